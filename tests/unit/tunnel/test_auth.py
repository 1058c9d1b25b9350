"""Datagram authentication: sealing and opening, tampering, replays and the window's edges,
wrong keys and reflection, nonces over a long run and across restarts, GRO batches, key files."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ipshift.packet.errors import PacketError
from ipshift.tunnel import auth
from ipshift.tunnel.auth import (
    OVERHEAD,
    WINDOW,
    AuthError,
    DatagramAuth,
    KeyFileError,
    Refusal,
    ReplayWindow,
    Role,
    check_key_file_status,
    format_key_file,
    generate_key,
    parse_key_file,
    read_key_file,
    role_for,
)
from ipshift.tunnel.config import ConfigError, Endpoint

KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))
START = 1_700_000_000_000_000_000  # a wall clock in nanoseconds
HEADER = bytes([0x11, 16, 0, 20])
PAYLOAD = bytes(range(256)) * 5 + b"end"


def pair(lane: int = 0, start: int = START) -> tuple[DatagramAuth, DatagramAuth]:
    """(initiator, responder) of one peering."""
    return (DatagramAuth(KEY, Role.INITIATOR, first_counter=start, lane=lane),
            DatagramAuth(KEY, Role.RESPONDER, first_counter=start + 12345, lane=lane))


def refusal_of(receiver: DatagramAuth, datagram: bytes) -> Refusal:
    with pytest.raises(AuthError) as info:
        receiver.open(datagram)
    assert isinstance(info.value, PacketError)
    return info.value.refusal


def test_round_trip_both_ways() -> None:
    initiator, responder = pair()
    datagram = initiator.seal(HEADER, PAYLOAD)
    assert len(datagram) == len(HEADER) + len(PAYLOAD) + OVERHEAD
    assert datagram[:4] == HEADER  # the framing header stays readable
    assert PAYLOAD[:64] not in datagram  # the rest is encrypted
    assert datagram[4:8] == bytes(4) and int.from_bytes(datagram[8:16], "big") == START
    assert responder.open(datagram) == (HEADER, PAYLOAD)
    assert initiator.open(responder.seal(HEADER, b"")) == (HEADER, b"")
    assert responder.counters.opened == 1 and initiator.counters.sealed == 1
    assert responder.refusals() == {r.name.lower(): 0 for r in Refusal}


def test_open_into_a_buffer() -> None:
    initiator, responder = pair()
    datagram = b"\xee" * 7 + initiator.seal(HEADER, PAYLOAD) + b"\xee" * 3
    out = bytearray(2000)
    length = responder.open_into(datagram, 7, len(datagram) - 3, out, 100)
    assert length == len(HEADER) + len(PAYLOAD)
    assert bytes(out[100:100 + length]) == HEADER + PAYLOAD


def test_every_tampered_byte_is_refused() -> None:
    initiator, responder = pair()
    datagram = initiator.seal(HEADER, PAYLOAD[:40])
    for at in range(len(datagram)):
        for flip in (0x01, 0x80):
            changed = bytearray(datagram)
            changed[at] ^= flip
            reason = refusal_of(responder, bytes(changed))
            if at == 4:
                assert reason is Refusal.WRONG_LANE
            elif at in (5, 6, 7):
                assert reason is Refusal.BAD_HEADER
            else:
                assert reason is Refusal.FORGED
    assert responder.open(datagram) == (HEADER, PAYLOAD[:40])  # the original still opens
    assert responder.refused[Refusal.FORGED] > 0


def test_wrong_key_and_reflection() -> None:
    initiator, responder = pair()
    stranger = DatagramAuth(OTHER_KEY, Role.INITIATOR, first_counter=START)
    assert refusal_of(responder, stranger.seal(HEADER, PAYLOAD)) is Refusal.FORGED
    # A datagram sent back to its own sender: the directions have different keys.
    assert refusal_of(initiator, initiator.seal(HEADER, PAYLOAD)) is Refusal.FORGED
    # Two ends that think they have the same role cannot talk.
    twin = DatagramAuth(KEY, Role.INITIATOR, first_counter=START)
    assert refusal_of(twin, initiator.seal(HEADER, PAYLOAD)) is Refusal.FORGED


def test_truncated_and_lanes() -> None:
    initiator, responder = pair()
    for size in range(0, 32):
        assert refusal_of(responder, bytes(size)) is Refusal.TRUNCATED
    other_lane = DatagramAuth(KEY, Role.INITIATOR, first_counter=START, lane=3)
    datagram = other_lane.seal(HEADER, PAYLOAD)
    assert datagram[4] == 3
    # Queue 0 refuses what was sealed for queue 3 (a replay to another port) ...
    assert refusal_of(responder, datagram) is Refusal.WRONG_LANE
    # ... and queue 3 opens it.
    assert pair(lane=3)[1].open(datagram) == (HEADER, PAYLOAD)
    with pytest.raises(ValueError):
        DatagramAuth(KEY, Role.INITIATOR, first_counter=START, lane=256)
    with pytest.raises(ValueError):
        DatagramAuth(b"short", Role.INITIATOR, first_counter=START)
    with pytest.raises(ValueError):
        DatagramAuth(KEY, Role.INITIATOR, first_counter=-1)
    with pytest.raises(ValueError):
        initiator.seal(b"\x10\x00", PAYLOAD)


def test_replays_and_the_window_edges() -> None:
    initiator, responder = pair()
    datagrams = [initiator.seal(HEADER, n.to_bytes(2, "big")) for n in range(WINDOW + 3)]
    newest = datagrams[-1]
    assert responder.open(newest)[1] == (WINDOW + 2).to_bytes(2, "big")
    assert refusal_of(responder, newest) is Refusal.REPLAYED
    # Counters up to WINDOW - 1 behind the newest are still accepted, once, in any order.
    for index in (WINDOW + 1, 3, 4, 5, 2 + 1000, WINDOW):
        assert responder.open(datagrams[index])[1] == index.to_bytes(2, "big")
        assert refusal_of(responder, datagrams[index]) is Refusal.REPLAYED
    # datagrams[3] is WINDOW - 1 behind the newest; [2] is WINDOW behind: too old.
    assert refusal_of(responder, datagrams[2]) is Refusal.TOO_OLD
    assert refusal_of(responder, datagrams[0]) is Refusal.TOO_OLD
    assert responder.refused[Refusal.REPLAYED] == 7 and responder.refused[Refusal.TOO_OLD] == 2


def test_forged_datagrams_move_no_window() -> None:
    initiator, responder = pair()
    first = initiator.seal(HEADER, PAYLOAD)
    # A forgery claiming a far higher counter: refused, and the window has not moved.
    forged = bytearray(initiator.seal(HEADER, PAYLOAD))
    forged[8:16] = (START + 10**9).to_bytes(8, "big")
    assert refusal_of(responder, bytes(forged)) is Refusal.FORGED
    assert responder.window.top == -1
    assert responder.open(first) == (HEADER, PAYLOAD)
    # Forged epochs are derived but not kept: the cache holds only keys that authenticated.
    for epoch in range(10):
        forged[8:16] = ((START >> 32) + 100 + epoch << 32).to_bytes(8, "big")
        assert refusal_of(responder, bytes(forged)) is Refusal.FORGED
    assert list(responder._receive) == [START >> 32]


def test_replay_window_unit() -> None:
    window = ReplayWindow(8)
    assert window.check(0) is None and window.check(2**64 - 1) is None
    window.accept(10)
    assert window.check(10) is Refusal.REPLAYED
    assert window.check(11) is None
    assert window.check(3) is None  # 7 behind: inside the window, not seen
    assert window.check(2) is Refusal.TOO_OLD  # 8 behind
    window.accept(3)
    assert window.check(3) is Refusal.REPLAYED
    window.accept(12)  # the window moves by 2: 3 is now too old, 10 still seen
    assert (window.top, window.check(3), window.check(10), window.check(11)) == (
        12, Refusal.TOO_OLD, Refusal.REPLAYED, None)
    window.accept(1000)  # far ahead: everything before is forgotten or too old
    assert window.seen == 1 and window.check(999) is None and window.check(992) is (
        Refusal.TOO_OLD)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 300), max_size=200))
def test_replay_window_against_a_set(counters: list[int]) -> None:
    window = ReplayWindow(64)
    seen: set[int] = set()
    for counter in counters:
        top = max(seen, default=-1)
        expected = (None if counter > top else Refusal.TOO_OLD if top - counter >= 64
                    else Refusal.REPLAYED if counter in seen else None)
        assert window.check(counter) is expected
        if expected is None:
            window.accept(counter)
            seen.add(counter)


def test_keys_change_every_epoch() -> None:
    # Start 3 datagrams before an epoch ends: the fourth is sealed with the next epoch's key.
    start = (7 << 32) - 3
    initiator, responder = pair(start=start)
    datagrams = [initiator.seal(HEADER, bytes([n])) for n in range(6)]
    assert initiator.counters.derived_keys == 2
    # Out of order across the boundary, both epochs open.
    for index in (4, 0, 5, 2, 1, 3):
        assert responder.open(datagrams[index])[1] == bytes([index])
    assert sorted(responder._receive) == [6, 7]


def test_nonces_never_repeat() -> None:
    """Over a long run, on two lanes, in both directions and across a restart, no (key, nonce)
    pair is used twice: the key depends on (direction, lane, epoch), the nonce is (lane,
    counter), and a restart starts the counter at a later clock."""
    used: set[tuple[int, int, int, bytes]] = set()
    count = 0

    def record(sender: DatagramAuth, datagram: bytes) -> None:
        nonlocal count
        nonce = datagram[4:16]
        counter = int.from_bytes(nonce[4:], "big")
        key_id = (int(sender.role), sender.lane, counter >> 32, nonce)
        assert key_id not in used
        used.add(key_id)
        count += 1

    batch = (HEADER + b"x" * 60) * 40
    out = bytearray(len(batch) + 40 * OVERHEAD)
    for lane in (0, 1):
        initiator, responder = pair(lane=lane, start=(5 << 32) - 1000)
        for sender in (initiator, responder):
            for _ in range(60):
                nbytes, segment = sender.seal_batch(batch, len(batch), 64, out)
                for at in range(0, nbytes, segment):
                    record(sender, bytes(out[at:at + segment]))
                record(sender, sender.seal(HEADER, b"y"))
        # A restart 1 ms later starts above every counter used before it.
        restarted = DatagramAuth(KEY, Role.INITIATOR, lane=lane,
                                 first_counter=(5 << 32) - 1000 + 1_000_000)
        assert restarted.counter > initiator.counter
        for _ in range(100):
            record(restarted, restarted.seal(HEADER, b"z"))
    assert count == len(used) == 2 * (2 * 60 * 41 + 100)


def test_counter_is_used_up() -> None:
    sender = DatagramAuth(KEY, Role.INITIATOR, first_counter=auth.MAX_COUNTER)
    sender.seal(HEADER, b"last")
    with pytest.raises(ValueError, match="used up"):
        sender.seal(HEADER, b"one more")
    with pytest.raises(ValueError, match="used up"):
        sender.seal_batch(HEADER * 2, 8, 4, bytearray(100))


# --- batches ----------------------------------------------------------------------------------
def gso_batch(count: int, size: int, last: int) -> bytes:
    """count datagrams of `size` bytes but a last one of `last`, each a framing header (chunk
    index in byte 1) and a numbered body."""
    parts = []
    for index in range(count):
        length = last if index == count - 1 else size
        parts.append(bytes([0x20, index, 0, 7]) + bytes([index]) * (length - 4))
    return b"".join(parts)


def test_batches_keep_the_gso_shape() -> None:
    initiator, responder = pair()
    plain = gso_batch(44, 1400, 700)
    sealed = bytearray(len(plain) + 44 * OVERHEAD)
    nbytes, segment = initiator.seal_batch(plain, len(plain), 1400, sealed)
    assert (nbytes, segment) == (len(plain) + 44 * OVERHEAD, 1400 + OVERHEAD)
    opened = bytearray(nbytes)
    assert responder.open_batch(sealed, nbytes, segment, opened) == (len(plain), 1400)
    assert bytes(opened[:len(plain)]) == plain
    # One datagram alone (segment 0) is a batch of one.
    one = bytearray(100)
    assert initiator.seal_batch(plain[:50], 50, 0, one) == (50 + OVERHEAD, 0)
    assert responder.open_batch(one, 50 + OVERHEAD, 0, bytearray(100))[0] == 50


def test_a_refused_datagram_leaves_the_rest_in_shape() -> None:
    initiator, responder = pair()
    plain = gso_batch(10, 300, 120)
    sealed = bytearray(len(plain) + 10 * OVERHEAD)
    nbytes, segment = initiator.seal_batch(plain, len(plain), 300, sealed)
    sealed[3 * segment + 50] ^= 1  # chunk 3 altered on the way
    sealed[9 * segment + 20] ^= 1  # and the last, short one
    opened = bytearray(nbytes)
    size, step = responder.open_batch(sealed, nbytes, segment, opened)
    assert step == 300 and size == 8 * 300
    kept = [opened[at:at + step] for at in range(0, size, step)]
    assert [chunk[1] for chunk in kept] == [0, 1, 2, 4, 5, 6, 7, 8]
    assert all(bytes(chunk) == plain[chunk[1] * 300:(chunk[1] + 1) * 300] for chunk in kept)
    assert responder.refused[Refusal.FORGED] == 2
    # The same batch again: all replays.
    assert responder.open_batch(sealed, nbytes, segment, opened) == (0, 300)
    assert responder.refused[Refusal.REPLAYED] == 8


def test_batch_buffers_must_fit() -> None:
    initiator, responder = pair()
    with pytest.raises(ValueError):
        initiator.seal_batch(bytes(100), 100, 50, bytearray(100))
    with pytest.raises(ValueError):
        initiator.seal_batch(bytes(102), 102, 50, bytearray(500))  # a 2-byte last datagram
    with pytest.raises(ValueError):
        responder.open_batch(bytes(100), 100, 50, bytearray(10))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200), st.integers(0, 80))
def test_fuzz_only_refusals(data: bytes, segment: int) -> None:
    _initiator, responder = pair()
    try:
        responder.open(data)
    except AuthError as exc:
        assert exc.refusal in Refusal
    size, step = responder.open_batch(data, len(data), segment, bytearray(len(data)))
    assert size == 0 and step in (0, max(segment - OVERHEAD, 0))


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 60), st.integers(0, 255))
def test_fuzz_mutated_datagrams(at: int, value: int) -> None:
    initiator, responder = pair()
    datagram = bytearray(initiator.seal(HEADER, b"payload of some length"))
    original = bytes(datagram)
    datagram[at % len(datagram)] = value
    try:
        opened = responder.open(bytes(datagram))
    except AuthError:
        assert bytes(datagram) != original
        return
    assert bytes(datagram) == original and opened == (HEADER, b"payload of some length")


# --- roles ------------------------------------------------------------------------------------
def test_roles_agree() -> None:
    a, b = Endpoint.parse("192.0.2.1:4789"), Endpoint.parse("192.0.2.2:4789")
    assert role_for(a, b) is Role.INITIATOR and role_for(b, a) is Role.RESPONDER
    c = Endpoint.parse("192.0.2.1:4790")
    assert role_for(a, c) is Role.INITIATOR and role_for(c, a) is Role.RESPONDER
    six = Endpoint.parse("[2001:db8::1]:4789")
    assert role_for(a, six) is not role_for(six, a)
    with pytest.raises(ConfigError):
        role_for(a, a)


# --- key files --------------------------------------------------------------------------------
def status(mode: int, uid: int = 0) -> os.stat_result:
    return os.stat_result((mode, 1, 1, 1, uid, 0, 45, 0, 0, 0))


def test_key_file_status() -> None:
    check_key_file_status(status(stat.S_IFREG | 0o600), 0)
    check_key_file_status(status(stat.S_IFREG | 0o400, 1000), 1000)
    check_key_file_status(status(stat.S_IFREG | 0o600, 0), 1000)  # root's file
    for bad, message in ((status(stat.S_IFREG | 0o640), "chmod 600"),
                         (status(stat.S_IFREG | 0o604), "chmod 600"),
                         (status(stat.S_IFREG | 0o602), "chmod 600"),
                         (status(stat.S_IFDIR | 0o700), "not a regular file"),
                         (status(stat.S_IFLNK | 0o600), "not a regular file"),
                         (status(stat.S_IFREG | 0o600, 1001), "owned by uid 1001")):
        with pytest.raises(KeyFileError, match=message):
            check_key_file_status(bad, 1000)


def test_key_file_text() -> None:
    text = format_key_file(KEY, "peer gw1\nmade by hand")
    assert text.startswith("# peer gw1\n# made by hand\n") and text.count("\n") == 3
    assert parse_key_file(text) == KEY
    assert parse_key_file("\n  " + text.splitlines()[-1] + "  \n\n") == KEY
    generated = generate_key()
    assert len(generated) == 32 and parse_key_file(format_key_file(generated)) == generated
    line = text.splitlines()[-1]
    for bad in ("", "# only a comment\n", line + "\n" + line, "not base64!",
                "AAAA", line[:-4] + "====", line + "AAAA"):
        with pytest.raises(KeyFileError):
            parse_key_file(bad)
    with pytest.raises(ValueError):
        format_key_file(b"short")


def test_read_key_file(tmp_path: Path) -> None:
    path = tmp_path / "gw1.key"
    path.write_text(format_key_file(KEY))
    path.chmod(0o600)
    assert read_key_file(str(path)) == KEY
    path.chmod(0o644)
    with pytest.raises(KeyFileError, match="chmod 600"):
        read_key_file(str(path))
    path.chmod(0o600)
    link = tmp_path / "link.key"
    link.symlink_to(path)
    with pytest.raises(KeyFileError, match="cannot open"):
        read_key_file(str(link))
    with pytest.raises(KeyFileError, match="cannot open"):
        read_key_file(str(tmp_path / "missing.key"))
    big = tmp_path / "big.key"
    big.write_bytes(b"#" * 5000)
    big.chmod(0o600)
    with pytest.raises(KeyFileError, match="larger"):
        read_key_file(str(big))
    binary = tmp_path / "binary.key"
    binary.write_bytes(b"\xff\xfe")
    binary.chmod(0o600)
    with pytest.raises(KeyFileError, match="not text"):
        read_key_file(str(binary))
