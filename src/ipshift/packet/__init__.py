"""Pure packet codecs: IPv4, IPv6 with extension headers, ICMP, ICMPv6 (errors, quotes,
neighbour discovery), UDP, TCP, checksums.

No I/O, no sockets, no clock. Parsers take bytes, bytearray or memoryview and copy no payload;
every malformed input raises `PacketError`. See docs/packet.md.

    packet = parse_packet(data)                       # validated lazy view
    packet.protocol, packet.ports, packet.payload     # read from the buffer on demand
    rewrite = FlowRewrite(src=("192.0.2.1", "203.0.113.7"))   # deltas computed once
    rewrite.apply(buf, partial_checksum=vnet_needs_csum)      # in place, per packet
"""

from ipshift.packet.build import build_packet
from ipshift.packet.checksum import (
    apply_delta,
    apply_delta_partial,
    apply_delta_udp,
    checksum_delta,
    complete_partial_checksum,
    internet_checksum,
    internet_sum,
    ipv4_header_checksum,
    ones_add,
    pseudo_header_sum,
    transport_checksum,
    verify_ipv4_header_checksum,
    verify_transport_checksum,
    word_delta,
)
from ipshift.packet.errors import BytesLike, PacketError, WritableBuffer
from ipshift.packet.icmp import (
    IcmpMessage,
    QuotedPacket,
    destination_unreachable,
    echo_message,
    echo_reply,
    echo_request,
    error_allowed,
    icmp_error,
    packet_too_big,
    parse_icmp,
    port_unreachable,
    quoted_packet,
    rewrite_quoted,
    time_exceeded,
)
from ipshift.packet.ipv4 import IPv4Header
from ipshift.packet.ipv6 import ChainEnd, ExtensionHeader, IPv6Header, walk_header_chain
from ipshift.packet.nd import (
    NeighbourMessage,
    build_neighbour_advert,
    build_neighbour_solicit,
    neighbour_advert_packet,
    neighbour_solicit_packet,
    parse_neighbour_advert,
    parse_neighbour_message,
    solicited_node,
)
from ipshift.packet.options import (
    Option,
    decode_ipv4_options,
    decode_ipv6_options,
    decode_tcp_options,
    encode_ipv4_options,
    encode_ipv6_options,
    encode_tcp_options,
)
from ipshift.packet.pcap import LINKTYPE_RAW, encode_pcap
from ipshift.packet.rewrite import FlowRewrite, decrement_hop_limit, set_hop_limit
from ipshift.packet.transport import ICMPHeader, TCPHeader, TransportHeader, UDPHeader
from ipshift.packet.view import IPv4Packet, IPv6Packet, Packet, parse_packet

__all__ = [
    "LINKTYPE_RAW",
    "BytesLike",
    "ChainEnd",
    "ExtensionHeader",
    "FlowRewrite",
    "ICMPHeader",
    "IPv4Header",
    "IPv4Packet",
    "IPv6Header",
    "IPv6Packet",
    "IcmpMessage",
    "NeighbourMessage",
    "Option",
    "Packet",
    "PacketError",
    "QuotedPacket",
    "TCPHeader",
    "TransportHeader",
    "UDPHeader",
    "WritableBuffer",
    "apply_delta",
    "apply_delta_partial",
    "apply_delta_udp",
    "build_neighbour_advert",
    "build_neighbour_solicit",
    "build_packet",
    "checksum_delta",
    "complete_partial_checksum",
    "decode_ipv4_options",
    "decode_ipv6_options",
    "decode_tcp_options",
    "decrement_hop_limit",
    "destination_unreachable",
    "echo_message",
    "echo_reply",
    "echo_request",
    "encode_ipv4_options",
    "encode_ipv6_options",
    "encode_pcap",
    "encode_tcp_options",
    "error_allowed",
    "icmp_error",
    "internet_checksum",
    "internet_sum",
    "ipv4_header_checksum",
    "neighbour_advert_packet",
    "neighbour_solicit_packet",
    "ones_add",
    "packet_too_big",
    "parse_icmp",
    "parse_neighbour_advert",
    "parse_neighbour_message",
    "parse_packet",
    "port_unreachable",
    "pseudo_header_sum",
    "quoted_packet",
    "rewrite_quoted",
    "set_hop_limit",
    "solicited_node",
    "time_exceeded",
    "transport_checksum",
    "verify_ipv4_header_checksum",
    "verify_transport_checksum",
    "walk_header_chain",
    "word_delta",
]
