"""tunnel_peers: the tunnel with its peer table, in one run beside the veth path and beside the
single-peer tunnel as it was before the table (commit 098708a).

Two namespaces joined by one veth (MTU 1500), as in the `tunnel` benchmark. Each round runs
iperf3 TCP, one stream, over the veth, then through each tunnel variant, then over the veth
again (variants in a rotated order, the old and new single-peer tunnels always side by side);
a variant's share of veth is taken against the mean of its round's two veth runs and the
median of the per-round shares is reported, because a shared 2-vCPU machine moves by tens of
percent from one minute to the next. Variants:

- before: `ipshift tunnel run --remote` of commit 098708a, run from a temporary git worktree
  (removed afterwards); the new single-peer figure is given as a ratio to it (target >= 0.9x);
- one peer: `ipshift tunnel run --remote` of this tree;
- 64 peers: both ends with a table of 64 (the real far end and 63 with other endpoints,
  prefixes, addresses and port ranges), so every packet is looked up;
- rewrite: both ends rewriting the address of one end (`--rewrite-src` at one end,
  `--rewrite-dst` at the other: the RSIP / ILNP case), every packet rewritten both ways;
- option hook: a hook inserting an 8-byte IPv6 destination-options header outbound and taking
  it out inbound (bench/tunnel_hook_runner.py), over IPv6 inside the tunnel, headroom 8;
- authenticated: one keyed peer at each end (AES-256-GCM on every datagram);
- IP-in-IP and GRE: both ends with a raw-socket peer of that encapsulation for each other.

Then, while iperf3 runs (4 streams), `peer-set` requests changing an unrelated peer are timed
from request to answer (the daemon answers once every queue has the new table), with 1 and 2
queues; and the daemon's resident memory with 10,000 peers (loaded while it runs) minus with
1 peer, with one stream through that table beside the veth path.

The table ends run bench/tunnel_hook_runner.py (the tunnel daemon of `ipshift tunnel run`
given a JSON spec) until `ipshift tunnel run --peers FILE` exists.
"""

from __future__ import annotations

import contextlib
import importlib.util
import ipaddress
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from scapy.layers.inet import IP, TCP

from bench.bench_peers import _per_call_us
from bench.bench_tunnel import TUNNEL, cpu_seconds, iperf_tcp, runs_text
from bench.harness import Context, Row, benchmark
from ipshift.ctl.client import CtlClient
from ipshift.ctl.protocol import CtlError
from ipshift.lab import Lab, LabProcess, Node
from ipshift.tunnel.auth import format_key_file, generate_key
from ipshift.tunnel.config import Endpoint
from ipshift.tunnel.peers import Encapsulation, Peer, PeerTable, PortRange

ROOT = Path(__file__).resolve().parents[1]
REFERENCE_COMMIT = "098708a"  # the single-peer tunnel before the peer table
RUNNER = [sys.executable, "-m", "bench.tunnel_hook_runner"]
DEV = "tunb"
PORT = 4789
ONE_PEER_TARGET = 0.9  # of the single-peer tunnel before the table, in the same run
SHARE_TARGET = 0.35  # of veth: one stream with 64 peers, rewrites, a resizing hook
AUTH_TARGET = 0.25  # of veth, with every datagram authenticated
START_TIMEOUT = 30.0  # seconds a tunnel end may take to come up (10,000 peers included)
NOT_MEASURED_RAW = "not measured: raw link missing"


@dataclass(frozen=True)
class End:
    """One side of the lab: its namespace, underlay address and tunnel addresses."""

    node: Node
    underlay: str
    inner: str
    inner6: str

    @property
    def endpoint(self) -> str:
        return f"{self.underlay}:{PORT}"


@dataclass
class Measured:
    """The per-round Gbit/s of one variant (None: that round failed) and its CPU cost."""

    gbits: list[float | None] = field(default_factory=list)
    cpu_per_gb: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def values(self) -> list[float]:
        return [g for g in self.gbits if g is not None]

    @property
    def median(self) -> float:
        values = self.values()
        return statistics.median(values) if values else 0.0

    @property
    def cpu(self) -> float:
        return statistics.median(self.cpu_per_gb) if self.cpu_per_gb else 0.0


def other_peers(count: int) -> list[Peer]:
    """`count` peers that own none of the lab's tunnel addresses: IPv6 /64s, exact addresses
    (IPv4 while 198.51.100.0/24 lasts, then IPv6), 4,096-port TCP and UDP shares of an address
    (IPv4 from 203.0.113.16 on, then IPv6), and IPv4 /28s of 198.51.100.128/25 then IPv6 /48s,
    at endpoints 192.0.2.10-249 (never a lab address)."""
    peers = []
    for index in range(count):
        endpoint = Endpoint(ipaddress.ip_address(f"192.0.2.{10 + index % 240}"),
                            10000 + index // 240)
        kind, n = index % 4, index // 4
        name = f"other{index}"
        if kind == 0:
            peer = Peer(name, endpoint, prefixes=(ipaddress.ip_network(f"2001:db8:1:{n:x}::/64"),))
        elif kind == 1:
            address = (ipaddress.ip_address(f"198.51.100.{n}") if n < 128
                       else ipaddress.ip_address(f"2001:db8:2::{n:x}"))
            peer = Peer(name, endpoint, addresses=(address,))
        elif kind == 2:
            shared = (ipaddress.ip_address(f"203.0.113.{16 + n // 16}") if n // 16 < 240
                      else ipaddress.ip_address(f"2001:db8:3::{n // 16:x}"))
            first = (n % 16) * 4096
            peer = Peer(name, endpoint, port_ranges=(PortRange(shared, 6, first, first + 4095),
                                                     PortRange(shared, 17, first, first + 4095)))
        else:
            prefix = (ipaddress.ip_network(f"198.51.100.{128 + n * 16}/28") if n < 8
                      else ipaddress.ip_network(f"2001:db8:{0x4000 + n:x}::/48"))
            peer = Peer(name, endpoint, prefixes=(prefix,))
        peers.append(peer)
    return peers


def _peer_entry(peer: Peer, key_file: Path | None = None) -> dict[str, Any]:
    entry = peer.as_dict()
    if key_file is not None:
        entry["key_file"] = str(key_file)
    return entry


def _rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


@contextlib.contextmanager
def reference_checkout(commit: str) -> Iterator[Path]:
    """A git worktree of `commit` in a temporary directory (its src/ is yielded), removed
    afterwards."""
    parent = Path(tempfile.mkdtemp(prefix="ipshift-reference-"))
    tree = parent / "tree"
    try:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "--quiet",
                        str(tree), commit], check=True, capture_output=True, text=True,
                       timeout=60)
        yield tree / "src"
    finally:
        if tree.exists():
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)],
                           check=False, capture_output=True, timeout=60)
        shutil.rmtree(parent, ignore_errors=True)
        subprocess.run(["git", "-C", str(ROOT), "worktree", "prune"], check=False,
                       capture_output=True, timeout=60)


class Site:
    """The two namespaces and how each tunnel variant is started in them."""

    def __init__(self, lab: Lab, tmp: Path, reference_src: Path | None) -> None:
        a, b = lab.host("a"), lab.host("b")
        lab.link(a, b, "192.0.2.1/24", "192.0.2.2/24")
        self.a = End(a, "192.0.2.1", "203.0.113.1", "2001:db8:ff::1")
        self.b = End(b, "192.0.2.2", "203.0.113.2", "2001:db8:ff::2")
        self.tmp = tmp
        self.reference_src = reference_src
        key_file = tmp / "peer.key"
        fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(format_key_file(generate_key(), "tunnel-peers benchmark"))
        self.key_file = key_file

    def ends(self) -> tuple[tuple[End, End], tuple[End, End]]:
        return (self.a, self.b), (self.b, self.a)

    def _socket(self, end: End) -> Path:
        return self.tmp / f"{end.node.name}.sock"

    def wait_up(self, proc: LabProcess, procs: list[LabProcess]) -> None:
        procs.append(proc)
        try:
            proc.wait_ready(" up: ", START_TIMEOUT, "tunnel")
        except Exception:
            for started in procs:
                started.stop()
            raise

    def cli(self, *extra: tuple[str, ...], reference: bool = False) -> list[LabProcess]:
        """`ipshift tunnel run --remote` at both ends (extra: per end, a's first), from this
        tree or from the reference checkout."""
        env = None
        if reference:
            assert self.reference_src is not None
            env = {"PYTHONPATH": str(self.reference_src)}
        procs: list[LabProcess] = []
        for index, (end, far) in enumerate(self.ends()):
            argv = [*TUNNEL, "run", "--dev", DEV, "--local", end.endpoint,
                    "--remote", far.endpoint, "--address", f"{end.inner}/30",
                    "--socket", str(self._socket(end)), *(extra[index] if extra else ())]
            self.wait_up(end.node.spawn(argv, name="tunnel", env=env), procs)
        return procs

    def runner(self, end: End, spec: dict[str, Any], procs: list[LabProcess]) -> LabProcess:
        """bench/tunnel_hook_runner.py at `end` with `spec` (dev, local, socket filled in)."""
        spec = {"dev": DEV, "local": end.endpoint, "socket": str(self._socket(end)), **spec}
        path = self.tmp / f"{end.node.name}.json"
        path.write_text(json.dumps(spec))
        proc = end.node.spawn([*RUNNER, str(path)], name="tunnel",
                              env={"PYTHONPATH": str(ROOT)})
        self.wait_up(proc, procs)
        return proc

    def far_peer(self, far: End, encapsulation: str = "udp") -> Peer:
        endpoint = Endpoint(ipaddress.ip_address(far.underlay),
                            PORT if encapsulation == "udp" else 0)
        return Peer(far.node.name, endpoint, Encapsulation(encapsulation),
                    prefixes=(ipaddress.ip_network(f"{far.inner}/32"),))

    def tables(self, others: int = 0, *, keyed: bool = False, encapsulation: str = "udp",
               queues: int = 1) -> list[LabProcess]:
        """Both ends with a peer table: the far end, plus `others` unrelated peers."""
        extra = [_peer_entry(peer) for peer in other_peers(others)]
        procs: list[LabProcess] = []
        for end, far in self.ends():
            entry = _peer_entry(self.far_peer(far, encapsulation),
                                self.key_file if keyed else None)
            self.runner(end, {"peers": [entry, *extra], "addresses": [f"{end.inner}/30"],
                              "queues": queues}, procs)
        return procs

    def option_hook(self) -> list[LabProcess]:
        """Both ends with the destination-options hook, IPv6 inside."""
        procs: list[LabProcess] = []
        for end, far in self.ends():
            # Per-packet framing: in batch framing a packet a hook grew past the chunk size
            # is cut in two by the socket's slot-sized UDP_SEGMENT and lost at the far end (a
            # data path defect, bench/README.md); a resized packet leaves one per datagram
            # either way, so this costs the measurement little.
            self.runner(end, {"remote": far.endpoint, "hook": "dstopt", "headroom": 8,
                              "framing": "packet",
                              "addresses": [f"{end.inner}/30", f"{end.inner6}/64"]}, procs)
        return procs


# --- the variants ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Variant:
    key: str
    label: str
    start: Callable[[Site], list[LabProcess]]
    ipv6: bool = False  # iperf3 over the tunnel's IPv6 addresses


def _rewrite(site: Site) -> list[LabProcess]:
    # a's address travels as 198.51.100.1: a rewrites it as source, b as destination.
    mapping = f"{site.a.inner}=198.51.100.1"
    return site.cli(("--rewrite-src", mapping), ("--rewrite-dst", mapping))


VARIANTS: tuple[Variant, ...] = (
    Variant("before", f"before the peer table ({REFERENCE_COMMIT})",
            lambda site: site.cli(reference=True)),
    Variant("one", "one peer (--remote)", lambda site: site.cli()),
    Variant("peers64", "64 peers, per-packet selection", lambda site: site.tables(63)),
    Variant("rewrite", "address rewrite at both ends", _rewrite),
    Variant("option", "8-byte IPv6 option added / removed by a hook", Site.option_hook,
            ipv6=True),
    Variant("auth", "authenticated (AES-256-GCM)", lambda site: site.tables(keyed=True)),
    Variant("ipip", "IP-in-IP peers", lambda site: site.tables(encapsulation="ipip")),
    Variant("gre", "GRE peers", lambda site: site.tables(encapsulation="gre")),
)


def _round_order(round_index: int, keys: list[str]) -> list[str]:
    """The variants of one round: rotated by the round, the old and new single-peer tunnels
    kept side by side (in alternating order), so neither always meets the same moment."""
    pair = ["before", "one"] if round_index % 2 == 0 else ["one", "before"]
    units: list[list[str]] = [[k for k in pair if k in keys]]
    units += [[k] for k in keys if k not in pair]
    shift = round_index % len(units)
    return [key for unit in units[shift:] + units[:shift] for key in unit]


def _measure(site: Site, variant: Variant, seconds: float, into: Measured) -> None:
    try:
        procs = variant.start(site)
    except Exception as exc:  # a variant that cannot start must not end the whole run
        into.gbits.append(None)
        into.errors.append(_one_line(exc))
        return
    try:
        pids = [p.pid for p in procs]
        before = cpu_seconds(pids)
        dst = site.b.inner6 if variant.ipv6 else site.b.inner
        gbits, carried = iperf_tcp(site.a.node, site.b.node, dst, seconds, 1)
        into.gbits.append(gbits)
        if carried:
            into.cpu_per_gb.append((cpu_seconds(pids) - before) / (carried / 1e9))
    except Exception as exc:
        into.gbits.append(None)
        into.errors.append(_one_line(exc))
    finally:
        for proc in procs:
            proc.stop()


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:300]


def _shares(measured: Measured, baseline: list[float]) -> list[float]:
    return [g / v for g, v in zip(measured.gbits, baseline, strict=True) if g and v]


def _ratios(measured: Measured, reference: Measured) -> list[float]:
    return [g / r for g, r in zip(measured.gbits, reference.gbits, strict=True) if g and r]


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else 0.0


# --- peer updates while forwarding -----------------------------------------------------------
@dataclass
class UpdateLatency:
    seconds: list[float] = field(default_factory=list)
    traffic_gbits: float = 0.0
    retransmits: int = 0
    error: str = ""

    def quantile(self, q: float) -> float:
        """The q-quantile in milliseconds (inclusive method; 0 without samples)."""
        if not self.seconds:
            return 0.0
        if len(self.seconds) == 1:
            return self.seconds[0] * 1000
        cuts = statistics.quantiles(self.seconds, n=100, method="inclusive")
        return cuts[round(q * 100) - 1] * 1000


def _update_latency(site: Site, queues: int, requests: int, traffic: float) -> UpdateLatency:
    """`requests` peer-set calls (an unrelated peer, alternating between two shapes) timed from
    request to answer while iperf3 carries 4 streams from a to b; a runs a table of two peers,
    b the --remote tunnel."""
    result = UpdateLatency()
    procs: list[LabProcess] = []
    a, b = site.a, site.b
    other = Peer("unrelated", Endpoint(ipaddress.ip_address("192.0.2.200"), PORT),
                 prefixes=(ipaddress.ip_network("198.51.100.0/24"),))
    shapes = [other.as_dict(),
              dict(other.as_dict(), endpoint=f"192.0.2.201:{PORT}",
                   prefixes=["198.51.100.0/25", "2001:db8:77::/64"])]
    server = client = None
    try:
        site.runner(a, {"peers": [_peer_entry(site.far_peer(b)), shapes[0]],
                        "addresses": [f"{a.inner}/30"], "queues": queues}, procs)
        end_b = b.node.spawn([*TUNNEL, "run", "--dev", DEV, "--local", b.endpoint, "--remote",
                              a.endpoint, "--address", f"{b.inner}/30", "--queues", str(queues),
                              "--socket", str(site.tmp / "b.sock")], name="tunnel")
        site.wait_up(end_b, procs)
        server = b.node.spawn(["iperf3", "-s", "-1"], name="iperf3-server")
        b.node.wait_listening(5201)
        client = a.node.spawn(["iperf3", "-c", b.inner, "-t", str(traffic), "-P", "4", "-J"],
                              name="iperf3-client")
        time.sleep(1.0)  # traffic under way
        deadline = time.monotonic() + traffic - 2.0  # every request while traffic runs
        with CtlClient(site.tmp / f"{a.node.name}.sock", timeout=10.0) as ctl:
            for index in range(requests):
                if time.monotonic() > deadline:
                    break
                started = time.perf_counter()
                ctl.call("peer-set", peer=shapes[(index + 1) % 2], key_file=None)
                result.seconds.append(time.perf_counter() - started)
        client.wait(traffic + 30)
        report = json.loads(client.stdout() or "{}")
        received = report.get("end", {}).get("sum_received") or {}
        result.traffic_gbits = float(received.get("bits_per_second", 0)) / 1e9
        result.retransmits = int(report.get("end", {}).get("sum_sent", {}).get("retransmits", 0))
    except Exception as exc:
        result.error = _one_line(exc)
    finally:
        for proc in (client, server, *procs):
            if proc is not None:
                proc.stop()
    return result


# --- memory and lookups with a large table ---------------------------------------------------
@dataclass
class LargeTable:
    peers: int
    rss_one: int = 0
    rss_loaded: int = 0
    load_seconds: float = 0.0
    through: Measured = field(default_factory=Measured)
    veth: Measured = field(default_factory=Measured)
    select_us: dict[int, float] = field(default_factory=dict)
    error: str = ""

    @property
    def per_peer(self) -> float:
        return (self.rss_loaded - self.rss_one) / self.peers if self.rss_loaded else 0.0


def _large_table(site: Site, count: int, rounds: int, seconds: float) -> LargeTable:
    """a's daemon RSS with 1 peer, then with `count` peers loaded while it runs (after traffic
    through each, so buffers are in place); then one stream through the large table beside
    the veth path."""
    result = LargeTable(count)
    a, b = site.a, site.b
    far = site.far_peer(b)
    procs: list[LabProcess] = []
    try:
        runner = site.runner(a, {"peers": [_peer_entry(far)], "addresses": [f"{a.inner}/30"]},
                             procs)
        end_b = b.node.spawn([*TUNNEL, "run", "--dev", DEV, "--local", b.endpoint, "--remote",
                              a.endpoint, "--address", f"{b.inner}/30",
                              "--socket", str(site.tmp / "b.sock")], name="tunnel")
        site.wait_up(end_b, procs)
        iperf_tcp(a.node, b.node, b.inner, min(seconds, 2.0), 1)
        result.rss_one = _rss_bytes(runner.pid)
        table_file = site.tmp / "large-table.json"
        table_file.write_text(json.dumps(
            [_peer_entry(far)] + [_peer_entry(peer) for peer in other_peers(count - 1)]))
        with CtlClient(site.tmp / f"{a.node.name}.sock", timeout=120.0) as ctl:
            answer = ctl.call("bench-load-peers", path=str(table_file))
        result.load_seconds = float(answer["seconds"])
        iperf_tcp(a.node, b.node, b.inner, min(seconds, 2.0), 1)
        result.rss_loaded = _rss_bytes(runner.pid)
        for _ in range(rounds):
            veth = iperf_tcp(a.node, b.node, b.underlay, seconds, 1)[0]
            through = iperf_tcp(a.node, b.node, b.inner, seconds, 1)[0]
            result.veth.gbits.append(veth)
            result.through.gbits.append(through)
    except (CtlError, RuntimeError, OSError, KeyError, ValueError) as exc:
        result.error = _one_line(exc)
    finally:
        for proc in procs:
            proc.stop()
    result.select_us = _select_costs(far, count)
    return result


def _select_costs(far: Peer, count: int) -> dict[int, float]:
    """PeerTable.select per packet toward the far end with 1, 64 and `count` peers (the
    micro figure behind the throughput; the `peers` benchmark has the full set)."""
    packet = bytes(IP(src="203.0.113.1", dst=str(far.prefixes[0].network_address))
                   / TCP(sport=40000, dport=5201, flags="A"))
    costs = {}
    for size in (1, 64, count):
        table = PeerTable([far, *other_peers(size - 1)])
        if table.select(packet) is not far:
            raise RuntimeError(f"a table of {size} peers does not select {far.name}")
        costs[size] = _per_call_us(partial(table.select, packet), 3, 0.2)
    return costs


# --- the benchmark ---------------------------------------------------------------------------
@benchmark("tunnel_peers", "tunnel with a peer table vs before and veth: 64 peers, hooks, "
           "auth, IP-in-IP/GRE, peer updates, memory", needs_root=True)
def run(ctx: Context) -> list[Row]:
    rounds, seconds = (1, 1.0) if ctx.quick else (5, 4.0)
    requests, traffic = (20, 5.0) if ctx.quick else (200, 12.0)
    table_peers = 2_000 if ctx.quick else 10_000
    raw_present = importlib.util.find_spec("ipshift.tunnel.raw") is not None
    keys = [v.key for v in VARIANTS if raw_present or v.key not in ("ipip", "gre")]
    measured = {v.key: Measured() for v in VARIANTS}
    veth_pairs: list[tuple[float, float]] = []
    reference_error = ""
    with contextlib.ExitStack() as stack:
        try:
            reference = stack.enter_context(reference_checkout(REFERENCE_COMMIT))
        except (subprocess.SubprocessError, OSError) as exc:
            reference, reference_error = None, _one_line(exc)
            keys.remove("before")
        lab = stack.enter_context(Lab("bench-tunnel-peers"))
        site = Site(lab, Path(stack.enter_context(tempfile.TemporaryDirectory())), reference)
        if reference is not None:
            try:
                _check_reference(site, reference)
            except RuntimeError as exc:
                reference, reference_error = None, _one_line(exc)
                keys.remove("before")
        variants = {v.key: v for v in VARIANTS}
        for round_index in range(rounds):
            first = iperf_tcp(site.a.node, site.b.node, site.b.underlay, seconds, 1)[0]
            for key in _round_order(round_index, keys):
                _measure(site, variants[key], seconds, measured[key])
            last = iperf_tcp(site.a.node, site.b.node, site.b.underlay, seconds, 1)[0]
            veth_pairs.append((first, last))
        latency = {queues: _update_latency(site, queues, requests, traffic) for queues in (1, 2)}
        large = _large_table(site, table_peers, rounds, seconds)
    for key in measured:
        if key not in keys:
            measured[key].gbits = [None] * rounds
    veth = [(first + last) / 2 for first, last in veth_pairs]
    return _rows(measured, veth, veth_pairs, latency, large, raw_present, reference_error)


def _check_reference(site: Site, reference: Path) -> None:
    """The reference processes must import the reference code, not this tree's."""
    res = site.a.node.run([sys.executable, "-c", "import ipshift; print(ipshift.__file__)"],
                          env={"PYTHONPATH": str(reference)})
    if not res.stdout.strip().startswith(str(reference)):
        raise RuntimeError(f"the reference checkout is not what runs: {res.stdout.strip()}")


def _rows(measured: dict[str, Measured], veth: list[float],
          veth_pairs: list[tuple[float, float]], latency: dict[int, UpdateLatency],
          large: LargeTable, raw_present: bool, reference_error: str) -> list[Row]:
    veth_median = _median(veth)
    veth_runs = "/".join(f"{a:.1f}+{b:.1f}" for a, b in veth_pairs)
    one, before = measured["one"], measured["before"]
    ratio = _median(_ratios(one, before))
    one_share = _median(_shares(one, veth))
    rows = [Row(
        metric="TCP, 1 stream: one peer (--remote)",
        unit="Gbit/s",
        ipshift=one.median,
        baselines={"kernel veth": veth_median, f"before the table ({REFERENCE_COMMIT})":
                   before.median},
        better="higher",
        target=f">= {ONE_PEER_TARGET}x before",
        target_met=(ratio >= ONE_PEER_TARGET) if before.values() else None,
        notes=(f"{ratio:.2f}x before (median of per-round ratios), {one_share:.0%} of veth "
               f"(before {_median(_shares(before, veth)):.0%}); CPU-s/GB {one.cpu:.2f} (before "
               f"{before.cpu:.2f}); runs {_runs(one)} vs {_runs(before)}; veth runs (round "
               f"start+end) {veth_runs}"
               + (f"; reference not run: {reference_error}" if reference_error else "")
               + _errors(one) + _errors(before)),
    )]
    for key, target in (("peers64", SHARE_TARGET), ("rewrite", SHARE_TARGET),
                        ("option", SHARE_TARGET), ("auth", AUTH_TARGET),
                        ("ipip", None), ("gre", None)):
        variant = next(v for v in VARIANTS if v.key == key)
        samples = measured[key]
        share = _median(_shares(samples, veth))
        if key in ("ipip", "gre") and not raw_present:
            rows.append(Row(metric=f"TCP, 1 stream: {variant.label}", unit="Gbit/s", ipshift=0,
                            better="higher", notes=NOT_MEASURED_RAW))
            continue
        rows.append(Row(
            metric=f"TCP, 1 stream: {variant.label}",
            unit="Gbit/s",
            ipshift=samples.median,
            baselines={"kernel veth": veth_median, "one peer": one.median},
            better="higher",
            target=f">= {target:.0%} of veth" if target is not None else "",
            target_met=(share >= target) if target is not None and samples.values() else None,
            notes=(f"{share:.0%} of veth, {_median(_ratios(samples, one)):.2f}x one peer; "
                   f"CPU-s/GB {samples.cpu:.2f}; runs {_runs(samples)}"
                   + (" (IPv6 inside; per-packet framing)" if key == "option" else "")
                   + _errors(samples)),
        ))
    for queues, result in latency.items():
        for label, q in (("p50", 0.5), ("p95", 0.95)):
            rows.append(Row(
                metric=f"peer-set to answer, {queues} queue{'s' if queues > 1 else ''}, {label}",
                unit="ms",
                ipshift=result.quantile(q),
                notes=(f"{len(result.seconds)} requests while 4 streams ran at "
                       f"{result.traffic_gbits:.2f} Gbit/s ({result.retransmits} retransmits); "
                       f"max {max(result.seconds, default=0) * 1000:.1f} ms"
                       + (f"; failed: {result.error}" if result.error else ""))
                if label == "p50" else "",
            ))
    large_share = _median(_shares(large.through, large.veth.values()))
    select = ", ".join(f"{size:,} peers {cost:.2f}" for size, cost in large.select_us.items())
    rows.append(Row(
        metric=f"memory per peer, {large.peers:,} peers",
        unit="bytes",
        ipshift=large.per_peer,
        notes=(f"daemon RSS {large.rss_one / 2**20:.1f} MiB with 1 peer, "
               f"{large.rss_loaded / 2**20:.1f} MiB with {large.peers:,}, loaded while "
               f"running by replace_peers in {large.load_seconds:.2f} s (what peers-replace "
               "calls; a request of 10,000 peers exceeds the control channel's 64 KiB)"
               + (f"; failed: {large.error}" if large.error else "")),
    ))
    rows.append(Row(
        metric=f"TCP, 1 stream: {large.peers:,} peers in the table",
        unit="Gbit/s",
        ipshift=large.through.median,
        baselines={"kernel veth": large.veth.median, "one peer": one.median},
        better="higher",
        notes=(f"{large_share:.0%} of veth (its own rounds); PeerTable.select per packet (us): "
               f"{select}; runs {_runs(large.through)}, veth {runs_text(large.veth.values())}"),
    ))
    return rows


def _runs(measured: Measured) -> str:
    return "/".join("-" if g is None else f"{g:.2f}" for g in measured.gbits)


def _errors(measured: Measured) -> str:
    if not measured.errors:
        return ""
    return f"; {len(measured.errors)} round(s) failed: {measured.errors[0]}"
