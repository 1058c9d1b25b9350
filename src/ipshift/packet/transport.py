"""Upper-layer headers: TCP (RFC 9293), UDP (RFC 768), ICMP (RFC 792) and ICMPv6 (RFC 4443).

Checksums need the IP addresses, so these classes leave them alone: a None checksum packs as
zero and `build_packet` fills it in.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import ClassVar

from ipshift.packet.errors import BytesLike, PacketError
from ipshift.packet.options import Option, decode_tcp_options

_TCP = struct.Struct("!HHIIHHHH")
_UDP = struct.Struct("!HHHH")
_ICMP = struct.Struct("!BBHI")

# ICMP (v4) types the toolkit uses by name.
ICMP_ECHO_REPLY = 0
ICMP_DEST_UNREACHABLE = 3
ICMP_ECHO_REQUEST = 8
ICMP_TIME_EXCEEDED = 11
ICMP_PARAMETER_PROBLEM = 12
#: ICMP types whose body quotes the packet that caused them (RFC 792).
ICMP_ERROR_TYPES = frozenset({ICMP_DEST_UNREACHABLE, 4, 5, ICMP_TIME_EXCEEDED,
                              ICMP_PARAMETER_PROBLEM})

ICMPV6_DEST_UNREACHABLE = 1
ICMPV6_PACKET_TOO_BIG = 2
ICMPV6_TIME_EXCEEDED = 3
ICMPV6_PARAMETER_PROBLEM = 4
ICMPV6_ECHO_REQUEST = 128
ICMPV6_ECHO_REPLY = 129
#: ICMPv6 error messages (types 0-127, RFC 4443 2.1) quote the packet that caused them.
ICMPV6_ERROR_TYPES = frozenset(range(128))


def _pack(layout: struct.Struct, what: str, *values: int) -> bytes:
    try:
        return layout.pack(*values)
    except struct.error as exc:
        raise ValueError(f"{what} header field out of range: {exc}") from exc


@dataclass(slots=True)
class TCPHeader:
    """A TCP header. `flags` holds the 9 flag bits (NS is 0x100, CWR 0x80 ... FIN 0x01);
    `options` the raw option bytes (a multiple of 4, see `option_list`). A None `data_offset`
    (in 32-bit words) follows from the options."""

    sport: int
    dport: int
    seq: int = 0
    ack: int = 0
    flags: int = 0
    window: int = 65535
    urgent: int = 0
    options: bytes = b""
    checksum: int | None = None
    data_offset: int | None = None
    reserved: int = 0

    FIN: ClassVar[int] = 0x01
    SYN: ClassVar[int] = 0x02
    RST: ClassVar[int] = 0x04
    PSH: ClassVar[int] = 0x08
    ACK: ClassVar[int] = 0x10
    URG: ClassVar[int] = 0x20
    ECE: ClassVar[int] = 0x40
    CWR: ClassVar[int] = 0x80

    @classmethod
    def parse(cls, data: BytesLike, offset: int = 0) -> TCPHeader:
        if len(data) - offset < 20:
            raise PacketError("truncated", "TCP header needs 20 bytes")
        sport, dport, seq, ack, off_flags, window, csum, urgent = _TCP.unpack_from(data, offset)
        size = off_flags >> 10 & 0x3C
        if size < 20:
            raise PacketError("bad-data-offset", f"TCP data offset {size >> 2} is below 5")
        if len(data) - offset < size:
            raise PacketError("truncated", f"TCP header of {size} bytes is cut short")
        return cls(
            sport=sport,
            dport=dport,
            seq=seq,
            ack=ack,
            flags=off_flags & 0x1FF,
            window=window,
            urgent=urgent,
            options=bytes(data[offset + 20 : offset + size]),
            checksum=csum,
            data_offset=size >> 2,
            reserved=off_flags >> 9 & 7,
        )

    def pack(self) -> bytes:
        if len(self.options) % 4 or len(self.options) > 40:
            raise ValueError("TCP options must be a multiple of 4 bytes, at most 40")
        offset = (20 + len(self.options)) >> 2 if self.data_offset is None else self.data_offset
        if not 0 <= offset <= 15 or not 0 <= self.flags <= 0x1FF or not 0 <= self.reserved <= 7:
            raise ValueError("TCP data offset takes 4 bits, reserved 3 and flags 9")
        head = _pack(_TCP, "TCP", self.sport, self.dport, self.seq, self.ack,
                     offset << 12 | self.reserved << 9 | self.flags, self.window,
                     self.checksum or 0, self.urgent)
        return head + self.options

    @property
    def header_length(self) -> int:
        return 20 + len(self.options)

    def option_list(self) -> list[Option]:
        """The options decoded; raises PacketError("bad-option") if they are malformed."""
        return decode_tcp_options(self.options)


@dataclass(slots=True)
class UDPHeader:
    """A UDP header; a None `length` is filled in by `build_packet`."""

    sport: int
    dport: int
    length: int | None = None
    checksum: int | None = None

    @classmethod
    def parse(cls, data: BytesLike, offset: int = 0) -> UDPHeader:
        if len(data) - offset < 8:
            raise PacketError("truncated", "UDP header needs 8 bytes")
        sport, dport, length, csum = _UDP.unpack_from(data, offset)
        if length < 8:
            raise PacketError("length-mismatch", f"UDP length {length} is below 8")
        return cls(sport, dport, length, csum)

    def pack(self, payload_length: int = 0) -> bytes:
        length = 8 + payload_length if self.length is None else self.length
        return _pack(_UDP, "UDP", self.sport, self.dport, length, self.checksum or 0)

    @property
    def header_length(self) -> int:
        return 8


@dataclass(slots=True)
class ICMPHeader:
    """An ICMP or ICMPv6 header: type, code, checksum and the 4 octets that follow
    (`rest`: identifier and sequence of an echo, MTU of a packet too big, pointer, ...).
    The same layout serves both; the IP version decides the checksum rule."""

    type: int
    code: int = 0
    rest: int = 0
    checksum: int | None = None

    @classmethod
    def parse(cls, data: BytesLike, offset: int = 0) -> ICMPHeader:
        if len(data) - offset < 8:
            raise PacketError("truncated", "ICMP header needs 8 bytes")
        icmp_type, code, csum, rest = _ICMP.unpack_from(data, offset)
        return cls(icmp_type, code, rest, csum)

    @classmethod
    def echo(cls, icmp_type: int, identifier: int, sequence: int) -> ICMPHeader:
        """An echo request or reply (ICMP_ECHO_REQUEST, ICMPV6_ECHO_REQUEST, ...)."""
        if not 0 <= identifier <= 0xFFFF or not 0 <= sequence <= 0xFFFF:
            raise ValueError("echo identifier and sequence take 16 bits each")
        return cls(icmp_type, 0, identifier << 16 | sequence)

    def pack(self) -> bytes:
        return _pack(_ICMP, "ICMP", self.type, self.code, self.checksum or 0, self.rest)

    @property
    def header_length(self) -> int:
        return 8

    @property
    def identifier(self) -> int:
        return self.rest >> 16

    @property
    def sequence(self) -> int:
        return self.rest & 0xFFFF


TransportHeader = TCPHeader | UDPHeader | ICMPHeader
