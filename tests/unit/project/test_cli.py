import contextlib
import json
import os
import socket
import subprocess
import sys
import threading

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


def _without_unbuffered() -> dict[str, str]:
    """The environment of a user's shell: stdout to a pipe is block-buffered."""
    return {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}


def test_help_into_a_closed_pipe_is_quiet():
    """`ipshift --help | true`: the reader is gone before a byte is written. The help sits in
    the buffer until exit, where the interpreter used to print "Exception ignored ...
    BrokenPipeError" and exit 120; now 141 (128 + SIGPIPE) and nothing on stderr."""
    for argv in (["--help"], ["ctl", "--help"], ["--version"]):
        read_end, write_end = os.pipe()
        os.close(read_end)
        try:
            res = subprocess.run([sys.executable, "-m", "ipshift", *argv], stdout=write_end,
                                 stderr=subprocess.PIPE, text=True, timeout=60,
                                 env=_without_unbuffered())
        finally:
            os.close(write_end)
        assert (res.returncode, res.stderr) == (141, ""), argv


@pytest.mark.parametrize("unbuffered", [False, True])
def test_output_into_a_reader_that_closes_early_is_quiet(tmp_path, unbuffered):
    """`ipshift ctl NAME status | head -c1` on a large status: the command's own print meets
    the closed pipe (at once when unbuffered, at the last flush otherwise)."""
    path = tmp_path / "d.sock"
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(path))
    listener.listen(1)
    listener.settimeout(30)
    routes = [{"prefix": f"198.51.{i >> 8}.{i & 255}/32", "via": "192.0.2.1"}
              for i in range(20_000)]  # about a megabyte of table: more than a pipe holds

    def serve():
        with contextlib.suppress(OSError), listener.accept()[0] as conn:
            conn.settimeout(30)
            request = b""
            while b"\n" not in request:
                request += conn.recv(4096)
            conn.sendall(json.dumps({"id": 1, "result": {"routes": routes}}).encode() + b"\n")

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    env = {**_without_unbuffered(), **({"PYTHONUNBUFFERED": "1"} if unbuffered else {})}
    reader = subprocess.Popen(["head", "-c1"], stdin=subprocess.PIPE,
                              stdout=subprocess.DEVNULL)
    try:
        assert reader.stdin is not None
        res = subprocess.run([sys.executable, "-m", "ipshift", "ctl", str(path)],
                             stdout=reader.stdin, stderr=subprocess.PIPE, text=True,
                             timeout=60, env=env)
    finally:
        if reader.stdin is not None:
            reader.stdin.close()
        reader.wait(30)
        listener.close()
        server.join(30)
    assert (res.returncode, res.stderr) == (141, "")
