"""IP-in-IP and GRE encapsulation for peers that speak them (RSIP tunnel types 1 and 2): the
codecs only, no I/O. The forwarder sends and receives through raw sockets.

IP-in-IP (RFC 2003, RFC 4213): an outer IP header whose protocol is 4 (an IPv4 packet
inside) or 41 (IPv6 inside), over IPv4 or IPv6. GRE (RFC 2784): an outer IP header with
protocol 47, then

     0                   1                   2                   3
     0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1
    +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
    |C| |K|S| Reserved0       | Ver |         Protocol Type         |
    +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
    |      Checksum (optional)      |       Reserved1 (optional)    |
    +-------------------------------+-------------------------------+
    |                         Key (optional)                        |
    +---------------------------------------------------------------+
    |                 Sequence Number (optional)                    |
    +---------------------------------------------------------------+

with the key and sequence number of RFC 2890. The key identifies a peer among several behind
one address (`Peer.gre_key`); sequence numbers are accepted and reported, not enforced. A
packet with the routing bit or bits 4-5 set (RFC 1701 source routing, recursion) or a version
other than 0 is refused, as RFC 2784 requires; bits 6-12 are ignored. Payloads other than IPv4
(0x0800) and IPv6 (0x86DD) are refused.

What Linux raw sockets hand over, and so which functions to use:

- AF_INET, SOCK_RAW, protocol 4, 41 or 47: received packets include the outer IPv4 header
  (`parse_ipip(data)`, `parse_gre(data)`); sends carry only what follows it (the kernel builds
  the header: send `gre_header(inner) + inner`, or just `inner` for IP-in-IP), unless
  IP_HDRINCL is set (`ipip_header`, `gre_outer_header`).
- AF_INET6, SOCK_RAW: neither sends nor receives carry the IPv6 header; the sender's address
  comes from recvfrom (`parse_ipip(data, protocol=41)`, `parse_gre(data, outer_included=False)`).

The kernel has checked the outer IPv4 header checksum before a raw socket sees the packet, so
it is not checked again. The outer TOS / traffic class is copied from the inner packet on
encapsulation; ECN marks of the outer header are not carried inward on decapsulation.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

from ipshift.packet.checksum import internet_checksum, internet_sum
from ipshift.packet.errors import BytesLike, PacketError
from ipshift.packet.protocols import IPPROTO_GRE, IPPROTO_IPIP, IPPROTO_IPV6
from ipshift.tunnel import wire

ETHERTYPE_IPV4 = 0x0800
ETHERTYPE_IPV6 = 0x86DD
GRE_CHECKSUM = 0x8000
GRE_ROUTING = 0x4000
GRE_KEY = 0x2000
GRE_SEQUENCE = 0x1000
_GRE_REFUSED = GRE_ROUTING | 0x0C00  # bits 1, 4, 5: RFC 1701 features
_GRE_VERSION = 0x0007
_GRE = struct.Struct("!HH")
_U32 = struct.Struct("!I")
_V4_OUTER = struct.Struct("!BBHHHBBH4s4s")
_V6_OUTER = struct.Struct("!IHBB16s16s")
_ETHERTYPE_OF_VERSION = {4: ETHERTYPE_IPV4, 6: ETHERTYPE_IPV6}
_VERSION_OF_ETHERTYPE = {ETHERTYPE_IPV4: 4, ETHERTYPE_IPV6: 6}
_VERSION_OF_PROTOCOL = {IPPROTO_IPIP: 4, IPPROTO_IPV6: 6}


class EncapError(PacketError):
    """An IP-in-IP or GRE packet is malformed or of a kind not supported; counted, dropped."""


class Decapsulated(NamedTuple):
    """What a received tunnel packet holds: its protocol (4, 41 or 47), the outer addresses
    (None when the socket strips the outer header), where the inner packet is, and the GRE
    key and sequence number (None when absent)."""

    protocol: int
    outer_src: bytes | None
    outer_dst: bytes | None
    inner_offset: int
    inner_end: int
    key: int | None = None
    sequence: int | None = None


def ipip_protocol(inner: BytesLike) -> int:
    """The outer protocol number for an inner packet: 4 for IPv4, 41 for IPv6."""
    version = inner[0] >> 4 if len(inner) else 0
    if version == 4:
        return IPPROTO_IPIP
    if version == 6:
        return IPPROTO_IPV6
    raise ValueError(f"an IP-in-IP inner packet is IPv4 or IPv6, not version {version}")


# --- send -------------------------------------------------------------------------------------
def outer_header(
    src: bytes, dst: bytes, protocol: int, payload_length: int, *, ttl: int = 64, tos: int = 0,
    dont_fragment: bool = True, identification: int = 0, flow_label: int = 0,
) -> bytes:
    """An outer IPv4 (4-byte addresses, header checksum computed) or IPv6 (16-byte) header
    for `payload_length` bytes of `protocol`."""
    if len(src) != len(dst) or len(src) not in (4, 16):
        raise ValueError("outer addresses must both be 4 or both be 16 bytes")
    if len(src) == 4:
        total = 20 + payload_length
        if total > 0xFFFF:
            raise ValueError(f"{payload_length} bytes do not fit one IPv4 packet")
        header = bytearray(_V4_OUTER.pack(0x45, tos, total, identification,
                                          0x4000 if dont_fragment else 0, ttl, protocol, 0,
                                          src, dst))
        header[10:12] = internet_checksum(header).to_bytes(2, "big")
        return bytes(header)
    if payload_length > 0xFFFF:
        raise ValueError(f"{payload_length} bytes do not fit one IPv6 packet")
    return _V6_OUTER.pack(6 << 28 | tos << 20 | flow_label, payload_length, protocol, ttl, src,
                          dst)


def _inner_tos(inner: BytesLike) -> int:
    """The inner packet's TOS (IPv4) or traffic class (IPv6), copied to the outer header."""
    if inner[0] >> 4 == 4:
        return inner[1]
    return (inner[0] & 0x0F) << 4 | inner[1] >> 4


def _inner_dont_fragment(inner: BytesLike) -> bool:
    # IPv4: as the inner packet says (RFC 2003 3.1); IPv6 is never fragmented on the way.
    return inner[0] >> 4 != 4 or bool(inner[6] & 0x40)


def ipip_header(src: bytes, dst: bytes, inner: BytesLike, *, ttl: int = 64) -> bytes:
    """The outer header that carries `inner` as IP-in-IP (for IP_HDRINCL or packet sockets)."""
    protocol = ipip_protocol(inner)
    return outer_header(src, dst, protocol, len(inner), ttl=ttl, tos=_inner_tos(inner),
                        dont_fragment=_inner_dont_fragment(inner))


def gre_header(
    inner: BytesLike, *, key: int | None = None, sequence: int | None = None,
    checksum: bool = False,
) -> bytes:
    """The GRE header for `inner` (what a raw socket sends before it)."""
    ethertype = _ETHERTYPE_OF_VERSION.get(inner[0] >> 4 if len(inner) else 0)
    if ethertype is None:
        raise ValueError("a GRE payload here is an IPv4 or IPv6 packet")
    flags = (GRE_CHECKSUM if checksum else 0) | (GRE_KEY if key is not None else 0) | (
        GRE_SEQUENCE if sequence is not None else 0)
    header = bytearray(_GRE.pack(flags, ethertype))
    if checksum:
        header += bytes(4)
    if key is not None:
        header += _U32.pack(key)
    if sequence is not None:
        header += _U32.pack(sequence)
    if checksum:
        # Over the GRE header (checksum field zero) and the payload; the header's length is
        # even, so the two sums chain.
        value = internet_checksum(inner, internet_sum(header))
        header[4:6] = value.to_bytes(2, "big")
    return bytes(header)


def gre_outer_header(
    src: bytes, dst: bytes, inner: BytesLike, *, key: int | None = None,
    sequence: int | None = None, checksum: bool = False, ttl: int = 64,
) -> bytes:
    """Outer IP header and GRE header for `inner` (for IP_HDRINCL or packet sockets)."""
    gre = gre_header(inner, key=key, sequence=sequence, checksum=checksum)
    return outer_header(src, dst, IPPROTO_GRE, len(gre) + len(inner), ttl=ttl,
                        tos=_inner_tos(inner), dont_fragment=_inner_dont_fragment(inner)) + gre


# --- receive ----------------------------------------------------------------------------------
def _outer_ipv4(packet: BytesLike, offset: int, end: int, protocols: tuple[int, ...]
                ) -> tuple[int, bytes, bytes, int]:
    """Check the outer IPv4 header at packet[offset:end]: (protocol, source, destination,
    where its payload starts)."""
    if end - offset < 20:
        raise EncapError("truncated", f"{end - offset} bytes, not an IPv4 header")
    first, _tos, total, _ident, fragment, _ttl, protocol, _csum, src, dst = (
        _V4_OUTER.unpack_from(packet, offset))
    if first >> 4 != 4:
        raise EncapError("bad-version", f"outer IP version {first >> 4}")
    header_len = (first & 0x0F) * 4
    if header_len < 20 or offset + header_len > end:
        raise EncapError("bad-ihl", f"outer header length {header_len}")
    if total != end - offset:
        raise EncapError("length-mismatch", f"outer total length {total}, {end - offset} bytes")
    if fragment & 0x3FFF:
        raise EncapError("fragment", "an outer fragment (raw sockets see reassembled packets)")
    if protocol not in protocols:
        raise EncapError("bad-protocol", f"outer protocol {protocol}")
    return protocol, src, dst, offset + header_len


def _check_inner(packet: BytesLike, start: int, end: int, version: int) -> None:
    why = wire.inner_length_error(packet, start, end)
    if why is not None:
        raise EncapError("bad-inner", why)
    if packet[start] >> 4 != version:
        raise EncapError("bad-inner", f"IPv{packet[start] >> 4} inside, IPv{version} announced")


def parse_ipip(
    packet: BytesLike, offset: int = 0, end: int | None = None, *, protocol: int | None = None,
) -> Decapsulated:
    """An IP-in-IP packet. `protocol` None: packet[offset:end] starts with the outer IPv4
    header (an AF_INET raw socket); 4 or 41: it is the payload alone (AF_INET6)."""
    if end is None:
        end = len(packet)
    if not 0 <= offset <= end <= len(packet):
        raise EncapError("truncated", "offsets outside the buffer")
    src: bytes | None = None
    dst: bytes | None = None
    if protocol is None:
        protocol, src, dst, start = _outer_ipv4(packet, offset, end,
                                                (IPPROTO_IPIP, IPPROTO_IPV6))
    elif protocol in _VERSION_OF_PROTOCOL:
        start = offset
    else:
        raise ValueError(f"IP-in-IP is protocol 4 or 41, not {protocol}")
    _check_inner(packet, start, end, _VERSION_OF_PROTOCOL[protocol])
    return Decapsulated(protocol, src, dst, start, end)


def parse_gre(
    packet: BytesLike, offset: int = 0, end: int | None = None, *, outer_included: bool = True,
) -> Decapsulated:
    """A GRE packet: packet[offset:end] starts with the outer IPv4 header (outer_included,
    an AF_INET raw socket) or with the GRE header (AF_INET6)."""
    if end is None:
        end = len(packet)
    if not 0 <= offset <= end <= len(packet):
        raise EncapError("truncated", "offsets outside the buffer")
    src: bytes | None = None
    dst: bytes | None = None
    start = offset
    if outer_included:
        _protocol, src, dst, start = _outer_ipv4(packet, offset, end, (IPPROTO_GRE,))
    if end - start < 4:
        raise EncapError("truncated", "no room for a GRE header")
    flags, ethertype = _GRE.unpack_from(packet, start)
    if flags & _GRE_VERSION:
        raise EncapError("bad-version", f"GRE version {flags & _GRE_VERSION}")
    if flags & _GRE_REFUSED:
        raise EncapError("bad-flags", f"GRE flags 0x{flags:04x} (routing or recursion)")
    version = _VERSION_OF_ETHERTYPE.get(ethertype)
    if version is None:
        raise EncapError("bad-payload", f"GRE protocol type 0x{ethertype:04x}")
    at = start + 4
    size = at + 4 * ((flags & GRE_CHECKSUM != 0) + (flags & GRE_KEY != 0)
                     + (flags & GRE_SEQUENCE != 0))
    if size > end:
        raise EncapError("truncated", "GRE optional fields cut short")
    if flags & GRE_CHECKSUM:
        if internet_sum(memoryview(packet)[start:end]) != 0xFFFF:
            raise EncapError("bad-checksum", "GRE checksum does not verify")
        at += 4
    key = sequence = None
    if flags & GRE_KEY:
        key = _U32.unpack_from(packet, at)[0]
        at += 4
    if flags & GRE_SEQUENCE:
        sequence = _U32.unpack_from(packet, at)[0]
        at += 4
    _check_inner(packet, at, end, version)
    return Decapsulated(IPPROTO_GRE, src, dst, at, end, key, sequence)


__all__ = [
    "IPPROTO_GRE",
    "Decapsulated",
    "EncapError",
    "gre_header",
    "gre_outer_header",
    "ipip_header",
    "ipip_protocol",
    "outer_header",
    "parse_gre",
    "parse_ipip",
]
