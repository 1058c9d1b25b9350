"""`ipshift ilnp node`: an ILNPv6 node on the tunnel data path (docs/ilnp.md).

The glue between the kernel, the tunnel and the engine; it decides nothing itself:

- the TUN device (`ilnp0`) carries the application form: every node is `APP:<NID>`; the
  tunnel's peers are the next hops (a correspondent itself, or a router) at `[I-LV]:port`,
  each owning the application addresses of the correspondents reached through it; one
  catch-all peer owns the whole application /64, so a packet to a node not resolved yet goes
  to the control plane (`DataPath` answers CONTROL);
- the per-packet work is `DataPath`'s hooks on the forwarding thread; what they hand over
  (CONTROL, and datagrams from endpoints no peer has) comes to the event loop, where the
  engine (`NodeEngine`) decides and its actions are applied: Locator Updates and queued
  packets sent with `TunnelDaemon.send_packet`, accepted packets written with `deliver`;
- after each step the engine's view (`NodeEngine.paths`) is pushed: peers first, then the
  hooks' state, so no packet is ever rewritten for a peer the table does not have yet;
- locators come from the kernel: the addresses ending in our NID on the configured
  interfaces whose link is up (netlink), optionally narrowed by a schedule; discovery hellos
  on each interface, static hosts and the DNS tell where correspondents are.

Threads: the forwarding thread runs the hooks and the stranger sink; everything else runs on
the event loop. The hooks' state is replaced, never mutated, from the loop.
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import logging
import socket
import struct
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from ipshift.ctl.protocol import CtlError
from ipshift.daemon import (
    TUN_DEVICE,
    DaemonOptions,
    Metric,
    Runtime,
    StartError,
    close_watched,
    counter,
    gauge,
)
from ipshift.daemon import run_service as run_daemon_service
from ipshift.daemon.pump import EnginePump
from ipshift.daemon.runtime import default_socket
from ipshift.ilnp import dns as ilnp_dns
from ipshift.ilnp import hello as hello_wire
from ipshift.ilnp.config import NodeFileConfig, Schedule
from ipshift.ilnp.datapath import DataPath, is_locator_update
from ipshift.ilnp.engine import (
    ACK,
    ADVERTISE,
    Arrival,
    LocatorEntry,
    NodeConfig,
    NodeEngine,
    Note,
    Own,
    Publish,
    Remote,
    Resolve,
    Route,
    SendUpdate,
    Transmit,
    Update,
    Verdict,
    l64_text,
    nid_text,
)
from ipshift.net import udp
from ipshift.net.errors import NetError
from ipshift.net.netlink import (
    IFA_F_DADFAILED,
    IFA_F_DEPRECATED,
    IFA_F_TENTATIVE,
    KernelWatcher,
)
from ipshift.packet import ilnp as wire_ilnp
from ipshift.packet.checksum import complete_partial_checksum
from ipshift.packet.errors import PacketError
from ipshift.tunnel import wire
from ipshift.tunnel.config import Endpoint, TunnelConfig
from ipshift.tunnel.daemon import TunnelDaemon, TunnelError
from ipshift.tunnel.hooks import CONTROL, DROP, FORWARD, OUTBOUND, Hooks
from ipshift.tunnel.peers import Peer

log = logging.getLogger("ipshift.ilnp")

CATCH_ALL = "unresolved"
DEPRECATED_PENALTY = 100  # added to the preference of a locator whose address is deprecated
SYNC_INTERVAL = 0.5  # s between reads of the tunnel's per-peer counters (activity)
_MASK64 = (1 << 64) - 1
_HEADER = struct.Struct("!4xHBBQQQQ")


@dataclass
class Neighbour:
    """What discovery (or the configuration) says of a node."""

    name: str
    nid: int
    locators: dict[int, int]  # l64 -> preference
    router: bool
    expires: float
    source: str = "hello"


class NodeService:
    component = "ilnp"
    adopts = frozenset({TUN_DEVICE})

    def __init__(self, config: NodeFileConfig) -> None:
        self.config = config
        self.instance = config.device
        self.netns = config.netns
        settings: dict[str, Any] = {k: (int(v) if k == "lu_tries" else v)
                                    for k, v in config.engine.items()}
        self.engine = NodeEngine(NodeConfig(
            nid=config.nid, nonce_size=config.nonce_size, router=config.router,
            hop_limit=config.hop_limit, **settings))
        self.datapath = DataPath(config.nid, config.app_locator, rule=config.checksum,
                                 clock=time.monotonic, router=config.router,
                                 catch_all=CATCH_ALL)
        self.tunnel: TunnelDaemon | None = None
        self.neighbours: dict[int, Neighbour] = {}
        self.counters = {"hellos_sent": 0, "hellos_received": 0, "hellos_malformed": 0,
                         "stranger_datagrams": 0, "stranger_malformed": 0, "control_packets": 0,
                         "control_malformed": 0, "dns_published": 0, "dns_publish_failed": 0,
                         "dns_resolved": 0, "dns_resolve_failed": 0, "moves": 0,
                         "peer_update_failed": 0}
        self._rt: Runtime | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pump: EnginePump | None = None
        self._watcher: KernelWatcher | None = None
        self._hello_sock: socket.socket | None = None
        self._peers: dict[str, Peer] = {}
        self._peer_nids: dict[str, list[int]] = {}  # peer -> the correspondents behind it
        self._pushed: dict[str, Any] | None = None
        self._activity: dict[str, tuple[int, int]] = {}
        self._schedule_set: frozenset[int] | None = None
        self._tsig: ilnp_dns.TsigKey | None = None
        self._publishing = False
        self._publish_again = False
        self._resolving: set[int] = set()
        self._locator_devs: dict[int, str] = {}
        # IPv4 networks: (l64, nid) -> the node's IPv4 address there (hellos; ours: found)
        self._ipv4: dict[tuple[int, int], ipaddress.IPv4Address] = {}
        self._own_ipv4: dict[int, ipaddress.IPv4Address] = {}

    # --- start / stop ------------------------------------------------------------------------
    async def start(self, rt: Runtime) -> None:
        self._rt = rt
        self._loop = loop = asyncio.get_running_loop()
        config = self.config
        if config.dns is not None:
            try:
                self._tsig = ilnp_dns.read_tsig_key(config.dns.key_file)
            except ilnp_dns.IlnpDnsError as exc:
                raise StartError(str(exc)) from exc
        for host in config.hosts:
            self.neighbours[host.nid] = Neighbour(host.name, host.nid, dict(
                (l64, pref) for l64, pref in host.locators), False, float("inf"), "config")
        self._open_tunnel(rt)
        self._pump = EnginePump(loop, self.engine, self._apply, after=self._sync)
        try:
            self._watcher = KernelWatcher(config.netns, ("link", "address"))
        except NetError as exc:
            raise StartError(f"cannot watch the interfaces: {exc}") from exc
        loop.add_reader(self._watcher.fileno(), self._kernel_changed)
        if config.discovery:
            self._open_discovery(loop)
        if config.schedule is not None:
            rt.spawn(self._run_schedule(config.schedule), "locator schedule")
        self._follow_locators()
        rt.every(SYNC_INTERVAL, self._read_activity, "reading the data path's activity")
        rt.every(1.0, self._check_tunnel, "watching the tunnel")
        if config.discovery:
            rt.every(config.hello_interval, lambda: self._send_hellos(False), "sending hellos")
            self._send_hellos(True)
        rt.method("resolve", self._ctl_resolve)
        rt.method("correspondents", lambda params: {
            "correspondents": self.engine.status_rows(time.monotonic())})
        log.info("ILNP node %s, NID %s, application address %s on %s, UDP port %d, "
                 "locators %s", config.name, nid_text(config.nid),
                 config.app_address(config.nid), config.device, config.port,
                 ", ".join(l64_text(x) for x in self.engine.own) or "none yet")

    def _open_tunnel(self, rt: Runtime) -> None:
        config = self.config
        app = config.app_address(config.nid)
        rt.record.settled(TUN_DEVICE)
        tunnel = TunnelDaemon(TunnelConfig(
            dev=config.device, local=Endpoint(ipaddress.IPv6Address("::"), config.port),
            extra_local=(Endpoint(ipaddress.IPv4Address("0.0.0.0"), config.port)
                         if config.ipv4_locators else None),
            dynamic=True, serve=None, framing="batch", mtu=config.mtu, netns=config.netns,
            headroom=4 + 4 * ((config.nonce_size + 4) // 4),
            addresses=(ipaddress.IPv6Interface(f"{app}/64"),)),
            # Batch framing for direct correspondents; `whole` sends what carries the nonce
            # and what goes through a router one packet per datagram. resizes=False keeps
            # the receive side coalescing TCP segments: the hooks replace only packets that
            # carry a nonce, which are sent and so received whole.
            Hooks(outbound=self.datapath.outbound, inbound=self.datapath.inbound,
                  control=self._from_forwarder, on_state=self.datapath.apply, resizes=False,
                  stranger=self._stranger, whole=self.datapath.needs_whole))
        try:
            tunnel.open()
            rt.record.add(TUN_DEVICE, config.device)
            tunnel.start()
            catch_all = Peer(CATCH_ALL, Endpoint(ipaddress.IPv6Address(
                config.app_locator << 64 | 1), 9), prefixes=(ipaddress.IPv6Network(
                    (config.app_locator << 64, 64)),))
            tunnel.update_peers([catch_all])
        except (TunnelError, NetError, OSError, ValueError) as exc:
            tunnel.close()
            rt.record.discard(TUN_DEVICE, config.device)
            raise StartError(f"cannot open the tunnel device {config.device}: {exc}") from exc
        self.tunnel = tunnel

    def _open_discovery(self, loop: asyncio.AbstractEventLoop) -> None:
        try:
            sock = udp.open_with_destination(socket.AF_INET6, self.config.discovery_port,
                                             netns_name=self.config.netns)
        except NetError as exc:
            raise StartError(f"discovery: {exc} (another node on this port? set "
                             "discovery.port)") from exc
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_LOOP, 0)
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_HOPS, 1)
        loop.add_reader(sock.fileno(), self._hello_readable)
        self._hello_sock = sock

    async def stop(self) -> None:
        loop = self._loop
        if self._pump is not None:
            self._pump.stop()
        close_watched(loop, self._watcher)
        close_watched(loop, self._hello_sock)
        self._watcher = self._hello_sock = None
        if self.tunnel is not None:
            self.tunnel.close()
            if self._rt is not None:
                self._rt.record.discard(TUN_DEVICE, self.config.device)
            self.tunnel = None

    # --- from the forwarding thread -------------------------------------------------------------
    def _from_forwarder(self, peer: Peer | None, direction: str, packet: bytes) -> None:
        """A hook said CONTROL (forwarding thread): a router's transit goes on at once
        (`DataPath.transit`), the rest to the loop."""
        if direction != OUTBOUND and self.config.router:
            buf = bytearray(packet)
            hop = self.datapath.transit(buf)
            if hop is not None:
                self._send(hop, bytes(buf))
                return
        loop = self._loop
        if loop is not None:
            # the event's time is when it arrived, not when the loop gets to it
            loop.call_soon_threadsafe(self._control_packet, direction, packet,
                                      time.monotonic())

    def _stranger(self, sender: tuple[str, int], datagram: bytes) -> None:
        """A datagram from an endpoint no peer has (forwarding thread): a correspondent that
        moved, a new one, transit for a router. The inbound hook decides, as for a peer."""
        self.counters["stranger_datagrams"] += 1
        try:
            header, inner = wire.decode(datagram)
        except PacketError:
            self.counters["stranger_malformed"] += 1
            return
        buf = bytearray(inner)
        if header.partial:
            complete_partial_checksum(buf, header.csum_start, header.csum_offset)
        verdict = self.datapath.inbound(buf, 0, False, None)
        tunnel = self.tunnel
        if verdict is CONTROL:
            self._from_forwarder(None, "inbound", bytes(buf))
        elif verdict is FORWARD and tunnel is not None:
            tunnel.deliver(bytes(buf))
        elif verdict is not DROP and verdict is not FORWARD and tunnel is not None:
            tunnel.deliver(bytes(verdict))  # type: ignore[arg-type]

    # --- on the loop: what the hooks handed over --------------------------------------------------
    def _control_packet(self, direction: str, packet: bytes, arrived: float) -> None:
        self.counters["control_packets"] += 1
        now = arrived
        try:
            if direction == OUTBOUND:
                self._outbound(packet, now)
            else:
                self._inbound(packet, now)
        except (PacketError, ValueError) as exc:
            self.counters["control_malformed"] += 1
            log.debug("a packet handed to the control plane was malformed: %s", exc)
        self._step()

    def _outbound(self, packet: bytes, now: float) -> None:
        nid = int.from_bytes(packet[32:40], "big")
        route = self.engine.outbound(nid, packet, now)
        if route is not None:
            self._transmit(route, packet)

    def _inbound(self, packet: bytes, now: float) -> None:
        _, _, hop, src_loc, src_nid, dst_loc, dst_nid = _HEADER.unpack_from(packet)
        arrival = Arrival(src_loc, src_nid, dst_loc, dst_nid, wire_ilnp.find_nonce(packet),
                          dst_loc if dst_loc in self.engine.own else
                          next(iter(self.engine.own), 0), hop)
        if is_locator_update(packet):
            lu = wire_ilnp.parse_locator_update_packet(packet)
            update = Update(lu.update.operation, tuple(
                LocatorEntry(e.l64, e.preference, e.lifetime) for e in lu.update.locators),
                lu.update.reserved)
            decision = self.engine.locator_update(arrival, update, now)
            if decision.verdict is Verdict.DELIVER:
                return
        else:
            decision = self.engine.inbound(arrival, now)
        tunnel = self.tunnel
        if tunnel is None:
            return
        if decision.verdict is Verdict.DELIVER:
            tunnel.deliver(self.datapath.to_application(bytearray(packet)))
        elif decision.verdict is Verdict.FORWARD and decision.route is not None:
            forwarded = bytearray(packet)
            forwarded[7] = hop - 1
            self._send(decision.route.next_hop, bytes(forwarded))

    # --- the engine's actions ------------------------------------------------------------------
    def _step(self) -> None:
        if self._pump is not None:
            self._pump.run()

    def _apply(self, actions: Sequence[Any]) -> None:
        # what goes on the wire first (a move's updates, their acks), bookkeeping after
        actions = sorted(actions, key=lambda a: not isinstance(a, SendUpdate | Transmit))
        for action in actions:
            if isinstance(action, SendUpdate):
                self._send_update(action)
            elif isinstance(action, Transmit):
                self._transmit(action.route, action.packet)
            elif isinstance(action, Resolve):
                self._resolve(action.nid)
            elif isinstance(action, Publish):
                self._publish()
                if self.config.discovery and self._loop is not None:
                    # after this drain: the Locator Updates of the move go first
                    self._loop.call_soon(self._send_hellos, False)
            elif isinstance(action, Note):
                log.log(action.level, "%s", action.text)

    def _send_update(self, action: SendUpdate) -> None:
        route, update = action.route, action.update
        operation = wire_ilnp.LU_ADVERTISEMENT if update.operation == ADVERTISE \
            else wire_ilnp.LU_ACKNOWLEDGEMENT
        assert update.operation in (ADVERTISE, ACK)
        message = wire_ilnp.LocatorUpdate(operation, tuple(
            wire_ilnp.LocatorEntry(e.l64, e.preference, min(e.lifetime, 0xFFFF))
            for e in update.locators), update.sequence)
        packet = wire_ilnp.locator_update_packet(
            wire_ilnp.ilv(route.local, self.config.nid), wire_ilnp.ilv(route.remote, route.nid),
            message, nonce=action.nonce, hop_limit=self.config.hop_limit)
        self._send(route.next_hop, packet)

    def _transmit(self, route: Route, packet: bytes) -> None:
        try:
            data = self.datapath.to_wire(packet, route.local, route.remote, route.nonce)
        except PacketError as exc:
            self.counters["control_malformed"] += 1
            log.debug("cannot send a queued packet: %s", exc)
            return
        self._send(route.next_hop, data)

    def _endpoint(self, l64: int, nid: int) -> Endpoint:
        """Where the node (l64, nid) takes datagrams: its I-LV, or on an IPv4 network the
        IPv4 address its hellos gave for that locator."""
        v4 = self._ipv4.get((l64, nid))
        if v4 is not None:
            return Endpoint(v4, self.config.port)
        return Endpoint(wire_ilnp.ilv(l64, nid), self.config.port)

    def _send(self, hop: tuple[int, int], packet: bytes) -> None:
        if self.tunnel is not None:
            self.tunnel.send_packet(self._endpoint(*hop), packet)

    # --- pushing the engine's view to the data path -----------------------------------------------
    def _sync(self) -> None:
        """Peers per next hop, then the hooks' state, from the engine's view now. Not waited
        for: the forwarder applies them in this order, and the loop stays free for the ack
        that is already on its way."""
        tunnel = self.tunnel
        if tunnel is None:
            return
        paths = self.engine.paths(time.monotonic())
        by_hop: dict[tuple[int, int], list[int]] = {}
        for path in paths.values():
            by_hop.setdefault(path.next_hop, []).append(path.nid)
        wanted: dict[str, Peer] = {}
        nids_of: dict[str, list[int]] = {}
        anywhere = (ipaddress.IPv6Network("::/0"),)
        for (l64, nid), nids in by_hop.items():
            name = f"hop-{l64:016x}-{nid:016x}"
            wanted[name] = Peer(
                name, self._endpoint(l64, nid),
                addresses=tuple(self.config.app_address(n) for n in sorted(nids)),
                extra_sources=anywhere)
            nids_of[name] = nids
        # A correspondent may send from another of its locators on a network we share than
        # the one we send to (its preferences are its own): a receive-only peer for each, so
        # its batch-framed datagrams are taken, not left to the stranger sink.
        for path in paths.values():
            for l64 in path.locators & set(self.engine.own):
                if (l64, path.nid) not in by_hop:
                    name = f"from-{l64:016x}-{path.nid:016x}"
                    wanted[name] = Peer(name, self._endpoint(l64, path.nid),
                                        extra_sources=anywhere)
                    nids_of[name] = [path.nid]
        upserts = [p for name, p in wanted.items() if self._peers.get(name) != p]
        removals = [name for name in self._peers if name not in wanted]
        if upserts or removals:
            try:
                tunnel.update_peers(upserts, removals, wait=False)
                self._peers = wanted
                self._peer_nids = nids_of
            except ValueError as exc:
                self.counters["peer_update_failed"] += 1
                log.warning("cannot update the tunnel's peers: %s", exc)
        state = DataPath.encode_state(paths, self.engine.receiving(time.monotonic()))
        if state != self._pushed:
            tunnel.update_hook_state(state, wait=False)
            self._pushed = state

    def _check_tunnel(self) -> None:
        if self.tunnel is not None and not self.tunnel.alive() and self._rt is not None:
            self._rt.fail("the tunnel's forwarding thread stopped (see the error above)")

    def _read_activity(self) -> None:
        """Tell the engine which correspondents the data path carried packets for."""
        tunnel = self.tunnel
        if tunnel is None:
            return
        now = time.monotonic()
        for name in self._peers:
            try:
                counts = tunnel.peer_counters_of(name)
            except ValueError:
                continue
            current = (counts.get("tun_reads", 0), counts.get("tun_writes", 0))
            before = self._activity.get(name, (0, 0))
            self._activity[name] = current
            sent, heard = max(current[0] - before[0], 0), max(current[1] - before[1], 0)
            nids = self._peer_nids.get(name, ())
            if sent or heard:
                one = len(nids) == 1  # a next hop of one correspondent: its counts are its
                for nid in nids:
                    self.engine.touch(nid, now, heard=heard > 0, sent=sent > 0,
                                      packets_in=heard if one else 0,
                                      packets_out=sent if one else 0)
        self._step()

    # --- locators from the kernel and the schedule ------------------------------------------------
    def _kernel_changed(self) -> None:
        assert self._watcher is not None
        try:
            changes = self._watcher.read()
        except NetError as exc:
            log.warning("reading interface changes: %s", exc)
            return
        if changes or self._watcher.resynced:
            self._follow_locators()

    def _present_locators(self) -> dict[int, Own]:
        assert self._watcher is not None
        view = self._watcher.view
        found: dict[int, Own] = {}
        self._locator_devs = {}
        self._own_ipv4 = {}
        for dev in self.config.interfaces:
            link = view.link(dev)
            if link is None or not link.up or not link.carrier:
                continue
            v4_locator = self.config.ipv4_locators.get(dev)
            if v4_locator is not None:  # an IPv4 network: its address carries the locator
                v4 = [a for a in view.addresses_of(dev, socket.AF_INET) if a.scope == 0]
                if v4:
                    found[v4_locator] = Own(self.config.preferences.get(dev, 10))
                    self._locator_devs[v4_locator] = dev
                    self._own_ipv4[v4_locator] = ipaddress.IPv4Address(v4[0].address)
                continue
            for address in view.addresses_of(dev, socket.AF_INET6):
                value = int(ipaddress.IPv6Address(address.address.partition("%")[0]))
                if value & _MASK64 != self.config.nid or address.prefixlen != 64 or \
                        address.flags & (IFA_F_TENTATIVE | IFA_F_DADFAILED):
                    continue
                l64 = value >> 64
                preference = self.config.preferences.get(dev, 10)
                if address.flags & IFA_F_DEPRECATED or address.preferred_lft == 0:
                    # a network about to go (RFC 4862 deprecation): correspondents move off
                    # it now, while it still works, so its removal loses nothing
                    preference = min(preference + DEPRECATED_PENALTY, 0xFFFF)
                found[l64] = Own(preference)
                self._locator_devs[l64] = dev
        return found

    def _follow_locators(self) -> None:
        present = self._present_locators()
        if self._schedule_set is not None:
            present = {l64: own for l64, own in present.items() if l64 in self._schedule_set}
        if present != self.engine.own:
            self.counters["moves"] += 1
            self._learn_routers(present)  # first: the updates may go through them
            self.engine.set_locators(present, time.monotonic())
        self._step()

    async def _run_schedule(self, schedule: Schedule) -> None:
        """The seed's experiments: each set for move_time, overlapping the next for
        handoff_time (soft handoff)."""
        index = 0
        self._schedule_set = frozenset(schedule.sets[0])
        self._follow_locators()
        while True:
            await asyncio.sleep(schedule.move_time - schedule.handoff_time)
            nxt = schedule.sets[(index + 1) % len(schedule.sets)]
            if schedule.handoff_time > 0:
                self._schedule_set = frozenset(schedule.sets[index]) | frozenset(nxt)
                self._follow_locators()
                await asyncio.sleep(schedule.handoff_time)
            index = (index + 1) % len(schedule.sets)
            self._schedule_set = frozenset(nxt)
            self._follow_locators()

    # --- discovery ------------------------------------------------------------------------------
    def _hello(self, solicit: bool) -> bytes:
        return hello_wire.Hello(
            self.config.name, self.config.nid,
            tuple((e.l64, e.preference) for e in self.engine.advertised()),
            router=self.config.router, solicit=solicit,
            interval=self.config.hello_interval,
            ipv4=tuple((l64, str(a)) for l64, a in sorted(self._own_ipv4.items())
                       if l64 in self.engine.own)).encode()

    def _send_hellos(self, solicit: bool) -> None:
        self._flood(self._hello(solicit), None)
        self._expire_neighbours()

    def _flood(self, data: bytes, arrived_on: int | None) -> None:
        """A hello onto every underlay link but the one it came from."""
        sock = self._hello_sock
        if sock is None:
            return
        for dev in self.config.interfaces:
            try:
                index = socket.if_nametoindex(dev)
                if index == arrived_on:
                    continue
                sock.sendto(data, (hello_wire.GROUP, self.config.discovery_port, 0, index))
                self.counters["hellos_sent"] += 1
            except OSError as exc:
                log.debug("hello on %s: %s", dev, exc)

    def _hello_readable(self) -> None:
        sock = self._hello_sock
        if sock is None:
            return
        answer = False
        for got in udp.recv_batch_with_destination(sock, 32, 2048):
            try:
                hello = hello_wire.decode(got.data)
            except hello_wire.HelloError:
                self.counters["hellos_malformed"] += 1
                continue
            if hello.nid == self.config.nid:
                continue
            self.counters["hellos_received"] += 1
            answer = answer or hello.solicit
            self._heard(hello)
            if self.config.router and self.config.flood and hello.ttl > 1:
                self._flood(dataclasses.replace(hello, ttl=hello.ttl - 1).encode(), got.ifindex)
        if answer:
            self._send_hellos(False)
        self._step()

    def _heard(self, hello: hello_wire.Hello) -> None:
        now = time.monotonic()
        lifetime = 3 * hello.interval
        self.neighbours[hello.nid] = Neighbour(hello.name, hello.nid, dict(hello.locators),
                                               hello.router, now + lifetime)
        for l64, address in hello.ipv4:
            self._ipv4[(l64, hello.nid)] = ipaddress.IPv4Address(address)
        if hello.nid in self.engine.ilcc:
            self.engine.learned(hello.nid, {l64: Remote(pref, lifetime, "hello")
                                            for l64, pref in hello.locators}, now)
        if hello.router:
            self._learn_routers()

    def _learn_routers(self, locators: Iterable[int] | None = None) -> None:
        """The router on each of our networks (`locators`, default: our locators now)."""
        now = time.monotonic()
        for l64 in (self.engine.own if locators is None else locators):
            router = next((n.nid for n in self.neighbours.values()
                           if n.router and l64 in n.locators and n.expires > now), None)
            self.engine.set_router(l64, router)

    def _expire_neighbours(self) -> None:
        now = time.monotonic()
        gone = [nid for nid, n in self.neighbours.items() if n.expires <= now]
        for nid in gone:
            del self.neighbours[nid]
        if gone:
            self._learn_routers()

    # --- names ----------------------------------------------------------------------------------
    def _by_name(self, name: str) -> Neighbour | None:
        wanted = {name.lower().rstrip("."), self._fqdn(name).rstrip(".")}
        return next((n for n in self.neighbours.values()
                     if n.name.lower().rstrip(".") in wanted and n.expires > time.monotonic()),
                    None)

    def _fqdn(self, name: str) -> str:
        dns = self.config.dns
        if name.endswith(".") or dns is None:
            return name if name.endswith(".") else name + "."
        if "." in name and name.lower().endswith(dns.zone.rstrip(".").lower()):
            return name + "."
        return f"{name}.{dns.zone}"

    def _resolve(self, nid: int) -> None:
        """The engine asks where `nid` is: the directory (discovery, configuration) at once,
        else the DNS under the name derived from the NID."""
        now = time.monotonic()
        known = self.neighbours.get(nid)
        if known is not None and known.expires > now and known.locators:
            lifetime = min(known.expires - now, 600.0)
            self.engine.learned(nid, {l64: Remote(pref, lifetime, known.source)
                                      for l64, pref in known.locators.items()}, now)
            return
        if self.config.dns is None or nid in self._resolving or self._rt is None:
            self.engine.unresolved(nid, now)
            return
        self._resolving.add(nid)
        self._rt.spawn(self._resolve_dns(nid, _nid_name(nid, self.config.dns.zone)),
                       "resolving a NID")

    async def _resolve_dns(self, nid: int | None, name: str) -> int | None:
        dns = self.config.dns
        assert dns is not None and self._loop is not None
        try:
            records = await self._loop.run_in_executor(
                None, ilnp_dns.resolve, dns.server, dns.port, name, dns.timeout)
        except ilnp_dns.IlnpDnsError as exc:
            self.counters["dns_resolve_failed"] += 1
            log.info("resolving %s: %s", name, exc)
            if nid is not None:
                self._resolving.discard(nid)
                self.engine.unresolved(nid, time.monotonic())
                self._step()
            return None
        self.counters["dns_resolved"] += 1
        found = records.preferred_nid
        if nid is None:
            # a name looked up for a program (ctl resolve): its packets will ask the engine,
            # which looks the NID up itself; a cache here would go stale with the next move
            return found
        self._resolving.discard(nid)
        found = nid if any(v == nid for _, v in records.nids) else found
        now = time.monotonic()
        self.engine.learned(found, {l64: Remote(pref, max(records.ttl, 1), "dns")
                                    for pref, l64 in records.l64s}, now)
        self._step()
        return found

    async def _ctl_resolve(self, params: dict[str, Any]) -> dict[str, Any]:
        """`resolve name=HOST`: the application address of HOST (discovery, configuration or
        the DNS), for the UDP proxy and for people."""
        name = params.get("name")
        if not isinstance(name, str) or not name:
            raise CtlError("bad-request", "resolve needs name=HOSTNAME")
        known = self._by_name(name)
        if known is not None:
            nid: int | None = known.nid
            source = known.source
        elif self.config.dns is not None:
            nid = await self._resolve_dns(None, self._fqdn(name))
            source = "dns"
        else:
            nid = None
            source = ""
        if nid is None:
            # an answer, not a failure of the daemon: no traceback in its log
            raise CtlError("not-found", f"{name}: not found (not discovered, not configured"
                             f"{', not in the DNS' if self.config.dns else ''})")
        return {"name": name, "nid": nid_text(nid),
                "address": str(self.config.app_address(nid)), "source": source}

    def _publish(self) -> None:
        """Our locator set changed: replace our L64 records (one update in flight; the last
        set wins)."""
        if self.config.dns is None or self._rt is None:
            return
        if self._publishing:
            self._publish_again = True
            return
        self._publishing = True
        self._rt.spawn(self._publish_now(), "publishing to the DNS")

    async def _publish_now(self) -> None:
        dns, key = self.config.dns, self._tsig
        assert dns is not None and key is not None and self._loop is not None
        try:
            while True:
                self._publish_again = False
                entries = self.engine.advertised()
                if entries:
                    for name in (self._fqdn(self.config.name),
                                 _nid_name(self.config.nid, dns.zone)):
                        records = ilnp_dns.IlnpRecords(
                            name, nids=((10, self.config.nid),),
                            l64s=tuple((e.preference, e.l64) for e in entries), ttl=dns.ttl)
                        await self._publish_one(records)
                if not self._publish_again:
                    return
        finally:
            self._publishing = False

    async def _publish_one(self, records: ilnp_dns.IlnpRecords) -> None:
        dns, key = self.config.dns, self._tsig
        assert dns is not None and key is not None and self._loop is not None
        try:
            await self._loop.run_in_executor(None, lambda: ilnp_dns.publish(
                dns.server, dns.port, dns.zone, records, key, timeout=dns.timeout))
            self.counters["dns_published"] += 1
        except ilnp_dns.IlnpDnsError as exc:
            self.counters["dns_publish_failed"] += 1
            log.warning("publishing %s: %s", records.hostname, exc)

    # --- status ------------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        now = time.monotonic()
        engine = self.engine
        return {
            "node": {
                "name": self.config.name, "nid": nid_text(self.config.nid),
                "address": str(self.config.app_address(self.config.nid)),
                "device": self.config.device, "port": self.config.port,
                "checksum": self.config.checksum, "router": self.config.router,
                "locators": [{"l64": l64_text(l64), "preference": own.preference,
                              "interface": self._locator_devs.get(l64),
                              "ipv4": (str(self._own_ipv4[l64]) if l64 in self._own_ipv4
                                       else None),
                              "packets_out": self.datapath.out_by_locator.get(l64, 0),
                              "packets_in": self.datapath.in_by_locator.get(l64, 0)}
                             for l64, own in sorted(engine.own.items())],
                "moves": engine.moves,
            },
            "correspondents": engine.status_rows(now),
            "neighbours": [{"name": n.name, "nid": nid_text(n.nid), "router": n.router,
                            "locators": [l64_text(x) for x in sorted(n.locators)],
                            "source": n.source,
                            "expires_s": None if n.expires == float("inf")
                            else round(n.expires - now, 1)}
                           for n in self.neighbours.values()],
            "counters": {**vars(engine.counters), "datapath": dict(self.datapath.counters),
                         "node": dict(self.counters)},
            "lu_latency_ms": _latency(engine.lu_latencies),
            "tunnel": self.tunnel.status() if self.tunnel is not None else None,
        }

    def metrics(self) -> list[Metric]:
        counts = self.engine.counters
        return [
            gauge("ilnp_locators", len(self.engine.own), "locators this node holds"),
            gauge("ilnp_correspondents", len(self.engine.ilcc), "ILCC entries"),
            counter("ilnp_lu_sent", counts.lu_sent, "Locator Updates sent"),
            counter("ilnp_lu_acked", counts.lu_acked, "Locator Updates acknowledged"),
            counter("ilnp_lu_received", counts.lu_received, "Locator Updates received"),
            counter("ilnp_moves", self.engine.moves, "locator set changes"),
        ]


def _latency(values: Iterable[float]) -> dict[str, float] | None:
    ordered = sorted(values)
    if not ordered:
        return None
    return {"count": len(ordered), "median": round(ordered[len(ordered) // 2] * 1000, 3),
            "max": round(ordered[-1] * 1000, 3)}


def _nid_name(nid: int, zone: str) -> str:
    return f"nid-{nid:016x}.{zone}"


def run_node(config: NodeFileConfig, *, socket_path: Any = None,
             metrics: str | None = None) -> int:
    return run_daemon_service(NodeService(config), DaemonOptions(
        socket=socket_path or default_socket("ilnp", config.device), metrics=metrics))
