"""Netlink framing shared by the hand-written netlink codecs (ctnetlink, sock_diag, batched
route changes): message headers, type-length-value attributes, and walking a datagram.

Everything here is pure; malformed input raises `ParseError` (a `NetError`).
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from typing import NamedTuple

from ipshift.net.errors import ParseError

NLMSG_ERROR = 2
NLMSG_DONE = 3
NLA_F_NESTED = 0x8000
NLA_TYPE_MASK = 0x3FFF  # without the nested / net-byte-order flags

HEADER = struct.Struct("=IHHII")  # length, type, flags, sequence, port id
ATTR = struct.Struct("=HH")  # length, type (rtattr and nlattr share the layout)
_ERRNO = struct.Struct("=i")


class Message(NamedTuple):
    type: int
    flags: int
    seq: int
    body: bytes


def message(msg_type: int, flags: int, seq: int, payload: bytes) -> bytes:
    """One netlink message: header + payload."""
    return HEADER.pack(HEADER.size + len(payload), msg_type, flags, seq, 0) + payload


def attr(kind: int, payload: bytes, *, nested: bool = False) -> bytes:
    """One attribute, padded to 4 bytes."""
    length = ATTR.size + len(payload)
    return (ATTR.pack(length, kind | (NLA_F_NESTED if nested else 0)) + payload
            + bytes((-length) & 3))


def messages(data: bytes) -> Iterator[Message]:
    """The messages of one datagram, in order."""
    off = 0
    while off < len(data):
        if off + HEADER.size > len(data):
            raise ParseError(f"truncated netlink header at offset {off}")
        length, msg_type, flags, seq, _pid = HEADER.unpack_from(data, off)
        if length < HEADER.size or off + length > len(data):
            raise ParseError(f"bad netlink message length {length} at offset {off}")
        yield Message(msg_type, flags, seq, data[off + HEADER.size : off + length])
        off += (length + 3) & ~3


def error_code(body: bytes, *, required: bool = True) -> int:
    """The errno (positive; 0 for an ack) at the start of an NLMSG_ERROR or NLMSG_DONE body."""
    if len(body) < _ERRNO.size:
        if required:
            raise ParseError("truncated netlink error message")
        return 0
    return -int(_ERRNO.unpack_from(body)[0])


def attributes(data: bytes, off: int = 0, what: str = "netlink") -> Iterator[tuple[int, bytes]]:
    """(type without flags, value) of each attribute from `off` on."""
    while off + ATTR.size <= len(data):
        length, kind = ATTR.unpack_from(data, off)
        if length < ATTR.size or off + length > len(data):
            raise ParseError(f"bad {what} attribute length {length} at offset {off}")
        yield kind & NLA_TYPE_MASK, data[off + ATTR.size : off + length]
        off += (length + 3) & ~3
