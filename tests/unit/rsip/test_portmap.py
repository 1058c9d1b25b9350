"""The PCP table's transactions, against a recording stand-in for libnftables (no kernel):
one transaction per batch, never an element added twice or deleted when absent, filters
added and removed as a difference, a failed batch retried change by change, and the
conntrack work queued for later."""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest

from ipshift.net.nft import NftError
from ipshift.net.nfttable import OwnedTable
from ipshift.rsip.mapping import (
    AddForward,
    AddPeer,
    Forward,
    PeerPin,
    RemoteFilter,
    RemoveForward,
    RemovePeer,
    SetFilters,
)
from ipshift.rsip.portmap import PortMap, table_body

V4 = ipaddress.IPv4Address
EXT = V4("203.0.113.1")
HOST = V4("192.0.2.10")
TCP_FORWARD = Forward(EXT, 6, 8080, HOST, 80)
UDP_FORWARD = Forward(EXT, 17, 5000, HOST, 5000)
NET = RemoteFilter(ipaddress.IPv4Network("198.51.100.0/24"))
ONE = RemoteFilter(ipaddress.IPv4Network("198.51.100.7/32"), 443)


class RecordingNft:
    netns = None

    def __init__(self) -> None:
        self.transactions: list[list[dict[str, Any]]] = []
        self.fail_when: Any = None  # a predicate on a transaction

    def run_json(self, commands: list[dict[str, Any]]) -> dict[str, Any]:
        if self.fail_when is not None and self.fail_when(commands):
            raise NftError("nft: Could not process rule: File exists")
        self.transactions.append(commands)
        return {}


def elements(transaction: list[dict[str, Any]]) -> list[tuple[str, str, int]]:
    """(verb, set or map name, number of elements) of each command."""
    out = []
    for command in transaction:
        ((verb, body),) = command.items()
        element = body["element"]
        out.append((verb, element["name"], len(element["elem"])))
    return out


@pytest.fixture
def portmap() -> tuple[PortMap, RecordingNft]:
    nft = RecordingNft()
    table = OwnedTable(nft, "ip", "pcp", "test")  # type: ignore[arg-type]
    return PortMap(table, "lan0"), nft


def test_a_forward_is_three_elements_in_one_transaction(portmap: tuple[PortMap,
                                                                       RecordingNft]) -> None:
    pm, nft = portmap
    assert pm.apply([AddForward(TCP_FORWARD), AddForward(UDP_FORWARD)]) == []
    assert len(nft.transactions) == 1
    assert elements(nft.transactions[0]) == [("add", "forwards", 1), ("add", "targets", 1),
                                              ("add", "outbound", 1)] * 2
    first = nft.transactions[0][0]["add"]["element"]
    assert first["table"] == "ipshift_pcp_test" and first["family"] == "ip"
    key, value = first["elem"][0]
    assert key == {"concat": ["203.0.113.1", "tcp", 8080]}
    assert value == {"concat": ["192.0.2.10", 80]}
    assert len(pm) == 2


def test_nothing_is_added_twice_or_deleted_when_absent(portmap: tuple[PortMap,
                                                                      RecordingNft]) -> None:
    pm, nft = portmap
    pm.apply([AddForward(TCP_FORWARD)])
    pm.apply([AddForward(TCP_FORWARD), RemoveForward(UDP_FORWARD)])
    assert len(nft.transactions) == 1  # the second batch had nothing to do
    pm.apply([RemoveForward(TCP_FORWARD), AddForward(TCP_FORWARD)])
    assert elements(nft.transactions[1]) == [
        ("delete", "forwards", 1), ("delete", "targets", 1), ("delete", "outbound", 1),
        ("add", "forwards", 1), ("add", "targets", 1), ("add", "outbound", 1)]
    assert pm.forwards == {(EXT, 6, 8080): TCP_FORWARD}


def test_filters_change_by_difference(portmap: tuple[PortMap, RecordingNft]) -> None:
    pm, nft = portmap
    pm.apply([AddForward(TCP_FORWARD, (NET,))])
    assert elements(nft.transactions[0])[3:] == [("add", "allowed", 1), ("add", "filtered", 1)]
    allowed = nft.transactions[0][3]["add"]["element"]["elem"][0]["concat"]
    assert allowed == ["203.0.113.1", "tcp", 8080,
                       {"prefix": {"addr": "198.51.100.0", "len": 24}}, {"range": [0, 65535]}]
    pm.apply([SetFilters(TCP_FORWARD, (NET, ONE))])
    assert elements(nft.transactions[1]) == [("add", "allowed", 1)]
    assert nft.transactions[1][0]["add"]["element"]["elem"][0]["concat"][4] == 443
    pm.apply([SetFilters(TCP_FORWARD, ())])
    assert elements(nft.transactions[2]) == [("delete", "filtered", 1),
                                             ("delete", "allowed", 2)]
    pm.apply([AddForward(UDP_FORWARD, (ONE,)), RemoveForward(UDP_FORWARD)])
    assert pm.filters == {} and (EXT, 17, 5000) not in pm.forwards


def test_peer_pins(portmap: tuple[PortMap, RecordingNft]) -> None:
    pm, nft = portmap
    pin = PeerPin(6, HOST, 40000, V4("198.51.100.7"), 443, EXT, 40000)
    pm.apply([AddPeer(pin), AddPeer(pin)])
    pm.apply([RemovePeer(pin), RemovePeer(pin)])
    assert [elements(t) for t in nft.transactions] == [[("add", "peers", 1)],
                                                       [("delete", "peers", 1)]]
    key, value = nft.transactions[0][0]["add"]["element"]["elem"][0]
    assert key == {"concat": ["192.0.2.10", "tcp", 40000, "198.51.100.7", 443]}
    assert value == {"concat": ["203.0.113.1", 40000]}
    assert pm.peers == {}


def test_a_failed_batch_is_retried_change_by_change(portmap: tuple[PortMap,
                                                                   RecordingNft]) -> None:
    pm, nft = portmap
    bad = Forward(EXT, 17, 6000, HOST, 6000)
    nft.fail_when = lambda commands: any(
        c.get("add", {}).get("element", {}).get("elem") == [[
            {"concat": ["203.0.113.1", "udp", 6000]}, {"concat": ["192.0.2.10", 6000]}]]
        for c in commands)
    failed = pm.apply([AddForward(TCP_FORWARD), AddForward(bad)])
    assert failed == [AddForward(bad)] and pm.failures == 1
    assert set(pm.forwards) == {(EXT, 6, 8080)}  # what the kernel holds, and nothing else


def test_conntrack_work_is_queued_not_done(portmap: tuple[PortMap, RecordingNft]) -> None:
    pm, _ = portmap
    pm.apply([AddForward(UDP_FORWARD), AddForward(TCP_FORWARD)])
    pm.apply([RemoveForward(TCP_FORWARD)])
    assert pm.flow_work_queued
    work = pm.take_flow_work()
    assert work == {(17, EXT): (set(), {5000}), (6, EXT): ({8080}, set())}
    assert not pm.flow_work_queued and pm.take_flow_work() == {}
    # a forward made again before the sweep keeps its flows
    pm.apply([RemoveForward(UDP_FORWARD), AddForward(UDP_FORWARD)])
    assert pm.take_flow_work() == {(17, EXT): (set(), {5000})}


def test_the_table_body_names_the_internal_interface() -> None:
    body = table_body("lan0")
    assert 'iifname != "lan0"' in body and "dnat ip to ip daddr . meta l4proto . th dport " \
        "map @forwards" in body
