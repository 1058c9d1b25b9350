"""What resend needs to know about a packet: its flow, seen from this host, and a rewrite.

A flow is named from the local side: `local` is the address this host (or its masquerading)
uses, `remote` the peer. Outgoing packets have local = source; incoming ones local = destination.
ICMP and ICMPv6 echo use the identifier as the local port and 0 as the remote one.
"""

from __future__ import annotations

import functools
import ipaddress
import struct
from dataclasses import dataclass

from ipshift.packet import FlowRewrite, PacketError, decrement_hop_limit, parse_packet
from ipshift.packet import icmp as _icmp
from ipshift.packet.protocols import IPPROTO_ICMP as PROTO_ICMP
from ipshift.packet.protocols import IPPROTO_ICMPV6 as PROTO_ICMPV6
from ipshift.packet.protocols import IPPROTO_TCP as PROTO_TCP
from ipshift.packet.protocols import IPPROTO_UDP as PROTO_UDP

__all__ = [
    "ICMP_ECHO_REPLY",
    "ICMP_ECHO_REQUEST",
    "PROTO_ICMP",
    "PROTO_ICMPV6",
    "PROTO_TCP",
    "PROTO_UDP",
    "FlowKey",
    "PacketInfo",
    "describe",
    "not_beyond_link",
    "rewrite_source",
]

ICMP_ECHO_REQUEST = {PROTO_ICMP: _icmp.ICMP_ECHO_REQUEST, PROTO_ICMPV6: _icmp.ICMPV6_ECHO_REQUEST}
ICMP_ECHO_REPLY = {PROTO_ICMP: _icmp.ICMP_ECHO_REPLY, PROTO_ICMPV6: _icmp.ICMPV6_ECHO_REPLY}
_ECHO = struct.Struct("!BBHHH")  # type, code, checksum, identifier, sequence
_TCP_SEQ_FLAGS = struct.Struct("!4xIxB")


@dataclass(frozen=True)
class FlowKey:
    version: int
    proto: int
    local: str
    local_port: int
    remote: str
    remote_port: int

    def __str__(self) -> str:
        name = {PROTO_TCP: "tcp", PROTO_UDP: "udp", PROTO_ICMP: "icmp",
                PROTO_ICMPV6: "icmpv6"}.get(self.proto, str(self.proto))
        lb, rb = ("[", "]") if self.version == 6 else ("", "")
        return (f"{name} {lb}{self.local}{rb}:{self.local_port} -> "
                f"{lb}{self.remote}{rb}:{self.remote_port}")


@dataclass(frozen=True)
class PacketInfo:
    key: FlowKey
    dedup: tuple[object, ...]  # equal for retransmissions of the same segment or datagram
    size: int  # the IP packet's length (bytes after it, such as link padding, are not part)


def describe(data: bytes | bytearray | memoryview, *, outgoing: bool) -> PacketInfo | str | None:
    """The flow of a TCP, UDP or ICMP echo packet; None for other packets (not resent), or a
    short reason string for a malformed one (counted by the engine, never raised).

    Outgoing packets that a resend could not help are None too: fragments (resending one
    fragment of a datagram cannot be reassembled), a TTL / hop limit of 1 or 0 (the resent
    copy would have to leave with 0), and link-scoped, multicast or loopback destinations
    (their replies, if any, do not come back to the link's new address)."""
    try:
        pkt = parse_packet(data)
    except PacketError as exc:
        return exc.reason
    if pkt.is_fragment:
        return None
    if outgoing and (pkt.hop_limit <= 1 or not_beyond_link(pkt.dst_ip) is not None):
        return None
    proto = pkt.protocol
    src, dst = str(pkt.src_ip), str(pkt.dst_ip)
    local, remote = (src, dst) if outgoing else (dst, src)
    if proto in (PROTO_TCP, PROTO_UDP):
        sport, dport = pkt.ports
        lport, rport = (sport, dport) if outgoing else (dport, sport)
        if proto == PROTO_TCP:
            seq, flags = _TCP_SEQ_FLAGS.unpack_from(pkt.buf, pkt.transport_offset)
            extra: tuple[object, ...] = (seq, flags)
        else:
            extra = (bytes(pkt.payload),)
    elif proto in ICMP_ECHO_REQUEST and pkt.version == (4 if proto == PROTO_ICMP else 6):
        if pkt.end - pkt.transport_offset < _ECHO.size:
            return "truncated"
        icmp_type, _, _, ident, seq = _ECHO.unpack_from(pkt.buf, pkt.transport_offset)
        wanted = ICMP_ECHO_REQUEST if outgoing else ICMP_ECHO_REPLY
        if icmp_type != wanted[proto]:
            return None
        lport, rport, extra = ident, 0, (seq,)
    else:
        return None
    key = FlowKey(pkt.version, proto, local, lport, remote, rport)
    return PacketInfo(key, (key, *extra), pkt.end - pkt.offset)


def not_beyond_link(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    """Why `address` does not reach beyond the link (so it can be neither a resent packet's
    destination nor the link's new source address); None if it does."""
    if address.is_unspecified or address.is_multicast or address.is_loopback:
        return "unspecified, multicast or loopback"
    if address.is_link_local:
        return "link-local (a resend goes beyond the link)"
    return None


@functools.lru_cache(maxsize=64)
def _source_rewrite(old: bytes, new: bytes) -> FlowRewrite:
    # one rewrite (and checksum delta) per old/new pair, shared by the packets of a dial
    return FlowRewrite(src=(old, new), icmp_errors=False)


def rewrite_source(data: bytes, new_source: str) -> bytes:
    """A copy of `data` with source address `new_source` (checksums updated incrementally, as
    for a forwarded copy: TTL / hop limit lowered by one)."""
    buf = bytearray(data)
    version = buf[0] >> 4
    old = bytes(data[12:16] if version == 4 else data[8:24])
    new = ipaddress.ip_address(new_source).packed
    if not _source_rewrite(old, new).apply(buf):
        raise PacketError("not-rewritten", "packet source does not match")
    if decrement_hop_limit(buf) == 0:
        raise PacketError("hop-limit", "TTL / hop limit would reach 0")
    return bytes(buf)
