"""Checksums: RFC 1071 sums, pseudo-headers, RFC 1624 incremental updates, partial checksums."""

from __future__ import annotations

import ipaddress
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import IP, TCP, UDP

from ipshift.packet import (
    PacketError,
    apply_delta,
    apply_delta_partial,
    apply_delta_udp,
    checksum_delta,
    complete_partial_checksum,
    internet_checksum,
    internet_sum,
    ipv4_header_checksum,
    ones_add,
    parse_packet,
    pseudo_header_sum,
    transport_checksum,
    verify_ipv4_header_checksum,
    verify_transport_checksum,
    word_delta,
)

SRC4 = ipaddress.IPv4Address("192.0.2.1").packed
DST4 = ipaddress.IPv4Address("198.51.100.2").packed
SRC6 = ipaddress.IPv6Address("2001:db8::1").packed
DST6 = ipaddress.IPv6Address("2001:db8::2").packed


def reference_sum(data: bytes) -> int:
    """RFC 1071 the slow way: 16-bit words, end-around carry after every addition."""
    if len(data) % 2:
        data += b"\0"
    total = 0
    for (word,) in struct.iter_unpack("!H", data):
        total += word
        total = (total & 0xFFFF) + (total >> 16)
    return total


def words(*values: int) -> bytes:
    return b"".join(v.to_bytes(2, "big") for v in values)


# -- RFC 1071 ------------------------------------------------------------------------------------
def test_rfc1071_numerical_example() -> None:
    data = bytes.fromhex("0001f203f4f5f6f7")
    assert internet_sum(data) == 0xDDF2  # section 3, "Sum2"
    assert internet_checksum(data) == 0x220D
    # Byte order independence (section 2 (B)): the swapped order gives the swapped sum.
    assert internet_sum(bytes.fromhex("0100 03f2 f5f4 f7f6")) == 0xF2DD


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=300), st.integers(0, 0xFFFF))
def test_internet_sum_equals_the_reference(data: bytes, initial: int) -> None:
    assert internet_sum(data) == reference_sum(data)
    assert internet_sum(data, initial) == ones_add(reference_sum(data), initial)


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=2, max_size=200).filter(lambda b: any(b)))
def test_data_with_its_checksum_sums_to_minus_zero(data: bytes) -> None:
    if len(data) % 2:
        data += b"\0"
    checked = data + internet_checksum(data).to_bytes(2, "big")
    assert internet_sum(checked) == 0xFFFF


# -- RFC 1624 ------------------------------------------------------------------------------------
def test_rfc1624_section4_example() -> None:
    """m = 0x5555 becomes m' = 0x3285; the other header words sum to 0xCD7A."""
    others = 0xCD7A
    assert internet_checksum(words(others, 0x5555)) == 0xDD2F  # HC
    assert internet_checksum(words(others, 0x3285)) == 0x0000  # HC' from scratch
    # Eqn. 3 (apply_delta) gives the recomputed value; eqn. 2 would have given 0xFFFF.
    assert apply_delta(0xDD2F, word_delta(0x5555, 0x3285)) == 0x0000
    eqn2 = ones_add(ones_add(0xDD2F, 0x5555), ~0x3285 & 0xFFFF)
    assert eqn2 == 0xFFFF
    assert apply_delta(0xDD2F, checksum_delta(words(0x5555), words(0x3285))) == 0x0000


def test_rfc1624_section5_verification_accepts_both_zeros() -> None:
    assert internet_sum(words(0xCD7A, 0x3285, 0xFFFF)) == 0xFFFF
    assert internet_sum(words(0xCD7A, 0x3285, 0x0000)) == 0xFFFF


@settings(max_examples=1000, deadline=None)
@given(
    st.lists(st.integers(0, 0xFFFF), min_size=1, max_size=40).filter(any),
    st.data(),
)
def test_incremental_update_equals_recomputation(values: list[int], data: st.DataObject) -> None:
    """For any data with a non-zero word (every header qualifies) and any change of an aligned
    field, eqn. 3 with a precomputed delta equals the checksum from scratch."""
    start = data.draw(st.integers(0, len(values) - 1))
    stop = data.draw(st.integers(start + 1, len(values)))
    replacement = data.draw(st.lists(st.integers(0, 0xFFFF), min_size=stop - start,
                                     max_size=stop - start))
    changed = values[:start] + replacement + values[stop:]
    if not any(changed):
        return  # all-zero data has no checksum to speak of
    delta = checksum_delta(words(*values[start:stop]), words(*replacement))
    assert apply_delta(internet_checksum(words(*values)), delta) == internet_checksum(
        words(*changed))
    # Partial (non-complemented) sums move by the same delta.
    assert apply_delta_partial(internet_sum(words(*values)), delta) == internet_sum(
        words(*changed))


def test_udp_rules() -> None:
    assert apply_delta_udp(0, 0x1234) == 0  # no checksum stays no checksum
    # ~HC + delta = 0xFFFF: eqn. 3 gives 0, which UDP sends as 0xFFFF.
    assert apply_delta(0x1234, 0x1234) == 0
    assert apply_delta_udp(0x1234, 0x1234) == 0xFFFF
    assert apply_delta_udp(0xFFFF, checksum_delta(SRC4, DST4)) == apply_delta(
        0xFFFF, checksum_delta(SRC4, DST4))


def _segment_summing_to_minus_zero(protocol: int) -> bytes:
    """A UDP/TCP-sized segment (checksum field zero) whose pseudo-header sum is exactly -0."""
    header = bytearray(20 if protocol == 6 else 8)
    if protocol == 17:
        header[4:6] = (len(header) + 2).to_bytes(2, "big")
    segment = bytes(header) + b"\0\0"
    partial = internet_sum(segment, pseudo_header_sum(SRC4, DST4, protocol, len(segment)))
    return bytes(header) + (~partial & 0xFFFF).to_bytes(2, "big")


def test_computed_zero_is_sent_as_ffff_for_udp_only() -> None:
    udp = _segment_summing_to_minus_zero(17)
    assert transport_checksum(SRC4, DST4, 17, udp) == 0xFFFF
    tcp = _segment_summing_to_minus_zero(6)
    assert transport_checksum(SRC4, DST4, 6, tcp) == 0x0000


def test_pseudo_header_sums_match_the_rfc_layouts() -> None:
    v4 = SRC4 + DST4 + struct.pack("!BBH", 0, 17, 1234)
    assert pseudo_header_sum(SRC4, DST4, 17, 1234) == reference_sum(v4)
    v6 = SRC6 + DST6 + struct.pack("!I3xB", 70000, 58)
    assert pseudo_header_sum(SRC6, DST6, 58, 70000) == reference_sum(v6)
    with pytest.raises(ValueError):
        pseudo_header_sum(SRC4, DST6, 6, 20)


def test_transport_checksum_and_verification_against_scapy() -> None:
    for layer in (TCP(sport=1, dport=2), UDP(sport=3, dport=4)):
        packet = IP(bytes(IP(src="192.0.2.1", dst="198.51.100.2") / layer / b"payload!"))
        data = bytes(packet)
        segment = bytearray(data[20:])
        offset = 16 if isinstance(layer, TCP) else 6
        wanted = int.from_bytes(segment[offset : offset + 2], "big")
        assert verify_transport_checksum(SRC4, DST4, packet.proto, segment)
        segment[offset : offset + 2] = b"\0\0"
        assert transport_checksum(SRC4, DST4, packet.proto, segment) == wanted
        segment[-1] ^= 0x40
        assert transport_checksum(SRC4, DST4, packet.proto, segment) != wanted


def test_udp_without_checksum_verifies_over_ipv4_only() -> None:
    segment = struct.pack("!HHHH", 1, 2, 10, 0) + b"hi"
    assert verify_transport_checksum(SRC4, DST4, 17, segment)
    assert not verify_transport_checksum(SRC6, DST6, 17, segment)


def test_ipv4_header_checksum_against_scapy() -> None:
    header = bytes(IP(src="192.0.2.1", dst="203.0.113.9", ttl=3, id=77,
                      options=b"\x01\x01\x01\x00"))
    assert ipv4_header_checksum(header) == int.from_bytes(header[10:12], "big")
    assert verify_ipv4_header_checksum(header)
    damaged = bytearray(header)
    damaged[8] ^= 1
    assert not verify_ipv4_header_checksum(damaged)
    with pytest.raises(PacketError) as error:
        ipv4_header_checksum(header[:19])
    assert error.value.reason == "truncated"


def test_checksum_delta_needs_equal_even_lengths() -> None:
    with pytest.raises(ValueError):
        checksum_delta(b"\1\2\3", b"\1\2\3")
    with pytest.raises(ValueError):
        checksum_delta(SRC4, SRC6)


# -- partial checksums -----------------------------------------------------------------------------
def _partial_tcp(src: str, dst: str) -> tuple[bytearray, int]:
    """An IPv4 TCP packet as a TUN with vnet headers hands it over: NEEDS_CSUM, the field
    holding the non-complemented pseudo-header sum."""
    data = bytearray(bytes(IP(src=src, dst=dst) / TCP(sport=40000, dport=80) / b"GET / HTTP/1.0"))
    packet = parse_packet(data)
    field = packet.transport_offset + 16
    data[field : field + 2] = pseudo_header_sum(
        packet.src, packet.dst, 6, len(packet.segment)).to_bytes(2, "big")
    return data, field


def test_complete_partial_checksum_does_what_the_device_does() -> None:
    data, _ = _partial_tcp("192.0.2.1", "198.51.100.2")
    complete_partial_checksum(data, 20, 16)
    assert parse_packet(data).verify_transport_checksum()
    full = bytes(IP(src="192.0.2.1", dst="198.51.100.2") / TCP(sport=40000, dport=80)
                 / b"GET / HTTP/1.0")
    assert bytes(data) == full
    with pytest.raises(PacketError):
        complete_partial_checksum(bytearray(30), 20, 16)


def test_the_wrong_rule_only_shows_after_completion() -> None:
    """Changing the source of a partial packet: the pseudo-header rule survives completion by
    the next device, the full-checksum rule does not (the failure a forwarded hop shows)."""
    delta = checksum_delta(ipaddress.IPv4Address("192.0.2.1").packed,
                           ipaddress.IPv4Address("203.0.113.9").packed)
    right, field = _partial_tcp("192.0.2.1", "198.51.100.2")
    wrong = bytearray(right)
    for buf, update in ((right, apply_delta_partial), (wrong, apply_delta)):
        value = int.from_bytes(buf[field : field + 2], "big")
        buf[field : field + 2] = update(value, delta).to_bytes(2, "big")
        buf[12:16] = ipaddress.IPv4Address("203.0.113.9").packed
        buf[10:12] = ipv4_header_checksum(buf[:20]).to_bytes(2, "big")
        complete_partial_checksum(buf, 20, 16)
    assert parse_packet(right).verify_transport_checksum() is True
    assert parse_packet(wrong).verify_transport_checksum() is False
