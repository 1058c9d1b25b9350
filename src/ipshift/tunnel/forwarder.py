"""The TUN <-> UDP forwarder: moves packets between one TUN queue and one UDP socket.

`QueuePump` does the work of one TUN queue and its socket, one read at a time:

- TUN -> UDP (`pump_tun`): one read returns a packet or a TSO/USO super-packet of up to 64 KB;
  it is cut into per-packet tunnel datagrams (`gso.Encapsulator`) and sent with one sendmsg and
  UDP_SEGMENT.
- UDP -> TUN (`pump_udp`): one recvmsg with UDP_GRO returns up to 64 KB of back-to-back tunnel
  datagrams; consecutive segments of a TCP flow are merged back into one super-packet
  (`gso.Decapsulator`) and written with one writev.

Peers: every pump forwards for the peers of a `PeerTable` (ipshift.tunnel.peers): outbound
the table picks the peer per TUN read, inbound it names the sender and checks what it may
send; per-peer state (reassembly, loss feedback, authentication) lives in `_PeerState`.

`Forwarder` drives pumps from one thread: a plain poll() loop that drains whichever fd is
ready. One thread per queue measured cheaper per byte than one thread per direction (GIL
hand-offs at every syscall) and than an asyncio loop (callback machinery per wake-up); see
docs/tunnel.md. Several queues run in several processes (`ipshift.tunnel.daemon`), as the GIL
would serialise them in one.
"""

from __future__ import annotations

import collections
import errno
import ipaddress
import logging
import mmap
import os
import select
import socket
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

from ipshift.net import udp
from ipshift.packet import vnet
from ipshift.packet.errors import PacketError
from ipshift.tunnel import auth, batch, gso, wire
from ipshift.tunnel.auth import DatagramAuth
from ipshift.tunnel.config import Endpoint
from ipshift.tunnel.hooks import CONTROL, INBOUND, OUTBOUND, packet_length
from ipshift.tunnel.hooks import Hooks as Hooks  # re-exported: where embedders found it
from ipshift.tunnel.peers import DropCounters, DropReason, Encapsulation, Peer, PeerTable

if TYPE_CHECKING:
    from ipshift.tunnel.raw import RawLink

log = logging.getLogger("ipshift.tunnel")

# One TUN read: vnet header + the largest super-packet the kernel builds (64 KB).
TUN_READ_SIZE = vnet.HEADER_LEN + 0x10000
# Reads per ready fd before looking at the other one: keeps ACKs flowing under bulk load.
DRAIN_BUDGET = 16
_POLL_IN = select.POLLIN | select.POLLERR | select.POLLHUP
# Send errors that mean "peer or path not there right now": the inner protocol copes.
_TRANSIENT_SEND_ERRORS = frozenset({
    errno.ECONNREFUSED, errno.EAGAIN, errno.ENOBUFS, errno.EHOSTUNREACH, errno.ENETUNREACH,
    errno.EHOSTDOWN, errno.ENETDOWN,
})


@dataclass
class Counters:
    """What went through one queue. Plain ints, updated per read or batch (not per packet), so
    counting stays off the per-packet cost."""

    tun_reads: int = 0  # packets or super-packets read from TUN
    tun_read_bytes: int = 0
    super_packets_out: int = 0  # reads that were TSO/USO super-packets, segmented in software
    datagrams_out: int = 0  # tunnel datagrams sent (one inner packet each)
    sends: int = 0  # sendmsg calls
    udp_receives: int = 0  # recvmsg calls that returned data (a GRO batch or one datagram)
    udp_receive_bytes: int = 0
    datagrams_in: int = 0  # well-formed tunnel datagrams received
    tun_writes: int = 0  # writes to TUN
    super_packets_in: int = 0  # writes that were coalesced super-packets
    malformed: int = 0  # tunnel datagrams dropped as malformed
    bad_tun_packets: int = 0  # TUN reads that could not be segmented
    rewritten: int = 0  # packets changed by the rewrite hooks
    hook_drops: int = 0  # packets a hook refused (e.g. malformed for the rewriter)
    send_errors: int = 0
    receive_errors: int = 0
    write_errors: int = 0
    foreign: int = 0  # datagrams from an endpoint that is no peer's (unknown_endpoint)
    strangers: int = 0  # ... of them handed to the component's stranger sink
    streams_incomplete: int = 0  # batch framing: super-packets that lost chunks on the way
    segments_recovered: int = 0  # ... and the segments of them delivered nonetheless
    loss_reports_sent: int = 0  # reports of incomplete streams sent to the peer
    loss_reports_received: int = 0  # ... received from it
    fallbacks: int = 0  # times loss reports made this end send per-packet framing for a while
    no_peer: int = 0  # TUN reads whose destination no peer owns (dropped)
    foreign_source: int = 0  # received packets whose inner source the peer may not use
    foreign_destination: int = 0  # received packets addressed to nothing this end serves
    control: int = 0  # packets a hook handed to the control plane
    resized: int = 0  # packets a hook replaced by one of another length
    auth_refused: int = 0  # datagrams refused by authentication (forged, replayed, ...)
    reports_refused: int = 0  # loss reports about more streams than were sent
    table_generation: int = 0  # the peer table generation this queue forwards with

    def as_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def add(self, other: Counters) -> None:
        for f in fields(self):
            if f.name == "table_generation":
                self.table_generation = max(self.table_generation, other.table_generation)
                continue
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    def as_array(self) -> list[int]:
        return [getattr(self, f.name) for f in fields(self)]

    @classmethod
    def from_array(cls, values: Sequence[int]) -> Counters:
        return cls(*values)

    @classmethod
    def size(cls) -> int:
        return len(fields(cls))


# Per-peer counters: one row of 64-bit words per table slot, in memory that forked queue
# workers share with the daemon (an anonymous shared mapping: pages cost only once touched).
PEER_FIELDS = (
    "tun_reads", "tun_read_bytes", "datagrams_out", "datagrams_in", "receive_bytes",
    "tun_writes", "foreign_source", "foreign_destination", "malformed", "hook_drops",
    "control", "resized", "send_errors", "auth_refused", "reports_refused", "fallbacks",
)
(_P_READS, _P_READ_BYTES, _P_OUT, _P_IN, _P_IN_BYTES, _P_WRITES, _P_FOREIGN_SOURCE,
 _P_FOREIGN_DESTINATION, _P_MALFORMED, _P_HOOK_DROPS, _P_CONTROL, _P_RESIZED, _P_SEND_ERRORS,
 _P_AUTH_REFUSED, _P_REPORTS_REFUSED, _P_FALLBACKS) = range(len(PEER_FIELDS))
_ROW = len(PEER_FIELDS)
DEFAULT_PEER_SLOTS = 65536


class PeerCounterArray:
    """Counters of each peer (by table slot) for `queues` queues, shareable across fork."""

    def __init__(self, slots: int = DEFAULT_PEER_SLOTS, queues: int = 1) -> None:
        self.slots = slots
        self.queues = queues
        self._map = mmap.mmap(-1, max(1, slots * queues * _ROW * 8))
        self.words = memoryview(self._map).cast("Q")

    def base(self, queue: int, slot: int) -> int:
        """Where the row of `slot` of `queue` starts; -1 beyond the array (not counted)."""
        if not 0 <= slot < self.slots:
            return -1
        return (queue * self.slots + slot) * _ROW

    def reset(self, queue: int, slot: int) -> None:
        base = self.base(queue, slot)
        if base >= 0:
            self.words[base:base + _ROW] = _ZERO_ROW

    def read(self, slot: int) -> dict[str, int]:
        """The counters of `slot`, summed over the queues."""
        totals = [0] * _ROW
        for queue in range(self.queues):
            base = self.base(queue, slot)
            if base < 0:
                break
            row = self.words[base:base + _ROW]
            for index in range(_ROW):
                totals[index] += row[index]
        return dict(zip(PEER_FIELDS, totals, strict=True))


_ZERO_ROW = memoryview(bytes(_ROW * 8)).cast("Q")
_SCRATCH_WORDS = memoryview(bytearray(_ROW * 8)).cast("Q")  # where uncounted peers count


class _PeerState:
    """What one queue keeps per peer: where to send, per-sender reassembly and loss
    feedback, authentication, counters. Made on the peer's first packet."""

    __slots__ = (
        "address",
        "assembler",
        "auth",
        "base",
        "fallback",
        "hook_in",
        "lost_seen",
        "peer",
        "raw",
        "recovered_seen",
        "reporter",
        "sock",
        "streams_reported",
        "streams_sent",
        "words",
    )

    def __init__(self, peer: Peer) -> None:
        self.peer = peer
        self.address: udp.Address | None = None  # None: the socket is connected to it
        self.sock: socket.socket | None = None
        self.raw = peer.encapsulation is not Encapsulation.UDP
        self.assembler = batch.BatchAssembler()
        self.reporter = batch.LossReporter()
        self.fallback = batch.Fallback()
        self.auth: DatagramAuth | None = None
        self.hook_in: gso.PacketHook | None = None
        self.streams_sent = 0  # batch-framed super-packets sent since the last loss report
        self.streams_reported = 0
        self.lost_seen = 0  # the assembler's loss figures already in the queue's counters
        self.recovered_seen = 0
        self.words = _SCRATCH_WORDS
        self.base = 0


class QueuePump:
    """The two directions of one TUN queue and its sockets, for the peers of a `PeerTable`.
    Each pump_* call does one read and everything it implies; it raises BlockingIOError when
    there was nothing to read.

    Outbound, each TUN read goes to the peer the table selects by its inner destination (with
    one peer, no lookup); inbound, a datagram counts only from a peer's endpoint, and what it
    carries is written to TUN only if its inner source is the peer's and its destination is
    served here (`PeerTable.inbound_verdict`, checked on every write). Batch reassembly, loss
    feedback and authentication are kept per peer. `set_table` swaps the table between two
    reads (the forwarding thread applies it; see Forwarder.call_soon).

    Without a table, the pump serves one peer that may send anything: the socket's connected
    peer, or `peer` (the point-to-point tunnel of the tests and benchmarks).

    The TUN fd must be non-blocking. Sockets stay blocking so that a full send buffer holds
    the TUN side back (backpressure) instead of dropping a whole super-packet; receives use
    MSG_DONTWAIT. `queue` N sends to each UDP peer's port + N (and expects it from there)."""

    def __init__(
        self,
        tun_fd: int,
        sock: socket.socket | Sequence[socket.socket],
        *,
        peer: udp.Address | None = None,
        hooks: Hooks | None = None,
        counters: Counters | None = None,
        chunk: int | None = None,
        table: PeerTable | None = None,
        queue: int = 0,
        raw: RawLink | None = None,
        peer_counters: PeerCounterArray | None = None,
        authenticated: bool = False,
    ) -> None:
        """chunk: send super-packets in batch framing (wire version 2) cut into chunks of this
        many bytes (the tunnel MTU); None: per-packet framing only. Both are received.
        authenticated: some peer may have a key, so sends leave room for its overhead."""
        self.tun_fd = tun_fd
        self.sockets = [sock] if isinstance(sock, socket.socket) else list(sock)
        self.sock = self.sockets[0]
        self._by_family = {s.family: s for s in self.sockets}
        self.queue = queue
        self.raw = raw
        self.counters = counters or Counters()
        self.drops = DropCounters()
        self.peer_counters = peer_counters or PeerCounterArray(slots=1024)
        self._connected: dict[socket.socket, tuple[str, int]] = {}
        for s in self.sockets:
            try:
                self._connected[s] = s.getpeername()[:2]
            except OSError:
                pass
        self._locals = {s.family: _endpoint_of(s.getsockname()) for s in self.sockets}
        self.table = table if table is not None else self._one_peer(peer)
        self.counters.table_generation = self.table.generation
        self._states: dict[str, _PeerState] = {}
        self._slot_owner: dict[int, str] = {}
        self._hooks = hooks if hooks is not None else Hooks()
        self._bind_hooks()
        overhead = auth.OVERHEAD * udp.MAX_SEGMENTS if authenticated else 0
        self.max_batch = udp.max_batch(self.sock.family) - overhead
        self._encoder: batch.BatchEncoder | None = None
        # Where a hook's replacement of a packet read from TUN is laid out for sending.
        self._resized = bytearray(TUN_READ_SIZE + 256)
        self._resized_encapsulator = gso.Encapsulator(self._resized, 0)
        self._sealed = bytearray(udp.MAX_RECEIVE + udp.MAX_SEGMENTS * auth.OVERHEAD)
        if chunk:
            # Batch framing: TUN reads scatter into a buffer laid out as chunk datagrams.
            self._encoder = encoder = batch.BatchEncoder(chunk, self.max_batch, TUN_READ_SIZE)
            self._tun_buf = encoder.buffer
            self._tun_iov = encoder.read_iov
            self._encapsulator = gso.Encapsulator(encoder.buffer, encoder.PACKET_AT)
            self._scratch_encapsulator = gso.Encapsulator(encoder.scratch, 0)
            # Chunk batches are sent without a control message: the socket cuts every send
            # into slot-sized datagrams (lone packets are never longer than a slot).
            for s in self.sockets:
                udp.set_segment_size(s, encoder.slot)
            self.pump_tun = self._batch_tun_pump()  # type: ignore[method-assign]
        else:
            self._tun_buf = bytearray(TUN_READ_SIZE)
            self._tun_iov = [memoryview(self._tun_buf)]
            self._encapsulator = gso.Encapsulator(self._tun_buf, vnet.HEADER_LEN)
        self._decapsulator = gso.Decapsulator(udp.MAX_RECEIVE + 1)
        self._opened = bytearray(udp.MAX_RECEIVE + 1)  # authenticated batches, once opened
        self._writes: list[gso.IoVec] = []
        self._current: _PeerState | None = None  # the sender of the batches being received
        self._current_sender: udp.Address | None = None
        # A router's GRO may join datagrams of both framings into one batch.
        self._decapsulator.on_other = self._chunk_among_packets
        self._decapsulator.coalesce = not self._hooks.resizes

    def _one_peer(self, address: udp.Address | None) -> PeerTable:
        """The table of a point-to-point pump: one peer that owns every destination."""
        if address is None:
            address = next(iter(self._connected.values()), None)
        if address is None:
            raise ValueError("a pump without a table needs a connected socket or `peer`")
        endpoint = _endpoint_of(address)
        everything = (ipaddress.ip_network("0.0.0.0/0"), ipaddress.ip_network("::/0"))
        return PeerTable([Peer("peer", endpoint, prefixes=everything)])

    # --- the table and the hooks --------------------------------------------------------------
    @property
    def hooks(self) -> Hooks:
        return self._hooks

    @hooks.setter
    def hooks(self, hooks: Hooks | None) -> None:
        self._hooks = hooks if hooks is not None else Hooks()
        self._bind_hooks()
        self._decapsulator.coalesce = not self._hooks.resizes

    def _bind_hooks(self) -> None:
        for state in self._states.values():
            state.hook_in = self._inbound_hook(state)

    def set_table(self, table: PeerTable) -> None:
        """Forward with `table` from the next read on. Peers whose entry did not change keep
        everything (streams being reassembled included); changed ones keep their state but
        for what the change touches; removed ones lose it."""
        old = self.table
        self.table = table
        self.counters.table_generation = table.generation
        try:
            delta = table.delta_since(old)
            names: Iterable[str] = [peer.name for _slot, peer in delta.upserts] + list(
                delta.removals)
        except Exception:
            names = list(self._states)
        for name in names:
            state = self._states.get(name)
            if state is None:
                continue
            peer = table.get(name)
            if peer is None:
                self._forget(state)
            elif peer is not state.peer:
                if peer.endpoint != state.peer.endpoint or peer.key != state.peer.key or \
                        peer.encapsulation != state.peer.encapsulation:
                    self._forget(state)  # another far end: start afresh
                else:
                    state.peer = peer
                    state.hook_in = self._inbound_hook(state)

    def _forget(self, state: _PeerState) -> None:
        if state is self._current:
            writes = self._writes
            self._decapsulator.flush(writes, state.hook_in)
            if writes:
                self._write(writes)
            self._current = None
            self._current_sender = None
        state.assembler.materialize()
        del self._states[state.peer.name]

    def _state(self, peer: Peer) -> _PeerState:
        """The state of `peer` (made on its first packet; the table knows the peer)."""
        state = self._states.get(peer.name)
        if state is not None:
            if state.peer is peer:
                return state
            self._forget(state)
        state = _PeerState(peer)
        slot = self.table.slots.get(peer.name, -1)
        base = self.peer_counters.base(self.queue, slot)
        if base >= 0:
            state.words, state.base = self.peer_counters.words, base
            if self._slot_owner.get(slot) != peer.name:
                self.peer_counters.reset(self.queue, slot)
                self._slot_owner[slot] = peer.name
        host = peer.endpoint.host
        family = socket.AF_INET6 if host.version == 6 else socket.AF_INET
        if not state.raw:
            sock = self._by_family.get(family)
            if sock is None:
                raise _NoSocket(f"peer {peer.name!r}: no local IPv{host.version} endpoint")
            state.sock = sock
            address = (socket.inet_ntop(family, host.packed), peer.endpoint.port + self.queue)
            if self._connected.get(sock) != address:
                state.address = address
            if peer.key is not None:
                local = self._locals[family]
                state.auth = DatagramAuth(
                    peer.key, auth.role_for(local, Endpoint(host, peer.endpoint.port)),
                    first_counter=time.time_ns(), lane=self.queue)
        state.assembler.on_other = self._packet_among_chunks
        state.hook_in = self._inbound_hook(state)
        self._states[peer.name] = state
        return state

    def _inbound_hook(self, state: _PeerState) -> gso.PacketHook | None:
        """The inbound hook bound to the peer, counting its verdicts."""
        hook = self._hooks.inbound
        if hook is None:
            return None
        peer = state.peer
        control = self._hooks.control
        counters = self.counters

        def bound(buf: bytearray, offset: int, partial: bool) -> bool | gso.Buffer:
            result = hook(buf, offset, partial, peer)
            if result is True:
                return True
            words, base = state.words, state.base
            if result is CONTROL:
                counters.control += 1
                words[base + _P_CONTROL] += 1
                if control is not None:
                    control(peer, INBOUND, bytes(buf[offset:offset + packet_length(buf, offset)]))
                return False
            if not result:
                counters.hook_drops += 1
                words[base + _P_HOOK_DROPS] += 1
                return False
            counters.resized += 1
            words[base + _P_RESIZED] += 1
            return result  # type: ignore[return-value]

        bound.resizes = self._hooks.resizes  # type: ignore[attr-defined]
        return bound

    def states(self) -> Mapping[str, _PeerState]:
        return self._states

    # --- TUN -> peer ----------------------------------------------------------------------------
    def _select(self, buf: bytearray, at: int, size: int) -> _PeerState | None:
        """The state of the peer for the packet buf[at:at + size]; None: dropped (counted)."""
        table = self.table
        peer = table.only or table.select(buf, at, at + size)
        if peer is None:
            self._no_peer(at, size)
            return None
        state = self._states.get(peer.name)
        if state is None or state.peer is not peer:
            try:
                state = self._state(peer)
            except _NoSocket as exc:
                self.counters.send_errors += 1
                log.debug("%s", exc)
                return None
        return state

    def pump_tun(self) -> None:
        """One TUN read, sent in per-packet framing."""
        counters = self.counters
        buf = self._tun_buf
        size = os.readv(self.tun_fd, self._tun_iov) - vnet.HEADER_LEN
        counters.tun_reads += 1
        counters.tun_read_bytes += size + vnet.HEADER_LEN
        state = self._select(buf, vnet.HEADER_LEN, size)
        if state is None:
            return
        words, base = state.words, state.base
        words[base + _P_READS] += 1
        words[base + _P_READ_BYTES] += size
        self._send_read(state, self._encapsulator, buf, vnet.HEADER_LEN, size,
                        *vnet.HEADER.unpack_from(buf))

    def _batch_tun_pump(self) -> Callable[[], None]:
        """pump_tun for batch framing, as a closure over everything it touches: it runs once
        per packet read from TUN, and attribute lookups are a good part of its cost."""
        encoder = self._encoder
        assert encoder is not None
        counters = self.counters
        pump = self  # hooks and the table may be replaced after construction: read per packet
        readv, fd, read_iov = os.readv, self.tun_fd, encoder.read_iov
        buf, view = encoder.buffer, encoder.view
        packet_at = encoder.PACKET_AT
        vnet_at = packet_at - vnet.HEADER_LEN
        unpack_vnet = vnet.HEADER.unpack_from
        header_at = packet_at - wire.HEADER_LEN  # a version 1 header before the packet
        room = encoder.chunk - batch.META_LEN  # packet bytes that fit the first slot
        pack_header = wire.HEADER.pack
        partial_first = wire.VERSION << 4 | wire.FLAG_PARTIAL
        plain, verified = wire.PLAIN_HEADER, wire.VERIFIED_HEADER
        needs_csum, data_valid = vnet.F_NEEDS_CSUM, vnet.F_DATA_VALID
        encode = encoder.encode
        chunk = encoder.chunk
        states = self._states
        state_for = self._state
        general = self._tun_read_general

        def send_whole(state: _PeerState, data: memoryview) -> None:
            """One send of chunk datagrams (or one packet) that the socket cuts itself."""
            counters.sends += 1
            sock = state.sock
            assert sock is not None
            try:
                if state.address is None:
                    sock.send(data)
                else:
                    sock.sendto(data, state.address)
            except OSError as exc:
                counters.send_errors += 1
                state.words[state.base + _P_SEND_ERRORS] += 1
                if exc.errno not in _TRANSIENT_SEND_ERRORS:
                    log.warning("tunnel send failed: %s", exc)

        def pump_tun() -> None:
            size = readv(fd, read_iov) - vnet.HEADER_LEN
            counters.tun_reads += 1
            counters.tun_read_bytes += size + vnet.HEADER_LEN
            table = pump.table
            peer = table.only
            if peer is None:
                peer = table.select(buf, packet_at, packet_at + size)
                if peer is None:
                    pump._no_peer(packet_at, size)
                    return
            state = states.get(peer.name)
            if state is None or state.peer is not peer:
                try:
                    state = state_for(peer)
                except _NoSocket as exc:
                    counters.send_errors += 1
                    log.debug("%s", exc)
                    return
            words, base = state.words, state.base
            words[base] += 1  # _P_READS
            words[base + 1] += size  # _P_READ_BYTES
            flags, gso_type, hdr_len, gso_size, csum_start, csum_offset = unpack_vnet(
                buf, vnet_at)
            if pump._hooks.outbound is None and not state.raw and state.auth is None:
                if not gso_type and 20 <= size <= room:
                    # The common small packet (an ACK): one version 1 datagram, in place.
                    if flags & needs_csum:
                        if csum_start < 20 or csum_start + csum_offset + 2 > size:
                            counters.bad_tun_packets += 1
                            return
                        buf[header_at:packet_at] = pack_header(
                            partial_first, csum_offset, csum_start)
                    else:
                        buf[header_at:packet_at] = verified if flags & data_valid else plain
                    counters.datagrams_out += 1
                    words[base + 2] += 1  # _P_OUT
                    send_whole(state, view[header_at:packet_at + size])
                    return
                if gso_type and not state.fallback.until:
                    try:
                        sends = encode(size, flags, gso_type, hdr_len, gso_size, csum_start,
                                       csum_offset)
                    except PacketError as exc:
                        counters.bad_tun_packets += 1
                        log.debug("dropped a packet from TUN: %s", exc)
                        return
                    if sends:
                        datagrams = -(-(batch.META_LEN + size) // chunk)
                        counters.super_packets_out += 1
                        counters.datagrams_out += datagrams
                        words[base + 2] += datagrams  # _P_OUT
                        state.streams_sent += 1
                        for data, _segment in sends:
                            send_whole(state, data)
                        return
            general(state, size, flags, gso_type, hdr_len, gso_size, csum_start, csum_offset)

        return pump_tun

    def _no_peer(self, at: int, size: int) -> None:
        reason = self.table.drop_reason(self._tun_buf, at, at + size)
        self.drops.count(reason)
        if reason is DropReason.MALFORMED:
            self.counters.bad_tun_packets += 1
        else:
            self.counters.no_peer += 1

    def _tun_read_general(
        self, state: _PeerState, size: int, flags: int, gso_type: int, hdr_len: int,
        gso_size: int, csum_start: int, csum_offset: int,
    ) -> None:
        """Batch framing's pump_tun beyond its fast paths: a super-packet or a packet too
        large for the first slot with a hook, a raw or authenticated peer, or a sender that
        fell back to per-packet framing."""
        counters = self.counters
        encoder = self._encoder
        assert encoder is not None
        hooks = self._hooks
        outbound = hooks.outbound
        try:
            if (gso_type and not state.raw and not hooks.resizes
                    and not state.fallback.active(time.monotonic())
                    and not (hooks.whole is not None
                             and hooks.whole(encoder.buffer, encoder.PACKET_AT, state.peer))):
                # The headers are in the first slot, where the hook can rewrite them.
                if outbound is not None and not self._outbound_verdict(
                    state, encoder.buffer, encoder.PACKET_AT, size, flags,
                    headers_only=lambda: self._packet_copy(size),
                ):
                    return
                sends = encoder.encode(size, flags, gso_type, hdr_len, gso_size, csum_start,
                                       csum_offset)
                if sends:
                    datagrams = batch.chunks_for(batch.META_LEN + size, encoder.chunk)
                    counters.super_packets_out += 1
                    counters.datagrams_out += datagrams
                    state.words[state.base + _P_OUT] += datagrams
                    state.streams_sent += 1
                    for datagrams_view, _segment in sends:
                        self._send(state, (datagrams_view,), 0, encoder.slot)
                    return
                outbound = None  # already applied
            buf, at = encoder.packet(size)
            try:
                self._send_read(
                    state,
                    self._encapsulator if buf is encoder.buffer else self._scratch_encapsulator,
                    buf, at, size, flags, gso_type, hdr_len, gso_size, csum_start, csum_offset,
                    hook=outbound is not None)
            finally:
                encoder.restore()
        except PacketError as exc:
            counters.bad_tun_packets += 1
            log.debug("dropped a packet from TUN: %s", exc)

    def _packet_copy(self, size: int) -> bytes:
        """The packet just read into the batch encoder's slots, as one piece."""
        encoder = self._encoder
        assert encoder is not None
        buf, at = encoder.packet(size)
        try:
            return bytes(buf[at:at + size])
        finally:
            encoder.restore()

    def _outbound_verdict(
        self, state: _PeerState, buf: bytearray, at: int, size: int, flags: int, *,
        headers_only: Callable[[], bytes] | None = None,
    ) -> bool | gso.Buffer:
        """Run the outbound hook on buf[at:at + size]: True to send it as it is (now), False
        if it is gone (dropped or handed to the control plane, counted), or its replacement.
        headers_only: only the headers are at buf[at:] (a super-packet in the batch slots);
        it returns the whole packet for the control plane, and a replacement is refused."""
        hooks = self._hooks
        assert hooks.outbound is not None
        result = hooks.outbound(buf, at, bool(flags & vnet.F_NEEDS_CSUM), state.peer)
        if result is True:
            return True
        counters = self.counters
        words, base = state.words, state.base
        if result is CONTROL:
            counters.control += 1
            words[base + _P_CONTROL] += 1
            if hooks.control is not None:
                hooks.control(state.peer, OUTBOUND, headers_only() if headers_only is not None
                              else bytes(buf[at:at + size]))
            return False
        if not result or headers_only is not None:
            counters.hook_drops += 1
            words[base + _P_HOOK_DROPS] += 1
            return False
        counters.resized += 1
        words[base + _P_RESIZED] += 1
        return result  # type: ignore[return-value]

    def _send_read(
        self, state: _PeerState, encapsulator: gso.Encapsulator, buf: bytearray, at: int,
        size: int, flags: int, gso_type: int, hdr_len: int, gso_size: int, csum_start: int,
        csum_offset: int, *, hook: bool = True,
    ) -> None:
        """Send the packet read from TUN, contiguous at buf[at:at + size], to `state`'s peer
        one inner packet per datagram (or through the raw link), after the outbound hook."""
        if hook and self._hooks.outbound is not None:
            verdict = self._outbound_verdict(state, buf, at, size, flags)
            if verdict is False:
                return
            if verdict is not True:
                # A replacement of another length, before the L4 header: lay it out for
                # sending and move the vnet offsets with it.
                replacement = verdict
                delta = len(replacement) - size
                buf, at, size = self._resized, 0, len(replacement)
                buf[:size] = replacement
                encapsulator = self._resized_encapsulator
                if flags & vnet.F_NEEDS_CSUM:
                    csum_start += delta
                if hdr_len:
                    hdr_len += delta
        if state.raw:
            if self.raw is None:
                self.counters.send_errors += 1
                state.words[state.base + _P_SEND_ERRORS] += 1
                return
            try:
                sent = self.raw.send(state.peer, buf, at, at + size, flags, gso_type, gso_size,
                                     csum_start, csum_offset)
            except PacketError as exc:
                self.counters.bad_tun_packets += 1
                log.debug("dropped a packet from TUN for %s: %s", state.peer.name, exc)
                return
            self.counters.datagrams_out += sent
            state.words[state.base + _P_OUT] += sent
            return
        self._send_packets(state, encapsulator, at + size, flags, gso_type, gso_size,
                           csum_start, csum_offset)

    def _send_packets(
        self, state: _PeerState, encapsulator: gso.Encapsulator, end: int, flags: int,
        gso_type: int, gso_size: int, csum_start: int, csum_offset: int,
    ) -> None:
        """Send the packet at encapsulator.buffer[encapsulator.offset:end] in per-packet
        framing (a super-packet cut into its packets)."""
        counters = self.counters
        try:
            iov, segment = encapsulator.encapsulate(
                end, flags, gso_type, gso_size, csum_start, csum_offset
            )
        except PacketError as exc:
            counters.bad_tun_packets += 1
            log.debug("dropped a packet from TUN: %s", exc)
            return
        if segment == 0:
            counters.datagrams_out += 1
            state.words[state.base + _P_OUT] += 1
            self._send(state, iov, 0)
            return
        count = len(iov) >> 1
        counters.super_packets_out += 1
        counters.datagrams_out += count
        state.words[state.base + _P_OUT] += count
        per_send = min(udp.MAX_SEGMENTS, self.max_batch // segment)
        if count <= per_send:
            self._send(state, iov, segment)
            return
        # More than one UDP_SEGMENT send may carry (a full 64 KB super-packet: its per-segment
        # headers push it past 65,507 bytes); the far end joins the batches again.
        step = per_send * 2
        for first in range(0, len(iov), step):
            chunk = iov[first:first + step]
            self._send(state, chunk, segment if len(chunk) > 2 else 0)

    def _send(self, state: _PeerState, iov: Sequence[gso.Buffer], segment: int,
              cut: int = 0) -> None:
        """One sendmsg to the peer: the datagrams in iov, each `segment` bytes but the last
        (0: one datagram; `cut`: the socket cuts them into datagrams of that size itself)."""
        counters = self.counters
        counters.sends += 1
        sock = state.sock
        assert sock is not None
        try:
            if state.auth is not None:
                data = iov[0] if len(iov) == 1 else b"".join(iov)
                size, segment = state.auth.seal_batch(data, len(data), segment or cut,
                                                      self._sealed)
                # Always with the segment size as a control message: the socket's own
                # (batch framing's slot) would cut a sealed packet longer than a slot.
                udp.send_segments(sock, (memoryview(self._sealed)[:size],), segment or size,
                                  state.address)
            elif cut:
                if state.address is None:
                    sock.send(iov[0])
                else:
                    sock.sendto(iov[0], state.address)
            else:
                if segment == 0 and self._encoder is not None:
                    # One datagram on a socket whose own segment size is batch framing's
                    # slot: name its length, or one that a hook made longer than a slot
                    # leaves cut in two.
                    segment = sum(map(len, iov))
                udp.send_segments(sock, iov, segment, state.address)
        except OSError as exc:
            counters.send_errors += 1
            state.words[state.base + _P_SEND_ERRORS] += 1
            if exc.errno not in _TRANSIENT_SEND_ERRORS:
                log.warning("tunnel send failed: %s", exc)

    # --- peer -> TUN ----------------------------------------------------------------------------
    def pump_udp(self, sock: socket.socket | None = None) -> None:
        """Receive one batch from `sock` (default: the first socket). While it ends in an open
        run of TCP segments or an incomplete batch-framed super-packet (one that took two UDP
        sends), receive the next batch too, so it reaches TUN whole. An incomplete
        super-packet whose rest has not arrived yet waits for it up to batch.STALE_AFTER (see
        `expire`)."""
        # The common cases (a whole super-packet, an ACK) are written out here: this runs
        # once per batch received, and calls are a good part of its cost.
        sock = sock or self.sock
        decapsulator = self._decapsulator
        writes = self._writes
        counters = self.counters
        receive, dontwait = udp.receive_segments, socket.MSG_DONTWAIT
        try:
            while True:
                state = self._current
                if state is not None and state.assembler.pending is not None:
                    self._make_room(state)
                try:
                    size, segment, sender = receive(sock, decapsulator.buffer, dontwait)
                except OSError as exc:
                    self._receive_failed(exc)
                    return
                counters.udp_receives += 1
                counters.udp_receive_bytes += size
                if sender != self._current_sender or state is None:
                    state = self._switch_sender(sender)
                    if state is None:
                        if self._hooks.stranger is not None:
                            self._hand_to_stranger(sender, size, segment)
                        return
                state.words[state.base + _P_IN_BYTES] += size
                if state.auth is not None:
                    size, segment = self._open(state, size, segment)
                    if not size:
                        return
                if state.hook_in is None and decapsulator.pending is None and \
                        self._fast_write(state, size, segment):
                    return
                if not self._take_batch(state, size, segment):
                    return
                if decapsulator.pending is None and state.assembler.pending is None:
                    return
                # What is complete goes now: the buffer it points into is received into again
                # after the next batch.
                if writes:
                    self._write(writes)
        finally:
            if writes:
                self._write(writes)

    def _make_room(self, state: _PeerState) -> None:
        """Keep the buffer an incomplete super-packet points into from being received into."""
        assembler = state.assembler
        decapsulator = self._decapsulator
        held = assembler.held()
        if held is not None and held is decapsulator.buffer:
            if decapsulator.pending is None:
                decapsulator.switch()
            else:
                assembler.materialize()

    def _receive_failed(self, exc: OSError) -> None:
        """A receive that returned no datagram: deliver what is pending. Re-raises
        BlockingIOError when nothing was (the caller's signal that the socket is drained)."""
        if isinstance(exc, BlockingIOError):
            if self._decapsulator.pending is None:
                raise exc
        elif isinstance(exc, ConnectionRefusedError):
            # A queued ICMP port unreachable for an earlier send: nothing received.
            self.counters.send_errors += 1
        else:  # e.g. a queued ICMP error of another kind
            self.counters.receive_errors += 1
            log.debug("tunnel receive failed: %s", exc)
        self._flush_current()

    def _open(self, state: _PeerState, size: int, segment: int) -> tuple[int, int]:
        """Authenticate and decrypt a keyed peer's batch in place in the receive buffer;
        (0, 0) when nothing of it was genuine (counted)."""
        assert state.auth is not None
        decapsulator = self._decapsulator
        refused_before = sum(state.auth.refused)
        size, segment = state.auth.open_batch(decapsulator.buffer, size, segment, self._opened)
        refused = sum(state.auth.refused) - refused_before
        if refused:
            self.counters.auth_refused += refused
            state.words[state.base + _P_AUTH_REFUSED] += refused
        if not size:
            self._flush_current()
            return 0, 0
        decapsulator.buffer[:size] = memoryview(self._opened)[:size]
        return size, segment

    def _switch_sender(self, sender: udp.Address) -> _PeerState | None:
        """Make the peer at `sender` the current one, after delivering what the previous one
        left pending; None (counted) if no peer has that endpoint."""
        self._flush_current()
        if self._current is not None:
            self._current.assembler.materialize()
        self._current = None
        self._current_sender = None
        peer = self.table.udp_endpoints.get((sender[0], sender[1] - self.queue))
        if peer is None:
            self.counters.foreign += 1
            self.drops.count(DropReason.UNKNOWN_ENDPOINT)
            return None
        state = self._states.get(peer.name)
        if state is None or state.peer is not peer:
            try:
                state = self._state(peer)
            except _NoSocket:
                self.counters.foreign += 1
                return None
        self._current = state
        self._current_sender = sender
        return state

    def _hand_to_stranger(self, sender: udp.Address, size: int, segment: int) -> None:
        """Give each datagram of a batch from an unknown endpoint to the stranger sink."""
        sink = self._hooks.stranger
        assert sink is not None
        data = self._decapsulator.buffer
        step = segment if 0 < segment < size else max(size, 1)  # an empty datagram is one too
        address = (str(sender[0]), int(sender[1]) - self.queue)
        for start in range(0, max(size, 1), step):
            self.counters.strangers += 1
            try:
                sink(address, bytes(data[start:min(start + step, size)]))
            except Exception:
                log.exception("the stranger sink failed on a datagram from %s", address[0])

    def _flush_current(self) -> None:
        state = self._current
        if state is not None and self._decapsulator.pending is not None:
            self._decapsulator.flush(self._writes, state.hook_in)
        if self._writes:
            self._write(self._writes)

    def _fast_write(self, state: _PeerState, size: int, segment: int) -> bool:
        """The two common cases, written straight from the receive buffer when no hook
        needs to see them: a GRO batch that is exactly one whole batch-framed super-packet,
        and a lone packet that cannot join a run (an ACK). True if it was one of them."""
        buf = self._decapsulator.buffer
        if segment:
            iov = state.assembler.whole(buf, size, segment)
            if iov is None:
                return False
            # A whole batch-framed super-packet: straight to TUN.
            datagrams = -(-size // segment)
            self.counters.datagrams_in += datagrams
            state.words[state.base + _P_IN] += datagrams
            if not iov:
                self.counters.malformed += 1
                state.words[state.base + _P_MALFORMED] += 1
                return True
        else:
            if state.assembler.pending is not None:
                return False
            vnet_header = _lone_packet(buf, size)
            if vnet_header is None:
                return False
            # The common lone packet (an ACK): straight to TUN.
            self.counters.datagrams_in += 1
            state.words[state.base + _P_IN] += 1
            iov = [vnet_header, memoryview(buf)[4:size]]
        if self.table.checks_inbound:
            self._write([iov], state)
            return True
        counters = self.counters
        counters.tun_writes += 1
        state.words[state.base + _P_WRITES] += 1
        if len(iov) > 2:
            counters.super_packets_in += 1
        try:
            os.writev(self.tun_fd, iov)
        except OSError as exc:
            counters.write_errors += 1
            log.debug("TUN write failed: %s", exc)
        return True

    def _take_batch(self, state: _PeerState, size: int, segment: int) -> bool:
        """Decapsulate or reassemble one batch into `self._writes`; False if it was a loss
        report (nothing more to do)."""
        counters = self.counters
        decapsulator = self._decapsulator
        assembler = state.assembler
        writes = self._writes
        hook = state.hook_in
        buf = decapsulator.buffer
        if size == batch.REPORT_LEN and buf[0] == batch.REPORT_BYTE and not segment:
            self._on_report(state, buf)
            if decapsulator.pending is not None:
                decapsulator.flush(writes, hook)
            return False
        before = assembler.malformed
        if size and buf[0] == batch.FIRST_BYTE:  # batch framing
            if decapsulator.pending is not None:
                decapsulator.flush(writes, hook)
            accepted = assembler.receive(buf, size, segment, time.monotonic(), writes, hook)
            malformed = 0
        else:
            accepted, malformed = decapsulator.decapsulate(size, segment, writes, hook)
            held = assembler.held()
            if held is not None and held is decapsulator.buffer:
                assembler.materialize()  # the decapsulator moved to that buffer
        if assembler.malformed != before or assembler.lost != state.lost_seen:
            # Chunks, and whole streams found malformed once assembled.
            malformed += assembler.malformed - before
            self._count_assembler(state)
        counters.datagrams_in += accepted
        counters.malformed += malformed
        state.words[state.base + _P_IN] += accepted
        state.words[state.base + _P_MALFORMED] += malformed
        return True

    def _chunk_among_packets(self, buf: bytearray, start: int, end: int) -> bool:
        state = self._current
        if state is None:
            return False
        assembler = state.assembler
        taken = assembler.receive_one(
            buf, start, end, time.monotonic(), self._writes, state.hook_in)
        if not taken:
            # The decapsulator counts the datagrams it hands over and that are refused; the
            # assembler counted this one too (exactly once, whatever the reason).
            assembler.malformed -= 1
        return taken

    def _packet_among_chunks(self, buf: bytearray, start: int, end: int) -> bool:
        state = self._current
        hook = state.hook_in if state is not None else None
        if self._decapsulator.pending is not None:
            self._decapsulator.flush(self._writes, hook)
        return _single(buf, memoryview(buf), start, end, self._writes, hook)

    def _count_assembler(self, state: _PeerState) -> None:
        """Carry the assembler's loss figures into the counters, and tell the peer when
        streams arrive incomplete (it may fall back to per-packet framing)."""
        assembler = state.assembler
        counters = self.counters
        counters.streams_incomplete += assembler.lost - state.lost_seen
        counters.segments_recovered += assembler.recovered - state.recovered_seen
        state.lost_seen, state.recovered_seen = assembler.lost, assembler.recovered
        report = state.reporter.due(assembler.streams, assembler.lost, time.monotonic())
        if report is not None:
            counters.loss_reports_sent += 1
            self._send(state, (report,), 0)

    def _on_report(self, state: _PeerState, buf: bytearray) -> None:
        """A loss report from the peer: believed only about streams that were sent to it."""
        counters = self.counters
        data = memoryview(buf)[:batch.REPORT_LEN]
        try:
            complete, incomplete = batch.report_counts(data)
        except PacketError:
            counters.malformed += 1
            state.words[state.base + _P_MALFORMED] += 1
            return
        sent = state.streams_sent - state.streams_reported
        if complete + incomplete > sent:
            counters.reports_refused += 1
            state.words[state.base + _P_REPORTS_REFUSED] += 1
            return
        state.streams_reported += complete + incomplete
        fell_back = state.fallback.on_report(data, time.monotonic())
        counters.loss_reports_received += 1
        if fell_back and state.fallback.count != state.words[state.base + _P_FALLBACKS]:
            counters.fallbacks += 1
            state.words[state.base + _P_FALLBACKS] = state.fallback.count
            log.info("peer %s reports lost chunks: per-packet framing for %.0f s",
                     state.peer.name, batch.FALLBACK_SECONDS)

    def _only_state(self) -> _PeerState:
        peer = self.table.only
        if peer is None:
            raise AttributeError("a pump with several peers keeps this per peer")
        return self._state(peer)

    @property
    def fallback(self) -> batch.Fallback:
        """The loss-feedback state of the one peer of a point-to-point pump."""
        return self._only_state().fallback

    @property
    def assembler(self) -> batch.BatchAssembler:
        """The reassembly state of the one peer of a point-to-point pump."""
        return self._only_state().assembler

    def waiting(self) -> bool:
        """Is an incomplete batch-framed super-packet waiting for the rest of its chunks?"""
        return any(state.assembler.pending is not None for state in self._states.values())

    def expire(self) -> None:
        """Deliver what arrived of super-packets whose missing chunks are overdue."""
        writes = self._writes
        now = time.monotonic()
        for state in list(self._states.values()):
            if state.assembler.pending is None:
                continue
            state.assembler.expire(now, writes, state.hook_in)
            self._count_assembler(state)
            if writes:
                self._write(writes, state)

    # --- raw peers ------------------------------------------------------------------------------
    def pump_raw(self, fd: int) -> None:
        """Packets from IP-in-IP and GRE peers on one raw socket."""
        assert self.raw is not None
        arrivals = self.raw.receive(fd)
        if not arrivals:
            raise BlockingIOError
        table = self.table
        counters = self.counters
        writes = self._writes
        for arrival in arrivals:
            counters.udp_receives += 1
            counters.udp_receive_bytes += len(arrival.inner)
            peer = table.peer_by_endpoint(arrival.host, arrival.selector, arrival.encapsulation)
            if peer is None:
                counters.foreign += 1
                self.drops.count(DropReason.UNKNOWN_ENDPOINT)
                continue
            state = self._states.get(peer.name)
            if state is None or state.peer is not peer:
                state = self._state(peer)
            counters.datagrams_in += 1
            state.words[state.base + _P_IN] += 1
            state.words[state.base + _P_IN_BYTES] += len(arrival.inner)
            inner = bytearray(arrival.inner)
            if state.hook_in is None:
                writes.append([vnet.PLAIN, inner])
            else:
                gso.hooked_write(state.hook_in, inner, 0, False, vnet.PLAIN, inner, writes)
            if writes:
                self._write(writes, state)

    # --- TUN writes -----------------------------------------------------------------------------
    def _count_refused(self, state: _PeerState, why: DropReason) -> None:
        self.drops.count(why)
        counters = self.counters
        words, base = state.words, state.base
        if why is DropReason.FOREIGN_SOURCE:
            counters.foreign_source += 1
            words[base + _P_FOREIGN_SOURCE] += 1
        elif why is DropReason.FOREIGN_DESTINATION:
            counters.foreign_destination += 1
            words[base + _P_FOREIGN_DESTINATION] += 1
        else:
            counters.malformed += 1
            words[base + _P_MALFORMED] += 1

    def _write(self, writes: list[gso.IoVec], state: _PeerState | None = None) -> None:
        """Write what `state` (default: the current sender) sent, after the inbound checks."""
        state = state or self._current
        if state is None:
            writes.clear()
            return
        counters = self.counters
        tun_fd = self.tun_fd
        table = self.table
        checks = table.checks_inbound
        peer = state.peer
        words, base = state.words, state.base
        for iov in writes:
            if checks:
                why = table.inbound_verdict(peer, iov[1])
                if why is not None:
                    self._count_refused(state, why)
                    continue
            counters.tun_writes += 1
            words[base + _P_WRITES] += 1
            if len(iov) > 2:
                counters.super_packets_in += 1
            try:
                os.writev(tun_fd, iov)
            except OSError as exc:
                counters.write_errors += 1
                log.debug("TUN write failed: %s", exc)
        writes.clear()


class _NoSocket(Exception):
    """A peer of an IP family this end has no socket for."""


def _endpoint_of(address: Sequence[Any]) -> Endpoint:
    return Endpoint(ipaddress.ip_address(str(address[0]).partition("%")[0]), int(address[1]))


_LONE_VNET = {
    0x10: vnet.PLAIN,
    0x12: vnet.HEADER.pack(vnet.F_DATA_VALID, vnet.GSO_NONE, 0, 0, 0, 0),
}


def _lone_packet(buf: bytearray, size: int) -> bytes | None:
    """The vnet header for the version 1 datagram buf[:size] if it can go to TUN as it is: well
    formed (the checks of wire.decode) and not a TCP segment with data, which the
    Decapsulator might join with the next ones. None: let the Decapsulator decide."""
    if size < 24:
        return None
    first = buf[0]
    ip0 = buf[4]
    if ip0 >> 4 == 4:
        if ip0 & 0x0F < 5 or (buf[6] << 8 | buf[7]) != size - 4:
            return None
        l4_proto = buf[13]
    elif ip0 >> 4 == 6:
        if size < 44 or (buf[8] << 8 | buf[9]) + 44 != size:
            return None
        l4_proto = buf[10]
    else:
        return None
    if first == 0x11:
        csum_offset = buf[1]
        csum_start = buf[2] << 8 | buf[3]
        if csum_start < (20 if ip0 >> 4 == 4 else 40) or csum_start + csum_offset + 2 > size - 4:
            return None
        if l4_proto == 6 and csum_offset == 16:
            tcp = 4 + csum_start
            if tcp + 13 >= size or size - tcp - (buf[tcp + 12] >> 4) * 4 != 0:
                return None  # TCP with data (or odd): maybe part of a run
        return vnet.HEADER.pack(vnet.F_NEEDS_CSUM, vnet.GSO_NONE, 0, 0, csum_start, csum_offset)
    if buf[1] or buf[2] or buf[3]:
        return None
    return _LONE_VNET.get(first)


def _single(
    buf: bytearray, view: memoryview, start: int, end: int, writes: list[gso.IoVec],
    hook: gso.PacketHook | None,
) -> bool:
    """One version 1 datagram at buf[start:end] as one TUN write; False if malformed."""
    try:
        header, _packet = wire.decode(view[start:end])
    except PacketError:
        return False
    inner = start + wire.HEADER_LEN
    vnet_header = gso.vnet_for(header.flags, header.csum_start, header.csum_offset)
    if hook is None:
        writes.append([vnet_header, view[inner:end]])
    else:
        gso.hooked_write(hook, buf, inner, header.partial, vnet_header, view[inner:end], writes)
    return True


class Forwarder:
    """Runs QueuePumps on one thread with a poll() loop until stop() (from any thread or a
    signal handler). `run()` blocks the calling thread; `start()` runs it on a new thread.
    `call_soon(fn)` runs fn on the forwarding thread between two reads (how a peer table or
    hooks change under a running pump); `add_reader(fd, fn)` polls another fd (a queue
    worker's control pipe)."""

    def __init__(self, pumps: Sequence[QueuePump]) -> None:
        self.pumps = list(pumps)
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._calls: collections.deque[Callable[[], None]] = collections.deque()
        self._readers: dict[int, Callable[[], None]] = {}
        self.error: BaseException | None = None

    def call_soon(self, call: Callable[[], None]) -> None:
        """Run `call` on the forwarding thread before its next read (thread-safe)."""
        self._calls.append(call)
        self._wake()

    def add_reader(self, fd: int, call: Callable[[], None]) -> None:
        """Call `call` when `fd` is readable (before run(); it must not block)."""
        self._readers[fd] = call

    def _run_calls(self) -> None:
        calls = self._calls
        while calls:
            call = calls.popleft()
            try:
                call()
            except Exception:
                log.exception("a change to the running tunnel failed")

    def run(self) -> None:
        poller = select.poll()
        handlers: dict[int, Callable[[], None]] = {}
        for pump in self.pumps:
            os.set_blocking(pump.tun_fd, False)
            poller.register(pump.tun_fd, _POLL_IN)
            handlers[pump.tun_fd] = pump.pump_tun
            for sock in pump.sockets:
                sock.setblocking(True)
                poller.register(sock.fileno(), _POLL_IN)
                handlers[sock.fileno()] = _bound(pump.pump_udp, sock)
            if pump.raw is not None:
                for fd in pump.raw.fds():
                    poller.register(fd, _POLL_IN)
                    handlers[fd] = _bound(pump.pump_raw, fd)
        for fd in self._readers:
            poller.register(fd, _POLL_IN)
        poller.register(self._wake_r, select.POLLIN)
        budget = range(DRAIN_BUDGET)
        readers = self._readers
        try:
            pumps = self.pumps
            wait_ms = max(1, int(batch.STALE_AFTER * 1000))
            while not self._stopping:
                if self._calls:
                    self._run_calls()
                timeout = wait_ms if any(pump.waiting() for pump in pumps) else None
                events = poller.poll(timeout)
                if timeout is not None:
                    for pump in pumps:
                        if pump.waiting():
                            pump.expire()
                for fd, _events in events:
                    step = handlers.get(fd)
                    if step is None:
                        if fd == self._wake_r:
                            self._drain_wake()
                        elif fd in readers:
                            readers[fd]()
                        continue
                    try:
                        for _ in budget:
                            step()
                    except BlockingIOError:
                        pass
        except BaseException as exc:
            if not self._stopping:
                log.exception("forwarder stopped by an unexpected error")
                self.error = exc
                raise

    def _drain_wake(self) -> None:
        try:
            while os.read(self._wake_r, 4096):
                pass
        except OSError:
            pass

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass  # pipe full (already woken) or closed

    def start(self, name: str = "tunnel-forwarder") -> None:
        self._thread = threading.Thread(target=self._run_quietly, name=name, daemon=True)
        self._thread.start()

    def _run_quietly(self) -> None:
        try:
            self.run()
        except BaseException:  # recorded in self.error and logged by run()
            pass

    def counters(self) -> Counters:
        total = Counters()
        for pump in self.pumps:
            total.add(pump.counters)
        return total

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stop(self, timeout: float = 5.0) -> None:
        """Make run() return (safe from signal handlers and other threads)."""
        self._stopping = True
        self._wake()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def close(self) -> None:
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass


def _bound(method: Callable[[Any], None], argument: Any) -> Callable[[], None]:
    def step() -> None:
        method(argument)

    return step
