"""sacip's identities, handshake and sealed messages: both ends agree on the documented keys,
and nothing forged, altered, replayed or meant for someone else opens."""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import random
import stat
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from hypothesis import given, settings
from hypothesis import strategies as st

from ipshift.sacip import wire
from ipshift.sacip.crypto import (
    MAX_COUNTER,
    Association,
    AssociationExhausted,
    AuthError,
    CryptoError,
    HandshakeError,
    Identity,
    IdentityError,
    Initiator,
    ReplayError,
    ReplayWindow,
    fingerprint,
    load_identity,
    respond,
)

#: X25519 public keys of small order (and their non-canonical encodings): every DH with them
#: gives all zeros
SMALL_ORDER = [bytes.fromhex(h) for h in (
    "00" * 32,
    "01" + "00" * 31,
    "e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800",
    "5f9c95bca3508c24b1d0b1559c83ef5b04445cc4581c8e86d8224eddd09f1157",
    "ec" + "ff" * 30 + "7f",
    "ed" + "ff" * 30 + "7f",
    "ee" + "ff" * 30 + "7f",
)]


def seeded(seed: int) -> Callable[[int], bytes]:
    """A reproducible rng for the `rng` parameters."""
    source = random.Random(seed)
    return source.randbytes


def handshake(a: Identity | None = None, b: Identity | None = None,
              ) -> tuple[Association, Association]:
    """(initiator's association, responder's association) of a fresh handshake."""
    initiator = Initiator(a or Identity.generate(), 11)
    ack, theirs = respond(b or Identity.generate(), initiator.hello(), 22)
    return initiator.complete(ack), theirs


def fields_of(ack: wire.HelloAck) -> tuple[bytes, bytes, bytes, int, int, bytes]:
    return (ack.static, ack.ephemeral, ack.random, ack.sender_index, ack.receiver_index,
            ack.confirm)


def sealed(association: Association, inner: bytes) -> wire.Sealed:
    message = wire.decode_datagram(association.seal(inner))
    assert isinstance(message, wire.Sealed)
    return message


# --- the handshake -------------------------------------------------------------------------------
def test_both_ends_agree_and_seal_both_ways() -> None:
    a, b = Identity.generate(), Identity.generate()
    mine, theirs = handshake(a, b)
    assert (mine.peer_public, theirs.peer_public) == (b.public, a.public)
    assert (mine.initiator, theirs.initiator) == (True, False)
    assert (mine.local_index, mine.remote_index) == (11, 22)
    assert (theirs.local_index, theirs.remote_index) == (22, 11)
    for sender, receiver in ((mine, theirs), (theirs, mine), (mine, theirs)):
        message = sealed(sender, b"hello")
        assert message.receiver_index == receiver.local_index
        assert receiver.open(message) == b"hello"


def test_the_keys_are_the_documented_schedule() -> None:
    """Derived here from the module docstring's formula with the library's primitives alone: a
    message the initiator seals opens with key i->r, one the responder seals with key r->i."""
    rng_i, rng_r = seeded(1), seeded(2)
    s_i, s_r = Identity.generate(rng_i), Identity.generate(rng_r)
    initiator = Initiator(s_i, 5, rng_i)
    hello = initiator.hello()
    ack, theirs = respond(s_r, hello, 9, rng_r)
    mine = initiator.complete(ack)

    replay_i = seeded(1)
    replay_i(32)  # the static key
    e_i = X25519PrivateKey.from_private_bytes(replay_i(32))
    private_i = X25519PrivateKey.from_private_bytes(s_i.private_bytes())

    def dh(private: X25519PrivateKey, public: bytes) -> bytes:
        return private.exchange(X25519PublicKey.from_public_bytes(public))

    ikm = (dh(private_i, s_r.public) + dh(e_i, ack.ephemeral) + dh(private_i, ack.ephemeral)
           + dh(e_i, s_r.public))
    info = b"ipshift sacip v1" + s_i.public + hello.ephemeral + s_r.public + ack.ephemeral
    okm = HKDF(hashes.SHA256(), 96, hello.random + ack.random, info).derive(ikm)
    to_responder, to_initiator, confirm_key = okm[:32], okm[32:64], okm[64:]

    confirm = hmac.new(confirm_key, b"confirm" + (9).to_bytes(8, "big") + (5).to_bytes(8, "big"),
                       hashlib.sha256).digest()[:16]
    assert ack.confirm == confirm
    for sender, key, counter in ((mine, to_responder, 1), (theirs, to_initiator, 1),
                                 (mine, to_responder, 2)):
        message = sealed(sender, b"inner")
        nonce = bytes(4) + counter.to_bytes(8, "big")
        assert message.counter == counter
        assert ChaCha20Poly1305(key).decrypt(nonce, message.ciphertext, message.header()) == (
            b"inner")


def test_randomness_is_injected_and_each_handshake_differs() -> None:
    me, peer = Identity.generate(seeded(3)), Identity.generate(seeded(4))
    assert Initiator(me, 1, seeded(5)).hello() == Initiator(me, 1, seeded(5)).hello()
    first, second = Initiator(me, 1), Initiator(me, 1)
    assert first.hello().ephemeral != second.hello().ephemeral
    ack_one, _ = respond(peer, first.hello(), 2)
    ack_two, _ = respond(peer, first.hello(), 2)
    assert ack_one.ephemeral != ack_two.ephemeral and ack_one.confirm != ack_two.confirm


def test_a_forged_or_stray_ack_fails_the_handshake() -> None:
    a, b, c = Identity.generate(), Identity.generate(), Identity.generate()
    initiator = Initiator(a, 11)
    hello = initiator.hello()
    ack, _ = respond(b, hello, 22)
    fields = fields_of(ack)
    # another static key, ephemeral, random, sender index or confirm tag: the tag is wrong
    for position, other in ((0, c.public), (1, Identity.generate().public), (2, bytes(16)),
                            (3, 23), (5, bytes(16))):
        forged = list(fields)
        forged[position] = other
        with pytest.raises(HandshakeError, match="confirm tag"):
            initiator.complete(wire.HelloAck(*forged))  # type: ignore[arg-type]
    with pytest.raises(HandshakeError, match="another handshake"):
        initiator.complete(wire.HelloAck(*fields[:4], 99, ack.confirm))  # type: ignore[arg-type]
    # a third party answering in the responder's name cannot make its tag
    impostor, _ = respond(c, hello, 22)
    with pytest.raises(HandshakeError, match="confirm tag"):
        initiator.complete(wire.HelloAck(b.public, *fields_of(impostor)[1:]))
    assert initiator.complete(ack).peer_public == b.public  # the genuine ack still completes


def test_a_third_party_answering_in_its_own_name_is_named_so() -> None:
    """Whom to trust is the engine's choice (pinned keys or trust on first use): the handshake
    only guarantees that the key it reports is the one that answered."""
    a, c = Identity.generate(), Identity.generate()
    initiator = Initiator(a, 11)
    ack, _ = respond(c, initiator.hello(), 22)
    assert initiator.complete(ack).peer_public == c.public


def test_an_ack_to_another_initiator_fails() -> None:
    a, b = Identity.generate(), Identity.generate()
    first, second = Initiator(a, 11), Initiator(a, 11)
    ack, _ = respond(b, first.hello(), 22)
    with pytest.raises(HandshakeError, match="confirm tag"):
        second.complete(ack)


@pytest.mark.parametrize("bad", SMALL_ORDER, ids=lambda key: key.hex()[:6])
def test_small_order_keys_are_refused(bad: bytes) -> None:
    a, b = Identity.generate(), Identity.generate()
    good = Initiator(a, 1).hello()
    for hello in (wire.Hello(bad, good.ephemeral, good.random, 1),
                  wire.Hello(good.static, bad, good.random, 1)):
        with pytest.raises(HandshakeError, match="small order"):
            respond(b, hello, 2)
    initiator = Initiator(a, 1)
    ack, _ = respond(b, initiator.hello(), 2)
    for forged in (wire.HelloAck(bad, ack.ephemeral, ack.random, 2, 1, ack.confirm),
                   wire.HelloAck(ack.static, bad, ack.random, 2, 1, ack.confirm)):
        with pytest.raises(HandshakeError, match="small order"):
            initiator.complete(forged)


def test_an_index_zero_is_refused_at_once() -> None:
    me = Identity.generate()
    with pytest.raises(ValueError, match="index"):
        Initiator(me, 0)
    with pytest.raises(ValueError, match="index"):
        respond(me, Initiator(Identity.generate(), 1).hello(), 2**64)


# --- sealed messages -----------------------------------------------------------------------------
@settings(max_examples=50, deadline=None)
@given(st.lists(st.binary(max_size=1200), min_size=1, max_size=6))
def test_seal_and_open_round_trip_both_ways(payloads: list[bytes]) -> None:
    mine, theirs = handshake()
    for number, payload in enumerate(payloads, start=1):
        for sender, receiver in ((mine, theirs), (theirs, mine)):
            message = sealed(sender, payload)
            assert message.counter == sender.send_counter == number
            assert receiver.open(message) == payload


def test_a_notice_as_long_as_allowed_seals_into_one_datagram() -> None:
    mine, theirs = handshake()
    notice = wire.Notice(1, "2001:db8::1", "2001:db8::2", "2001:db8:9::5",
                         (wire.Session(6, 40000, 443),) * wire.MAX_NOTICE_SESSIONS)
    datagram = mine.seal(notice.encode())
    assert len(datagram) <= wire.MAX_DATAGRAM
    message = wire.decode_datagram(datagram)
    assert isinstance(message, wire.Sealed)
    assert wire.decode_inner(theirs.open(message)) == notice


def test_every_changed_byte_fails_and_moves_nothing() -> None:
    mine, theirs = handshake()
    datagram = mine.seal(b"x" * 40)
    for position in range(len(datagram)):
        for flip in (0x01, 0x80, 0xFF):
            altered = bytearray(datagram)
            altered[position] ^= flip
            try:
                message = wire.decode_datagram(bytes(altered))
            except wire.WireError:
                continue  # version, type, reserved, index 0: the codec refuses it
            assert isinstance(message, wire.Sealed)
            with pytest.raises(AuthError):
                theirs.open(message)
    # none of the failures moved the window: the genuine datagram, then the next, still open
    genuine = wire.decode_datagram(datagram)
    assert isinstance(genuine, wire.Sealed)
    assert theirs.open(genuine) == b"x" * 40
    assert theirs.open(sealed(mine, b"ok")) == b"ok"


def test_a_cut_or_extended_ciphertext_fails() -> None:
    mine, theirs = handshake()
    message = sealed(mine, b"y" * 30)
    for ciphertext in (message.ciphertext[:-1], message.ciphertext + b"\x00",
                       message.ciphertext[:16]):
        with pytest.raises(AuthError):
            theirs.open(wire.Sealed(message.receiver_index, message.counter, ciphertext))


def test_replays_are_refused_and_reordering_within_the_window_is_accepted_once() -> None:
    mine, theirs = handshake()
    messages = [sealed(mine, b"%d" % n) for n in range(6)]
    for n in (3, 1, 5, 0):
        assert theirs.open(messages[n]) == b"%d" % n
    for n in (3, 1, 5, 0):
        with pytest.raises(ReplayError) as caught:
            theirs.open(messages[n])
        assert caught.value.reason == "replay"
    assert theirs.open(messages[2]) == b"2" and theirs.open(messages[4]) == b"4"


def test_a_counter_older_than_the_window_is_refused() -> None:
    mine, theirs = handshake()
    first = sealed(mine, b"old")
    for _ in range(1024):
        mine.seal(b"")
    assert theirs.open(sealed(mine, b"new")) == b"new"  # counter 1026: 1 is 1025 behind
    with pytest.raises(ReplayError):
        theirs.open(first)


def test_a_forged_counter_far_ahead_moves_nothing() -> None:
    mine, theirs = handshake()
    early = sealed(mine, b"early")
    with pytest.raises(AuthError):
        theirs.open(wire.Sealed(theirs.local_index, 10**9, bytes(40)))
    assert theirs.open(early) == b"early"


def test_a_third_partys_message_and_one_for_another_index_fail() -> None:
    mine, theirs = handshake()
    other, _ = handshake()
    forged = sealed(other, b"hi")
    with pytest.raises(AuthError) as caught:
        theirs.open(wire.Sealed(theirs.local_index, forged.counter, forged.ciphertext))
    assert caught.value.reason == "auth"
    with pytest.raises(AuthError, match="another association"):
        mine.open(sealed(other, b"hi"))  # its index is 22, ours 11


def test_a_message_reflected_to_its_sender_fails_even_with_equal_indexes() -> None:
    """Both ends chose index 7, so the header fits either: only the key per direction stops it."""
    initiator = Initiator(Identity.generate(), 7)
    ack, theirs = respond(Identity.generate(), initiator.hello(), 7)
    mine = initiator.complete(ack)
    for association in (mine, theirs):
        with pytest.raises(AuthError, match="tag"):
            association.open(sealed(association, b"echo"))


def test_a_same_key_pair_handshaking_again_gets_new_keys() -> None:
    a, b = Identity.generate(), Identity.generate()
    old_mine, _ = handshake(a, b)
    _, new_theirs = handshake(a, b)
    with pytest.raises(AuthError):
        new_theirs.open(sealed(old_mine, b"stale"))  # forward secrecy's visible half


def test_an_association_seals_2_to_the_63_messages_then_refuses() -> None:
    mine, theirs = handshake()
    mine.send_counter = MAX_COUNTER - 1
    last = sealed(mine, b"last")
    assert last.counter == MAX_COUNTER == 2**63
    assert theirs.open(last) == b"last"
    with pytest.raises(AssociationExhausted) as caught:
        mine.seal(b"one more")
    assert caught.value.reason == "exhausted" and mine.send_counter == MAX_COUNTER


HANDSHAKE = handshake()  # one association for the fuzz test, made once


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.just(HANDSHAKE[1].local_index), st.integers(1, 2**64 - 1)),
       st.integers(1, 2**64 - 1), st.binary(min_size=16, max_size=200))
def test_any_made_up_sealed_datagram_is_a_crypto_error(index: int, counter: int,
                                                       ciphertext: bytes) -> None:
    _, theirs = HANDSHAKE
    try:
        theirs.open(wire.Sealed(index, counter, ciphertext))
    except CryptoError as exc:
        assert exc.reason in ("auth", "replay")
    else:
        pytest.fail("a made-up sealed message opened")


def test_the_errors_are_value_errors_with_slugs() -> None:
    assert all(issubclass(error, CryptoError) and issubclass(error, ValueError)
               for error in (HandshakeError, AuthError, ReplayError, AssociationExhausted))
    assert (AuthError.reason, ReplayError.reason, HandshakeError.reason) == (
        "auth", "replay", "handshake")


# --- the replay window ---------------------------------------------------------------------------
def test_replay_window_unit() -> None:
    window = ReplayWindow(8)
    assert window.check(1) and window.check(2**64 - 1)
    window.commit(10)
    assert not window.check(10) and window.check(11) and window.check(3)  # 7 behind: inside
    assert not window.check(2)  # 8 behind: too old
    window.commit(3)
    assert not window.check(3)
    window.commit(1000)
    assert window.check(999) and not window.check(992) and not window.check(10)


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 64), st.lists(st.integers(1, 400), max_size=300))
def test_replay_window_against_a_set(size: int, counters: list[int]) -> None:
    window = ReplayWindow(size)
    seen: set[int] = set()
    for counter in counters:
        top = max(seen, default=0)
        fresh = counter not in seen and top - counter < size
        assert window.check(counter) is fresh
        if fresh:
            window.commit(counter)
            seen.add(counter)


def test_the_default_window_is_1024() -> None:
    window = ReplayWindow()
    window.commit(1025)
    assert window.check(2) and not window.check(1)


# --- identities ----------------------------------------------------------------------------------
def test_an_identity_round_trips_through_its_private_bytes() -> None:
    me = Identity.generate(seeded(7))
    again = Identity.from_private(me.private_bytes())
    assert again.public == me.public and len(me.public) == 32
    assert Identity.generate(seeded(7)).public == me.public
    with pytest.raises(IdentityError, match="32 bytes, not 31"):
        Identity.from_private(bytes(31))


def test_a_fingerprint_is_sha256_in_unpadded_base64_as_ssh_shows_it() -> None:
    public = bytes(range(32))
    expected = base64.b64encode(hashlib.sha256(public).digest()).decode().rstrip("=")
    assert fingerprint(public) == "SHA256:" + expected
    assert len(fingerprint(public)) == len("SHA256:") + 43 and "=" not in fingerprint(public)
    me = Identity.generate()
    assert me.fingerprint == fingerprint(me.public)


def test_an_identity_file_is_made_private_once_and_read_back(tmp_path: Path) -> None:
    path = tmp_path / "state" / "sacip.key"
    made = load_identity(str(path), create=True)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert load_identity(str(path)).public == made.public
    assert load_identity(str(path), create=True).public == made.public  # never replaced
    assert path.read_text().startswith("# ipshift sacip identity")


def test_an_unusable_identity_file_is_one_line_saying_what_to_do(tmp_path: Path) -> None:
    path = tmp_path / "sacip.key"
    load_identity(str(path), create=True)
    os.chmod(path, 0o644)
    with pytest.raises(IdentityError, match="chmod 600"):
        load_identity(str(path))
    with pytest.raises(IdentityError, match="cannot open"):
        load_identity(str(tmp_path / "missing.key"))
    short = tmp_path / "short.key"
    short.write_text(base64.b64encode(bytes(16)).decode() + "\n")
    short.chmod(0o600)
    with pytest.raises(IdentityError, match="16 bytes, not 32"):
        load_identity(str(short))
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(IdentityError, match="cannot create") as caught:
        load_identity(str(blocker / "sacip.key"), create=True)
    assert "\n" not in str(caught.value)
