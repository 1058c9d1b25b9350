"""IPv6 header and extension headers (RFC 8200), and the walk along the header chain."""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass
from typing import NamedTuple

from ipshift.packet.errors import BytesLike, PacketError
from ipshift.packet.options import (
    IPV6_HOME_ADDRESS,
    Option,
    decode_ipv6_options,
    encode_ipv6_options,
    find_ipv6_option,
)
from ipshift.packet.protocols import (
    IPPROTO_AH,
    IPPROTO_DSTOPTS,
    IPPROTO_FRAGMENT,
    IPPROTO_HOPOPTS,
    IPPROTO_NONE,
    IPPROTO_ROUTING,
    IPV6_EXTENSION_HEADERS,
)

_HEADER = struct.Struct("!IHBB16s16s")
_FRAGMENT = struct.Struct("!HI")

ROUTING_TYPE_SOURCE_ROUTE = 0  # RFC 2460, deprecated by RFC 5095 but still parsed
ROUTING_TYPE_2 = 2  # Mobile IPv6 (RFC 6275)
ROUTING_TYPE_SEGMENT = 4  # Segment Routing Header (RFC 8754)


@dataclass(slots=True)
class IPv6Header:
    """The fixed IPv6 header. A None `payload_length` is filled in by `pack`."""

    src: bytes
    dst: bytes
    next_header: int = IPPROTO_NONE
    hop_limit: int = 64
    traffic_class: int = 0
    flow_label: int = 0
    payload_length: int | None = None

    @classmethod
    def parse(cls, data: BytesLike, offset: int = 0) -> IPv6Header:
        if len(data) - offset < 40:
            raise PacketError("truncated", "IPv6 header needs 40 bytes")
        vtcfl, plen, nh, hlim, src, dst = _HEADER.unpack_from(data, offset)
        if vtcfl >> 28 != 6:
            raise PacketError("bad-version", f"version {vtcfl >> 28} in an IPv6 header")
        return cls(
            src=src,
            dst=dst,
            next_header=nh,
            hop_limit=hlim,
            traffic_class=vtcfl >> 20 & 0xFF,
            flow_label=vtcfl & 0xFFFFF,
            payload_length=plen,
        )

    def pack(self, payload_length: int = 0) -> bytes:
        if len(self.src) != 16 or len(self.dst) != 16:
            raise ValueError("IPv6 addresses must be 16 bytes")
        if not 0 <= self.traffic_class <= 0xFF or not 0 <= self.flow_label <= 0xFFFFF:
            raise ValueError("IPv6 traffic class takes 8 bits and the flow label 20")
        plen = payload_length if self.payload_length is None else self.payload_length
        try:
            return _HEADER.pack(
                6 << 28 | self.traffic_class << 20 | self.flow_label,
                plen,
                self.next_header,
                self.hop_limit,
                self.src,
                self.dst,
            )
        except struct.error as exc:
            raise ValueError(f"IPv6 header field out of range: {exc}") from exc

    @property
    def src_ip(self) -> ipaddress.IPv6Address:
        return ipaddress.IPv6Address(self.src)

    @property
    def dst_ip(self) -> ipaddress.IPv6Address:
        return ipaddress.IPv6Address(self.dst)


@dataclass(slots=True)
class ExtensionHeader:
    """One IPv6 extension header.

    `kind` is its own protocol number (IPPROTO_HOPOPTS, IPPROTO_ROUTING, IPPROTO_FRAGMENT,
    IPPROTO_DSTOPTS, IPPROTO_AH, ...); `body` is everything after its first two octets (next
    header and length; in a fragment header the second octet is reserved: ignored on parse,
    written as zero). `next_header` is what the header said on parse; `build_packet` sets it
    from the chain.
    """

    kind: int
    body: bytes
    next_header: int = IPPROTO_NONE

    @classmethod
    def hop_by_hop(cls, options: list[Option] | tuple[Option, ...]) -> ExtensionHeader:
        return cls(IPPROTO_HOPOPTS, encode_ipv6_options(options))

    @classmethod
    def destination_options(cls, options: list[Option] | tuple[Option, ...]) -> ExtensionHeader:
        return cls(IPPROTO_DSTOPTS, encode_ipv6_options(options))

    @classmethod
    def routing(cls, routing_type: int, segments_left: int, data: bytes) -> ExtensionHeader:
        """A routing header; `data` is what follows the segments left octet."""
        return cls(IPPROTO_ROUTING, bytes((routing_type, segments_left)) + data)

    @classmethod
    def routing_addresses(
        cls, routing_type: int, segments_left: int, addresses: list[bytes] | tuple[bytes, ...]
    ) -> ExtensionHeader:
        """A type 0 or type 2 routing header: 4 reserved bytes, then the addresses."""
        return cls.routing(routing_type, segments_left, bytes(4) + b"".join(addresses))

    @classmethod
    def fragment(cls, offset: int, more: bool, identification: int) -> ExtensionHeader:
        """A fragment header; `offset` in 8-byte units."""
        if not 0 <= offset <= 0x1FFF or not 0 <= identification <= 0xFFFFFFFF:
            raise ValueError("IPv6 fragment offset takes 13 bits and the identification 32")
        return cls(IPPROTO_FRAGMENT, _FRAGMENT.pack(offset << 3 | more, identification))

    @classmethod
    def parse(
        cls, kind: int, data: BytesLike, offset: int, end: int | None = None
    ) -> ExtensionHeader:
        """Decode the extension header of type `kind` at `offset` (not past `end`)."""
        stop = len(data) if end is None else min(end, len(data))
        size = extension_header_size(kind, data, offset, stop)
        return cls(kind, bytes(data[offset + 2 : offset + size]), data[offset])

    def pack(self, next_header: int | None = None) -> bytes:
        nh = self.next_header if next_header is None else next_header
        size = len(self.body) + 2
        if self.kind == IPPROTO_FRAGMENT:
            if size != 8:
                raise ValueError("an IPv6 fragment header is 8 bytes")
            return bytes((nh, 0)) + self.body
        if self.kind == IPPROTO_AH:
            if size % 4 or not 12 <= size <= 1028:
                raise ValueError("an AH header is a multiple of 4 bytes, 12 to 1028")
            return bytes((nh, size // 4 - 2)) + self.body
        if size % 8 or size > 2048:
            raise ValueError(f"extension header {self.kind} must be a multiple of 8 bytes")
        return bytes((nh, size // 8 - 1)) + self.body

    @property
    def length(self) -> int:
        """Size on the wire in bytes."""
        return len(self.body) + 2

    def options(self) -> list[Option]:
        """Options of a hop-by-hop or destination options header."""
        if self.kind not in (IPPROTO_HOPOPTS, IPPROTO_DSTOPTS):
            raise ValueError(f"extension header {self.kind} carries no option list")
        return decode_ipv6_options(self.body)

    @property
    def routing_type(self) -> int:
        self._expect(IPPROTO_ROUTING)
        return self.body[0]

    @property
    def segments_left(self) -> int:
        self._expect(IPPROTO_ROUTING)
        return self.body[1]

    @property
    def fragment_offset(self) -> int:
        self._expect(IPPROTO_FRAGMENT)
        return int.from_bytes(self.body[0:2], "big") >> 3

    @property
    def more_fragments(self) -> bool:
        self._expect(IPPROTO_FRAGMENT)
        return bool(self.body[1] & 1)

    @property
    def identification(self) -> int:
        self._expect(IPPROTO_FRAGMENT)
        return int.from_bytes(self.body[2:6], "big")

    def _expect(self, kind: int) -> None:
        if self.kind != kind:
            raise ValueError(f"extension header {self.kind} is not of type {kind}")


class ChainEnd(NamedTuple):
    """Where an IPv6 header chain leads (see `walk_header_chain`)."""

    protocol: int  # upper-layer protocol (or what follows the fragment header of a later fragment)
    offset: int  # where it starts
    fragment_header_offset: int  # -1 if not fragmented
    later_fragment: bool  # True: fragment offset > 0, no upper-layer header in this packet
    pseudo_src_offset: int  # the address the pseudo-header uses as source ...
    pseudo_dst_offset: int  # ... and as destination (RFC 8200 8.1, RFC 6275 6.3)


def extension_header_size(kind: int, data: BytesLike, offset: int, end: int) -> int:
    """Size of the extension header of type `kind` at `offset`; PacketError if it does not fit
    before `end`."""
    if end - offset < 8:
        raise PacketError("truncated", f"IPv6 extension header {kind} needs 8 bytes")
    if kind == IPPROTO_FRAGMENT:
        size = 8
    elif kind == IPPROTO_AH:
        size = (data[offset + 1] + 2) << 2
    else:
        size = (data[offset + 1] + 1) << 3
    if offset + size > end:
        raise PacketError("truncated", f"IPv6 extension header {kind} runs past the packet")
    return size


def walk_header_chain(data: BytesLike, offset: int, end: int) -> ChainEnd:
    """Follow the chain of the IPv6 packet at `offset` (ending at `end`) to the upper layer.

    Steps over hop-by-hop (first only), routing, fragment, destination options, AH, mobility,
    HIP and shim6 headers; ESP and "no next header" end the chain. Notes the final destination
    of a routing header with segments left (types 0, 2 and 4) and a home address option, since
    the upper-layer pseudo-header uses those instead of the header's addresses.
    """
    kind = data[offset + 6]
    pos = offset + 40
    fragment_at = -1
    pseudo_src = offset + 8
    pseudo_dst = offset + 24
    while kind in IPV6_EXTENSION_HEADERS:
        size = extension_header_size(kind, data, pos, end)
        following = data[pos]
        if kind == IPPROTO_FRAGMENT:
            if fragment_at >= 0:
                raise PacketError("bad-extension-header", "two fragment headers")
            fragment_at = pos
            if (data[pos + 2] << 8 | data[pos + 3]) & 0xFFF8:
                # A later fragment: what follows is the middle of the fragmentable part.
                return ChainEnd(following, pos + 8, pos, True, pseudo_src, pseudo_dst)
        elif kind == IPPROTO_HOPOPTS:
            if pos != offset + 40:
                raise PacketError("bad-extension-header", "hop-by-hop options not first")
        elif kind == IPPROTO_ROUTING:
            if data[pos + 3]:  # segments left
                pseudo_dst = _routing_final_destination(data, pos, size, pseudo_dst)
        elif kind == IPPROTO_DSTOPTS:
            home = find_ipv6_option(data, pos + 2, pos + size, IPV6_HOME_ADDRESS)
            if home >= 0:
                if data[home - 1] != 16:
                    raise PacketError("bad-option", "home address option is not 16 bytes")
                pseudo_src = home
        kind = following
        pos += size
    return ChainEnd(kind, pos, fragment_at, False, pseudo_src, pseudo_dst)


def _routing_final_destination(data: BytesLike, pos: int, size: int, default: int) -> int:
    routing_type = data[pos + 2]
    if routing_type == ROUTING_TYPE_SOURCE_ROUTE:
        count = (size - 8) >> 4
        if count:
            return pos + 8 + ((count - 1) << 4)  # the last address is the final one
    elif routing_type in (ROUTING_TYPE_2, ROUTING_TYPE_SEGMENT) and size >= 24:
        return pos + 8  # type 2: the home address; SRH: Segment List[0] is the last segment
    # Other types (RPL's compressed addresses, unassigned ones): keep the header's destination.
    return default
