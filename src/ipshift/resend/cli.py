"""Command lines of resend: the seed's `ip_resend` and `ip_resend_wakeup`, and `ipshift resend`.

    ip_resend  -o OUTGOING_INTERFACE [-s SNOOP_INTERFACE] [-c COMMUNICATION_SOCKET]
               [-w WAKEUP_WAIT_MAX] [-{r|R} RESPONSE_WAIT_MAX] [-d DEBUG_LEVEL] [--persistent]
    ip_resend_wakeup  -m WAKEUP_MESSAGE {-d NETWORK_INTERFACE | -o NETWORK_INTERFACE | -c PATH}
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ipshift.daemon.cli import (
    add_control_commands,
    add_run_options,
    entry_point,
    options_from_args,
    start_logging,
)
from ipshift.resend.engine import ResendConfig
from ipshift.resend.wakeup import (
    SOCKET_DIR,
    WakeupFailed,
    accelerated,
    add_target_options,
    default_socket,
    send_wakeup,
    socket_from_args,
)
from ipshift.ui import UserError


def _add_run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("-o", dest="outgoing", required=True, metavar="OUTGOING_INTERFACE",
                   help="the demand-dial interface the packets are resent on")
    p.add_argument("-s", dest="snoop", metavar="SNOOP_INTERFACE",
                   help="where outgoing packets are snooped (default: the outgoing interface; "
                        "diald's proxy interface, e.g. sl0)")
    p.add_argument("-c", dest="socket", metavar="COMMUNICATION_SOCKET",
                   help=f"unix socket for ip_resend_wakeup (default: {SOCKET_DIR}/<interface>)")
    p.add_argument("-w", dest="wakeup_wait", type=float, default=10.0, metavar="WAKEUP_WAIT_MAX",
                   help="seconds to wait for the wakeup after the first packet (default 10)")
    resp = p.add_mutually_exclusive_group()
    resp.add_argument("-r", dest="response_wait", type=float, metavar="RESPONSE_WAIT_MAX",
                      help="seconds to wait for replies and map them back (default 10; "
                           "0: resend only)")
    resp.add_argument("-R", dest="watch_wait", type=float, metavar="RESPONSE_WAIT_MAX",
                      help="wait for replies like -r but do not translate them")
    p.add_argument("-d", dest="debug", type=int, default=0, metavar="DEBUG_LEVEL",
                   help="0 warnings, 1 progress, 2 and more details")
    p.add_argument("--persistent", action="store_true",
                   help="re-arm after each dial cycle instead of exiting")
    p.add_argument("--max-packets", type=int, default=64,
                   help="packets captured per cycle (default 64)")
    add_run_options(p)


def config_from_args(args: argparse.Namespace) -> ResendConfig:
    translate = args.watch_wait is None
    wait = args.watch_wait if not translate else args.response_wait
    if wait is None:
        wait = 10.0
    for name, value in (("-w", args.wakeup_wait), ("-r/-R", wait)):
        if not 0 <= value < float("inf"):  # also refuses nan
            raise UserError(f"{name} must be a number of seconds, 0 or more (not {value})")
    if not 1 <= args.max_packets <= 4096:
        raise UserError("--max-packets must be within 1..4096")
    return ResendConfig(
        wakeup_wait=args.wakeup_wait,
        response_wait=wait,
        translate=translate,
        persistent=args.persistent,
        max_packets=args.max_packets,
    )


def _run(args: argparse.Namespace) -> int:
    from ipshift.resend.daemon import run_daemon

    config = config_from_args(args)
    try:
        sock = Path(args.socket) if args.socket else default_socket(args.outgoing)
    except WakeupFailed as exc:
        raise UserError(str(exc)) from exc
    options = options_from_args(args, socket=sock)
    if os.geteuid() != 0:
        raise UserError("ip_resend captures packets and changes nftables: run it as root")
    if not args.persistent and _handed_over(sock, args.outgoing):
        return 0
    start_logging(args, min(args.debug, 2), "ip_resend")
    return run_daemon(config, outgoing=args.outgoing, snoop=args.snoop or args.outgoing,
                      socket=sock, metrics=options.metrics)


def _handed_over(sock: Path, outgoing: str) -> bool:
    """A one-shot start while an instance for the interface still finishes its cycle (pppd's
    ip-down runs the seed's `exec ip_resend -o $1` right after a dial whose TCP connection
    lives on): that instance takes the next dial over, and this one has nothing to do. An
    instance that is ending is waited for (up to 5 s), then this one starts."""
    import time

    from ipshift.ctl import CtlError, request

    deadline = time.monotonic() + 5.0
    while True:
        try:
            answer = str(request(sock, "take-over"))
        except CtlError:
            return False  # none running (or one too old to take over): start as usual
        if answer != "is ending" or time.monotonic() > deadline:
            print(f"ip_resend: the running instance on {outgoing} {answer}")
            return True
        time.sleep(0.1)


def _socket_for(args: argparse.Namespace) -> Path:
    try:
        return socket_from_args(args)
    except WakeupFailed as exc:
        raise UserError(str(exc)) from exc


def _wakeup(args: argparse.Namespace) -> int:
    try:
        answer = send_wakeup(_socket_for(args), args.message)
    except WakeupFailed as exc:
        raise UserError(str(exc)) from exc
    print(f"ip_resend: {answer}")
    if not accelerated(args.message, answer):
        print(f"ipshift resend wakeup: nothing was accelerated ({answer})", file=sys.stderr)
        return 1
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser("resend", help="demand-dial first-packet accelerator (ip_resend)")
    rs = p.add_subparsers(dest="resend_command", metavar="ACTION", required=True)
    run = rs.add_parser("run", help="capture, resend and map back (same options as ip_resend)")
    _add_run_options(run)
    run.set_defaults(handler=_run)
    wk = rs.add_parser("wakeup", help="send a message (address, stop, term) to ip_resend")
    wk.add_argument("-m", dest="message", required=True, metavar="WAKEUP_MESSAGE")
    add_target_options(wk)
    wk.set_defaults(handler=_wakeup)
    add_control_commands(rs, "ip_resend", add_target_options, _socket_for)


def ip_resend_main(argv: Sequence[str] | None = None) -> int:
    def build() -> argparse.ArgumentParser:
        p = argparse.ArgumentParser(prog="ip_resend",
                                    description="demand-dial first-packet accelerator")
        _add_run_options(p)
        p.set_defaults(handler=_run)
        return p

    return entry_point(build, argv)
