"""sacip's handshake and sealed messages."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ipshift.sacip import wire
from ipshift.sacip.crypto import (
    AuthError,
    HandshakeError,
    Identity,
    IdentityError,
    Initiator,
    ReplayError,
    fingerprint,
    load_identity,
    respond,
)


def handshake() -> tuple[Identity, Identity, object, object]:
    a, b = Identity.generate(), Identity.generate()
    initiator = Initiator(a, 11)
    ack, theirs = respond(b, initiator.hello(), 22)
    mine = initiator.complete(ack)
    return a, b, mine, theirs


def test_both_ends_agree_and_seal_both_ways() -> None:
    a, b, mine, theirs = handshake()
    assert mine.peer_public == b.public and theirs.peer_public == a.public  # type: ignore[attr-defined]
    for sender, receiver in ((mine, theirs), (theirs, mine)):
        datagram = sender.seal(b"hello")  # type: ignore[attr-defined]
        sealed = wire.decode_datagram(datagram)
        assert isinstance(sealed, wire.Sealed)
        assert receiver.open(sealed) == b"hello"  # type: ignore[attr-defined]


def test_replays_are_refused_and_reordering_within_the_window_is_not() -> None:
    _a, _b, mine, theirs = handshake()
    sealed = [wire.decode_datagram(mine.seal(b"%d" % i)) for i in range(5)]  # type: ignore[attr-defined]
    assert theirs.open(sealed[3]) == b"3"  # type: ignore[attr-defined]
    assert theirs.open(sealed[1]) == b"1"  # type: ignore[attr-defined]
    for again in (sealed[3], sealed[1]):
        with pytest.raises(ReplayError):
            theirs.open(again)  # type: ignore[attr-defined]


@settings(max_examples=100, deadline=None)
@given(st.integers(0, 60), st.integers(1, 255))
def test_any_changed_byte_fails_authentication(position: int, flip: int) -> None:
    _a, _b, mine, theirs = handshake()
    datagram = bytearray(mine.seal(b"x" * 40))  # type: ignore[attr-defined]
    position = 4 + position % (len(datagram) - 4)  # version/type/reserved: the codec's
    datagram[position] ^= flip
    try:
        sealed = wire.decode_datagram(bytes(datagram))
    except wire.WireError:
        return
    with pytest.raises((AuthError, ReplayError)):
        theirs.open(sealed)  # type: ignore[attr-defined]
    # and the failure moved nothing: the genuine datagram still opens
    assert theirs.open(wire.decode_datagram(mine.seal(b"ok"))) == b"ok"  # type: ignore[attr-defined]


def test_a_third_party_and_a_reflected_message_fail() -> None:
    _a, _b, mine, theirs = handshake()
    _c, _d, other, _ = handshake()
    datagram = wire.decode_datagram(other.seal(b"hi"))  # type: ignore[attr-defined]
    with pytest.raises(AuthError):
        theirs.open(datagram)  # type: ignore[attr-defined]
    own = wire.decode_datagram(mine.seal(b"hi"))  # type: ignore[attr-defined]
    with pytest.raises(AuthError):
        mine.open(own)  # type: ignore[attr-defined]  # reflected to its sender


def test_a_forged_ack_fails_the_handshake() -> None:
    a, b, c = Identity.generate(), Identity.generate(), Identity.generate()
    initiator = Initiator(a, 11)
    hello = initiator.hello()
    ack, _ = respond(b, hello, 22)
    forged = wire.HelloAck(c.public, ack.ephemeral, ack.random, ack.sender_index,
                           ack.receiver_index, ack.confirm)
    with pytest.raises(HandshakeError):
        initiator.complete(forged)
    with pytest.raises(HandshakeError, match="another handshake"):
        initiator.complete(wire.HelloAck(ack.static, ack.ephemeral, ack.random,
                                         ack.sender_index, 99, ack.confirm))


def test_small_order_keys_are_refused() -> None:
    a = Identity.generate()
    hello = wire.Hello(bytes(32), bytes(32), bytes(16), 5)
    with pytest.raises(HandshakeError):
        respond(a, hello, 1)


def test_identity_file_is_made_private_and_read_back(tmp_path: Path) -> None:
    path = tmp_path / "state" / "sacip.key"
    made = load_identity(str(path), create=True)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_identity(str(path)).public == made.public
    assert made.fingerprint == fingerprint(made.public) and made.fingerprint.startswith("SHA256:")
    os.chmod(path, 0o644)
    with pytest.raises(IdentityError, match="chmod 600"):
        load_identity(str(path))
    with pytest.raises(IdentityError):
        load_identity(str(tmp_path / "missing.key"))
