"""sacip on real kernels, with real programs: mover - router - peer.

    mover ==wired (mw/rw: 192.0.2.0/26, .64/26, .128/26; 2001:db8:1::/64, 2::/64)== router
    mover ==wifi  (mf/rf: 198.51.100.0/26; 2001:db8:3::/64)========================== router
    router -- peer (203.0.113.0/24, 2001:db8:9::/64), peer2 (203.0.113.0/24: no sacip)

After a move the router no longer has the mover's old subnet (its gateway address there is
deleted), so a session only lives on if it is remapped. sacip runs on mover and peer.
"""

from __future__ import annotations

import json
import os
import select
import socket
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from ipshift.lab import Lab, LabProcess, Node
from ipshift.sacip.engine import INBOUND_GRACE
from tests.netns.conftest import need

pytestmark = pytest.mark.netns

SACIP = [sys.executable, "-m", "ipshift", "sacip"]
PEER4, PEER6 = "203.0.113.5", "2001:db8:9::5"
NOSACIP4 = "203.0.113.6"
# per family: (address on the wired link, its gateway), in the order the mover moves through
WIRED = {4: [("192.0.2.10/26", "192.0.2.1/26"), ("192.0.2.70/26", "192.0.2.65/26"),
             ("192.0.2.130/26", "192.0.2.129/26")],
         6: [("2001:db8:1::10/64", "2001:db8:1::1/64"), ("2001:db8:2::10/64", "2001:db8:2::1/64"),
             ("2001:db8:4::10/64", "2001:db8:4::1/64")]}
SAME_SUBNET = {4: "192.0.2.11/26", 6: "2001:db8:1::11/64"}
WIFI = {4: ("198.51.100.10/26", "198.51.100.1/26"), 6: ("2001:db8:3::10/64", "2001:db8:3::1/64")}
ECHO_PORT, UDP_PORT = 7000, 7001
WAIT = 15.0  # the longest any wait here takes
STALL_LIMIT = 5.0  # a session that does not move on within this is taken as dead


def bare(cidr: str) -> str:
    return cidr.split("/")[0]


def peer_of(family: int) -> str:
    return PEER4 if family == 4 else PEER6


@dataclass
class Site:
    lab: Lab
    mover: Node
    router: Node
    peer: Node
    peer2: Node
    workdir: Path
    daemons: dict[str, LabProcess] = field(default_factory=dict)

    def socket(self, node: Node) -> str:
        return str(self.workdir / f"{node.name}.sock")

    def start(self, node: Node, *extra: str) -> LabProcess:
        state = self.workdir / node.name
        state.mkdir(exist_ok=True)
        proc = node.spawn([*SACIP, "run", "--socket", self.socket(node),
                           "--identity", str(state / "id.key"),
                           "--known-peers", str(state / "known.json"),
                           "--scan-interval", "0.2", "--no-syslog", "-v", *extra],
                          name=f"sacip-{node.name}")
        proc.wait_ready("sacip up", 20, f"sacip on {node.name}")
        self.daemons[node.name] = proc
        return proc

    def status(self, node: Node) -> dict[str, Any]:
        res = node.run([*SACIP, "status", "--socket", self.socket(node), "--json"])
        doc: dict[str, Any] = json.loads(res.stdout)
        return doc

    def wait_ready(self, node: Node, sessions: int) -> None:
        """Until `node`'s daemon follows `sessions` sessions with every peer greeted."""
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline:
            doc = self.status(node)
            peers = doc.get("peers", [])
            if len(doc.get("sessions", [])) >= sessions and peers and all(
                    p["state"] in ("ready", "no-sacip") for p in peers):
                return
            time.sleep(0.1)
        raise AssertionError(f"{node.name} never got ready: {self.status(node)}")

    def wait_moved(self, node: Node, moved: int) -> dict[str, Any]:
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline:
            doc = self.status(node)
            if doc["moved"] + doc["not_preservable"] >= moved and not doc["pending"]:
                return doc
            time.sleep(0.1)
        raise AssertionError(f"{node.name}: no move finished: {self.status(node)}")


def build(lab: Lab, workdir: Path) -> Site:
    mover, router = lab.host("mover"), lab.router("router")
    peer, peer2 = lab.host("peer"), lab.host("peer2")
    lab.link(mover, router, [WIRED[4][0][0]], [gw for _a, gw in WIRED[4]],
             name_a="mw", name_b="rw")
    lab.link(mover, router, [], [WIFI[4][1]], name_a="mf", name_b="rf")
    switch = lab.switch("lan")
    lab.link(router, switch, ["203.0.113.1/24"], None, name_a="rp")
    lab.link(peer, switch, [f"{PEER4}/24"], None, name_a="pr")
    lab.link(peer2, switch, [f"{NOSACIP4}/24"], None, name_a="pr")
    mover.ip_batch([f"addr add {WIRED[6][0][0]} dev mw nodad",
                    f"route add default via {bare(WIRED[4][0][1])}",
                    f"route add default via {bare(WIRED[6][0][1])}"])
    router.ip_batch([f"addr add {gw} dev rw nodad" for _a, gw in WIRED[6]]
                    + [f"addr add {WIFI[6][1]} dev rf nodad",
                       "addr add 2001:db8:9::1/64 dev rp nodad"])
    peer.ip_batch([f"addr add {PEER6}/64 dev pr nodad", "route add default via 203.0.113.1",
                   "route add default via 2001:db8:9::1"])
    peer2.ip_batch(["route add default via 203.0.113.1"])
    return Site(lab, mover, router, peer, peer2, workdir)


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    if os.geteuid() != 0:
        pytest.skip("needs root: builds network namespaces")
    with Lab("sacip") as lab:
        built = build(lab, tmp_path)
        try:
            yield built
        finally:
            statuses = {name: proc.stop() for name, proc in built.daemons.items()}
            leftovers = [node.ip("-o", "addr", "show", "dev", "lo", "scope", "global")
                         for node in (built.mover, built.peer)]
            assert set(statuses.values()) <= {0}, statuses
            # stopping removed every address the daemons kept on lo
            assert leftovers == ["", ""], leftovers


# --- moves -----------------------------------------------------------------------------------
def forget_subnet(site: Site, gateway: str) -> None:
    """The router no longer has the old subnet: only a remap keeps a session alive."""
    site.router.ip("addr", "del", gateway, "dev", "rw")


def move_make_before_break(site: Site, family: int, step: int, *, same_subnet: bool,
                           promote: bool) -> str:
    """The seed's procedure: `ip addr add NEW`, `ip addr del OLD`."""
    old, old_gw = WIRED[family][step]
    new, new_gw = (SAME_SUBNET[family], old_gw) if same_subnet else WIRED[family][step + 1]
    if family == 4:
        site.mover.sysctl("net.ipv4.conf.mw.promote_secondaries", int(promote))
    site.mover.ip_batch([f"addr add {new} dev mw" + (" nodad" if family == 6 else ""),
                         f"route replace default via {bare(new_gw)}",
                         f"addr del {old} dev mw"])
    if not same_subnet:
        forget_subnet(site, old_gw)
    return bare(new)


def move_break_before_make(site: Site, family: int, step: int, gap: float = 0.5) -> str:
    """The old address is lost first (and its route with it); a new one comes `gap` later."""
    old, old_gw = WIRED[family][step]
    new, new_gw = WIRED[family][step + 1]
    site.mover.ip_batch([f"addr del {old} dev mw"])
    forget_subnet(site, old_gw)
    time.sleep(gap)
    site.mover.ip_batch([f"addr add {new} dev mw" + (" nodad" if family == 6 else ""),
                         f"route replace default via {bare(new_gw)}"])
    return bare(new)


def move_to_wifi(site: Site, family: int) -> str:
    old, old_gw = WIRED[family][0]
    new, new_gw = WIFI[family]
    site.mover.ip_batch([f"addr add {new} dev mf" + (" nodad" if family == 6 else ""),
                         f"route replace default via {bare(new_gw)} dev mf",
                         f"addr del {old} dev mw"])
    forget_subnet(site, old_gw)
    return bare(new)


# --- traffic -----------------------------------------------------------------------------------
class Stream:
    """A TCP connection mover -> peer echo server (threads in this process, sockets in the
    namespaces): numbered lines every 5 ms, each echoed back; `stop` says what came back."""

    def __init__(self, site: Site, family: int, server: str | None = None) -> None:
        fam = socket.AF_INET if family == 4 else socket.AF_INET6
        host = server or peer_of(family)
        server_node = site.peer if host in (PEER4, PEER6) else site.peer2

        def listen() -> socket.socket:
            s = socket.socket(fam, socket.SOCK_STREAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((host, ECHO_PORT))
            s.listen(1)
            return s

        self.listener = server_node.call(listen)

        def connect() -> socket.socket:
            c = socket.create_connection((host, ECHO_PORT), timeout=5)
            c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return c

        self.client = site.mover.call(connect)
        self.conn, _ = self.listener.accept()
        self.conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.stopping = threading.Event()
        self.sent = 0
        self.echoed = b""
        self.errors: list[str] = []
        self.longest_gap = 0.0
        self.threads = [threading.Thread(target=self._echo, daemon=True),
                        threading.Thread(target=self._send, daemon=True),
                        threading.Thread(target=self._receive, daemon=True)]
        for t in self.threads:
            t.start()

    def _echo(self) -> None:
        try:
            while True:
                data = self.conn.recv(65536)
                if not data:
                    return
                self.conn.sendall(data)
        except OSError as exc:
            self.errors.append(f"server: {exc}")

    def _send(self) -> None:
        try:
            while not self.stopping.is_set() and self.sent < 20000:
                self.client.sendall(b"%08d\n" % self.sent)
                self.sent += 1
                time.sleep(0.005)
        except OSError as exc:
            self.errors.append(f"client send: {exc}")

    def _receive(self) -> None:
        last = time.monotonic()
        self.client.settimeout(0.2)
        while True:
            try:
                data = self.client.recv(65536)
            except TimeoutError:
                if self.stopping.is_set() and len(self.echoed) >= 9 * self.sent:
                    return
                if time.monotonic() - last > WAIT:
                    return
                continue
            except OSError as exc:
                self.errors.append(f"client receive: {exc}")
                return
            if not data:
                return
            now = time.monotonic()
            self.longest_gap = max(self.longest_gap, now - last)
            last = now
            self.echoed += data

    def echoed_since(self, count: int, timeout: float = STALL_LIMIT) -> bool:
        """Do echoes arrive for `count` more lines within `timeout`?"""
        target = len(self.echoed) + 9 * count
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if len(self.echoed) >= target:
                return True
            time.sleep(0.02)
        return False

    def stop(self) -> None:
        self.stopping.set()
        for t in self.threads[1:]:
            t.join(WAIT)
        for s in (self.client, self.conn, self.listener):
            s.close()
        self.threads[0].join(WAIT)

    def assert_whole(self) -> None:
        assert not self.errors, self.errors
        expected = b"".join(b"%08d\n" % i for i in range(self.sent))
        assert self.echoed == expected, (len(self.echoed), len(expected))


class UdpFlow:
    """A connected UDP flow: the mover's socket connected to the peer's, which connects back
    on the first datagram (as a UDP application with sessions does)."""

    def __init__(self, site: Site, family: int) -> None:
        fam = socket.AF_INET if family == 4 else socket.AF_INET6
        host = peer_of(family)

        def server() -> socket.socket:
            s = socket.socket(fam, socket.SOCK_DGRAM)
            s.bind((host, UDP_PORT))
            return s

        self.server = site.peer.call(server)

        def client() -> socket.socket:
            c = socket.socket(fam, socket.SOCK_DGRAM)
            c.connect((host, UDP_PORT))
            return c

        self.client = site.mover.call(client)
        self.client.send(b"hello")
        _data, address = self.server.recvfrom(100)
        self.server.connect(address)

    def exchange(self, rounds: int = 20) -> int:
        """Datagrams that made the round trip out of `rounds`."""
        ok = 0
        for i in range(rounds):
            self.client.send(b"ping %d" % i)
            if select.select([self.server], [], [], 0.5)[0]:
                self.server.send(self.server.recv(100))
                if select.select([self.client], [], [], 0.5)[0]:
                    self.client.recv(100)
                    ok += 1
        return ok

    def close(self) -> None:
        self.client.close()
        self.server.close()


# --- tests -----------------------------------------------------------------------------------
PROCEDURES = ["mbb-promote", "mbb-other-subnet", "bbm", "other-interface"]


@pytest.mark.parametrize("family", [4, 6])
@pytest.mark.parametrize("procedure", PROCEDURES)
def test_tcp_and_udp_sessions_survive_a_move(site: Site, procedure: str, family: int) -> None:
    if procedure == "mbb-promote" and family == 6:
        pytest.skip("promote_secondaries is IPv4's; IPv6 keeps other addresses anyway")
    site.start(site.mover)
    site.start(site.peer)
    stream = Stream(site, family)
    udp = UdpFlow(site, family)
    try:
        site.wait_ready(site.mover, 2)
        site.wait_ready(site.peer, 2)
        assert stream.echoed_since(20)
        if procedure == "mbb-promote":
            new = move_make_before_break(site, family, 0, same_subnet=True, promote=True)
        elif procedure == "mbb-other-subnet":
            new = move_make_before_break(site, family, 0, same_subnet=False, promote=False)
        elif procedure == "bbm":
            new = move_break_before_make(site, family, 0)
        else:
            new = move_to_wifi(site, family)
        doc = site.wait_moved(site.mover, 2)
        assert stream.echoed_since(50), f"the stream stalled after the move: {doc}"
        assert udp.exchange() >= 19
        assert doc["moved"] == 2 and doc["not_preservable"] == 0, doc
        nows = [s.get("now", "") for s in doc["sessions"]]
        assert all(new in now for now in nows), nows
        assert site.status(site.peer)["moved"] == 2
    finally:
        stream.stop()
        udp.close()
    stream.assert_whole()


def test_repeated_moves_and_both_ends_keep_one_remap_per_session(site: Site) -> None:
    site.start(site.mover)
    site.start(site.peer)
    stream = Stream(site, 4)
    try:
        site.wait_ready(site.mover, 1)
        site.wait_ready(site.peer, 1)
        move_make_before_break(site, 4, 0, same_subnet=False, promote=False)
        site.wait_moved(site.mover, 1)
        assert stream.echoed_since(20)
        move_make_before_break(site, 4, 1, same_subnet=False, promote=False)  # A -> B -> C
        site.wait_moved(site.mover, 2)
        assert stream.echoed_since(20), site.daemons["mover"].stderr()[-2500:]
        # the peer moves too: a second address on its link, the old one deleted
        site.peer.sysctl("net.ipv4.conf.pr.promote_secondaries", 1)
        site.peer.ip_batch(["addr add 203.0.113.50/24 dev pr", "addr del 203.0.113.5/24 dev pr",
                            "route replace default via 203.0.113.1"])
        site.wait_moved(site.peer, 1)
        assert stream.echoed_since(40), stream.errors
        # the earlier wire tuples are let in for INBOUND_GRACE after each move, then go
        time.sleep(INBOUND_GRACE + 0.5)
        mover, peer = site.status(site.mover), site.status(site.peer)
        assert mover["remaps"] == 1 and peer["remaps"] == 1, (mover, peer)
        (session,) = mover["sessions"]
        assert session["now"].startswith("tcp 192.0.2.130:") and "203.0.113.50:7000" in \
            session["now"], session
    finally:
        stream.stop()
    stream.assert_whole()


def test_an_ssh_session_keeps_running_commands_across_two_moves(site: Site) -> None:
    need("sshd", "ssh", "ssh-keygen")
    keys = site.workdir / "ssh"
    keys.mkdir()
    site.peer.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(keys / "host")])
    site.mover.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(keys / "client")])
    (keys / "authorized_keys").write_text((keys / "client.pub").read_text())
    config = keys / "sshd_config"
    config.write_text(f"ListenAddress {PEER4}\nPort 2222\nHostKey {keys / 'host'}\n"
                      f"AuthorizedKeysFile {keys / 'authorized_keys'}\nPermitRootLogin yes\n"
                      "PasswordAuthentication no\nKbdInteractiveAuthentication no\n"
                      "UsePAM no\nStrictModes no\nPidFile none\n")
    os.makedirs("/run/sshd", exist_ok=True)
    sshd = site.peer.spawn(["/usr/sbin/sshd", "-D", "-e", "-f", str(config)], name="sshd")
    site.peer.wait_listening(2222)
    site.start(site.mover)
    site.start(site.peer)
    ticks = 120
    ssh = site.mover.spawn(["ssh", "-i", str(keys / "client"), "-p", "2222",
                            "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
                            "-o", "BatchMode=yes", f"root@{PEER4}",
                            f"for i in $(seq 1 {ticks}); do echo tick $i; sleep 0.05; done"],
                           name="ssh")
    try:
        ssh.wait_for_output("tick 5", 15)
        site.wait_ready(site.mover, 1)
        move_make_before_break(site, 4, 0, same_subnet=False, promote=False)
        site.wait_moved(site.mover, 1)
        move_to_wifi_after_first(site)
        site.wait_moved(site.mover, 2)
        assert ssh.wait(timeout=30) == 0, ssh.stderr()
    finally:
        ssh.stop()
        sshd.stop()
    lines = ssh.stdout().split()
    assert ssh.stdout().splitlines() == [f"tick {i}" for i in range(1, ticks + 1)], lines[-4:]


def move_to_wifi_after_first(site: Site) -> None:
    """From the second wired address (after one move) to the Wi-Fi link."""
    old, old_gw = WIRED[4][1]
    new, new_gw = WIFI[4]
    site.mover.ip_batch([f"addr add {new} dev mf", f"route replace default via "
                         f"{bare(new_gw)} dev mf", f"addr del {old} dev mw"])
    forget_subnet(site, old_gw)


def test_iperf3_stream_across_a_move(site: Site) -> None:
    need("iperf3")
    site.start(site.mover)
    site.start(site.peer)
    server = site.peer.spawn(["iperf3", "-s", "-1", "-B", PEER4, "-p", "5201", "-J"],
                             name="iperf3-server")
    site.peer.wait_listening(5201)
    client = site.mover.spawn(["iperf3", "-c", PEER4, "-p", "5201", "-t", "6", "-b", "200M",
                               "-J"], name="iperf3-client")
    try:
        time.sleep(1.0)
        site.wait_ready(site.mover, 1)
        move_make_before_break(site, 4, 0, same_subnet=False, promote=False)
        doc = site.wait_moved(site.mover, 1)
        assert client.wait(timeout=30) == 0, client.stdout()[-1000:]
        report = json.loads(client.stdout())
        received = report["end"]["sum_received"]["bytes"]
        seconds = report["end"]["sum_received"]["seconds"]
        # the second half of the test ran on the remapped session, at full rate
        per_interval = [i["sum"]["bytes"] for i in report["intervals"]]
        assert all(b > 0 for b in per_interval[-3:]), per_interval
        assert received > 0.5 * 200e6 / 8 * seconds, (received, doc)
    finally:
        client.stop()
        server.stop()


def test_a_peer_without_sacip_is_reported_and_reset_when_asked(site: Site) -> None:
    site.start(site.mover, "--reset-unpreservable")
    stream = Stream(site, 4, server=NOSACIP4)
    try:
        site.wait_ready(site.mover, 1)
        deadline = time.monotonic() + WAIT
        while site.status(site.mover)["peers"][0]["state"] != "no-sacip":
            assert time.monotonic() < deadline, site.status(site.mover)
            time.sleep(0.2)
        move_make_before_break(site, 4, 0, same_subnet=False, promote=False)
        doc = site.wait_moved(site.mover, 1)
        assert doc["not_preservable"] == 1 and doc["moved"] == 0, doc
        deadline = time.monotonic() + WAIT
        while not stream.errors and time.monotonic() < deadline:
            time.sleep(0.05)
        # reset at once: the application is told (ECONNABORTED), it does not hang
        assert any("abort" in e.lower() or "reset" in e.lower() for e in stream.errors), \
            stream.errors
    finally:
        stream.stop()


def test_forged_and_replayed_notices_move_nothing(site: Site) -> None:
    from scapy.layers.inet import IP, UDP
    from scapy.utils import rdpcap

    from ipshift.net.rawsock import RawSocket
    from ipshift.sacip import wire

    need("tcpdump")
    site.start(site.mover)
    site.start(site.peer)
    stream = Stream(site, 4)
    capture = site.workdir / "notices.pcap"
    sniffer = site.router.spawn(["tcpdump", "-ni", "rp", "-U", "-w", str(capture),
                                 "udp port 7366"], name="tcpdump")
    try:
        sniffer.wait_for_output("listening on", 10, stream="stderr")
        site.wait_ready(site.mover, 1)
        site.wait_ready(site.peer, 1)
        move_make_before_break(site, 4, 0, same_subnet=False, promote=False)
        site.wait_moved(site.mover, 1)
        time.sleep(0.3)
        sniffer.stop()
        sealed = list(dict.fromkeys(
            bytes(p[UDP].payload) for p in rdpcap(str(capture))
            if p.haslayer(UDP) and p[IP].dst == PEER4 and bytes(p[UDP].payload)[1:2] == b"\x03"))
        assert sealed, "no sealed datagram to the peer was seen"
        before = site.status(site.peer)
        # an attacker on the router's segment: the captured notices again, from their source,
        # a forged one (random ciphertext under a real index), and junk
        index = wire.decode_datagram(sealed[0])
        assert isinstance(index, wire.Sealed)
        forged = wire.Sealed(index.receiver_index, index.counter + 1000, os.urandom(80)).encode()
        packets = [bytes(IP(src="192.0.2.70", dst=PEER4) / UDP(sport=7366, dport=7366) / d)
                   for d in [*sealed, forged, b"\x01\x09junk", os.urandom(300)]]

        def send_all() -> None:
            with RawSocket(socket.AF_INET) as raw:
                for packet in packets:
                    raw.send(packet)

        site.router.call(send_all)
        time.sleep(0.5)
        after = site.status(site.peer)
        counters = after["counters"]
        assert counters.get("sealed_replay", 0) - before["counters"].get("sealed_replay", 0) \
            == len(sealed), counters
        assert counters.get("sealed_auth", 0) - before["counters"].get("sealed_auth", 0) == 1
        assert sum(v for k, v in counters.items() if k.startswith("malformed")) >= 2
        assert after["moved"] == before["moved"] and after["remaps"] == before["remaps"]
        assert stream.echoed_since(20)
    finally:
        stream.stop()
    stream.assert_whole()


def test_a_restarted_daemon_keeps_the_moved_sessions(site: Site) -> None:
    site.start(site.mover)
    site.start(site.peer)
    stream = Stream(site, 4)
    try:
        site.wait_ready(site.mover, 1)
        move_make_before_break(site, 4, 0, same_subnet=False, promote=False)
        site.wait_moved(site.mover, 1)
        site.daemons.pop("mover").signal(9)  # kill -9: remaps and the kept address stay
        time.sleep(0.5)
        assert stream.echoed_since(20)
        site.start(site.mover)
        doc = site.status(site.mover)
        assert doc["remaps"] == 1 and doc["kept"] == ["192.0.2.10"], doc
        assert stream.echoed_since(20)
        site.wait_ready(site.mover, 1)
        # and it moves on from there
        move_make_before_break(site, 4, 1, same_subnet=False, promote=False)
        site.wait_moved(site.mover, 1)
        assert stream.echoed_since(20)
    finally:
        stream.stop()
    stream.assert_whole()


def test_a_strict_router_drops_the_moved_session(site: Site) -> None:
    """The documented limit: a router whose conntrack refuses TCP it did not see start
    (nf_conntrack_tcp_loose=0, invalid packets dropped) drops the remapped session."""
    site.router.sysctl("net.netfilter.nf_conntrack_tcp_loose", 0)
    site.router.nft("table inet strict {\n chain forward_strict {\n  type filter hook "
                    "forward priority 0;\n  ct state invalid drop\n }\n}\n")
    site.start(site.mover)
    site.start(site.peer)
    stream = Stream(site, 4)
    try:
        site.wait_ready(site.mover, 1)
        assert stream.echoed_since(10)
        move_make_before_break(site, 4, 0, same_subnet=False, promote=False)
        doc = site.wait_moved(site.mover, 1)
        assert doc["moved"] == 1  # the daemons did their part ...
        assert not stream.echoed_since(10, timeout=3.0)  # ... the router drops the session
    finally:
        stream.stop()
