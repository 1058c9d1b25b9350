"""Optional per-peer datagram authentication (and encryption): AES-256-GCM, a replay window.

Pure but for `read_key_file` (key files themselves: ipshift.keyfile, whose names are
re-exported here): no sockets, no clock (the first send counter is given).

An authenticated datagram is the framing header in clear, 12 bytes of authentication header,
the sealed rest of the datagram and the 16-byte tag:

     0                   1                   2                   3
     0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1
    +---------------------------------------------------------------+
    |     framing header (wire version 1, batch chunk or report)    |
    +---------------+-----------------------------------------------+
    |     lane      |                 reserved (0)                  |
    +---------------+-----------------------------------------------+
    |                      send counter (64 bits)                   |
    |                                                               |
    +---------------------------------------------------------------+
    |     rest of the datagram, encrypted (inner packet or chunk)   |
    +---------------------------------------------------------------+
    |                         tag (16 bytes)                        |
    +---------------------------------------------------------------+

- The nonce is the 12 bytes lane, reserved, counter; the associated data is the first 16
  bytes (framing header and nonce), so neither can be changed.
- Keys: one 32-byte key per peer, shared by both ends (`read_key_file`). Each datagram is
  sealed with a key derived from it (HKDF-SHA256) for the sending direction, the lane and the
  epoch (counter >> 32): the two directions never share a key, so a datagram reflected back to
  its sender fails, and no key seals more than 2**32 datagrams (AES-GCM's safe volume).
  Which end is which direction: `Role` (`role_for` derives it from the two endpoints).
- The lane is the sender's queue: queue workers of one end share the key but never a lane,
  so never a nonce. A receiver accepts only its own lane (queue N of one end talks to queue N
  of the other), so a datagram replayed to another queue's port is refused as well.
- The counter starts at the wall clock in nanoseconds when the sender starts (the caller
  passes it) and goes up by one per datagram: a restarted sender starts above every counter
  it used before (it sends fewer than 10**9 datagrams a second), and the receiver's replay
  window (2048 datagrams, a bitmap) refuses counters it has seen or that are older.

Why AES-GCM and not ChaCha20-Poly1305: measured here (bench/bench_peers.py), AES-256-GCM
seals and opens a 1400-byte datagram in about 2/3 of ChaCha20-Poly1305's time on a CPU with
AES and carry-less multiply instructions, which is what the tunnel runs on.

A GRO receive holds many datagrams back to back; `open_batch` opens each on its own and lays
the accepted ones out as an unauthenticated batch of the same shape (the refused ones left
out), so the receive path after it is the same with and without a key. `seal_batch` does the
reverse for a UDP_SEGMENT send.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from ipshift import keyfile
from ipshift.keyfile import (
    KeyFileError,
    check_key_file_status,
    format_key_file,
    parse_key_file,
    write_key_file,
)
from ipshift.packet.errors import BytesLike, PacketError
from ipshift.tunnel import wire
from ipshift.tunnel.config import ConfigError, Endpoint
from ipshift.tunnel.peers import KEY_LEN

FRAMING_LEN = wire.HEADER_LEN  # the framing header every tunnel datagram starts with
AUTH_HEADER = struct.Struct(">IQ")  # lane << 24 | reserved, send counter
AUTH_HEADER_LEN = AUTH_HEADER.size  # 12: the nonce
PREFIX_LEN = FRAMING_LEN + AUTH_HEADER_LEN  # 16: the associated data
TAG_LEN = 16
OVERHEAD = AUTH_HEADER_LEN + TAG_LEN  # 28 bytes more per datagram than without a key
WINDOW = 2048  # datagrams the replay window remembers
EPOCH_SHIFT = 32  # a new derived key every 2**32 datagrams
MAX_LANES = 256
MAX_COUNTER = (1 << 64) - 1
_KEY_CACHE = 4  # derived receive keys kept (the current epoch, the one before, ...)
_HKDF_SALT = b"ipshift tunnel auth v1"


class Role(IntEnum):
    """Which direction an end sends in. The two ends of a peering must differ."""

    INITIATOR = 0
    RESPONDER = 1


def role_for(local: Endpoint, remote: Endpoint) -> Role:
    """The role of the end at `local` talking to `remote`: the end with the lower (address,
    port) is the initiator. Both ends of a tunnel configured with each other's endpoints agree;
    behind NAT, where an end does not see its own public endpoint, give the roles explicitly
    (a client is the initiator, a gateway the responder)."""
    mine = (local.host.version, local.host.packed, local.port)
    theirs = (remote.host.version, remote.host.packed, remote.port)
    if mine == theirs:
        raise ConfigError(f"local and remote endpoints are both {local}; they must differ")
    return Role.INITIATOR if mine < theirs else Role.RESPONDER


class Refusal(IntEnum):
    """Why a datagram was refused; every refusal is counted."""

    TRUNCATED = 0  # too short for the framing header, the authentication header and the tag
    BAD_HEADER = 1  # reserved bits set
    WRONG_LANE = 2  # sealed for another queue
    TOO_OLD = 3  # counter below the replay window
    REPLAYED = 4  # counter seen already
    FORGED = 5  # the tag does not verify: another key, altered on the way, or made up


class AuthError(PacketError):
    """A datagram was refused (`refusal` says why); the forwarder counts and drops it."""

    def __init__(self, refusal: Refusal, detail: str = "") -> None:
        super().__init__(refusal.name.lower().replace("_", "-"), detail)
        self.refusal = refusal


class TunnelKeyFileError(KeyFileError, ConfigError):
    """A tunnel key file is unusable: to the tunnel, a configuration error like any other."""


# --- key files (the format and its checks: ipshift.keyfile) ----------------------------------
def generate_key() -> bytes:
    return AESGCM.generate_key(bit_length=KEY_LEN * 8)


def read_key_file(path: str) -> bytes:
    """A tunnel key (KEY_LEN bytes) from key file `path`, with keyfile.read_key_file's checks;
    its errors are ConfigErrors too, as the tunnel's callers expect."""
    try:
        return keyfile.read_key_file(path, KEY_LEN)
    except KeyFileError as exc:
        raise TunnelKeyFileError(str(exc)) from exc


# --- the replay window ------------------------------------------------------------------------
class ReplayWindow:
    """The highest counter accepted and which of the WINDOW counters below it were seen (bit
    n of `seen`: counter top - n). Checked before a datagram is opened, updated only once it
    authenticated, so forged counters move nothing (RFC 4303 3.4.3)."""

    __slots__ = ("_mask", "seen", "size", "top")

    def __init__(self, size: int = WINDOW) -> None:
        self.size = size
        self._mask = (1 << size) - 1
        self.top = -1
        self.seen = 0

    def check(self, counter: int) -> Refusal | None:
        behind = self.top - counter
        if behind < 0:
            return None
        if behind >= self.size:
            return Refusal.TOO_OLD
        if self.seen >> behind & 1:
            return Refusal.REPLAYED
        return None

    def accept(self, counter: int) -> None:
        ahead = counter - self.top
        if ahead > 0:
            self.seen = (self.seen << ahead | 1) & self._mask if ahead < self.size else 1
            self.top = counter
        else:
            self.seen |= 1 << -ahead


@dataclass
class AuthCounters:
    sealed: int = 0
    opened: int = 0
    derived_keys: int = 0


class DatagramAuth:
    """Seals what one end sends to one peer and opens what it receives from it, on one lane
    (queue). `first_counter`: the wall clock in nanoseconds at start (time.time_ns()).

    Not thread-safe: one per peer and queue worker."""

    def __init__(self, key: bytes, role: Role, *, first_counter: int, lane: int = 0) -> None:
        if len(key) != KEY_LEN:
            raise ValueError(f"an authentication key has {KEY_LEN} bytes")
        if not 0 <= lane < MAX_LANES:
            raise ValueError(f"lane {lane} outside 0..{MAX_LANES - 1}")
        if not 0 <= first_counter <= MAX_COUNTER:
            raise ValueError("the first counter is a 64-bit number")
        self._key = key
        self.role = Role(role)
        self.lane = lane
        self._lane_word = lane << 24
        self.counter = first_counter  # the next one to send
        self._send_epoch = -1
        self._send_aead: AESGCM | None = None
        self._receive: dict[int, AESGCM] = {}
        self.window = ReplayWindow()
        self.counters = AuthCounters()
        self.refused = [0] * len(Refusal)

    def _derive(self, sender: Role, epoch: int) -> AESGCM:
        self.counters.derived_keys += 1
        info = b"ipshift tunnel datagrams" + bytes([sender, self.lane]) + epoch.to_bytes(4, "big")
        key = HKDF(hashes.SHA256(), KEY_LEN, _HKDF_SALT, info).derive(self._key)
        return AESGCM(key)

    def _send_key(self, counter: int) -> AESGCM:
        epoch = counter >> EPOCH_SHIFT
        if epoch != self._send_epoch:
            self._send_aead = self._derive(self.role, epoch)
            self._send_epoch = epoch
        assert self._send_aead is not None
        return self._send_aead

    # --- send ---------------------------------------------------------------------------------
    def _next_counter(self) -> int:
        counter = self.counter
        if counter > MAX_COUNTER:
            raise ValueError("the send counter is used up; restart with a new key")
        self.counter = counter + 1
        return counter

    def seal(self, header: BytesLike, payload: BytesLike) -> bytes:
        """The authenticated datagram for a 4-byte framing header and the rest."""
        out = bytearray(PREFIX_LEN + len(payload) + TAG_LEN)
        self.seal_into(out, 0, header, payload)
        return bytes(out)

    def seal_into(self, out: bytearray, at: int, header: BytesLike, payload: BytesLike) -> int:
        """Write the authenticated datagram to out[at:]; returns where it ends."""
        if len(header) != FRAMING_LEN:
            raise ValueError(f"the framing header has {FRAMING_LEN} bytes")
        counter = self._next_counter()
        view = memoryview(out)
        out[at:at + FRAMING_LEN] = header
        AUTH_HEADER.pack_into(out, at + FRAMING_LEN, self._lane_word, counter)
        end = at + PREFIX_LEN + len(payload) + TAG_LEN
        self._send_key(counter).encrypt_into(
            view[at + FRAMING_LEN:at + PREFIX_LEN], payload, view[at:at + PREFIX_LEN],
            view[at + PREFIX_LEN:end])
        self.counters.sealed += 1
        return end

    def seal_batch(self, data: BytesLike, nbytes: int, segment: int,
                   out: bytearray) -> tuple[int, int]:
        """Seal the datagrams data[:nbytes], each `segment` bytes but the last (segment 0: one
        datagram), into `out`, as a batch for one UDP_SEGMENT send. Returns (bytes, segment
        size) of the sealed batch."""
        step = segment or nbytes or 1
        count = -(-nbytes // step)
        if len(out) < nbytes + count * OVERHEAD:
            raise ValueError("the output buffer is too small for the sealed batch")
        if count and nbytes - (count - 1) * step < FRAMING_LEN:
            raise ValueError("a datagram shorter than its framing header")
        if self.counter + count - 1 > MAX_COUNTER:
            raise ValueError("the send counter is used up; restart with a new key")
        # Written out for speed: this runs once per datagram sent.
        source = memoryview(data)
        view = memoryview(out)
        lane_word = self._lane_word
        pack = AUTH_HEADER.pack_into
        counter = self.counter
        aead = self._send_key(counter)
        epoch = self._send_epoch
        at = 0
        for start in range(0, nbytes, step):
            if counter >> EPOCH_SHIFT != epoch:
                aead = self._send_key(counter)
                epoch = self._send_epoch
            stop = min(start + step, nbytes)
            end = at + stop - start + OVERHEAD
            view[at:at + FRAMING_LEN] = source[start:start + FRAMING_LEN]
            pack(out, at + FRAMING_LEN, lane_word, counter)
            aead.encrypt_into(view[at + FRAMING_LEN:at + PREFIX_LEN],
                              source[start + FRAMING_LEN:stop], view[at:at + PREFIX_LEN],
                              view[at + PREFIX_LEN:end])
            counter += 1
            at = end
        self.counter = counter
        self.counters.sealed += count
        return at, segment + OVERHEAD if segment else 0

    # --- receive ------------------------------------------------------------------------------
    def open(self, datagram: BytesLike) -> tuple[bytes, bytes]:
        """(framing header, rest) of an authenticated datagram; AuthError if refused."""
        size = len(datagram)
        out = bytearray(max(size - OVERHEAD, 0))
        self.open_into(datagram, 0, size, out, 0)
        return bytes(out[:FRAMING_LEN]), bytes(out[FRAMING_LEN:])

    def open_into(self, datagram: BytesLike, start: int, end: int, out: bytearray | memoryview,
                  at: int) -> int:
        """Open the datagram at datagram[start:end] into out[at:] as the unauthenticated
        datagram (framing header and rest); returns its length. AuthError if refused (then
        out[at:] holds nothing usable)."""
        length = end - start - OVERHEAD
        if length < FRAMING_LEN:
            return self._refuse(Refusal.TRUNCATED, f"{end - start}-byte datagram")
        word, counter = AUTH_HEADER.unpack_from(datagram, start + FRAMING_LEN)
        if word != self._lane_word:
            if word & 0xFFFFFF:
                return self._refuse(Refusal.BAD_HEADER, f"reserved bits 0x{word & 0xFFFFFF:x}")
            return self._refuse(Refusal.WRONG_LANE, f"lane {word >> 24}, not {self.lane}")
        refusal = self.window.check(counter)
        if refusal is not None:
            return self._refuse(refusal, f"counter {counter}, window top {self.window.top}")
        epoch = counter >> EPOCH_SHIFT
        aead = self._receive.get(epoch)
        fresh = aead is None
        if aead is None:
            # Kept only once a datagram authenticates with it: forged epochs evict nothing.
            aead = self._derive(Role(1 - self.role), epoch)
        source = memoryview(datagram)
        try:
            aead.decrypt_into(
                source[start + FRAMING_LEN:start + PREFIX_LEN], source[start + PREFIX_LEN:end],
                source[start:start + PREFIX_LEN],
                memoryview(out)[at + FRAMING_LEN:at + length])
        except InvalidTag:
            return self._refuse(Refusal.FORGED, "the tag does not verify")
        if fresh:
            if len(self._receive) >= _KEY_CACHE:
                del self._receive[min(self._receive)]
            self._receive[epoch] = aead
        out[at:at + FRAMING_LEN] = source[start:start + FRAMING_LEN]
        self.window.accept(counter)
        self.counters.opened += 1
        return length

    def _refuse(self, refusal: Refusal, detail: str) -> int:
        self.refused[refusal] += 1
        raise AuthError(refusal, detail)

    def open_batch(self, data: BytesLike, nbytes: int, segment: int,
                   out: bytearray) -> tuple[int, int]:
        """Open the datagrams of a GRO receive, data[:nbytes], each `segment` bytes but the
        last (segment 0: one datagram), each on its own. The accepted ones are written to
        `out` back to back as unauthenticated datagrams, each `segment - OVERHEAD` bytes but
        the last: the shape of a receive without a key. Returns (bytes, segment size) of that;
        refusals are counted in `refused`."""
        if not nbytes:
            self.refused[Refusal.TRUNCATED] += 1  # an empty datagram
            return 0, 0
        step = segment or nbytes
        if len(out) < nbytes:
            raise ValueError("the output buffer is smaller than the batch")
        # Written out for speed: this runs once per datagram received. The usual datagram
        # (this lane, the next counters in order, a known epoch) is opened here; anything
        # else takes open_into, which also says why it refuses.
        source = memoryview(data)
        view = memoryview(out)
        unpack = AUTH_HEADER.unpack_from
        lane_word = self._lane_word
        window = self.window
        keys = self._receive
        at = 0
        opened = 0
        for start in range(0, nbytes, step):
            stop = start + step
            if stop > nbytes:
                stop = nbytes
            length = stop - start - OVERHEAD
            if length >= FRAMING_LEN:
                word, counter = unpack(data, start + FRAMING_LEN)
                aead = keys.get(counter >> EPOCH_SHIFT)
                if word == lane_word and counter > window.top and aead is not None:
                    try:
                        aead.decrypt_into(source[start + FRAMING_LEN:start + PREFIX_LEN],
                                          source[start + PREFIX_LEN:stop],
                                          source[start:start + PREFIX_LEN],
                                          view[at + FRAMING_LEN:at + length])
                    except InvalidTag:
                        self.refused[Refusal.FORGED] += 1
                        continue
                    view[at:at + FRAMING_LEN] = source[start:start + FRAMING_LEN]
                    window.accept(counter)
                    at += length
                    opened += 1
                    continue
            try:
                at += self.open_into(data, start, stop, out, at)
            except AuthError:
                continue
        self.counters.opened += opened
        return at, segment - OVERHEAD if segment and segment > OVERHEAD else 0

    def refusals(self) -> dict[str, int]:
        return {refusal.name.lower(): self.refused[refusal] for refusal in Refusal}


__all__ = [
    "OVERHEAD",
    "WINDOW",
    "AuthError",
    "DatagramAuth",
    "KeyFileError",
    "Refusal",
    "ReplayWindow",
    "Role",
    "TunnelKeyFileError",
    "check_key_file_status",
    "format_key_file",
    "generate_key",
    "parse_key_file",
    "read_key_file",
    "role_for",
    "write_key_file",
]
