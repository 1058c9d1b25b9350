"""rsip: the RSIP gateway (`ipshift rsip server`) and client on the RsipSite topology.

The site is ipshift.lab.rsip_site: hosts a, b, c (192.0.2.10-12) behind gw (192.0.2.1 |
203.0.113.1, .2, .3), the Internet host inet (203.0.113.100); gw also masquerades
192.0.2.0/24, so c reaches inet by ordinary NAT beside the RSIP hosts. One gateway runs at a
time, with the site's configuration (LOG_LEVEL info, the default) plus what a phase says.

- throughput: iperf3 TCP, one stream, from a running `ipshift rsip client` to an iperf3 server
  on inet: a with the UDP tunnel (the default), b with `--tunnel ipip`; the baseline is c
  through the kernel's masquerade on the same gateway. iperf3 needs no options: the client
  narrows ip_local_port_range to its leased block. Runs alternate (masquerade, udp, ipip) for
  ROUNDS rounds; each figure is the median and the share of masquerade the median of the
  per-round shares (a shared 2-vCPU machine moves by tens of percent from run to run).
- control transactions per second: a registered host sends QUERY_REQUEST (no tuples: the
  gateway answers with its local networks; no lease changes, no log line, no lease-file
  write) again and again with WINDOW requests outstanding, built once with ipshift.rsip.wire:
  over one TCP connection from a (pipelined; the answers come back in order) and over UDP
  from b (each request with a fresh message counter, so the at-most-once replay cache answers
  none of them). Answers counted for TPS_SECONDS (at most TPS_MAX requests).
- memory with CLIENTS registered clients, each with a bind: VmRSS of the rsipd process
  (/proc/PID/status, its children added if it has any) before any client and with all of
  them. The lease engine allows one registration per host address, so the clients come from
  an IPv6 inside: gw's INT_IF gets 2001:db8:1::1/64 (the daemon then also listens there), a
  gets 2001:db8:1::10/64 on the same link, an AnyIP route `local 2001:db8:1:1::/64 dev lo`,
  and gw a route to that /64 via a. Client N sends REGISTER_REQUEST and ASSIGN_REQUEST_RSAP-IP
  (PORTS_PER_BIND ports, ipshift's UDP tunnel) over UDP from 2001:db8:1:1::N (a socket with
  IPV6_FREEBIND), FILL_WINDOW clients at a time, each request retried after RETRY. The gateway
  runs with MAX_CLIENTS raised, LEASE_TIME 3600 so nothing expires during the run.
- restart-to-serving with those leases in the lease file: SIGTERM (the file stays), then from
  spawning `rsipd` again to the control socket's first `ping` answer and to the first
  QUERY_RESPONSE to one of the restored clients over UDP (asked every PROBE_INTERVAL with a
  fresh counter); afterwards the `leases` ctl method must list every bind again. Baseline:
  the same restart with only the probing client's lease in a fresh lease file.
"""

from __future__ import annotations

import ipaddress
import select
import socket
import struct
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import bench.bench_pcp  # noqa: F401  (registers `pcp`, which has no registry entry of its own)
from bench.bench_tunnel import Samples, cpu_seconds, iperf_tcp, median_share, runs_text
from bench.harness import Context, Row, benchmark
from ipshift.ctl.client import CtlClient, request
from ipshift.ctl.protocol import CtlError
from ipshift.lab import Lab, Node
from ipshift.lab.rsip_site import GATEWAY_INT, INTERNET, RSIP, Client, RsipSite
from ipshift.rsip import wire
from ipshift.rsip.wire import Address, MessageType, Ports

ROUNDS, SECONDS = 3, 5.0            # iperf3 rounds and seconds per run
QUICK_ROUNDS, QUICK_SECONDS = 1, 2.0
TARGET_SHARE = 0.35                 # UDP framing, of the masquerade figure
WINDOW = 32                         # control requests outstanding at once
TPS_SECONDS, QUICK_TPS_SECONDS = 3.0, 1.0
TPS_MAX = 200_000                   # requests sent at most per transport
TARGET_TPS = 5000.0
CLIENTS, QUICK_CLIENTS = 10_000, 1000
PORTS_PER_BIND = 2                  # 10,000 binds of 2 fit PORT_RANGE 8192-32767 at one address
FILL_WINDOW = 32                    # clients registering at once
FILL_CAP = 600.0                    # seconds the fill may take in all
RETRY = 5.0                         # a request unanswered this long is sent again ...
TRIES = 6                           # ... at most this many times in all
TARGET_RSS = 200e6                  # bytes, with CLIENTS clients
PROBE_INTERVAL = 0.01               # seconds between restart probes
RESTART_CAP = 120.0                 # seconds a restart may take to serve
STOP_TIMEOUT = 60.0
GW6, A6 = "2001:db8:1::1", "2001:db8:1::10"
CLIENT_NET = ipaddress.IPv6Network("2001:db8:1:1::/64")
CLIENT_TUNNEL_PORT = 4556           # the UDP tunnel port the fill's clients say they use
CONTROL_PORT = wire.PORT
IPV6_FREEBIND = 78
LEASE_TIME = 3600
MB = 1e6


def _rss_bytes(pid: int) -> int:
    """VmRSS of `pid` and of its children (the tunnel's queue workers, if any)."""
    total = 0
    todo, seen = [pid], set()
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        try:
            for line in Path(f"/proc/{current}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
            for task in Path(f"/proc/{current}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except (OSError, ValueError):
            continue
    return total


def _log(text: str) -> None:
    print(f"   {text}", file=sys.stderr, flush=True)


def _msg_type(data: bytes) -> int:
    return data[1] if len(data) >= 4 else -1


def _error_name(data: bytes) -> str:
    try:
        message = wire.decode(data)
    except wire.RsipWireError as exc:
        return f"undecodable ({exc})"
    error = message.first(wire.Error)
    if error is None:
        return message.type.name
    try:
        return wire.ErrorCode(error.code).name
    except ValueError:
        return f"error {error.code}"


def _udp_counter(data: bytes) -> int | None:
    """The message counter of an answer over UDP: the gateway appends it as the last
    parameter of a successful answer (type 11, length 4)."""
    if len(data) >= 11 and data[-7] == 11 and data[-6:-4] == b"\x00\x04":
        return int.from_bytes(data[-4:], "big")
    return None


# --- throughput ----------------------------------------------------------------------------------
@dataclass
class Throughput:
    masquerade: Samples = field(default_factory=Samples)
    udp: Samples = field(default_factory=Samples)
    ipip: Samples = field(default_factory=Samples)
    blocks: dict[str, str] = field(default_factory=dict)


def throughput(site: RsipSite, work: Path, rounds: int, seconds: float) -> Throughput:
    out = Throughput()
    a, b, c = site.host("a"), site.host("b"), site.host("c")
    clients = {"udp": Client(a, work), "ipip": Client(b, work, "--tunnel", "ipip")}
    try:
        for kind, client in clients.items():
            client.start()
            info = client.status()["client"]
            if info["tunnel_kind"] != kind:
                raise RuntimeError(f"the {kind} client runs a {info['tunnel_kind']} tunnel")
            out.blocks[kind] = client.port_range()
        assert site.gateway is not None
        for _ in range(rounds):
            out.masquerade.gbits.append(iperf_tcp(c, site.inet, INTERNET, seconds, 1)[0])
            for kind, node, samples in (("udp", a, out.udp), ("ipip", b, out.ipip)):
                proc = clients[kind].proc
                assert proc is not None
                pids = [proc.pid, site.gateway.pid]
                before = cpu_seconds(pids)
                gbits, carried = iperf_tcp(node, site.inet, INTERNET, seconds, 1)
                samples.gbits.append(gbits)
                if carried:
                    samples.cpu_per_gb.append((cpu_seconds(pids) - before) / (carried / 1e9))
            _log(f"throughput: masquerade {out.masquerade.gbits[-1]:.2f}, udp "
                 f"{out.udp.gbits[-1]:.2f}, ipip {out.ipip.gbits[-1]:.2f} Gbit/s")
        # the traffic really went through the tunnels: their counters moved
        for kind, client in clients.items():
            counters = client.status().get("tunnel_counters", {})
            if not counters.get("tun_reads"):
                raise RuntimeError(f"the {kind} client's tunnel carried nothing: {counters}")
    finally:
        for client in clients.values():
            if client.proc is not None:
                client.stop()
    return out


# --- control transactions per second -------------------------------------------------------------
@dataclass
class Rate:
    answered: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    lost: int = 0
    seconds: float = 0.0

    @property
    def per_second(self) -> float:
        return self.answered / self.seconds if self.seconds > 0 else 0.0


def _read_messages(sock: socket.socket, buffer: bytearray, timeout: float) -> list[bytes]:
    """Whole RSIP messages from a TCP stream (framed by their overall length)."""
    if not select.select([sock], [], [], timeout)[0]:
        return []
    data = sock.recv(1 << 20)
    if not data:
        raise RuntimeError("the gateway closed the control connection")
    buffer += data
    out = []
    start = 0
    while len(buffer) - start >= 4:
        length = struct.unpack_from("!H", buffer, start + 2)[0]
        if length < 4 or len(buffer) - start < length:
            break
        out.append(bytes(buffer[start:start + length]))
        start += length
    del buffer[:start]
    return out


def _tcp_register(sock: socket.socket) -> int:
    sock.sendall(wire.encode(wire.register_request()))
    buffer = bytearray()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        for data in _read_messages(sock, buffer, 0.5):
            message = wire.decode(data)
            if message.type is MessageType.REGISTER_RESPONSE and message.client_id:
                return message.client_id
            raise RuntimeError(f"REGISTER over TCP answered {_error_name(data)}")
    raise RuntimeError("no answer to REGISTER over TCP within 10 s")


def tcp_rate(node: Node, seconds: float) -> Rate:
    sock = node.call(socket.create_connection, (GATEWAY_INT, CONTROL_PORT), 10)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        client_id = _tcp_register(sock)
        query = wire.encode(wire.query_request(client_id))
        wanted = MessageType.QUERY_RESPONSE.value
        rate = Rate()
        buffer = bytearray()
        sent = outstanding = 0
        start = time.perf_counter()
        deadline = start + seconds
        last = start
        while True:
            now = time.perf_counter()
            more = now < deadline and sent < TPS_MAX
            if more and outstanding < WINDOW:
                batch = min(WINDOW - outstanding, TPS_MAX - sent)
                sock.sendall(query * batch)
                sent += batch
                outstanding += batch
            if not outstanding:
                break
            answers = _read_messages(sock, buffer, 5.0)
            if not answers:
                rate.lost = outstanding  # nothing for 5 s: the rest is not coming
                break
            for data in answers:
                outstanding -= 1
                if _msg_type(data) == wanted:
                    rate.answered += 1
                else:
                    name = _error_name(data)
                    rate.errors[name] = rate.errors.get(name, 0) + 1
            last = time.perf_counter()
        rate.seconds = last - start
        sock.sendall(wire.encode(wire.deregister_request(client_id)))
        return rate
    finally:
        sock.close()


def _udp_exchange(sock: socket.socket, message: wire.Message,
                  counter: int) -> wire.Message:
    """One request over UDP, retried, and its answer (the gateway's own, by counter)."""
    data = wire.encode(message)
    for _ in range(TRIES):
        sock.send(data)
        deadline = time.monotonic() + RETRY
        while (left := deadline - time.monotonic()) > 0:
            if not select.select([sock], [], [], left)[0]:
                break
            answer = wire.decode(sock.recv(4096))
            if answer.counter == counter:
                return answer
    raise RuntimeError(f"no answer to {message.type.name} over UDP")


def udp_rate(node: Node, seconds: float) -> Rate:
    sock = node.call(socket.socket, socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.connect((GATEWAY_INT, CONTROL_PORT))
        answer = _udp_exchange(sock, wire.register_request(counter=1), 1)
        client_id = answer.client_id
        if answer.type is not MessageType.REGISTER_RESPONSE or client_id is None:
            raise RuntimeError(f"REGISTER over UDP answered {answer}")
        marker = 0x5A5A5A5A
        template = bytearray(wire.encode(wire.query_request(client_id, counter=marker)))
        offset = bytes(template).index(struct.pack("!BHI", 11, 4, marker)) + 3
        wanted = MessageType.QUERY_RESPONSE.value
        sock.setblocking(False)
        rate = Rate()
        waiting: set[int] = set()
        counter = 1
        sent = 0
        start = time.perf_counter()
        deadline = start + seconds
        last = start
        while True:
            now = time.perf_counter()
            while now < deadline and sent < TPS_MAX and len(waiting) < WINDOW:
                counter += 1
                struct.pack_into("!I", template, offset, counter)
                sock.send(template)
                waiting.add(counter)
                sent += 1
            if not waiting:
                break
            if not select.select([sock], [], [], 1.0)[0]:
                rate.lost += len(waiting)  # a second without an answer: given up on
                waiting.clear()
                continue
            for _ in range(256):
                try:
                    data = sock.recv(4096)
                except BlockingIOError:
                    break
                number = _udp_counter(data) if _msg_type(data) == wanted else None
                if number is not None and number in waiting:
                    waiting.discard(number)
                    rate.answered += 1
                    continue
                name = _error_name(data)
                if name != "QUERY_RESPONSE":  # (else: a late answer, already given up on)
                    rate.errors[name] = rate.errors.get(name, 0) + 1
                    try:
                        waiting.discard(wire.decode(data).counter or 0)
                    except wire.RsipWireError:
                        pass
            last = time.perf_counter()
        rate.seconds = last - start
        sock.setblocking(True)
        counter += 1
        _udp_exchange(sock, wire.deregister_request(client_id, counter=counter), counter)
        return rate
    finally:
        sock.close()


# --- many clients over IPv6 ----------------------------------------------------------------------
def client_address(index: int) -> str:
    return str(CLIENT_NET.network_address + index + 1)


def _v6_socket(address: str) -> socket.socket:
    sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    try:
        sock.setsockopt(socket.IPPROTO_IPV6, IPV6_FREEBIND, 1)
        sock.bind((address, 0))
        sock.connect((GW6, CONTROL_PORT))
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


@dataclass
class Fill:
    wanted: int
    done: dict[int, int] = field(default_factory=dict)   # index -> client ID
    refused: dict[str, int] = field(default_factory=dict)
    unanswered: int = 0
    retransmissions: int = 0
    seconds: float = 0.0


@dataclass
class _Pending:
    index: int
    sock: socket.socket
    step: int = 1            # 1: REGISTER (counter 1), 2: ASSIGN (counter 2)
    client_id: int = 0
    data: bytes = b""
    sent: float = 0.0
    tries: int = 0


def _register_v6(counter: int) -> wire.Message:
    return wire.register_request(counter=counter,
                                 extra=[wire.udp_tunnel_param(CLIENT_TUNNEL_PORT)])


def _assign_v6(client_id: int, counter: int) -> wire.Message:
    return wire.assign_request_rsap_ip(
        client_id, Address.dont_care(), Ports.any(PORTS_PER_BIND), Address.dont_care(),
        Ports.any(1), counter=counter, extra=[wire.udp_tunnel_param(CLIENT_TUNNEL_PORT)])


def fill(node: Node, count: int, cap: float) -> Fill:
    """`count` clients registered with a bind each, FILL_WINDOW at a time."""
    result = Fill(count)
    poller = select.epoll()
    pending: dict[int, _Pending] = {}   # by fd
    todo = iter(range(count))
    start = time.perf_counter()
    deadline = start + cap

    def send(item: _Pending, message: wire.Message) -> None:
        item.data, item.tries = wire.encode(message), 0
        resend(item)

    def resend(item: _Pending) -> None:
        item.sock.send(item.data)
        item.sent = time.perf_counter()
        item.tries += 1

    def finish(item: _Pending) -> None:
        poller.unregister(item.sock)
        del pending[item.sock.fileno()]
        item.sock.close()

    def opened(indexes: list[int]) -> list[socket.socket]:
        return [_v6_socket(client_address(i)) for i in indexes]

    try:
        exhausted = False
        while time.perf_counter() < deadline:
            if not exhausted and len(pending) < FILL_WINDOW:
                batch = [i for _, i in zip(range(FILL_WINDOW - len(pending)), todo,
                                           strict=False)]
                exhausted = len(batch) < FILL_WINDOW - len(pending)
                # sockets are opened in a's namespace (a thread there), used from here
                for index, sock in zip(batch, node.call(opened, batch), strict=True):
                    item = _Pending(index, sock)
                    pending[sock.fileno()] = item
                    poller.register(sock, select.EPOLLIN)
                    send(item, _register_v6(1))
            if not pending:
                break
            for fd, _ in poller.poll(0.05):
                ready = pending.get(fd)
                if ready is None:
                    continue
                item = ready
                try:
                    data = item.sock.recv(4096)
                    answer = wire.decode(data)
                except (BlockingIOError, wire.RsipWireError):
                    continue
                if answer.counter != item.step:
                    continue  # an answer to an earlier step's retransmission
                if answer.type is MessageType.REGISTER_RESPONSE and answer.client_id:
                    item.step, item.client_id = 2, answer.client_id
                    send(item, _assign_v6(item.client_id, 2))
                elif answer.type is MessageType.ASSIGN_RESPONSE_RSAP_IP:
                    result.done[item.index] = item.client_id
                    finish(item)
                else:
                    name = _error_name(data)
                    result.refused[name] = result.refused.get(name, 0) + 1
                    finish(item)
            now = time.perf_counter()
            for item in list(pending.values()):
                if now - item.sent > RETRY:
                    if item.tries >= TRIES:
                        result.unanswered += 1
                        finish(item)
                    else:
                        result.retransmissions += 1
                        resend(item)
    finally:
        for item in list(pending.values()):
            finish(item)
        poller.close()
    result.seconds = time.perf_counter() - start
    return result


# --- restart ---------------------------------------------------------------------------------
@dataclass
class Restart:
    leases: int
    stop_s: float = 0.0
    ping_s: float | None = None
    answer_s: float | None = None
    binds_after: int = 0
    rss_after: int = 0


def _ping_when(path: Path, start: float, stop: threading.Event, out: list[float]) -> None:
    while not stop.is_set() and time.perf_counter() - start < RESTART_CAP:
        try:
            with CtlClient(path, timeout=RESTART_CAP) as ctl:
                ctl.call("ping")
            out.append(time.perf_counter() - start)
            return
        except (CtlError, OSError):
            time.sleep(PROBE_INTERVAL)


def restart(site: RsipSite, probe: Node, address: str, client_id: int, leases: int) -> Restart:
    """Stop the running gateway (SIGTERM), start it again, and time it to serving."""
    result = Restart(leases)
    began = time.perf_counter()
    site.stop_gateway(STOP_TIMEOUT)
    result.stop_s = time.perf_counter() - began
    sock = probe.call(_v6_socket, address)
    stop = threading.Event()
    pinged: list[float] = []
    try:
        start = time.perf_counter()
        proc = site.gw.spawn([*RSIP, "server", "--config", str(site.config_file), "--socket",
                              str(site.socket), "--no-syslog"], name="rsipd")
        site.gateway = proc
        pinger = threading.Thread(target=_ping_when, args=(site.socket, start, stop, pinged),
                                  daemon=True)
        pinger.start()
        counter = 0
        while time.perf_counter() - start < RESTART_CAP:
            if not proc.running():
                raise RuntimeError(f"rsipd exited {proc.poll()}: {proc.stderr()[-2000:]}")
            counter += 1
            try:
                sock.send(wire.encode(wire.query_request(client_id, counter=counter)))
            except ConnectionRefusedError:
                pass  # an ICMP port unreachable of an earlier probe
            if select.select([sock], [], [], PROBE_INTERVAL)[0]:
                try:
                    answer = wire.decode(sock.recv(4096))
                except (ConnectionRefusedError, wire.RsipWireError):
                    continue
                if answer.type is MessageType.QUERY_RESPONSE:
                    result.answer_s = time.perf_counter() - start
                    break
                raise RuntimeError(f"the restarted gateway answered {answer.type.name} "
                                   f"{_error_name(wire.encode(answer, check=False))}")
        pinger.join(RESTART_CAP)
        result.ping_s = pinged[0] if pinged else None
        result.rss_after = _rss_bytes(proc.pid)
        rows = request(site.socket, "leases")["binds"]
        result.binds_after = len(rows)
    finally:
        stop.set()
        sock.close()
    return result


# --- the benchmark -------------------------------------------------------------------------------
@dataclass
class Memory:
    clients: int
    binds: int = 0           # held when the gateway was stopped for the restart
    before: int = 0
    after: int = 0
    fill: Fill | None = None
    usage: dict[str, int] = field(default_factory=dict)
    restart: Restart | None = None
    baseline: Restart | None = None


def inside6(site: RsipSite) -> None:
    """An IPv6 inside: gw's INT_IF 2001:db8:1::1/64, a 2001:db8:1::10/64 on the same switch,
    the clients' /64 local to a (AnyIP) and routed to it by gw."""
    a = site.host("a")
    site.gw.addr_add(site.int_if, f"{GW6}/64")
    a.addr_add(a.iface_to(site.switch), f"{A6}/64")
    a.ip("-6", "route", "add", "local", str(CLIENT_NET), "dev", "lo")
    site.gw.route_add(str(CLIENT_NET), "via", A6)
    a.run(["ping", "-6", "-c", "1", "-W", "2", GW6], timeout=10)


def memory(site: RsipSite, work: Path, count: int) -> Memory:
    out = Memory(count)
    a = site.host("a")
    keys: dict[str, Any] = {"MAX_CLIENTS": count + 16, "LEASE_TIME": LEASE_TIME,
                            "LOG_LEVEL": "info"}
    proc = site.start_gateway(STATE_DIR=work / "state-memory", **keys)
    time.sleep(1.0)
    out.before = _rss_bytes(proc.pid)
    out.fill = fill(a, count, FILL_CAP)
    _log(f"memory: {len(out.fill.done):,} of {count:,} clients in {out.fill.seconds:.1f} s "
         f"(refused {out.fill.refused}, unanswered {out.fill.unanswered}, "
         f"retransmissions {out.fill.retransmissions})")
    time.sleep(1.5)  # the lease file written (twice a second), the tunnel table settled
    out.after = _rss_bytes(proc.pid)
    out.usage = {k: int(v) for k, v in site.gateway_status()["usage"].items()}
    _log(f"memory: RSS {out.before / MB:.1f} -> {out.after / MB:.1f} MB, usage {out.usage}")
    if not out.fill.done:
        site.stop_gateway(STOP_TIMEOUT)
        return out
    index, client_id = max(out.fill.done.items())
    out.binds = out.usage.get("binds", 0)
    out.restart = restart(site, a, client_address(index), client_id, out.binds)
    _log(f"restart with {out.binds:,} leases: stop {out.restart.stop_s:.2f} s, ping "
         f"{out.restart.ping_s} s, answer {out.restart.answer_s} s, "
         f"{out.restart.binds_after:,} binds after")
    site.stop_gateway(STOP_TIMEOUT)

    # the baseline: a fresh lease file holding only the probing client's lease
    site.start_gateway(STATE_DIR=work / "state-baseline", **keys)
    probe = fill(a, 1, 30.0)
    if not probe.done:
        raise RuntimeError(f"the baseline's client was not registered: {probe}")
    time.sleep(1.0)
    out.baseline = restart(site, a, client_address(0), probe.done[0], 1)
    _log(f"restart with 1 lease: ping {out.baseline.ping_s} s, answer "
         f"{out.baseline.answer_s} s")
    site.stop_gateway(STOP_TIMEOUT)
    return out


@benchmark("rsip", "RSIP gateway: iperf3 through the client's tunnels vs masquerade, control "
           "requests/s over TCP and UDP, memory and restart with 10,000 clients",
           needs_root=True)
def run(ctx: Context) -> list[Row]:
    rounds, seconds = (QUICK_ROUNDS, QUICK_SECONDS) if ctx.quick else (ROUNDS, SECONDS)
    tps_seconds = QUICK_TPS_SECONDS if ctx.quick else TPS_SECONDS
    count = QUICK_CLIENTS if ctx.quick else CLIENTS
    version = _iperf3_version()
    with tempfile.TemporaryDirectory(prefix="ipshift-bench-rsip-") as tmp, \
            Lab("bench-rsip") as lab:
        work = Path(tmp)
        site = RsipSite(lab, work / "site")
        inside6(site)
        site.start_gateway(LOG_LEVEL="info")
        try:
            flows = throughput(site, work, rounds, seconds)
            tcp = tcp_rate(site.host("a"), tps_seconds)
            _log(f"control over TCP: {tcp.per_second:,.0f}/s {tcp.errors} lost {tcp.lost}")
            udp = udp_rate(site.host("b"), tps_seconds)
            _log(f"control over UDP: {udp.per_second:,.0f}/s {udp.errors} lost {udp.lost}")
        finally:
            site.stop_gateway()
        mem = memory(site, work, count)
    return rows(flows, tcp, udp, mem, version)


def _iperf3_version() -> str:
    import subprocess

    try:
        out = subprocess.run(["iperf3", "--version"], capture_output=True, text=True,
                             timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise RuntimeError(f"iperf3 is needed (the bootstrap installs it): {exc}") from exc
    return out.split("(")[0].strip()


def _optional(value: float | None) -> float:
    return value if value is not None else 0.0


def rows(flows: Throughput, tcp: Rate, udp: Rate, mem: Memory, iperf: str) -> list[Row]:
    share_udp = median_share(flows.udp, flows.masquerade)
    share_ipip = median_share(flows.ipip, flows.masquerade)
    out = [
        Row("TCP, 1 stream, RSIP client, UDP tunnel", "Gbit/s", flows.udp.median,
            {"kernel masquerade": flows.masquerade.median}, better="higher",
            target=f">= {TARGET_SHARE:.0%} of masquerade",
            target_met=share_udp >= TARGET_SHARE,
            notes=f"{share_udp:.0%} of masquerade (median of per-round shares); runs "
                  f"{runs_text(flows.udp.gbits)}, masquerade {runs_text(flows.masquerade.gbits)}"
                  f"; client + gateway {flows.udp.cpu:.2f} CPU-s/GB; block "
                  f"{flows.blocks.get('udp', '?')}; {iperf}"),
        Row("TCP, 1 stream, RSIP client, IP-in-IP tunnel", "Gbit/s", flows.ipip.median,
            {"kernel masquerade": flows.masquerade.median}, better="higher",
            notes=f"{share_ipip:.0%} of masquerade; runs {runs_text(flows.ipip.gbits)}; "
                  f"client + gateway {flows.ipip.cpu:.2f} CPU-s/GB; no target (IP-in-IP "
                  "peers are written one packet at a time)"),
    ]
    for name, rate, how in (("TCP", tcp, "1 connection, pipelined"),
                            ("UDP", udp, "fresh message counter each")):
        notes = f"QUERY_REQUEST, {WINDOW} outstanding, {how}; {rate.answered:,} answers in " \
                f"{rate.seconds:.1f} s"
        if rate.errors:
            notes += f"; errors {rate.errors}"
        if rate.lost:
            notes += f"; {rate.lost} unanswered"
        out.append(Row(f"control requests answered, {name}", "answers/s", rate.per_second,
                       better="higher", target=f">= {TARGET_TPS:,.0f}/s",
                       target_met=rate.per_second >= TARGET_TPS and not rate.errors,
                       notes=notes))
    fill_ = mem.fill
    held = len(fill_.done) if fill_ else 0
    full = mem.clients == CLIENTS
    per_client = (mem.after - mem.before) / held if held else 0.0
    out.append(Row(f"gateway RSS, {mem.clients:,} clients with a bind", "MB", mem.after / MB,
                   {"no client": mem.before / MB}, better="lower",
                   target=f"< {TARGET_RSS / MB:.0f} MB" if full else "",
                   target_met=(mem.after < TARGET_RSS and held == mem.clients) if full
                   else None,
                   notes=f"{per_client:,.0f} bytes per client; {held:,} registered over IPv6 "
                         f"UDP (usage {mem.usage}); refused {fill_.refused if fill_ else {}}, "
                         f"unanswered {fill_.unanswered if fill_ else 0}"))
    if fill_ is not None:
        out.append(Row(f"fill: {mem.clients:,} REGISTER + ASSIGN over UDP", "clients/s",
                       held / fill_.seconds if fill_.seconds else 0.0, better="higher",
                       notes=f"{fill_.seconds:.1f} s, {FILL_WINDOW} clients at once, "
                             f"{fill_.retransmissions} retransmissions"))
    after, base = mem.restart, mem.baseline
    if after is not None:
        base_ping = {"1 lease": _optional(base.ping_s)} if base and base.ping_s else {}
        base_answer = ({"1 lease": _optional(base.answer_s)}
                       if base and base.answer_s else {})
        kept = after.binds_after == after.leases
        out.append(Row(f"restart to serving a client, {after.leases:,} leases", "s",
                       _optional(after.answer_s), base_answer, better="lower",
                       target_met=None if after.answer_s else False,
                       target="" if after.answer_s else "answered",
                       notes=f"spawn -> first QUERY_RESPONSE over UDP (probed every "
                             f"{PROBE_INTERVAL * 1e3:.0f} ms); {after.binds_after:,} binds "
                             f"listed afterwards ({'all kept' if kept else 'SOME LOST'}); "
                             f"SIGTERM took {after.stop_s:.2f} s; RSS after "
                             f"{after.rss_after / MB:.1f} MB"))
        out.append(Row(f"restart to control socket ping, {after.leases:,} leases", "s",
                       _optional(after.ping_s), base_ping, better="lower",
                       notes="spawn -> first `ping` answered on the ctl socket"))
    return out


def _main(argv: list[str]) -> None:
    from bench.harness import format_table, write_results

    quick = "--quick" in argv
    started = time.monotonic()
    table = run(Context(quick=quick))
    print(format_table("rsip", table))
    if not quick:
        print(f"   results: {write_results('rsip', table, time.monotonic() - started)}")


if __name__ == "__main__":
    _main(sys.argv)
