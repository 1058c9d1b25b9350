"""IPv4 header (RFC 791)."""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass
from typing import ClassVar

from ipshift.packet.checksum import internet_checksum
from ipshift.packet.errors import BytesLike, PacketError
from ipshift.packet.options import Option, decode_ipv4_options

_HEADER = struct.Struct("!BBHHHBBH4s4s")


@dataclass(slots=True)
class IPv4Header:
    """An IPv4 header. `total_length` and `checksum` left as None are computed by `pack`.

    `flags` is the 3-bit field as a number: 4 reserved, 2 don't fragment, 1 more fragments;
    `fragment_offset` counts 8-byte units; `options` are the raw option bytes (a multiple of 4;
    see `option_list` and `encode_ipv4_options`).
    """

    src: bytes
    dst: bytes
    protocol: int = 0
    ttl: int = 64
    tos: int = 0
    identification: int = 0
    flags: int = 0
    fragment_offset: int = 0
    options: bytes = b""
    total_length: int | None = None
    checksum: int | None = None

    FLAG_RESERVED: ClassVar[int] = 4
    FLAG_DONT_FRAGMENT: ClassVar[int] = 2
    FLAG_MORE_FRAGMENTS: ClassVar[int] = 1

    @classmethod
    def parse(cls, data: BytesLike, offset: int = 0) -> IPv4Header:
        """Decode the header at `offset`. Checks version, IHL and that the total length covers
        the header; not that the buffer holds the whole packet (ICMP errors quote a prefix)."""
        if len(data) - offset < 20:
            raise PacketError("truncated", "IPv4 header needs 20 bytes")
        (vihl, tos, total, ident, frag, ttl, proto, csum, src, dst) = _HEADER.unpack_from(
            data, offset
        )
        if vihl >> 4 != 4:
            raise PacketError("bad-version", f"version {vihl >> 4} in an IPv4 header")
        ihl = (vihl & 15) << 2
        if ihl < 20:
            raise PacketError("bad-ihl", f"IHL {ihl >> 2} is below 5")
        if len(data) - offset < ihl:
            raise PacketError("truncated", f"IPv4 header of {ihl} bytes is cut short")
        if total < ihl:
            raise PacketError("length-mismatch", f"total length {total} < header length {ihl}")
        return cls(
            src=src,
            dst=dst,
            protocol=proto,
            ttl=ttl,
            tos=tos,
            identification=ident,
            flags=frag >> 13,
            fragment_offset=frag & 0x1FFF,
            options=bytes(data[offset + 20 : offset + ihl]),
            total_length=total,
            checksum=csum,
        )

    def pack(self, payload_length: int = 0) -> bytes:
        """Encode. A None total length becomes header + `payload_length`; a None checksum is
        computed."""
        if len(self.src) != 4 or len(self.dst) != 4:
            raise ValueError("IPv4 addresses must be 4 bytes")
        if len(self.options) % 4 or len(self.options) > 40:
            raise ValueError("IPv4 options must be a multiple of 4 bytes, at most 40")
        ihl = 20 + len(self.options)
        total = ihl + payload_length if self.total_length is None else self.total_length
        if not 0 <= self.flags <= 7 or not 0 <= self.fragment_offset <= 0x1FFF:
            raise ValueError("IPv4 flags take 3 bits and the fragment offset 13")
        try:
            fixed = _HEADER.pack(
                0x40 | ihl >> 2,
                self.tos,
                total,
                self.identification,
                self.flags << 13 | self.fragment_offset,
                self.ttl,
                self.protocol,
                0 if self.checksum is None else self.checksum,
                self.src,
                self.dst,
            )
        except struct.error as exc:
            raise ValueError(f"IPv4 header field out of range: {exc}") from exc
        header = bytearray(fixed)
        header += self.options
        if self.checksum is None:
            header[10:12] = internet_checksum(header).to_bytes(2, "big")
        return bytes(header)

    @property
    def header_length(self) -> int:
        return 20 + len(self.options)

    @property
    def dont_fragment(self) -> bool:
        return bool(self.flags & self.FLAG_DONT_FRAGMENT)

    @property
    def more_fragments(self) -> bool:
        return bool(self.flags & self.FLAG_MORE_FRAGMENTS)

    @property
    def src_ip(self) -> ipaddress.IPv4Address:
        return ipaddress.IPv4Address(self.src)

    @property
    def dst_ip(self) -> ipaddress.IPv4Address:
        return ipaddress.IPv4Address(self.dst)

    def option_list(self) -> list[Option]:
        """The options decoded; raises PacketError("bad-option") if they are malformed."""
        return decode_ipv4_options(self.options)


IPV4_OPTION_LSRR = 131  # loose source and record route
IPV4_OPTION_SSRR = 137  # strict source and record route


def source_route_destination(data: BytesLike, start: int, end: int) -> int:
    """Offset of the final destination in a loose or strict source route option among the
    options in ``data[start:end]``, or -1 if there is none or its route is used up.

    The sender's TCP/UDP pseudo-header holds the final destination, the last address of the
    route, while the header's destination is the next hop (RFC 1122 3.2.1.8). Malformed
    options give -1: they are `option_list`'s to report.
    """
    pos = start
    while pos < end:
        kind = data[pos]
        if kind == 0:
            break
        if kind == 1:
            pos += 1
            continue
        if pos + 1 >= end:
            return -1
        length = data[pos + 1]
        if length < 2 or pos + length > end:
            return -1
        # The pointer (third octet, counted from 1) passes the length when the route is done.
        if kind in (IPV4_OPTION_LSRR, IPV4_OPTION_SSRR) and length >= 7 and data[pos + 2] <= length:
            return pos + 3 + ((length - 3) // 4 - 1) * 4
        pos += length
    return -1

