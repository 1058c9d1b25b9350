"""ILNPv6 codecs (packet.ilnp): I-LVs, the nonce destination option, the ICMPv6 Locator Update,
the two transport checksum rules and the per-packet locator rewrite. Hand-built bytes from the
RFC 6743/6744 layouts, scapy as an oracle where it has the layer, hypothesis round trips and
fuzzing of every parser (only PacketError; a refused in-place call leaves the buffer alone)."""

from __future__ import annotations

import functools
import ipaddress
import struct
from collections.abc import Callable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scapy.layers.inet import TCP, UDP
from scapy.layers.inet6 import (
    HAO,
    HBHOptUnknown,
    ICMPv6EchoRequest,
    IPv6,
    IPv6ExtHdrDestOpt,
    IPv6ExtHdrHopByHop,
    IPv6ExtHdrRouting,
    PadN,
    in6_chksum,
)

from ipshift.packet import (
    ExtensionHeader,
    ICMPHeader,
    IPv4Header,
    IPv6Header,
    Option,
    PacketError,
    TCPHeader,
    UDPHeader,
    build_packet,
    decode_ipv6_options,
    ilnp,
    parse_packet,
)
from ipshift.packet.checksum import complete_partial_checksum, pseudo_header_sum
from ipshift.packet.ilnp import (
    ICMPV6_LOCATOR_UPDATE,
    LU_ACKNOWLEDGEMENT,
    LU_ADVERTISEMENT,
    NONCE_OPTION,
    LocatorEntry,
    LocatorUpdate,
    Rule,
)
from ipshift.packet.protocols import (
    IPPROTO_AH,
    IPPROTO_DSTOPTS,
    IPPROTO_ICMPV6,
    IPPROTO_NONE,
    IPPROTO_TCP,
    IPPROTO_UDP,
)

FUZZ = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])

L_A, L_B, L_C, L_D = 0x20010DB800010000, 0x20010DB800020000, 0x20010DB8000A0000, 0x20010DB8000B0000
NID_A, NID_B = 0x000000000000000A, 0x021122FFFE334455
A = str(ilnp.ilv(L_A, NID_A))  # 2001:db8:1::a
B = str(ilnp.ilv(L_B, NID_B))
NONCE4 = bytes.fromhex("a1b2c3d4")
NONCE12 = bytes.fromhex("00112233445566778899aabb")
RULES: tuple[Rule, ...] = ("ilnp", "ipv6")
OTHER: dict[Rule, Rule] = {"ilnp": "ipv6", "ipv6": "ilnp"}


def _udp(src: str = A, dst: str = B, payload: bytes = b"hello", *,
         extension_headers: tuple[ExtensionHeader, ...] = ()) -> bytes:
    return build_packet(IPv6Header(ipaddress.IPv6Address(src).packed,
                                   ipaddress.IPv6Address(dst).packed),
                        UDPHeader(40000, 53), payload, extension_headers=extension_headers)


def _nid_only(address: str) -> str:
    return str(ilnp.ilv(0, ilnp.split_ilv(address)[1]))


def only_packet_errors(call: Callable[[], object]) -> object:
    try:
        return call()
    except PacketError as error:
        assert error.reason and isinstance(error.reason, str)
        return error


# -- I-LV ----------------------------------------------------------------------------------------
def test_ilv_and_split() -> None:
    assert ilnp.ilv(L_A, NID_A) == ipaddress.IPv6Address("2001:db8:1::a")
    assert ilnp.ilv(L_B, NID_B) == ipaddress.IPv6Address("2001:db8:2:0:211:22ff:fe33:4455")
    assert ilnp.split_ilv("2001:db8:1::a") == (L_A, NID_A)
    assert ilnp.split_ilv(ipaddress.IPv6Address(B)) == (L_B, NID_B)
    assert ilnp.split_ilv(ipaddress.IPv6Address(B).packed) == (L_B, NID_B)
    assert ilnp.split_ilv(ilnp.ilv(0, 0)) == (0, 0)
    for bad in ((-1, 0), (0, 1 << 64), (1 << 64, 0)):
        with pytest.raises(ValueError):
            ilnp.ilv(*bad)
    with pytest.raises(ValueError):
        ilnp.split_ilv("192.0.2.1")


@given(st.integers(0, (1 << 64) - 1), st.integers(0, (1 << 64) - 1))
def test_ilv_round_trip(locator: int, nid: int) -> None:
    assert ilnp.split_ilv(ilnp.ilv(locator, nid)) == (locator, nid)
    assert ilnp.split_ilv(str(ilnp.ilv(locator, nid))) == (locator, nid)


def test_locator_helpers_read_and_write_in_place() -> None:
    buf = bytearray(_udp())
    before = bytes(buf)
    assert ilnp.locators(buf) == (L_A, L_B)
    assert (ilnp.source_locator(buf), ilnp.destination_locator(buf)) == (L_A, L_B)
    ilnp.set_source_locator(buf, L_C)
    ilnp.set_destination_locator(buf, L_D)
    assert bytes(buf[8:16]) == L_C.to_bytes(8, "big")
    assert bytes(buf[24:32]) == L_D.to_bytes(8, "big")
    # the node identifiers and everything else are untouched
    assert buf[16:24] == before[16:24] and buf[32:] == before[32:] and buf[:8] == before[:8]
    assert ilnp.locators(memoryview(buf)) == (L_C, L_D)
    # behind a link header
    framed = bytearray(b"\xee" * 14) + buf
    assert ilnp.locators(framed, 14) == (L_C, L_D)
    ilnp.set_source_locator(framed, L_A, 14)
    assert ilnp.source_locator(framed, 14) == L_A and framed[:14] == b"\xee" * 14
    with pytest.raises(ValueError):
        ilnp.set_source_locator(buf, 1 << 64)
    with pytest.raises(ValueError):
        ilnp.set_destination_locator(buf, -1)


@pytest.mark.parametrize("data, reason", [
    (b"", "truncated"), (bytes(39), "truncated"), (b"\x45" + bytes(39), "bad-version")])
def test_locator_helpers_refuse(data: bytes, reason: str) -> None:
    for call in (lambda: ilnp.locators(data), lambda: ilnp.source_locator(data),
                 lambda: ilnp.destination_locator(data),
                 lambda: ilnp.set_source_locator(bytearray(data), 1),
                 lambda: ilnp.set_destination_locator(bytearray(data), 1)):
        with pytest.raises(PacketError) as error:
            call()
        assert error.value.reason == reason


# -- the nonce option ----------------------------------------------------------------------------
def test_nonce_header_bytes() -> None:
    # RFC 6744 2: next header, hdr ext len, option type 0x8B, option length, nonce value
    assert ilnp.nonce_header(NONCE4, IPPROTO_UDP) == bytes((17, 0, 0x8B, 4)) + NONCE4
    assert ilnp.nonce_header(NONCE12, IPPROTO_TCP) == bytes((6, 1, 0x8B, 12)) + NONCE12
    assert ilnp.nonce_header(NONCE4) == bytes((IPPROTO_NONE, 0, 0x8B, 4)) + NONCE4
    header = ilnp.nonce_extension_header(NONCE12)
    assert header.kind == IPPROTO_DSTOPTS and header.options() == [Option(NONCE_OPTION, NONCE12)]
    for size in (0, 3, 5, 8, 16):
        with pytest.raises(ValueError):
            ilnp.nonce_header(bytes(size))


@pytest.mark.parametrize("nonce", [NONCE4, NONCE12])
@pytest.mark.parametrize("upper", ["udp", "tcp", "icmpv6"])
def test_insert_nonce_matches_scapy(nonce: bytes, upper: str) -> None:
    ip = IPv6(src=A, dst=B)
    layer = {"udp": UDP(sport=1, dport=2) / b"payload",
             "tcp": TCP(sport=3, dport=4, flags="S") / b"syn",
             "icmpv6": ICMPv6EchoRequest(id=5, seq=6, data=b"ping")}[upper]
    plain = bytes(ip / layer)
    with_nonce = bytes(ip / IPv6ExtHdrDestOpt(options=[HBHOptUnknown(otype=0x8B, optdata=nonce)])
                       / layer)
    assert ilnp.insert_nonce(plain, nonce) == with_nonce
    assert ilnp.find_nonce(with_nonce) == nonce
    assert ilnp.find_nonce(plain) is None
    assert ilnp.remove_nonce(with_nonce) == plain
    assert parse_packet(with_nonce).verify_transport_checksum()
    # scapy reads our header back as its own
    decoded = IPv6(ilnp.insert_nonce(plain, nonce))
    assert decoded[IPv6ExtHdrDestOpt].options[0].otype == 0x8B
    assert decoded[IPv6ExtHdrDestOpt].options[0].optdata == nonce


def test_insert_nonce_goes_before_the_upper_layer() -> None:
    """After hop-by-hop options and a routing header: the final destination's options."""
    layers = IPv6(src=A, dst=B) / IPv6ExtHdrHopByHop() / IPv6ExtHdrRouting(
        addresses=["2001:db8:9::9"], segleft=1)
    plain = bytes(layers / UDP(sport=1, dport=2) / b"x")
    expected = bytes(layers / IPv6ExtHdrDestOpt(options=[HBHOptUnknown(otype=0x8B,
                                                                       optdata=NONCE4)])
                     / UDP(sport=1, dport=2) / b"x")
    assert ilnp.insert_nonce(plain, NONCE4) == expected
    assert ilnp.remove_nonce(expected) == plain
    # a nonce in the destination options before the routing header is found too
    early = bytes(IPv6(src=A, dst=B) / IPv6ExtHdrDestOpt(
        options=[HBHOptUnknown(otype=0x8B, optdata=NONCE12)]) / IPv6ExtHdrRouting(
        addresses=["2001:db8:9::9"], segleft=1) / UDP() / b"x")
    assert ilnp.find_nonce(early) == NONCE12
    # ... and removed
    assert ilnp.remove_nonce(early) == bytes(IPv6(src=A, dst=B) / IPv6ExtHdrRouting(
        addresses=["2001:db8:9::9"], segleft=1) / UDP() / b"x")
    # ESP and "no next header" end the chain: the header goes in front of them
    nothing = build_packet(IPv6Header(ipaddress.IPv6Address(A).packed,
                                      ipaddress.IPv6Address(B).packed))
    assert ilnp.insert_nonce(nothing, NONCE4) == nothing[:4] + b"\x00\x08\x3c\x40" + (
        nothing[8:40]) + ilnp.nonce_header(NONCE4, IPPROTO_NONE)
    esp = build_packet(IPv6Header(bytes(16), bytes(16), next_header=50), payload=bytes(24))
    assert ilnp.remove_nonce(ilnp.insert_nonce(esp, NONCE4)) == esp
    assert ilnp.insert_nonce(esp, NONCE4)[40:48] == ilnp.nonce_header(NONCE4, 50)


def test_insert_nonce_joins_existing_destination_options_keeping_alignment() -> None:
    hao = IPv6(src=A, dst=B) / IPv6ExtHdrDestOpt(options=[HAO(hoa="2001:db8::77")])
    plain = bytes(hao / UDP(sport=1, dport=2) / b"mobile")
    home_at = plain.index(ipaddress.IPv6Address("2001:db8::77").packed)
    for nonce in (NONCE4, NONCE12):
        joined = ilnp.insert_nonce(plain, nonce)
        assert joined[6] == IPPROTO_DSTOPTS and joined[40] == IPPROTO_UDP
        options = decode_ipv6_options(joined[42 : 40 + (joined[41] + 1) * 8])
        assert options[0] == Option(NONCE_OPTION, nonce)  # first, as RFC 6744 2 asks
        assert [o.kind for o in options if o.kind > 1] == [NONCE_OPTION, 0xC9]
        new_home = joined.index(ipaddress.IPv6Address("2001:db8::77").packed)
        assert (new_home - home_at) % 8 == 0  # the home address keeps its 8n+6 alignment
        packet = parse_packet(joined)
        assert packet.pseudo_src == ipaddress.IPv6Address("2001:db8::77").packed
        assert packet.verify_transport_checksum()
        assert ilnp.find_nonce(joined) == nonce
        assert ilnp.remove_nonce(joined) == plain
        assert IPv6(joined)[HAO].hoa == "2001:db8::77"


def test_remove_nonce_keeps_other_options_aligned_with_little_padding() -> None:
    """A nonce among other options: replaced by at most 7 bytes of padding (Linux drops a
    packet with more consecutive padding), the others keep their offsets modulo 8."""
    hao = HAO(hoa="2001:db8::77")
    for nonce in (NONCE4, NONCE12, bytes(8)):
        built = bytearray(bytes(IPv6(src=A, dst=B) / IPv6ExtHdrDestOpt(
            options=[HBHOptUnknown(otype=0x8B, optdata=nonce), hao]) / UDP() / b"z"))
        ilnp.fill_checksum(built, "ipv6")  # scapy misses the home address behind another option
        data = bytes(built)
        home_at = data.index(ipaddress.IPv6Address("2001:db8::77").packed)
        stripped = ilnp.remove_nonce(data)
        assert ilnp.find_nonce(stripped) is None
        assert (stripped.index(ipaddress.IPv6Address("2001:db8::77").packed) - home_at) % 8 == 0
        header = stripped[40 : 40 + (stripped[41] + 1) * 8]
        run = longest = 0
        for kind, body in decode_ipv6_options(header[2:]):
            run = run + (1 if kind == 0 else len(body) + 2) if kind in (0, 1) else 0
            longest = max(longest, run)
        assert longest <= 7
        assert IPv6(stripped)[HAO].hoa == "2001:db8::77"
        assert parse_packet(stripped).verify_transport_checksum()
        assert parse_packet(stripped).pseudo_src == ipaddress.IPv6Address("2001:db8::77").packed
    # padding before the nonce goes with it
    built = bytearray(bytes(IPv6(src=A, dst=B) / IPv6ExtHdrDestOpt(
        options=[PadN(optdata=b"\0\0"), HBHOptUnknown(otype=0x8B, optdata=NONCE4),
                 HBHOptUnknown(otype=0x1E, optdata=b"abcdef")]) / UDP() / b"z"))
    ilnp.fill_checksum(built, "ipv6")
    stripped = ilnp.remove_nonce(built)
    assert stripped[40:56] == bytes.fromhex("1101" "0100" "1e06616263646566" "01020000")
    assert (stripped.index(b"abcdef") - built.index(b"abcdef")) % 8 == 0
    assert ilnp.verify_checksum(stripped, "ipv6")
    # the nonce alone with padding: the whole header goes
    padded = bytes(IPv6(src=A, dst=B) / IPv6ExtHdrDestOpt(
        options=[HBHOptUnknown(otype=0x8B, optdata=b"123456")]) / UDP() / b"z")
    assert ilnp.remove_nonce(padded) == bytes(IPv6(src=A, dst=B) / UDP() / b"z")


def test_remove_nonce_without_nonce_and_link_padding() -> None:
    plain = _udp()
    assert ilnp.remove_nonce(plain + b"\0\0\0\0") == plain
    assert ilnp.remove_nonce(bytearray(plain)) == plain
    framed = b"\xee" * 10 + ilnp.insert_nonce(plain, NONCE4) + b"\0" * 6
    assert ilnp.find_nonce(framed, 10) == NONCE4
    assert ilnp.remove_nonce(framed, 10) == plain
    assert ilnp.insert_nonce(b"\xee" * 10 + plain + b"\0", NONCE12, 10) == ilnp.insert_nonce(
        plain, NONCE12)


def _with_destination_options(body: bytes) -> bytes:
    """A UDP packet behind a destination options header of `body` (after its two octets)."""
    return _udp(extension_headers=(ExtensionHeader(IPPROTO_DSTOPTS, body),))


def test_pad1_around_the_nonce() -> None:
    other = bytes((0x1E, 2)) + b"ab"
    plain = _with_destination_options(b"\0\0" + other)
    joined = _with_destination_options(
        b"\0\0" + bytes((0x8B, 4)) + NONCE4 + other + b"\x01\x00")
    assert ilnp.find_nonce(joined) == NONCE4
    # the two Pad1 before the nonce go with it: 8 bytes, the header shrinks by one unit
    assert ilnp.remove_nonce(joined) == _with_destination_options(other + b"\x01\x00")
    # inserted first, the two Pad1 folded into its own padding
    inserted = ilnp.insert_nonce(plain, NONCE4)
    assert inserted == _with_destination_options(
        bytes((0x8B, 4)) + NONCE4 + b"\x01\x02\0\0" + other)
    assert ilnp.remove_nonce(inserted) == _with_destination_options(
        b"\x01\x00" + other)  # the same two bytes of padding, as one PadN


def test_malformed_options_after_a_home_address() -> None:
    """The chain walker stops reading a header's options at the home address: what follows is
    checked here."""
    home = bytes((0xC9, 16)) + bytes(16)
    for tail in (bytes(7) + b"\x1e", b"\x1e\x09abcdef"):  # no length octet; runs past
        data = _with_destination_options(b"\x01\x02\0\0" + home + tail)
        for call in (ilnp.find_nonce, ilnp.remove_nonce,
                     functools.partial(ilnp.insert_nonce, nonce=NONCE4)):
            with pytest.raises(PacketError) as error:
                call(data)
            assert error.value.reason == "bad-option"


def test_find_nonce_accepts_other_lengths_and_refuses_two() -> None:
    odd = bytes(IPv6(src=A, dst=B) / IPv6ExtHdrDestOpt(
        options=[HBHOptUnknown(otype=0x8B, optdata=b"12345678")]) / UDP())
    assert ilnp.find_nonce(odd) == b"12345678"
    two = bytes(IPv6(src=A, dst=B) / IPv6ExtHdrDestOpt(
        options=[HBHOptUnknown(otype=0x8B, optdata=NONCE4),
                 HBHOptUnknown(otype=0x8B, optdata=NONCE4)]) / UDP())
    two_headers = bytes(IPv6(src=A, dst=B) / IPv6ExtHdrDestOpt(
        options=[HBHOptUnknown(otype=0x8B, optdata=NONCE4)]) / IPv6ExtHdrRouting(
        addresses=["2001:db8:9::9"], segleft=1) / IPv6ExtHdrDestOpt(
        options=[HBHOptUnknown(otype=0x8B, optdata=NONCE12)]) / UDP())
    empty = bytes(IPv6(src=A, dst=B) / IPv6ExtHdrDestOpt(
        options=[HBHOptUnknown(otype=0x8B, optdata=b"")]) / UDP())
    for data, reason in ((two, "duplicate-nonce"), (two_headers, "duplicate-nonce"),
                         (empty, "bad-option")):
        for call in (ilnp.find_nonce, ilnp.remove_nonce,
                     functools.partial(ilnp.insert_nonce, nonce=NONCE4)):
            with pytest.raises(PacketError) as error:
                call(data)
            assert error.value.reason == reason
    # a nonce in hop-by-hop options is not a nonce (RFC 6744: destination options only)
    hop = bytes(IPv6(src=A, dst=B) / IPv6ExtHdrHopByHop(
        options=[HBHOptUnknown(otype=0x8B, optdata=NONCE4)]) / UDP())
    assert ilnp.find_nonce(hop) is None


def test_insert_and_remove_refusals() -> None:
    plain = _udp()
    with_nonce = ilnp.insert_nonce(plain, NONCE4)
    fragment = _udp(extension_headers=(ExtensionHeader.fragment(0, True, 7),))
    later = build_packet(IPv6Header(bytes(16), bytes(16)), payload=b"y" * 16,
                         extension_headers=(ExtensionHeader(44, bytes((0, 0x10, 0, 0, 0, 7)),
                                                            IPPROTO_UDP),))
    ah = _udp(extension_headers=(ExtensionHeader(IPPROTO_AH, bytes(10)),))
    cases = [
        (lambda: ilnp.insert_nonce(with_nonce, NONCE12), "duplicate-nonce"),
        (lambda: ilnp.insert_nonce(fragment, NONCE4), "fragmented"),
        (lambda: ilnp.insert_nonce(later, NONCE4), "fragmented"),
        (lambda: ilnp.insert_nonce(ah, NONCE4), "authenticated"),
        (lambda: ilnp.insert_nonce(_udp(payload=bytes(65535 - 8 - 4)), NONCE4), "too-big"),
        (lambda: ilnp.insert_nonce(_udp(extension_headers=(ExtensionHeader.destination_options(
            [Option(0x1E, bytes(253))] * 8),)), NONCE4), "too-big"),  # 2048 bytes already
        (lambda: ilnp.remove_nonce(_nonce_fragment()), "fragmented"),
        (lambda: ilnp.remove_nonce(_nonce_under_ah()), "authenticated"),
        (lambda: ilnp.insert_nonce(bytes(30), NONCE4), "truncated"),
        (lambda: ilnp.insert_nonce(b"\x45" + bytes(50), NONCE4), "bad-version"),
        (lambda: ilnp.insert_nonce(plain[:-1], NONCE4), "truncated"),
    ]
    for call, reason in cases:
        with pytest.raises(PacketError) as error:
            call()
        assert error.value.reason == reason, reason
    # an atomic fragment (offset 0, no more fragments, RFC 6946) is a whole packet
    atomic = _udp(extension_headers=(ExtensionHeader.fragment(0, False, 7),))
    joined = ilnp.insert_nonce(atomic, NONCE4)
    assert ilnp.find_nonce(joined) == NONCE4 and ilnp.remove_nonce(joined) == atomic
    assert parse_packet(joined).verify_transport_checksum()
    # the largest packet that still fits
    big = _udp(payload=bytes(65535 - 8 - 8))
    assert len(ilnp.insert_nonce(big, NONCE4)) == 40 + 65535
    # a nonce of another size cannot be sent
    with pytest.raises(ValueError):
        ilnp.insert_nonce(plain, b"123")


def _nonce_fragment() -> bytes:
    return build_packet(IPv6Header(bytes(16), bytes(16)), UDPHeader(1, 2), b"x" * 8,
                        extension_headers=(ilnp.nonce_extension_header(NONCE4),
                                           ExtensionHeader.fragment(0, True, 9)))


def _nonce_under_ah() -> bytes:
    return build_packet(IPv6Header(bytes(16), bytes(16)), UDPHeader(1, 2), b"x",
                        extension_headers=(ilnp.nonce_extension_header(NONCE4),
                                           ExtensionHeader(IPPROTO_AH, bytes(10))))


# -- random packets ------------------------------------------------------------------------------
@st.composite
def ilnp_packets(draw: st.DrawFn, *, fragments: bool = False) -> bytes:
    """IPv6 TCP/UDP/ICMPv6 packets with I-LV addresses and some extension headers; the upper
    layer checksum is right under the IPv6 rule (use `ilnp.fill_checksum` for the other)."""
    src = ilnp.ilv(draw(st.integers(0, (1 << 64) - 1)), draw(st.integers(0, (1 << 64) - 1)))
    dst = ilnp.ilv(draw(st.integers(0, (1 << 64) - 1)), draw(st.integers(0, (1 << 64) - 1)))
    headers: list[ExtensionHeader] = []
    if draw(st.booleans()):
        headers.append(ExtensionHeader.hop_by_hop([Option(1, bytes(draw(st.integers(0, 9))))]))
    if draw(st.integers(0, 4)) == 0:
        final = ipaddress.IPv6Address(draw(st.integers(0, (1 << 128) - 1))).packed
        headers.append(ExtensionHeader.routing_addresses(0, draw(st.integers(0, 1)), [final]))
    if fragments and draw(st.integers(0, 4)) == 0:
        headers.append(ExtensionHeader.fragment(0, draw(st.booleans()), 1))
    kind = draw(st.integers(0, 3))
    if kind == 1:  # other destination options, the nonce would join them
        headers.append(ExtensionHeader.destination_options(
            [Option(0x1E, draw(st.binary(max_size=6)))]))
    elif kind == 2:
        home = ipaddress.IPv6Address(draw(st.integers(0, (1 << 128) - 1))).packed
        headers.append(ExtensionHeader.destination_options(
            [Option(1, bytes(2)), Option(0xC9, home)]))
    protocol = draw(st.sampled_from([IPPROTO_TCP, IPPROTO_UDP, IPPROTO_ICMPV6]))
    transport: TCPHeader | UDPHeader | ICMPHeader
    if protocol == IPPROTO_TCP:
        transport = TCPHeader(draw(st.integers(0, 65535)), draw(st.integers(0, 65535)),
                              seq=draw(st.integers(0, 2**32 - 1)), flags=0x18)
    elif protocol == IPPROTO_UDP:
        transport = UDPHeader(draw(st.integers(0, 65535)), draw(st.integers(0, 65535)))
    else:
        transport = ICMPHeader(draw(st.sampled_from([128, 129, ICMPV6_LOCATOR_UPDATE])), 0,
                               draw(st.integers(0, 2**32 - 1)))
    return build_packet(IPv6Header(src.packed, dst.packed, hop_limit=draw(st.integers(1, 255))),
                        transport, draw(st.binary(max_size=64)), extension_headers=headers)


@settings(FUZZ, max_examples=300)
@given(ilnp_packets(), st.sampled_from([NONCE4, NONCE12]), st.sampled_from(RULES))
def test_nonce_round_trip_keeps_checksums(data: bytes, nonce: bytes, rule: Rule) -> None:
    buf = bytearray(data)
    ilnp.fill_checksum(buf, rule)
    plain = bytes(buf)
    joined = ilnp.insert_nonce(plain, nonce)
    assert len(joined) - len(plain) in (8, 16)
    assert int.from_bytes(joined[4:6], "big") == len(joined) - 40
    assert ilnp.find_nonce(joined) == nonce
    before, after = parse_packet(plain), parse_packet(joined)
    assert (after.protocol, after.pseudo_src, after.pseudo_dst) == (
        before.protocol, before.pseudo_src, before.pseudo_dst)
    assert bytes(after.segment) == bytes(before.segment)  # the checksum field did not change
    assert ilnp.verify_checksum(joined, rule)
    assert ilnp.remove_nonce(joined) == plain
    assert ilnp.remove_nonce(plain) == plain


# -- Locator Update ------------------------------------------------------------------------------
ENTRIES = (LocatorEntry(L_C, 10, 600), LocatorEntry(L_D, 20, 300))


def test_locator_update_bytes_from_the_rfc_layout() -> None:
    update = LocatorUpdate(LU_ADVERTISEMENT, ENTRIES)
    expected = (bytes((156, 0, 0, 0, 2, 1, 0, 0))
                + L_C.to_bytes(8, "big") + (10).to_bytes(2, "big") + (600).to_bytes(2, "big")
                + L_D.to_bytes(8, "big") + (20).to_bytes(2, "big") + (300).to_bytes(2, "big"))
    assert update.encode() == expected
    assert LocatorUpdate.decode(expected) == update
    assert LocatorUpdate.advertisement(list(ENTRIES)) == update
    ack = update.acknowledgement()
    assert ack.operation == LU_ACKNOWLEDGEMENT and not ack.is_advertisement
    assert ack.encode() == expected[:5] + b"\x02" + expected[6:]  # only the operation differs
    # the reserved field is kept, so the acknowledgement repeats the body exactly
    odd = expected[:6] + b"\xab\xcd" + expected[8:]
    assert LocatorUpdate.decode(odd).reserved == 0xABCD
    assert LocatorUpdate.decode(odd).acknowledgement().encode() == odd[:5] + b"\x02" + odd[6:]


@pytest.mark.parametrize("message, reason", [
    (b"", "truncated"),
    (bytes((156, 0, 0, 0, 1, 1, 0)), "truncated"),
    (bytes((155, 0, 0, 0, 1, 1, 0, 0)) + bytes(12), "bad-type"),
    (bytes((156, 1, 0, 0, 1, 1, 0, 0)) + bytes(12), "bad-code"),
    (bytes((156, 0, 0, 0, 0, 1, 0, 0)), "bad-locator-count"),
    (bytes((156, 0, 0, 0, 0, 1, 0, 0)) + bytes(12), "bad-locator-count"),
    (bytes((156, 0, 0, 0, 1, 0, 0, 0)) + bytes(12), "bad-operation"),
    (bytes((156, 0, 0, 0, 1, 3, 0, 0)) + bytes(12), "bad-operation"),
    (bytes((156, 0, 0, 0, 2, 1, 0, 0)) + bytes(12), "truncated"),
    (bytes((156, 0, 0, 0, 2, 1, 0, 0)) + bytes(23), "truncated"),
    (bytes((156, 0, 0, 0, 1, 1, 0, 0)) + bytes(13), "length-mismatch"),
    (bytes((156, 0, 0, 0, 1, 1, 0, 0)) + bytes(24), "length-mismatch"),  # miscounted
])
def test_locator_update_malformed(message: bytes, reason: str) -> None:
    with pytest.raises(PacketError) as error:
        LocatorUpdate.decode(message)
    assert error.value.reason == reason


def test_locator_update_values_are_checked() -> None:
    with pytest.raises(ValueError):
        LocatorUpdate(LU_ADVERTISEMENT, ())
    with pytest.raises(ValueError):
        LocatorUpdate(3, ENTRIES)
    with pytest.raises(ValueError):
        LocatorUpdate(LU_ADVERTISEMENT, ENTRIES * 128)  # 256 locators
    with pytest.raises(ValueError):
        LocatorUpdate(LU_ADVERTISEMENT, ENTRIES, reserved=1 << 16)
    with pytest.raises(ValueError):
        LocatorUpdate(LU_ADVERTISEMENT, (L_A,))
    for bad in ((1 << 64, 0, 0), (0, 1 << 16, 0), (0, 0, -1)):
        with pytest.raises(ValueError):
            LocatorEntry(*bad)
    assert len(LocatorUpdate(LU_ADVERTISEMENT, ENTRIES * 127 + ENTRIES[:1]).encode()) == (
        8 + 255 * 12)
    # a list is kept as a tuple: the value stays hashable
    assert hash(LocatorUpdate(LU_ADVERTISEMENT, list(ENTRIES)))


entries = st.lists(st.builds(LocatorEntry, st.integers(0, (1 << 64) - 1), st.integers(0, 65535),
                             st.integers(0, 65535)), min_size=1, max_size=255).map(tuple)


@settings(FUZZ, max_examples=200)
@given(st.sampled_from([LU_ADVERTISEMENT, LU_ACKNOWLEDGEMENT]), entries, st.integers(0, 65535))
def test_locator_update_round_trip(operation: int, locators: tuple[LocatorEntry, ...],
                                   reserved: int) -> None:
    update = LocatorUpdate(operation, locators, reserved)
    message = update.encode()
    assert len(message) == 8 + 12 * len(locators)
    assert LocatorUpdate.decode(message) == update
    assert LocatorUpdate.decode(memoryview(message)) == update
    for cut in (len(message) - 1, 7, 8 + 12 * (len(locators) - 1) + 5):
        with pytest.raises(PacketError):
            LocatorUpdate.decode(message[:cut])


@pytest.mark.parametrize("nonce", [None, NONCE4, NONCE12])
def test_locator_update_packet(nonce: bytes | None) -> None:
    advertisement = LocatorUpdate(LU_ADVERTISEMENT, ENTRIES)
    data = ilnp.locator_update_packet(A, B, advertisement, nonce=nonce, hop_limit=33)
    ip = IPv6(data)
    assert (ip.src, ip.dst, ip.hlim) == (A, B, 33)
    message = advertisement.encode()
    segment = data[len(data) - len(message):]
    assert segment[:2] == message[:2] and segment[4:] == message[4:]
    # the ICMPv6 checksum covers the full addresses (RFC 6741 4.3): scapy agrees
    expected = in6_chksum(IPPROTO_ICMPV6, ip, message)
    assert struct.unpack("!H", segment[2:4])[0] == expected
    assert ilnp.verify_checksum(data, "ilnp") and ilnp.verify_checksum(data, "ipv6")
    if nonce is None:
        assert data[6] == IPPROTO_ICMPV6
    else:
        assert data[40:40 + len(ilnp.nonce_header(nonce))] == ilnp.nonce_header(
            nonce, IPPROTO_ICMPV6)
    parsed = ilnp.parse_locator_update_packet(data)
    assert parsed == ilnp.LocatorUpdatePacket(ipaddress.IPv6Address(A),
                                              ipaddress.IPv6Address(B), advertisement, nonce)
    ack = ilnp.locator_update_packet(B, A, parsed.update.acknowledgement(), nonce=nonce)
    assert ilnp.parse_locator_update_packet(ack).update == advertisement.acknowledgement()
    assert ilnp.parse_locator_update_packet(b"\0" * 4 + data, 4) == parsed


def test_scapy_decodes_the_locator_update_as_it_can() -> None:
    """scapy 2.x has no class for type 156: it keeps the message as unknown ICMPv6 (or, in a
    version that has one, decodes our fields)."""
    data = ilnp.locator_update_packet(A, B, LocatorUpdate(LU_ADVERTISEMENT, ENTRIES),
                                      nonce=NONCE4)
    ip = IPv6(data)
    assert ip[IPv6ExtHdrDestOpt].options[0].optdata == NONCE4
    assert bytes(ip[IPv6ExtHdrDestOpt].payload)[0] == ICMPV6_LOCATOR_UPDATE
    assert bytes(ip) == data


def test_parse_locator_update_packet_refusals() -> None:
    good = ilnp.locator_update_packet(A, B, LocatorUpdate(LU_ADVERTISEMENT, ENTRIES),
                                      nonce=NONCE4)
    corrupt = bytearray(good)
    corrupt[-1] ^= 1
    echo = bytes(IPv6(src=A, dst=B) / ICMPv6EchoRequest())
    zero = bytearray(ilnp.locator_update_packet(A, B, LocatorUpdate(LU_ADVERTISEMENT, ENTRIES)))
    zero[44] = 0  # Num of Locs, checksum fixed below
    zero[42:44] = b"\0\0"
    ilnp.fill_checksum(zero)
    trailing = build_packet(IPv6Header(ipaddress.IPv6Address(A).packed,
                                       ipaddress.IPv6Address(B).packed),
                            ICMPHeader(156, 0, 1 << 24 | 1 << 16), bytes(12) + b"extra")
    v4 = build_packet(IPv4Header(src=bytes(4), dst=bytes(4)), ICMPHeader(8))
    fragment = build_packet(IPv6Header(ipaddress.IPv6Address(A).packed,
                                       ipaddress.IPv6Address(B).packed),
                            ICMPHeader(156, 0, 1 << 24 | 1 << 16), bytes(12),
                            extension_headers=(ExtensionHeader.fragment(0, True, 3),))
    cases = [(bytes(corrupt), "bad-checksum"), (echo, "bad-type"), (_udp(), "bad-protocol"),
             (fragment, "fragmented"),
             (bytes(zero), "bad-locator-count"), (trailing, "length-mismatch"),
             (v4, "bad-version"), (good[:-1], "truncated"), (b"", "truncated")]
    for data, reason in cases:
        with pytest.raises(PacketError) as error:
            ilnp.parse_locator_update_packet(data)
        assert error.value.reason == reason, reason


# -- transport checksums under both rules --------------------------------------------------------
@pytest.mark.parametrize("upper", ["udp", "tcp"])
def test_checksum_rules_against_scapy(upper: str) -> None:
    layer = (UDP(sport=1, dport=2) / b"data") if upper == "udp" else (
        TCP(sport=1, dport=2, flags="PA") / b"data")
    ipv6_rule = bytes(IPv6(src=A, dst=B) / layer)
    # RFC 6741 4.2: the checksum of the same segment between the bare identifiers
    ilnp_rule = bytes(IPv6(src=_nid_only(A), dst=_nid_only(B)) / layer)
    at = 40 + (6 if upper == "udp" else 16)
    expected_ipv6 = int.from_bytes(ipv6_rule[at : at + 2], "big")
    expected_ilnp = int.from_bytes(ilnp_rule[at : at + 2], "big")
    assert expected_ipv6 != expected_ilnp
    assert ilnp.compute_checksum(ipv6_rule, "ipv6") == expected_ipv6
    assert ilnp.compute_checksum(ipv6_rule, "ilnp") == expected_ilnp
    assert ilnp.compute_checksum(ipv6_rule) == expected_ilnp  # the default rule is ILNP's
    assert ilnp.verify_checksum(ipv6_rule, "ipv6") and not ilnp.verify_checksum(ipv6_rule)
    buf = bytearray(ipv6_rule)
    assert ilnp.fill_checksum(buf, "ilnp") == expected_ilnp
    assert buf == ipv6_rule[:at] + ilnp_rule[at : at + 2] + ipv6_rule[at + 2 :]
    assert ilnp.verify_checksum(buf, "ilnp") and not ilnp.verify_checksum(buf, "ipv6")
    # a locator change needs nothing under the ILNP rule
    ilnp.set_source_locator(buf, L_C)
    ilnp.set_destination_locator(buf, L_D)
    assert ilnp.verify_checksum(buf, "ilnp")
    # conversions
    assert ilnp.convert_checksum(buf, "ilnp", "ipv6") == ilnp.compute_checksum(buf, "ipv6")
    assert ilnp.verify_checksum(buf, "ipv6")
    assert ilnp.convert_checksum(buf, "ipv6", "ipv6") == ilnp.compute_checksum(buf, "ipv6")
    assert ilnp.convert_checksum(buf, "ipv6", "ilnp") == ilnp.compute_checksum(buf, "ilnp")
    assert ilnp.verify_checksum(buf, "ilnp")


def test_icmpv6_checksum_ignores_the_rule() -> None:
    echo = bytes(IPv6(src=A, dst=B) / ICMPv6EchoRequest(id=1, data=b"abc"))
    assert ilnp.verify_checksum(echo, "ilnp") and ilnp.verify_checksum(echo, "ipv6")
    assert ilnp.compute_checksum(echo, "ilnp") == ilnp.compute_checksum(echo, "ipv6") == (
        int.from_bytes(echo[42:44], "big"))
    buf = bytearray(echo)
    assert ilnp.convert_checksum(buf, "ipv6", "ilnp") == int.from_bytes(echo[42:44], "big")
    assert buf == echo


def test_routing_header_final_destination_in_the_ilnp_pseudo_header() -> None:
    final = str(ilnp.ilv(L_D, 0x77))
    layers = IPv6(src=A, dst=B) / IPv6ExtHdrRouting(addresses=[final], segleft=1)
    data = bytes(layers / UDP(sport=1, dport=2) / b"r")
    reference = bytes(IPv6(src=_nid_only(A), dst=_nid_only(final)) / UDP(sport=1, dport=2)
                      / b"r")
    assert ilnp.compute_checksum(data, "ilnp") == int.from_bytes(reference[46:48], "big")
    assert ilnp.verify_checksum(data, "ipv6")


def _zero_sum_udp(rule: Rule) -> bytearray:
    """A UDP packet whose checksum computes to 0 under `rule` (its field left 0)."""
    buf = bytearray(_udp(payload=b"\0\0"))
    buf[46:48] = b"\0\0"
    value = ilnp.compute_checksum(buf, rule)
    # Adding ~value to the payload makes the sum -0: the complement, the checksum, is 0.
    buf[48:50] = (value if value != 0xFFFF else 0).to_bytes(2, "big")
    buf[46:48] = b"\0\0"
    return buf


@pytest.mark.parametrize("rule", RULES)
def test_udp_zero_checksum(rule: Rule) -> None:
    buf = _zero_sum_udp(rule)
    assert ilnp.compute_checksum(buf, rule) == 0xFFFF
    assert not ilnp.verify_checksum(buf, rule)  # 0 is not allowed
    assert ilnp.fill_checksum(buf, rule) == 0xFFFF
    assert ilnp.verify_checksum(buf, rule)
    # no checksum (0, RFC 6935 tunnels) stays none when converted
    none = bytearray(_udp())
    none[46:48] = b"\0\0"
    assert ilnp.convert_checksum(none, rule, OTHER[rule]) == 0
    assert none[46:48] == b"\0\0"


@pytest.mark.parametrize("rule", RULES)
def test_conversion_to_a_zero_sum_gives_ffff(rule: Rule) -> None:
    other = OTHER[rule]
    buf = _zero_sum_udp(other)
    ilnp.fill_checksum(buf, rule)
    assert ilnp.convert_checksum(buf, rule, other) == 0xFFFF
    assert ilnp.verify_checksum(buf, other)


def test_checksum_refusals() -> None:
    fragment = _udp(extension_headers=(ExtensionHeader.fragment(0, True, 7),))
    later = build_packet(IPv6Header(bytes(16), bytes(16)), payload=b"y" * 16,
                         extension_headers=(ExtensionHeader(44, bytes((0, 0x10, 0, 0, 0, 7)),
                                                            IPPROTO_UDP),))
    sctp = build_packet(IPv6Header(bytes(16), bytes(16), next_header=132), payload=bytes(12))
    v4 = build_packet(IPv4Header(src=bytes(4), dst=bytes(4)), UDPHeader(1, 2))
    for data, reason in ((fragment, "fragmented"), (later, "fragmented"),
                         (sctp, "unsupported-protocol"), (v4, "bad-version"),
                         (b"\x60", "truncated")):
        for call in (ilnp.compute_checksum, ilnp.verify_checksum,
                     lambda d: ilnp.fill_checksum(bytearray(d))):
            with pytest.raises(PacketError) as error:
                call(data)
            assert error.value.reason == reason
    for data, reason in ((later, "fragmented"), (sctp, "unsupported-protocol"),
                         (v4, "bad-version")):
        with pytest.raises(PacketError) as error:
            ilnp.convert_checksum(bytearray(data), "ilnp", "ipv6")
        assert error.value.reason == reason
    # a first fragment is converted incrementally: its checksum covers the whole datagram
    whole = _udp()
    buf = bytearray(fragment)
    ilnp.convert_checksum(buf, "ipv6", "ilnp")
    assert buf[54:56] == ilnp.fill_checksum(bytearray(whole), "ilnp").to_bytes(2, "big")
    with pytest.raises(ValueError):
        ilnp.compute_checksum(whole, "ipv4")
    with pytest.raises(ValueError):
        ilnp.convert_checksum(bytearray(whole), "ilnp", "nat")


@settings(FUZZ, max_examples=300)
@given(ilnp_packets())
def test_convert_equals_recompute(data: bytes) -> None:
    buf = bytearray(data)
    protocol = parse_packet(buf).protocol
    for source in RULES:
        target = OTHER[source]
        ilnp.fill_checksum(buf, source)
        value = ilnp.convert_checksum(buf, source, target)
        assert ilnp.verify_checksum(buf, target)
        assert value == ilnp.compute_checksum(buf, target)
        if protocol == IPPROTO_ICMPV6:
            assert ilnp.verify_checksum(buf, source)


# -- the per-packet locator rewrite --------------------------------------------------------------
@settings(FUZZ, max_examples=500)
@given(ilnp_packets(fragments=True), st.integers(0, (1 << 64) - 1),
       st.integers(0, (1 << 64) - 1), st.sampled_from(RULES))
def test_rewrite_locators_keeps_checksums_right(data: bytes, src: int, dst: int,
                                                rule: Rule) -> None:
    buf = bytearray(data)
    packet = parse_packet(buf)
    # A first fragment's checksum covers the whole datagram: its twin with the more
    # fragments bit cleared (an atomic fragment, a whole packet) is the reference.
    twin = bytearray(buf)
    if packet.is_fragment:
        twin[packet.fragment_header_offset + 3] &= 0xFE
    ilnp.fill_checksum(twin, rule)
    at = packet.transport_offset + {6: 16, 17: 6, 58: 2}[packet.protocol]
    buf[at : at + 2] = twin[at : at + 2]
    before = bytes(buf)
    nids = (bytes(buf[16:24]), bytes(buf[32:40]))
    ilnp.rewrite_locators(buf, src, dst, rule)
    ilnp.rewrite_locators(twin, src, dst, rule)
    assert ilnp.locators(buf) == (src, dst)
    assert (bytes(buf[16:24]), bytes(buf[32:40])) == nids
    # only the locators and the checksum field changed
    assert buf[:8] == before[:8] and buf[40:at] == before[40:at]
    assert buf[at + 2 :] == before[at + 2 :]
    if rule == "ilnp" and packet.protocol != IPPROTO_ICMPV6:
        assert buf[at : at + 2] == before[at : at + 2]
    assert buf[at : at + 2] == twin[at : at + 2]
    # the incremental update equals a recomputation from scratch
    assert ilnp.verify_checksum(twin, rule)
    assert ilnp.compute_checksum(twin, rule) == int.from_bytes(twin[at : at + 2], "big")
    # and back, to the same bytes
    ilnp.rewrite_locators(buf, *ilnp.locators(before), rule)
    assert buf == before


def test_rewrite_locators_by_hand() -> None:
    ipv6_rule = bytearray(bytes(IPv6(src=A, dst=B) / TCP(sport=1, dport=2) / b"x"))
    ilnp_rule = bytearray(ipv6_rule)
    ilnp.fill_checksum(ilnp_rule, "ilnp")
    expected = bytes(IPv6(src=str(ilnp.ilv(L_C, NID_A)), dst=str(ilnp.ilv(L_D, NID_B)))
                     / TCP(sport=1, dport=2) / b"x")
    ilnp.rewrite_locators(ipv6_rule, L_C, L_D, "ipv6")
    assert ipv6_rule == expected  # scapy's full recomputation
    kept = bytes(ilnp_rule[56:58])
    ilnp.rewrite_locators(ilnp_rule, L_C, L_D)
    assert ilnp_rule[56:58] == kept and ilnp_rule[:56] == expected[:56]
    # ICMPv6 is fixed under both rules (RFC 6741 4.3)
    for rule in RULES:
        echo = bytearray(bytes(IPv6(src=A, dst=B) / ICMPv6EchoRequest(id=7, data=b"e")))
        ilnp.rewrite_locators(echo, L_C, L_D, rule)
        assert echo == bytes(IPv6(src=str(ilnp.ilv(L_C, NID_A)), dst=str(ilnp.ilv(L_D, NID_B)))
                             / ICMPv6EchoRequest(id=7, data=b"e"))
    # a Locator Update with its nonce, behind a link header, in a memoryview
    lu = ilnp.locator_update_packet(A, B, LocatorUpdate(LU_ADVERTISEMENT, ENTRIES),
                                    nonce=NONCE4)
    framed = bytearray(b"\xee" * 14 + lu)
    ilnp.rewrite_locators(memoryview(framed), L_C, L_D, offset=14)
    moved = ilnp.parse_locator_update_packet(framed, 14)
    assert (moved.src, moved.dst) == (ilnp.ilv(L_C, NID_A), ilnp.ilv(L_D, NID_B))
    assert moved.nonce == NONCE4 and framed[:14] == b"\xee" * 14
    # the same locators: nothing changes
    again = bytearray(expected)
    ilnp.rewrite_locators(again, L_C, L_D, "ipv6")
    assert again == expected


@pytest.mark.parametrize("proto", ["tcp", "udp", "icmpv6"])
def test_rewrite_locators_of_a_partial_checksum_completes_right(proto: str) -> None:
    # a NEEDS_CSUM packet from TUN: the field holds the pseudo-header sum, not complemented
    layer = {"tcp": TCP(sport=1, dport=2), "udp": UDP(sport=1, dport=2),
             "icmpv6": ICMPv6EchoRequest(id=7)}[proto]
    packet = bytearray(bytes(IPv6(src=A, dst=B) / layer / b"payload"))
    field = 40 + {"tcp": 16, "udp": 6, "icmpv6": 2}[proto]
    protocol = packet[6]
    packet[field:field + 2] = b"\0\0"
    pseudo = pseudo_header_sum(packet[8:24], packet[24:40], protocol, len(packet) - 40)
    packet[field:field + 2] = pseudo.to_bytes(2, "big")
    ilnp.rewrite_locators(packet, L_C, L_D, "ipv6", partial=True)
    complete_partial_checksum(packet, 40, field - 40)
    assert ilnp.verify_checksum(packet, "ipv6")


@pytest.mark.parametrize("rule", RULES)
def test_rewrite_locators_udp_zero(rule: Rule) -> None:
    # no checksum stays none
    none = bytearray(_udp())
    none[46:48] = b"\0\0"
    ilnp.rewrite_locators(none, L_C, L_D, rule)
    assert none[46:48] == b"\0\0"
    # a result of 0 is sent as 0xFFFF: a packet whose checksum computes to 0 once its source
    # locator is L_C
    buf = bytearray(_udp(payload=b"\0\0"))
    ilnp.set_source_locator(buf, L_C)
    buf[46:48] = b"\0\0"
    value = ilnp.compute_checksum(buf, "ipv6")
    buf[48:50] = (value if value != 0xFFFF else 0).to_bytes(2, "big")
    assert ilnp.compute_checksum(buf, "ipv6") == 0xFFFF
    ilnp.set_source_locator(buf, L_A)
    ilnp.fill_checksum(buf, "ipv6")
    ilnp.rewrite_locators(buf, L_C, L_B, "ipv6")
    assert buf[46:48] == b"\xff\xff" and ilnp.verify_checksum(buf, "ipv6")


def test_rewrite_locators_refusals_leave_the_buffer_alone() -> None:
    short_tcp = bytearray(build_packet(IPv6Header(bytes(16), bytes(16), next_header=IPPROTO_TCP),
                                       payload=bytes(12)))
    cases = [(bytearray(39), "truncated"), (bytearray(b"\x45" + bytes(60)), "bad-version"),
             (bytearray(_udp()[:-1]), "truncated"), (short_tcp, "truncated"),
             (bytearray(_udp(extension_headers=(ExtensionHeader.hop_by_hop([]),)))[:44],
              "truncated")]
    for buf, reason in cases:
        before = bytes(buf)
        with pytest.raises(PacketError) as error:
            ilnp.rewrite_locators(buf, L_C, L_D, "ipv6")
        assert error.value.reason == reason and buf == before
    buf = bytearray(_udp())
    for bad in ((1 << 64, 0, "ilnp"), (0, -1, "ilnp"), (0, 0, "ipv4")):
        with pytest.raises(ValueError):
            ilnp.rewrite_locators(buf, *bad)
    assert buf == _udp()
    # a later fragment gets its locators only; ESP too
    later = bytearray(build_packet(IPv6Header(bytes(16), bytes(16)), payload=b"y" * 16,
                                   extension_headers=(ExtensionHeader(
                                       44, bytes((0, 0x10, 0, 0, 0, 7)), IPPROTO_UDP),)))
    before = bytes(later)
    ilnp.rewrite_locators(later, L_C, L_D, "ipv6")
    assert later[40:] == before[40:] and ilnp.locators(later) == (L_C, L_D)


# -- fuzzing -------------------------------------------------------------------------------------
@functools.cache
def corpus() -> tuple[bytes, ...]:
    plain = _udp()
    update = LocatorUpdate(LU_ADVERTISEMENT, ENTRIES)
    packets = [
        ilnp.insert_nonce(plain, NONCE4),
        ilnp.insert_nonce(bytes(IPv6(src=A, dst=B) / TCP() / b"t"), NONCE12),
        ilnp.locator_update_packet(A, B, update, nonce=NONCE4),
        ilnp.locator_update_packet(B, A, update.acknowledgement(), nonce=NONCE12),
        ilnp.locator_update_packet(A, B, update),
        ilnp.insert_nonce(bytes(IPv6(src=A, dst=B) / IPv6ExtHdrDestOpt(
            options=[HAO(hoa="2001:db8::77")]) / UDP() / b"h"), NONCE4),
        bytes(IPv6(src=A, dst=B) / IPv6ExtHdrHopByHop() / IPv6ExtHdrRouting(
            addresses=[B], segleft=1) / ICMPv6EchoRequest()),
        _nonce_fragment(),
        _nonce_under_ah(),
        plain,
    ]
    return tuple(packets)


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(corpus())))
    for _ in range(draw(st.integers(1, 4))):
        action = draw(st.sampled_from(["truncate", "cut-consistently", "flip", "set", "insert",
                                       "delete"]))
        if action == "truncate":
            del data[draw(st.integers(0, len(data))):]
        elif action == "cut-consistently":
            del data[draw(st.integers(0, len(data))):]
            if len(data) >= 40:
                data[4:6] = (len(data) - 40).to_bytes(2, "big")
        elif not data:
            continue
        elif action == "flip":
            data[draw(st.integers(0, len(data) - 1))] ^= 1 << draw(st.integers(0, 7))
        elif action == "set":
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
        elif action == "insert":
            at = draw(st.integers(0, len(data)))
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        else:
            at = draw(st.integers(0, len(data) - 1))
            del data[at : at + draw(st.integers(1, 8))]
    return bytes(data)


ipv6_like = st.binary(max_size=120).map(lambda tail: b"\x60" + tail)
inputs = st.one_of(st.binary(max_size=120), ipv6_like, mutated())


def _every_call(data: bytes, offset: int) -> list[tuple[str, Callable[[bytearray], object]]]:
    return [
        ("find_nonce", lambda b: ilnp.find_nonce(b, offset)),
        ("insert_nonce", lambda b: ilnp.insert_nonce(b, NONCE4, offset)),
        ("insert_nonce12", lambda b: ilnp.insert_nonce(b, NONCE12, offset)),
        ("remove_nonce", lambda b: ilnp.remove_nonce(b, offset)),
        ("decode", lambda b: LocatorUpdate.decode(b[offset:])),
        ("parse_lu", lambda b: ilnp.parse_locator_update_packet(b, offset)),
        ("compute", lambda b: ilnp.compute_checksum(b, "ilnp", offset)),
        ("verify", lambda b: ilnp.verify_checksum(b, "ipv6", offset)),
        ("locators", lambda b: ilnp.locators(b, offset)),
        ("source", lambda b: ilnp.source_locator(b, offset)),
        ("destination", lambda b: ilnp.destination_locator(b, offset)),
    ]


def _in_place_calls(offset: int) -> list[Callable[[bytearray], object]]:
    return [
        lambda b: ilnp.fill_checksum(b, "ilnp", offset),
        lambda b: ilnp.convert_checksum(b, "ilnp", "ipv6", offset),
        lambda b: ilnp.convert_checksum(b, "ipv6", "ilnp", offset),
        lambda b: ilnp.rewrite_locators(b, L_C, L_D, "ilnp", offset),
        lambda b: ilnp.rewrite_locators(b, L_C, L_D, "ipv6", offset),
        lambda b: ilnp.set_source_locator(b, L_C, offset),
        lambda b: ilnp.set_destination_locator(b, L_D, offset),
    ]


@settings(FUZZ, max_examples=3000)
@given(inputs, st.integers(0, 3))
def test_every_parser_raises_only_packet_error(data: bytes, offset: int) -> None:
    framed = bytes(offset) + data
    for name, call in _every_call(data, offset):
        result = only_packet_errors(functools.partial(call, bytearray(framed)))
        if name == "remove_nonce" and not isinstance(result, PacketError):
            assert isinstance(result, bytes) and only_packet_errors(
                lambda r=result: ilnp.find_nonce(r)) is None
        if name.startswith("insert") and not isinstance(result, PacketError):
            assert isinstance(result, bytes)
            assert ilnp.find_nonce(result) == (NONCE4 if name == "insert_nonce" else NONCE12)
            # (not always byte for byte: a header of padding alone goes with the nonce)
            assert ilnp.find_nonce(ilnp.remove_nonce(result)) is None
    for call in _in_place_calls(offset):
        buf = bytearray(framed)
        result = only_packet_errors(functools.partial(call, buf))
        if isinstance(result, PacketError):
            assert buf == framed  # refused: untouched


def test_every_corpus_packet_cut_short_everywhere() -> None:
    for data in corpus():
        for cut in range(len(data) + 1):
            for fix_length in (False, True):
                packet = bytearray(data[:cut])
                if fix_length and cut >= 40:
                    packet[4:6] = (cut - 40).to_bytes(2, "big")
                for _, call in _every_call(bytes(packet), 0):
                    only_packet_errors(functools.partial(call, bytearray(packet)))
                for call in _in_place_calls(0):
                    buf = bytearray(packet)
                    if isinstance(only_packet_errors(functools.partial(call, buf)), PacketError):
                        assert buf == packet


@settings(FUZZ, max_examples=1000)
@given(st.binary(max_size=64))
def test_locator_update_decode_raises_only_packet_error(data: bytes) -> None:
    result = only_packet_errors(lambda: LocatorUpdate.decode(data))
    if not isinstance(result, PacketError):
        assert isinstance(result, LocatorUpdate) and result.encode()[4:] == data[4:]
    # with a plausible head, to reach past the first checks
    head = bytes((156, 0, 0, 0)) + data
    result = only_packet_errors(lambda: LocatorUpdate.decode(head))
    if not isinstance(result, PacketError):
        assert isinstance(result, LocatorUpdate) and result.encode()[4:] == head[4:]
