"""The seed overlay in namespaces: the reference peer (tests/ilnp_seed_peer.py, written from the
seed's description) against itself, and against `SeedNode` (ilnp/compat.py) driven by a small
asyncio adapter written here.

The seed's topology on one switch: a mobile node (mn), a correspondent (cn) on locator L3 and
a router (r) joined to L1, L2 and L3. mn moves between L1 and L2 on a short schedule (a move
every 2 s, 1 s of soft handoff) while it sends a numbered stream at 100 datagrams/s to cn
through r; nothing may be lost, and every move's Locator Update to cn must be acked.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from ipshift.ilnp.compat import Deliver, Join, Leave, Log, Multicast, SeedConfig, SeedNode
from ipshift.ilnp.seedwire import (
    SeedWireError,
    format_locator,
    group_for,
    locator_of_group,
    parse_locator,
)
from ipshift.lab import LabProcess, Node
from ipshift.net import udp

pytestmark = pytest.mark.netns

PEER = str(Path(__file__).resolve().parents[1] / "ilnp_seed_peer.py")
PORT = 10000
IFNAME = "to-sw"
L1, L2, L3 = "2001:db8:0:1", "2001:db8:0:2", "2001:db8:0:3"
SCHEDULE = f"{L2};{L1};{L1},{L2};{L2};{L1}"
COUNT = 1400  # 14 s at 100/s: a move every 2 s, at least five after discovery
MOVES = 5  # at least this many moves while the stream runs


@pytest.fixture
def site(lab: Any) -> dict[str, Node]:
    """mn, cn and r on one bridge (documentation addresses beside the link-local ones)."""
    sw = lab.switch("sw")
    nodes = {}
    for i, name in enumerate(("mn", "cn", "r"), start=1):
        node = lab.host(name)
        lab.link(node, sw, None, None, v6=(f"2001:db8:ff::{i}/64", None))
        nodes[name] = node
    return nodes


def peer(node: Node, hostname: str, nid: str, locators: str, *extra: str) -> LabProcess:
    proc = node.spawn([sys.executable, PEER, "--interface", IFNAME, "--hostname", hostname,
                       "--nid", nid, "--locators", locators, "--wait", "2", *extra],
                      name=f"seed-{hostname}")
    proc.wait_ready('"event": "ready"', 10, f"the reference peer {hostname}")
    return proc


def events(proc: LabProcess, event: str | None = None) -> list[dict[str, Any]]:
    out = []
    for line in proc.stdout().splitlines():
        if line.startswith("{"):
            doc = json.loads(line)
            if event is None or doc["event"] == event:
                out.append(doc)
    return out


def wait_until(what: str, check: Any, timeout: float, *procs: LabProcess) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        for proc in procs:
            if not proc.running():
                pytest.fail(f"{proc.name} exited {proc.poll()} while waiting for {what}: "
                            f"{proc.stderr()[-2000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"no {what} within {timeout} s")
        time.sleep(0.1)


def mover(node: Node) -> LabProcess:
    return peer(node, "mn", "1111", L1, "--move-schedule", SCHEDULE, "--move-time", "2",
                "--handoff-time", "1", "--send-to", "cn:7000", "--rate", "100", "--count",
                str(COUNT))


def check_mover(mn: LabProcess) -> None:
    """Discovery, then at least MOVES moves during the stream, each acked by cn within the
    2 s before the next move, and no update given up."""
    found = {e["host"] for e in events(mn, "discovered")}
    assert {"cn", "r"} <= found
    (done,) = events(mn, "stream_done")
    seen_cn = next(e["t"] for e in events(mn, "discovered") if e["host"] == "cn")
    moves = [e for e in events(mn, "moved") if seen_cn < e["t"] < done["t"]]
    assert len(moves) >= MOVES, events(mn, "moved")
    acks = [e for e in events(mn, "lu_acked") if e["host"] == "cn"]
    for move in moves:
        assert any(move["t"] <= a["t"] < move["t"] + 2 for a in acks), (move, acks)
    assert [e for e in events(mn, "lu_failed") if e["t"] < done["t"]] == []


def test_reference_peers_move_without_loss(site: dict[str, Node]) -> None:
    peer(site["r"], "r", "3333", f"{L1},{L2},{L3}", "--router")
    cn = peer(site["cn"], "cn", "2222", L3, "--listen", "7000")
    mn = mover(site["mn"])
    wait_until("end of the stream", lambda: events(mn, "stream_done"), 40, mn)
    wait_until("the last datagrams", lambda: len(events(cn, "received")) >= COUNT, 5, cn)
    time.sleep(0.3)  # anything doubled would be in by now
    seqs = Counter(e["seq"] for e in events(cn, "received"))
    assert set(seqs) == set(range(COUNT)), f"lost {sorted(set(range(COUNT)) - set(seqs))[:20]}"
    assert max(seqs.values()) == 1
    assert {e["host"] for e in events(cn, "discovered")} >= {"mn", "r"}
    assert len([e for e in events(cn, "lu_received") if e["host"] == "mn"]) >= MOVES
    check_mover(mn)


# --- SeedNode in an asyncio adapter ------------------------------------------------------------
class SeedAdapter:
    """The smallest adapter of `SeedNode`: one UDP socket on port 10000 joined to the groups
    of its locators on one interface, IPV6_RECVPKTINFO for the arrival locator."""

    def __init__(self, node: Node, engine: SeedNode) -> None:
        self.engine = engine
        self.uid = os.getuid()
        self.sock = udp.open_multicast(PORT, [], IFNAME, node.ns, family=socket.AF_INET6)
        self.sock.setblocking(False)
        addrs = node.ip_json("-6", "addr", "show", "dev", IFNAME)[0]["addr_info"]
        engine.own_addresses = {a["local"] for a in addrs}
        self.delivered: list[Deliver] = []
        self.logs: list[Log] = []
        self.not_ours = 0
        self._timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def run_until(self, done: Any, timeout: float) -> None:
        self._loop = loop = asyncio.get_running_loop()
        loop.add_reader(self.sock, self._readable)
        try:
            self.engine.start(loop.time())
            self._apply()
            deadline = loop.time() + timeout
            while not done():
                if loop.time() > deadline:
                    pytest.fail(f"not done within {timeout} s: {self.engine.status()}")
                await asyncio.sleep(0.1)
        finally:
            loop.remove_reader(self.sock)
            if self._timer is not None:
                self._timer.cancel()
            self.sock.close()

    def _now(self) -> float:
        assert self._loop is not None
        return self._loop.time()

    def _readable(self) -> None:
        for got in udp.recv_batch_with_destination(self.sock):
            try:
                arrival = locator_of_group(got.destination)
            except SeedWireError:
                self.not_ours += 1
                continue
            self.engine.datagram(got.data, arrival, str(got.source[0]), self._now())
        self._apply()

    def _on_timer(self) -> None:
        self._timer = None
        self.engine.timer(self._now())
        self._apply()

    def _apply(self) -> None:
        for action in self.engine.actions():
            if isinstance(action, Multicast):
                self.sock.sendto(action.data, (group_for(action.locator, self.uid), PORT))
            elif isinstance(action, Join):
                udp.join_group(self.sock, group_for(action.locator, self.uid), IFNAME)
            elif isinstance(action, Leave):
                udp.leave_group(self.sock, group_for(action.locator, self.uid), IFNAME)
            elif isinstance(action, Deliver):
                self.delivered.append(action)
            else:
                self.logs.append(action)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        deadline = self.engine.next_deadline()
        if deadline is not None and self._loop is not None:
            self._timer = self._loop.call_at(deadline, self._on_timer)


def test_seednode_as_the_correspondent(site: dict[str, Node]) -> None:
    peer(site["r"], "r", "3333", f"{L1},{L2},{L3}", "--router")
    mn = mover(site["mn"])
    engine = SeedNode(SeedConfig(nid=0x2222, hostname="cn", locators=(parse_locator(L3),),
                                 wait=2.0, ports=frozenset({7000})))
    adapter = SeedAdapter(site["cn"], engine)

    def done() -> bool:
        if not mn.running():
            pytest.fail(f"the mover exited {mn.poll()}: {mn.stderr()[-2000:]}")
        return bool(events(mn, "stream_done")) and len(adapter.delivered) >= COUNT

    asyncio.run(adapter.run_until(done, 45))
    seqs = Counter(int(d.payload.split()[1]) for d in adapter.delivered)
    assert set(seqs) == set(range(COUNT)), f"lost {sorted(set(range(COUNT)) - set(seqs))[:20]}"
    assert max(seqs.values()) == 1
    assert {(d.from_hostname, d.port) for d in adapter.delivered} == {("mn", 7000)}
    found = engine.neighbour_by_hostname("mn")
    assert found is not None and found.nid == 0x1111
    assert engine.counters["lu_received"] >= MOVES
    assert engine.counters["lu_acks_sent"] == engine.counters["lu_received"]
    assert not [k for k in engine.drops if k.startswith("malformed")], engine.drops
    assert adapter.not_ours == 0
    check_mover(mn)
    assert format_locator(found.primary or 0) in (L1, L2)


# --- the application interface -----------------------------------------------------------------
CLIENT = r"""
import socket, sys
local, host, remote, path, proxy_path, first = sys.argv[1:7]
unix = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
unix.bind(path)
unix.settimeout(5)
unix.sendto(f"{local} {host} {remote}".encode(), proxy_path)
proxy = int(unix.recv(64))
sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
sock.bind(("::1", int(local)))
sock.settimeout(0.2)
print("registered", proxy, flush=True)
for _ in range(100):
    if first == "1":
        sock.sendto(b"ping", ("::1", proxy))
    try:
        data, src = sock.recvfrom(2048)
    except socket.timeout:
        continue
    print("got", data.decode(), flush=True)
    if first == "0":
        sock.sendto(b"pong:" + data, ("::1", proxy))
    break
"""


def test_udp_proxy_carries_an_application_both_ways(site: dict[str, Node],
                                                    tmp_path: Path) -> None:
    peer(site["r"], "r", "3333", f"{L1},{L2},{L3}", "--router")
    for name, nid, loc in (("mn", "1111", L1), ("cn", "2222", L3)):
        peer(site[name], name, nid, loc, "--udp-proxy", "9000", "--unix",
             str(tmp_path / f"{name}.proxy"))
    answer = site["cn"].spawn([sys.executable, "-c", CLIENT, "5002", "mn", "5001",
                               str(tmp_path / "b.sock"), str(tmp_path / "cn.proxy"), "0"],
                              name="client-b")
    assert answer.wait_for_output("registered 9000", 10), answer.stderr()
    res = site["mn"].run([sys.executable, "-c", CLIENT, "5001", "cn", "5002",
                          str(tmp_path / "a.sock"), str(tmp_path / "mn.proxy"), "1"], timeout=40)
    assert "got pong:ping" in res.stdout, res.stdout + res.stderr
    assert answer.wait(10) == 0
    assert "got ping" in answer.stdout()
