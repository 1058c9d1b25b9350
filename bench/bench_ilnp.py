"""ilnp: the ILNP node (`ipshift ilnp node`) on the lab's seed topology, baselines in the same run.

The lab is ipshift.lab.ilnp_site (mn, cn, router r, locators L1-L3); programs reach a
correspondent at its application address APP:<NID> through the TUN device ilnp0. A move is
`site.move(soft=0.2)`: mn's I-LV added on its other link, the old one deprecated, deleted
0.2 s later (a soft handoff); moves come every 0.75 s.

On the direct site (cn on L1 and L2, no router on the way):
- TCP: one iperf3 stream (5 s) mn -> cn's application address against the kernel path between
  the same namespaces (iperf3 to cn's I-LV over the same veth + bridge); once more started
  right after a move, while every packet carries the nonce (`nonce_hold`, 2 s: one packet per
  datagram), with half-second intervals to tell the window from the rest.
- A light sequence (10 moves): numbered datagrams, 1,000/s, ILNP both ways (mn's acks need
  cn's nonce, which a one-way flow never brings) and plain IPv6 cn -> mn's first I-LV;
  LU -> ack latency from mn's status (`lu_latency_ms`); the plots.
- Loss at 10,000 packets/s: iperf3 -u (200-byte datagrams, 16 Mbit/s) mn -> cn's application
  address across 20 moves, loss from iperf3's receiver (lost_packets, packets; its
  half-second intervals split the first second, before any move, from the rest); the reverse
  direction (cn -> mn) over its own 20 moves (both at once overload the two daemons on a
  2-vCPU machine: each carries 20,000 packets/s and drops without any move); baseline: the
  same iperf3 stream cn -> mn's I-LV over plain IPv6 (lost while mn is on the other link),
  per move.
On the routed site (cn on L3 behind r): the light sequence again (loss, LU -> ack latency)
and, in full runs, 6 moves at 10,000 packets/s.

Plots (bench/results/ in full runs; /tmp/bench-ilnp-quick/ in quick runs): ilnp_sequence.png,
sequence number against arrival time of each numbered stream, moves as vertical lines;
ilnp_locators.png, packets/s sent from each of mn's locators (status polled every 100 ms)
in the light sequence and under iperf3 at 10,000/s.

MTU: ilnp0's MTU must be 1436 at most under a 1500-byte underlay (IPv6 40 + UDP 8 + framing
4 + the nonce's 12 bytes of headroom), or full-sized packets are refused (EMSGSIZE). The bench
checks it: a larger MTU is measured in a TCP row of its own and the rest runs with
`mtu = 1436` in the nodes' configuration.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import socket
import statistics
import struct
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench.harness import RESULTS_DIR, Context, Row, benchmark
from ipshift.ilnp.engine import NodeConfig
from ipshift.lab import Lab
from ipshift.lab.ilnp_site import NIDS, IlnpSite, app_address, build_site, ilv
from ipshift.lab.topology import LabError, LabProcess, Node

MTU = 1436  # 1500 - IPv6 40 - UDP 8 - framing 4 - nonce headroom 12 (see the docstring)
SOFT = 0.2  # s both locators held at a move (soft handoff)
MOVE_EVERY = 0.75  # s between moves
RATE = ("-l", "200", "-b", "16M")  # 10,000 datagrams/s
PPS = 10_000
NUMBERED_INTERVAL = 0.001  # the plotted numbered stream: 1,000 datagrams/s
POLL = 0.1  # s between status polls for the per-locator plot
TARGET_SHARE = 0.30  # TCP through ilnp0 >= 30 % of the veth path
TARGET_LU_MS = 2.0
NONCE_WINDOW = NodeConfig(nid=1).nonce_hold  # the engine's default


# --- iperf3 ----------------------------------------------------------------------------------
def _iperf_server(node: Node, bind: str | None, port: int, interval: str = "1") -> LabProcess:
    argv = ["iperf3", "-s", "-1", "-p", str(port), "-i", interval, "-J"]
    if bind:
        argv += ["-B", bind]
    proc = node.spawn(argv, name=f"iperf3-s-{port}")
    node.wait_listening(port)
    return proc


def _report(proc: LabProcess, timeout: float) -> dict[str, Any]:
    try:
        proc.wait(timeout)
    finally:
        proc.stop()
    try:
        doc: dict[str, Any] = json.loads(proc.stdout())
    except json.JSONDecodeError:
        return {"error": f"no JSON: {proc.stderr()[-300:]}"}
    return doc


def _tcp(client: Node, server: Node, address: str, port: int, seconds: int,
         interval: float = 1.0) -> dict[str, Any]:
    """One iperf3 TCP stream: Gbit/s received, retransmits, per-interval Gbit/s."""
    srv = _iperf_server(server, address, port)
    try:
        cli = client.spawn(["iperf3", "-c", address, "-p", str(port), "-t", str(seconds),
                            "-i", str(interval), "-J"], name=f"iperf3-c-{port}")
        doc = _report(cli, seconds + 30)
    finally:
        srv.stop()
    end = doc.get("end", {})
    return {"gbps": end.get("sum_received", {}).get("bits_per_second", 0.0) / 1e9,
            "retransmits": end.get("sum_sent", {}).get("retransmits"),
            "intervals": [i["sum"]["bits_per_second"] / 1e9 for i in doc.get("intervals", [])],
            "error": doc.get("error")}


class UdpStream:
    """iperf3 -u at PPS from `client` to `address`, for `seconds`; loss as the receiver saw it."""

    def __init__(self, client: Node, server: Node, address: str, port: int,
                 seconds: float) -> None:
        self.seconds = seconds
        self.server = _iperf_server(server, None, port, "0.5")
        self.client = client.spawn(["iperf3", "-u", "-c", address, "-p", str(port), *RATE,
                                    "-t", f"{seconds:g}", "-J"], name=f"iperf3-u-{port}")

    def result(self) -> dict[str, Any]:
        doc = _report(self.client, self.seconds + 30)
        server = _report(self.server, 10)
        got = server.get("end", {}).get("sum_received") or doc.get("end", {}).get(
            "sum_received", {})
        sent = doc.get("end", {}).get("sum_sent", {})
        # the receiver's half-second intervals: (end s, lost, packets)
        intervals = [(i["sum"]["end"], i["sum"].get("lost_packets", 0),
                      i["sum"].get("packets", 0)) for i in server.get("intervals", [])]
        return {"lost": int(got.get("lost_packets", -1)), "packets": int(got.get("packets", 0)),
                "sent": int(sent.get("packets", 0)), "intervals": intervals,
                "error": doc.get("error") or server.get("error")}


# --- a numbered stream (for the sequence plot) ------------------------------------------------
class Numbered:
    """Datagrams numbered 0, 1, ... every NUMBERED_INTERVAL from `src` to (address, port),
    received by a socket in `dst` bound to that address: (arrival time, number) recorded."""

    FMT = struct.Struct("!I")

    def __init__(self, src: Node, dst: Node, address: str, port: int, limit: float) -> None:
        def receiver() -> socket.socket:
            s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
            s.bind((address, port))
            s.settimeout(0.2)
            return s

        self.rx = dst.call(receiver)
        self.tx = src.call(lambda: socket.socket(socket.AF_INET6, socket.SOCK_DGRAM))
        self.target = (address, port)
        self.limit = limit  # s: every loop here ends by then whatever happens
        self.arrivals: list[tuple[float, int]] = []
        self.sent = 0
        self.send_errors = 0
        self.stopping = threading.Event()
        self.threads = [threading.Thread(target=f, daemon=True) for f in (self._rx, self._tx)]
        for t in self.threads:
            t.start()

    def _tx(self) -> None:
        start = time.monotonic()
        deadline, at = start + self.limit, start
        padding = bytes(60)
        while not self.stopping.is_set() and time.monotonic() < deadline:
            try:
                self.tx.sendto(self.FMT.pack(self.sent) + padding, self.target)
            except OSError:
                self.send_errors += 1
            self.sent += 1
            at += NUMBERED_INTERVAL
            delay = at - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            elif delay < -0.05:
                at = time.monotonic()  # fell behind (a stall): no burst to catch up

    def _rx(self) -> None:
        deadline = time.monotonic() + self.limit + 2
        while time.monotonic() < deadline:
            try:
                data = self.rx.recv(2048)
            except TimeoutError:
                if self.stopping.is_set():
                    return
                continue
            except OSError:
                return
            if len(data) >= 4:
                self.arrivals.append((time.monotonic(), self.FMT.unpack_from(data)[0]))

    def stop(self) -> None:
        self.stopping.set()
        time.sleep(0.3)  # the last datagrams in flight
        for t in self.threads:
            t.join(3)
        self.tx.close()
        self.rx.close()

    def loss(self) -> tuple[int, int]:
        """(lost, sent): numbers never seen."""
        return self.sent - len({seq for _t, seq in self.arrivals}), self.sent


class LocatorPoller:
    """mn's packets_out per locator from its status, every POLL seconds."""

    def __init__(self, site: IlnpSite, limit: float) -> None:
        self.site = site
        self.limit = limit
        self.samples: list[tuple[float, dict[str, int]]] = []
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        deadline = time.monotonic() + self.limit
        while not self.stopping.is_set() and time.monotonic() < deadline:
            now = time.monotonic()
            with contextlib.suppress(LabError, OSError, KeyError):
                doc = self.site.status(self.site.mn)
                self.samples.append((now, {loc["l64"]: int(loc["packets_out"])
                                           for loc in doc["node"]["locators"]}))
            self.stopping.wait(max(0.0, POLL - (time.monotonic() - now)))

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join(3)


# --- moves -----------------------------------------------------------------------------------
def _moves(site: IlnpSite, count: int) -> list[tuple[float, float]]:
    """`count` soft handoffs of mn, one every MOVE_EVERY s: (new I-LV added, old deleted)."""
    times = []
    for _ in range(count):
        start = time.monotonic()
        site.move(site.mn, soft=SOFT)
        times.append((start, time.monotonic()))
        time.sleep(max(0.0, MOVE_EVERY - (time.monotonic() - start)))
    return times


def _counter(doc: dict[str, Any], *path: str) -> int:
    value: Any = doc
    for key in path:
        value = value.get(key, {}) if isinstance(value, dict) else {}
    return int(value) if isinstance(value, int) else 0


def _configure(site: IlnpSite, mtu: int | None) -> None:
    for node in site.nodes.values():
        if mtu is None:
            site.write_config(node)
        else:
            site.write_config(node, mtu=mtu)


@contextlib.contextmanager
def _site(name: str, *, direct: bool, mtu: int | None) -> Iterator[IlnpSite]:
    with tempfile.TemporaryDirectory() as tmp, Lab(name) as lab:
        site = build_site(lab, Path(tmp), direct=direct)
        _configure(site, mtu)
        site.start_all()
        yield site


def _restart(site: IlnpSite, mtu: int | None) -> None:
    """mn and cn again with another configuration (r keeps running)."""
    for node in (site.mn, site.cn):
        site.stop(node)
        if mtu is None:
            site.write_config(node)
        else:
            site.write_config(node, mtu=mtu)
    site.start(site.cn)
    site.start(site.mn)
    site.wait_discovered()


def _sequence(site: IlnpSite, moves: int, *, stream: str | None = "fwd",
              numbered: bool = False, poll: bool = False, port: int = 5210) -> dict[str, Any]:
    """`moves` soft handoffs of mn under an iperf3 UDP stream at PPS (`stream`: "fwd" mn ->
    cn's application address, "rev" cn -> mn's, "plain" cn -> mn's present I-LV over plain
    IPv6, None: none). `numbered`: the 1,000/s numbered streams (ILNP both ways, plain IPv6
    cn -> mn's I-LV) beside (both ways: a node that never hears from its correspondent has
    no nonce of it and drops its acks as lu_bad_nonce); `poll`: mn's per-locator counters
    every POLL s."""
    seconds = 1.5 + moves * MOVE_EVERY + 1.0  # the last move ends >= 1 s before the stream
    mn_ilv = ilv(site.at, NIDS["mn"])
    udp = None
    if stream == "plain":
        udp = UdpStream(site.cn, site.mn, mn_ilv, port, seconds)
    elif stream == "rev":
        udp = UdpStream(site.cn, site.mn, app_address("mn"), port, seconds)
    elif stream == "fwd":
        udp = UdpStream(site.mn, site.cn, app_address("cn"), port, seconds)
    before = {n.name: site.status(n) for n in (site.mn, site.cn)}
    streams: dict[str, Numbered] = {}
    poller = None
    start = time.monotonic()
    try:
        if numbered:
            streams["ILNP mn -> cn"] = Numbered(site.mn, site.cn, app_address("cn"), 7301,
                                               seconds + 5)
            streams["ILNP cn -> mn"] = Numbered(site.cn, site.mn, app_address("mn"), 7303,
                                               seconds + 5)
            streams["plain IPv6 cn -> mn's I-LV"] = Numbered(site.cn, site.mn, mn_ilv, 7302,
                                                             seconds + 5)
        if poll:
            poller = LocatorPoller(site, seconds + 5)
        time.sleep(1.5)
        move_times = _moves(site, moves)
        if udp is not None:
            result = udp.result()
        else:
            time.sleep(1.0)
            result = {"lost": 0, "packets": 0, "sent": 0, "error": None}
    finally:
        for numbered_stream in streams.values():
            numbered_stream.stop()
        if poller is not None:
            poller.stop()
    after = {n.name: site.status(n) for n in (site.mn, site.cn)}

    def delta(name: str, key: str) -> dict[str, int]:
        new, old = after[name]["counters"][key], before[name]["counters"][key]
        return {k: v - old.get(k, 0) for k, v in new.items()
                if isinstance(v, int) and v != old.get(k, 0)}

    result.update(
        moves=move_times, start=start, numbered=streams, poller=poller, status=after,
        send_errors={name: _counter(after[name], "tunnel", "counters", "send_errors")
                     - _counter(before[name], "tunnel", "counters", "send_errors")
                     for name in after},
        drops={name: delta(name, "drops") for name in after},
        datapath={name: delta(name, "datapath") for name in after})
    return result


def _lu(doc: dict[str, Any]) -> dict[str, Any]:
    lat = doc.get("lu_latency_ms") or {}
    counters = doc.get("counters", {})
    rtts = [c.get("rtt_ms") for c in doc.get("correspondents", [])]
    return {"median": float(lat.get("median", float("nan"))),
            "max": float(lat.get("max", float("nan"))), "count": int(lat.get("count", 0)),
            "sent": counters.get("lu_sent", 0), "acked": counters.get("lu_acked", 0),
            "retransmitted": counters.get("lu_retransmitted", 0),
            "failed": counters.get("lu_failed", 0), "drops": counters.get("drops", {}),
            "rtt_ms": rtts}


# --- plots -----------------------------------------------------------------------------------
def _mark_moves(ax: Any, seq: dict[str, Any]) -> None:
    start = seq["start"]
    for n, (added, deleted) in enumerate(seq["moves"]):
        ax.axvline(added - start, color="grey", linestyle=":", linewidth=0.8,
                   label="new locator added" if n == 0 else None)
        ax.axvline(deleted - start, color="red", linestyle="--", linewidth=0.8,
                   label="old locator deleted" if n == 0 else None)


def _plots(light: dict[str, Any], loaded: dict[str, Any], directory: Path) -> list[str]:
    """ilnp_sequence.png from the numbered streams of `light`; ilnp_locators.png: mn's
    packets/s per locator in `light` (the numbered stream alone) and `loaded` (iperf3)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    start = light["start"]
    streams = [(label, st) for label, st in light["numbered"].items() if st.sent]
    if streams:
        fig, axes = plt.subplots(len(streams), 1, figsize=(10, 2.6 * len(streams)),
                                 sharex=True, squeeze=False)
        for ax, (label, stream) in zip(axes[:, 0], streams, strict=True):
            lost, sent = stream.loss()
            ax.plot([t - start for t, _ in stream.arrivals], [n for _, n in stream.arrivals],
                    ".", markersize=1.5, label=f"{label}: {lost} of {sent} lost")
            _mark_moves(ax, light)
            ax.set_ylabel("sequence no.")
            ax.legend(loc="upper left", fontsize=8)
        axes[0, 0].set_title(
            f"ipshift ilnp: numbered streams (1,000/s each) across {len(light['moves'])} soft "
            "handoffs of mn (arrival time, sequence number)", fontsize=9)
        axes[-1, 0].set_xlabel("seconds")
        fig.tight_layout()
        path = directory / "ilnp_sequence.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(str(path))

    panels = [(seq, title) for seq, title in (
        (light, "the numbered stream alone (1,000/s)"),
        (loaded, "iperf3 -u, 200-byte datagrams at 10,000/s"))
        if seq.get("poller") is not None and len(seq["poller"].samples) > 1]
    if panels:
        fig, axes = plt.subplots(len(panels), 1, figsize=(10, 3.6 * len(panels)),
                                 squeeze=False)
        for ax, (seq, title) in zip(axes[:, 0], panels, strict=True):
            samples = seq["poller"].samples
            locators = sorted({loc for _t, sample in samples for loc in sample})
            for loc in locators:
                xs, ys = [], []
                for (t0, s0), (t1, s1) in itertools.pairwise(samples):
                    xs.append(t1 - seq["start"])
                    diff = s1[loc] - s0[loc] if loc in s1 and loc in s0 else 0
                    ys.append(max(0, diff) / (t1 - t0))
                ax.plot(xs, ys, linewidth=1.2, label=f"from {loc}")
            _mark_moves(ax, seq)
            ax.set_xlabel("seconds")
            ax.set_ylabel("packets/s")
            ax.set_title(f"ipshift ilnp: mn's packets out per locator (status every 100 ms): "
                         f"{title}", fontsize=9)
            ax.legend(loc="upper right", fontsize=7)
        fig.tight_layout()
        path = directory / "ilnp_locators.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(str(path))
    return paths


def _reorders(stream: Numbered) -> int:
    last, count = -1, 0
    for _t, seq in stream.arrivals:
        if seq < last:
            count += 1
        last = max(last, seq)
    return count


def _longest_gap_ms(stream: Numbered) -> float:
    times = [t for t, _ in stream.arrivals]
    return 1000 * max((b - a for a, b in itertools.pairwise(times)), default=0.0)


# --- the benchmark ---------------------------------------------------------------------------
@benchmark("ilnp", "ILNP node: TCP through ilnp0 vs veth, datagram loss across soft handoffs "
           "(vs plain IPv6), LU -> ack latency direct/routed, sequence and locator plots",
           needs_root=True)
def run(ctx: Context) -> list[Row]:
    quick = ctx.quick
    load_start = os.getloadavg()[0]
    tcp_s = 2 if quick else 5
    moves = 4 if quick else 20
    light_moves = 3 if quick else 10
    rev_moves = 2 if quick else 20
    plain_moves = 2 if quick else 6
    routed_loaded_moves = 0 if quick else 6
    f: dict[str, Any] = {}
    with _site("bench-ilnp", direct=True, mtu=None) as site:
        # the node as it ships (its own MTU)
        f["default_mtu"] = site.status(site.mn)["tunnel"]["tunnel"]["mtu"]
        if f["default_mtu"] > MTU:  # too large for the underlay: measured, then worked around
            before = _counter(site.status(site.mn), "tunnel", "counters", "send_errors")
            f["tcp_default"] = _tcp(site.mn, site.cn, app_address("cn"), 5201, 2)
            f["tcp_default"]["send_errors"] = _counter(
                site.status(site.mn), "tunnel", "counters", "send_errors") - before
            _restart(site, MTU)
        f["mtu"] = site.status(site.mn)["tunnel"]["tunnel"]["mtu"]
        # LU -> ack under a light load (the numbered stream), for the plots too
        f["light"] = _sequence(site, light_moves, stream=None, numbered=True, poll=True)
        f["lu_direct"] = _lu(f["light"]["status"]["mn"])
        f["tcp"] = _tcp(site.mn, site.cn, app_address("cn"), 5202, tcp_s)
        f["veth"] = _tcp(site.mn, site.cn, ilv(site.at, NIDS["cn"]), 5203, tcp_s)
        # right after a move: the first NONCE_WINDOW s carry the nonce
        before_move = site.status(site.mn)
        site.move(site.mn, soft=SOFT)
        f["tcp_moved"] = _tcp(site.mn, site.cn, app_address("cn"), 5204, tcp_s, interval=0.5)
        after_move = site.status(site.mn)
        f["tcp_moved"]["nonce_added"] = _counter(
            after_move, "counters", "datapath", "nonce_added") - _counter(
            before_move, "counters", "datapath", "nonce_added")
        f["tcp_moved"]["tunnel"] = {
            key: _counter(after_move, "tunnel", "counters", key)
            - _counter(before_move, "tunnel", "counters", key)
            for key in ("super_packets_out", "datagrams_out", "resized", "hook_drops",
                        "send_errors", "bad_tun_packets")}
        # loss across handoffs at 10,000/s: forward, reverse, plain IPv6
        f["fwd"] = _sequence(site, moves, stream="fwd", poll=True, port=5210)
        f["lu_loaded"] = _lu(f["fwd"]["status"]["mn"])  # cumulative: light + TCP + this
        f["rev"] = _sequence(site, rev_moves, stream="rev", port=5211)
        f["plain"] = _sequence(site, plain_moves, stream="plain", port=5212)
    with _site("bench-ilnp-routed", direct=False, mtu=None) as site:
        if site.status(site.mn)["tunnel"]["tunnel"]["mtu"] > MTU:
            _restart(site, MTU)
        f["routed_light"] = _sequence(site, light_moves, stream=None, numbered=True)
        f["lu_routed"] = _lu(f["routed_light"]["status"]["mn"])
        if routed_loaded_moves:
            f["routed"] = _sequence(site, routed_loaded_moves, stream="fwd", port=5213)
    # quick runs draw too (the code is exercised) but leave the results' plots alone
    plot_dir = RESULTS_DIR if not quick else Path(tempfile.gettempdir()) / "bench-ilnp-quick"
    f["plots"] = _plots(f["light"], f["fwd"], plot_dir)
    f["load"] = (load_start, os.getloadavg()[0])
    return _rows(f, moves)


def _describe(seq: dict[str, Any]) -> str:
    pct = 100 * seq["lost"] / seq["packets"] if seq["packets"] else float("nan")
    text = f"{seq['lost']:,} of {seq['packets']:,} ({pct:.3f} %) over {len(seq['moves'])} moves"
    errors = {k: v for k, v in seq.get("send_errors", {}).items() if v}
    if errors:
        text += f", tunnel send errors {errors}"
    drops = {k: v for k, v in seq.get("drops", {}).items() if v}
    if drops:
        text += f", engine drops {drops}"
    if seq.get("error"):
        text += f", iperf3 error {seq['error']}"
    intervals = seq.get("intervals") or []
    first = [i for i in intervals if i[0] <= 1.01]  # before the first move (at 1.5 s)
    if first and len(intervals) > len(first) and seq["lost"] >= 0:
        # an interval's count goes negative (and wraps) when a datagram arrives late into
        # the next one: the rest is the total less the first second
        lost_first = sum(i[1] if i[1] < 1 << 63 else i[1] - (1 << 64) for i in first)
        got_first = sum(i[2] for i in first)
        text += (f"; in the first second (no move, no nonce) {lost_first:,} of {got_first:,} "
                 f"lost, after it {seq['lost'] - lost_first:,} of "
                 f"{seq['packets'] - got_first:,}")
    return text


def _per_move(seq: dict[str, Any] | None) -> float:
    if not seq:
        return float("nan")
    count = len(seq.get("moves", []))
    return seq["lost"] / count if count and seq["lost"] >= 0 else float("nan")


def _numbered_text(seq: dict[str, Any]) -> str:
    parts = []
    for label, stream in seq["numbered"].items():
        lost, sent = stream.loss()
        parts.append(f"{label} {lost} of {sent} lost, {_reorders(stream)} reordered, longest "
                     f"gap {_longest_gap_ms(stream):.1f} ms")
    return "; ".join(parts)


def _lu_text(lu: dict[str, Any]) -> str:
    return (f"median {lu['median']:.2f} max {lu['max']:.1f} ms, {lu['count']} acked of "
            f"{lu['sent']} sent ({lu['retransmitted']} retransmitted, {lu['failed']} failed), "
            f"drops {lu['drops'] or '{}'}, rtt_ms {lu['rtt_ms']}")


def _rows(f: dict[str, Any], moves: int) -> list[Row]:
    rows: list[Row] = []
    veth = f["veth"]["gbps"]
    tcp = f["tcp"]["gbps"]
    share = tcp / veth if veth else float("nan")
    rows.append(Row(
        "iperf3 TCP mn -> cn application address (direct)", "Gbit/s", tcp,
        {"kernel veth": veth}, "higher", f">= {TARGET_SHARE:.0%} of veth",
        share >= TARGET_SHARE,
        f"{share:.0%} of veth; ilnp0 MTU {f['mtu']}"
        f"{' (set: the default is too large)' if 'tcp_default' in f else ' (its own)'}"
        f"; retransmits {f['tcp']['retransmits']}"
        f" (veth {f['veth']['retransmits']})"
        + (f"; error {f['tcp']['error']}" if f["tcp"]["error"] else "")))
    moved = f["tcp_moved"]
    window = [g for n, g in enumerate(moved["intervals"]) if (n + 1) * 0.5 <= NONCE_WINDOW]
    rest = moved["intervals"][len(window):]
    rows.append(Row(
        "iperf3 TCP started right after a move", "Gbit/s", moved["gbps"],
        {"kernel veth": veth, "same path, no move": tcp}, "higher",
        "", None,  # the cost of RFC 6744's nonce window, shown beside the target above
        f"first {NONCE_WINDOW:g} s (nonce in every packet, one per datagram) "
        f"{statistics.mean(window) if window else float('nan'):.2f} Gbit/s, after "
        f"{statistics.mean(rest) if rest else float('nan'):.2f}; {moved['nonce_added']:,} "
        f"packets carried the nonce; retransmits {moved['retransmits']}; mn's tunnel "
        f"{moved['tunnel']}"))
    dflt = f.get("tcp_default")
    if dflt is not None:
        rows.append(Row(
            f"iperf3 TCP at the node's default ilnp0 MTU ({f['default_mtu']})", "Gbit/s",
            dflt["gbps"], {"kernel veth": veth}, "higher", f">= {TARGET_SHARE:.0%} of veth",
            dflt["gbps"] >= TARGET_SHARE * veth if veth else None,
            f"2 s; {dflt['send_errors']} tunnel send errors on mn (EMSGSIZE: full-sized "
            f"packets + framing + IPv6/UDP exceed the 1500-byte underlay); retransmits "
            f"{dflt['retransmits']}"))
    fwd, rev, plain = f["fwd"], f["rev"], f["plain"]
    rows.append(Row(
        f"datagrams lost per soft handoff, mn -> cn ({moves} moves, 10k pps)", "packets",
        _per_move(fwd), {"plain IPv6 to mn's I-LV": _per_move(plain)}, "lower", "0 lost",
        fwd["lost"] == 0,
        f"ILNP {_describe(fwd)} (status polled every 100 ms beside); plain IPv6 iperf3 "
        f"cn -> mn's I-LV {_describe(plain)}"))
    rows.append(Row(
        f"datagrams lost per soft handoff, cn -> mn ({len(rev['moves'])} moves, 10k pps)",
        "packets", _per_move(rev), {"plain IPv6 to mn's I-LV": _per_move(plain)}, "lower",
        "0 lost", rev["lost"] == 0,
        f"{_describe(rev)}; a sequence of its own (both directions at once overload the "
        f"daemons on 2 vCPUs)"))
    light, routed_light = f["light"], f["routed_light"]

    def ilnp_lost(seq: dict[str, Any]) -> tuple[int, int]:
        pairs = [stream.loss() for label, stream in seq["numbered"].items()
                 if label.startswith("ILNP")]
        return sum(p[0] for p in pairs), sum(p[1] for p in pairs)

    lost, sent = ilnp_lost(light)
    r_lost, r_sent = ilnp_lost(routed_light)
    plain_stream = light["numbered"]["plain IPv6 cn -> mn's I-LV"]
    rows.append(Row(
        f"numbered streams 1,000/s both ways across {len(light['moves'])} soft handoffs, lost",
        "packets", float(lost),
        {"plain IPv6 cn -> mn's I-LV": float(plain_stream.loss()[0]),
         "ILNP routed through r": float(r_lost)}, "lower", "0 lost", lost == 0,
        f"{lost} of {sent} direct, {r_lost} of {r_sent} routed; direct: "
        f"{_numbered_text(light)}; routed: {_numbered_text(routed_light)}"
        + (f"; routed engine drops {routed_light['drops']}"
           if any(routed_light["drops"].values()) else "")))
    if "routed" in f:
        rows.append(Row(
            f"datagrams lost per soft handoff, mn -> cn routed through r "
            f"({len(f['routed']['moves'])} moves, 10k pps)", "packets", _per_move(f["routed"]),
            {"direct": _per_move(fwd)}, "lower", "0 lost", f["routed"]["lost"] == 0,
            _describe(f["routed"])))
    d, r, loaded = f["lu_direct"], f["lu_routed"], f["lu_loaded"]
    rows.append(Row(
        "LU -> ack latency, median (direct, 1,000/s stream)", "ms", d["median"],
        {"routed through r": r["median"]}, "lower", f"<= {TARGET_LU_MS:g} ms",
        d["median"] <= TARGET_LU_MS,
        f"direct {_lu_text(d)}; routed {_lu_text(r)}; direct after the 10k pps sequences too "
        f"(cumulative) {_lu_text(loaded)}"))
    rows.append(Row("plots", "files", len(f["plots"]), notes=", ".join(
        Path(p).name for p in f["plots"])))
    rows.append(Row("machine load: 1-min load average at the end", "", f["load"][1],
                    notes=f"{f['load'][0]:.2f} at the start, {os.cpu_count()} CPUs (other "
                    "work on the machine shows here: the 10k pps figures are CPU-bound)"))
    return rows
