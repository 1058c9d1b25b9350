"""The routes daemon's asyncio adapter without a kernel: hooks at shutdown, the nft table's
lifecycle, metrics and configuration errors that must be one line, the metrics snapshot."""

import asyncio
import os
import socket
import threading
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import generate_latest

from ipshift import cli
from ipshift.daemon import DaemonOptions, Instance, OwnedRecord, Runtime, run_service
from ipshift.daemon.metrics import registry
from ipshift.routes import config
from ipshift.routes import daemon as daemon_mod
from ipshift.routes.daemon import RoutesDaemon
from ipshift.routes.plan import RunHook
from ipshift.ui import UserError

SEED = ("ip route append default via 198.51.100.1 dev wan0 table 200\n"
        "ip route append default via 203.0.113.1 dev wan1 table 200\n")


def _cfg(tmp_path: Path, daemon: str = "") -> config.RoutesConfig:
    path = tmp_path / "routes.toml"
    path.write_text(f'ip = """\n{SEED}"""\n[daemon]\nprofile = "fast"\n{daemon}\n')
    return config.load(path)


def _runtime(d: RoutesDaemon, tmp_path: Path) -> Runtime:
    """The runtime a daemon gets from run_service, without the lock and the socket (call it
    on a running loop)."""
    rt = Runtime(d, Instance("routes", "t", run_dir=tmp_path), tmp_path / "s.sock",
                 OwnedRecord(tmp_path / "record.json"))
    d._rt = rt
    d._loop = rt.loop
    return rt


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_shutdown_ends_hook_processes(tmp_path):
    pidfile = tmp_path / "hook.pid"
    hook = tmp_path / "hook.sh"
    hook.write_text(f"#!/bin/sh\necho $$ > {pidfile}.tmp\nmv {pidfile}.tmp {pidfile}\n"
                    "exec sleep 40\n")
    hook.chmod(0o755)
    cfg = _cfg(tmp_path, f'hooks = ["{hook}", "{hook}"]\nhook_timeout = 30')
    d = RoutesDaemon(cfg)

    async def go() -> tuple[int, bool]:
        rt = _runtime(d, tmp_path)
        d._spawn(d._hooks(RunHook("wan0", "down", "up", "test", ())))
        for _ in range(1000):  # bounded: until the first hook runs
            if pidfile.exists():
                break
            await asyncio.sleep(0.01)
        pid = int(pidfile.read_text())
        rt.request_stop()
        await asyncio.wait_for(d._drain_tasks(), 30)
        alive = _alive(pid)
        if alive:
            os.kill(pid, 9)  # the bug: it outlives the daemon; do not leave it behind
        return pid, alive

    _, alive = asyncio.run(go())
    assert not alive  # terminated and reaped, not left running
    assert d.stats.hooks_run == 1  # the second hook is not started while stopping


class FakeKernel:
    def __init__(self, cfg: Any, netns: Any = None) -> None:
        self.calls: list[str] = []
        self.nl = None
        FakeKernel.last = self

    def links(self) -> list[Any]:
        return []

    def addresses(self, addresses: Any = None) -> dict[str, Any]:
        return {}

    def routes(self, routes: Any = None) -> list[Any]:
        return []

    def owned_rules(self, rules: Any = None) -> list[Any]:
        return []

    def apply_routes(self, ops: Any) -> list[None]:
        return [None] * len(ops)

    def add_rule(self, rule: Any) -> None:
        pass

    def remove_rule(self, rule: Any) -> None:
        pass

    def install_pinning(self) -> None:
        self.calls.append("install")

    def remove_pinning(self) -> None:
        self.calls.append("remove")

    def close(self) -> None:
        pass


class FakeWatcher:
    """An empty kernel that never changes."""

    resynced = False

    def __init__(self, netns: Any, kinds: Any, netlink: Any = None) -> None:
        self.r, self.w = os.pipe()
        self.view = self

    def fileno(self) -> int:
        return self.r

    def read(self) -> list[Any]:
        return []

    def links(self) -> list[Any]:
        return []

    def addresses(self) -> list[Any]:
        return []

    def routes(self) -> list[Any]:
        return []

    def rules(self) -> list[Any]:
        return []

    def close(self) -> None:
        os.close(self.r)
        os.close(self.w)


@pytest.mark.parametrize(("failback", "start", "stop"), [
    ("move", ["remove"], ["remove"]),  # a leftover of an earlier "stay" daemon goes
    ("stay", ["install"], ["remove"]),
])
def test_nft_table_removed_whatever_the_failback(tmp_path, monkeypatch, failback, start, stop):
    monkeypatch.setattr(daemon_mod, "KernelAdapter", FakeKernel)
    monkeypatch.setattr(daemon_mod, "KernelWatcher", FakeWatcher)
    d = RoutesDaemon(_cfg(tmp_path, f'failback = "{failback}"'))

    async def go() -> tuple[list[str], list[str]]:
        rt = _runtime(d, tmp_path)
        d._start_kernel(rt.loop.time())
        at_start = list(FakeKernel.last.calls)
        rt.request_stop()
        d._shutdown()
        return at_start, FakeKernel.last.calls[len(at_start):]

    assert asyncio.run(go()) == (start, stop)


@pytest.fixture
def no_kernel(monkeypatch):
    """These daemons must fail before touching the kernel: fail loudly (never hang) if not."""
    def refuse(*args: Any) -> None:
        raise AssertionError("the daemon went on to the kernel")
    monkeypatch.setattr(daemon_mod, "KernelAdapter", refuse)


@pytest.fixture
def busy_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    yield s.getsockname()[1]
    s.close()


def test_metrics_port_in_use_is_a_startup_error_and_cleans_up(tmp_path, busy_port, no_kernel):
    sock = tmp_path / "s.sock"
    d = RoutesDaemon(_cfg(tmp_path))
    options = DaemonOptions(socket=sock, metrics=f"127.0.0.1:{busy_port}", run_dir=tmp_path)
    with pytest.raises(UserError, match=f"127.0.0.1:{busy_port}"):
        run_service(d, options)
    assert not sock.exists()
    assert d.engine is None  # failed before touching the kernel


def _run_cli(monkeypatch, capsys, tmp_path, *args):
    cfg = tmp_path / "routes.toml"
    if not cfg.exists():
        _cfg(tmp_path)
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setattr("ipshift.ctl.protocol.DEFAULT_DIR", tmp_path)
    rc = cli.main(["routes", "run", "-c", str(cfg), "--socket", str(tmp_path / "s.sock"), *args])
    return rc, capsys.readouterr().err.strip().splitlines()


def test_cli_metrics_port_in_use_is_one_line(tmp_path, monkeypatch, capsys, busy_port,
                                             no_kernel):
    rc, lines = _run_cli(monkeypatch, capsys, tmp_path, "--metrics", f"127.0.0.1:{busy_port}")
    assert rc == 2
    assert len(lines) == 1 and "in use" in lines[0] and str(busy_port) in lines[0], lines
    assert not (tmp_path / "s.sock").exists()


@pytest.mark.parametrize("value", ["127.0.0.1:x", "9465", "127.0.0.1:0", ":9465"])
def test_cli_bad_metrics_value_is_one_line(tmp_path, monkeypatch, capsys, value, no_kernel):
    rc, lines = _run_cli(monkeypatch, capsys, tmp_path, "--metrics", value)
    assert rc == 2
    assert len(lines) == 1 and "ADDRESS:PORT" in lines[0] and "--metrics" in lines[0], lines


@pytest.mark.parametrize("suffix", [".toml", ".ip"])
def test_config_not_utf8_is_a_config_error_naming_the_file(tmp_path, suffix):
    bad = tmp_path / f"bad{suffix}"
    bad.write_bytes(b"ip route add default via 198.51.100.1 dev wan0\n\xff\xfe\n")
    cfg, problems = config.check(bad)
    assert cfg is None and len(problems) == 1
    assert str(problems[0]).startswith(str(bad)) and "UTF-8" in str(problems[0])
    with pytest.raises(config.ConfigError, match="UTF-8"):
        config.load(bad)


def test_config_include_not_utf8_names_the_include(tmp_path):
    inc = tmp_path / "inc.ip"
    inc.write_bytes(b"\xff\n")
    top = tmp_path / "routes.toml"
    top.write_text(f'include = ["{inc}"]\n')
    _, problems = config.check(top)
    assert any("inc.ip" in str(p) and "UTF-8" in str(p) for p in problems), problems


def test_cli_run_and_check_with_non_utf8_config(tmp_path, monkeypatch, capsys, no_kernel):
    bad = tmp_path / "routes.toml"
    bad.write_bytes(b"\xff\xfe[daemon]\n")
    rc, lines = _run_cli(monkeypatch, capsys, tmp_path)
    assert rc == 2 and len(lines) == 1 and str(bad) in lines[0] and "UTF-8" in lines[0]
    assert cli.main(["routes", "check", "-c", str(bad)]) == 1
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and str(bad) in out[0] and "UTF-8" in out[0]


class LoopOnlyDict(dict):
    """A stats dict that fails when read from another thread than the event loop's."""

    owner: int | None = None

    def _check(self) -> None:
        assert threading.get_ident() == self.owner, "stats read outside the event loop"

    def items(self):  # type: ignore[override]
        self._check()
        return super().items()

    def keys(self):  # type: ignore[override]
        self._check()
        return super().keys()

    def values(self):  # type: ignore[override]
        self._check()
        return super().values()

    def __iter__(self):
        self._check()
        return super().__iter__()

    def copy(self):
        self._check()
        return dict(super().items())


def test_metrics_read_stats_on_the_event_loop_only(tmp_path, monkeypatch):
    """The loop thread adds keys to the stats dicts at any time: a scrape on the metrics thread
    must not iterate them (dictionary changed size during iteration)."""
    monkeypatch.setattr(daemon_mod, "KernelAdapter", FakeKernel)
    monkeypatch.setattr(daemon_mod, "KernelWatcher", FakeWatcher)
    d = RoutesDaemon(_cfg(tmp_path))
    s = d.stats
    for name in ("conntrack_deleted", "probes_sent", "transitions", "last_change"):
        setattr(s, name, LoopOnlyDict(getattr(s, name)))
    s.transitions[("wan0", "down")] = 2
    s.probes_sent[("wan0", "icmp")] = 7
    s.conntrack_deleted["wan0"] = 3

    async def go() -> str:
        rt = _runtime(d, tmp_path)
        owner = threading.get_ident()
        for name in ("conntrack_deleted", "probes_sent", "transitions", "last_change"):
            getattr(s, name).owner = owner
        d._start_kernel(rt.loop.time())
        rt.state = "running"
        try:
            text = await asyncio.to_thread(generate_latest, registry(rt.metrics_threadsafe))
        finally:
            d._shutdown()
        return text.decode()

    text = asyncio.run(go())
    assert 'ipshift_routes_uplink_transitions_total{state="down",uplink="wan0"} 2.0' in text
    assert 'ipshift_routes_probes_sent_total{kind="icmp",uplink="wan0"}' in text
    assert 'ipshift_routes_conntrack_deleted_total{uplink="wan0"} 3.0' in text
