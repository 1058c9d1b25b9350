"""A Knot DNS server in a lab namespace: authoritative for one zone, accepting dynamic updates
(RFC 2136) signed with its own TSIG key, everything it writes kept in one work directory.

    with Lab("dns") as lab:
        ns = lab.host("ns")
        lab.link(switch, ns, "192.0.2.53/24", v6=(None, "2001:db8::53/64"))
        server = KnotServer(ns, workdir)          # zone ilnp.test., key ilnp-update
        server.start()                            # returns once it answers the zone's SOA
        server.key_file                           # hmac-sha256:ilnp-update:SECRET (0600)
        server.knotc("zone-read", "ilnp.test.")   # its control socket, in workdir

Files in `workdir`: knotd.conf, the zone file (zones/), journal and timer databases (db/),
the PID file and control socket (run/), the key file. knotd runs in the foreground as root
with `-c knotd.conf` and logs to its stderr; nothing under /etc, /var or /run is used, so
servers of parallel tests never collide. The zone is under .test (reserved, RFC 6761) and
the addresses come from the documentation ranges.

The key file holds one line `ALGORITHM:NAME:SECRET` (the `-y` form of kdig and knsupdate),
the format `ipshift.ilnp.dns.read_tsig_key` reads.
"""

from __future__ import annotations

import base64
import ipaddress
import os
import secrets
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

import dns.exception
import dns.message
import dns.name
import dns.query
import dns.rcode
import dns.rdatatype

from ipshift.lab.topology import LabError, LabProcess, Node

ZONE = "ilnp.test."
KEY_NAME = "ilnp-update"
ALGORITHM = "hmac-sha256"
DNS_PORT = 53
TTL = 30
READY_TIMEOUT = 20.0
UNIX_PATH_MAX = 107
_SAFE_PATH = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789/._-+")


def _quoted(path: Path) -> str:
    text = str(path)
    if not set(text) <= _SAFE_PATH:
        raise LabError(f"knotd's work directory {text!r} has characters its configuration "
                       "cannot hold; use a plain path")
    return f'"{text}"'


class KnotServer:
    """knotd on `node`, authoritative for `zone`, listening on `addresses` (default: every
    address of the node's links) port `port`; updates allowed with its TSIG key only."""

    def __init__(self, node: Node, workdir: Path, zone: str = ZONE, *,
                 addresses: Sequence[str] | None = None, port: int = DNS_PORT,
                 key_name: str = KEY_NAME, ttl: int = TTL) -> None:
        self.node = node
        self.workdir = Path(workdir).absolute()
        self.zone = dns.name.from_text(zone).to_text()
        if addresses is None:
            addresses = [a.split("/")[0] for link in node.links for end in (link.a, link.b)
                         if end.node is node for a in end.addresses]
        self.addresses = [str(ipaddress.ip_address(a)) for a in addresses]
        if not self.addresses:
            raise LabError(f"{node.name} has no address for knotd to listen on; link it first")
        self.port = port
        self.ttl = ttl
        self.key_name = dns.name.from_text(key_name).to_text(omit_final_dot=True)
        self.key_secret = base64.b64encode(secrets.token_bytes(32)).decode()
        self.conf = self.workdir / "knotd.conf"
        self.rundir = self.workdir / "run"
        self.storage = self.workdir / "db"
        self.zonedir = self.workdir / "zones"
        self.zonefile = self.zonedir / f"{self.zone.rstrip('.') or 'root'}.zone"
        self.socket = self.rundir / "knot.sock"
        self.key_file = self.workdir / f"{self.key_name}.key"
        if len(str(self.socket).encode()) > UNIX_PATH_MAX:
            raise LabError(f"knotd's control socket path {self.socket} is longer than "
                           f"{UNIX_PATH_MAX} bytes; use a shorter work directory")
        self.proc: LabProcess | None = None

    @property
    def address(self) -> str:
        """The first address it listens on (IPv6 first, if it has one)."""
        v6 = [a for a in self.addresses if ":" in a]
        return (v6 or self.addresses)[0]

    @property
    def key_line(self) -> str:
        """The key as `ALGORITHM:NAME:SECRET` (the key file's line; kdig's `-y`)."""
        return f"{ALGORITHM}:{self.key_name}:{self.key_secret}"

    # --- files ----------------------------------------------------------------------------
    def config_text(self) -> str:
        listen = ", ".join(f'"{a}@{self.port}"' for a in self.addresses)
        return f"""\
# written by ipshift.lab.dns for a lab namespace; everything in {self.workdir}
server:
    rundir: {_quoted(self.rundir)}
    pidfile: {_quoted(self.rundir / "knot.pid")}
    listen: [ {listen} ]
    udp-workers: 1
    tcp-workers: 1
    background-workers: 1
    identity: ""
    version: ""
    nsid: ""

control:
    listen: {_quoted(self.socket)}

log:
  - target: stderr
    any: info

database:
    storage: {_quoted(self.storage)}

key:
  - id: {self.key_name}
    algorithm: {ALGORITHM}
    secret: {self.key_secret}

acl:
  - id: update-with-key
    key: {self.key_name}
    action: update

template:
  - id: default
    storage: {_quoted(self.zonedir)}
    semantic-checks: on
    zonefile-sync: -1
    journal-content: changes

zone:
  - domain: {self.zone}
    file: {_quoted(self.zonefile)}
    acl: update-with-key
"""

    def zone_text(self) -> str:
        glue = "".join(f"ns {'AAAA' if ':' in a else 'A'} {a}\n" for a in self.addresses)
        return (f"$ORIGIN {self.zone}\n$TTL {self.ttl}\n"
                f"@ SOA ns hostmaster 1 3600 600 86400 {self.ttl}\n"
                f"@ NS ns\n{glue}")

    def write_files(self) -> None:
        for directory in (self.workdir, self.rundir, self.storage, self.zonedir):
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.conf.write_text(self.config_text())
        self.zonefile.write_text(self.zone_text())
        self.key_file.unlink(missing_ok=True)
        fd = os.open(self.key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                     | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "w") as file:
            file.write(f"# TSIG key of the lab's knotd on {self.node.name} (zone {self.zone})\n"
                       f"{self.key_line}\n")

    # --- the process ----------------------------------------------------------------------
    def start(self, timeout: float = READY_TIMEOUT) -> LabProcess:
        """Write the files, start knotd and return once it answers the zone's SOA query."""
        if self.proc is not None and self.proc.running():
            raise LabError(f"knotd on {self.node.name} runs already")
        if shutil.which("knotd") is None:
            raise LabError("knotd is not installed (package knot): run scripts/bootstrap")
        self.write_files()
        self.proc = self.node.spawn(["knotd", "-c", str(self.conf), "-s", str(self.socket)],
                                    name=f"knotd-{self.node.name}")
        self.wait_ready(timeout)
        return self.proc

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> None:
        """Wait until every listen address answers the SOA query with NOERROR; if it does
        not, stop knotd and raise LabError with the end of its log."""
        proc = self.proc
        if proc is None:
            raise LabError("knotd was not started")
        deadline = time.monotonic() + timeout
        pending = list(self.addresses)
        while pending:
            if not proc.running():
                raise LabError(f"knotd on {self.node.name} exited {proc.poll()}: "
                               f"{self._log_tail(proc)}")
            if self.node.call(self._answers_soa, pending[0]):
                pending.pop(0)
                continue
            if time.monotonic() > deadline:
                proc.stop()
                raise LabError(f"knotd on {self.node.name} did not answer the SOA of "
                               f"{self.zone} at {pending[0]} within {timeout:g} s: "
                               f"{self._log_tail(proc)}")
            time.sleep(0.05)

    def _answers_soa(self, address: str) -> bool:
        query = dns.message.make_query(self.zone, dns.rdatatype.SOA, flags=0)
        try:
            response = dns.query.udp(query, address, timeout=0.5, port=self.port)
        except (dns.exception.DNSException, OSError):
            return False
        return response.rcode() == dns.rcode.NOERROR and bool(response.answer)

    @staticmethod
    def _log_tail(proc: LabProcess) -> str:
        lines = (proc.stderr() + proc.stdout()).strip().splitlines()
        return " | ".join(lines[-8:]) or "no output"

    def log(self) -> str:
        return self._log_tail(self.proc) if self.proc is not None else ""

    def knotc(self, *args: str, timeout: float = 20) -> str:
        """Run `knotc` on its control socket (e.g. `zone-read ilnp.test. mn NID`)."""
        res = self.node.run(["knotc", "-c", str(self.conf), "-s", str(self.socket), *args],
                            check=False, timeout=timeout)
        if res.returncode != 0:
            raise LabError(f"knotc {' '.join(args)}: {(res.stderr or res.stdout).strip()}")
        return res.stdout

    def stop(self, timeout: float = 10) -> int | None:
        """SIGTERM knotd (SIGKILL after `timeout`); its exit status, None if it never ran."""
        if self.proc is None:
            return None
        code = self.proc.stop(timeout)
        self.proc = None
        return code

    def __repr__(self) -> str:
        return f"<KnotServer {self.zone} on {self.node.name} {self.addresses}>"
