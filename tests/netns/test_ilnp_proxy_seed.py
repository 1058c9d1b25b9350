"""The seed's application interface in namespaces: `ipshift ilnp seed-node CONFIG 10000` on
the mobile node and the correspondent, mappings made with `ipshift ilnp proxy-create`, and
real `nc -u -p 10001 127.0.0.1 10000` at both ends exchanging lines while the mobile node
moves on its schedule; then the same node against the reference peer's own proxy.

The seed's topology on one switch (tests/netns/test_ilnp_seed_peer.py): mn moves between L1
and L2 (a move every 2 s, 1 s of soft handoff), cn sits on L3, and r, the reference peer
(tests/ilnp_seed_peer.py) as a router, joins all three.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from ipshift.ctl.client import request
from ipshift.ilnp.proxycli import send_mapping
from ipshift.lab import LabProcess, Node
from tests.netns.conftest import need

pytestmark = pytest.mark.netns

PROXYCLI = [sys.executable, "-m", "ipshift", "ilnp"]
PEER = str(Path(__file__).resolve().parents[1] / "ilnp_seed_peer.py")
IFNAME = "to-sw"
L1, L2, L3 = "2001:db8:0:1", "2001:db8:0:2", "2001:db8:0:3"
PROXY_PORT, APP_PORT = 10000, 10001
LINES = 70  # 7 s at 10 lines/s: three or more moves of mn while they flow
RATE = 10.0
MIN_MOVES = 2


@pytest.fixture
def site(lab: Any) -> dict[str, Node]:
    need("nc")
    sw = lab.switch("sw")
    nodes = {}
    for i, name in enumerate(("mn", "cn", "r"), start=1):
        node = lab.host(name)
        lab.link(node, sw, None, None, v6=(f"2001:db8:ff::{i}/64", None))
        nodes[name] = node
    return nodes


def wait_until(what: str, check: Callable[[], Any], timeout: float,
               *procs: LabProcess) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        for proc in procs:
            if not proc.running():
                pytest.fail(f"{proc.name} exited {proc.poll()} while waiting for {what}: "
                            f"{proc.stderr()[-2000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"no {what} within {timeout} s")
        time.sleep(0.1)


def reference_peer(node: Node, hostname: str, nid: str, locators: str,
                   *extra: str) -> LabProcess:
    proc = node.spawn([sys.executable, PEER, "--interface", IFNAME, "--hostname", hostname,
                       "--nid", nid, "--locators", locators, "--wait", "2", *extra],
                      name=f"seed-{hostname}")
    proc.wait_ready('"event": "ready"', 10, f"the reference peer {hostname}")
    return proc


class SeedNodeProc:
    """`ipshift ilnp seed-node` with its proxy, every path of it under `tmp_path`."""

    def __init__(self, node: Node, tmp_path: Path, config: str, *, proxy: bool = True) -> None:
        self.node = node
        self.name = node.name
        self.config = tmp_path / f"{self.name}.ini"
        self.config.write_text(config)
        self.run_dir = tmp_path / f"run-{self.name}"
        self.unix = self.run_dir / "proxy.sock"
        self.control = self.run_dir / "control.sock"
        port = [str(PROXY_PORT), "--unix", str(self.unix)] if proxy else []
        self.proc = node.spawn([*PROXYCLI, "seed-node", str(self.config), *port,
                                "--socket", str(self.control), "--no-syslog"],
                               name=f"seed-node-{self.name}",
                               env={"IPSHIFT_RUN_DIR": str(self.run_dir)})
        self.proc.wait_ready(" running (pid", 15, f"ipshift ilnp seed-node on {self.name}")

    def status(self) -> dict[str, Any]:
        doc: dict[str, Any] = request(self.control, "status")
        return doc

    def neighbours(self) -> set[str]:
        return {n["hostname"] for n in self.status()["node"]["neighbours"].values()}

    def moves(self) -> int:
        return int(self.status()["node"]["counters"].get("moves", 0))


def node_config(hostname: str, nid: str, locators: str, schedule: str = "",
                router: bool = False) -> str:
    """The seed's own layout and key names; the schedule in ipshift's form."""
    lines = ["[link]", "mcast_port = 10000", f"mcast_interface = {IFNAME}", "",
             "[network]", f"locators = {locators}", f"nid = {nid}",
             "move_time = 2", "handover_time = 1", "", "[discovery]",
             f"hostname = {hostname}", "wait_time = 2"]
    if schedule:
        lines.append(f"move_schedule = {schedule}")
    if router:
        lines.append("router = yes")
    return "\n".join(lines) + "\n"


def proxy_create(node: Node, unix: Path, local: int, host: str, remote: int) -> str:
    res = node.run([*PROXYCLI, "proxy-create", str(local), host, str(remote), "--unix",
                    str(unix)], timeout=15)
    return res.stdout.strip()


class Netcat:
    """A real `nc -u -p 10001 HOST PORT`; lines go in through a FIFO as its stdin."""

    def __init__(self, node: Node, tmp_path: Path, host: str, port: int, *extra: str) -> None:
        self.fifo = tmp_path / f"nc-{node.name}.in"
        os.mkfifo(self.fifo)
        command = " ".join(["exec nc -u", *extra, "-p", str(APP_PORT), host, str(port),
                            "<", str(self.fifo)])
        self.proc = node.spawn(["sh", "-c", command], name=f"nc-{node.name}")
        self.fd = self._open_writer(5.0)
        wait_until(f"nc's socket on port {APP_PORT} in {node.name}",
                   lambda: f":{APP_PORT} " in node.run(["ss", "-Huan"]).stdout, 10, self.proc)

    def _open_writer(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fd = os.open(self.fifo, os.O_WRONLY | os.O_NONBLOCK)
            except OSError as exc:
                if exc.errno != errno.ENXIO or time.monotonic() > deadline:
                    raise
                time.sleep(0.02)
                continue
            os.set_blocking(fd, True)
            return fd

    def send(self, line: str) -> None:
        os.write(self.fd, line.encode() + b"\n")

    def lines(self) -> list[str]:
        return self.proc.stdout().splitlines()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.fd)


@contextlib.contextmanager
def netcats(*ends: tuple[Node, Path, str, int, tuple[str, ...]]) -> Iterator[list[Netcat]]:
    opened: list[Netcat] = []
    try:
        for node, tmp_path, host, port, extra in ends:
            opened.append(Netcat(node, tmp_path, host, port, *extra))
        yield opened
    finally:
        for nc in opened:
            nc.close()


def exchange(a: Netcat, b: Netcat, tag_a: str, tag_b: str) -> None:
    """LINES lines each way at RATE; then every line must have arrived, once."""
    start = time.monotonic()
    for i in range(LINES):
        a.send(f"{tag_a} {i}")
        b.send(f"{tag_b} {i}")
        time.sleep(max(0.0, start + (i + 1) / RATE - time.monotonic()))
    want_at_b = {f"{tag_a} {i}" for i in range(LINES)}
    want_at_a = {f"{tag_b} {i}" for i in range(LINES)}
    wait_until("every line at both ends",
               lambda: want_at_b <= set(b.lines()) and want_at_a <= set(a.lines()), 10,
               a.proc, b.proc)
    time.sleep(0.3)  # anything doubled would be in by now
    for nc, want in ((a, want_at_a), (b, want_at_b)):
        got = [line for line in nc.lines() if line]
        assert sorted(got) == sorted(want), f"{nc.proc.name}: {got[:10]} ..."


def check_loopback_only(node: Node, unix: Path) -> None:
    sockets = node.run(["ss", "-Hunl"]).stdout
    assert f"127.0.0.1:{PROXY_PORT} " in sockets, sockets
    assert f"0.0.0.0:{PROXY_PORT} " not in sockets, sockets
    assert stat.S_IMODE(unix.stat().st_mode) == 0o600
    assert stat.S_IMODE(unix.parent.stat().st_mode) == 0o700


def test_nc_talks_across_the_overlay_while_mn_moves(site: dict[str, Node],
                                                   tmp_path: Path) -> None:
    reference_peer(site["r"], "r", "3333", f"{L1},{L2},{L3}", "--router")
    mn = SeedNodeProc(site["mn"], tmp_path, node_config("mn", "0:0:0:1111", L1, f"{L2};{L1}"))
    cn = SeedNodeProc(site["cn"], tmp_path, node_config("cn", "2222", L3))
    for me, other in ((mn, "cn"), (cn, "mn")):
        wait_until(f"{me.name} discovering {other} and r",
                   lambda me=me, other=other: {other, "r"} <= me.neighbours(), 15, me.proc)
        assert proxy_create(me.node, me.unix, APP_PORT, other, APP_PORT) == str(PROXY_PORT)
        check_loopback_only(me.node, me.unix)
    with netcats((site["mn"], tmp_path, "127.0.0.1", PROXY_PORT, ()),
                 (site["cn"], tmp_path, "127.0.0.1", PROXY_PORT, ())) as (at_mn, at_cn):
        moves_before = mn.moves()
        exchange(at_mn, at_cn, "mn", "cn")
        moved = mn.moves() - moves_before
    assert moved >= MIN_MOVES
    st_mn, st_cn = mn.status(), cn.status()
    assert st_cn["node"]["counters"]["lu_received"] >= moved
    assert st_mn["node"]["counters"].get("lu_acked", 0) >= moved
    for doc in (st_mn, st_cn):
        proxy = doc["proxy"]
        assert proxy["counters"]["sent"] == LINES and proxy["counters"]["delivered"] == LINES
        assert [(m["local_port"], m["remote_port"]) for m in proxy["mappings"]] == \
            [(APP_PORT, APP_PORT)]
    # a new mapping of the same port replaces the old one
    assert proxy_create(site["mn"], mn.unix, APP_PORT, "r", 7) == str(PROXY_PORT)
    rows = mn.status()["proxy"]["mappings"]
    assert [(m["remote_host"], m["remote_port"]) for m in rows] == [("r", 7)]
    assert "mapping of port 10001 replaced: was cn:10001, now r:7" in mn.proc.stderr()
    # a malformed request is answered, counted and changes nothing
    answer = site["mn"].call(send_mapping, mn.unix, b"10001 cn 0", 5.0)
    assert answer == "error: remote port '0': a port is a number 1-65535"
    status = mn.status()["proxy"]
    assert status["mapping_errors"] == {"bad_remote_port": 1}
    assert [m["remote_host"] for m in status["mappings"]] == ["r"]


def test_seed_node_talks_to_the_reference_peers_proxy(site: dict[str, Node],
                                                      tmp_path: Path) -> None:
    reference_peer(site["r"], "r", "3333", f"{L1},{L2},{L3}", "--router")
    ref_unix = tmp_path / "cn-reference.proxy"
    reference_peer(site["cn"], "cn", "2222", L3, "--udp-proxy", "9000", "--unix", str(ref_unix))
    mn = SeedNodeProc(site["mn"], tmp_path, node_config("mn", "1111", L1, f"{L2};{L1}"))
    wait_until("mn discovering cn and r", lambda: {"cn", "r"} <= mn.neighbours(), 15, mn.proc)
    assert proxy_create(site["mn"], mn.unix, APP_PORT, "cn", APP_PORT) == str(PROXY_PORT)
    # the reference peer takes the same datagram from our proxy-create, and answers its port
    assert proxy_create(site["cn"], ref_unix, APP_PORT, "mn", APP_PORT) == "9000"
    with netcats((site["mn"], tmp_path, "127.0.0.1", PROXY_PORT, ()),
                 (site["cn"], tmp_path, "::1", 9000, ("-6",))) as (at_mn, at_cn):
        moves_before = mn.moves()
        exchange(at_mn, at_cn, "ipshift", "reference")
        moved = mn.moves() - moves_before
    assert moved >= MIN_MOVES
    status = mn.status()
    assert status["node"]["counters"].get("lu_acked", 0) >= moved
    assert status["proxy"]["drops"] == {}


def test_seed_node_without_a_proxy_is_the_router(site: dict[str, Node], tmp_path: Path) -> None:
    """All three nodes ipshift's: r runs the node alone (no PROXY_PORT) as the router."""
    r = SeedNodeProc(site["r"], tmp_path, node_config("r", "3333", f"{L1},{L2},{L3}",
                                                      router=True), proxy=False)
    mn = SeedNodeProc(site["mn"], tmp_path, node_config("mn", "1111", L1, f"{L2};{L1}"))
    cn = SeedNodeProc(site["cn"], tmp_path, node_config("cn", "2222", L3))
    for me, other in ((mn, "cn"), (cn, "mn")):
        wait_until(f"{me.name} discovering {other} and r",
                   lambda me=me, other=other: {other, "r"} <= me.neighbours(), 15, me.proc)
        assert proxy_create(me.node, me.unix, APP_PORT, other, APP_PORT) == str(PROXY_PORT)
    with netcats((site["mn"], tmp_path, "127.0.0.1", PROXY_PORT, ()),
                 (site["cn"], tmp_path, "127.0.0.1", PROXY_PORT, ())) as (at_mn, at_cn):
        moves_before = mn.moves()
        exchange(at_mn, at_cn, "mn", "cn")
        moved = mn.moves() - moves_before
    assert moved >= MIN_MOVES
    status = r.status()
    assert "proxy" not in status and status["node"]["router"]
    assert status["node"]["counters"]["forwarded"] >= 2 * LINES
    assert f":{PROXY_PORT} " not in site["r"].run(["ss", "-Hu4anl"]).stdout
