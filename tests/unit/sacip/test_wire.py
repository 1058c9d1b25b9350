"""sacip's wire format: every message round-trips, and anything else is a WireError."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ipshift.sacip import wire

u64 = st.integers(1, 2**64 - 1)
key = st.binary(min_size=32, max_size=32)
random16 = st.binary(min_size=16, max_size=16)
v4 = st.ip_addresses(v=4).filter(lambda a: not (a.is_unspecified or a.is_multicast)).map(str)
v6 = st.ip_addresses(v=6).filter(lambda a: not (a.is_unspecified or a.is_multicast)).map(str)
sessions = st.builds(wire.Session, st.sampled_from([6, 17]), st.integers(1, 65535),
                     st.integers(1, 65535))


@st.composite
def notices(draw: st.DrawFn) -> wire.Notice:
    family = draw(st.sampled_from([v4, v6]))
    old, new = draw(st.lists(family, min_size=2, max_size=2, unique=True))
    return wire.Notice(draw(st.integers(0, 2**32 - 1)), old, new, draw(family),
                       tuple(draw(st.lists(sessions, min_size=1, max_size=40))))


outer = st.one_of(
    st.builds(wire.Hello, key, key, random16, u64),
    st.builds(wire.HelloAck, key, key, random16, u64, u64, random16),
    st.builds(wire.Sealed, u64, u64, st.binary(min_size=16, max_size=600)),
)
inner = st.one_of(
    notices(),
    st.builds(wire.Challenge, st.integers(0, 2**32 - 1), random16),
    st.builds(wire.Response, st.integers(0, 2**32 - 1), random16),
    st.builds(wire.Ack, st.integers(0, 2**32 - 1),
              st.lists(st.sampled_from([wire.MOVED, wire.UNKNOWN, wire.REFUSED]), min_size=1,
                       max_size=40).map(tuple)),
    st.builds(wire.Ping, st.integers(0, 2**64 - 1)),
    st.builds(wire.Pong, st.integers(0, 2**64 - 1)),
)


@settings(max_examples=300)
@given(outer)
def test_datagrams_round_trip(message: wire.Hello | wire.HelloAck | wire.Sealed) -> None:
    assert wire.decode_datagram(message.encode()) == message


@settings(max_examples=300)
@given(inner)
def test_inner_messages_round_trip(message: wire.Inner) -> None:
    assert wire.decode_inner(message.encode()) == message


@settings(max_examples=500)
@given(st.binary(max_size=1400))
def test_random_bytes_are_a_wire_error_or_a_message(data: bytes) -> None:
    for decode in (wire.decode_datagram, wire.decode_inner):
        try:
            decode(data)
        except wire.WireError as exc:
            assert exc.reason in ("short", "version", "type", "length", "address", "count",
                                  "field")


@settings(max_examples=200)
@given(st.one_of(outer, inner), st.data())
def test_truncated_extended_or_flipped_messages_never_crash(message: object,
                                                           data: st.DataObject) -> None:
    encoded = message.encode()  # type: ignore[attr-defined]
    decode = wire.decode_inner if isinstance(message, wire.Inner) else wire.decode_datagram
    cut = data.draw(st.integers(0, len(encoded) - 1))
    variants = [encoded[:cut], encoded + b"\x00"]
    position = data.draw(st.integers(0, len(encoded) - 1))
    flipped = bytearray(encoded)
    flipped[position] ^= data.draw(st.integers(1, 255))
    variants.append(bytes(flipped))
    for variant in variants:
        try:
            decode(variant)
        except wire.WireError:
            pass
    # a cut or extended fixed-size message is refused, not misread
    if not isinstance(message, wire.Sealed):
        with pytest.raises(wire.WireError):
            decode(encoded[:cut])
        with pytest.raises(wire.WireError):
            decode(encoded + b"\x00")


def test_invalid_messages_cannot_be_built() -> None:
    with pytest.raises(wire.WireError, match="same"):
        wire.Notice(1, "192.0.2.1", "192.0.2.1", "203.0.113.5", (wire.Session(6, 1, 2),))
    with pytest.raises(wire.WireError, match="one family"):
        wire.Notice(1, "192.0.2.1", "2001:db8::1", "203.0.113.5", (wire.Session(6, 1, 2),))
    with pytest.raises(wire.WireError, match="TCP or UDP"):
        wire.Session(1, 1, 2)
    with pytest.raises(wire.WireError):
        wire.Session(17, 0, 2)  # UDP source port 0: no session
    with pytest.raises(wire.WireError):
        wire.Hello(bytes(31), bytes(32), bytes(16), 1)
    with pytest.raises(wire.WireError):
        wire.Sealed(0, 1, bytes(16))  # index 0 is no association


def test_a_long_list_of_sessions_is_split_and_each_notice_fits_a_datagram() -> None:
    items = [wire.Session(6, 10000 + i, 443) for i in range(1000)]
    split = wire.notices(7, "2001:db8::1", "2001:db8::2", "2001:db8:9::5", items)
    assert [n.seq for n in split] == list(range(7, 7 + len(split)))
    assert [s for n in split for s in n.sessions] == items
    for notice in split:
        sealed = wire.SEALED_OVERHEAD + len(notice.encode())
        assert sealed <= wire.MAX_DATAGRAM
    assert len(split) == -(-1000 // wire.MAX_NOTICE_SESSIONS)


def test_addresses_are_normalised() -> None:
    notice = wire.Notice(1, "2001:DB8::1", "2001:db8:0::2", "2001:db8::9",
                         (wire.Session(6, 1, 2),))
    assert notice.old == "2001:db8::1" and notice.new == "2001:db8::2"
    assert ipaddress.ip_address(notice.receiver).version == 6
