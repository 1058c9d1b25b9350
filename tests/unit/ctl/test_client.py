"""The client says what is true when it cannot reach a daemon, and the wire stays strict JSON."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ipshift.ctl import CtlClient, CtlError, decode_message, encode_message


def _code(path: Path) -> tuple[str, str]:
    with pytest.raises(CtlError) as info:
        CtlClient(path)
    return info.value.code, info.value.message


def test_not_running(tmp_path: Path) -> None:
    assert _code(tmp_path / "absent.sock")[0] == "not-running"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(tmp_path / "stale.sock"))
    stale.close()
    code, message = _code(tmp_path / "stale.sock")
    assert code == "not-running" and "stale" in message


def test_a_file_that_is_not_a_socket(tmp_path: Path) -> None:
    (tmp_path / "notes").write_text("x")
    code, message = _code(tmp_path / "notes")
    assert code == "not-a-socket" and "is not a control socket" in message


def test_a_path_too_long(tmp_path: Path) -> None:
    code, message = _code(tmp_path / ("x" * 120))
    assert code == "bad-path" and "107" in message


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch to another user")
def test_permission_denied_is_not_not_running(tmp_path: Path) -> None:
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(private / "d.sock"))
    server.listen()
    os.chmod(tmp_path, 0o755)
    try:
        script = ("import sys\nfrom pathlib import Path\nfrom ipshift.ctl import CtlClient, "
                  "CtlError\ntry:\n    CtlClient(Path(sys.argv[1]))\nexcept CtlError as e:\n"
                  "    print(e.code, e.message)\n")
        res = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                              sys.executable, "-c", script, str(private / "d.sock")],
                             capture_output=True, text=True, timeout=30,
                             env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[3]
                                                                  / "src")})
        assert res.stdout.startswith("permission ") and "run as root" in res.stdout, res
    finally:
        server.close()


@pytest.mark.parametrize("constant", [b"NaN", b"Infinity", b"-Infinity"])
def test_non_json_constants_are_bad_requests(constant: bytes) -> None:
    with pytest.raises(CtlError) as info:
        decode_message(b'{"id": ' + constant + b', "method": "status"}')
    assert info.value.code == "bad-request"


@given(st.floats(allow_nan=True, allow_infinity=True))
def test_answers_are_strict_json(value: float) -> None:
    line = encode_message({"id": value, "result": [value, {"x": value}]})
    json.loads(line, parse_constant=lambda name: pytest.fail(f"{name} on the wire"))


def test_a_broken_pipe_is_quiet() -> None:
    """`ipshift ... | head -c1`: exit 141, nothing on stderr."""
    reader = subprocess.Popen(["head", "-c1"], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL)
    assert reader.stdin is not None
    writer = subprocess.run(
        [sys.executable, "-c",
         "import sys, time\nfrom ipshift import cli\nfrom ipshift.lab import cli as lab_cli\n"
         "def handler(args):\n    time.sleep(0.5)\n    print('x' * 100000)\n    return 0\n"
         "lab_cli._list = handler\nsys.exit(cli.main(['lab', 'list']))\n"],
        stdout=reader.stdin, stderr=subprocess.PIPE, text=True, timeout=30)
    reader.stdin.close()
    reader.wait(10)
    assert writer.returncode == 141 and writer.stderr == ""
