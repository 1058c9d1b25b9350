"""Owned nft tables and stateless flow remaps with real traffic: a mover host m, a router r and
a peer p. Checksum offloads are off on every veth (`tx off rx off`), so every hop computes and
every receiver verifies checksums in software: a wrong L4 checksum is dropped and counted."""

import contextlib
import signal
import socket
import sys
from dataclasses import dataclass

import pytest

from ipshift.net.conntrack import Conntrack
from ipshift.net.nft import Nft
from ipshift.net.nfttable import OwnedTable, OwnedTableError, remove_stale_tables, table_name
from ipshift.net.remap import Direction, FlowRemaps, Remap

pytestmark = pytest.mark.netns

OWNER = "remaptest"
SO_NO_CHECK = 11  # IPv4 UDP: send without checksum
UDP_NO_CHECK6_TX, UDP_NO_CHECK6_RX = 101, 102
TIMEOUT = 10.0
CHUNK = 16 * 1024


@dataclass
class Addrs:
    family: int
    old: str  # the mover's address before the move (then kept on lo)
    new: str  # its address after the move
    peer: str
    dead_gateway: str  # on the peer's link; nothing answers there
    old_subnet: str
    lo_prefix: int


V4 = Addrs(socket.AF_INET, "192.0.2.10", "203.0.113.10", "198.51.100.20", "198.51.100.99",
           "192.0.2.0/24", 32)
V6 = Addrs(socket.AF_INET6, "2001:db8:1::10", "2001:db8:3::10", "2001:db8:2::20",
           "2001:db8:2::99", "2001:db8:1::/64", 128)


@pytest.fixture
def site(lab):
    """m has an old uplink (old0) and a new one (new0) to r; p sits behind r."""
    m, r, p = lab.host("m"), lab.router("r"), lab.host("p")
    lab.link(m, r, "192.0.2.10/24", "192.0.2.1/24", v6=("2001:db8:1::10/64", "2001:db8:1::1/64"),
             name_a="old0", name_b="to-m-old")
    lab.link(m, r, "203.0.113.10/24", "203.0.113.1/24",
             v6=("2001:db8:3::10/64", "2001:db8:3::1/64"), name_a="new0", name_b="to-m-new")
    lab.link(r, p, "198.51.100.1/24", "198.51.100.20/24",
             v6=("2001:db8:2::1/64", "2001:db8:2::20/64"))
    m.ip("route", "add", "default", "via", "192.0.2.1")
    m.ip("-6", "route", "add", "default", "via", "2001:db8:1::1")
    p.ip("route", "add", "default", "via", "198.51.100.1")
    p.ip("-6", "route", "add", "default", "via", "2001:db8:2::1")
    for node in (m, r, p):
        for link in node.links:
            node.run(["ethtool", "-K", link.end(node).ifname, "tx", "off", "rx", "off"])
    # any ct rule makes conntrack track the namespace's packets, so we can see what it saw
    for node in (m, p):
        node.nft("table inet ctprobe { chain c { type filter hook input priority 0;\n"
                 "ct state established counter\n}\n}")
    m.sysctl("net.ipv4.ping_group_range", "0 2147483647")
    return m, r, p


def move(m, a: Addrs) -> None:
    """The mover's old uplink goes away; its old address stays local on lo."""
    m.addr_add("lo", f"{a.old}/{a.lo_prefix}")
    m.ip("addr", "del", f"{a.old}/{24 if a.family == socket.AF_INET else 64}", "dev", "old0")
    m.link_set("old0", "down")
    ver = "-4" if a.family == socket.AF_INET else "-6"
    gateway = "203.0.113.1" if a.family == socket.AF_INET else "2001:db8:3::1"
    m.ip(ver, "route", "replace", "default", "via", gateway)


def checksum_errors(node) -> int:
    """InCsumErrors of TCP, UDP, ICMP (v4 and v6) in the node's namespace."""
    total = 0
    lines = node.run(["cat", "/proc/net/snmp"]).stdout.splitlines()
    for head, values in zip(lines[::2], lines[1::2], strict=True):
        row = dict(zip(head.split()[1:], values.split()[1:], strict=True))
        total += int(row.get("InCsumErrors", 0))
    for line in node.run(["cat", "/proc/net/snmp6"]).stdout.splitlines():
        name, _, value = line.partition(" ")
        if name.endswith("InCsumErrors"):
            total += int(value)
    return total


def _socket(family, kind, proto=0, bind=None, options=()):
    s = socket.socket(family, kind, proto)
    for level, name, value in options:
        s.setsockopt(level, name, value)
    if bind is not None:
        s.bind(bind)
    s.settimeout(TIMEOUT)
    return s


def _listener(family, addr):
    s = _socket(family, socket.SOCK_STREAM, bind=(addr, 0))
    s.listen(1)
    return s


def _connect(family, source, target):
    s = _socket(family, socket.SOCK_STREAM, bind=(source, 0))
    s.connect(target)
    return s


def recv_exact(sock, size: int) -> bytes:
    data = b""
    while len(data) < size:
        part = sock.recv(size - len(data))
        assert part, "connection closed"
        data += part
    return data


def tcp_exchange(a, b, total: int) -> None:
    """`total` bytes from a to b and back, a chunk at a time."""
    for i in range(total // CHUNK):
        chunk = bytes([i % 251]) * CHUNK
        a.sendall(chunk)
        assert recv_exact(b, CHUNK) == chunk
        b.sendall(chunk[::-1])
        assert recv_exact(a, CHUNK) == chunk[::-1]


def udp_ask(client, server, target, tries: int = 3) -> str:
    """client -> server -> client; the source address the server saw (a datagram lost while
    a neighbour is resolved is sent again, `tries` times)."""
    for _ in range(tries):
        client.sendto(b"ping", target)
        try:
            data, source = server.recvfrom(100)
        except TimeoutError:
            continue
        assert data == b"ping"
        server.sendto(b"pong", source)
        assert client.recvfrom(100)[0] == b"pong"
        return str(source[0])
    raise AssertionError(f"no datagram reached {target}")


@contextlib.contextmanager
def closing_all(*socks):
    try:
        yield socks
    finally:
        for s in socks:
            s.close()


@pytest.mark.parametrize("a", [V4, V6], ids=["ipv4", "ipv6"])
def test_tcp_and_udp_flows_survive_a_move(site, a):
    m, _r, p = site
    fam = a.family
    listener = p.call(_listener, fam, a.peer)
    port = listener.getsockname()[1]
    client = m.call(_connect, fam, a.old, (a.peer, port))
    server, _ = listener.accept()
    server.settimeout(TIMEOUT)
    m_udp = m.call(_socket, fam, socket.SOCK_DGRAM, 0, (a.old, 40000))
    p_udp = p.call(_socket, fam, socket.SOCK_DGRAM, 0, (a.peer, 5002))
    with closing_all(listener, client, server, m_udp, p_udp), \
            Nft(m.ns) as m_nft, Nft(p.ns) as p_nft:
        lport = client.getsockname()[1]
        tcp_exchange(client, server, 64 * 1024)
        assert udp_ask(m_udp, p_udp, (a.peer, 5002)) == a.old
        errors_before = checksum_errors(m) + checksum_errors(p)

        mover = FlowRemaps(OwnedTable(m_nft, "inet", OWNER, "mover"))
        peer = FlowRemaps(OwnedTable(p_nft, "inet", OWNER, "peer"))
        mover.install()
        peer.install()
        at_mover = [Remap("tcp", a.old, lport, a.peer, port, new_local=a.new),
                    Remap("udp", a.old, 40000, a.peer, 5002, new_local=a.new)]
        at_peer = [Remap("tcp", a.peer, port, a.old, lport, new_peer=a.new),
                   Remap("udp", a.peer, 5002, a.old, 40000, new_peer=a.new)]

        move(m, a)
        # the peer's route to the old network now leads nowhere: its packets reach the mover
        # only because the destination is rewritten before routing (output hook)
        p.route_add(a.old_subnet, "via", a.dead_gateway)
        # the order that keeps the flow: mover inbound, the peer both ways, mover outbound
        assert mover.add(at_mover, Direction.INBOUND) == 2
        assert peer.add(at_peer) == 2
        assert mover.add(at_mover, Direction.OUTBOUND) == 2
        assert mover.add(at_mover) == 0  # installed already

        tcp_exchange(client, server, 192 * 1024)
        assert udp_ask(m_udp, p_udp, (a.peer, 5002)) == a.old  # the peer's socket sees old

        v = 4 if fam == socket.AF_INET else 6
        m_counts, p_counts = mover.packet_counts(), peer.packet_counts()
        assert m_counts[f"out{v}_saddr"] > 0 and m_counts[f"in{v}_daddr"] > 0
        assert p_counts[f"out{v}_daddr"] > 0 and p_counts[f"in{v}_saddr"] > 0
        assert checksum_errors(m) + checksum_errors(p) == errors_before
        # conntrack on both ends saw the socket-side tuple only
        for node in (m, p):
            with Conntrack(node.ns) as ct:
                flows = ct.entries(proto=socket.IPPROTO_TCP, orig_src=a.old, orig_sport=lport)
                assert len(flows) == 1, flows
                assert not [e for e in ct.entries()
                            if a.new in (e.orig.src, e.orig.dst, e.reply.src, e.reply.dst)]
        assert mover.read_back() == {r: Direction.BOTH for r in at_mover}
        assert peer.read_back() == {r: Direction.BOTH for r in at_peer}
        assert mover.status()["remaps"] == 2 and mover.status()["elements"] == 4

        # removing remaps restores plain behaviour: without the peer's, its socket sees the
        # wire address; without the mover's too, the mover's packets leave with the old one
        assert peer.remove(at_peer) == 2
        m_udp.sendto(b"ping", (a.peer, 5002))
        assert p_udp.recvfrom(100)[1][0] == a.new
        assert mover.remove(at_mover) == 2
        m_udp.sendto(b"ping", (a.peer, 5002))
        assert p_udp.recvfrom(100)[1][0] == a.old
        assert mover.read_back() == {} and peer.read_back() == {}
        assert mover.status()["remaps"] == 0 and mover.status()["elements"] == 0

        assert mover.delete() and peer.delete()
        assert m_nft.tables() == [("inet", "ctprobe")]
        assert p_nft.tables() == [("inet", "ctprobe")]


def test_the_mover_outbound_first_resets_the_connection(site):
    """Why the order matters: a segment from the new address that reaches the peer before
    the peer maps it finds no socket there, and the peer's answer is a reset."""
    m, _r, p = site
    a = V4
    listener = p.call(_listener, a.family, a.peer)
    port = listener.getsockname()[1]
    client = m.call(_connect, a.family, a.old, (a.peer, port))
    server, _ = listener.accept()
    with closing_all(listener, client, server), Nft(m.ns) as m_nft:
        lport = client.getsockname()[1]
        tcp_exchange(client, server, CHUNK)
        mover = FlowRemaps(OwnedTable(m_nft, "inet", OWNER, "mover"))
        mover.install()
        move(m, a)
        mover.add([Remap("tcp", a.old, lport, a.peer, port, new_local=a.new)])
        client.sendall(b"x")
        with pytest.raises(ConnectionResetError):
            client.recv(1)
        mover.delete()


@pytest.mark.parametrize("a", [V4, V6], ids=["ipv4", "ipv6"])
def test_one_ended_port_remap_keeps_zero_udp_checksums_and_maps_icmp_echo(site, a):
    """Like resend: only the mover remaps, address and port (or echo identifier)."""
    m, _r, p = site
    fam = a.family
    v4 = fam == socket.AF_INET
    no_check_tx = [(socket.SOL_SOCKET, SO_NO_CHECK, 1)] if v4 else \
        [(socket.IPPROTO_UDP, UDP_NO_CHECK6_TX, 1)]
    no_check_rx = [] if v4 else [(socket.IPPROTO_UDP, UDP_NO_CHECK6_RX, 1)]
    icmp_proto = socket.IPPROTO_ICMP if v4 else socket.IPPROTO_ICMPV6
    m_plain = m.call(_socket, fam, socket.SOCK_DGRAM, 0, (a.old, 40000))
    m_zero = m.call(_socket, fam, socket.SOCK_DGRAM, 0, (a.old, 40010), no_check_tx)
    p_udp = p.call(_socket, fam, socket.SOCK_DGRAM, 0, (a.peer, 5002), no_check_rx)
    m_ping = m.call(_socket, fam, socket.SOCK_DGRAM, icmp_proto, (a.old, 7))
    with closing_all(m_plain, m_zero, p_udp, m_ping), Nft(m.ns) as m_nft:
        remaps = FlowRemaps(OwnedTable(m_nft, "inet", OWNER, "ports"))
        remaps.install()
        wanted = [
            Remap("udp", a.old, 40000, a.peer, 5002, new_local=a.new, new_local_port=40001),
            Remap("udp", a.old, 40010, a.peer, 5002, new_local=a.new, new_local_port=40011),
            Remap("icmp", a.old, 7, a.peer, new_local=a.new, new_local_port=9),
        ]
        errors_before = checksum_errors(m) + checksum_errors(p)
        assert remaps.add(wanted) == 3

        for sock, wire_port in ((m_plain, 40001), (m_zero, 40011)):
            sock.sendto(b"ping", (a.peer, 5002))
            data, source = p_udp.recvfrom(100)
            assert (data, source[:2]) == (b"ping", (a.new, wire_port))
            p_udp.sendto(b"pong", source)
            data, source = sock.recvfrom(100)
            assert (data, source[:2]) == (b"pong", (a.peer, 5002))

        request = bytes([8 if v4 else 128, 0, 0, 0, 0, 0, 0, 1]) + b"remapped echo"
        m_ping.sendto(request, (a.peer, 0))
        reply, source = m_ping.recvfrom(200)
        assert reply[0] == (0 if v4 else 129) and reply[8:] == b"remapped echo"
        assert source[0] == a.peer

        v = 4 if v4 else 6
        counts = remaps.packet_counts()
        for name in (f"out{v}_sport", f"out{v}_saddr", f"in{v}_daddr", f"in{v}_dport",
                     f"out{v}_icmp_id", f"out{v}_icmp_saddr", f"in{v}_icmp_daddr",
                     f"in{v}_icmp_id"):
            assert counts.get(name, 0) >= 1, (name, counts)
        assert checksum_errors(m) + checksum_errors(p) == errors_before
        assert remaps.status()["by_proto"] == {"tcp": 0, "udp": 2, "icmp": 1}

        # without its remap the echo goes out as the socket sent it (m has not moved here,
        # so the old address still works)
        assert remaps.remove(wanted[2:]) == 1
        m_ping.sendto(request, (a.peer, 0))
        reply, source = m_ping.recvfrom(200)
        assert reply[8:] == b"remapped echo" and source[0] == a.peer
        assert remaps.packet_counts() == counts
        remaps.delete()
        assert m_nft.tables() == [("inet", "ctprobe")]


@pytest.mark.parametrize("a", [V4, V6], ids=["ipv4", "ipv6"])
def test_router_remaps_forwarded_flows(site, a):
    """r remaps a forwarded UDP flow both ways: m talks to a virtual peer address that r
    maps to p (destination, forward hook) and r hides m behind another source (postrouting)."""
    m, r, p = site
    fam = a.family
    virtual_peer = a.dead_gateway
    hidden = "203.0.113.77" if fam == socket.AF_INET else "2001:db8:3::77"
    m_udp = m.call(_socket, fam, socket.SOCK_DGRAM, 0, (a.old, 40000))
    p_udp = p.call(_socket, fam, socket.SOCK_DGRAM, 0, (a.peer, 5002))
    with closing_all(m_udp, p_udp), Nft(r.ns) as r_nft:
        remaps = FlowRemaps(OwnedTable(r_nft, "inet", OWNER, "router"))
        remaps.install()
        remaps.add([Remap("udp", a.old, 40000, virtual_peer, 5000, new_local=hidden,
                          new_peer=a.peer, new_peer_port=5002)])
        m_udp.sendto(b"ping", (virtual_peer, 5000))
        data, source = p_udp.recvfrom(100)
        assert (data, source[:2]) == (b"ping", (hidden, 40000))
        p_udp.sendto(b"pong", source)
        data, source = m_udp.recvfrom(100)
        assert (data, source[:2]) == (b"pong", (virtual_peer, 5000))
        v = 4 if fam == socket.AF_INET else 6
        counts = remaps.packet_counts()
        assert {f"out{v}_daddr", f"out{v}_dport", f"out{v}_saddr", f"in{v}_saddr",
                f"in{v}_sport", f"in{v}_daddr"} <= set(counts)
        remaps.delete()


HOLDER = """
import sys, time
from ipshift.net.nft import Nft
from ipshift.net.nfttable import OwnedTable
OwnedTable(Nft(), "inet", sys.argv[1], sys.argv[2]).create("chain c { }")
print("ready", flush=True)
time.sleep(120)
"""


def test_owned_table_replaces_refuses_and_recovers(lab):
    n = lab.host("n")
    with Nft(n.ns) as nft:
        table = OwnedTable(nft, "inet", OWNER, "main")
        table.create("chain first { }")
        OwnedTable(nft, "inet", OWNER, "main").create("chain second { }")  # replaces
        assert nft.tables() == [("inet", table_name(OWNER, "main"))]
        chains = [x["chain"]["name"] for x in nft.list_table("inet", table.name)["nftables"]
                  if "chain" in x]
        assert chains == ["second"]
        assert table.kernel_mark() == table.mark

        # a table of another running process is refused; once it is killed, it is stale
        holder = n.spawn([sys.executable, "-c", HOLDER, OWNER, "held"])
        holder.wait_ready("ready", 20, "the table holder")
        held = OwnedTable(nft, "inet", OWNER, "held")
        with pytest.raises(OwnedTableError, match=f"running process {holder.pid}"):
            held.create("chain mine { }")
        assert remove_stale_tables(nft, OWNER) == []
        holder.signal(signal.SIGKILL)
        holder.wait(10)
        assert held.exists()
        assert remove_stale_tables(nft, OWNER) == [f"inet {held.name}"]
        assert not held.exists()

        # a table without an ipshift mark is left alone; is_live can judge by instance
        nft.run(f"add table ip {table_name(OWNER, 'unmarked')}")
        OwnedTable(nft, "ip6", OWNER, "gone").create()
        removed = remove_stale_tables(
            nft, OWNER, is_live=lambda found: found.name == table_name(OWNER, "main"))
        assert removed == [f"ip6 {table_name(OWNER, 'gone')}"]
        assert sorted(nft.tables()) == [("inet", table.name),
                                        ("ip", table_name(OWNER, "unmarked"))]
        nft.delete_table("ip", table_name(OWNER, "unmarked"))

        # a flow that moves again: same key, new value, one transaction
        remaps = FlowRemaps(table)
        remaps.install()
        first = Remap("tcp", "192.0.2.1", 1000, "198.51.100.1", 80, new_local="203.0.113.1")
        again = Remap("tcp", "192.0.2.1", 1000, "198.51.100.1", 80, new_local="203.0.113.2")
        remaps.add([first])
        assert remaps.update(add=[again], remove=[first]) == (1, 1)
        assert remaps.read_back() == {again: Direction.BOTH}
        # remaps of a replaced table are gone with it
        FlowRemaps(OwnedTable(nft, "inet", OWNER, "main")).install()
        assert remaps.read_back() == {}
        assert table.delete() is True
        assert table.delete() is False
        assert nft.tables() == []
