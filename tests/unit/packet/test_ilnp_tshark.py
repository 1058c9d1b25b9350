"""tshark as an independent decoder of the ILNPv6 codecs: nonce options of 4 and 12 bytes, a
Locator Update advertisement with two locators and its acknowledgement, and UDP under each
checksum rule (tshark applies the IPv6 rule, so it must call the ILNP rule's checksum bad),
also after a per-packet locator rewrite.

tshark's checksum status: 0 bad, 1 good, 2 unverified, 3 not present, 4 illegal.
"""

from __future__ import annotations

import ipaddress
import shutil
import subprocess
from pathlib import Path

import pytest

from ipshift.packet import IPv6Header, TCPHeader, UDPHeader, build_packet, encode_pcap, ilnp
from ipshift.packet.ilnp import LocatorEntry, LocatorUpdate

TSHARK = shutil.which("tshark")
FIELDS = ("ipv6.opt.ilnp_nonce", "icmpv6.ilnp.nb_locs", "icmpv6.ilnp.nb_locator",
          "icmpv6.ilnp.nb_preference", "icmpv6.ilnp.nb_lifetime", "icmpv6.reserved",
          "icmpv6.checksum.status", "udp.checksum.status", "tcp.checksum.status")
BAD, GOOD = "0", "1"

L_A, L_B, L_C, L_D = 0x20010DB800010000, 0x20010DB800020000, 0x20010DB8000A0000, 0x20010DB8000B0000
A = ilnp.ilv(L_A, 0x0A).packed
B = ilnp.ilv(L_B, 0x021122FFFE334455).packed
NONCE4 = bytes.fromhex("a1b2c3d4")
NONCE12 = bytes.fromhex("00112233445566778899aabb")
ENTRIES = (LocatorEntry(L_C, 10, 600), LocatorEntry(L_D, 20, 300))


def _udp(payload: bytes = b"ilnp") -> bytearray:
    return bytearray(build_packet(IPv6Header(A, B), UDPHeader(40000, 5353), payload))


def _packets() -> list[bytes]:
    advert = LocatorUpdate.advertisement(ENTRIES)
    ilnp_rule = _udp()
    ilnp.fill_checksum(ilnp_rule, "ilnp")
    ipv6_rule = _udp()
    ilnp.fill_checksum(ipv6_rule, "ipv6")
    moved_ipv6 = bytearray(ipv6_rule)
    ilnp.rewrite_locators(moved_ipv6, L_C, L_D, "ipv6")
    moved_ilnp = bytearray(ilnp_rule)
    ilnp.rewrite_locators(moved_ilnp, L_C, L_D, "ilnp")
    moved_lu = bytearray(ilnp.locator_update_packet(A, B, advert, nonce=NONCE4))
    ilnp.rewrite_locators(moved_lu, L_C, L_D, "ilnp")  # ICMPv6 is fixed under either rule
    return [
        ilnp.insert_nonce(_udp(), NONCE4),                                        # 1
        ilnp.insert_nonce(build_packet(IPv6Header(A, B), TCPHeader(40000, 80, flags=0x02)),
                          NONCE12),                                                # 2
        ilnp.locator_update_packet(A, B, advert, nonce=NONCE4),                   # 3
        ilnp.locator_update_packet(B, A, advert.acknowledgement(), nonce=NONCE4),  # 4
        bytes(ilnp_rule),                                                          # 5
        bytes(ipv6_rule),                                                          # 6
        bytes(moved_ipv6),                                                         # 7
        bytes(moved_ilnp),                                                         # 8
        bytes(moved_lu),                                                           # 9
    ]


@pytest.mark.skipif(TSHARK is None, reason="tshark is not installed (apt install tshark)")
def test_tshark_decodes_ilnp(tmp_path: Path) -> None:
    packets = _packets()
    pcap = tmp_path / "ilnp.pcap"
    pcap.write_bytes(encode_pcap(packets))
    result = subprocess.run(
        [str(TSHARK), "-r", str(pcap), "-o", "udp.check_checksum:TRUE",
         "-o", "tcp.check_checksum:TRUE", "-T", "fields", "-E", "separator=\t",
         "-E", "occurrence=a", "-E", "aggregator=,",
         *[arg for field in FIELDS for arg in ("-e", field)]],
        capture_output=True, text=True, timeout=120, check=True,
    )
    lines = result.stdout.splitlines()
    assert len(lines) == len(packets), result.stdout + result.stderr
    rows = [dict(zip(FIELDS, line.split("\t"), strict=True)) for line in lines]

    # (a) the nonce options, 4 and 12 bytes; the TCP/UDP checksums are untouched by them
    assert rows[0]["ipv6.opt.ilnp_nonce"] == NONCE4.hex()
    assert rows[0]["udp.checksum.status"] == GOOD
    assert rows[1]["ipv6.opt.ilnp_nonce"] == NONCE12.hex()
    assert rows[1]["tcp.checksum.status"] == GOOD

    # (b) the Locator Update advertisement and its acknowledgement
    for row, operation in ((rows[2], "01"), (rows[3], "02"), (rows[8], "01")):
        assert row["ipv6.opt.ilnp_nonce"] == NONCE4.hex()
        assert row["icmpv6.ilnp.nb_locs"] == "2"
        assert row["icmpv6.ilnp.nb_locator"] == ",".join(f"{e.l64:#018x}" for e in ENTRIES)
        assert row["icmpv6.ilnp.nb_preference"] == "10,20"
        assert row["icmpv6.ilnp.nb_lifetime"] == "600,300"
        assert row["icmpv6.reserved"].split(",")[0] == operation  # the operation octet
        assert row["icmpv6.checksum.status"] == GOOD

    # (c) UDP under each rule: tshark applies the IPv6 rule
    assert rows[4]["udp.checksum.status"] == BAD  # the ILNP rule (locators zeroed)
    assert rows[5]["udp.checksum.status"] == GOOD
    assert ilnp.verify_checksum(packets[4], "ilnp") and ilnp.verify_checksum(packets[5], "ipv6")
    # ... and after a locator rewrite: fixed under "ipv6", left alone (still ILNP's) otherwise
    assert rows[6]["udp.checksum.status"] == GOOD
    assert rows[7]["udp.checksum.status"] == BAD
    assert ilnp.verify_checksum(packets[7], "ilnp")
    assert packets[7][46:48] == packets[4][46:48]
    assert ipaddress.IPv6Address(packets[8][8:24]) == ilnp.ilv(L_C, 0x0A)
