"""Software segmentation (TUN super-packet -> per-packet datagrams) and coalescing (GRO batch ->
super-packet), checked against scapy: every datagram carries one complete, parseable packet
whose checksums are right once completed; sequence numbers, lengths and IDs continue; and what
the far end writes to TUN is the sender's super-packet again."""

from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6

from ipshift.packet import vnet
from ipshift.tunnel import gso, wire
from tests.unit.tunnel.test_support import (
    assert_checksums_valid,
    batch,
    complete,
    complete_write,
    decapsulate,
    encapsulate,
    gso_type_for,
    payload_bytes,
    segments_of,
    super_packet,
)

SLOW = settings(deadline=None, max_examples=120,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def check_segments(
    packet: bytearray, start: int, offset: int, mss: int, *, udp: bool = False
) -> list[bytes]:
    version = packet[0] >> 4
    datagrams = segments_of(packet, start, offset, mss, gso_type_for(version, udp))
    header_len = start + (8 if udp else (packet[start + 12] >> 4) * 4)
    payload = bytes(packet[header_len:])
    count = -(-len(payload) // mss)
    assert len(datagrams) == count
    # UDP_SEGMENT needs every datagram but the last the same size
    assert {len(d) for d in datagrams[:-1]} <= {4 + header_len + mss}
    assert len(datagrams[-1]) <= 4 + header_len + mss
    original = assert_checksums_valid(complete(bytes(wire.encode_header(
        wire.FLAG_PARTIAL, start, offset)) + bytes(packet)))
    joined = b""
    for index, datagram in enumerate(datagrams):
        tunnel, _ = wire.decode(datagram)  # one complete inner packet, lengths consistent
        assert tunnel.partial and (tunnel.csum_start, tunnel.csum_offset) == (start, offset)
        inner = complete(datagram)
        parsed = assert_checksums_valid(inner)
        piece = payload[index * mss:(index + 1) * mss]
        if version == 4:
            assert parsed[IP].id == (original[IP].id + index) & 0xFFFF
            assert parsed[IP].len == header_len + len(piece)
            for field in ("src", "dst", "tos", "ttl", "flags"):
                assert getattr(parsed[IP], field) == getattr(original[IP], field)
        else:
            assert parsed[IPv6].plen == header_len - 40 + len(piece)
            for field in ("src", "dst", "tc", "fl", "hlim"):
                assert getattr(parsed[IPv6], field) == getattr(original[IPv6], field)
        if udp:
            assert parsed[UDP].len == 8 + len(piece)
            data = bytes(parsed[UDP].payload)
        else:
            tcp = parsed[TCP]
            assert tcp.seq == (original[TCP].seq + index * mss) & 0xFFFFFFFF
            assert tcp.ack == original[TCP].ack and tcp.window == original[TCP].window
            assert tcp.options == original[TCP].options
            flags = int(original[TCP].flags)
            want = flags & ~0x80 if index else flags  # CWR on the first segment only
            if index < count - 1:
                want &= ~0x09  # FIN and PSH on the last only
            assert int(tcp.flags) == want
            data = bytes(tcp.payload)
        assert data == piece
        joined += data
    assert joined == payload
    return datagrams


@pytest.mark.parametrize("version", [4, 6])
def test_tcp_super_packet_is_cut_like_the_kernel_does(version: int) -> None:
    packet, start, offset = super_packet(version, 46 * 1416 - 100, flags="PA")
    check_segments(packet, start, offset, 1416)


@pytest.mark.parametrize("version", [4, 6])
def test_cwr_first_fin_last(version: int) -> None:
    packet, start, offset = super_packet(version, 5000, flags="FPAC")
    check_segments(packet, start, offset, 1400)


@pytest.mark.parametrize("version", [4, 6])
def test_udp_super_packet(version: int) -> None:
    packet, start, offset = super_packet(version, 7000, udp=True)
    check_segments(packet, start, offset, 1000, udp=True)


def test_ipv4_id_wraps_and_checksum_carries() -> None:
    # IDs wrap inside the batch; every starting ID also walks the header sum across the
    # end-around carry for one of these.
    for ident in (0xFFFE, 0xFFF0, 0, 1, 0x8000, 0x1234, 0xFEDC, 0xBEEF):
        packet, start, offset = super_packet(4, 30 * 1200, ident=ident)
        check_segments(packet, start, offset, 1200)


def test_every_header_checksum_carry_position() -> None:
    # Sweep the ID so the per-segment header sums cross 0xFFFF at every possible segment.
    for ident in range(0x9000, 0x9000 + 600, 7):
        packet, start, offset = super_packet(4, 20 * 100, ident=ident, tos=0x10, ttl=3)
        check_segments(packet, start, offset, 100)


def test_sequence_number_wraps() -> None:
    packet, start, offset = super_packet(4, 10 * 1000, seq=0xFFFFFFFF - 2500)
    check_segments(packet, start, offset, 1000)


@SLOW
@given(
    version=st.sampled_from([4, 6]),
    udp=st.booleans(),
    mss=st.integers(64, 1500),
    payload=st.integers(1, 20_000),
    seq=st.integers(0, 2**32 - 1),
    ident=st.integers(0, 0xFFFF),
    flags=st.sampled_from(["A", "PA", "FA", "FPA", "AC", "PAE"]),
    options=st.sampled_from([[], None, [("MSS", 1400), ("NOP", None), ("NOP", None)]]),
)
# A segment whose completed TCP checksum is zero: stored as 0xFFFF, as Linux does.
@example(version=6, udp=False, mss=234, payload=1170, seq=575285, ident=0, flags="A", options=[])
def test_segmentation_property(
    version: int, udp: bool, mss: int, payload: int, seq: int, ident: int, flags: str,
    options: list[tuple[str, object]] | None,
) -> None:
    packet, start, offset = super_packet(version, payload, udp=udp, seq=seq, ident=ident,
                                         flags=flags, options=options)
    check_segments(packet, start, offset, mss, udp=udp)


def test_plain_and_verified_packets_pass_as_they_are() -> None:
    raw = bytes(IP(src="203.0.113.1", dst="203.0.113.2") / UDP(sport=1, dport=2) / b"hi")
    (datagram,) = encapsulate(raw, 0, vnet.GSO_NONE, 0, 0, 0)
    assert datagram == wire.PLAIN_HEADER + raw
    (datagram,) = encapsulate(raw, vnet.F_DATA_VALID, vnet.GSO_NONE, 0, 0, 0)
    assert datagram == wire.VERIFIED_HEADER + raw
    writes, accepted, malformed = decapsulate([batch([datagram])])
    assert (accepted, malformed) == (1, 0)
    assert writes == [(vnet.VnetHeader(flags=vnet.F_DATA_VALID), raw)]


def test_super_packet_that_fits_one_segment_is_sent_whole() -> None:
    packet, start, offset = super_packet(4, 900)
    (datagram,) = segments_of(packet, start, offset, 1000, vnet.GSO_TCPV4)
    assert datagram[4:] == packet


@pytest.mark.parametrize(
    ("flags", "gso_type", "size", "start", "offset", "reason"),
    [
        (0, vnet.GSO_TCPV4, 1000, 0, 0, "vnet-gso"),  # segmentation without a partial csum
        (vnet.F_NEEDS_CSUM, vnet.GSO_TCPV4, 0, 20, 16, "vnet-gso"),  # gso_size 0
        (vnet.F_NEEDS_CSUM, vnet.GSO_TCPV6, 1000, 20, 16, "vnet-gso"),  # v6 type for a v4 packet
        (vnet.F_NEEDS_CSUM, vnet.GSO_UDP_L4, 1000, 20, 16, "vnet-gso"),  # UDP type, TCP offset
        (vnet.F_NEEDS_CSUM, vnet.GSO_TCPV4, 1000, 20, 6, "vnet-gso"),  # TCP type, UDP offset
        (vnet.F_NEEDS_CSUM, vnet.GSO_TCPV4, 1000, 24, 16, "vnet-gso"),  # L4 not after the IHL
        (vnet.F_NEEDS_CSUM, vnet.GSO_TCPV4, 1000, 9000, 16, "vnet-csum"),  # outside the packet
        (vnet.F_NEEDS_CSUM, vnet.GSO_TCPV4, 1, 20, 16, "vnet-gso"),  # thousands of segments
        (vnet.F_NEEDS_CSUM, 0x42, 1000, 20, 16, "vnet-gso"),  # unknown type
    ],
)
def test_inconsistent_vnet_headers_raise_segment_error(
    flags: int, gso_type: int, size: int, start: int, offset: int, reason: str
) -> None:
    packet, _, _ = super_packet(4, 3000)
    with pytest.raises(gso.SegmentError) as info:
        encapsulate(packet, flags, gso_type, size, start, offset)
    assert info.value.reason == reason


def test_truncated_packet_raises() -> None:
    with pytest.raises(gso.SegmentError):
        encapsulate(b"\x45" + bytes(10), 0, vnet.GSO_NONE, 0, 0, 0)


# --- receive side ------------------------------------------------------------------------------
def roundtrip(packet: bytearray, start: int, offset: int, mss: int, version: int,
              per_send: int | None = None) -> list[tuple[vnet.VnetHeader, bytes]]:
    datagrams = segments_of(packet, start, offset, mss, gso_type_for(version))
    # at most what one UDP_SEGMENT send (and so one GRO receive) can carry
    per_send = min(per_send or len(datagrams), 65507 // len(datagrams[0]))
    sends = [datagrams[i:i + per_send] for i in range(0, len(datagrams), per_send)]
    writes, accepted, malformed = decapsulate([batch(s) for s in sends])
    assert (accepted, malformed) == (len(datagrams), 0)
    return writes


@pytest.mark.parametrize("version", [4, 6])
def test_one_batch_becomes_the_original_super_packet(version: int) -> None:
    packet, start, offset = super_packet(version, 43 * 1416 - 7, flags="PA")
    (write,) = roundtrip(packet, start, offset, 1416, version)
    header, merged = write
    assert merged == packet  # headers, lengths, ID, flags and partial checksum all as sent
    assert header == vnet.VnetHeader(
        vnet.F_NEEDS_CSUM, gso_type_for(version), start + 32, 1416, start, 16
    )


@pytest.mark.parametrize("version", [4, 6])
def test_two_sends_are_joined_again(version: int) -> None:
    # A 64 KB super-packet needs two UDP_SEGMENT sends; the receiver joins the two batches.
    packet, start, offset = super_packet(version, 46 * 1416, flags="PA")
    (write,) = roundtrip(packet, start, offset, 1416, version, per_send=44)
    assert write[1] == packet


def test_every_full_size_ending_is_joined_across_batches() -> None:
    packet, start, offset = super_packet(4, 20 * 500)  # no PSH: the run stays open
    for per_send in (1, 2, 3, 7, 19):
        writes = roundtrip(packet, start, offset, 500, 4, per_send=per_send)
        # runs join at most two batches; together they still carry the stream in order
        assert b"".join(w[1][52:] for w in writes) == packet[52:]
        for header, merged in writes:
            assert_checksums_valid(complete_write(header, merged))


@SLOW
@given(
    version=st.sampled_from([4, 6]),
    mss=st.integers(200, 1500),
    payload=st.integers(1, 60_000),
    seq=st.integers(0, 2**32 - 1),
    ident=st.integers(0, 0xFFFF),
    flags=st.sampled_from(["A", "PA"]),
    per_send=st.integers(1, 64),
)
def test_coalescing_property(
    version: int, mss: int, payload: int, seq: int, ident: int, flags: str, per_send: int
) -> None:
    packet, start, offset = super_packet(version, payload, seq=seq, ident=ident, flags=flags)
    if -(-payload // mss) > 1000:
        return
    writes = roundtrip(packet, start, offset, mss, version, per_send=per_send)
    header_len = start + 32
    stream = b"".join(w[1][header_len:] for w in writes)
    assert stream == packet[header_len:]
    next_seq = seq
    for header, merged in writes:
        parsed = assert_checksums_valid(complete_write(header, merged))
        assert parsed[TCP].seq == next_seq
        next_seq = (next_seq + len(bytes(parsed[TCP].payload))) & 0xFFFFFFFF
        if header.gso != vnet.GSO_NONE:
            # what the kernel would do with it: cut it again -> the same segments we received
            again = segments_of(bytearray(merged), header.csum_start, header.csum_offset,
                                header.gso_size, header.gso_type)
            for datagram in again:
                assert_checksums_valid(complete(datagram))
    if len(writes) == 1 and -(-payload // mss) <= per_send:
        assert writes[0][1] == packet


def test_segments_of_different_flows_are_not_merged() -> None:
    a, start, offset = super_packet(4, 5 * 1000, sport=1111, seed=1)
    b, _, _ = super_packet(4, 5 * 1000, sport=2222, seed=2)
    da = segments_of(a, start, offset, 1000, vnet.GSO_TCPV4)
    db = segments_of(b, start, offset, 1000, vnet.GSO_TCPV4)
    mixed = [d for pair in zip(da, db, strict=True) for d in pair]
    writes, accepted, _ = decapsulate([batch(mixed)])
    assert accepted == 10 and len(writes) == 10
    for header, merged in writes:
        assert header.gso == vnet.GSO_NONE
        assert_checksums_valid(complete_write(header, merged))


@pytest.mark.parametrize("version", [4, 6])
@pytest.mark.parametrize(
    "change",
    ["seq-gap", "ack", "window", "options", "ttl", "tos", "psh-in-middle", "syn", "ports"],
)
def test_what_breaks_a_run(version: int, change: str) -> None:
    packet, start, offset = super_packet(version, 8 * 1000)
    datagrams = [bytearray(d) for d in segments_of(packet, start, offset, 1000,
                                                    gso_type_for(version))]
    victim = datagrams[4]
    tcp = 4 + start
    ip = 4
    if change == "seq-gap":
        for d in datagrams[4:]:
            seq = struct.unpack_from(">I", d, tcp + 4)[0]
            struct.pack_into(">I", d, tcp + 4, seq + 1)
    elif change == "ack":
        victim[tcp + 8] ^= 1
    elif change == "window":
        victim[tcp + 15] ^= 1
    elif change == "options":
        victim[tcp + 30] ^= 1
    elif change == "ttl":
        victim[ip + (8 if version == 4 else 7)] -= 1
    elif change == "tos":
        victim[ip + 1] ^= 0x04
    elif change == "psh-in-middle":
        datagrams[3][tcp + 13] |= 0x08
    elif change == "syn":
        victim[tcp + 13] |= 0x02
    elif change == "ports":
        victim[tcp] ^= 1
    writes, accepted, malformed = decapsulate([batch([bytes(d) for d in datagrams])])
    assert (accepted, malformed) == (8, 0)
    assert len(writes) >= 2
    # whatever was merged is exactly a run of the input, in order
    total = sum(len(w[1]) - (start + 32) for w in writes)
    assert total == 8 * 1000


def test_non_tcp_and_complete_checksums_are_written_one_by_one() -> None:
    udp_packet, start, offset = super_packet(6, 3000, udp=True)
    datagrams = segments_of(udp_packet, start, offset, 1000, vnet.GSO_UDP_L4)
    writes, accepted, _ = decapsulate([batch(datagrams)])
    assert accepted == 3 and len(writes) == 3
    for header, merged in writes:
        assert header.needs_csum and header.gso == vnet.GSO_NONE
        assert_checksums_valid(complete_write(header, merged))


def test_lone_segment_keeps_its_partial_checksum() -> None:
    packet, start, offset = super_packet(4, 800, flags="PA")
    (datagram,) = segments_of(packet, start, offset, 1000, vnet.GSO_TCPV4)
    writes, _, _ = decapsulate([batch([datagram])])
    assert writes == [(vnet.VnetHeader(vnet.F_NEEDS_CSUM, 0, 0, 0, 20, 16), bytes(packet))]


def test_malformed_datagrams_are_counted_and_skipped() -> None:
    good = bytes(IP(src="203.0.113.1", dst="203.0.113.2") / UDP() / b"x")
    datagrams = [
        wire.PLAIN_HEADER + good,
        b"\x20\x00\x00\x00" + good,  # version 2
        b"\x14\x00\x00\x00" + good,  # reserved flag
        wire.PLAIN_HEADER + good[:-1],  # length mismatch
        wire.encode_header(0, 20, 6) + good,  # positions without PARTIAL
        wire.encode_header(wire.FLAG_PARTIAL, 8, 6) + good,  # csum_start inside the header
        b"\x10",  # truncated
        wire.PLAIN_HEADER + good,
    ]
    writes, accepted, malformed = decapsulate([(d, 0) for d in datagrams])
    assert (accepted, malformed, len(writes)) == (2, 6, 2)


def test_gro_batch_of_garbage_never_raises() -> None:
    data = payload_bytes(1472 * 10, seed=5)
    _, accepted, malformed = decapsulate([(data, 1472)])
    assert accepted + malformed == 10


@settings(deadline=None, max_examples=400)
@given(data=st.binary(min_size=0, max_size=3000), segment=st.integers(0, 1500))
def test_receive_path_fuzz(data: bytes, segment: int) -> None:
    # any bytes, any GRO segment size: counted, never an exception
    writes, _, _ = decapsulate([(data, segment)])
    for header, packet in writes:
        header.check(len(packet))


@settings(deadline=None, max_examples=300,
          suppress_health_check=[HealthCheck.too_slow])
@given(
    mutations=st.lists(st.tuples(st.integers(0, 1500), st.integers(0, 255)), max_size=6),
    version=st.sampled_from([4, 6]),
)
def test_fast_path_agrees_with_wire_decode(
    mutations: list[tuple[int, int]], version: int
) -> None:
    # Mutated real datagrams: the receive path accepts exactly those wire.decode accepts.
    packet, start, offset = super_packet(version, 4 * 300)
    datagrams = [bytearray(d) for d in segments_of(packet, start, offset, 300,
                                                    gso_type_for(version))]
    for position, value in mutations:
        target = datagrams[position % len(datagrams)]
        target[position % len(target)] = value
    expected = 0
    for d in datagrams:
        try:
            wire.decode(bytes(d))
            expected += 1
        except wire.TunnelHeaderError:
            pass
    for batches in ([(bytes(d), 0) for d in datagrams],):
        _, accepted, malformed = decapsulate(batches)
        assert (accepted, malformed) == (expected, len(datagrams) - expected)
