"""The PCP / NAT-PMP responder of the RSIP gateway: the I/O around `MappingEngine`.

One UDP socket on port 5351 (every local address, with packet info: a request counts only if
it came in on INT_IF and to the gateway's internal address), one owned nft table of port
forwards (ipshift.rsip.portmap), conntrack for PEER lookups. On start it announces itself
(PCP ANNOUNCE and NAT-PMP's public address to 224.0.0.1:5350, ten times over two minutes),
so clients of a restarted gateway make their mappings again.

Datagrams are read in batches: every request of a batch is decided, their forwards go into
the kernel in one nft transaction, and only then are the replies sent, so a client that got
its answer can be reached at once.

    responder = PcpResponder(responder_config(gateway_config, own, internal), leases)
    await responder.start(rt)         # rt: the daemon runtime (owned-state record, ...)
    responder.status(); responder.metrics()
    responder.external_address_changed(new)   # EXT_IF renumbered: mappings go, clients told
    await responder.stop()            # the table goes, the ports go back to the leases

`python -m ipshift.rsip.responder --int-if eth1 --internal 192.0.2.1/24 --external
203.0.113.1` runs the responder alone on the runtime with a lease table of its own (tests,
benchmarks, and gateways that lease no ports by RSIP).
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import logging
import socket
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ipshift.daemon import (
    NFT_TABLE,
    DaemonOptions,
    EnginePump,
    Metric,
    Runtime,
    StartError,
    counter,
    gauge,
    run_service,
)
from ipshift.net import udp
from ipshift.net.errors import NetError
from ipshift.net.nft import Nft
from ipshift.net.nfttable import OwnedTable
from ipshift.rsip.config import GatewayConfig
from ipshift.rsip.leases import LeasePolicy, Leases
from ipshift.rsip.mapping import (
    TCP,
    UDP,
    AddForward,
    AddPeer,
    LookupFlow,
    MappingEngine,
    PcpConfig,
    PortAuthority,
    RemoveForward,
    RemovePeer,
    Report,
    Send,
    SetFilters,
)
from ipshift.rsip.portmap import FAMILY, OWNER, PortMap

log = logging.getLogger("ipshift.rsip")

READ_BATCH = 64           # datagrams decided before their forwards go to the kernel together
FLOW_SWEEP_INTERVAL = 0.1  # seconds between conntrack sweeps (each walks the whole table)
LEASE_TICK = 5.0          # seconds between quarantine sweeps of a stand-alone lease table


def responder_config(gateway: GatewayConfig, own: ipaddress.IPv4Address,
                     internal: ipaddress.IPv4Interface) -> PcpConfig:
    """The responder's settings from the gateway's (rsipd.conf): mappings on EXT_IF's address
    (or the first POOL address when POOL leaves it out), requests on INT_IF from its network,
    THIRD_PARTY as PCP_THIRD_PARTY says, and the gateway's own RSIP ports never forwarded."""
    external = own if not gateway.pool or own in gateway.pool else gateway.pool[0]
    reserved = frozenset({(TCP, gateway.port), (UDP, gateway.port), (UDP, gateway.tunnel_port)})
    return PcpConfig(external_address=external, internal_address=internal.ip,
                     internal_interface=gateway.int_if, internal_networks=(internal.network,),
                     instance=gateway.name, netns=gateway.netns,
                     third_party=gateway.pcp_third_party, reserved_ports=reserved)


class PcpResponder:
    """The responder as a part of a daemon: start(rt) / stop() / status() / metrics()."""

    def __init__(self, config: PcpConfig, authority: PortAuthority) -> None:
        self.config = config
        self.authority = authority
        self.engine: MappingEngine | None = None
        self.portmap: PortMap | None = None
        self.counters = {"received": 0, "replied": 0, "send_failed": 0, "receive_failed": 0,
                         "kernel_failed": 0, "lookup_failed": 0}
        self._rt: Runtime | None = None
        self._nft: Nft | None = None
        self._sock: socket.socket | None = None
        self._pump: EnginePump | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ifindex = -1
        self._sweep: asyncio.Future[int] | None = None
        self._sweep_timer: asyncio.TimerHandle | None = None
        self._last_sweep = float("-inf")

    # --- start and stop ----------------------------------------------------------------------
    async def start(self, rt: Runtime) -> None:
        config = self.config
        loop = asyncio.get_running_loop()
        self._loop, self._rt = loop, rt
        self._nft = Nft(config.netns)
        table = OwnedTable(self._nft, FAMILY, OWNER, config.instance)
        rt.record.add(NFT_TABLE, table.spec)
        self.portmap = PortMap(table, config.internal_interface)
        try:
            self.portmap.install()
        except NetError as exc:
            raise StartError(f"cannot create the PCP port forwards: {exc}") from exc
        try:
            self._sock = udp.open_with_destination(socket.AF_INET, config.port,
                                                   netns_name=config.netns)
        except NetError as exc:
            raise StartError(f"{exc} (is another PCP or NAT-PMP server such as miniupnpd "
                             "running? stop it first)") from exc
        try:
            self._ifindex = udp.interface_index(self._sock, config.internal_interface)
        except NetError as exc:
            raise StartError(f"PCP: {exc} (the internal interface, INT_IF)") from exc
        self.engine = MappingEngine(config, self.authority, loop.time())
        self._pump = EnginePump(loop, self.engine, self._apply, after=self._sweep_flows)
        loop.add_reader(self._sock.fileno(), self._readable)
        self._pump.run()
        log.info("PCP/NAT-PMP on %s (%s) port %d: mappings on %s, table %s",
                 config.internal_interface, config.internal_address, config.port,
                 config.external_address, table.spec)

    async def stop(self) -> None:
        loop = self._loop
        if self._sock is not None:
            if loop is not None:
                loop.remove_reader(self._sock.fileno())
            self._sock.close()
            self._sock = None
        if self._pump is not None:
            self._pump.stop()
        if self._sweep_timer is not None:
            self._sweep_timer.cancel()
        if self._sweep is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._sweep), 5.0)
            except Exception as exc:  # the table goes anyway, and the flows with it
                log.debug("PCP: the last conntrack sweep: %s", exc)
        if self.engine is not None and loop is not None:
            self.engine.release_all(loop.time())
        if self.portmap is not None:
            try:
                self.portmap.delete()
                if self._rt is not None:
                    self._rt.record.discard(NFT_TABLE, self.portmap.table.spec)
            except NetError as exc:
                log.warning("removing nftables table %s: %s", self.portmap.table.spec, exc)
            self.portmap.close()
        if self._nft is not None:
            self._nft.close()
            self._nft = None

    def external_address_changed(self, address: ipaddress.IPv4Address | None) -> None:
        """EXT_IF's address changed (or went): every mapping goes, the epoch starts again and
        the clients are told (for the gateway daemon's address watch)."""
        if self.engine is None or self._pump is None or self._loop is None:
            return
        self.engine.set_external_address(address, self._loop.time())
        self._pump.run()

    # --- requests ----------------------------------------------------------------------------
    def _readable(self) -> None:
        sock, engine, pump, loop = self._sock, self.engine, self._pump, self._loop
        if sock is None or engine is None or pump is None or loop is None:
            return
        try:
            batch = udp.recv_batch_with_destination(sock, READ_BATCH)
        except (NetError, OSError) as exc:
            self.counters["receive_failed"] += 1
            log.debug("PCP: receive failed: %s", exc)
            return
        now = loop.time()
        replies: list[tuple[bytes, tuple[str, int]]] = []
        for datagram in batch:
            source = (str(datagram.source[0]), int(datagram.source[1]))
            reply = engine.receive(datagram.data, source, now,
                                   destination=datagram.destination,
                                   inside=datagram.ifindex == self._ifindex)
            if reply is not None:
                replies.append((reply, source))
        self.counters["received"] += len(batch)
        pump.run()  # the batch's forwards are in the kernel before any reply leaves
        for data, destination in replies:
            self._send(data, destination)

    def _sweep_flows(self) -> None:
        """End the flows of removed forwards (and stale UDP entries of new ones) on a worker
        thread: one sweep at a time, at most every FLOW_SWEEP_INTERVAL, never in the way of
        a reply."""
        loop, portmap = self._loop, self.portmap
        if loop is None or portmap is None or self._sweep is not None \
                or self._sweep_timer is not None or not portmap.flow_work_queued:
            return
        wait = self._last_sweep + FLOW_SWEEP_INTERVAL - loop.time()
        if wait > 0:
            def later() -> None:
                self._sweep_timer = None
                self._sweep_flows()

            self._sweep_timer = loop.call_later(wait, later)
            return
        work = portmap.take_flow_work()
        if not work:
            return
        self._last_sweep = loop.time()
        self._sweep = loop.run_in_executor(None, portmap.end_flows, work)
        self._sweep.add_done_callback(self._swept)

    def _swept(self, future: asyncio.Future[int]) -> None:
        self._sweep = None
        if not future.cancelled() and future.exception() is not None:
            log.warning("PCP: conntrack sweep failed: %s", future.exception())
        if self._sock is not None:  # not stopping
            self._sweep_flows()

    def _send(self, data: bytes, destination: tuple[str, int]) -> None:
        if self._sock is None:
            return
        try:
            # from the internal address: what clients sent to, and for the multicast
            # announcements the interface that address is on
            udp.send_from(self._sock, data, destination, str(self.config.internal_address))
            self.counters["replied"] += 1
        except OSError:
            self.counters["send_failed"] += 1

    def _apply(self, actions: Sequence[Any]) -> None:
        assert self.portmap is not None and self.engine is not None and self._loop is not None
        changes = [a for a in actions
                   if isinstance(a, AddForward | RemoveForward | SetFilters | AddPeer |
                                 RemovePeer)]
        if changes:
            failed = self.portmap.apply(changes)
            self.counters["kernel_failed"] += len(failed)
        for action in actions:
            if isinstance(action, LookupFlow):
                try:
                    external = self.portmap.lookup_flow(action)
                except NetError as exc:
                    self.counters["lookup_failed"] += 1
                    log.debug("PCP: conntrack lookup failed: %s", exc)
                    external = None
                self.engine.flow_found(action.token, external, self._loop.time())
            elif isinstance(action, Send):
                self._send(action.data, action.destination)
            elif isinstance(action, Report):
                level = {"warning": logging.WARNING, "debug": logging.DEBUG}.get(action.level,
                                                                                logging.INFO)
                log.log(level, "%s", action.message)

    # --- status ------------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        if self.engine is None or self._loop is None or self.portmap is None:
            return {}
        doc = self.engine.status(self._loop.time())
        doc["listen"] = f"{self.config.internal_interface} {self.config.internal_address}:" \
                        f"{self.config.port}"
        doc["kernel"] = {"table": self.portmap.table.spec,
                         "forwards": len(self.portmap.forwards),
                         "peers": len(self.portmap.peers),
                         "filtered": len(self.portmap.filters),
                         "split_transactions": self.portmap.failures,
                         "flows_ended": self.portmap.flows_ended}
        doc["io"] = dict(self.counters)
        return doc

    def metrics(self) -> list[Metric]:
        engine = self.engine
        if engine is None:
            return []
        prefix = "ipshift_rsip_pcp"
        forwards, pins = engine.sizes()
        out = [gauge(f"{prefix}_mappings", forwards, "mappings held, by kind", kind="map"),
               gauge(f"{prefix}_mappings", pins, "mappings held, by kind", kind="peer")]
        for key, value in sorted(engine.counters.items()):
            out.append(counter(f"{prefix}_decisions", value,
                               "requests and mappings by what was decided", decision=key))
        for key, value in self.counters.items():
            out.append(counter(f"{prefix}_io", value, "datagrams and kernel calls", event=key))
        return out


class PcpService:
    """The responder alone on the daemon runtime, with a lease table of its own."""

    component = "pcp"
    adopts: frozenset[str] = frozenset()

    def __init__(self, config: PcpConfig, policy: LeasePolicy) -> None:
        self.instance = config.instance
        self.netns = config.netns
        self.leases = Leases(policy)
        self.responder = PcpResponder(config, self.leases)

    async def start(self, rt: Runtime) -> None:
        await self.responder.start(rt)
        loop = asyncio.get_running_loop()

        def sweep() -> None:  # quarantined ports become free again
            self.leases.expire(loop.time())

        rt.every(LEASE_TICK, sweep, "sweeping the leases")

    async def stop(self) -> None:
        await self.responder.stop()

    def status(self) -> dict[str, Any]:
        return {"pcp": self.responder.status(), "usage": self.leases.usage()}

    def metrics(self) -> list[Metric]:
        return self.responder.metrics()


def _range(text: str) -> tuple[int, int]:
    low, _, high = text.partition("-")
    try:
        return int(low), int(high or low)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r} is not FIRST-LAST") from exc


def build_parser() -> argparse.ArgumentParser:
    from ipshift.daemon.cli import add_run_options

    p = argparse.ArgumentParser(
        prog="python -m ipshift.rsip.responder",
        description="The rsip gateway's PCP/NAT-PMP responder alone, with its own leases.")
    p.add_argument("--int-if", required=True, help="the internal interface (INT_IF)")
    p.add_argument("--internal", required=True, type=ipaddress.IPv4Interface,
                   metavar="ADDRESS/PREFIX", help="the gateway's address on INT_IF")
    p.add_argument("--external", required=True, type=ipaddress.IPv4Address,
                   metavar="ADDRESS", help="the public address mappings are made on")
    p.add_argument("--name", default="default", help="instance name (nft table suffix)")
    p.add_argument("--port-range", type=_range, default=(8192, 32767), metavar="FIRST-LAST",
                   help="ports handed out when a suggestion cannot be had")
    p.add_argument("--min-lifetime", type=int, default=120)
    p.add_argument("--max-lifetime", type=int, default=86400)
    p.add_argument("--max-per-host", type=int, default=1024)
    p.add_argument("--host-rate", type=float, default=1000.0,
                   help="requests per second per host before they are dropped")
    p.add_argument("--third-party", action="store_true", help="honour THIRD_PARTY")
    p.add_argument("--no-pcp", dest="pcp", action="store_false")
    p.add_argument("--no-natpmp", dest="natpmp", action="store_false")
    p.add_argument("--no-announce", dest="announce", action="store_false")
    p.add_argument("--socket", type=Path, help="control socket")
    p.add_argument("--run-dir", type=Path, help="locks and owned-state records")
    p.add_argument("-v", "--verbose", action="count", default=0)
    add_run_options(p)
    p.set_defaults(handler=_run)
    return p


def _run(args: argparse.Namespace) -> int:
    from ipshift.daemon.cli import start_logging
    from ipshift.ui import UserError

    start_logging(args, args.verbose, "ipshift-pcp")
    internal: ipaddress.IPv4Interface = args.internal
    try:
        config = PcpConfig(
            external_address=args.external, internal_address=internal.ip,
            internal_interface=args.int_if, internal_networks=(internal.network,),
            instance=args.name, pcp=args.pcp, natpmp=args.natpmp, announce=args.announce,
            third_party=args.third_party, min_lifetime=args.min_lifetime,
            max_lifetime=args.max_lifetime, max_per_host=args.max_per_host,
            host_rate=args.host_rate, host_burst=max(args.host_rate, 1.0))
        policy = LeasePolicy(pool=(args.external,), port_range=args.port_range,
                             max_lease=float(args.max_lifetime))
    except ValueError as exc:
        raise UserError(str(exc)) from exc
    return run_service(PcpService(config, policy), DaemonOptions(
        socket=args.socket, metrics=args.metrics, run_dir=args.run_dir))


def main(argv: Sequence[str] | None = None) -> int:
    from ipshift.daemon.cli import entry_point

    return entry_point(build_parser, argv)


if __name__ == "__main__":
    sys.exit(main())
