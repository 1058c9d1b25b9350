"""The virtio_net_hdr codec: layout, checks, and fuzzing (malformed -> VnetHeaderError only)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ipshift.packet import PacketError, vnet

# What a Linux 6.18 TUN device handed over (captured with IFF_VNET_HDR and TSO/USO on):
# a UDP GSO super-packet of 5028 bytes (gso_size 1000, L4 at 20, checksum at +6), a TCP SYN
# with a partial checksum, and an IPv6 packet with a complete one.
CAPTURED = [
    (bytes.fromhex("01051c00e80314000600"), vnet.VnetHeader(1, vnet.GSO_UDP_L4, 28, 1000, 20, 6)),
    (bytes.fromhex("01000000000014001000"), vnet.VnetHeader(1, vnet.GSO_NONE, 0, 0, 20, 16)),
    (bytes(10), vnet.VnetHeader()),
]


@pytest.mark.parametrize(("raw", "header"), CAPTURED)
def test_decode_captured_headers(raw: bytes, header: vnet.VnetHeader) -> None:
    assert vnet.decode(raw) == header
    assert header.encode() == raw


def test_properties() -> None:
    header = vnet.VnetHeader(vnet.F_NEEDS_CSUM, vnet.GSO_TCPV6 | vnet.GSO_ECN, 74, 1428, 40, 16)
    assert header.needs_csum and not header.data_valid
    assert header.gso == vnet.GSO_TCPV6 and header.ecn
    assert vnet.VnetHeader(vnet.F_DATA_VALID).data_valid
    assert vnet.VnetHeader().encode() == vnet.PLAIN
    assert vnet.HEADER_LEN == 10


def test_split_returns_the_packet() -> None:
    header, packet = vnet.split(vnet.VnetHeader().encode() + b"\x45packet")
    assert header == vnet.VnetHeader() and bytes(packet) == b"\x45packet"


@pytest.mark.parametrize(
    ("header", "packet_len", "reason"),
    [
        (vnet.VnetHeader(flags=0x08), None, "vnet-flags"),
        (vnet.VnetHeader(flags=vnet.F_RSC_INFO), None, "vnet-flags"),
        (vnet.VnetHeader(gso_type=vnet.GSO_UDP), None, "vnet-gso-type"),  # legacy UFO
        (vnet.VnetHeader(gso_type=0x42), None, "vnet-gso-type"),
        (vnet.VnetHeader(gso_type=vnet.GSO_ECN), None, "vnet-gso-type"),
        (vnet.VnetHeader(vnet.F_NEEDS_CSUM, vnet.GSO_TCPV4, 54, 0, 20, 16), None, "vnet-gso-size"),
        (vnet.VnetHeader(0, vnet.GSO_TCPV4, 54, 1448, 0, 0), None, "vnet-csum"),
        (vnet.VnetHeader(0, 0, 0, 0, 20, 16), None, "vnet-csum"),
        (vnet.VnetHeader(vnet.F_NEEDS_CSUM, 0, 0, 0, 20, 16), 37, "vnet-csum"),
        (vnet.VnetHeader(0, 0, 100, 0, 0, 0), 60, "vnet-hdr-len"),
    ],
)
def test_inconsistent_headers_are_rejected(
    header: vnet.VnetHeader, packet_len: int | None, reason: str
) -> None:
    with pytest.raises(vnet.VnetHeaderError) as info:
        vnet.decode(header.encode(), packet_len)
    assert info.value.reason == reason
    assert isinstance(info.value, PacketError)


def test_checksum_field_just_inside_the_packet_is_fine() -> None:
    header = vnet.VnetHeader(vnet.F_NEEDS_CSUM, 0, 0, 0, 20, 16)
    assert vnet.decode(header.encode(), 38) == header


def test_truncated() -> None:
    with pytest.raises(vnet.VnetHeaderError) as info:
        vnet.decode(b"\x01\x00\x00")
    assert info.value.reason == "truncated"


@given(
    flags=st.integers(0, 255), gso_type=st.integers(0, 255), hdr_len=st.integers(0, 0xFFFF),
    gso_size=st.integers(0, 0xFFFF), start=st.integers(0, 0xFFFF), offset=st.integers(0, 0xFFFF),
)
def test_encode_decode_roundtrip(
    flags: int, gso_type: int, hdr_len: int, gso_size: int, start: int, offset: int
) -> None:
    header = vnet.VnetHeader(flags, gso_type, hdr_len, gso_size, start, offset)
    raw = header.encode()
    assert len(raw) == vnet.HEADER_LEN
    try:
        assert vnet.decode(raw) == header
    except vnet.VnetHeaderError:
        return
    header.check()


@given(st.binary(max_size=64), st.one_of(st.none(), st.integers(0, 70000)))
def test_fuzz_only_raises_the_typed_error(data: bytes, packet_len: int | None) -> None:
    try:
        header = vnet.decode(data, packet_len)
    except vnet.VnetHeaderError:
        return
    assert header.encode() == data[:vnet.HEADER_LEN]


@given(st.binary(max_size=200))
def test_split_fuzz(data: bytes) -> None:
    try:
        header, packet = vnet.split(data)
    except vnet.VnetHeaderError:
        return
    assert len(packet) == len(data) - vnet.HEADER_LEN
    header.check(len(packet))
