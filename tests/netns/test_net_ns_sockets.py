"""Raw IP sending seen by AF_PACKET snooping, and sock_diag listing/destroying sockets."""

import asyncio
import os
import socket
import struct

import pytest
from scapy.layers.inet import IP, UDP
from scapy.layers.inet6 import IPv6

from ipshift.net.packetsock import (
    ETH_P_ARP,
    ETH_P_IP,
    ETH_P_IPV6,
    PACKET_HOST,
    PACKET_OUTGOING,
    PacketSocket,
)
from ipshift.net.rawsock import RawSocket, RawSocketError
from ipshift.net.sockdiag import SockDiag, SockDiagError

pytestmark = pytest.mark.netns


@pytest.fixture
def ab(lab):
    a, b = lab.host("a"), lab.host("b")
    lab.link(a, b, "192.0.2.1/24", "192.0.2.2/24", v6=("2001:db8:1::1/64", "2001:db8:1::2/64"))
    return a, b


def _collect(sock, predicate, count, timeout=5.0):
    """Packets matching `predicate` until `count` were seen (bounded by `timeout`)."""

    async def run():
        got = []
        while len(got) < count:
            got += [p for p in await sock.next_batch() if predicate(p)]
        return got

    async def bounded():
        return await asyncio.wait_for(run(), timeout)

    return asyncio.run(bounded())


def test_raw_v4_v6_send_seen_by_snoop_in_peer_and_own_namespace(ab):
    a, b = ab
    pkt4 = bytes(IP(src="192.0.2.1", dst="192.0.2.2", ttl=9) / UDP(sport=1111, dport=2222)
                 / b"ipshift-raw4")
    pkt6 = bytes(IPv6(src="2001:db8:1::1", dst="2001:db8:1::2", hlim=9)
                 / UDP(sport=1111, dport=2222) / b"ipshift-raw6")
    with PacketSocket("to-a", netns=b.ns, direction="in") as incoming, \
            PacketSocket("to-b", netns=a.ns, direction="out") as outgoing, \
            PacketSocket("to-a", netns=b.ns, direction="in", protocols=(ETH_P_IPV6,)) as only6:
        with RawSocket(socket.AF_INET, netns=a.ns, device="to-b") as raw4, \
                RawSocket(socket.AF_INET6, netns=a.ns, device="to-b") as raw6:
            assert raw4.send(pkt4) == len(pkt4)
            assert raw6.send(pkt6) == len(pkt6)

        def ours(p):
            return p.data.endswith((b"ipshift-raw4", b"ipshift-raw6"))

        got_in = _collect(incoming, ours, 2)
        assert {(p.protocol, p.pkttype) for p in got_in} == {(ETH_P_IP, PACKET_HOST),
                                                             (ETH_P_IPV6, PACKET_HOST)}
        by_proto = {p.protocol: p.data for p in got_in}
        assert by_proto[ETH_P_IP][0] >> 4 == 4 and by_proto[ETH_P_IP][8] == 9  # our TTL
        assert by_proto[ETH_P_IPV6] == pkt6  # IPv6: the header we built, unchanged
        got_out = _collect(outgoing, ours, 2)
        assert all(p.pkttype == PACKET_OUTGOING and p.outgoing for p in got_out)
        got6 = _collect(only6, ours, 1)
        assert all(p.protocol == ETH_P_IPV6 for p in got6)
        assert all(p.protocol == ETH_P_IPV6 for p in only6.recv_batch())


def test_snoop_keeps_arp_out_unless_asked(ab):
    a, _ = ab
    with PacketSocket("to-b", netns=a.ns) as ip_only, \
            PacketSocket("to-b", netns=a.ns, protocols=(ETH_P_ARP,)) as arp_only:
        a.ip("neigh", "flush", "dev", "to-b")
        a.run(["ping", "-c", "1", "-W", "2", "192.0.2.2"], check=False)
        arp = _collect(arp_only, lambda p: True, 1)
        assert all(p.protocol == ETH_P_ARP for p in arp)
        assert all(p.protocol in (ETH_P_IP, ETH_P_IPV6) for p in ip_only.recv_batch(1000))


def test_raw_socket_errors_are_one_line(ab):
    a, _ = ab
    with pytest.raises(RawSocketError, match="to-nowhere"):
        RawSocket(socket.AF_INET, netns=a.ns, device="to-nowhere")
    with RawSocket(socket.AF_INET, netns=a.ns) as raw:
        with pytest.raises(ValueError, match="IPv4"):
            raw.send(b"\x60" + bytes(39))
        pkt = bytes(IP(src="192.0.2.1", dst="203.0.113.1") / UDP())
        with pytest.raises(RawSocketError, match="unreachable") as info:
            raw.send(pkt)
        assert "\n" not in str(info.value)


def test_raw_protocol_socket_receives_its_protocol(ab):
    a, b = ab
    with RawSocket(socket.AF_INET, 253, netns=b.ns) as rx, \
            RawSocket(socket.AF_INET, 253, netns=a.ns) as tx:
        tx.send(b"experimental", "192.0.2.2")

        async def wait():
            loop = asyncio.get_running_loop()
            while (got := rx.recv()) is None:
                ready = loop.create_future()
                loop.add_reader(rx.fileno(), ready.set_result, None)
                try:
                    await asyncio.wait_for(ready, 5)
                finally:
                    loop.remove_reader(rx.fileno())
            return got

        data, src = asyncio.run(wait())
        assert src == "192.0.2.1" and data.endswith(b"experimental") and data[9] == 253


def test_sock_diag_lists_and_destroys(ab):
    a, b = ab

    def listen():
        s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        s.bind(("2001:db8:1::2", 8080))
        s.listen()
        u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        u.bind(("192.0.2.2", 5353))
        return s, u

    listener, udp = b.call(listen)
    client = a.call(lambda: socket.create_connection(("2001:db8:1::2", 8080), timeout=5))
    server, _ = listener.accept()
    server.settimeout(5)
    try:
        with SockDiag(b.ns) as diag:
            tcp = diag.sockets("tcp")
            (lst,) = [s for s in tcp if s.listening]
            assert (lst.src, lst.sport) == ("2001:db8:1::2", 8080)
            assert lst.inode == os.fstat(listener.fileno()).st_ino
            assert lst.uid == os.getuid()
            (est,) = diag.sockets("tcp", dport=client.getsockname()[1])
            assert est.state_name == "ESTABLISHED" and est.dst == "2001:db8:1::1"
            assert diag.sockets("tcp", src="192.0.2.2") == []
            (u,) = diag.sockets("udp", family=socket.AF_INET)
            assert (u.src, u.sport, u.state_name) == ("192.0.2.2", 5353, "UNCONN")
            assert u.inode == os.fstat(udp.fileno()).st_ino
            # the test runner's own namespace is not mixed in
            assert all(s.src in ("2001:db8:1::2", "192.0.2.2") for s in tcp)

            diag.destroy(est)
            with pytest.raises(OSError) as info:
                server.recv(10)
            assert info.value.errno == 103  # ECONNABORTED
            with pytest.raises(SockDiagError):
                diag.destroy(est)  # gone now
            assert diag.destroy_matching("udp", sport=5353) == 1
            with pytest.raises(ValueError, match="refusing"):
                diag.destroy_matching("tcp")
    finally:
        for s in (client, server, listener, udp):
            s.close()


def test_packet_capture_header_struct(ab):
    """The snooped IPv4 header is the one on the wire (kernel filled length and checksum)."""
    a, b = ab
    pkt = bytearray(bytes(IP(src="192.0.2.1", dst="192.0.2.2") / UDP(dport=9) / b"len"))
    struct.pack_into("!HH", pkt, 2, 0, 0)  # total length 0: the kernel fills it in
    struct.pack_into("!H", pkt, 10, 0)  # checksum 0: the kernel fills it in
    with PacketSocket("to-a", netns=b.ns, direction="in", protocols=(ETH_P_IP,)) as snoop:
        with RawSocket(netns=a.ns) as raw:
            raw.send(bytes(pkt))
        (got,) = _collect(snoop, lambda p: p.data.endswith(b"len"), 1)
    assert struct.unpack_from("!H", got.data, 2)[0] == len(pkt)
    assert IP(got.data).chksum == IP(bytes(IP(got.data))).chksum
