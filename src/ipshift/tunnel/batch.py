"""Batch framing (tunnel wire version 2): a TSO/USO super-packet crosses the tunnel whole.

Per-packet framing (version 1, `gso`) cuts every super-packet read from TUN into complete inner
packets and joins them again at the far end. Batch framing skips both: the super-packet and a
16-byte description of it (its vnet fields) are sent as one byte stream cut into chunks, one
chunk per UDP datagram, each behind a 4-byte chunk header. A 64 KB super-packet is one or two
UDP_SEGMENT sends; at the far end one GRO receive usually holds all its chunks, and it goes to
TUN as one write. The per-chunk work is one column of stream numbers (the chunk indexes never
change), so the Python cost per super-packet no longer depends on its segment count.

What the framing gives up, and how that is bounded:

- A chunk is not a packet. When a chunk is lost, the receiver still delivers every inner segment
  whose bytes all arrived, each as a complete packet rebuilt from chunk 0's headers (the same
  cutting `gso.Encapsulator` does on the send side); only the segments that overlapped the lost
  chunk are lost. Without chunk 0 (headers unknown) the whole super-packet is lost.
- The receiver assembles one stream at a time: a chunk of another stream closes the open one,
  and so does a short timeout (`STALE_AFTER`). Reordering across streams loses the late chunks.
- Packets read from TUN one at a time (ACKs, small packets, anything not a super-packet) keep
  the version 1 datagram: one packet each, decodable alone.

Wire format (big-endian), see docs/tunnel.md:

    chunk header:  version 2 | flags 0 (1 byte) | chunk index (1) | stream number (2)
    chunk 0 data starts with the meta:
        flags (1: PARTIAL / VERIFIED as in version 1) | gso_type (1: virtio values, ECN 0x80)
        hdr_len (2) | gso_size (2) | csum_start (2) | csum_offset (2) | chunk size (2)
        length of the inner super-packet (4)
    then the inner super-packet; the stream (meta + packet) is cut every `chunk size` bytes.

No I/O here; the forwarder does the sends, receives and TUN writes.
"""

from __future__ import annotations

import struct

from ipshift.packet import vnet
from ipshift.packet.errors import PacketError
from ipshift.tunnel import wire
from ipshift.tunnel.gso import (
    MAX_SEGMENTS,
    Buffer,
    Encapsulator,
    IoVec,
    OtherDatagram,
    PacketHook,
    SegmentError,
    resized_vnet,
    super_packet_shape,
)

VERSION = 2
CHUNK = struct.Struct(">BBH")
CHUNK_LEN = CHUNK.size
FIRST_BYTE = VERSION << 4  # flags are all reserved: a chunk header always starts with 0x20
META = struct.Struct(">BBHHHHHI")
META_LEN = META.size  # 16
MAX_CHUNKS = 256  # the index is one byte
MIN_CHUNK = 512
# Largest inner super-packet: an IPv6 one with a full payload length field.
MAX_PACKET = 0xFFFF + 40
# Seconds an incomplete stream waits for its missing chunks (a second UDP send on its way).
STALE_AFTER = 0.005
#: The most datagrams one UDP_SEGMENT send carries (net/ipv4/udp.c: UDP_MAX_SEGMENTS).
MAX_SEGMENTS_PER_SEND = 64

_VALID_GSO = frozenset({vnet.GSO_TCPV4, vnet.GSO_TCPV6, vnet.GSO_UDP_L4})


# Loss feedback. A receiver that finds streams arriving incomplete tells the sender, at most
# every REPORT_INTERVAL seconds, in a 12-byte datagram: version 2 with flag 0x1, two reserved
# bytes, then the streams it completed and the streams that arrived incomplete since its last
# report (32 bits each). A sender that hears that at least LOSS_SHARE of the streams, and at
# least MIN_INCOMPLETE of them, were incomplete sends super-packets in per-packet framing for
# FALLBACK_SECONDS, then tries batch framing again.
REPORT_BYTE = FIRST_BYTE | 0x1
REPORT = struct.Struct(">BBHII")
REPORT_LEN = REPORT.size
REPORT_INTERVAL = 0.1
LOSS_SHARE = 0.05
MIN_INCOMPLETE = 2  # one lost chunk now and then is no reason to change
FALLBACK_SECONDS = 10.0

# The first two bytes of chunk headers 0, 1, 2, ...: (version, index) pairs back to back.
_HEADS = b"".join(bytes([FIRST_BYTE, index]) for index in range(MAX_CHUNKS))


def packet_error(
    packet: Buffer, size: int, gso_type: int, gso_size: int, csum_start: int, csum_offset: int,
) -> str | None:
    """Why the `size`-byte super-packet starting with `packet` (its headers at least) may not
    go to a TUN device whole with these vnet fields; None if it may. The checks of
    gso.super_packet_shape plus the IP length field, in one call for the receive path."""
    if len(packet) < csum_start + 20:
        return "headers not in the first chunk"
    version = packet[0] >> 4
    if version == 4:
        if (
            (packet[2] << 8 | packet[3]) != size
            or csum_start != (packet[0] & 0x0F) * 4
            or csum_start < 20
        ):
            return "IPv4 length or header length"
        protocol = packet[9]
    elif version == 6:
        if (packet[4] << 8 | packet[5]) + 40 != size or csum_start < 40 or csum_start & 3:
            return "IPv6 length or checksum start"
        protocol = packet[6] if csum_start == 40 else -1  # -1: after extension headers
    else:
        return f"IP version {version}"
    gso = gso_type & vnet.GSO_TYPE_MASK
    if gso == vnet.GSO_UDP_L4:
        if protocol not in (17, -1) or csum_offset != 6:
            return "UDP segmentation of a packet that is not UDP"
        l4_len = 8
    elif gso == (vnet.GSO_TCPV4 if version == 4 else vnet.GSO_TCPV6):
        l4_len = (packet[csum_start + 12] >> 4) * 4
        if protocol not in (6, -1) or csum_offset != 16 or l4_len < 20:
            return "TCP segmentation of a packet that is not TCP"
    else:
        return f"gso_type 0x{gso_type:x} for IPv{version}"
    if gso_type & 0x78:
        return f"gso_type 0x{gso_type:x}"
    payload = size - csum_start - l4_len
    if gso_size <= 0 or payload <= 0 or payload > gso_size * MAX_SEGMENTS:
        return f"{payload} bytes in {gso_size}-byte segments"
    return None


class BatchError(PacketError):
    """A batch-framed stream is malformed; counted and dropped."""


def chunks_for(length: int, chunk: int) -> int:
    """How many chunks carry a stream of `length` bytes (meta included)."""
    return -(-length // chunk)


class LossReporter:
    """Receive side of the loss feedback: when to tell the sender, and what."""

    def __init__(self) -> None:
        self._complete = 0
        self._incomplete = 0
        self._last = float("-inf")

    def due(self, complete: int, incomplete: int, now: float) -> bytes | None:
        """The report to send now, given the running totals of complete and incomplete
        streams; None when there is no news or the last report is too recent."""
        if incomplete <= self._incomplete or now - self._last < REPORT_INTERVAL:
            return None
        report = REPORT.pack(REPORT_BYTE, 0, 0, (complete - self._complete) & 0xFFFFFFFF,
                             (incomplete - self._incomplete) & 0xFFFFFFFF)
        self._complete, self._incomplete, self._last = complete, incomplete, now
        return report


def report_counts(data: Buffer) -> tuple[int, int]:
    """(complete, incomplete) streams of a loss report; BatchError if it is not one."""
    if len(data) != REPORT_LEN or data[0] != REPORT_BYTE or data[1] or data[2] or data[3]:
        raise BatchError("bad-report", f"{len(data)}-byte loss report")
    _first, _reserved, _zero, complete, incomplete = REPORT.unpack_from(data)
    return complete, incomplete


class Fallback:
    """Send side of the loss feedback: whether super-packets go in per-packet framing now."""

    def __init__(self) -> None:
        self.until = 0.0  # per-packet framing until then (monotonic); 0.0: batch framing
        self.count = 0  # times it fell back

    def on_report(self, data: Buffer, now: float) -> bool:
        """Take a loss report; True if it makes the sender fall back. Raises BatchError for a
        malformed one."""
        complete, incomplete = report_counts(data)
        if incomplete >= MIN_INCOMPLETE and incomplete >= LOSS_SHARE * (complete + incomplete):
            if not self.until:
                self.count += 1
            self.until = now + FALLBACK_SECONDS
            return True
        return False

    def active(self, now: float) -> bool:
        """Is the sender in per-packet framing? (Back to batch framing once the time is up.)"""
        if self.until and now >= self.until:
            self.until = 0.0
        return bool(self.until)


# --- send -------------------------------------------------------------------------------------
class BatchEncoder:
    """The send side: a read buffer laid out as the datagrams themselves.

    The buffer is a row of slots of `chunk + 4` bytes, each a chunk header (written once, but
    for the stream number) followed by room for one chunk. The TUN read scatters into the
    chunk rooms (`read_iov`, for os.readv), with the vnet header landing where the meta goes;
    so a super-packet read is already its datagrams, back to back, and goes out as one plain
    slice of the buffer: no per-chunk work at all but one column of stream numbers.

    Packets that are not cut (`packet()`) are made contiguous again: at most the bytes that
    spilled over into the second slot move back by the 4 bytes of its header."""

    # Where the packet starts in the buffer: after chunk 0's header and the meta.
    PACKET_AT = CHUNK_LEN + META_LEN

    def __init__(self, chunk: int, per_send_bytes: int, read_size: int = 0x10000 + 10) -> None:
        if not MIN_CHUNK <= chunk <= 0xFFFF:
            raise ValueError(f"chunk size {chunk} outside {MIN_CHUNK}..65535")
        self.chunk = chunk
        self.slot = slot = chunk + CHUNK_LEN
        self.per_send = max(1, min(MAX_SEGMENTS_PER_SEND, per_send_bytes // slot))
        # The read lands vnet header first, at the end of the meta.
        readable = read_size - vnet.HEADER_LEN + META_LEN
        self.slots = chunks_for(readable, chunk)
        if self.slots > MAX_CHUNKS:
            raise ValueError(f"chunk size {chunk}: a 64 KB super-packet needs over 256 chunks")
        self.buffer = buf = bytearray(self.slots * slot)
        buf[0::slot] = bytes([FIRST_BYTE]) * self.slots
        buf[1::slot] = bytes(range(self.slots))
        self.view = view = memoryview(buf)
        first = self.PACKET_AT - vnet.HEADER_LEN
        self.read_iov: list[memoryview] = [view[first:slot]] + [
            view[index * slot + CHUNK_LEN:(index + 1) * slot] for index in range(1, self.slots)]
        self.stream = 0
        self.scratch = bytearray(read_size)  # for packets spread over several slots
        self._dirty = False  # slot 1's header holds packet bytes (see packet())

    @staticmethod
    def one_send_limit(chunk: int, per_send_bytes: int) -> int:
        """The largest super-packet that goes out in one UDP send."""
        per_send = max(1, min(MAX_SEGMENTS_PER_SEND, per_send_bytes // (chunk + CHUNK_LEN)))
        return per_send * chunk - META_LEN

    def vnet_fields(self) -> tuple[int, int, int, int, int, int]:
        """The vnet header of the packet just read."""
        return vnet.HEADER.unpack_from(self.buffer, self.PACKET_AT - vnet.HEADER_LEN)

    def encode(
        self, size: int, flags: int, gso_type: int, hdr_len: int, gso_size: int,
        csum_start: int, csum_offset: int,
    ) -> list[tuple[memoryview, int]]:
        """The sends for the `size`-byte super-packet just read: (datagrams, segment size)
        pairs, each one slice of the buffer. Empty: the packet is not a super-packet after
        all (one segment), send it as a packet. The packet comes from the kernel; the receiving
        end checks it in full before it goes to a TUN device whole."""
        buf = self.buffer
        at = self.PACKET_AT
        udp = gso_type & vnet.GSO_TYPE_MASK == vnet.GSO_UDP_L4
        if (
            not flags & vnet.F_NEEDS_CSUM
            or not 20 <= csum_start <= min(size - (8 if udp else 20), self.chunk - 128)
            or gso_size <= 0
        ):
            raise SegmentError("vnet-gso", "a super-packet needs a partial checksum in it")
        header_len = csum_start + (8 if udp else (buf[at + csum_start + 12] >> 4) * 4)
        if size - header_len <= gso_size:
            return []
        if self._dirty:
            self.restore()
        chunk, slot = self.chunk, self.slot
        length = META_LEN + size
        count = chunks_for(length, chunk)
        META.pack_into(buf, CHUNK_LEN, wire.FLAG_PARTIAL, gso_type, hdr_len, gso_size,
                       csum_start, csum_offset, chunk, size)
        self.stream = stream = (self.stream + 1) & 0xFFFF
        end = count * slot
        buf[2:end:slot] = bytes([stream >> 8]) * count
        buf[3:end:slot] = bytes([stream & 0xFF]) * count
        total = length + count * CHUNK_LEN
        per_send = self.per_send
        if count <= per_send:
            return [(self.view[:total], slot if count > 1 else 0)]
        sends = []
        step = per_send * slot
        for first in range(0, total, step):
            part = self.view[first:min(first + step, total)]
            sends.append((part, slot if len(part) > slot else 0))
        return sends

    def packet(self, size: int) -> tuple[bytearray, int]:
        """The `size`-byte packet just read as one contiguous piece: (buffer, offset). It is
        moved together in place when it spilled over a little (a full-size packet: the meta
        takes room in the first slot), else copied to a scratch buffer."""
        room = self.chunk - META_LEN  # packet bytes in slot 0
        if size <= room:
            return self.buffer, self.PACKET_AT
        slot = self.slot
        spill = size - room
        if spill <= self.chunk:
            buf = self.buffer
            # Over slot 1's header, which `restore` writes back after the send.
            buf[slot:slot + spill] = buf[slot + CHUNK_LEN:slot + CHUNK_LEN + spill]
            self._dirty = True
            return buf, self.PACKET_AT
        scratch = self.scratch
        scratch[:size] = b"".join(self._pieces(size))
        return scratch, 0

    def restore(self) -> None:
        """Put slot 1's chunk header back after `packet()` moved a packet over it."""
        if self._dirty:
            self.buffer[self.slot:self.slot + 2] = bytes([FIRST_BYTE, 1])
            self._dirty = False

    def _pieces(self, size: int) -> list[memoryview]:
        out = []
        left = size
        for index, room in enumerate(self.read_iov):
            piece = room[vnet.HEADER_LEN:] if index == 0 else room
            out.append(piece[:left])
            left -= len(out[-1])
            if left <= 0:
                break
        return out


# --- receive ----------------------------------------------------------------------------------
class _Stream:
    """One super-packet being assembled from its chunks."""

    __slots__ = (
        "chunk",
        "count",
        "csum_offset",
        "csum_start",
        "gso_size",
        "gso_type",
        "have",
        "hdr_len",
        "held",
        "number",
        "pieces",
        "since",
        "size",
        "vnet_flags",
    )

    def __init__(self, number: int, since: float) -> None:
        self.number = number
        self.since = since
        # Each chunk's data, by index (None: not here yet).
        self.pieces: list[Buffer | None] = [None] * MAX_CHUNKS
        self.have = 0
        self.count = 0  # 0 until chunk 0 (with the meta) is here
        self.chunk = self.size = self.gso_type = self.gso_size = self.hdr_len = 0
        self.csum_start = self.csum_offset = self.vnet_flags = 0
        self.held: bytearray | None = None  # the receive buffer some pieces are views into

    def take_meta(self, data: Buffer) -> None:
        """Read the meta at the start of chunk 0's data; raises BatchError."""
        if len(data) < META_LEN:
            raise BatchError("bad-meta", "chunk 0 shorter than the meta")
        flags, gso_type, hdr_len, gso_size, csum_start, csum_offset, chunk, size = (
            META.unpack_from(data)
        )
        if flags != wire.FLAG_PARTIAL:
            raise BatchError("bad-meta", f"flags 0x{flags:x} (a super-packet is PARTIAL)")
        if gso_type & vnet.GSO_TYPE_MASK not in _VALID_GSO or gso_type & 0x78:
            raise BatchError("bad-meta", f"gso_type 0x{gso_type:x}")
        if chunk < MIN_CHUNK or not 20 <= size <= MAX_PACKET:
            raise BatchError("bad-meta", f"chunk size {chunk}, packet {size} bytes")
        count = chunks_for(META_LEN + size, chunk)
        if count > MAX_CHUNKS:
            raise BatchError("bad-meta", f"{count} chunks")
        self.chunk, self.size, self.count = chunk, size, count
        self.gso_type, self.gso_size, self.hdr_len = gso_type, gso_size, hdr_len
        self.csum_start, self.csum_offset = csum_start, csum_offset
        self.vnet_flags = vnet.F_NEEDS_CSUM

    def expected(self, index: int) -> int:
        """Data bytes chunk `index` must have."""
        if index < self.count - 1:
            return self.chunk
        return META_LEN + self.size - (self.count - 1) * self.chunk

    def complete(self) -> bool:
        return self.count > 0 and self.have == self.count


class BatchAssembler:
    """Turns received chunk datagrams back into TUN writes.

    `receive()` takes the chunk datagrams of one GRO batch (a version 1 datagram among them
    goes to `on_other`). A stream that completes inside the batch is written straight from the
    receive buffer. A stream still incomplete at the end of a batch of several chunks keeps
    pointing into that buffer (`held()`): the caller receives into another one, or calls
    `materialize()` first. Single chunks of an incomplete stream are copied."""

    def __init__(self) -> None:
        self.pending: _Stream | None = None
        self.streams = 0  # super-packets written whole
        self.recovered = 0  # segments rebuilt from incomplete streams
        self.lost = 0  # streams that lost chunks (and so some or all of their segments)
        self.malformed = 0  # chunks or streams dropped as malformed
        self._scratch = bytearray(META_LEN + MAX_PACKET + vnet.HEADER_LEN)
        self._layouts: dict[tuple[int, int], tuple[memoryview, memoryview, list[Buffer]]] = {}
        # Called as on_other(buffer, start, end) for a version 1 datagram in a batch; returns
        # whether it was taken.
        self.on_other: OtherDatagram | None = None
        self._encapsulator = Encapsulator(self._scratch, vnet.HEADER_LEN)

    # The forwarder calls this with the datagrams buf[:nbytes], each `segment` bytes but the
    # last (segment 0: one datagram); `now` is a monotonic time.
    def whole(self, buf: bytearray, nbytes: int, segment: int) -> IoVec | None:
        """If the GRO batch buf[:nbytes] (datagrams of `segment` bytes) is exactly one whole
        stream, the usual case, its TUN write: an iovec of the vnet header and slices of the
        receive buffer. An empty list: it was one, but malformed (counted). None: not that
        case (the general path, `receive`, decides)."""
        if buf[0] != FIRST_BYTE or buf[1] or self.pending is not None or segment & 1:
            return None
        flags, gso_type, hdr_len, gso_size, csum_start, csum_offset, chunk, size = (
            META.unpack_from(buf, CHUNK_LEN))
        count = -(-nbytes // segment)
        if (
            segment != chunk + CHUNK_LEN
            or nbytes != META_LEN + size + CHUNK_LEN * count
            or flags != wire.FLAG_PARTIAL
            or count > MAX_CHUNKS
        ):
            return None
        layout = self._layouts.get((id(buf), segment))
        if layout is None:
            layout = self._layout(buf, segment)
        view, pairs, slices = layout
        # Chunk headers: (version, index) and the stream number, as two columns of pairs.
        half = segment >> 1
        if (
            bytes(pairs[0:nbytes >> 1:half]) != _HEADS[:2 * count]
            or bytes(pairs[1:nbytes >> 1:half]) != bytes(view[2:4]) * count
        ):
            return None
        iov = slices[:count + 1]  # [vnet header slot, packet start, the other chunks ...]
        iov[count] = view[(count - 1) * segment + CHUNK_LEN:nbytes]
        if not self._finish(iov, size, gso_type, hdr_len, gso_size, csum_start, csum_offset):
            return []
        return iov

    def receive(
        self, buf: bytearray, nbytes: int, segment: int, now: float, writes: list[IoVec],
        hook: PacketHook | None = None,
    ) -> int:
        """Take the chunk datagrams of one GRO batch (each `segment` bytes but the last;
        segment 0: one datagram); `now` is a monotonic time. What is complete is appended to
        `writes`. Returns the number of datagrams taken (the rest were malformed)."""
        if nbytes <= 0:
            self.malformed += 1  # an empty datagram
            return 0
        step = segment or nbytes
        count = -(-nbytes // step)
        if count > 1:
            iov = self.whole(buf, nbytes, step)
            if iov is not None:
                if iov:
                    self._deliver(iov, writes, hook)
                return count
        if count > 1 and buf[0] == FIRST_BYTE and nbytes > (count - 1) * step + CHUNK_LEN:
            layout = self._layouts.get((id(buf), step))
            if layout is None:
                layout = self._layout(buf, step)
            view, pairs, _slices = layout
            index = buf[1]
            if (
                step & 1 == 0
                and index + count <= MAX_CHUNKS
                and bytes(pairs[0:nbytes >> 1:step >> 1]) == _HEADS[2 * index:2 * (index + count)]
                and bytes(pairs[1:nbytes >> 1:step >> 1]) == bytes(view[2:4]) * count
            ):
                # Consecutive chunks of one stream, but not all of it.
                if self._add(buf, view, 0, nbytes, step, index, count, buf[2] << 8 | buf[3],
                             now, writes, hook):
                    return count
                return 0
        taken = 0
        for start in range(0, nbytes, step):
            taken += self.receive_one(buf, start, min(start + step, nbytes), now, writes, hook)
        return taken

    def _layout(self, buf: bytearray, step: int) -> tuple[memoryview, memoryview, list[Buffer]]:
        """Views of a receive buffer for datagrams of `step` bytes, made once: the buffer,
        the buffer as 16-bit pairs, and every datagram slot's data (after its chunk header)."""
        if len(self._layouts) >= 8:
            self._layouts.clear()
        view = memoryview(buf)
        pairs = view[:len(buf) & ~1].cast("H")
        # An iovec to write a whole stream: a slot for the vnet header, the packet's start in
        # chunk 0, then each datagram's data (the last one is cut to size per stream).
        slices: list[Buffer] = [b"", view[CHUNK_LEN + META_LEN:step]]
        # Every slot that starts in the buffer, the last one too when it does not fit whole.
        slices += [view[at + CHUNK_LEN:at + step] for at in range(step, len(buf), step)]
        layout = self._layouts[(id(buf), step)] = (view, pairs, slices)
        return layout

    def receive_one(
        self, buf: bytearray, start: int, end: int, now: float, writes: list[IoVec],
        hook: PacketHook | None = None,
    ) -> bool:
        """One chunk datagram at buf[start:end]. Returns False if it was malformed."""
        if buf[start] != FIRST_BYTE and self.on_other is not None:
            # A per-packet datagram that a GRO joined to chunks (same size, same flow).
            if self.on_other(buf, start, end):
                return True
            self.malformed += 1
            return False
        if end - start <= CHUNK_LEN or buf[start] != FIRST_BYTE:
            self.malformed += 1
            return False
        return self._add(buf, memoryview(buf), start, end, end - start, buf[start + 1], 1,
                         buf[start + 2] << 8 | buf[start + 3], now, writes, hook)

    def expire(self, now: float, writes: list[IoVec], hook: PacketHook | None = None) -> None:
        """Give up waiting for an incomplete stream older than STALE_AFTER."""
        stream = self.pending
        if stream is not None and now - stream.since >= STALE_AFTER:
            self.flush(writes, hook)

    def flush(self, writes: list[IoVec], hook: PacketHook | None = None) -> None:
        """Deliver what can be delivered of the incomplete stream, if any."""
        stream = self.pending
        self.pending = None
        if stream is not None:
            self.lost += 1
            self._recover(stream, writes, hook)

    def _add(
        self, buf: bytearray, view: memoryview, start: int, end: int, step: int, index: int,
        count: int, number: int, now: float, writes: list[IoVec], hook: PacketHook | None,
    ) -> bool:
        """Take `count` chunks (index, index + 1, ...) of stream `number` from the datagrams at
        buf[start:end], each `step` bytes but the last. False: dropped as malformed."""
        stream = self.pending
        if stream is not None and stream.number != number:
            self.flush(writes, hook)
            stream = None
        if stream is None:
            stream = _Stream(number, now)
        if index == 0 and not stream.count:
            try:
                stream.take_meta(view[start + CHUNK_LEN:start + step])
            except BatchError:
                self.malformed += 1
                self.pending = None
                return False
            if stream.have and not self._sizes_fit(stream):
                return False
        pieces = stream.pieces
        fresh = pieces[index:index + count].count(None) == count
        completes = fresh and bool(stream.count) and stream.have + count == stream.count
        # A run that completes the stream stays in the receive buffer, and so does a batch of
        # several chunks (the first UDP send of two): the forwarder then receives into its
        # other buffer until the stream is done (`held`). Anything else is copied.
        if start == 0 and count > 1 and (completes or stream.held is None):
            layout = self._layouts.get((id(buf), step))
            if layout is None:
                layout = self._layout(buf, step)
            run = layout[2][1:count + 1]  # slot 0's data is view[CHUNK_LEN:step] ...
            run[0] = view[CHUNK_LEN:step]  # ... with the meta, if this is chunk 0
            run[-1] = view[(count - 1) * step + CHUNK_LEN:end]
            if not completes:
                stream.held = buf
        else:
            source = memoryview(bytes(view[start:end]))
            run = [source[at + CHUNK_LEN:min(at + step, end - start)]
                   for at in range(0, end - start, step)]
        if fresh:
            pieces[index:index + count] = run
            stream.have += count
        else:  # some of them again (duplicates)
            for offset, piece in enumerate(run):
                if pieces[index + offset] is None:
                    pieces[index + offset] = piece
                    stream.have += 1
        if stream.count:
            # Every chunk but the last is `chunk` bytes: checking this run's ends suffices.
            last = index + count - 1
            if (
                last >= stream.count
                or len(run[-1]) != stream.expected(last)
                or (count > 1 and len(run[0]) != stream.chunk)
            ):
                self.malformed += 1
                self.pending = None
                return False
        if stream.complete():
            self.pending = None
            iov: IoVec = [b"", pieces[0][META_LEN:]]  # type: ignore[index]
            iov += pieces[1:stream.count]  # type: ignore[arg-type]
            if self._finish(iov, stream.size, stream.gso_type, stream.hdr_len,
                            stream.gso_size, stream.csum_start, stream.csum_offset):
                self._deliver(iov, writes, hook)
        else:
            self.pending = stream
        return True

    def _sizes_fit(self, stream: _Stream) -> bool:
        """Chunk 0 came after others: check those against the meta now."""
        for index, piece in enumerate(stream.pieces):
            if piece is not None and (
                index >= stream.count or len(piece) != stream.expected(index)
            ):
                self.malformed += 1
                self.pending = None
                return False
        return True

    def held(self) -> bytearray | None:
        """The receive buffer the incomplete stream still points into (do not receive into
        it before `materialize()`), if any."""
        return self.pending.held if self.pending is not None else None

    def materialize(self) -> None:
        """Copy what the incomplete stream holds of a receive buffer."""
        stream = self.pending
        if stream is not None and stream.held is not None:
            pieces = stream.pieces
            for index, piece in enumerate(pieces):
                if piece is not None:
                    pieces[index] = memoryview(bytes(piece))
            stream.held = None

    def _finish(
        self, iov: IoVec, size: int, gso_type: int, hdr_len: int, gso_size: int,
        csum_start: int, csum_offset: int,
    ) -> bool:
        """Check a complete stream's packet (iov[1] is its start) and put its vnet header in
        iov[0]. False: malformed (counted)."""
        if (
            hdr_len > size
            or packet_error(iov[1], size, gso_type, gso_size, csum_start, csum_offset)
            is not None
        ):
            self.malformed += 1
            return False
        self.streams += 1
        iov[0] = vnet.HEADER.pack(vnet.F_NEEDS_CSUM, gso_type, hdr_len, gso_size, csum_start,
                                  csum_offset)
        return True

    def _deliver(self, iov: IoVec, writes: list[IoVec], hook: PacketHook | None) -> None:
        """Append a finished stream's write, after the hook (if any) saw its headers."""
        if hook is not None:
            # The hook sees the packet's headers in a buffer as long as the packet (it
            # rewrites headers only; the payload stays where it is). A buffer per stream: a
            # batch may complete several streams before any of them is written. A hook that
            # may change lengths (`resizes`) sees the whole packet.
            first = iov[1]
            if getattr(hook, "resizes", False):
                headers = bytearray().join(iov[1:])
            else:
                headers = bytearray(sum(len(piece) for piece in iov[1:]))
                headers[:len(first)] = first
            result = hook(headers, 0, True)
            if result is True:
                iov[1] = memoryview(headers)[:len(first)]
                if getattr(hook, "resizes", False):
                    del iov[2:]
                    iov[1] = headers
            elif result:
                iov[0] = resized_vnet(bytes(iov[0]), len(result) - len(headers))
                iov[1:] = [result]
            else:
                return
        writes.append(iov)

    def _recover(self, stream: _Stream, writes: list[IoVec], hook: PacketHook | None) -> None:
        """An incomplete stream: rebuild every inner segment whose bytes all arrived."""
        if not stream.count or stream.pieces[0] is None:
            return  # no headers: nothing can be rebuilt
        chunk, size = stream.chunk, stream.size
        scratch = self._scratch
        base = vnet.HEADER_LEN  # the stream's packet lands at scratch[base:]
        # Lay the stream out contiguously (missing chunks stay whatever they were).
        have = bytearray(stream.count)
        for index, piece in enumerate(stream.pieces[:stream.count]):
            if piece is None:
                continue
            at = index * chunk - META_LEN  # the piece's position in the packet
            if at < 0:
                scratch[base:base + len(piece) + at] = piece[-at:]
            else:
                scratch[base + at:base + at + len(piece)] = piece
            have[index] = 1
        def arrived(end: int) -> bool:
            """Did the stream's first `end` bytes (meta included) all arrive?"""
            return all(have[:-(-end // chunk)])

        # The fixed part of the L4 header (its length field) must be here to read it.
        if not arrived(META_LEN + min(stream.csum_start + 20, size)):
            return
        try:
            version, l4_len, header_len = super_packet_shape(
                scratch, base, size, stream.vnet_flags, stream.gso_type, stream.gso_size,
                stream.csum_start, stream.csum_offset)
            if hook is not None and hook(scratch, base, True) is not True:
                return  # dropped, or resized, which recovery cannot take
            iov, segment = self._encapsulator.encapsulate(
                base + size, stream.vnet_flags, stream.gso_type, stream.gso_size,
                stream.csum_start, stream.csum_offset)
        except PacketError:
            self.malformed += 1
            return
        del version, l4_len
        if not arrived(META_LEN + header_len):
            return  # options of the L4 header are missing
        if segment == 0:
            return  # one segment, and some of it missing
        pieces = [iov[i:i + 2] for i in range(0, len(iov), 2)]
        vnet_header = vnet.HEADER.pack(
            vnet.F_NEEDS_CSUM, vnet.GSO_NONE, 0, 0, stream.csum_start, stream.csum_offset)
        gso_size = stream.gso_size
        for number, (tunnel_header, payload) in enumerate(pieces):
            first = META_LEN + header_len + number * gso_size  # stream offsets of its payload
            last = first + len(payload) - 1
            if all(have[i] for i in range(first // chunk, last // chunk + 1)):
                # Copied out: the scratch buffer is reused for the next stream.
                writes.append([vnet_header,
                               bytes(tunnel_header[wire.HEADER_LEN:]) + bytes(payload)])
                self.recovered += 1


__all__ = [
    "CHUNK_LEN",
    "META_LEN",
    "VERSION",
    "BatchAssembler",
    "BatchEncoder",
    "BatchError",
    "SegmentError",
]
