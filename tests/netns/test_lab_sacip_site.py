"""The sacip lab on its own, without the daemons (ipshift.lab.sacip_site): the topology, the
address and route state every move procedure leaves, the premise of the baselines (plain TCP
dies at a move that nothing remaps, MPTCP lives through it), the firewall modes of the router
and the real programs (sshd and ssh, iperf3, connected UDP).

    mover ==wired (mw/rw)== router -- lan switch -- peer, peer2
    mover ==wifi  (mf/rf)== router
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from ipshift.lab import Lab
from ipshift.lab.sacip_site import (
    NOSACIP4,
    PEER4,
    PEER6,
    PEER_OTHER_SUBNET,
    SAME_SUBNET,
    WIFI,
    WIRED,
    SacipSite,
    SshSession,
    Stream,
    UdpFlow,
    bare,
    build_site,
    move_break_before_make,
    move_make_before_break,
    move_peer,
    move_to_wifi,
    peer_of,
    start_iperf3,
    start_sshd,
)
from ipshift.lab.topology import NETNS_ETC, STATE_DIR, Node, leftovers
from ipshift.net import netns
from tests.netns.conftest import need

pytestmark = pytest.mark.netns


@pytest.fixture
def site(tmp_path: Path) -> Iterator[SacipSite]:
    if os.geteuid() != 0:
        pytest.skip("needs root: builds network namespaces")
    with Lab("sacip-site") as lab:
        yield build_site(lab, tmp_path)


# --- state helpers ---------------------------------------------------------------------------
def addresses(node: Node, dev: str, family: int) -> set[str]:
    """The global addresses on `dev`, as CIDR."""
    links = node.ip_json(f"-{family}", "addr", "show", "dev", dev, "scope", "global")
    # iproute2 leaves an empty entry for each address the scope filter hides
    return {f"{a['local']}/{a['prefixlen']}" for link in links for a in link["addr_info"] if a}


def defaults(node: Node, family: int) -> list[tuple[str, str]]:
    """Every default route as (gateway, device)."""
    return [(r.get("gateway", ""), r["dev"])
            for r in node.ip_json(f"-{family}", "route", "show", "default")]


def routed(node: Node, family: int) -> set[str]:
    """The destinations of `node`'s routes of one family."""
    return {r["dst"] for r in node.ip_json(f"-{family}", "route", "show")}


def subnet(cidr: str) -> str:
    return str(ipaddress.ip_interface(cidr).network)


def reaches(node: Node, source: str, destination: str) -> bool:
    """Does a ping from `source` get an answer (within 4 s)?"""
    res = node.run(["ping", "-n", "-c", "1", "-i", "0.2", "-w", "4", "-I", source, destination],
                   check=False, timeout=10)
    return res.returncode == 0


def other(family: int) -> int:
    return 6 if family == 4 else 4


# --- tests -----------------------------------------------------------------------------------
def test_the_site_builds_and_leaves_nothing_behind(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root: builds network namespaces")
    need("ping")
    lab = Lab("sacip-site")
    with lab:
        site = build_site(lab, tmp_path)
        names = [node.ns for node in lab.nodes.values()]
        assert all(netns.exists(name) for name in names)
        for family in (4, 6):
            assert addresses(site.mover, "mw", family) == {WIRED[family][0][0]}
            assert addresses(site.mover, "mf", family) == set()
            assert defaults(site.mover, family) == [(bare(WIRED[family][0][1]), "mw")]
            # the router routes every subnet the mover can move to, and the peer's two
            gateways = [gw for _a, gw in WIRED[family]]
            gateways += [WIFI[family][1], PEER_OTHER_SUBNET[family][1]]
            assert {subnet(gw) for gw in gateways} <= routed(site.router, family)
            assert reaches(site.mover, bare(WIRED[family][0][0]), peer_of(family))
        assert reaches(site.mover, bare(WIRED[4][0][0]), NOSACIP4)
        site.router_firewall(strict=True)  # an nft table too: it goes with the namespace
        sleeper = site.peer.spawn(["sleep", "60"])
    assert not any(netns.exists(name) for name in names)
    assert leftovers({lab.prefix}) == []
    assert sleeper.poll() is not None
    assert not any((Path(NETNS_ETC) / name).exists() for name in names)
    assert not (STATE_DIR / f"{lab.run_id}.json").exists()


MOVES = ["mbb-other-subnet", "mbb-same-subnet-promote", "bbm", "other-interface"]


@pytest.mark.parametrize("family", [4, 6])
@pytest.mark.parametrize("procedure", MOVES)
def test_each_move_leaves_the_stated_addresses_and_routes(site: SacipSite, procedure: str,
                                                          family: int) -> None:
    need("ping")
    old, old_gw = WIRED[family][0]
    untouched = (addresses(site.mover, "mw", other(family)), defaults(site.mover, other(family)))
    new_dev = "mw"
    if procedure == "mbb-other-subnet":
        new = move_make_before_break(site, family, 0, same_subnet=False, promote=False)
        new_cidr, new_gw = WIRED[family][1]
    elif procedure == "mbb-same-subnet-promote":
        new = move_make_before_break(site, family, 0, same_subnet=True, promote=True)
        new_cidr, new_gw = SAME_SUBNET[family], old_gw
    elif procedure == "bbm":
        new = move_break_before_make(site, family, 0, gap=0.1)
        new_cidr, new_gw = WIRED[family][1]
    else:
        new = move_to_wifi(site, family)
        (new_cidr, new_gw), new_dev = WIFI[family], "mf"
    assert new == bare(new_cidr)
    assert addresses(site.mover, new_dev, family) == {new_cidr}
    if new_dev != "mw":
        assert addresses(site.mover, "mw", family) == set()
    assert defaults(site.mover, family) == [(bare(new_gw), new_dev)]
    if family == 4:  # promoted: the new address is the primary one now
        (link,) = site.mover.ip_json("-4", "addr", "show", "dev", new_dev)
        assert not any(a.get("secondary") for a in link["addr_info"]), link
    # the other family is left as it was
    assert (addresses(site.mover, "mw", other(family)), defaults(site.mover, other(family))) \
        == untouched
    # a session on the old address needs remapping: the router no longer routes its subnet
    # (except the same-subnet move, the seed's own case, where only the address changed)
    old_routed = subnet(old) in routed(site.router, family)
    assert old_routed == (procedure == "mbb-same-subnet-promote")
    assert reaches(site.mover, new, peer_of(family))


def test_without_promote_secondaries_the_new_address_goes_with_the_old(site: SacipSite) -> None:
    """The reason the seed's procedure needs promote_secondaries: deleting an IPv4 primary
    deletes its secondaries unless they are promoted."""
    move_make_before_break(site, 4, 0, same_subnet=True, promote=False)
    assert addresses(site.mover, "mw", 4) == set()


@pytest.mark.parametrize("family", [4, 6])
def test_the_peer_moves_to_another_subnet(site: SacipSite, family: int) -> None:
    need("ping")
    new = move_peer(site, family, other_subnet=True)
    assert addresses(site.peer, "pr", family) == {PEER_OTHER_SUBNET[family][0]}
    assert defaults(site.peer, family) == [(bare(PEER_OTHER_SUBNET[family][1]), "pr")]
    assert reaches(site.peer, new, bare(WIRED[family][0][0]))


def test_plain_tcp_dies_at_a_make_before_break_move(site: SacipSite) -> None:
    """The baselines' premise: with nothing remapping it, a session on the old address does
    not survive the seed's procedure."""
    stream = Stream(site, 4)
    try:
        assert stream.echoed_since(20)
        move_make_before_break(site, 4, 0, same_subnet=False, promote=False)
        assert not stream.echoed_since(1, timeout=3.0)
    finally:
        stream.stop()


def test_mptcp_survives_two_make_before_break_moves(site: SacipSite) -> None:
    """MPTCP sockets at both ends, the in-kernel path manager: the new address is added as a
    subflow endpoint and the old one's endpoint removed; A -> B -> C."""
    site.enable_mptcp()
    site.mptcp_endpoint_add(site.mover, WIRED[4][0][0], "mw")
    stream = Stream(site, 4, mptcp=True)
    try:
        assert stream.echoed_since(20)
        for step in (0, 1):
            new = move_make_before_break(site, 4, step, same_subnet=False, promote=False)
            site.mptcp_endpoint_add(site.mover, new, "mw")
            site.mptcp_endpoint_delete(site.mover, WIRED[4][step][0])
            assert stream.echoed_since(20), f"MPTCP stalled after move {step + 1}"
        endpoints = site.mover.ip_json("mptcp", "endpoint", "show")
        assert [e["address"] for e in endpoints] == [bare(WIRED[4][2][0])]
    finally:
        stream.stop()
    stream.assert_whole()


@pytest.mark.parametrize("strict", [False, True])
def test_the_router_firewall_picks_up_a_running_session_only_when_loose(
        site: SacipSite, strict: bool) -> None:
    """A session the router's conntrack never saw start is what a remapped one looks like:
    the loose firewall picks it up mid-stream, the strict one drops it; a session that starts
    after the firewall passes either."""
    before = Stream(site, 4)
    try:
        assert before.echoed_since(10)
        site.router_firewall(strict=strict)
        assert site.router.run(["sysctl", "-n", "net.netfilter.nf_conntrack_tcp_loose"]) \
            .stdout.strip() == ("0" if strict else "1")
        assert site.router.run(["sysctl", "-n", "net.ipv4.conf.rw.rp_filter"]).stdout.strip() \
            == ("1" if strict else "2")
        assert before.echoed_since(20, timeout=3.0) is not strict
    finally:
        before.stop()
    after = Stream(site, 6)
    try:
        assert after.echoed_since(20)
    finally:
        after.stop()
    after.assert_whole()


def test_ssh_session_echoes_lines_and_runs_commands(site: SacipSite, tmp_path: Path) -> None:
    need("ssh", "ssh-keygen", "sshd")
    sshd = start_sshd(site, tmp_path / "ssh")
    try:
        session = SshSession(site, sshd)
        try:
            for i in range(3):
                session.send(f"line {i}")
                assert session.echoed(f"line {i}"), session.process.stderr()[-500:]
        finally:
            status = session.close()
        assert status == 0, session.process.stderr()[-500:]
        assert session.process.stdout().splitlines() == [f"line {i}" for i in range(3)]
        # a one-shot command, over IPv6: the server sees the mover's address
        res = site.mover.run(sshd.client_argv("echo $SSH_CONNECTION", family=6), timeout=30)
        client, _port, server, _server_port = res.stdout.split()
        assert (client, server) == (bare(WIRED[6][0][0]), PEER6)
    finally:
        sshd.stop()
    assert sshd.process.poll() is not None


def test_iperf3_and_connected_udp_helpers(site: SacipSite) -> None:
    need("iperf3")
    run = start_iperf3(site, 2, "-b", "100M")
    try:
        report = run.report()
    finally:
        run.stop()
    assert report["end"]["sum_received"]["bytes"] > 0.5 * 100e6 / 8 * 2
    assert report["start"]["connected"][0]["remote_host"] == PEER4
    udp = UdpFlow(site, 6)
    try:
        assert udp.exchange(20) == 20
    finally:
        udp.close()
