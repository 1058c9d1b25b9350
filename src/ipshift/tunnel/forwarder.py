"""The TUN <-> UDP forwarder: moves packets between one TUN queue and one UDP socket.

`QueuePump` does the work of one TUN queue and its socket, one read at a time:

- TUN -> UDP (`pump_tun`): one read returns a packet or a TSO/USO super-packet of up to 64 KB;
  it is cut into per-packet tunnel datagrams (`gso.Encapsulator`) and sent with one sendmsg and
  UDP_SEGMENT.
- UDP -> TUN (`pump_udp`): one recvmsg with UDP_GRO returns up to 64 KB of back-to-back tunnel
  datagrams; consecutive segments of a TCP flow are merged back into one super-packet
  (`gso.Decapsulator`) and written with one writev.

`Forwarder` drives pumps from one thread: a plain poll() loop that drains whichever fd is
ready. One thread per queue measured cheaper per byte than one thread per direction (GIL
hand-offs at every syscall) and than an asyncio loop (callback machinery per wake-up); see
docs/tunnel.md. Several queues run in several processes (`ipshift.tunnel.daemon`), as the GIL
would serialise them in one.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields

from ipshift.net import udp
from ipshift.packet import vnet
from ipshift.packet.errors import PacketError
from ipshift.tunnel import batch, gso, wire

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
    foreign: int = 0  # datagrams from an address that is not the peer (unconnected sockets)
    streams_incomplete: int = 0  # batch framing: super-packets that lost chunks on the way
    segments_recovered: int = 0  # ... and the segments of them delivered nonetheless
    loss_reports_sent: int = 0  # reports of incomplete streams sent to the peer
    loss_reports_received: int = 0  # ... received from it
    fallbacks: int = 0  # times loss reports made this end send per-packet framing for a while

    def as_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def add(self, other: Counters) -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    def as_array(self) -> list[int]:
        return [getattr(self, f.name) for f in fields(self)]

    @classmethod
    def from_array(cls, values: Sequence[int]) -> Counters:
        return cls(*values)

    @classmethod
    def size(cls) -> int:
        return len(fields(cls))


@dataclass(frozen=True)
class Hooks:
    """Per-packet hooks (see gso.PacketHook): `outbound` sees packets read from TUN before they
    are encapsulated, `inbound` packets coming out of the tunnel before they are written."""

    outbound: gso.PacketHook | None = None
    inbound: gso.PacketHook | None = None


class QueuePump:
    """The two directions of one TUN queue and its UDP socket. Each pump_* call does one read
    and everything it implies; it raises BlockingIOError when there was nothing to read.

    The TUN fd must be non-blocking. The socket stays blocking so that a full send buffer
    holds the TUN side back (backpressure) instead of dropping a whole super-packet; receives
    use MSG_DONTWAIT."""

    def __init__(
        self,
        tun_fd: int,
        sock: socket.socket,
        *,
        peer: udp.Address | None = None,
        hooks: Hooks | None = None,
        counters: Counters | None = None,
        chunk: int | None = None,
    ) -> None:
        """chunk: send super-packets in batch framing (wire version 2) cut into chunks of this
        many bytes (the tunnel MTU); None: per-packet framing only. Both are received."""
        self.tun_fd = tun_fd
        self.sock = sock
        # With a connected socket the kernel filters senders and routes once; peer is only
        # needed for an unconnected one.
        self.peer = peer
        self.hooks = hooks or Hooks()
        self.counters = counters or Counters()
        self.max_batch = udp.max_batch(sock.family)
        self._encoder: batch.BatchEncoder | None = None
        # Loss reports from the peer make batch framing send per-packet for a while.
        self.fallback = batch.Fallback()
        if chunk:
            # Batch framing: TUN reads scatter into a buffer laid out as chunk datagrams.
            self._encoder = encoder = batch.BatchEncoder(chunk, self.max_batch, TUN_READ_SIZE)
            self._tun_buf = encoder.buffer
            self._tun_iov = encoder.read_iov
            self._encapsulator = gso.Encapsulator(encoder.buffer, encoder.PACKET_AT)
            self._scratch_encapsulator = gso.Encapsulator(encoder.scratch, 0)
            # Chunk batches are sent without a control message: the socket cuts every send
            # into slot-sized datagrams (lone packets are never longer than a slot).
            udp.set_segment_size(sock, encoder.slot)
            self.pump_tun = self._batch_tun_pump()  # type: ignore[method-assign]
        else:
            self._tun_buf = bytearray(TUN_READ_SIZE)
            self._tun_iov = [memoryview(self._tun_buf)]
            self._encapsulator = gso.Encapsulator(self._tun_buf, vnet.HEADER_LEN)
        self._decapsulator = gso.Decapsulator(udp.MAX_RECEIVE + 1)
        self._assembler = self.assembler = batch.BatchAssembler()
        self._reporter = batch.LossReporter()
        self._writes: list[gso.IoVec] = []
        # A router's GRO may join datagrams of both framings into one batch.
        self._decapsulator.on_other = self._chunk_among_packets
        self._assembler.on_other = self._packet_among_chunks

    # --- TUN -> UDP ---------------------------------------------------------------------------
    def pump_tun(self) -> None:
        """One TUN read, sent in per-packet framing."""
        counters = self.counters
        buf = self._tun_buf
        size = os.readv(self.tun_fd, self._tun_iov)
        counters.tun_reads += 1
        counters.tun_read_bytes += size
        flags, gso_type, _hdr_len, gso_size, csum_start, csum_offset = vnet.HEADER.unpack_from(
            buf
        )
        outbound = self.hooks.outbound
        if outbound is not None and not outbound(
            buf, vnet.HEADER_LEN, bool(flags & vnet.F_NEEDS_CSUM)
        ):
            counters.hook_drops += 1
            return
        self._send_packets(self._encapsulator, size, flags, gso_type, gso_size, csum_start,
                           csum_offset)

    def _batch_tun_pump(self) -> Callable[[], None]:
        """pump_tun for batch framing, as a closure over everything it touches: it runs once
        per packet read from TUN, and attribute lookups are a good part of its cost."""
        encoder = self._encoder
        assert encoder is not None
        counters = self.counters
        pump = self  # hooks may be replaced after construction: read them per packet
        readv, fd, read_iov = os.readv, self.tun_fd, encoder.read_iov
        buf, view = encoder.buffer, encoder.view
        vnet_at = encoder.PACKET_AT - vnet.HEADER_LEN
        unpack_vnet = vnet.HEADER.unpack_from
        header_at = encoder.PACKET_AT - wire.HEADER_LEN  # a version 1 header before the packet
        room = encoder.chunk - batch.META_LEN  # packet bytes that fit the first slot
        pack_header = wire.HEADER.pack
        partial_first = wire.VERSION << 4 | wire.FLAG_PARTIAL
        plain, verified = wire.PLAIN_HEADER, wire.VERIFIED_HEADER
        needs_csum, data_valid = vnet.F_NEEDS_CSUM, vnet.F_DATA_VALID
        sock = self.sock
        peer = self.peer

        def send_whole(data: memoryview) -> None:
            """One send of chunk datagrams (or one packet) that the socket cuts itself."""
            counters.sends += 1
            try:
                if peer is None:
                    sock.send(data)
                else:
                    sock.sendto(data, peer)
            except OSError as exc:
                counters.send_errors += 1
                if exc.errno not in _TRANSIENT_SEND_ERRORS:
                    log.warning("tunnel send failed: %s", exc)

        encode = encoder.encode
        chunk = encoder.chunk
        fallback = self.fallback

        def pump_tun() -> None:
            size = readv(fd, read_iov) - vnet.HEADER_LEN
            counters.tun_reads += 1
            counters.tun_read_bytes += size + vnet.HEADER_LEN
            flags, gso_type, hdr_len, gso_size, csum_start, csum_offset = unpack_vnet(
                buf, vnet_at)
            outbound = pump.hooks.outbound
            if not gso_type and 20 <= size <= room and outbound is None:
                # The common small packet (an ACK): one version 1 datagram, in place.
                if flags & needs_csum:
                    if csum_start < 20 or csum_start + csum_offset + 2 > size:
                        counters.bad_tun_packets += 1
                        return
                    buf[header_at:encoder.PACKET_AT] = pack_header(
                        partial_first, csum_offset, csum_start)
                else:
                    buf[header_at:encoder.PACKET_AT] = verified if flags & data_valid else plain
                counters.datagrams_out += 1
                send_whole(view[header_at:encoder.PACKET_AT + size])
                return
            if gso_type and outbound is None and not fallback.until:
                try:
                    sends = encode(size, flags, gso_type, hdr_len, gso_size, csum_start,
                                   csum_offset)
                except PacketError as exc:
                    counters.bad_tun_packets += 1
                    log.debug("dropped a packet from TUN: %s", exc)
                    return
                if sends:
                    counters.super_packets_out += 1
                    counters.datagrams_out += -(-(batch.META_LEN + size) // chunk)
                    for datagrams, _segment in sends:
                        send_whole(datagrams)
                    return
            self._tun_read_general(size, flags, gso_type, hdr_len, gso_size, csum_start,
                                   csum_offset)

        return pump_tun

    def _tun_read_general(
        self, size: int, flags: int, gso_type: int, hdr_len: int, gso_size: int,
        csum_start: int, csum_offset: int,
    ) -> None:
        """A super-packet, a packet too large for the first slot, or any packet with a
        hook: the rest of batch framing's pump_tun."""
        counters = self.counters
        encoder = self._encoder
        assert encoder is not None
        outbound = self.hooks.outbound
        try:
            if gso_type and not self.fallback.active(time.monotonic()):
                # The headers are in the first slot, where the hook can rewrite them.
                if outbound is not None and not outbound(
                    encoder.buffer, encoder.PACKET_AT, bool(flags & vnet.F_NEEDS_CSUM)
                ):
                    counters.hook_drops += 1
                    return
                sends = encoder.encode(size, flags, gso_type, hdr_len, gso_size, csum_start,
                                       csum_offset)
                if sends:
                    counters.super_packets_out += 1
                    counters.datagrams_out += batch.chunks_for(batch.META_LEN + size,
                                                              encoder.chunk)
                    for datagrams, _segment in sends:
                        self._send((datagrams,), 0)  # the socket cuts them (UDP_SEGMENT)
                    return
                outbound = None  # already applied
            buf, at = encoder.packet(size)
            try:
                if outbound is not None and not outbound(
                    buf, at, bool(flags & vnet.F_NEEDS_CSUM)
                ):
                    counters.hook_drops += 1
                    return
                self._send_packets(
                    self._encapsulator if buf is encoder.buffer else self._scratch_encapsulator,
                    at + size, flags, gso_type, gso_size, csum_start, csum_offset)
            finally:
                encoder.restore()
        except PacketError as exc:
            counters.bad_tun_packets += 1
            log.debug("dropped a packet from TUN: %s", exc)

    def _send_packets(
        self, encapsulator: gso.Encapsulator, end: int, flags: int, gso_type: int,
        gso_size: int, csum_start: int, csum_offset: int,
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
            self._send(iov, 0)
            return
        count = len(iov) >> 1
        counters.super_packets_out += 1
        counters.datagrams_out += count
        per_send = min(udp.MAX_SEGMENTS, self.max_batch // segment)
        if count <= per_send:
            self._send(iov, segment)
            return
        # More than one UDP_SEGMENT send may carry (a full 64 KB super-packet: its per-segment
        # headers push it past 65,507 bytes); the far end joins the batches again.
        step = per_send * 2
        for first in range(0, len(iov), step):
            chunk = iov[first:first + step]
            self._send(chunk, segment if len(chunk) > 2 else 0)

    def _send(self, iov: Sequence[gso.Buffer], segment: int) -> None:
        self.counters.sends += 1
        try:
            udp.send_segments(self.sock, iov, segment, self.peer)
        except OSError as exc:
            self.counters.send_errors += 1
            if exc.errno not in _TRANSIENT_SEND_ERRORS:
                log.warning("tunnel send failed: %s", exc)

    # --- UDP -> TUN ---------------------------------------------------------------------------
    def pump_udp(self) -> None:
        """Receive one batch. While it ends in an open run of TCP segments or an incomplete
        batch-framed super-packet (one that took two UDP sends), receive the next batch too, so
        it reaches TUN whole. An incomplete super-packet whose rest has not arrived yet waits
        for it up to batch.STALE_AFTER (see `expire`)."""
        counters = self.counters
        decapsulator = self._decapsulator
        assembler = self._assembler
        writes = self._writes
        hook = self.hooks.inbound
        try:
            while True:
                held = assembler.held()
                if held is not None and held is decapsulator.buffer:
                    # An incomplete super-packet points into it: receive into the other one.
                    if decapsulator.pending is None:
                        decapsulator.switch()
                    else:
                        assembler.materialize()
                try:
                    size, segment, sender = udp.receive_segments(
                        self.sock, decapsulator.buffer, socket.MSG_DONTWAIT
                    )
                except BlockingIOError:
                    if decapsulator.pending is None:
                        raise
                    decapsulator.flush(writes, hook)
                    return
                except ConnectionRefusedError:
                    # A queued ICMP port unreachable for an earlier send: nothing received.
                    counters.send_errors += 1
                    decapsulator.flush(writes, hook)
                    return
                except OSError as exc:  # e.g. a queued ICMP error of another kind
                    counters.receive_errors += 1
                    log.debug("tunnel receive failed: %s", exc)
                    decapsulator.flush(writes, hook)
                    return
                counters.udp_receives += 1
                counters.udp_receive_bytes += size
                if self.peer is not None and sender[:2] != self.peer[:2]:
                    counters.foreign += 1
                    decapsulator.flush(writes, hook)
                    return
                buf = decapsulator.buffer
                if segment and hook is None and decapsulator.pending is None:
                    iov = assembler.whole(buf, size, segment)
                    if iov is not None:
                        # A whole batch-framed super-packet: straight to TUN.
                        counters.datagrams_in += -(-size // segment)
                        if iov:
                            counters.tun_writes += 1
                            counters.super_packets_in += 1
                            try:
                                os.writev(self.tun_fd, iov)
                            except OSError as exc:
                                counters.write_errors += 1
                                log.debug("TUN write failed: %s", exc)
                        else:
                            counters.malformed += 1
                        return
                elif (
                    not segment
                    and hook is None
                    and decapsulator.pending is None
                    and assembler.pending is None
                ):
                    vnet_header = _lone_packet(buf, size)
                    if vnet_header is not None:
                        # The common lone packet (an ACK): straight to TUN.
                        counters.datagrams_in += 1
                        counters.tun_writes += 1
                        try:
                            os.writev(self.tun_fd, (vnet_header, memoryview(buf)[4:size]))
                        except OSError as exc:
                            counters.write_errors += 1
                            log.debug("TUN write failed: %s", exc)
                        return
                if size == batch.REPORT_LEN and buf[0] == batch.REPORT_BYTE and not segment:
                    self._on_report(buf)
                    if decapsulator.pending is not None:
                        decapsulator.flush(writes, hook)
                    return
                before = assembler.malformed
                if size and buf[0] == batch.FIRST_BYTE:  # batch framing
                    if decapsulator.pending is not None:
                        decapsulator.flush(writes, hook)
                    accepted = assembler.receive(
                        decapsulator.buffer, size, segment, time.monotonic(), writes, hook)
                    malformed = 0
                else:
                    accepted, malformed = decapsulator.decapsulate(size, segment, writes, hook)
                    held = assembler.held()
                    if held is not None and held is decapsulator.buffer:
                        assembler.materialize()  # the decapsulator moved to that buffer
                if assembler.malformed != before or assembler.lost != counters.streams_incomplete:
                    # Chunks, and whole streams found malformed once assembled.
                    malformed += assembler.malformed - before
                    self._count_assembler()
                counters.datagrams_in += accepted
                counters.malformed += malformed
                if decapsulator.pending is None and assembler.pending is None:
                    return
                # What is complete goes now: the buffer it points into is received into again
                # after the next batch.
                if writes:
                    self._write(writes)
        finally:
            if writes:
                self._write(writes)

    def _chunk_among_packets(self, buf: bytearray, start: int, end: int) -> bool:
        assembler = self._assembler
        taken = assembler.receive_one(
            buf, start, end, time.monotonic(), self._writes, self.hooks.inbound)
        if not taken:
            # The decapsulator counts the datagrams it hands over and that are refused; the
            # assembler counted this one too (exactly once, whatever the reason).
            assembler.malformed -= 1
        return taken

    def _packet_among_chunks(self, buf: bytearray, start: int, end: int) -> bool:
        if self._decapsulator.pending is not None:
            self._decapsulator.flush(self._writes, self.hooks.inbound)
        return _single(buf, memoryview(buf), start, end, self._writes, self.hooks.inbound)

    def _count_assembler(self) -> None:
        """Carry the assembler's loss figures into the counters, and tell the peer when
        streams arrive incomplete (it may fall back to per-packet framing)."""
        assembler = self._assembler
        counters = self.counters
        counters.streams_incomplete = assembler.lost
        counters.segments_recovered = assembler.recovered
        report = self._reporter.due(assembler.streams, assembler.lost, time.monotonic())
        if report is not None:
            counters.loss_reports_sent += 1
            self._send((report,), 0)

    def _on_report(self, buf: bytearray) -> None:
        counters = self.counters
        try:
            fell_back = self.fallback.on_report(memoryview(buf)[:batch.REPORT_LEN],
                                                time.monotonic())
        except PacketError:
            counters.malformed += 1
            return
        counters.loss_reports_received += 1
        if fell_back and self.fallback.count != counters.fallbacks:
            counters.fallbacks = self.fallback.count
            log.info("the peer reports lost chunks: per-packet framing for %.0f s",
                     batch.FALLBACK_SECONDS)

    def waiting(self) -> bool:
        """Is an incomplete batch-framed super-packet waiting for the rest of its chunks?"""
        return self._assembler.pending is not None

    def expire(self) -> None:
        """Deliver what arrived of a super-packet whose missing chunks are overdue."""
        writes = self._writes
        self._assembler.expire(time.monotonic(), writes, self.hooks.inbound)
        self._count_assembler()
        if writes:
            self._write(writes)

    def _write(self, writes: list[gso.IoVec]) -> None:
        counters = self.counters
        counters.tun_writes += len(writes)
        tun_fd = self.tun_fd
        for iov in writes:
            if len(iov) > 2:
                counters.super_packets_in += 1
            try:
                os.writev(tun_fd, iov)
            except OSError as exc:
                counters.write_errors += 1
                log.debug("TUN write failed: %s", exc)
        writes.clear()


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
    if hook is not None and not hook(buf, inner, header.partial):
        return True
    writes.append([gso.vnet_for(header.flags, header.csum_start, header.csum_offset),
                   view[inner:end]])
    return True


class Forwarder:
    """Runs QueuePumps on one thread with a poll() loop until stop() (from any thread or a
    signal handler). `run()` blocks the calling thread; `start()` runs it on a new thread."""

    def __init__(self, pumps: Sequence[QueuePump]) -> None:
        self.pumps = list(pumps)
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.error: BaseException | None = None

    def run(self) -> None:
        poller = select.poll()
        handlers = {}
        for pump in self.pumps:
            pump.sock.setblocking(True)
            os.set_blocking(pump.tun_fd, False)
            poller.register(pump.tun_fd, _POLL_IN)
            poller.register(pump.sock.fileno(), _POLL_IN)
            handlers[pump.tun_fd] = pump.pump_tun
            handlers[pump.sock.fileno()] = pump.pump_udp
        poller.register(self._wake_r, select.POLLIN)
        budget = range(DRAIN_BUDGET)
        try:
            pumps = self.pumps
            wait_ms = max(1, int(batch.STALE_AFTER * 1000))
            assemblers = [pump.assembler for pump in pumps]
            while not self._stopping:
                timeout = None
                for assembler in assemblers:
                    if assembler.pending is not None:
                        timeout = wait_ms
                events = poller.poll(timeout)
                if timeout is not None:
                    for pump in pumps:
                        if pump.waiting():
                            pump.expire()
                for fd, _events in events:
                    step = handlers.get(fd)
                    if step is None:
                        continue  # the wake-up pipe
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
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass  # pipe full (already woken) or closed
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def close(self) -> None:
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass
