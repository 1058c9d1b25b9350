"""The lab builds real namespaces, links, routes and impairments, and removes all of it."""

import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from ipshift.lab import Lab, LabError, clean
from ipshift.net import netns


def _ping(node, addr, count=1, wait=1):
    argv = ["ping", "-n", "-q", "-c", str(count), "-W", str(wait), "-i", "0.01", addr]
    return node.run(argv, check=False, timeout=count * wait + 5)


def test_routed_topology_v4_v6(lab):
    a, r, b = lab.host("a"), lab.router("r"), lab.host("b")
    lab.link(a, r, "192.0.2.1/24", "192.0.2.254/24", v6=("2001:db8:1::1/64", "2001:db8:1::ff/64"))
    lab.link(r, b, "198.51.100.254/24", "198.51.100.1/24",
             v6=("2001:db8:2::ff/64", "2001:db8:2::1/64"))
    a.ip("route", "add", "default", "via", "192.0.2.254")
    a.ip("-6", "route", "add", "default", "via", "2001:db8:1::ff")
    b.ip("route", "add", "default", "via", "198.51.100.254")
    b.ip("-6", "route", "add", "default", "via", "2001:db8:2::ff")
    assert _ping(a, "198.51.100.1").returncode == 0
    assert _ping(a, "2001:db8:2::1").returncode == 0
    assert a.iface_to(r) == "to-r"
    assert {x["ifname"] for x in a.ip_json("link", "show")} == {"lo", "to-r"}


def test_switch_joins_hosts(lab):
    sw = lab.switch("sw")
    hosts = [lab.host(f"h{i}") for i in range(3)]
    for i, h in enumerate(hosts):
        lab.link(h, sw, f"203.0.113.{i + 1}/24")
    assert _ping(hosts[0], "203.0.113.3").returncode == 0
    with pytest.raises(LabError):
        lab.link(lab.host("x"), sw, None, "203.0.113.9/24")


def test_blackhole_and_loss(lab):
    a, b = lab.host("a"), lab.host("b")
    link = lab.link(a, b, "192.0.2.1/24", "192.0.2.2/24")
    assert _ping(a, "192.0.2.2").returncode == 0
    lab.impair(b, link.b.ifname, blackhole=True)
    assert _ping(a, "192.0.2.2").returncode != 0
    # ARP still answered: the peer looks alive at layer 2 but drops IP
    neigh = a.ip_json("neigh", "show", "192.0.2.2")
    assert neigh and "lladdr" in neigh[0]
    lab.impair(b, link.b.ifname, loss_percent=50, direction="ingress")
    res = _ping(a, "192.0.2.2", count=100, wait=1)
    received = int(res.stdout.split(" received")[0].rsplit(" ", 1)[1])
    assert 10 < received < 95  # about half arrive; bounds are wide, this is not a timing test
    lab.impair(b, link.b.ifname)  # clear
    assert _ping(a, "192.0.2.2").returncode == 0


def test_spawn_captures_output_and_stops(lab):
    a = lab.host("a")
    code = "import time; print('ready', flush=True); time.sleep(60)"
    proc = a.spawn([sys.executable, "-c", code])
    assert proc.wait_for_output("ready", timeout=10)
    assert proc.running()
    rc = proc.stop()
    assert rc == -signal.SIGTERM
    res = a.run(["ip", "-o", "link"])
    assert "lo" in res.stdout


def test_a_program_that_does_not_get_ready_is_a_clear_error(lab):
    a = lab.host("a")
    died = a.spawn(["sh", "-c", "echo starting; echo 'no such thing' >&2; exit 3"], name="x")
    with pytest.raises(LabError) as info:
        died.wait_ready("ready", 10, "the x daemon")
    text = str(info.value)
    assert "the x daemon in a did not start (exited with status 3)" in text
    assert "stderr: no such thing" in text and "stdout: starting" in text
    slow = a.spawn(["sleep", "60"], name="slow")
    with pytest.raises(LabError, match=r"still not ready after 0.3 s"):
        slow.wait_ready("ready", 0.3)
    assert not slow.running()  # stopped, not left behind


def test_node_call_runs_in_namespace(lab):
    a = lab.host("a")
    lab.link(a, lab.host("b"), "192.0.2.1/24", "192.0.2.2/24")

    def bind_addr():
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            s.bind(("192.0.2.1", 0))
            return True
        finally:
            s.close()

    assert a.call(bind_addr) is True
    with pytest.raises(OSError):
        bind_addr()  # the address does not exist outside the namespace


def test_close_removes_everything_and_is_idempotent():
    if os.geteuid() != 0:
        pytest.skip("needs root")
    lab = Lab("t")
    with lab:
        a = lab.host("a")
        lab.link(a, lab.host("b"), "192.0.2.1/24", "192.0.2.2/24")
        proc = a.spawn(["sleep", "60"])
        names = [n.ns for n in lab.nodes.values()]
        assert all(netns.exists(n) for n in names)
    assert not any(netns.exists(n) for n in names)
    assert proc.poll() is not None
    lab.close()  # second close is harmless
    with pytest.raises(LabError):
        lab.host("late")


def test_killed_run_is_cleaned_by_lab_clean():
    """A run killed with SIGKILL leaves namespaces and a process; `clean` removes both."""
    if os.geteuid() != 0:
        pytest.skip("needs root")
    script = (
        "import time\n"
        "from ipshift.lab import Lab\n"
        "lab = Lab('victim').__enter__()\n"
        "a = lab.host('a'); lab.link(a, lab.host('b'), '192.0.2.1/24', '192.0.2.2/24')\n"
        "p = a.spawn(['sleep', '120'])\n"
        "print(lab.prefix, p.pid, flush=True)\n"
        "time.sleep(120)\n"
    )
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        line = child.stdout.readline().split()
        prefix, sleeper = line[0], int(line[1])
        child.kill()
        child.wait(10)
        assert any(n.startswith(prefix) for n in netns.list_names())
        removed = clean(only=prefix)
        assert {n for n in removed if n.startswith(prefix)} == {prefix + "a", prefix + "b"}
        assert not any(n.startswith(prefix) for n in netns.list_names())
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                os.kill(sleeper, 0)
            except ProcessLookupError:
                break
            time.sleep(0.05)
        else:
            pytest.fail("the lab's process survived clean")
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(10)
        if "prefix" in locals():
            clean(only=prefix)


def test_sigterm_during_run_cleans_up():
    if os.geteuid() != 0:
        pytest.skip("needs root")
    script = (
        "import time\n"
        "from ipshift.lab import Lab\n"
        "with Lab('sig') as lab:\n"
        "    lab.host('a')\n"
        "    print(lab.prefix, flush=True)\n"
        "    time.sleep(120)\n"
    )
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    prefix = ""
    try:
        prefix = child.stdout.readline().strip()
        assert prefix
        child.send_signal(signal.SIGTERM)
        child.wait(20)
        assert not any(n.startswith(prefix) for n in netns.list_names())
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(10)
        if prefix:
            clean(only=prefix)
