"""The RSIP client's command line: `rsipclient` (the seed's name) and `ipshift rsip client`.

    rsipclient [-s SERVER] [-p PORT] [-l PORT]... [-m MTU] [-n PORTS] [--transport tcp|udp]
               [--tunnel udp|ipip|gre] [--dev rsip0] ...        # runs in the foreground
    rsipclient status [--json]                                  # the krsip-style state
    rsipclient stop

`ipshift rsip client` is the same parser: its owner calls `add_client_arguments(parser)` and
hands the parsed arguments to `run(args)`.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
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
from ipshift.daemon.runtime import default_socket
from ipshift.ui import UserError

DEFAULT_DEV = "rsip0"


def _add_target(p: argparse.ArgumentParser, *, suppress: bool = False) -> None:
    # In the status and stop subcommands the defaults are suppressed, so that
    # `client --dev rsip1 status` keeps the --dev given before the action.
    default: Any = argparse.SUPPRESS if suppress else None
    p.add_argument("--dev", metavar="NAME", default=default if suppress else DEFAULT_DEV,
                   help=f"the tunnel device, which names the client instance (default "
                        f"{DEFAULT_DEV})")
    p.add_argument("--socket", metavar="PATH", default=default,
                   help="control socket (default: /run/ipshift/rsipclient-DEV.sock)")


def _socket_for(args: argparse.Namespace) -> Path:
    socket = getattr(args, "socket", None)
    if socket:
        return Path(socket)
    return default_socket("rsipclient", getattr(args, "dev", None) or DEFAULT_DEV)


def _ports(text: str) -> tuple[int, int]:
    first, _, last = text.partition("-")
    try:
        low, high = int(first), int(last or first)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not PORT or FIRST-LAST") from None
    if not 1 <= low <= high <= 0xFFFF:
        raise argparse.ArgumentTypeError(f"{text!r}: ports are 1-65535, FIRST <= LAST")
    return low, high


def _address(text: str) -> ipaddress.IPv4Address:
    try:
        return ipaddress.IPv4Address(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an IPv4 address") from None


def add_client_arguments(parser: argparse.ArgumentParser) -> None:
    """The client's options (the seed's -s, -p, -l, -m, -n and ipshift's own), and its
    `status` and `stop` actions."""
    p = parser
    p.add_argument("-s", "--server", type=_address, metavar="ADDRESS",
                   help="the RSIP server's (internal) address (default: the default gateway)")
    p.add_argument("-p", "--port", type=int, metavar="PORT",
                   help="the RSIP server's port (default 4555)")
    p.add_argument("-l", "--listen", type=int, action="append", metavar="PORT", default=[],
                   help="ask for PORT of the public address, so that the Internet reaches a "
                        "server here (repeatable)")
    p.add_argument("-m", "--mtu", type=int, metavar="MTU",
                   help="MTU of the tunnel device (default: what the path to the gateway "
                        "carries; keep it below the gateway's MTU)")
    p.add_argument("-n", "--ports", type=int, metavar="N",
                   help="ports to lease for outgoing connections (default 255, at most 255)")
    p.add_argument("--transport", choices=("tcp", "udp"),
                   help="RSIP over TCP (default) or over UDP with retransmissions")
    p.add_argument("--tunnel", choices=("udp", "ipip", "gre"),
                   help="the tunnel asked for: ipshift's UDP framing (default; IP-IP if the "
                        "gateway lacks it), IP-in-IP or GRE")
    p.add_argument("--tunnel-port", dest="tunnel_port", type=int, metavar="PORT",
                   help="this host's UDP port of the UDP tunnel (default 4556)")
    p.add_argument("--lease", type=int, metavar="SECONDS",
                   help="lease time to ask for (default: the server's)")
    p.add_argument("--no-auto-listen", dest="auto_listen", action="store_false",
                   help="do not ask for the ports applications start listening on")
    p.add_argument("--ignore-port", dest="ignore_ports", type=_ports, action="append",
                   metavar="PORT[-LAST]", default=[],
                   help="never ask for these ports on behalf of a listening application "
                        "(repeatable; e.g. 22 for a local ssh server)")
    p.add_argument("--scan-interval", dest="scan_interval", type=float, metavar="SECONDS",
                   help="how often listening sockets are looked at (default 1)")
    _add_target(p)
    p.add_argument("-v", "--verbose", action="count", default=0)
    add_run_options(p)
    actions = p.add_subparsers(dest="client_command", metavar="ACTION")
    add_control_commands(actions, "RSIP client",
                         lambda sub: _add_target(sub, suppress=True), _socket_for,
                         render_status)


def client_config_from(args: argparse.Namespace) -> Any:
    """The ClientConfig the arguments describe; UserError (one line) if they do not fit."""
    from ipshift.rsip.client import ClientSettings, TunnelKind
    from ipshift.rsip.clientd import ClientConfig

    settings: dict[str, Any] = {"listens": tuple(args.listen or ()),
                                "auto_listen": bool(args.auto_listen),
                                "ignored_ports": tuple(args.ignore_ports or ())}
    for option, key in (("ports", "ports"), ("transport", "transport"),
                        ("tunnel_port", "tunnel_port"), ("lease", "lease")):
        value = getattr(args, option, None)
        if value is not None:
            settings[key] = value
    if args.tunnel:
        settings["tunnel"] = TunnelKind(args.tunnel)
    config: dict[str, Any] = {"server": args.server, "dev": args.dev or DEFAULT_DEV,
                              "mtu": args.mtu}
    if args.port is not None:
        config["port"] = args.port
    if args.scan_interval is not None:
        config["scan_interval"] = args.scan_interval
    try:
        return ClientConfig(settings=ClientSettings(**settings), **config)
    except ValueError as exc:
        raise UserError(str(exc)) from exc


def run(args: argparse.Namespace) -> int:
    """Run the client in the foreground (or the action given: status, stop)."""
    handler = getattr(args, "handler", None)
    if getattr(args, "client_command", None) and handler is not None and handler is not run:
        result: int = handler(args)
        return result
    from ipshift.rsip.clientd import run_client

    config = client_config_from(args)
    sock = _socket_for(args)
    options = options_from_args(args, socket=sock)
    if os.geteuid() != 0:
        raise UserError("You must be root to run the RSIP client (it creates a tunnel device, "
                        "routes and nftables state)")
    start_logging(args, args.verbose, "rsipclient")
    return run_client(config, socket_path=sock, metrics=options.metrics)


def render_status(doc: dict[str, Any]) -> str:
    """The client's state in the shape of the seed's /proc/sys/net/krsip/state."""
    client = doc.get("client") or {}
    rows = [("STATE", "CLIENT ID", "RLT", "PROTO", "SERVER", "PORT", "TUNNEL"),
            (str(client.get("state", "?")), _text(client.get("client_id")),
             _text(client.get("registration_s")), str(client.get("transport", "?")),
             str(client.get("server", "?")), _text(client.get("port")),
             str(client.get("tunnel", "?")))]
    lines = _table(rows)
    binds = doc.get("binds") or []
    bind_rows = [("LEASED ADDRESS", "PORTS", "BIND ID", "LEASE TIME", "USED")]
    bind_rows += [(str(b.get("address")), str(b.get("ports")), _text(b.get("bind_id")),
                   _text(b.get("lease_s")), _text(b.get("used", 0))) for b in binds]
    lines += _table(bind_rows)
    ignored = doc.get("ignored_ports") or []
    lines.append("RULES (policy ACCEPT)")
    lines += [f"I{entry}" for entry in ignored]
    refused = [port for port, entry in (doc.get("listens") or {}).items()
               if isinstance(entry, dict) and entry.get("state") == "refused"]
    if refused:
        lines.append(f"refused by the server: {', '.join(refused)}")
    if client.get("tunnel_kind"):
        endpoint = client.get("endpoint")
        if client.get("gateway_udp_port"):
            endpoint = f"{endpoint}:{client['gateway_udp_port']}"
        lines.append(f"tunnel {client['tunnel_kind']} to {endpoint} from {client.get('local')}"
                     + (f", MTU {client['mtu']}" if client.get("mtu") else "")
                     + (f", local ports {client['port_range']}" if client.get("port_range")
                        else ""))
    return "\n".join(lines)


def _text(value: Any) -> str:
    return "-" if value is None else str(value)


def _table(rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))
            .rstrip() for row in rows]


def main(argv: Sequence[str] | None = None) -> int:
    """The `rsipclient` console command."""
    def build() -> argparse.ArgumentParser:
        p = argparse.ArgumentParser(prog="rsipclient",
                                    description="lease a public address and ports from an "
                                                "RSIP gateway and send Internet traffic "
                                                "through its tunnel")
        add_client_arguments(p)
        p.set_defaults(handler=run)
        return p

    return entry_point(build, argv)
