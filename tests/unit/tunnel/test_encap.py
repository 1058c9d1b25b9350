"""IP-in-IP and GRE codecs against scapy, the refusals of RFC 2784, and fuzzing."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import GRE

from ipshift.packet.errors import PacketError
from ipshift.tunnel.encap import (
    IPPROTO_GRE,
    Decapsulated,
    EncapError,
    gre_header,
    gre_outer_header,
    ipip_header,
    ipip_protocol,
    outer_header,
    parse_gre,
    parse_ipip,
)

OUTER4 = ("192.0.2.1", "192.0.2.2")
OUTER6 = ("2001:db8::1", "2001:db8::2")
INNER4 = bytes(IP(src="198.51.100.1", dst="198.51.100.2", tos=0xB8, flags="DF") / TCP(
    sport=40000, dport=443) / b"inner payload")
INNER4_NO_DF = bytes(IP(src="198.51.100.1", dst="198.51.100.2") / UDP() / b"odd")
INNER6 = bytes(IPv6(src="2001:db8:1::1", dst="2001:db8:1::2", tc=0x28) / UDP(
    sport=5353, dport=53) / b"inner six")


def packed(address: str) -> bytes:
    return ipaddress.ip_address(address).packed


def outer(version: int) -> tuple[bytes, bytes]:
    src, dst = OUTER4 if version == 4 else OUTER6
    return packed(src), packed(dst)


# --- IP-in-IP ---------------------------------------------------------------------------------
@pytest.mark.parametrize("outer_version", [4, 6])
@pytest.mark.parametrize(("inner", "protocol"), [(INNER4, 4), (INNER6, 41),
                                                 (INNER4_NO_DF, 4)])
def test_ipip_matches_scapy(outer_version: int, inner: bytes, protocol: int) -> None:
    src, dst = outer(outer_version)
    built = ipip_header(src, dst, inner) + inner
    tos = inner[1] if inner[0] >> 4 == 4 else (inner[0] & 0x0F) << 4 | inner[1] >> 4
    dont_fragment = inner[0] >> 4 == 6 or bool(inner[6] & 0x40)
    if outer_version == 4:
        expected = IP(src=OUTER4[0], dst=OUTER4[1], id=0, ttl=64, proto=protocol, tos=tos,
                      flags="DF" if dont_fragment else 0) / inner
    else:
        expected = IPv6(src=OUTER6[0], dst=OUTER6[1], hlim=64, nh=protocol, tc=tos) / inner
    assert built == bytes(expected)
    assert ipip_protocol(inner) == protocol
    if outer_version == 4:
        # An AF_INET raw socket hands over the outer header too.
        found = parse_ipip(built)
        assert found == Decapsulated(protocol, src, dst, 20, len(built))
    else:
        # An AF_INET6 raw socket hands over the payload only.
        found = parse_ipip(inner, protocol=protocol)
        assert found == Decapsulated(protocol, None, None, 0, len(inner))
    assert bytes(built[-len(inner):]) == inner


def test_parse_ipip_in_a_buffer() -> None:
    packet = bytes(IP(src=OUTER4[0], dst=OUTER4[1], proto=4) / INNER4)
    buf = bytearray(b"\x00" * 5 + packet + b"\xff" * 9)
    found = parse_ipip(buf, 5, 5 + len(packet))
    assert bytes(buf[found.inner_offset:found.inner_end]) == INNER4
    found6 = parse_ipip(memoryview(buf), 25, 5 + len(packet), protocol=4)
    assert found6.inner_offset == 25


@pytest.mark.parametrize(("packet", "reason"), [
    (b"", "truncated"),
    (bytes(IP(src=OUTER4[0], dst=OUTER4[1], proto=4) / INNER4)[:19], "truncated"),
    (bytes(IPv6(src=OUTER6[0], dst=OUTER6[1], nh=4) / INNER4), "bad-version"),
    (b"\x44" + bytes(IP(src=OUTER4[0], dst=OUTER4[1], proto=4) / INNER4)[1:], "bad-ihl"),
    (b"\x4f" + bytes(IP(src=OUTER4[0], dst=OUTER4[1], proto=4) / bytes(20))[1:], "bad-ihl"),
    (bytes(IP(src=OUTER4[0], dst=OUTER4[1], proto=4) / INNER4) + b"x", "length-mismatch"),
    (bytes(IP(src=OUTER4[0], dst=OUTER4[1], proto=4, flags="MF") / INNER4), "fragment"),
    (bytes(IP(src=OUTER4[0], dst=OUTER4[1], proto=6) / INNER4), "bad-protocol"),
    (bytes(IP(src=OUTER4[0], dst=OUTER4[1], proto=4) / INNER6), "bad-inner"),
    (bytes(IP(src=OUTER4[0], dst=OUTER4[1], proto=41) / INNER4), "bad-inner"),
    (bytes(IP(src=OUTER4[0], dst=OUTER4[1], proto=4) / INNER4[:-1]), "bad-inner"),
    (bytes(IP(src=OUTER4[0], dst=OUTER4[1], proto=4) / (b"\x45" * 10)), "bad-inner"),
])
def test_ipip_refusals(packet: bytes, reason: str) -> None:
    with pytest.raises(EncapError) as info:
        parse_ipip(packet)
    assert info.value.reason == reason and isinstance(info.value, PacketError)


def test_ipip_payload_refusals() -> None:
    with pytest.raises(EncapError):
        parse_ipip(INNER6, protocol=4)
    with pytest.raises(EncapError):
        parse_ipip(INNER4 + b"x", protocol=4)
    with pytest.raises(EncapError):
        parse_ipip(INNER4, 0, len(INNER4) + 1, protocol=4)
    with pytest.raises(ValueError):
        parse_ipip(INNER4, protocol=47)
    with pytest.raises(ValueError):
        ipip_protocol(b"\x50" + INNER4[1:])


def test_outer_header_limits() -> None:
    with pytest.raises(ValueError):
        outer_header(bytes(4), bytes(16), 4, 10)
    with pytest.raises(ValueError):
        outer_header(bytes(4), bytes(4), 4, 0xFFFF)
    with pytest.raises(ValueError):
        outer_header(bytes(16), bytes(16), 4, 0x10000)
    assert len(outer_header(bytes(16), bytes(16), 41, 0xFFFF)) == 40


# --- GRE --------------------------------------------------------------------------------------
@pytest.mark.parametrize("outer_version", [4, 6])
@pytest.mark.parametrize("inner", [INNER4, INNER6, INNER4_NO_DF])
@pytest.mark.parametrize(("key", "sequence", "checksum"), [
    (None, None, False), (7, None, False), (None, 9, False), (0xFFFFFFFF, 0, True),
    (None, None, True), (1234, 5678, True),
])
def test_gre_matches_scapy(outer_version: int, inner: bytes, key: int | None,
                           sequence: int | None, checksum: bool) -> None:
    src, dst = outer(outer_version)
    gre = GRE(proto=0x0800 if inner[0] >> 4 == 4 else 0x86DD,
              chksum_present=int(checksum), key_present=int(key is not None),
              key=key, seqnum_present=int(sequence is not None), sequence_number=sequence)
    expected_gre = bytes(gre / inner)
    built = gre_header(inner, key=key, sequence=sequence, checksum=checksum) + inner
    assert built == expected_gre
    tos = inner[1] if inner[0] >> 4 == 4 else (inner[0] & 0x0F) << 4 | inner[1] >> 4
    dont_fragment = inner[0] >> 4 == 6 or bool(inner[6] & 0x40)
    if outer_version == 4:
        whole = IP(src=OUTER4[0], dst=OUTER4[1], id=0, ttl=64, tos=tos,
                   flags="DF" if dont_fragment else 0) / gre / inner
    else:
        whole = IPv6(src=OUTER6[0], dst=OUTER6[1], hlim=64, tc=tos) / gre / inner
    with_outer = gre_outer_header(src, dst, inner, key=key, sequence=sequence,
                                  checksum=checksum) + inner
    assert with_outer == bytes(whole)
    if outer_version == 4:
        found = parse_gre(with_outer)
        assert (found.outer_src, found.outer_dst) == (src, dst)
    else:
        found = parse_gre(built, outer_included=False)
        assert found.outer_src is None
    assert (found.protocol, found.key, found.sequence) == (IPPROTO_GRE, key, sequence)
    packet = with_outer if outer_version == 4 else built
    assert bytes(packet[found.inner_offset:found.inner_end]) == inner


def test_gre_from_scapy_with_ignored_bits() -> None:
    # Bits 6-12 are reserved and ignored on receipt (RFC 2784 2.3).
    packet = bytes(IP(src=OUTER4[0], dst=OUTER4[1]) / GRE(flags=0x1F, proto=0x0800) / INNER4)
    found = parse_gre(packet)
    assert bytes(packet[found.inner_offset:]) == INNER4


def _gre(**fields: object) -> bytes:
    return bytes(GRE(**fields))


@pytest.mark.parametrize(("gre", "inner", "reason"), [
    (_gre(version=1, proto=0x0800), INNER4, "bad-version"),
    (_gre(routing_present=1, proto=0x0800) + bytes(4), INNER4, "bad-flags"),
    (_gre(strict_route_source=1, proto=0x0800), INNER4, "bad-flags"),
    (_gre(recursion_control=4, proto=0x0800), INNER4, "bad-flags"),
    (_gre(proto=0x6558), INNER4, "bad-payload"),
    (_gre(proto=0x86DD), INNER4, "bad-inner"),
    (_gre(proto=0x0800), INNER4[:-2], "bad-inner"),
    (_gre(key_present=1, key=3, proto=0x0800)[:6], b"", "truncated"),
    (b"\x00\x00", b"", "truncated"),
])
def test_gre_refusals(gre: bytes, inner: bytes, reason: str) -> None:
    for packet, included in ((bytes(IP(src=OUTER4[0], dst=OUTER4[1], proto=47) / (gre + inner)),
                              True), (gre + inner, False)):
        with pytest.raises(EncapError) as info:
            parse_gre(packet, outer_included=included)
        assert info.value.reason == reason


def test_gre_checksum_is_checked() -> None:
    packet = bytearray(gre_header(INNER4, checksum=True, key=5) + INNER4)
    assert parse_gre(packet, outer_included=False).key == 5
    packet[-1] ^= 0x40
    with pytest.raises(EncapError, match="bad-checksum"):
        parse_gre(packet, outer_included=False)
    ipip_in_gre = bytes(IP(src=OUTER4[0], dst=OUTER4[1], proto=4) / INNER4)
    with pytest.raises(EncapError, match="bad-protocol"):
        parse_gre(ipip_in_gre)
    with pytest.raises(ValueError):
        gre_header(b"\x50" * 20)


# --- fuzz ---------------------------------------------------------------------------------------
@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=120), st.sampled_from([None, 4, 41]), st.booleans())
def test_fuzz_only_the_typed_error(data: bytes, protocol: int | None, included: bool) -> None:
    for parse in (lambda: parse_ipip(data, protocol=protocol),
                  lambda: parse_gre(data, outer_included=included)):
        try:
            found = parse()
        except EncapError:
            continue
        assert 0 <= found.inner_offset <= found.inner_end == len(data)


GRE_PACKET = bytes(IP(src=OUTER4[0], dst=OUTER4[1]) / GRE(
    chksum_present=1, key_present=1, key=77, seqnum_present=1, sequence_number=3,
    proto=0x86DD) / INNER6)


@settings(max_examples=400, deadline=None)
@given(st.integers(0, len(GRE_PACKET) - 1), st.integers(0, 255))
def test_fuzz_mutated_gre(at: int, value: int) -> None:
    data = bytearray(GRE_PACKET)
    data[at] = value
    try:
        found = parse_gre(bytes(data))
    except EncapError:
        return
    # The checksum covers the GRE header and payload: only outer header bytes that are not
    # checked, or an unchanged byte, can still pass.
    assert at < 20 or data == GRE_PACKET
    assert found.key == 77 and found.inner_end == len(data)
