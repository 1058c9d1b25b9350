"""The address-rewrite hook on the tunnel path: the partial-checksum rule for NEEDS_CSUM packets
(super-packets before segmentation, runs before merging), the full rule otherwise; checked by
completing the checksums as a forwarding hop would and recomputing them with scapy."""

from __future__ import annotations

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import ICMPv6DestUnreach, IPv6

from ipshift.packet import complete_partial_checksum, vnet
from ipshift.tunnel import Counters
from ipshift.tunnel.config import AddressMapping
from ipshift.tunnel.rewrite import AddressRewriter
from tests.unit.tunnel.test_support import (
    assert_checksums_valid,
    batch,
    complete,
    complete_write,
    decapsulate,
    gso_type_for,
    segments_of,
    super_packet,
)

OLD = {4: "203.0.113.1", 6: "2001:db8:ff::1"}
NEW = {4: "198.51.100.7", 6: "2001:db8:77::7"}
PEER = {4: "203.0.113.2", 6: "2001:db8:ff::2"}
PEER_NEW = {4: "192.0.2.77", 6: "2001:db8:ee::77"}


def rewriter(version: int) -> AddressRewriter:
    return AddressRewriter(src=[AddressMapping.parse(f"{OLD[version]}={NEW[version]}")])


def addresses(packet: bytes) -> tuple[str, str]:
    parsed = IP(packet) if packet[0] >> 4 == 4 else IPv6(packet)
    layer = parsed[IP] if packet[0] >> 4 == 4 else parsed[IPv6]
    return str(layer.src), str(layer.dst)


@pytest.mark.parametrize("version", [4, 6])
def test_outbound_super_packet_then_segments(version: int) -> None:
    counters = Counters()
    hooks = rewriter(version).hooks(counters)
    assert hooks.outbound is not None
    packet, start, offset = super_packet(version, 12 * 1000, flags="PA")
    assert hooks.outbound(packet, 0, True)
    for datagram in segments_of(packet, start, offset, 1000, gso_type_for(version)):
        inner = complete(datagram)
        assert_checksums_valid(inner)
        assert addresses(inner) == (NEW[version], PEER[version])
    assert counters.rewritten == 1


@pytest.mark.parametrize("version", [4, 6])
def test_inbound_run_is_rewritten_before_merging(version: int) -> None:
    counters = Counters()
    hooks = rewriter(version).hooks(counters)
    reply, start, offset = super_packet(version, 20 * 1000,
                                        addresses=(PEER[version], NEW[version]))
    datagrams = segments_of(reply, start, offset, 1000, gso_type_for(version))
    writes, _, _ = decapsulate([batch(datagrams[:12]), batch(datagrams[12:])], hooks.inbound)
    assert len(writes) == 1 and writes[0][0].gso != vnet.GSO_NONE
    merged = complete_write(*writes[0])
    assert_checksums_valid(merged)
    assert addresses(merged) == (PEER[version], OLD[version])
    # cut again as a forwarding hop would: every segment still right
    header, data = writes[0]
    for datagram in segments_of(bytearray(data), header.csum_start, header.csum_offset,
                                header.gso_size, header.gso_type):
        assert_checksums_valid(complete(datagram))


def test_full_checksums_get_the_full_rule() -> None:
    counters = Counters()
    hooks = rewriter(4).hooks(counters)
    assert hooks.outbound is not None and hooks.inbound is not None
    for packet in (
        IP(src=OLD[4], dst=PEER[4]) / UDP(sport=53, dport=53) / b"query",
        IP(src=OLD[4], dst=PEER[4]) / TCP(sport=1, dport=2, flags="S"),
        IP(src=OLD[4], dst=PEER[4]) / ICMP() / b"ping",
    ):
        buf = bytearray(bytes(packet))
        assert hooks.outbound(buf, 0, False)
        assert addresses(bytes(assert_checksums_valid(bytes(buf)))) == (NEW[4], PEER[4])
    # an ICMP error from the far side quotes the rewritten packet: both get mapped back
    quoted = IP(src=NEW[4], dst=PEER[4]) / UDP(sport=53, dport=53) / b"query"
    error = bytearray(bytes(IP(src=PEER[4], dst=NEW[4]) / ICMP(type=3, code=3) / bytes(quoted)))
    assert hooks.inbound(error, 0, False)
    parsed = assert_checksums_valid(bytes(error))
    assert parsed[IP].dst == OLD[4]
    assert counters.rewritten == 4


def test_other_flows_pass_untouched() -> None:
    counters = Counters()
    hooks = rewriter(4).hooks(counters)
    assert hooks.outbound is not None
    packet = bytes(IP(src="192.0.2.9", dst=PEER[4]) / UDP() / b"x")
    buf = bytearray(packet)
    assert hooks.outbound(buf, 0, False) and bytes(buf) == packet
    assert counters.rewritten == 0


def test_unparseable_packets_are_refused() -> None:
    counters = Counters()
    hooks = rewriter(4).hooks(counters)
    assert hooks.outbound is not None
    broken = bytearray(bytes(IP(src=OLD[4], dst=PEER[4]) / TCP() / b"x"))
    broken[2:4] = (4000).to_bytes(2, "big")  # total length beyond the buffer
    assert not hooks.outbound(broken, 0, True)


def test_no_rules_no_hooks() -> None:
    assert not AddressRewriter()
    assert AddressRewriter(dst=[AddressMapping.parse("192.0.2.1=192.0.2.2")])


def both_ways(version: int) -> AddressRewriter:
    """A source rule and a destination rule that one flow matches at once."""
    return AddressRewriter(src=[AddressMapping.parse(f"{OLD[version]}={NEW[version]}")],
                           dst=[AddressMapping.parse(f"{PEER[version]}={PEER_NEW[version]}")])


@pytest.mark.parametrize("partial", [False, True], ids=["full", "partial"])
@pytest.mark.parametrize("udp", [False, True], ids=["tcp", "udp"])
@pytest.mark.parametrize("version", [4, 6])
def test_source_and_destination_rules_both_apply(version: int, udp: bool, partial: bool) -> None:
    """A packet matching a --rewrite-src and a --rewrite-dst rule gets both rewrites, outbound
    and (reversed) inbound; scapy recomputes the checksums from scratch as the oracle."""
    counters = Counters()
    hooks = both_ways(version).hooks(counters)
    assert hooks.outbound is not None and hooks.inbound is not None
    for hook, before, after in (
        (hooks.outbound, (OLD[version], PEER[version]), (NEW[version], PEER_NEW[version])),
        (hooks.inbound, (PEER_NEW[version], NEW[version]), (PEER[version], OLD[version])),
    ):
        # A TUN packet with NEEDS_CSUM (the L4 field holds the pseudo-header sum), or a
        # complete one.
        packet, start, offset = super_packet(version, 300, udp=udp, addresses=before)
        if not partial:
            complete_partial_checksum(packet, start, offset)
            assert_checksums_valid(bytes(packet))
        assert hook(packet, 0, partial)
        if partial:
            complete_partial_checksum(packet, start, offset)
        assert addresses(bytes(assert_checksums_valid(bytes(packet)))) == after
    assert counters.rewritten == 2  # one per packet, however many rules


@pytest.mark.parametrize("version", [4, 6])
def test_icmp_error_quote_gets_both_rules_mapped_back(version: int) -> None:
    """The peer's ICMP error about a doubly rewritten packet: both rules map the outer
    addresses and the quote back."""
    hooks = both_ways(version).hooks(Counters())
    assert hooks.inbound is not None
    if version == 4:
        quoted = IP(src=NEW[4], dst=PEER_NEW[4]) / UDP(sport=53, dport=53) / b"query"
        error = IP(src=PEER_NEW[4], dst=NEW[4]) / ICMP(type=3, code=3) / bytes(quoted)
        want = IP(src=PEER[4], dst=OLD[4]) / ICMP(type=3, code=3) / bytes(
            IP(src=OLD[4], dst=PEER[4]) / UDP(sport=53, dport=53) / b"query")
    else:
        quoted6 = IPv6(src=NEW[6], dst=PEER_NEW[6]) / UDP(sport=53, dport=53) / b"query"
        error = IPv6(src=PEER_NEW[6], dst=NEW[6]) / ICMPv6DestUnreach() / bytes(quoted6)
        want = IPv6(src=PEER[6], dst=OLD[6]) / ICMPv6DestUnreach() / bytes(
            IPv6(src=OLD[6], dst=PEER[6]) / UDP(sport=53, dport=53) / b"query")
    buf = bytearray(bytes(error))
    assert hooks.inbound(buf, 0, False)
    assert bytes(buf) == bytes(want)  # scapy computes every checksum of `want` from scratch

