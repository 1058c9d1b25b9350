"""The tunnel daemon's life: clean exit on SIGTERM, nothing left after SIGKILL, malformed
datagrams counted and dropped, and the wire format spoken by an independent peer (a few lines
of Python with scapy, no ipshift code on the sending side)."""

from __future__ import annotations

import json
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ipshift.lab import Lab, LabProcess, Node
from tests.netns.test_tunnel_forward import TUNNEL

pytestmark = pytest.mark.netns

PEER = r"""
import json, socket, sys
from scapy.layers.inet import IP, ICMP
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("192.0.2.2", 4789))
s.settimeout(5)
tunnel = ("192.0.2.1", 4789)
junk = [b"", b"\x10", b"\x20\x00\x00\x00" + bytes(40), b"\x10\x00\x00\x00\x45" + bytes(10),
        bytes(range(256)) * 4]
for datagram in junk:
    s.sendto(datagram, tunnel)
ping = bytes(IP(src="203.0.113.2", dst="203.0.113.1", ttl=9) / ICMP(id=7, seq=1) / b"hello")
s.sendto(bytes([0x10, 0, 0, 0]) + ping, tunnel)  # version 1, no flags: complete checksum
while True:
    data, sender = s.recvfrom(65535)
    if len(data) > 24 and data[4] >> 4 == 4 and data[4 + 9] == 1:
        break
flags, csum_offset, csum_start = data[0] & 15, data[1], int.from_bytes(data[2:4], "big")
reply = IP(data[4:])
rebuilt = IP(data[4:]); del rebuilt.chksum; del rebuilt[ICMP].chksum
print(json.dumps({
    "version": data[0] >> 4, "flags": flags, "sender": list(sender),
    "type": reply[ICMP].type, "src": reply.src, "dst": reply.dst,
    "payload": bytes(reply[ICMP].payload).decode(),
    "checksums_ok": bytes(rebuilt) == bytes(reply),
}))
"""


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Node, Node, Path]]:
    with Lab("tunnel-life") as lab:
        a, b = lab.host("a"), lab.host("b")
        lab.link(a, b, "192.0.2.1/24", "192.0.2.2/24")
        yield a, b, tmp_path_factory.mktemp("tunnel-life")


def start(node: Node, tmp: Path, name: str = "tun-a", *extra: str) -> tuple[LabProcess, Path]:
    socket = tmp / f"{name}-{len(list(tmp.iterdir()))}.sock"
    proc = node.spawn([*TUNNEL, "run", "--dev", name, "--local", "192.0.2.1:4789", "--remote",
                       "192.0.2.2:4789", "--address", "203.0.113.1/30", "--socket", str(socket),
                       *extra], name="tunnel")
    assert proc.wait_for_output(" up: ", timeout=20), proc.stderr()
    return proc, socket


def gone(node: Node, name: str, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not has_link(node, name):
            return True
        time.sleep(0.1)
    return False


def has_link(node: Node, name: str) -> bool:
    return name in node.run(["ip", "-o", "link", "show"]).stdout


def status(node: Node, socket: Path) -> dict[str, object]:
    res = node.run([*TUNNEL, "status", "--dev", "x", "--socket", str(socket), "--json"],
                   timeout=20)
    doc: dict[str, object] = json.loads(res.stdout)
    return doc


def test_sigterm_removes_the_device_and_the_socket(pair: tuple[Node, Node, Path]) -> None:
    a, _, tmp = pair
    proc, socket = start(a, tmp)
    assert has_link(a, "tun-a") and socket.exists()
    assert "203.0.113.1/30" in a.ip("-o", "addr", "show", "dev", "tun-a")
    proc.signal(signal.SIGTERM)
    assert proc.wait(timeout=15) == 0, proc.stderr()
    assert not has_link(a, "tun-a")
    assert not socket.exists()
    assert "tunnel tun-a down" in proc.stderr()


def test_sigkill_leaves_nothing_and_a_restart_works(pair: tuple[Node, Node, Path]) -> None:
    a, _, tmp = pair
    proc, _ = start(a, tmp, "tun-k")
    proc.signal(signal.SIGKILL)
    proc.wait(timeout=15)
    assert not has_link(a, "tun-k")  # non-persistent: the kernel removed it with the last fd
    again, _ = start(a, tmp, "tun-k")
    assert has_link(a, "tun-k")
    assert again.stop() == 0, again.stderr()
    assert not has_link(a, "tun-k")


def test_sigkill_of_a_multi_queue_tunnel_takes_its_workers_and_device_along(
    pair: tuple[Node, Node, Path],
) -> None:
    """The queue workers hold the device's other queues: they must go with the daemon."""
    a, _, tmp = pair
    proc, _ = start(a, tmp, "tun-q", "--queues", "2")
    proc.signal(signal.SIGKILL)
    proc.wait(timeout=15)
    assert gone(a, "tun-q"), "the workers kept the device"
    again, _ = start(a, tmp, "tun-q", "--queues", "2")  # ports and name free again
    assert again.stop() == 0, again.stderr()
    assert gone(a, "tun-q")


def test_a_refused_second_instance_leaves_the_first_alone(
    pair: tuple[Node, Node, Path],
) -> None:
    a, _, tmp = pair
    proc, socket = start(a, tmp, "tun-s", "--queues", "2")
    try:
        before = a.ip("-o", "addr", "show", "dev", "tun-s") + a.ip("-o", "link", "show", "tun-s")
        for sock in (socket, tmp / "other.sock"):  # the same control socket, or another one
            second = a.spawn([*TUNNEL, "run", "--dev", "tun-s", "--local", "192.0.2.1:4799",
                              "--remote", "192.0.2.2:4799", "--address", "198.51.100.9/32",
                              "--mtu", "1280", "--queues", "2", "--socket", str(sock)],
                             name="tunnel-second")
            assert second.wait(timeout=20) in (1, 2)
            assert "already running" in second.stderr() or "exists already" in second.stderr()
        after = a.ip("-o", "addr", "show", "dev", "tun-s") + a.ip("-o", "link", "show", "tun-s")
        assert after == before and proc.running()
    finally:
        assert proc.stop() == 0, proc.stderr()


def test_an_independent_peer_and_malformed_datagrams(pair: tuple[Node, Node, Path]) -> None:
    a, b, tmp = pair
    proc, socket = start(a, tmp)
    try:
        res = b.run([sys.executable, "-c", PEER], timeout=30)
        answer = json.loads(res.stdout)
        assert answer == {
            "version": 1, "flags": answer["flags"], "sender": ["192.0.2.1", 4789],
            "type": 0, "src": "203.0.113.1", "dst": "203.0.113.2", "payload": "hello",
            "checksums_ok": True,
        }
        assert answer["flags"] in (0, 2)  # an ICMP reply carries a complete checksum
        doc = status(a, socket)
        counters = doc["counters"]
        assert isinstance(counters, dict)
        assert counters["malformed"] == 5 and counters["datagrams_in"] == 1
        assert proc.running()
    finally:
        assert proc.stop() == 0, proc.stderr()


def gso_max_size(node: Node, dev: str) -> int:
    return int(json.loads(node.ip("-d", "-j", "link", "show", "dev", dev))[0]["gso_max_size"])


def settles(node: Node, dev: str, size: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if gso_max_size(node, dev) == size:
            return True
        time.sleep(0.2)
    return False


def test_gso_max_size_follows_ip_forwarding(pair: tuple[Node, Node, Path]) -> None:
    """On a host, TCP super-packets are built to fit one UDP send; once the namespace forwards,
    the device gets the kernel's 64 KB back (a smaller limit would make the kernel cut forwarded
    super-packets into single packets), and the host limit returns when forwarding stops."""
    a, _, tmp = pair
    proc, socket = start(a, tmp, "tun-f")
    host_limit = 64576  # 44 chunks of 1468 bytes, the stream's 16-byte meta included
    try:
        assert gso_max_size(a, "tun-f") == host_limit
        fields = status(a, socket)["tunnel"]
        assert isinstance(fields, dict) and fields["gso_max_size"] == host_limit
        a.run(["sysctl", "-qw", "net.ipv4.ip_forward=1"])
        assert settles(a, "tun-f", 0x10000), proc.stderr()
        fields = status(a, socket)["tunnel"]
        assert isinstance(fields, dict) and fields["gso_max_size"] == 0x10000
        assert "IP forwarding is on" in proc.stderr()
        a.run(["sysctl", "-qw", "net.ipv4.ip_forward=0"])
        assert settles(a, "tun-f", host_limit), proc.stderr()
    finally:
        a.run(["sysctl", "-qw", "net.ipv4.ip_forward=0"])
        assert proc.stop() == 0, proc.stderr()


def test_a_busy_name_is_a_clear_error(pair: tuple[Node, Node, Path]) -> None:
    a, _, tmp = pair
    a.ip("link", "add", "busy0", "type", "veth", "peer", "name", "busy1")
    try:
        proc = a.spawn([*TUNNEL, "run", "--dev", "busy0", "--local", "192.0.2.1:4789",
                        "--remote", "192.0.2.2:4789", "--socket", str(tmp / "busy.sock")],
                       name="tunnel-busy")
        assert proc.wait(timeout=20) == 2
        assert "busy0" in proc.stderr() and "pick another --dev" in proc.stderr()
    finally:
        a.ip("link", "del", "busy0")


FETCH = r"""
import sys, urllib.request
print(urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/metrics", timeout=5).read().decode())
"""


def test_metrics_and_stop(pair: tuple[Node, Node, Path]) -> None:
    """--metrics serves the tunnel's counters for Prometheus; `ipshift tunnel stop` ends it
    after it removed its device."""
    a, _, tmp = pair
    a.ip("link", "set", "lo", "up")
    proc, socket = start(a, tmp, "tun-m", "--metrics", "127.0.0.1:9465")
    try:
        text = a.run([sys.executable, "-c", FETCH, "9465"], timeout=20).stdout
        assert 'ipshift_tunnel_datagrams_in_total{dev="tun-m"}' in text
        assert "ipshift_tunnel_uptime_seconds" in text and "ipshift_control_refused_total" in text
        res = a.run([*TUNNEL, "stop", "--dev", "tun-m", "--socket", str(socket)], timeout=30)
        assert res.stdout.strip() == "stopped"
        assert proc.wait(timeout=15) == 0, proc.stderr()
        assert not has_link(a, "tun-m") and not socket.exists()
    finally:
        if proc.running():
            proc.stop()


def test_the_peer_being_this_host_is_refused(pair: tuple[Node, Node, Path]) -> None:
    a, _, tmp = pair
    proc = a.spawn([*TUNNEL, "run", "--dev", "tun-self", "--local", "192.0.2.1:4789",
                    "--remote", "192.0.2.1:4790", "--socket", str(tmp / "self.sock")],
                   name="tunnel-self")
    assert proc.wait(timeout=20) == 2
    err = proc.stderr().strip().splitlines()
    assert len(err) == 1 and "is an address of this host" in err[0], err
    assert not has_link(a, "tun-self")
