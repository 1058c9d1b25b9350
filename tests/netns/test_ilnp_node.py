"""`ipshift ilnp node` in the seed's topology (ipshift.lab.ilnp_site): a mobile node (mn) moving
between L1 and L2, a correspondent (cn) on L3, a router (r) on all three; real programs (ping,
iperf3, ssh) talk through the TUN devices at the application addresses while mn moves.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ipshift.ilnp.dns import read_tsig_key, resolve
from ipshift.lab import Lab, LabProcess, Node
from ipshift.lab.dns import KnotServer
from ipshift.lab.ilnp_site import NIDS, IlnpSite, app_address, build_site, ilv
from ipshift.packet import ilnp as wire_ilnp
from ipshift.packet.pcap import encode_pcap
from ipshift.tunnel import wire

from .conftest import need

pytestmark = pytest.mark.netns

PORT = 7700


@pytest.fixture
def routed(lab: Lab, tmp_path: Path) -> Iterator[IlnpSite]:
    site = build_site(lab, tmp_path / "site")
    site.start_all()
    yield site


@pytest.fixture
def direct(lab: Lab, tmp_path: Path) -> Iterator[IlnpSite]:
    site = build_site(lab, tmp_path / "site", direct=True)
    site.start_all()
    yield site


def ping(node: Node, to: str, count: int, interval: float = 0.01) -> LabProcess:
    return node.spawn(["ping", "-n", "-q", "-c", str(count), "-i", str(interval), "-W", "1",
                       to], name=f"ping-{node.name}")


def received(proc: LabProcess) -> tuple[int, int]:
    """(transmitted, received) from ping's summary."""
    assert proc.wait(60) in (0, 1), proc.stderr()
    found = re.search(r"(\d+) packets transmitted, (\d+) received", proc.stdout())
    assert found, proc.stdout()
    return int(found[1]), int(found[2])


def correspondent(site: IlnpSite, node: Node, name: str) -> dict[str, Any]:
    wanted = f"0000:0000:0000:{NIDS[name]:04x}"
    rows = [row for row in site.status(node)["correspondents"] if row["nid"] == wanted]
    assert rows, site.status(node)["correspondents"]
    return rows[0]


def check_updates_acked(site: IlnpSite, moves: int) -> dict[str, Any]:
    counters = site.status(site.mn)["counters"]
    assert counters["lu_sent"] >= moves
    # each update is acked, or replaced by a newer one first (attach and deprecation come
    # a moment apart); none given up
    assert counters["lu_acked"] + counters["lu_superseded"] == counters["lu_sent"], counters
    assert counters["lu_failed"] == 0 and counters["lu_acked"] >= moves, counters
    return counters


def test_twenty_moves_with_traffic_both_ways(routed: IlnpSite) -> None:
    site = routed
    there = ping(site.mn, app_address("cn"), 1000)
    back = ping(site.cn, app_address("mn"), 1000)
    for _ in range(20):
        time.sleep(0.2)
        site.move(soft=0.2)
    for proc in (there, back):
        sent, got = received(proc)
        assert got == sent, f"{proc.name}: {sent - got} of {sent} lost across 20 soft handoffs"
    check_updates_acked(site, 20)
    # the correspondent holds exactly the locator mn is on now, learned from its update
    row = correspondent(site, site.cn, "mn")
    assert [loc["l64"] for loc in row["locators"]] == [f"2001:db8:{site.at}:0::/64"]
    assert row["locators"][0]["source"] == "lu" and row["via"] == "0000:0000:0000:0033"
    assert site.status(site.mn)["node"]["moves"] >= 40  # attach and detach each


def test_hard_handoffs_lose_only_what_was_in_flight(routed: IlnpSite) -> None:
    site = routed
    there = ping(site.mn, app_address("cn"), 300, 0.02)
    for _ in range(4):
        time.sleep(1.0)
        site.move(soft=0)
    sent, got = received(there)
    assert got >= sent - 4 * 3, f"{sent - got} of {sent} lost across 4 hard handoffs"
    check_updates_acked(site, 4)


def test_iperf3_over_the_tun_survives_moves(direct: IlnpSite) -> None:
    need("iperf3")
    site = direct
    server = site.cn.spawn(["iperf3", "-s", "-1", "-B", app_address("cn"), "-p", "5201"],
                           name="iperf3-s")
    site.cn.wait_listening(5201)
    client = site.mn.spawn(["iperf3", "-c", app_address("cn"), "-p", "5201", "-t", "6",
                            "-i", "1", "-J"], name="iperf3-c")
    for _ in range(4):
        time.sleep(1.0)
        site.move(soft=0.2)
    assert client.wait(30) == 0, client.stdout()[-2000:] + client.stderr()
    import json

    doc = json.loads(client.stdout())
    intervals = [i["sum"]["bytes"] for i in doc["intervals"]]
    assert len(intervals) >= 6 and all(b > 0 for b in intervals), intervals
    assert doc["end"]["sum_received"]["bytes"] > 10_000_000
    server.wait(10)
    check_updates_acked(site, 4)


def test_ssh_session_survives_moves_through_the_router(routed: IlnpSite, tmp_path: Path) -> None:
    need("sshd", "ssh", "ssh-keygen")
    site = routed
    keys = tmp_path / "ssh"
    keys.mkdir()
    site.cn.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(keys / "host")])
    site.mn.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(keys / "client")])
    (keys / "authorized_keys").write_text((keys / "client.pub").read_text())
    config = keys / "sshd_config"
    config.write_text(f"ListenAddress {app_address('cn')}\nPort 2222\nHostKey {keys / 'host'}\n"
                      f"AuthorizedKeysFile {keys / 'authorized_keys'}\n"
                      "PermitRootLogin prohibit-password\nPasswordAuthentication no\n"
                      "KbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\n"
                      "PidFile none\n")
    os.makedirs("/run/sshd", exist_ok=True)
    sshd = site.cn.spawn(["/usr/sbin/sshd", "-D", "-e", "-f", str(config)], name="sshd")
    site.cn.wait_listening(2222)
    session = site.mn.spawn(
        ["ssh", "-i", str(keys / "client"), "-p", "2222", "-o", "StrictHostKeyChecking=no",
         "-o", "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes",
         f"root@{app_address('cn')}",
         "for i in $(seq 1 40); do echo line $i; sleep 0.1; done"], name="ssh")
    for _ in range(3):
        time.sleep(1.0)
        site.move(soft=0.2)
    assert session.wait(30) == 0, session.stderr()
    assert [line for line in session.stdout().splitlines() if line.startswith("line")] == \
        [f"line {i}" for i in range(1, 41)]
    sshd.stop()


# --- an attacker on the correspondent's link -------------------------------------------------
def capture(node: Node, ifname: str, path: Path) -> LabProcess:
    proc = node.spawn(["tshark", "-q", "-i", ifname, "-f", f"udp port {PORT}", "-w", str(path)],
                      name="tshark-capture")
    deadline = time.monotonic() + 15
    while not path.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(0.5)
    return proc


def inner_packets(path: Path) -> list[bytes]:
    """The ILNPv6 packets the overlay's datagrams carried (after the tunnel header)."""
    out = subprocess.run(["tshark", "-r", str(path), "-T", "fields", "-e", "udp.payload"],
                         capture_output=True, text=True, timeout=60, check=True).stdout
    packets = []
    for line in out.split():
        data = bytes.fromhex(line.replace(":", ""))
        _, inner = wire.decode(data)
        packets.append(bytes(inner))
    return packets


def updates_from_mn(packets: list[bytes]) -> list[wire_ilnp.LocatorUpdatePacket]:
    found = []
    for packet in packets:
        try:
            lu = wire_ilnp.parse_locator_update_packet(packet)
        except Exception:
            continue
        if int(lu.src) & 0xFFFF_FFFF_FFFF_FFFF == NIDS["mn"] and lu.update.is_advertisement:
            found.append(lu)
    return found


def send_as_stranger(node: Node, to: str, packets: list[bytes]) -> None:
    def send() -> None:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as sock:
            for packet in packets:
                sock.sendto(wire.PLAIN_HEADER + packet, (to, PORT))

    node.call(send)


def test_forged_and_replayed_updates_are_dropped_and_pcap_decodes(
        routed: IlnpSite, lab: Lab, tmp_path: Path) -> None:
    need("tshark")
    site = routed
    attacker = lab.host("x")
    sw3 = lab.nodes["sw3"]
    lab.link(attacker, sw3, None, None, v6=("2001:db8:3::66/64", None), name_a="l3")
    pcap = tmp_path / "l3.pcap"
    tap = capture(site.cn, "l3", pcap)
    there = ping(site.mn, app_address("cn"), 400, 0.01)
    time.sleep(0.5)
    site.move(soft=0.2)  # to L2: the update to replay later
    time.sleep(0.5)
    site.move(soft=0.2)  # back to L1
    time.sleep(0.5)
    tap.stop()
    packets = inner_packets(pcap)
    updates = updates_from_mn(packets)
    assert updates, f"no Locator Update from mn among {len(packets)} captured packets"
    before = site.status(site.cn)["counters"]["drops"]
    # forged: mn "moved" to L3 (the attacker's link): without a nonce, and with a wrong one
    fake = wire_ilnp.LocatorUpdate.advertisement([wire_ilnp.LocatorEntry(0x20010DB800030000, 1,
                                                                         600)])
    src, dst = wire_ilnp.ilv(0x20010DB800030000, NIDS["mn"]), updates[0].dst
    forged = [wire_ilnp.locator_update_packet(src, dst, fake),
              wire_ilnp.locator_update_packet(src, dst, fake, nonce=b"\x01\x02\x03\x04")]
    # replayed: the captured update that took mn to L2, after mn came back to L1
    to_l2 = next(lu for lu in updates if [e.l64 for e in lu.update.locators
                                          if e.preference < 100] == [0x20010DB800020000])
    replay = next(p for p in packets if updates_from_mn([p]) == [to_l2])
    send_as_stranger(attacker, ilv(3, NIDS["cn"]), [*forged, replay])
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        drops = site.status(site.cn)["counters"]["drops"]
        if drops.get("lu_bad_nonce", 0) >= before.get("lu_bad_nonce", 0) + 2 and \
                drops.get("lu_replayed", 0) > before.get("lu_replayed", 0):
            break
        time.sleep(0.1)
    assert drops.get("lu_bad_nonce", 0) == before.get("lu_bad_nonce", 0) + 2, drops
    assert drops.get("lu_replayed", 0) == before.get("lu_replayed", 0) + 1, drops
    row = correspondent(site, site.cn, "mn")
    assert [loc["l64"] for loc in row["locators"]] == ["2001:db8:1:0::/64"]
    sent, got = received(there)
    assert got == sent
    # the captured overlay decodes in tshark: nonces, LU fields, ICMPv6 checksums good
    check_tshark(tmp_path, packets, updates)


def check_tshark(tmp_path: Path, packets: list[bytes],
                 updates: list[wire_ilnp.LocatorUpdatePacket]) -> None:
    raw = tmp_path / "inner.pcap"
    raw.write_bytes(encode_pcap(packets))
    fields = ("ipv6.src", "ipv6.opt.ilnp_nonce", "icmpv6.type", "icmpv6.ilnp.nb_locator",
              "icmpv6.checksum.status")
    out = subprocess.run(
        ["tshark", "-r", str(raw), "-T", "fields", "-E", "separator=\t", "-E", "occurrence=a",
         "-E", "aggregator=,", *[a for f in fields for a in ("-e", f)]],
        capture_output=True, text=True, timeout=60, check=True).stdout
    rows = [dict(zip(fields, line.split("\t"), strict=True)) for line in out.splitlines()]
    assert len(rows) == len(packets)
    lus = [row for row in rows if row["icmpv6.type"].startswith("156")]
    assert len(lus) >= len(updates)
    for row in lus:
        assert row["icmpv6.checksum.status"] == "1"  # good
        assert len(row["ipv6.opt.ilnp_nonce"]) == 8  # 4 bytes, as hex
        assert row["icmpv6.ilnp.nb_locator"].startswith("0x20010db80")
    echoes = [row for row in rows if row["icmpv6.type"] in ("128", "129")]
    assert echoes and all(row["icmpv6.checksum.status"] == "1" for row in echoes)
    assert any(row["ipv6.opt.ilnp_nonce"] for row in echoes)  # the nonce after a move


def test_a_flood_of_junk_is_counted_and_traffic_goes_on(routed: IlnpSite, lab: Lab) -> None:
    site = routed
    attacker = lab.host("x")
    lab.link(attacker, lab.nodes["sw3"], None, None, v6=("2001:db8:3::66/64", None),
             name_a="l3")

    def flood() -> None:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as sock:
            for i in range(3000):
                sock.sendto(os.urandom(i % 200), (ilv(3, NIDS["cn"]), PORT))
                sock.sendto(b"ILNP-HELLO/1 {" + os.urandom(i % 50),
                            (ilv(3, NIDS["cn"]), 7702))

    there = ping(site.mn, app_address("cn"), 200, 0.01)
    attacker.call(flood)
    sent, got = received(there)
    assert got == sent
    counters = site.status(site.cn)["counters"]["node"]
    assert counters["stranger_malformed"] >= 2500 and counters["hellos_malformed"] >= 2500


def test_stop_and_kill_leave_nothing_behind(routed: IlnpSite) -> None:
    site = routed
    proc = site.daemons["mn"]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(10)
    # the TUN device is not persistent: it went with the process
    assert "ilnp0" not in site.mn.ip("link", "show")
    site.start(site.mn)
    there = ping(site.mn, app_address("cn"), 20, 0.05)
    sent, got = received(there)
    assert got >= sent - 2  # the first ones wait for discovery
    assert site.stop(site.mn) == 0
    assert "ilnp0" not in site.mn.ip("link", "show")
    assert not Path(site.socket(site.mn)).exists()


# --- the DNS ------------------------------------------------------------------------------
def test_dns_records_follow_moves_and_resolve_correspondents(lab: Lab, tmp_path: Path) -> None:
    need("knotd", "knotc")
    site = build_site(lab, tmp_path / "site")
    dns_node = lab.host("dns")
    lab.link(dns_node, lab.nodes["sw3"], None, None, v6=("2001:db8:3::53/64", None),
             name_a="l3")
    server = KnotServer(dns_node, tmp_path / "knot")
    server.start()
    try:
        # the underlay routes between the three networks through r (the DNS is on L3)
        site.r.sysctl("net.ipv6.conf.all.forwarding", 1)
        site.mn.ip("-6", "route", "add", "default", "via", ilv(1, NIDS["r"]))
        dns_node.ip("-6", "route", "add", "default", "via", ilv(3, NIDS["r"]))
        dns = (f'[dns]\nserver = "2001:db8:3::53"\nzone = "ilnp.test."\n'
               f'key_file = "{server.key_file}"\nttl = 5\n')
        for node in (site.r, site.cn, site.mn):
            # the router does not pass hellos on: cn finds mn through the DNS only
            extra = dns + ("[discovery]\ninterval = 1.0\nflood = false\n"
                           if node is site.r else "")
            site.write_config(node, extra)
            site.start(node)
        key = read_tsig_key(str(server.key_file))
        assert key is not None

        def l64s(name: str) -> list[int]:
            records = dns_node.call(lambda: resolve("2001:db8:3::53", 53, name, 2.0))
            return [value for _, value in records.l64s]

        wait_for(lambda: l64s("mn.ilnp.test.") == [0x20010DB800010000], "mn published")
        answer = site.ctl(site.cn, "resolve", "mn")
        assert app_address("mn") in answer and "dns" in answer
        unknown = site.cn.run([sys.executable, "-m", "ipshift", "ilnp", "resolve", "nobody",
                               "--socket", site.socket(site.cn)], timeout=20, check=False)
        assert unknown.returncode != 0 and "nobody" in unknown.stderr
        assert len(unknown.stderr.strip().splitlines()) == 1, unknown.stderr
        assert "Traceback" not in site.daemons["cn"].stderr()
        site.move(soft=0.2)
        site.mn.ip("-6", "route", "replace", "default", "via", ilv(2, NIDS["r"]))
        wait_for(lambda: l64s("mn.ilnp.test.") == [0x20010DB800020000], "mn's move published")
        # cn reaches mn found by the NID-derived name in the DNS, through the router
        there = ping(site.cn, app_address("mn"), 20, 0.05)
        sent, got = received(there)
        assert got >= sent - 1, json.dumps(site.status(site.cn))
        assert site.status(site.mn)["counters"]["node"]["dns_published"] >= 4
    finally:
        server.stop()


def wait_for(check: Any, what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except Exception:
            pass
        time.sleep(0.2)
    pytest.fail(f"not within {timeout:g} s: {what}")


# --- multihoming, the schedule, the UDP proxy over the TUN ------------------------------------
def test_traffic_fails_over_when_a_locator_dies(lab: Lab, tmp_path: Path) -> None:
    site = build_site(lab, tmp_path / "site", direct=True)
    # mn multihomed on L1 (preferred) and L2
    site.mn.ip("addr", "add", f"{ilv(2, NIDS['mn'])}/64", "dev", "l2", "nodad")
    # the network comes back with the same address (as SLAAC with a token would make it)
    site.mn.sysctl("net.ipv6.conf.l1.keep_addr_on_down", 1)
    site.write_config(site.mn, "[preferences]\nl1 = 10\nl2 = 20\n")
    site.start_all()
    there = ping(site.cn, app_address("mn"), 300, 0.01)
    wait_for(lambda: correspondent(site, site.cn, "mn")["using"] == "2001:db8:1:0::/64",
             "cn using mn's preferred locator")
    site.mn.ip("link", "set", "l1", "down")  # the preferred network dies
    wait_for(lambda: correspondent(site, site.cn, "mn")["using"] == "2001:db8:2:0::/64",
             "cn failing over to L2")
    sent, got = received(there)
    assert got >= sent - 5, f"{sent - got} of {sent} lost at the failover"
    site.mn.ip("link", "set", "l1", "up")
    wait_for(lambda: correspondent(site, site.cn, "mn")["using"] == "2001:db8:1:0::/64",
             "cn back on L1 once it returns")


def test_a_schedule_cycles_the_locators_like_the_seeds_experiments(lab: Lab,
                                                                   tmp_path: Path) -> None:
    site = build_site(lab, tmp_path / "site")
    site.mn.ip("addr", "add", f"{ilv(2, NIDS['mn'])}/64", "dev", "l2", "nodad")
    site.write_config(site.mn, '[schedule]\nsets = [["2001:db8:1::/64"], ["2001:db8:2::/64"]]\n'
                               "move_time = 1.0\nhandoff_time = 0.3\n")
    site.start_all()
    there = ping(site.mn, app_address("cn"), 500, 0.01)
    sent, got = received(there)
    assert got == sent, f"{sent - got} of {sent} lost across the scheduled moves"
    doc = site.status(site.mn)
    assert doc["node"]["moves"] >= 8  # about 5 s: a soft and a full change per second
    assert len(doc["node"]["locators"]) in (1, 2)
    check_updates_acked(site, 4)


def test_nc_through_the_udp_proxy_over_the_tun_while_mn_moves(direct: IlnpSite,
                                                               tmp_path: Path) -> None:
    from .test_ilnp_proxy_seed import APP_PORT, PROXY_PORT, exchange, netcats

    need("nc")
    site = direct
    unix = {}
    for node, other in ((site.mn, "cn"), (site.cn, "mn")):
        unix[node.name] = tmp_path / f"proxy-{node.name}" / "map.sock"
        unix[node.name].parent.mkdir(mode=0o700)
        node.spawn([sys.executable, "-m", "ipshift", "ilnp", "proxy", str(PROXY_PORT),
                    "--node-socket", site.socket(node), "--unix", str(unix[node.name]),
                    "--socket", str(tmp_path / f"proxy-{node.name}.ctl")],
                   name=f"proxy-{node.name}")
        wait_for(lambda n=node: unix[n.name].exists(), f"the proxy on {node.name}")
        answer = node.run([sys.executable, "-m", "ipshift", "ilnp", "proxy-create",
                           str(APP_PORT), other, str(APP_PORT), "--unix", str(unix[node.name])],
                          timeout=15).stdout.strip()
        assert answer == str(PROXY_PORT)
    with netcats((site.mn, tmp_path, "127.0.0.1", PROXY_PORT, ()),
                 (site.cn, tmp_path, "127.0.0.1", PROXY_PORT, ())) as (at_mn, at_cn):
        moving = threading.Thread(target=lambda: [
            (time.sleep(1.5), site.move(soft=0.2)) for _ in range(3)])
        moving.start()
        exchange(at_mn, at_cn, "mn", "cn")
        moving.join(15)
    check_updates_acked(site, 3)


def test_a_move_to_an_ipv4_network_and_back(lab: Lab, tmp_path: Path) -> None:
    site = build_site(lab, tmp_path / "site", direct=True)
    sw4 = lab.switch("sw4")
    lab.link(site.mn, sw4, None, None, name_a="l4")
    lab.link(site.cn, sw4, "192.0.2.22/24", None, name_a="l4")
    mapping = 'ipv4_locators = { l4 = "2001:db8:4::/64" }\n'
    for node in (site.mn, site.cn):
        site.write_config(node, mapping)
    site.start_all()
    there = ping(site.mn, app_address("cn"), 400, 0.01)
    time.sleep(0.5)
    # onto the IPv4 network (an address there), then off the IPv6 one
    site.mn.ip("addr", "add", "192.0.2.11/24", "dev", "l4")
    time.sleep(0.3)
    site.mn.ip("addr", "del", f"{ilv(1, NIDS['mn'])}/64", "dev", "l1")
    wait_for(lambda: correspondent(site, site.cn, "mn")["using"] == "2001:db8:4:0::/64",
             "cn sending to mn's IPv4 network")
    time.sleep(0.5)
    site.mn.ip("addr", "add", f"{ilv(1, NIDS['mn'])}/64", "dev", "l1", "nodad")
    time.sleep(0.3)
    site.mn.ip("addr", "del", "192.0.2.11/24", "dev", "l4")
    sent, got = received(there)
    assert got >= sent - 4, f"{sent - got} of {sent} lost moving to IPv4 and back"
    locators = site.status(site.mn)["node"]["locators"]
    assert [loc["l64"] for loc in locators] == ["2001:db8:1:0::/64"]
    assert correspondent(site, site.cn, "mn")["using"] == "2001:db8:1:0::/64"
    check_updates_acked(site, 2)


def test_the_plain_ipv6_checksum_rule_carries_tcp_and_icmp(lab: Lab, tmp_path: Path) -> None:
    need("iperf3")
    site = build_site(lab, tmp_path / "site", direct=True)
    for node in (site.mn, site.cn, site.r):
        site.write_config(node, checksum="ipv6")
    site.start_all()
    sent, got = received(ping(site.mn, app_address("cn"), 20, 0.02))
    assert got == sent
    site.cn.spawn(["iperf3", "-s", "-1", "-B", app_address("cn"), "-p", "5202"], name="s")
    site.cn.wait_listening(5202)
    client = site.mn.run(["iperf3", "-c", app_address("cn"), "-p", "5202", "-t", "2", "-J"],
                         timeout=30)
    doc = json.loads(client.stdout)
    assert doc["end"]["sum_received"]["bytes"] > 10_000_000
    assert doc["end"]["sum_sent"]["retransmits"] < 50
