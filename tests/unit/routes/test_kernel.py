"""Kernel adapter pieces that need no kernel: conversions, the nft ruleset, conntrack
selection, the ARP and ND codecs, and the CLI's one-line answers."""

import ipaddress
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ipshift.net.conntrack import ConntrackEntry, FlowTuple
from ipshift.net.netlink import NextHop, Route, Rule
from ipshift.packet.arp import ARP_REPLY, ARP_REQUEST, ArpPacket, mac_bytes, mac_text
from ipshift.packet.errors import PacketError
from ipshift.routes import config
from ipshift.routes.kernel import (
    conntrack_victims,
    from_route,
    from_rule,
    pin_ruleset,
    to_route,
    to_rule,
)
from ipshift.routes.plan import FlushConntrack, KNexthop, KRoute, KRule

ROOT = Path(__file__).resolve().parents[3]
TABLES = {"main": 254, "default": 253, "local": 255}
GW1 = ipaddress.ip_address("198.51.100.1")
GW2 = ipaddress.ip_address("203.0.113.1")
D4 = ipaddress.ip_network("0.0.0.0/0")


def test_route_round_trip_single_and_multipath():
    single = KRoute(4, 20, D4, (KNexthop("wan0", GW1),), src=ipaddress.ip_address("198.51.100.2"))
    r = to_route(single, 73)
    assert (r.gateway, r.dev, r.proto, r.table, r.src) == ("198.51.100.1", "wan0", 73, 20,
                                                         "198.51.100.2")
    assert from_route(r) == single
    multi = KRoute(4, 100, D4, (KNexthop("wan0", GW1, 2), KNexthop("wan1", GW2, 1)))
    r = to_route(multi, 73)
    assert [h.weight for h in r.nexthops] == [2, 1]
    assert from_route(r) == multi


def test_kernel_dumps_normalise():
    # IPv6 metric 1024 is the kernel's default (our 0); scopes do not exist in IPv6
    r6 = Route("::/0", gateway="2001:db8::1", dev="wan0", table=20, metric=1024, scope=253)
    k = from_route(r6)
    assert k.metric == 0 and k.scope == 0 and k.family == 6
    assert to_route(k, 73).metric == 1024
    # a single path reported as a one-element multipath compares equal to a plain route
    r = Route("0.0.0.0/0", table=20, nexthops=(NextHop("198.51.100.1", "wan0", 5),))
    assert from_route(r).nexthops == (KNexthop("wan0", GW1, 1),)
    assert from_route(Route("192.0.2.255/32", dev="lan0", table=255, type="broadcast")) is None


def test_rule_round_trip_and_owned_delete():
    k = KRule(4, 5, 7300, fwmark=0x10000, fwmask=0xFF0000)
    r = to_rule(k, 73)
    assert r.proto == 73 and r.family == socket.AF_INET
    assert from_rule(r) == k
    # an unmasked fwmark is dumped with mask 0xffffffff: same rule
    assert from_rule(Rule(10, 100, fwmark=3, fwmask=0xFFFFFFFF)) == KRule(4, 10, 100, fwmark=3)


def test_pin_ruleset_marks_and_restores_per_uplink():
    cfg = config.loads("ip route add default table 100 nexthop via 198.51.100.1 dev wan0 "
                       "nexthop via 198.51.100.9 dev wan0 nexthop via 203.0.113.1 dev wan1\n",
                       tables=TABLES)
    text = pin_ruleset(cfg)
    assert "table inet ipshift_routes" in text
    # two gateways share wan0: the nexthop decides, inbound marking by device is skipped
    assert 'oifname "wan0" rt ip nexthop 198.51.100.1' in text
    assert 'iifname "wan0" ct mark' not in text and 'iifname "wan1" ct mark' in text
    assert text.count("meta mark set") == 6  # prerouting + output per uplink


def _entry(src, reply_dst, mark=0):
    return ConntrackEntry(FlowTuple(src, "203.0.113.250", 17, 1000, 9000),
                          FlowTuple("203.0.113.250", reply_dst, 17, 9000, 1000), mark=mark)


def test_conntrack_victims_are_only_the_dead_uplinks():
    entries = [_entry("192.0.2.3", "198.51.100.2"), _entry("192.0.2.3", "203.0.113.2"),
               _entry("192.0.2.4", "192.0.2.4", mark=0x10000),
               _entry("192.0.2.5", "192.0.2.5", mark=0x20000)]
    act = FlushConntrack("wan0", (ipaddress.ip_address("198.51.100.2"),), 0x10000, 0xFF0000)
    assert conntrack_victims(entries, act) == [entries[0], entries[2]]
    act = FlushConntrack("wan0", (ipaddress.ip_address("198.51.100.2"),))
    assert conntrack_victims(entries, act) == [entries[0]]


def test_arp_codec():
    mac = mac_bytes("02:00:00:00:00:01")
    req = ArpPacket.request(mac, "198.51.100.2", "198.51.100.1")
    wire = req.pack()
    assert len(wire) == 28 and ArpPacket.parse(wire) == req and req.op == ARP_REQUEST
    reply = req.reply_to(mac_bytes("02:00:00:00:00:02"))
    back = ArpPacket.parse(reply.pack())
    assert back.op == ARP_REPLY and str(back.sender_ip) == "198.51.100.1"
    assert str(back.target_ip) == "198.51.100.2" and mac_text(back.sender_mac).endswith(":02")
    with pytest.raises(PacketError):
        ArpPacket.parse(wire[:20])


def test_arp_against_scapy():
    scapy = pytest.importorskip("scapy.all")
    mac = mac_bytes("02:00:00:00:00:01")
    wire = ArpPacket.request(mac, "198.51.100.2", "198.51.100.1").pack()
    pkt = scapy.ARP(wire)
    assert pkt.op == 1 and pkt.psrc == "198.51.100.2" and pkt.pdst == "198.51.100.1"
    assert pkt.hwsrc == "02:00:00:00:00:01"
    ours = ArpPacket.parse(bytes(scapy.ARP(op=2, hwsrc="02:00:00:00:00:02", psrc="198.51.100.1",
                                           hwdst="02:00:00:00:00:01", pdst="198.51.100.2")))
    assert ours.op == ARP_REPLY and str(ours.sender_ip) == "198.51.100.1"


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=64))
def test_arp_parser_fuzz(data):
    try:
        ArpPacket.parse(data)
    except PacketError:
        pass


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "ipshift", "routes", *args], capture_output=True,
                          text=True, timeout=60, cwd=ROOT)


def test_cli_check_lists_every_problem_one_line_each(tmp_path):
    bad = tmp_path / "bad.ip"
    bad.write_text("ip rule add from 192.0.2.0/24 table 100\n"
                   "ip route add default via 198.51.100.1\n"
                   "iptables -t nat -A POSTROUTING -j MASQUERADE\n")
    res = _cli("check", "-c", str(bad))
    assert res.returncode == 1
    lines = res.stdout.strip().splitlines()
    assert len(lines) == 4 and all(line.startswith(str(bad)) for line in lines)
    assert "nothing to do" in lines[-1]
    good = ROOT / "examples" / "routes" / "masquerade.ip"
    res = _cli("check", "-c", str(good))
    assert res.returncode == 0 and "ok: 2 uplinks" in res.stdout


def test_cli_status_without_daemon_is_one_line(tmp_path):
    res = _cli("status", "--socket", str(tmp_path / "none.sock"))
    assert res.returncode == 2
    assert len(res.stderr.strip().splitlines()) == 1 and "is it running" in res.stderr


def test_cli_run_with_bad_config_is_one_line(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[daemon]\nfailback = "never"\nprofile = "x"\n')
    res = _cli("run", "-c", str(bad), "--socket", str(tmp_path / "s.sock"))
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert (len(lines) == 1 and "more" in lines[0]) or "root" in lines[0]


def test_rules_in_the_kernels_form():
    # the kernel gives a mark its full mask only when the mark is not 0: say it explicitly
    assert to_rule(KRule(4, 10, 100, fwmark=0), 73).fwmask == 0xFFFFFFFF
    assert to_rule(KRule(4, 10, 100, fwmark=3), 73).fwmask == 0xFFFFFFFF
    assert to_rule(KRule(4, 10, 100), 73).fwmask is None
    # what the kernel dumps for `from 0.0.0.0/0 fwmark 3/0xffffffff` is the rule configured
    dumped = from_rule(Rule(10, 100, fwmark=3, fwmask=0xFFFFFFFF))
    assert dumped == KRule(4, 10, 100, src=D4, fwmark=3, fwmask=0xFFFFFFFF)
    # `fwmark 0/0xffffffff` (packets without a mark): the kernel dumps the mask alone
    assert from_rule(Rule(10, 100, fwmask=0xFFFFFFFF)) == KRule(4, 10, 100, fwmark=0)
    assert from_rule(Rule(10, 100)) == KRule(4, 10, 100)
