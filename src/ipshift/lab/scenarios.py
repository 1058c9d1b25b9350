"""Ready-made lab scenarios shared by the tests, the benchmarks and the demo."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any, ClassVar

from ipshift.lab.topology import Lab, LabError, LabProcess, Node

CONTRIB = Path(__file__).resolve().parents[3] / "contrib"


class DialupSite:
    """A home host (or masquerading router with a LAN host) on a demand-dial link to an ISP.

        home --ppp0 (dial on demand: placeholder 192.0.2.99, pool 203.0.113.100-199)-- isp
        isp: dnsmasq on 203.0.113.53 (and 2001:db8:53::53) answering `name`, a TCP echo on :7
        lan (optional): 192.0.2.10 behind home, masqueraded on ppp0

    pppd's ip-up is the contrib script (`contrib/resend/ppp-ip-up.sh`), which calls
    ip_resend_wakeup; `run_dir` keeps this site's control sockets apart from the machine's.
    """

    NAME = "www.example.test"
    A = "198.51.100.80"
    AAAA = "2001:db8:80::80"
    DNS4 = "203.0.113.53"
    DNS6 = "2001:db8:53::53"
    PLACEHOLDER = "192.0.2.99"

    def __init__(
        self,
        lab: Lab,
        run_dir: Path,
        *,
        v6: bool = False,
        lan: bool = False,
        idle: float = 0.0,
        delay: float = 1.0,
        ip_up: Path | None = None,
        ip_down: Path | None = None,
        rexmit: bool = False,
    ) -> None:
        self.lab = lab
        self.run_dir = run_dir
        run_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.env = {
            "IPSHIFT_RUN_DIR": str(run_dir),
            "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}",
        }
        self.home, self.isp = lab.host("home"), lab.host("isp")
        self.isp.ip("addr", "add", f"{self.DNS4}/32", "dev", "lo")
        listen = [f"--listen-address={self.DNS4}"]
        if v6:
            self.isp.ip("-6", "addr", "add", f"{self.DNS6}/128", "dev", "lo", "nodad")
            listen.append(f"--listen-address={self.DNS6}")
        self.dns = self.isp.spawn([
            "dnsmasq", "--no-daemon", "--no-resolv", "--no-hosts", "--bind-interfaces",
            *listen, f"--host-record={self.NAME},{self.A},{self.AAAA}", "--log-queries",
            "--pid-file=", "--user=root",
        ], name="dnsmasq")
        self.echo = self.isp.spawn(
            ["socat", f"TCP-LISTEN:7,bind={self.DNS4},fork,reuseaddr", "EXEC:cat"], name="echo"
        )
        self.home.set_resolv_conf(f"nameserver {self.DNS4}\n")
        hook = ip_up or CONTRIB / "resend" / "ppp-ip-up.sh"
        args = ["--delay", str(delay), "--ip-up", str(hook), "--idle", str(idle)]
        if ip_down is not None:
            args += ["--ip-down", str(ip_down)]
        if rexmit:
            args.append("--rexmit")
        if v6:
            args += ["--placeholder6", "2001:db8:ffff::99",
                     "--pool6", "2001:db8:100::10-2001:db8:100::ff"]
        self.lan: Node | None = None
        if lan:
            self.lan = lab.host("lan")
            lab.link(self.lan, self.home, "192.0.2.10/24", "192.0.2.1/24")
            self.lan.ip("route", "add", "default", "via", "192.0.2.1")
            self.lan.set_resolv_conf(f"nameserver {self.DNS4}\n")
            self.home.sysctl("net.ipv4.ip_forward", 1)
            self.home.nft('table ip masq {\n chain post {\n'
                          '  type nat hook postrouting priority 100;\n'
                          '  oifname "ppp0" masquerade\n }\n}\n')
        self.dialup = lab.dialup(self.home, self.isp, *args, env=self.env)
        if not self.dns.wait_for_output("started", timeout=10) and not self.dns.running():
            raise LabError(f"dnsmasq did not start: {self.dns.stderr()}")

    def start_resend(self, *extra: str, timeout: float = 15) -> LabProcess:
        proc = self.home.spawn([sys.executable, "-m", "ipshift", "resend", "run", "-o", "ppp0",
                                "-d", "1", *extra], env=self.env, name="ip_resend")
        proc.wait_ready("armed", timeout, "ip_resend")
        return proc

    def status(self) -> dict[str, Any] | None:
        res = self.home.run([sys.executable, "-m", "ipshift", "resend", "status", "-o", "ppp0",
                             "--json"], env=self.env, check=False)
        if res.returncode != 0:
            return None
        doc: dict[str, Any] = json.loads(res.stdout)
        return doc

    def wait_resend_state(self, state: str, timeout: float = 10) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            doc = self.status()
            if doc and doc.get("state") == state:
                return True
            time.sleep(0.05)
        return False

    def dial_events(self, word: str) -> int:
        return self.dialup.stdout().count(f"dialup: {word}")

    def wait_dial_events(self, word: str, count: int, timeout: float = 15) -> bool:
        deadline = time.monotonic() + timeout
        while self.dial_events(word) < count:
            if time.monotonic() > deadline or not self.dialup.running():
                return False
            time.sleep(0.02)
        return True

    def hang_up(self, timeout: float = 10) -> None:
        """Hang up now (as an idle timeout would) and wait until the link is down."""
        before = self.dial_events("down")
        self.dialup.signal(10)  # SIGUSR1
        if not self.wait_dial_events("down", before + 1, timeout):
            raise LabError("the dial-up emulator did not hang up")

    def queries_from(self, addr: str) -> list[str]:
        return [line for line in self.dns.stderr().splitlines()
                if "query[" in line and f"from {addr}" in line]

    def timed(self, node: Node, argv: list[str], timeout: float = 30) -> tuple[float, str]:
        """Run argv in `node` and measure its duration inside the namespace (no exec costs)."""
        code = (
            "import subprocess, sys, time\n"
            "t = time.monotonic()\n"
            "r = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
            "print(round(time.monotonic() - t, 4), r.returncode, r.stdout.replace(chr(10), ' '))\n"
        )
        res = node.run([sys.executable, "-c", code, *argv], timeout=timeout)
        seconds, rc, out = res.stdout.split(" ", 2)
        return float(seconds), out.strip() if int(rc) == 0 else ""




class TunnelSite:
    """Two sites joined by the user-space tunnel across a routed underlay:

        h1 --(198.51.100.0/26, 2001:db8:a::/64)-- g1 ==(192.0.2.0/25 - r - 192.0.2.128/25)== g2
        g2 --(198.51.100.64/26, 2001:db8:b::/64)-- h2

    Software checksumming (`tx off`) on every forwarded hop toward a host and in the underlay, so a
    wrong partial-checksum rule shows up as drops; GRO on the underlay ends, so datagrams arrive
    as UDP_GRO batches. `start_tunnel(g1|g2)` runs `ipshift tunnel run` with the inner routes.
    """

    TUNNEL: ClassVar[list[str]] = [sys.executable, "-m", "ipshift", "tunnel"]

    def __init__(self, lab: Lab, sockets: Path) -> None:
        self.lab = lab
        self.sockets = sockets
        h1, g1, r = lab.host("h1"), lab.router("g1"), lab.router("r")
        g2, h2 = lab.router("g2"), lab.host("h2")
        self.h1, self.g1, self.r, self.g2, self.h2 = h1, g1, r, g2, h2
        l1 = lab.link(h1, g1, "198.51.100.1/26", "198.51.100.62/26",
                      v6=("2001:db8:a::1/64", "2001:db8:a::ff/64"))
        u1 = lab.link(g1, r, "192.0.2.1/25", "192.0.2.126/25")
        u2 = lab.link(r, g2, "192.0.2.254/25", "192.0.2.129/25")
        self.underlay = (u1, u2)  # g1 - r, r - g2
        l2 = lab.link(g2, h2, "198.51.100.126/26", "198.51.100.65/26",
                      v6=("2001:db8:b::ff/64", "2001:db8:b::1/64"))
        g1.ip("route", "add", "192.0.2.128/25", "via", "192.0.2.126")
        g2.ip("route", "add", "192.0.2.0/25", "via", "192.0.2.254")
        h1.ip("route", "add", "default", "via", "198.51.100.62")
        h1.ip("-6", "route", "add", "default", "via", "2001:db8:a::ff")
        h2.ip("route", "add", "default", "via", "198.51.100.126")
        h2.ip("-6", "route", "add", "default", "via", "2001:db8:b::ff")
        for node, ifname in ((g1, l1.b.ifname), (g2, l2.a.ifname), (r, u1.b.ifname),
                             (r, u2.a.ifname)):
            node.run(["ethtool", "-K", ifname, "tx", "off"])
        g1.run(["ethtool", "-K", u1.a.ifname, "gro", "on"])
        g2.run(["ethtool", "-K", u2.b.ifname, "gro", "on"])

    def start_tunnel(self, gateway: Node, *extra: str, v6: bool = True) -> LabProcess:
        """Start the tunnel end on g1 or g2 and wait until it is up."""
        if gateway is self.g1:
            args = ["--dev", "tun-g1", "--local", "192.0.2.1:4789", "--remote",
                    "192.0.2.129:4789", "--address", "203.0.113.1/30",
                    "--route", "198.51.100.64/26", "--serve", "198.51.100.0/26"]
            args += ["--address", "2001:db8:ff::1/64", "--route", "2001:db8:b::/64",
                     "--serve", "2001:db8:a::/64"] if v6 else []
        else:
            args = ["--dev", "tun-g2", "--local", "192.0.2.129:4789", "--remote",
                    "192.0.2.1:4789", "--address", "203.0.113.2/30",
                    "--route", "198.51.100.0/26", "--serve", "198.51.100.64/26"]
            args += ["--address", "2001:db8:ff::2/64", "--route", "2001:db8:a::/64",
                     "--serve", "2001:db8:b::/64"] if v6 else []
        socket = self.socket_of(gateway, len(list(self.sockets.iterdir())))
        proc = gateway.spawn([*self.TUNNEL, "run", *args, "--socket", str(socket), *extra],
                             name=f"tunnel-{gateway.name}")
        proc.wait_ready(" up: ", 20, "the tunnel")
        return proc

    def socket_of(self, gateway: Node, serial: int) -> Path:
        return self.sockets / f"{gateway.name}-{serial}.sock"

    def underlay_loss(self, percent: int) -> None:
        """Drop `percent` % of the tunnel datagrams from g1 toward g2, one datagram at a time
        (0: none). g1 then cuts its UDP GSO sends into datagrams itself (a veth would pass
        them whole, and a drop rule would take a whole send at once); r drops at its ingress;
        g2's GRO joins what arrives into batches again, with the gaps."""
        u1 = self.underlay[0]
        self.g1.run(["ethtool", "-K", u1.a.ifname, "tx-udp-segmentation",
                     "off" if percent else "on"])
        self.lab.impair(self.r, u1.b.ifname, loss_percent=percent, direction="ingress")

    def counters(self, gateway: Node, proc: LabProcess) -> dict[str, int]:
        socket = next(a for a in proc.argv if a.endswith(".sock"))
        res = gateway.run([*self.TUNNEL, "status", "--dev", "x", "--socket", socket, "--json"],
                          timeout=20)
        counters: dict[str, int] = json.loads(res.stdout)["counters"]
        return counters
