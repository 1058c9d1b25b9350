"""FlowRewrite and the hop-limit helpers, case by case, against scapy's full recomputation."""

from __future__ import annotations

import ipaddress

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP, IPOption_LSRR, IPOption_SSRR, fragment
from scapy.layers.inet6 import (
    HAO,
    ICMPv6DestUnreach,
    ICMPv6EchoRequest,
    ICMPv6PacketTooBig,
    IPv6,
    IPv6ExtHdrDestOpt,
    IPv6ExtHdrFragment,
    IPv6ExtHdrRouting,
)
from scapy.packet import Packet as ScapyPacket

from ipshift.packet import (
    FlowRewrite,
    PacketError,
    build_packet,
    complete_partial_checksum,
    decrement_hop_limit,
    internet_sum,
    parse_packet,
    pseudo_header_sum,
    set_hop_limit,
    transport_checksum,
)

OLD4, NEW4, PEER4, ROUTER4 = "192.0.2.1", "203.0.113.9", "198.51.100.2", "198.51.100.254"
OLD6, NEW6, PEER6, ROUTER6 = "2001:db8::1", "2001:db8:1::9", "2001:db8::2", "2001:db8::fe"


def fresh(packet: ScapyPacket) -> bytes:
    """scapy's bytes with every checksum computed from scratch."""
    return bytes(packet.__class__(bytes(packet)))


def rewritten(packet: ScapyPacket, rewrite: FlowRewrite, **kwargs: bool) -> bytes:
    buf = bytearray(bytes(packet))
    assert rewrite.apply(buf, **kwargs) is True
    return bytes(buf)


# -- addresses and ports ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "layer", [TCP(sport=40000, dport=443, flags="S"), UDP(sport=5353, dport=53), ICMP(type=8, id=7)]
)
def test_ipv4_source_rewrite(layer: ScapyPacket) -> None:
    before = IP(src=OLD4, dst=PEER4) / layer / b"payload"
    after = IP(src=NEW4, dst=PEER4) / layer / b"payload"
    assert rewritten(before, FlowRewrite.source(OLD4, NEW4)) == fresh(after)


@pytest.mark.parametrize("layer", [TCP(sport=40000, dport=443), UDP(sport=5353, dport=53),
                                   ICMPv6EchoRequest(id=7, data=b"ping")])
def test_ipv6_destination_rewrite(layer: ScapyPacket) -> None:
    before = IPv6(src=PEER6, dst=NEW6) / layer
    after = IPv6(src=PEER6, dst=OLD6) / layer
    assert rewritten(before, FlowRewrite.destination(NEW6, OLD6)) == fresh(after)


def test_addresses_and_ports_together_and_reverse() -> None:
    rewrite = FlowRewrite(src=(OLD4, NEW4), sport=(40000, 61000), dport=(53, 5353))
    before = IP(src=OLD4, dst=PEER4) / UDP(sport=40000, dport=53) / b"q"
    after = IP(src=NEW4, dst=PEER4) / UDP(sport=61000, dport=5353) / b"q"
    assert rewritten(before, rewrite) == fresh(after)
    reply = IP(src=PEER4, dst=NEW4) / UDP(sport=5353, dport=61000) / b"a"
    restored = IP(src=PEER4, dst=OLD4) / UDP(sport=53, dport=40000) / b"a"
    assert rewritten(reply, rewrite.reverse()) == fresh(restored)
    assert "sport 40000 -> 61000" in repr(rewrite)


def test_ports_only_rewrite_works_for_both_versions() -> None:
    rewrite = FlowRewrite(dport=(80, 8080))
    for ip in (IP(src=OLD4, dst=PEER4), IPv6(src=OLD6, dst=PEER6)):
        after = ip.copy()
        assert rewritten(ip / TCP(sport=1, dport=80), rewrite) == fresh(after / TCP(sport=1,
                                                                                     dport=8080))


def test_other_flows_are_left_untouched() -> None:
    rewrite = FlowRewrite(src=(OLD4, NEW4), dport=(53, 5353))
    for packet in (
        IP(src=PEER4, dst=OLD4) / UDP(sport=1, dport=53),  # another source
        IP(src=OLD4, dst=PEER4) / UDP(sport=1, dport=54),  # another port
        IPv6(src=OLD6, dst=PEER6) / UDP(sport=1, dport=53),  # another IP version
    ):
        data = bytearray(bytes(packet))
        assert rewrite.apply(data) is False
        assert data == bytes(packet)


def test_ipv4_udp_without_checksum_stays_without() -> None:
    before = IP(src=OLD4, dst=PEER4) / UDP(sport=1, dport=2, chksum=0) / b"no checksum"
    out = rewritten(before, FlowRewrite.source(OLD4, NEW4))
    assert out[26:28] == b"\0\0"
    assert out == bytes(IP(src=NEW4, dst=PEER4) / UDP(sport=1, dport=2, chksum=0)
                        / b"no checksum")


def _payload_for_sum_minus_zero(ip: ScapyPacket, layer: ScapyPacket, payload: bytes) -> bytes:
    """`payload` with its last two bytes chosen so that the upper layer sums to -0 before the
    checksum is complemented: a recomputation then gives 0 (TCP) or 0xFFFF (UDP)."""
    data = bytearray(bytes(ip / layer / (payload[:-2] + b"\0\0")))
    view = parse_packet(data)
    at = view.transport_offset + (16 if view.protocol == 6 else 6)
    data[at : at + 2] = b"\0\0"
    partial = internet_sum(view.segment, pseudo_header_sum(view.src, view.dst, view.protocol,
                                                           len(view.segment)))
    return payload[:-2] + (~partial & 0xFFFF).to_bytes(2, "big")


@pytest.mark.parametrize(("layer", "field", "value"), [
    (TCP(sport=1, dport=2), slice(36, 38), b"\0\0"),
    (UDP(sport=1, dport=2), slice(26, 28), b"\xff\xff"),
])
def test_rfc1624_boundary_where_the_new_checksum_is_zero(
    layer: ScapyPacket, field: slice, value: bytes
) -> None:
    """After the change the sum is -0: eqn. 3 gives 0x0000 like a recomputation (eqn. 2 of
    RFC 1141 would give 0xFFFF); UDP then sends 0xFFFF."""
    payload = _payload_for_sum_minus_zero(IP(src=NEW4, dst=PEER4), layer, b"abcdef")
    expected = fresh(IP(src=NEW4, dst=PEER4) / layer / payload)
    assert expected[field] == value
    before = IP(src=OLD4, dst=PEER4) / layer / payload
    assert rewritten(before, FlowRewrite.source(OLD4, NEW4)) == expected


def test_rfc1624_boundary_in_the_ipv4_header() -> None:
    """An IPv4 header whose new checksum is 0x0000 (the RFC 1624 section 4 situation)."""
    base = IP(src=NEW4, dst=PEER4, id=0) / UDP(sport=1, dport=2)
    header = bytearray(bytes(base)[:20])
    header[10:12] = b"\0\0"
    header[4:6] = b"\0\0"
    header[4:6] = (~internet_sum(header) & 0xFFFF).to_bytes(2, "big")  # identification
    after = IP(src=NEW4, dst=PEER4, id=int.from_bytes(header[4:6], "big")) / UDP(sport=1, dport=2)
    expected = fresh(after)
    assert expected[10:12] == b"\0\0"
    before = IP(src=OLD4, dst=PEER4, id=after.id) / UDP(sport=1, dport=2)
    assert rewritten(before, FlowRewrite.source(OLD4, NEW4)) == expected


# -- partial checksums ---------------------------------------------------------------------------
@pytest.mark.parametrize("ip", [IP(src=OLD4, dst=PEER4), IPv6(src=OLD6, dst=PEER6)])
@pytest.mark.parametrize("layer", [TCP(sport=40000, dport=443), UDP(sport=5353, dport=53)])
def test_partial_checksum_rule(ip: ScapyPacket, layer: ScapyPacket) -> None:
    new = NEW4 if ip.version == 4 else NEW6
    data = bytearray(bytes(ip / layer / b"some payload"))
    view = parse_packet(data)
    start = view.transport_offset
    offset = 16 if view.protocol == 6 else 6
    data[start + offset : start + offset + 2] = pseudo_header_sum(
        view.src, view.dst, view.protocol, len(view.segment)).to_bytes(2, "big")
    rewrite = FlowRewrite(src=(ip.src, new), sport=(layer.sport, 1234))
    assert rewrite.apply(data, partial_checksum=True)
    complete_partial_checksum(data, start, offset)
    after = ip.copy()
    after.src = new
    moved = layer.copy()
    moved.sport = 1234
    assert bytes(data) == fresh(after / moved / b"some payload")


# -- fragments, extension headers ------------------------------------------------------------------
def test_ipv4_fragments_rewrite_consistently() -> None:
    """The first fragment's checksum covers the whole datagram: after the rewrite, the
    reassembled datagram is scapy's recomputed one."""
    whole = IP(src=OLD4, dst=PEER4, id=99) / UDP(sport=1, dport=2) / (b"0123456789" * 30)
    rewrite = FlowRewrite.source(OLD4, NEW4)
    pieces = [bytearray(bytes(f)) for f in fragment(IP(bytes(whole)), fragsize=96)]
    assert len(pieces) > 2
    for piece in pieces:
        assert rewrite.apply(piece)
        assert parse_packet(piece).verify_ip_checksum()
    assert not parse_packet(pieces[1]).has_transport_header
    reassembled = bytes(pieces[0][20:]) + b"".join(bytes(p[20:]) for p in pieces[1:])
    moved = IP(src=NEW4, dst=PEER4, id=99) / UDP(sport=1, dport=2) / (b"0123456789" * 30)
    assert reassembled == fresh(moved)[20:]


def test_ipv6_later_fragment_gets_its_addresses_only() -> None:
    packet = IPv6(src=OLD6, dst=PEER6) / IPv6ExtHdrFragment(offset=10, id=5) / (b"z" * 40)
    out = rewritten(packet, FlowRewrite.source(OLD6, NEW6))
    assert out[48:] == bytes(packet)[48:]
    assert parse_packet(out).src_ip == ipaddress.ip_address(NEW6)


def test_routing_header_final_destination_keeps_the_upper_checksum() -> None:
    """With segments left, the pseudo-header uses the routing header's final destination:
    changing the header's destination must not change the TCP checksum."""
    route = IPv6ExtHdrRouting(addresses=["2001:db8::aa", PEER6], segleft=2)
    before = IPv6(src=OLD6, dst="2001:db8::bb") / route / TCP(sport=1, dport=2) / b"x"
    after = IPv6(src=OLD6, dst="2001:db8::cc") / route / TCP(sport=1, dport=2) / b"x"
    out = rewritten(before, FlowRewrite.destination("2001:db8::bb", "2001:db8::cc"))
    assert out == fresh(after)
    assert out[-23:-21] == bytes(before)[-23:-21]  # TCP checksum unchanged


def test_home_address_option_stands_in_for_the_source() -> None:
    option = IPv6ExtHdrDestOpt(options=[HAO(hoa="2001:db8::77")])
    before = IPv6(src=OLD6, dst=PEER6) / option / UDP(sport=1, dport=2) / b"mobile"
    after = IPv6(src=NEW6, dst=PEER6) / option / UDP(sport=1, dport=2) / b"mobile"
    view = parse_packet(bytes(before))
    assert view.pseudo_src == ipaddress.IPv6Address("2001:db8::77").packed
    assert view.verify_transport_checksum()
    assert rewritten(before, FlowRewrite.source(OLD6, NEW6)) == fresh(after)


@pytest.mark.parametrize("option", [IPOption_LSRR, IPOption_SSRR])
def test_ipv4_source_route_final_destination(option: type[ScapyPacket]) -> None:
    """The sender's pseudo-header holds the route's last address, not the next hop in the
    header: changing the header's destination keeps the UDP checksum (as scapy computes it)."""
    route = option(routers=["198.51.100.7", PEER4])
    before = IP(src=OLD4, dst="192.0.2.200", options=[route]) / UDP(sport=1, dport=2) / b"sr"
    view = parse_packet(bytes(before))
    assert view.pseudo_dst == ipaddress.IPv4Address(PEER4).packed
    assert view.verify_transport_checksum()
    after = IP(src=NEW4, dst="192.0.2.201", options=[route]) / UDP(sport=1, dport=2) / b"sr"
    rewrite = FlowRewrite(src=(OLD4, NEW4), dst=("192.0.2.200", "192.0.2.201"))
    assert rewritten(before, rewrite) == fresh(after)
    # build_packet follows the same rule.
    header, udp = view.ip_header(), view.transport_header()
    assert udp is not None
    udp.checksum = None
    assert build_packet(header, udp, view.payload) == bytes(before)
    # Once the route is used up (pointer past the end), the header's destination is final.
    done = bytearray(bytes(before))
    done[22] = 12  # pointer > length (11)
    assert parse_packet(done).pseudo_dst == parse_packet(done).dst


@pytest.mark.parametrize("protocol", [136, 33])  # UDP-Lite and DCCP carry pseudo-header sums too
def test_udplite_and_dccp_checksums_follow(protocol: int) -> None:
    segment = bytearray(b"\x13\x88\x00\x35\x00\x00\x00\x00" + b"\0" * 8 + b"datagram")
    src, dst = (ipaddress.ip_address(a).packed for a in (OLD4, PEER4))
    segment[6:8] = transport_checksum(src, dst, protocol, segment).to_bytes(2, "big")
    packet = bytearray(bytes(IP(src=OLD4, dst=PEER4, proto=protocol) / bytes(segment)))
    assert FlowRewrite(src=(OLD4, NEW4), sport=(5000, 6000)).apply(packet)
    view = parse_packet(packet)
    moved = bytearray(view.segment)
    assert moved[:2] == (6000).to_bytes(2, "big")
    wanted = moved[6:8]
    moved[6:8] = b"\0\0"
    assert transport_checksum(view.src, view.dst, protocol, moved).to_bytes(2, "big") == wanted


# -- ICMP errors -----------------------------------------------------------------------------------
def test_icmp_error_quoting_the_moved_address_is_mapped_back() -> None:
    """The mover sent from NEW (its outbound rewrite OLD -> NEW); a router answers to NEW
    quoting that packet; the inbound rewrite turns both the destination and the quote back."""
    inbound = FlowRewrite.destination(NEW4, OLD4)
    quoted = IP(src=NEW4, dst=PEER4, id=5) / UDP(sport=4000, dport=53) / b"query"
    error = IP(src=ROUTER4, dst=NEW4) / ICMP(type=3, code=4, nexthopmtu=1400) / quoted
    restored_quote = IP(src=OLD4, dst=PEER4, id=5) / UDP(sport=4000, dport=53) / b"query"
    want = IP(src=ROUTER4, dst=OLD4) / ICMP(type=3, code=4, nexthopmtu=1400) / restored_quote
    assert rewritten(error, inbound) == fresh(want)


def test_icmp_error_with_a_short_tcp_quote() -> None:
    """RFC 792 quotes 8 bytes of the upper layer: the TCP checksum is not in the quote."""
    quote = bytes(IP(src=NEW4, dst=PEER4) / TCP(sport=4000, dport=443))[:28]
    error = IP(src=ROUTER4, dst=NEW4) / ICMP(type=11) / quote
    out = rewritten(error, FlowRewrite.destination(NEW4, OLD4))
    view = parse_packet(out)
    assert view.verify_transport_checksum() and view.verify_ip_checksum()
    inner = IP(out[28:])
    assert inner.src == OLD4 and out[48:56] == quote[20:28]
    assert internet_sum(out[28:48]) == 0xFFFF  # the quoted header's checksum was updated


def test_icmpv6_error_quote_and_port_rewrite() -> None:
    inbound = FlowRewrite(dst=(NEW6, OLD6), dport=(61000, 40000))
    quoted = IPv6(src=NEW6, dst=PEER6) / TCP(sport=61000, dport=443) / b"request"
    error = IPv6(src=ROUTER6, dst=NEW6) / ICMPv6PacketTooBig(mtu=1280) / quoted
    restored = IPv6(src=OLD6, dst=PEER6) / TCP(sport=40000, dport=443) / b"request"
    want = IPv6(src=ROUTER6, dst=OLD6) / ICMPv6PacketTooBig(mtu=1280) / restored
    assert rewritten(error, inbound) == fresh(want)


def test_icmp_errors_can_be_left_alone() -> None:
    quoted = IPv6(src=NEW6, dst=PEER6) / UDP(sport=1, dport=2)
    error = IPv6(src=ROUTER6, dst=NEW6) / ICMPv6DestUnreach() / quoted
    out = rewritten(error, FlowRewrite(dst=(NEW6, OLD6), icmp_errors=False))
    assert out[48:] == bytes(error)[48:]
    assert parse_packet(out).verify_transport_checksum()


def test_icmp_error_about_another_flow_keeps_its_quote() -> None:
    quoted = IP(src=PEER4, dst=ROUTER4) / UDP(sport=1, dport=2)
    error = IP(src=ROUTER4, dst=NEW4) / ICMP(type=3, code=3) / quoted
    out = rewritten(error, FlowRewrite.destination(NEW4, OLD4))
    assert out[28:] == bytes(error)[28:]
    assert out == fresh(IP(src=ROUTER4, dst=OLD4) / ICMP(type=3, code=3) / quoted)


def test_icmp_error_quoting_other_ports_keeps_its_quote() -> None:
    """ICMP has no ports: the error matches by address, its quote by addresses and ports."""
    inbound = FlowRewrite(dst=(NEW4, OLD4), dport=(61000, 40000))
    mine = IP(src=NEW4, dst=PEER4) / UDP(sport=61000, dport=53) / b"q"
    other = IP(src=NEW4, dst=PEER4) / UDP(sport=12345, dport=53) / b"q"
    for quoted, rewritten_quote in ((mine, True), (other, False)):
        error = IP(src=ROUTER4, dst=NEW4) / ICMP(type=3, code=3) / quoted
        out = rewritten(error, inbound)
        assert (out[28:] != bytes(error)[28:]) is rewritten_quote
        assert parse_packet(out).verify_transport_checksum()
        assert (IP(out[28:])[UDP].sport == 40000) is rewritten_quote


# -- buffers and errors ----------------------------------------------------------------------------
def test_offset_and_memoryview_buffers() -> None:
    """Rewrite in place behind a 10-byte vnet header, through a memoryview."""
    packet = IP(src=OLD4, dst=PEER4) / TCP(sport=1, dport=2) / b"x"
    frame = bytearray(10) + bytes(packet)
    assert FlowRewrite.source(OLD4, NEW4).apply(memoryview(frame), 10)
    assert frame[:10] == bytes(10)
    assert bytes(frame[10:]) == fresh(IP(src=NEW4, dst=PEER4) / TCP(sport=1, dport=2) / b"x")


def test_malformed_packets_raise_and_stay_untouched() -> None:
    rewrite = FlowRewrite.source(OLD4, NEW4)
    good = bytes(IP(src=OLD4, dst=PEER4) / TCP(sport=1, dport=2))
    for broken, reason in (
        (good[:30], "truncated"),  # total length says 40
        (good[:2] + b"\x00\x26" + good[4:38], "truncated"),  # 18 bytes of TCP header
        (b"\x75" + good[1:], "bad-version"),
        (b"\x44" + good[1:], "bad-ihl"),
        (b"", "truncated"),
    ):
        buf = bytearray(broken)
        with pytest.raises(PacketError) as error:
            rewrite.apply(buf)
        assert error.value.reason == reason
        assert buf == broken


@pytest.mark.parametrize("size", [16, 17, 18, 19])
@pytest.mark.parametrize("rewrite", [FlowRewrite.source(OLD6, NEW6), FlowRewrite.destination(
    PEER6, NEW6), FlowRewrite(src=(OLD6, NEW6), sport=(1, 5))], ids=["src", "dst", "ports"])
def test_ipv6_short_tcp_header_is_refused_by_every_path(size: int, rewrite: FlowRewrite) -> None:
    """A TCP segment of 16-19 bytes: the address-only fast path refuses it as the careful path
    and parse_packet do (TCP needs 20 bytes), whatever the rule."""
    tcp = bytes(TCP(sport=1, dport=2))[:size]
    packet = bytes(IPv6(src=OLD6, dst=PEER6, nh=6) / tcp)
    with pytest.raises(PacketError) as parsed:
        parse_packet(packet)
    for partial in (False, True):
        buf = bytearray(packet)
        with pytest.raises(PacketError) as error:
            rewrite.apply(buf, 0, partial)
        assert error.value.reason == parsed.value.reason == "truncated"
        assert buf == packet


def test_constructor_checks() -> None:
    with pytest.raises(ValueError):
        FlowRewrite(src=(OLD4, NEW6))
    with pytest.raises(ValueError):
        FlowRewrite(sport=(1, 70000))
    with pytest.raises(ValueError):
        FlowRewrite(src=(b"\1\2\3", b"\1\2\3"))


# -- TTL / hop limit -----------------------------------------------------------------------------
def test_ttl_decrement_keeps_the_header_checksum() -> None:
    for ttl in (64, 1, 255):
        buf = bytearray(bytes(IP(src=OLD4, dst=PEER4, ttl=ttl) / UDP()))
        assert decrement_hop_limit(buf) == ttl - 1
        assert bytes(buf) == fresh(IP(src=OLD4, dst=PEER4, ttl=ttl - 1) / UDP())
    zero = bytearray(bytes(IP(src=OLD4, dst=PEER4, ttl=0) / UDP()))
    assert decrement_hop_limit(zero) == 0
    set_hop_limit(zero, 200)
    assert bytes(zero) == fresh(IP(src=OLD4, dst=PEER4, ttl=200) / UDP())


def test_hop_limit_ipv6() -> None:
    buf = bytearray(bytes(IPv6(src=OLD6, dst=PEER6, hlim=2) / UDP()))
    assert decrement_hop_limit(buf) == 1
    assert buf[7] == 1
    with pytest.raises(ValueError):
        set_hop_limit(buf, 256)
    with pytest.raises(PacketError):
        decrement_hop_limit(bytearray(b"\x60" + bytes(30)))
