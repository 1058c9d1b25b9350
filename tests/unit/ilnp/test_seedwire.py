"""The seed overlay's private format: layout, groups, every malformed input a typed error
(fuzzed), and agreement with the reference peer written from the same description."""

from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ipshift.ilnp import seedwire
from ipshift.ilnp.seedwire import (
    ALL_NODES,
    HEADER_LEN,
    NH_DISCOVERY,
    NH_LOCATOR_UPDATE,
    NH_STP,
    Discovery,
    LocatorUpdate,
    SeedHeader,
    SeedWireError,
    Stp,
    decode,
    decode_body,
    decode_datagram,
    decode_header,
    encode,
    encode_datagram,
    format_locator,
    group_for,
    locator_of_group,
    parse_locator,
)
from ipshift.packet import PacketError
from tests import ilnp_seed_peer

FUZZ = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow], max_examples=300)

L1 = 0x20010DB800000001
MN, CN = 0x1111, 0x2222


def test_header_layout_is_the_seeds() -> None:
    header = SeedHeader(NH_STP, L1, MN, 0x20010DB800000003, CN, hop_limit=3)
    data = encode(header, Stp(7000, 7001, b"hi"))
    assert len(data) == HEADER_LEN + 6
    assert data[:4] == bytes(4)  # version 0, traffic class and flow label zero
    assert struct.unpack("!HBB", data[4:8]) == (6, 42, 3)
    assert struct.unpack("!QQQQ", data[8:40]) == (L1, MN, 0x20010DB800000003, CN)
    assert data[40:] == b"\x1b\x58\x1b\x59hi"
    assert decode(data) == (header, Stp(7000, 7001, b"hi"))


def test_discovery_and_update_layouts() -> None:
    disc = Discovery(MN, L1, True, "mn")
    assert disc.encode() == struct.pack("!QQB", MN, L1, 1) + b"mn"
    assert Discovery.decode(disc.encode()) == disc
    assert Discovery.decode(struct.pack("!QQB", MN, L1, 0)) == Discovery(MN, L1, False, "")
    assert Discovery.decode(struct.pack("!QQB", MN, L1, 0) + "hôte".encode()).hostname == "hôte"
    adv = LocatorUpdate.advertise([L1, 0x20010DB800000002])
    assert adv.encode() == b"\x01" + struct.pack("!QQ", L1, 0x20010DB800000002)
    assert LocatorUpdate.decode(adv.encode()) == adv
    assert LocatorUpdate.acknowledge().encode() == b"\x00"
    assert LocatorUpdate.decode(b"\x00") == LocatorUpdate(True)
    assert LocatorUpdate.decode(b"\x01") == LocatorUpdate(False, ())  # left every network
    assert seedwire.next_header_of(adv) == NH_LOCATOR_UPDATE
    assert seedwire.next_header_of(disc) == NH_DISCOVERY


def test_groups_name_the_uid_and_the_locator() -> None:
    assert group_for(L1, 0) == "ff12::2001:db8:0:1"
    assert group_for(L1, 1000) == "ff12:0:3e8:0:2001:db8:0:1"
    assert group_for(L1, 65536 + 5) == "ff12:0:5:0:2001:db8:0:1"  # modulo 65536
    assert group_for(ALL_NODES, 0) == "ff12::ff02:0:0:1"
    assert parse_locator("ff02:0:0:1") == ALL_NODES
    assert locator_of_group("ff12:0:3e8:0:2001:db8:0:1") == L1
    assert locator_of_group("ff12::2001:db8:0:1%to-sw") == L1
    for bad in ("ff02::1", "ff12:1::2001:db8:0:1", "ff12:0:0:1:2001:db8:0:1", "2001:db8::1",
                "nonsense", ""):
        with pytest.raises(SeedWireError) as info:
            locator_of_group(bad)
        assert info.value.reason == "not-a-locator-group"


def test_locator_text() -> None:
    assert parse_locator("2001:db8:0:1") == L1
    assert parse_locator("2001:db8::1") == L1
    assert parse_locator("::1") == 1
    assert parse_locator("2001:DB8:0:1") == L1
    assert format_locator(L1) == "2001:db8:0:1"
    for bad in ("2001:db8:1", "2001:db8:0:1:2", "2001::db8::1", "2001:db8:0:12345",
                "g:0:0:0", "", "1:2:3::4:5"):
        with pytest.raises(ValueError):
            parse_locator(bad)


@pytest.mark.parametrize(("data", "reason"), [
    (b"", "truncated"),
    (bytes(39), "truncated"),
    (b"\x60" + bytes(39), "bad-version"),
    (SeedHeader(NH_STP, 1, 2, 3, 4).encode(10) + bytes(9), "truncated"),
    (SeedHeader(NH_STP, 1, 2, 3, 4).encode(1) + bytes(2), "trailing-bytes"),
])
def test_bad_headers(data: bytes, reason: str) -> None:
    with pytest.raises(SeedWireError) as info:
        decode_datagram(data)
    assert info.value.reason == reason
    assert info.value.counter == "malformed_" + reason.replace("-", "_")
    assert isinstance(info.value, PacketError)


def test_traffic_class_and_flow_label_are_ignored() -> None:
    data = bytearray(encode(SeedHeader(NH_LOCATOR_UPDATE, 1, 2, 3, 4), LocatorUpdate(True)))
    data[1:4] = b"\x0f\xff\xff"
    assert decode(bytes(data))[1] == LocatorUpdate(True)


@pytest.mark.parametrize(("nh", "payload", "reason"), [
    (NH_STP, b"\x00\x01\x00", "truncated"),
    (NH_DISCOVERY, bytes(16), "truncated"),
    (NH_DISCOVERY, bytes(16) + b"\x02", "bad-discovery-type"),
    (NH_DISCOVERY, bytes(16) + b"\x01\xff\xfe", "bad-hostname"),
    (NH_LOCATOR_UPDATE, b"", "truncated"),
    (NH_LOCATOR_UPDATE, b"\x00\x00", "bad-ack"),
    (NH_LOCATOR_UPDATE, b"\x02", "bad-lu-type"),
    (NH_LOCATOR_UPDATE, b"\x01" + bytes(7), "bad-locator-list"),
    (41, b"", "unknown-next-header"),
])
def test_bad_bodies(nh: int, payload: bytes, reason: str) -> None:
    with pytest.raises(SeedWireError) as info:
        decode_body(nh, payload)
    assert info.value.reason == reason


def test_encoders_refuse_what_cannot_be_written() -> None:
    with pytest.raises(ValueError):
        SeedHeader(256, 0, 0, 0, 0)
    with pytest.raises(ValueError):
        SeedHeader(NH_STP, 1 << 64, 0, 0, 0)
    with pytest.raises(ValueError):
        Stp(70000, 1)
    with pytest.raises(ValueError):
        LocatorUpdate(True, (L1,))
    with pytest.raises(ValueError):
        encode(SeedHeader(NH_STP, 0, 0, 0, 0), LocatorUpdate(True))  # nh does not match
    with pytest.raises(ValueError):
        encode_datagram(SeedHeader(NH_STP, 0, 0, 0, 0), bytes(70000))
    with pytest.raises(ValueError):
        group_for(L1, -1)


def test_forwarded_header_decrements_the_hop_limit() -> None:
    header = SeedHeader(NH_STP, 1, 2, 3, 4, hop_limit=3)
    assert header.forwarded() == SeedHeader(NH_STP, 1, 2, 3, 4, hop_limit=2)


# --- fuzz --------------------------------------------------------------------------------------
u64 = st.integers(0, (1 << 64) - 1)
headers = st.builds(SeedHeader, st.sampled_from([NH_STP, NH_DISCOVERY, NH_LOCATOR_UPDATE]),
                    u64, u64, u64, u64, st.integers(0, 255))
bodies = st.one_of(
    st.builds(Stp, st.integers(0, 0xFFFF), st.integers(0, 0xFFFF), st.binary(max_size=64)),
    st.builds(Discovery, u64, u64, st.booleans(), st.text(max_size=20)),
    st.builds(LocatorUpdate.advertise, st.lists(u64, max_size=6)),
    st.just(LocatorUpdate.acknowledge()),
)


@FUZZ
@given(headers, bodies)
def test_roundtrip(header: SeedHeader, body: seedwire.Body) -> None:
    header = SeedHeader(seedwire.next_header_of(body), header.src_locator, header.src_nid,
                        header.dst_locator, header.dst_nid, header.hop_limit)
    assert decode(encode(header, body)) == (header, body)


@FUZZ
@given(st.binary(max_size=120))
def test_random_bytes_decode_or_raise_the_typed_error(data: bytes) -> None:
    try:
        decode(data)
    except SeedWireError:
        pass
    for nh in (NH_STP, NH_DISCOVERY, NH_LOCATOR_UPDATE):
        try:
            decode_body(nh, data)
        except SeedWireError:
            pass


@FUZZ
@given(headers, bodies, st.lists(st.tuples(st.integers(0, 200), st.integers(0, 255)),
                                 min_size=1, max_size=6), st.integers(0, 200))
def test_mutated_datagrams_decode_or_raise_the_typed_error(
        header: SeedHeader, body: seedwire.Body, flips: list[tuple[int, int]], cut: int) -> None:
    header = SeedHeader(seedwire.next_header_of(body), header.src_locator, header.src_nid,
                        header.dst_locator, header.dst_nid, header.hop_limit)
    data = bytearray(encode(header, body))
    for where, value in flips:
        data[where % len(data)] = value
    for candidate in (bytes(data), bytes(data[:cut])):
        try:
            decode_header(candidate)
            decode(candidate)
        except SeedWireError:
            pass


@FUZZ
@given(u64, st.integers(0, 1 << 20))
def test_groups_roundtrip(locator: int, uid: int) -> None:
    assert locator_of_group(group_for(locator, uid)) == locator
    assert parse_locator(format_locator(locator)) == locator


# --- the reference peer agrees -----------------------------------------------------------------
@FUZZ
@given(u64, st.integers(0, 1 << 20))
def test_reference_peer_names_the_same_groups(locator: int, uid: int) -> None:
    assert ilnp_seed_peer.group(locator, uid) == group_for(locator, uid)
    assert ilnp_seed_peer.loc_text(locator) == format_locator(locator)
    assert ilnp_seed_peer.parse_loc(format_locator(locator)) == locator


def test_reference_peer_header_is_this_header() -> None:
    header = SeedHeader(NH_DISCOVERY, L1, MN, ALL_NODES, 0, 3)
    body = Discovery(MN, L1, True, "mn")
    theirs = ilnp_seed_peer.HDR.pack(0, len(body.encode()), NH_DISCOVERY, 3, L1, MN, ALL_NODES,
                                     0) + body.encode()
    assert theirs == encode(header, body)
    assert ilnp_seed_peer.parse_loc("2001:db8::1") == parse_locator("2001:db8::1")
