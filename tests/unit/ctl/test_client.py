"""The client says what is true when it cannot reach a daemon, bounds what it reads, and
`ipshift ctl` turns every bad input into one line."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from ipshift.cli import main
from ipshift.ctl import CtlClient, CtlError
from ipshift.ctl.client import CONNECT_FAILURES
from ipshift.ctl.protocol import MAX_LINE, MAX_REQUEST


def _connect_error(path: Path, timeout: float = 5.0) -> CtlError:
    with pytest.raises(CtlError) as info:
        CtlClient(path, timeout=timeout)
    assert "\n" not in info.value.message
    assert info.value.code in CONNECT_FAILURES
    return info.value


@contextlib.contextmanager
def fake_daemon(path: Path, answer: Callable[[socket.socket, bytes], None]) -> Iterator[None]:
    """A daemon that takes one connection, reads one request line and answers it by
    `answer(connection, request)`; stopped and joined on exit."""
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(path))
    listener.listen(1)
    listener.settimeout(10)

    def serve() -> None:
        with contextlib.suppress(OSError), listener.accept()[0] as conn:
            conn.settimeout(10)
            request = b""
            while b"\n" not in request:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                request += chunk
            answer(conn, request)
            conn.shutdown(socket.SHUT_WR)
            while conn.recv(65536):  # until the client is done with the answer
                pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield
    finally:
        listener.close()
        thread.join(15)


def test_not_running(tmp_path: Path) -> None:
    error = _connect_error(tmp_path / "absent.sock")
    assert error.code == "not-running" and "is it running" in error.message
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(tmp_path / "stale.sock"))
    stale.close()  # the file stays, nobody listens
    error = _connect_error(tmp_path / "stale.sock")
    assert error.code == "not-running" and "a stale socket" in error.message


def test_what_is_not_a_socket_is_named_so(tmp_path: Path) -> None:
    """Connecting to a regular file is ECONNREFUSED, which used to read "not running"."""
    (tmp_path / "notes").write_text("x")
    (tmp_path / "dir").mkdir()
    for path in (tmp_path / "notes", tmp_path / "dir"):
        error = _connect_error(path)
        assert error.code == "not-a-socket"
        assert error.message == f"{path} is not a control socket"
    error = _connect_error(tmp_path / "notes" / "x.sock")  # ENOTDIR
    assert error.code == "not-a-socket" and "not a directory" in error.message


def test_a_path_too_long_for_a_unix_socket(tmp_path: Path) -> None:
    error = _connect_error(tmp_path / ("x" * 120))
    assert error.code == "bad-path" and "at most 107" in error.message


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None,
                    reason="needs root and setpriv to run as another user")
def test_permission_denied_is_not_not_running(tmp_path: Path) -> None:
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(private / "d.sock"))
    server.listen()
    try:
        script = ("import sys\nfrom pathlib import Path\nfrom ipshift.ctl import CtlClient, "
                  "CtlError\ntry:\n    CtlClient(Path(sys.argv[1]))\nexcept CtlError as e:\n"
                  "    print(e.code, e.message)\n")
        res = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                              sys.executable, "-c", script, str(private / "d.sock")],
                             capture_output=True, text=True, timeout=30,
                             env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[3]
                                                                  / "src")})
        assert res.stdout == f"permission permission denied on {private / 'd.sock'}: run as " \
                             "root\n", res
    finally:
        server.close()


def test_a_daemon_that_does_not_accept_is_a_timeout(tmp_path: Path) -> None:
    """A full accept queue (a daemon stuck in a long step) is waited for, then reported."""
    path = tmp_path / "stuck.sock"
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(path))
    listener.listen(0)
    queued: list[socket.socket] = []
    try:
        for _ in range(16):
            waiting = socket.socket(socket.AF_UNIX)
            waiting.setblocking(False)
            queued.append(waiting)
            try:
                waiting.connect(str(path))
            except BlockingIOError:
                break  # the queue is full
        else:
            pytest.fail("the accept queue never filled")
        error = _connect_error(path, timeout=0.2)
        assert error.code == "timeout" and "did not accept the connection" in error.message
    finally:
        for waiting in queued:
            waiting.close()
        listener.close()


def test_a_large_answer_arrives_whole(tmp_path: Path) -> None:
    """A status of 10,000 routes is far above a request's size, well below the answer limit."""
    routes = [{"prefix": f"198.51.{i >> 8}.{i & 255}/32", "via": "192.0.2.1", "metric": i}
              for i in range(10_000)]

    def answer(conn: socket.socket, request: bytes) -> None:
        req_id = json.loads(request)["id"]
        conn.sendall(json.dumps({"id": req_id, "result": {"routes": routes}}).encode() + b"\n")

    with fake_daemon(tmp_path / "d.sock", answer), CtlClient(tmp_path / "d.sock") as client:
        assert client.call("status") == {"routes": routes}


def test_an_answer_longer_than_the_limit_is_refused_not_buffered(tmp_path: Path) -> None:
    def answer(conn: socket.socket, request: bytes) -> None:
        block = b"x" * (1 << 20)
        with contextlib.suppress(OSError):  # the client hangs up once it has seen enough
            for _ in range((MAX_LINE >> 20) + 2):
                conn.sendall(block)

    with fake_daemon(tmp_path / "d.sock", answer), CtlClient(tmp_path / "d.sock") as client:
        with pytest.raises(CtlError, match="longer than 16 MiB") as info:
            client.call("status")
        assert info.value.code == "bad-answer"
        assert len(client._buf) <= MAX_LINE + (1 << 20)  # at most one read past the limit


def test_requests_are_checked_before_they_leave(tmp_path: Path) -> None:
    """Too large for a daemon, or not JSON: refused here, with nothing sent."""
    sent: list[bytes] = []
    with fake_daemon(tmp_path / "d.sock", lambda conn, req: sent.append(req)), \
            CtlClient(tmp_path / "d.sock") as client:
        with pytest.raises(CtlError, match=f"longer than the {MAX_REQUEST}"):
            client.call("set", blob="x" * MAX_REQUEST)
        with pytest.raises(CtlError, match="NaN and Infinity"):
            client.call("set", value=float("nan"))
        client.close()
    assert sent == []


def test_any_parameter_name_can_be_sent(tmp_path: Path) -> None:
    """`method` is positional-only: a parameter named "method" (or "path") is a parameter."""
    seen: list[dict[str, object]] = []

    def answer(conn: socket.socket, request: bytes) -> None:
        seen.append(json.loads(request))
        conn.sendall(b'{"id": 1, "result": "ok"}\n')

    with fake_daemon(tmp_path / "d.sock", answer):
        assert main(["ctl", str(tmp_path / "d.sock"), "find", "--params",
                     '{"method": "x", "path": "/y"}']) == 0
    assert seen[0]["method"] == "find" and seen[0]["params"] == {"method": "x", "path": "/y"}


def test_a_daemon_error_is_passed_on_as_one_line(tmp_path: Path) -> None:
    def answer(conn: socket.socket, request: bytes) -> None:
        conn.sendall(json.dumps({"id": 1, "error": {"code": "failed\nx",
                                                    "message": "two\nlines " + "y" * 1000}})
                     .encode() + b"\n")

    with fake_daemon(tmp_path / "d.sock", answer), CtlClient(tmp_path / "d.sock") as client, \
            pytest.raises(CtlError) as info:
        client.call("status")
    assert info.value.code == "failed x"
    assert info.value.message.startswith("two lines y") and "\n" not in info.value.message
    assert len(info.value.message) <= 500


@pytest.mark.parametrize(("params", "message"), [
    ("[" * 5000, "nested too deeply"),
    ('{"a": ' * 5000, "nested too deeply"),
    ('{"id": NaN}', "NaN is not a JSON number"),
    ('{"x": 1e999}', "out of range"),
    ("[1]", "must be a JSON object"),
    ("{", "not JSON"),
    (b'{"x": "\xff"}'.decode(errors="surrogateescape"), "not JSON"),
    ('{"x": "' + "a" * MAX_REQUEST + '"}', "longer than"),
])
def test_bad_params_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                 params: str, message: str) -> None:
    """`ipshift ctl NAME status --params "$(python3 -c 'print("["*5000)')"` was a
    RecursionError traceback."""
    assert main(["ctl", str(tmp_path / "absent.sock"), "status", "--params", params]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("ipshift: --params: ") and message in err


@pytest.mark.parametrize("target", ["notes", "notes/x.sock", "x" * 120])
def test_ipshift_ctl_says_what_is_wrong(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                        target: str) -> None:
    (tmp_path / "notes").write_text("x")
    assert main(["ctl", str(tmp_path / target)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not running" not in err and "listens" not in err
