"""The seed's command lines parse as the seed documents them."""

import argparse
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from ipshift.resend.cli import _add_run_options, config_from_args
from ipshift.resend.wakeup import WakeupFailed, default_socket, main
from ipshift.ui import UserError


def _parse(*argv):
    p = argparse.ArgumentParser()
    _add_run_options(p)
    return config_from_args(p.parse_args(list(argv)))


def test_defaults_are_the_seeds():
    c = _parse("-o", "ppp0")
    assert (c.wakeup_wait, c.response_wait, c.translate, c.persistent) == (10.0, 10.0, True, False)
    assert c.maps_replies


def test_r_and_R():
    assert not _parse("-o", "ppp0", "-r", "0").maps_replies
    c = _parse("-o", "ppp0", "-R", "4")
    assert (c.response_wait, c.translate, c.maps_replies) == (4.0, False, False)
    with pytest.raises(SystemExit):
        _parse("-o", "ppp0", "-r", "1", "-R", "1")  # one or the other, as in the seed
    with pytest.raises(UserError):
        _parse("-o", "ppp0", "-w", "-1")
    for option in ("-w", "-r", "-R"):
        for value in ("nan", "inf"):
            with pytest.raises(UserError, match="number of seconds"):
                _parse("-o", "ppp0", option, value)


def test_socket_derived_from_interface():
    assert default_socket("ppp0").name == "ppp0"
    assert default_socket("ppp0").parent.name == "resend"
    for bad in ("", "../x", ".."):
        with pytest.raises(WakeupFailed):
            default_socket(bad)


def test_wakeup_needs_a_target(capsys):
    assert main(["-m", "192.0.2.1"]) == 2
    assert "-d INTERFACE, -o INTERFACE or -c PATH" in capsys.readouterr().err


def test_run_without_root_is_a_clear_error(monkeypatch, capsys):
    from ipshift.cli import main

    monkeypatch.setattr("os.geteuid", lambda: 65534)
    monkeypatch.setattr("ipshift.resend.daemon.run_daemon",
                        lambda *a, **k: pytest.fail("started anyway"))
    assert main(["resend", "run", "-o", "ppp9"]) == 2
    assert "run it as root" in capsys.readouterr().err


def _wakeup_error(capsys, *argv):
    assert main(["-m", "192.0.2.1", *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("ip_resend_wakeup: ")
    return err


def test_wakeup_to_what_is_not_a_socket_says_so(tmp_path, capsys):
    """`-c /etc/passwd` used to say "not running": ECONNREFUSED on a regular file."""
    (tmp_path / "passwd").write_text("root:x:0:0::/root:/bin/sh\n")
    for target in ("passwd", ".", "passwd/x"):
        err = _wakeup_error(capsys, "-c", str(tmp_path / target))
        assert "is not a control socket" in err and "not running" not in err


def test_wakeup_to_a_stopped_ip_resend_says_not_running(tmp_path, capsys):
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(tmp_path / "ppp0"))
    stale.close()
    for target in ("ppp0", "absent"):
        err = _wakeup_error(capsys, "-c", str(tmp_path / target))
        assert err == f"ip_resend_wakeup: Unable to reach ip_resend on {tmp_path / target}: " \
                      "not running\n"


def test_wakeup_with_a_socket_path_too_long(tmp_path, capsys):
    err = _wakeup_error(capsys, "-c", str(tmp_path / ("x" * 120)))
    assert "at most 107" in err


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None,
                    reason="needs root and setpriv to run as another user")
def test_wakeup_without_permission_says_run_as_root(tmp_path):
    """An unprivileged ip-up script used to be told "not running"."""
    private = tmp_path / "resend"
    private.mkdir(mode=0o700)
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(private / "ppp0"))
    listener.listen()
    try:
        res = subprocess.run(
            ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable,
             "-m", "ipshift.resend.wakeup", "-m", "192.0.2.1", "-c", str(private / "ppp0")],
            capture_output=True, text=True, timeout=30,
            env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[3] / "src")})
    finally:
        listener.close()
    assert res.returncode == 2
    assert res.stderr == (f"ip_resend_wakeup: Unable to reach ip_resend: permission denied on "
                          f"{private / 'ppp0'}: run as root\n")


def test_a_wakeup_that_accelerates_nothing_is_a_failure():
    from ipshift.resend.wakeup import accelerated

    assert accelerated("203.0.113.100", "resent 2 packet(s)")
    assert accelerated("stop", "stopped") and accelerated("term", "terminating")
    assert accelerated("203.0.113.100", "resent 0 packet(s), 1 already resent by the link "
                                        "(pppd), replies mapped")
    for answer in ("busy: already resent for this cycle", "nothing captured",
                   "link already up; nothing captured",
                   "resent 0 packet(s), 1 unchanged (address did not change)"):
        assert not accelerated("203.0.113.100", answer), answer
