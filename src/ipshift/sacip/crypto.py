"""Keys, the handshake and sealed messages of the sacip daemons. Pure (randomness injectable).

    me = load_identity("/var/lib/ipshift/sacip.key", create=True)
    initiator = Initiator(me, local_index=7)
    hello = initiator.hello()                                  # -> the peer
    ack, theirs = respond(peer_identity, hello, local_index=9)  # on the peer
    mine = initiator.complete(ack)                             # HandshakeError if forged
    datagram = mine.seal(b"...")                               # a whole SEALED datagram
    theirs.open(wire.decode_datagram(datagram))                # AuthError / ReplayError

Key schedule. Each end has a static X25519 key (its identity, pinned or trusted on first use
by the other end) and makes an ephemeral one per handshake. Both ends compute the same four
Diffie-Hellman results — static-static, ephemeral-ephemeral, and the two mixed ones — so only
the holders of both static keys get the keys, and the ephemerals make them forward secret:

    ikm  = DH(s_i, S_r) || DH(e_i, E_r) || DH(s_i, E_r) || DH(e_i, S_r)
    salt = random_i || random_r
    info = "ipshift sacip v1" || S_i || E_i || S_r || E_r
    HKDF-SHA256(ikm, salt, info) -> key i->r (32) || key r->i (32) || confirm key (32)
    confirm = HMAC-SHA256(confirm key, "confirm" || index_r || index_i)[:16]

The responder's confirm tag proves it derived the keys (holds its static key); the initiator
proves it with its first sealed message. A DH result of all zeros (a small-order public key)
is refused.

Sealing: ChaCha20-Poly1305, a key per direction, nonce = 4 zero bytes + the 64-bit counter
(starting at 1), associated data = the SEALED header (version, type, receiver index,
counter). A receiver keeps a window of the last 1024 counters: one seen before, or older than
the window, is refused — after the tag was checked, so forged counters move nothing.
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

from ipshift.sacip import wire
from ipshift.tunnel.auth import KeyFileError, ReplayWindow, read_key_file, write_key_file

Random = Callable[[int], bytes]
LABEL = b"ipshift sacip v1"
WINDOW = 1024
MAX_COUNTER = (1 << 63) - 1
_INDEXES = struct.Struct("!QQ")


class CryptoError(ValueError):
    """Something did not authenticate; `.reason` is a slug for counting."""

    reason = "crypto"


class HandshakeError(CryptoError):
    reason = "handshake"


class AuthError(CryptoError):
    reason = "auth"


class ReplayError(CryptoError):
    reason = "replay"


class AssociationExhausted(CryptoError):
    reason = "exhausted"


class IdentityError(ValueError):
    """The identity key cannot be used; str() is one line."""


def fingerprint(public: bytes) -> str:
    """`SHA256:` and the unpadded base64 of the key's SHA-256, as ssh shows host keys."""
    digest = hashlib.sha256(public).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


class Identity:
    """This host's static X25519 key."""

    def __init__(self, private: X25519PrivateKey) -> None:
        self._private = private
        self.public = private.public_key().public_bytes(serialization.Encoding.Raw,
                                                        serialization.PublicFormat.Raw)
        self.fingerprint = fingerprint(self.public)

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

    def exchange(self, public: bytes) -> bytes:
        return _dh(self._private, public)


def load_identity(path: str, *, create: bool = False) -> Identity:
    """The identity in key file `path` (0600, root's; see ipshift.keyfile), made there first
    if it does not exist and `create`."""
    if create and not os.path.lexists(path):
        os.makedirs(os.path.dirname(path) or ".", mode=0o700, exist_ok=True)
        write_key_file(path, Identity.generate().private_bytes(),
                       "ipshift sacip identity (X25519 private key): keep it secret")
    try:
        return Identity.from_private(read_key_file(path))
    except KeyFileError as exc:
        raise IdentityError(str(exc)) from exc


def _dh(private: X25519PrivateKey, public: bytes) -> bytes:
    try:
        shared = private.exchange(X25519PublicKey.from_public_bytes(public))
    except ValueError as exc:  # the library refuses an all-zero result itself
        raise HandshakeError(f"unusable public key: {exc}") from exc
    if shared == bytes(32):
        raise HandshakeError("unusable public key (small order)")
    return shared


def _schedule(dhs: list[bytes], random_i: bytes, random_r: bytes,
              publics: tuple[bytes, bytes, bytes, bytes]) -> tuple[bytes, bytes, bytes]:
    okm = HKDF(hashes.SHA256(), 96, random_i + random_r, LABEL + b"".join(publics)).derive(
        b"".join(dhs))
    return okm[:32], okm[32:64], okm[64:]


def _confirm(key: bytes, responder_index: int, initiator_index: int) -> bytes:
    mac = hmac.new(key, b"confirm" + _INDEXES.pack(responder_index, initiator_index),
                   hashlib.sha256)
    return mac.digest()[:wire.CONFIRM_LEN]


class Initiator:
    """One handshake this end starts."""

    def __init__(self, identity: Identity, local_index: int, *, rng: Random = os.urandom) -> None:
        self.identity = identity
        self.local_index = local_index
        self._ephemeral = X25519PrivateKey.from_private_bytes(rng(32))
        self._ephemeral_public = self._ephemeral.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        self._random = rng(wire.RANDOM_LEN)

    def hello(self) -> wire.Hello:
        return wire.Hello(self.identity.public, self._ephemeral_public, self._random,
                          self.local_index)

    def complete(self, ack: wire.HelloAck) -> Association:
        if ack.receiver_index != self.local_index:
            raise HandshakeError("the HELLO-ACK answers another handshake")
        dhs = [self.identity.exchange(ack.static), _dh(self._ephemeral, ack.ephemeral),
               self.identity.exchange(ack.ephemeral), _dh(self._ephemeral, ack.static)]
        send, receive, confirm_key = _schedule(
            dhs, self._random, ack.random,
            (self.identity.public, self._ephemeral_public, ack.static, ack.ephemeral))
        if not hmac.compare_digest(_confirm(confirm_key, ack.sender_index, self.local_index),
                                   ack.confirm):
            raise HandshakeError("the HELLO-ACK's confirm tag is wrong")
        return Association(ack.static, self.local_index, ack.sender_index, True, send, receive)


def respond(identity: Identity, hello: wire.Hello, local_index: int, *,
            rng: Random = os.urandom) -> tuple[wire.HelloAck, Association]:
    """Answer a HELLO: the HELLO-ACK to send and the association (usable once the initiator's
    first sealed message opens)."""
    ephemeral = X25519PrivateKey.from_private_bytes(rng(32))
    ephemeral_public = ephemeral.public_key().public_bytes(serialization.Encoding.Raw,
                                                           serialization.PublicFormat.Raw)
    random = rng(wire.RANDOM_LEN)
    dhs = [identity.exchange(hello.static), _dh(ephemeral, hello.ephemeral),
           _dh(ephemeral, hello.static), identity.exchange(hello.ephemeral)]
    to_initiator_from_i, to_responder, confirm_key = _schedule(
        dhs, hello.random, random,
        (hello.static, hello.ephemeral, identity.public, ephemeral_public))
    ack = wire.HelloAck(identity.public, ephemeral_public, random, local_index,
                        hello.sender_index, _confirm(confirm_key, local_index,
                                                     hello.sender_index))
    # key i->r is what the initiator seals with: the responder opens with it
    association = Association(hello.static, local_index, hello.sender_index, False,
                              to_responder, to_initiator_from_i)
    return ack, association


class Association:
    """Keys and counters agreed with one peer daemon."""

    def __init__(self, peer_public: bytes, local_index: int, remote_index: int,
                 initiator: bool, send_key: bytes, receive_key: bytes) -> None:
        self.peer_public = peer_public
        self.local_index = local_index
        self.remote_index = remote_index
        self.initiator = initiator
        self.send_counter = 0
        self._send = ChaCha20Poly1305(send_key)
        self._receive = ChaCha20Poly1305(receive_key)
        self.window = ReplayWindow(WINDOW)

    def seal(self, inner: bytes) -> bytes:
        if self.send_counter >= MAX_COUNTER:
            raise AssociationExhausted("this association has sealed all it may: greet again")
        self.send_counter += 1
        header = wire.Sealed(self.remote_index, self.send_counter, bytes(wire.TAG_LEN)).header()
        nonce = bytes(4) + self.send_counter.to_bytes(8, "big")
        return header + self._send.encrypt(nonce, inner, header)

    def open(self, sealed: wire.Sealed) -> bytes:
        if sealed.receiver_index != self.local_index:
            raise AuthError("sealed for another association")
        if self.window.check(sealed.counter) is not None:
            raise ReplayError(f"counter {sealed.counter} seen before or too old")
        nonce = bytes(4) + sealed.counter.to_bytes(8, "big")
        try:
            plain = self._receive.decrypt(nonce, sealed.ciphertext, sealed.header())
        except InvalidTag:
            raise AuthError("the tag does not authenticate") from None
        self.window.accept(sealed.counter)
        return plain
