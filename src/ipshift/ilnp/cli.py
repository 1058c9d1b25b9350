"""`ipshift ilnp node|status|stop|resolve` and the UDP proxy's commands.

    ipshift ilnp node CONFIG.toml         # an ILNPv6 node on the TUN device (docs/ilnp.md)
    ipshift ilnp status [--dev ilnp0]     # identifiers, locators, correspondents, counters
    ipshift ilnp resolve HOST             # HOST's application address, as the node finds it
    ipshift ilnp proxy PORT | proxy-create LOCAL_PORT HOST REMOTE_PORT | seed-node CONFIG
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from ipshift.daemon.cli import (
    add_control_commands,
    add_run_options,
    call,
    options_from_args,
    start_logging,
)
from ipshift.daemon.runtime import default_socket
from ipshift.ui import UserError


def _add_target(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dev", default="ilnp0", help="the node's TUN device (default: ilnp0)")
    p.add_argument("--socket", metavar="PATH",
                   help="control socket (default: /run/ipshift/ilnp-DEV.sock)")


def _socket_for(args: argparse.Namespace) -> Path:
    return Path(args.socket) if args.socket else default_socket("ilnp", args.dev)


def _node(args: argparse.Namespace) -> int:
    from ipshift.ilnp.config import NodeConfigError, load
    from ipshift.ilnp.node import run_node

    try:
        config = load(args.config)
    except NodeConfigError as exc:
        raise UserError(f"{args.config}: {exc}") from exc
    if os.geteuid() != 0:
        raise UserError("You must be root to run an ILNP node (it creates a TUN device)")
    sock = Path(args.socket) if args.socket else default_socket("ilnp", config.device)
    options = options_from_args(args, socket=sock)
    start_logging(args, args.verbose, "ipshift-ilnp")
    return run_node(config, socket_path=sock, metrics=options.metrics)


def _resolve(args: argparse.Namespace) -> int:
    answer = call(_socket_for(args), "resolve", name=args.host)
    print(f"{answer['name']}  {answer['address']}  (NID {answer['nid']}, {answer['source']})")
    return 0


def render_status(doc: dict[str, Any]) -> str:
    """`ipshift ilnp status` for people: the node, its locators, its correspondents."""
    node = doc.get("node", {})
    lines = [f"node {node.get('name')}  NID {node.get('nid')}  address {node.get('address')}"
             f"  ({node.get('device')}, UDP {node.get('port')}, checksum {node.get('checksum')}"
             f"{', router' if node.get('router') else ''}), moves {node.get('moves')}",
             "locators:"]
    for loc in node.get("locators", []):
        lines.append(f"  {loc['l64']:<24} pref {loc['preference']:<5} on {loc['interface']}"
                     f"  out {loc['packets_out']}  in {loc['packets_in']}")
    if not node.get("locators"):
        lines.append("  none (no address ending in the NID on a configured interface)")
    lines.append("correspondents (ILCC):")
    for cn in doc.get("correspondents", []):
        using = cn.get("using") or "no route"
        via = f" via {cn['via']}" if cn.get("via") else ""
        nonce = ("nonces: ours " + str(cn["nonce_out"]) + " bytes, theirs "
                 + ("known" if cn["nonce_in"] else "not yet"))
        lines.append(f"  {cn['nid']}  using {using}{via}  rtt {cn.get('rtt_ms')} ms  "
                     f"in {cn['packets_in']} out {cn['packets_out']}  {nonce}"
                     f"{'  LU pending' if cn.get('lu_pending') else ''}")
        for loc in cn.get("locators", []):
            lines.append(f"      {loc['l64']:<24} pref {loc['preference']:<5} "
                         f"from {loc['source']:<6} expires in {loc['expires_s']} s")
    if not doc.get("correspondents"):
        lines.append("  none")
    neighbours = doc.get("neighbours", [])
    if neighbours:
        lines.append("neighbours:")
        for n in neighbours:
            lines.append(f"  {n['name']:<20} {n['nid']}  {' '.join(n['locators'])}"
                         f"{'  router' if n['router'] else ''}  ({n['source']})")
    counters = doc.get("counters", {})
    lu = {k: v for k, v in counters.items() if k.startswith(("lu_", "acks"))}
    lines.append("locator updates: " + "  ".join(f"{k} {v}" for k, v in lu.items()))
    latency = doc.get("lu_latency_ms")
    if latency:
        lines.append(f"LU to ack: median {latency['median']} ms, max {latency['max']} ms "
                     f"({latency['count']})")
    drops = {**counters.get("drops", {}), **{
        k: v for k, v in counters.get("datapath", {}).items() if v and k not in (
            "nonce_added", "nonce_removed", "to_control")}}
    lines.append("drops: " + ("  ".join(f"{k} {v}" for k, v in sorted(drops.items()))
                              or "none"))
    return "\n".join(lines)


def register(sub: Any) -> None:
    p = sub.add_parser("ilnp", help="the Identifier-Locator Network Protocol: a node, its "
                                    "TUN interface and UDP proxy")
    actions = p.add_subparsers(dest="ilnp_command", metavar="ACTION", required=True)
    node = actions.add_parser("node", help="run an ILNPv6 node (TUN device, mobility, "
                                           "multihoming, DNS)")
    node.add_argument("config", metavar="CONFIG", help="the node's TOML file (docs/ilnp.md)")
    node.add_argument("--socket", metavar="PATH",
                      help="control socket (default: /run/ipshift/ilnp-DEVICE.sock)")
    node.add_argument("-v", "--verbose", action="count", default=0)
    add_run_options(node)
    node.set_defaults(handler=_node)
    add_control_commands(actions, "ILNP node", _add_target, _socket_for, render_status)
    resolve = actions.add_parser("resolve", help="a host's application address (discovery, "
                                                 "configuration or DNS)")
    resolve.add_argument("host")
    _add_target(resolve)
    resolve.set_defaults(handler=_resolve)
    from ipshift.ilnp.proxycli import add_proxy_commands

    add_proxy_commands(actions)
