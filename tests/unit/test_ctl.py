"""Control channel: request/response, errors, stale and busy sockets, malformed input."""

import asyncio
import json
import os
import socket
import stat

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ipshift.ctl import CtlClient, CtlError, decode_message, request
from ipshift.ctl.render import render, table
from ipshift.ctl.server import CtlServer, prepare_socket_path


@pytest.fixture
def sock_dir(tmp_path):
    d = tmp_path / "run"
    d.mkdir(mode=0o700)
    return d


def _serve_and_call(path, setup, calls):
    """Start a server in a loop thread-free way: run the client calls in an executor."""

    async def main():
        server = CtlServer(path)
        setup(server)
        await server.start()
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(None, calls), server
        finally:
            await server.close()

    return asyncio.run(main())


def test_roundtrip_status_and_errors(sock_dir):
    path = sock_dir / "d.sock"

    def setup(server):
        server.method("status", lambda p: {"state": "up", "echo": p.get("x")})

        async def slow(p):
            await asyncio.sleep(0)
            return [1, 2]

        server.method("list", slow)
        server.method("boom", lambda p: 1 / 0)

    def calls():
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        with CtlClient(path) as c:
            out = [c.call("status", x=5), c.call("list"), c.call("ping")]
            for bad in ("nope", "boom"):
                with pytest.raises(CtlError) as info:
                    c.call(bad)
                out.append(info.value.code)
        return out

    out, _server = _serve_and_call(path, setup, calls)
    assert out == [{"state": "up", "echo": 5}, [1, 2], {"pong": True}, "unknown-method", "failed"]
    assert not path.exists()  # removed on close


def test_malformed_lines_are_counted_not_fatal(sock_dir):
    path = sock_dir / "d.sock"

    def calls():
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(str(path))
        s.sendall(b"not json\n[1,2]\n{\"method\": 3}\n{\"id\":7,\"method\":\"ping\"}\n")
        buf = b""
        while buf.count(b"\n") < 4:
            buf += s.recv(4096)
        s.close()
        return [json.loads(x) for x in buf.splitlines()]

    answers, server = _serve_and_call(path, lambda s: None, calls)
    assert [a.get("error", {}).get("code") for a in answers[:3]] == ["bad-request"] * 3
    assert answers[3] == {"id": 7, "result": {"pong": True}}
    assert server.errors == 3


def test_stale_socket_is_replaced_and_live_one_refused(sock_dir):
    path = sock_dir / "d.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()  # file remains, nobody listens
    prepare_socket_path(path)
    assert not path.exists()

    live = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    live.bind(str(path))
    live.listen()
    try:
        with pytest.raises(CtlError) as info:
            prepare_socket_path(path)
        assert info.value.code == "busy"
        assert "already running" in info.value.message
    finally:
        live.close()


def test_world_writable_directory_refused(tmp_path):
    d = tmp_path / "open"
    d.mkdir()
    os.chmod(d, 0o777)
    with pytest.raises(CtlError) as info:
        prepare_socket_path(d / "x.sock")
    assert info.value.code == "unsafe"


def test_client_reports_not_running(sock_dir):
    with pytest.raises(CtlError) as info:
        request(sock_dir / "absent.sock", "status")
    assert info.value.code == "not-running"
    assert "is it running" in info.value.message


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=256))
def test_decode_fuzz_only_typed_errors(data):
    try:
        obj = decode_message(data)
    except CtlError as exc:
        assert exc.code == "bad-request"
    else:
        assert isinstance(obj, dict)


def test_render_table_and_json():
    doc = {"name": "x", "uplinks": [{"name": "wan0", "rtt": 1.234, "up": True},
                                     {"name": "wan1", "rtt": None, "up": False}]}
    text = render(doc, as_json=False)
    assert "NAME  RTT   UP" in text and "wan1  -     False" in text
    assert json.loads(render(doc, as_json=True)) == doc
    assert table([]) == "(none)"
