"""`ipshift sacip run|status|stop|fingerprint`.

    ipshift sacip run [--config FILE] [--name NAME] [--socket PATH] [--port N] [--tofu|--pinned]
    ipshift sacip status [--json]        # sessions (original -> current tuple), peers, keys
    ipshift sacip fingerprint            # this host's key, to pin on the other end
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from ipshift.daemon.cli import (
    add_control_commands,
    add_run_options,
    options_from_args,
    start_logging,
)
from ipshift.daemon.runtime import default_socket
from ipshift.ui import UserError


def _add_target(p: argparse.ArgumentParser) -> None:
    p.add_argument("--name", default="default",
                   help="the instance name (default: default; one daemon per namespace)")
    p.add_argument("--socket", metavar="PATH",
                   help="control socket (default: /run/ipshift/sacip-NAME.sock)")


def _socket_for(args: argparse.Namespace) -> Path:
    return Path(args.socket) if args.socket else default_socket("sacip", args.name)


def _config(args: argparse.Namespace) -> Any:
    from ipshift.sacip.config import ConfigError, SacipConfig, load_config

    overrides: dict[str, Any] = {"name": args.name}
    for key in ("port", "identity", "known_peers", "scan_interval", "move_timeout"):
        value = getattr(args, key, None)
        if value is not None:
            overrides[key] = Path(value) if key in ("identity", "known_peers") else value
    if getattr(args, "trust", None):
        overrides["trust"] = args.trust
    if getattr(args, "reset_unpreservable", False):
        overrides["reset_unpreservable"] = True
    try:
        if args.config:
            return load_config(args.config, **overrides)
        return SacipConfig(**overrides)
    except ConfigError as exc:
        raise UserError(str(exc)) from exc


def _run(args: argparse.Namespace) -> int:
    from ipshift.sacip.daemon import run_daemon

    config = _config(args)
    sock = _socket_for(args)
    options = options_from_args(args, socket=sock)
    if os.geteuid() != 0:
        raise UserError("sacip changes addresses and nftables: run it as root")
    start_logging(args, args.verbose, "ipshift-sacip")
    return run_daemon(config, socket_path=sock, metrics=options.metrics)


def _fingerprint(args: argparse.Namespace) -> int:
    from ipshift.sacip.crypto import load_identity

    config = _config(args)
    try:
        identity = load_identity(str(config.identity), create=False)
    except (ValueError, OSError) as exc:
        raise UserError(f"{config.identity}: {exc} (the daemon makes the key on its first "
                        "start)") from exc
    print(identity.fingerprint)
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser("sacip", help="sessions that survive address changes at either end")
    actions = p.add_subparsers(dest="sacip_command", metavar="ACTION", required=True)
    run = actions.add_parser("run", help="keep this host's sessions across address changes")
    _add_target(run)
    run.add_argument("--config", metavar="FILE", help="a sacip TOML file (see docs/sacip.md)")
    run.add_argument("--port", type=int, help="UDP port of the daemons (default 7366)")
    run.add_argument("--identity", metavar="FILE",
                     help="this host's key file (default /var/lib/ipshift/sacip.key)")
    run.add_argument("--known-peers", dest="known_peers", metavar="FILE",
                     help="trust-on-first-use memory (default "
                          "/var/lib/ipshift/sacip-known.json)")
    run.add_argument("--trust", choices=("tofu", "pinned"),
                     help="trust peers on first use (default) or only pinned ones")
    run.add_argument("--scan-interval", dest="scan_interval", type=float, metavar="SECONDS",
                     help="seconds between looks at the sessions (default 1)")
    run.add_argument("--move-timeout", dest="move_timeout", type=float, metavar="SECONDS",
                     help="how long sessions of a lost address wait for a new one "
                          "(default 120)")
    run.add_argument("--reset-unpreservable", action="store_true",
                     help="reset sessions a move cannot keep at once instead of letting "
                          "them hang")
    run.add_argument("-v", "--verbose", action="count", default=0)
    add_run_options(run)
    run.set_defaults(handler=_run)
    fp = actions.add_parser("fingerprint", help="print this host's key fingerprint")
    _add_target(fp)
    fp.add_argument("--config", metavar="FILE")
    fp.add_argument("--identity", metavar="FILE")
    fp.set_defaults(handler=_fingerprint)
    add_control_commands(actions, "sacip daemon", _add_target, _socket_for)
