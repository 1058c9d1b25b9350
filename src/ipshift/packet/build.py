"""`build_packet`: encode headers and a payload into one packet, filling lengths and checksums."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from ipshift.packet.checksum import internet_checksum, transport_checksum
from ipshift.packet.errors import BytesLike
from ipshift.packet.ipv4 import IPv4Header, source_route_destination
from ipshift.packet.ipv6 import ExtensionHeader, IPv6Header, walk_header_chain
from ipshift.packet.protocols import IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP
from ipshift.packet.transport import ICMPHeader, TCPHeader, TransportHeader, UDPHeader

_CHECKSUM_OFFSET = {IPPROTO_TCP: 16, IPPROTO_UDP: 6, IPPROTO_ICMP: 2, IPPROTO_ICMPV6: 2}


def build_packet(
    ip: IPv4Header | IPv6Header,
    transport: TransportHeader | None = None,
    payload: BytesLike = b"",
    *,
    extension_headers: Sequence[ExtensionHeader] = (),
) -> bytes:
    """Encode an IPv4 or IPv6 packet.

    The protocol / next header fields follow from `transport` (TCP 6, UDP 17, ICMP 1 over IPv4,
    ICMPv6 58 over IPv6) and from the chain of `extension_headers` (IPv6 only). Fields left None
    (lengths, checksums) are computed; fields given are written as they are, so malformed
    packets can be built on purpose. The inputs are not modified.
    """
    if isinstance(ip, IPv4Header) and extension_headers:
        raise ValueError("extension headers are IPv6 only")
    protocol = _protocol_of(ip, transport, extension_headers)
    if transport is None:
        segment = bytes(payload)
    elif isinstance(transport, UDPHeader):
        segment = transport.pack(len(payload)) + payload
    else:
        segment = transport.pack() + payload

    if isinstance(ip, IPv4Header):
        header = dataclasses.replace(ip, protocol=protocol).pack(len(segment))
        packet = bytearray(header + segment)
        transport_at = len(header)
    else:
        chain = bytearray()
        kinds = [ext.kind for ext in extension_headers] + [protocol]
        for ext, following in zip(extension_headers, kinds[1:], strict=True):
            chain += ext.pack(following)
        header = dataclasses.replace(ip, next_header=kinds[0]).pack(len(chain) + len(segment))
        packet = bytearray(header + chain + segment)
        transport_at = len(header) + len(chain)

    if transport is not None and transport.checksum is None:
        at = transport_at + _CHECKSUM_OFFSET[protocol]
        if protocol == IPPROTO_ICMP:
            value = internet_checksum(segment)
        elif isinstance(ip, IPv4Header):
            # A source route's final destination stands in for the header's (next hop).
            route_at = source_route_destination(packet, 20, transport_at)
            dst = ip.dst if route_at < 0 else bytes(packet[route_at : route_at + 4])
            value = transport_checksum(ip.src, dst, protocol, segment)
        else:
            # The pseudo-header may use a routing header's final destination or a home address.
            end = walk_header_chain(packet, 0, len(packet))
            src = bytes(packet[end.pseudo_src_offset : end.pseudo_src_offset + 16])
            dst = bytes(packet[end.pseudo_dst_offset : end.pseudo_dst_offset + 16])
            value = transport_checksum(src, dst, protocol, segment)
        packet[at : at + 2] = value.to_bytes(2, "big")
    return bytes(packet)


def _protocol_of(
    ip: IPv4Header | IPv6Header,
    transport: TransportHeader | None,
    extension_headers: Sequence[ExtensionHeader],
) -> int:
    if isinstance(transport, TCPHeader):
        return IPPROTO_TCP
    if isinstance(transport, UDPHeader):
        return IPPROTO_UDP
    if isinstance(transport, ICMPHeader):
        return IPPROTO_ICMP if isinstance(ip, IPv4Header) else IPPROTO_ICMPV6
    if isinstance(ip, IPv4Header):
        return ip.protocol
    return extension_headers[-1].next_header if extension_headers else ip.next_header
