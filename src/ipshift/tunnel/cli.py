"""`ipshift tunnel`: run a UDP tunnel over a TUN device, show its counters."""

from __future__ import annotations

import argparse
import ipaddress
import os
from pathlib import Path
from typing import Any

from ipshift.daemon.cli import (
    add_control_commands,
    add_run_options,
    options_from_args,
    start_logging,
)
from ipshift.tunnel.config import AddressMapping, ConfigError, Endpoint, TunnelConfig
from ipshift.ui import UserError


def config_from_args(args: argparse.Namespace) -> TunnelConfig:
    try:
        return TunnelConfig(
            dev=args.dev,
            local=Endpoint.parse(args.local, "--local"),
            remote=Endpoint.parse(args.remote, "--remote"),
            addresses=tuple(_interface(a) for a in args.address),
            routes=tuple(_network(r) for r in args.route),
            mtu=args.mtu,
            queues=args.queues,
            framing=args.framing,
            rewrite_src=tuple(AddressMapping.parse(m, "--rewrite-src") for m in args.rewrite_src),
            rewrite_dst=tuple(AddressMapping.parse(m, "--rewrite-dst") for m in args.rewrite_dst),
            serve=_serve(args.serve),
        )
    except ConfigError as exc:
        raise UserError(str(exc)) from exc


def _serve(entries: list[str]) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] | None:
    """--serve PREFIX (repeatable), or `any` for every destination."""
    if any(entry.lower() == "any" for entry in entries):
        return None
    try:
        return tuple(ipaddress.ip_network(entry) for entry in entries)
    except ValueError as exc:
        raise ConfigError(f"--serve: {exc}; give a prefix such as 198.51.100.0/24 (host bits "
                          "zero) or `any`") from exc


def _interface(text: str) -> ipaddress.IPv4Interface | ipaddress.IPv6Interface:
    try:
        return ipaddress.ip_interface(text)
    except ValueError as exc:
        raise ConfigError(f"--address {text!r} is not ADDRESS/PREFIXLEN") from exc


def _network(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    try:
        return ipaddress.ip_network(text, strict=False)
    except ValueError as exc:
        raise ConfigError(f"--route {text!r} is not a prefix such as 198.51.100.0/24") from exc


def _socket_path(args: argparse.Namespace) -> Path:
    from ipshift.ctl import socket_path
    from ipshift.tunnel.daemon import ctl_name

    return Path(args.socket) if args.socket else socket_path(ctl_name(args.dev))


def _run(args: argparse.Namespace) -> int:
    from ipshift.tunnel.daemon import run_daemon

    config = config_from_args(args)
    options = options_from_args(args, socket=_socket_path(args))
    if os.geteuid() != 0:
        raise UserError("the tunnel creates a TUN device: run it as root")
    start_logging(args, args.verbose, "ipshift-tunnel")
    return run_daemon(config, socket_path=options.socket, metrics=options.metrics)


def _add_target(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dev", required=True, metavar="NAME", help="the tunnel's TUN device")
    p.add_argument("--socket", metavar="PATH", help="control socket, if not the default")


def register(sub: Any) -> None:
    p = sub.add_parser(
        "tunnel", help="UDP tunnel over a TUN device (offloaded user-space data path)"
    )
    ts = p.add_subparsers(dest="tunnel_command", metavar="ACTION", required=True)
    run = ts.add_parser(
        "run",
        help="create the TUN device and forward until SIGTERM/SIGINT (foreground)",
        description="Create TUN device DEV and carry its packets to the peer over UDP; TSO "
        "super-packets cross whole in MTU-sized chunks (docs/tunnel.md). Foreground; logs to "
        "stderr and syslog; SIGUSR1 logs the status; `ipshift tunnel stop --dev DEV` ends it.",
    )
    run.add_argument("--dev", required=True, metavar="NAME", help="TUN device to create")
    run.add_argument("--local", required=True, metavar="ADDR:PORT",
                     help="local UDP endpoint ([v6]:port for IPv6)")
    run.add_argument("--remote", required=True, metavar="ADDR:PORT", help="the peer's endpoint")
    run.add_argument("--address", action="append", default=[], metavar="CIDR",
                     help="address for the TUN device (repeatable)")
    run.add_argument("--route", action="append", default=[], metavar="PREFIX",
                     help="route PREFIX through the tunnel (repeatable)")
    run.add_argument("--serve", action="append", default=[], metavar="PREFIX",
                     help="inner destinations accepted from the tunnel besides this end's own "
                          "addresses: the networks behind a gateway (repeatable); `any` accepts "
                          "all (a relay)")
    run.add_argument("--mtu", type=int, metavar="N",
                     help="tunnel MTU (default: the path MTU to the peer minus 32, or 52 over "
                          "IPv6)")
    run.add_argument("--queues", type=int, default=1, metavar="N",
                     help="TUN queues, one worker process each; uses UDP ports PORT..PORT+N-1 "
                          "at both ends (default 1)")
    run.add_argument("--framing", choices=("batch", "packet"), default="batch",
                     help="batch (default): TSO super-packets cross whole, in MTU-sized chunks; "
                          "packet: one inner packet per datagram, for peers that speak only "
                          "that (docs/tunnel.md)")
    run.add_argument("--rewrite-src", action="append", default=[], metavar="OLD=NEW",
                     help="rewrite source OLD to NEW entering the tunnel, and destination NEW "
                          "back to OLD leaving it (repeatable)")
    run.add_argument("--rewrite-dst", action="append", default=[], metavar="OLD=NEW",
                     help="rewrite destination OLD to NEW entering the tunnel, and source NEW "
                          "back to OLD leaving it (repeatable)")
    run.add_argument("--socket", metavar="PATH",
                     help="control socket (default /run/ipshift/tunnel-DEV.sock)")
    add_run_options(run)
    run.set_defaults(handler=_run)
    add_control_commands(ts, "tunnel", _add_target, _socket_path)
