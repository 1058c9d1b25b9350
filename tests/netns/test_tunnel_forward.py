"""The tunnel forwarder across forwarded hops that complete checksums in software.

    h1 --(tx off)-- g1 ==tunnel== g2 --(tx off)-- h2      (the tunnel's UDP goes g1 - r - g2)

g1 and g2 run `ipshift tunnel run`; iperf3 runs between h1 and h2. Packets leave the tunnel with
a partial checksum (NEEDS_CSUM) and are forwarded to a host over an interface with checksum
offload off, so the forwarding hop computes the final checksum in software from what the
forwarder wrote into the checksum field: a wrong pseudo-header sum (after segmentation,
coalescing or an address rewrite) becomes a checksum error at h1/h2, counted in their
`TcpInCsumErrors`. The underlay router r has offload off as well, so the tunnel's UDP GSO sends
are cut in software there, and g1/g2 have GRO on, so they receive them as GRO batches again.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from ipshift.lab import Lab, LabProcess, Node
from tests.netns.conftest import need

pytestmark = pytest.mark.netns

TUNNEL = [sys.executable, "-m", "ipshift", "tunnel"]
CSUM_COUNTERS = ("TcpInCsumErrors", "UdpInCsumErrors", "Udp6InCsumErrors", "IpInHdrErrors",
                 "Ip6InHdrErrors")
IPERF_SECONDS = 2


@dataclass
class Site:
    lab: Lab
    h1: Node
    g1: Node
    r: Node
    g2: Node
    h2: Node
    tmp: Path

    def tunnel(self, gateway: Node, *extra: str) -> LabProcess:
        """Start the tunnel on g1 or g2 and wait until it is up."""
        if gateway is self.g1:
            args = ["--dev", "tun-g1", "--local", "192.0.2.1:4789", "--remote", "192.0.2.129:4789",
                    "--address", "203.0.113.1/30", "--address", "2001:db8:ff::1/64",
                    "--route", "198.51.100.64/26", "--route", "2001:db8:b::/64"]
        else:
            args = ["--dev", "tun-g2", "--local", "192.0.2.129:4789", "--remote", "192.0.2.1:4789",
                    "--address", "203.0.113.2/30", "--address", "2001:db8:ff::2/64",
                    "--route", "198.51.100.0/26", "--route", "2001:db8:a::/64"]
        socket = self.tmp / f"{gateway.name}-{len(list(self.tmp.iterdir()))}.sock"
        proc = gateway.spawn([*TUNNEL, "run", *args, "--socket", str(socket), *extra],
                             name=f"tunnel-{gateway.name}")
        if not proc.wait_for_output(" up: ", timeout=20):
            proc.stop()
            raise AssertionError(f"tunnel on {gateway.name} did not start: {proc.stderr()}")
        return proc

    def status(self, gateway: Node, proc: LabProcess) -> dict[str, int]:
        socket = next(a for a in proc.argv if a.endswith(".sock"))
        res = gateway.run([*TUNNEL, "status", "--dev", "x", "--socket", socket, "--json"],
                          timeout=20)
        counters: dict[str, int] = json.loads(res.stdout)["counters"]
        return counters


def checksum_errors(node: Node) -> dict[str, int]:
    out = node.run(["nstat", "-asz", *CSUM_COUNTERS], timeout=20).stdout
    counts = {name: 0 for name in CSUM_COUNTERS}
    for line in out.splitlines():
        fields = line.split()
        if len(fields) >= 2 and fields[0] in counts:
            counts[fields[0]] = int(fields[1])
    return counts


def iperf(site: Site, dst: str, *extra: str) -> tuple[int, str]:
    """One bounded iperf3 TCP run between h1 and h2's `dst`. Returns the bytes received (by h2,
    or by h1 with -R) and the address h2 saw the connection come from."""
    server = site.h2.spawn(["iperf3", "-s", "-1", "-J"], name="iperf3-server")
    try:
        site.h2.wait_listening(5201)  # a one-off server would be gone after a failed attempt
        client = site.h1.run(["iperf3", "-c", dst, "-t", str(IPERF_SECONDS), "-J", *extra],
                             check=False, timeout=IPERF_SECONDS + 30)
        assert client.returncode == 0, client.stdout[-2000:]
        server.wait(timeout=20)
        seen_from = str(json.loads(server.stdout())["start"]["connected"][0]["remote_host"])
        received = int(json.loads(client.stdout)["end"]["sum_received"]["bytes"])
        return received, seen_from
    finally:
        server.stop()


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    need("iperf3", "ethtool", "nstat")
    with Lab("tunnel") as lab:
        h1, g1, r = lab.host("h1"), lab.router("g1"), lab.router("r")
        g2, h2 = lab.router("g2"), lab.host("h2")
        l1 = lab.link(h1, g1, "198.51.100.1/26", "198.51.100.62/26",
                      v6=("2001:db8:a::1/64", "2001:db8:a::ff/64"))
        u1 = lab.link(g1, r, "192.0.2.1/25", "192.0.2.126/25")
        u2 = lab.link(r, g2, "192.0.2.254/25", "192.0.2.129/25")
        g1.ip("route", "add", "192.0.2.128/25", "via", "192.0.2.126")
        g2.ip("route", "add", "192.0.2.0/25", "via", "192.0.2.254")
        l2 = lab.link(g2, h2, "198.51.100.126/26", "198.51.100.65/26",
                      v6=("2001:db8:b::ff/64", "2001:db8:b::1/64"))
        h1.ip("route", "add", "default", "via", "198.51.100.62")
        h1.ip("-6", "route", "add", "default", "via", "2001:db8:a::ff")
        h2.ip("route", "add", "default", "via", "198.51.100.126")
        h2.ip("-6", "route", "add", "default", "via", "2001:db8:b::ff")
        # software checksums on every forwarded hop toward a host, and in the underlay
        g1.run(["ethtool", "-K", l1.b.ifname, "tx", "off"])
        g2.run(["ethtool", "-K", l2.a.ifname, "tx", "off"])
        r.run(["ethtool", "-K", u1.b.ifname, "tx", "off"])
        r.run(["ethtool", "-K", u2.a.ifname, "tx", "off"])
        # GRO on the underlay ends: the datagrams r cut apart come back as UDP_GRO batches
        g1.run(["ethtool", "-K", u1.a.ifname, "gro", "on"])
        g2.run(["ethtool", "-K", u2.b.ifname, "gro", "on"])
        yield Site(lab, h1, g1, r, g2, h2, tmp_path_factory.mktemp("tunnel"))


@pytest.fixture
def tunnels(site: Site) -> Iterator[tuple[LabProcess, LabProcess]]:
    first, second = site.tunnel(site.g1), site.tunnel(site.g2)
    yield first, second
    for proc in (first, second):
        assert proc.stop() == 0, proc.stderr()


@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
def test_tcp_both_directions_with_software_checksums(
    site: Site, tunnels: tuple[LabProcess, LabProcess], family: str
) -> None:
    dst = "198.51.100.65" if family == "ipv4" else "2001:db8:b::1"
    before = {n.name: checksum_errors(n) for n in (site.h1, site.h2, site.g1, site.g2)}
    assert iperf(site, dst)[0] > 1_000_000
    assert iperf(site, dst, "-R")[0] > 1_000_000
    after = {n.name: checksum_errors(n) for n in (site.h1, site.h2, site.g1, site.g2)}
    assert after == before  # not one checksum error anywhere
    g1, g2 = (site.status(site.g1, tunnels[0]), site.status(site.g2, tunnels[1]))
    for counters in (g1, g2):
        assert counters["malformed"] == 0 and counters["bad_tun_packets"] == 0
        assert counters["write_errors"] == 0
        # super-packets were cut for the tunnel and joined again behind it
        assert counters["super_packets_out"] > 0 and counters["super_packets_in"] > 0


def test_address_rewrite_across_the_forwarded_hop(site: Site) -> None:
    # g1 hides h1 behind 203.0.113.100 / 2001:db8:ff::100 (an ILNP-style locator rewrite);
    # g2 routes those back into the tunnel.
    first = site.tunnel(site.g1, "--rewrite-src", "198.51.100.1=203.0.113.100",
                        "--rewrite-src", "2001:db8:a::1=2001:db8:ff::100")
    second = site.tunnel(site.g2, "--route", "203.0.113.100/32", "--route",
                         "2001:db8:ff::100/128")
    try:
        before = {n.name: checksum_errors(n) for n in (site.h1, site.h2)}
        for dst, seen_as in (("198.51.100.65", "203.0.113.100"),
                             ("2001:db8:b::1", "2001:db8:ff::100")):
            for extra in ((), ("-R",)):
                received, seen_from = iperf(site, dst, *extra)
                assert received > 1_000_000
                assert seen_from == seen_as
        assert {n.name: checksum_errors(n) for n in (site.h1, site.h2)} == before
        assert site.status(site.g1, first)["rewritten"] > 0
        assert site.status(site.g1, first)["hook_drops"] == 0
    finally:
        assert first.stop() == 0, first.stderr()
        assert second.stop() == 0, second.stderr()


def test_multi_queue_tunnel(site: Site) -> None:
    first = site.tunnel(site.g1, "--queues", "2")
    second = site.tunnel(site.g2, "--queues", "2")
    try:
        queues = site.g1.run(["ls", "/sys/class/net/tun-g1/queues"]).stdout.split()
        assert sorted(q for q in queues if q.startswith("tx-")) == ["tx-0", "tx-1"]
        before = checksum_errors(site.h2)
        assert iperf(site, "198.51.100.65", "-P", "4")[0] > 1_000_000
        assert checksum_errors(site.h2) == before
        counters = site.status(site.g2, second)
        assert counters["datagrams_in"] > 0 and counters["malformed"] == 0
    finally:
        assert first.stop() == 0, first.stderr()
        assert second.stop() == 0, second.stderr()
    assert "tun-g1" not in site.g1.ip("link", "show")
