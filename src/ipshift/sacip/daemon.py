"""The sacip daemon: the engine fed from the kernel, its actions applied to it.

    service = SacipService(config)
    run_service(service, DaemonOptions(socket=path))

What it holds in the kernel (all recorded in the runtime's owned-state record, and taken over
by the next run after a kill -9, so that a restart keeps the sessions moved):
- the nft table `ipshift_sacip_<name>` with the flow remaps (`ipshift.net.remap`);
- old addresses kept on lo (`ipshift.net.loaddr`, identifiers only: never picked as a source);
- two UDP sockets on the sacip port (IPv4 and IPv6) for the daemons' own messages.

Inputs: rtnetlink (addresses and routes: a move starts when a global address leaves its
interface; a new source toward each peer is looked up after every change while sessions
wait), sock_diag every `scan_interval` (the sessions), the UDP sockets.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import os
import socket
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from ipshift.daemon import (
    LO_ADDRESS,
    NFT_TABLE,
    QUEUE_RULE,
    DaemonOptions,
    EnginePump,
    Metric,
    Runtime,
    StartError,
    close_watched,
    counter,
    gauge,
    run_service,
)
from ipshift.daemon.kernel import close_remap_table, kept_addresses, remap_table
from ipshift.net import udp
from ipshift.net.errors import NetError
from ipshift.net.loaddr import LoAddresses
from ipshift.net.netlink import Netlink
from ipshift.net.netlink.objects import Address, Route
from ipshift.net.netlink.watch import ADDED, REMOVED, KernelWatcher
from ipshift.net.nfqueue import NfQueue, QueueRule
from ipshift.net.nft import Nft
from ipshift.net.remap import FlowRemaps
from ipshift.net.sockdiag import SockDiag
from ipshift.packet.errors import PacketError
from ipshift.sacip.config import SacipConfig
from ipshift.sacip.crypto import CryptoError, Identity, load_identity
from ipshift.sacip.engine import (
    Action,
    Flow,
    KeepAddress,
    ReleaseAddress,
    Remaps,
    RememberPeer,
    Report,
    ResetFlows,
    SacipEngine,
    Send,
)
from ipshift.sacip.icmpmap import ICMP_ERRORS, ICMPV6_ERRORS, map_error

log = logging.getLogger("ipshift.sacip")

# sock_diag state bits: the TCP states in which a session has a peer and may still send
# (established, the closing ones, TIME_WAIT for its last ACKs); UDP: connected sockets.
_TCP_STATES = sum(1 << s for s in (1, 4, 5, 6, 8, 9, 11))
_UDP_CONNECTED = 1 << 1
RT_SCOPE_UNIVERSE = 0


def _plain(address: str) -> str:
    """An IPv4-mapped IPv6 address (a v6 socket talking IPv4) as the IPv4 address it is."""
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ip)


def read_known(path: Path) -> dict[str, str]:
    """The known-peers file: {address: fingerprint}; missing means empty."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise StartError(f"cannot read the known-peers file {path}: {exc}") from exc
    if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                             for k, v in data.items()):
        raise StartError(f"{path} is not a known-peers file (an object of address: "
                         "fingerprint); move it away to start afresh")
    return data


def write_known(path: Path, known: dict[str, str]) -> None:
    """Atomically, mode 0600 (it says whom this host trusts)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, tmp = tempfile.mkstemp(prefix=".known-", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(dict(sorted(known.items())), handle, indent=1)
            handle.write("\n")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


class SacipService:
    component = "sacip"
    adopts = frozenset({NFT_TABLE, LO_ADDRESS})  # a restart keeps the moved sessions

    def __init__(self, config: SacipConfig) -> None:
        self.config = config
        self.instance = config.name
        self.netns = config.netns
        self.engine: SacipEngine | None = None
        self.pump: EnginePump | None = None
        self._rt: Runtime | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._netlink: Netlink | None = None
        self._watcher: KernelWatcher | None = None
        self._lo: LoAddresses | None = None
        self._nft: Nft | None = None
        self._remaps: FlowRemaps | None = None
        self._diag: SockDiag | None = None
        self._sockets: dict[int, socket.socket] = {}
        self._queue: NfQueue | None = None
        self._queue_rules: list[QueueRule] = []
        self.icmp_mapped = 0
        self.icmp_passed = 0
        self.icmp_malformed = 0
        self.errors = 0
        self.scans = 0

    # --- lifecycle ------------------------------------------------------------------------
    async def start(self, rt: Runtime) -> None:
        self._rt = rt
        self._loop = rt.loop
        config = self.config
        try:
            identity = load_identity(str(config.identity), create=True)
        except (CryptoError, ValueError, OSError) as exc:
            raise StartError(f"identity key {config.identity}: {exc}") from exc
        known = read_known(config.known_peers)
        try:
            adopted = self._open_kernel(rt)
        except (NetError, OSError) as exc:
            self._close_kernel()
            raise StartError(f"cannot start sacip: {exc}") from exc
        now = rt.loop.time()
        self.engine = SacipEngine(config, identity, now, known=known)
        self.pump = EnginePump(rt.loop, self.engine, self._apply_all)
        for remap in adopted:
            self.engine.adopt(remap, now)
        self._scan()
        assert self._lo is not None
        self._apply_all(self.engine.actions())
        self._lo.release_unused()  # kept by a killed run for sessions that are gone
        rt.every(config.scan_interval, self._scan, "looking at the sessions")
        log.info("sacip up: identity %s, port %d, %d session(s), %d adopted remap(s)",
                 identity.fingerprint, config.port, len(self.engine.sessions_by_flow),
                 len(adopted))

    def _open_kernel(self, rt: Runtime) -> list[Any]:
        config, netns = self.config, self.netns
        self._netlink = Netlink(netns)
        self._lo = kept_addresses(rt, self._netlink, identifier_only=True, adopt=True)
        # subscribed before the first scan: a move that happens meanwhile is not missed
        self._watcher = KernelWatcher(netns, ("link", "address", "route"),
                                      netlink=self._netlink)
        assert self._loop is not None
        self._loop.add_reader(self._watcher.fileno(), self._on_netlink)
        self._nft = Nft(netns)
        # a killed predecessor's remaps are taken over: its sessions stay moved
        self._remaps, found = remap_table(rt, self._nft, "sacip", config.name, adopt=True)
        adopted = list(found)
        self._diag = SockDiag(netns)
        for family in (socket.AF_INET, socket.AF_INET6):
            try:
                sock = udp.open_with_destination(family, config.port, netns_name=netns)
            except NetError as exc:
                if family == socket.AF_INET6 and exc.errno == 97:  # no IPv6 here
                    continue
                raise
            self._sockets[family] = sock
            self._loop.add_reader(sock.fileno(), self._on_datagrams, sock)
        self._open_icmp_queue(rt)
        return adopted

    def _open_icmp_queue(self, rt: Runtime) -> None:
        """ICMP errors arriving here go through `map_error` (only errors: pings and the
        rest never leave the kernel). With --queue-bypass they pass while no one listens."""
        config = self.config
        owner = f"sacip-{config.name}"[:20]
        self._queue = NfQueue(config.icmp_queue, netns=self.netns)
        for family, matches in (
                (4, [["-p", "icmp", "--icmp-type", str(t)] for t in ICMP_ERRORS]),
                (6, [["-p", "ipv6-icmp", "--icmpv6-type", str(t)] for t in ICMPV6_ERRORS])):
            rt.record.add(QUEUE_RULE, f"{family} mangle {owner}")
            self._queue_rules.append(QueueRule(owner, config.icmp_queue, chain="INPUT",
                                               match=matches, family=family,
                                               netns=self.netns))
        assert self._loop is not None
        self._loop.add_reader(self._queue.fileno(), self._on_icmp)

    def _on_icmp(self) -> None:
        queue, engine = self._queue, self.engine
        if queue is None:
            return
        for packet in queue.receive(64):
            buf = bytearray(packet.payload)
            try:
                changed = engine is not None and map_error(buf, engine.socket_side)
            except PacketError:
                self.icmp_malformed += 1
                changed = False
            if changed:
                self.icmp_mapped += 1
                queue.replace(packet.packet_id, buf)
            else:
                self.icmp_passed += 1
                queue.accept(packet.packet_id)
        queue.flush()

    async def stop(self) -> None:
        if self.pump is not None:
            self.pump.stop()
        self._close_kernel()

    def _close_kernel(self) -> None:
        loop = self._loop
        for sock in self._sockets.values():
            close_watched(loop, sock)
        self._sockets.clear()
        close_watched(loop, self._queue)
        self._queue = None
        for rule in self._queue_rules:
            try:
                rule.close()
                if self._rt is not None:
                    self._rt.record.discard(QUEUE_RULE,
                                            f"{rule.family} {rule.table} {rule.owner}")
            except (NetError, OSError) as exc:
                log.warning("removing the ICMP queue rule: %s", exc)
        self._queue_rules.clear()
        close_watched(loop, self._watcher)
        self._watcher = None
        if self._remaps is not None:
            close_remap_table(self._rt, self._remaps)
            self._remaps = None
        if self._nft is not None:
            self._nft.close()
            self._nft = None
        if self._lo is not None:
            self._lo.release_all()
            self._lo = None
        for handle in (self._diag, self._netlink):
            if handle is not None:
                handle.close()
        self._diag = self._netlink = None

    def _now(self) -> float:
        assert self._loop is not None
        return self._loop.time()

    def _scan(self) -> None:
        """Every established session, as sock_diag shows it."""
        if self._diag is None or self.engine is None:
            return
        flows = []
        for proto, states in (("tcp", _TCP_STATES), ("udp", _UDP_CONNECTED)):
            for info in self._diag.sockets(proto, states=states):
                if not info.dport or not info.sport:
                    continue
                flows.append(Flow(proto, _plain(info.src), info.sport, _plain(info.dst),
                                  info.dport))
        self.scans += 1
        self.engine.sessions(flows, self._now())
        self._run()

    def _on_netlink(self) -> None:
        if self._watcher is None or self.engine is None:
            return
        now = self._now()
        try:
            changes = self._watcher.read()
        except NetError as exc:
            log.error("sacip: cannot read the kernel state: %s", exc)
            return
        for change in changes:
            obj = change.obj
            if not isinstance(obj, Address) or not self._movable(obj):
                continue
            if change.action == REMOVED:
                self.engine.address_gone(obj.address, now)
            elif change.action == ADDED:
                self.engine.address_back(obj.address, now)
        if changes:
            self._find_sources(now)
        self._run()

    @staticmethod
    def _movable(address: Address) -> bool:
        if address.dev == "lo" or address.scope != RT_SCOPE_UNIVERSE:
            return False
        ip = ipaddress.ip_address(address.address)
        return not (ip.is_link_local or ip.is_loopback)

    def _find_sources(self, now: float) -> None:
        """For sessions waiting to move: the source the kernel would now use toward each
        peer (none yet in the gap of a break-before-make move)."""
        assert self.engine is not None and self._netlink is not None
        wanted = self.engine.wanted_sources()
        if not wanted or self._watcher is None:
            return
        # an address kept on lo (ours) is no new home, even when the kernel offers it
        usable = {str(ipaddress.ip_address(a.address)) for a in self._watcher.view.addresses()
                  if self._movable(a)}
        for old, peer in wanted:
            try:
                route: Route = self._netlink.lookup(peer)
            except NetError:
                continue
            if route.src and str(ipaddress.ip_address(route.src)) in usable:
                self.engine.source_for(old, peer, route.src, now)

    def _on_datagrams(self, sock: socket.socket) -> None:
        if self.engine is None:
            return
        now = self._now()
        for _ in range(64):
            try:
                got = udp.recv_with_destination(sock, 2048, socket.MSG_DONTWAIT)
            except BlockingIOError:
                break
            except (OSError, NetError) as exc:
                self.engine.counters["receive_errors"] = \
                    self.engine.counters.get("receive_errors", 0) + 1
                log.debug("sacip receive: %s", exc)
                continue
            self.engine.datagram(got.data, (got.source[0], got.source[1]), got.destination, now)
        self._run()

    def _run(self) -> None:
        if self.pump is not None:
            self.pump.run()

    # --- actions --------------------------------------------------------------------------
    def _apply_all(self, actions: Sequence[Action]) -> None:
        for action in actions:
            try:
                self._apply(action)
            except (NetError, OSError, ValueError) as exc:
                self.errors += 1
                log.error("sacip: %s failed: %s", type(action).__name__, exc)

    def _apply(self, action: Action) -> None:
        if isinstance(action, Send):
            family = socket.AF_INET6 if ":" in action.address else socket.AF_INET
            sock = self._sockets.get(family)
            if sock is None:
                raise NetError(f"no {family.name} socket to reach {action.address}")
            try:
                udp.send_from(sock, action.data, (action.address, action.port), action.source)
            except BlockingIOError:
                self.errors += 1
        elif isinstance(action, Remaps):
            assert self._remaps is not None
            self._remaps.update(add=action.add, remove=action.remove, direction=action.direction)
        elif isinstance(action, KeepAddress):
            assert self._lo is not None
            self._lo.acquire(action.address)
        elif isinstance(action, ReleaseAddress):
            assert self._lo is not None
            self._lo.release(action.address)
        elif isinstance(action, ResetFlows):
            self._reset(action.flows, action.reason)
        elif isinstance(action, RememberPeer):
            assert self.engine is not None
            write_known(self.config.known_peers, self.engine.known)
        elif isinstance(action, Report):
            getattr(log, action.level)("%s", action.message)

    def _reset(self, flows: Iterable[Flow], reason: str) -> None:
        assert self._diag is not None
        count = 0
        for flow in flows:
            count += self._diag.destroy_matching(flow.proto, src=flow.local, sport=flow.local_port,
                                                 dst=flow.peer, dport=flow.peer_port)
        log.warning("reset %d session(s) at once (%s)", count, reason)

    # --- status ---------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        if self.engine is None:
            return {}
        doc = self.engine.status()
        doc["daemon"] = {"port": self.config.port, "trust": self.config.trust}
        doc["scans"] = self.scans
        doc["errors"] = self.errors
        doc["icmp_errors"] = {"mapped": self.icmp_mapped, "passed": self.icmp_passed,
                              "malformed": self.icmp_malformed}
        if self._remaps is not None:
            doc["remaps"] = len(self._remaps)
        return doc

    def metrics(self) -> Iterable[Metric]:
        if self.engine is None:
            return []
        engine = self.engine
        out = [gauge("sacip_sessions", len(engine.sessions_by_flow), "sessions followed"),
               counter("sacip_sessions_moved", engine.moved_total,
                       "sessions kept across a move"),
               counter("sacip_sessions_not_preservable", engine.lost_total,
                       "sessions a move could not keep"),
               gauge("sacip_kept_addresses", len(engine.kept), "old addresses kept on lo"),
               counter("sacip_errors", self.errors, "kernel operations that failed"),
               counter("sacip_icmp_errors_mapped", self.icmp_mapped,
                       "ICMP errors about moved sessions mapped back")]
        for name, value in sorted(engine.counters.items()):
            out.append(counter("sacip_events", value, "protocol events by kind", kind=name))
        return out


def run_daemon(config: SacipConfig, *, socket_path: Path | None,
               metrics: str | None = None) -> int:
    return run_service(SacipService(config), DaemonOptions(socket=socket_path, metrics=metrics))


__all__ = ["Identity", "SacipService", "run_daemon"]
