"""The tunnel datagram header: layout, checks, fuzzing."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from scapy.layers.inet import IP, TCP
from scapy.layers.inet6 import IPv6

from ipshift.packet import PacketError
from ipshift.tunnel import wire

TCP4 = bytes(IP(src="203.0.113.1", dst="203.0.113.2") / TCP() / b"data")
TCP6 = bytes(IPv6(src="2001:db8::1", dst="2001:db8::2") / TCP() / b"data")


def test_layout() -> None:
    assert wire.HEADER_LEN == 4
    assert wire.encode_header(wire.FLAG_PARTIAL, 20, 16) == bytes([0x11, 16, 0, 20])
    assert bytes([0x10, 0, 0, 0]) == wire.PLAIN_HEADER
    assert bytes([0x12, 0, 0, 0]) == wire.VERIFIED_HEADER
    assert wire.TunnelHeader(wire.FLAG_PARTIAL, 40, 16).encode() == bytes([0x11, 16, 0, 40])


@pytest.mark.parametrize("inner", [TCP4, TCP6])
def test_decode(inner: bytes) -> None:
    start = 20 if inner[0] >> 4 == 4 else 40
    header, packet = wire.decode(wire.encode_header(wire.FLAG_PARTIAL, start, 16) + inner)
    assert header == wire.TunnelHeader(wire.FLAG_PARTIAL, start, 16)
    assert header.partial and not header.verified
    assert bytes(packet) == inner
    header, _ = wire.decode(wire.VERIFIED_HEADER + inner)
    assert header.verified and not header.partial


@pytest.mark.parametrize(
    ("datagram", "reason"),
    [
        (b"\x10\x00", "truncated"),
        (bytes([0x20, 0, 0, 0]) + TCP4, "bad-version"),
        (bytes([0x00, 0, 0, 0]) + TCP4, "bad-version"),
        (bytes([0x14, 0, 0, 0]) + TCP4, "bad-flags"),
        (wire.PLAIN_HEADER + TCP4[:-1], "bad-inner"),
        (wire.PLAIN_HEADER + TCP4 + b"x", "bad-inner"),
        (wire.PLAIN_HEADER + TCP6[:-1], "bad-inner"),
        (wire.PLAIN_HEADER + b"\x55" + TCP4[1:], "bad-inner"),  # IP version 5
        (wire.PLAIN_HEADER + b"\x44" + TCP4[1:], "bad-inner"),  # IHL 4
        (wire.PLAIN_HEADER + TCP4[:19], "bad-inner"),
        (wire.PLAIN_HEADER + TCP6[:39], "bad-inner"),
        (wire.encode_header(0, 20, 16) + TCP4, "bad-inner"),  # positions without PARTIAL
        (wire.encode_header(wire.FLAG_PARTIAL, 19, 16) + TCP4, "bad-inner"),
        (wire.encode_header(wire.FLAG_PARTIAL, 20, 16) + TCP6, "bad-inner"),  # inside IPv6 hdr
        (wire.encode_header(wire.FLAG_PARTIAL, 20, 200) + TCP4, "bad-inner"),
    ],
)
def test_malformed(datagram: bytes, reason: str) -> None:
    with pytest.raises(wire.TunnelHeaderError) as info:
        wire.decode(datagram)
    assert info.value.reason == reason
    assert isinstance(info.value, PacketError)


@given(st.binary(max_size=120))
def test_fuzz_only_raises_the_typed_error(data: bytes) -> None:
    try:
        header, inner = wire.decode(data)
    except wire.TunnelHeaderError:
        return
    assert header.encode() == data[:4] and len(inner) == len(data) - 4


@given(
    flags=st.integers(0, 15), start=st.integers(0, 0xFFFF), offset=st.integers(0, 255),
    inner=st.sampled_from([TCP4, TCP6]),
)
def test_header_fuzz(flags: int, start: int, offset: int, inner: bytes) -> None:
    datagram = wire.encode_header(flags, start, offset) + inner
    try:
        header, packet = wire.decode(datagram)
    except wire.TunnelHeaderError:
        return
    assert (header.flags, header.csum_start, header.csum_offset) == (flags, start, offset)
    if header.partial:
        assert start + offset + 2 <= len(packet)
