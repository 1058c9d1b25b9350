"""sacip's wire format: every message round-trips, every encoding is the only one of its
message, and anything else is one WireError with a reason to count, never another exception."""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ipshift.packet.errors import PacketError
from ipshift.sacip import wire

REASONS = {"short", "version", "type", "length", "address", "count", "field"}
Message = wire.Datagram | wire.Inner

index = st.integers(1, 2**64 - 1)
u32 = st.integers(0, 2**32 - 1)
key = st.binary(min_size=32, max_size=32)
bytes16 = st.binary(min_size=16, max_size=16)
unicast_v4 = st.ip_addresses(v=4).filter(lambda a: not (a.is_unspecified or a.is_multicast))
unicast_v6 = st.ip_addresses(v=6).filter(lambda a: not (a.is_unspecified or a.is_multicast))
sessions = st.builds(wire.Session, st.sampled_from([6, 17]), st.integers(1, 65535),
                     st.integers(1, 65535))
results = st.sampled_from([wire.MOVED, wire.UNKNOWN, wire.REFUSED])


@st.composite
def notices(draw: st.DrawFn) -> wire.Notice:
    family = draw(st.sampled_from([unicast_v4, unicast_v6])).map(str)
    old, new = draw(st.lists(family, min_size=2, max_size=2, unique=True))
    items = draw(st.lists(sessions, min_size=1, max_size=wire.MAX_NOTICE_SESSIONS))
    return wire.Notice(draw(u32), old, new, draw(family), tuple(items))


datagrams = st.one_of(
    st.builds(wire.Hello, key, key, bytes16, index),
    st.builds(wire.HelloAck, key, key, bytes16, index, index, bytes16),
    st.builds(wire.Sealed, index, index, st.binary(min_size=16, max_size=1212)),
)
inners = st.one_of(
    notices(),
    st.builds(wire.Challenge, u32, bytes16),
    st.builds(wire.Response, u32, bytes16),
    st.builds(wire.Ack, u32, st.lists(results, min_size=1, max_size=wire.MAX_NOTICE_SESSIONS)
              .map(tuple)),
    st.builds(wire.Ping, st.integers(0, 2**64 - 1)),
    st.builds(wire.Pong, st.integers(0, 2**64 - 1)),
)


def decoder_of(message: Message) -> Callable[[bytes], Message]:
    return wire.decode_inner if isinstance(message, wire.Inner) else wire.decode_datagram


def decodes_exactly_or_refuses(decode: Callable[[bytes], Message], data: bytes) -> bool:
    """True if `data` is a message whose encoding is `data` itself; False if refused with a
    WireError of a known reason. Any other outcome fails the test."""
    try:
        message = decode(data)
    except wire.WireError as exc:
        assert exc.reason in REASONS, exc.reason
        assert "\n" not in str(exc)
        return False
    assert message.encode() == data  # nothing ignored, nothing read two ways
    return True


# --- round trips ---------------------------------------------------------------------------------
@settings(max_examples=300)
@given(datagrams)
def test_datagrams_round_trip(message: wire.Datagram) -> None:
    assert wire.decode_datagram(message.encode()) == message


@settings(max_examples=300)
@given(inners)
def test_inner_messages_round_trip(message: wire.Inner) -> None:
    assert wire.decode_inner(message.encode()) == message


def test_the_layout_is_the_documented_one() -> None:
    hello = wire.Hello(b"S" * 32, b"E" * 32, b"R" * 16, 0x0102030405060708)
    assert hello.encode() == (b"\x01\x01\x00\x00" + b"S" * 32 + b"E" * 32 + b"R" * 16
                              + bytes(range(1, 9)))
    ack = wire.HelloAck(b"S" * 32, b"E" * 32, b"R" * 16, 5, 7, b"C" * 16)
    assert ack.encode() == (b"\x01\x02\x00\x00" + b"S" * 32 + b"E" * 32 + b"R" * 16
                            + struct.pack("!QQ", 5, 7) + b"C" * 16)
    sealed = wire.Sealed(9, 3, b"T" * 16)
    assert sealed.header() == b"\x01\x03\x00\x00" + struct.pack("!QQ", 9, 3)
    assert sealed.encode() == sealed.header() + b"T" * 16
    notice = wire.Notice(0x0A0B0C0D, "192.0.2.1", "198.51.100.1", "203.0.113.9",
                         (wire.Session(6, 40000, 22), wire.Session(17, 5353, 53)))
    assert notice.encode() == (b"\x01\x0a\x0b\x0c\x0d\x04" + bytes([192, 0, 2, 1, 198, 51, 100, 1,
                                                                   203, 0, 113, 9])
                               + b"\x00\x02" + struct.pack("!BHHBHH", 6, 40000, 22, 17, 5353, 53))
    assert wire.Challenge(1, b"K" * 16).encode() == b"\x02\x00\x00\x00\x01" + b"K" * 16
    assert wire.Response(1, b"K" * 16).encode() == b"\x03\x00\x00\x00\x01" + b"K" * 16
    assert wire.Ack(2, (0, 1, 2)).encode() == b"\x04\x00\x00\x00\x02\x00\x03\x00\x01\x02"
    assert wire.Ping(1).encode() == b"\x05" + struct.pack("!Q", 1)
    assert wire.Pong(2**64 - 1).encode() == b"\x06" + b"\xff" * 8
    assert wire.PORT == 7366 and wire.VERSION == 1


# --- malformed input -----------------------------------------------------------------------------
@settings(max_examples=1000)
@given(st.binary(max_size=1400))
def test_random_bytes_are_a_message_encoded_exactly_so_or_a_wire_error(data: bytes) -> None:
    decodes_exactly_or_refuses(wire.decode_datagram, data)
    decodes_exactly_or_refuses(wire.decode_inner, data)


@settings(max_examples=300)
@given(st.sampled_from([1, 2, 3, 4, 5, 6]), st.binary(max_size=300))
def test_random_bodies_after_a_known_type_are_refused_or_exact(kind: int, body: bytes) -> None:
    """Random bytes rarely start with a known type; these always do, so the parsers go deep."""
    decodes_exactly_or_refuses(wire.decode_datagram, bytes([wire.VERSION, kind, 0, 0]) + body)
    decodes_exactly_or_refuses(wire.decode_inner, bytes([kind]) + body)


@settings(max_examples=200)
@given(st.one_of(datagrams, inners))
def test_every_truncation_is_refused_or_exact(message: Message) -> None:
    encoded = message.encode()
    decode = decoder_of(message)
    for cut in range(len(encoded)):
        if decodes_exactly_or_refuses(decode, encoded[:cut]):
            # only a SEALED datagram has no length of its own: a cut one is another ciphertext
            assert isinstance(message, wire.Sealed) and cut >= wire.SEALED_OVERHEAD


@settings(max_examples=200)
@given(st.one_of(datagrams, inners), st.binary(min_size=1, max_size=40))
def test_trailing_bytes_are_refused(message: Message, extra: bytes) -> None:
    encoded = message.encode()
    if isinstance(message, wire.Sealed):  # the ciphertext takes them; the tag will fail
        if len(encoded) + len(extra) > wire.MAX_DATAGRAM:
            with pytest.raises(wire.WireError) as caught:
                wire.decode_datagram(encoded + extra)
            assert caught.value.reason == "length"
        return
    with pytest.raises(wire.WireError) as caught:
        decoder_of(message)(encoded + extra)
    assert caught.value.reason == "length"


@settings(max_examples=300)
@given(st.one_of(datagrams, inners), st.data())
def test_bit_flips_are_refused_or_exact(message: Message, data: st.DataObject) -> None:
    encoded = bytearray(message.encode())
    position = data.draw(st.integers(0, len(encoded) - 1), label="position")
    encoded[position] ^= 1 << data.draw(st.integers(0, 7), label="bit")
    decodes_exactly_or_refuses(decoder_of(message), bytes(encoded))


@pytest.mark.parametrize(("data", "reason"), [
    (b"", "short"),
    (b"\x01\x01\x00", "short"),
    (b"\x02\x01\x00\x00" + bytes(88), "version"),
    (b"\x01\x07\x00\x00" + bytes(88), "type"),
    (b"\x01\x01\x00\x01" + bytes(88), "field"),  # reserved bytes set
    (b"\x01\x01\x00\x00" + bytes(87), "length"),
    (b"\x01\x01\x00\x00" + bytes(80) + bytes(8), "field"),  # sender index 0
    (b"\x01\x03\x00\x00" + bytes(31), "short"),  # no room for the tag
    (b"\x01\x03\x00\x00" + b"\x00" * 7 + b"\x01" + b"\x00" * 7 + b"\x01" + bytes(1213),
     "length"),  # larger than a datagram may be
])
def test_outer_refusals_name_their_reason(data: bytes, reason: str) -> None:
    with pytest.raises(wire.WireError) as caught:
        wire.decode_datagram(data)
    assert caught.value.reason == reason


NOTICE_HEAD = b"\x01\x00\x00\x00\x01\x04" + bytes([192, 0, 2, 1, 192, 0, 2, 2, 203, 0, 113, 9])


@pytest.mark.parametrize(("data", "reason"), [
    (b"", "short"),
    (b"\x00", "type"),
    (b"\x07" + bytes(8), "type"),
    (b"\x01\x00\x00\x00\x01\x05" + bytes(14), "field"),  # family 5
    (NOTICE_HEAD[:-1], "short"),
    (NOTICE_HEAD + b"\x00\x00", "count"),  # no session
    (NOTICE_HEAD + b"\x00\x01" + struct.pack("!BHH", 6, 1, 2) + b"\x00", "length"),
    (NOTICE_HEAD + b"\x00\x02" + struct.pack("!BHH", 6, 1, 2), "length"),
    (NOTICE_HEAD + b"\x00\x01" + struct.pack("!BHH", 1, 1, 2), "field"),  # ICMP
    (NOTICE_HEAD + b"\x00\x01" + struct.pack("!BHH", 17, 0, 2), "field"),  # port 0
    (NOTICE_HEAD[:10] + NOTICE_HEAD[6:10] + NOTICE_HEAD[14:] + b"\x00\x01"
     + struct.pack("!BHH", 6, 1, 2), "address"),  # old == new
    (NOTICE_HEAD[:6] + bytes(4) + NOTICE_HEAD[10:] + b"\x00\x01" + struct.pack("!BHH", 6, 1, 2),
     "address"),  # 0.0.0.0
    (b"\x02" + bytes(4) + bytes(15), "length"),
    (b"\x04" + bytes(4) + b"\x00\x01" + b"\x03", "field"),  # result 3
    (b"\x04" + bytes(4) + b"\x00\x00", "count"),
    (b"\x04" + bytes(4) + b"\x00", "short"),
    (b"\x05" + bytes(7), "length"),
])
def test_inner_refusals_name_their_reason(data: bytes, reason: str) -> None:
    with pytest.raises(wire.WireError) as caught:
        wire.decode_inner(data)
    assert caught.value.reason == reason


def test_the_error_is_the_packet_parsers_one() -> None:
    with pytest.raises(PacketError):
        wire.decode_datagram(b"")
    assert issubclass(wire.WireError, ValueError)


# --- construction --------------------------------------------------------------------------------
@pytest.mark.parametrize(("build", "reason"), [
    (lambda: wire.Notice(1, "192.0.2.1", "192.0.2.1", "203.0.113.5",
                         (wire.Session(6, 1, 2),)), "address"),
    (lambda: wire.Notice(1, "192.0.2.1", "2001:db8::1", "203.0.113.5",
                         (wire.Session(6, 1, 2),)), "address"),
    (lambda: wire.Notice(1, "192.0.2.1", "192.0.2.2", "not an address",
                         (wire.Session(6, 1, 2),)), "address"),
    (lambda: wire.Notice(1, "192.0.2.1", "192.0.2.2", "224.0.0.1",
                         (wire.Session(6, 1, 2),)), "address"),
    (lambda: wire.Notice(1, "192.0.2.1", "192.0.2.2", "203.0.113.5", ()), "count"),
    (lambda: wire.Notice(1, "192.0.2.1", "192.0.2.2", "203.0.113.5",
                         (wire.Session(6, 1, 2),) * (wire.MAX_NOTICE_SESSIONS + 1)), "count"),
    (lambda: wire.Notice(2**32, "192.0.2.1", "192.0.2.2", "203.0.113.5",
                         (wire.Session(6, 1, 2),)), "field"),
    (lambda: wire.Session(1, 1, 2), "field"),
    (lambda: wire.Session(17, 0, 2), "field"),  # UDP source port 0: no session
    (lambda: wire.Session(6, 1, 65536), "field"),
    (lambda: wire.Hello(bytes(31), bytes(32), bytes(16), 1), "field"),
    (lambda: wire.Hello(bytes(32), bytes(32), bytes(16), 0), "field"),
    (lambda: wire.HelloAck(bytes(32), bytes(32), bytes(16), 1, 2**64, bytes(16)), "field"),
    (lambda: wire.HelloAck(bytes(32), bytes(32), bytes(16), 1, 1, bytes(15)), "field"),
    (lambda: wire.Sealed(0, 1, bytes(16)), "field"),  # index 0 is no association
    (lambda: wire.Sealed(1, 0, bytes(16)), "field"),  # counters start at 1
    (lambda: wire.Sealed(1, 1, bytes(15)), "length"),  # shorter than the tag
    (lambda: wire.Challenge(1, bytes(15)), "field"),
    (lambda: wire.Response(-1, bytes(16)), "field"),
    (lambda: wire.Ack(1, (0, 3)), "field"),
    (lambda: wire.Ack(1, ()), "count"),
    (lambda: wire.Ping(2**64), "field"),
    (lambda: wire.Pong(True), "field"),
])
def test_an_invalid_message_cannot_be_built(build: Callable[[], object], reason: str) -> None:
    with pytest.raises(wire.WireError) as caught:
        build()
    assert caught.value.reason == reason


def test_addresses_are_normalised() -> None:
    notice = wire.Notice(1, "2001:DB8::1", "2001:db8:0::2", "2001:db8::9",
                         (wire.Session(6, 1, 2),))
    assert notice.old == "2001:db8::1" and notice.new == "2001:db8::2"
    assert ipaddress.ip_address(notice.receiver).version == 6
    assert notice == wire.Notice(1, "2001:db8::1", "2001:db8::2", "2001:db8::9",
                                 [wire.Session(6, 1, 2)])  # type: ignore[arg-type]


def test_challenge_and_response_are_distinct_messages() -> None:
    assert wire.Challenge(1, bytes(16)) != wire.Response(1, bytes(16))
    assert wire.Ping(1) != wire.Pong(1)


# --- splitting -----------------------------------------------------------------------------------
def test_a_full_ipv6_notice_sealed_fits_the_minimum_mtu_and_one_more_would_not() -> None:
    most = wire.Notice(1, "2001:db8::1", "2001:db8::2", "2001:db8:9::5",
                       (wire.Session(6, 1, 2),) * wire.MAX_NOTICE_SESSIONS)
    sealed = wire.SEALED_OVERHEAD + len(most.encode())
    assert sealed <= wire.MAX_DATAGRAM == 1232
    assert sealed + 5 > wire.MAX_DATAGRAM


def test_a_long_list_of_sessions_is_split_in_order() -> None:
    items = [wire.Session(6, 10000 + i, 443) for i in range(1000)]
    split = wire.notices(7, "2001:db8::1", "2001:db8::2", "2001:db8:9::5", items)
    assert [n.seq for n in split] == list(range(7, 7 + len(split)))
    assert [s for n in split for s in n.sessions] == items
    assert len(split) == -(-1000 // wire.MAX_NOTICE_SESSIONS)
    assert all(n.old == "2001:db8::1" and n.new == "2001:db8::2" for n in split)


def test_split_sequence_numbers_wrap_and_an_empty_list_gives_no_notice() -> None:
    items = [wire.Session(17, 1 + i, 53) for i in range(wire.MAX_NOTICE_SESSIONS + 1)]
    split = wire.notices(2**32 - 1, "192.0.2.1", "192.0.2.2", "203.0.113.5", items)
    assert [n.seq for n in split] == [2**32 - 1, 0]
    assert wire.notices(1, "192.0.2.1", "192.0.2.2", "203.0.113.5", []) == []
