"""IPv6 neighbour discovery (RFC 4861): neighbour solicitations and advertisements.

    body = build_neighbour_solicit(gateway, mac)          # for a raw ICMPv6 socket
    sock.sendto(body, (str(solicited_node(gateway)), 0, 0, ifindex))
    parse_neighbour_advert(reply)                          # the target that answered

The message builders return the ICMPv6 message without IP header and with checksum 0: a raw
ICMPv6 socket fills the checksum in (and must send with hop limit 255). `*_packet` builds the
whole IPv6 packet, checksum included, for a TUN device or a packet socket.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

from ipshift.packet.build import build_packet
from ipshift.packet.errors import BytesLike, PacketError
from ipshift.packet.ipv6 import IPv6Header
from ipshift.packet.transport import ICMPHeader

ND_ROUTER_SOLICIT = 133
ND_ROUTER_ADVERT = 134
ND_NEIGHBOR_SOLICIT = 135
ND_NEIGHBOR_ADVERT = 136
ND_OPT_SOURCE_LINKADDR = 1
ND_OPT_TARGET_LINKADDR = 2
ND_HOP_LIMIT = 255  # RFC 4861 7.1.1: anything else was forwarded and is ignored

NA_FLAG_ROUTER = 0x80000000
NA_FLAG_SOLICITED = 0x40000000
NA_FLAG_OVERRIDE = 0x20000000

_HEADER = struct.Struct("!BBHI")  # type, code, checksum, flags / reserved


@dataclass(frozen=True, slots=True)
class NeighbourMessage:
    """A neighbour solicitation or advertisement: `flags` are the advertisement's R, S, O bits
    (NA_FLAG_*), `link_address` the data of the source (solicitation) or target
    (advertisement) link-layer address option, if present: 6 bytes for Ethernet; longer
    addresses come with the option's padding (the link type says how long they are)."""

    type: int
    target: ipaddress.IPv6Address
    flags: int = 0
    link_address: bytes | None = None

    @property
    def router(self) -> bool:
        return bool(self.flags & NA_FLAG_ROUTER)

    @property
    def solicited(self) -> bool:
        return bool(self.flags & NA_FLAG_SOLICITED)

    @property
    def override(self) -> bool:
        return bool(self.flags & NA_FLAG_OVERRIDE)


def solicited_node(addr: ipaddress.IPv6Address) -> ipaddress.IPv6Address:
    """ff02::1:ffXX:XXXX for `addr` (RFC 4291 2.7.1)."""
    return ipaddress.IPv6Address(b"\xff\x02" + b"\x00" * 9 + b"\x01\xff" + addr.packed[13:])


def _link_option(kind: int, mac: bytes | None) -> bytes:
    if not mac:
        return b""
    size = 2 + len(mac)
    units = -(-size // 8)  # options are padded to 8-octet units
    if units > 255:
        raise ValueError("a link-layer address option must fit 255 units of 8 octets")
    return struct.pack("!BB", kind, units) + mac + bytes(units * 8 - size)


def build_neighbour_solicit(target: ipaddress.IPv6Address, mac: bytes | None) -> bytes:
    """ICMPv6 neighbour solicitation (checksum left 0: the kernel fills it on raw sockets);
    with `mac`, a source link-layer address option."""
    return (_HEADER.pack(ND_NEIGHBOR_SOLICIT, 0, 0, 0) + target.packed
            + _link_option(ND_OPT_SOURCE_LINKADDR, mac))


def build_neighbour_advert(target: ipaddress.IPv6Address, mac: bytes | None = None, *,
                           router: bool = False, solicited: bool = True,
                           override: bool = True) -> bytes:
    """ICMPv6 neighbour advertisement (checksum left 0); with `mac`, a target link-layer
    address option."""
    flags = ((NA_FLAG_ROUTER if router else 0) | (NA_FLAG_SOLICITED if solicited else 0)
             | (NA_FLAG_OVERRIDE if override else 0))
    return (_HEADER.pack(ND_NEIGHBOR_ADVERT, 0, 0, flags) + target.packed
            + _link_option(ND_OPT_TARGET_LINKADDR, mac))


def _packet(src: ipaddress.IPv6Address, dst: ipaddress.IPv6Address, message: bytes) -> bytes:
    kind, code, _, rest = _HEADER.unpack_from(message)
    return build_packet(IPv6Header(src.packed, dst.packed, hop_limit=ND_HOP_LIMIT),
                        ICMPHeader(kind, code, rest), message[_HEADER.size :])


def neighbour_solicit_packet(src: ipaddress.IPv6Address, target: ipaddress.IPv6Address,
                             mac: bytes | None = None, *, unicast: bool = False) -> bytes:
    """A whole neighbour solicitation packet from `src`: to the target's solicited-node
    group, or to the target itself (`unicast`, as when confirming reachability). An
    unspecified `src` (duplicate address detection) must not carry `mac` (RFC 4861 4.3)."""
    if src.is_unspecified and mac:
        raise ValueError("a solicitation from :: carries no source link-layer address")
    dst = target if unicast else solicited_node(target)
    return _packet(src, dst, build_neighbour_solicit(target, mac))


def neighbour_advert_packet(src: ipaddress.IPv6Address, dst: ipaddress.IPv6Address,
                            target: ipaddress.IPv6Address, mac: bytes | None = None, *,
                            router: bool = False, solicited: bool = True,
                            override: bool = True) -> bytes:
    """A whole neighbour advertisement packet."""
    return _packet(src, dst, build_neighbour_advert(target, mac, router=router,
                                                    solicited=solicited, override=override))


def parse_neighbour_message(data: BytesLike) -> NeighbourMessage:
    """A neighbour solicitation or advertisement (the ICMPv6 message, no IP header)."""
    if len(data) < 24:
        raise PacketError("truncated", "a neighbour discovery message needs 24 bytes")
    kind, code, _, rest = _HEADER.unpack_from(data)
    if kind not in (ND_NEIGHBOR_SOLICIT, ND_NEIGHBOR_ADVERT):
        raise PacketError("bad-type", f"ICMPv6 type {kind} is not a neighbour solicitation "
                                      "or advertisement")
    if code != 0:
        raise PacketError("bad-code", f"neighbour discovery code {code} is not 0")
    wanted = ND_OPT_SOURCE_LINKADDR if kind == ND_NEIGHBOR_SOLICIT else ND_OPT_TARGET_LINKADDR
    link_address = None
    pos = 24
    while pos < len(data):
        if len(data) - pos < 2:
            raise PacketError("bad-option", "neighbour discovery option cut short")
        option, units = data[pos], data[pos + 1]
        if units == 0:
            raise PacketError("bad-option", "neighbour discovery option of length 0")
        end = pos + units * 8
        if end > len(data):
            raise PacketError("bad-option", "neighbour discovery option runs past the message")
        if option == wanted and link_address is None:
            link_address = bytes(data[pos + 2 : end])
        pos = end
    return NeighbourMessage(
        type=kind,
        target=ipaddress.IPv6Address(bytes(data[8:24])),
        flags=rest & 0xE0000000 if kind == ND_NEIGHBOR_ADVERT else 0,
        link_address=link_address,
    )


def parse_neighbour_advert(data: BytesLike) -> ipaddress.IPv6Address:
    """The target of a neighbour advertisement (the ICMPv6 message, no IP header)."""
    if len(data) < 24:
        raise PacketError("truncated", "neighbour advertisement needs 24 bytes")
    if data[0] != ND_NEIGHBOR_ADVERT:
        raise PacketError("bad-type", f"ICMPv6 type {data[0]} is not a neighbour advertisement")
    return ipaddress.IPv6Address(bytes(data[8:24]))
