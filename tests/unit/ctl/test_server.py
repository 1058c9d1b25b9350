"""What a client can cost a daemon's control server: connections, idle time, request size,
running out of file descriptors. The hostile client is another process, so the server's own
descriptor limit can be made small."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from ipshift.ctl import CtlClient, CtlError
from ipshift.ctl.server import MAX_REQUEST, CtlServer, socket_path_problem


@pytest.fixture
def sock_dir(tmp_path: Path) -> Path:
    d = tmp_path / "run"
    d.mkdir(mode=0o700)
    return d


def _with_server(path: Path, body, **kwargs):  # type: ignore[no-untyped-def]
    async def main():  # type: ignore[no-untyped-def]
        server = CtlServer(path, **kwargs)
        await server.start()
        try:
            return await asyncio.get_running_loop().run_in_executor(None, body, server)
        finally:
            await server.close()

    return asyncio.run(main())


def test_connections_over_the_cap_are_told_busy(sock_dir: Path) -> None:
    path = sock_dir / "d.sock"

    def body(server: CtlServer) -> tuple[list[bytes], object]:
        held = []
        for _ in range(4):
            s = socket.socket(socket.AF_UNIX)
            s.connect(str(path))
            held.append(s)
        time.sleep(0.1)
        extra = socket.socket(socket.AF_UNIX)
        extra.connect(str(path))
        extra.settimeout(2)
        answer = extra.recv(4096)
        extra.close()
        for s in held:
            s.close()
        time.sleep(0.1)
        with CtlClient(path) as c:  # room again
            pong = c.call("ping")
        return [answer], pong

    (answer,), pong = _with_server(path, body, max_connections=4)
    err = json.loads(answer)["error"]
    assert err["code"] == "busy" and "at most 4" in err["message"]
    assert pong == {"pong": True}


def test_an_idle_connection_is_closed(sock_dir: Path) -> None:
    path = sock_dir / "d.sock"

    def body(server: CtlServer) -> tuple[bytes, int]:
        s = socket.socket(socket.AF_UNIX)
        s.connect(str(path))
        s.sendall(b'{"id": 1, "meth')  # half a request, then nothing
        s.settimeout(5)
        data = s.recv(4096)  # b"" once the server gives up on it
        s.close()
        return data, server.timeouts

    data, timeouts = _with_server(path, body, idle_timeout=0.2)
    assert data == b"" and timeouts == 1


def test_a_request_longer_than_the_limit_is_refused(sock_dir: Path) -> None:
    path = sock_dir / "d.sock"

    def body(server: CtlServer) -> tuple[dict[str, object], int]:
        s = socket.socket(socket.AF_UNIX)
        s.connect(str(path))
        s.settimeout(5)
        try:
            s.sendall(b"x" * (MAX_REQUEST + 4096))
        except OSError:
            pass  # the server may close before reading it all
        data = b""
        while not data.endswith(b"\n"):
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
        s.close()
        return json.loads(data), server.errors

    answer, errors = _with_server(path, body)
    assert answer["error"]["code"] == "bad-request" and errors == 1  # type: ignore[index]


def test_socket_path_limit() -> None:
    assert socket_path_problem(Path("/run/ipshift/routes.sock")) is None
    problem = socket_path_problem(Path("/run/" + "d" * 103 + ".sock"))
    assert problem and "at most 107" in problem


SERVER = textwrap.dedent("""
    import asyncio, logging, resource, sys
    from pathlib import Path
    from ipshift.ctl.server import CtlServer
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    resource.setrlimit(resource.RLIMIT_NOFILE, (48, 48))
    async def main():
        server = CtlServer(Path(sys.argv[1]), max_connections=1000, idle_timeout=60)
        server.method("count", lambda p: server.counters())
        await server.start()
        print("serving", flush=True)
        await asyncio.sleep(float(sys.argv[2]))
        await server.close()
    asyncio.run(main())
""")


def test_running_out_of_descriptors_pauses_accepting_and_logs_once(sock_dir: Path) -> None:
    """80 idle clients against a server limited to 48 descriptors (max_connections set high
    so that the descriptor limit, not the cap, is what runs out): the server keeps going,
    logs the burst once, and answers again once clients leave."""
    path = sock_dir / "d.sock"
    proc = subprocess.Popen([sys.executable, "-c", SERVER, str(path), "6"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "serving"
        clients = []
        for _ in range(80):
            s = socket.socket(socket.AF_UNIX)
            s.setblocking(False)
            try:
                s.connect(str(path))
            except BlockingIOError:
                pass
            clients.append(s)
        time.sleep(1.5)  # the server accepts what it can, then fails and pauses
        for s in clients:
            s.close()
        deadline = time.monotonic() + 10
        counters = None
        while time.monotonic() < deadline:
            try:
                with CtlClient(path, timeout=2) as c:
                    counters = c.call("count")
                break
            except CtlError:
                time.sleep(0.2)
        assert counters is not None, "the server did not answer after the clients left"
        assert counters["accept_failures"] >= 1
    finally:
        _out, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    warnings = [line for line in err.splitlines() if "cannot accept" in line]
    assert len(warnings) == 1, err
    assert "Traceback" not in err
