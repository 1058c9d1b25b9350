"""QueuePump with a table of peers, without root: a gateway pump on 127.0.0.1 serves peers on
127.0.0.2..5, each a point-to-point pump of its own; SOCK_SEQPACKET socket pairs stand in for
the TUN queues (as in test_forwarder)."""

from __future__ import annotations

import ipaddress
import select
import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scapy.layers.inet import ICMP, IP, UDP
from scapy.layers.inet6 import IPv6

from ipshift.net import udp
from ipshift.packet import vnet
from ipshift.tunnel import auth, batch, hooks, wire
from ipshift.tunnel.config import Endpoint
from ipshift.tunnel.forwarder import Counters, PeerCounterArray, QueuePump
from ipshift.tunnel.hooks import Hooks
from ipshift.tunnel.peers import Peer, PeerTable, PortRange
from tests.unit.tunnel.test_support import gso_type_for, super_packet

SUPER = vnet.VnetHeader
PREFIXES = {
    "p1": "198.51.100.0/26",
    "p2": "198.51.100.64/26",
    "p3": "2001:db8:3::/64",
}


@dataclass
class Node:
    pump: QueuePump
    tun: socket.socket  # the kernel's side of the fake TUN queue
    sock: socket.socket
    others: list[socket.socket] = field(default_factory=list)


def _fake_tun() -> tuple[socket.socket, socket.socket]:
    kernel, queue = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    for s in (kernel, queue):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    queue.setblocking(False)
    return kernel, queue


def _peer(name: str, host: str, port: int, key: bytes | None = None, **entries: object) -> Peer:
    return Peer(name, Endpoint(ipaddress.ip_address(host), port), key=key, **entries)  # type: ignore[arg-type]


@dataclass
class Star:
    gateway: Node
    peers: dict[str, Node]
    table: PeerTable


def _star(chunk: int | None, keys: bool = False, gateway_hooks: Hooks | None = None,
          peer_hooks: Hooks | None = None) -> Iterator[Star]:
    gsock = udp.open_udp(("127.0.0.1", 0))
    gport = gsock.getsockname()[1]
    key = auth.generate_key() if keys else None
    made: list[socket.socket] = [gsock]
    nodes: dict[str, Node] = {}
    entries = []
    for index, name in enumerate(("p1", "p2", "p3"), start=2):
        sock = udp.open_udp((f"127.0.0.{index}", 0))
        made.append(sock)
        port = sock.getsockname()[1]
        entries.append(_peer(name, f"127.0.0.{index}", port, key,
                             prefixes=(ipaddress.ip_network(PREFIXES[name]),)))
        sock.connect(("127.0.0.1", gport))
    entries.append(_peer("shared", "127.0.0.5", 9, key, port_ranges=(
        PortRange.parse("203.0.113.7/udp/1000-1999"),)))
    table = PeerTable(entries, local_destinations=(ipaddress.ip_network("203.0.113.0/24"),
                                                   ipaddress.ip_network("2001:db8:ff::/64")))
    kernel, queue = _fake_tun()
    made += [kernel, queue]
    gateway = Node(QueuePump(queue.fileno(), gsock, table=table, chunk=chunk, hooks=gateway_hooks,
                             authenticated=keys), kernel, gsock)
    for entry, sock in zip(entries[:3], made[1:4], strict=True):
        kernel, queue = _fake_tun()
        made += [kernel, queue]
        # The peer's own table: the gateway owns everything (a host behind one tunnel).
        own = PeerTable([_peer("gw", "127.0.0.1", gport, key, prefixes=(
            ipaddress.ip_network("0.0.0.0/0"), ipaddress.ip_network("::/0")))])
        nodes[entry.name] = Node(QueuePump(queue.fileno(), sock, table=own, chunk=chunk,
                                           hooks=peer_hooks, authenticated=keys), kernel, sock)
    try:
        yield Star(gateway, nodes, table)
    finally:
        for s in made:
            s.close()


@pytest.fixture(params=[None, 1400], ids=["packet-framing", "batch-framing"])
def star(request: pytest.FixtureRequest) -> Iterator[Star]:
    yield from _star(request.param)


def send_from_tun(node: Node, packet: bytes, header: vnet.VnetHeader | None = None) -> None:
    node.tun.send((header or SUPER()).encode() + packet)
    node.pump.pump_tun()


def pump_until_quiet(node: Node, timeout: float = 1.0) -> None:
    while select.select([node.sock], [], [], timeout)[0]:
        timeout = 0.05
        try:
            node.pump.pump_udp()
        except BlockingIOError:
            pass


def written(node: Node, timeout: float = 0.3) -> list[bytes]:
    out = []
    while select.select([node.tun], [], [], timeout if not out else 0.05)[0]:
        _header, packet = vnet.split(node.tun.recv(0x20000))
        out.append(bytes(packet))
    return out


def udp4(src: str, dst: str, dport: int = 9, payload: bytes = b"x") -> bytes:
    return bytes(IP(src=src, dst=dst) / UDP(sport=1234, dport=dport) / payload)


def test_each_packet_goes_to_the_peer_that_owns_its_destination(star: Star) -> None:
    gw = star.gateway
    send_from_tun(gw, udp4("203.0.113.1", "198.51.100.10"))
    send_from_tun(gw, udp4("203.0.113.1", "198.51.100.70"))
    send_from_tun(gw, bytes(IPv6(src="2001:db8:ff::1", dst="2001:db8:3::9") / UDP(dport=9)))
    send_from_tun(gw, udp4("203.0.113.1", "192.0.2.99"))  # nobody's
    for name, node in star.peers.items():
        pump_until_quiet(node)
        got = written(node)
        assert len(got) == 1, name
        destination = got[0][16:20] if got[0][0] >> 4 == 4 else got[0][24:40]
        network = ipaddress.ip_network(PREFIXES[name])
        assert ipaddress.ip_address(bytes(destination)) in network
    assert gw.pump.counters.no_peer == 1


def test_a_port_range_share_is_chosen_by_port(star: Star) -> None:
    gw = star.gateway
    send_from_tun(gw, udp4("203.0.113.1", "203.0.113.7", dport=1500))
    send_from_tun(gw, udp4("203.0.113.1", "203.0.113.7", dport=2500))  # outside the share
    state = gw.pump.states()
    assert "shared" in state and gw.pump.counters.no_peer == 1


def test_inbound_sources_are_checked_per_peer(star: Star) -> None:
    gw = star.gateway
    p1 = star.peers["p1"]
    send_from_tun(p1, udp4("198.51.100.5", "203.0.113.1"))  # p1's own source
    send_from_tun(p1, udp4("198.51.100.70", "203.0.113.1"))  # p2's source
    send_from_tun(p1, udp4("198.51.100.200", "203.0.113.1"))  # nobody's
    send_from_tun(p1, udp4("198.51.100.5", "192.0.2.1"))  # not served here
    pump_until_quiet(gw)
    got = written(gw)
    assert [IP(p).src for p in got] == ["198.51.100.5"]
    counters = gw.pump.counters
    assert counters.foreign_source == 2 and counters.foreign_destination == 1
    row = gw.pump.peer_counters.read(star.table.slots["p1"])
    assert row["foreign_source"] == 2 and row["tun_writes"] == 1


def test_a_datagram_from_no_peer_is_counted_and_dropped(star: Star) -> None:
    gw = star.gateway
    stranger = udp.open_udp(("127.0.0.9", 0))
    try:
        stranger.sendto(wire.PLAIN_HEADER + udp4("198.51.100.5", "203.0.113.1"),
                        gw.sock.getsockname())
        pump_until_quiet(gw)
    finally:
        stranger.close()
    assert written(gw) == [] and gw.pump.counters.foreign == 1


def test_a_stranger_sink_sees_each_datagram_from_no_peer_whole() -> None:
    seen: list[tuple[tuple[str, int], bytes]] = []
    hooks = Hooks(stranger=lambda sender, datagram: seen.append((sender, datagram)))
    for star in _star(None, gateway_hooks=hooks):
        gw = star.gateway
        stranger = udp.open_udp(("127.0.0.9", 0))
        try:
            datagrams = [wire.PLAIN_HEADER + udp4("198.51.100.5", "203.0.113.1", payload=b"x" * n)
                         for n in (1, 300)] + [b""]
            for datagram in datagrams:
                stranger.sendto(datagram, gw.sock.getsockname())
            pump_until_quiet(gw)
            port = stranger.getsockname()[1]
        finally:
            stranger.close()
        assert written(gw) == []
        assert seen == [(("127.0.0.9", port), d) for d in datagrams]
        assert gw.pump.counters.foreign == 3 and gw.pump.counters.strangers == 3


def test_a_super_packet_from_a_peer_is_checked_once_and_arrives_whole(star: Star) -> None:
    gw = star.gateway
    p2 = star.peers["p2"]
    packet, start, offset = addressed(super_packet(4, 20 * 1300, flags="PA"), "198.51.100.66",
                                      "203.0.113.1")  # p2's source
    header = SUPER(vnet.F_NEEDS_CSUM, gso_type_for(4), start + 32, 1300, start, offset)
    send_from_tun(p2, bytes(packet), header)
    pump_until_quiet(gw)
    assert written(gw) == [bytes(packet)]
    assert gw.pump.counters.foreign_source == 0
    assert gw.pump.peer_counters.read(star.table.slots["p2"])["tun_writes"] >= 1


def addressed(made: tuple[bytearray, int, int], src: str, dst: str,
              ) -> tuple[bytearray, int, int]:
    """An IPv4 super-packet from super_packet() with other addresses (checksums fixed)."""
    packet, start, offset = made
    packet[12:16] = ipaddress.ip_address(src).packed
    packet[16:20] = ipaddress.ip_address(dst).packed
    packet[10:12] = b"\0\0"
    packet[10:12] = struct.pack("!H", _ip_checksum(packet[:20]))
    _fix_pseudo(packet, start, offset)
    return packet, start, offset


def _ip_checksum(header: bytes | bytearray) -> int:
    total = sum(struct.unpack(f"!{len(header) // 2}H", bytes(header)))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def _fix_pseudo(packet: bytearray, start: int, offset: int) -> None:
    """Recompute the partial (pseudo-header) sum after the addresses changed."""
    length = len(packet) - start
    words = struct.unpack("!4H", bytes(packet[12:20]))
    total = sum(words) + 6 + length
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    packet[start + offset:start + offset + 2] = struct.pack("!H", total)


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(host=st.integers(0, 255), source=st.integers(0, 255))
def test_property_exactly_the_owner_gets_it_and_foreign_sources_never_reach_tun(
    host: int, source: int,
) -> None:
    for made in _star(None):
        gw = made.gateway
        destination = f"198.51.100.{host}"
        send_from_tun(gw, udp4("203.0.113.1", destination))
        owners = [name for name, prefix in PREFIXES.items()
                  if ipaddress.ip_address(destination) in ipaddress.ip_network(prefix)]
        for name, node in made.peers.items():
            pump_until_quiet(node, 0.2 if name in owners else 0.02)
            assert len(written(node, 0.05)) == (1 if name in owners else 0)
        # p1 sends from an arbitrary source: it reaches TUN only if it is p1's.
        send_from_tun(made.peers["p1"], udp4(f"198.51.100.{source}", "203.0.113.1"))
        pump_until_quiet(gw, 0.2)
        arrived = written(gw, 0.05)
        mine = ipaddress.ip_address(f"198.51.100.{source}") in ipaddress.ip_network(PREFIXES["p1"])
        assert len(arrived) == (1 if mine else 0)


def test_table_change_keeps_unchanged_peers_state_and_takes_new_peers(star: Star) -> None:
    gw = star.gateway
    send_from_tun(gw, udp4("203.0.113.1", "198.51.100.10"))
    p1_state = gw.pump.states()["p1"]
    newcomer = _peer("p4", "127.0.0.6", 9, prefixes=(ipaddress.ip_network("198.51.100.128/26"),))
    table = star.table.with_peers([newcomer])
    gw.pump.set_table(table)
    assert gw.pump.states()["p1"] is p1_state
    assert gw.pump.counters.table_generation == table.generation
    send_from_tun(gw, udp4("203.0.113.1", "198.51.100.130"))
    assert "p4" in gw.pump.states() and gw.pump.counters.no_peer == 0
    # p1 moves: its state starts afresh, others keep theirs
    p2_state = gw.pump.states().get("p2")
    moved = _peer("p1", "127.0.0.2", 10, prefixes=(ipaddress.ip_network(PREFIXES["p1"]),))
    gw.pump.set_table(table.with_peers([moved]))
    assert "p1" not in gw.pump.states() and gw.pump.states().get("p2") is p2_state


def test_hooks_see_the_peer_resize_and_divert() -> None:
    seen: list[str] = []
    control: list[tuple[str, str, bytes]] = []

    def outbound(buf: bytearray, offset: int, partial: bool, peer: Peer) -> hooks.HookResult:
        seen.append(peer.name)
        if buf[offset] >> 4 == 6 and buf[offset + 6] == 17:
            # Insert an 8-byte destination-options header (PadN) after the IPv6 header.
            packet = bytes(buf[offset:offset + hooks.packet_length(buf, offset)])
            options = bytes([17, 0, 1, 4, 0, 0, 0, 0])
            grown = bytearray(packet[:40] + options + packet[40:])
            grown[6] = 60
            grown[4:6] = struct.pack("!H", len(grown) - 40)
            return grown
        if buf[offset] >> 4 == 4 and buf[offset + 9] == 1:
            return hooks.CONTROL  # ICMP goes to the control plane
        return True

    gateway_hooks = Hooks(outbound=outbound, control=lambda peer, direction, packet:
                          control.append((peer.name, direction, packet)), resizes=True)
    for made in _star(1400, gateway_hooks=gateway_hooks):
        gw = made.gateway
        send_from_tun(gw, bytes(IPv6(src="2001:db8:ff::1", dst="2001:db8:3::9") / UDP(dport=9)
                                / b"payload"))
        p3 = made.peers["p3"]
        pump_until_quiet(p3)
        (arrived,) = written(p3)
        assert arrived[6] == 60 and arrived[40] == 17 and len(arrived) == 40 + 8 + 8 + 7
        ping = bytes(IP(src="203.0.113.1", dst="198.51.100.9") / ICMP())
        send_from_tun(gw, ping)
        assert control == [("p1", hooks.OUTBOUND, ping)]
        assert seen == ["p3", "p1"]
        assert gw.pump.counters.resized == 1 and gw.pump.counters.control == 1


def test_inbound_hook_may_strip_what_the_sender_added() -> None:
    def strip(buf: bytearray, offset: int, partial: bool, peer: Peer) -> hooks.HookResult:
        if buf[offset] >> 4 == 6 and buf[offset + 6] == 60:
            packet = bytes(buf[offset:offset + hooks.packet_length(buf, offset)])
            shrunk = bytearray(packet[:40] + packet[48:])
            shrunk[6] = packet[40]
            shrunk[4:6] = struct.pack("!H", len(shrunk) - 40)
            return shrunk
        return True

    for made in _star(1400, gateway_hooks=Hooks(inbound=strip, resizes=True)):
        plain = bytes(IPv6(src="2001:db8:3::9", dst="2001:db8:ff::1") / UDP(dport=9) / b"abc")
        grown = bytearray(plain[:40] + bytes([17, 0, 1, 4, 0, 0, 0, 0]) + plain[40:])
        grown[6] = 60
        grown[4:6] = struct.pack("!H", len(grown) - 40)
        send_from_tun(made.peers["p3"], bytes(grown))
        pump_until_quiet(made.gateway)
        assert written(made.gateway) == [plain]


def test_with_keys_everything_crosses_and_nothing_unauthenticated_is_taken() -> None:
    for made in _star(1400, keys=True):
        gw, p1 = made.gateway, made.peers["p1"]
        send_from_tun(p1, udp4("198.51.100.5", "203.0.113.1", payload=b"sealed"))
        # capture the sealed datagram on its way by receiving it ourselves, then replay it
        assert select.select([gw.sock], [], [], 1)[0]
        datagram, sender = gw.sock.recvfrom(4096)
        assert len(datagram) == 4 + len(udp4("198.51.100.5", "203.0.113.1", payload=b"sealed")) \
            + auth.OVERHEAD
        p1.sock.send(datagram)
        p1.sock.send(datagram)  # the replay
        p1.sock.send(wire.PLAIN_HEADER + udp4("198.51.100.5", "203.0.113.1"))  # no seal
        pump_until_quiet(gw)
        assert len(written(gw)) == 1
        assert gw.pump.counters.auth_refused == 2
        # and back
        send_from_tun(gw, udp4("203.0.113.1", "198.51.100.5", payload=b"back"))
        pump_until_quiet(p1)
        assert written(p1) == [udp4("203.0.113.1", "198.51.100.5", payload=b"back")]
        del sender


def test_keyed_super_packets_cross_in_batch_framing() -> None:
    for made in _star(1400, keys=True):
        gw, p1 = made.gateway, made.peers["p1"]
        packet, start, offset = addressed(super_packet(4, 30 * 1300, flags="PA"),
                                          "203.0.113.1", "198.51.100.5")
        header = SUPER(vnet.F_NEEDS_CSUM, gso_type_for(4), start + 32, 1300, start, offset)
        send_from_tun(gw, bytes(packet), header)
        pump_until_quiet(p1)
        got = written(p1)
        assert got == [bytes(packet)]


def test_loss_reports_are_believed_only_about_streams_sent(star: Star) -> None:
    gw, p1 = star.gateway, star.peers["p1"]
    p1.sock.send(batch.REPORT.pack(batch.REPORT_BYTE, 0, 0, 0, 50))
    pump_until_quiet(gw)
    assert gw.pump.counters.reports_refused == 1 and gw.pump.counters.fallbacks == 0


def test_peer_counter_rows_are_reset_when_a_slot_is_reused() -> None:
    array = PeerCounterArray(slots=4, queues=2)
    base = array.base(1, 3)
    array.words[base] = 7
    assert array.read(3)["tun_reads"] == 7
    array.reset(1, 3)
    assert array.read(3)["tun_reads"] == 0
    assert array.base(0, 4) == -1  # beyond the array: not counted


def test_counters_add_keeps_the_newest_generation() -> None:
    a, b = Counters(table_generation=3, tun_reads=1), Counters(table_generation=5, tun_reads=2)
    a.add(b)
    assert a.table_generation == 5 and a.tun_reads == 3


def test_a_point_to_point_pump_needs_a_peer() -> None:
    sock = udp.open_udp(("127.0.0.1", 0))
    try:
        with pytest.raises(ValueError, match="connected socket"):
            QueuePump(-1, sock)
    finally:
        sock.close()


def test_timing_free_sanity_of_the_star_fixture() -> None:
    """The fixture closes what it made even when a test body fails."""
    generator = _star(None)
    made = next(generator)
    sockets = [made.gateway.sock, *(node.sock for node in made.peers.values())]
    generator.close()
    assert all(s.fileno() == -1 for s in sockets)


def test_a_keyed_full_size_packet_is_not_cut_by_the_batch_slot_size() -> None:
    """A sealed packet is 28 bytes longer than a chunk slot allows for: it must leave as one
    datagram all the same."""
    for made in _star(1400, keys=True):
        gw, p1 = made.gateway, made.peers["p1"]
        packet = udp4("203.0.113.1", "198.51.100.5", payload=bytes(1400 - 28))
        send_from_tun(gw, packet)
        pump_until_quiet(p1)
        assert written(p1) == [packet]


def test_ipv4_and_ipv6_peers_side_by_side_on_one_pump() -> None:
    four = udp.open_udp(("127.0.0.1", 0))
    six = udp.open_udp(("::1", 0))
    far4 = udp.open_udp(("127.0.0.2", 0))
    far6 = udp.open_udp(("::1", 0))
    kernel, queue = _fake_tun()
    try:
        table = PeerTable([
            _peer("v4", "127.0.0.2", far4.getsockname()[1],
                  prefixes=(ipaddress.ip_network("198.51.100.0/24"),)),
            _peer("v6", "::1", far6.getsockname()[1],
                  prefixes=(ipaddress.ip_network("2001:db8:6::/48"),)),
        ])
        node = Node(QueuePump(queue.fileno(), [four, six], table=table, chunk=1400), kernel, four)
        send_from_tun(node, udp4("203.0.113.1", "198.51.100.1"))
        send_from_tun(node, bytes(IPv6(src="2001:db8:ff::1", dst="2001:db8:6::1") / UDP()))
        assert select.select([far4], [], [], 1)[0] and select.select([far6], [], [], 1)[0]
        assert far4.recv(2000)[4:] == udp4("203.0.113.1", "198.51.100.1")
        assert far6.recv(2000)[4] >> 4 == 6
        # and inbound on the IPv6 socket, from the IPv6 peer
        far6.sendto(wire.PLAIN_HEADER + bytes(IPv6(src="2001:db8:6::1", dst="2001:db8:ff::1")
                                              / UDP()), six.getsockname())
        assert select.select([six], [], [], 1)[0]
        node.pump.pump_udp(six)
        assert len(written(node)) == 1
    finally:
        for s in (four, six, far4, far6, kernel, queue):
            s.close()


def test_a_packet_a_hook_grows_past_the_batch_slot_leaves_whole() -> None:
    """Batch framing sets the socket's own segment size to a chunk slot: a full-size packet
    that an outbound hook makes 8 bytes longer must still leave as one datagram."""
    def grow(buf: bytearray, offset: int, partial: bool, peer: Peer) -> hooks.HookResult:
        packet = bytes(buf[offset:offset + hooks.packet_length(buf, offset)])
        grown = bytearray(packet[:40] + bytes([17, 0, 1, 4, 0, 0, 0, 0]) + packet[40:])
        grown[6] = 60
        grown[4:6] = struct.pack("!H", len(grown) - 40)
        return grown

    for made in _star(1400, gateway_hooks=Hooks(outbound=grow, resizes=True)):
        gw, p3 = made.gateway, made.peers["p3"]
        packet = bytes(IPv6(src="2001:db8:ff::1", dst="2001:db8:3::9") / UDP(dport=9)
                       / bytes(1400 - 48))
        assert len(packet) == 1400
        send_from_tun(gw, packet)
        pump_until_quiet(p3)
        (arrived,) = written(p3)
        assert len(arrived) == 1408 and arrived[48:] == packet[40:]


@pytest.mark.parametrize("whole", [False, True])
def test_a_hook_that_resizes_some_packets_gets_them_whole_in_batch_framing(whole: bool) -> None:
    def copy(buf: bytearray, offset: int, partial: bool, peer: Peer) -> hooks.HookResult:
        return bytes(buf[offset:offset + hooks.packet_length(buf, offset)])  # a replacement

    gateway_hooks = Hooks(outbound=copy, whole=(lambda buf, offset, peer: True) if whole
                          else None)
    for made in _star(1400, gateway_hooks=gateway_hooks):
        gw = made.gateway
        packet, start, offset = addressed(super_packet(4, 20 * 1300, flags="PA"),
                                          "203.0.113.1", "198.51.100.9")  # p1's
        header = SUPER(vnet.F_NEEDS_CSUM, gso_type_for(4), start + 32, 1300, start, offset)
        send_from_tun(gw, bytes(packet), header)
        p1 = made.peers["p1"]
        pump_until_quiet(p1)
        arrived = written(p1)
        if whole:  # the replacement of the whole packet, sent one packet per datagram
            assert gw.pump.counters.resized == 1 and gw.pump.counters.hook_drops == 0
            assert sum(len(p) for p in arrived) >= 20 * 1300
        else:  # batch framing shows the hook the headers only: a replacement is refused
            assert gw.pump.counters.hook_drops == 1 and arrived == []
