"""A daemon tried as a hostile local user would: an unprivileged user who wants to stop it
from starting, and clients that hold connections, idle or with endless partial requests, under
a small descriptor limit. The tunnel daemon stands for all of them: the lock and the control
server are the runtime's, shared by every daemon."""

from __future__ import annotations

import pwd
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from ipshift.ctl import request
from ipshift.lab import Lab, LabProcess, Node
from tests.netns.test_tunnel_forward import TUNNEL

pytestmark = pytest.mark.netns


@pytest.fixture(scope="module")
def host(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Node, Path]]:
    with Lab("hostile") as lab:
        a, b = lab.host("a"), lab.host("b")
        lab.link(a, b, "192.0.2.1/24", "192.0.2.2/24")
        run_dir = tmp_path_factory.mktemp("hostile") / "run"
        run_dir.mkdir(mode=0o700)
        yield a, run_dir


def _tunnel(node: Node, run_dir: Path, dev: str, *, limit: int | None = None) -> LabProcess:
    argv = [*TUNNEL, "run", "--dev", dev, "--local", "192.0.2.1:4789", "--remote",
            "192.0.2.2:4789", "--address", "203.0.113.1/30", "--no-syslog"]
    if limit is not None:
        argv = ["prlimit", f"--nofile={limit}:{limit}", "--", *argv]
    proc = node.spawn(argv, env={"IPSHIFT_RUN_DIR": str(run_dir)}, name=f"tunnel-{dev}")
    proc.wait_ready(" up: ", 20, "the tunnel")
    return proc


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


AS_NOBODY = textwrap.dedent("""
    import fcntl, os, socket, sys
    lock_dir = sys.argv[1]
    # the name the old lock used: binding it must no longer keep anything from starting
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind("\\0ipshift-tunnel-lock-squatter")
    try:
        fd = os.open(os.path.join(lock_dir, "x.lock"), os.O_RDWR | os.O_CREAT)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        print("locked")
    except OSError as exc:
        print("refused", exc.errno)
    sys.stdout.flush()
    sys.stdin.read()  # hold the squatted name until the test is done
""")


def test_an_unprivileged_user_cannot_take_or_read_the_instance_lock(
        host: tuple[Node, Path]) -> None:
    node, run_dir = host
    nobody = pwd.getpwnam("nobody")
    first = _tunnel(node, run_dir, "tun-h1")  # creates the private lock directory
    first.stop()
    lock_dir = run_dir / "instances"
    assert oct(lock_dir.stat().st_mode & 0o777) == "0o700"
    squatter = subprocess.Popen(
        ["ip", "netns", "exec", node.ns, "setpriv", f"--reuid={nobody.pw_uid}",
         f"--regid={nobody.pw_gid}", "--clear-groups", sys.executable, "-c", AS_NOBODY,
         str(lock_dir)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert squatter.stdout is not None
        line = squatter.stdout.readline().split()
        assert line[0] == "refused" and int(line[1]) == 13, line  # EACCES
        proc = _tunnel(node, run_dir, "tun-h1")  # starts regardless
        assert proc.stop() == 0, proc.stderr()
    finally:
        squatter.kill()
        squatter.wait(10)


FLOOD = textwrap.dedent("""
    import resource, socket, sys, time
    path, count, payload = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    resource.setrlimit(resource.RLIMIT_NOFILE, (count + 64, count + 64))
    held, refused = [], 0
    for _ in range(count):
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(0.05)
        try:
            s.connect(path)
        except OSError:
            refused += 1
            s.close()
            continue
        s.setblocking(False)
        if payload:
            try:
                s.send(b"x" * payload)  # a line that never ends
            except OSError:
                pass
        held.append(s)
    print(len(held), refused, flush=True)
    time.sleep(float(sys.argv[4]))
    for s in held:
        s.close()
""")


def _flood(node: Node, sock: Path, count: int, payload: int, hold: float) -> tuple[int, int]:
    res = node.run([sys.executable, "-c", FLOOD, str(sock), str(count), str(payload),
                    str(hold)], timeout=120)
    held, refused = res.stdout.split()
    return int(held), int(refused)


def test_idle_connections_beyond_the_descriptor_limit(host: tuple[Node, Path]) -> None:
    """1,100 idle connections against a daemon limited to 1,024 descriptors: it keeps
    forwarding and answering, with no traceback."""
    node, run_dir = host
    proc = _tunnel(node, run_dir, "tun-h2", limit=1024)
    sock = run_dir / "tunnel-tun-h2.sock"
    try:
        _flood(node, sock, 1100, 0, 3.0)  # held for 3 s: more than the daemon's 1 s tick
        doc = request(sock, "status")
        assert doc["daemon"]["state"] == "running" and proc.running()
        assert doc["tunnel"]["running"] is True
        err = proc.stderr()
        assert "Traceback" not in err, err[-3000:]
    finally:
        assert proc.stop() == 0, proc.stderr()[-3000:]


def test_partial_requests_do_not_grow_the_daemon(host: tuple[Node, Path]) -> None:
    """300 connections each sending 1 MB of a line that never ends: at most the connection cap
    is served, each cut off at the request limit; the daemon's memory barely moves."""
    node, run_dir = host
    proc = _tunnel(node, run_dir, "tun-h3")
    sock = run_dir / "tunnel-tun-h3.sock"
    try:
        before = _rss_kib(proc.pid)
        _flood(node, sock, 300, 1 << 20, 2.0)
        after = _rss_kib(proc.pid)
        assert after - before < 32 * 1024, (before, after)  # KiB; was ~300 MB unbounded
        doc = request(sock, "status")
        assert doc["daemon"]["state"] == "running"
        assert "Traceback" not in proc.stderr()
    finally:
        assert proc.stop() == 0, proc.stderr()[-3000:]
