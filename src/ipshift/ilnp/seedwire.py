"""The seed ILNP overlay's private wire format: pure codecs, no I/O.

The seed (the original implementation this project replaces) carried its overlay in UDP over
IPv6 link-local-scope multicast, one group per locator, every node on the same port (10000 by
default). Its datagrams start with a 40-byte header, big-endian:

    0      4        6    7    8            16           24           32           40
    | vtf  | length | nh | hl | src locator | src NID    | dst locator | dst NID    | payload
    vtf: version (4 bits, 0), traffic class and flow label, all zero; length: payload bytes;
    nh: 42 STP, 43 discovery, 44 locator update; hl: hop limit (3 by default)

and one of three bodies:

    STP (42)        src port (2) | dst port (2) | payload
    discovery (43)  NID (8) | locator (8) | 1 solicitation / 0 advertisement (1) | hostname UTF-8
    LU (44)         1 (1) | N x locator (8): the full new set;  or  0 (1): the acknowledgement

Locators and NIDs are 64-bit ints here. A locator is written like the high half of an IPv6
address, four groups (`2001:db8:0:1`); `parse_locator` and `format_locator` convert.

Decisions where the seed's description leaves things open:

- The discovery destination "locator ff02:0:0:1" is the 64-bit value 0xff02000000000001
  (`ALL_NODES`). Its group, by the general rule, is `ff12:0:<uid>:0:ff02:0:0:1`
  (`group_for(ALL_NODES, uid)`); the seed's nodes never join it, they send discovery on each of
  their own locators' groups with this value as destination locator (see compat.py).
- `group_for(locator, uid)` writes the uid modulo 65536 in the third group; `locator_of_group`
  accepts any `ff12:0:<x>:0:<L64>` (with or without a `%scope`) and returns the L64, whatever
  the uid: the uid is the adapter's filter (it joins only its own groups).
- Decoding is strict where the seed's layout is unambiguous and lenient where it is not
  meaningful: a version other than 0 is refused ("bad-version"), traffic class and flow label
  are ignored (always written as zero); the payload length must match the datagram exactly
  ("truncated" if it claims more, "trailing-bytes" if less); an acknowledgement is exactly one
  byte, an advertisement's list a whole number of locators; a hostname must be valid UTF-8.
- An advertisement with no locator (N = 0) is well formed (a node that left every network).

Every malformed input raises `SeedWireError` (a `PacketError`) with a short `reason` and a
`counter` name for the caller's drop counters; nothing else is ever raised on bad bytes.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

from ipshift.packet.errors import BytesLike, PacketError

#: the seed's defaults
DEFAULT_PORT = 10000
DEFAULT_HOP_LIMIT = 3
HEADER_LEN = 40

NH_STP = 42
NH_DISCOVERY = 43
NH_LOCATOR_UPDATE = 44
NEXT_HEADERS = (NH_STP, NH_DISCOVERY, NH_LOCATOR_UPDATE)

#: "locator ff02:0:0:1": the destination locator of discovery (all nodes); NID 0 with it
ALL_NODES = 0xFF02000000000001
ALL_NODES_NID = 0

U64_MAX = (1 << 64) - 1
MAX_PAYLOAD = 0xFFFF

_HEADER = struct.Struct("!IHBBQQQQ")
_STP = struct.Struct("!HH")
_DISCOVERY = struct.Struct("!QQB")
_U64 = struct.Struct("!Q")

LU_ACK = 0
LU_ADVERTISE = 1


class SeedWireError(PacketError):
    """A malformed seed datagram; `reason` is the short tag, `counter` the drop counter's name
    (`malformed_<reason>`, snake case)."""

    @property
    def counter(self) -> str:
        return "malformed_" + self.reason.replace("-", "_")


# --- locators and groups -----------------------------------------------------------------------
def parse_locator(text: str) -> int:
    """'2001:db8:0:1' (four groups of hex, `::` allowed) -> 0x20010db800000001."""
    text = text.strip()
    if text.count("::") > 1:
        raise ValueError(f"invalid locator {text!r}: more than one '::'")
    if "::" in text:
        head, tail = text.split("::")
        left = head.split(":") if head else []
        right = tail.split(":") if tail else []
        if len(left) + len(right) > 3:
            raise ValueError(f"invalid locator {text!r}: '::' must stand for a zero group")
        groups = left + ["0"] * (4 - len(left) - len(right)) + right
    else:
        groups = text.split(":")
    if len(groups) != 4:
        raise ValueError(f"invalid locator {text!r}: four groups of hex digits, e.g. 2001:db8:0:1")
    value = 0
    for group in groups:
        if not 1 <= len(group) <= 4 or any(c not in "0123456789abcdefABCDEF" for c in group):
            raise ValueError(f"invalid locator {text!r}: {group!r} is not a 16-bit hex group")
        value = (value << 16) | int(group, 16)
    return value


def format_locator(locator: int) -> str:
    """0x20010db800000001 -> '2001:db8:0:1' (four groups, no compression)."""
    _check_u64(locator, "locator")
    return ":".join(f"{(locator >> shift) & 0xFFFF:x}" for shift in (48, 32, 16, 0))


def group_for(locator: int, uid: int) -> str:
    """The multicast group of a locator: `ff12:0:<uid mod 65536>:0:<L64>` (compressed text)."""
    _check_u64(locator, "locator")
    if uid < 0:
        raise ValueError(f"uid {uid} is negative")
    value = (0xFF12 << 112) | ((uid % 65536) << 80) | locator
    return str(ipaddress.IPv6Address(value))


def locator_of_group(addr: str) -> int:
    """The locator a datagram arrived on: the low 64 bits of its destination group, which must
    be of the form `ff12:0:<uid>:0:<L64>` (a `%scope` suffix is ignored); SeedWireError
    ("not-a-locator-group") otherwise."""
    try:
        value = int(ipaddress.IPv6Address(addr.split("%", 1)[0]))
    except ValueError as exc:
        raise SeedWireError("not-a-locator-group", f"{addr!r} is not an IPv6 address") from exc
    if value >> 112 != 0xFF12 or (value >> 96) & 0xFFFF or (value >> 64) & 0xFFFF:
        raise SeedWireError("not-a-locator-group", f"{addr} is not ff12:0:<uid>:0:<locator>")
    return value & U64_MAX


def _check_u64(value: int, what: str) -> None:
    if not 0 <= value <= U64_MAX:
        raise ValueError(f"{what} {value:#x} is not a 64-bit value")


# --- header ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SeedHeader:
    """The 40-byte header without its payload length (the codec computes it)."""

    next_header: int
    src_locator: int
    src_nid: int
    dst_locator: int
    dst_nid: int
    hop_limit: int = DEFAULT_HOP_LIMIT

    def __post_init__(self) -> None:
        if not 0 <= self.next_header <= 255:
            raise ValueError(f"next header {self.next_header} out of range 0..255")
        if not 0 <= self.hop_limit <= 255:
            raise ValueError(f"hop limit {self.hop_limit} out of range 0..255")
        for name in ("src_locator", "src_nid", "dst_locator", "dst_nid"):
            _check_u64(getattr(self, name), name)

    def encode(self, payload_length: int) -> bytes:
        if not 0 <= payload_length <= MAX_PAYLOAD:
            raise ValueError(f"payload of {payload_length} bytes: at most {MAX_PAYLOAD}")
        return _HEADER.pack(0, payload_length, self.next_header, self.hop_limit,
                            self.src_locator, self.src_nid, self.dst_locator, self.dst_nid)

    def forwarded(self) -> SeedHeader:
        """The header a router sends on: hop limit one less (the caller checks it was > 1)."""
        return SeedHeader(self.next_header, self.src_locator, self.src_nid, self.dst_locator,
                          self.dst_nid, self.hop_limit - 1)


def decode_header(data: BytesLike) -> tuple[SeedHeader, int]:
    """(header, payload length) of a datagram; only the 40 bytes are looked at."""
    if len(data) < HEADER_LEN:
        raise SeedWireError("truncated", f"{len(data)} bytes, the header alone is {HEADER_LEN}")
    vtf, length, nh, hl, sl, sn, dl, dn = _HEADER.unpack_from(data)
    if vtf >> 28:
        raise SeedWireError("bad-version", f"version {vtf >> 28}, the seed's is 0")
    return SeedHeader(nh, sl, sn, dl, dn, hl), length


def encode_datagram(header: SeedHeader, payload: BytesLike) -> bytes:
    """Header and payload (a body's `encode()`) as one datagram."""
    return header.encode(len(payload)) + bytes(payload)


def decode_datagram(data: BytesLike) -> tuple[SeedHeader, bytes]:
    """(header, payload) of a whole datagram; the length must match exactly."""
    header, length = decode_header(data)
    rest = len(data) - HEADER_LEN
    if length > rest:
        raise SeedWireError("truncated", f"payload length {length}, {rest} bytes follow")
    if length < rest:
        raise SeedWireError("trailing-bytes", f"payload length {length}, {rest} bytes follow")
    return header, bytes(data[HEADER_LEN:])


# --- bodies ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Stp:
    """The seed's transport: ports and the application's bytes."""

    src_port: int
    dst_port: int
    payload: bytes = b""

    def __post_init__(self) -> None:
        for port in (self.src_port, self.dst_port):
            if not 0 <= port <= 0xFFFF:
                raise ValueError(f"STP port {port} out of range 0..65535")

    def encode(self) -> bytes:
        return _STP.pack(self.src_port, self.dst_port) + self.payload

    @classmethod
    def decode(cls, payload: BytesLike) -> Stp:
        if len(payload) < _STP.size:
            raise SeedWireError("truncated", f"STP of {len(payload)} bytes, ports alone are 4")
        src, dst = _STP.unpack_from(payload)
        return cls(src, dst, bytes(payload[_STP.size:]))


@dataclass(frozen=True)
class Discovery:
    """A solicitation (asks every node to advertise) or an advertisement: who (NID), where
    (one locator) and the node's hostname."""

    nid: int
    locator: int
    solicitation: bool
    hostname: str

    def __post_init__(self) -> None:
        _check_u64(self.nid, "NID")
        _check_u64(self.locator, "locator")

    def encode(self) -> bytes:
        return (_DISCOVERY.pack(self.nid, self.locator, int(self.solicitation))
                + self.hostname.encode())

    @classmethod
    def decode(cls, payload: BytesLike) -> Discovery:
        if len(payload) < _DISCOVERY.size:
            raise SeedWireError("truncated", f"discovery of {len(payload)} bytes, at least 17")
        nid, locator, kind = _DISCOVERY.unpack_from(payload)
        if kind not in (0, 1):
            raise SeedWireError("bad-discovery-type", f"type {kind}, not 0 or 1")
        try:
            hostname = bytes(payload[_DISCOVERY.size:]).decode()
        except UnicodeDecodeError as exc:
            raise SeedWireError("bad-hostname", f"not UTF-8: {exc.reason}") from exc
        return cls(nid, locator, kind == 1, hostname)


@dataclass(frozen=True)
class LocatorUpdate:
    """An advertisement (`ack` False) of the mover's full new locator set, or the
    acknowledgement (`ack` True, no locators). Nothing says which update an ack answers: the
    mover matches it by the sender's NID."""

    ack: bool
    locators: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.ack and self.locators:
            raise ValueError("an acknowledgement carries no locators")
        for locator in self.locators:
            _check_u64(locator, "locator")
        if 1 + 8 * len(self.locators) > MAX_PAYLOAD:
            raise ValueError(f"{len(self.locators)} locators do not fit in one datagram")

    @classmethod
    def advertise(cls, locators: tuple[int, ...] | list[int]) -> LocatorUpdate:
        return cls(False, tuple(locators))

    @classmethod
    def acknowledge(cls) -> LocatorUpdate:
        return cls(True)

    def encode(self) -> bytes:
        if self.ack:
            return bytes([LU_ACK])
        return bytes([LU_ADVERTISE]) + b"".join(_U64.pack(x) for x in self.locators)

    @classmethod
    def decode(cls, payload: BytesLike) -> LocatorUpdate:
        if not payload:
            raise SeedWireError("truncated", "empty locator update")
        kind = payload[0]
        if kind == LU_ACK:
            if len(payload) != 1:
                raise SeedWireError("bad-ack", f"acknowledgement of {len(payload)} bytes, not 1")
            return cls(True)
        if kind != LU_ADVERTISE:
            raise SeedWireError("bad-lu-type", f"locator update type {kind}, not 0 or 1")
        if (len(payload) - 1) % 8:
            raise SeedWireError("bad-locator-list",
                                f"{len(payload) - 1} bytes of locators, not a multiple of 8")
        return cls(False, tuple(_U64.unpack_from(payload, 1 + 8 * i)[0]
                                for i in range((len(payload) - 1) // 8)))


Body = Stp | Discovery | LocatorUpdate


def decode_body(next_header: int, payload: BytesLike) -> Body:
    """The body a header's next header announces; "unknown-next-header" for any other value."""
    if next_header == NH_STP:
        return Stp.decode(payload)
    if next_header == NH_DISCOVERY:
        return Discovery.decode(payload)
    if next_header == NH_LOCATOR_UPDATE:
        return LocatorUpdate.decode(payload)
    raise SeedWireError("unknown-next-header", f"next header {next_header}")


def next_header_of(body: Body) -> int:
    if isinstance(body, Stp):
        return NH_STP
    if isinstance(body, Discovery):
        return NH_DISCOVERY
    return NH_LOCATOR_UPDATE


def encode(header: SeedHeader, body: Body) -> bytes:
    """One datagram; the header's next header must match the body."""
    if header.next_header != next_header_of(body):
        raise ValueError(f"next header {header.next_header} does not announce a "
                         f"{type(body).__name__}")
    return encode_datagram(header, body.encode())


def decode(data: BytesLike) -> tuple[SeedHeader, Body]:
    """A whole datagram: header and decoded body."""
    header, payload = decode_datagram(data)
    return header, decode_body(header.next_header, payload)
