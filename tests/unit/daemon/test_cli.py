"""Every daemon's command line refuses an unusable control socket or metrics address in one
line with exit status 2, before anything is created."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ipshift import cli

LONG = "/tmp/" + "s" * 110 + ".sock"
SEED = "ip route append default via 198.51.100.1 dev wan0 table 200\n"


def _argv(component: str, tmp_path: Path, socket: str) -> list[str]:
    if component == "tunnel":
        return ["tunnel", "run", "--dev", "tunx", "--local", "192.0.2.1:4789", "--remote",
                "192.0.2.2:4789", "--socket", socket]
    if component == "resend":
        return ["resend", "run", "-o", "ppp9", "-c", socket]
    config = tmp_path / "routes.ip"
    config.write_text(SEED)
    return ["routes", "run", "-c", str(config), "--socket", socket]


@pytest.fixture
def as_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    run = tmp_path / "run"
    run.mkdir(mode=0o700)
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setattr("ipshift.ctl.protocol.DEFAULT_DIR", run)
    return run


@pytest.mark.parametrize("component", ["tunnel", "resend", "routes"])
@pytest.mark.parametrize(("socket", "message"), [
    (LONG, "at most 107"),
    ("/proc/self/x.sock", "/proc/self"),
])
def test_unusable_socket_is_one_line(component: str, socket: str, message: str, tmp_path: Path,
                                     as_root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = cli.main(_argv(component, tmp_path, socket))
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and message in err[0], err
    assert "Traceback" not in "".join(err)
    assert not list(as_root.glob("instances/*.json"))  # nothing was recorded as owned


@pytest.mark.parametrize("component", ["tunnel", "resend", "routes"])
def test_bad_metrics_address_is_one_line(component: str, tmp_path: Path, as_root: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    argv = [*_argv(component, tmp_path, str(as_root / "d.sock")), "--metrics", "9465"]
    rc = cli.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "ADDRESS:PORT" in err[0], err


@pytest.mark.parametrize("component", ["tunnel", "resend", "routes"])
def test_every_daemon_has_status_and_stop(component: str,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    for action in ("status", "stop"):
        with pytest.raises(SystemExit) as info:
            cli.main([component, action, "--help"])
        assert info.value.code == 0
    assert "--json" in capsys.readouterr().out


@pytest.mark.parametrize("name", ["../../etc/x", "a b", "x" * 65])
def test_routes_status_name_is_checked(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    for action in ("status", "stop"):
        assert cli.main(["routes", action, "--name", name]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "--name" in err[0], err
