"""Header codecs, option lists, build_packet, the packet view and the pcap writer, case by case."""

from __future__ import annotations

import ipaddress
import struct
from pathlib import Path

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import (
    IPv6,
    IPv6ExtHdrDestOpt,
    IPv6ExtHdrFragment,
    IPv6ExtHdrHopByHop,
    IPv6ExtHdrRouting,
    IPv6ExtHdrSegmentRouting,
    RouterAlert,
)
from scapy.utils import rdpcap

from ipshift.packet import (
    LINKTYPE_RAW,
    ExtensionHeader,
    ICMPHeader,
    IPv4Header,
    IPv6Header,
    Option,
    PacketError,
    TCPHeader,
    UDPHeader,
    build_packet,
    decode_ipv4_options,
    decode_ipv6_options,
    decode_tcp_options,
    encode_ipv4_options,
    encode_ipv6_options,
    encode_pcap,
    encode_tcp_options,
    parse_packet,
)
from ipshift.packet.transport import ICMP_ECHO_REQUEST, ICMPV6_ECHO_REQUEST

A4 = ipaddress.IPv4Address("192.0.2.1").packed
B4 = ipaddress.IPv4Address("198.51.100.2").packed
A6 = ipaddress.IPv6Address("2001:db8::1").packed
B6 = ipaddress.IPv6Address("2001:db8::2").packed


# -- options -------------------------------------------------------------------------------------
def test_tcp_options_round_trip_and_match_scapy() -> None:
    options = [Option(2, struct.pack("!H", 1460)), Option(1), Option(3, b"\x07"), Option(4),
               Option(8, struct.pack("!II", 5, 6))]
    raw = encode_tcp_options(options)
    assert len(raw) % 4 == 0
    assert len(raw) == 20 and decode_tcp_options(raw) == options
    assert decode_tcp_options(encode_tcp_options(options[:2])) == [*options[:2], Option(0)]
    scapy = bytes(TCP(options=[("MSS", 1460), ("NOP", None), ("WScale", 7), ("SAckOK", b""),
                               ("Timestamp", (5, 6))]))[20:]
    assert decode_tcp_options(scapy)[:5] == [*options[:2], Option(3, b"\x07"), *options[3:]]


@pytest.mark.parametrize("raw", [b"\x02", b"\x02\x01", b"\x02\x09\x00\x00", b"\x08\x00"])
def test_malformed_options(raw: bytes) -> None:
    for decode in (decode_tcp_options, decode_ipv4_options):
        with pytest.raises(PacketError) as error:
            decode(raw)
        assert error.value.reason == "bad-option"


def test_option_encoders_refuse_what_does_not_fit() -> None:
    with pytest.raises(ValueError):
        encode_ipv4_options([Option(7, bytes(39))])
    with pytest.raises(ValueError):
        encode_tcp_options([Option(1, b"x")])
    with pytest.raises(ValueError):
        encode_ipv6_options([Option(0, b"x")])


def test_ipv6_options_are_padded_to_eight_bytes() -> None:
    for data in (b"", b"a", b"abcde", b"abcdef"):
        body = encode_ipv6_options([Option(0x1E, data)])
        assert (len(body) + 2) % 8 == 0
        decoded = [o for o in decode_ipv6_options(body) if o.kind not in (0, 1)]
        assert decoded == [Option(0x1E, data)]
    assert encode_ipv6_options([]) == bytes((1, 4)) + bytes(4)  # one PadN
    with pytest.raises(PacketError):
        decode_ipv6_options(b"\x1e\x05ab")


# -- headers -------------------------------------------------------------------------------------
def test_ipv4_header_errors() -> None:
    good = IPv4Header(A4, B4, protocol=17).pack(8)
    assert IPv4Header.parse(good).checksum == int.from_bytes(good[10:12], "big")
    for data, reason in (
        (good[:19], "truncated"),
        (b"\x65" + good[1:], "bad-version"),
        (b"\x43" + good[1:], "bad-ihl"),
        (b"\x46" + good[1:], "truncated"),
        (good[:2] + b"\x00\x10" + good[4:], "length-mismatch"),
    ):
        with pytest.raises(PacketError) as error:
            IPv4Header.parse(data)
        assert error.value.reason == reason


def test_header_pack_refuses_out_of_range_fields() -> None:
    with pytest.raises(ValueError):
        IPv4Header(A4, B4, ttl=256).pack()
    with pytest.raises(ValueError):
        IPv4Header(A4, B4, options=b"\x01").pack()
    with pytest.raises(ValueError):
        IPv6Header(A6, B6, flow_label=1 << 20).pack()
    with pytest.raises(ValueError):
        TCPHeader(1, 70000).pack()
    with pytest.raises(ValueError):
        ICMPHeader.echo(ICMP_ECHO_REQUEST, 1 << 16, 0)


def test_extension_header_constructors_match_scapy() -> None:
    route = ExtensionHeader.routing_addresses(0, 1, [A6, B6])
    assert route.pack(6) == bytes(IPv6ExtHdrRouting(nh=6, addresses=["2001:db8::1",
                                                                   "2001:db8::2"], segleft=1))
    fragment = ExtensionHeader.fragment(offset=100, more=True, identification=0xABCDEF)
    assert fragment.pack(17) == bytes(IPv6ExtHdrFragment(nh=17, offset=100, m=1, id=0xABCDEF))
    assert (fragment.fragment_offset, fragment.more_fragments, fragment.identification) == (
        100, True, 0xABCDEF)
    options = ExtensionHeader.hop_by_hop([Option(5, b"\x00\x00")])  # router alert
    assert options.pack(58) == bytes(IPv6ExtHdrHopByHop(nh=58, options=[RouterAlert(value=0)]))
    assert options.options()[0] == Option(5, b"\x00\x00")
    with pytest.raises(ValueError):
        ExtensionHeader.routing(0, 0, b"odd").pack(6)
    with pytest.raises(ValueError):
        fragment.routing_type  # noqa: B018 - the property raises for the wrong header kind


# -- the view ------------------------------------------------------------------------------------
def test_view_copies_nothing_and_sees_rewrites() -> None:
    buf = bytearray(bytes(IP(src="192.0.2.1", dst="198.51.100.2") / UDP(sport=1, dport=2)
                          / b"payload"))
    packet = parse_packet(buf)
    payload = packet.payload
    assert payload.obj is buf  # a window on the caller's buffer
    buf[-1:] = b"!"
    assert bytes(payload) == b"payload"[:-1] + b"!"
    assert packet.ports == (1, 2) and packet.flow_key() == (17, A4, B4, 1, 2)


def test_link_padding_and_offsets() -> None:
    data = bytes(IP(src="192.0.2.1", dst="198.51.100.2") / TCP() / b"abc")
    frame = b"\xee" * 10 + data + b"\0" * 6  # a header before, Ethernet padding after
    packet = parse_packet(frame, 10)
    assert (packet.offset, packet.end) == (10, 10 + len(data))
    assert bytes(packet.payload) == b"abc" and packet.verify_transport_checksum()


def test_fragments() -> None:
    first = parse_packet(bytes(IP(src="192.0.2.1", dst="198.51.100.2", flags="MF")
                               / UDP(sport=1, dport=2, len=500) / (b"x" * 40)))
    assert first.is_fragment and first.has_transport_header and first.ports == (1, 2)
    assert first.verify_transport_checksum() is None  # cannot be checked on a fragment
    later = parse_packet(bytes(IP(src="192.0.2.1", dst="198.51.100.2", frag=6, proto=17)
                               / (b"y" * 40)))
    assert later.is_fragment and not later.has_transport_header
    assert later.transport_header() is None
    with pytest.raises(PacketError) as error:
        _ = later.ports
    assert error.value.reason == "no-ports"
    later6 = parse_packet(bytes(IPv6(src="2001:db8::1", dst="2001:db8::2")
                                / IPv6ExtHdrFragment(offset=3, nh=6) / (b"z" * 16)))
    assert later6.protocol == 6 and not later6.has_transport_header


@pytest.mark.parametrize("protocol", [132, 33, 136], ids=["sctp", "dccp", "udplite"])
def test_port_protocols_need_four_bytes_of_ports(protocol: int) -> None:
    """SCTP, DCCP and UDP-Lite: fewer than 4 transport bytes is a truncated packet (not a
    struct.error from `ports`), and ports are never read from link padding after it."""
    v4 = IP(src="192.0.2.1", dst="198.51.100.2", proto=protocol)
    v6 = IPv6(src="2001:db8::1", dst="2001:db8::2", nh=protocol)
    v6_first_fragment = (IPv6(src="2001:db8::1", dst="2001:db8::2")
                         / IPv6ExtHdrFragment(m=1, nh=protocol))
    for ip in (v4, IP(src="192.0.2.1", dst="198.51.100.2", proto=protocol, flags="MF"), v6,
               v6_first_fragment):
        for size in range(4):
            data = bytes(ip / (b"\x12\x34\x56"[:size]))
            for padding in (b"", b"\xab" * 8):  # e.g. Ethernet padding after the packet
                with pytest.raises(PacketError) as error:
                    parse_packet(data + padding)
                assert error.value.reason == "truncated"
        packet = parse_packet(bytes(ip / b"\x12\x34\x56\x78") + b"\xab" * 8)
        assert packet.ports == (0x1234, 0x5678)
        assert packet.flow_key()[3:] == (0x1234, 0x5678)
    # A later fragment carries no ports, however short.
    later = parse_packet(bytes(IP(src="192.0.2.1", dst="198.51.100.2", proto=protocol, frag=1)
                               / b"ab"))
    assert later.flow_key()[3:] == (0, 0)


def test_ipv6_chain_walk_and_final_destination() -> None:
    srh = IPv6ExtHdrSegmentRouting(addresses=["2001:db8::30", "2001:db8::20"], segleft=1)
    data = bytes(IPv6(src="2001:db8::1", dst="2001:db8::20") / IPv6ExtHdrHopByHop() / srh
                 / IPv6ExtHdrDestOpt() / TCP(sport=1, dport=2) / b"srh")
    packet = parse_packet(data)
    assert [e.kind for e in packet.extension_headers()] == [0, 43, 60]
    assert packet.pseudo_dst == ipaddress.IPv6Address("2001:db8::30").packed  # Segment List[0]
    assert packet.verify_transport_checksum()


@pytest.mark.parametrize(("data", "reason"), [
    (bytes(IPv6(src="2001:db8::1", dst="2001:db8::2") / IPv6ExtHdrDestOpt()
           / IPv6ExtHdrHopByHop() / UDP()), "bad-extension-header"),
    (bytes(IPv6(src="2001:db8::1", dst="2001:db8::2") / IPv6ExtHdrFragment()
           / IPv6ExtHdrFragment() / UDP()), "bad-extension-header"),
    (bytes(IPv6(src="2001:db8::1", dst="2001:db8::2", plen=200) / UDP()), "truncated"),
    (bytes(IP(src="192.0.2.1", dst="198.51.100.2") / UDP(len=4)), "length-mismatch"),
    (bytes(IP(src="192.0.2.1", dst="198.51.100.2") / TCP(dataofs=4)), "bad-data-offset"),
    (b"\x20" + bytes(19), "bad-version"),
])
def test_parse_errors(data: bytes, reason: str) -> None:
    with pytest.raises(PacketError) as error:
        parse_packet(data)
    assert error.value.reason == reason


def test_esp_and_no_next_header_end_the_chain() -> None:
    for next_header in (50, 59):
        data = bytes(IPv6(src="2001:db8::1", dst="2001:db8::2")
                     / IPv6ExtHdrDestOpt(nh=next_header) / b"opaque!!")
        packet = parse_packet(data)
        assert packet.protocol == next_header and packet.transport_header() is None
        assert bytes(packet.payload) == b"opaque!!"


# -- build ---------------------------------------------------------------------------------------
def test_build_icmp_echo_both_versions() -> None:
    v4 = build_packet(IPv4Header(A4, B4, ttl=9), ICMPHeader.echo(ICMP_ECHO_REQUEST, 7, 1),
                      b"probe")
    assert v4 == bytes(IP(src="192.0.2.1", dst="198.51.100.2", ttl=9, id=0)
                       / ICMP(type=8, id=7, seq=1) / b"probe")
    v6 = parse_packet(build_packet(IPv6Header(A6, B6), ICMPHeader.echo(ICMPV6_ECHO_REQUEST, 7, 1),
                                   b"probe"))
    assert v6.protocol == 58 and v6.verify_transport_checksum()
    header = v6.transport_header()
    assert isinstance(header, ICMPHeader) and (header.identifier, header.sequence) == (7, 1)


def test_build_with_routing_header_uses_the_final_destination() -> None:
    packet = build_packet(
        IPv6Header(A6, ipaddress.IPv6Address("2001:db8::99").packed),
        UDPHeader(1000, 2000), b"routed",
        extension_headers=[ExtensionHeader.routing_addresses(0, 1, [B6])],
    )
    scapy = IPv6(src="2001:db8::1", dst="2001:db8::99") / IPv6ExtHdrRouting(
        addresses=["2001:db8::2"], segleft=1) / UDP(sport=1000, dport=2000) / b"routed"
    assert packet == bytes(scapy)


def test_build_refuses_extension_headers_on_ipv4() -> None:
    with pytest.raises(ValueError):
        build_packet(IPv4Header(A4, B4), UDPHeader(1, 2),
                     extension_headers=[ExtensionHeader.hop_by_hop([])])


def test_build_keeps_explicit_fields() -> None:
    data = build_packet(IPv4Header(A4, B4, checksum=0x1234, total_length=99), UDPHeader(1, 2,
                        length=77, checksum=0), b"x")
    assert data[10:12] == b"\x12\x34" and data[2:4] == (99).to_bytes(2, "big")
    assert data[24:28] == b"\x00\x4d\x00\x00"


# -- pcap ----------------------------------------------------------------------------------------
def test_pcap_is_read_by_scapy(tmp_path: Path) -> None:
    packets = [bytes(IP(src="192.0.2.1", dst="198.51.100.2") / UDP() / b"a"),
               bytes(IPv6(src="2001:db8::1", dst="2001:db8::2") / TCP())]
    data = encode_pcap(packets, timestamps=[1.5, 2.25])
    assert struct.unpack_from("<IHHiIII", data)[6] == LINKTYPE_RAW
    path = tmp_path / "two.pcap"
    path.write_bytes(data)
    read = rdpcap(str(path))
    assert [bytes(p) for p in read] == packets
    assert [float(p.time) for p in read] == [1.5, 2.25]


def test_pcap_timestamps_round_into_the_next_second() -> None:
    """Microseconds that round to 1000000 carry into the seconds; a negative timestamp is a
    ValueError, not struct.error."""
    data = encode_pcap([b"\x45" + bytes(19)] * 3, timestamps=[0.9999996, 1.9999999, 7.25])
    records = [struct.unpack_from("<II", data, 24 + i * 36) for i in range(3)]
    assert records == [(1, 0), (2, 0), (7, 250000)]
    for bad in (-1.0, -0.0000001, float("nan"), 2.0**32):
        with pytest.raises(ValueError, match="timestamp"):
            encode_pcap([b"\x45" + bytes(19)], timestamps=[bad])
