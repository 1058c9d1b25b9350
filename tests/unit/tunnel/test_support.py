"""Helpers shared by the tunnel unit tests: TUN-like super-packets built with scapy, and the
tunnel's two halves driven without I/O. scapy is the independent oracle for every check."""

from __future__ import annotations

import ipaddress

from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.packet import Packet as ScapyPacket
from scapy.packet import Raw

from ipshift.packet import complete_partial_checksum, pseudo_header_sum, vnet
from ipshift.tunnel import gso, wire

V4 = ("203.0.113.1", "203.0.113.2")
V6 = ("2001:db8:ff::1", "2001:db8:ff::2")
TIMESTAMPS = [("NOP", None), ("NOP", None), ("Timestamp", (123456, 654321))]


def payload_bytes(size: int, seed: int = 0) -> bytes:
    return bytes((seed + i * 7) & 0xFF for i in range(size))


def super_packet(
    version: int = 4,
    payload: int = 10_000,
    *,
    udp: bool = False,
    seq: int = 1000,
    ident: int = 100,
    flags: str = "A",
    options: list[tuple[str, object]] | None = None,
    tos: int = 0,
    ttl: int = 64,
    addresses: tuple[str, str] | None = None,
    sport: int = 40000,
    seed: int = 0,
) -> tuple[bytearray, int, int]:
    """A packet as a TUN device with TSO hands it over: L4 checksum field holding the
    pseudo-header sum over the whole L4 length (NEEDS_CSUM). Returns (packet, csum_start,
    csum_offset)."""
    src, dst = addresses or (V4 if version == 4 else V6)
    ip: ScapyPacket
    if version == 4:
        ip = IP(src=src, dst=dst, id=ident, flags="DF", tos=tos, ttl=ttl)
    else:
        ip = IPv6(src=src, dst=dst, tc=tos, hlim=ttl, fl=0x12345)
    l4: ScapyPacket
    if udp:
        l4 = UDP(sport=sport, dport=5201)
    else:
        l4 = TCP(sport=sport, dport=5201, seq=seq, ack=777, flags=flags, window=501,
                 options=TIMESTAMPS if options is None else options)
    packet = bytearray(bytes(ip / l4 / Raw(payload_bytes(payload, seed))))
    csum_start = 20 if version == 4 else 40
    csum_offset = 6 if udp else 16
    partial = pseudo_header_sum(
        ipaddress.ip_address(src).packed, ipaddress.ip_address(dst).packed, 17 if udp else 6,
        len(packet) - csum_start,
    )
    packet[csum_start + csum_offset:csum_start + csum_offset + 2] = partial.to_bytes(2, "big")
    return packet, csum_start, csum_offset


def gso_type_for(version: int, udp: bool = False) -> int:
    if udp:
        return vnet.GSO_UDP_L4
    return vnet.GSO_TCPV4 if version == 4 else vnet.GSO_TCPV6


def encapsulate(
    packet: bytes | bytearray, flags: int, gso_type: int, gso_size: int, csum_start: int,
    csum_offset: int,
) -> list[bytes]:
    """The tunnel datagrams for one TUN read, each as bytes."""
    buffer = bytearray(packet)
    iov, segment = gso.Encapsulator(buffer, 0).encapsulate(
        len(buffer), flags, gso_type, gso_size, csum_start, csum_offset
    )
    data = b"".join(bytes(part) for part in iov)
    if segment == 0:
        return [data]
    return [data[at:at + segment] for at in range(0, len(data), segment)]


def segments_of(packet: bytearray, csum_start: int, csum_offset: int, gso_size: int,
                gso_type: int) -> list[bytes]:
    return encapsulate(packet, vnet.F_NEEDS_CSUM, gso_type, gso_size, csum_start, csum_offset)


def batch(datagrams: list[bytes]) -> tuple[bytes, int]:
    """What one UDP_GRO receive returns for these datagrams: their concatenation and the GRO
    segment size (0 for a single datagram)."""
    if len(datagrams) == 1:
        return datagrams[0], 0
    return b"".join(datagrams), len(datagrams[0])


def decapsulate(
    batches: list[tuple[bytes, int]], hook: gso.PacketHook | None = None
) -> tuple[list[tuple[vnet.VnetHeader, bytes]], int, int]:
    """Run received batches through one Decapsulator as the forwarder does. Returns the TUN
    writes as (checked vnet header, packet bytes), and the accepted / malformed counts."""
    decapsulator = gso.Decapsulator(0x10000)
    out: list[tuple[vnet.VnetHeader, bytes]] = []
    accepted = malformed = 0
    for data, segment in batches:
        writes: list[gso.IoVec] = []
        decapsulator.buffer[:len(data)] = data
        got, bad = decapsulator.decapsulate(len(data), segment, writes, hook)
        accepted += got
        malformed += bad
        out += [_write(w) for w in writes]
    writes = []
    decapsulator.flush(writes, hook)
    out += [_write(w) for w in writes]
    return out, accepted, malformed


def _write(iov: gso.IoVec) -> tuple[vnet.VnetHeader, bytes]:
    data = b"".join(bytes(part) for part in iov)
    header, packet = vnet.split(data)
    return header, bytes(packet)


def complete(datagram: bytes) -> bytes:
    """The inner packet of a tunnel datagram with its checksum completed, as the receiving
    TUN device (or a forwarding hop without checksum offload) would."""
    header, inner = wire.decode(datagram)
    packet = bytearray(inner)
    if header.partial:
        complete_partial_checksum(packet, header.csum_start, header.csum_offset)
    return bytes(packet)


def complete_write(header: vnet.VnetHeader, packet: bytes) -> bytes:
    out = bytearray(packet)
    if header.needs_csum:
        complete_partial_checksum(out, header.csum_start, header.csum_offset)
    return bytes(out)


def parse(packet: bytes) -> ScapyPacket:
    return IP(packet) if packet[0] >> 4 == 4 else IPv6(packet)


def assert_checksums_valid(packet: bytes) -> ScapyPacket:
    """scapy recomputes every checksum from scratch; they must equal the packet's. A TCP or
    UDP checksum that scapy computes as 0x0000 may be 0xFFFF in the packet: both are zero in
    ones' complement, and a device (or Linux's skb_checksum_help) completing a partial
    checksum stores 0xFFFF."""
    parsed = parse(packet)
    rebuilt = parsed.copy()
    if IP in rebuilt:
        del rebuilt[IP].chksum
    for layer in (TCP, UDP):
        if layer in rebuilt:
            del rebuilt[layer].chksum
    expected = bytes(rebuilt)
    if expected != packet:
        for layer in (TCP, UDP):
            if layer in parsed and parsed[layer].chksum == 0xFFFF:
                field = len(packet) - len(parsed[layer]) + (16 if layer is TCP else 6)
                if expected[field:field + 2] == b"\0\0":
                    expected = expected[:field] + b"\xff\xff" + expected[field + 2:]
    assert expected == packet, f"checksums differ: {parsed.summary()}"
    return parsed


def test_super_packet_helper_has_a_partial_checksum() -> None:
    packet, start, offset = super_packet(4, 3000)
    completed = bytearray(packet)
    complete_partial_checksum(completed, start, offset)
    assert_checksums_valid(bytes(completed))


def test_batch_helper() -> None:
    assert batch([b"ab"]) == (b"ab", 0)
    assert batch([b"ab", b"cd", b"e"]) == (b"abcde", 2)
