"""An RSIP site: private hosts behind a gateway with one public address, and the Internet.

    a 192.0.2.10 --+
    b 192.0.2.11 --+-- switch -- gw 192.0.2.1 | 203.0.113.1 (+ .2 .3 for RSA-IP) -- inet
    c 192.0.2.12 --+                                                      203.0.113.100

gw is the RSIP gateway (`ipshift rsip server`, INT_IF toward the switch, EXT_IF toward inet)
and also masquerades 192.0.2.0/24, so c, which speaks no RSIP, still reaches the Internet by
ordinary NAT beside it (to ports outside PORT_RANGE, as docs/rsip.md advises). inet is an
Internet server with only a route to 203.0.113.0/24: it can reach nothing private. a and b
run the RSIP client.

    with Lab("rsip") as lab:
        site = RsipSite(lab, workdir)
        gateway = site.start_gateway()          # waits until it answers on its socket
        status = site.gateway_status()
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ipshift.ctl.client import request
from ipshift.ctl.protocol import CtlError
from ipshift.lab.topology import Lab, LabError, LabProcess, Node
from ipshift.net import sysctl

GATEWAY_INT = "192.0.2.1"
PUBLIC = "203.0.113.1"
PUBLIC_EXTRA = ("203.0.113.2", "203.0.113.3")
INTERNET = "203.0.113.100"
HOSTS = {"a": "192.0.2.10", "b": "192.0.2.11", "c": "192.0.2.12"}
PORT_RANGE = "8192-32767"
RSIP = [sys.executable, "-m", "ipshift", "rsip"]
PORT_RANGE_KEY = "net.ipv4.ip_local_port_range"
TABLE = "ipshift_rsipclient_rsip0"  # the client's owned nft table
WAIT = 30.0

# An HTTP server that answers with the address and port it was reached from.
WHO = r"""
import http.server, sys
class Who(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = f"{self.client_address[0]}:{self.client_address[1]}\n".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
server = http.server.HTTPServer((sys.argv[1], int(sys.argv[2])), Who)
print("serving", flush=True)
server.serve_forever()
"""

def wait_for(what: str, check: Callable[[], Any], timeout: float = WAIT,
              process: LabProcess | None = None) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if process is not None and not process.running():
            raise AssertionError(f"{what}: {process.name} exited {process.poll()}: "
                                 f"{process.stderr()[-3000:]}")
        if time.monotonic() > deadline:
            tail = process.stderr()[-3000:] if process is not None else ""
            raise AssertionError(f"{what}: not within {timeout:g} s {tail}")
        time.sleep(0.1)


def start_who(node: Node, address: str, port: int) -> LabProcess:
    """WHO on `node`, once it serves."""
    proc = node.spawn([sys.executable, "-c", WHO, address, str(port)],
                      name=f"who-{node.name}-{port}")
    proc.wait_ready("serving", 20, f"{node.name}'s web server on {port}")
    return proc


class Client:
    """`ipshift rsip client` on one host, and what it left in the kernel."""

    def __init__(self, node: Node, workdir: Path, *args: str, server: bool = True) -> None:
        self.node = node
        self.server = ["-s", GATEWAY_INT] if server else []  # without: the default gateway
        self.socket = workdir / f"rsipclient-{node.name}.sock"
        self.args = args
        self.proc: LabProcess | None = None

    def command(self, *extra: str) -> list[str]:
        return [*RSIP, "client", *self.server, "--socket", str(self.socket),
                "--no-syslog", "-v", *self.args, *extra]

    def start(self) -> LabProcess:
        proc = self.node.spawn(self.command(), name=f"rsipclient-{self.node.name}")
        self.proc = proc
        wait_for("the client's tunnel", lambda: self.state() == "running", process=proc)
        return proc

    def status(self) -> dict[str, Any]:
        result: dict[str, Any] = request(self.socket, "status")
        return result

    def state(self) -> str | None:
        try:
            return str(self.status()["daemon"]["state"])
        except (CtlError, OSError, KeyError):
            return None

    def listen_state(self, port: int) -> str | None:
        entry = self.status().get("listens", {}).get(str(port))
        return entry["state"] if entry else None

    def stop(self) -> int:
        assert self.proc is not None
        code = self.proc.stop(15)
        self.proc = None
        return code

    # what it installed
    def port_range(self) -> str:
        return " ".join(sysctl.read(PORT_RANGE_KEY, self.node.ns).split())

    def tables(self) -> str:
        return self.node.run(["nft", "list", "tables"]).stdout

    def has_device(self) -> bool:
        return self.node.run(["ip", "link", "show", "rsip0"], check=False).returncode == 0

    def routes(self) -> str:
        return self.node.ip("route")

    def assert_clean(self, original_range: str) -> None:
        assert not self.has_device()
        assert "rsip0" not in self.routes() and "proto 75" not in self.routes()
        assert TABLE not in self.tables()
        assert self.port_range() == original_range


def get(node: Node, url: str) -> str:
    return node.run(["curl", "-s", "--max-time", "10", url], timeout=20).stdout.strip()




class RsipSite:
    def __init__(self, lab: Lab, workdir: Path) -> None:
        self.lab = lab
        self.workdir = workdir
        workdir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.switch = lab.switch("lan")
        self.gw = lab.router("gw")
        self.inet = lab.host("inet")
        self.int_if = lab.link(self.switch, self.gw, None,
                               f"{GATEWAY_INT}/24").end(self.gw).ifname
        ext = lab.link(self.gw, self.inet,
                       [f"{PUBLIC}/24", *(f"{a}/24" for a in PUBLIC_EXTRA)], f"{INTERNET}/24")
        self.ext_if = ext.end(self.gw).ifname
        self.hosts: dict[str, Node] = {}
        for name, address in HOSTS.items():
            host = lab.host(name)
            lab.link(self.switch, host, None, f"{address}/24")
            host.route_add("default", "via", GATEWAY_INT)
            self.hosts[name] = host
        self.gw.sysctl("net.ipv4.ip_forward", 1)
        self.gw.sysctl("net.ipv4.ip_local_port_range", "32768 60999")
        self.gw.nft(f"""
table ip lab_nat {{
    chain postrouting {{
        type nat hook postrouting priority srcnat; policy accept;
        ip saddr 192.0.2.0/24 oifname "{self.ext_if}" meta l4proto {{ tcp, udp }} \
            masquerade to :32768-60999
        ip saddr 192.0.2.0/24 oifname "{self.ext_if}" masquerade
    }}
}}""")
        self.state_dir = workdir / "state"
        self.socket = workdir / "rsipd.sock"
        self.stat_file = workdir / "rsipd.stat"
        self.config_file = workdir / "rsipd.conf"
        self.gateway: LabProcess | None = None
        for host in self.hosts.values():  # neighbours resolved before any test's first packet
            host.run(["ping", "-c", "1", "-W", "2", GATEWAY_INT], timeout=10)
        self.inet.run(["ping", "-c", "1", "-W", "2", PUBLIC], timeout=10)

    def host(self, name: str) -> Node:
        return self.hosts[name]

    def config_text(self, **keys: Any) -> str:
        values: dict[str, Any] = {
            "INT_IF": self.int_if, "EXT_IF": self.ext_if, "POOL": PUBLIC,
            "PORT_RANGE": PORT_RANGE, "LISTEN_RANGE": "1-1023", "MAX_CLIENTS": 0, "MTU": 1480,
            "LOG_LEVEL": "debug", "STATE_DIR": self.state_dir, "STAT_FILE": self.stat_file,
        }
        values.update(keys)
        return "".join(f"{key}={value}\n" for key, value in values.items())

    def start_gateway(self, *extra: str, timeout: float = 20.0, **keys: Any) -> LabProcess:
        """rsipd with this site's config (+ `keys`), once it answers on its control socket."""
        self.config_file.write_text(self.config_text(**keys))
        proc = self.gw.spawn([*RSIP, "server", "--config", str(self.config_file), "--socket",
                              str(self.socket), "--no-syslog", *extra], name="rsipd")
        self.gateway = proc
        self.wait_ready(proc, self.socket, timeout)
        return proc

    @staticmethod
    def wait_ready(proc: LabProcess, socket: Path, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not proc.running():
                raise LabError(f"{proc.name} exited {proc.poll()}: {proc.stderr()[-2000:]}")
            try:
                request(socket, "ping")
                return
            except (CtlError, OSError):
                time.sleep(0.05)
        raise LabError(f"{proc.name} did not answer within {timeout}s: {proc.stderr()[-2000:]}")

    def gateway_status(self) -> dict[str, Any]:
        result: dict[str, Any] = request(self.socket, "status")
        return result

    def gateway_binds(self, host: str) -> list[dict[str, Any]]:
        """The gateway's binds for the private host `host` (its status rows)."""
        return [row for row in self.gateway_status().get("binds", []) if row["client"] == host]

    def stop_gateway(self, timeout: float = 15.0) -> int:
        assert self.gateway is not None
        code = self.gateway.stop(timeout)
        self.gateway = None
        return code
