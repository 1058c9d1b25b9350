"""The sacip daemons' messages, on UDP port 7366. Pure codecs.

Outer datagrams (network byte order; first byte the version, second the type):

    HELLO      1  1  reserved(2) static(32) ephemeral(32) random(16) sender_index(8)
    HELLO-ACK  1  2  reserved(2) static(32) ephemeral(32) random(16) sender_index(8)
                     receiver_index(8) confirm(16)
    SEALED     1  3  reserved(2) receiver_index(8) counter(8) ciphertext+tag(>= 16)

Inner messages (the plaintext of a SEALED datagram; first byte the inner type):

    NOTICE     1  seq(4) family(1: 4 or 6) old new receiver (4 or 16 bytes each)
                  count(2) count x [proto(1) sender_port(2) receiver_port(2)]
    CHALLENGE  2  seq(4) cookie(16)          RESPONSE  3  seq(4) cookie(16)
    ACK        4  seq(4) count(2) count x result(1)   (MOVED 0, UNKNOWN 1, REFUSED 2)
    PING       5  nonce(8)                   PONG      6  nonce(8)

A NOTICE says: the sessions between me at `old` and you at `receiver` continue with me at
`new`; each session is named by protocol (6 TCP, 17 UDP) and ports (1..65535) as it is on the
wire between those two addresses. Indexes name an association at its receiver and are never 0;
counters start at 1; a SEALED datagram is at most 1232 bytes (the IPv6 minimum MTU less the
IPv6 and UDP headers), so a NOTICE names at most MAX_NOTICE_SESSIONS sessions (`notices`
splits a longer list).

    datagram = Hello(static, ephemeral, random, index).encode()
    message = decode_datagram(data)        # Hello | HelloAck | Sealed, or WireError
    inner = decode_inner(plaintext)        # Notice | Challenge | ... , or WireError

Every length is checked exactly (trailing bytes are refused) and every field's range, also
when a message is built, so an invalid message cannot be made. `WireError.reason` is a short
slug for counting ("short", "version", "type", "length", "address", "count", "field").
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Sequence
from dataclasses import dataclass

from ipshift.packet.errors import PacketError

PORT = 7366
VERSION = 1
HELLO, HELLO_ACK, SEALED = 1, 2, 3
NOTICE, CHALLENGE, RESPONSE, ACK, PING, PONG = 1, 2, 3, 4, 5, 6
MOVED, UNKNOWN, REFUSED = 0, 1, 2
KEY_LEN, RANDOM_LEN, CONFIRM_LEN, COOKIE_LEN, TAG_LEN = 32, 16, 16, 16, 16
MAX_DATAGRAM = 1232  # the IPv6 minimum MTU less IPv6 and UDP headers
PROTOCOLS = (6, 17)

_HEAD = struct.Struct("!BBH")
_HELLO = struct.Struct(f"!BBH{KEY_LEN}s{KEY_LEN}s{RANDOM_LEN}sQ")
_HELLO_ACK = struct.Struct(f"!BBH{KEY_LEN}s{KEY_LEN}s{RANDOM_LEN}sQQ{CONFIRM_LEN}s")
_SEALED = struct.Struct("!BBHQQ")
_SEQ_COOKIE = struct.Struct(f"!BI{COOKIE_LEN}s")
_SESSION = struct.Struct("!BHH")
_NONCE = struct.Struct("!BQ")
_U16 = struct.Struct("!H")
SEALED_OVERHEAD = _SEALED.size + TAG_LEN
_NOTICE_FIXED6 = 1 + 4 + 1 + 3 * 16 + 2
#: sessions per NOTICE such that a sealed IPv6 notice fits MAX_DATAGRAM
MAX_NOTICE_SESSIONS = (MAX_DATAGRAM - SEALED_OVERHEAD - _NOTICE_FIXED6) // _SESSION.size


class WireError(PacketError):
    """A datagram or inner message that is not one; `.reason` says why, for counting."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(reason, message)
        self.reason = reason


def _need(cond: bool, reason: str, message: str) -> None:
    if not cond:
        raise WireError(reason, message)


def _bytes(value: bytes, length: int, what: str) -> None:
    _need(isinstance(value, bytes) and len(value) == length, "field",
          f"{what} is {length} bytes")


def _u(value: int, bits: int, what: str, least: int = 0) -> None:
    _need(isinstance(value, int) and not isinstance(value, bool)
          and least <= value < (1 << bits), "field", f"{what} {value!r} is out of range")


# --- outer datagrams -------------------------------------------------------------------------
@dataclass(frozen=True)
class Hello:
    static: bytes
    ephemeral: bytes
    random: bytes
    sender_index: int

    def __post_init__(self) -> None:
        _bytes(self.static, KEY_LEN, "static key")
        _bytes(self.ephemeral, KEY_LEN, "ephemeral key")
        _bytes(self.random, RANDOM_LEN, "random")
        _u(self.sender_index, 64, "sender index", 1)

    def encode(self) -> bytes:
        return _HELLO.pack(VERSION, HELLO, 0, self.static, self.ephemeral, self.random,
                           self.sender_index)


@dataclass(frozen=True)
class HelloAck:
    static: bytes
    ephemeral: bytes
    random: bytes
    sender_index: int
    receiver_index: int
    confirm: bytes

    def __post_init__(self) -> None:
        _bytes(self.static, KEY_LEN, "static key")
        _bytes(self.ephemeral, KEY_LEN, "ephemeral key")
        _bytes(self.random, RANDOM_LEN, "random")
        _u(self.sender_index, 64, "sender index", 1)
        _u(self.receiver_index, 64, "receiver index", 1)
        _bytes(self.confirm, CONFIRM_LEN, "confirm tag")

    def encode(self) -> bytes:
        return _HELLO_ACK.pack(VERSION, HELLO_ACK, 0, self.static, self.ephemeral, self.random,
                               self.sender_index, self.receiver_index, self.confirm)


@dataclass(frozen=True)
class Sealed:
    receiver_index: int
    counter: int
    ciphertext: bytes  # with the tag

    def __post_init__(self) -> None:
        _u(self.receiver_index, 64, "receiver index", 1)
        _u(self.counter, 64, "counter", 1)
        _need(isinstance(self.ciphertext, bytes) and TAG_LEN <= len(self.ciphertext)
              <= MAX_DATAGRAM - _SEALED.size, "length", "a sealed message's ciphertext is "
              f"{TAG_LEN}..{MAX_DATAGRAM - _SEALED.size} bytes")

    def header(self) -> bytes:
        """The associated data: version, type, reserved, receiver index and counter."""
        return _SEALED.pack(VERSION, SEALED, 0, self.receiver_index, self.counter)

    def encode(self) -> bytes:
        return self.header() + self.ciphertext


Datagram = Hello | HelloAck | Sealed


def decode_datagram(data: bytes) -> Datagram:
    _need(len(data) >= _HEAD.size, "short", f"a datagram of {len(data)} bytes")
    version, kind, reserved = _HEAD.unpack_from(data)
    _need(version == VERSION, "version", f"version {version}, not {VERSION}")
    _need(reserved == 0, "field", "reserved bytes are not zero")
    if kind == HELLO:
        _need(len(data) == _HELLO.size, "length", f"a HELLO is {_HELLO.size} bytes")
        _v, _t, _r, static, ephemeral, random, index = _HELLO.unpack(data)
        return Hello(static, ephemeral, random, index)
    if kind == HELLO_ACK:
        _need(len(data) == _HELLO_ACK.size, "length",
              f"a HELLO-ACK is {_HELLO_ACK.size} bytes")
        _v, _t, _r, static, ephemeral, random, sender, receiver, confirm = _HELLO_ACK.unpack(data)
        return HelloAck(static, ephemeral, random, sender, receiver, confirm)
    if kind == SEALED:
        _need(len(data) >= SEALED_OVERHEAD, "short", f"a SEALED datagram of {len(data)} bytes")
        _need(len(data) <= MAX_DATAGRAM, "length", f"a datagram of {len(data)} bytes")
        _v, _t, _r, receiver, counter = _SEALED.unpack_from(data)
        return Sealed(receiver, counter, bytes(data[_SEALED.size:]))
    raise WireError("type", f"datagram type {kind}")


# --- inner messages ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Session:
    proto: int
    sender_port: int
    receiver_port: int

    def __post_init__(self) -> None:
        _need(self.proto in PROTOCOLS, "field", f"protocol {self.proto!r} is not TCP or UDP")
        _u(self.sender_port, 16, "sender port", 1)
        _u(self.receiver_port, 16, "receiver port", 1)


def _address(text: str, what: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        raise WireError("address", f"{what} {text!r} is not an address") from None
    _need(not (ip.is_unspecified or ip.is_multicast), "address",
          f"{what} {ip} is not a unicast address")
    return ip


@dataclass(frozen=True)
class Notice:
    seq: int
    old: str
    new: str
    receiver: str
    sessions: tuple[Session, ...]

    def __post_init__(self) -> None:
        _u(self.seq, 32, "seq")
        ips = [_address(a, w) for a, w in ((self.old, "old address"), (self.new, "new address"),
                                           (self.receiver, "receiver address"))]
        _need(len({ip.version for ip in ips}) == 1, "address",
              "a notice's addresses are of one family")
        _need(ips[0] != ips[1], "address", "the old and the new address are the same")
        fix = object.__setattr__
        fix(self, "old", str(ips[0]))
        fix(self, "new", str(ips[1]))
        fix(self, "receiver", str(ips[2]))
        fix(self, "sessions", tuple(self.sessions))
        _need(1 <= len(self.sessions) <= MAX_NOTICE_SESSIONS, "count",
              f"a notice names 1..{MAX_NOTICE_SESSIONS} sessions")
        _need(all(isinstance(s, Session) for s in self.sessions), "field", "not a Session")

    def encode(self) -> bytes:
        version = ipaddress.ip_address(self.old).version
        out = [struct.pack("!BIB", NOTICE, self.seq, version)]
        out += [ipaddress.ip_address(a).packed for a in (self.old, self.new, self.receiver)]
        out.append(_U16.pack(len(self.sessions)))
        out += [_SESSION.pack(s.proto, s.sender_port, s.receiver_port) for s in self.sessions]
        return b"".join(out)


def notices(seq_start: int, old: str, new: str, receiver: str,
            sessions: Sequence[Session]) -> list[Notice]:
    """The sessions in notices of at most MAX_NOTICE_SESSIONS each, seq counting up."""
    out = []
    for n, first in enumerate(range(0, len(sessions), MAX_NOTICE_SESSIONS)):
        out.append(Notice((seq_start + n) & 0xFFFFFFFF, old, new, receiver,
                          tuple(sessions[first:first + MAX_NOTICE_SESSIONS])))
    return out


@dataclass(frozen=True)
class _Cookie:
    """A message of a notice's sequence number and a 16-byte cookie."""

    KIND = 0
    seq: int
    cookie: bytes

    def __post_init__(self) -> None:
        _u(self.seq, 32, "seq")
        _bytes(self.cookie, COOKIE_LEN, "cookie")

    def encode(self) -> bytes:
        return _SEQ_COOKIE.pack(self.KIND, self.seq, self.cookie)


@dataclass(frozen=True)
class Challenge(_Cookie):
    """To the new address: prove you receive there (return routability)."""

    KIND = CHALLENGE


@dataclass(frozen=True)
class Response(_Cookie):
    """From the new address: the challenge's cookie."""

    KIND = RESPONSE


@dataclass(frozen=True)
class Ack:
    seq: int
    results: tuple[int, ...]

    def __post_init__(self) -> None:
        _u(self.seq, 32, "seq")
        object.__setattr__(self, "results", tuple(self.results))
        _need(1 <= len(self.results) <= MAX_NOTICE_SESSIONS, "count",
              f"an ack has 1..{MAX_NOTICE_SESSIONS} results")
        _need(all(r in (MOVED, UNKNOWN, REFUSED) for r in self.results), "field",
              "a result is 0 (moved), 1 (unknown) or 2 (refused)")

    def encode(self) -> bytes:
        return struct.pack("!BIH", ACK, self.seq, len(self.results)) + bytes(self.results)


@dataclass(frozen=True)
class _Nonce:
    KIND = 0
    nonce: int

    def __post_init__(self) -> None:
        _u(self.nonce, 64, "nonce")

    def encode(self) -> bytes:
        return _NONCE.pack(self.KIND, self.nonce)


@dataclass(frozen=True)
class Ping(_Nonce):
    KIND = PING


@dataclass(frozen=True)
class Pong(_Nonce):
    KIND = PONG


Inner = Notice | Challenge | Response | Ack | Ping | Pong


def decode_inner(plain: bytes) -> Inner:
    _need(len(plain) >= 1, "short", "an empty message")
    kind = plain[0]
    if kind == NOTICE:
        _need(len(plain) >= 6, "short", "a NOTICE shorter than its header")
        seq, family = struct.unpack_from("!IB", plain, 1)
        _need(family in (4, 6), "field", f"address family {family}")
        size = 4 if family == 4 else 16
        head = 6 + 3 * size + 2
        _need(len(plain) >= head, "short", "a NOTICE shorter than its addresses")
        old, new, receiver = (str(ipaddress.ip_address(plain[6 + i * size:6 + (i + 1) * size]))
                              for i in range(3))
        (count,) = _U16.unpack_from(plain, head - 2)
        _need(len(plain) == head + count * _SESSION.size, "length",
              f"a NOTICE of {count} sessions is {head + count * _SESSION.size} bytes")
        sessions = tuple(Session(*_SESSION.unpack_from(plain, head + i * _SESSION.size))
                         for i in range(count))
        return Notice(seq, old, new, receiver, sessions)
    if kind in (CHALLENGE, RESPONSE):
        _need(len(plain) == _SEQ_COOKIE.size, "length", f"a message of {len(plain)} bytes")
        _k, seq, cookie = _SEQ_COOKIE.unpack(plain)
        return Challenge(seq, cookie) if kind == CHALLENGE else Response(seq, cookie)
    if kind == ACK:
        _need(len(plain) >= 7, "short", "an ACK shorter than its header")
        seq, count = struct.unpack_from("!IH", plain, 1)
        _need(len(plain) == 7 + count, "length", f"an ACK of {count} results is {7 + count}")
        return Ack(seq, tuple(plain[7:]))
    if kind in (PING, PONG):
        _need(len(plain) == _NONCE.size, "length", f"a message of {len(plain)} bytes")
        _k, nonce = _NONCE.unpack(plain)
        return Ping(nonce) if kind == PING else Pong(nonce)
    raise WireError("type", f"inner message type {kind}")
