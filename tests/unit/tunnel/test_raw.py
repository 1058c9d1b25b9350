"""The raw link's socket-free parts: TUN packets and super-packets turned into complete IP
packets for IP-in-IP and GRE peers (checked against scapy's own checksums), the share filter's
arithmetic, the encapsulation overhead, and a link without local addresses."""

from __future__ import annotations

import ipaddress
import socket

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6

from ipshift.packet import vnet
from ipshift.packet.errors import PacketError
from ipshift.tunnel import gso
from ipshift.tunnel.config import Endpoint
from ipshift.tunnel.peers import Encapsulation, Peer
from ipshift.tunnel.raw import (
    PlainSegmenter,
    RawLink,
    RawSendError,
    overhead,
    share_filter,
)
from tests.unit.tunnel.test_support import (
    assert_checksums_valid,
    gso_type_for,
    payload_bytes,
    super_packet,
)

SLOW = settings(deadline=None, max_examples=60,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
OFFSET = vnet.HEADER_LEN  # where the forwarder reads packets into its buffer


def gre_peer(host: str = "192.0.2.20", key: int | None = None) -> Peer:
    return Peer("gre1", Endpoint(ipaddress.ip_address(host), 0), Encapsulation.GRE, gre_key=key)


def read_buffer(packet: bytes | bytearray) -> bytearray:
    """A TUN read buffer: room for the vnet header, then the packet, then spare room."""
    return bytearray(OFFSET) + bytearray(packet) + bytearray(64)


def packets_of(pieces: list[gso.Buffer]) -> list[bytes]:
    assert len(pieces) % 2 == 0
    return [bytes(pieces[at]) + bytes(pieces[at + 1]) for at in range(0, len(pieces), 2)]


def segment(
    packet: bytearray, csum_start: int, csum_offset: int, gso_size: int, gso_type: int,
    segmenter: PlainSegmenter | None = None,
) -> list[bytes]:
    buf = read_buffer(packet)
    return packets_of((segmenter or PlainSegmenter()).segment(
        buf, OFFSET, OFFSET + len(packet), vnet.F_NEEDS_CSUM, gso_type, gso_size, csum_start,
        csum_offset))


def check_super_packet(version: int, udp: bool, payload: int, mss: int, *, seq: int = 1000,
                       ident: int = 100, seed: int = 0) -> None:
    packet, start, offset = super_packet(version, payload, udp=udp, seq=seq, ident=ident,
                                         seed=seed)
    original = (IP if version == 4 else IPv6)(bytes(packet))
    data = payload_bytes(payload, seed)
    packets = segment(packet, start, offset, mss, gso_type_for(version, udp))
    assert len(packets) == -(-payload // mss)
    joined = b""
    for index, raw in enumerate(packets):
        parsed = assert_checksums_valid(raw)  # scapy recomputes every checksum from scratch
        if udp:
            piece = bytes(parsed[UDP].payload)
        else:
            piece = bytes(parsed[TCP].payload)
            assert parsed[TCP].seq == (original[TCP].seq + index * mss) & 0xFFFFFFFF
        assert piece == data[index * mss:(index + 1) * mss]
        joined += piece
    assert joined == data


@pytest.mark.parametrize("version", [4, 6])
@pytest.mark.parametrize("udp", [False, True])
def test_super_packet_becomes_complete_packets(version: int, udp: bool) -> None:
    check_super_packet(version, udp, 10_000, 1400)


@SLOW
@given(version=st.sampled_from([4, 6]), udp=st.booleans(),
       payload=st.integers(1, 20_000), mss=st.integers(200, 1460),
       seq=st.integers(0, 0xFFFFFFFF), ident=st.integers(0, 0xFFFF),
       seed=st.integers(0, 255))
def test_every_segment_checksum_is_scapys(version: int, udp: bool, payload: int, mss: int,
                                          seq: int, ident: int, seed: int) -> None:
    # Sequence wraps, ID wraps and checksum fields that fold to zero included.
    check_super_packet(version, udp, payload, mss, seq=seq, ident=ident, seed=seed)


def test_segmenter_reuses_its_header_areas_without_mixing_packets() -> None:
    segmenter = PlainSegmenter()
    first, start, offset = super_packet(4, 6000, seed=1)
    second, _, _ = super_packet(4, 6000, seed=2, seq=99)
    one = segment(first, start, offset, 1000, vnet.GSO_TCPV4, segmenter)
    two = segment(second, start, offset, 1000, vnet.GSO_TCPV4, segmenter)
    assert one != two
    assert one == segment(first, start, offset, 1000, vnet.GSO_TCPV4)
    for raw in two:
        assert_checksums_valid(raw)


@pytest.mark.parametrize("version", [4, 6])
def test_lone_packet_with_partial_checksum_is_completed_in_place(version: int) -> None:
    packet, start, offset = super_packet(version, 300, udp=True)
    buf = read_buffer(packet)
    pieces = PlainSegmenter().segment(buf, OFFSET, OFFSET + len(packet), vnet.F_NEEDS_CSUM,
                                      vnet.GSO_NONE, 0, start, offset)
    (raw,) = packets_of(pieces)
    assert_checksums_valid(raw)
    assert bytes(buf[OFFSET:OFFSET + len(packet)]) == raw  # completed in the read buffer


def test_super_packet_of_one_segment_is_sent_whole_and_completed() -> None:
    packet, start, offset = super_packet(6, 900)
    (raw,) = segment(packet, start, offset, 1400, vnet.GSO_TCPV6)
    assert_checksums_valid(raw)
    assert len(raw) == len(packet)


@pytest.mark.parametrize("flags", [0, vnet.F_DATA_VALID])
def test_packet_with_complete_checksum_goes_unchanged(flags: int) -> None:
    packet = bytes(IP(src="203.0.113.1", dst="203.0.113.2") / UDP(dport=53) / b"query")
    buf = read_buffer(packet)
    pieces = PlainSegmenter().segment(buf, OFFSET, OFFSET + len(packet), flags, vnet.GSO_NONE,
                                      0, 0, 0)
    assert packets_of(pieces) == [packet]


@pytest.mark.parametrize(("packet", "flags", "gso_type", "csum", "reason"), [
    (bytes(19), 0, vnet.GSO_NONE, (0, 0), "truncated"),
    (b"\x50" + bytes(39), 0, vnet.GSO_NONE, (0, 0), "bad-version"),
    # a checksum position inside the IP header, or past the packet's end
    (bytes(IPv6() / UDP()), vnet.F_NEEDS_CSUM, vnet.GSO_NONE, (20, 6), "vnet-csum"),
    (bytes(IP() / UDP()), vnet.F_NEEDS_CSUM, vnet.GSO_NONE, (20, 16), "vnet-csum"),
    # segmentation without a partial checksum, or of a packet that is not what it says
    (bytes(IP() / TCP() / bytes(3000)), 0, vnet.GSO_TCPV4, (20, 16), "vnet-gso"),
    (bytes(IP() / UDP() / bytes(3000)), vnet.F_NEEDS_CSUM, vnet.GSO_TCPV6, (20, 6), "vnet-gso"),
])
def test_packets_that_cannot_be_sent_raise_one_typed_error(
    packet: bytes, flags: int, gso_type: int, csum: tuple[int, int], reason: str
) -> None:
    buf = read_buffer(packet)
    with pytest.raises(PacketError) as info:
        PlainSegmenter().segment(buf, OFFSET, OFFSET + len(packet), flags, gso_type, 1000, *csum)
    assert info.value.reason == reason
    assert isinstance(info.value, RawSendError | gso.SegmentError)


@settings(max_examples=300, deadline=None)
@given(data=st.binary(min_size=0, max_size=3000), flags=st.integers(0, 3),
       gso_type=st.sampled_from([0, 1, 3, 4, 5, 0x81, 0x7F]), gso_size=st.integers(0, 2000),
       csum_start=st.integers(0, 3000), csum_offset=st.integers(0, 40))
def test_segmenter_fuzz_only_raises_packet_errors(data: bytes, flags: int, gso_type: int,
                                                  gso_size: int, csum_start: int,
                                                  csum_offset: int) -> None:
    buf = read_buffer(data)
    try:
        pieces = PlainSegmenter().segment(buf, OFFSET, OFFSET + len(data), flags, gso_type,
                                          gso_size, csum_start, csum_offset)
    except PacketError:
        return
    packets = packets_of(pieces)
    assert packets and all(len(p) >= 20 for p in packets)


# --- the share filter ------------------------------------------------------------------------
def run_classic_bpf(program: list[tuple[int, int, int, int]], source_word: int) -> int:
    """What the kernel does with the few instructions share_filter uses, for a packet whose
    loaded word is `source_word`."""
    accumulator = 0
    pc = 0
    for _ in range(len(program)):  # no loops in classic BPF: bounded by its length
        code, jt, jf, k = program[pc]
        pc += 1
        if code == 0x20:  # ld [k] (a word; here always the source address word)
            accumulator = source_word
        elif code == 0x94:  # mod #k
            accumulator %= k
        elif code == 0x15:  # jeq #k, jt, jf
            pc += jt if accumulator == k else jf
        elif code == 0x06:  # ret #k
            return k
        else:
            raise AssertionError(f"unexpected instruction {code:#x}")
    raise AssertionError("the program fell off its end")


@pytest.mark.parametrize("family", [socket.AF_INET, socket.AF_INET6])
@given(word=st.integers(0, 0xFFFFFFFF), count=st.integers(1, 16))
def test_share_filter_gives_each_sender_to_exactly_one_link(
    family: socket.AddressFamily, word: int, count: int
) -> None:
    keeping = [index for index in range(count)
               if run_classic_bpf(share_filter(family, index, count), word)]
    assert keeping == [word % count]


def test_share_filter_loads_the_source_address_relative_to_the_network_header() -> None:
    net_off = 0x100000  # SKF_NET_OFF: negative offsets count from the network header
    assert share_filter(socket.AF_INET, 0, 2)[0][3] == (-net_off + 12) & 0xFFFFFFFF
    assert share_filter(socket.AF_INET6, 0, 2)[0][3] == (-net_off + 8 + 12) & 0xFFFFFFFF


# --- overhead and a link without addresses -------------------------------------------------
def test_overhead_per_encapsulation() -> None:
    ipip4 = Peer("ipip1", Endpoint(ipaddress.ip_address("192.0.2.9"), 0), Encapsulation.IPIP)
    assert overhead(ipip4) == 20
    assert overhead(gre_peer()) == 24
    assert overhead(gre_peer("2001:db8::9", key=5)) == 48


def test_link_without_an_address_of_the_peers_family_counts_what_it_cannot_send() -> None:
    with RawLink([]) as link:
        assert link.fds() == []
        packet, start, offset = super_packet(4, 3000)
        buf = read_buffer(packet)
        sent = link.send(gre_peer(), buf, OFFSET, OFFSET + len(packet), vnet.F_NEEDS_CSUM,
                         vnet.GSO_TCPV4, 1000, start, offset)
        assert sent == 0 and link.send_errors == 3
        with pytest.raises(RawSendError):
            link.send(gre_peer(), bytearray(40), 0, 40, 0, vnet.GSO_NONE, 0, 0, 0)
        assert link.send_errors == 3


def test_link_refuses_what_is_not_its_own() -> None:
    udp_peer = Peer("udp1", Endpoint(ipaddress.ip_address("192.0.2.9"), 4789))
    with RawLink([]) as link:
        packet = bytearray(bytes(IP() / UDP()))
        with pytest.raises(ValueError, match="UDP framing"):
            link.send(udp_peer, packet, 0, len(packet), 0, vnet.GSO_NONE, 0, 0, 0)
        with pytest.raises(ValueError, match="not a socket of this raw link"):
            link.receive(0)
    with pytest.raises(ValueError, match="share"):
        RawLink([], share=(2, 2))
