"""ICMP (RFC 792) and ICMPv6 (RFC 4443): echo, errors quoting the offending packet, reading a
quote, and rewriting a quote in place.

    error = port_unreachable(offending, src="198.51.100.1")     # a whole IP packet
    message = parse_icmp(error)
    message.is_error, message.mtu, message.quoted.dst, message.quoted.dport

    buf = bytearray(queued.payload)
    rewrite_quoted(buf, dst="203.0.113.50")    # the quoted destination mapped back

Errors quote as much of the offending packet as fits in 576 bytes (IPv4, RFC 1812 4.3.2.3)
or 1280 bytes (IPv6, RFC 4443 2.4 c) for the whole error packet. The version of an error
follows from the offending packet; its destination defaults to the offending packet's source.

An ICMP error about a flow whose addresses a stateless rule rewrites (nftables `ip daddr set`)
gets its outer header rewritten but not the packet it quotes, so the sender's stack does not
recognise its own packet: `rewrite_quoted` fixes the quote with the RFC 1624 incremental
update of `FlowRewrite`, then updates the ICMP checksum by the change.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

from ipshift.packet.build import build_packet
from ipshift.packet.checksum import apply_delta, internet_checksum
from ipshift.packet.errors import BytesLike, PacketError, WritableBuffer
from ipshift.packet.ipv4 import IPv4Header
from ipshift.packet.ipv6 import IPv6Header, walk_header_chain
from ipshift.packet.protocols import (
    IPPROTO_DCCP,
    IPPROTO_ICMP,
    IPPROTO_ICMPV6,
    IPPROTO_SCTP,
    IPPROTO_TCP,
    IPPROTO_UDP,
    IPPROTO_UDPLITE,
)
from ipshift.packet.rewrite import AddressLike, FlowRewrite
from ipshift.packet.transport import (
    ICMP_DEST_UNREACHABLE,
    ICMP_ECHO_REPLY,
    ICMP_ECHO_REQUEST,
    ICMP_ERROR_TYPES,
    ICMP_PARAMETER_PROBLEM,
    ICMP_TIME_EXCEEDED,
    ICMPV6_DEST_UNREACHABLE,
    ICMPV6_ECHO_REPLY,
    ICMPV6_ECHO_REQUEST,
    ICMPV6_ERROR_TYPES,
    ICMPV6_PACKET_TOO_BIG,
    ICMPV6_PARAMETER_PROBLEM,
    ICMPV6_TIME_EXCEEDED,
    ICMPHeader,
)
from ipshift.packet.view import parse_packet

__all__ = [
    "ICMPV6_ADDRESS_UNREACHABLE",
    "ICMPV6_ADMIN_PROHIBITED",
    "ICMPV6_DEST_UNREACHABLE",
    "ICMPV6_ECHO_REPLY",
    "ICMPV6_ECHO_REQUEST",
    "ICMPV6_ERROR_LIMIT",
    "ICMPV6_NO_ROUTE",
    "ICMPV6_PACKET_TOO_BIG",
    "ICMPV6_PARAMETER_PROBLEM",
    "ICMPV6_PORT_UNREACHABLE",
    "ICMPV6_TIME_EXCEEDED",
    "ICMP_ADMIN_PROHIBITED",
    "ICMP_DEST_UNREACHABLE",
    "ICMP_ECHO_REPLY",
    "ICMP_ECHO_REQUEST",
    "ICMP_ERROR_LIMIT",
    "ICMP_FRAGMENTATION_NEEDED",
    "ICMP_HOST_UNREACHABLE",
    "ICMP_NET_UNREACHABLE",
    "ICMP_PARAMETER_PROBLEM",
    "ICMP_PORT_UNREACHABLE",
    "ICMP_PROTOCOL_UNREACHABLE",
    "ICMP_TIME_EXCEEDED",
    "TIME_EXCEEDED_REASSEMBLY",
    "TIME_EXCEEDED_TRANSIT",
    "IcmpMessage",
    "QuotedPacket",
    "destination_unreachable",
    "echo_message",
    "echo_reply",
    "echo_request",
    "error_allowed",
    "icmp_error",
    "packet_too_big",
    "parse_icmp",
    "port_unreachable",
    "quoted_packet",
    "rewrite_quoted",
    "time_exceeded",
]

# destination unreachable codes
ICMP_NET_UNREACHABLE = 0
ICMP_HOST_UNREACHABLE = 1
ICMP_PROTOCOL_UNREACHABLE = 2
ICMP_PORT_UNREACHABLE = 3
ICMP_FRAGMENTATION_NEEDED = 4  # with the next-hop MTU (RFC 1191)
ICMP_ADMIN_PROHIBITED = 13  # RFC 1812
ICMPV6_NO_ROUTE = 0
ICMPV6_ADMIN_PROHIBITED = 1
ICMPV6_ADDRESS_UNREACHABLE = 3
ICMPV6_PORT_UNREACHABLE = 4
# time exceeded codes (the same in both)
TIME_EXCEEDED_TRANSIT = 0
TIME_EXCEEDED_REASSEMBLY = 1

#: The largest error packet, header included: RFC 1812 4.3.2.3 and RFC 4443 2.4 (c).
ICMP_ERROR_LIMIT = 576
ICMPV6_ERROR_LIMIT = 1280

_ICMP = struct.Struct("!BBHI")
_U16 = struct.Struct("!H")
#: Upper layers whose ports `rewrite_quoted` can change (their checksum covers them).
_REWRITABLE_PORTS = frozenset({IPPROTO_TCP, IPPROTO_UDP, IPPROTO_UDPLITE, IPPROTO_DCCP})
_PORT_PROTOCOLS = _REWRITABLE_PORTS | {IPPROTO_SCTP}


def _packed(value: AddressLike, version: int, what: str) -> bytes:
    if isinstance(value, bytes):
        packed = value
    else:
        try:
            packed = ipaddress.ip_address(value).packed
        except ValueError as exc:
            raise ValueError(f"{what}: {exc}") from None
    if len(packed) != (4 if version == 4 else 16):
        raise ValueError(f"{what} must be an IPv{version} address")
    return packed


# --- echo ----------------------------------------------------------------------------------


def echo_message(version: int, identifier: int, sequence: int, payload: BytesLike = b"", *,
                 reply: bool = False) -> bytes:
    """An echo request (or reply) without IP header, for a raw or ping socket. The ICMP
    checksum is filled in; an ICMPv6 one is left 0 (it covers the addresses: the kernel fills
    it on raw ICMPv6 sockets)."""
    if version == 4:
        kind = ICMP_ECHO_REPLY if reply else ICMP_ECHO_REQUEST
    elif version == 6:
        kind = ICMPV6_ECHO_REPLY if reply else ICMPV6_ECHO_REQUEST
    else:
        raise ValueError(f"IP version 4 or 6, not {version}")
    message = bytearray(ICMPHeader.echo(kind, identifier, sequence).pack())
    message += payload
    if version == 4:
        _U16.pack_into(message, 2, internet_checksum(message))
    return bytes(message)


def _ip_header(src: bytes, dst: bytes, hop_limit: int) -> IPv4Header | IPv6Header:
    if len(src) == 4:
        return IPv4Header(src, dst, ttl=hop_limit)
    return IPv6Header(src, dst, hop_limit=hop_limit)


def _echo_packet(src: AddressLike, dst: AddressLike, identifier: int, sequence: int,
                 payload: BytesLike, hop_limit: int, reply: bool) -> bytes:
    version = (4 if len(src) == 4 else 6) if isinstance(src, bytes) else ipaddress.ip_address(
        src).version
    s = _packed(src, version, "the echo source")
    d = _packed(dst, version, "the echo destination")
    v4 = version == 4
    kind = ((ICMP_ECHO_REPLY if v4 else ICMPV6_ECHO_REPLY) if reply
            else (ICMP_ECHO_REQUEST if v4 else ICMPV6_ECHO_REQUEST))
    return build_packet(_ip_header(s, d, hop_limit), ICMPHeader.echo(kind, identifier, sequence),
                        payload)


def echo_request(src: AddressLike, dst: AddressLike, identifier: int, sequence: int,
                 payload: BytesLike = b"", *, hop_limit: int = 64) -> bytes:
    """A whole ICMP or ICMPv6 echo request packet (the addresses' version decides)."""
    return _echo_packet(src, dst, identifier, sequence, payload, hop_limit, False)


def echo_reply(src: AddressLike, dst: AddressLike, identifier: int, sequence: int,
               payload: BytesLike = b"", *, hop_limit: int = 64) -> bytes:
    """A whole ICMP or ICMPv6 echo reply packet."""
    return _echo_packet(src, dst, identifier, sequence, payload, hop_limit, True)


# --- errors --------------------------------------------------------------------------------


def _offending(offending: BytesLike) -> tuple[int, bytes, bytes]:
    """(version, source address, the packet without link padding) of a packet to quote."""
    if not offending:
        raise PacketError("truncated", "no offending packet to quote")
    version = offending[0] >> 4
    data = bytes(offending)
    if version == 4:
        if len(data) < 20 or (data[0] & 15) < 5:
            raise PacketError("truncated", "an offending IPv4 packet needs its header")
        total = data[2] << 8 | data[3]
        if 20 <= total < len(data):
            data = data[:total]
        return 4, data[12:16], data
    if version == 6:
        if len(data) < 40:
            raise PacketError("truncated", "an offending IPv6 packet needs its header")
        total = 40 + (data[4] << 8 | data[5])
        if total < len(data):
            data = data[:total]
        return 6, data[8:24], data
    raise PacketError("bad-version", f"cannot quote an IP version {version} packet")


def icmp_error(offending: BytesLike, icmp_type: int, code: int, *, src: AddressLike,
               dst: AddressLike | None = None, rest: int = 0, hop_limit: int = 64) -> bytes:
    """A whole ICMP (IPv4 offending packet) or ICMPv6 (IPv6) error packet from `src` to `dst`
    (default: the offending packet's source) quoting as much of `offending` as fits."""
    version, offender, data = _offending(offending)
    s = _packed(src, version, "the error source")
    d = offender if dst is None else _packed(dst, version, "the error destination")
    limit = ICMP_ERROR_LIMIT - 20 - 8 if version == 4 else ICMPV6_ERROR_LIMIT - 40 - 8
    return build_packet(_ip_header(s, d, hop_limit), ICMPHeader(icmp_type, code, rest),
                        data[:limit])


def destination_unreachable(offending: BytesLike, code: int, *, src: AddressLike,
                            dst: AddressLike | None = None, hop_limit: int = 64) -> bytes:
    """Destination unreachable with `code` (ICMP_PORT_UNREACHABLE, ICMPV6_NO_ROUTE, ...)."""
    version = _offending(offending)[0]
    kind = ICMP_DEST_UNREACHABLE if version == 4 else ICMPV6_DEST_UNREACHABLE
    return icmp_error(offending, kind, code, src=src, dst=dst, hop_limit=hop_limit)


def port_unreachable(offending: BytesLike, *, src: AddressLike, dst: AddressLike | None = None,
                     hop_limit: int = 64) -> bytes:
    """Port unreachable (code 3 in ICMP, 4 in ICMPv6), what a host without the socket sends."""
    version = _offending(offending)[0]
    code = ICMP_PORT_UNREACHABLE if version == 4 else ICMPV6_PORT_UNREACHABLE
    return destination_unreachable(offending, code, src=src, dst=dst, hop_limit=hop_limit)


def packet_too_big(offending: BytesLike, mtu: int, *, src: AddressLike,
                   dst: AddressLike | None = None, hop_limit: int = 64) -> bytes:
    """ICMPv6 packet too big, or ICMP fragmentation needed with the next-hop MTU (RFC 1191)."""
    version = _offending(offending)[0]
    if version == 4:
        if not 0 <= mtu <= 0xFFFF:
            raise ValueError(f"an IPv4 next-hop MTU takes 16 bits, not {mtu}")
        return icmp_error(offending, ICMP_DEST_UNREACHABLE, ICMP_FRAGMENTATION_NEEDED, src=src,
                          dst=dst, rest=mtu, hop_limit=hop_limit)
    if not 0 <= mtu <= 0xFFFFFFFF:
        raise ValueError(f"an IPv6 MTU takes 32 bits, not {mtu}")
    return icmp_error(offending, ICMPV6_PACKET_TOO_BIG, 0, src=src, dst=dst, rest=mtu,
                      hop_limit=hop_limit)


def time_exceeded(offending: BytesLike, code: int = TIME_EXCEEDED_TRANSIT, *, src: AddressLike,
                  dst: AddressLike | None = None, hop_limit: int = 64) -> bytes:
    """Time exceeded: TTL / hop limit reached 0 in transit (code 0) or reassembly (code 1)."""
    version = _offending(offending)[0]
    kind = ICMP_TIME_EXCEEDED if version == 4 else ICMPV6_TIME_EXCEEDED
    return icmp_error(offending, kind, code, src=src, dst=dst, hop_limit=hop_limit)


def error_allowed(offending: BytesLike) -> bool:
    """May an ICMP error be sent about `offending`? Not about an ICMP error, a non-first
    fragment, a packet from an unspecified, multicast or limited broadcast source, nor (IPv4)
    one sent to a multicast or the limited broadcast address (RFC 1812 4.3.2.7, RFC 4443 2.4 e;
    directed broadcasts and the IPv6 exceptions for multicast destinations are the caller's).
    Malformed packets: False."""
    try:
        packet = parse_packet(offending)
    except PacketError:
        return False
    source = packet.src_ip
    if source.is_unspecified or source.is_multicast:
        return False
    if packet.version == 4:
        if source == ipaddress.IPv4Address("255.255.255.255"):
            return False
        dst = packet.dst_ip
        if dst.is_multicast or dst == ipaddress.IPv4Address("255.255.255.255"):
            return False
    if not packet.has_transport_header:
        return False
    icmp = IPPROTO_ICMP if packet.version == 4 else IPPROTO_ICMPV6
    if packet.protocol == icmp:
        kind = packet.buf[packet.transport_offset]
        return kind not in (ICMP_ERROR_TYPES if packet.version == 4 else ICMPV6_ERROR_TYPES)
    return True


# --- parsing -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class QuotedPacket:
    """The packet an ICMP error quotes: its IP header (with IPv6 extension headers) and the
    start of its upper layer, as far as the error carries it (RFC 792: at least 8 bytes).

    Offsets are into the buffer the error was parsed from; `end` is where the quote ends.
    `sport` / `dport` are None when the quote has no ports (other protocols, a non-first
    fragment, fewer than 4 bytes quoted)."""

    version: int
    offset: int
    transport_offset: int
    end: int
    protocol: int
    src: bytes
    dst: bytes
    header: bytes  # the quoted IP header and extension headers
    transport: bytes  # the first (up to) 8 bytes of the upper layer
    total_length: int  # the quoted packet's own length, as its header says
    has_transport_header: bool
    sport: int | None = None
    dport: int | None = None

    @property
    def src_ip(self) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
        return ipaddress.ip_address(self.src)

    @property
    def dst_ip(self) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
        return ipaddress.ip_address(self.dst)


@dataclass(frozen=True, slots=True)
class IcmpMessage:
    """An ICMP or ICMPv6 message and the packet around it (`version`, `src`, `dst`).
    `offset` is where the ICMP header starts in the buffer, `end` where the message ends."""

    version: int
    type: int
    code: int
    checksum: int
    rest: int
    offset: int
    end: int
    src: bytes
    dst: bytes
    quoted: QuotedPacket | None = None

    @property
    def is_error(self) -> bool:
        return self.type in (ICMP_ERROR_TYPES if self.version == 4 else ICMPV6_ERROR_TYPES)

    @property
    def is_echo(self) -> bool:
        kinds = ((ICMP_ECHO_REQUEST, ICMP_ECHO_REPLY) if self.version == 4
                 else (ICMPV6_ECHO_REQUEST, ICMPV6_ECHO_REPLY))
        return self.type in kinds

    @property
    def identifier(self) -> int:
        return self.rest >> 16

    @property
    def sequence(self) -> int:
        return self.rest & 0xFFFF

    @property
    def mtu(self) -> int | None:
        """The MTU of a packet too big / fragmentation needed; None for other messages."""
        if self.version == 6:
            return self.rest if self.type == ICMPV6_PACKET_TOO_BIG else None
        if self.type == ICMP_DEST_UNREACHABLE and self.code == ICMP_FRAGMENTATION_NEEDED:
            return self.rest & 0xFFFF
        return None

    @property
    def pointer(self) -> int | None:
        """The offending octet of a parameter problem; None for other messages."""
        if self.version == 6:
            return self.rest if self.type == ICMPV6_PARAMETER_PROBLEM else None
        return self.rest >> 24 if self.type == ICMP_PARAMETER_PROBLEM else None


def parse_icmp(data: BytesLike, offset: int = 0) -> IcmpMessage:
    """The ICMP (in IPv4) or ICMPv6 (in IPv6) message of the IP packet at `data[offset:]`,
    with the quoted packet of an error. Raises PacketError: malformed, not ICMP, a fragment,
    or an error whose quote is not an IP header of the same version."""
    packet = parse_packet(data, offset)
    icmp = IPPROTO_ICMP if packet.version == 4 else IPPROTO_ICMPV6
    if packet.protocol != icmp:
        raise PacketError("not-icmp", f"protocol {packet.protocol} in an IPv{packet.version} "
                                      "packet")
    if packet.is_fragment:
        raise PacketError("fragment", "a fragment of an ICMP message")
    start = packet.transport_offset
    kind, code, checksum, rest = _ICMP.unpack_from(data, start)
    errors = ICMP_ERROR_TYPES if packet.version == 4 else ICMPV6_ERROR_TYPES
    quoted = _quote(data, start + 8, packet.end, packet.version) if kind in errors else None
    return IcmpMessage(packet.version, kind, code, checksum, rest, start, packet.end,
                       packet.src, packet.dst, quoted)


def quoted_packet(data: BytesLike, offset: int = 0) -> QuotedPacket:
    """The packet quoted by the ICMP or ICMPv6 error at `data[offset:]`."""
    message = parse_icmp(data, offset)
    if message.quoted is None:
        raise PacketError("not-an-error", f"ICMP type {message.type} quotes no packet")
    return message.quoted


def _quote(data: BytesLike, start: int, end: int, version: int) -> QuotedPacket:
    if start >= end:
        raise PacketError("truncated", "an ICMP error without a quoted packet")
    quoted_version = data[start] >> 4
    if quoted_version != version:
        raise PacketError("bad-quote", f"an IPv{version} error quotes IP version "
                                       f"{quoted_version}")
    if version == 4:
        if end - start < 20:
            raise PacketError("truncated", "quoted IPv4 header cut short")
        header_end = start + ((data[start] & 15) << 2)
        if header_end - start < 20 or header_end > end:
            raise PacketError("bad-quote", "quoted IPv4 header length does not fit")
        transport_at = header_end
        protocol = data[start + 9]
        first = not ((data[start + 6] & 0x1F) or data[start + 7])
        total = data[start + 2] << 8 | data[start + 3]
        src = bytes(data[start + 12 : start + 16])
        dst = bytes(data[start + 16 : start + 20])
    else:
        if end - start < 40:
            raise PacketError("truncated", "quoted IPv6 header cut short")
        chain = walk_header_chain(data, start, end)
        transport_at = chain.offset
        protocol = chain.protocol
        first = not chain.later_fragment
        total = 40 + (data[start + 4] << 8 | data[start + 5])
        src = bytes(data[start + 8 : start + 24])
        dst = bytes(data[start + 24 : start + 40])
    transport = bytes(data[transport_at : min(transport_at + 8, end)])
    sport = dport = None
    if first and protocol in _PORT_PROTOCOLS and len(transport) >= 4:
        sport, dport = struct.unpack_from("!HH", transport)
    return QuotedPacket(
        version=version,
        offset=start,
        transport_offset=transport_at,
        end=end,
        protocol=protocol,
        src=src,
        dst=dst,
        header=bytes(data[start:transport_at]),
        transport=transport,
        total_length=total,
        has_transport_header=first,
        sport=sport,
        dport=dport,
    )


# --- rewriting the quote -------------------------------------------------------------------


def rewrite_quoted(
    buf: WritableBuffer,
    offset: int = 0,
    *,
    src: AddressLike | None = None,
    dst: AddressLike | None = None,
    sport: int | None = None,
    dport: int | None = None,
) -> bool:
    """Give the packet quoted by the ICMP or ICMPv6 error at `buf[offset:]` new addresses
    and/or ports, in place: the quoted IPv4 header checksum, the quoted upper-layer checksum
    (where the quote holds it) and the error's own checksum are updated incrementally
    (RFC 1624). The outer header is left alone (a stateless rule or `FlowRewrite` does that).

    Returns False if nothing needed to change. Raises PacketError for a packet that is not an
    ICMP error, or ports asked of a quote that has none (or has them behind IPv6 extension
    headers); the buffer is then untouched."""
    message = parse_icmp(buf, offset)
    quote = message.quoted
    if quote is None:
        raise PacketError("not-an-error", f"ICMP type {message.type} quotes no packet")
    version = quote.version
    new_src = _packed(src, version, "the quoted source") if src is not None else quote.src
    new_dst = _packed(dst, version, "the quoted destination") if dst is not None else quote.dst
    for port in (sport, dport):
        if port is not None and not 0 <= port <= 0xFFFF:
            raise ValueError(f"ports are 0..65535, not {port}")
    new_sport = sport if sport is not None and sport != quote.sport else None
    new_dport = dport if dport is not None and dport != quote.dport else None
    if (new_sport is not None or new_dport is not None) and (
        quote.sport is None
        or quote.dport is None
        or quote.protocol not in _REWRITABLE_PORTS
        # the rewrite reads ports right after the fixed IPv6 header
        or (version == 6 and quote.transport_offset != quote.offset + 40)
    ):
        raise PacketError("no-ports", f"the quoted protocol {quote.protocol} packet has no "
                                      "ports to rewrite here")
    rewrite = FlowRewrite(
        src=(quote.src, new_src) if new_src != quote.src else None,
        dst=(quote.dst, new_dst) if new_dst != quote.dst else None,
        sport=(quote.sport, new_sport) if new_sport is not None and quote.sport is not None
        else None,
        dport=(quote.dport, new_dport) if new_dport is not None and quote.dport is not None
        else None,
        icmp_errors=False,
    )
    if rewrite.src is None and rewrite.dst is None and not (rewrite.sport or rewrite.dport):
        return False
    change = rewrite.rewrite_quoted(buf, quote.offset, quote.end, message.offset)
    if change is None:  # pragma: no cover - the rewrite's old values are the quote's own
        raise PacketError("bad-quote", "the quote did not match itself")
    (checksum,) = _U16.unpack_from(buf, message.offset + 2)
    _U16.pack_into(buf, message.offset + 2, apply_delta(checksum, change))
    return True

