"""The sacip lab: mover - router - peer, with the moves of docs/sacip.md and traffic that
tells whether a session lived through them. Used by tests/netns/test_sacip.py,
bench/bench_sacip.py and `ipshift demo sacip`.

    mover ==wired (mw/rw: 192.0.2.0/26, .64/26, .128/26; 2001:db8:1::/64, 2::/64)== router
    mover ==wifi  (mf/rf: 198.51.100.0/26; 2001:db8:3::/64)========================== router
    router -- lan switch -- peer (203.0.113.5, 2001:db8:9::5), peer2 (203.0.113.6: no sacip)
    (the peer can move within its subnet or to 198.51.100.128/26, 2001:db8:a::/64: move_peer)

After a move the router no longer has the mover's old subnet (its gateway address there is
deleted), so a session only lives on if it is remapped. The router does not track connections
until `router_firewall` gives it a stateful firewall, loose or strict (the documented limit).

Real programs: `start_sshd` (OpenSSH on the peer, key login only) with `SshSession` (lines
fed to a remote `read`/`echo` loop) or `Sshd.client_argv` for any command; `start_iperf3`;
`Stream` (TCP echo, plain or MPTCP: `SacipSite.enable_mptcp`) and `UdpFlow` (connected UDP).

    with Lab("sacip") as lab:
        site = build_site(lab, workdir)
        site.start(site.mover); site.start(site.peer)
        stream = Stream(site, 4)
        move_make_before_break(site, 4, 0, same_subnet=False, promote=False)
        site.wait_moved(site.mover, 1); stream.echoed_since(20)
"""

from __future__ import annotations

import json
import os
import select
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ipshift.lab.topology import Lab, LabError, LabProcess, Node

SACIP = [sys.executable, "-m", "ipshift", "sacip"]
PEER4, PEER6 = "203.0.113.5", "2001:db8:9::5"
NOSACIP4 = "203.0.113.6"
# per family: (address on the wired link, its gateway), in the order the mover moves through
WIRED = {4: [("192.0.2.10/26", "192.0.2.1/26"), ("192.0.2.70/26", "192.0.2.65/26"),
             ("192.0.2.130/26", "192.0.2.129/26")],
         6: [("2001:db8:1::10/64", "2001:db8:1::1/64"), ("2001:db8:2::10/64", "2001:db8:2::1/64"),
             ("2001:db8:4::10/64", "2001:db8:4::1/64")]}
SAME_SUBNET = {4: "192.0.2.11/26", 6: "2001:db8:1::11/64"}
WIFI = {4: ("198.51.100.10/26", "198.51.100.1/26"), 6: ("2001:db8:3::10/64", "2001:db8:3::1/64")}
# the peer's address and where it moves to: (its new address, the gateway there)
PEER_HOME = {4: f"{PEER4}/24", 6: f"{PEER6}/64"}
PEER_SAME_SUBNET = {4: ("203.0.113.50/24", "203.0.113.1/24"),
                    6: ("2001:db8:9::50/64", "2001:db8:9::1/64")}
PEER_OTHER_SUBNET = {4: ("198.51.100.130/26", "198.51.100.129/26"),
                     6: ("2001:db8:a::5/64", "2001:db8:a::1/64")}
ECHO_PORT, UDP_PORT = 7000, 7001
SSH_PORT, IPERF_PORT = 2222, 5201
WAIT = 15.0  # the longest any wait here takes
STALL_LIMIT = 5.0  # a session that does not move on within this is taken as dead


def bare(cidr: str) -> str:
    return cidr.split("/")[0]


def peer_of(family: int) -> str:
    return PEER4 if family == 4 else PEER6


@dataclass
class SacipSite:
    lab: Lab
    mover: Node
    router: Node
    peer: Node
    peer2: Node
    workdir: Path
    daemons: dict[str, LabProcess] = field(default_factory=dict)

    def socket(self, node: Node) -> str:
        return str(self.workdir / f"{node.name}.sock")

    def start(self, node: Node, *extra: str) -> LabProcess:
        state = self.workdir / node.name
        state.mkdir(exist_ok=True)
        proc = node.spawn([*SACIP, "run", "--socket", self.socket(node),
                           "--identity", str(state / "id.key"),
                           "--known-peers", str(state / "known.json"),
                           "--scan-interval", "0.2", "--no-syslog", "-v", *extra],
                          name=f"sacip-{node.name}")
        proc.wait_ready("sacip up", 20, f"sacip on {node.name}")
        self.daemons[node.name] = proc
        return proc

    def status(self, node: Node) -> dict[str, Any]:
        res = node.run([*SACIP, "status", "--socket", self.socket(node), "--json"])
        doc: dict[str, Any] = json.loads(res.stdout)
        return doc

    def wait_ready(self, node: Node, sessions: int, timeout: float = WAIT) -> None:
        """Until `node`'s daemon follows `sessions` sessions with every peer greeted."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            doc = self.status(node)
            peers = doc.get("peers", [])
            if doc.get("sessions_total", 0) >= sessions and peers and all(
                    p["state"] in ("ready", "no-sacip") for p in peers):
                return
            time.sleep(0.1)
        raise AssertionError(f"{node.name} never got ready: {self.status(node)}")

    def wait_moved(self, node: Node, moved: int) -> dict[str, Any]:
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline:
            doc = self.status(node)
            if doc["moved"] + doc["not_preservable"] >= moved and not doc["pending"]:
                return doc
            time.sleep(0.1)
        raise AssertionError(f"{node.name}: no move finished: {self.status(node)}")

    def router_firewall(self, *, strict: bool) -> None:
        """A stateful firewall on the router (nft table inet lab_firewall: `ct state invalid
        drop` on forward). Loose, as routers are by default: conntrack picks up TCP it meets
        mid-stream (`nf_conntrack_tcp_loose=1`), loose reverse-path check (`rp_filter=2`).
        Strict, the documented limit: no mid-stream pickup (`nf_conntrack_tcp_loose=0`), strict
        reverse-path check (`rp_filter=1`, and `fib saddr . iif oif missing drop` for IPv6)."""
        rpf = "  fib saddr . iif oif missing counter drop\n" if strict else ""
        # the mode before the table: conntrack starts tracking with the table, and a flow it
        # picked up loosely in between would stay established
        self.router.sysctl("net.netfilter.nf_conntrack_tcp_loose", 0 if strict else 1)
        for conf in ("all", "default", "rw", "rf", "rp"):
            self.router.sysctl(f"net.ipv4.conf.{conf}.rp_filter", 1 if strict else 2)
        self.router.nft("table inet lab_firewall {\n"
                        " chain prerouting {\n  type filter hook prerouting priority 0;\n"
                        f"{rpf} }}\n"
                        " chain forward {\n  type filter hook forward priority 0;\n"
                        "  ct state invalid counter drop\n }\n}\n")

    def enable_mptcp(self) -> None:
        """MPTCP with the in-kernel path manager at both ends: `sysctl net.mptcp.enabled=1`,
        `ip mptcp limits set subflow 2 add_addr_accepted 2`, no endpoints yet."""
        for node in (self.mover, self.peer):
            node.sysctl("net.mptcp.enabled", 1)
            node.ip("mptcp", "limits", "set", "subflow", "2", "add_addr_accepted", "2")
            node.ip("mptcp", "endpoint", "flush")

    def mptcp_endpoint_add(self, node: Node, address: str, dev: str,
                           flag: str = "subflow") -> None:
        """`ip mptcp endpoint add ADDRESS dev DEV FLAG` (`subflow` on the client: it opens a
        subflow from there; `signal` on the server: it announces the address)."""
        node.ip("mptcp", "endpoint", "add", bare(address), "dev", dev, flag)

    def mptcp_endpoint_delete(self, node: Node, address: str) -> None:
        """`ip mptcp endpoint delete id ID` for ADDRESS's endpoint: its subflows close and the
        other end is told (REMOVE_ADDR)."""
        for endpoint in node.ip_json("mptcp", "endpoint", "show"):
            if endpoint.get("address") == bare(address):
                node.ip("mptcp", "endpoint", "delete", "id", str(endpoint["id"]))
                return
        raise LabError(f"{node.name} has no MPTCP endpoint {bare(address)}")


def build_site(lab: Lab, workdir: Path) -> SacipSite:
    mover, router = lab.host("mover"), lab.router("router")
    peer, peer2 = lab.host("peer"), lab.host("peer2")
    lab.link(mover, router, [WIRED[4][0][0]], [gw for _a, gw in WIRED[4]],
             name_a="mw", name_b="rw")
    lab.link(mover, router, [], [WIFI[4][1]], name_a="mf", name_b="rf")
    switch = lab.switch("lan")
    lab.link(router, switch, ["203.0.113.1/24"], None, name_a="rp")
    lab.link(peer, switch, [f"{PEER4}/24"], None, name_a="pr")
    lab.link(peer2, switch, [f"{NOSACIP4}/24"], None, name_a="pr")
    mover.ip_batch([f"addr add {WIRED[6][0][0]} dev mw nodad",
                    f"route add default via {bare(WIRED[4][0][1])}",
                    f"route add default via {bare(WIRED[6][0][1])}"])
    router.ip_batch([f"addr add {gw} dev rw nodad" for _a, gw in WIRED[6]]
                    + [f"addr add {WIFI[6][1]} dev rf nodad",
                       "addr add 2001:db8:9::1/64 dev rp nodad",
                       f"addr add {PEER_OTHER_SUBNET[4][1]} dev rp",
                       f"addr add {PEER_OTHER_SUBNET[6][1]} dev rp nodad"])
    peer.ip_batch([f"addr add {PEER6}/64 dev pr nodad", "route add default via 203.0.113.1",
                   "route add default via 2001:db8:9::1"])
    peer2.ip_batch(["route add default via 203.0.113.1"])
    return SacipSite(lab, mover, router, peer, peer2, workdir)


# --- moves -----------------------------------------------------------------------------------
def forget_subnet(site: SacipSite, gateway: str) -> None:
    """The router no longer has the old subnet: only a remap keeps a session alive."""
    site.router.ip("addr", "del", gateway, "dev", "rw")


def move_make_before_break(site: SacipSite, family: int, step: int, *, same_subnet: bool,
                           promote: bool) -> str:
    """The seed's procedure: `ip addr add NEW`, `ip addr del OLD`."""
    old, old_gw = WIRED[family][step]
    new, new_gw = (SAME_SUBNET[family], old_gw) if same_subnet else WIRED[family][step + 1]
    if family == 4:
        site.mover.sysctl("net.ipv4.conf.mw.promote_secondaries", int(promote))
    site.mover.ip_batch([f"addr add {new} dev mw" + (" nodad" if family == 6 else ""),
                         f"route replace default via {bare(new_gw)}",
                         f"addr del {old} dev mw"])
    if not same_subnet:
        forget_subnet(site, old_gw)
    return bare(new)


def move_break_before_make(site: SacipSite, family: int, step: int, gap: float = 0.5) -> str:
    """The old address is lost first (and its route with it); a new one comes `gap` later:
    `ip addr del OLD dev mw` (IPv4 drops the default route with it; for IPv6 also `ip route
    del default via OLD_GW`, as a lost lease takes it), `gap` seconds, then `ip addr add NEW
    dev mw` and `ip route replace default via NEW_GW`."""
    old, old_gw = WIRED[family][step]
    new, new_gw = WIRED[family][step + 1]
    site.mover.ip_batch([f"addr del {old} dev mw"]
                        + ([f"route del default via {bare(old_gw)}"] if family == 6 else []))
    forget_subnet(site, old_gw)
    time.sleep(gap)
    site.mover.ip_batch([f"addr add {new} dev mw" + (" nodad" if family == 6 else ""),
                         f"route replace default via {bare(new_gw)}"])
    return bare(new)


def move_to_wifi(site: SacipSite, family: int, step: int = 0) -> str:
    """Wired to Wi-Fi: the new address on the other interface and the default route with
    it, then the wired address (the `step`th) deleted."""
    old, old_gw = WIRED[family][step]
    new, new_gw = WIFI[family]
    site.mover.ip_batch([f"addr add {new} dev mf" + (" nodad" if family == 6 else ""),
                         f"route replace default via {bare(new_gw)} dev mf",
                         f"addr del {old} dev mw"])
    forget_subnet(site, old_gw)
    return bare(new)


def move_peer(site: SacipSite, family: int, *, other_subnet: bool) -> str:
    """The peer moves make-before-break (promote_secondaries on): `ip addr add NEW dev pr`,
    `ip route replace default via GW`, `ip addr del 203.0.113.5/24|2001:db8:9::5/64 dev pr`.
    Its old subnet stays routed (peer2 is on it)."""
    old = PEER_HOME[family]
    new, new_gw = (PEER_OTHER_SUBNET if other_subnet else PEER_SAME_SUBNET)[family]
    if family == 4:
        site.peer.sysctl("net.ipv4.conf.pr.promote_secondaries", 1)
    site.peer.ip_batch([f"addr add {new} dev pr" + (" nodad" if family == 6 else ""),
                        f"route replace default via {bare(new_gw)}",
                        f"addr del {old} dev pr"])
    return bare(new)


# --- traffic -----------------------------------------------------------------------------------
class Stream:
    """A TCP connection mover -> peer echo server (threads in this process, sockets in the
    namespaces): numbered lines every 5 ms, each echoed back; `stop` says what came back.
    With `mptcp`, both sockets are IPPROTO_MPTCP (see SacipSite.enable_mptcp)."""

    def __init__(self, site: SacipSite, family: int, server: str | None = None, *,
                 mptcp: bool = False) -> None:
        fam = socket.AF_INET if family == 4 else socket.AF_INET6
        proto = socket.IPPROTO_MPTCP if mptcp else 0
        host = server or peer_of(family)
        server_node = site.peer if host in (PEER4, PEER6) else site.peer2

        def listen() -> socket.socket:
            s = socket.socket(fam, socket.SOCK_STREAM, proto)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((host, ECHO_PORT))
            s.listen(1)
            return s

        self.listener = server_node.call(listen)

        def connect() -> socket.socket:
            c = socket.socket(fam, socket.SOCK_STREAM, proto)
            c.settimeout(5)
            c.connect((host, ECHO_PORT))
            c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return c

        self.client = site.mover.call(connect)
        self.conn, _ = self.listener.accept()
        self.conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.stopping = threading.Event()
        self.sent = 0
        self.echoed = b""
        self.errors: list[str] = []
        self.longest_gap = 0.0
        self.threads = [threading.Thread(target=self._echo, daemon=True),
                        threading.Thread(target=self._send, daemon=True),
                        threading.Thread(target=self._receive, daemon=True)]
        for t in self.threads:
            t.start()

    def _echo(self) -> None:
        try:
            while True:
                data = self.conn.recv(65536)
                if not data:
                    return
                self.conn.sendall(data)
        except OSError as exc:
            self.errors.append(f"server: {exc}")

    def _send(self) -> None:
        try:
            while not self.stopping.is_set() and self.sent < 20000:
                self.client.sendall(b"%08d\n" % self.sent)
                self.sent += 1
                time.sleep(0.005)
        except OSError as exc:
            self.errors.append(f"client send: {exc}")

    def _receive(self) -> None:
        last = time.monotonic()
        self.client.settimeout(0.2)
        while True:
            try:
                data = self.client.recv(65536)
            except TimeoutError:
                quiet = time.monotonic() - last
                # once stopping, wait for the echoes still due, but not on a dead session
                if self.stopping.is_set() and (len(self.echoed) >= 9 * self.sent
                                               or quiet > STALL_LIMIT):
                    return
                if quiet > WAIT:
                    return
                continue
            except OSError as exc:
                self.errors.append(f"client receive: {exc}")
                return
            if not data:
                return
            now = time.monotonic()
            self.longest_gap = max(self.longest_gap, now - last)
            last = now
            self.echoed += data

    def echoed_since(self, count: int, timeout: float = STALL_LIMIT) -> bool:
        """Do echoes arrive for `count` more lines within `timeout`?"""
        target = len(self.echoed) + 9 * count
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if len(self.echoed) >= target:
                return True
            time.sleep(0.02)
        return False

    def stop(self) -> None:
        self.stopping.set()
        for t in self.threads[1:]:
            t.join(WAIT)
        for s in (self.client, self.conn, self.listener):
            s.close()
        self.threads[0].join(WAIT)

    def assert_whole(self) -> None:
        assert not self.errors, self.errors
        expected = b"".join(b"%08d\n" % i for i in range(self.sent))
        assert self.echoed == expected, (len(self.echoed), len(expected))


class UdpFlow:
    """A connected UDP flow: the mover's socket connected to the peer's, which connects back
    on the first datagram (as a UDP application with sessions does)."""

    def __init__(self, site: SacipSite, family: int) -> None:
        fam = socket.AF_INET if family == 4 else socket.AF_INET6
        host = peer_of(family)

        def server() -> socket.socket:
            s = socket.socket(fam, socket.SOCK_DGRAM)
            s.bind((host, UDP_PORT))
            return s

        self.server = site.peer.call(server)

        def client() -> socket.socket:
            c = socket.socket(fam, socket.SOCK_DGRAM)
            c.connect((host, UDP_PORT))
            return c

        self.client = site.mover.call(client)
        self.client.send(b"hello")
        _data, address = self.server.recvfrom(100)
        self.server.connect(address)

    def exchange(self, rounds: int = 20) -> int:
        """Datagrams that made the round trip out of `rounds`."""
        ok = 0
        for i in range(rounds):
            self.client.send(b"ping %d" % i)
            if select.select([self.server], [], [], 0.5)[0]:
                self.server.send(self.server.recv(100))
                if select.select([self.client], [], [], 0.5)[0]:
                    self.client.recv(100)
                    ok += 1
        return ok

    def close(self) -> None:
        self.client.close()
        self.server.close()


# --- real programs ---------------------------------------------------------------------------
SSH_ECHO_LOOP = 'while read -r line; do echo "$line"; done'


@dataclass
class Sshd:
    """OpenSSH's sshd on the peer (both addresses, SSH_PORT): key login as root only, no
    PAM, no passwords; `keys` holds its host key, the client key and the config."""

    process: LabProcess
    keys: Path

    def client_argv(self, command: str, family: int = 4) -> list[str]:
        """`ssh` to the peer as root with the generated key, running `command`."""
        return ["ssh", "-i", str(self.keys / "client"), "-p", str(SSH_PORT),
                "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
                "-o", "BatchMode=yes", f"root@{peer_of(family)}", command]

    def stop(self) -> int:
        return self.process.stop()


def start_sshd(site: SacipSite, keys: Path) -> Sshd:
    """Generate a host key and a client key into `keys` (a new directory), write the config
    there and start `sshd -D -e -f CONFIG` in the peer; returns once it listens."""
    keys.mkdir()
    site.peer.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(keys / "host")])
    site.mover.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(keys / "client")])
    (keys / "authorized_keys").write_text((keys / "client.pub").read_text())
    config = keys / "sshd_config"
    # StrictModes off: the key files live in a temporary directory, not a home directory
    config.write_text(f"ListenAddress {PEER4}\nListenAddress {PEER6}\nPort {SSH_PORT}\n"
                      f"HostKey {keys / 'host'}\nAuthorizedKeysFile {keys / 'authorized_keys'}\n"
                      "PermitRootLogin prohibit-password\nPasswordAuthentication no\n"
                      "KbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\n"
                      "PidFile none\n")
    os.makedirs("/run/sshd", exist_ok=True)  # sshd's privilege separation directory
    process = site.peer.spawn(["/usr/sbin/sshd", "-D", "-e", "-f", str(config)], name="sshd")
    try:
        site.peer.wait_listening(SSH_PORT)
    except LabError:
        process.stop()
        raise LabError(f"sshd did not start: {process.stderr().strip()[-300:]}") from None
    return Sshd(process, keys)


class SshSession:
    """An ssh session from the mover running a `read`/`echo` loop on the peer; its stdin is a
    FIFO this object writes lines into, so a test sends a line and waits for its echo."""

    def __init__(self, site: SacipSite, sshd: Sshd, family: int = 4) -> None:
        fifo = sshd.keys / f"stdin-{len(list(sshd.keys.glob('stdin-*')))}"
        os.mkfifo(fifo)
        # read-write: opening does not wait for the reader, and closing it is the EOF
        self._stdin: int | None = os.open(fifo, os.O_RDWR)
        self.process = site.mover.spawn(
            ["sh", "-c", 'exec "$@" < "$0"', str(fifo),
             *sshd.client_argv(SSH_ECHO_LOOP, family)], name=f"ssh-{family}")

    def send(self, line: str) -> None:
        assert self._stdin is not None, "the session's input is closed"
        os.write(self._stdin, line.encode() + b"\n")

    def echoed(self, line: str, timeout: float = WAIT) -> bool:
        """Has `line` come back (within `timeout`)?"""
        return self.process.wait_for_output(line + "\n", timeout, stream="stdout")

    def close(self) -> int:
        """End the input (the remote loop ends, ssh exits); the exit status."""
        if self._stdin is not None:
            os.close(self._stdin)
            self._stdin = None
        try:
            return self.process.wait(timeout=WAIT)
        finally:
            self.process.stop()


@dataclass
class Iperf3:
    """A one-off iperf3 server on the peer and its client on the mover."""

    server: LabProcess
    client: LabProcess
    seconds: int

    def report(self) -> dict[str, Any]:
        """The client's JSON report, once it has finished (it must succeed)."""
        status = self.client.wait(timeout=self.seconds + 30)
        if status != 0:
            raise LabError(f"iperf3 client exited {status}: {self.client.stdout()[-500:]}")
        doc: dict[str, Any] = json.loads(self.client.stdout())
        return doc

    def stop(self) -> None:
        self.client.stop()
        self.server.stop()


def start_iperf3(site: SacipSite, seconds: int, *extra: str, family: int = 4,
                 port: int = IPERF_PORT) -> Iperf3:
    """`iperf3 -s -1 -B PEER -J` on the peer, then `iperf3 -c PEER -t SECONDS -J EXTRA...` on
    the mover (a one-off server is gone after a failed attempt: the client waits for it)."""
    host = peer_of(family)
    server = site.peer.spawn(["iperf3", "-s", "-1", "-B", host, "-p", str(port), "-J"],
                             name="iperf3-server")
    try:
        site.peer.wait_listening(port)
        client = site.mover.spawn(["iperf3", "-c", host, "-p", str(port), "-t", str(seconds),
                                   "-J", *extra], name="iperf3-client")
    except BaseException:
        server.stop()
        raise
    return Iperf3(server, client, seconds)
