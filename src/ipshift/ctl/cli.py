"""`ipshift ctl`: talk to any daemon's control socket directly (status, ping, raw calls)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ipshift.ctl.client import request
from ipshift.ctl.protocol import MAX_REQUEST, CtlError, decode_message, socket_path
from ipshift.ctl.render import render
from ipshift.ui import UserError


def _call(args: argparse.Namespace) -> int:
    path = Path(args.socket) if "/" in args.socket else socket_path(args.socket)
    params: dict[str, Any] = {}
    if args.params:
        try:  # the wire's own rules: one JSON object, no NaN, bounded size and nesting
            params = decode_message(args.params.encode("utf-8", "surrogateescape"),
                                    limit=MAX_REQUEST)
        except CtlError as exc:
            raise UserError(f"--params: {exc.message}") from exc
    try:
        result = request(path, args.method, **params)
    except CtlError as exc:
        raise UserError(exc.message) from exc
    print(render(result, as_json=args.json))
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser("ctl", help="call a daemon's control socket")
    p.add_argument("socket", help="daemon name (socket under /run/ipshift/) or socket path")
    p.add_argument("method", nargs="?", default="status", help="method to call (default: status)")
    p.add_argument("--params", help="JSON object of parameters")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(handler=_call)
