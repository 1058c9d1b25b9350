"""Netlink framing shared by the hand-written netlink codecs (ctnetlink, nfnetlink_queue,
sock_diag, batched route changes): message headers, type-length-value attributes, the nfnetlink
header, and walking a datagram.

Everything here is pure; malformed input raises `ParseError` (a `NetError`).
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from typing import NamedTuple

from ipshift.net.errors import ParseError

NLMSG_ERROR = 2
NLMSG_DONE = 3
NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4
NLA_F_NESTED = 0x8000
NLA_TYPE_MASK = 0x3FFF  # without the nested / net-byte-order flags

HEADER = struct.Struct("=IHHII")  # length, type, flags, sequence, port id
ATTR = struct.Struct("=HH")  # length, type (rtattr and nlattr share the layout)
_ERRNO = struct.Struct("=i")
#: struct nfgenmsg: family, version, resource id (a queue number, ...; network byte order)
NFGENMSG = struct.Struct("!BBH")
NFNETLINK_V0 = 0


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


def netfilter_message(subsystem: int, msg_type: int, flags: int, seq: int, family: int,
                      res_id: int, attrs: bytes) -> bytes:
    """One nfnetlink message: header, nfgenmsg, attributes."""
    return message(subsystem << 8 | msg_type, flags, seq,
                   NFGENMSG.pack(family, NFNETLINK_V0, res_id) + attrs)


def netfilter_header(body: bytes, what: str = "nfnetlink") -> tuple[int, int]:
    """(family, resource id) of an nfnetlink message body; its attributes start at
    `NFGENMSG.size`."""
    if len(body) < NFGENMSG.size:
        raise ParseError(f"{what} message shorter than its nfgenmsg header")
    family, _version, res_id = NFGENMSG.unpack_from(body)
    return family, res_id


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
