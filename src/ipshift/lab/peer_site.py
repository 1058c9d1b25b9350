"""A tunnel gateway with many peers behind it: the peer table's lab.

    lan --(198.51.100.0/26, 2001:db8:10::/64)-- gw
    gw, p1, p2, p3, x, far on one underlay segment (a bridge, 192.0.2.0/24)
    pN --(198.51.100.64N/26, 2001:db8:1N::/64)-- hN              (N = 1, 2, 3)

gw runs `ipshift tunnel run --peers FILE` with p1-p3 as UDP peers, p3 authenticated with a key
file made by `ipshift tunnel keygen`, and two peers that `far` plays with scapy: an IP-in-IP
peer at 192.0.2.31 (203.0.113.16/28, 2001:db8:31::/64) and a GRE peer with key 7 at
192.0.2.32 (203.0.113.32/28, 2001:db8:32::/64); far also has 192.0.2.33, which is no peer's.
p1 and p2 run `--remote` tunnels back to gw, p3 a one-peer `--peers` tunnel (a key is given in
a peers file); each serves its own branch network. x is an attacker on the segment.

Every link toward an inner host (lan, hN) has checksum offload off on the router's side, so
the router completes the checksums of packets the tunnel wrote with a partial checksum in
software, and a wrong one shows at the host as a checksum error. All tunnel MTUs are 1400
(room for the key's 28 bytes at every end) and so are the inner links', so no path MTU
discovery runs under a test's traffic.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from ipshift.ctl.client import request
from ipshift.lab.topology import Lab, LabError, LabProcess, Node

PORT = 4789
TUNNEL_MTU = 1400
GATEWAY = "192.0.2.1"
ATTACKER = "192.0.2.66"
LAN = "198.51.100.1"  # the host behind the gateway
LAN_OTHER = "198.51.100.2"  # its second address (for flows apart from the main ones)
LAN6 = "2001:db8:10::1"
LAN_PREFIXES = ("198.51.100.0/26", "2001:db8:10::/64")
GATEWAY_DEV = "tun-gw"


@dataclass(frozen=True)
class Branch:
    """A UDP peer of the gateway and the network behind it."""

    index: int  # 1..3
    router: Node  # pN: runs the peer's tunnel
    host: Node  # hN: the branch network's host
    keyed: bool

    @property
    def name(self) -> str:
        return self.router.name

    @property
    def underlay(self) -> str:
        return f"192.0.2.1{self.index}"

    @property
    def endpoint(self) -> str:
        return f"{self.underlay}:{PORT}"

    @property
    def prefixes(self) -> tuple[str, str]:
        return (f"198.51.100.{64 * self.index}/26", f"2001:db8:1{self.index}::/64")

    @property
    def address(self) -> str:
        """The branch host's IPv4 address."""
        return f"198.51.100.{64 * self.index + 1}"

    @property
    def address6(self) -> str:
        return f"2001:db8:1{self.index}::1"

    @property
    def dev(self) -> str:
        return f"tun-{self.name}"


@dataclass(frozen=True)
class RawPeer:
    """A peer that speaks IP-in-IP or GRE, played by `far` with scapy."""

    name: str
    encapsulation: str
    underlay: str
    prefixes: tuple[str, str]
    address: str  # a host in its IPv4 network
    address6: str  # ... and in its IPv6 network
    gre_key: int | None = None


RAW_PEERS = (
    RawPeer("legacy-ipip", "ipip", "192.0.2.31", ("203.0.113.16/28", "2001:db8:31::/64"),
            "203.0.113.17", "2001:db8:31::1"),
    RawPeer("legacy-gre", "gre", "192.0.2.32", ("203.0.113.32/28", "2001:db8:32::/64"),
            "203.0.113.33", "2001:db8:32::1", gre_key=7),
)
FAR_OTHER = "192.0.2.33"  # an address of far that is no peer's


@dataclass
class Tunnels:
    """The running tunnel ends of a PeerSite: the gateway's and one per branch."""

    gateway: LabProcess
    branches: dict[str, LabProcess]

    def all(self) -> list[LabProcess]:
        return [self.gateway, *self.branches.values()]


class PeerSite:
    """The star topology above; `start()` runs every tunnel end and waits until each is up."""

    TUNNEL: ClassVar[list[str]] = [sys.executable, "-m", "ipshift", "tunnel"]

    def __init__(self, lab: Lab, workdir: Path) -> None:
        self.lab = lab
        self.workdir = workdir
        workdir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._serial = 0
        self.switch = lab.switch("u")
        self.gw, self.lan = lab.router("gw"), lab.host("lan")
        self.underlay_ifname = lab.link(self.switch, self.gw, None,
                                        f"{GATEWAY}/24").end(self.gw).ifname
        inner = lab.link(self.gw, self.lan, "198.51.100.62/26", [f"{LAN}/26", f"{LAN_OTHER}/26"],
                         v6=("2001:db8:10::ff/64", f"{LAN6}/64"), mtu=TUNNEL_MTU)
        self.lan.route_add("default", "via", "198.51.100.62")
        self.lan.route_add("default", "via", "2001:db8:10::ff")
        self._software_checksums(self.gw, inner.end(self.gw).ifname)
        self.branches: list[Branch] = []
        for index in (1, 2, 3):
            router, host = lab.router(f"p{index}"), lab.host(f"h{index}")
            branch = Branch(index, router, host, keyed=index == 3)
            lab.link(self.switch, router, None, f"{branch.underlay}/24")
            first4 = f"198.51.100.{64 * index + 62}"
            link = lab.link(router, host, f"{first4}/26", f"{branch.address}/26",
                            v6=(f"2001:db8:1{index}::ff/64", f"{branch.address6}/64"),
                            mtu=TUNNEL_MTU)
            host.route_add("default", "via", first4)
            host.route_add("default", "via", f"2001:db8:1{index}::ff")
            self._software_checksums(router, link.end(router).ifname)
            self.branches.append(branch)
        self.attacker = lab.host("x")
        lab.link(self.switch, self.attacker, None, f"{ATTACKER}/24")
        self.far = lab.host("far")
        lab.link(self.switch, self.far, None,
                 [f"{peer.underlay}/24" for peer in RAW_PEERS] + [f"{FAR_OTHER}/24"])
        self.key_file = workdir / "p3.key"
        if not self.key_file.exists():
            self.gw.run([*self.TUNNEL, "keygen", str(self.key_file)], timeout=30)
        self.peers_file = workdir / "gw-peers.toml"
        self.peers_file.write_text(self.peers_toml())
        # Neighbours resolved up front, so that no first packet of a test waits in a queue.
        for node, source in ((self.attacker, ATTACKER), (self.far, FAR_OTHER),
                             *((self.far, peer.underlay) for peer in RAW_PEERS),
                             *((b.router, b.underlay) for b in self.branches)):
            node.run(["ping", "-c", "1", "-W", "2", "-I", source, GATEWAY], timeout=10)

    @staticmethod
    def _software_checksums(router: Node, ifname: str) -> None:
        router.run(["ethtool", "-K", ifname, "tx", "off"])

    def branch(self, name: str) -> Branch:
        return next(b for b in self.branches if b.name == name)

    # --- peers files ------------------------------------------------------------------------
    def peers_toml(self) -> str:
        """The gateway's peers file: the three branches and the two raw peers."""
        tables = []
        for branch in self.branches:
            text = (f'[[peer]]\nname = "{branch.name}"\nendpoint = "{branch.endpoint}"\n'
                    f"prefixes = {json.dumps(list(branch.prefixes))}\n")
            if branch.keyed:
                text += f'key_file = "{self.key_file.name}"\n'  # beside the peers file
            tables.append(text)
        for peer in RAW_PEERS:
            text = (f'[[peer]]\nname = "{peer.name}"\nendpoint = "{peer.underlay}"\n'
                    f'encapsulation = "{peer.encapsulation}"\n'
                    f"prefixes = {json.dumps(list(peer.prefixes))}\n")
            if peer.gre_key is not None:
                text += f"gre_key = {peer.gre_key}\n"
            tables.append(text)
        return "\n".join(tables)

    def branch_peers_file(self, branch: Branch) -> Path:
        """A keyed branch's own peers file: the gateway as its one peer, with the key."""
        path = self.workdir / f"{branch.name}-peers.toml"
        path.write_text(f'[[peer]]\nname = "gw"\nendpoint = "{GATEWAY}:{PORT}"\n'
                        f"prefixes = {json.dumps(list(LAN_PREFIXES))}\n"
                        f'key_file = "{self.key_file.name}"\n')
        return path

    # --- running ----------------------------------------------------------------------------
    def _socket(self, node: Node) -> Path:
        self._serial += 1
        return self.workdir / f"{node.name}-{self._serial}.sock"

    def _spawn(self, node: Node, args: list[str], what: str) -> LabProcess:
        socket = self._socket(node)
        proc = node.spawn([*self.TUNNEL, "run", *args, "--mtu", str(TUNNEL_MTU),
                           "--socket", str(socket)], name=f"tunnel-{node.name}")
        proc.wait_ready(" up: ", 30, what)
        return proc

    def start_gateway(self, *extra: str) -> LabProcess:
        routes = [p for b in self.branches for p in b.prefixes]
        routes += [p for peer in RAW_PEERS for p in peer.prefixes]
        args = ["--dev", GATEWAY_DEV, "--local", f"{GATEWAY}:{PORT}",
                "--peers", str(self.peers_file)]
        for prefix in LAN_PREFIXES:
            args += ["--serve", prefix]
        for prefix in routes:
            args += ["--route", prefix]
        return self._spawn(self.gw, [*args, *extra], "the gateway's tunnel")

    def start_branch(self, branch: Branch, *extra: str) -> LabProcess:
        args = ["--dev", branch.dev, "--local", branch.endpoint]
        if branch.keyed:
            args += ["--peers", str(self.branch_peers_file(branch))]
        else:
            args += ["--remote", f"{GATEWAY}:{PORT}"]
        for prefix in LAN_PREFIXES:
            args += ["--route", prefix]
        for prefix in branch.prefixes:
            args += ["--serve", prefix]
        return self._spawn(branch.router, [*args, *extra], f"{branch.name}'s tunnel")

    def start(self) -> Tunnels:
        """Every tunnel end, up; on a failure the ends already started are stopped."""
        started: list[LabProcess] = []
        try:
            gateway = self.start_gateway()
            started.append(gateway)
            branches = {}
            for branch in self.branches:
                branches[branch.name] = self.start_branch(branch)
                started.append(branches[branch.name])
        except BaseException:
            for proc in started:
                proc.stop()
            raise
        return Tunnels(gateway, branches)

    # --- asking and changing a running tunnel -------------------------------------------------
    @staticmethod
    def socket_of(proc: LabProcess) -> str:
        return next(arg for arg in proc.argv if arg.endswith(".sock"))

    def tunnel_command(self, proc: LabProcess, *args: str) -> Any:
        """`ipshift tunnel ARGS --socket S --json` for the tunnel `proc` runs; its JSON."""
        res = proc.node.run([*self.TUNNEL, *args, "--socket", self.socket_of(proc), "--json"],
                            timeout=30, check=False)
        if res.returncode != 0:
            raise LabError(f"ipshift tunnel {' '.join(args)} exited {res.returncode}: "
                           f"{(res.stderr or res.stdout).strip()}")
        return json.loads(res.stdout)

    def peers(self, proc: LabProcess) -> dict[str, Any]:
        """`ipshift tunnel peers --json`: every peer with its counters, and the drops."""
        doc: dict[str, Any] = self.tunnel_command(proc, "peers")
        return doc

    def peer_counters(self, proc: LabProcess) -> dict[str, dict[str, int]]:
        """Each peer's counters, by name."""
        return {peer["name"]: peer["counters"] for peer in self.peers(proc)["peers"]}

    def counters(self, proc: LabProcess) -> dict[str, int]:
        """The whole tunnel's counters (`ipshift tunnel status --json`)."""
        counters: dict[str, int] = self.tunnel_command(proc, "status", "--dev", "x")["counters"]
        return counters

    def call(self, proc: LabProcess, method: str, **params: Any) -> Any:
        """Call a control method of the tunnel `proc` runs, from this process: no program to
        start, so a change lands within a stream's lifetime even on a busy machine."""
        return request(Path(self.socket_of(proc)), method, **params)
