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


def test_a_live_server_with_a_full_backlog_is_not_taken_over(sock_dir):
    path = sock_dir / "live.sock"
    live = socket.socket(socket.AF_UNIX)
    live.bind(str(path))
    live.listen(1)  # a daemon whose loop is busy for a moment: its backlog fills up
    waiting = []
    try:
        for _ in range(8):
            client = socket.socket(socket.AF_UNIX)
            client.setblocking(False)
            waiting.append(client)
            try:
                client.connect(str(path))
            except BlockingIOError:
                break
        with pytest.raises(CtlError) as info:
            prepare_socket_path(path)
        assert info.value.code == "busy" and path.exists()
    finally:
        for client in waiting:
            client.close()
        live.close()


def test_what_is_not_a_socket_is_never_removed(sock_dir):
    notes = sock_dir / "notes.sock"
    notes.write_text("important")
    with pytest.raises(CtlError, match="not a socket"):
        prepare_socket_path(notes)
    assert notes.read_text() == "important"
    (sock_dir / "dir.sock").mkdir()
    with pytest.raises(CtlError, match="not a socket"):
        prepare_socket_path(sock_dir / "dir.sock")


def test_close_leaves_a_socket_that_is_no_longer_ours(sock_dir):
    path = sock_dir / "d.sock"

    async def main():
        server = CtlServer(path)
        await server.start()
        path.unlink()  # an operator removed it, and another instance took the name
        other = socket.socket(socket.AF_UNIX)
        other.bind(str(path))
        try:
            await server.close()
            return path.exists()
        finally:
            other.close()

    assert asyncio.run(main())


@pytest.mark.parametrize("line", [b"[" * 100_000, b'{"id": ' + b"9" * 5000 + b"}"])
def test_pathological_json_is_a_bad_request(line):
    with pytest.raises(CtlError) as info:
        decode_message(line)
    assert info.value.code == "bad-request"


def test_an_error_about_params_names_the_request(sock_dir):
    server = CtlServer(sock_dir / "x.sock")
    answer = asyncio.run(server.dispatch(b'{"id": 7, "method": "ping", "params": 3}'))
    assert answer["id"] == 7 and answer["error"]["code"] == "bad-request"


@pytest.mark.parametrize("reply", [
    b'{"id": 1, "error": "x"}\n',  # error not an object
    b'{"id": 99, "result": 1}\n',  # someone else's answer
    b'{"id": 1, "result": ' + b"9" * 5000 + b"}\n",  # an integer Python refuses to read
    None,  # no answer at all: a hung daemon
])
def test_the_client_turns_every_bad_answer_into_a_ctl_error(sock_dir, reply):
    path = sock_dir / "fake.sock"
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(path))
    server.listen(1)
    try:
        with CtlClient(path, timeout=0.3) as client:
            peer, _ = server.accept()
            with peer:
                if reply is not None:
                    peer.sendall(reply)
                with pytest.raises(CtlError):
                    client.call("status")
    finally:
        server.close()
