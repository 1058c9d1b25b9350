"""Command-line pieces every daemon shares: `run` options (--metrics, --syslog), and the
`status` and `stop` commands that talk to a running instance's control socket.

    run = sub.add_parser("run"); add_run_options(run)
    ... run_service(service, options_from_args(args, socket=path))
    add_control_commands(sub, "tunnel", socket_for, render_status)
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ipshift.ctl.client import request
from ipshift.ctl.protocol import CtlError
from ipshift.ctl.render import render
from ipshift.daemon.metrics import address_problem
from ipshift.daemon.owned import OwnedRecord
from ipshift.daemon.runtime import DaemonOptions, remove_leftovers
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


def call(path: Path, method: str, /, **params: Any) -> Any:
    try:
        return request(path, method, **params)
    except CtlError as exc:
        raise UserError(exc.message) from exc


def entry_point(build: Callable[[], argparse.ArgumentParser],
                argv: Sequence[str] | None = None) -> int:
    """The body of a stand-alone console command (`ip_resend`, `rsipd`, ...): parse, run the
    handler, and turn a UserError into one line on stderr and exit status 2."""
    parser = build()
    args = parser.parse_args(argv)
    try:
        result: int = args.handler(args)
        return result
    except UserError as exc:
        print(f"{parser.prog}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # a reader that closed early (`| head`): quiet, as shell tools are
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


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


# --- `ipshift daemons`: every instance on this host ------------------------------------------
def _namespaces_by_inode() -> dict[int, str | None]:
    """inode -> name of the namespaces a cleanup can enter (None: this process's own)."""
    out: dict[int, str | None] = {}
    netns_dir = Path("/run/netns")
    if netns_dir.is_dir():
        for entry in sorted(netns_dir.iterdir()):
            with contextlib.suppress(OSError):
                out[entry.stat().st_ino] = entry.name
    with contextlib.suppress(OSError):
        out[os.stat("/proc/self/ns/net").st_ino] = None
    return out


def list_instances(run_dir: Path) -> list[dict[str, Any]]:
    """Every instance that ever ran from `run_dir`: running or not, and what it holds (for
    a running one) or left behind (for a stopped one killed before it could clean up)."""
    directory = run_dir / "instances"
    namespaces = _namespaces_by_inode()
    rows = []
    for lock in sorted(directory.glob("*.lock")) if directory.is_dir() else []:
        component, _, rest = lock.stem.partition(".")
        name, _, inode = rest.rpartition(".")
        running, pid = _probe_lock(lock)
        record_path = lock.with_suffix(".json")
        owned = OwnedRecord(record_path).previous if record_path.exists() else {}
        ino = int(inode) if inode.isdigit() else -1
        known = ino in namespaces
        rows.append({
            "component": component, "name": name,
            # a namespace that no longer exists took everything in it along
            "netns": (namespaces[ino] or "-") if known else f"gone (inode {inode})",
            "running": running, "pid": pid if running else None,
            "owned": sorted(f"{kind} {item}" for kind, items in owned.items() for item in items),
            "_record": record_path, "_netns": namespaces.get(ino), "_ns_known": known,
        })
    return rows


def _probe_lock(path: Path) -> tuple[bool, int | None]:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False, None
    try:
        text = os.pread(fd, 32, 0).decode(errors="replace").strip()
        pid = int(text) if text.isdigit() else None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return True, pid
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False, pid
    finally:
        os.close(fd)


def _daemons(args: argparse.Namespace) -> int:
    from ipshift.ctl import protocol
    from ipshift.ctl.render import table

    rows = list_instances(protocol.DEFAULT_DIR)
    if args.clean:
        if os.geteuid() != 0:
            raise UserError("cleaning up after stopped daemons changes the kernel: run as root")
        for row in rows:
            if row["running"] or not row["owned"]:
                continue
            record = OwnedRecord(row["_record"])
            if row["_ns_known"]:
                remove_leftovers(record, row["_netns"], frozenset())
            record.previous.clear()
            record.remove()
            print(f"cleaned up after {row['component']} {row['name']!r}: "
                  f"{', '.join(row['owned'])}")
            row["owned"] = []
    shown = [{k: v for k, v in row.items() if not k.startswith("_")} for row in rows]
    if args.json:
        print(render(shown, as_json=True))
    elif not args.clean:
        print(table([{**r, "owned": len(r["owned"])} for r in shown],
                    ("component", "name", "netns", "running", "pid", "owned")))
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser("daemons", help="the ipshift daemons of this host, and what stopped ones "
                                       "left behind")
    p.add_argument("--clean", action="store_true",
                   help="remove what daemons killed before they could clean up left behind "
                        "(nft tables, addresses on lo, routes and rules)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(handler=_daemons)
