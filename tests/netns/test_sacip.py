"""sacip on real kernels, with real programs: mover - router - peer (ipshift.lab.sacip_site).

    mover ==wired (mw/rw: 192.0.2.0/26, .64/26, .128/26; 2001:db8:1::/64, 2::/64)== router
    mover ==wifi  (mf/rf: 198.51.100.0/26; 2001:db8:3::/64)========================== router
    router -- peer (203.0.113.0/24, 2001:db8:9::/64), peer2 (203.0.113.0/24: no sacip)

After a move the router no longer has the mover's old subnet (its gateway address there is
deleted), so a session only lives on if it is remapped. sacip runs on mover and peer.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ipshift.lab import Lab
from ipshift.lab.sacip_site import (
    NOSACIP4,
    PEER4,
    WAIT,
    SacipSite,
    Stream,
    UdpFlow,
    build_site,
    move_break_before_make,
    move_make_before_break,
    move_to_wifi,
    start_sshd,
)
from ipshift.sacip.engine import INBOUND_GRACE
from tests.netns.conftest import need

pytestmark = pytest.mark.netns

@pytest.fixture
def site(tmp_path: Path) -> Iterator[SacipSite]:
    if os.geteuid() != 0:
        pytest.skip("needs root: builds network namespaces")
    with Lab("sacip") as lab:
        built = build_site(lab, tmp_path)
        try:
            yield built
        finally:
            statuses = {name: proc.stop() for name, proc in built.daemons.items()}
            leftovers = [node.ip("-o", "addr", "show", "dev", "lo", "scope", "global")
                         for node in (built.mover, built.peer)]
            assert set(statuses.values()) <= {0}, statuses
            # stopping removed every address the daemons kept on lo
            assert leftovers == ["", ""], leftovers


# --- tests -----------------------------------------------------------------------------------
PROCEDURES = ["mbb-promote", "mbb-other-subnet", "bbm", "other-interface"]
# promote_secondaries is IPv4's (IPv6 keeps the other addresses anyway)
CASES = [(p, f) for p in PROCEDURES for f in (4, 6) if (p, f) != ("mbb-promote", 6)]


@pytest.mark.parametrize(("procedure", "family"), CASES)
def test_tcp_and_udp_sessions_survive_a_move(site: SacipSite, procedure: str, family: int) -> None:
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


def test_repeated_moves_and_both_ends_keep_one_remap_per_session(site: SacipSite) -> None:
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


def test_an_ssh_session_keeps_running_commands_across_two_moves(site: SacipSite) -> None:
    need("ssh", "ssh-keygen")
    sshd = start_sshd(site, site.workdir / "ssh")
    site.start(site.mover)
    site.start(site.peer)
    ticks = 120
    ssh = site.mover.spawn(sshd.client_argv(
        f"for i in $(seq 1 {ticks}); do echo tick $i; sleep 0.05; done"), name="ssh")
    try:
        ssh.wait_for_output("tick 5", 15)
        site.wait_ready(site.mover, 1)
        move_make_before_break(site, 4, 0, same_subnet=False, promote=False)
        site.wait_moved(site.mover, 1)
        move_to_wifi(site, 4, step=1)
        site.wait_moved(site.mover, 2)
        assert ssh.wait(timeout=30) == 0, ssh.stderr()
    finally:
        ssh.stop()
        sshd.stop()
    lines = ssh.stdout().split()
    assert ssh.stdout().splitlines() == [f"tick {i}" for i in range(1, ticks + 1)], lines[-4:]


def test_iperf3_stream_across_a_move(site: SacipSite) -> None:
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


def test_a_peer_without_sacip_is_reported_and_reset_when_asked(site: SacipSite) -> None:
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


def test_forged_and_replayed_notices_move_nothing(site: SacipSite) -> None:
    from scapy.layers.inet import IP, UDP

    from ipshift.net.packetsock import PacketSocket
    from ipshift.net.rawsock import RawSocket
    from ipshift.sacip import wire

    site.start(site.mover)
    site.start(site.peer)
    stream = Stream(site, 4)
    # what crosses the router's link to the peer, as an attacker there would see it
    sniffer = PacketSocket("rp", netns=site.router.ns)
    try:
        site.wait_ready(site.mover, 1)
        site.wait_ready(site.peer, 1)
        sniffer.recv_batch(100_000)  # the greetings: not what is replayed here
        move_make_before_break(site, 4, 0, same_subnet=False, promote=False)
        site.wait_moved(site.mover, 1)
        time.sleep(0.3)
        seen = [IP(p.data) for p in sniffer.recv_batch(100_000)]
        sealed = list(dict.fromkeys(
            bytes(p[UDP].payload) for p in seen
            if p.haslayer(UDP) and p[IP].dst == PEER4 and p[UDP].dport == 7366
            and bytes(p[UDP].payload)[1:2] == b"\x03"))
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
        sniffer.close()
        stream.stop()
    stream.assert_whole()


def test_a_restarted_daemon_keeps_the_moved_sessions(site: SacipSite) -> None:
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


def test_a_strict_router_drops_the_moved_session(site: SacipSite) -> None:
    """The documented limit: a router whose conntrack refuses TCP it did not see start
    (nf_conntrack_tcp_loose=0, invalid packets dropped) drops the remapped session."""
    site.router_firewall(strict=True)
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


def test_pmtu_errors_about_a_moved_session_reach_its_socket(site: SacipSite) -> None:
    """After the move a router on the path needs smaller packets: its "fragmentation needed"
    goes to the new address and quotes the new tuple; mapped back, the socket lowers its
    path MTU and the stream goes on (otherwise: a black hole)."""
    site.start(site.mover)
    site.start(site.peer)

    def listen() -> socket.socket:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((PEER4, 7300))
        s.listen(1)
        return s

    listener = site.peer.call(listen)
    client = site.mover.call(lambda: socket.create_connection((PEER4, 7300), timeout=5))
    server, _ = listener.accept()
    received = [0]
    stopping = [False]

    def drain() -> None:
        server.settimeout(0.2)
        while not stopping[0]:
            try:
                data = server.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            if not data:
                return
            received[0] += len(data)

    def pump() -> None:
        deadline = time.monotonic() + 40
        try:
            while not stopping[0] and time.monotonic() < deadline:
                client.sendall(b"x" * 1400)
                time.sleep(0.002)
        except OSError:
            pass

    threads = [threading.Thread(target=f, daemon=True) for f in (drain, pump)]
    for t in threads:
        t.start()
    try:
        site.wait_ready(site.mover, 1)
        move_make_before_break(site, 4, 0, same_subnet=False, promote=False)
        site.wait_moved(site.mover, 1)
        site.router.ip("link", "set", "rp", "mtu", "1280")
        time.sleep(1.0)
        before = received[0]
        time.sleep(2.0)
        assert received[0] - before > 200_000, (before, received[0])
        assert site.status(site.mover)["icmp_errors"]["mapped"] >= 1
    finally:
        stopping[0] = True
        for t in threads:
            t.join(5)
        for s in (client, server, listener):
            s.close()


def test_both_ends_move_at_the_same_moment(site: SacipSite) -> None:
    """The mover changes subnet (its old one forgotten by the router) while the peer changes
    address within its own: each notice goes to the other's old address; the peer's old one
    still reaches it, and that is enough for both moves to complete."""
    site.start(site.mover)
    site.start(site.peer)
    stream = Stream(site, 4)
    try:
        site.wait_ready(site.mover, 1)
        site.wait_ready(site.peer, 1)
        site.peer.sysctl("net.ipv4.conf.pr.promote_secondaries", 1)
        peer_move = threading.Thread(target=site.peer.ip_batch, args=([
            "addr add 203.0.113.50/24 dev pr", "addr del 203.0.113.5/24 dev pr",
            "route replace default via 203.0.113.1"],))
        peer_move.start()
        move_make_before_break(site, 4, 0, same_subnet=False, promote=False)
        peer_move.join(10)
        site.wait_moved(site.mover, 2)
        site.wait_moved(site.peer, 2)
        assert stream.echoed_since(40), (stream.errors, site.status(site.mover)["sessions"])
        (session,) = site.status(site.mover)["sessions"]
        assert "192.0.2.70:" in session["now"] and "203.0.113.50:7000" in session["now"]
    finally:
        stream.stop()
    stream.assert_whole()


def test_a_flood_of_junk_and_spoofed_greetings_changes_nothing(site: SacipSite) -> None:
    """An attacker on the peer's segment sends thousands of malformed datagrams and HELLOs
    from spoofed sources to the peer's daemon: they are counted and dropped (greetings
    answered at most at the handshake rate), and a session still moves right after."""
    from scapy.layers.inet import IP, UDP

    from ipshift.net.rawsock import RawSocket
    from ipshift.sacip import wire

    site.start(site.mover)
    site.start(site.peer)
    stream = Stream(site, 4)
    try:
        site.wait_ready(site.mover, 1)
        site.wait_ready(site.peer, 1)
        junk = [os.urandom(n % 300) for n in range(3000)]
        hellos = [wire.Hello(os.urandom(32), os.urandom(32), os.urandom(16), n + 1).encode()
                  for n in range(1000)]
        packets = [bytes(IP(src=f"198.51.100.{200 + n % 50}", dst=PEER4) /
                         UDP(sport=7366, dport=7366) / payload)
                   for n, payload in enumerate(junk + hellos)]

        def send_all() -> None:
            with RawSocket(socket.AF_INET) as raw:
                for packet in packets:
                    raw.send(packet)

        site.peer2.call(send_all)  # peer2 sits on the peer's segment
        # the daemon works through what it received: read its counters once they settle
        # (a busy machine takes longer than a fixed pause)
        counters: dict[str, int] = {}
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            time.sleep(0.5)
            now = site.status(site.peer)["counters"]
            if now == counters:
                break
            counters = now
        malformed = sum(v for k, v in counters.items() if k.startswith("malformed"))
        answered = counters.get("associations", 0)
        limited = counters.get("hellos_rate_limited", 0)
        hellos = limited + answered + counters.get("keys_refused", 0)
        assert malformed >= 2500, counters  # (a few random ones may parse as something)
        # what the socket kept of the 1,000 greetings: all but the burst are rate limited
        assert hellos >= 500 and limited >= hellos - 2 * (1 + 150), counters
        assert answered <= 1 + 150, counters  # the rate limit's burst, plus the real one
        move_make_before_break(site, 4, 0, same_subnet=False, promote=False)
        doc = site.wait_moved(site.mover, 1)
        assert doc["moved"] == 1
        assert stream.echoed_since(20)
    finally:
        stream.stop()
    stream.assert_whole()
