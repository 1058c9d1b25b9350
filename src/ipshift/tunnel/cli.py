"""`ipshift tunnel`: run a UDP tunnel over a TUN device, show its counters, change its peers
while it runs, make key files."""

from __future__ import annotations

import argparse
import ipaddress
import os
from pathlib import Path
from typing import Any

from ipshift.ctl.render import render, table
from ipshift.daemon.cli import (
    add_control_commands,
    add_run_options,
    call,
    options_from_args,
    start_logging,
)
from ipshift.tunnel.config import AddressMapping, ConfigError, Endpoint, TunnelConfig
from ipshift.tunnel.peerfile import (
    load_peer_entries,
    load_peers,
    peer_entry,
    peer_request,
)
from ipshift.tunnel.peers import Encapsulation, Peer
from ipshift.ui import UserError

EXAMPLE_PEERS = "examples/tunnel-peers.toml"


def config_from_args(args: argparse.Namespace) -> TunnelConfig:
    try:
        local, *extra_local = [Endpoint.parse(text, "--local") for text in args.local]
        if len(extra_local) > 1:
            raise ConfigError("--local is given at most twice: one IPv4 and one IPv6 endpoint")
        return TunnelConfig(
            dev=args.dev,
            local=local,
            extra_local=extra_local[0] if extra_local else None,
            remote=Endpoint.parse(args.remote, "--remote") if args.remote is not None else None,
            peers=_peers_of(args),
            headroom=args.headroom,
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


def _peers_of(args: argparse.Namespace) -> tuple[Peer, ...]:
    """--peers FILE, or nothing for a --remote tunnel (exactly one of the two)."""
    if args.remote is not None and args.peers is not None:
        raise ConfigError("--remote and --peers exclude each other: give one peer with "
                          "--remote ADDR:PORT, or several in the --peers file")
    if args.remote is None and args.peers is None:
        raise ConfigError("no peer: give it with --remote ADDR:PORT, or several with --peers "
                          f"FILE (see {EXAMPLE_PEERS})")
    if args.peers is None:
        return ()
    peers = load_peers(args.peers)
    if not peers:
        raise ConfigError(f"{args.peers} lists no peers; add [[peer]] tables (see "
                          f"{EXAMPLE_PEERS})")
    return peers


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
        description="Create TUN device DEV and carry its packets to the peer (--remote) or "
        "the peers (--peers FILE) over UDP, IP-in-IP or GRE; TSO "
        "super-packets cross whole in MTU-sized chunks (docs/tunnel.md). Foreground; logs to "
        "stderr and syslog; SIGUSR1 logs the status; `ipshift tunnel stop --dev DEV` ends it.",
    )
    run.add_argument("--dev", required=True, metavar="NAME", help="TUN device to create")
    run.add_argument("--local", required=True, action="append", metavar="ADDR:PORT",
                     help="local UDP endpoint ([v6]:port for IPv6); give it twice, an IPv4 "
                          "and an IPv6 one, to serve peers of both families")
    run.add_argument("--remote", metavar="ADDR:PORT",
                     help="the peer's endpoint (a point-to-point tunnel; or --peers)")
    run.add_argument("--peers", metavar="FILE",
                     help="the peers, from a TOML file of [[peer]] tables (instead of "
                          "--remote); `ipshift tunnel peers` changes them while it runs")
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
    run.add_argument("--headroom", type=int, default=0, metavar="N",
                     help="bytes the tunnel MTU leaves for hooks that add headers (default 0)")
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
    _register_peers(ts)
    keygen = ts.add_parser(
        "keygen", help="write a new peer authentication key file (mode 0600)",
        description="Write a new random 32-byte key, in base64, to FILE (created with mode "
        "0600; an existing file is never overwritten), or print it. Give the same key file to "
        "both ends (key_file in the peers file, or --key-file).")
    keygen.add_argument("file", nargs="?", metavar="FILE",
                        help="where to write it (default: print it)")
    keygen.set_defaults(handler=_keygen)


# --- `ipshift tunnel peers` ------------------------------------------------------------------
# How the keys of a peer description are given to `peers set`, for its error messages.
SET_OPTIONS = {
    "name": "NAME", "endpoint": "--endpoint", "encapsulation": "--encapsulation",
    "prefixes": "--prefix", "addresses": "--address", "port_ranges": "--port-range",
    "extra_sources": "--extra-source", "gre_key": "--gre-key", "key_file": "--key-file",
}
# Per-peer counters that count packets dropped or refused for the peer.
PEER_DROPS = ("foreign_source", "foreign_destination", "malformed", "hook_drops",
              "send_errors", "auth_refused", "reports_refused")
PEER_COLUMNS = ("name", "endpoint", "encap", "owns", "auth", "datagrams out/in",
                "bytes out/in", "drops")
OWNS_SHOWN = 2  # entries of a peer listed in the table (--json has them all)


def render_peers(doc: dict[str, Any]) -> str:
    """The answer of the "peers" control method, for people."""
    peers = doc.get("peers") or []
    lines = [f"generation {doc.get('generation', '-')}, {len(peers)} "
             f"peer{'' if len(peers) == 1 else 's'}"]
    lines.append(table([_peer_row(peer) for peer in peers], PEER_COLUMNS))
    drops = {reason: count for reason, count in (doc.get("drops") or {}).items() if count}
    lines.append("drops: " + (", ".join(f"{reason} {count}" for reason, count in drops.items())
                              or "none"))
    return "\n".join(lines)


def _peer_row(peer: dict[str, Any]) -> dict[str, Any]:
    counters = peer.get("counters") or {}
    encapsulation = str(peer.get("encapsulation", Encapsulation.UDP))
    if peer.get("gre_key") is not None:
        encapsulation += f" key {peer['gre_key']}"
    owns = [*peer.get("prefixes", []), *peer.get("addresses", []),
            *peer.get("port_ranges", [])]
    owned = ",".join(str(entry) for entry in owns[:OWNS_SHOWN]) or "-"
    if len(owns) > OWNS_SHOWN:
        owned += f" (+{len(owns) - OWNS_SHOWN})"
    if peer.get("extra_sources"):
        owned += f"; from {','.join(str(p) for p in peer['extra_sources'])}"
    drops = ",".join(f"{reason}:{counters[reason]}" for reason in PEER_DROPS
                     if counters.get(reason))
    return {
        "name": peer.get("name"), "endpoint": peer.get("endpoint"),
        "encap": encapsulation, "owns": owned,
        "auth": "yes" if peer.get("authenticated") else "no",
        "datagrams out/in": f"{_amount(counters.get('datagrams_out'))}/"
                            f"{_amount(counters.get('datagrams_in'))}",
        "bytes out/in": f"{_amount(counters.get('tun_read_bytes'))}/"
                        f"{_amount(counters.get('receive_bytes'))}",
        "drops": drops or "-",
    }


def _amount(value: object) -> str:
    """A counter, short: 9999, 12.3k, 456M, ... (exact figures with --json)."""
    if not isinstance(value, int) or isinstance(value, bool):
        return "-"
    if value < 10_000:
        return str(value)
    scaled, shown = float(value), ""
    for unit in ("k", "M", "G", "T", "P", "E"):
        if scaled < 999.5:
            break
        scaled, shown = scaled / 1000, unit
    return (f"{scaled:.1f}" if scaled < 99.95 else f"{scaled:.0f}") + shown


def _peers_show(args: argparse.Namespace) -> int:
    doc = call(_peers_socket(args), "peers")
    if args.json or not isinstance(doc, dict):
        print(render(doc, as_json=args.json))
    else:
        print(render_peers(doc))
    return 0


def _peers_set(args: argparse.Namespace) -> int:
    fields: dict[str, Any] = {"name": args.name, "endpoint": args.endpoint}
    optional = {"encapsulation": args.encapsulation, "prefixes": args.prefixes,
                "addresses": args.addresses, "port_ranges": args.port_ranges,
                "extra_sources": args.extra_sources, "gre_key": args.gre_key,
                "key_file": args.key_file}
    fields.update({key: value for key, value in optional.items() if value not in (None, [])})
    try:
        entry = peer_entry(fields, f"peer {args.name!r}", key_name=SET_OPTIONS.__getitem__)
    except ConfigError as exc:
        raise UserError(str(exc)) from exc
    result = call(_peers_socket(args), "peer-set", **peer_request(entry.peer, entry.key_file))
    _report(args, result, f"peer {args.name!r} "
                          f"{'added' if _get(result, 'added') else 'updated'}")
    return 0


def _peers_remove(args: argparse.Namespace) -> int:
    result = call(_peers_socket(args), "peer-remove", name=args.name)
    _report(args, result, f"peer {args.name!r} removed")
    return 0


def _peers_load(args: argparse.Namespace) -> int:
    # Checked here first, so that a mistake is named against the file the user typed; then
    # the daemon reads the file itself (thousands of peers do not fit a control request).
    path = os.path.abspath(args.file)
    try:
        entries = load_peer_entries(path)
    except ConfigError as exc:
        raise UserError(str(exc)) from exc
    if not entries:
        raise UserError(f"{args.file} lists no peers; to remove peers one by one use "
                        "`ipshift tunnel peers --dev DEV remove NAME`")
    result = call(_peers_socket(args), "peers-load", path=path)
    _report(args, result, f"{len(entries)} peer{'' if len(entries) == 1 else 's'} of "
                          f"{args.file} in force")
    return 0


def _get(result: object, key: str) -> Any:
    return result.get(key) if isinstance(result, dict) else None


def _report(args: argparse.Namespace, result: object, done: str) -> None:
    if args.json:
        print(render(result, as_json=True))
    else:
        print(f"{done} (generation {_get(result, 'generation')})")


def _add_peers_options(p: argparse.ArgumentParser, *, inherited: bool) -> None:
    """--dev, --socket and --json of `peers`, also taken after its ACTION (there they default
    to nothing, so as not to undo what came before the ACTION)."""
    default = argparse.SUPPRESS if inherited else None
    p.add_argument("--dev", metavar="NAME", default=default,
                   help="the tunnel's TUN device (required)")
    p.add_argument("--socket", metavar="PATH", default=default,
                   help="control socket, if not the default")
    p.add_argument("--json", action="store_true",
                   default=argparse.SUPPRESS if inherited else False,
                   help="machine-readable output")


def _peers_socket(args: argparse.Namespace) -> Path:
    if args.dev is None and args.socket is None:
        raise UserError("no tunnel given: name its device with --dev NAME (ipshift tunnel "
                        "peers --dev NAME ...)")
    return _socket_path(args)


def _register_peers(ts: Any) -> None:
    peers = ts.add_parser(
        "peers", help="list a running tunnel's peers and their counters, or change them",
        description="Without ACTION: the peers of the tunnel on DEV, what each owns, whether "
        "it authenticates, its counters, and the drops of the whole table. The tunnel must "
        "have been started with --peers FILE to change them. --dev, --socket and --json go "
        "before or after ACTION.",
        epilog="e.g. ipshift tunnel peers --dev tun0 set branch2 --endpoint 192.0.2.3:4789 "
               "--prefix 198.51.100.64/26")
    _add_peers_options(peers, inherited=False)
    peers.set_defaults(handler=_peers_show)
    actions = peers.add_subparsers(dest="peers_command", metavar="ACTION")

    set_ = actions.add_parser(
        "set", help="add a peer, or replace the one of that name (whole: what is not given "
                    "is gone)",
        description="Add peer NAME, or replace the peer of that name with this description "
        "(entries not given again are removed, and without --key-file it no longer "
        "authenticates). The daemon reads the key file itself.")
    set_.add_argument("name", metavar="NAME", help="the peer's name")
    set_.add_argument("--endpoint", required=True, metavar="ADDR:PORT",
                      help="its underlay endpoint ([v6]:PORT for IPv6; for ipip and gre just "
                           "the address)")
    set_.add_argument("--encapsulation", choices=[str(e) for e in Encapsulation],
                      help="udp (default): ipshift's framing; ipip or gre: raw IP-in-IP or GRE")
    set_.add_argument("--prefix", dest="prefixes", action="append", default=[],
                      metavar="PREFIX", help="inner destinations routed to it, longest prefix "
                                             "wins (repeatable)")
    set_.add_argument("--address", dest="addresses", action="append", default=[],
                      metavar="ADDRESS", help="a whole inner address it owns (repeatable)")
    set_.add_argument("--port-range", dest="port_ranges", action="append", default=[],
                      metavar="ADDRESS/PROTO/FIRST-LAST",
                      help="a share of an address by ports, e.g. 203.0.113.7/tcp/1024-2047 "
                           "(repeatable)")
    set_.add_argument("--extra-source", dest="extra_sources", action="append", default=[],
                      metavar="PREFIX", help="inner sources it may use besides what it owns "
                                             "(repeatable)")
    set_.add_argument("--gre-key", type=int, metavar="K", help="its GRE key (gre peers)")
    set_.add_argument("--key-file", metavar="FILE",
                      help="its authentication key file (`ipshift tunnel keygen`)")
    _add_peers_options(set_, inherited=True)
    set_.set_defaults(handler=_peers_set)

    remove = actions.add_parser("remove", help="remove a peer",
                                description="Remove peer NAME from the running tunnel.")
    remove.add_argument("name", metavar="NAME", help="the peer's name")
    _add_peers_options(remove, inherited=True)
    remove.set_defaults(handler=_peers_remove)

    load = actions.add_parser(
        "load", help="make the peers exactly those of a peers file",
        description="Replace the tunnel's peers with those of FILE, at once: peers not in "
        "it are removed, unchanged ones keep their state. The file is checked here first; "
        "the daemon reads the key files.")
    load.add_argument("file", metavar="FILE", help="a peers file (TOML, [[peer]] tables)")
    _add_peers_options(load, inherited=True)
    load.set_defaults(handler=_peers_load)


def _keygen(args: argparse.Namespace) -> int:
    from ipshift.tunnel.auth import format_key_file, generate_key, write_key_file

    comment = "ipshift tunnel peer key: the same file at both ends; keep it secret"
    key = generate_key()
    if args.file is None:
        print(format_key_file(key, comment), end="")
        return 0
    try:
        write_key_file(args.file, key, comment)
    except FileExistsError as exc:
        raise UserError(f"{args.file} exists; keygen never overwrites a key: remove it first "
                        "or give another name") from exc
    except OSError as exc:
        raise UserError(f"cannot create {args.file}: {exc.strerror}") from exc
    except ValueError as exc:
        raise UserError(f"{args.file!r} is not a usable path") from exc
    print(f"wrote a new key to {args.file} (mode 0600); copy it to the peer over a secure "
          "channel")
    return 0
