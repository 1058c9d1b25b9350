"""The peer table in a running gateway: one `ipshift tunnel run --peers FILE` with three UDP
peers, an IP-in-IP and a GRE peer, and an attacker on the same underlay segment.

    lan -- gw ==(192.0.2.0/24 bridge)== p1 -- h1, p2 -- h2, p3 -- h3 (keyed), x, far

The topology is `ipshift.lab.peer_site.PeerSite`. The tests show: traffic of all three peers
at once arrives whole, with correct checksums, and each peer's counters hold its own traffic;
peers and rewrite rules changed mid-stream lose nothing, and a rule that concerns a flow takes
effect in it; what an attacker sends is dropped and counted per reason (and with a key,
nothing unauthenticated passes, not even a replayed genuine datagram); IP-in-IP and GRE peers
played by scapy are served in both directions.
"""

from __future__ import annotations

import ipaddress
import json
import select
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from scapy.layers.inet import ICMP, IP, UDP
from scapy.layers.inet6 import ICMPv6EchoReply, ICMPv6EchoRequest, IPv6
from scapy.layers.l2 import GRE
from scapy.packet import Packet as ScapyPacket
from scapy.packet import Raw

from ipshift.lab import Lab, LabProcess, Node
from ipshift.lab.peer_site import (
    ATTACKER,
    FAR_OTHER,
    GATEWAY,
    LAN,
    LAN6,
    LAN_OTHER,
    PORT,
    RAW_PEERS,
    Branch,
    PeerSite,
    RawPeer,
    Tunnels,
)
from ipshift.net.packetsock import PacketSocket
from ipshift.net.rawsock import RawSocket
from ipshift.tunnel.config import Endpoint
from ipshift.tunnel.peerfile import peer_request
from ipshift.tunnel.peers import Peer
from tests.netns.conftest import need
from tests.netns.test_tunnel_forward import checksum_errors
from tests.unit.tunnel.test_support import assert_checksums_valid

pytestmark = pytest.mark.netns

IPERF_SECONDS = 3
TCP_RATE = {"p1": "40M", "p2": "20M", "p3": "10M"}  # different, so no peer's sum fits another
UDP_RATE = "4M"
UDP_LENGTH = 1200  # below the tunnel MTU: no UDP datagram is fragmented
LISTEN_PORT = 7000
WAIT_SECONDS = 10.0  # the longest any one wait of these tests takes
SETTLE_SECONDS = 0.3  # how long nothing more may arrive after what was expected
VERSION_1 = b"\x10\x00\x00\x00"  # tunnel header: version 1, no flags, complete checksum


# --- the site ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PeerSite]:
    need("iperf3", "ethtool", "nstat")
    with Lab("tunnel-peers") as lab:
        yield PeerSite(lab, tmp_path_factory.mktemp("peers"))


@pytest.fixture
def tunnels(site: PeerSite) -> Iterator[Tunnels]:
    """Every tunnel end, fresh for each test (no counters or table changes carried over),
    started once the tunnels' own link-up chatter has died down."""
    running = site.start()
    try:
        wait_quiet(site, running.gateway)
        yield running
    finally:
        statuses = {proc.name: proc.stop() for proc in running.all()}  # all, then judge
        assert set(statuses.values()) == {0}, (statuses, running.gateway.stderr()[-2000:])


QUIET_SECONDS = 2.0  # MLD repeats its unsolicited reports within a second (RFC 3810 9.11)
QUIET_WITHIN = 15.0


def wait_quiet(site: PeerSite, gateway: LabProcess) -> None:
    """Wait until the gateway's drop counters have not moved for QUIET_SECONDS (bounded). A
    TUN device coming up sends MLD reports from its link-local address into the tunnel, which
    the other end counts as packets to a destination it does not serve (or for no peer); they
    stop within seconds and must not blur what a test counts."""
    deadline = time.monotonic() + QUIET_WITHIN
    last, since = site.peers(gateway)["drops"], time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.5)
        drops = site.peers(gateway)["drops"]
        if drops != last:
            last, since = drops, time.monotonic()
        elif time.monotonic() - since >= QUIET_SECONDS:
            return
    raise AssertionError(f"the gateway still counts drops after {QUIET_WITHIN:g} s: {last}")


def delta(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    """What changed between two counter snapshots (the nonzero differences)."""
    return {key: after[key] - before.get(key, 0) for key in after
            if key != "table_generation" and after[key] != before.get(key, 0)}


def udp_socket(node: Node, address: str, port: int = 0) -> socket.socket:
    """A UDP socket bound in `node`'s namespace (it stays there)."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET

    def bound() -> socket.socket:
        sock = socket.socket(family, socket.SOCK_DGRAM)
        sock.bind((address, port))
        return sock

    return node.call(bound)


def received(sock: socket.socket, done: Callable[[list[tuple[bytes, str]]], bool]
             ) -> list[tuple[bytes, str]]:
    """What arrives at `sock` (payload, source address) until `done` says so, then within the
    settle time (so that anything extra is seen too); bounded by WAIT_SECONDS."""
    got: list[tuple[bytes, str]] = []
    deadline = time.monotonic() + WAIT_SECONDS
    settle_until: float | None = None
    sock.setblocking(False)
    while True:
        now = time.monotonic()
        if settle_until is None and done(got):
            settle_until = now + SETTLE_SECONDS
        limit = deadline if settle_until is None else min(deadline, settle_until)
        if now >= limit:
            return got
        ready, _, _ = select.select([sock], [], [], limit - now)
        if ready:
            data, sender = sock.recvfrom(65535)
            got.append((data, sender[0]))


def payloads(got: list[tuple[bytes, str]]) -> list[bytes]:
    return [data for data, _sender in got]


# --- iperf3 -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Flow:
    """One iperf3 test between a branch host and lan (the server): up (host to lan) or down
    (-R), TCP at a set rate or UDP."""

    branch: Branch
    port: int
    udp: bool = False
    down: bool = False
    v6: bool = False

    def argv(self) -> list[str]:
        dst = LAN6 if self.v6 else LAN
        argv = ["iperf3", "-c", dst, "-p", str(self.port), "-t", str(IPERF_SECONDS), "-J"]
        if self.udp:
            argv += ["-u", "-b", UDP_RATE, "-l", str(UDP_LENGTH)]
        else:
            argv += ["-b", TCP_RATE[self.branch.name]]
        return [*argv, "-R"] if self.down else argv


@dataclass
class Running:
    flow: Flow
    server: LabProcess
    client: LabProcess


def start_flows(site: PeerSite, flows: list[Flow]) -> list[Running]:
    """Start a one-off iperf3 server on lan for each flow, then all the clients at once."""
    servers = []
    try:
        for flow in flows:
            servers.append(site.lan.spawn(["iperf3", "-s", "-1", "-p", str(flow.port), "-J"],
                                          name=f"iperf3-server-{flow.port}"))
            # a one-off server is gone after a failed attempt: no client before it listens
            site.lan.wait_listening(flow.port)
        clients = [flow.branch.host.spawn(flow.argv(), name=f"iperf3-client-{flow.port}")
                   for flow in flows]
    except BaseException:
        for server in servers:
            server.stop()
        raise
    return [Running(*started) for started in zip(flows, servers, clients, strict=True)]


def finish_flows(running: list[Running]) -> dict[Flow, dict[str, Any]]:
    """Each flow's client report (iperf3 JSON); every client must have succeeded."""
    reports = {}
    try:
        for run in running:
            status = run.client.wait(timeout=IPERF_SECONDS + 30)
            assert status == 0, f"{run.flow}: {run.client.stdout()[-1500:]}"
            run.server.wait(timeout=20)
            reports[run.flow] = json.loads(run.client.stdout())
    finally:
        for run in running:
            run.client.stop()
            run.server.stop()
    return reports


def received_bytes(report: dict[str, Any]) -> int:
    """The bytes the receiving end of an iperf3 test got."""
    return int(report["end"]["sum_received"]["bytes"])


IN_FLIGHT = 5  # UDP datagrams still on their way when iperf3 stops counting


def assert_udp_complete(flow: Flow, report: dict[str, Any]) -> None:
    """No gap in the datagrams received, and none missing but the last few in flight."""
    sent, got = report["end"]["sum_sent"], report["end"]["sum_received"]
    assert got["lost_packets"] == 0, (flow, got)
    assert 0 < sent["packets"] - IN_FLIGHT <= got["packets"] <= sent["packets"], (flow, sent, got)


def retransmits(report: dict[str, Any]) -> int:
    return int(report["end"]["sum_sent"]["retransmits"])


# --- 1. three peers at once -------------------------------------------------------------------
def test_three_peers_exchange_tcp_and_udp_at_once(site: PeerSite, tunnels: Tunnels) -> None:
    p1, p2, p3 = site.branches
    flows = [
        Flow(p1, 5201), Flow(p1, 5202, udp=True),  # p1 sends
        Flow(p2, 5203, down=True), Flow(p2, 5204, udp=True, down=True),  # p2 receives
        Flow(p3, 5205, v6=True), Flow(p3, 5206, udp=True, down=True, v6=True),  # both (keyed)
    ]
    hosts = [site.lan, site.gw] + [n for b in site.branches for n in (b.router, b.host)]
    csum_before = {node.name: checksum_errors(node) for node in hosts}
    gw_before = site.counters(tunnels.gateway)
    drops_before = site.peers(tunnels.gateway)["drops"]

    reports = finish_flows(start_flows(site, flows))

    # Everything arrived: each TCP flow carried megabytes, no UDP datagram was lost, not one
    # checksum error anywhere (the routers complete checksums in software toward the hosts).
    for flow, report in reports.items():
        if flow.udp:
            assert_udp_complete(flow, report)
            assert received_bytes(report) > 1_000_000
        else:
            assert received_bytes(report) > 2_000_000
    assert {node.name: checksum_errors(node) for node in hosts} == csum_before
    gw = delta(site.counters(tunnels.gateway), gw_before)
    for problem in ("malformed", "write_errors", "send_errors", "hook_drops", "bad_tun_packets"):
        assert gw.get(problem, 0) == 0, gw
    assert site.peers(tunnels.gateway)["drops"] == drops_before  # nothing refused

    # Each peer's counters hold its own traffic. In bytes: at least what its host sent and
    # received, plus little overhead (TCP's acknowledgements, the tunnel's headers).
    per_peer = site.peer_counters(tunnels.gateway)
    for branch in site.branches:
        sent = sum(received_bytes(r) for f, r in reports.items()
                   if f.branch is branch and not f.down)
        got = sum(received_bytes(r) for f, r in reports.items()
                  if f.branch is branch and f.down)
        counters = per_peer[branch.name]
        assert sent <= counters["receive_bytes"] <= 1.1 * sent + 0.1 * got + 200_000, \
            (branch.name, sent, got, counters)
        assert got <= counters["tun_read_bytes"] <= 1.1 * got + 0.1 * sent + 200_000, \
            (branch.name, sent, got, counters)
        # Exactly, in datagrams: what the gateway counted as sent to this peer is what the
        # peer's own tunnel received (all of it from the gateway), and the other way round;
        # so no other peer's datagram is in its row (and the bridge lost none).
        far = site.counters(tunnels.branches[branch.name])
        assert counters["datagrams_out"] == far["datagrams_in"], (branch.name, counters, far)
        assert counters["datagrams_in"] == far["datagrams_out"], (branch.name, counters, far)
        assert far["foreign"] == 0 and counters["tun_writes"] > 0
        assert counters["auth_refused"] == 0
    for peer in RAW_PEERS:
        assert per_peer[peer.name]["datagrams_out"] == per_peer[peer.name]["datagrams_in"] == 0


# --- 2. changes mid-stream --------------------------------------------------------------------
PROBE_PORT = 7001
PROBE_INTERVAL = 0.02
PROBES_BEFORE = 25  # probes sent before the changes, and again after them
MAX_PROBES = 400  # bounds the probe sender whatever happens
ALIAS = "198.51.100.50"  # what the gateway's new rule makes lan's second address look like


def peer(name: str, endpoint: str, *prefixes: str) -> Peer:
    """A UDP peer as the control socket's "peer-set" takes it."""
    return Peer(name, Endpoint.parse(endpoint),
                prefixes=tuple(ipaddress.ip_network(p) for p in prefixes))


class Prober:
    """Numbered datagrams from lan's second address to a branch host, one every
    PROBE_INTERVAL, on a thread, until stopped (at most MAX_PROBES)."""

    def __init__(self, site: PeerSite, branch: Branch) -> None:
        self.receiver = udp_socket(branch.host, branch.address, PROBE_PORT)
        self.sender = udp_socket(site.lan, LAN_OTHER)
        self.target = (branch.address, PROBE_PORT)
        self.sent = 0
        self.stopping = threading.Event()
        self.reached: dict[int, threading.Event] = {}
        self.thread = threading.Thread(target=self._send, name="prober", daemon=True)

    def __enter__(self) -> Prober:
        self.thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
        self.receiver.close()
        self.sender.close()

    def _send(self) -> None:
        while self.sent < MAX_PROBES and not self.stopping.is_set():
            self.sender.sendto(str(self.sent).encode(), self.target)
            self.sent += 1
            for count, event in list(self.reached.items()):
                if self.sent >= count:
                    event.set()
            time.sleep(PROBE_INTERVAL)

    def wait_sent(self, more: int) -> None:
        """Wait until `more` further probes have gone out (bounded)."""
        event = self.reached.setdefault(self.sent + more, threading.Event())
        assert event.wait(WAIT_SECONDS), "the prober stalled"

    def stop(self) -> int:
        self.stopping.set()
        self.thread.join(WAIT_SECONDS)
        return self.sent


def test_peers_and_rewrites_change_mid_stream_without_loss(site: PeerSite,
                                                           tunnels: Tunnels) -> None:
    p1, p2 = site.branch("p1"), site.branch("p2")
    gateway = tunnels.gateway
    flows = [Flow(p1, 5211), Flow(p1, 5212, udp=True)]
    # The same flows without any change: what this machine's TCP retransmits anyway.
    baseline = finish_flows(start_flows(site, flows))
    before = site.peer_counters(gateway)["p1"]
    far_before = site.counters(tunnels.branches["p1"])
    generation = site.peers(gateway)["generation"]

    with Prober(site, p1) as prober:
        running = start_flows(site, flows)
        try:
            prober.wait_sent(PROBES_BEFORE)
            # A new peer, another peer's prefixes, the stream's own peer's prefixes (its
            # endpoint kept: it keeps its state), and the rewrite rules.
            answers = [
                site.call(gateway, "peer-set", **peer_request(
                    peer("p4", "192.0.2.14:4789", "203.0.113.64/28"), None)),
                site.call(gateway, "peer-set", **peer_request(
                    peer("p2", p2.endpoint, *p2.prefixes, "203.0.113.128/28"), None)),
                site.call(gateway, "peer-set", **peer_request(
                    peer("p1", p1.endpoint, *p1.prefixes, "203.0.113.80/28"), None)),
            ]
            # A rule for the probes (lan's second address becomes ALIAS on its way to the
            # peers), and two that concern nothing flowing.
            rules = {"src": [f"{LAN_OTHER}={ALIAS}"], "dst": ["203.0.113.200=203.0.113.201"],
                     "src_prefixes": ["2001:db8:99::/64=2001:db8:98::/64"]}
            rewrites = site.call(gateway, "rewrites", rules=rules)
            still_running = [run.client.running() for run in running]
            prober.wait_sent(PROBES_BEFORE)
        finally:
            reports = finish_flows(running)
        sent = prober.stop()
        probes = received(prober.receiver, lambda got: len(got) >= sent)

    # The changes were made while the streams ran, and are in force.
    assert all(still_running), "the streams ended before the changes: nothing was shown"
    assert [a["generation"] for a in answers] == [generation + 1, generation + 2,
                                                  generation + 3]
    assert [a["added"] for a in answers] == [True, False, False]
    assert rewrites["rules"]["src"] == rules["src"]
    table = {p["name"]: p for p in site.peers(gateway)["peers"]}
    assert table["p4"]["prefixes"] == ["203.0.113.64/28"]
    assert "203.0.113.128/28" in table["p2"]["prefixes"]
    assert "203.0.113.80/28" in table["p1"]["prefixes"]

    # Nothing of the streams was lost: TCP retransmitted no more than without changes, and
    # every UDP datagram and every probe arrived, in order.
    tcp, udp = (reports[flow] for flow in flows)
    assert retransmits(tcp) <= retransmits(baseline[flows[0]]), (retransmits(tcp),
                                                                 retransmits(baseline[flows[0]]))
    assert received_bytes(tcp) > 2_000_000
    assert_udp_complete(flows[1], udp)
    assert payloads(probes) == [str(i).encode() for i in range(sent)]
    # The rule that concerns the probes took effect between two of them: lan's second
    # address before, the alias after.
    sources = [source for _data, source in probes]
    assert ALIAS in sources, sources
    switched = sources.index(ALIAS)
    assert PROBES_BEFORE <= switched <= sent - PROBES_BEFORE, sources
    assert sources == [LAN_OTHER] * switched + [ALIAS] * (sent - switched)

    # Not one datagram between p1 and the gateway was lost or refused across the changes:
    # what one end sent, the other counted for p1 (the bridge loses nothing).
    after = site.peer_counters(gateway)["p1"]
    far = delta(site.counters(tunnels.branches["p1"]), far_before)
    assert after["datagrams_in"] - before["datagrams_in"] == far["datagrams_out"]
    assert after["datagrams_out"] - before["datagrams_out"] == far["datagrams_in"]
    for problem in ("foreign_source", "foreign_destination", "malformed", "hook_drops",
                    "send_errors"):
        assert after[problem] == before[problem], (problem, before, after)
    for problem in ("streams_incomplete", "malformed", "write_errors", "foreign_source"):
        assert problem not in far, far
    assert site.counters(gateway)["rewritten"] >= sent - switched


LOADED_PEERS = 3000  # far more than one control request could carry (64 KiB)


def test_a_peers_file_of_thousands_is_loaded_while_traffic_flows(site: PeerSite,
                                                                  tunnels: Tunnels) -> None:
    """`ipshift tunnel peers load FILE`: the daemon reads the file itself, so its size is not
    bounded by a control request; a peer that the file keeps as it was loses nothing."""
    gateway, p1 = tunnels.gateway, site.branch("p1")
    extra = "".join(f'[[peer]]\nname = "x{i}"\nendpoint = "192.0.2.200:{10000 + i}"\n'
                    f'addresses = ["2001:db8:77::{i:x}"]\n' for i in range(LOADED_PEERS))
    path = site.workdir / "thousands.toml"  # beside the key file the site's peers name
    path.write_text(site.peers_toml() + "\n" + extra)
    assert path.stat().st_size > 3 * 64 * 1024
    generation = site.peers(gateway)["generation"]
    with Prober(site, p1) as prober:
        prober.wait_sent(PROBES_BEFORE)
        answer = site.tunnel_command(gateway, "peers", "load", str(path))
        prober.wait_sent(PROBES_BEFORE)
        sent = prober.stop()
        probes = received(prober.receiver, lambda got: len(got) >= sent)
    assert answer["generation"] == generation + 1
    listed = site.peers(gateway)["peers"]
    assert len(listed) == LOADED_PEERS + len(site.branches) + len(RAW_PEERS)
    assert payloads(probes) == [str(i).encode() for i in range(sent)]


# --- 3. an attacker on the underlay -----------------------------------------------------------
STRANGER_PORT = PORT + 100  # a port of a peer's address that is not its endpoint


def to_gateway(source: str, source_port: int, body: bytes) -> bytes:
    """A whole IPv4 packet with a UDP datagram for the gateway's tunnel port, from any
    source: sent through a raw socket, it spoofs that source."""
    return bytes(IP(src=source, dst=GATEWAY) / UDP(sport=source_port, dport=PORT) / Raw(body))


def inner_udp(src: str, dst: str, text: bytes) -> bytes:
    """An inner IPv4 packet to the listeners' port, checksums complete."""
    return bytes(IP(src=src, dst=dst, ttl=16) / UDP(sport=40000, dport=LISTEN_PORT) / Raw(text))


def loss_report(complete: int, incomplete: int) -> bytes:
    """A 12-byte loss report: version 2 with flag 1, then the stream counts."""
    return b"\x21\x00\x00\x00" + complete.to_bytes(4, "big") + incomplete.to_bytes(4, "big")


def send_raw(node: Node, packets: list[bytes]) -> None:
    """Send whole IPv4 packets (headers as built, spoofed source included) from `node`."""
    with RawSocket(socket.AF_INET, netns=node.ns) as raw:
        for packet in packets:
            raw.send(packet)


def test_what_an_attacker_sends_is_dropped_and_counted(site: PeerSite, tunnels: Tunnels) -> None:
    p1 = site.branch("p1")
    gateway = tunnels.gateway
    lan_listener = udp_socket(site.lan, LAN, LISTEN_PORT)
    gw_listener = udp_socket(site.gw, GATEWAY, LISTEN_PORT)
    could_send = VERSION_1 + inner_udp(p1.address, LAN, b"as p1 could send it")
    attacks = {
        # (a) from an address that is no peer's, and from p1's address but another port
        "foreign": [to_gateway(ATTACKER, PORT, could_send)] * 3
        + [to_gateway(p1.underlay, STRANGER_PORT, could_send)],
        # (b) p1's address and port, an inner source outside p1's networks
        "foreign_source": [to_gateway(p1.underlay, PORT, VERSION_1 + inner_udp(
            "198.51.100.200", LAN, b"foreign source"))] * 4,
        # (c) p1's address and port, an inner destination the gateway does not serve: its
        # own underlay address
        "foreign_destination": [to_gateway(p1.underlay, PORT, VERSION_1 + inner_udp(
            p1.address, GATEWAY, b"to the gateway's underlay address"))] * 5,
        # (d) loss reports about far more streams than the gateway sent p1
        "reports_refused": [to_gateway(p1.underlay, PORT, loss_report(0, 1_000_000))] * 6,
    }
    # Last, on the same socket: what p1 could have sent, from p1's address and port. Without
    # a key the address is the credential, so it passes; once it is at lan, the gateway has
    # dealt with everything sent before it.
    sentinel = to_gateway(p1.underlay, PORT, could_send)
    counters_before = site.counters(gateway)
    p1_before = site.peer_counters(gateway)["p1"]
    drops_before = site.peers(gateway)["drops"]
    try:
        send_raw(site.attacker, [*(p for packets in attacks.values() for p in packets), sentinel])
        at_lan = received(lan_listener, lambda got: len(got) >= 1)
        at_gateway = received(gw_listener, lambda got: True)
    finally:
        lan_listener.close()
        gw_listener.close()

    assert payloads(at_lan) == [b"as p1 could send it"]  # the sentinel alone
    assert at_gateway == []
    counted = delta(site.counters(gateway), counters_before)
    expected = {reason: len(packets) for reason, packets in attacks.items()}
    assert {reason: counted.get(reason, 0) for reason in expected} == expected, counted
    assert counted["tun_writes"] == 1  # the sentinel: nothing else reached TUN
    for untouched in ("malformed", "loss_reports_received", "fallbacks", "auth_refused"):
        assert untouched not in counted, counted
    p1_counted = delta(site.peer_counters(gateway)["p1"], p1_before)
    assert p1_counted["tun_writes"] == 1
    for reason in ("foreign_source", "foreign_destination", "reports_refused"):
        assert p1_counted[reason] == expected[reason], p1_counted
    assert "fallbacks" not in p1_counted
    drops = delta(site.peers(gateway)["drops"], drops_before)
    assert drops == {"unknown_endpoint": 4, "foreign_source": 4, "foreign_destination": 5,
                     "reports_refused": 6}


def is_tunnel_datagram_from(packet: bytes, source: str) -> bool:
    """An IPv4 UDP packet from `source`'s tunnel port to the gateway's."""
    if len(packet) < 28 or packet[0] >> 4 != 4:
        return False
    parsed = IP(packet)
    return bool(UDP in parsed and parsed.src == source and parsed.dst == GATEWAY
                and parsed[UDP].sport == PORT and parsed[UDP].dport == PORT)


def test_with_a_key_nothing_unauthenticated_passes_and_replays_are_refused(
    site: PeerSite, tunnels: Tunnels
) -> None:
    p3 = site.branch("p3")
    assert p3.keyed
    gateway = tunnels.gateway
    listener = udp_socket(site.lan, LAN, LISTEN_PORT)
    sender = udp_socket(p3.host, p3.address)
    try:
        # A genuine datagram through p3's tunnel, captured on the gateway's underlay port.
        with PacketSocket(site.underlay_ifname, netns=site.gw.ns, direction="in") as sniffer:
            sender.sendto(b"genuine", (LAN, LISTEN_PORT))
            first = received(listener, lambda got: len(got) >= 1)
            captured = [s.data for s in sniffer.recv_batch()
                        if is_tunnel_datagram_from(s.data, p3.underlay)]
        assert payloads(first) == [b"genuine"]
        assert len(captured) == 1, captured
        genuine = bytes(IP(captured[0])[UDP].payload)
        assert genuine[0] >> 4 == 1  # a version 1 framing header in clear, the rest sealed
        assert b"genuine" not in genuine

        counters_before = site.counters(gateway)
        p3_before = site.peer_counters(gateway)["p3"]
        attacks = (
            # what p3 could send, but without authentication
            [to_gateway(p3.underlay, PORT, VERSION_1 + inner_udp(
                p3.address, LAN, b"unauthenticated"))] * 3
            + [to_gateway(p3.underlay, PORT, loss_report(0, 10))] * 2  # a plausible report
            # the genuine datagram again, as it was (sent anew: the captured UDP checksum
            # was left to offload and is not complete)
            + [to_gateway(p3.underlay, PORT, genuine)] * 2
        )
        send_raw(site.attacker, attacks)
        sender.sendto(b"genuine again", (LAN, LISTEN_PORT))  # after them on the wire
        later = received(listener, lambda got: len(got) >= 1)
    finally:
        listener.close()
        sender.close()

    assert payloads(later) == [b"genuine again"]  # nothing of the attacks, no replay
    counted = delta(site.counters(gateway), counters_before)
    assert counted["auth_refused"] == len(attacks), counted
    assert counted["tun_writes"] == 1
    for untouched in ("foreign", "foreign_source", "foreign_destination", "malformed",
                      "loss_reports_received", "reports_refused", "fallbacks"):
        assert untouched not in counted, counted
    p3_counted = delta(site.peer_counters(gateway)["p3"], p3_before)
    assert p3_counted["auth_refused"] == len(attacks) and p3_counted["tun_writes"] == 1


# --- 4. IP-in-IP and GRE peers ----------------------------------------------------------------
GRE_WRONG_KEY = 8


def raw_protocol(raw_peer: RawPeer, version: int) -> int:
    if raw_peer.encapsulation == "gre":
        return 47
    return 4 if version == 4 else 41


def encapsulated(raw_peer: RawPeer, inner: ScapyPacket, *, source: str | None = None,
                 gre_key: int | None = None) -> bytes:
    """`inner` as the raw peer sends it (from its underlay address unless `source`)."""
    version = inner.version
    outer = IP(src=source or raw_peer.underlay, dst=GATEWAY,
               proto=raw_protocol(raw_peer, version))
    if raw_peer.encapsulation == "ipip":
        return bytes(outer / inner)
    key = raw_peer.gre_key if gre_key is None else gre_key
    gre = GRE(proto=0x0800 if version == 4 else 0x86DD, key_present=1, key=key)
    return bytes(outer / gre / inner)


def from_gateway(receiver: RawSocket, raw_peer: RawPeer, wanted: Callable[[ScapyPacket], bool]
                 ) -> ScapyPacket:
    """The first packet `far` gets from the gateway for this raw peer whose inner packet
    `wanted` keeps; its outer header and GRE header checked, its inner packet returned (its
    checksums checked by scapy). Bounded by WAIT_SECONDS."""
    deadline = time.monotonic() + WAIT_SECONDS
    while time.monotonic() < deadline:
        select.select([receiver.fileno()], [], [], deadline - time.monotonic())
        arrived = receiver.recv()
        if arrived is None:
            continue
        outer = IP(arrived[0])
        if outer.src != GATEWAY or outer.dst != raw_peer.underlay:
            continue
        payload = bytes(outer.payload)
        if raw_peer.encapsulation == "gre":
            gre = GRE(payload)
            assert (gre.key_present, gre.key) == (1, raw_peer.gre_key)
            assert (gre.chksum_present, gre.seqnum_present, gre.version) == (0, 0, 0)
            inner_bytes = bytes(gre.payload)
            assert gre.proto == (0x0800 if inner_bytes[0] >> 4 == 4 else 0x86DD)
        else:
            inner_bytes = payload
            assert outer.proto == (4 if inner_bytes[0] >> 4 == 4 else 41)
        inner = assert_checksums_valid(inner_bytes)
        if wanted(inner):
            return inner
    raise AssertionError(f"{raw_peer.name}: nothing wanted arrived at far")


def echo_reply(request: ScapyPacket) -> ScapyPacket:
    if request.version == 4:
        echo = request[ICMP]
        return (IP(src=request.dst, dst=request.src) / ICMP(type=0, id=echo.id, seq=echo.seq)
                / Raw(bytes(echo.payload)))
    echo6 = request[ICMPv6EchoRequest]
    return IPv6(src=request.dst, dst=request.src) / ICMPv6EchoReply(
        id=echo6.id, seq=echo6.seq, data=echo6.data)


@pytest.mark.parametrize("raw_peer", RAW_PEERS, ids=lambda peer: peer.encapsulation)
def test_ip_in_ip_and_gre_peers_played_by_scapy(site: PeerSite, tunnels: Tunnels,
                                               raw_peer: RawPeer) -> None:
    gateway = tunnels.gateway
    for version in (4, 6):
        address, lan = ((raw_peer.address, LAN) if version == 4
                        else (raw_peer.address6, LAN6))
        counters_before = site.counters(gateway)
        peer_before = site.peer_counters(gateway)[raw_peer.name]
        with RawSocket(socket.AF_INET, raw_protocol(raw_peer, version),
                       netns=site.far.ns) as receiver:
            # Out: a ping from lan reaches far encapsulated; far answers it the same way,
            # and ping completes the round trip.
            ping = site.lan.spawn(["ping", f"-{version}", "-c", "1", "-W", "5", address],
                                  name=f"ping-{raw_peer.encapsulation}{version}")
            try:
                request = from_gateway(receiver, raw_peer, lambda inner: bool(
                    ICMP in inner or ICMPv6EchoRequest in inner))
                assert (request.src, request.dst) == (lan, address)
                send_raw(site.far, [encapsulated(raw_peer, echo_reply(request))])
                assert ping.wait(timeout=WAIT_SECONDS) == 0, ping.stdout()
            finally:
                ping.stop()
            # Out: a UDP datagram that left lan with a partial checksum arrives complete.
            with udp_socket(site.lan, lan) as udp:
                udp.sendto(b"to the raw peer", (address, 9))
            datagram = from_gateway(receiver, raw_peer, lambda inner: UDP in inner)
            assert (datagram.src, datagram.dst) == (lan, address)
            assert bytes(datagram[UDP].payload) == b"to the raw peer"

        # In: what the peer sends from its address reaches lan; the same from an address
        # that is no peer's (or, over GRE, with another key or none) does not.
        inner = (IP(src=address, dst=lan) if version == 4 else IPv6(src=address, dst=lan)) \
            / UDP(sport=40000, dport=LISTEN_PORT)
        strangers = [encapsulated(raw_peer, inner / Raw(b"from a stranger"), source=FAR_OTHER)]
        if raw_peer.encapsulation == "gre":
            strangers.append(encapsulated(raw_peer, inner / Raw(b"another key"),
                                          gre_key=GRE_WRONG_KEY))
            keyless = bytes(IP(src=raw_peer.underlay, dst=GATEWAY, proto=47)
                            / GRE(proto=0x0800 if version == 4 else 0x86DD)
                            / inner / Raw(b"no key"))
            strangers.append(keyless)
        with udp_socket(site.lan, lan, LISTEN_PORT) as listener:
            send_raw(site.far, [*strangers, encapsulated(raw_peer, inner / Raw(b"from the peer"))])
            got = received(listener, lambda got: len(got) >= 1)
        assert got == [(b"from the peer", address)]

        counted = delta(site.counters(gateway), counters_before)
        assert counted["foreign"] == len(strangers), counted
        peer_counted = delta(site.peer_counters(gateway)[raw_peer.name], peer_before)
        # out: the echo request and the UDP datagram; in: the reply and the datagram
        assert (peer_counted["datagrams_out"], peer_counted["datagrams_in"],
                peer_counted["tun_writes"]) == (2, 2, 2), peer_counted
        for problem in ("send_errors", "foreign_source", "foreign_destination", "malformed"):
            assert problem not in peer_counted, peer_counted
    raw = site.tunnel_command(gateway, "status", "--dev", "x")["raw"]
    assert raw["send_errors"] == 0 and raw["receive_errors"] == 0 and not raw["malformed"], raw
