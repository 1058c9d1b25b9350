"""ICMP, ICMPv6 and neighbour discovery: builders checked byte for byte against scapy, the
quote accessor, rewriting a quote (against scapy's full recomputation), and fuzzing of every
parser (only PacketError; a refused buffer is left untouched)."""

import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import (
    ICMPv6DestUnreach,
    ICMPv6EchoReply,
    ICMPv6EchoRequest,
    ICMPv6ND_NA,
    ICMPv6ND_NS,
    ICMPv6NDOptDstLLAddr,
    ICMPv6NDOptSrcLLAddr,
    ICMPv6PacketTooBig,
    ICMPv6TimeExceeded,
    IPv6,
    IPv6ExtHdrDestOpt,
)
from scapy.packet import Raw, raw

from ipshift.packet import (
    PacketError,
    build_neighbour_advert,
    build_neighbour_solicit,
    destination_unreachable,
    echo_message,
    echo_reply,
    echo_request,
    error_allowed,
    icmp_error,
    neighbour_advert_packet,
    neighbour_solicit_packet,
    packet_too_big,
    parse_icmp,
    parse_neighbour_advert,
    parse_neighbour_message,
    parse_packet,
    port_unreachable,
    quoted_packet,
    rewrite_quoted,
    solicited_node,
    time_exceeded,
    verify_ipv4_header_checksum,
)
from ipshift.packet.icmp import (
    ICMP_ERROR_LIMIT,
    ICMP_HOST_UNREACHABLE,
    ICMPV6_ERROR_LIMIT,
    ICMPV6_NO_ROUTE,
    TIME_EXCEEDED_REASSEMBLY,
)
from ipshift.packet.nd import NA_FLAG_OVERRIDE, NA_FLAG_SOLICITED, ND_NEIGHBOR_SOLICIT

HOST, ROUTER, PEER, VIRTUAL = "192.0.2.1", "192.0.2.254", "198.51.100.1", "203.0.113.50"
HOST6, ROUTER6, PEER6, VIRTUAL6 = "2001:db8:1::1", "2001:db8:1::ff", "2001:db8:2::1", \
    "2001:db8:3::50"
MAC = b"\x02\x00\x00\x00\x00\x01"


def _udp(src, dst, sport=40000, dport=9, payload=b"hello"):
    ip = IP(src=src, dst=dst, id=7) if ":" not in src else IPv6(src=src, dst=dst)
    return raw(ip / UDP(sport=sport, dport=dport) / payload)


def _outer(src, dst):
    return IP(src=src, dst=dst, id=0) if ":" not in src else IPv6(src=src, dst=dst)


def _verify(error):
    """The outer checksums are right, and so is a quoted IPv4 header's."""
    packet = parse_packet(error)
    assert packet.verify_ip_checksum() and packet.verify_transport_checksum()
    quote = quoted_packet(error)
    if quote.version == 4:
        assert verify_ipv4_header_checksum(quote.header)


# --- echo --------------------------------------------------------------------------------------


def test_echo_packets_match_scapy():
    assert echo_request(HOST, PEER, 0x1234, 7, b"ping") == raw(
        IP(src=HOST, dst=PEER, id=0) / ICMP(type=8, id=0x1234, seq=7) / b"ping")
    assert echo_reply(PEER, HOST, 0x1234, 7, b"ping", hop_limit=9) == raw(
        IP(src=PEER, dst=HOST, id=0, ttl=9) / ICMP(type=0, id=0x1234, seq=7) / b"ping")
    assert echo_request(HOST6, PEER6, 1, 2, b"x") == raw(
        IPv6(src=HOST6, dst=PEER6) / ICMPv6EchoRequest(id=1, seq=2, data=b"x"))
    assert echo_reply(ipaddress.ip_address(PEER6).packed, HOST6, 1, 2) == raw(
        IPv6(src=PEER6, dst=HOST6) / ICMPv6EchoReply(id=1, seq=2))
    # without IP header, for sockets: ICMP with its checksum, ICMPv6 left to the kernel
    assert echo_message(4, 0x1234, 7, b"ping") == raw(ICMP(type=8, id=0x1234, seq=7) / b"ping")
    assert echo_message(6, 1, 2, b"x", reply=True) == raw(
        ICMPv6EchoReply(id=1, seq=2, data=b"x", cksum=0))
    message = parse_icmp(echo_request(HOST, PEER, 0x1234, 7))
    assert message.is_echo and not message.is_error and message.quoted is None
    assert (message.identifier, message.sequence) == (0x1234, 7)
    with pytest.raises(ValueError):
        echo_request(HOST, PEER6, 1, 1)


# --- errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize("v6", [False, True])
def test_errors_match_scapy(v6):
    src, dst, router = (HOST6, PEER6, ROUTER6) if v6 else (HOST, PEER, ROUTER)
    offending = _udp(src, dst)
    outer = _outer(router, src)
    if v6:
        cases = [
            (port_unreachable(offending, src=router), ICMPv6DestUnreach(code=4)),
            (destination_unreachable(offending, ICMPV6_NO_ROUTE, src=router),
             ICMPv6DestUnreach(code=0)),
            (packet_too_big(offending, 1400, src=router), ICMPv6PacketTooBig(mtu=1400)),
            (time_exceeded(offending, src=router), ICMPv6TimeExceeded(code=0)),
            (time_exceeded(offending, TIME_EXCEEDED_REASSEMBLY, src=router),
             ICMPv6TimeExceeded(code=1)),
        ]
    else:
        cases = [
            (port_unreachable(offending, src=router), ICMP(type=3, code=3)),
            (destination_unreachable(offending, ICMP_HOST_UNREACHABLE, src=router),
             ICMP(type=3, code=1)),
            (packet_too_big(offending, 1400, src=router), ICMP(type=3, code=4, nexthopmtu=1400)),
            (time_exceeded(offending, src=router), ICMP(type=11, code=0)),
        ]
    for ours, icmp in cases:
        assert ours == raw(outer / icmp / Raw(offending))
        _verify(ours)
    mtu = parse_icmp(cases[2][0]).mtu
    assert mtu == 1400
    # an explicit destination, and link padding after the offending packet is not quoted
    padded = offending + b"\0" * 6
    assert icmp_error(padded, 3 if not v6 else 1, 0, src=router, dst=dst) == raw(
        _outer(router, dst) / (ICMP(type=3, code=0) if not v6 else ICMPv6DestUnreach(code=0))
        / Raw(offending))


@pytest.mark.parametrize("v6", [False, True])
def test_errors_quote_up_to_the_minimum_mtu(v6):
    src, dst, router = (HOST6, PEER6, ROUTER6) if v6 else (HOST, PEER, ROUTER)
    big = _udp(src, dst, payload=bytes(1400))
    error = port_unreachable(big, src=router)
    limit = ICMPV6_ERROR_LIMIT if v6 else ICMP_ERROR_LIMIT
    assert len(error) == limit
    quote = quoted_packet(error)
    assert error[quote.offset:] == big[: limit - quote.offset]
    assert quote.total_length == len(big)  # what the quoted header says, not what is quoted
    _verify(error)
    small = _udp(src, dst)
    assert len(port_unreachable(small, src=router)) < limit


def test_quote_accessor():
    error = port_unreachable(_udp(HOST, PEER, 40000, 9), src=PEER)
    message = parse_icmp(error)
    assert message.is_error and message.mtu is None and message.pointer is None
    quote = message.quoted
    assert quote is not None
    assert (str(quote.src_ip), str(quote.dst_ip), quote.sport, quote.dport) == (
        HOST, PEER, 40000, 9)
    assert quote.protocol == 17 and quote.has_transport_header
    assert len(quote.header) == 20 and len(quote.transport) == 8
    assert quote.offset == 28 and quote.transport_offset == 48 and quote.end == len(error)
    # only 8 bytes of the upper layer quoted (RFC 792's minimum), a TCP packet
    offending = raw(IP(src=HOST, dst=PEER) / TCP(sport=5, dport=6))
    minimal = raw(IP(src=PEER, dst=HOST) / ICMP(type=3, code=3) / Raw(offending[:28]))
    quote = quoted_packet(minimal)
    assert (quote.sport, quote.dport, len(quote.transport)) == (5, 6, 8)
    # IPv6 with an extension header before UDP
    offending6 = raw(IPv6(src=HOST6, dst=PEER6) / IPv6ExtHdrDestOpt() / UDP(sport=1, dport=2))
    quote = quoted_packet(port_unreachable(offending6, src=PEER6))
    assert (quote.protocol, quote.sport, quote.dport) == (17, 1, 2)
    assert quote.transport_offset - quote.offset == 48
    # parameter problem pointer, quote without ports
    problem = raw(IP(src=PEER, dst=HOST) / ICMP(type=12, ptr=9) / Raw(offending[:22]))
    message = parse_icmp(problem)
    assert message.pointer == 9 and message.quoted is not None
    assert message.quoted.sport is None


def test_quote_errors():
    with pytest.raises(PacketError, match="not-an-error"):
        quoted_packet(echo_request(HOST, PEER, 1, 1))
    with pytest.raises(PacketError, match="not-icmp"):
        parse_icmp(_udp(HOST, PEER))
    v6_in_v4 = raw(IP(src=PEER, dst=HOST) / ICMP(type=3, code=3) / Raw(_udp(HOST6, PEER6)))
    with pytest.raises(PacketError, match="bad-quote"):
        parse_icmp(v6_in_v4)
    short = raw(IP(src=PEER, dst=HOST) / ICMP(type=3, code=3) / Raw(_udp(HOST, PEER)[:12]))
    with pytest.raises(PacketError, match="truncated"):
        parse_icmp(short)
    with pytest.raises(PacketError):
        port_unreachable(b"\x45" + bytes(10), src=PEER)


def test_error_allowed():
    assert error_allowed(_udp(HOST, PEER))
    assert error_allowed(echo_request(HOST, PEER, 1, 1))
    assert not error_allowed(port_unreachable(_udp(HOST, PEER), src=PEER))
    assert not error_allowed(port_unreachable(_udp(HOST6, PEER6), src=PEER6))
    assert not error_allowed(_udp(HOST, "224.0.0.9"))
    assert not error_allowed(_udp(HOST, "255.255.255.255"))
    assert not error_allowed(_udp("0.0.0.0", PEER))
    assert not error_allowed(raw(IP(src=HOST, dst=PEER, frag=100) / Raw(bytes(16))))
    assert not error_allowed(b"garbage")


# --- rewriting the quote -----------------------------------------------------------------------


@pytest.mark.parametrize("v6", [False, True])
def test_rewrite_quoted_destination_back_matches_scapy(v6):
    """A remap sent the host's packet to the peer's real address; the peer's error quotes
    that address; mapped back, the quote is what the host sent."""
    host, peer, virtual = (HOST6, PEER6, VIRTUAL6) if v6 else (HOST, PEER, VIRTUAL)
    icmp = ICMPv6DestUnreach(code=4) if v6 else ICMP(type=3, code=3)
    seen_by_peer = _udp(host, peer)
    error = bytearray(raw(_outer(virtual, host) / icmp / Raw(seen_by_peer)))
    sent_by_host = _udp(host, virtual)
    assert rewrite_quoted(error, dst=virtual)
    assert bytes(error) == raw(_outer(virtual, host) / icmp / Raw(sent_by_host))
    _verify(bytes(error))
    # nothing left to change
    assert not rewrite_quoted(error, dst=virtual)
    # ports too, and back again to the very same bytes
    before = bytes(error)
    assert rewrite_quoted(error, src=peer, sport=1111, dport=2222)
    assert bytes(error) == raw(_outer(virtual, host) / icmp
                               / Raw(_udp(peer, virtual, sport=1111, dport=2222)))
    assert rewrite_quoted(error, src=host, sport=40000, dport=9)
    assert bytes(error) == before


def test_rewrite_quoted_truncated_tcp_quote_keeps_checksums_valid():
    offending = raw(IP(src=HOST, dst=PEER) / TCP(sport=5, dport=6))
    error = bytearray(raw(IP(src=PEER, dst=HOST, id=0) / ICMP(type=3, code=4, nexthopmtu=1280)
                          / Raw(offending[:28])))
    assert rewrite_quoted(error, dst=VIRTUAL, dport=80)
    quote = quoted_packet(error)
    assert (str(quote.dst_ip), quote.dport) == (VIRTUAL, 80)
    _verify(bytes(error))
    assert parse_icmp(error).mtu == 1280


def test_rewrite_quoted_refusals_leave_the_buffer_alone():
    echo = bytearray(echo_request(HOST, PEER, 1, 1))
    with pytest.raises(PacketError, match="not-an-error"):
        rewrite_quoted(echo, dst=VIRTUAL)
    offending = raw(IP(src=HOST, dst=PEER) / ICMP(type=8))
    error = bytearray(port_unreachable(offending, src=PEER))
    copy = bytes(error)
    with pytest.raises(PacketError, match="no-ports"):
        rewrite_quoted(error, dst=VIRTUAL, dport=9)
    assert bytes(error) == copy
    with pytest.raises(ValueError):
        rewrite_quoted(error, dst=VIRTUAL6)
    assert rewrite_quoted(error, dst=VIRTUAL)  # addresses alone are fine
    offending6 = raw(IPv6(src=HOST6, dst=PEER6) / IPv6ExtHdrDestOpt() / UDP(sport=1, dport=2))
    error6 = bytearray(port_unreachable(offending6, src=PEER6))
    with pytest.raises(PacketError, match="no-ports"):
        rewrite_quoted(error6, dport=3)
    assert rewrite_quoted(error6, dst=VIRTUAL6)
    assert quoted_packet(error6).dst_ip == ipaddress.ip_address(VIRTUAL6)
    _verify(bytes(error6))


addresses4 = st.integers(1, 2**32 - 1).map(lambda n: ipaddress.IPv4Address(n).packed)
addresses6 = st.integers(1, 2**128 - 1).map(lambda n: ipaddress.IPv6Address(n).packed)
ports = st.integers(0, 0xFFFF)


@settings(max_examples=300, deadline=None)
@given(st.booleans(), st.data(), st.sampled_from(["udp", "tcp", "tcp8"]),
       st.binary(max_size=40), st.none() | ports, st.none() | ports)
def test_rewrite_quoted_property(v6, data, kind, payload, sport, dport):
    """Any rewrite gives valid checksums and the requested fields; undoing it restores every
    byte."""
    addrs = addresses6 if v6 else addresses4
    src, dst, new_src, new_dst, router = (data.draw(addrs) for _ in range(5))
    s, d = (str(ipaddress.ip_address(a)) for a in (src, dst))
    ip = IPv6(src=s, dst=d) if v6 else IP(src=s, dst=d, id=3)
    l4 = UDP(sport=1000, dport=2000) if kind == "udp" else TCP(sport=1000, dport=2000)
    offending = raw(ip / l4 / payload)
    if kind == "tcp8":
        offending = offending[: (40 if v6 else 20) + 8]
    rs = str(ipaddress.ip_address(router))
    error = bytearray(raw(_outer(rs, s) / (ICMPv6DestUnreach(code=4) if v6
                                           else ICMP(type=3, code=3)) / Raw(offending)))
    original = bytes(error)
    rewrite_quoted(error, src=new_src, dst=new_dst, sport=sport, dport=dport)
    _verify(bytes(error))
    quote = quoted_packet(error)
    assert (quote.src, quote.dst) == (new_src, new_dst)
    assert quote.sport == (1000 if sport is None else sport)
    assert quote.dport == (2000 if dport is None else dport)
    if kind == "udp":  # the whole datagram is quoted: its checksum must still be right
        assert parse_packet(bytes(error)[quote.offset:]).verify_transport_checksum()
    rewrite_quoted(error, src=src, dst=dst, sport=1000, dport=2000)
    assert bytes(error) == original


# --- neighbour discovery -----------------------------------------------------------------------


def test_neighbour_discovery_codec():
    gw = ipaddress.IPv6Address("2001:db8:1::1")
    assert str(solicited_node(gw)) == "ff02::1:ff00:1"
    ns = build_neighbour_solicit(gw, MAC)
    assert ns[0] == 135 and ns[8:24] == gw.packed and len(ns) == 32
    na = bytes([136, 0, 0, 0, 0x60, 0, 0, 0]) + gw.packed
    assert parse_neighbour_advert(na) == gw
    with pytest.raises(PacketError):
        parse_neighbour_advert(ns)


def test_neighbour_messages_match_scapy():
    target = ipaddress.IPv6Address("2001:db8:1::ff")
    src = ipaddress.IPv6Address("2001:db8:1::1")
    lladdr = "02:00:00:00:00:01"
    assert build_neighbour_solicit(target, MAC) == raw(
        ICMPv6ND_NS(tgt=str(target), cksum=0) / ICMPv6NDOptSrcLLAddr(lladdr=lladdr))
    assert build_neighbour_solicit(target, None) == raw(ICMPv6ND_NS(tgt=str(target), cksum=0))
    assert build_neighbour_advert(target, MAC) == raw(
        ICMPv6ND_NA(tgt=str(target), R=0, S=1, O=1, cksum=0)
        / ICMPv6NDOptDstLLAddr(lladdr=lladdr))
    assert build_neighbour_advert(target, router=True, solicited=False, override=False) == raw(
        ICMPv6ND_NA(tgt=str(target), R=1, S=0, O=0, cksum=0))
    assert neighbour_solicit_packet(src, target, MAC) == raw(
        IPv6(src=str(src), dst=str(solicited_node(target)), hlim=255)
        / ICMPv6ND_NS(tgt=str(target)) / ICMPv6NDOptSrcLLAddr(lladdr=lladdr))
    assert neighbour_solicit_packet(src, target, unicast=True) == raw(
        IPv6(src=str(src), dst=str(target), hlim=255) / ICMPv6ND_NS(tgt=str(target)))
    assert neighbour_advert_packet(target, src, target, MAC) == raw(
        IPv6(src=str(target), dst=str(src), hlim=255)
        / ICMPv6ND_NA(tgt=str(target), R=0, S=1, O=1) / ICMPv6NDOptDstLLAddr(lladdr=lladdr))
    with pytest.raises(ValueError):
        neighbour_solicit_packet(ipaddress.IPv6Address("::"), target, MAC)

    message = parse_neighbour_message(raw(
        ICMPv6ND_NA(tgt=str(target), R=1, S=1, O=0) / ICMPv6NDOptDstLLAddr(lladdr=lladdr)))
    assert message.target == target and message.link_address == MAC
    assert message.router and message.solicited and not message.override
    assert message.flags & (NA_FLAG_SOLICITED | NA_FLAG_OVERRIDE) == NA_FLAG_SOLICITED
    solicit = parse_neighbour_message(build_neighbour_solicit(target, MAC))
    assert solicit.type == ND_NEIGHBOR_SOLICIT and solicit.link_address == MAC
    assert solicit.flags == 0
    for bad in (ns_zero_option := build_neighbour_solicit(target, None) + b"\x01\x00" + bytes(6),
                build_neighbour_solicit(target, None) + b"\x01\x02" + bytes(6),
                echo_message(6, 1, 1, bytes(20))):
        with pytest.raises(PacketError):
            parse_neighbour_message(bad)
    assert ns_zero_option


# --- fuzzing -----------------------------------------------------------------------------------


def _corpus():
    v4 = _udp(HOST, PEER)
    v6 = _udp(HOST6, PEER6)
    tcp6 = raw(IPv6(src=HOST6, dst=PEER6) / IPv6ExtHdrDestOpt() / TCP())
    return [
        port_unreachable(v4, src=PEER), packet_too_big(v6, 1280, src=ROUTER6),
        time_exceeded(tcp6, src=ROUTER6), echo_request(HOST, PEER, 1, 2, b"abc"),
        port_unreachable(raw(IP(src=HOST, dst=PEER, options=b"\x01" * 4) / UDP()), src=PEER),
    ]


CORPUS = _corpus()


def _run_parsers(data):
    for parse in (parse_icmp, quoted_packet, parse_neighbour_message, parse_neighbour_advert):
        try:
            parse(data)
        except PacketError:
            pass
    error_allowed(data)
    buf = bytearray(data)
    try:
        rewrite_quoted(buf, dst=VIRTUAL6 if data[:1] >= b"\x60" else VIRTUAL, dport=7)
    except PacketError:
        assert bytes(buf) == data
    else:
        parse_icmp(buf)  # what it wrote still parses


@settings(max_examples=1000, deadline=None)
@given(st.binary(max_size=120))
def test_arbitrary_bytes_raise_only_packet_error(data):
    _run_parsers(data)


@settings(max_examples=1500, deadline=None)
@given(st.sampled_from(CORPUS), st.lists(st.tuples(st.integers(0, 2000), st.integers(0, 255)),
                                         max_size=4), st.integers(0, 2000))
def test_mutated_messages_raise_only_packet_error(packet, flips, cut):
    data = bytearray(packet)
    for at, value in flips:
        data[at % len(data)] = value
    _run_parsers(bytes(data[: max(1, cut % (len(data) + 1))]))
