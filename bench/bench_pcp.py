"""pcp: the rsip gateway's PCP responder beside miniupnpd (Debian's miniupnpd-nftables 2.3.1)
in the same run and topology.

The site is ipshift.lab.rsip_site (private host a behind gw; inet outside). One server at a
time runs in gw, answering PCP on 192.0.2.1:5351:

- ipshift: `python -m ipshift.rsip.responder` (the responder alone on the daemon runtime, its
  own lease table; per-host limits raised, since one client host plays every host here);
  a mapping is three elements of the maps of one nft table;
- miniupnpd: PCP/NAT-PMP only (no UPnP), secure mode, an allow rule for 192.0.2.0/24, its
  nftables chains made as /etc/miniupnpd/nft_init.sh makes them (forward policy accept); a
  mapping is a DNAT rule and a filter rule in its chains. miniupnpd refuses to forward at all
  when its external address is a reserved one (203.0.113.1 is, like every documentation
  address): a small STUN server on inet (203.0.113.100 and .101, ports 3478 and 3479, as RFC
  5780 asks) tells it the address is public and unfiltered, which turns forwarding on.

Measured at 0, 1,000, 5,000 and 10,000 mappings held (filled by the same client, at most
FILL_CAP seconds per level; how far a server got is reported):
- PCP MAP requests answered per second: new UDP mappings asked for with WINDOW requests
  outstanding (a client that waits for each answer would measure the round trip instead);
- reachable: a TCP mapping asked for, then, from the answer's arrival, TCP connects from inet
  to the public address and port until one succeeds (ms; a connect refused by the gateway
  itself means the forward is not there yet).
"""

from __future__ import annotations

import ipaddress
import os
import select
import signal
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bench.harness import Context, Row, benchmark
from ipshift.lab import Lab, LabProcess, Node
from ipshift.lab.rsip_site import GATEWAY_INT, HOSTS, INTERNET, PUBLIC, RsipSite
from ipshift.rsip import pcpwire
from ipshift.rsip.pcpwire import MapData, Opcode, PcpRequest, PcpWireError, Result

LEVELS = (0, 1000, 5000, 10_000)
QUICK_LEVELS = (0, 200)
WINDOW = 32                 # requests outstanding at once
RATE_REQUESTS = 400         # new mappings asked for to measure the rate (per level)
FILL_CAP = 60.0             # seconds a server may take to fill one level
RATE_CAP = 20.0             # seconds a rate measurement may take
RETRY = 5.0                 # a request unanswered this long is sent again (longer than a
                            # slow server's queue, or retransmissions would pile up in it) ...
TRIES = 3                   # ... at most this many times in all
PROBE_CAP = 5.0             # seconds the reachability probe tries
PROBES = 4                  # reachability samples per level (median reported)
TARGET_RATE = 2000.0
TARGET_REACHABLE_MS = 10.0
FILL_PORTS = 10_000         # internal (and suggested external) ports of the filling mappings
PROBE_PORTS = 7000          # TCP ports a listens on for the reachability probe
STUN_SECOND = "203.0.113.101"
STUN_PORTS = (3478, 3479)
CLIENT = HOSTS["a"]
NONCE = b"bench-nonce!"
LIFETIME = 3600

STUN_SERVER = r"""
import select, socket, struct, sys
ips, ports, cookie = sys.argv[1:3], (3478, 3479), 0x2112A442
socks = {}
for ip in ips:
    for port in ports:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind((ip, port))
        socks[(ip, port)] = s
print("stun ready", flush=True)
def attr(kind, port, address):
    return struct.pack("!HHBBH4s", kind, 8, 0, 1, port, address)
while True:
    for s in select.select(list(socks.values()), [], [])[0]:
        data, peer = s.recvfrom(2048)
        if len(data) < 20 or struct.unpack_from("!H", data)[0] != 1:
            continue
        change, offset = 0, 20
        while offset + 4 <= len(data):
            kind, length = struct.unpack_from("!HH", data, offset)
            if kind == 3 and length >= 4:
                change = struct.unpack_from("!I", data, offset + 4)[0]
            offset += 4 + length + (-length % 4)
        here_ip, here_port = s.getsockname()
        other_ip = ips[1] if here_ip == ips[0] else ips[0]
        other_port = ports[1] if here_port == ports[0] else ports[0]
        reply_from = (other_ip if change & 4 else here_ip, other_port if change & 2 else here_port)
        address = socket.inet_aton(peer[0])
        xored = struct.pack("!I", struct.unpack("!I", address)[0] ^ cookie)
        attrs = (attr(0x0001, peer[1], address) + attr(0x0020, peer[1] ^ (cookie >> 16), xored)
                 + attr(0x802C, other_port, socket.inet_aton(other_ip)))
        reply = struct.pack("!HHI", 0x0101, len(attrs), cookie) + data[8:20] + attrs
        socks[reply_from].sendto(reply, peer)
"""

MINIUPNPD_TABLES = """
table inet filter {
    chain miniupnpd {
    }
    chain prerouting_miniupnpd {
    }
    chain postrouting_miniupnpd {
    }
    chain forward {
        type filter hook forward priority 0; policy accept;
        jump miniupnpd
    }
    chain prerouting {
        type nat hook prerouting priority -100; policy accept;
        jump prerouting_miniupnpd
    }
    chain postrouting {
        type nat hook postrouting priority 100; policy accept;
        jump postrouting_miniupnpd
    }
}
"""


def map_request(port: int, protocol: int = 17) -> bytes:
    return PcpRequest(Opcode.MAP, LIFETIME, ipaddress.IPv4Address(CLIENT),
                      MapData(NONCE, protocol, port, port, ipaddress.IPv4Address(0))).encode()


@dataclass
class Batch:
    asked: int
    answered: int = 0
    succeeded: int = 0
    seconds: float = 0.0
    results: dict[str, int] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.answered / self.seconds if self.seconds > 0 else 0.0


def pipeline(sock: socket.socket, ports: Sequence[int], cap: float,
             protocol: int = 17) -> Batch:
    """MAP requests for `ports`, WINDOW outstanding, each retried after RETRY up to TRIES
    times, for at most `cap` seconds."""
    batch = Batch(len(ports))
    todo = list(reversed(ports))
    waiting: dict[int, tuple[float, int]] = {}  # internal port -> (sent at, tries)
    start = time.perf_counter()
    deadline = start + cap
    while todo or waiting:
        now = time.perf_counter()
        if now > deadline:
            break
        while todo and len(waiting) < WINDOW:
            port = todo.pop()
            sock.send(map_request(port, protocol))
            waiting[port] = (now, 1)
        for port, (sent, tries) in list(waiting.items()):
            if now - sent > RETRY:
                if tries >= TRIES:
                    del waiting[port]
                else:
                    sock.send(map_request(port, protocol))
                    waiting[port] = (now, tries + 1)
        readable, _, _ = select.select([sock], [], [], 0.05)
        if not readable:
            continue
        for _ in range(256):
            try:
                data = sock.recv(2048)
            except BlockingIOError:
                break
            try:
                response = pcpwire.decode_pcp_response(data)
            except PcpWireError:
                continue
            if not isinstance(response.data, MapData):
                continue
            if waiting.pop(response.data.internal_port, None) is None:
                continue  # an answer to a retransmission
            batch.answered += 1
            batch.succeeded += response.result is Result.SUCCESS
            name = response.result.name
            batch.results[name] = batch.results.get(name, 0) + 1
    batch.seconds = time.perf_counter() - start
    drain(sock)
    return batch


def drain(sock: socket.socket, quiet: float = 0.3, cap: float = 30.0) -> None:
    """Read (and drop) answers until the server has been quiet for `quiet` seconds, so what
    it still owes is not measured as the next phase."""
    deadline = time.perf_counter() + cap
    while time.perf_counter() < deadline and select.select([sock], [], [], quiet)[0]:
        try:
            sock.recv(2048)
        except BlockingIOError:
            pass


def reachable_ms(client: socket.socket, inet: Node, port: int) -> float | None:
    """From the answer to a TCP MAP request to the first connect from inet that succeeds."""
    probes = [inet.call(socket.socket, socket.AF_INET, socket.SOCK_STREAM) for _ in range(64)]
    try:
        answered: float | None = None
        for _ in range(TRIES):
            client.send(map_request(port, 6))
            if select.select([client], [], [], RETRY)[0]:
                data = client.recv(2048)
                answered = time.perf_counter()
                response = pcpwire.decode_pcp_response(data)
                if response.result is not Result.SUCCESS:
                    return None
                break
        if answered is None:
            return None
        for probe in probes:
            probe.settimeout(0.5)
            if probe.connect_ex((PUBLIC, port)) == 0:
                return (time.perf_counter() - answered) * 1e3
            if time.perf_counter() - answered > PROBE_CAP:
                break
            time.sleep(0.0005)
        return None
    finally:
        for probe in probes:
            probe.close()


@dataclass
class Level:
    wanted: int
    held: int
    fill_seconds: float
    rate: Batch | None = None          # None: the fill did not reach the level in FILL_CAP
    reachable: list[float] = field(default_factory=list)


class Server:
    name = ""

    def start(self) -> None: ...
    def stop(self) -> None: ...


class Ipshift(Server):
    name = "ipshift"

    def __init__(self, site: RsipSite, workdir: Path) -> None:
        self.site, self.workdir = site, workdir
        self.proc: LabProcess | None = None

    def start(self) -> None:
        sock = self.workdir / "pcp.sock"
        self.proc = self.site.gw.spawn([
            sys.executable, "-m", "ipshift.rsip.responder", "--int-if", self.site.int_if,
            "--internal", f"{GATEWAY_INT}/24", "--external", PUBLIC, "--socket", str(sock),
            "--run-dir", str(self.workdir / "run"), "--no-syslog", "--no-announce",
            "--port-range", "40000-60000", "--max-per-host", "65536",
            "--host-rate", "1000000"], name="pcp")
        RsipSite.wait_ready(self.proc, sock, 20)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop(20)
            self.proc = None


class Miniupnpd(Server):
    name = "miniupnpd"

    def __init__(self, site: RsipSite, workdir: Path) -> None:
        self.site, self.workdir = site, workdir
        self.pid: int | None = None

    def start(self) -> None:
        site = self.site
        inet_if = site.inet.iface_to(site.gw)
        site.inet.addr_add(inet_if, f"{STUN_SECOND}/24")
        stun = site.inet.spawn([sys.executable, "-c", STUN_SERVER, INTERNET, STUN_SECOND],
                               name="stun")
        stun.wait_ready("stun ready", 20, "the STUN server")
        site.gw.nft(MINIUPNPD_TABLES)
        conf = self.workdir / "miniupnpd.conf"
        conf.write_text("\n".join([
            f"ext_ifname={site.ext_if}", f"listening_ip={site.int_if}",
            "enable_natpmp=yes", "enable_upnp=no", "secure_mode=yes", "system_uptime=no",
            "min_lifetime=120", "max_lifetime=86400", "ext_perform_stun=yes",
            f"ext_stun_host={INTERNET}", f"ext_stun_port={STUN_PORTS[0]}",
            "uuid=3d3cec3a-8cf0-11e0-98ee-001a6bd2d07b",
            "allow 1024-65535 192.0.2.0/24 1024-65535",
            "deny 0-65535 0.0.0.0/0 0-65535", ""]))
        pidfile = self.workdir / "miniupnpd.pid"
        # without -d it logs at its normal level (with -d it would write debug lines for every
        # request), and forks: the namespace's removal ends it whatever happens here
        starter = site.gw.spawn(["miniupnpd", "-f", str(conf), "-P", str(pidfile)],
                                name="miniupnpd")
        starter.wait(20)
        site.gw.wait_listening(pcpwire.SERVER_PORT, udp=True, timeout=20)
        self.pid = int(pidfile.read_text().split()[0])

    def stop(self) -> None:
        if self.pid is None:
            return
        try:
            os.kill(self.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and Path(f"/proc/{self.pid}").exists():
            time.sleep(0.05)
        if Path(f"/proc/{self.pid}").exists():
            os.kill(self.pid, signal.SIGKILL)
        self.pid = None


def measure(server: Server, site: RsipSite, levels: Sequence[int], rate_requests: int,
            probes: int, log: Callable[[str], None]) -> list[Level]:
    client = site.host("a").call(socket.socket, socket.AF_INET, socket.SOCK_DGRAM)
    client.connect((GATEWAY_INT, pcpwire.SERVER_PORT))
    client.setblocking(False)
    next_port = FILL_PORTS
    probe_port = PROBE_PORTS
    held = 0
    out: list[Level] = []
    try:
        server.start()
        for wanted in levels:
            fill = pipeline(client, range(next_port, next_port + max(wanted - held, 0)),
                            FILL_CAP)
            next_port += fill.asked
            held += fill.succeeded
            log(f"{server.name}: {held:,} held ({fill.seconds:.1f} s to fill, "
                f"{fill.results})")
            if held < wanted:
                # the cap stopped the fill: what the server still owes would be measured
                # next, so neither this level nor the higher ones are
                out.append(Level(wanted, held, fill.seconds))
                break
            rate = pipeline(client, range(next_port, next_port + rate_requests), RATE_CAP)
            next_port += rate.asked
            samples = []
            for _ in range(probes):
                sample = reachable_ms(client, site.inet, probe_port)
                probe_port += 1
                if sample is not None:
                    samples.append(sample)
            out.append(Level(wanted, held, fill.seconds, rate, samples))
            held += rate.succeeded + len(samples)
            log(f"{server.name}: {rate.rate:,.0f} answers/s {rate.results}, reachable "
                f"{samples} ms")
    finally:
        server.stop()
        client.close()
    return out


@benchmark("pcp", "PCP mappings/s and time to reachable with 0-10,000 held, beside miniupnpd",
           needs_root=True)
def run(ctx: Context) -> list[Row]:
    levels = QUICK_LEVELS if ctx.quick else LEVELS
    rate_requests = 100 if ctx.quick else RATE_REQUESTS
    probes = 2 if ctx.quick else PROBES

    def log(text: str) -> None:
        print(f"   {text}", file=sys.stderr, flush=True)

    results: dict[str, list[Level]] = {}
    with tempfile.TemporaryDirectory(prefix="ipshift-bench-pcp-") as tmp, \
            Lab("bench-pcp") as lab:
        work = Path(tmp)
        site = RsipSite(lab, work / "site")
        a = site.host("a")
        listeners = [a.call(socket.create_server, ("0.0.0.0", PROBE_PORTS + i))
                     for i in range(len(levels) * probes * 2)]
        try:
            for server in (Ipshift(site, work), Miniupnpd(site, work)):
                results[server.name] = measure(server, site, levels, rate_requests, probes, log)
        finally:
            for listener in listeners:
                listener.close()
    return rows(results, levels)


def rows(results: dict[str, list[Level]], levels: Sequence[int]) -> list[Row]:
    ours, theirs = results["ipshift"], results["miniupnpd"]
    out: list[Row] = []
    for i, wanted in enumerate(levels):
        mine = ours[i] if i < len(ours) else None
        base = theirs[i] if i < len(theirs) else None
        if mine is None or mine.rate is None:
            continue
        baselines: dict[str, float] = {}
        notes = [f"ipshift held {mine.held:,}, {mine.rate.results}"]
        if base is not None and base.rate is not None:
            baselines["miniupnpd 2.3.1"] = base.rate.rate
            notes.append(f"miniupnpd held {base.held:,} (fill {base.fill_seconds:.1f} s), "
                         f"{base.rate.results}")
        else:
            reached = theirs[-1].held if theirs else 0
            notes.append(f"miniupnpd not measured: its fill stopped at {reached:,} held "
                         f"after {FILL_CAP:.0f} s")
        last = wanted == levels[-1]
        out.append(Row(f"MAP requests answered, {wanted:,} held", "answers/s",
                       mine.rate.rate, baselines, better="higher",
                       target=f">= {TARGET_RATE:,.0f}/s" if last else "",
                       target_met=(mine.rate.rate >= TARGET_RATE) if last else None,
                       notes="; ".join(notes)))
    for i, wanted in enumerate(levels):
        mine = ours[i] if i < len(ours) else None
        base = theirs[i] if i < len(theirs) else None
        if mine is None or not mine.reachable:
            continue
        ours_ms = statistics.median(mine.reachable)
        baselines = {}
        if base is not None and base.reachable:
            baselines["miniupnpd 2.3.1"] = statistics.median(base.reachable)
        out.append(Row(f"answer to reachable from outside, {wanted:,} held", "ms", ours_ms,
                       baselines, better="lower", target=f"<= {TARGET_REACHABLE_MS:g} ms",
                       target_met=max(mine.reachable) <= TARGET_REACHABLE_MS,
                       notes=f"median of {len(mine.reachable)}; ipshift max "
                             f"{max(mine.reachable):.2f} ms" + (
                                 f", miniupnpd max {max(base.reachable):.2f} ms"
                                 if base is not None and base.reachable else "")))
    fills = [(lv.wanted, lv.fill_seconds, lv.held) for lv in ours if lv.wanted]
    base_fills = {lv.wanted: (lv.fill_seconds, lv.held) for lv in theirs if lv.wanted}
    for wanted, seconds, held in fills:
        baselines = {}
        note = ""
        if wanted in base_fills:
            b_seconds, b_held = base_fills[wanted]
            if b_held >= wanted:
                baselines["miniupnpd 2.3.1"] = b_seconds
            else:
                note = f"miniupnpd held {b_held:,} when its {FILL_CAP:.0f} s cap ran out"
        out.append(Row(f"fill up to {wanted:,} held", "s", seconds, baselines,
                       better="lower", notes=note or f"ipshift held {held:,}"))
    return out


if __name__ == "__main__":
    from bench.harness import format_table, write_results

    quick = "--quick" in sys.argv
    started = time.monotonic()
    table = run(Context(quick=quick))
    print(format_table("pcp", table))
    if not quick:
        print(f"   results: {write_results('pcp', table, time.monotonic() - started)}")
