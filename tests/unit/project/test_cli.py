import subprocess
import sys

import pytest

from ipshift.cli import build_parser, main


def test_help_lists_every_command(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for cmd in ("demo", "lab", "ctl", "bench"):
        assert cmd in out


def test_every_registered_command_has_a_handler():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert sub.choices
    for name, p in sub.choices.items():
        assert p.get_default("handler") or any(
            getattr(a, "choices", None) for a in p._actions
        ), name


def test_ctl_to_missing_daemon_is_one_clear_line(tmp_path):
    res = subprocess.run(
        [sys.executable, "-m", "ipshift", "ctl", str(tmp_path / "none.sock")],
        capture_output=True, text=True,
    )
    assert res.returncode == 2
    assert res.stderr.strip().count("\n") == 0
    assert "no daemon listens" in res.stderr
