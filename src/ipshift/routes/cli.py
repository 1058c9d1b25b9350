"""`ipshift routes run|check|status|stop`."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from ipshift.ctl.protocol import socket_path
from ipshift.ctl.render import render, table
from ipshift.daemon import run_service
from ipshift.daemon.cli import (
    add_run_options,
    call,
    options_from_args,
    start_logging,
    stop_instance,
)
from ipshift.daemon.instance import name_problem
from ipshift.routes import config
from ipshift.routes.model import PROFILES, RoutesConfig
from ipshift.ui import UserError

UPLINK_COLUMNS = ("uplink", "interface", "gateway", "state", "rtt_ms", "loss_pct", "targets_up",
                  "last_change", "reason")
ROUTE_COLUMNS = ("route", "active", "state")


def _socket(args: argparse.Namespace, name: str = "routes") -> Path:
    if getattr(args, "socket", None):
        return Path(args.socket)
    name = getattr(args, "name", None) or name
    problem = name_problem(name, "daemon name")
    if problem:
        raise UserError(f"--name: {problem}")
    return socket_path(name)


def _load(args: argparse.Namespace) -> RoutesConfig:
    try:
        cfg = config.load(args.config)
    except config.ConfigError as exc:
        more = len([p for p in exc.problems if p.severity == "error"]) - 1
        hint = f" (and {more} more: run `ipshift routes check -c {args.config}`)" if more > 0 \
            else ""
        raise UserError(f"{exc}{hint}") from exc
    if getattr(args, "profile", None):
        cfg = cfg.with_profile(args.profile)
    return cfg


def _run(args: argparse.Namespace) -> int:
    if args.metrics is not None:
        problem = config.metrics_problem(args.metrics)
        if problem:
            raise UserError(f"--metrics: {problem}")
    if os.geteuid() != 0:
        raise UserError("the routes daemon changes routes and sends raw probes: run it as root")
    cfg = _load(args)
    from ipshift.routes.daemon import RoutesDaemon

    path = Path(args.socket) if args.socket else socket_path(cfg.settings.name)
    metrics = args.metrics if args.metrics is not None else cfg.settings.metrics
    options = options_from_args(argparse.Namespace(metrics=metrics), socket=path)
    start_logging(args, args.verbose, "ipshift-routes")
    try:
        return run_service(RoutesDaemon(cfg), options)
    except PermissionError as exc:
        raise UserError(f"permission denied: {exc.strerror} (run as root)") from exc


def _check(args: argparse.Namespace) -> int:
    cfg, problems = config.check(args.config, live=args.live)
    for p in problems:
        print(p)
    errors = [p for p in problems if p.severity == "error"]
    if cfg is not None and not errors:
        groups = cfg.groups()
        alts = sum(1 for g in groups.values() if len(g) > 1)
        multi = sum(1 for r in cfg.routes if len(r.nexthops) > 1)
        print(f"{args.config}: ok: {len(cfg.uplinks)} uplinks "
              f"({', '.join(u.name for u in cfg.uplinks)}), {len(cfg.rules)} rules, "
              f"{len(cfg.routes)} routes ({alts} alternative groups, {multi} multipath)")
        return 0
    print(f"{args.config}: {len(errors)} error(s)", file=sys.stderr)
    return 1


def _status(args: argparse.Namespace) -> int:
    doc: Any = call(_socket(args), "status")
    if args.json:
        print(render(doc, as_json=True))
        return 0
    daemon = doc.get("daemon", {})
    print(render({k: v for k, v in daemon.items()}, as_json=False))
    print("uplinks:")
    rows = [{c: r.get(c) for c in UPLINK_COLUMNS} for r in doc.get("uplinks", [])]
    print("  " + table(rows, UPLINK_COLUMNS).replace("\n", "\n  "))
    print("routes:")
    rows = [{c: r.get(c) for c in ROUTE_COLUMNS} for r in doc.get("routes", [])]
    print("  " + table(rows, ROUTE_COLUMNS).replace("\n", "\n  "))
    errors = [r for r in doc.get("routes", []) if r.get("error")]
    for r in errors:
        print(f"  ! {r['error']}")
    return 0


def _stop(args: argparse.Namespace) -> int:
    return stop_instance(_socket(args), args.timeout)


def register(sub: Any) -> None:
    p = sub.add_parser("routes", help="alternative routes and dead gateway detection (seed 004)",
                       description="Watch uplinks' gateways and keep alternative, multipath and "
                                   "static routes and NAT correct across failures.")
    rs = p.add_subparsers(dest="routes_command", metavar="COMMAND")
    p.set_defaults(handler=lambda args: (p.print_help(), 2)[1])

    run = rs.add_parser("run", help="run the daemon in the foreground")
    run.add_argument("-c", "--config", required=True, help="TOML file or iproute2 command lines")
    run.add_argument("--socket", help="control socket (default /run/ipshift/<name>.sock)")
    run.add_argument("--profile", choices=sorted(PROFILES), help="probe profile for all uplinks")
    add_run_options(run)
    run.set_defaults(handler=_run)

    chk = rs.add_parser("check", help="validate a configuration, one line per problem")
    chk.add_argument("-c", "--config", required=True)
    chk.add_argument("--live", action="store_true",
                     help="also look at this machine (devices, rp_filter)")
    chk.set_defaults(handler=_check)

    st = rs.add_parser("status", help="per-uplink state, RTT, loss, last change; routes")
    st.add_argument("--json", action="store_true", help="machine-readable output")
    st.add_argument("--name", default="routes", help="daemon name (socket /run/ipshift/NAME.sock)")
    st.add_argument("--socket", help="control socket path")
    st.set_defaults(handler=_status)

    sp = rs.add_parser("stop", help="stop the daemon (it removes what it installed)")
    sp.add_argument("--name", default="routes")
    sp.add_argument("--socket", help="control socket path")
    sp.add_argument("--timeout", type=float, default=15.0)
    sp.set_defaults(handler=_stop)
