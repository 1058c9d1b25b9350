"""tshark as a second, independent decoder: a pcap of a few hundred rewritten packets (IPv4 and
IPv6; TCP, UDP, ICMP, ICMPv6, ICMP errors; full and partial checksums; TTL changes) in which
tshark must find every checksum good.

tshark's checksum status: 0 bad, 1 good, 2 unverified, 3 not present, 4 illegal.
"""

from __future__ import annotations

import random
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP, IPOption_NOP, IPOption_Router_Alert
from scapy.layers.inet6 import (
    ICMPv6DestUnreach,
    ICMPv6EchoReply,
    ICMPv6EchoRequest,
    IPv6,
    IPv6ExtHdrDestOpt,
    IPv6ExtHdrHopByHop,
)
from scapy.packet import Packet as ScapyPacket

from ipshift.packet import (
    FlowRewrite,
    complete_partial_checksum,
    decrement_hop_limit,
    encode_pcap,
    parse_packet,
    pseudo_header_sum,
)

TSHARK = shutil.which("tshark")
FIELDS = ("ip.checksum.status", "tcp.checksum.status", "udp.checksum.status",
          "icmp.checksum.status", "icmpv6.checksum.status")
GOOD, NOT_PRESENT = "1", "3"


@dataclass
class Case:
    data: bytes
    outer: str  # the field that must report the upper layer's checksum: "tcp", "udp", ...
    udp_without_checksum: bool = False


def _v4(rng: random.Random) -> str:
    return f"{rng.choice(['192.0.2', '198.51.100', '203.0.113'])}.{rng.randint(1, 254)}"


def _v6(rng: random.Random) -> str:
    return f"2001:db8:{rng.randint(0, 0xFFFF):x}::{rng.randint(1, 0xFFFF):x}"


def _make_partial(data: bytearray) -> tuple[int, int]:
    """Turn a TCP/UDP packet into a NEEDS_CSUM one; returns (csum_start, csum_offset)."""
    packet = parse_packet(data)
    offset = 16 if packet.protocol == 6 else 6
    at = packet.transport_offset + offset
    data[at : at + 2] = pseudo_header_sum(packet.pseudo_src, packet.pseudo_dst, packet.protocol,
                                          len(packet.segment)).to_bytes(2, "big")
    return packet.transport_offset, offset


def _case(rng: random.Random) -> Case:
    version = rng.choice([4, 6])
    kind = rng.choice(["tcp", "udp", "udp", "icmp", "error"])
    address = _v4 if version == 4 else _v6
    old, new, peer = address(rng), address(rng), address(rng)
    payload = rng.randbytes(rng.randint(0, 300))
    if version == 4:
        options = rng.choice([[], [IPOption_Router_Alert()], [IPOption_NOP(), IPOption_NOP()]])
        ip: ScapyPacket = IP(src=old, dst=peer, ttl=rng.randint(2, 255), options=options)
    else:
        ip = IPv6(src=old, dst=peer, hlim=rng.randint(2, 255))
        if rng.random() < 0.3:
            ip = ip / IPv6ExtHdrHopByHop() / IPv6ExtHdrDestOpt()
    sport, dport = rng.randint(1024, 65535), rng.choice([53, 80, 443, 5353])
    rewrite = FlowRewrite(src=(old, new))
    if kind == "tcp":
        packet = ip / TCP(sport=sport, dport=dport, seq=rng.getrandbits(32), flags="PA",
                          options=[("MSS", 1400), ("SAckOK", b"")]) / payload
        rewrite = FlowRewrite(src=(old, new), sport=(sport, rng.randint(1024, 65535)))
    elif kind == "udp":
        packet = ip / UDP(sport=sport, dport=dport) / payload
        rewrite = FlowRewrite(src=(old, new), dport=(dport, rng.randint(1, 65535)))
    elif kind == "icmp" or (version == 6 and kind == "icmp"):
        echo = ICMP(type=8, id=rng.getrandbits(16)) if version == 4 else rng.choice(
            [ICMPv6EchoRequest, ICMPv6EchoReply])(id=rng.getrandbits(16), data=payload)
        packet = ip / echo / (payload if version == 4 else b"")
    else:  # an ICMP error from a router to the moved address, quoting what was sent from it
        router = address(rng)
        quoted = (IP(src=new, dst=peer) if version == 4 else IPv6(src=new, dst=peer)) / UDP(
            sport=sport, dport=dport) / payload[:64]
        header = ICMP(type=3, code=4, nexthopmtu=1400) if version == 4 else ICMPv6DestUnreach()
        packet = (IP(src=router, dst=new) if version == 4 else IPv6(src=router, dst=new)) / (
            header) / quoted
        rewrite = FlowRewrite(dst=(new, old))  # the mover's inbound direction
    data = bytearray(bytes(packet))
    without_checksum = kind == "udp" and version == 4 and rng.random() < 0.15
    if without_checksum:
        at = parse_packet(data).transport_offset + 6
        data[at : at + 2] = b"\0\0"
    partial = kind in ("tcp", "udp") and not without_checksum and rng.random() < 0.4
    where = _make_partial(data) if partial else None
    assert rewrite.apply(data, partial_checksum=partial)
    if where is not None:
        complete_partial_checksum(data, *where)
    if rng.random() < 0.3:
        decrement_hop_limit(data)
    outer = {"tcp": "tcp", "udp": "udp"}.get(kind, "icmp" if version == 4 else "icmpv6")
    return Case(bytes(data), outer, without_checksum)


@pytest.mark.skipif(TSHARK is None, reason="tshark is not installed (apt install tshark)")
def test_tshark_finds_every_checksum_good(tmp_path: Path) -> None:
    rng = random.Random(1624)
    cases = [_case(rng) for _ in range(400)]
    pcap = tmp_path / "rewritten.pcap"
    pcap.write_bytes(encode_pcap([c.data for c in cases]))
    result = subprocess.run(
        [str(TSHARK), "-r", str(pcap), "-o", "ip.check_checksum:TRUE",
         "-o", "tcp.check_checksum:TRUE", "-o", "udp.check_checksum:TRUE",
         "-T", "fields", "-E", "separator=\t", "-E", "occurrence=a", "-E", "aggregator=,",
         *[arg for field in FIELDS for arg in ("-e", field)]],
        capture_output=True, text=True, timeout=120, check=True,
    )
    lines = result.stdout.splitlines()
    assert len(lines) == len(cases)
    checked = 0
    for number, (line, case) in enumerate(zip(lines, cases, strict=True), 1):
        status = dict(zip(("ip", "tcp", "udp", "icmp", "icmpv6"),
                          (f.split(",") if f else [] for f in line.split("\t")), strict=True))
        wanted = NOT_PRESENT if case.udp_without_checksum else GOOD
        assert status[case.outer][:1] == [wanted], f"frame {number}: {line!r}"
        for name, values in status.items():
            for index, value in enumerate(values):
                if name == case.outer and index == 0:
                    continue
                # Inner (quoted) packets may be reported unverified; never bad or illegal.
                assert value in (GOOD, "2", NOT_PRESENT), f"frame {number}: {name} {line!r}"
                checked += value == GOOD
        if case.data[0] >> 4 == 4:
            assert status["ip"][0] == GOOD, f"frame {number}: {line!r}"
    assert checked >= len(cases) // 3  # IPv4 headers and quoted packets were verified too
