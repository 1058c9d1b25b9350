"""Conntrack list and selective delete with real NATed UDP flows over two uplinks."""

import socket

import pytest

from ipshift.net.conntrack import Conntrack, ConntrackFilter

pytestmark = pytest.mark.netns

NAT = """
table ip ipsh_nat {
  chain post { type nat hook postrouting priority 100; oifname { "to-u1", "to-u2" } masquerade; }
}
table ip6 ipsh_nat {
  chain post { type nat hook postrouting priority 100; oifname { "to-u1", "to-u2" } masquerade; }
}
"""


@pytest.fixture
def natted(lab):
    """client c - router r - two uplinks u1, u2; r masquerades on both."""
    c, r, u1, u2 = lab.host("c"), lab.router("r"), lab.host("u1"), lab.host("u2")
    lab.link(c, r, "192.0.2.1/24", "192.0.2.254/24", v6=("2001:db8:1::1/64", "2001:db8:1::ff/64"))
    lab.link(r, u1, "198.51.100.254/24", "198.51.100.1/24",
             v6=("2001:db8:2::ff/64", "2001:db8:2::1/64"))
    lab.link(r, u2, "203.0.113.254/24", "203.0.113.1/24",
             v6=("2001:db8:3::ff/64", "2001:db8:3::1/64"))
    c.ip("route", "add", "default", "via", "192.0.2.254")
    c.ip("-6", "route", "add", "default", "via", "2001:db8:1::ff")
    r.nft(NAT)
    return c, r, u1, u2


def _udp_exchange(c, server_node, family, server_addr, client_port):
    """One request/response through the NAT; returns the source address the server saw."""

    def serve():
        s = socket.socket(family, socket.SOCK_DGRAM)
        s.bind((server_addr, 4000))
        s.settimeout(5)
        return s

    server = server_node.call(serve)

    def ask():
        s = socket.socket(family, socket.SOCK_DGRAM)
        s.bind(("", client_port))
        s.settimeout(5)
        s.sendto(b"ping", (server_addr, 4000))
        return s

    client = c.call(ask)
    try:
        _, peer = server.recvfrom(100)
        server.sendto(b"pong", peer)
        assert client.recvfrom(100)[0] == b"pong"
        return peer[0]
    finally:
        client.close()
        server.close()


def test_list_and_delete_only_flows_of_one_uplink(natted):
    c, r, u1, u2 = natted
    seen = [
        _udp_exchange(c, u1, socket.AF_INET, "198.51.100.1", 5001),
        _udp_exchange(c, u1, socket.AF_INET, "198.51.100.1", 5002),
        _udp_exchange(c, u2, socket.AF_INET, "203.0.113.1", 5003),
        _udp_exchange(c, u1, socket.AF_INET6, "2001:db8:2::1", 5004),
        _udp_exchange(c, u2, socket.AF_INET6, "2001:db8:3::1", 5005),
    ]
    assert seen == ["198.51.100.254", "198.51.100.254", "203.0.113.254",
                    "2001:db8:2::ff", "2001:db8:3::ff"]
    with Conntrack(r.ns) as ct:
        flows = [e for e in ct.entries(proto=socket.IPPROTO_UDP) if e.orig.dport == 4000]
        assert len(flows) == 5
        assert all(e.seen_reply and e.snat for e in flows)
        by_port = {e.orig.sport: e for e in flows}
        assert by_port[5001].reply.dst == "198.51.100.254"
        assert by_port[5004].reply.dst == "2001:db8:2::ff"
        assert ct.count() >= 5

        dead_v4 = ct.entries(reply_dst="198.51.100.254")
        assert {e.orig.sport for e in dead_v4} == {5001, 5002}
        dead_v6 = ct.entries(ConntrackFilter(reply_dst="2001:db8:2::ff"))
        assert {e.orig.sport for e in dead_v6} == {5004}

        # uplink u1 died: drop only its flows, v4 and v6
        assert ct.delete_matching(reply_dst="198.51.100.254") == 2
        assert ct.delete_matching(reply_dst="2001:db8:2::ff") == 1
        left = {e.orig.sport for e in ct.entries(proto=socket.IPPROTO_UDP)
                if e.orig.dport == 4000}
        assert left == {5003, 5005}

        # deleting an entry twice is not an error, just False
        one = ct.entries(orig_sport=5003)[0]
        assert ct.delete(one) is True
        assert ct.delete(one) is False
        with pytest.raises(ValueError, match="refusing"):
            ct.delete_matching()
    # the conntrack CLI agrees
    out = r.run(["conntrack", "-L", "-p", "udp"], check=False).stdout
    assert "sport=5001" not in out and "sport=5005" in out


def test_icmp_and_tcp_entries_parse_and_delete(natted):
    c, r, u1, _ = natted
    assert c.run(["ping", "-c", "1", "-W", "2", "198.51.100.1"], check=False).returncode == 0
    assert c.run(["ping", "-c", "1", "-W", "2", "2001:db8:2::1"], check=False).returncode == 0
    listener = u1.call(lambda: socket.create_server(("198.51.100.1", 8080)))
    client = c.call(lambda: socket.create_connection(("198.51.100.1", 8080), timeout=5))
    server, _ = listener.accept()
    try:
        with Conntrack(r.ns) as ct:
            icmp = ct.entries(proto=socket.IPPROTO_ICMP)
            icmp6 = ct.entries(proto=socket.IPPROTO_ICMPV6, orig_src="2001:db8:1::1")
            assert len(icmp) == 1 and icmp[0].orig.icmp_type == 8
            assert icmp[0].orig.icmp_id == icmp[0].reply.icmp_id
            assert len(icmp6) == 1 and icmp6[0].orig.icmp_type == 128
            (tcp,) = ct.entries(proto=socket.IPPROTO_TCP, orig_dport=8080)
            assert tcp.tcp_state == "ESTABLISHED" and tcp.reply.dst == "198.51.100.254"
            assert ct.delete_many([*icmp, *icmp6, tcp]) == 3
            assert ct.entries(proto=socket.IPPROTO_ICMP) == []
            assert ct.entries(proto=socket.IPPROTO_TCP, orig_dport=8080) == []
    finally:
        for s in (client, server, listener):
            s.close()
