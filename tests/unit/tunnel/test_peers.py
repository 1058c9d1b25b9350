"""The peer table: selection by inner destination, inbound checks, updates as new generations,
and the serialisation for worker processes. Packets are built with scapy, the independent
oracle; a brute-force model of the rules is the oracle for the property tests."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, replace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scapy.layers.inet import ICMP, IP, TCP, UDP, IPerror, TCPerror, UDPerror
from scapy.layers.inet6 import (
    ICMPv6DestUnreach,
    ICMPv6EchoRequest,
    IPerror6,
    IPv6,
    IPv6ExtHdrDestOpt,
    IPv6ExtHdrFragment,
)
from scapy.packet import Packet as ScapyPacket

from ipshift.tunnel.config import ConfigError, Endpoint, IPAddress, IPNetwork
from ipshift.tunnel.peers import (
    DropCounters,
    DropReason,
    Encapsulation,
    GenerationError,
    Peer,
    PeerCodecError,
    PeerTable,
    PortRange,
    TableDelta,
    decode_message,
    encode_delta,
    encode_table,
    endpoint_key,
    message_length,
)

ip = ipaddress.ip_address
net = ipaddress.ip_network
KEY = bytes(range(32))


def endpoint(address: str, port: int = 4789) -> Endpoint:
    return Endpoint(ip(address), port)


def peer(name: str, host: str = "192.0.2.1", port: int = 4789, **entries: object) -> Peer:
    return Peer(name, endpoint(host, port), **entries)  # type: ignore[arg-type]


def ranges(*texts: str) -> tuple[PortRange, ...]:
    return tuple(PortRange.parse(text) for text in texts)


# Peers of a small RSIP-like gateway: a site behind a prefix, a host with its own address, two
# clients sharing 203.0.113.5 by port ranges (and ICMP identifiers), an IPv6 site.
SITE = peer("site", "192.0.2.10", prefixes=(net("198.51.100.0/24"), net("198.51.0.0/16")))
HOST = peer("host", "192.0.2.11", addresses=(ip("198.51.100.7"),))
CLIENT1 = peer("client1", "192.0.2.12",
               port_ranges=ranges("203.0.113.5/tcp/1024-2047", "203.0.113.5/udp/1024-2047",
                                  "203.0.113.5/icmp/0-99"))
CLIENT2 = peer("client2", "192.0.2.13",
               port_ranges=ranges("203.0.113.5/tcp/2048-3071", "2001:db8:5::5/tcp/2048-3071"))
SITE6 = peer("site6", "2001:db8:ff::6", prefixes=(net("2001:db8:1::/48"), net("2001:db8::/32")),
             extra_sources=(net("192.0.2.128/25"),))
TABLE = PeerTable([SITE, HOST, CLIENT1, CLIENT2, SITE6])


def raw(packet: ScapyPacket) -> bytes:
    return bytes(packet)


def selected(table: PeerTable, packet: ScapyPacket) -> str | None:
    found = table.select(raw(packet))
    return None if found is None else found.name


# --- peers ------------------------------------------------------------------------------------
def test_port_range_text() -> None:
    entry = PortRange.parse("198.51.100.7/tcp/1024-2047")
    assert entry == PortRange(ip("198.51.100.7"), 6, 1024, 2047)
    assert str(entry) == "198.51.100.7/tcp/1024-2047"
    assert PortRange.parse("2001:db8::7/icmp/5") == PortRange(ip("2001:db8::7"), 58, 5, 5)
    assert PortRange.parse("192.0.2.1/ICMP/0-9").protocol == 1
    assert str(PortRange.parse("2001:db8::7/udp/53")) == "2001:db8::7/udp/53-53"


@pytest.mark.parametrize("text", [
    "198.51.100.7", "198.51.100.7/tcp", "198.51.100.7/gre/1-2", "host/tcp/1-2",
    "198.51.100.7/tcp/2-1", "198.51.100.7/tcp/1-70000", "198.51.100.7/tcp/x-2",
])
def test_bad_port_ranges(text: str) -> None:
    with pytest.raises(ConfigError):
        PortRange.parse(text)


def test_port_range_protocol_must_have_ports() -> None:
    with pytest.raises(ConfigError, match="no ports"):
        PortRange(ip("192.0.2.1"), 58, 0, 1)  # ICMPv6 identifiers on an IPv4 address
    with pytest.raises(ConfigError, match="no ports"):
        PortRange(ip("192.0.2.1"), 47, 0, 1)


@pytest.mark.parametrize(("entries", "message"), [
    ({"name": ""}, "peer name"),
    ({"name": "a b"}, "peer name"),
    ({"name": "-a"}, "peer name"),
    ({"name": "x" * 64}, "peer name"),
    ({"port": 0}, "port 1-65535"),
    ({"encapsulation": Encapsulation.IPIP}, "no port"),
    ({"encapsulation": "vxlan"}, "encapsulation"),
    ({"gre_key": 5}, "GRE key"),
    ({"key": b"short"}, "32 bytes"),
    ({"prefixes": (net("198.51.100.0/24"), net("198.51.100.0/24"))}, "twice"),
    ({"addresses": (ip("198.51.100.1"), ip("198.51.100.1"))}, "twice"),
    ({"prefixes": ("198.51.100.1/24",)}, "host bits"),
    ({"addresses": (ip("203.0.113.5"),), "port_ranges": ranges("203.0.113.5/tcp/1-2")},
     "both a whole address"),
    ({"port_ranges": ranges("203.0.113.5/tcp/1-20", "203.0.113.5/tcp/20-30")}, "overlap"),
])
def test_bad_peers(entries: dict[str, object], message: str) -> None:
    fields: dict[str, object] = {"name": "p", "port": 4789, **entries}
    with pytest.raises(ConfigError, match=message):
        peer(**fields)  # type: ignore[arg-type]


def test_peer_coerces_and_describes() -> None:
    made = Peer("gw", endpoint("192.0.2.1"), "udp", ["198.51.100.0/24"],  # type: ignore[arg-type]
                ["198.51.100.7"], [], ["2001:db8::/32"], key=KEY)  # type: ignore[arg-type]
    assert made.encapsulation is Encapsulation.UDP
    assert made.prefixes == (net("198.51.100.0/24"),) and made.addresses == (ip("198.51.100.7"),)
    assert made.extra_sources == (net("2001:db8::/32"),) and made.authenticated
    assert " key=" not in repr(made) and str(KEY) not in repr(made)
    described = made.as_dict()
    assert described["endpoint"] == "192.0.2.1:4789" and described["authenticated"] is True
    assert "key" not in described
    assert Peer.from_dict(described, key=KEY) == made
    assert Peer.from_dict(CLIENT2.as_dict()) == CLIENT2
    raw_peer = Peer("gre1", Endpoint(ip("2001:db8::20"), 0), Encapsulation.GRE, gre_key=9)
    assert raw_peer.as_dict()["endpoint"] == "2001:db8::20"
    assert Peer.from_dict(raw_peer.as_dict()) == raw_peer
    for broken in ({"endpoint": "192.0.2.1:1"}, {"name": "a", "endpoint": "192.0.2.1:1",
                                                  "prefixes": "198.51.100.0/24"},
                   {"name": "a", "endpoint": "192.0.2.1:1", "encapsulation": "x"},
                   {"name": "a", "endpoint": "192.0.2.1:1", "gre_key": "7"}):
        with pytest.raises(ConfigError):
            Peer.from_dict(broken)


def test_raw_peers() -> None:
    gre = Peer("gre1", Endpoint(ip("192.0.2.20"), 0), Encapsulation.GRE, gre_key=7)
    ipip = Peer("ipip1", Endpoint(ip("2001:db8::20"), 0), Encapsulation.IPIP)
    table = PeerTable([gre, ipip, SITE])
    assert table.peer_by_endpoint("192.0.2.20", 7, Encapsulation.GRE) is gre
    assert table.peer_by_endpoint("192.0.2.20", 0, Encapsulation.GRE) is None
    assert table.peer_by_endpoint("2001:db8::20", 0, Encapsulation.IPIP) is ipip
    assert table.peer_by_endpoint("192.0.2.10", 4789) is SITE
    assert table.udp_endpoints.get(("192.0.2.10", 4789)) is SITE
    assert table.peer_by_endpoint("192.0.2.10", 4790) is None
    # Two GRE peers behind one address, told apart by their keys.
    other = Peer("gre2", Endpoint(ip("192.0.2.20"), 0), Encapsulation.GRE, gre_key=8)
    assert table.add(other).peer_by_endpoint("192.0.2.20", 8, Encapsulation.GRE) is other
    assert endpoint_key(other) == ("192.0.2.20", 8)


def test_endpoint_text_is_what_the_socket_reports() -> None:
    six = peer("six", "2001:db8:0:0::0:1")
    assert endpoint_key(six) == ("2001:db8::1", 4789)
    assert PeerTable([six]).peer_by_endpoint("2001:db8::1", 4789) is six


# --- selection --------------------------------------------------------------------------------
@pytest.mark.parametrize(("packet", "expected"), [
    (IP(dst="198.51.100.7") / TCP(), "host"),  # exact beats the site's /24
    (IP(dst="198.51.100.8") / TCP(), "site"),  # /24
    (IP(dst="198.51.7.8") / UDP(), "site"),  # /16
    (IP(dst="203.0.113.5") / TCP(dport=1500), "client1"),
    (IP(dst="203.0.113.5") / UDP(dport=1024), "client1"),
    (IP(dst="203.0.113.5") / TCP(dport=2047), "client1"),
    (IP(dst="203.0.113.5") / TCP(dport=2048), "client2"),
    (IP(dst="203.0.113.5") / UDP(dport=2048), None),  # client2 has TCP only
    (IP(dst="203.0.113.5") / TCP(dport=80), None),  # no owner, no prefix to fall to
    (IP(dst="203.0.113.5") / ICMP(type=0, id=42), "client1"),  # echo reply to its identifier
    (IP(dst="203.0.113.5") / ICMP(type=8, id=100), None),
    (IP(dst="203.0.113.5", options=b"\x01\x01\x01\x01") / TCP(dport=2100), "client2"),
    (IPv6(dst="2001:db8:1::9") / UDP(), "site6"),
    (IPv6(dst="2001:db8:5::5") / TCP(dport=2500), "client2"),
    (IPv6(dst="2001:db8:5::5") / IPv6ExtHdrDestOpt() / TCP(dport=2500), "client2"),
    (IPv6(dst="2001:db8:5::5") / TCP(dport=99), "site6"),  # falls through to 2001:db8::/32
    (IPv6(dst="2001:db9::1") / UDP(), None),
    (IP(dst="192.0.2.200") / UDP(), None),
])
def test_select(packet: ScapyPacket, expected: str | None) -> None:
    assert selected(TABLE, packet) == expected


def test_select_in_a_buffer_with_offset_and_end() -> None:
    packet = raw(IP(dst="203.0.113.5") / TCP(dport=1500))
    buf = bytearray(b"\xee" * 10 + packet + b"\xee" * 100)
    found = TABLE.select(buf, 10, 10 + len(packet))
    assert found is CLIENT1
    assert TABLE.select(memoryview(buf), 10, 10 + len(packet)) is CLIENT1
    assert TABLE.select(buf, 10, 10 + 19) is None  # cut short


def test_fragments_carry_no_ports() -> None:
    with_site = TABLE.add(peer("catchall", "192.0.2.30", prefixes=(net("203.0.113.0/24"),)))
    first = IP(dst="203.0.113.5", flags="MF") / TCP(dport=1500)
    later = IP(dst="203.0.113.5", frag=10, proto=6) / (b"x" * 16)
    assert selected(with_site, first) == "client1"
    assert selected(with_site, later) == "catchall"  # no port: the prefix
    later6 = IPv6(dst="2001:db8:5::5") / IPv6ExtHdrFragment(offset=10, nh=6) / (b"y" * 16)
    assert selected(TABLE, later6) == "site6"


def test_icmp_errors_follow_the_quoted_flow() -> None:
    # A router tells client2 (203.0.113.5:2100 as source) that its packet was too big.
    error = IP(src="198.51.100.1", dst="203.0.113.5") / ICMP(type=3, code=4, nexthopmtu=1400) / (
        IPerror(src="203.0.113.5", dst="192.0.2.99") / TCPerror(sport=2100, dport=443))
    assert selected(TABLE, error) == "client2"
    error6 = IPv6(src="2001:db8:9::1", dst="2001:db8:5::5") / ICMPv6DestUnreach() / (
        IPerror6(src="2001:db8:5::5", dst="2001:db8:9::2") / TCPerror(sport=2100, dport=443))
    assert selected(TABLE, error6) == "client2"
    # An error about client1's ping (quoted ICMP echo request, its identifier).
    echo_error = IP(src="198.51.100.1", dst="203.0.113.5") / ICMP(type=11) / (
        IPerror(src="203.0.113.5", dst="192.0.2.99") / ICMP(type=8, id=7))
    assert selected(TABLE, echo_error) == "client1"
    # A quoted UDP packet on no range, and a truncated quote: nobody.
    unowned = IP(src="198.51.100.1", dst="203.0.113.5") / ICMP(type=3, code=3) / (
        IPerror(src="203.0.113.5", dst="192.0.2.99") / UDPerror(sport=9, dport=53))
    assert selected(TABLE, unowned) is None
    cut = raw(error)[:-10]
    assert TABLE.select(cut) is None


def test_drop_reasons() -> None:
    assert TABLE.drop_reason(b"") is DropReason.MALFORMED
    assert TABLE.drop_reason(raw(IP(dst="192.0.2.200"))[:19]) is DropReason.MALFORMED
    assert TABLE.drop_reason(raw(IPv6(dst="2001:db9::1"))[:39]) is DropReason.MALFORMED
    assert TABLE.drop_reason(b"\x50" + bytes(40)) is DropReason.MALFORMED
    assert TABLE.drop_reason(raw(IP(dst="192.0.2.200") / UDP())) is DropReason.NO_PEER
    for data in (b"", b"\x45", b"\x60" + bytes(30), b"\x50" + bytes(40)):
        assert TABLE.select(data) is None
        assert TABLE.inbound_verdict(SITE, data) is DropReason.MALFORMED
    counters = DropCounters()
    counters.count(DropReason.NO_PEER)
    counters.count(DropReason.FOREIGN_SOURCE, 3)
    assert counters.as_dict() == {"malformed": 0, "no_peer": 1, "unknown_endpoint": 0,
                                  "foreign_source": 3, "foreign_destination": 0}


# --- inbound ----------------------------------------------------------------------------------
def test_inbound_sources() -> None:
    def verdict(sender: Peer, packet: ScapyPacket) -> DropReason | None:
        return TABLE.inbound_verdict(sender, raw(packet))

    assert verdict(SITE, IP(src="198.51.100.9", dst="192.0.2.99") / TCP()) is None
    assert verdict(SITE, IP(src="198.51.100.7", dst="192.0.2.99") / TCP()) is (
        DropReason.FOREIGN_SOURCE)  # the host's address, not the site's
    assert verdict(HOST, IP(src="198.51.100.7", dst="192.0.2.99") / TCP()) is None
    assert verdict(CLIENT1, IP(src="203.0.113.5") / TCP(sport=1500)) is None
    assert verdict(CLIENT1, IP(src="203.0.113.5") / TCP(sport=2500)) is DropReason.FOREIGN_SOURCE
    assert verdict(CLIENT2, IP(src="203.0.113.5") / TCP(sport=2500)) is None
    assert verdict(CLIENT1, IP(src="203.0.113.5") / ICMP(type=8, id=5)) is None
    assert verdict(CLIENT2, IP(src="203.0.113.5") / ICMP(type=8, id=5)) is (
        DropReason.FOREIGN_SOURCE)
    assert verdict(CLIENT1, IP(src="198.51.100.200") / UDP()) is DropReason.FOREIGN_SOURCE
    # An error client2 sends about a packet it received on its port 2100 (quoted destination).
    error = IP(src="203.0.113.5", dst="192.0.2.99") / ICMP(type=3, code=3) / (
        IPerror(src="192.0.2.99", dst="203.0.113.5") / UDPerror(sport=53, dport=2100))
    assert verdict(CLIENT2, error) is DropReason.FOREIGN_SOURCE  # UDP: client2 has TCP only
    error = IP(src="203.0.113.5", dst="192.0.2.99") / ICMP(type=3, code=3) / (
        IPerror(src="192.0.2.99", dst="203.0.113.5") / UDPerror(sport=53, dport=1100))
    assert verdict(CLIENT1, error) is None
    # Extra sources: the IPv6 site may also send from 192.0.2.128/25.
    assert verdict(SITE6, IP(src="192.0.2.200") / UDP()) is None
    assert verdict(SITE6, IP(src="192.0.2.100") / UDP()) is DropReason.FOREIGN_SOURCE
    assert verdict(SITE6, IPv6(src="2001:db8:1::1") / UDP()) is None
    assert verdict(SITE6, IPv6(src="2001:db8:5::5") / TCP(sport=2100)) is (
        DropReason.FOREIGN_SOURCE)  # client2's
    assert TABLE.allowed(SITE6, raw(IPv6(src="2001:db8:1::1") / UDP()))


def test_reverse_path_is_strict() -> None:
    # The site owns 198.51.0.0/16, but 198.51.100.7 routes to the host: the site may not use it.
    assert not TABLE.allowed(SITE, raw(IP(src="198.51.100.7") / UDP()))
    # A peer object from an older snapshot of the same name is the same peer.
    assert TABLE.allowed(replace(SITE), raw(IP(src="198.51.3.3") / UDP()))


def test_local_destinations() -> None:
    table = PeerTable([SITE], local_destinations=[net("192.0.2.0/25"), net("2001:db8:aa::/48")])
    assert table.checks_inbound
    assert table.inbound_verdict(SITE, raw(IP(src="198.51.100.1", dst="192.0.2.5"))) is None
    assert table.inbound_verdict(SITE, raw(IP(src="198.51.100.1", dst="192.0.2.200"))) is (
        DropReason.FOREIGN_DESTINATION)
    assert table.inbound_verdict(SITE, raw(IPv6(src="2001:db8::1", dst="2001:db8:bb::1"))) is (
        DropReason.FOREIGN_DESTINATION)
    relaxed = table.with_local_destinations(None)
    assert relaxed.local_destinations is None
    assert relaxed.inbound_verdict(SITE, raw(IP(src="198.51.100.1", dst="192.0.2.200"))) is None


def test_one_peer() -> None:
    everything = peer("all", prefixes=(net("0.0.0.0/0"), net("::/0")))
    table = PeerTable([everything])
    assert table.only is everything and not table.checks_inbound
    assert PeerTable([SITE]).only is SITE and PeerTable([SITE]).checks_inbound
    assert TABLE.only is None and TABLE.checks_inbound
    assert PeerTable().only is None
    assert PeerTable([everything], local_destinations=[net("192.0.2.0/24")]).checks_inbound


# --- conflicts ----------------------------------------------------------------------------------
@pytest.mark.parametrize(("other", "message"), [
    (peer("x", "192.0.2.50", addresses=(ip("198.51.100.7"),)), "both own 198.51.100.7"),
    (peer("x", "192.0.2.50", prefixes=(net("198.51.100.0/24"),)), "both own 198.51.100.0/24"),
    (peer("x", "192.0.2.50", addresses=(ip("203.0.113.5"),)), "one way only"),
    (peer("x", "192.0.2.50", port_ranges=ranges("198.51.100.7/tcp/1-5")), "one way only"),
    (peer("x", "192.0.2.50", port_ranges=ranges("203.0.113.5/tcp/3000-3100")), "overlap"),
    (peer("x", "192.0.2.10"), "same endpoint"),
    (peer("site", "192.0.2.50"), "named"),
])
def test_conflicts(other: Peer, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        PeerTable([SITE, HOST, CLIENT1, CLIENT2, other])
    if other.name != "site":
        with pytest.raises(ConfigError, match=message):
            TABLE.add(other)


def test_a_failed_update_changes_nothing() -> None:
    before = encode_table(TABLE)
    with pytest.raises(ConfigError):
        TABLE.with_peers([peer("new", "192.0.2.60", prefixes=(net("10.0.0.0/8"),)),
                          peer("bad", "192.0.2.61", addresses=(ip("198.51.100.7"),))])
    assert encode_table(TABLE) == before
    assert "new" not in TABLE and TABLE.select(raw(IP(dst="10.1.1.1"))) is None


def test_updates_make_generations() -> None:
    assert TABLE.generation == 1
    moved = replace(HOST, addresses=(ip("198.51.100.8"),))
    second = TABLE.replace(moved)
    assert second.generation == 2 and second["host"] is moved
    assert selected(second, IP(dst="198.51.100.7") / TCP()) == "site"
    assert selected(second, IP(dst="198.51.100.8") / TCP()) == "host"
    # The old snapshot is untouched (a reader still holding it sees the old rules).
    assert selected(TABLE, IP(dst="198.51.100.7") / TCP()) == "host"
    assert selected(TABLE, IP(dst="198.51.100.8") / TCP()) == "site"
    assert second.slots["host"] == TABLE.slots["host"]
    third = second.remove("client1")
    assert third.generation == 3 and "client1" not in third and len(third) == 4
    assert selected(third, IP(dst="203.0.113.5") / TCP(dport=1500)) is None
    fourth = third.add(peer("client3", "192.0.2.14",
                            port_ranges=ranges("203.0.113.5/tcp/1024-2047")))
    assert fourth.slots["client3"] == TABLE.slots["client1"]  # the freed slot, reused
    assert selected(fourth, IP(dst="203.0.113.5") / TCP(dport=1500)) == "client3"
    # Swapping an address between two peers in one update.
    swapped = TABLE.with_peers([replace(HOST, addresses=()),
                                replace(SITE, addresses=(ip("198.51.100.7"),))])
    assert selected(swapped, IP(dst="198.51.100.7") / TCP()) == "site"
    with pytest.raises(ConfigError):
        TABLE.add(HOST)
    with pytest.raises(ConfigError):
        TABLE.replace(peer("nobody"))
    with pytest.raises(ConfigError):
        TABLE.remove("nobody")
    with pytest.raises(ConfigError):
        TABLE.with_peers([HOST], ["host"])
    with pytest.raises(ConfigError):
        TABLE.with_peers([HOST, HOST])


def test_deltas() -> None:
    later = TABLE.remove("host").add(peer("host2", "192.0.2.40", addresses=(ip("198.51.100.9"),)))
    delta = later.delta_since(TABLE)
    assert delta.base == 1 and delta.generation == 3
    assert delta.removals == ("host",)
    assert [p.name for _slot, p in delta.upserts] == ["host2"]
    applied = TABLE.apply(delta)
    assert applied.generation == 3 and dict(applied.slots) == dict(later.slots)
    assert dict(applied.peers) == dict(later.peers)
    with pytest.raises(GenerationError):
        later.apply(delta)
    one_step = TABLE.remove("host")
    assert one_step.delta_since(TABLE) == TableDelta(1, 2, (), ("host",))
    assert TABLE.delta_since(TABLE).upserts == ()
    with pytest.raises(ConfigError):
        TABLE.apply(TableDelta(1, 2, (), ("nobody",)))
    with pytest.raises(ConfigError, match="taken"):
        TABLE.apply(TableDelta(1, 2, ((TABLE.slots["site"], peer("x", "192.0.2.99")),)))
    with pytest.raises(ConfigError, match="twice"):
        TABLE.apply(TableDelta(1, 2, ((9, peer("x", "192.0.2.99")),
                                      (10, peer("x", "192.0.2.98")))))


# --- serialisation ----------------------------------------------------------------------------
def test_codec_round_trip() -> None:
    gre = Peer("gre1", Endpoint(ip("192.0.2.20"), 0), Encapsulation.GRE, gre_key=7, key=KEY)
    table = TABLE.add(gre).with_local_destinations([net("192.0.2.0/24"), net("2001:db8::/32")])
    data = encode_table(table)
    assert message_length(data[:8]) == len(data)
    copy = decode_message(data)
    assert isinstance(copy, PeerTable)
    assert copy.generation == table.generation
    assert dict(copy.peers) == dict(table.peers) and dict(copy.slots) == dict(table.slots)
    assert copy["gre1"].key == KEY
    assert copy.local_destinations == table.local_destinations
    assert encode_table(copy) == data
    delta = table.remove("host").with_local_destinations(None).delta_since(table)
    decoded = decode_message(encode_delta(delta))
    assert decoded == delta and decoded.local_changed and decoded.local_destinations is None
    empty = decode_message(encode_table(PeerTable()))
    assert isinstance(empty, PeerTable) and len(empty) == 0


def test_codec_refuses() -> None:
    data = encode_table(TABLE)
    for bad in (b"", data[:-1], data + b"x", b"XXXX" + data[4:], data[:8]):
        with pytest.raises(PeerCodecError):
            decode_message(bad)
    with pytest.raises(PeerCodecError):
        message_length(b"IPSP\x00\x00\x00\x01")
    with pytest.raises(PeerCodecError):
        message_length(b"nope")
    # Two peers claiming one address: a snapshot no table could have.
    twin = peer("twin", "192.0.2.70", addresses=(ip("198.51.100.7"),))
    delta = encode_delta(TableDelta(0, 5, ((0, HOST), (1, twin))))
    # The same bytes as a snapshot: kind (byte 9) 1, flags (byte 26) "local destinations
    # changed" as every snapshot has.
    forged = delta[:9] + bytes([1]) + delta[10:26] + bytes([1]) + delta[27:]
    with pytest.raises(PeerCodecError, match="conflict"):
        decode_message(forged)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_codec_fuzz(data: bytes) -> None:
    try:
        decode_message(data)
    except PeerCodecError:
        pass


MESSAGE = encode_table(TABLE.add(Peer("gre1", Endpoint(ip("192.0.2.20"), 0), Encapsulation.GRE,
                                      gre_key=7, key=KEY)))


@settings(max_examples=400, deadline=None)
@given(st.integers(0, len(MESSAGE) - 1), st.integers(0, 255), st.integers(0, len(MESSAGE)))
def test_codec_fuzz_mutations(at: int, value: int, cut: int) -> None:
    for data in (MESSAGE[:at] + bytes([value]) + MESSAGE[at + 1:], MESSAGE[:cut]):
        try:
            result = decode_message(data)
        except PeerCodecError:
            continue
        # What decodes is a table or delta that encodes back the same way.
        encoded = (encode_table(result) if isinstance(result, PeerTable)
                   else encode_delta(result))
        assert decode_message(encoded) is not None


# --- properties against a model of the rules --------------------------------------------------
V4_HOSTS = [0, 1, 2, 7, 64, 65, 128, 200, 255]
V4_PREFIXES = ["0.0.0.0/0", "198.51.0.0/16", "198.51.100.0/24", "198.51.100.0/25",
               "198.51.100.128/25", "198.51.100.64/26", "198.51.100.0/30", "198.51.100.64/31"]
V6_PREFIXES = ["::/0", "2001:db8::/32", "2001:db8:1::/48", "2001:db8:1::/64", "2001:db8:1::/126"]
SHARED = ["203.0.113.5", "203.0.113.6", "2001:db8:5::5"]
PROTOCOLS = {"tcp": 6, "udp": 17}


def _v4(host: int) -> IPAddress:
    return ip(f"198.51.100.{host}")


def _v6(host: int) -> IPAddress:
    return ip(f"2001:db8:1::{host:x}")


claim = st.one_of(
    st.tuples(st.just("prefix"), st.sampled_from(V4_PREFIXES + V6_PREFIXES)),
    st.tuples(st.just("address"), st.sampled_from([str(_v4(h)) for h in V4_HOSTS]
                                                  + [str(_v6(h)) for h in (1, 2, 3)])),
    st.tuples(st.just("ports"), st.tuples(st.sampled_from(SHARED), st.sampled_from(
        ["tcp", "udp", "icmp"]), st.integers(0, 40), st.integers(0, 12))),
    st.tuples(st.just("extra"), st.sampled_from(V4_PREFIXES + V6_PREFIXES)),
)


@dataclass
class Draft:
    prefixes: list[IPNetwork]
    addresses: list[IPAddress]
    ranges: list[PortRange]
    extra: list[IPNetwork]


def build_table(claims: list[tuple[int, tuple[str, object]]]) -> PeerTable:
    """Peers p0..p3 from claims, skipping any claim that conflicts with an earlier one."""
    drafts = [Draft([], [], [], []) for _ in range(4)]
    owned: set[object] = set()
    whole: set[IPAddress] = set()
    shared: dict[tuple[IPAddress, int], list[tuple[int, int]]] = {}
    for owner, (kind, value) in claims:
        draft = drafts[owner]
        if kind in ("prefix", "extra"):
            prefix = net(str(value))
            target = draft.prefixes if kind == "prefix" else draft.extra
            if (kind == "prefix" and prefix in owned) or prefix in target:
                continue
            if kind == "prefix":
                owned.add(prefix)
            target.append(prefix)
        elif kind == "address":
            address = ip(str(value))
            if address in whole or any(a == address for a, _p in shared):
                continue
            whole.add(address)
            draft.addresses.append(address)
        else:
            text, name, first, size = value  # type: ignore[misc]
            address = ip(text)
            protocol = (1 if address.version == 4 else 58) if name == "icmp" else PROTOCOLS[name]
            taken = shared.setdefault((address, protocol), [])
            if address in whole or any(first <= b and a <= first + size for a, b in taken):
                continue
            taken.append((first, first + size))
            draft.ranges.append(PortRange(address, protocol, first, first + size))
    return PeerTable(Peer(f"p{n}", endpoint(f"192.0.2.{n + 1}"), prefixes=tuple(d.prefixes),
                          addresses=tuple(d.addresses), port_ranges=tuple(d.ranges),
                          extra_sources=tuple(d.extra)) for n, d in enumerate(drafts))


def model_owner(
    table: PeerTable, address: IPAddress, protocol: int, port: int | None
) -> str | None:
    """The rules, by brute force: exact, then port ranges, then the longest prefix."""
    for candidate in table:
        if address in candidate.addresses:
            return candidate.name
    if port is not None:
        for candidate in table:
            for entry in candidate.port_ranges:
                if (entry.address == address and entry.protocol == protocol
                        and entry.first <= port <= entry.last):
                    return candidate.name
    best: tuple[int, str] | None = None
    for candidate in table:
        for prefix in candidate.prefixes:
            if address in prefix and (best is None or prefix.prefixlen > best[0]):
                best = (prefix.prefixlen, candidate.name)
    return None if best is None else best[1]


# Addresses of packets: the claimed ones and some outside them; the shared addresses more
# often, so that ports decide often.
ADDRESSES = (
    [str(_v4(h)) for h in (0, 1, 7, 64, 128, 200, 255)] + ["198.51.7.7", "192.0.2.77"]
    + ["203.0.113.5"] * 4 + ["203.0.113.6"] * 3,
    [str(_v6(h)) for h in (1, 2, 3, 0x100)] + ["2001:db8:9::1", "fe80::1"]
    + ["2001:db8:5::5"] * 4,
)
flow = st.tuples(st.sampled_from([4, 6]), st.integers(0, 20), st.integers(0, 20),
                 st.sampled_from(["tcp", "udp", "echo"]), st.integers(0, 45), st.integers(0, 45))


def build_packet(flow_: tuple[int, int, int, str, int, int]) -> tuple[ScapyPacket, int, int, int]:
    """(packet, protocol, source port, destination port): echo identifiers count as both."""
    version, src_at, dst_at, kind, sport, dport = flow_
    pool = ADDRESSES[0 if version == 4 else 1]
    src, dst = pool[src_at % len(pool)], pool[dst_at % len(pool)]
    header: ScapyPacket = IP(src=src, dst=dst) if version == 4 else IPv6(src=src, dst=dst)
    if kind == "tcp":
        return header / TCP(sport=sport, dport=dport), 6, sport, dport
    if kind == "udp":
        return header / UDP(sport=sport, dport=dport), 17, sport, dport
    echo = ICMP(type=8, id=sport) if version == 4 else ICMPv6EchoRequest(id=sport)
    return header / echo, 1 if version == 4 else 58, sport, sport


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(0, 3), claim), max_size=24),
       st.lists(flow, min_size=1, max_size=12))
def test_selection_matches_the_model(claims: list[tuple[int, tuple[str, object]]],
                                     flows: list[tuple[int, int, int, str, int, int]]) -> None:
    table = build_table(claims)
    for flow_ in flows:
        packet, protocol, sport, dport = build_packet(flow_)
        data = raw(packet)
        expected = model_owner(table, ip(packet.dst), protocol, dport)
        found = table.select(data)
        assert (found.name if found else None) == expected
        if found is None:
            assert table.drop_reason(data) is DropReason.NO_PEER
        source_owner = model_owner(table, ip(packet.src), protocol, sport)
        for sender in table:
            allowed = table.allowed(sender, data)
            in_extra = any(ip(packet.src) in prefix for prefix in sender.extra_sources)
            assert allowed == (source_owner == sender.name or in_extra)
            # Whatever the rest of the table: a source outside the peer's own entries is
            # never allowed.
            own = (ip(packet.src) in sender.addresses
                   or any(ip(packet.src) in p for p in sender.prefixes + sender.extra_sources)
                   or any(e.address == ip(packet.src) and e.protocol == protocol
                          and e.first <= sport <= e.last for e in sender.port_ranges))
            if not own:
                assert not allowed


operation = st.tuples(st.sampled_from(["add", "remove", "replace", "snapshot"]),
                      st.integers(0, 5), st.lists(st.tuples(st.integers(0, 3), claim),
                                                  max_size=4))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(operation, max_size=12), st.lists(flow, min_size=1, max_size=6))
def test_workers_follow_the_parent(ops: list[tuple[str, int, list[tuple[int, tuple[str, object]]]]],
                                   flows: list[tuple[int, int, int, str, int, int]]) -> None:
    """A worker fed the encoded deltas (or a snapshot now and then) has the parent's table,
    slots and selections at every generation."""
    parent = PeerTable()
    decoded = decode_message(encode_table(parent))
    assert isinstance(decoded, PeerTable)
    worker = decoded
    for kind, number, claims in ops:
        name = f"q{number}"
        candidate = build_table([(0, c) for _o, c in claims])["p0"]
        candidate = replace(candidate, name=name, endpoint=endpoint(f"192.0.2.{100 + number}"))
        before = parent
        try:
            if kind == "add" and name not in parent:
                parent = parent.add(candidate)
            elif kind == "remove" and name in parent:
                parent = parent.remove(name)
            elif kind == "replace" and name in parent:
                parent = parent.replace(candidate)
            elif kind == "snapshot":
                message = decode_message(encode_table(parent))
                assert isinstance(message, PeerTable)
                worker = message
                continue
            else:
                continue
        except ConfigError:
            assert parent is before
            continue
        delta = decode_message(encode_delta(parent.delta_since(before)))
        assert isinstance(delta, TableDelta)
        worker = worker.apply(delta)
        assert worker.generation == parent.generation
        assert dict(worker.peers) == dict(parent.peers)
        assert dict(worker.slots) == dict(parent.slots)
        assert len(set(parent.slots.values())) == len(parent)
        for flow_ in flows:
            data = raw(build_packet(flow_)[0])
            mine, theirs = worker.select(data), parent.select(data)
            assert (mine and mine.name) == (theirs and theirs.name)
