"""Declarative network-namespace labs.

    with Lab("demo") as lab:
        a = lab.host("a"); r = lab.router("r"); b = lab.host("b")
        lab.link(a, r, "192.0.2.1/24", "192.0.2.254/24")
        a.ip("route", "add", "default", "via", "192.0.2.254")
        server = b.spawn(["iperf3", "-s"])

Every namespace is named `ipsh-<run id>-<node>`; the run is recorded under /run/ipshift/lab/ with
the owner's PID so that `ipshift lab clean` can remove what a killed run left behind. Leaving the
`with` block (normally, by exception, or by SIGTERM/SIGINT) stops the processes the lab started and
deletes its namespaces, which takes every veth, bridge, route and nft table in them along.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any, TypeVar

from ipshift.net import netns, sysctl
from ipshift.net.nft import Nft, NftError

log = logging.getLogger("ipshift.lab")

NS_PREFIX = "ipsh-"
NETNS_ETC = "/etc/netns"
STATE_DIR = Path(os.environ.get("IPSHIFT_LAB_STATE", "/run/ipshift/lab"))
IFNAMSIZ = 15

T = TypeVar("T")

#: Namespace prefixes of the labs this process created (for leak checks that must not touch
#: labs of other processes running at the same time).
CREATED_PREFIXES: set[str] = set()


class LabError(RuntimeError):
    """A lab step failed; the message names the command and what the kernel said."""


def _check_run(argv: Sequence[str], *, input: str | None = None, timeout: float = 30) -> str:
    try:
        res = subprocess.run(
            list(argv), input=input, capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired as exc:
        raise LabError(f"timed out after {timeout}s: {' '.join(argv)}") from exc
    if res.returncode != 0:
        raise LabError(f"{' '.join(argv)}: {res.stderr.strip() or res.stdout.strip()}")
    return res.stdout


class Interrupted(KeyboardInterrupt):
    """SIGTERM or SIGHUP during a lab's `with` block, raised so that the block unwinds and
    cleans up like it does on Ctrl-C; `signum` says which (a program exits 128 + signum)."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"signal {signum}")
        self.signum = signum


class LabProcess:
    """A program running inside a lab namespace; output goes to temporary files (no pipe stalls)."""

    def __init__(self, node: Node, argv: Sequence[str], name: str, env: dict[str, str] | None):
        self.node = node
        self.argv = list(argv)
        self.name = name
        self._out = tempfile.TemporaryFile(mode="w+b")
        self._err = tempfile.TemporaryFile(mode="w+b")
        full_env = dict(os.environ)
        if env:
            full_env.update(env)
        # `ip netns exec` enters the namespace and execs the program: the PID is the program's.
        self.popen = subprocess.Popen(
            netns.wrap_argv(node.ns, self.argv),
            stdin=subprocess.DEVNULL,
            stdout=self._out,
            stderr=self._err,
            env=full_env,
            start_new_session=True,
        )
        self.pid = self.popen.pid

    def poll(self) -> int | None:
        return self.popen.poll()

    def running(self) -> bool:
        return self.popen.poll() is None

    def wait(self, timeout: float = 30) -> int:
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired as exc:
            raise LabError(
                f"{self.name} in {self.node.name} still running after {timeout}s"
            ) from exc

    def signal(self, sig: int) -> None:
        if self.popen.poll() is None:
            os.kill(self.pid, sig)

    def stop(self, timeout: float = 5) -> int:
        """SIGTERM, then SIGKILL after `timeout`; returns the exit status."""
        if self.popen.poll() is None:
            self.signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.signal(signal.SIGKILL)
                self.popen.wait(timeout)
        return self.popen.returncode

    def _read(self, f: Any) -> str:
        f.flush()
        f.seek(0)
        data: bytes = f.read()
        return data.decode(errors="replace")

    def stdout(self) -> str:
        return self._read(self._out)

    def stderr(self) -> str:
        return self._read(self._err)

    def wait_for_output(
        self, text: str, timeout: float = 10, *, stream: str = "any", interval: float = 0.02
    ) -> bool:
        """Wait until `text` shows in the output (or the process exits); True if seen."""
        deadline = time.monotonic() + timeout
        while True:
            out = (self.stdout() if stream in ("any", "stdout") else "") + (
                self.stderr() if stream in ("any", "stderr") else ""
            )
            if text in out:
                return True
            if not self.running() or time.monotonic() > deadline:
                return False
            time.sleep(interval)

    def wait_ready(self, text: str, timeout: float, what: str | None = None) -> None:
        """Wait until `text` shows in the output; if it does not, stop the process and raise
        LabError saying whether it was still running or how it exited, with the end of both of
        its outputs."""
        if self.wait_for_output(text, timeout):
            return
        status = self.poll()
        state = (f"still not ready after {timeout:g} s" if status is None
                 else f"exited with status {status}")
        self.stop()
        parts = [f"{what or self.name} in {self.node.name} did not start ({state})"]
        for label, text_ in (("stderr", self.stderr()), ("stdout", self.stdout())):
            tail = text_.strip().splitlines()[-5:]
            if tail:
                parts.append(f"{label}: " + " | ".join(tail))
        raise LabError("; ".join(parts))

    def close(self) -> None:
        self._out.close()
        self._err.close()

    def __repr__(self) -> str:
        return f"<LabProcess {self.name} pid={self.pid} in {self.node.name}>"


@dataclass
class LinkEnd:
    node: Node
    ifname: str
    addresses: list[str] = field(default_factory=list)

    @property
    def ip(self) -> str:
        """The first address without its prefix length."""
        return self.addresses[0].split("/")[0]


@dataclass
class Link:
    a: LinkEnd
    b: LinkEnd

    def end(self, node: Node) -> LinkEnd:
        if node is self.a.node:
            return self.a
        if node is self.b.node:
            return self.b
        raise LabError(f"{node.name} is not on this link")


class Node:
    """One network namespace: a host, a router (forwarding on) or a switch (a bridge)."""

    def __init__(self, lab: Lab, name: str, kind: str):
        self.lab = lab
        self.name = name
        self.kind = kind
        self.ns = f"{lab.prefix}{name}"
        self.links: list[Link] = []

    # --- commands -------------------------------------------------------------------------
    def ip(self, *args: str, timeout: float = 30) -> str:
        """Run `ip -n <ns> ARGS` and return its output; raise LabError on failure."""
        return _check_run(["ip", "-n", self.ns, *args], timeout=timeout)

    def ip_batch(self, commands: Iterable[str]) -> None:
        """Run many `ip` commands in one process (each line as it would follow `ip`)."""
        text = "\n".join(commands) + "\n"
        _check_run(["ip", "-n", self.ns, "-batch", "-"], input=text)

    def ip_json(self, *args: str) -> Any:
        return json.loads(self.ip("-json", *args) or "[]")

    def run(
        self,
        argv: Sequence[str],
        *,
        check: bool = True,
        timeout: float = 60,
        input: str | None = None,
        env: dict[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run a program inside the namespace and wait for it (bounded by `timeout`)."""
        full_env = None
        if env:
            full_env = dict(os.environ)
            full_env.update(env)
        try:
            res = subprocess.run(
                netns.wrap_argv(self.ns, argv),
                input=input,
                capture_output=True,
                text=True,
                timeout=timeout,
                env=full_env,
            )
        except subprocess.TimeoutExpired as exc:
            raise LabError(f"{self.name}: timed out after {timeout}s: {' '.join(argv)}") from exc
        if check and res.returncode != 0:
            raise LabError(
                f"{self.name}: {' '.join(argv)} exited {res.returncode}: "
                f"{(res.stderr or res.stdout).strip()}"
            )
        return res

    def spawn(
        self, argv: Sequence[str], *, name: str | None = None, env: dict[str, str] | None = None
    ) -> LabProcess:
        """Start a program in the background; the lab stops it on exit."""
        proc = LabProcess(self, argv, name or os.path.basename(argv[0]), env)
        self.lab._track(proc)
        return proc

    def call(self, fn: Callable[..., T], *args: object) -> T:
        """Run a Python function on a thread inside this namespace."""
        return netns.call_in(self.ns, fn, *args)

    def sysctl(self, key: str, value: str | int) -> None:
        sysctl.write(key, value, self.ns)

    def wait_listening(self, port: int, *, udp: bool = False, timeout: float = 10.0) -> None:
        """Wait until something listens on `port` here (e.g. a one-off `iperf3 -s -1`, which is
        gone after a client's failed attempt, so clients must not start before it listens)."""
        deadline = time.monotonic() + timeout
        flags = "-Hulpn" if udp else "-Htlpn"
        while f":{port} " not in self.run(["ss", flags]).stdout:
            if time.monotonic() > deadline:
                raise LabError(f"nothing listens on port {port} in {self.name}")
            time.sleep(0.02)

    def set_resolv_conf(self, text: str) -> None:
        """Give programs run in this namespace their own /etc/resolv.conf (`ip netns exec`
        bind-mounts /etc/netns/<ns>/resolv.conf over it); removed with the namespace."""
        directory = Path(NETNS_ETC) / self.ns
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "resolv.conf").write_text(text)

    def nft(self, ruleset: str) -> None:
        """Load nftables text (e.g. a whole `table ... { }`) into this namespace."""
        handle = Nft(self.ns)
        try:
            handle.run(ruleset)
        except NftError as exc:
            raise LabError(f"{self.name}: nft: {exc}") from exc
        finally:
            handle.close()

    def nft_delete_table(self, family: str, name: str) -> bool:
        """Delete an nftables table here; False if there was none."""
        handle = Nft(self.ns)
        try:
            return handle.delete_table(family, name)
        finally:
            handle.close()

    # --- convenience -----------------------------------------------------------------------
    def addr_add(self, ifname: str, cidr: str) -> None:
        extra = ["nodad"] if ":" in cidr else []
        self.ip("addr", "add", cidr, "dev", ifname, *extra)

    def route_add(self, dst: str, *args: str) -> None:
        self.ip("-6" if ":" in dst or any(":" in a for a in args) else "-4", "route", "add", dst,
                *args)

    def link_set(self, ifname: str, state: str) -> None:
        self.ip("link", "set", ifname, state)

    def iface_to(self, peer: Node) -> str:
        for link in self.links:
            if link.a.node is peer:
                return link.b.ifname if link.b.node is self else link.a.ifname
            if link.b.node is peer:
                return link.a.ifname
        raise LabError(f"{self.name} has no link to {peer.name}")

    def __repr__(self) -> str:
        return f"<Node {self.kind} {self.name} ({self.ns})>"


class Lab:
    """A set of namespaces built for one run, removed as a whole."""

    def __init__(self, name: str = "lab", *, handle_signals: bool = True):
        self.name = name
        self.run_id = secrets.token_hex(3)
        self.prefix = f"{NS_PREFIX}{self.run_id}-"
        self.nodes: dict[str, Node] = {}
        self.links: list[Link] = []
        self._procs: list[LabProcess] = []
        self._handle_signals = handle_signals
        self._old_handlers: dict[int, Any] = {}
        self._closed = False
        self._lock = threading.Lock()
        self._state_file = STATE_DIR / f"{self.run_id}.json"
        CREATED_PREFIXES.add(self.prefix)

    # --- lifecycle -------------------------------------------------------------------------
    def __enter__(self) -> Lab:
        if os.geteuid() != 0:
            raise LabError("the lab builds network namespaces and needs root (run with sudo)")
        if self._handle_signals and threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGHUP):
                self._old_handlers[sig] = signal.signal(sig, self._on_signal)
        self._save_state()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        # Turn the signal into an exception so `with` blocks unwind and clean up.
        raise Interrupted(signum)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        for proc in reversed(self._procs):
            try:
                proc.stop(timeout=3)
            except Exception as exc:  # cleanup must go on
                log.warning("stopping %s: %s", proc, exc)
            proc.close()
        for node in reversed(list(self.nodes.values())):
            _remove_namespace(node.ns)
        self._state_file.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            STATE_DIR.rmdir()  # the last lab gone: leave no empty directory behind
        for sig, handler in self._old_handlers.items():
            signal.signal(sig, handler)

    def _save_state(self) -> None:
        # /run/ipshift is the daemons' private run directory too: create it 0700
        STATE_DIR.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        STATE_DIR.mkdir(exist_ok=True, mode=0o700)
        doc = {
            "pid": os.getpid(),
            "name": self.name,
            "namespaces": [n.ns for n in self.nodes.values()],
            "processes": [p.pid for p in self._procs],
        }
        tmp = self._state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(doc))
        tmp.replace(self._state_file)

    def _track(self, proc: LabProcess) -> None:
        self._procs.append(proc)
        self._save_state()

    # --- building --------------------------------------------------------------------------
    def _node(self, name: str, kind: str) -> Node:
        if self._closed:
            raise LabError("the lab is closed")
        if name in self.nodes:
            raise LabError(f"node {name} exists already")
        node = Node(self, name, kind)
        self.nodes[name] = node
        self._save_state()  # record before creating, so a crash in between is still cleaned
        netns.create(node.ns)
        node.sysctl("net.ipv6.conf.all.accept_dad", 0)
        node.sysctl("net.ipv6.conf.default.accept_dad", 0)
        node.sysctl("net.ipv6.conf.default.accept_ra", 0)
        node.ip("link", "set", "lo", "up")
        return node

    def host(self, name: str) -> Node:
        return self._node(name, "host")

    def router(self, name: str) -> Node:
        node = self._node(name, "router")
        node.sysctl("net.ipv4.ip_forward", 1)
        node.sysctl("net.ipv6.conf.all.forwarding", 1)
        return node

    def switch(self, name: str) -> Node:
        """A learning bridge in its own namespace; links to it become bridge ports."""
        node = self._node(name, "switch")
        node.ip("link", "add", "br0", "type", "bridge")
        node.ip("link", "set", "br0", "up")
        return node

    def link(
        self,
        a: Node,
        b: Node,
        addr_a: str | Sequence[str] | None = None,
        addr_b: str | Sequence[str] | None = None,
        *,
        v6: tuple[str | None, str | None] | None = None,
        name_a: str | None = None,
        name_b: str | None = None,
        mtu: int | None = None,
    ) -> Link:
        """Connect two nodes with a veth pair and address both ends (either may be a switch)."""
        name_a = name_a or _ifname(a, b)
        name_b = name_b or _ifname(b, a)
        _check_run(["ip", "-n", a.ns, "link", "add", name_a, "type", "veth", "peer", "name",
                    name_b, "netns", b.ns])
        ends = []
        for node, ifname, addrs, addr6 in (
            (a, name_a, addr_a, v6[0] if v6 else None),
            (b, name_b, addr_b, v6[1] if v6 else None),
        ):
            cmds = []
            addresses = [addrs] if isinstance(addrs, str) else list(addrs or [])
            if addr6:
                addresses.append(addr6)
            if mtu:
                cmds.append(f"link set {ifname} mtu {mtu}")
            if node.kind == "switch":
                if addresses:
                    raise LabError(f"switch {node.name} takes no addresses")
                cmds.append(f"link set {ifname} master br0")
            for cidr in addresses:
                cmds.append(f"addr add {cidr} dev {ifname}" + (" nodad" if ":" in cidr else ""))
            cmds.append(f"link set {ifname} up")
            node.ip_batch(cmds)
            ends.append(LinkEnd(node, ifname, addresses))
        for end in ends:
            _wait_link_ready(end.node, end.ifname)
        link = Link(ends[0], ends[1])
        a.links.append(link)
        b.links.append(link)
        self.links.append(link)
        return link

    def dialup(
        self, home: Node, isp: Node, *args: str, ready_timeout: float = 20,
        env: dict[str, str] | None = None,
    ) -> LabProcess:
        """Start the dial-on-demand emulator (`ipshift.lab.dialup`, pppd in demand mode) between
        `home` and `isp`; extra arguments go to its command line, `env` to its hooks. Returns
        once it is ready."""
        argv = [sys.executable, "-m", "ipshift.lab.dialup", "--isp-ns", isp.ns, *args]
        proc = home.spawn(argv, name="dialup", env=env)
        proc.wait_ready("dialup: ready", ready_timeout, "the dial-up emulator")
        return proc

    # --- impairments -----------------------------------------------------------------------
    def impair(
        self,
        node: Node,
        ifname: str,
        *,
        loss_percent: int = 0,
        blackhole: bool = False,
        include_arp: bool = False,
        direction: str = "both",
    ) -> None:
        """Drop traffic on one interface: random loss (`numgen`), or everything (a silent peer).

        Uses netdev ingress/egress hooks so forwarded and local traffic are both affected.
        IP only by default, so ARP/ND still answer (a gateway that is up but no longer routes);
        `include_arp` drops ARP too. Calling again replaces the interface's previous rules;
        loss_percent=0 and blackhole=False remove them.
        """
        if not 0 <= loss_percent <= 100:
            raise LabError("loss_percent must be within 0..100")
        table = f"ipshift_lab_{ifname}".replace("-", "_").replace(".", "_")
        node.nft_delete_table("netdev", table)  # the previous impairment, if any
        if not blackhole and loss_percent == 0:
            return
        if blackhole:
            verdict = "drop"
        else:
            verdict = f"numgen random mod 100 < {loss_percent} drop"
        match = "" if include_arp else "meta protocol { ip, ip6 } "
        hooks = ["ingress", "egress"] if direction == "both" else [direction]
        chains = "\n".join(
            f'  chain {h} {{ type filter hook {h} device "{ifname}" priority 0; '
            f"{match}{verdict}; }}"
            for h in hooks
        )
        node.nft(f"table netdev {table} {{\n{chains}\n}}\n")


def _wait_link_ready(node: Node, ifname: str, timeout: float = 3.0) -> None:
    """Wait until the interface has carrier and a usable IPv6 link-local address: before that
    the first packets over a fresh veth are lost, which would make tests flaky."""
    deadline = time.monotonic() + timeout
    while True:
        info = node.ip_json("addr", "show", "dev", ifname)
        if info:
            dev = info[0]
            up = dev.get("operstate") in ("UP", "UNKNOWN") or "LOWER_UP" in dev.get("flags", [])
            addrs = dev.get("addr_info", [])
            link_local = any(
                a.get("scope") == "link" and a.get("family") == "inet6" and not a.get("tentative")
                for a in addrs
            )
            tentative = any(a.get("tentative") for a in addrs)
            if node.kind == "switch" or (up and link_local and not tentative):
                return
        if time.monotonic() > deadline:
            raise LabError(f"{node.name}: {ifname} did not come up within {timeout}s")
        time.sleep(0.01)


def _ifname(node: Node, peer: Node) -> str:
    base = f"to-{peer.name}"[:IFNAMSIZ]
    used = {e.ifname for link in node.links for e in (link.a, link.b) if e.node is node}
    name, i = base, 1
    while name in used:
        suffix = str(i)
        name = base[: IFNAMSIZ - len(suffix)] + suffix
        i += 1
    return name


def _remove_namespace(ns: str) -> None:
    """Stop every process left in the namespace (all were started by the lab), then delete it."""
    shutil.rmtree(Path(NETNS_ETC) / ns, ignore_errors=True)
    if not netns.exists(ns):
        return
    try:
        pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True,
                              timeout=10).stdout.split()
    except subprocess.TimeoutExpired:
        pids = []
    for pid in pids:
        try:
            os.kill(int(pid), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass
    try:
        netns.delete(ns)
    except OSError as exc:
        log.warning("could not delete namespace %s: %s", ns, exc)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def leftovers(prefixes: set[str] | None = None) -> list[str]:
    """Namespaces still there of the labs with these prefixes (default: this process's)."""
    wanted = CREATED_PREFIXES if prefixes is None else prefixes
    return [n for n in netns.list_names() if any(n.startswith(p) for p in wanted)]


def remove_namespaces(names: Iterable[str]) -> None:
    for ns in names:
        _remove_namespace(ns)


def clean(*, everything: bool = False, only: str | None = None) -> list[str]:
    """Remove what earlier runs left: namespaces of runs whose owner is gone (or all `ipsh-`
    namespaces with `everything`); `only` limits it to one run's prefix. Returns the
    namespaces removed."""
    removed: list[str] = []
    live_prefixes: set[str] = set()
    if STATE_DIR.is_dir():
        for state in STATE_DIR.glob("*.json"):
            try:
                doc = json.loads(state.read_text())
                pid = int(doc["pid"])
            except (OSError, ValueError, KeyError, TypeError):
                state.unlink(missing_ok=True)
                continue
            prefix = f"{NS_PREFIX}{state.stem}-"
            if only is not None and prefix != only:
                continue
            if not everything and _pid_alive(pid) and pid != os.getpid():
                live_prefixes.add(prefix)
                continue
            for proc_pid in doc.get("processes", []):
                # only processes this lab started, and only if still inside its namespaces
                _kill_if_in_lab(int(proc_pid), prefix)
            state.unlink(missing_ok=True)
    for ns in netns.list_names():
        if not ns.startswith(NS_PREFIX):
            continue
        if any(ns.startswith(p) for p in live_prefixes):
            continue
        if only is not None and not ns.startswith(only):
            continue
        _remove_namespace(ns)
        removed.append(ns)
    return removed


def _kill_if_in_lab(pid: int, prefix: str) -> None:
    try:
        ns_of_pid = subprocess.run(["ip", "netns", "identify", str(pid)], capture_output=True,
                                   text=True, timeout=5).stdout.strip()
    except subprocess.TimeoutExpired:
        return
    if ns_of_pid.startswith(prefix):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
