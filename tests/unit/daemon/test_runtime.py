"""The daemon runtime without a kernel: the instance lock, the owned-state record, the engine
pump, systemd notification, metrics, and a whole service lifecycle through run_service."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import stat
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import generate_latest

from ipshift.ctl import CtlClient, CtlError
from ipshift.daemon import (
    NFT_TABLE,
    DaemonOptions,
    EnginePump,
    Instance,
    InstanceError,
    InstanceLock,
    Metric,
    OwnedRecord,
    Runtime,
    StartError,
    counter,
    gauge,
    run_service,
)
from ipshift.daemon.instance import name_problem
from ipshift.daemon.metrics import address_problem, registry
from ipshift.daemon.notify import sd_notify
from ipshift.ui import UserError


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    d = tmp_path / "run"
    d.mkdir(mode=0o700)
    return d


# --- the instance lock ------------------------------------------------------------------------
def test_a_second_instance_is_refused_with_the_holders_pid(run_dir: Path) -> None:
    inst = Instance("routes", "main", run_dir=run_dir)
    first = InstanceLock(inst)
    first.acquire()
    try:
        with pytest.raises(InstanceError, match=rf"another routes 'main' is already running "
                                                rf"\(pid {os.getpid()}\)"):
            InstanceLock(Instance("routes", "main", run_dir=run_dir)).acquire()
        # another name, or another component of the same name, is another instance
        other = InstanceLock(Instance("routes", "backup", run_dir=run_dir))
        other.acquire()
        other.release()
        InstanceLock(Instance("tunnel", "main", run_dir=run_dir)).acquire()
    finally:
        first.release()
    again = InstanceLock(inst)
    again.acquire()  # released: free again
    again.release()


def test_lock_directory_is_private(run_dir: Path) -> None:
    os.chmod(run_dir, 0o755)  # as an older lab left /run/ipshift
    lock = InstanceLock(Instance("resend", "ppp0", run_dir=run_dir))
    lock.acquire()
    lock.release()
    assert stat.S_IMODE(os.stat(run_dir / "instances").st_mode) == 0o700
    os.chmod(run_dir / "instances", 0o777)
    with pytest.raises(InstanceError, match="writable by other users"):
        InstanceLock(Instance("resend", "ppp0", run_dir=run_dir)).acquire()


@pytest.mark.parametrize("name", ["", "a" * 65, "../x", "a/b", "sp ace", ".hidden", "\xff",
                                  "tab\t"])
def test_bad_instance_names_are_one_line(name: str) -> None:
    problem = name_problem(name)
    assert problem and "\n" not in problem
    with pytest.raises(InstanceError):
        Instance("routes", name)


@pytest.mark.parametrize("name", ["routes", "ppp0", "eth0.100", "wan-1", "a" * 64, "tun%d"])
def test_good_instance_names(name: str) -> None:
    assert name_problem(name) is None


# --- the owned-state record -------------------------------------------------------------------
def test_record_survives_a_crash_and_forgets_what_was_settled(tmp_path: Path) -> None:
    path = tmp_path / "r.json"
    rec = OwnedRecord(path)
    assert rec.previous == {}
    rec.add(NFT_TABLE, "inet ipshift_resend_ppp0")
    rec.add("lo_address", "192.0.2.7/32")
    rec.add("lo_address", "192.0.2.7/32")  # once
    # the process dies here: the next instance reads what it held
    nxt = OwnedRecord(path)
    assert nxt.left_over("lo_address") == ["192.0.2.7/32"]
    assert nxt.left_over(NFT_TABLE) == ["inet ipshift_resend_ppp0"]
    nxt.add("lo_address", "198.51.100.9/32")
    nxt.settled("lo_address", ["192.0.2.7/32"])
    # a crash now still knows the unsettled table, and the new address
    third = OwnedRecord(path)
    assert third.previous == {NFT_TABLE: ["inet ipshift_resend_ppp0"],
                              "lo_address": ["198.51.100.9/32"]}
    nxt.settled(NFT_TABLE)
    nxt.discard("lo_address", "198.51.100.9/32")
    assert not path.exists()  # nothing held, nothing left over: no record


@pytest.mark.parametrize("content", [b"", b"{", b"[]", b'{"owned": 3}', b"\xff\xfe",
                                     b'{"owned": {"x": "notalist"}}'])
def test_a_damaged_record_is_ignored(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "r.json"
    path.write_bytes(content)
    assert OwnedRecord(path).previous == {}


# --- the engine pump --------------------------------------------------------------------------
class TickEngine:
    """Emits an action at each timer until `count` timers have fired, 10 ms apart."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.fired: list[float] = []
        self.pending: list[str] = []
        self.at: float | None = None

    def start(self, now: float) -> None:
        self.at = now + 0.01

    def handle_timer(self, now: float) -> None:
        self.fired.append(now)
        self.pending.append(f"tick{len(self.fired)}")
        self.at = now + 0.01 if len(self.fired) < self.count else None

    def next_timer(self) -> float | None:
        return self.at

    def actions(self) -> Sequence[Any]:
        out, self.pending = self.pending, []
        return out


def test_pump_fires_timers_and_applies_actions_in_order() -> None:
    applied: list[str] = []
    after_calls = []

    async def go() -> TickEngine:
        loop = asyncio.get_running_loop()
        engine = TickEngine(5)
        pump = EnginePump(loop, engine, applied.extend, after=lambda: after_calls.append(1))
        engine.start(pump.now())
        pump.run()
        for _ in range(200):  # bounded
            if len(engine.fired) == 5:
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.03)  # no timer after the last
        pump.stop()
        return engine

    engine = asyncio.run(go())
    assert applied == [f"tick{i}" for i in range(1, 6)]
    assert len(engine.fired) == 5 and engine.fired == sorted(engine.fired)
    assert len(after_calls) == 6  # the first run, then one per timer


class Runaway:
    def handle_timer(self, now: float) -> None:
        pass

    def next_timer(self) -> float | None:
        return None

    def actions(self) -> Sequence[Any]:
        return ["again"]


def test_pump_bounds_an_engine_that_never_settles() -> None:
    async def go() -> EnginePump:
        pump = EnginePump(asyncio.get_running_loop(), Runaway(), lambda acts: None)
        pump.run()
        return pump

    assert asyncio.run(go()).rounds_cut == 1


# --- systemd and metrics ----------------------------------------------------------------------
@pytest.mark.parametrize("abstract", [False, True])
def test_sd_notify_reaches_the_manager(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                       abstract: bool) -> None:
    manager = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    if abstract:
        name = f"ipshift-test-{os.getpid()}"
        manager.bind("\0" + name)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
    else:
        manager.bind(str(tmp_path / "notify"))
        monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify"))
    manager.settimeout(2)
    try:
        assert sd_notify("READY=1", "STATUS=up")
        assert manager.recv(4096) == b"READY=1\nSTATUS=up"
    finally:
        manager.close()


def test_sd_notify_outside_systemd_does_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert not sd_notify("READY=1")
    monkeypatch.setenv("NOTIFY_SOCKET", "relative/path")
    assert not sd_notify("READY=1")


@pytest.mark.parametrize(("value", "ok"), [
    ("127.0.0.1:9465", True), ("[::1]:9465", True), ("localhost:80", True),
    ("9465", False), (":9465", False), ("127.0.0.1:0", False), ("127.0.0.1:x", False),
    ("example.invalid:80", False), ("127.0.0.1:70000", False), ("[::1]:²", False),
])
def test_metrics_address(value: str, ok: bool) -> None:
    assert (address_problem(value) is None) == ok


def test_metrics_are_rendered_for_prometheus() -> None:
    snapshot = [counter("ipshift_x_sent", 3, "sent", uplink="wan0"),
                counter("ipshift_x_sent", 4, "sent", uplink="wan1"),
                gauge("ipshift_x_up", 1, "up")]
    text = generate_latest(registry(lambda: snapshot)).decode()
    assert 'ipshift_x_sent_total{uplink="wan0"} 3.0' in text
    assert 'ipshift_x_sent_total{uplink="wan1"} 4.0' in text
    assert "ipshift_x_up 1.0" in text and "# TYPE ipshift_x_sent_total counter" in text


# --- a whole service --------------------------------------------------------------------------
class FakeService:
    """Holds a pretend nft table; from start(), plays the client of its own control socket."""

    component = "fake"
    adopts = frozenset({NFT_TABLE})  # handled here: no nftables in a unit test

    def __init__(self, name: str = "one", *, fail: str | None = None) -> None:
        self.instance = name
        self.netns = None
        self.fail = fail
        self.stopped = False
        self.seen: dict[str, Any] = {}
        self.rt: Runtime | None = None

    async def start(self, rt: Runtime) -> None:
        self.rt = rt
        self.seen["left_over"] = rt.record.left_over(NFT_TABLE)
        rt.record.settled(NFT_TABLE)
        if self.fail:
            raise StartError(self.fail)
        rt.record.add(NFT_TABLE, "inet fake_one")
        rt.method("echo", lambda params: params)
        rt.spawn(self._client(rt), "client")

    async def _client(self, rt: Runtime) -> None:
        await asyncio.sleep(0.05)  # serving by now
        self.seen["second"] = await asyncio.to_thread(self._second_instance, rt)
        self.seen["calls"] = await asyncio.to_thread(self._calls, rt.socket)

    @staticmethod
    def _second_instance(rt: Runtime) -> str:
        try:
            InstanceLock(rt.instance).acquire()
        except InstanceError as exc:
            return str(exc)
        return "acquired"

    @staticmethod
    def _calls(path: Path) -> dict[str, Any]:
        with CtlClient(path) as c:
            out = {"status": c.call("status"), "metrics": c.call("metrics"),
                   "echo": c.call("echo", x=1)}
            out["stop"] = c.call("stop")
        return out

    async def stop(self) -> None:
        self.stopped = True
        if self.rt is not None:
            self.rt.record.discard(NFT_TABLE, "inet fake_one")

    def status(self) -> dict[str, Any]:
        return {"daemon": {"tables": 1}, "fake": {"ok": True}}

    def metrics(self) -> Iterable[Metric]:
        return [counter("ipshift_fake_things", 2, "things")]


def test_service_lifecycle(run_dir: Path) -> None:
    service = FakeService()
    sock = run_dir / "fake.sock"
    assert run_service(service, DaemonOptions(socket=sock, run_dir=run_dir)) == 0
    calls = service.seen["calls"]
    head = calls["status"]["daemon"]
    assert head["component"] == "fake" and head["name"] == "one" and head["state"] == "running"
    assert head["pid"] == os.getpid() and head["tables"] == 1  # the service's block merged
    assert calls["status"]["fake"] == {"ok": True}
    names = {m["name"] for m in calls["metrics"]}
    assert {"ipshift_fake_things_total", "ipshift_fake_uptime_seconds"} <= names
    assert calls["echo"] == {"x": 1} and calls["stop"] == {"stopping": True}
    assert "already running" in service.seen["second"]
    assert service.stopped and not sock.exists()
    assert not list((run_dir / "instances").glob("*.json"))  # nothing held: no record


def test_a_crashed_instance_is_found_by_the_next(run_dir: Path) -> None:
    inst = Instance("fake", "one", run_dir=run_dir)
    inst.directory.mkdir(mode=0o700)
    inst.record_path.write_text(json.dumps({"pid": 1, "owned": {NFT_TABLE: ["inet fake_one"]}}))
    service = FakeService()
    assert run_service(service, DaemonOptions(socket=run_dir / "f.sock", run_dir=run_dir)) == 0
    assert service.seen["left_over"] == ["inet fake_one"]


def test_a_failed_start_is_one_line_and_leaves_nothing(run_dir: Path) -> None:
    service = FakeService(fail="the interface ppp9 does not exist")
    sock = run_dir / "f.sock"
    with pytest.raises(UserError, match=r"^the interface ppp9 does not exist$"):
        run_service(service, DaemonOptions(socket=sock, run_dir=run_dir))
    assert service.stopped and not sock.exists()
    again = InstanceLock(Instance("fake", "one", run_dir=run_dir))
    again.acquire()  # the lock was released
    again.release()


@pytest.mark.parametrize(("options", "message"), [
    ({"socket": Path("/tmp/" + "x" * 120)}, "at most 107"),
    ({"metrics": "nowhere"}, "ADDRESS:PORT"),
])
def test_bad_options_fail_before_anything(run_dir: Path, options: dict[str, Any],
                                          message: str) -> None:
    service = FakeService()
    with pytest.raises(UserError, match=message):
        run_service(service, DaemonOptions(run_dir=run_dir, **options))
    assert "left_over" not in service.seen  # never started


def test_socket_in_proc_is_one_line(run_dir: Path) -> None:
    with pytest.raises(UserError) as info:
        run_service(FakeService(), DaemonOptions(socket=Path("/proc/self/x.sock"),
                                                 run_dir=run_dir))
    assert "\n" not in str(info.value) and "/proc/self" in str(info.value)


def test_ctl_error_codes_reach_the_client(run_dir: Path) -> None:
    with pytest.raises(CtlError):
        CtlClient(run_dir / "none.sock")
