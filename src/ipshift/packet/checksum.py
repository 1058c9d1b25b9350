"""The Internet checksum (RFC 1071), pseudo-header checksums, and RFC 1624 incremental updates.

Two kinds of value live in a checksum field:

* a *full* checksum: the complement of the ones' complement sum of everything it covers. Update it
  with RFC 1624 eqn. 3, ``HC' = ~(~HC + ~m + m')`` -> `apply_delta`.
* a *partial* checksum (TUN with IFF_VNET_HDR, ``VIRTIO_NET_HDR_F_NEEDS_CSUM``): the field holds the
  folded, **non-complemented** pseudo-header sum and the device completes it later. An address
  change adds the delta to that sum -> `apply_delta_partial`. Ports and payload need no update:
  the device sums them when it completes the checksum.

A "delta" is the ones' complement sum ``~m + m'`` of a change, computed once per flow by
`checksum_delta` and added to as many packets as needed.

Sums are computed by reading the whole buffer as one big integer: 2**16 = 1 (mod 0xFFFF), so the
ones' complement sum of the 16-bit words is that integer modulo 0xFFFF (with -0, 0xFFFF, standing
for a zero residue of non-zero data). It is the fastest pure-Python way found (see bench/).
"""

from __future__ import annotations

import struct

from ipshift.packet.errors import BytesLike, PacketError, WritableBuffer
from ipshift.packet.protocols import IPPROTO_UDP

_U16 = struct.Struct("!H")


def internet_sum(data: BytesLike, initial: int = 0) -> int:
    """Folded 16-bit ones' complement sum of `data` (odd length: zero-padded), plus `initial`.

    Not complemented. 0 only when `data` and `initial` are all zero; otherwise in 1..0xFFFF.
    """
    value = int.from_bytes(data, "big")
    if len(data) & 1:
        value <<= 8
    value += initial
    folded = value % 0xFFFF
    if folded:
        return folded
    return 0xFFFF if value else 0


def internet_checksum(data: BytesLike, initial: int = 0) -> int:
    """RFC 1071 checksum of `data`: the complement of `internet_sum` (0..0xFFFF)."""
    return ~internet_sum(data, initial) & 0xFFFF


def ones_add(a: int, b: int) -> int:
    """Ones' complement sum of two 16-bit values (use it to combine deltas)."""
    total = a + b
    return (total & 0xFFFF) + (total >> 16)


def word_delta(old: int, new: int) -> int:
    """`checksum_delta` of one 16-bit word changing from `old` to `new`."""
    return ones_add(~old & 0xFFFF, new)


def pseudo_header_sum(src: BytesLike, dst: BytesLike, protocol: int, length: int) -> int:
    """Non-complemented sum of the TCP/UDP/ICMPv6 pseudo-header (RFC 768/793, RFC 8200 8.1).

    4-byte addresses give the IPv4 pseudo-header, 16-byte ones the IPv6 one; both sum to the
    same value for the same fields, as zero padding does not change a ones' complement sum.
    `length` is the upper-layer length (header plus payload).
    """
    if len(src) != len(dst) or len(src) not in (4, 16):
        raise ValueError("pseudo-header addresses must both be 4 or both be 16 bytes")
    return internet_sum(src, internet_sum(dst, protocol + (length >> 16) + (length & 0xFFFF)))


def transport_checksum(src: BytesLike, dst: BytesLike, protocol: int, segment: BytesLike) -> int:
    """Full checksum of a TCP/UDP/ICMPv6/UDP-Lite/DCCP segment whose checksum field is zero.

    For UDP a computed 0 is sent as 0xFFFF (RFC 768: 0 means "no checksum").
    """
    value = ~internet_sum(segment, pseudo_header_sum(src, dst, protocol, len(segment))) & 0xFFFF
    if value == 0 and protocol == IPPROTO_UDP:
        return 0xFFFF
    return value


def verify_transport_checksum(
    src: BytesLike, dst: BytesLike, protocol: int, segment: BytesLike
) -> bool:
    """True if the checksum inside `segment` is right (RFC 1071: the sum over all is -0).

    An IPv4 UDP datagram with checksum 0 carries no checksum and passes; over IPv6 it fails
    (RFC 8200 section 8.1).
    """
    if protocol == IPPROTO_UDP and len(src) == 4 and len(segment) >= 8 and not (
        segment[6] | segment[7]
    ):
        return True
    return internet_sum(segment, pseudo_header_sum(src, dst, protocol, len(segment))) == 0xFFFF


def ipv4_header_checksum(header: BytesLike) -> int:
    """Checksum of an IPv4 header, computed as if its checksum field (bytes 10-11) were zero."""
    if len(header) < 20:
        raise PacketError("truncated", "IPv4 header shorter than 20 bytes")
    field = header[10] << 8 | header[11]
    # Adding ~field cancels the field's own contribution (ones' complement subtraction).
    return ~internet_sum(header, ~field & 0xFFFF) & 0xFFFF


def verify_ipv4_header_checksum(header: BytesLike) -> bool:
    """True if the IPv4 header checksum is right."""
    return internet_sum(header) == 0xFFFF


def checksum_delta(old: BytesLike, new: BytesLike) -> int:
    """Ones' complement sum ``~old + new`` for a change of `old` into `new` (RFC 1624).

    Both must have the same even length and start at an even offset of the covered data
    (addresses and ports do). Compute once per flow; add with `apply_delta` per packet.
    """
    if len(old) != len(new) or len(old) & 1:
        raise ValueError("checksum_delta needs two byte strings of the same even length")
    return ones_add(~internet_sum(old) & 0xFFFF, internet_sum(new))


def apply_delta(checksum: int, delta: int) -> int:
    """RFC 1624 eqn. 3 on a full checksum: ``~(~HC + delta)``.

    A zero sum is read as -0: the covered data always holds a non-zero word (the version in the
    IPv4 header, the protocol in a pseudo-header), so +0 cannot be the true sum. That keeps the
    result equal to a recomputation from scratch in every case. The UDP rule (0 means "none")
    is the caller's: see `apply_delta_udp`.
    """
    total = (~checksum & 0xFFFF) + delta
    total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF if total else 0


def apply_delta_udp(checksum: int, delta: int) -> int:
    """`apply_delta` for a UDP checksum: 0 (no checksum: IPv4, or IPv6 tunnels per RFC 6935)
    stays 0; a result of 0 becomes 0xFFFF."""
    if not checksum:
        return 0
    return apply_delta(checksum, delta) or 0xFFFF


def apply_delta_partial(partial_sum: int, delta: int) -> int:
    """Add `delta` to a partial (non-complemented) pseudo-header sum, for NEEDS_CSUM packets."""
    total = partial_sum + delta
    total = (total & 0xFFFF) + (total >> 16)
    return total or 0xFFFF


def complete_partial_checksum(
    buf: WritableBuffer, csum_start: int, csum_offset: int, end: int | None = None
) -> int:
    """Do what a device does for a NEEDS_CSUM packet: sum ``buf[csum_start:end]`` (the field
    holds the pseudo-header sum), store the complement at ``csum_start + csum_offset``.

    Like Linux (skb_checksum_help), a result of 0 is stored as 0xFFFF. Returns the value stored.
    """
    stop = len(buf) if end is None else end
    field = csum_start + csum_offset
    if csum_start < 0 or field + 2 > stop or stop > len(buf):
        raise PacketError("truncated", "checksum field outside the packet")
    value = ~internet_sum(memoryview(buf)[csum_start:stop]) & 0xFFFF or 0xFFFF
    _U16.pack_into(buf, field, value)
    return value
