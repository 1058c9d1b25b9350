"""The seed's "masquerade through many ISPs" network in namespaces, for tests, bench and demo.

    lan (192.0.2.3) --- r (NAT router: lan0 192.0.2.1, wan0..wanN-1) --- isp1..ispN --- net
                                                                   net: 203.0.113.250, .251

ISP k (k = 0, 1, 2: the seed's two ISPs plus a third) serves a /26 of a documentation range:

    ISP1 198.51.100.0/26   gateway .1   router .2      (seed: 10.0.1.0/24)
    ISP2 203.0.113.0/26    gateway .1   router .2      (seed: 10.0.2.0/24)
    ISP3 198.51.100.64/26  gateway .65  router .66

With more than three ISPs (the 16-uplink benchmark) ISP k serves 198.51.100.16k/28. Every ISP
router forwards to `net`, which holds the server addresses on its loopback and routes each
ISP's prefix back through that ISP. The router masquerades the LAN on every uplink (nftables).

Used by the routes tests, bench and demo; like all of ipshift.lab, never by a daemon.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ipshift.ctl.client import request
from ipshift.ctl.protocol import CtlError
from ipshift.lab.topology import Lab, LabError, LabProcess, Node

SERVER = "203.0.113.250"
SERVER2 = "203.0.113.251"
LAN_NET = "192.0.2.0/24"
ROUTER_LAN = "192.0.2.1"
LAN_HOST = "192.0.2.3"
FLOW_PORT = 9000


@dataclass(frozen=True)
class Isp:
    index: int
    net: ipaddress.IPv4Network
    gateway: str
    router_addr: str
    wan: str  # the router's interface

    @property
    def table(self) -> int:
        return 20 + 10 * self.index  # the seed's tables 20, 30, ...


def isp_plan(n: int) -> list[Isp]:
    if not 1 <= n <= 16:
        raise ValueError("1..16 ISPs")
    if n <= 3:
        nets = ["198.51.100.0/26", "203.0.113.0/26", "198.51.100.64/26"][:n]
    else:
        nets = [f"198.51.100.{16 * k}/28" for k in range(n)]
    out = []
    for k, text in enumerate(nets):
        net = ipaddress.IPv4Network(text)
        out.append(Isp(k, net, str(net.network_address + 1), str(net.network_address + 2),
                       f"wan{k}"))
    return out


def seed_config(isps: list[Isp], *, extra: str = "") -> str:
    """The seed's masquerade example, as written, for these ISPs (iproute2 syntax)."""
    lines = ["# the seed's 'masquerade through many ISPs', documentation addresses",
             "ip rule add prio 10 table main"]
    for isp in isps:
        lines += [
            f"ip rule add prio {isp.table} from {isp.net} table {isp.table}",
            f"ip route append default via {isp.gateway} dev {isp.wan} src {isp.router_addr} "
            f"table {isp.table}",
        ]
    mp, alt = (100, 200) if len(isps) <= 8 else (1000, 2000)
    lines.append(f"ip rule add prio {mp} from {LAN_NET} table {mp}")
    lines.append(f"ip route add default table {mp} \\")
    lines += [f"        nexthop via {isp.gateway} dev {isp.wan} \\" for isp in isps]
    lines[-1] = lines[-1].rstrip(" \\")
    lines.append(f"ip rule add prio {alt} table {alt}")
    for isp in isps:
        lines.append(f"ip route append default via {isp.gateway} dev {isp.wan} "
                     f"src {isp.router_addr} table {alt}")
    return "\n".join(lines) + "\n" + extra


def toml_config(isps: list[Isp], *, profile: str = "fast", hooks: list[str] | None = None,
                targets: tuple[str, ...] = (SERVER, SERVER2), extra: str = "") -> str:
    """A TOML configuration of the same network: explicit uplinks with targets beyond the
    gateways and a quorum, plus the seed's commands."""
    out = ['ip = """', seed_config(isps), '"""', "", "[daemon]", f'profile = "{profile}"']
    if hooks:
        out.append("hooks = [" + ", ".join(f'"{h}"' for h in hooks) + "]")
    out.append(extra)
    for isp in isps:
        out += ["", "[[uplink]]", f'name = "isp{isp.index + 1}"', f'interface = "{isp.wan}"',
                f'gateway = "{isp.gateway}"', f'source = "{isp.router_addr}"',
                "targets = [" + ", ".join(f'"{t}"' for t in targets) + "]", "quorum = 1"]
    return "\n".join(out) + "\n"


class IspSite:
    """Builds the network; `start_daemon` runs `ipshift routes` on the router."""

    def __init__(self, lab: Lab, n_isps: int = 2, *, run_dir: Path, hash_l4: bool = True):
        self.lab = lab
        self.run_dir = run_dir
        self.isps = isp_plan(n_isps)
        self.lan = lab.host("lan")
        self.r = lab.router("r")
        self.net = lab.host("net")
        self.isp_nodes: list[Node] = []
        lab.link(self.lan, self.r, f"{LAN_HOST}/24", f"{ROUTER_LAN}/24", name_b="lan0")
        self.lan.ip("route", "add", "default", "via", ROUTER_LAN)
        self.net.ip("addr", "add", f"{SERVER}/32", "dev", "lo")
        self.net.ip("addr", "add", f"{SERVER2}/32", "dev", "lo")
        for isp in self.isps:
            node = lab.router(f"isp{isp.index + 1}")
            self.isp_nodes.append(node)
            lab.link(self.r, node, f"{isp.router_addr}/{isp.net.prefixlen}",
                     f"{isp.gateway}/{isp.net.prefixlen}", name_a=isp.wan, name_b="to-r")
            base = 128 + 4 * isp.index  # transit /30s in 203.0.113.128/26
            isp_side, net_side = f"203.0.113.{base + 1}", f"203.0.113.{base + 2}"
            lab.link(node, self.net, f"{isp_side}/30", f"{net_side}/30", name_a="to-net",
                     name_b=f"isp{isp.index + 1}")
            node.ip("route", "add", "default", "via", net_side)
            self.net.ip("route", "add", str(isp.net), "via", isp_side)
        if hash_l4:
            self.r.sysctl("net.ipv4.fib_multipath_hash_policy", 1)
        wans = ", ".join(isp.wan for isp in self.isps)
        self.r.nft(
            "table ip nat {\n"
            "  chain postrouting { type nat hook postrouting priority srcnat; policy accept;\n"
            f"    ip saddr {LAN_NET} oifname {{ {wans} }} masquerade\n"
            "  }\n}\n")
        self.daemon: LabProcess | None = None
        self.socket = run_dir / "routes.sock"
        self.config_path: Path | None = None

    def node_of(self, isp: Isp) -> Node:
        return self.isp_nodes[isp.index]

    def isp_of_source(self, src: str) -> Isp | None:
        addr = ipaddress.ip_address(src)
        for isp in self.isps:
            if addr in isp.net:
                return isp
        return None

    # ---- the daemon ------------------------------------------------------------------------
    def write_config(self, text: str, name: str = "routes.ip") -> Path:
        path = self.run_dir / name
        path.write_text(text)
        self.config_path = path
        return path

    def start_daemon(self, config: Path | None = None, *, profile: str | None = None,
                     extra_args: tuple[str, ...] = (), wait: float = 20.0) -> LabProcess:
        path = config or self.config_path
        if path is None:
            path = self.write_config(seed_config(self.isps))
        argv = [sys.executable, "-m", "ipshift", "-v", "routes", "run", "-c", str(path),
                "--socket", str(self.socket), *extra_args]
        if profile:
            argv += ["--profile", profile]
        env = {"PYTHONPATH": str(Path(__file__).resolve().parents[2]),
               "IPSHIFT_RUN_DIR": str(self.run_dir)}
        self.daemon = self.r.spawn(argv, name="ipshift-routes", env=env)
        self.wait_status(lambda st: bool(st.get("uplinks")) and all(
            u["state"] != "unknown" for u in st["uplinks"]), timeout=wait,
            what="the daemon to judge every uplink")
        return self.daemon

    def status(self) -> dict[str, Any]:
        doc: dict[str, Any] = request(self.socket, "status")
        return doc

    def wait_status(self, pred: Callable[[dict[str, Any]], bool], *, timeout: float,
                    what: str = "the daemon's status", interval: float = 0.02) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        last: dict[str, Any] = {}
        while True:
            if self.daemon is not None and not self.daemon.running():
                raise LabError(f"the routes daemon exited {self.daemon.poll()}: "
                               f"{self.daemon.stderr()[-2000:]}")
            try:
                last = self.status()
                if pred(last):
                    return last
            except (CtlError, OSError):
                pass
            if time.monotonic() > deadline:
                raise LabError(f"timed out after {timeout}s waiting for {what}; last status: "
                               f"{last.get('uplinks')}")
            time.sleep(interval)

    def uplink_state(self, st: dict[str, Any], name: str) -> str:
        for u in st["uplinks"]:
            if u["uplink"] == name:
                return str(u["state"])
        raise KeyError(name)

    def stop_daemon(self, timeout: float = 15.0) -> int | None:
        if self.daemon is None:
            return None
        rc = self.daemon.stop(timeout=timeout)
        return rc

    # ---- impairments -----------------------------------------------------------------------
    def silence(self, isp: Isp, on: bool = True, *, include_arp: bool = False) -> None:
        """The gateway stays up (and answers ARP) but forwards nothing: nft drop."""
        self.lab.impair(self.node_of(isp), "to-r", blackhole=on, include_arp=include_arp)

    def loss(self, isp: Isp, percent: int) -> None:
        self.lab.impair(self.node_of(isp), "to-r", loss_percent=percent)

    def carrier(self, isp: Isp, up: bool) -> None:
        """Carrier loss on the router's uplink: the far end of the veth goes down."""
        self.node_of(isp).link_set("to-r", "up" if up else "down")

    def flap_router_link(self, isp: Isp) -> None:
        """Administrative down/up on the router's side: the kernel deletes its routes."""
        self.r.link_set(isp.wan, "down")
        self.r.link_set(isp.wan, "up")

    def owned_routes(self, table: int | str) -> list[dict[str, Any]]:
        routes: list[dict[str, Any]] = self.r.ip_json("route", "show", "table", str(table),
                                                       "proto", "73")
        return routes


@dataclass
class FlowRecord:
    t: float
    seq: int
    src: str
    port: int


@dataclass
class UdpFlows:
    """Continuous UDP flows from the LAN host to the server, seen at the server: which source
    (NAT address, so which uplink) each datagram arrived with, and when."""

    client: Node
    server: Node
    n_flows: int = 1
    interval: float = 0.01
    server_addr: str = SERVER
    port: int = FLOW_PORT
    records: list[FlowRecord] = field(default_factory=list)
    sent: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)
    _socks: list[socket.socket] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> UdpFlows:
        def server_sock() -> socket.socket:
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.bind((self.server_addr, self.port))
            s.settimeout(0.2)
            return s

        def client_socks() -> list[socket.socket]:
            out = []
            for _ in range(self.n_flows):
                s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                s.bind(("0.0.0.0", 0))
                out.append(s)
            return out

        srv = self.server.call(server_sock)
        clients = self.client.call(client_socks)
        self._socks = [srv, *clients]
        rx = threading.Thread(target=self._receive, args=(srv,), daemon=True)
        tx = threading.Thread(target=self._send, args=(clients,), daemon=True)
        self._threads = [rx, tx]
        rx.start()
        tx.start()
        return self

    def _receive(self, s: socket.socket) -> None:
        while not self._stop.is_set():
            try:
                data, (src, sport) = s.recvfrom(2048)
            except TimeoutError:
                continue
            except OSError:
                return
            now = time.monotonic()
            try:
                seq = int(data.split(b" ", 1)[0])
            except ValueError:
                continue
            with self._lock:
                self.records.append(FlowRecord(now, seq, src, sport))

    def _send(self, socks: list[socket.socket]) -> None:
        seq = 0
        next_at = time.monotonic()
        while not self._stop.is_set():
            for s in socks:
                seq += 1
                try:
                    s.sendto(f"{seq} ipshift-flow".encode(), (self.server_addr, self.port))
                    self.sent += 1
                except OSError:
                    pass
            next_at += self.interval
            delay = next_at - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            else:
                next_at = time.monotonic()

    def since(self, t: float) -> list[FlowRecord]:
        with self._lock:
            return [r for r in self.records if r.t >= t]

    def wait(self, pred: Callable[[list[FlowRecord]], bool], *, since: float, timeout: float,
             what: str = "the flow") -> list[FlowRecord]:
        deadline = time.monotonic() + timeout
        while True:
            recs = self.since(since)
            if pred(recs):
                return recs
            if time.monotonic() > deadline:
                srcs = sorted({r.src for r in recs})
                raise LabError(f"timed out after {timeout}s waiting for {what} "
                               f"(sources since: {srcs}, {len(recs)} datagrams)")
            time.sleep(0.01)

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=2)
        for s in self._socks:
            s.close()


def capture(node: Node, ifname: str, path: Path) -> LabProcess:
    """tcpdump of what arrives on `ifname` (the router's packets, seen by the ISP)."""
    proc = node.spawn(["tcpdump", "-i", ifname, "-Q", "in", "-nn", "-U", "-w", str(path), "ip"],
                      name=f"tcpdump-{node.name}")
    proc.wait_ready("listening on", 20, "tcpdump")
    return proc


def pcap_sources(path: Path) -> list[str]:
    """IPv4 source addresses of every packet in a pcap file (Ethernet link type)."""
    import struct

    data = path.read_bytes()
    if len(data) < 24:
        return []
    magic = struct.unpack_from("<I", data)[0]
    endian = "<" if magic in (0xA1B2C3D4, 0xA1B23C4D) else ">"
    linktype = struct.unpack_from(endian + "I", data, 20)[0]
    offset = 24
    out = []
    while offset + 16 <= len(data):
        _, _, incl, _ = struct.unpack_from(endian + "IIII", data, offset)
        pkt = data[offset + 16: offset + 16 + incl]
        offset += 16 + incl
        ip = pkt[14:] if linktype == 1 else pkt
        if linktype == 1 and pkt[12:14] != b"\x08\x00":
            continue
        if len(ip) >= 20 and ip[0] >> 4 == 4:
            out.append(str(ipaddress.IPv4Address(ip[12:16])))
    return out


def require_root() -> None:
    if os.geteuid() != 0:
        raise LabError("needs root: builds network namespaces")
