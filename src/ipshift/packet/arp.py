"""ARP for IPv4 over Ethernet (RFC 826): requests and replies, pure.

    req = ArpPacket.request(sender_mac, sender_ip, target_ip)   # who has target_ip? tell sender
    wire = req.pack()                                            # 28 bytes, no Ethernet header
    reply = ArpPacket.parse(data)                                # raises PacketError if malformed

The Ethernet header is the packet socket's business (SOCK_DGRAM adds and strips it).
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

from ipshift.packet.errors import BytesLike, PacketError

ETH_P_ARP = 0x0806
ETH_P_IP = 0x0800
ARPHRD_ETHER = 1
ARP_REQUEST = 1
ARP_REPLY = 2
BROADCAST_MAC = b"\xff" * 6
ZERO_MAC = b"\x00" * 6

_ARP = struct.Struct("!HHBBH6s4s6s4s")


def mac_text(mac: bytes) -> str:
    return ":".join(f"{b:02x}" for b in mac)


def mac_bytes(text: str) -> bytes:
    parts = text.split(":")
    if len(parts) != 6:
        raise ValueError(f"{text!r} is not a MAC address")
    return bytes(int(p, 16) for p in parts)


@dataclass(frozen=True)
class ArpPacket:
    op: int
    sender_mac: bytes
    sender_ip: ipaddress.IPv4Address
    target_mac: bytes
    target_ip: ipaddress.IPv4Address

    @classmethod
    def request(cls, sender_mac: bytes, sender_ip: ipaddress.IPv4Address | str,
                target_ip: ipaddress.IPv4Address | str) -> ArpPacket:
        """A request from `sender_ip` (the seed's section 3: the route's preferred source)."""
        return cls(ARP_REQUEST, sender_mac, ipaddress.IPv4Address(sender_ip), ZERO_MAC,
                   ipaddress.IPv4Address(target_ip))

    def reply_to(self, mac: bytes) -> ArpPacket:
        """The reply a host owning `target_ip` with `mac` would send (tests, simulations)."""
        return ArpPacket(ARP_REPLY, mac, self.target_ip, self.sender_mac, self.sender_ip)

    def pack(self) -> bytes:
        if len(self.sender_mac) != 6 or len(self.target_mac) != 6:
            raise ValueError("MAC addresses take 6 bytes")
        return _ARP.pack(ARPHRD_ETHER, ETH_P_IP, 6, 4, self.op, self.sender_mac,
                         self.sender_ip.packed, self.target_mac, self.target_ip.packed)

    @classmethod
    def parse(cls, data: BytesLike) -> ArpPacket:
        if len(data) < _ARP.size:
            raise PacketError("truncated", f"ARP needs {_ARP.size} bytes, got {len(data)}")
        htype, ptype, hlen, plen, op, sha, spa, tha, tpa = _ARP.unpack_from(data)
        if htype != ARPHRD_ETHER or ptype != ETH_P_IP or hlen != 6 or plen != 4:
            raise PacketError("unsupported", f"ARP for hardware {htype} protocol {ptype:#x}")
        if op not in (ARP_REQUEST, ARP_REPLY):
            raise PacketError("bad-op", f"ARP operation {op}")
        return cls(op, bytes(sha), ipaddress.IPv4Address(bytes(spa)), bytes(tha),
                   ipaddress.IPv4Address(bytes(tpa)))
