"""`ip_resend_wakeup`: tell a running ip_resend the new address (or `stop`, `term`).

It runs from pppd's ip-up while the first packets wait, so it imports as little as it can:
its start-up time adds to the first answer's delay.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from ipshift.ctl import CtlError, request
from ipshift.ctl.client import CONNECT_FAILURES
from ipshift.ctl.protocol import DEFAULT_DIR

SOCKET_DIR = DEFAULT_DIR / "resend"


class WakeupFailed(Exception):
    """One line for the user: why the message did not get through."""


def default_socket(interface: str) -> Path:
    """The seed derived the socket from the interface under /var/ip_resend/; the same rule,
    under the run directory every ipshift daemon uses."""
    if not interface or "/" in interface or interface in (".", ".."):
        raise WakeupFailed(f"invalid interface name {interface!r}")
    return SOCKET_DIR / interface


def add_target_options(p: argparse.ArgumentParser) -> None:
    target = p.add_mutually_exclusive_group()
    target.add_argument("-d", dest="interface", metavar="NETWORK_INTERFACE",
                        help="the interface ip_resend was started for")
    target.add_argument("-o", dest="outgoing", metavar="NETWORK_INTERFACE",
                        help="same as -d (the form the seed's ip-up example uses)")
    target.add_argument("-c", dest="socket", metavar="PF_UNIX_PATH",
                        help="the communication socket")


def socket_from_args(args: argparse.Namespace) -> Path:
    """The socket named by -c, or derived from -d / -o."""
    if args.socket:
        return Path(args.socket)
    iface = args.interface or args.outgoing
    if not iface:
        raise WakeupFailed("say which ip_resend to reach: -d INTERFACE, -o INTERFACE or -c PATH")
    return default_socket(iface)


def send_wakeup(path: Path, message: str) -> str:
    try:
        answer = request(path, "wakeup", message=message)
    except CtlError as exc:
        if exc.code == "not-running":
            raise WakeupFailed(f"Unable to reach ip_resend on {path}: not running") from exc
        if exc.code in CONNECT_FAILURES:  # permission, not a socket, ...: say which
            raise WakeupFailed(f"Unable to reach ip_resend: {exc.message}") from exc
        raise WakeupFailed(f"ip_resend on {path}: {exc.message}") from exc
    return str(answer)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="ip_resend_wakeup",
                                description="tell ip_resend the new address (or stop/term)")
    p.add_argument("-m", dest="message", required=True, metavar="WAKEUP_MESSAGE",
                   help="new address(es), 'stop' or 'term'")
    add_target_options(p)
    args = p.parse_args(argv)
    try:
        answer = send_wakeup(socket_from_args(args), args.message)
    except WakeupFailed as exc:
        print(f"ip_resend_wakeup: {exc}", file=sys.stderr)
        return 2
    print(f"ip_resend: {answer}")
    if not accelerated(args.message, answer):
        print(f"ip_resend_wakeup: nothing was accelerated ({answer})", file=sys.stderr)
        return 1
    return 0


def accelerated(message: str, answer: str) -> bool:
    """Whether the daemon's answer to `message` did what the caller wanted: packets resent
    for an address, the cycle stopped for `stop` and `term`."""
    if message.strip() in ("stop", "term"):
        return True
    return answer.startswith("resent ") and (not answer.startswith("resent 0 ")
                                             or "already resent by the link" in answer)


if __name__ == "__main__":
    sys.exit(main())
