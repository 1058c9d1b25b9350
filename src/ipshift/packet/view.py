"""`parse_packet`: a validated, lazy view of an IP packet held in a caller's buffer.

Parsing checks the structure (version, header lengths, total length, the extension header
chain, the upper-layer header's own length) and records offsets; it copies nothing. Fields are
read from the buffer when asked for, so a view sees in-place rewrites of its buffer.
"""

from __future__ import annotations

import ipaddress
import struct
from typing import ClassVar

from ipshift.packet.checksum import (
    internet_sum,
    verify_ipv4_header_checksum,
    verify_transport_checksum,
)
from ipshift.packet.errors import BytesLike, PacketError
from ipshift.packet.ipv4 import IPv4Header, source_route_destination
from ipshift.packet.ipv6 import (
    ExtensionHeader,
    IPv6Header,
    extension_header_size,
    walk_header_chain,
)
from ipshift.packet.protocols import (
    IPPROTO_DCCP,
    IPPROTO_ICMP,
    IPPROTO_ICMPV6,
    IPPROTO_SCTP,
    IPPROTO_TCP,
    IPPROTO_UDP,
    IPPROTO_UDPLITE,
    IPV6_EXTENSION_HEADERS,
)
from ipshift.packet.transport import ICMPHeader, TCPHeader, TransportHeader, UDPHeader

_V4_FIXED = struct.Struct("!BxHxxHxB")  # version/IHL, total length, flags/fragment, protocol
_V6_FIXED = struct.Struct("!HB")  # payload length, next header
_PORTS = struct.Struct("!HH")
_unpack_ports = _PORTS.unpack_from

#: Protocols whose first four octets are the source and destination ports.
PORT_PROTOCOLS = frozenset({IPPROTO_TCP, IPPROTO_UDP, IPPROTO_UDPLITE, IPPROTO_DCCP, IPPROTO_SCTP})
#: Those of them whose header `_check_transport` checks only for the ports (4 bytes).
_OTHER_PORT_PROTOCOLS = PORT_PROTOCOLS - {IPPROTO_TCP, IPPROTO_UDP}


class Packet:
    """A parsed IP packet: `buf[offset:end]`, its upper layer `protocol` at
    `transport_offset`. Create with `parse_packet`."""

    __slots__ = ("buf", "end", "offset", "protocol", "transport_offset")
    version: ClassVar[int]

    buf: BytesLike
    offset: int
    transport_offset: int
    end: int
    protocol: int

    # -- addresses -----------------------------------------------------------------------------
    @property
    def src(self) -> bytes:
        raise NotImplementedError

    @property
    def dst(self) -> bytes:
        raise NotImplementedError

    @property
    def src_ip(self) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
        return ipaddress.ip_address(self.src)

    @property
    def dst_ip(self) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
        return ipaddress.ip_address(self.dst)

    @property
    def pseudo_src(self) -> bytes:
        """The source address the upper-layer checksum covers."""
        return self.src

    @property
    def pseudo_dst(self) -> bytes:
        """The destination address the upper-layer checksum covers."""
        return self.dst

    # -- layers --------------------------------------------------------------------------------
    @property
    def has_transport_header(self) -> bool:
        """False for a non-first fragment: its upper-layer header is in another packet."""
        raise NotImplementedError

    @property
    def is_fragment(self) -> bool:
        raise NotImplementedError

    @property
    def hop_limit(self) -> int:
        """TTL (IPv4) or hop limit (IPv6)."""
        raise NotImplementedError

    @property
    def data(self) -> memoryview:
        """The whole IP packet."""
        return memoryview(self.buf)[self.offset : self.end]

    @property
    def transport_end(self) -> int:
        """End of the upper-layer data (for UDP: as its length field says)."""
        if self.protocol == IPPROTO_UDP and self.has_transport_header and not self.is_fragment:
            return self.transport_offset + (
                self.buf[self.transport_offset + 4] << 8 | self.buf[self.transport_offset + 5]
            )
        return self.end

    @property
    def segment(self) -> memoryview:
        """The upper layer, header and payload: what its checksum covers."""
        return memoryview(self.buf)[self.transport_offset : self.transport_end]

    @property
    def transport_header_length(self) -> int:
        if not self.has_transport_header:
            return 0
        if self.protocol == IPPROTO_TCP:
            return self.buf[self.transport_offset + 12] >> 2 & 0x3C
        if self.protocol in (IPPROTO_UDP, IPPROTO_ICMP if self.version == 4 else IPPROTO_ICMPV6):
            return 8
        return 0

    @property
    def payload(self) -> memoryview:
        """The data after the upper-layer header (after the IP layer for unknown protocols)."""
        start = self.transport_offset + self.transport_header_length
        return memoryview(self.buf)[start : self.transport_end]

    @property
    def ports(self) -> tuple[int, int]:
        """(source port, destination port) of TCP, UDP, UDP-Lite, DCCP or SCTP."""
        if self.protocol not in PORT_PROTOCOLS or not self.has_transport_header:
            raise PacketError("no-ports", f"protocol {self.protocol} packet carries no ports here")
        sport, dport = _PORTS.unpack_from(self.buf, self.transport_offset)
        return sport, dport

    @property
    def sport(self) -> int:
        return self.ports[0]

    @property
    def dport(self) -> int:
        return self.ports[1]

    def flow_key(self) -> tuple[int, bytes, bytes, int, int]:
        """(protocol, src, dst, sport, dport); ports are 0 where the packet has none."""
        try:
            sport, dport = self.ports
        except PacketError:
            sport = dport = 0
        return self.protocol, self.src, self.dst, sport, dport

    def ip_header(self) -> IPv4Header | IPv6Header:
        raise NotImplementedError

    def transport_header(self) -> TransportHeader | None:
        """The decoded TCP, UDP, ICMP or ICMPv6 header; None for other protocols and for
        non-first fragments."""
        if not self.has_transport_header:
            return None
        if self.protocol == IPPROTO_TCP:
            return TCPHeader.parse(self.buf, self.transport_offset)
        if self.protocol == IPPROTO_UDP:
            return UDPHeader.parse(self.buf, self.transport_offset)
        if self.protocol == (IPPROTO_ICMP if self.version == 4 else IPPROTO_ICMPV6):
            return ICMPHeader.parse(self.buf, self.transport_offset)
        return None

    # -- checksums -----------------------------------------------------------------------------
    def verify_ip_checksum(self) -> bool:
        """IPv4 header checksum (IPv6 has none: always True)."""
        return True

    def verify_transport_checksum(self) -> bool | None:
        """Upper-layer checksum of TCP, UDP, ICMP or ICMPv6; None when it cannot be checked
        (other protocols, fragments)."""
        if not self.has_transport_header or self.is_fragment:
            return None
        segment = self.segment
        if self.protocol == (IPPROTO_ICMP if self.version == 4 else IPPROTO_ICMPV6):
            if self.version == 4:  # ICMP has no pseudo-header
                return internet_sum(segment) == 0xFFFF
        elif self.protocol not in (IPPROTO_TCP, IPPROTO_UDP):
            return None
        return verify_transport_checksum(self.pseudo_src, self.pseudo_dst, self.protocol, segment)

    def __repr__(self) -> str:
        return (
            f"<{type(self).__name__} {self.src_ip} -> {self.dst_ip} protocol {self.protocol}"
            f" {self.end - self.offset} bytes>"
        )


class IPv4Packet(Packet):
    __slots__ = ()
    version: ClassVar[int] = 4

    @property
    def src(self) -> bytes:
        return bytes(self.buf[self.offset + 12 : self.offset + 16])

    @property
    def dst(self) -> bytes:
        return bytes(self.buf[self.offset + 16 : self.offset + 20])

    @property
    def pseudo_dst(self) -> bytes:
        if self.transport_offset - self.offset > 20:  # options: maybe a source route
            at = source_route_destination(self.buf, self.offset + 20, self.transport_offset)
            if at >= 0:
                return bytes(self.buf[at : at + 4])
        return self.dst

    @property
    def has_transport_header(self) -> bool:
        return not (self.buf[self.offset + 6] & 0x1F or self.buf[self.offset + 7])

    @property
    def is_fragment(self) -> bool:
        return bool(self.buf[self.offset + 6] & 0x3F or self.buf[self.offset + 7])

    @property
    def hop_limit(self) -> int:
        return self.buf[self.offset + 8]

    @property
    def ports(self) -> tuple[int, int]:
        """(source port, destination port) of TCP, UDP, UDP-Lite, DCCP or SCTP."""
        # Inlined for the flow lookup of every packet: protocol check and first fragment.
        buf = self.buf
        at = self.offset + 6
        if self.protocol in PORT_PROTOCOLS and not (buf[at] & 0x1F or buf[at + 1]):
            sport, dport = _unpack_ports(buf, self.transport_offset)
            return sport, dport
        raise PacketError("no-ports", f"protocol {self.protocol} packet carries no ports here")

    def ip_header(self) -> IPv4Header:
        return IPv4Header.parse(self.buf, self.offset)

    def verify_ip_checksum(self) -> bool:
        return verify_ipv4_header_checksum(
            memoryview(self.buf)[self.offset : self.transport_offset]
        )


class IPv6Packet(Packet):
    __slots__ = ("fragment_header_offset", "pseudo_dst_offset", "pseudo_src_offset")
    version: ClassVar[int] = 6

    fragment_header_offset: int  # -1 if not fragmented
    pseudo_src_offset: int
    pseudo_dst_offset: int

    @property
    def src(self) -> bytes:
        return bytes(self.buf[self.offset + 8 : self.offset + 24])

    @property
    def dst(self) -> bytes:
        return bytes(self.buf[self.offset + 24 : self.offset + 40])

    @property
    def pseudo_src(self) -> bytes:
        return bytes(self.buf[self.pseudo_src_offset : self.pseudo_src_offset + 16])

    @property
    def pseudo_dst(self) -> bytes:
        return bytes(self.buf[self.pseudo_dst_offset : self.pseudo_dst_offset + 16])

    @property
    def has_transport_header(self) -> bool:
        at = self.fragment_header_offset
        return at < 0 or not (self.buf[at + 2] << 8 | self.buf[at + 3]) & 0xFFF8

    @property
    def is_fragment(self) -> bool:
        """True if this packet is part of a larger one; an atomic fragment (fragment header
        with offset 0 and no more fragments, RFC 6946) is whole."""
        at = self.fragment_header_offset
        return at >= 0 and bool((self.buf[at + 2] << 8 | self.buf[at + 3]) & 0xFFF9)

    @property
    def hop_limit(self) -> int:
        return self.buf[self.offset + 7]

    def ip_header(self) -> IPv6Header:
        return IPv6Header.parse(self.buf, self.offset)

    def extension_headers(self) -> list[ExtensionHeader]:
        """The extension headers between the IPv6 header and `transport_offset`."""
        headers: list[ExtensionHeader] = []
        kind = self.buf[self.offset + 6]
        pos = self.offset + 40
        while pos < self.transport_offset:
            size = extension_header_size(kind, self.buf, pos, self.transport_offset)
            headers.append(ExtensionHeader(kind, bytes(self.buf[pos + 2 : pos + size]),
                                           self.buf[pos]))
            kind = self.buf[pos]
            pos += size
        return headers


def parse_packet(data: BytesLike, offset: int = 0) -> IPv4Packet | IPv6Packet:
    """Validate the IPv4 or IPv6 packet at `data[offset:]` and return a view of it.

    Bytes after the IP total length (link padding) are ignored. Raises PacketError for every
    malformed input.
    """
    # Fast path for the common case, unfragmented IPv4 whose checks all pass; anything else
    # (IPv6, fragments, errors) takes the careful path, which also picks the error reason.
    try:
        first, total, fragment, protocol = _unpack_v4_fixed(data, offset)
        if first == 0x45:
            header_end = offset + 20
        elif first >> 4 == 4 and first & 15 >= 5:
            header_end = offset + ((first & 15) << 2)
        elif first >> 4 == 6:
            return _parse_ipv6(data, offset, len(data))
        else:
            return _parse_checked(data, offset)
        end = offset + total
        if fragment & 0x3FFF or not header_end <= end <= len(data):
            return _parse_checked(data, offset)
        if protocol == IPPROTO_TCP:
            if not 20 <= data[header_end + 12] >> 2 & 0x3C <= end - header_end:
                return _parse_checked(data, offset)
        elif protocol == IPPROTO_UDP:
            if not 8 <= (data[header_end + 4] << 8 | data[header_end + 5]) <= end - header_end:
                return _parse_checked(data, offset)
        elif protocol == IPPROTO_ICMP:
            if end - header_end < 8:
                return _parse_checked(data, offset)
        elif protocol in _OTHER_PORT_PROTOCOLS and end - header_end < 4:
            return _parse_checked(data, offset)
    except (struct.error, IndexError):
        return _parse_checked(data, offset)
    packet = _new_object(IPv4Packet)
    packet.buf = data
    packet.offset = offset
    packet.transport_offset = header_end
    packet.end = end
    packet.protocol = protocol
    return packet


_unpack_v4_fixed = _V4_FIXED.unpack_from
_new_object = object.__new__


def _parse_checked(data: BytesLike, offset: int) -> IPv4Packet | IPv6Packet:
    """parse_packet without shortcuts: every check in order, with its own error reason."""
    size = len(data)
    if offset >= size or offset < 0:
        raise PacketError("truncated", "empty packet")
    version = data[offset] >> 4
    if version == 6:
        return _parse_ipv6(data, offset, size)
    if version != 4:
        raise PacketError("bad-version", f"IP version {version}")
    if size - offset < 20:
        raise PacketError("truncated", "IPv4 header needs 20 bytes")
    first, total, fragment, protocol = _V4_FIXED.unpack_from(data, offset)
    header_end = offset + ((first & 15) << 2)
    end = offset + total
    if header_end - offset < 20:
        raise PacketError("bad-ihl", f"IHL {first & 15} is below 5")
    if end > size:
        raise PacketError("truncated", f"total length {total} exceeds the {size - offset} bytes")
    if header_end > end:
        raise PacketError("length-mismatch", f"total length {total} < header length")
    if not fragment & 0x1FFF:
        _check_transport(data, protocol, header_end, end, fragment & 0x2000, IPPROTO_ICMP)
    packet = IPv4Packet.__new__(IPv4Packet)
    packet.buf = data
    packet.offset = offset
    packet.transport_offset = header_end
    packet.end = end
    packet.protocol = protocol
    return packet


def _parse_ipv6(data: BytesLike, offset: int, size: int) -> IPv6Packet:
    if size - offset < 40:
        raise PacketError("truncated", "IPv6 header needs 40 bytes")
    length, protocol = _V6_FIXED.unpack_from(data, offset + 4)
    end = offset + 40 + length
    if end > size:
        raise PacketError("truncated", f"payload length exceeds the {size - offset} bytes")
    if protocol in IPV6_EXTENSION_HEADERS:
        chain = walk_header_chain(data, offset, end)
        protocol = chain.protocol
        start = chain.offset
        fragment_at = chain.fragment_header_offset
        if not chain.later_fragment:
            _check_transport(data, protocol, start, end, fragment_at >= 0, IPPROTO_ICMPV6)
        pseudo_src = chain.pseudo_src_offset
        pseudo_dst = chain.pseudo_dst_offset
    else:
        start = offset + 40
        fragment_at = -1
        pseudo_src = offset + 8
        pseudo_dst = offset + 24
        _check_transport(data, protocol, start, end, False, IPPROTO_ICMPV6)
    packet = _new_object(IPv6Packet)
    packet.buf = data
    packet.offset = offset
    packet.transport_offset = start
    packet.end = end
    packet.protocol = protocol
    packet.fragment_header_offset = fragment_at
    packet.pseudo_src_offset = pseudo_src
    packet.pseudo_dst_offset = pseudo_dst
    return packet


def _check_transport(
    data: BytesLike, protocol: int, start: int, end: int, fragmented: int | bool, icmp: int
) -> None:
    """Check that a TCP, UDP or ICMP header fits, and the ports of UDP-Lite, DCCP and SCTP.
    In a first fragment only the fixed part must be there; the rest of the segment is in later
    fragments."""
    if protocol == IPPROTO_TCP:
        if end - start < 20:
            raise PacketError("truncated", "TCP header needs 20 bytes")
        header = data[start + 12] >> 2 & 0x3C
        if header < 20:
            raise PacketError("bad-data-offset", f"TCP data offset {header >> 2} is below 5")
        if not fragmented and start + header > end:
            raise PacketError("truncated", f"TCP header of {header} bytes is cut short")
    elif protocol == IPPROTO_UDP:
        if end - start < 8:
            raise PacketError("truncated", "UDP header needs 8 bytes")
        length = data[start + 4] << 8 | data[start + 5]
        if length < 8 or (not fragmented and start + length > end):
            raise PacketError("length-mismatch", f"UDP length {length} for {end - start} bytes")
    elif protocol == icmp:
        if end - start < 8:
            raise PacketError("truncated", "ICMP header needs 8 bytes")
    elif protocol in _OTHER_PORT_PROTOCOLS and end - start < 4:
        # `ports` reads the first four octets: they must be inside the packet, not padding.
        raise PacketError("truncated", f"protocol {protocol} header needs its 4 bytes of ports")
