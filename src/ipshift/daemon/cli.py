"""Command-line pieces every daemon shares: `run` options (--metrics, --syslog), and the
`status` and `stop` commands that talk to a running instance's control socket.

    run = sub.add_parser("run"); add_run_options(run)
    ... run_service(service, options_from_args(args, socket=path))
    add_control_commands(sub, "tunnel", socket_for, render_status)
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ipshift.ctl.client import request
from ipshift.ctl.protocol import CtlError
from ipshift.ctl.render import render
from ipshift.daemon.metrics import address_problem
from ipshift.daemon.runtime import DaemonOptions
from ipshift.ui import UserError, setup_logging

SocketFor = Callable[[argparse.Namespace], Path]
Renderer = Callable[[dict[str, Any]], str]


def add_run_options(p: argparse.ArgumentParser, *, metrics: bool = True) -> None:
    if metrics:
        p.add_argument("--metrics", metavar="ADDRESS:PORT",
                       help="serve Prometheus metrics on ADDRESS:PORT (e.g. 127.0.0.1:9465)")
    p.add_argument("--syslog", action=argparse.BooleanOptionalAction, default=None,
                   help="also log to syslog (default: yes, unless stderr goes to the "
                        "systemd journal already)")


def start_logging(args: argparse.Namespace, verbosity: int, ident: str) -> None:
    """Daemons log routine events at INFO (one -v: DEBUG); to stderr, and to syslog as
    --syslog says (by default unless systemd's journal already reads stderr)."""
    syslog = getattr(args, "syslog", None)
    if syslog is None:
        syslog = "JOURNAL_STREAM" not in os.environ
    setup_logging(verbosity + 1, syslog=syslog, ident=ident)


def options_from_args(args: argparse.Namespace, *, socket: Path | None) -> DaemonOptions:
    metrics = getattr(args, "metrics", None)
    if metrics:
        problem = address_problem(metrics)
        if problem:
            raise UserError(f"--metrics: {problem}")
    return DaemonOptions(socket=socket, metrics=metrics)


def call(path: Path, method: str, **params: Any) -> Any:
    try:
        return request(path, method, **params)
    except CtlError as exc:
        raise UserError(exc.message) from exc


def show_status(path: Path, *, as_json: bool, renderer: Renderer | None = None) -> int:
    doc = call(path, "status")
    if as_json or renderer is None or not isinstance(doc, dict):
        print(render(doc, as_json=as_json))
    else:
        print(renderer(doc))
    return 0


def stop_instance(path: Path, timeout: float) -> int:
    """Ask the daemon to stop and wait until its control socket is gone (it removes the
    socket last, after everything it installed)."""
    call(path, "stop")
    deadline = time.monotonic() + timeout
    while path.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    if path.exists():
        raise UserError(f"the daemon on {path} did not stop within {timeout:g}s")
    print("stopped")
    return 0


def add_control_commands(sub: Any, what: str, add_target: Callable[[argparse.ArgumentParser],
                                                                   None],
                         socket_for: SocketFor, renderer: Renderer | None = None) -> None:
    """`status [--json]` and `stop [--timeout S]` subcommands of a component."""
    st = sub.add_parser("status", help=f"show a running {what}'s state and counters")
    add_target(st)
    st.add_argument("--json", action="store_true", help="machine-readable output")
    st.set_defaults(handler=lambda args: show_status(socket_for(args), as_json=args.json,
                                                     renderer=renderer))
    sp = sub.add_parser("stop", help=f"stop a running {what} (it removes what it installed)")
    add_target(sp)
    sp.add_argument("--timeout", type=float, default=15.0, metavar="SECONDS",
                    help="how long to wait for it to finish (default 15)")
    sp.set_defaults(handler=lambda args: stop_instance(socket_for(args), args.timeout))
