"""Each daemon run the way its unit in contrib/systemd/ runs it: ExecStart as systemd expands
it (%i, $VARIABLES from the EnvironmentFile, /usr/bin/env on PATH), NOTIFY_SOCKET and
JOURNAL_STREAM set, the RuntimeDirectory as run directory. The daemon must send READY=1 once
it serves, answer status, and end with status 0 on the unit's KillSignal having removed
what it created."""

from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import sys
import time
from pathlib import Path

import pytest

from ipshift.ctl import request
from ipshift.lab import Lab, Node
from ipshift.lab.isps import IspSite, seed_config
from ipshift.lab.scenarios import DialupSite
from tests.netns.conftest import need

pytestmark = pytest.mark.netns

UNITS = Path(__file__).resolve().parents[2] / "contrib" / "systemd"


def read_unit(name: str) -> dict[str, str]:
    """The [Service] section (the last value of a key wins, as for these single-valued ones)."""
    section, out = "", {}
    for raw in (UNITS / name).read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
        elif section == "Service":
            key, _, value = line.partition("=")
            out[key.strip()] = value.strip()
    return out


def exec_start(unit: dict[str, str], instance: str, etc: Path) -> tuple[list[str], dict[str, str]]:
    """argv and environment of ExecStart as systemd builds them: %i, EnvironmentFile, then
    $VAR expanded to its whitespace-separated words; /etc/ipshift/ is the test's `etc`."""
    env: dict[str, str] = {}
    env_file = unit.get("EnvironmentFile")
    if env_file:
        path = Path(env_file.replace("%i", instance).replace("/etc/ipshift", str(etc)))
        for line in path.read_text().splitlines():
            key, _, value = line.partition("=")
            if key.strip() and not key.startswith("#"):
                env[key.strip()] = value.strip()
    argv: list[str] = []
    for word in shlex.split(unit["ExecStart"].replace("%i", instance)):
        if word.startswith("$"):
            argv += env.get(word[1:], "").split()
        else:
            argv.append(word.replace("/etc/ipshift", str(etc)))
    return argv, env


class Manager:
    """The notify socket systemd would listen on."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.5)

    def wait_for(self, field: str, timeout: float) -> list[str]:
        seen: list[str] = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                seen += self.sock.recv(4096).decode().splitlines()
            except TimeoutError:
                continue
            if field in seen:
                return seen
        raise AssertionError(f"no {field} from the daemon within {timeout}s; got {seen}")

    def close(self) -> None:
        self.sock.close()


def run_unit(node: Node, unit_name: str, instance: str, tmp: Path, etc: Path,
             extra_env: dict[str, str] | None = None) -> tuple[object, Manager, Path]:
    unit = read_unit(unit_name)
    assert unit["Type"] == "notify" and unit["NotifyAccess"] == "main"
    assert unit["RuntimeDirectoryMode"] == "0700"
    argv, env = exec_start(unit, instance, etc)
    assert argv[0] == "/usr/bin/env"
    run_dir = tmp / "run" / unit["RuntimeDirectory"]
    run_dir.mkdir(parents=True, mode=0o700, exist_ok=True)
    manager = Manager(tmp / f"notify-{instance}")
    env.update({
        "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}",
        "NOTIFY_SOCKET": str(manager.path),
        "JOURNAL_STREAM": "8:12345",  # stderr goes to the journal: no syslog besides
        "IPSHIFT_RUN_DIR": str(run_dir),
        **(extra_env or {}),
    })
    proc = node.spawn(argv, env=env, name=unit_name)
    return proc, manager, run_dir


def stop_like_systemd(proc, unit_name: str) -> int:  # type: ignore[no-untyped-def]
    sig = getattr(signal, read_unit(unit_name).get("KillSignal", "SIGTERM"))
    proc.signal(sig)
    return int(proc.wait(timeout=float(read_unit(unit_name)["TimeoutStopSec"])))


def test_tunnel_unit(tmp_path: Path) -> None:
    with Lab("unit-tunnel") as lab:
        a, b = lab.host("a"), lab.host("b")
        lab.link(a, b, "192.0.2.1/24", "192.0.2.2/24")
        etc = tmp_path / "etc"
        (etc / "tunnel").mkdir(parents=True)
        (etc / "tunnel" / "tun7.conf").write_text(
            "TUNNEL_OPTIONS=--local 192.0.2.1:4789 --remote 192.0.2.2:4789 "
            "--address 203.0.113.1/30\n")
        proc, manager, run_dir = run_unit(a, "ipshift-tunnel@.service", "tun7", tmp_path, etc)
        try:
            seen = manager.wait_for("READY=1", 20)
            assert any(f.startswith("STATUS=") for f in seen)
            doc = request(run_dir / "tunnel-tun7.sock", "status")
            assert doc["daemon"]["state"] == "running" and doc["tunnel"]["device"] == "tun7"
            assert "tun7" in a.ip("-o", "link", "show")
            assert stop_like_systemd(proc, "ipshift-tunnel@.service") == 0, proc.stderr()
            assert "STOPPING=1" in manager.wait_for("STOPPING=1", 5)
            assert "tun7" not in a.ip("-o", "link", "show")
            assert not (run_dir / "tunnel-tun7.sock").exists()
        finally:
            manager.close()
            if proc.running():
                proc.stop()


def test_routes_unit(tmp_path: Path) -> None:
    with Lab("unit-routes") as lab:
        site = IspSite(lab, run_dir=tmp_path / "site")
        etc = tmp_path / "etc"
        (etc / "routes").mkdir(parents=True)
        (etc / "routes" / "main.toml").write_text(
            'ip = """\n' + seed_config(site.isps) + '"""\n[daemon]\nname = "main"\n'
            'profile = "fast"\n')
        proc, manager, run_dir = run_unit(site.r, "ipshift-routes@.service", "main", tmp_path,
                                          etc)
        try:
            manager.wait_for("READY=1", 20)
            doc = request(run_dir / "main.sock", "status")
            assert doc["daemon"]["component"] == "routes" and doc["daemon"]["name"] == "main"
            assert len(doc["uplinks"]) == 2
            assert "proto 73" in site.r.ip("route", "show", "table", "200")
            assert stop_like_systemd(proc, "ipshift-routes@.service") == 0, proc.stderr()
            assert "proto 73" not in site.r.ip("route", "show", "table", "all")
            assert "Traceback" not in proc.stderr()
        finally:
            manager.close()
            if proc.running():
                proc.stop()


def test_resend_unit(tmp_path: Path) -> None:
    need("dnsmasq", "dig", "socat")
    with Lab("unit-resend") as lab:
        site = DialupSite(lab, tmp_path / "site")
        proc, manager, run_dir = run_unit(site.home, "ip_resend@.service", "ppp0", tmp_path,
                                          tmp_path / "etc")
        try:
            manager.wait_for("READY=1", 20)
            doc = request(run_dir / "resend" / "ppp0", "status")
            assert doc["daemon"]["component"] == "resend" and doc["state"] == "armed"
            tables = site.home.run(["nft", "-j", "list", "tables"]).stdout
            assert "ipshift_resend_ppp0" in tables
            assert stop_like_systemd(proc, "ip_resend@.service") == 0, proc.stderr()
            tables = json.loads(site.home.run(["nft", "-j", "list", "tables"]).stdout)
            assert not [t for t in tables["nftables"]
                        if t.get("table", {}).get("name") == "ipshift_resend_ppp0"]
        finally:
            manager.close()
            if proc.running():
                proc.stop()


def test_sacip_unit(tmp_path: Path) -> None:
    with Lab("unit-sacip") as lab:
        a, b = lab.host("a"), lab.host("b")
        lab.link(a, b, "192.0.2.1/24", "192.0.2.2/24")
        etc = tmp_path / "etc"
        (etc / "sacip").mkdir(parents=True)
        (etc / "sacip" / "main.conf").write_text("SACIP_OPTIONS=--scan-interval 0.5\n")
        state = tmp_path / "state"
        state.mkdir(mode=0o700)
        proc, manager, run_dir = run_unit(a, "ipshift-sacip@.service", "main", tmp_path, etc,
                                          {"STATE_DIRECTORY": str(state)})
        try:
            manager.wait_for("READY=1", 20)
            doc = request(run_dir / "sacip-main.sock", "status")
            assert doc["daemon"]["component"] == "sacip" and doc["daemon"]["name"] == "main"
            assert (state / "sacip.key").stat().st_mode & 0o077 == 0  # made on first start
            assert "ipshift_sacip_main" in a.run(["nft", "list", "tables"]).stdout
            assert stop_like_systemd(proc, "ipshift-sacip@.service") == 0, proc.stderr()
            assert "ipshift_sacip_main" not in a.run(["nft", "list", "tables"]).stdout
            assert "IPSHIFT-sacip" not in a.run(["iptables", "-t", "mangle", "-S"]).stdout
        finally:
            manager.close()
            if proc.running():
                proc.stop()


def test_rsipd_unit(tmp_path: Path) -> None:
    with Lab("unit-rsipd") as lab:
        gw, inet, host = lab.router("gw"), lab.host("inet"), lab.host("h")
        inside = lab.link(host, gw, "192.0.2.10/24", "192.0.2.1/24").end(gw).ifname
        outside = lab.link(gw, inet, "203.0.113.1/24", "203.0.113.100/24").end(gw).ifname
        etc = tmp_path / "etc"
        (etc / "rsip").mkdir(parents=True)
        (etc / "rsip" / "main.conf").write_text(f"INT_IF={inside}\nEXT_IF={outside}\nPCP=no\n")
        state = tmp_path / "state"
        state.mkdir(mode=0o700)
        proc, manager, run_dir = run_unit(gw, "ipshift-rsipd@.service", "main", tmp_path, etc,
                                          {"STATE_DIRECTORY": str(state)})
        try:
            manager.wait_for("READY=1", 20)
            doc = request(run_dir / "rsip-main.sock", "status")
            assert doc["daemon"]["component"] == "rsip" and doc["daemon"]["name"] == "main"
            assert doc["gateway"]["public"] == "203.0.113.1"
            assert (state / "rsip-main.db").stat().st_mode & 0o077 == 0
            assert "ipshift_rsip_main" in gw.run(["nft", "list", "tables"]).stdout
            proc.signal(signal.SIGUSR1)
            deadline = time.monotonic() + 10
            while not (run_dir / "rsipd-main.stat").exists() and time.monotonic() < deadline:
                time.sleep(0.05)
            assert "RSIP server status file" in (run_dir / "rsipd-main.stat").read_text()
            assert stop_like_systemd(proc, "ipshift-rsipd@.service") == 0, proc.stderr()
            assert "ipshift_rsip_main" not in gw.run(["nft", "list", "tables"]).stdout
            assert "4555" not in gw.run(["ip", "rule"]).stdout
            assert (state / "rsip-main.db").exists()  # leases outlive the daemon
        finally:
            manager.close()
            if proc.running():
                proc.stop()


def test_rsipclient_unit(tmp_path: Path) -> None:
    from ipshift.lab.rsip_site import PUBLIC, TABLE, RsipSite

    with Lab("unit-rsipc") as lab:
        site = RsipSite(lab, tmp_path / "site")
        site.start_gateway()
        a = site.host("a")
        etc = tmp_path / "etc"
        (etc / "rsip").mkdir(parents=True)
        (etc / "rsip" / "client-rsip0.conf").write_text("RSIPCLIENT_OPTIONS=-s 192.0.2.1 -l 80\n")
        original = a.run(["sysctl", "-n", "net.ipv4.ip_local_port_range"]).stdout.split()
        proc, manager, run_dir = run_unit(a, "ipshift-rsipclient@.service", "rsip0", tmp_path,
                                          etc)
        try:
            manager.wait_for("READY=1", 30)
            doc = request(run_dir / "rsipclient-rsip0.sock", "status")
            assert doc["daemon"]["component"] == "rsipclient"
            assert doc["client"]["state"] == "assigned"
            assert f"{PUBLIC}/32" in a.ip("-o", "addr", "show", "rsip0")
            assert [b["first"] for b in doc["binds"] if b["kind"] == "listen"] == [80]
            assert stop_like_systemd(proc, "ipshift-rsipclient@.service") == 0, proc.stderr()
            assert a.run(["ip", "link", "show", "rsip0"], check=False).returncode != 0
            assert TABLE not in a.run(["nft", "list", "tables"]).stdout
            assert a.run(["sysctl", "-n", "net.ipv4.ip_local_port_range"]).stdout.split() \
                == original
            assert site.gateway_binds("192.0.2.10") == []
        finally:
            manager.close()
            if proc.running():
                proc.stop()
            site.stop_gateway()


def test_ilnp_unit(tmp_path: Path) -> None:
    with Lab("unit-ilnp") as lab:
        a, b = lab.host("a"), lab.host("b")
        lab.link(a, b, None, None, v6=("2001:db8:1::11/64", "2001:db8:1::22/64"),
                 name_a="l1")
        etc = tmp_path / "etc"
        (etc / "ilnp").mkdir(parents=True)
        config = etc / "ilnp" / "ilnp0.toml"
        config.write_text('name = "a"\nnid = "0000:0000:0000:0011"\ninterfaces = ["l1"]\n')
        (etc / "ilnp" / "ilnp0.conf").write_text(f"ILNP_CONFIG={config}\n")
        proc, manager, run_dir = run_unit(a, "ipshift-ilnp@.service", "ilnp0", tmp_path, etc)
        try:
            manager.wait_for("READY=1", 20)
            doc = request(run_dir / "ilnp-ilnp0.sock", "status")
            assert doc["daemon"]["component"] == "ilnp" and doc["daemon"]["name"] == "ilnp0"
            assert [loc["l64"] for loc in doc["node"]["locators"]] == ["2001:db8:1:0::/64"]
            assert "ilnp0" in a.ip("link", "show")
            assert stop_like_systemd(proc, "ipshift-ilnp@.service") == 0, proc.stderr()
            assert "ilnp0" not in a.ip("link", "show")
        finally:
            manager.close()
            if proc.running():
                proc.stop()
