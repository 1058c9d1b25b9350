"""ILNPv6 on the wire (RFC 6740-6744): identifier-locator vectors, the nonce destination option,
the ICMPv6 Locator Update, and the two transport checksum rules.

    address = ilv(locator, nid)                     # I-LV: L64 high 64 bits, NID low 64 bits
    nonce = find_nonce(packet)                      # bytes, or None
    packet = insert_nonce(packet, nonce)            # new bytes; lengths and chain fixed
    lu = parse_locator_update_packet(packet)        # lu.update.locators, lu.nonce
    rewrite_locators(buf, src_l64, dst_l64, rule="ilnp")   # per packet, in place

Checksum rules: under RFC 6741 4.2 (``rule="ilnp"``) the TCP/UDP pseudo-header holds the
addresses with their locators zeroed, so a locator rewrite leaves the checksum alone; under
``rule="ipv6"`` (the plain IPv6 pseudo-header, as a newer draft proposes) it covers the full
addresses. ICMPv6 always uses the plain IPv6 rule (RFC 6741 4.3). Every parser raises
`PacketError` and nothing else on malformed input; see docs/packet.md, section "ILNPv6".
"""

from __future__ import annotations

import dataclasses
import ipaddress
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, Literal

from ipshift.packet.build import build_packet
from ipshift.packet.checksum import (
    apply_delta,
    apply_delta_udp,
    checksum_delta,
    internet_sum,
    pseudo_header_sum,
)
from ipshift.packet.errors import BytesLike, PacketError, WritableBuffer
from ipshift.packet.ipv6 import (
    ChainEnd,
    ExtensionHeader,
    IPv6Header,
    extension_header_size,
    walk_header_chain,
)
from ipshift.packet.options import IPV6_PAD1, IPV6_PADN, Option, ipv6_option_spans, ipv6_padding
from ipshift.packet.protocols import (
    IPPROTO_AH,
    IPPROTO_DCCP,
    IPPROTO_DSTOPTS,
    IPPROTO_ICMPV6,
    IPPROTO_NONE,
    IPPROTO_TCP,
    IPPROTO_UDP,
    IPPROTO_UDPLITE,
)
from ipshift.packet.transport import ICMPHeader
from ipshift.packet.view import IPv6Packet, parse_packet

__all__ = [
    "DEFAULT_NONCE_SIZE",
    "ICMPV6_LOCATOR_UPDATE",
    "LU_ACKNOWLEDGEMENT",
    "LU_ADVERTISEMENT",
    "NONCE_OPTION",
    "NONCE_SIZES",
    "RULES",
    "AddressLike6",
    "LocatorEntry",
    "LocatorUpdate",
    "LocatorUpdatePacket",
    "Rule",
    "compute_checksum",
    "convert_checksum",
    "destination_locator",
    "fill_checksum",
    "find_nonce",
    "ilv",
    "insert_nonce",
    "locator_update_packet",
    "locators",
    "nonce_extension_header",
    "nonce_header",
    "parse_locator_update_packet",
    "remove_nonce",
    "rewrite_locators",
    "set_destination_locator",
    "set_source_locator",
    "source_locator",
    "split_ilv",
    "verify_checksum",
]

#: The transport checksum rule: "ilnp" (RFC 6741 4.2, locators zeroed in the pseudo-header)
#: or "ipv6" (the plain IPv6 pseudo-header).
Rule = Literal["ilnp", "ipv6"]
RULES: Final = ("ilnp", "ipv6")

NONCE_OPTION: Final = 0x8B  # RFC 6744 2: destination option type 139
NONCE_SIZES: Final = (4, 12)  # the 32- and 96-bit nonces every implementation must support
DEFAULT_NONCE_SIZE: Final = 4  # what FreeBSD 14, the reference implementation, sends
ICMPV6_LOCATOR_UPDATE: Final = 156  # RFC 6743 2
LU_ADVERTISEMENT: Final = 1
LU_ACKNOWLEDGEMENT: Final = 2

AddressLike6 = ipaddress.IPv6Address | str | bytes

_U64_MAX = (1 << 64) - 1
_LU_HEADER = struct.Struct("!BBHBBH")  # type, code, checksum, num of locs, operation, reserved
_LU_ENTRY = struct.Struct("!QHH")  # L64, preference, lifetime
_U16 = struct.Struct("!H")
_U64 = struct.Struct("!Q")
_FAST = struct.Struct("!B3xHBxQ8xQ")  # version byte, payload length, next header, both L64s
_unpack_fast = _FAST.unpack_from
_unpack_u16 = _U16.unpack_from
_pack_u16 = _U16.pack_into
_pack_u64 = _U64.pack_into
_unpack_locators = struct.Struct("!Q8xQ").unpack_from  # at offset + 8

# Upper layers whose checksum covers a pseudo-header: protocol -> (checksum offset, smallest
# header). ICMPv6 always takes the full addresses; the others follow the rule.
_CHECKSUM_FIELD: dict[int, tuple[int, int]] = {
    IPPROTO_TCP: (16, 20),
    IPPROTO_UDP: (6, 8),
    IPPROTO_UDPLITE: (6, 8),
    IPPROTO_DCCP: (6, 12),
    IPPROTO_ICMPV6: (2, 8),
}
#: compute/verify/fill take these: UDP-Lite and DCCP checksums cover a part of the segment
#: their header chooses, which only the incremental updates need not know.
_COMPUTED = frozenset({IPPROTO_TCP, IPPROTO_UDP, IPPROTO_ICMPV6})
_PADDING = (IPV6_PAD1, IPV6_PADN)


def _check_rule(rule: str) -> None:
    if rule != "ilnp" and rule != "ipv6":
        raise ValueError(f"checksum rule must be 'ilnp' or 'ipv6', not {rule!r}")


# -- identifier-locator vectors ------------------------------------------------------------------
def ilv(locator: int, nid: int) -> ipaddress.IPv6Address:
    """The IPv6 address of an I-LV: the 64-bit locator (L64) above the 64-bit node identifier."""
    if not 0 <= locator <= _U64_MAX or not 0 <= nid <= _U64_MAX:
        raise ValueError("a locator and a node identifier take 64 bits each")
    return ipaddress.IPv6Address(locator << 64 | nid)


def split_ilv(address: AddressLike6 | int) -> tuple[int, int]:
    """(locator, node identifier) of an IPv6 address (an address, its text, its 16 bytes)."""
    value = int(ipaddress.IPv6Address(address))
    return value >> 64, value & _U64_MAX


def _header_at(buf: BytesLike, offset: int) -> None:
    if offset < 0 or len(buf) - offset < 40:
        raise PacketError("truncated", "IPv6 header needs 40 bytes")
    if buf[offset] >> 4 != 6:
        raise PacketError("bad-version", f"IP version {buf[offset] >> 4} is not 6")


def locators(buf: BytesLike, offset: int = 0) -> tuple[int, int]:
    """(source L64, destination L64) of the IPv6 packet at `offset`."""
    _header_at(buf, offset)
    src, dst = _unpack_locators(buf, offset + 8)
    return src, dst


def source_locator(buf: BytesLike, offset: int = 0) -> int:
    """The source L64 (the high 64 bits of the source address, bytes 8-15)."""
    _header_at(buf, offset)
    return int.from_bytes(buf[offset + 8 : offset + 16], "big")


def destination_locator(buf: BytesLike, offset: int = 0) -> int:
    """The destination L64 (bytes 24-31)."""
    _header_at(buf, offset)
    return int.from_bytes(buf[offset + 24 : offset + 32], "big")


def _set_locator(buf: WritableBuffer, at: int, locator: int, offset: int) -> None:
    _header_at(buf, offset)
    if not 0 <= locator <= _U64_MAX:
        raise ValueError(f"a locator takes 64 bits, not {locator:#x}")
    _pack_u64(buf, at, locator)


def set_source_locator(buf: WritableBuffer, locator: int, offset: int = 0) -> None:
    """Replace the source L64 in place. No checksum is touched: see `rewrite_locators`."""
    _set_locator(buf, offset + 8, locator, offset)


def set_destination_locator(buf: WritableBuffer, locator: int, offset: int = 0) -> None:
    """Replace the destination L64 in place. No checksum is touched: see `rewrite_locators`."""
    _set_locator(buf, offset + 24, locator, offset)


# -- the header chain ----------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class _Header:
    kind: int
    pos: int  # where it starts
    size: int
    named_at: int  # the octet holding the next header value that names it


def _walk(data: BytesLike, offset: int) -> tuple[int, ChainEnd, list[_Header]]:
    """(end of the IPv6 packet, where its chain leads, its extension headers), validated."""
    _header_at(data, offset)
    end = offset + 40 + (data[offset + 4] << 8 | data[offset + 5])
    if end > len(data):
        raise PacketError("truncated", f"payload length exceeds the {len(data) - offset} bytes")
    chain = walk_header_chain(data, offset, end)  # raises for every malformed chain
    headers: list[_Header] = []
    kind = data[offset + 6]
    named_at = offset + 6
    pos = offset + 40
    while pos < chain.offset:  # the same steps the walker took
        size = extension_header_size(kind, data, pos, end)
        headers.append(_Header(kind, pos, size, named_at))
        kind = data[pos]
        named_at = pos
        pos += size
    return end, chain, headers


def _locate_nonce(
    data: BytesLike, headers: list[_Header]
) -> tuple[int, list[tuple[int, int, int]], int] | None:
    """(index of the destination options header, its options, index of the nonce option)."""
    found: tuple[int, list[tuple[int, int, int]], int] | None = None
    for number, header in enumerate(headers):
        if header.kind != IPPROTO_DSTOPTS:
            continue
        spans = ipv6_option_spans(data, header.pos + 2, header.pos + header.size)
        for index, (kind, start, end) in enumerate(spans):
            if kind != NONCE_OPTION:
                continue
            if found is not None:
                raise PacketError("duplicate-nonce", "more than one nonce option (RFC 6744 2: "
                                                     "discard as authentication failed)")
            if end - start == 2:
                raise PacketError("bad-option", "nonce option without a nonce")
            found = (number, spans, index)
    return found


def _check_fragment(data: BytesLike, chain: ChainEnd, what: str) -> None:
    at = chain.fragment_header_offset
    if at >= 0 and (data[at + 2] << 8 | data[at + 3]) & 0xFFF9:
        raise PacketError("fragmented", f"cannot {what} a fragment: the final destination "
                                        "options are in the fragmentable part")


def _check_no_ah(headers: list[_Header], what: str) -> None:
    if any(header.kind == IPPROTO_AH for header in headers):
        raise PacketError("authenticated", f"cannot {what} a packet under AH: its ICV covers "
                                           "the header chain and the payload length")


def _set_payload_length(packet: bytearray) -> None:
    length = len(packet) - 40
    if length > 0xFFFF:
        raise PacketError("too-big", f"payload of {length} bytes does not fit an IPv6 header")
    _pack_u16(packet, 4, length)


# -- the nonce option (RFC 6744) -----------------------------------------------------------------
def _nonce_bytes(nonce: BytesLike) -> bytes:
    if len(nonce) not in NONCE_SIZES:
        raise ValueError(f"an ILNPv6 nonce is 4 or 12 bytes, not {len(nonce)}")
    return bytes(nonce)


def nonce_extension_header(nonce: BytesLike) -> ExtensionHeader:
    """A destination options header holding only the nonce option, for `build_packet`."""
    return ExtensionHeader.destination_options([Option(NONCE_OPTION, _nonce_bytes(nonce))])


def nonce_header(nonce: BytesLike, next_header: int = IPPROTO_NONE) -> bytes:
    """The destination options header carrying `nonce` (4 or 12 bytes) in front of
    `next_header`: 8 bytes for a 4-byte nonce, 16 for a 12-byte one (no padding needed)."""
    return nonce_extension_header(nonce).pack(next_header)


def find_nonce(data: BytesLike, offset: int = 0) -> bytes | None:
    """The nonce of the IPv6 packet at `offset`, or None if it has none.

    Looks in every destination options header of the chain. Two nonce options are
    `duplicate-nonce` (RFC 6744 2: at most one per packet, discard as authentication failed);
    an empty one is `bad-option`. Any other length is returned as it is (4 and 12 are the
    common ones): the caller compares it with the nonce it expects.
    """
    _, _, headers = _walk(data, offset)
    found = _locate_nonce(data, headers)
    if found is None:
        return None
    _, spans, index = found
    _, start, end = spans[index]
    return bytes(data[start + 2 : end])


def insert_nonce(data: BytesLike, nonce: BytesLike, offset: int = 0) -> bytes:
    """The IPv6 packet at `offset` with the nonce option added (a new packet; `data` is left
    alone). Payload length and next-header chain are fixed; link padding is dropped.

    The option goes in front of the upper-layer header (or ESP, or "no next header"): into the
    destination options header already there, first, with padding that keeps the other
    options' alignment, or in a new destination options header. Upper-layer checksums stay
    right under either rule: the pseudo-header holds no extension header. Refused: a packet
    that already has a nonce (`duplicate-nonce`), a fragment (`fragmented`), a packet under AH
    (`authenticated`), one that would outgrow the payload length (`too-big`).
    """
    value = _nonce_bytes(nonce)
    end, chain, headers = _walk(data, offset)
    _check_fragment(data, chain, "add a nonce to")
    _check_no_ah(headers, "add a nonce to")
    if _locate_nonce(data, headers) is not None:
        raise PacketError("duplicate-nonce", "the packet already carries a nonce option")
    packet = bytearray(data[offset:end])
    last = headers[-1] if headers else None
    if last is not None and last.kind == IPPROTO_DSTOPTS:
        # The option goes first, with the header's leading padding (if any) folded into its
        # own: the header grows by a multiple of 8, so every other option keeps its alignment,
        # and no run of padding passes 7 bytes (Linux drops such packets).
        lead = 0
        for kind, _, stop in ipv6_option_spans(data, last.pos + 2, last.pos + last.size):
            if kind not in _PADDING:
                break
            lead = stop - last.pos - 2
        option = bytes((NONCE_OPTION, len(value))) + value
        block = option + ipv6_padding((lead - len(option)) % 8)
        at = last.pos - offset
        units = packet[at + 1] + (len(block) - lead) // 8
        if units > 255:
            raise PacketError("too-big", "the destination options header would pass 2048 bytes")
        packet[at + 1] = units
        packet[at + 2 : at + 2 + lead] = block
    else:
        named_at = (last.pos if last is not None else offset + 6) - offset
        packet[chain.offset - offset : chain.offset - offset] = nonce_header(
            value, packet[named_at])
        packet[named_at] = IPPROTO_DSTOPTS
    _set_payload_length(packet)
    return bytes(packet)


def remove_nonce(data: BytesLike, offset: int = 0) -> bytes:
    """The IPv6 packet at `offset` without its nonce option (a new packet; a packet without a
    nonce comes back as it is, without link padding).

    A destination options header left with nothing but padding goes; otherwise the option and
    the padding around it are replaced by at most 7 bytes of padding, keeping the other
    options' alignment. Undoes `insert_nonce` byte for byte where the header's padding was
    canonical (one Pad1 or PadN per run). Refused like `insert_nonce`: fragments, AH, and
    `duplicate-nonce`.
    """
    end, chain, headers = _walk(data, offset)
    found = _locate_nonce(data, headers)
    if found is None:
        return bytes(data[offset:end])
    _check_fragment(data, chain, "remove the nonce of")
    _check_no_ah(headers, "remove the nonce of")
    number, spans, index = found
    header = headers[number]
    packet = bytearray(data[offset:end])
    low = index
    while low > 0 and spans[low - 1][0] in _PADDING:
        low -= 1
    high = index
    while high + 1 < len(spans) and spans[high + 1][0] in _PADDING:
        high += 1
    others = [span for span in spans[:low] + spans[high + 1 :] if span[0] not in _PADDING]
    at = header.pos - offset
    if not others:
        packet[header.named_at - offset] = packet[at]
        del packet[at : at + header.size]
    else:
        start, stop = spans[low][1] - offset, spans[high][2] - offset
        filler = ipv6_padding((stop - start) % 8)
        packet[at + 1] -= (stop - start - len(filler)) // 8
        packet[start:stop] = filler
    _set_payload_length(packet)
    return bytes(packet)


# -- ICMPv6 Locator Update (RFC 6743) ------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class LocatorEntry:
    """One locator of a Locator Update: the L64, its preference (as for L64 DNS records, RFC
    6742: lower is preferred) and its lifetime in seconds."""

    l64: int
    preference: int = 0
    lifetime: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.l64 <= _U64_MAX:
            raise ValueError(f"an L64 takes 64 bits, not {self.l64:#x}")
        if not 0 <= self.preference <= 0xFFFF or not 0 <= self.lifetime <= 0xFFFF:
            raise ValueError("preference and lifetime take 16 bits each")


@dataclass(frozen=True, slots=True)
class LocatorUpdate:
    """An ICMPv6 Locator Update (type 156, code 0): an advertisement of the sender's valid
    locators (`LU_ADVERTISEMENT`) or the acknowledgement that repeats it (`LU_ACKNOWLEDGEMENT`).
    `reserved` is kept so that an acknowledgement repeats the advertisement exactly."""

    operation: int
    locators: tuple[LocatorEntry, ...]
    reserved: int = 0

    def __post_init__(self) -> None:
        if self.operation not in (LU_ADVERTISEMENT, LU_ACKNOWLEDGEMENT):
            raise ValueError(f"Locator Update operation {self.operation} is not 1 or 2")
        object.__setattr__(self, "locators", tuple(self.locators))
        if not 1 <= len(self.locators) <= 255:
            raise ValueError("a Locator Update carries 1 to 255 locators")
        if not all(isinstance(entry, LocatorEntry) for entry in self.locators):
            raise ValueError("Locator Update locators must be LocatorEntry values")
        if not 0 <= self.reserved <= 0xFFFF:
            raise ValueError("the Locator Update reserved field takes 16 bits")

    @classmethod
    def advertisement(cls, locators: Sequence[LocatorEntry]) -> LocatorUpdate:
        return cls(LU_ADVERTISEMENT, tuple(locators))

    @property
    def is_advertisement(self) -> bool:
        return self.operation == LU_ADVERTISEMENT

    def acknowledgement(self) -> LocatorUpdate:
        """The acknowledgement of this advertisement: the same body, operation 2 (RFC 6743 2)."""
        return dataclasses.replace(self, operation=LU_ACKNOWLEDGEMENT)

    def encode(self) -> bytes:
        """The ICMPv6 message with checksum 0 (a raw ICMPv6 socket fills it in)."""
        head = _LU_HEADER.pack(ICMPV6_LOCATOR_UPDATE, 0, 0, len(self.locators), self.operation,
                               self.reserved)
        return head + b"".join(_LU_ENTRY.pack(e.l64, e.preference, e.lifetime)
                               for e in self.locators)

    @classmethod
    def decode(cls, message: BytesLike) -> LocatorUpdate:
        """Decode the ICMPv6 message (from the type octet; the checksum is not checked here).

        Malformed: another type (`bad-type`) or code (`bad-code`), Num of Locs 0
        (`bad-locator-count`, RFC 6743 2), an operation other than 1 or 2 (`bad-operation`),
        fewer bytes than the locators need (`truncated`), and any byte after them
        (`length-mismatch`): the message has no room for extensions, so extra bytes mean a
        miscounted Num of Locs, and an acknowledgement must repeat the body exactly.
        """
        if len(message) < 8:
            raise PacketError("truncated", "an ICMPv6 Locator Update needs 8 bytes")
        kind, code, _, count, operation, reserved = _LU_HEADER.unpack_from(message)
        if kind != ICMPV6_LOCATOR_UPDATE:
            raise PacketError("bad-type", f"ICMPv6 type {kind} is not a Locator Update")
        if code != 0:
            raise PacketError("bad-code", f"Locator Update code {code} is not 0")
        if count == 0:
            raise PacketError("bad-locator-count", "Locator Update with Num of Locs 0")
        if operation not in (LU_ADVERTISEMENT, LU_ACKNOWLEDGEMENT):
            raise PacketError("bad-operation", f"Locator Update operation {operation}")
        size = 8 + count * _LU_ENTRY.size
        if len(message) < size:
            raise PacketError("truncated", f"{count} locators need {size} bytes, "
                                           f"not {len(message)}")
        if len(message) > size:
            raise PacketError("length-mismatch", f"{len(message) - size} bytes after the "
                                                 f"{count} locators")
        entries = tuple(LocatorEntry(*_LU_ENTRY.unpack_from(message, at))
                        for at in range(8, size, _LU_ENTRY.size))
        return cls(operation, entries, reserved)


@dataclass(frozen=True, slots=True)
class LocatorUpdatePacket:
    """A Locator Update read from a whole packet: addresses, the message, the nonce (None when
    the packet has none: RFC 6743 requires one, and the receiver drops such a message)."""

    src: ipaddress.IPv6Address
    dst: ipaddress.IPv6Address
    update: LocatorUpdate
    nonce: bytes | None


def _packed(address: AddressLike6) -> bytes:
    return ipaddress.IPv6Address(address).packed


def locator_update_packet(src: AddressLike6, dst: AddressLike6, update: LocatorUpdate, *,
                          nonce: BytesLike | None = None, hop_limit: int = 64) -> bytes:
    """A whole ILNPv6 packet: IPv6 header, the nonce's destination options header (if
    `nonce`), the Locator Update with its ICMPv6 checksum (full addresses, RFC 6741 4.3)."""
    rest = len(update.locators) << 24 | update.operation << 16 | update.reserved
    return build_packet(
        IPv6Header(_packed(src), _packed(dst), hop_limit=hop_limit),
        ICMPHeader(ICMPV6_LOCATOR_UPDATE, 0, rest),
        update.encode()[8:],
        extension_headers=[nonce_extension_header(nonce)] if nonce is not None else (),
    )


def parse_locator_update_packet(data: BytesLike, offset: int = 0) -> LocatorUpdatePacket:
    """Read a Locator Update packet: checked for structure, then type (`bad-type` for other
    ICMPv6 messages, `bad-protocol` for other upper layers), checksum (`bad-checksum`), the
    message (see `LocatorUpdate.decode`) and the nonce (see `find_nonce`)."""
    packet = _ipv6_packet(data, offset)
    if packet.protocol != IPPROTO_ICMPV6:
        raise PacketError("bad-protocol", f"protocol {packet.protocol} is not ICMPv6")
    if packet.is_fragment:
        raise PacketError("fragmented", "a fragment of a Locator Update")
    segment = packet.segment
    if segment[0] != ICMPV6_LOCATOR_UPDATE:
        raise PacketError("bad-type", f"ICMPv6 type {segment[0]} is not a Locator Update")
    if not packet.verify_transport_checksum():
        raise PacketError("bad-checksum", "Locator Update with a wrong ICMPv6 checksum")
    update = LocatorUpdate.decode(segment)
    return LocatorUpdatePacket(ipaddress.IPv6Address(packet.src),
                               ipaddress.IPv6Address(packet.dst), update,
                               find_nonce(data, offset))


# -- transport checksums under both rules ----------------------------------------------------
def _ipv6_packet(data: BytesLike, offset: int) -> IPv6Packet:
    packet = parse_packet(data, offset)
    if not isinstance(packet, IPv6Packet):
        raise PacketError("bad-version", "ILNPv6 packets are IPv6")
    return packet


def _pseudo_addresses(packet: IPv6Packet, rule: str) -> tuple[bytes, bytes]:
    src, dst = packet.pseudo_src, packet.pseudo_dst
    if rule == "ilnp" and packet.protocol != IPPROTO_ICMPV6:
        return bytes(8) + src[8:], bytes(8) + dst[8:]
    return src, dst


def _whole_segment(data: BytesLike, offset: int, rule: str) -> tuple[IPv6Packet, memoryview]:
    _check_rule(rule)
    packet = _ipv6_packet(data, offset)
    if packet.protocol not in _COMPUTED:
        raise PacketError("unsupported-protocol",
                          f"protocol {packet.protocol}: TCP, UDP and ICMPv6 only")
    if packet.is_fragment:
        raise PacketError("fragmented", "the checksum covers the whole datagram")
    return packet, packet.segment


def compute_checksum(data: BytesLike, rule: Rule = "ilnp", offset: int = 0) -> int:
    """The right checksum of the TCP, UDP or ICMPv6 segment of the IPv6 packet at `offset`
    under `rule` (ICMPv6: always the IPv6 rule), whatever its checksum field holds. A UDP sum
    of 0 gives 0xFFFF (RFC 8200 8.1: no zero UDP checksum over IPv6)."""
    packet, segment = _whole_segment(data, offset, rule)
    field = _CHECKSUM_FIELD[packet.protocol][0]
    (old,) = _unpack_u16(segment, field)
    src, dst = _pseudo_addresses(packet, rule)
    # Adding ~old cancels the field's own contribution (ones' complement subtraction).
    total = pseudo_header_sum(src, dst, packet.protocol, len(segment)) + (~old & 0xFFFF)
    value = ~internet_sum(segment, total) & 0xFFFF
    if value == 0 and packet.protocol == IPPROTO_UDP:
        return 0xFFFF
    return value


def verify_checksum(data: BytesLike, rule: Rule = "ilnp", offset: int = 0) -> bool:
    """True if the TCP, UDP or ICMPv6 checksum of the packet is right under `rule`. A UDP
    checksum of 0 is wrong (RFC 8200 8.1)."""
    packet, segment = _whole_segment(data, offset, rule)
    if packet.protocol == IPPROTO_UDP and not (segment[6] | segment[7]):
        return False
    src, dst = _pseudo_addresses(packet, rule)
    return internet_sum(segment, pseudo_header_sum(src, dst, packet.protocol,
                                                   len(segment))) == 0xFFFF


def fill_checksum(buf: WritableBuffer, rule: Rule = "ilnp", offset: int = 0) -> int:
    """Write `compute_checksum` into the packet's checksum field; returns it."""
    value = compute_checksum(buf, rule, offset)
    packet = _ipv6_packet(buf, offset)
    _pack_u16(buf, packet.transport_offset + _CHECKSUM_FIELD[packet.protocol][0], value)
    return value


def convert_checksum(buf: WritableBuffer, from_rule: Rule, to_rule: Rule,
                     offset: int = 0) -> int:
    """Change the TCP/UDP (UDP-Lite, DCCP) checksum of the packet from one rule to the other,
    in place and incrementally (RFC 1624: adding or taking away the pseudo-header locators).
    Returns the new value. ICMPv6 is left alone (one rule for both), so is a UDP checksum of 0
    (none, RFC 6935 tunnels). First fragments are converted; later ones are `fragmented`."""
    _check_rule(from_rule)
    _check_rule(to_rule)
    packet = _ipv6_packet(buf, offset)
    if packet.protocol not in _CHECKSUM_FIELD:
        raise PacketError("unsupported-protocol", f"protocol {packet.protocol} has no "
                                                  "pseudo-header checksum")
    if not packet.has_transport_header:
        raise PacketError("fragmented", "a later fragment has no checksum field")
    at = packet.transport_offset + _CHECKSUM_FIELD[packet.protocol][0]
    (value,) = _unpack_u16(buf, at)
    if from_rule == to_rule or packet.protocol == IPPROTO_ICMPV6:
        return int(value)
    located = packet.pseudo_src[:8] + packet.pseudo_dst[:8]
    if to_rule == "ipv6":  # the locators join the sum
        delta = checksum_delta(bytes(16), located)
    else:  # they leave it
        delta = checksum_delta(located, bytes(16))
    if packet.protocol == IPPROTO_UDP:
        value = apply_delta_udp(value, delta)
    else:
        value = apply_delta(value, delta)
    _pack_u16(buf, at, value)
    return int(value)


# -- the per-packet fast path ----------------------------------------------------------------
def rewrite_locators(buf: WritableBuffer, src_locator: int, dst_locator: int,
                     rule: Rule = "ilnp", offset: int = 0, *, partial: bool = False) -> None:
    """Replace both L64s of the IPv6 packet at `offset` in place, fixing the checksum by RFC
    1624: ICMPv6 always (its pseudo-header has the full addresses); TCP, UDP, UDP-Lite and DCCP
    only under ``rule="ipv6"`` (under "ilnp" their pseudo-header has no locators).

    For the overlay hook, per packet: no copy, no bytes object, one unpack for the header. A
    routing header's final destination or a home address stands in the pseudo-header for the
    header's field, whose change then does not count. A UDP checksum of 0 stays 0; a computed
    0 is sent as 0xFFFF. Non-first fragments get the locators only. Raises PacketError (buffer
    untouched) for a malformed packet, ValueError for a locator outside 64 bits or an unknown
    rule. `partial`: the checksum field holds a partial (pseudo-header) sum, as TUN packets
    marked NEEDS_CSUM do: the change is added to it instead (docs/packet.md).
    """
    if rule != "ilnp" and rule != "ipv6":
        raise ValueError(f"checksum rule must be 'ilnp' or 'ipv6', not {rule!r}")
    if not (0 <= src_locator <= _U64_MAX and 0 <= dst_locator <= _U64_MAX):
        raise ValueError("a locator takes 64 bits")
    if offset < 0 or len(buf) - offset < 40:
        raise PacketError("truncated", "IPv6 header needs 40 bytes")
    first, length, protocol, old_src, old_dst = _unpack_fast(buf, offset)
    if first >> 4 != 6:
        raise PacketError("bad-version", f"IP version {first >> 4} is not 6")
    end = offset + 40 + length
    if end > len(buf):
        raise PacketError("truncated", "payload length exceeds the buffer")
    start = offset + 40
    delta = src_locator - old_src + dst_locator - old_dst
    if protocol not in _CHECKSUM_FIELD:
        chain = walk_header_chain(buf, offset, end)
        protocol = -1 if chain.later_fragment else chain.protocol
        start = chain.offset
        if chain.pseudo_src_offset != offset + 8:
            delta -= src_locator - old_src
        if chain.pseudo_dst_offset != offset + 24:
            delta -= dst_locator - old_dst
    entry = _CHECKSUM_FIELD.get(protocol)
    if entry is not None and (rule == "ipv6" or protocol == IPPROTO_ICMPV6):
        field, smallest = entry
        if end - start < smallest:
            raise PacketError("truncated", f"protocol {protocol} header cut short")
        delta %= 0xFFFF  # 2**16 = 1 (mod 0xFFFF): the ones' complement sum of the words
        if delta:
            at = start + field
            (value,) = _unpack_u16(buf, at)
            if partial:  # the sum the device completes: the change is added as it is
                value += delta
                value = (value & 0xFFFF) + (value >> 16)
                _pack_u16(buf, at, value)
            elif value or protocol != IPPROTO_UDP:  # UDP 0: no checksum (RFC 6935), stays 0
                value = 0xFFFF - value + delta  # RFC 1624 eqn. 3, as in `apply_delta`
                value = (value & 0xFFFF) + (value >> 16)
                value = 0xFFFF - value if value else 0
                if not value and protocol == IPPROTO_UDP:
                    value = 0xFFFF
                _pack_u16(buf, at, value)
    _pack_u64(buf, offset + 8, src_locator)
    _pack_u64(buf, offset + 24, dst_locator)
