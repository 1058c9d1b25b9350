"""tunnel: iperf3 TCP through the TUN <-> UDP forwarder, beside the plain kernel veth path.

Two namespaces joined by one veth (MTU 1500). The baseline is iperf3 over that veth; the
tunnel runs `ipshift tunnel run` at both ends (each a process of its own) and iperf3 over the
tunnel addresses, so both share the same two CPUs, kernel and topology. Runs alternate
(veth, tunnel, veth, tunnel, ...), each figure is the median and each share of veth the median
of the per-round shares, because a shared 2-vCPU machine moves by tens of percent from one
second to the next.

Rows: one TCP stream (target >= 35 % of veth), in the default batch framing, beside per-packet
framing; one stream between hosts behind two forwarding gateways (`lab.scenarios.TunnelSite`,
the RSIP/ILNP shape), both framings, without loss and with 1 % of the tunnel's datagrams
dropped one by one (what loss costs when a lost chunk takes segments with it); four streams
with two queues
(IFF_MULTI_QUEUE, a worker process per queue) beside four streams on one queue; ping
round-trip time. The forwarders' CPU time per GB carried (both ends, user + system) is in the
notes.

A third figure for one stream, "super-packet prototype", is the data path with no framing at
all: each TSO super-packet is shipped as it is (cut into 1472-byte UDP datagrams that are not
packets) and the GRO batch written back whole. It is not a tunnel anyone could use (it breaks
as soon as a batch is not exactly one super-packet: any loss, any reordering, any router cutting
GSO apart), but it shows what the kernel side of this data path costs without any Python work
per packet or chunk.

The tunnel with a table of peers, hooks, authentication and raw encapsulations is measured by
bench/bench_tunnel_peers.py (`tunnel_peers`), which shares the helpers of this module.
"""

from __future__ import annotations

import json
import re
import statistics
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from bench.harness import Context, Row, benchmark
from ipshift.lab import Lab, LabProcess, Node
from ipshift.lab.scenarios import TunnelSite

TARGET_SHARE = 0.35
TUNNEL = [sys.executable, "-m", "ipshift", "tunnel"]
PROTOTYPE = r"""
import os, select, signal, socket, sys
from ipshift.net import tun, udp
dev, local, remote, address = sys.argv[1:5]
device = tun.open_tun(dev)
os.system(f"ip link set {dev} mtu 1468 gso_max_size 60000 up; ip addr add {address} dev {dev}")
sock = udp.open_udp((local, 5100), (remote, 5100))
device.set_blocking(False); sock.setblocking(False)
signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
segment = [(udp.SOL_UDP, udp.UDP_SEGMENT, (1472).to_bytes(2, "little"))]
poller = select.poll()
poller.register(device.fd, select.POLLIN)
poller.register(sock, select.POLLIN)
out, back = bytearray(70000), bytearray(70000)
print("prototype up", flush=True)
while True:
    for fd, _ in poller.poll():
        for _ in range(16):
            try:
                if fd == device.fd:
                    n = os.readv(device.fd, [out])
                    sock.sendmsg([memoryview(out)[:n]], segment if n > 1472 else [])
                else:
                    n = sock.recvmsg_into([back], 64)[0]
                    os.write(device.fd, memoryview(back)[:n])
            except (BlockingIOError, ConnectionRefusedError):
                break
"""


@dataclass
class Samples:
    gbits: list[float] = field(default_factory=list)
    cpu_per_gb: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.gbits) if self.gbits else 0.0

    @property
    def cpu(self) -> float:
        return statistics.median(self.cpu_per_gb) if self.cpu_per_gb else 0.0


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU of these processes and their children (the queue workers)."""
    total = 0.0
    seen: set[int] = set()
    todo = list(pids)
    while todo:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.add(pid)
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / 100
            for task in Path(f"/proc/{pid}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except (OSError, ValueError, IndexError):
            continue
    return total


def iperf_tcp(client: Node, server: Node, dst: str, seconds: float,
              streams: int) -> tuple[float, int]:
    """(Gbit/s, bytes) of one iperf3 TCP run, as measured by the receiver."""
    srv = server.spawn(["iperf3", "-s", "-1"], name="iperf3-server")
    try:
        # Start the client only once the server listens: a one-off server (-1) that saw a
        # failed attempt would be gone for the retry.
        server.wait_listening(5201)
        res = client.run(["iperf3", "-c", dst, "-t", str(seconds), "-P", str(streams), "-J"],
                         check=False, timeout=seconds + 30)
        report = json.loads(res.stdout) if res.stdout.strip().startswith("{") else {}
        received = report.get("end", {}).get("sum_received")
        if res.returncode != 0 or not received:
            raise RuntimeError(f"iperf3 to {dst} failed: {report.get('error') or res.stdout[-300:]}"
                               f" {res.stderr[-300:]}")
        return float(received["bits_per_second"]) / 1e9, int(received["bytes"])
    finally:
        srv.stop()


def _ping(node: Node, dst: str, count: int) -> tuple[float, float]:
    """(min, avg) round-trip time in microseconds."""
    res = node.run(["ping", "-q", "-c", str(count), "-i", "0.01", dst], timeout=count + 30)
    match = re.search(r"= ([\d.]+)/([\d.]+)/", res.stdout)
    if not match:
        raise RuntimeError(f"no ping statistics: {res.stdout}")
    return float(match.group(1)) * 1000, float(match.group(2)) * 1000


class Tunnels:
    """Both ends of the tunnel (or of the prototype), started and stopped together."""

    def __init__(self, a: Node, b: Node, sockets: Path, *, queues: int = 1,
                 prototype: bool = False, framing: str = "batch") -> None:
        self.procs: list[LabProcess] = []
        for node, local, remote, address in ((a, "192.0.2.1", "192.0.2.2", "203.0.113.1/30"),
                                              (b, "192.0.2.2", "192.0.2.1", "203.0.113.2/30")):
            if prototype:
                argv = [sys.executable, "-c", PROTOTYPE, "tunp", local, remote, address]
                ready = "prototype up"
            else:
                argv = [*TUNNEL, "run", "--dev", "tunb", "--local", f"{local}:4789",
                        "--remote", f"{remote}:4789", "--address", address,
                        "--queues", str(queues), "--framing", framing,
                        "--socket", str(sockets / f"{node.name}.sock")]
                ready = " up: "
            proc = node.spawn(argv, name="tunnel")
            self.procs.append(proc)
            if not proc.wait_for_output(ready, timeout=20):
                self.stop()
                raise RuntimeError(f"tunnel did not start in {node.name}: {proc.stderr()}")

    def cpu(self) -> float:
        return cpu_seconds([p.pid for p in self.procs])

    def stop(self) -> None:
        for proc in self.procs:
            proc.stop()


def _through(tunnels: Tunnels, a: Node, b: Node, seconds: float, streams: int,
             samples: Samples) -> None:
    before = tunnels.cpu()
    gbits, carried = iperf_tcp(a, b, "203.0.113.2", seconds, streams)
    samples.gbits.append(gbits)
    if carried:
        samples.cpu_per_gb.append((tunnels.cpu() - before) / (carried / 1e9))


@benchmark("tunnel", "iperf3 TCP and ping through the TUN <-> UDP forwarder vs the veth path",
           needs_root=True)
def run(ctx: Context) -> list[Row]:
    rounds, seconds, pings = (1, 1.0, 20) if ctx.quick else (5, 4.0, 200)
    veth1, veth4 = Samples(), Samples()
    tunnel1, tunnel4, tunnel4mq, proto1 = Samples(), Samples(), Samples(), Samples()
    packet1 = Samples()
    with Lab("bench-tunnel") as lab, tempfile.TemporaryDirectory() as tmp:
        a, b = lab.host("a"), lab.host("b")
        lab.link(a, b, "192.0.2.1/24", "192.0.2.2/24")
        sockets = Path(tmp)
        for _ in range(rounds):
            veth1.gbits.append(iperf_tcp(a, b, "192.0.2.2", seconds, 1)[0])
            tunnels = Tunnels(a, b, sockets)
            try:
                _through(tunnels, a, b, seconds, 1, tunnel1)
                _through(tunnels, a, b, seconds, 4, tunnel4)
            finally:
                tunnels.stop()
            tunnels = Tunnels(a, b, sockets, framing="packet")
            try:
                _through(tunnels, a, b, seconds, 1, packet1)
            finally:
                tunnels.stop()
            veth4.gbits.append(iperf_tcp(a, b, "192.0.2.2", seconds, 4)[0])
            tunnels = Tunnels(a, b, sockets, queues=2)
            try:
                _through(tunnels, a, b, seconds, 4, tunnel4mq)
            finally:
                tunnels.stop()
            tunnels = Tunnels(a, b, sockets, prototype=True)
            try:
                _through(tunnels, a, b, seconds, 1, proto1)
            finally:
                tunnels.stop()
        veth_min, veth_avg = _ping(a, "192.0.2.2", pings)
        tunnels = Tunnels(a, b, sockets)
        try:
            _ping(a, "203.0.113.2", 5)  # warm up (neighbour entries, first wake-ups)
            tunnel_min, tunnel_avg = _ping(a, "203.0.113.2", pings)
        finally:
            tunnels.stop()

    # The share is taken per round (tunnel and veth measured seconds apart) and the median of
    # those is reported: the veth figure alone moves by a third between rounds on this machine.
    gateway = {key: Samples() for key in ("batch", "packet", "batch-loss", "packet-loss")}
    with Lab("bench-tunnel-gw") as lab, tempfile.TemporaryDirectory() as tmp:
        _gateways(TunnelSite(lab, Path(tmp)), rounds, seconds, gateway)

    share = median_share(tunnel1, veth1)
    proto_share = median_share(proto1, veth1)
    packet_share = median_share(packet1, veth1)
    share4 = median_share(tunnel4mq, veth4)
    return [
        Row(
            metric="TCP, 1 stream through the tunnel",
            unit="Gbit/s",
            ipshift=tunnel1.median,
            baselines={"kernel veth": veth1.median, "super-packet prototype": proto1.median,
                       "per-packet framing": packet1.median},
            better="higher",
            target=f">= {TARGET_SHARE:.0%} of veth",
            target_met=share >= TARGET_SHARE,
            notes=f"batch framing, {share:.0%} of veth (median of per-round shares; prototype "
                  f"{proto_share:.0%}, per-packet framing {packet_share:.0%}); forwarders "
                  f"{tunnel1.cpu:.2f} CPU-s/GB "
                  f"(prototype {proto1.cpu:.2f}, per-packet framing {packet1.cpu:.2f}); runs "
                  f"{runs_text(tunnel1.gbits)}, veth {runs_text(veth1.gbits)}, prototype "
                  f"{runs_text(proto1.gbits)}",
        ),
        Row(
            metric="TCP through two forwarding gateways",
            unit="Gbit/s",
            ipshift=gateway["batch"].median,
            baselines={"per-packet framing": gateway["packet"].median},
            better="higher",
            notes="h1 - g1 = r = g2 - h2, checksums in software toward the hosts; 64 KB "
                  f"super-packets in two sends; runs {runs_text(gateway['batch'].gbits)} vs "
                  f"{runs_text(gateway['packet'].gbits)}",
        ),
        Row(
            metric="same, 1 % of tunnel datagrams lost",
            unit="Gbit/s",
            ipshift=gateway["batch-loss"].median,
            baselines={"per-packet framing": gateway["packet-loss"].median},
            better="higher",
            notes="a lost chunk costs the segments it carried, chunk 0 all of them; runs "
                  f"{runs_text(gateway['batch-loss'].gbits)} vs "
                  f"{runs_text(gateway['packet-loss'].gbits)}",
        ),
        Row(
            metric="TCP, 4 streams, 2 queues (worker each)",
            unit="Gbit/s",
            ipshift=tunnel4mq.median,
            baselines={"kernel veth": veth4.median, "tunnel, 1 queue": tunnel4.median},
            better="higher",
            notes=f"{share4:.0%} of veth; CPU-s/GB {tunnel4mq.cpu:.2f} (1 queue "
                  f"{tunnel4.cpu:.2f}); runs {runs_text(tunnel4mq.gbits)}",
        ),
        Row(metric="ping RTT through the tunnel, average", unit="us", ipshift=tunnel_avg,
            baselines={"kernel veth": veth_avg}, better="lower"),
        Row(metric="ping RTT through the tunnel, minimum", unit="us", ipshift=tunnel_min,
            baselines={"kernel veth": veth_min}, better="lower"),
    ]


def _gateways(site: TunnelSite, rounds: int, seconds: float,
              samples: dict[str, Samples]) -> None:
    """iperf3 h1 -> h2 through the gateway pair, both framings, without and with loss."""
    for _ in range(rounds):
        for framing in ("batch", "packet"):
            procs = [site.start_tunnel(gateway, "--framing", framing)
                     for gateway in (site.g1, site.g2)]
            try:
                samples[framing].gbits.append(
                    iperf_tcp(site.h1, site.h2, "198.51.100.65", seconds, 1)[0])
                site.underlay_loss(1)
                try:
                    samples[f"{framing}-loss"].gbits.append(
                        iperf_tcp(site.h1, site.h2, "198.51.100.65", seconds, 1)[0])
                finally:
                    site.underlay_loss(0)
            finally:
                for proc in procs:
                    proc.stop()


def median_share(tunnel: Samples, veth: Samples) -> float:
    shares = [t / v for t, v in zip(tunnel.gbits, veth.gbits, strict=False) if v]
    return statistics.median(shares) if shares else 0.0


def runs_text(values: list[float]) -> str:
    return "/".join(f"{v:.2f}" for v in values)
