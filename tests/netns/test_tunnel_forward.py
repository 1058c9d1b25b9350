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

import pytest

from ipshift.lab import Lab, LabProcess, Node
from ipshift.lab.scenarios import TunnelSite
from tests.netns.conftest import need

pytestmark = pytest.mark.netns

TUNNEL = [sys.executable, "-m", "ipshift", "tunnel"]
CSUM_COUNTERS = ("TcpInCsumErrors", "UdpInCsumErrors", "Udp6InCsumErrors", "IpInHdrErrors",
                 "Ip6InHdrErrors")
IPERF_SECONDS = 2


class Site(TunnelSite):
    """The shared topology, with the names these tests use."""

    def tunnel(self, gateway: Node, *extra: str) -> LabProcess:
        return self.start_tunnel(gateway, *extra)

    def status(self, gateway: Node, proc: LabProcess) -> dict[str, int]:
        return self.counters(gateway, proc)


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
        yield Site(lab, tmp_path_factory.mktemp("tunnel"))


@pytest.fixture(params=["batch", "packet"])
def tunnels(site: Site, request: pytest.FixtureRequest) -> Iterator[tuple[LabProcess, LabProcess]]:
    framing = ("--framing", request.param)
    first, second = site.tunnel(site.g1, *framing), site.tunnel(site.g2, *framing)
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


def test_batch_framing_under_loss_delivers_what_survives_and_falls_back(site: Site) -> None:
    # 2 % of the tunnel's datagrams from g1 are dropped one by one on their way to g2:
    # super-packets arrive with chunks missing. g2 must deliver every inner segment that
    # arrived whole (with correct checksums at h2), TCP must recover the rest, and g2's loss
    # reports must make g1 send per-packet framing for a while.
    first, second = site.tunnel(site.g1), site.tunnel(site.g2)
    site.underlay_loss(2)
    try:
        before = checksum_errors(site.h2)
        assert iperf(site, "198.51.100.65")[0] > 1_000_000
        assert checksum_errors(site.h2) == before
        counters = site.status(site.g2, second)
        assert counters["streams_incomplete"] > 0
        assert counters["segments_recovered"] > 0
        assert counters["loss_reports_sent"] > 0
        assert counters["malformed"] == 0 and counters["write_errors"] == 0
        sender = site.status(site.g1, first)
        assert sender["loss_reports_received"] > 0 and sender["fallbacks"] == 1
        # per-packet datagrams: many more than the chunks of the super-packets sent
        assert sender["datagrams_out"] > 30 * sender["super_packets_out"]
    finally:
        site.underlay_loss(0)
        assert first.stop() == 0, first.stderr()
        assert second.stop() == 0, second.stderr()


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
