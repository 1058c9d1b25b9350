"""The asyncio adapter of resend, a service on the daemon runtime (ipshift.daemon): feeds the
engine from packet sockets, address events and the control socket (`wakeup`), and applies its
actions with raw sockets, nftables, conntrack and netlink.

One instance per outgoing interface and namespace (the runtime's lock), whatever its control
socket. Kernel objects it owns, all removed on exit, and recorded in the instance's owned-state
record so that a start after a kill -9 removes what the killed one left:
- nftables table `inet ipshift_resend_<interface>` holding the per-flow rewrites;
- old addresses it put on `lo` (net.loaddr, with a use count per mapping).
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ipshift.ctl import CtlError
from ipshift.daemon import (
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
from ipshift.net.conntrack import Conntrack
from ipshift.net.errors import NetError
from ipshift.net.loaddr import LoAddresses
from ipshift.net.netlink import Address, KernelWatcher, Netlink
from ipshift.net.nft import Nft
from ipshift.net.packetsock import PacketSocket
from ipshift.net.rawsock import RawSocket
from ipshift.net.remap import Direction, FlowRemaps, Remap
from ipshift.net.sockdiag import SockDiag
from ipshift.resend.engine import (
    Action,
    CheckFlows,
    CycleDone,
    FlowMapping,
    LookupOrigin,
    MapFlow,
    Reinject,
    Resend,
    ResendConfig,
    ResendEngine,
    UnmapFlow,
    WakeupError,
)
from ipshift.resend.flows import PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP

log = logging.getLogger("ipshift.resend")

_PROTO_NAMES = {PROTO_TCP: "tcp", PROTO_UDP: "udp", PROTO_ICMP: "icmp", PROTO_ICMPV6: "icmp"}


def remap_of(m: FlowMapping) -> Remap:
    """The stateless remap of one mapping: outbound packets from `inner` to the peer leave
    with `outer` as source; inbound ones from the peer to `outer` get `inner` as
    destination (rewritten in prerouting, before conntrack; the source after NAT)."""
    name = _PROTO_NAMES.get(m.proto)
    if name is None:
        raise ValueError(f"no mapping for protocol {m.proto}")
    if name == "icmp":  # the echo identifier stands in the port's place
        return Remap("icmp", m.inner_addr, m.inner_port, m.peer, new_local=m.outer_addr,
                     new_local_port=m.outer_port)
    return Remap(name, m.inner_addr, m.inner_port, m.peer, m.peer_port,
                 new_local=m.outer_addr, new_local_port=m.outer_port)


class ResendDaemon:
    component = "resend"
    adopts: frozenset[str] = frozenset()  # leftover tables and lo addresses: the runtime's

    def __init__(self, config: ResendConfig, *, outgoing: str, snoop: str,
                 netns: str | None = None) -> None:
        self.config = config
        self.outgoing = outgoing
        self.instance = outgoing
        self.snoop = snoop
        self.netns = netns
        self.engine = ResendEngine(config)
        self.pump: EnginePump | None = None
        self._rt: Runtime | None = None
        self._nft: Nft | None = None
        self._remaps: FlowRemaps | None = None
        self._netlink: Netlink | None = None
        self._watcher: KernelWatcher | None = None
        self._conntrack: Conntrack | None = None
        self._sockdiag: SockDiag | None = None
        self._lo: LoAddresses | None = None
        self._out_sock: PacketSocket | None = None
        self._in_sock: PacketSocket | None = None
        self._raw: dict[int, RawSocket] = {}
        self._mapped: set[FlowMapping] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self.errors = 0

    # --- lifecycle ------------------------------------------------------------------------
    async def start(self, rt: Runtime) -> None:
        self._rt = rt
        self._loop = rt.loop
        rt.method("wakeup", self._on_wakeup)
        rt.method("take-over", self._on_take_over)
        try:
            self._open_kernel(rt)
        except (NetError, OSError) as exc:
            raise StartError(f"cannot start on {self.outgoing}: {exc}") from exc
        self.pump = EnginePump(rt.loop, self.engine, self._apply_all, after=self._after_actions)
        self._update_sockets()
        log.info("ip_resend on %s (snooping %s): armed", self.outgoing, self.snoop)

    async def stop(self) -> None:
        if self.pump is not None:
            self.pump.stop()
        self._close_kernel()

    def _open_kernel(self, rt: Runtime) -> None:
        self._netlink = Netlink(self.netns)
        self._netlink.index(self.outgoing)  # fails clearly if the interface does not exist
        self._lo = kept_addresses(rt, self._netlink)
        # subscribed before anything can depend on an address: a loss is never missed, and
        # the view is re-read after an overrun (the callback then runs as well)
        self._watcher = KernelWatcher(self.netns, ("link", "address"), netlink=self._netlink)
        self._watcher.on_addresses_changed(self.outgoing, self._on_addresses)
        self.engine.present = {a.address for a in self._watcher.addresses_of(self.outgoing)}
        assert self._loop is not None
        self._loop.add_reader(self._watcher.fileno(), self._watcher.read)
        self._nft = Nft(self.netns)
        self._remaps, _ = remap_table(rt, self._nft, "resend", self.outgoing)
        self._conntrack = Conntrack(self.netns)

    def _close_kernel(self) -> None:
        for sock in (self._out_sock, self._in_sock, *self._raw.values()):
            if sock is not None:
                sock.close()
        self._out_sock = self._in_sock = None
        self._raw.clear()
        close_watched(self._loop, self._watcher)
        self._watcher = None
        if self._remaps is not None:
            close_remap_table(self._rt, self._remaps)
            self._remaps = None
        self._mapped.clear()
        if self._nft is not None:
            self._nft.close()
            self._nft = None
        if self._lo is not None:
            self._lo.release_all()
        for handle in (self._conntrack, self._sockdiag, self._netlink):
            if handle is not None:
                handle.close()
        self._conntrack = self._sockdiag = self._netlink = None

    # --- actions --------------------------------------------------------------------------
    def _apply_all(self, actions: Sequence[Action]) -> None:
        for action in actions:
            try:
                self._apply(action)
            except (NetError, OSError, ValueError) as exc:
                self.errors += 1
                log.error("%s failed: %s", type(action).__name__, exc)

    def _after_actions(self) -> None:
        """Adjust the sockets to the state; a finished cycle (or `term`) ends the daemon."""
        self._update_sockets()
        if (self.engine.state == "done" or self.engine.terminate) and self._rt is not None:
            self._rt.request_stop()

    def _pump(self) -> None:
        if self.pump is not None:
            self.pump.run()

    def _apply(self, action: Action) -> None:
        if isinstance(action, LookupOrigin):
            self._lookup_origin(action)
        elif isinstance(action, MapFlow):
            self._map(action.mapping)
        elif isinstance(action, UnmapFlow):
            self._unmap(action.mapping)
        elif isinstance(action, Resend):
            self._raw_socket(action.version).send(action.data)
        elif isinstance(action, Reinject):
            self._raw_socket(action.version, local=True).send(action.data)
        elif isinstance(action, CheckFlows):
            self._check_flows(action)
        elif isinstance(action, CycleDone):
            log.info("cycle done: %s", action.reason)

    # --- packets --------------------------------------------------------------------------
    def _update_sockets(self) -> None:
        """Read only what the state needs: outgoing packets while capturing, incoming ones from
        the first capture until the replies are in; a busy link costs nothing the rest of the
        time."""
        assert self._loop is not None
        want_out = self.engine.state in ("armed", "captured")
        # open for replies before the wakeup (they can arrive right after the resend) and
        # while UDP/ICMP mappings linger; closed while only TCP mappings remain. Also open
        # while armed: on a link that is already up the reply to the first captured packet
        # comes within microseconds, before a socket opened at the capture could see it, and
        # that reply is what tells ordinary traffic from a dial.
        want_in = self.engine.wants_replies or self.engine.state == "armed"
        if want_out and self._out_sock is None:
            self._out_sock = PacketSocket(self.snoop, netns=self.netns, direction="out")
            self._loop.add_reader(self._out_sock.fileno(), self._read, self._out_sock, True)
        elif not want_out and self._out_sock is not None:
            self._loop.remove_reader(self._out_sock.fileno())
            self._out_sock.close()
            self._out_sock = None
        if want_in and self._in_sock is None:
            self._in_sock = PacketSocket(self.outgoing, netns=self.netns, direction="in")
            self._loop.add_reader(self._in_sock.fileno(), self._read, self._in_sock, False)
        elif not want_in and self._in_sock is not None:
            self._loop.remove_reader(self._in_sock.fileno())
            self._in_sock.close()
            self._in_sock = None

    def _read(self, sock: PacketSocket, outgoing: bool) -> None:
        assert self._loop is not None
        now = self._loop.time()
        try:
            batch = sock.recv_batch(64)
        except NetError as exc:
            self.errors += 1
            log.warning("%s", exc)
            return
        for pkt in batch:
            if outgoing:
                self.engine.packet_out(pkt.data, now)
            else:
                self.engine.packet_in(pkt.data, now)
        self._pump()

    def _raw_socket(self, version: int, *, local: bool = False) -> RawSocket:
        """Out of the link (resends), or, with `local`, routed like any packet this host
        sends: to a local address it is delivered here (replies re-delivered)."""
        key = version + 100 if local else version
        sock = self._raw.get(key)
        if sock is None:
            family = socket.AF_INET if version == 4 else socket.AF_INET6
            sock = RawSocket(family, socket.IPPROTO_RAW, netns=self.netns,
                             device=None if local else self.outgoing)
            self._raw[key] = sock
        return sock

    # --- control --------------------------------------------------------------------------
    def _on_take_over(self, params: dict[str, Any]) -> str:
        answer = self.engine.take_over_next_dial()
        log.info("a new instance was started for %s: this one %s", self.outgoing, answer)
        return answer

    def _on_wakeup(self, params: dict[str, Any]) -> str:
        assert self._loop is not None
        message = params.get("message")
        if not isinstance(message, str):
            raise CtlError("bad-request", "wakeup needs a string 'message'")
        try:
            answer = self.engine.wakeup(message, self._loop.time())
        except WakeupError as exc:
            log.warning("wakeup message refused: %s", exc)
            raise CtlError("bad-message", str(exc)) from exc
        self._pump()
        if self._watcher is not None and self.engine.link_addresses:
            # an address the link does not have (any more) never sends a notification: take
            # what is queued, then compare with the view
            self._watcher.read()
            self._on_addresses(self.outgoing, self._watcher.addresses_of(self.outgoing))
        return answer

    def status(self) -> dict[str, Any]:
        doc = self.engine.status()
        doc.update({
            "interface": self.outgoing,
            "snoop": self.snoop,
            "persistent": self.config.persistent,
            "lo_addresses": sorted(self._lo.owned) if self._lo else [],
            "errors": self.errors,
        })
        return doc

    def metrics(self) -> list[Metric]:
        counters = vars(self.engine.counters)
        out = [counter(f"ipshift_resend_{name}", value, f"resend {name.replace('_', ' ')}",
                       interface=self.outgoing)
               for name, value in counters.items() if isinstance(value, int)]
        out.append(counter("ipshift_resend_errors", self.errors, "failed kernel operations",
                           interface=self.outgoing))
        out.append(gauge("ipshift_resend_mappings", len(self._mapped), "flows mapped back",
                         interface=self.outgoing))
        return out

    # --- kernel state ---------------------------------------------------------------------
    def _lookup_origin(self, action: LookupOrigin) -> None:
        assert self._conntrack is not None
        flow = action.flow
        entries = self._conntrack.entries(reply_src=flow.remote, reply_dst=flow.local,
                                          proto=flow.proto)
        for entry in entries:
            r = entry.reply
            if flow.proto in (PROTO_TCP, PROTO_UDP):
                if (r.sport, r.dport) != (flow.remote_port, flow.local_port):
                    continue
                origin = (entry.orig.src, entry.orig.sport)
            elif r.icmp_id == flow.local_port:
                origin = (entry.orig.src, entry.orig.icmp_id)
            else:
                continue
            if origin[0] != flow.local and origin[1] is not None:
                log.info("%s was masqueraded from %s:%s", flow, origin[0], origin[1])
                self.engine.origin_found(flow, origin[0], int(origin[1]))
                return
            break
        # Not masqueraded: this host's own packet, or one routed from a network behind it,
        # whose replies do not depend on the link's address.
        assert self._netlink is not None
        try:
            local = {a.address for a in self._netlink.addresses()}
        except NetError as exc:
            log.warning("cannot list local addresses: %s", exc)
            return
        if flow.local not in local:
            log.info("%s comes from a routed network, not from this host: not resent", flow)
            self.engine.foreign_source(flow)

    def _map(self, m: FlowMapping) -> None:
        assert self._nft is not None and self._conntrack is not None
        if m.keep_inner_local:
            assert self._lo is not None
            self._lo.acquire(m.inner_addr)
        else:
            # A masqueraded flow: its old entry (LAN host -> peer, translated to the old address)
            # may outlive the address. Left in place, the mapped reply would clash with it and
            # conntrack would remap the reply's port; the LAN host's resolver drops that.
            stale = self._conntrack.delete_matching(
                orig_src=m.inner_addr, orig_dst=m.peer, proto=m.proto,
                orig_sport=m.inner_port, orig_dport=m.peer_port,
            )
            if stale:
                log.info("dropped %d stale masquerade entr%s of %s:%d", stale,
                         "y" if stale == 1 else "ies", m.inner_addr, m.inner_port)
        assert self._remaps is not None
        self._remaps.add([remap_of(m)], Direction.BOTH)
        self._mapped.add(m)
        log.info("mapped %s: replies to %s:%d go to %s:%d", m.peer, m.outer_addr, m.outer_port,
                 m.inner_addr, m.inner_port)

    def _unmap(self, m: FlowMapping) -> None:
        if m in self._mapped and self._remaps is not None:
            self._mapped.discard(m)
            try:
                self._remaps.remove([remap_of(m)], Direction.BOTH)
            except NetError as exc:
                log.warning("removing the mapping of %s: %s", m.peer, exc)
        if m.keep_inner_local and self._lo is not None:
            self._lo.release(m.inner_addr)

    def _check_flows(self, action: CheckFlows) -> None:
        """A TCP mapping lives as long as its connection. This host's own connection is its
        socket (sock_diag: also TIME_WAIT, so late segments are still mapped); conntrack
        would not do, since the kernel tracks nothing on a host whose rules never ask for it.
        A masqueraded one is its conntrack entry (masquerading needs conntrack)."""
        assert self._conntrack is not None and self._loop is not None
        gone = []
        for m in action.mappings:
            try:
                if m.keep_inner_local:
                    if self._sockdiag is None:
                        self._sockdiag = SockDiag(self.netns)
                    alive = bool(self._sockdiag.sockets(
                        "tcp", src=m.inner_addr, sport=m.inner_port, dst=m.peer,
                        dport=m.peer_port))
                else:
                    alive = bool(self._conntrack.entries(
                        orig_src=m.inner_addr, orig_dst=m.peer, proto=m.proto,
                        orig_sport=m.inner_port, orig_dport=m.peer_port))
            except NetError as exc:
                self.errors += 1
                log.warning("cannot tell whether %s:%d -> %s:%d is still open: %s",
                            m.inner_addr, m.inner_port, m.peer, m.peer_port, exc)
                continue  # kept: asked again at the next check
            if not alive:
                gone.append(m)
        if gone:
            self.engine.flows_gone(gone, self._loop.time())

    def _on_addresses(self, dev: str, addresses: list[Address]) -> None:
        """The link's addresses changed (or the link came or went): the engine decides what a
        lost address means for the cycle."""
        assert self._loop is not None
        present = {a.address for a in addresses}
        self.engine.present = present
        lost = sorted(self.engine.link_addresses - present)
        for addr in lost:
            self.engine.address_lost(addr, self._loop.time())
        if lost:
            self._pump()


def run_daemon(config: ResendConfig, *, outgoing: str, snoop: str, socket: Path,
               netns: str | None = None, metrics: str | None = None) -> int:
    daemon = ResendDaemon(config, outgoing=outgoing, snoop=snoop, netns=netns)
    return run_service(daemon, DaemonOptions(socket=socket, metrics=metrics))
