"""Malformed input: every parser and rewriter raises PacketError or succeeds, never anything else;
a rewrite that refuses a packet leaves it untouched; the fast paths agree with the careful ones."""

from __future__ import annotations

import functools
from collections.abc import Callable

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from scapy.layers.inet import ICMP, IP, TCP, UDP, IPOption_Router_Alert
from scapy.layers.inet6 import (
    HAO,
    ICMPv6DestUnreach,
    ICMPv6EchoRequest,
    IPv6,
    IPv6ExtHdrDestOpt,
    IPv6ExtHdrFragment,
    IPv6ExtHdrHopByHop,
    IPv6ExtHdrRouting,
)

from ipshift.packet import (
    ExtensionHeader,
    FlowRewrite,
    ICMPHeader,
    IPv4Header,
    IPv6Header,
    PacketError,
    TCPHeader,
    UDPHeader,
    decode_ipv4_options,
    decode_ipv6_options,
    decode_tcp_options,
    decrement_hop_limit,
    parse_packet,
    walk_header_chain,
)
from ipshift.packet.view import _parse_checked

FUZZ = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])


@functools.cache
def corpus() -> tuple[bytes, ...]:
    """Valid packets of every shape, to mutate (documentation addresses)."""
    v4 = dict(src="192.0.2.1", dst="198.51.100.2")
    v6 = dict(src="2001:db8::1", dst="2001:db8::2")
    packets = [
        IP(**v4) / TCP(sport=1, dport=2, options=[("MSS", 1460), ("SAckOK", b"")]) / b"data",
        IP(**v4, options=[IPOption_Router_Alert()]) / UDP(sport=53, dport=53) / b"query",
        IP(**v4) / ICMP(type=8, id=1, seq=2) / b"ping",
        IP(src="203.0.113.7", dst="192.0.2.1") / ICMP(type=3, code=4)
        / IP(**v4) / UDP(sport=5, dport=6) / b"quoted",
        IP(**v4, flags="MF") / TCP(sport=1, dport=2) / (b"x" * 16),
        IP(**v4, frag=3) / (b"y" * 24),
        IPv6(**v6) / TCP(sport=3, dport=4) / b"six",
        IPv6(**v6) / UDP(sport=5, dport=6) / b"",
        IPv6(**v6) / ICMPv6EchoRequest(id=9, data=b"abc"),
        IPv6(**v6) / IPv6ExtHdrHopByHop() / IPv6ExtHdrRouting(addresses=["2001:db8::9"],
                                                             segleft=1) / TCP() / b"r",
        IPv6(**v6) / IPv6ExtHdrFragment(m=1, id=3) / UDP() / b"frag",
        IPv6(**v6) / IPv6ExtHdrFragment(offset=2, id=3) / b"later fragment",
        IPv6(**v6) / IPv6ExtHdrDestOpt(options=[HAO(hoa="2001:db8::77")]) / UDP() / b"hao",
        IPv6(src="2001:db8::5", dst="2001:db8::1") / ICMPv6DestUnreach()
        / IPv6(**v6) / TCP(sport=7, dport=8) / b"quoted",
    ]
    return tuple(bytes(p) for p in packets)


REWRITES = (
    FlowRewrite(src=("192.0.2.1", "203.0.113.9")),
    FlowRewrite(dst=("192.0.2.1", "203.0.113.9"), sport=(5, 6)),
    FlowRewrite(src=("2001:db8::1", "2001:db8::99"), dst=("2001:db8::2", "2001:db8::3")),
    FlowRewrite(dst=("2001:db8::1", "2001:db8::42")),
    FlowRewrite(sport=(1, 1000)),
)


@st.composite
def mutated_packets(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(corpus())))
    for _ in range(draw(st.integers(1, 4))):
        action = draw(st.sampled_from(["truncate", "flip", "set", "insert", "delete",
                                       "cut-consistently"]))
        if action == "truncate":
            del data[draw(st.integers(0, len(data))) :]
        elif action == "cut-consistently":
            # Shorten the packet and its IP length field with it: a short upper-layer header
            # in a packet whose lengths add up (only the upper layer's checks can refuse it).
            del data[draw(st.integers(0, len(data))) :]
            if len(data) >= 40 and data[0] >> 4 == 6:
                data[4:6] = (len(data) - 40).to_bytes(2, "big")
            elif len(data) >= 20 and data[0] >> 4 == 4:
                data[2:4] = len(data).to_bytes(2, "big")
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


# IP-looking garbage reaches deeper than plain random bytes.
ip_like = st.tuples(st.sampled_from([0x45, 0x46, 0x4F, 0x40, 0x60, 0x6F]), st.binary(max_size=120)
                    ).map(lambda t: bytes([t[0]]) + t[1])
inputs = st.one_of(st.binary(max_size=120), ip_like, mutated_packets())


def careful(rewrite: FlowRewrite) -> FlowRewrite:
    """A copy of `rewrite` with its IPv4 and IPv6 fast paths switched off: every packet takes
    the careful path (`_apply_general` alone still takes the IPv6 fast path)."""
    copy = FlowRewrite.__new__(FlowRewrite)
    for name in FlowRewrite.__slots__:
        setattr(copy, name, getattr(rewrite, name))
    copy._fast = (False, *rewrite._fast[1:])
    copy._fast_v6 = (False, *rewrite._fast_v6[1:])
    return copy


CAREFUL = {id(rewrite): careful(rewrite) for rewrite in REWRITES}


def only_packet_errors(call: Callable[[], object]) -> object:
    try:
        return call()
    except PacketError as error:
        assert error.reason and isinstance(error.reason, str)
        return error


def _outcome(result: object) -> object:
    if isinstance(result, PacketError):
        return ("error", result.reason)
    assert not isinstance(result, BaseException)
    return (type(result).__name__, result.offset, result.transport_offset,  # type: ignore[attr-defined]
            result.end, result.protocol)  # type: ignore[attr-defined]


@settings(FUZZ, max_examples=3000)
@given(inputs)
def test_parse_packet_raises_only_packet_error(data: bytes) -> None:
    result = only_packet_errors(lambda: parse_packet(data))
    # The fast path and the careful path agree, on the verdict and on the reason.
    assert _outcome(result) == _outcome(only_packet_errors(lambda: _parse_checked(data, 0)))
    if isinstance(result, PacketError):
        return
    packet = parse_packet(memoryview(data))  # memoryview input parses the same
    for read in (
        lambda: packet.src_ip, lambda: packet.dst_ip, lambda: packet.pseudo_src,
        lambda: packet.pseudo_dst, lambda: bytes(packet.payload), lambda: bytes(packet.segment),
        lambda: packet.ports, packet.flow_key, packet.ip_header, packet.transport_header,
        packet.verify_ip_checksum, packet.verify_transport_checksum, lambda: packet.hop_limit,
        lambda: packet.is_fragment, lambda: packet.has_transport_header, lambda: repr(packet),
        lambda: getattr(packet, "extension_headers", list)(),
    ):
        only_packet_errors(read)
    header = packet.ip_header()
    if isinstance(header, IPv4Header):
        only_packet_errors(header.option_list)
    transport = only_packet_errors(packet.transport_header)
    if isinstance(transport, TCPHeader):
        only_packet_errors(transport.option_list)


@settings(FUZZ, max_examples=2000)
@given(inputs, st.integers(0, 4), st.sampled_from(REWRITES), st.booleans())
def test_rewrite_raises_only_packet_error_and_refusals_touch_nothing(
    data: bytes, offset: int, rewrite: FlowRewrite, partial: bool
) -> None:
    buf = bytearray(bytes(offset) + data)
    result = only_packet_errors(lambda: rewrite.apply(buf, offset, partial))
    if result is not True:
        assert buf == bytes(offset) + data
    # The fast path agrees with the general one.
    other = bytearray(bytes(offset) + data)
    general = only_packet_errors(lambda: rewrite._apply_general(other, offset, partial))
    assert (type(general), getattr(general, "reason", general)) == (
        type(result), getattr(result, "reason", result))
    assert other == buf
    # ... and with the fast paths really off.
    other = bytearray(bytes(offset) + data)
    slow = only_packet_errors(lambda: CAREFUL[id(rewrite)].apply(other, offset, partial))
    assert (type(slow), getattr(slow, "reason", slow)) == (
        type(result), getattr(result, "reason", result))
    assert other == buf


@pytest.mark.parametrize("rewrite", REWRITES, ids=repr)
def test_fast_paths_agree_on_short_upper_layer_headers(rewrite: FlowRewrite) -> None:
    """Every packet of the corpus cut short at every length with its IP length field fixed up
    (IPv6 TCP of 18-19 bytes among them): the fast paths give what the careful path gives."""
    for data in corpus():
        for cut in range(len(data) + 1):
            packet = bytearray(data[:cut])
            if cut >= 40 and packet[0] >> 4 == 6:
                packet[4:6] = (cut - 40).to_bytes(2, "big")
            elif cut >= 20 and packet[0] >> 4 == 4:
                packet[2:4] = cut.to_bytes(2, "big")
            for partial in (False, True):
                fast, slow = bytearray(packet), bytearray(packet)
                result = only_packet_errors(lambda: rewrite.apply(fast, 0, partial))  # noqa: B023
                expected = only_packet_errors(
                    lambda: CAREFUL[id(rewrite)].apply(slow, 0, partial))  # noqa: B023
                assert (type(result), getattr(result, "reason", result), fast) == (
                    type(expected), getattr(expected, "reason", expected), slow), (
                    cut, bytes(packet).hex())


@settings(FUZZ, max_examples=500)
@given(inputs)
def test_hop_limit_raises_only_packet_error(data: bytes) -> None:
    buf = bytearray(data)
    only_packet_errors(lambda: decrement_hop_limit(buf))


@settings(FUZZ, max_examples=1500)
@given(st.binary(max_size=80), st.integers(0, 8))
def test_header_decoders_raise_only_packet_error(data: bytes, offset: int) -> None:
    assume(offset <= len(data))
    for decode in (IPv4Header.parse, IPv6Header.parse, TCPHeader.parse, UDPHeader.parse,
                   ICMPHeader.parse):
        only_packet_errors(functools.partial(decode, data, offset))
    for kind in (0, 43, 44, 51, 60):
        only_packet_errors(functools.partial(ExtensionHeader.parse, kind, data, offset))
    for options in (decode_ipv4_options, decode_tcp_options, decode_ipv6_options):
        only_packet_errors(functools.partial(options, data))
    if len(data) >= 40:
        only_packet_errors(lambda: walk_header_chain(data, 0, len(data)))


def test_corpus_parses_and_mutations_are_caught() -> None:
    for data in corpus():
        packet = parse_packet(data)
        assert packet.verify_ip_checksum()
        for cut in range(len(data)):
            only_packet_errors(functools.partial(parse_packet, data[:cut]))
        truncated = only_packet_errors(functools.partial(parse_packet, data[: packet.end - 1]))
        assert isinstance(truncated, PacketError) and truncated.reason in (
            "truncated", "length-mismatch")
