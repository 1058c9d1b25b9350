"""sacip: sessions across address moves, beside plain TCP and MPTCP in the same run.

The lab is ipshift.lab.sacip_site (mover - router - peer). A probe sends a 16-byte message
every 1 ms (TCP_NODELAY) to an echo server on the peer and timestamps each echo. A move
cycles the mover between two wired subnets; the router forgets the old one at once, so a
session lives on only if something moves it:

- plain TCP: nothing does (resumed or not within 3 s);
- MPTCP (IPPROTO_MPTCP sockets at both ends, the in-kernel path manager, the new address
  added as a `subflow` endpoint and the old one's endpoint removed with the address);
- sacip (the daemons at both ends, plain TCP sockets).

Stall: make-before-break, the longest gap between echoes around the move; break-before-make,
from the new address appearing to the first echo after it. p50/p95 over the moves. Also: the
time from the address going to the move confirmed (sacip's own record), the throughput of a
remapped iperf3 stream against the same stream before its move, and 10,000 sessions moved.
"""

from __future__ import annotations

import itertools
import json
import resource
import socket
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from bench.harness import Context, Row, benchmark
from ipshift.lab import Lab
from ipshift.lab.sacip_site import PEER4, WIRED, SacipSite, bare, build_site

IPPROTO_MPTCP = 262
PROBE_PORT = 7100
INTERVAL = 0.001
SETTLE = 1.5  # seconds watched after each move
GAP = 0.3  # break-before-make: seconds without an address
DEAD = 3.0  # a session silent this long after the move is dead
TARGET_MBB_MS, TARGET_BBM_MS = 10.0, 50.0
MANY = 10_000


class Probe:
    """Messages every INTERVAL mover -> peer, echoed; `echoes` are receive times."""

    def __init__(self, site: SacipSite, mptcp: bool, port: int) -> None:
        proto = IPPROTO_MPTCP if mptcp else 0

        def listen() -> socket.socket:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM, proto)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((PEER4, port))
            s.listen(1)
            return s

        def connect() -> socket.socket:
            c = socket.socket(socket.AF_INET, socket.SOCK_STREAM, proto)
            c.settimeout(5)
            c.connect((PEER4, port))
            c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return c

        self.listener = site.peer.call(listen)
        self.client = site.mover.call(connect)
        self.server, _ = self.listener.accept()
        self.server.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.echoes: list[float] = []
        self.stopping = threading.Event()
        self.threads = [threading.Thread(target=f, daemon=True)
                        for f in (self._echo, self._send, self._receive)]
        for t in self.threads:
            t.start()

    def _echo(self) -> None:
        try:
            while data := self.server.recv(65536):
                self.server.sendall(data)
        except OSError:
            pass

    def _send(self) -> None:
        deadline = time.monotonic() + 900  # bounded whatever happens
        try:
            while not self.stopping.is_set() and time.monotonic() < deadline:
                self.client.send(b"m" * 16)
                time.sleep(INTERVAL)
        except OSError:
            pass

    def _receive(self) -> None:
        self.client.settimeout(0.2)
        while not self.stopping.is_set():
            try:
                if not self.client.recv(65536):
                    return
            except TimeoutError:
                continue
            except OSError:
                return
            self.echoes.append(time.monotonic())

    def stall_after(self, start: float, *, from_start: bool) -> float | None:
        """Seconds of the stall a move at `start` caused (None: never resumed)."""
        after = [t for t in self.echoes if t > start]
        if not after or after[-1] < start + SETTLE - 0.3:
            return None
        if from_start:
            return after[0] - start
        around = [t for t in self.echoes if start - 0.05 <= t <= start + SETTLE]
        return max((b - a for a, b in itertools.pairwise(around)), default=0.0)

    def close(self) -> None:
        self.stopping.set()
        for s in (self.client, self.server, self.listener):
            s.close()
        for t in self.threads:
            t.join(2)


def _router_gateway(site: SacipSite, cidr: str, present: bool) -> None:
    have = f"inet {cidr} " in site.router.ip("-4", "-o", "addr", "show", "dev", "rw")
    if present and not have:
        site.router.ip("addr", "add", cidr, "dev", "rw")
    elif not present and have:
        site.router.ip("addr", "del", cidr, "dev", "rw")


def _move(site: SacipSite, frm: int, to: int, procedure: str,
          mptcp: Callable[[str, str], None] | None = None) -> float:
    """Move the mover's wired address from subnet `frm` to `to`; the time the stall counts
    from (the move for make-before-break, the new address for break-before-make)."""
    old, old_gw = WIRED[4][frm]
    new, new_gw = WIRED[4][to]
    _router_gateway(site, new_gw, True)
    if procedure == "mbb":
        start = time.monotonic()
        site.mover.ip_batch([f"addr add {new} dev mw",
                             f"route replace default via {bare(new_gw)}",
                             f"addr del {old} dev mw"])
        if mptcp:
            mptcp(bare(old), bare(new))
        _router_gateway(site, old_gw, False)
        return start
    site.mover.ip_batch([f"addr del {old} dev mw"])
    if mptcp:
        mptcp(bare(old), "")
    _router_gateway(site, old_gw, False)
    time.sleep(GAP)
    start = time.monotonic()
    site.mover.ip_batch([f"addr add {new} dev mw", f"route replace default via {bare(new_gw)}"])
    if mptcp:
        mptcp("", bare(new))
    return start


def _mptcp_endpoints(site: SacipSite) -> Callable[[str, str], None]:
    """MPTCP's in-kernel path manager: the mover's address as a subflow endpoint."""
    for node in (site.mover, site.peer):
        node.run(["ip", "mptcp", "limits", "set", "subflow", "4", "add_addr_accepted", "4"])
        node.sysctl("net.mptcp.enabled", 1)
    site.mover.run(["ip", "mptcp", "endpoint", "flush"])
    site.mover.run(["ip", "mptcp", "endpoint", "add", bare(WIRED[4][0][0]), "dev", "mw",
                    "subflow"])

    def change(old: str, new: str) -> None:
        if new:
            site.mover.run(["ip", "mptcp", "endpoint", "add", new, "dev", "mw", "subflow"])
        if old:
            for line in site.mover.run(["ip", "mptcp", "endpoint", "show"]).stdout.splitlines():
                words = line.split()
                if words and words[0] == old and "id" in words:
                    site.mover.run(["ip", "mptcp", "endpoint", "delete", "id",
                                    words[words.index("id") + 1]])

    return change


def _stalls(site: SacipSite, probe: Probe, procedure: str, moves: int,
            mptcp: Callable[[str, str], None] | None = None) -> tuple[list[float], int]:
    """Stalls (seconds) of `moves` moves back and forth, and how many never resumed."""
    stalls, dead = [], 0
    position = 0
    for _ in range(moves):
        to = 1 - position
        start = _move(site, position, to, procedure, mptcp)
        position = to
        time.sleep(SETTLE)
        stall = probe.stall_after(start, from_start=procedure == "bbm")
        if stall is None:
            dead += 1
            break  # a dead session stays dead
        stalls.append(stall)
    return stalls, dead


def _reset_position(site: SacipSite) -> None:
    """Back to the first wired subnet with its gateway, the other one gone."""
    mover = site.mover.ip("-4", "-o", "addr", "show", "dev", "mw")
    for index, (cidr, gw) in enumerate(WIRED[4][:2]):
        if index == 0:
            _router_gateway(site, gw, True)
            if f"inet {cidr} " not in mover:
                site.mover.ip("addr", "add", cidr, "dev", "mw")
        elif f"inet {cidr} " in mover:
            site.mover.ip("addr", "del", cidr, "dev", "mw")
    site.mover.ip("route", "replace", "default", "via", bare(WIRED[4][0][1]))


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _throughput(site: SacipSite, seconds: int) -> tuple[float, float]:
    """Gbit/s of one iperf3 stream before its move (unremapped) and after it (remapped)."""
    server = site.peer.spawn(["iperf3", "-s", "-1", "-B", PEER4, "-p", "5299", "-J"],
                             name="iperf3-server")
    site.peer.wait_listening(5299)
    client = site.mover.spawn(["iperf3", "-c", PEER4, "-p", "5299", "-t", str(2 * seconds + 2),
                               "-J"], name="iperf3-client")
    try:
        time.sleep(seconds + 1)
        _move(site, 0, 1, "mbb")
        client.wait(timeout=4 * seconds + 30)
        report = json.loads(client.stdout())
    finally:
        client.stop()
        server.stop()
    rates = [i["sum"]["bits_per_second"] / 1e9 for i in report["intervals"]]
    return statistics.median(rates[:seconds]), statistics.median(rates[-seconds:])


CONNECTOR = """
import resource, socket, sys, time
count = int(sys.argv[2])
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, count + 1024), hard))
held = [socket.create_connection((sys.argv[1], 7200), timeout=10) for _ in range(count)]
print("connected", len(held), flush=True)
time.sleep(float(sys.argv[3]))
"""


def _many(site: SacipSite, count: int) -> tuple[float, int]:
    """Seconds from the address change to `count` sessions confirmed moved, and how many.
    The clients are a child process in the mover's namespace, the servers this process:
    each holds one descriptor per session."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, count + 1024), hard))

    def listen() -> socket.socket:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((PEER4, 7200))
        s.listen(4096)
        return s

    listener = site.peer.call(listen)
    servers: list[socket.socket] = []
    connector = site.mover.spawn([sys.executable, "-c", CONNECTOR, PEER4, str(count), "300"],
                                 name="connector")
    try:
        listener.settimeout(30)
        while len(servers) < count:
            servers.append(listener.accept()[0])
        connector.wait_for_output("connected", 60)
        site.wait_ready(site.mover, count, timeout=120)
        site.wait_ready(site.peer, count, timeout=120)
        before = site.status(site.mover)["moved"]
        _move(site, 0, 1, "mbb")
        deadline = time.monotonic() + 60
        doc = site.status(site.mover)
        while doc["moved"] - before < count and time.monotonic() < deadline:
            time.sleep(0.2)
            doc = site.status(site.mover)
        return (doc["move_ms"][0] / 1000 if doc["move_ms"] else float("nan"),
                doc["moved"] - before)
    finally:
        connector.stop()
        for s in [*servers, listener]:
            s.close()


@benchmark("sacip", "session stall at an address move: plain TCP, MPTCP, sacip",
           needs_root=True)
def run(ctx: Context) -> list[Row]:
    moves = 4 if ctx.quick else 20
    rows: list[Row] = []
    figures: dict[str, dict[str, tuple[list[float], int]]] = {}
    with tempfile.TemporaryDirectory() as tmp, Lab("bench-sacip") as lab:
        site = build_site(lab, Path(tmp))
        # plain TCP: no daemon, nothing moves the session
        for procedure in ("mbb", "bbm"):
            probe = Probe(site, mptcp=False, port=PROBE_PORT)
            time.sleep(0.3)
            figures.setdefault("plain TCP", {})[procedure] = _stalls(site, probe, procedure, 1)
            probe.close()
            _reset_position(site)
        # MPTCP
        change = _mptcp_endpoints(site)
        for n, procedure in enumerate(("mbb", "bbm")):
            probe = Probe(site, mptcp=True, port=PROBE_PORT + 1 + n)
            time.sleep(0.5)
            figures.setdefault("MPTCP", {})[procedure] = _stalls(site, probe, procedure, moves,
                                                                 change)
            probe.close()
            _reset_position(site)
            change = _mptcp_endpoints(site)
        site.mover.run(["ip", "mptcp", "endpoint", "flush"])
        # sacip
        site.start(site.mover)
        site.start(site.peer)
        move_ms: list[float] = []
        for n, procedure in enumerate(("mbb", "bbm")):
            probe = Probe(site, mptcp=False, port=PROBE_PORT + 3 + n)
            site.wait_ready(site.mover, 1)
            site.wait_ready(site.peer, 1)
            figures.setdefault("sacip", {})[procedure] = _stalls(site, probe, procedure, moves)
            move_ms += site.status(site.mover)["move_ms"]
            probe.close()
            _reset_position(site)
        plain_rate, remapped_rate = _throughput(site, 2 if ctx.quick else 4)
        _reset_position(site)
    many = MANY // 10 if ctx.quick else MANY
    with tempfile.TemporaryDirectory() as tmp, Lab("bench-sacip-many") as lab:
        # a fresh site, and the daemons' default look at the sessions once a second (the
        # lab's 0.2 s would spend the machine re-reading 10,000 sockets five times a second)
        site = build_site(lab, Path(tmp))
        for node in (site.mover, site.peer):
            site.start(node, "--scan-interval", "1")
        many_seconds, many_moved = _many(site, many)

    for procedure, name, target in (("mbb", "make-before-break", TARGET_MBB_MS),
                                    ("bbm", "break-before-make", TARGET_BBM_MS)):
        stalls, dead = figures["sacip"][procedure]
        mp_stalls, mp_dead = figures["MPTCP"][procedure]
        plain_stalls, plain_dead = figures["plain TCP"][procedure]
        p95 = 1000 * _pct(stalls, 0.95)
        rows.append(Row(
            f"stall at a {name} move, p95 ({len(stalls)} moves)", "ms", p95,
            {"MPTCP": 1000 * _pct(mp_stalls, 0.95)}, "lower", f"<= {target:g} ms, 0 lost",
            p95 <= target and dead == 0,
            f"p50 {1000 * _pct(stalls, 0.5):.1f} ms, lost {dead}; MPTCP p50 "
            f"{1000 * _pct(mp_stalls, 0.5):.1f} ms, lost {mp_dead} of {len(mp_stalls) + mp_dead};"
            f" plain TCP resumed {len(plain_stalls)} of {len(plain_stalls) + plain_dead}"))
    rows.append(Row("new address usable -> move confirmed (sacip), p95", "ms",
                    _pct(move_ms, 0.95),
                    {}, "lower", "", None,
                    f"p50 {_pct(move_ms, 0.5):.1f} ms over {len(move_ms)} moves"))
    ratio = remapped_rate / plain_rate if plain_rate else float("nan")
    rows.append(Row("iperf3 TCP throughput after the move (remapped)", "Gbit/s", remapped_rate,
                    {"same stream before its move": plain_rate}, "higher", ">= 0.95x",
                    ratio >= 0.95, f"{ratio:.2f}x"))
    rows.append(Row(f"{many:,} sessions moved: address change -> all confirmed", "s",
                    many_seconds, {}, "lower", "<= 1 s", many_seconds <= 1.0 and
                    many_moved == many, f"{many_moved} of {many} moved"))
    return rows
