"""Peer-table changes reaching a running tunnel: TunnelDaemon in process (one queue: the
forwarding thread; two queues: worker processes fed through their control pipes), with a
point-to-point `ipshift tunnel run` at the far end, ping across while the table changes."""

from __future__ import annotations

import ipaddress
import threading
import time
from collections.abc import Iterator, Mapping
from typing import Any

import pytest

from ipshift.lab import Lab, Node
from ipshift.tunnel import TunnelConfig, TunnelDaemon, hooks
from ipshift.tunnel.config import ConfigError, Endpoint
from ipshift.tunnel.hooks import Hooks
from ipshift.tunnel.peers import Peer
from ipshift.tunnel.rewrite import PrefixMapping, RewriteRules
from tests.netns.test_tunnel_forward import TUNNEL

pytestmark = pytest.mark.netns


@pytest.fixture(scope="module")
def pair() -> Iterator[tuple[Node, Node]]:
    with Lab("tunnel-upd") as lab:
        a, b = lab.host("a"), lab.host("b")
        lab.link(a, b, "192.0.2.1/24", "192.0.2.2/24")
        yield a, b


def far_peer(port: int = 4789) -> Peer:
    return Peer("b", Endpoint(ipaddress.ip_address("192.0.2.2"), port),
                prefixes=(ipaddress.ip_network("203.0.113.0/30"),))


def dummy(index: int) -> Peer:
    return Peer(f"d{index}", Endpoint(ipaddress.ip_address("192.0.2.200"), 5000 + index),
                prefixes=(ipaddress.ip_network(f"198.51.100.{index * 4}/30"),))


@pytest.mark.parametrize("queues", [1, 2])
def test_changes_reach_every_queue_while_packets_flow(pair: tuple[Node, Node],
                                                       queues: int) -> None:
    a, b = pair
    config = TunnelConfig(
        dev=f"tun-u{queues}", local=Endpoint.parse("192.0.2.1:4789"), peers=(far_peer(),),
        addresses=(ipaddress.ip_interface("203.0.113.1/30"),), queues=queues, netns=a.ns)
    far = b.spawn([*TUNNEL, "run", "--dev", "tun-far", "--local", "192.0.2.2:4789", "--remote",
                   "192.0.2.1:4789", "--address", "203.0.113.2/30", "--queues", str(queues)],
                  name=f"far-{queues}")
    try:
        far.wait_ready(" up: ", 20, "the far tunnel end")
        with TunnelDaemon(config) as daemon:
            assert "0% packet loss" in a.run(["ping", "-c", "3", "-i", "0.2", "-W", "2",
                                              "203.0.113.2"]).stdout
            pinger = a.spawn(["ping", "-c", "40", "-i", "0.05", "-W", "1", "203.0.113.2"],
                             name=f"ping-{queues}")
            generation = daemon.table.generation
            for index in range(1, 21):
                generation = daemon.update_peers([dummy(index)])
            generation = daemon.update_peers(removals=[f"d{i}" for i in range(1, 11)])
            daemon.set_rewrites(RewriteRules(src_prefixes=(
                PrefixMapping.parse("2001:db8:1::/64=2001:db8:2::/64"),)))
            assert pinger.wait(20) == 0, pinger.stdout()  # not one ping lost
            assert "0% packet loss" in pinger.stdout()
            assert daemon.table.generation == generation and len(daemon.table) == 11
            time.sleep(1.2)  # workers publish their counters twice a second
            counters = daemon.counters()
            assert counters.table_generation == generation
            assert daemon.peer_counters_of("b")["tun_writes"] >= 40
            assert daemon.peer_counters_of("d20")["tun_reads"] == 0
            with pytest.raises(ConfigError, match=r"both own 198\.51\.100\.80"):
                daemon.update_peers([Peer("clash", Endpoint(ipaddress.ip_address(
                    "192.0.2.201"), 1), prefixes=(ipaddress.ip_network("198.51.100.80/30"),))])
            assert daemon.table.generation == generation  # a refused update changes nothing
    finally:
        far.stop()


def test_a_point_to_point_tunnel_refuses_peer_changes(pair: tuple[Node, Node]) -> None:
    a, _b = pair
    config = TunnelConfig(dev="tun-p2p", local=Endpoint.parse("192.0.2.1:4790"),
                          remote=Endpoint.parse("192.0.2.2:4790"), netns=a.ns)
    with TunnelDaemon(config) as daemon, pytest.raises(ConfigError, match="--peers"):
        daemon.update_peers([dummy(1)])


@pytest.mark.parametrize("queues", [1, 2])
def test_hooks_divert_to_the_daemon_and_take_state_in_every_queue(pair: tuple[Node, Node],
                                                                  queues: int) -> None:
    """A component's hook, switched on by hook state, hands ICMP echo requests to its
    control plane instead of forwarding them; from worker processes they come up a pipe."""
    a, b = pair
    diverted: list[tuple[str, str, bytes]] = []
    lock = threading.Lock()
    divert = {"on": False}

    def outbound(buf: bytearray, offset: int, partial: bool, peer: Peer) -> hooks.HookResult:
        if divert["on"] and buf[offset] == 0x45 and buf[offset + 9] == 1 and \
                buf[offset + 20] == 8:
            return hooks.CONTROL
        return True

    def sink(peer: Peer, direction: str, packet: bytes) -> None:
        with lock:
            diverted.append((peer.name, direction, packet))

    def on_state(state: Mapping[str, Any]) -> None:
        divert["on"] = bool(state.get("divert"))

    config = TunnelConfig(
        dev=f"tun-h{queues}", local=Endpoint.parse("192.0.2.1:4791"), peers=(far_peer(4791),),
        addresses=(ipaddress.ip_interface("203.0.113.1/30"),), queues=queues, netns=a.ns)
    far = b.spawn([*TUNNEL, "run", "--dev", "tun-hfar", "--local", "192.0.2.2:4791", "--remote",
                   "192.0.2.1:4791", "--address", "203.0.113.2/30", "--queues", str(queues)],
                  name=f"hfar-{queues}")
    try:
        far.wait_ready(" up: ", 20, "the far tunnel end")
        tunnel_hooks = Hooks(outbound=outbound, control=sink, on_state=on_state)
        with TunnelDaemon(config, hooks=tunnel_hooks) as daemon:
            ping = ["ping", "-c", "2", "-i", "0.2", "-W", "1", "203.0.113.2"]
            assert a.run(ping, check=False).returncode == 0
            daemon.update_hook_state({"divert": True})
            assert a.run(ping, check=False).returncode != 0  # diverted, not forwarded
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and len(diverted) < 2:
                time.sleep(0.05)
            with lock:
                assert len(diverted) >= 2
                name, direction, packet = diverted[0]
            assert (name, direction) == ("b", hooks.OUTBOUND)
            assert packet[16:20] == ipaddress.ip_address("203.0.113.2").packed
            assert daemon.counters().control >= 2 or queues > 1  # workers publish later
    finally:
        far.stop()
