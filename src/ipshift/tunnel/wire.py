"""The tunnel's wire format: one UDP datagram = a 4-byte header + one complete IP packet.

     0                   1                   2                   3
     0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1
    +-------+-------+---------------+-------------------------------+
    |Version| Flags |  csum_offset  |          csum_start           |
    +-------+-------+---------------+-------------------------------+
    |                 inner IPv4 or IPv6 packet ...                 |

- Version 1. A receiver drops other versions.
- Flags: PARTIAL (0x1) the inner L4 checksum field holds only the pseudo-header sum; the receiver
  completes it by adding the ones'-complement sum of the bytes from csum_start (counted from the
  first byte of the inner packet) to the end, into the 16-bit field at csum_start + csum_offset,
  exactly as a virtio NEEDS_CSUM packet. The outer UDP checksum covers the datagram in transit.
  VERIFIED (0x2) the sender's kernel had verified the inner checksum (virtio DATA_VALID).
  Other bits are reserved: sent as zero, a datagram with any of them set is dropped.
- csum_start/csum_offset are zero unless PARTIAL is set.

The header is big-endian. The inner packet must fill the rest of the datagram exactly (its IPv4
total length / IPv6 payload length agree with the datagram length).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from ipshift.packet.errors import BytesLike, PacketError

VERSION = 1
HEADER = struct.Struct(">BBH")
HEADER_LEN = HEADER.size
FLAG_PARTIAL = 0x1
FLAG_VERIFIED = 0x2
KNOWN_FLAGS = FLAG_PARTIAL | FLAG_VERIFIED


class TunnelHeaderError(PacketError):
    """A tunnel datagram is malformed; the forwarder counts and drops it."""


@dataclass(frozen=True, slots=True)
class TunnelHeader:
    flags: int = 0
    csum_start: int = 0
    csum_offset: int = 0

    @property
    def partial(self) -> bool:
        return bool(self.flags & FLAG_PARTIAL)

    @property
    def verified(self) -> bool:
        return bool(self.flags & FLAG_VERIFIED)

    def encode(self) -> bytes:
        return encode_header(self.flags, self.csum_start, self.csum_offset)


def encode_header(flags: int, csum_start: int = 0, csum_offset: int = 0) -> bytes:
    return HEADER.pack(VERSION << 4 | flags, csum_offset, csum_start)


# Headers the sender uses for packets with a complete checksum.
PLAIN_HEADER = encode_header(0)
VERIFIED_HEADER = encode_header(FLAG_VERIFIED)


def inner_length_error(datagram: BytesLike, start: int, end: int) -> str | None:
    """Why the inner packet at datagram[start:end] is not one complete IP packet (None if it is).
    Shared by `decode` and the forwarder's fast path so both accept exactly the same packets."""
    size = end - start
    if size < 20:
        return "inner packet shorter than an IPv4 header"
    version = datagram[start] >> 4
    if version == 4:
        if datagram[start] & 0x0F < 5:
            return "inner IPv4 header length below 5 words"
        if (datagram[start + 2] << 8 | datagram[start + 3]) != size:
            return "inner IPv4 total length does not match the datagram"
        return None
    if version == 6:
        if size < 40:
            return "inner packet shorter than an IPv6 header"
        if (datagram[start + 4] << 8 | datagram[start + 5]) + 40 != size:
            return "inner IPv6 payload length does not match the datagram"
        return None
    return f"inner IP version {version}"


def checksum_error(
    datagram: BytesLike, start: int, end: int, flags: int, csum_start: int, csum_offset: int
) -> str | None:
    """Why the checksum fields do not fit the inner packet (None if they do)."""
    if flags & FLAG_PARTIAL:
        min_start = 20 if datagram[start] >> 4 == 4 else 40
        if csum_start < min_start or start + csum_start + csum_offset + 2 > end:
            return f"partial checksum at {csum_start}+{csum_offset} outside the L4 header"
    elif csum_start or csum_offset:
        return "checksum position set without the PARTIAL flag"
    return None


def decode(datagram: BytesLike) -> tuple[TunnelHeader, memoryview]:
    """Check one tunnel datagram; return its header and the inner packet."""
    if len(datagram) < HEADER_LEN:
        raise TunnelHeaderError("truncated", f"{len(datagram)}-byte datagram")
    first, csum_offset, csum_start = HEADER.unpack_from(datagram)
    if first >> 4 != VERSION:
        raise TunnelHeaderError("bad-version", f"tunnel version {first >> 4}")
    flags = first & 0x0F
    if flags & ~KNOWN_FLAGS:
        raise TunnelHeaderError("bad-flags", f"reserved tunnel flags 0x{flags:x}")
    why = inner_length_error(datagram, HEADER_LEN, len(datagram))
    if why is None:
        why = checksum_error(datagram, HEADER_LEN, len(datagram), flags, csum_start, csum_offset)
    if why is not None:
        raise TunnelHeaderError("bad-inner", why)
    return TunnelHeader(flags, csum_start, csum_offset), memoryview(datagram)[HEADER_LEN:]
