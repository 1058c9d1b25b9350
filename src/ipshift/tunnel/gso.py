"""Software segmentation and coalescing between TUN super-packets and per-packet tunnel datagrams.

No I/O: `Encapsulator` and `Decapsulator` work on the forwarder's read buffers and return iovecs
for sendmsg/writev. This is the forwarder's hot path, written for CPython speed rather than for
elegance: whole columns of per-segment fields are computed and stored with a few C-level calls
(struct packing of ranges, strided memoryview assignment), and iovecs are reused slices of fixed
buffers, so that the Python work per super-packet barely depends on how many segments it has.
Checksum arithmetic comes from `ipshift.packet.checksum`; the two column formulas below are its
`apply_delta` applied to a run of consecutive IDs, written out so that they vectorise.

Send side, `Encapsulator`: a TSO/USO super-packet read from TUN is cut into gso_size pieces, each
with its own copy of the IP and L4 headers, fixed the way the kernel's own GSO would fix them:
IPv4 total length, ID (+1 per segment) and header checksum; IPv6 payload length; TCP sequence
number (+gso_size per segment), CWR on the first segment only, FIN/PSH on the last only; UDP length.
The L4 checksum stays partial: the pseudo-header sum in its field is moved from the super-packet's
L4 length to the segment's, and the far end's TUN completes it (NEEDS_CSUM).

Receive side, `Decapsulator`: the datagrams of one GRO batch are checked and turned into TUN
writes. Consecutive TCP segments of one flow (same headers but for length/ID/checksum/sequence,
contiguous sequence numbers, equal sizes but a shorter last one, no flags but ACK and a final
PSH) become one super-packet with a TSO vnet header, so the kernel handles them as one skb;
everything else is written packet by packet.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from typing import Literal, TypeAlias

from ipshift.packet import vnet
from ipshift.packet.checksum import apply_delta, apply_delta_partial, ones_add, word_delta
from ipshift.packet.errors import PacketError
from ipshift.tunnel import wire

Buffer: TypeAlias = bytes | bytearray | memoryview
IoVec: TypeAlias = list[Buffer]

TCP_FIN = 0x01
TCP_PSH = 0x08
TCP_ACK = 0x10
TCP_CWR = 0x80

# The most segments one super-packet may be cut into: 64 KB of 1-byte segments would be a
# denial of service, and no sane MTU goes below this.
MAX_SEGMENTS = 1024
# Largest coalesced L3 payload: the IPv4 total length / IPv6 payload length field.
MAX_COALESCED = 0xFFFF

_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")

# Per-datagram fields the receive path reads in one call: tunnel header (4) then the first
# 4 bytes of the inner packet.
_TUNNEL = struct.Struct(">BBHBBH")


class SegmentError(PacketError):
    """A super-packet cannot be segmented (inconsistent vnet header and packet)."""


# --- send: super-packet -> datagrams -----------------------------------------------------------
_struct_cache: dict[str, struct.Struct] = {}


def _struct(fmt: str) -> struct.Struct:
    s = _struct_cache.get(fmt)
    if s is None:
        s = _struct_cache[fmt] = struct.Struct(fmt)
    return s


def _words(fmt: Literal["H", "I"], values: Sequence[int] | range) -> memoryview:
    """values packed big-endian, viewed as native words of the same size (so that assigning
    the view into a cast memoryview copies the bytes unchanged)."""
    return memoryview(_struct(f">{len(values)}{fmt}").pack(*values)).cast(fmt)


def super_packet_shape(
    buf: Buffer,
    base: int,
    size: int,
    flags: int,
    gso_type: int,
    gso_size: int,
    csum_start: int,
    csum_offset: int,
) -> tuple[int, int, int]:
    """Check that the TSO/USO super-packet at buf[base:base + size] agrees with its vnet fields
    (the same checks before cutting it in software and before handing one to TUN whole).
    Returns (IP version, L4 header length, length of all headers); raises SegmentError."""
    gso = gso_type & vnet.GSO_TYPE_MASK
    if not flags & vnet.F_NEEDS_CSUM or gso_size <= 0:
        raise SegmentError("vnet-gso", "segmentation needs a partial checksum and a gso_size")
    if size < 20 or csum_start < 20 or csum_start + csum_offset + 2 > size:
        raise SegmentError("vnet-csum", f"checksum at {csum_start}+{csum_offset}, {size} bytes")
    version = buf[base] >> 4
    l4 = base + csum_start
    if gso == vnet.GSO_UDP_L4:
        l4_len = 8
        if csum_offset != 6 or version not in (4, 6):
            raise SegmentError("vnet-gso", "UDP segmentation of a packet that is not UDP")
    elif (gso == vnet.GSO_TCPV4 and version == 4) or (gso == vnet.GSO_TCPV6 and version == 6):
        if csum_offset != 16 or csum_start + 13 >= size:
            raise SegmentError("vnet-gso", "TCP segmentation of a packet that is not TCP")
        l4_len = (buf[l4 + 12] >> 4) * 4
        if l4_len < 20:
            raise SegmentError("vnet-gso", f"TCP header length {l4_len}")
    else:
        raise SegmentError("vnet-gso", f"gso_type {gso_type} for an IPv{version} packet")
    header_len = csum_start + l4_len
    if size < header_len or csum_start % 4 or (
        version == 4 and csum_start != (buf[base] & 0x0F) * 4
    ):
        raise SegmentError("vnet-gso", f"{size}-byte packet, L4 header at {csum_start}")
    if -(-(size - header_len) // gso_size) > MAX_SEGMENTS:
        raise SegmentError("vnet-gso", f"{size - header_len} bytes in {gso_size}-byte segments")
    return version, l4_len, header_len


class _SendLayout:
    """Reusable buffers for one (header length, segment size) shape: a header area with a slot
    per segment, and the iovec that alternates header slots with payload slices of the read
    buffer. Built once per shape, so segmenting creates no per-segment objects."""

    __slots__ = ("header_size", "headers", "iov", "words16", "words32")

    def __init__(self, view: memoryview, base: int, header_len: int, gso_size: int) -> None:
        self.header_size = size = wire.HEADER_LEN + header_len  # a multiple of 4 (see below)
        slots = min(MAX_SEGMENTS, (0x10000 - header_len) // gso_size + 1)
        self.headers = bytearray(slots * size)
        headers = memoryview(self.headers)
        # IP and L4 header lengths are multiples of 4, as is the tunnel header: every field the
        # segments differ in is aligned, so whole columns can be written through cast views.
        self.words16 = headers.cast("H")
        self.words32 = headers.cast("I")
        payload = base + header_len
        self.iov: IoVec = []
        for index in range(slots):
            self.iov.append(headers[index * size:(index + 1) * size])
            self.iov.append(view[payload + index * gso_size:payload + (index + 1) * gso_size])


class Encapsulator:
    """Cuts packets read into `buffer` (starting at `offset`) into tunnel datagrams.

    The returned iovec points into the read buffer and into header areas owned by this object:
    it is valid until the next call."""

    def __init__(self, buffer: bytearray, offset: int = vnet.HEADER_LEN) -> None:
        self.buffer = buffer
        self.view = memoryview(buffer)
        self.offset = offset
        self._layouts: dict[tuple[int, int], _SendLayout] = {}

    def encapsulate(
        self,
        end: int,
        flags: int,
        gso_type: int,
        gso_size: int,
        csum_start: int,
        csum_offset: int,
    ) -> tuple[IoVec, int]:
        """Turn the packet at buffer[offset:end] (its vnet fields given separately) into tunnel
        datagrams. Returns (iov, segment_size): the concatenation of iov is the datagrams back
        to back, each segment_size bytes but the last; segment_size 0 means a single datagram."""
        buf = self.buffer
        base = self.offset
        size = end - base
        if size < 20:
            raise SegmentError("truncated", f"{size}-byte packet")
        if flags & vnet.F_NEEDS_CSUM:
            if csum_start < 20 or csum_start + csum_offset + 2 > size:
                raise SegmentError(
                    "vnet-csum", f"checksum at {csum_start}+{csum_offset}, {size} bytes"
                )
            tunnel_header = wire.HEADER.pack(
                wire.VERSION << 4 | wire.FLAG_PARTIAL, csum_offset, csum_start
            )
        elif flags & vnet.F_DATA_VALID:
            tunnel_header = wire.VERIFIED_HEADER
        else:
            tunnel_header = wire.PLAIN_HEADER
        gso = gso_type & vnet.GSO_TYPE_MASK
        if gso == vnet.GSO_NONE:
            return [tunnel_header, self.view[base:end]], 0
        version, l4_len, header_len = super_packet_shape(
            buf, base, size, flags, gso_type, gso_size, csum_start, csum_offset
        )
        l4 = base + csum_start
        payload = size - header_len
        if payload <= gso_size:
            return [tunnel_header, self.view[base:end]], 0
        count = -(-payload // gso_size)
        if count > MAX_SEGMENTS:
            raise SegmentError("vnet-gso", f"{count} segments of {gso_size} bytes")
        last = payload - (count - 1) * gso_size

        layout = self._layouts.get((header_len, gso_size))
        if layout is None:
            if len(self._layouts) >= 16:
                self._layouts.clear()
            layout = self._layouts[(header_len, gso_size)] = _SendLayout(
                self.view, base, header_len, gso_size
            )
        if 2 * count > len(layout.iov):
            raise SegmentError("vnet-gso", f"{size}-byte super-packet is larger than 64 KB")
        iov = layout.iov[:2 * count - 1]
        iov.append(self.view[base + header_len + (count - 1) * gso_size:end])

        # The L4 checksum field holds the pseudo-header sum over the super-packet's L4 length;
        # move it to each segment's L4 length (the kernel's tcp_gso_segment does the same).
        field_at = l4 + csum_offset
        pseudo = buf[field_at] << 8 | buf[field_at + 1]
        l4_total = size - csum_start
        check_full = apply_delta_partial(pseudo, word_delta(l4_total, l4_len + gso_size))
        check_last = apply_delta_partial(pseudo, word_delta(l4_total, l4_len + last))

        # One template for the full-size middle segments, repeated; then the columns that
        # differ per segment; then the first and last segments' own fields.
        hsize = layout.header_size
        template = bytearray(hsize)
        template[:4] = tunnel_header
        template[4:] = buf[base:base + header_len]
        at = 4 + csum_start  # the L4 header inside a slot
        if version == 4:
            ident = template[8] << 8 | template[9]
            old_total = template[6] << 8 | template[7]
            # The IPv4 header sum without the ID (added back per segment), per total length.
            base_sum = ones_add(~(template[14] << 8 | template[15]) & 0xFFFF, ~ident & 0xFFFF)
            sum_full = ones_add(base_sum, word_delta(old_total, header_len + gso_size))
            sum_last = ones_add(base_sum, word_delta(old_total, header_len + last))
            _U16.pack_into(template, 6, header_len + gso_size)
        else:
            _U16.pack_into(template, 8, header_len - 40 + gso_size)
        if gso == vnet.GSO_UDP_L4:
            _U16.pack_into(template, at + 4, 8 + gso_size)
        else:
            tcp_flags = template[at + 13]
            template[at + 13] = tcp_flags & ~(TCP_FIN | TCP_PSH | TCP_CWR)
        _U16.pack_into(template, at + csum_offset, check_full)
        headers = layout.headers
        headers[:count * hsize] = template * count
        column_end = count * hsize

        if gso != vnet.GSO_UDP_L4:
            seq = _U32.unpack_from(buf, l4 + 4)[0]
            seqs: range | list[int] = range(seq, seq + count * gso_size, gso_size)
            if seq + (count - 1) * gso_size > 0xFFFFFFFF:
                seqs = [value & 0xFFFFFFFF for value in seqs]
            layout.words32[(at + 4) // 4:column_end // 4:hsize // 4] = _words("I", seqs)
            # CWR only on the first segment, FIN and PSH only on the last.
            headers[at + 13] = tcp_flags & ~(TCP_FIN | TCP_PSH)
            headers[column_end - hsize + at + 13] = tcp_flags & ~TCP_CWR
        last_at = column_end - hsize
        if version == 4:
            ids: range | list[int] = range(ident, ident + count)
            first = sum_full + ident
            # Segment i's checksum is ~(sum_full + ID_i) folded, i.e. apply_delta(0xFFFF -
            # sum_full, ID_i); with consecutive IDs and no end-around carry inside the batch
            # that is an arithmetic progression going down by one.
            if ident + count - 1 > 0xFFFF or first <= 0xFFFF < first + count - 1:
                # ID wrap or a carry inside the batch (rare): one at a time.
                ids = [value & 0xFFFF for value in ids]
                sums: range | list[int] = [
                    apply_delta(~sum_full & 0xFFFF, value) for value in ids]
            elif first <= 0xFFFF:
                sums = range(0xFFFF - first, 0xFFFF - first - count, -1)
            else:  # every sum carries once: fold = sum - 0xFFFF
                sums = range(0x1FFFE - first, 0x1FFFE - first - count, -1)
            layout.words16[4:column_end // 2:hsize // 2] = _words("H", ids)
            layout.words16[7:column_end // 2:hsize // 2] = _words("H", sums)
            last_ident = (ident + count - 1) & 0xFFFF
            _U16.pack_into(headers, last_at + 6, header_len + last)
            _U16.pack_into(headers, last_at + 14, apply_delta(~sum_last & 0xFFFF, last_ident))
        else:
            _U16.pack_into(headers, last_at + 8, header_len - 40 + last)
        if gso == vnet.GSO_UDP_L4:
            _U16.pack_into(headers, last_at + at + 4, 8 + last)
        _U16.pack_into(headers, last_at + at + csum_offset, check_last)
        return iov, hsize + gso_size


# --- receive: datagrams -> TUN writes ----------------------------------------------------------
def vnet_for(tunnel_flags: int, csum_start: int, csum_offset: int) -> bytes:
    if tunnel_flags & wire.FLAG_PARTIAL:
        return vnet.HEADER.pack(vnet.F_NEEDS_CSUM, vnet.GSO_NONE, 0, 0, csum_start, csum_offset)
    if tunnel_flags & wire.FLAG_VERIFIED:
        return _VNET_VERIFIED
    return vnet.PLAIN


def hooked_write(
    hook: PacketHook, buf: bytearray, start: int, partial: bool, vnet_header: bytes,
    piece: Buffer, writes: list[IoVec],
) -> None:
    """Run `hook` on the single packet buf[start:] that would be written as [vnet_header,
    piece], and append what it decided: the write, nothing (dropped), or the replacement with
    its vnet header's checksum start moved by the length difference (a hook changes bytes
    before the L4 header only)."""
    result = hook(buf, start, partial)
    if result is True:
        writes.append([vnet_header, piece])
    elif result:
        writes.append([resized_vnet(vnet_header, len(result) - len(piece)), result])


def resized_vnet(vnet_header: bytes, delta: int) -> bytes:
    """`vnet_header` for its packet grown by `delta` bytes before the L4 header."""
    flags, gso_type, hdr_len, gso_size, csum_start, csum_offset = vnet.HEADER.unpack(vnet_header)
    if not delta or not flags & vnet.F_NEEDS_CSUM:
        return vnet_header
    return vnet.HEADER.pack(flags, gso_type, hdr_len + delta if hdr_len else 0, gso_size,
                            csum_start + delta, csum_offset)


_VNET_VERIFIED = vnet.HEADER.pack(vnet.F_DATA_VALID, vnet.GSO_NONE, 0, 0, 0, 0)
_VNET_TCP4 = vnet.HEADER.pack(vnet.F_NEEDS_CSUM, vnet.GSO_NONE, 0, 0, 20, 16)
_VNET_TCP6 = vnet.HEADER.pack(vnet.F_NEEDS_CSUM, vnet.GSO_NONE, 0, 0, 40, 16)

#: Called as hook(buffer, offset, partial) for a packet at buffer[offset:] (its IP length
#: fields tell where it ends) before it goes on; may rewrite it in place, keeping its length.
#: partial: its L4 checksum is a NEEDS_CSUM partial sum. Returns True to pass it on, False to
#: drop it, or bytes that replace it (another length: ipshift.tunnel.hooks), which only the
#: places that hold a whole single packet honour (`hooked_write`); elsewhere bytes drop it.
#: The forwarder binds its per-peer hooks (ipshift.tunnel.hooks) to this shape.
PacketHook: TypeAlias = Callable[[bytearray, int, bool], "bool | Buffer"]
#: Called as handler(buffer, start, end) for a datagram of the other framing found in a batch;
#: returns whether it was taken (False: malformed).
OtherDatagram: TypeAlias = Callable[[bytearray, int, int], bool]


class _Run:
    """Consecutive segments of one TCP flow being merged (receive side)."""

    __slots__ = (
        "ack_key", "addr_key", "buf", "count", "first_end", "head_key", "header_len", "hop_at",
        "hops", "ip", "last_flags", "limit", "mss", "next_seq", "opt_key", "payloads", "tcp",
        "total", "version", "view", "win_key",
    )

    def __init__(
        self, buf: bytearray, view: memoryview, start: int, end: int, version: int, tcp: int,
        payload_at: int, seq: int, tcp_flags: int,
    ) -> None:
        payload = end - payload_at
        self.buf = buf  # the receive buffer holding the first segment
        self.view = view
        self.ip = start
        self.tcp = tcp
        self.first_end = end
        self.version = version
        self.header_len = payload_at - start
        self.count = 1
        self.mss = payload
        self.total = payload
        self.next_seq = (seq + payload) & 0xFFFFFFFF
        self.last_flags = tcp_flags
        self.payloads: list[Buffer] = [view[payload_at:end]]
        # What later segments must repeat (the kernel's GRO rules): addresses and ports, ACK
        # number, window, TCP options, IPv4 TOS / IPv6 traffic class and flow label, TTL.
        if version == 4:
            self.head_key = bytes(buf[start:start + 2])
            self.addr_key = bytes(buf[start + 12:tcp + 4])
            self.hop_at = 8
            self.limit = MAX_COALESCED - self.header_len
        else:
            self.head_key = bytes(buf[start:start + 4])
            self.addr_key = bytes(buf[start + 8:tcp + 4])
            self.hop_at = 7
            self.limit = MAX_COALESCED - self.header_len + 40
        self.hops = buf[start + self.hop_at]
        self.ack_key = bytes(buf[tcp + 8:tcp + 13])  # ACK number and data offset
        self.win_key = bytes(buf[tcp + 14:tcp + 16])
        self.opt_key = bytes(buf[tcp + 18:payload_at])  # urgent pointer and options

    @property
    def open(self) -> bool:
        """Could the next segment still join (the last one was full-size, without PSH)?"""
        return not self.last_flags & TCP_PSH and self.total == self.count * self.mss


class Decapsulator:
    """Turns received tunnel datagrams into TUN writes.

    Receive into `buffer`, then call decapsulate(). Writes point into the receive buffers (and
    into small header objects); write them before the next receive. Two buffers alternate: a
    super-packet too big for one UDP send arrives as two GRO batches, and a run of segments
    still open at the end of one batch (`pending`) is continued by the next batch received into
    the other buffer, so it still reaches TUN as one super-packet. Call flush() when no next
    batch is coming (the receive would block)."""

    def __init__(self, size: int) -> None:
        self._buffers = (bytearray(size), bytearray(size))
        self._views = (memoryview(self._buffers[0]), memoryview(self._buffers[1]))
        self._current = 0
        self.buffer = self._buffers[0]  # where the next datagrams must be received
        self.pending: _Run | None = None
        # Called as on_other(buffer, start, end) for a datagram of another version in a batch
        # (batch framing's chunks); returns whether it was taken.
        self.on_other: OtherDatagram | None = None
        # Header and payload slices of each datagram slot, per buffer and (datagram size,
        # header size): a GRO batch of a known shape then needs no per-datagram slicing.
        self._slots: dict[tuple[int, int, int], _ReceiveLayout] = {}
        # False: write every segment on its own (for hooks that change packet lengths, which
        # a merged run could not take).
        self.coalesce = True

    def switch(self) -> None:
        """Receive into the other buffer from now on (no run may be pending)."""
        assert self.pending is None
        self._current ^= 1
        self.buffer = self._buffers[self._current]

    def flush(self, writes: list[IoVec], hook: PacketHook | None = None) -> None:
        """Emit the pending run, if any."""
        if self.pending is not None:
            _flush(self.pending, writes, hook)
            self.pending = None

    def decapsulate(
        self, nbytes: int, segment: int, writes: list[IoVec], hook: PacketHook | None = None
    ) -> tuple[int, int]:
        """Append to `writes` the TUN writes for the datagrams in buffer[:nbytes] (each `segment`
        bytes but the last; segment 0: one datagram), each an iovec starting with a vnet header.
        A run still open at the end is kept in `pending` (and `buffer` switches to the other
        one). Returns (inner packets accepted, datagrams dropped as malformed)."""
        buf = self.buffer
        view = self._views[self._current]
        if nbytes <= 0:
            self.flush(writes, hook)
            return 0, 1  # an empty datagram
        step = segment or nbytes
        offset = 0
        accepted = 0
        malformed = 0
        run = self.pending
        self.pending = None
        tunnel_unpack = _TUNNEL.unpack_from
        startswith = buf.startswith
        while offset < nbytes:
            end = offset + step
            if end > nbytes:
                end = nbytes
            start = offset + 4
            offset = end
            size = end - start
            if buf[start - 4] >> 4 != wire.VERSION:
                # Another framing's datagram that a GRO joined to ours (same size, same flow).
                if self.on_other is not None and self.on_other(buf, start - 4, end):
                    accepted += 1
                else:
                    malformed += 1
                continue
            if size < 20:
                malformed += 1
                continue
            first, csum_offset, csum_start, ip0, _tos, length = tunnel_unpack(buf, start - 4)
            tunnel_flags = first & 0x0F
            version = ip0 >> 4
            # The same checks as wire.decode, inlined (a unit test keeps the two in step).
            if tunnel_flags & ~wire.KNOWN_FLAGS:
                malformed += 1
                continue
            if version == 4:
                if length != size or ip0 & 0x0F < 5:
                    malformed += 1
                    continue
            elif version == 6:
                if size < 40 or (buf[start + 4] << 8 | buf[start + 5]) + 40 != size:
                    malformed += 1
                    continue
            else:
                malformed += 1
                continue
            if tunnel_flags & wire.FLAG_PARTIAL:
                if csum_start < (20 if version == 4 else 40) or \
                        csum_start + csum_offset + 2 > size:
                    malformed += 1
                    continue
            elif csum_start or csum_offset:
                malformed += 1
                continue
            accepted += 1

            # Coalescable: partial-checksum TCP, IPv4 without options and with DF and no
            # fragment bits (so IDs carry no meaning), IPv6 without extension headers, only ACK
            # (+PSH) set, some payload.
            tcp = 0
            if tunnel_flags & wire.FLAG_PARTIAL and csum_offset == 16:
                if version == 4:
                    if ip0 == 0x45 and csum_start == 20 and buf[start + 9] == 6 and \
                            buf[start + 6] == 0x40 and buf[start + 7] == 0:
                        tcp = start + 20
                elif csum_start == 40 and buf[start + 6] == 6:
                    tcp = start + 40
            payload_at = payload = tcp_flags = 0
            if tcp:
                tcp_len = (buf[tcp + 12] >> 4) * 4
                tcp_flags = buf[tcp + 13]
                payload_at = tcp + tcp_len
                payload = end - payload_at
                if tcp_len < 20 or payload <= 0 or tcp_flags & ~TCP_PSH != TCP_ACK:
                    tcp = 0
            if not tcp:
                if run is not None:
                    _flush(run, writes, hook)
                    run = None
                if hook is None:
                    writes.append(
                        [vnet_for(tunnel_flags, csum_start, csum_offset), view[start:end]]
                    )
                else:
                    hooked_write(hook, buf, start, bool(tunnel_flags & wire.FLAG_PARTIAL),
                                 vnet_for(tunnel_flags, csum_start, csum_offset),
                                 view[start:end], writes)
                continue

            seq = _U32.unpack_from(buf, tcp + 4)[0]
            if run is not None:
                if (
                    seq == run.next_seq
                    and run.version == version
                    and payload_at - start == run.header_len
                    and payload <= run.mss
                    and run.total + payload <= run.limit
                    and buf[start + run.hop_at] == run.hops
                    and startswith(run.addr_key, start + (12 if version == 4 else 8))
                    and startswith(run.ack_key, tcp + 8)
                    and startswith(run.win_key, tcp + 14)
                    and startswith(run.opt_key, tcp + 18)
                    and startswith(run.head_key, start)
                ):
                    run.payloads.append(view[payload_at:end])
                    run.count += 1
                    run.total += payload
                    run.next_seq = (seq + payload) & 0xFFFFFFFF
                    run.last_flags = tcp_flags
                    if payload < run.mss or tcp_flags & TCP_PSH:
                        _flush(run, writes, hook)
                        run = None
                    elif segment and end == segment:
                        offset = self._extend_batch(run, nbytes, segment, seq)
                        accepted += offset // segment - 1
                    continue
                _flush(run, writes, hook)
            run = _Run(buf, view, start, end, version, tcp, payload_at, seq, tcp_flags)
            if tcp_flags & TCP_PSH or not self.coalesce:
                _flush(run, writes, hook)
                run = None
            elif segment and end == segment:
                # First datagram of a GRO batch: the rest is usually the same flow's next
                # segments.
                offset = self._extend_batch(run, nbytes, segment, seq)
                accepted += offset // segment - 1
        if run is not None:
            if run.open and run.buf is buf:
                # Perhaps continued by the next batch: keep it, receive into the other buffer.
                self.pending = run
                self._current ^= 1
                self.buffer = self._buffers[self._current]
            else:
                _flush(run, writes, hook)
        return accepted, malformed

    def _extend_batch(self, run: _Run, nbytes: int, segment: int, seq: int) -> int:
        """Check all full-size datagrams after the first at once and add them to the run if
        they continue it. `seq` is the first datagram's sequence number, which the run has
        just taken in. Returns the offset where per-datagram processing resumes.

        A GRO batch is normally one sender's super-packet cut into equal datagrams, so instead
        of parsing each, their headers are gathered into one buffer and compared in bulk with
        the first datagram's: every byte but the sequence number (checked against the expected
        progression) and the IPv4 ID and header checksum (which coalescing replaces) must be
        the same, so the first datagram's validity checks carry over to all of them.
        """
        # All but the batch's last datagram (which may be shorter or carry PSH: the general
        # path takes it).
        count = (nbytes - 1) // segment
        if count < 2:
            return segment
        mss = run.mss
        others = count - 1
        last_seq = seq + others * mss
        if last_seq > 0xFFFFFFFF or run.total + others * mss > run.limit:
            return segment  # sequence wrap or oversize: the general path decides
        header_size = segment - mss  # tunnel header + IP + TCP: a multiple of 4
        key = (self._current, segment, header_size)
        slots = self._slots.get(key)
        if slots is None:
            if len(self._slots) >= 16:
                self._slots.clear()
            slots = self._slots[key] = _ReceiveLayout(
                self._views[self._current], segment, header_size
            )
        headers = bytearray().join(slots.headers[1:count])
        words = memoryview(headers).cast("I")
        stride = header_size // 4
        seq_at = (run.tcp - run.ip + 8) // 4  # the seq word, counting the tunnel header
        if words[seq_at::stride].tobytes() != _struct(f">{others}I").pack(
            *range(seq + mss, last_seq + 1, mss)
        ):
            return segment
        words[seq_at::stride] = _ZERO_WORDS32[:others]
        reference = bytearray(slots.headers[0])
        reference[seq_at * 4:seq_at * 4 + 4] = bytes(4)
        if run.version == 4:
            # IPv4 ID and header checksum (bytes 4-5 and 10-11 of the IP header).
            halves = memoryview(headers).cast("H")
            halves[4::stride * 2] = _ZERO_WORDS16[:others]
            halves[7::stride * 2] = _ZERO_WORDS16[:others]
            reference[8:10] = reference[14:16] = bytes(2)
        if headers != reference * others:
            return segment
        run.payloads.extend(slots.payloads[1:count])
        run.count += others
        run.total += others * mss
        run.next_seq = (last_seq + mss) & 0xFFFFFFFF
        return count * segment


_ZERO_WORDS32 = memoryview(bytes(4 * 1024)).cast("I")
_ZERO_WORDS16 = memoryview(bytes(2 * 1024)).cast("H")


class _ReceiveLayout:
    """Header and payload slices of each datagram slot of the receive buffer, for one
    (datagram size, header size) shape: a GRO batch of that shape needs no per-datagram
    slicing."""

    __slots__ = ("headers", "payloads")

    def __init__(self, view: memoryview, segment: int, header_size: int) -> None:
        starts = range(0, len(view) - segment + 1, segment)
        self.headers: list[Buffer] = [view[at:at + header_size] for at in starts]
        self.payloads: list[Buffer] = [view[at + header_size:at + segment] for at in starts]


def _flush(run: _Run, writes: list[IoVec], hook: PacketHook | None) -> None:
    buf = run.buf
    start = run.ip
    l3 = 20 if run.version == 4 else 40
    # The hook sees the run's first segment, a complete packet; the merged header is derived
    # from it, so a rewrite carries over to all segments.
    if run.count == 1:
        vnet_header = _VNET_TCP4 if l3 == 20 else _VNET_TCP6
        if hook is None:
            writes.append([vnet_header, run.view[start:run.first_end]])
        else:
            hooked_write(hook, buf, start, True, vnet_header, run.view[start:run.first_end],
                         writes)
        return
    if hook is not None and hook(buf, start, True) is not True:
        return  # dropped, or a replacement, which a merged run cannot take
    header_len = run.header_len
    header = bytearray(buf[start:start + header_len])
    tcp_len = header_len - l3
    if l3 == 20:
        old_total = header[2] << 8 | header[3]
        new_total = header_len + run.total
        header[2:4] = _U16.pack(new_total)
        header_check = header[10] << 8 | header[11]
        header[10:12] = _U16.pack(apply_delta(header_check, word_delta(old_total, new_total)))
        gso_type = vnet.GSO_TCPV4
    else:
        header[4:6] = _U16.pack(tcp_len + run.total)
        gso_type = vnet.GSO_TCPV6
    header[l3 + 13] |= run.last_flags & TCP_PSH
    # Partial checksum of a super-packet: the pseudo-header sum over its whole L4 length (what
    # the kernel's GSO expects when it segments it again).
    pseudo = header[l3 + 16] << 8 | header[l3 + 17]
    header[l3 + 16:l3 + 18] = _U16.pack(
        apply_delta_partial(pseudo, word_delta(tcp_len + run.mss, tcp_len + run.total))
    )
    writes.append([
        vnet.HEADER.pack(vnet.F_NEEDS_CSUM, gso_type, header_len, run.mss, l3, 16),
        header,
        *run.payloads,
    ])
