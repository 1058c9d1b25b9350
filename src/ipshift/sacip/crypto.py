"""Keys, the handshake and sealed messages of the sacip daemons. Pure: no sockets, no clock,
randomness injectable (`rng`, os.urandom by default).

    me = load_identity("/var/lib/ipshift/sacip.key", create=True)
    initiator = Initiator(me, local_index=7)
    hello = initiator.hello()                                   # -> the peer
    ack, theirs = respond(peer_identity, hello, local_index=9)  # on the peer -> back
    mine = initiator.complete(ack)                              # HandshakeError if forged
    datagram = mine.seal(b"...")                                # a whole SEALED datagram
    theirs.open(wire.decode_datagram(datagram))                 # AuthError / ReplayError

Key schedule. Each end has a static X25519 key, its identity (the engine pins the peer's or
trusts it on first use; this module does not decide trust), and makes an ephemeral one per
handshake. With s/S the static private/public keys, e/E the ephemeral ones, i the initiator
and r the responder, both ends compute the same four Diffie-Hellman results, each with its own
private keys, so only the holders of both static keys get the keys, and the ephemerals make
them forward secret:

    ikm  = DH(s_i, S_r) || DH(e_i, E_r) || DH(s_i, E_r) || DH(e_i, S_r)
    salt = random_i || random_r                      (16 bytes each, from HELLO and HELLO-ACK)
    info = b"ipshift sacip v1" || S_i || E_i || S_r || E_r
    HKDF-SHA256(ikm, salt, info) -> key i->r (32) || key r->i (32) || confirm key (32)
    confirm = HMAC-SHA256(confirm key, b"confirm" || index_r || index_i)[:16]   (u64 each)

The responder's confirm tag proves it derived the keys, so holds its static key; the initiator
proves the same with its first sealed message, which only then opens. A DH result of all zeros
(a small-order public key) is refused.

Sealing: ChaCha20-Poly1305, one key per direction (so a message reflected to its sender does
not open), nonce = 4 zero bytes + the 64-bit counter (1, 2, ...; at most 2**63 per
association), associated data = the SEALED header (version, type, reserved, receiver index,
counter). The receiver keeps a window of the last 1024 counters: a counter seen before, or
older than the window, is refused, and only a message whose tag checked moves the window, so
forged counters move nothing.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import struct
from collections.abc import Callable

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from ipshift import keyfile
from ipshift.sacip import wire
from ipshift.tunnel import auth

Random = Callable[[int], bytes]
LABEL = b"ipshift sacip v1"
WINDOW = 1024
MAX_COUNTER = 1 << 63  # the last counter an association seals; then it must greet again
IDENTITY_COMMENT = "ipshift sacip identity (X25519 private key): keep it secret"
_INDEXES = struct.Struct("!QQ")
_MAX_INDEX = (1 << 64) - 1


class CryptoError(ValueError):
    """Something did not authenticate; `.reason` is a short slug for counting."""

    reason = "crypto"


class HandshakeError(CryptoError):
    """A HELLO or HELLO-ACK cannot make an association (unusable key, forged, or stray)."""

    reason = "handshake"


class AuthError(CryptoError):
    """A sealed message's tag is wrong: forged, altered, or not for this association."""

    reason = "auth"


class ReplayError(CryptoError):
    """A sealed message's counter was seen before or is older than the window."""

    reason = "replay"


class AssociationExhausted(CryptoError):
    """The association sealed all the counters it may; greet the peer again."""

    reason = "exhausted"


class IdentityError(ValueError):
    """The identity key cannot be used; str() is one line saying what to do."""


def _raw_public(private: X25519PrivateKey) -> bytes:
    return private.public_key().public_bytes(serialization.Encoding.Raw,
                                             serialization.PublicFormat.Raw)


def fingerprint(public: bytes) -> str:
    """`SHA256:` and the unpadded standard base64 of the key's SHA-256, as ssh shows keys."""
    digest = hashlib.sha256(public).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


class Identity:
    """This host's static X25519 key."""

    def __init__(self, private: X25519PrivateKey) -> None:
        self._private = private
        self.public: bytes = _raw_public(private)
        self.fingerprint: str = fingerprint(self.public)

    @classmethod
    def generate(cls, rng: Random = os.urandom) -> Identity:
        return cls.from_private(rng(32))

    @classmethod
    def from_private(cls, raw: bytes) -> Identity:
        if len(raw) != 32:
            raise IdentityError(f"an X25519 private key is 32 bytes, not {len(raw)}")
        return cls(X25519PrivateKey.from_private_bytes(raw))

    def private_bytes(self) -> bytes:
        return self._private.private_bytes(serialization.Encoding.Raw,
                                           serialization.PrivateFormat.Raw,
                                           serialization.NoEncryption())

    def _agree(self, public: bytes) -> bytes:
        return _dh(self._private, public)


def load_identity(path: str, *, create: bool = False) -> Identity:
    """The identity in key file `path` (ipshift.keyfile: 0600, the reader's or root's), made
    there first (and its directory, 0700) if it does not exist and `create`."""
    if create and not os.path.lexists(path):
        try:
            os.makedirs(os.path.dirname(path) or ".", mode=0o700, exist_ok=True)
            try:
                keyfile.write_key_file(path, Identity.generate().private_bytes(),
                                       IDENTITY_COMMENT)
            except FileExistsError:
                pass  # made at the same moment by another process: read that one
        except OSError as exc:
            raise IdentityError(f"cannot create identity file {path}: {exc.strerror}; "
                                "create its directory or give another path") from exc
        except ValueError as exc:
            raise IdentityError(f"{path!r} is not a usable path for the identity") from exc
    try:
        return Identity.from_private(keyfile.read_key_file(path, 32))
    except keyfile.KeyFileError as exc:
        raise IdentityError(str(exc)) from exc


def _dh(private: X25519PrivateKey, public: bytes) -> bytes:
    try:
        shared = private.exchange(X25519PublicKey.from_public_bytes(public))
    except ValueError as exc:  # the library refuses an all-zero result itself
        raise HandshakeError("unusable public key (small order)") from exc
    if shared == bytes(32):  # in case a library version does not
        raise HandshakeError("unusable public key (small order)")
    return shared


def _schedule(dhs: list[bytes], random_i: bytes, random_r: bytes,
              publics: tuple[bytes, bytes, bytes, bytes]) -> tuple[bytes, bytes, bytes]:
    """(key i->r, key r->i, confirm key)."""
    okm = HKDF(hashes.SHA256(), 96, random_i + random_r, LABEL + b"".join(publics)).derive(
        b"".join(dhs))
    return okm[:32], okm[32:64], okm[64:]


def _confirm(key: bytes, responder_index: int, initiator_index: int) -> bytes:
    mac = hmac.new(key, b"confirm" + _INDEXES.pack(responder_index, initiator_index),
                   hashlib.sha256)
    return mac.digest()[:wire.CONFIRM_LEN]


def _check_index(index: int) -> None:
    if isinstance(index, bool) or not isinstance(index, int) or not 1 <= index <= _MAX_INDEX:
        raise ValueError(f"an association index is 1..2**64-1, not {index!r}")


class ReplayWindow:
    """The counters of the last `size` accepted as a bitmap (tunnel.auth's window): `check`
    before opening, `commit` only once the tag checked."""

    def __init__(self, size: int = WINDOW) -> None:
        self._window = auth.ReplayWindow(size)

    def check(self, counter: int) -> bool:
        """True if `counter` is new: above every one committed, or in the window and unseen."""
        return self._window.check(counter) is None

    def commit(self, counter: int) -> None:
        self._window.accept(counter)


class Association:
    """Keys and counters agreed with one peer daemon."""

    def __init__(self, peer_public: bytes, local_index: int, remote_index: int,
                 initiator: bool, send_key: bytes, receive_key: bytes) -> None:
        self.peer_public = peer_public
        self.local_index = local_index  # the peer puts it in what it seals to us
        self.remote_index = remote_index  # we put it in what we seal to the peer
        self.initiator = initiator
        self.send_counter = 0  # the last counter sealed
        self._send = ChaCha20Poly1305(send_key)
        self._receive = ChaCha20Poly1305(receive_key)
        self._window = ReplayWindow(WINDOW)

    def seal(self, inner: bytes) -> bytes:
        """A whole SEALED datagram carrying `inner` (an encoded inner message)."""
        if self.send_counter >= MAX_COUNTER:
            raise AssociationExhausted("this association has sealed all it may: greet again")
        counter = self.send_counter + 1
        header = wire.Sealed(self.remote_index, counter, bytes(wire.TAG_LEN)).header()
        datagram = header + self._send.encrypt(_nonce(counter), inner, header)
        self.send_counter = counter
        return datagram

    def open(self, sealed: wire.Sealed) -> bytes:
        """The plaintext of `sealed`, or AuthError / ReplayError (the window left as it was)."""
        if sealed.receiver_index != self.local_index:
            raise AuthError("sealed for another association")
        if not self._window.check(sealed.counter):
            raise ReplayError(f"counter {sealed.counter} seen before or too old")
        try:
            plain = self._receive.decrypt(_nonce(sealed.counter), sealed.ciphertext,
                                          sealed.header())
        except InvalidTag:
            raise AuthError("the tag does not authenticate") from None
        self._window.commit(sealed.counter)
        return plain


def _nonce(counter: int) -> bytes:
    return bytes(4) + counter.to_bytes(8, "big")


class Initiator:
    """One handshake this end starts: `hello()` to send, `complete(ack)` with the answer."""

    def __init__(self, identity: Identity, local_index: int, rng: Random = os.urandom) -> None:
        _check_index(local_index)
        self.identity = identity
        self.local_index = local_index
        self._ephemeral = X25519PrivateKey.from_private_bytes(rng(32))
        self._ephemeral_public = _raw_public(self._ephemeral)
        self._random = rng(wire.RANDOM_LEN)

    def hello(self) -> wire.Hello:
        return wire.Hello(self.identity.public, self._ephemeral_public, self._random,
                          self.local_index)

    def complete(self, ack: wire.HelloAck) -> Association:
        """The association the HELLO-ACK `ack` agrees, or HandshakeError if it answers another
        handshake, carries an unusable key or its confirm tag is wrong."""
        if ack.receiver_index != self.local_index:
            raise HandshakeError("the HELLO-ACK answers another handshake")
        dhs = [self.identity._agree(ack.static), _dh(self._ephemeral, ack.ephemeral),
               self.identity._agree(ack.ephemeral), _dh(self._ephemeral, ack.static)]
        to_responder, to_initiator, confirm_key = _schedule(
            dhs, self._random, ack.random,
            (self.identity.public, self._ephemeral_public, ack.static, ack.ephemeral))
        if not hmac.compare_digest(_confirm(confirm_key, ack.sender_index, self.local_index),
                                   ack.confirm):
            raise HandshakeError("the HELLO-ACK's confirm tag is wrong")
        return Association(ack.static, self.local_index, ack.sender_index, True,
                           send_key=to_responder, receive_key=to_initiator)


def respond(identity: Identity, hello: wire.Hello, local_index: int,
            rng: Random = os.urandom) -> tuple[wire.HelloAck, Association]:
    """Answer a HELLO: the HELLO-ACK to send back and the association (to trust once the
    initiator's first sealed message opens). HandshakeError if the HELLO's keys are unusable."""
    _check_index(local_index)
    ephemeral = X25519PrivateKey.from_private_bytes(rng(32))
    ephemeral_public = _raw_public(ephemeral)
    random = rng(wire.RANDOM_LEN)
    dhs = [identity._agree(hello.static), _dh(ephemeral, hello.ephemeral),
           _dh(ephemeral, hello.static), identity._agree(hello.ephemeral)]
    to_responder, to_initiator, confirm_key = _schedule(
        dhs, hello.random, random, (hello.static, hello.ephemeral, identity.public,
                                    ephemeral_public))
    ack = wire.HelloAck(identity.public, ephemeral_public, random, local_index,
                        hello.sender_index, _confirm(confirm_key, local_index,
                                                     hello.sender_index))
    association = Association(hello.static, local_index, hello.sender_index, False,
                              send_key=to_initiator, receive_key=to_responder)
    return ack, association
