"""The seed's command lines parse as the seed documents them."""

import argparse

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
