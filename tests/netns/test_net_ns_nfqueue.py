"""NFQUEUE in a lab of three namespaces, host h - router r - peer p.

The router remaps a virtual address to the peer's real one with stateless nftables rules (as
sacip and resend do). The peer's ICMP errors about the host's datagrams quote the real address,
which the rules do not rewrite; queued to user space and fixed there, they reach the host's
connected UDP socket as ECONNREFUSED, which the unfixed error never does. Also: a burst of
packets accepted with one batch verdict, drops, and the queue rule gone after close and after
its owner was killed.
"""

import select
import signal
import socket
import sys
import textwrap
import time

import pytest

from ipshift.net.nfqueue import NfQueue, NfQueueError, QueueRule, QueueRuleError
from ipshift.net.packetsock import PacketSocket
from ipshift.net.sockbase import force_buffer
from ipshift.packet import (
    PacketError,
    parse_icmp,
    parse_packet,
    rewrite_quoted,
    verify_ipv4_header_checksum,
)

pytestmark = pytest.mark.netns

V4 = {"host": "192.0.2.1", "router": "192.0.2.254", "peer": "198.51.100.1",
      "virtual": "203.0.113.50", "family": socket.AF_INET, "version": 4}
V6 = {"host": "2001:db8:1::1", "router": "2001:db8:1::ff", "peer": "2001:db8:2::1",
      "virtual": "2001:db8:3::50", "family": socket.AF_INET6, "version": 6}

REMAP = """
table {fam} ipsh_remap {{
  chain pre {{
    type filter hook prerouting priority -300; policy accept;
    {ip} daddr {virtual} {ip} daddr set {peer}
    {ip} saddr {peer} {ip} daddr {host} {ip} saddr set {virtual}
  }}
}}
"""


@pytest.fixture
def trio(lab):
    h, r, p = lab.host("h"), lab.router("r"), lab.host("p")
    lab.link(h, r, "192.0.2.1/24", "192.0.2.254/24", v6=("2001:db8:1::1/64", "2001:db8:1::ff/64"))
    lab.link(r, p, "198.51.100.254/24", "198.51.100.1/24",
             v6=("2001:db8:2::ff/64", "2001:db8:2::1/64"))
    for node, v4, v6 in ((h, "192.0.2.254", "2001:db8:1::ff"),
                         (p, "198.51.100.254", "2001:db8:2::ff")):
        node.ip("route", "add", "default", "via", v4)
        node.ip("-6", "route", "add", "default", "via", v6)
    p.sysctl("net.ipv4.icmp_ratelimit", 0)
    p.sysctl("net.ipv6.icmp.ratelimit", 0)
    for fam, ip, net in (("ip", "ip", V4), ("ip6", "ip6", V6)):
        # keyed by both ends, like a flow's remap (the peer's neighbour discovery stays alone)
        r.nft(REMAP.format(fam=fam, ip=ip, virtual=net["virtual"], peer=net["peer"],
                           host=net["host"]))
    return h, r, p


def _serve(queue, handle, done, timeout=10.0):
    """Feed queued packets to `handle(queue, packet)` and flush, until `done()` (bounded)."""
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            raise AssertionError(f"queue not done within {timeout} s: {queue.counters}")
        select.select([queue], [], [], 0.2)
        for packet in queue.receive(256):
            handle(queue, packet)
        queue.flush()


def _wait_error(snoop, net, quoted_dst, timeout=10.0):
    """The next ICMP error the host receives about port 9 (bounded)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        select.select([snoop], [], [], 0.2)
        for seen in snoop.recv_batch():
            try:
                message = parse_icmp(seen.data)
            except PacketError:
                continue
            if message.quoted is not None and message.quoted.dport == 9:
                assert str(message.quoted.dst_ip) == quoted_dst
                return seen.data
    raise AssertionError(f"no ICMP error quoting {quoted_dst} reached the host")


@pytest.mark.parametrize("net", [V4, V6], ids=["v4", "v6"])
def test_icmp_error_quote_fixed_in_user_space(trio, net):
    h, r, p = trio
    family, ping = net["family"], ["ping", "-c", "1", "-W", "3", net["router"]]
    udp = h.call(lambda: socket.socket(family, socket.SOCK_DGRAM))
    try:
        udp.connect((net["virtual"], 9))
        with PacketSocket(h.iface_to(r), netns=h.ns, direction="in") as snoop:
            # without the fix: the error arrives quoting the peer's real address, and the
            # host's stack, finding no socket for it, ignores it
            udp.send(b"one")
            error = _wait_error(snoop, net, net["peer"])
            assert str(parse_icmp(error).quoted.src_ip) == net["host"]
            h.run(ping)  # a round trip later the error was handled long ago
            assert udp.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0

            icmp = (["-p", "icmp", "--icmp-type", "destination-unreachable"] if net["version"] == 4
                    else ["-p", "ipv6-icmp", "--icmpv6-type", "destination-unreachable"])
            with QueueRule("t-icmp", 11, chain="PREROUTING",
                           match=["-i", r.iface_to(p), *icmp], family=net["version"],
                           netns=r.ns), NfQueue(11, netns=r.ns) as queue:

                def fix(queue, packet):
                    buf = bytearray(packet.payload)
                    quote = parse_icmp(buf).quoted
                    if quote is not None and str(quote.dst_ip) == net["peer"]:
                        assert rewrite_quoted(buf, dst=net["virtual"])
                        queue.replace(packet.packet_id, buf)
                    else:
                        queue.accept(packet.packet_id)

                udp.send(b"two")
                _serve(queue, fix, lambda: queue.counters.replaced == 1)
                udp.settimeout(5)
                with pytest.raises(ConnectionRefusedError):
                    udp.recv(100)
                fixed = _wait_error(snoop, net, net["virtual"])
                message = parse_icmp(fixed)
                assert parse_packet(fixed).verify_transport_checksum()
                if net["version"] == 4:
                    assert verify_ipv4_header_checksum(message.quoted.header)
                assert str(message.quoted.src_ip) == net["host"]
                assert message.quoted.sport == udp.getsockname()[1]
                assert queue.counters.received == 1 and queue.counters.malformed == 0
                assert queue.counters.verdict_errors == 0
    finally:
        udp.close()
    assert "IPSHIFT-" not in r.run(
        ["iptables" if net["version"] == 4 else "ip6tables", "-t", "mangle", "-S"]).stdout


def _udp_server(p, port):
    sock = p.call(lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
    force_buffer(sock, "rcv", 8 << 20)  # a whole released burst must fit
    sock.bind(("198.51.100.1", port))
    sock.settimeout(5)
    return sock


def _drain(sock, expected):
    got = set()
    while len(got) < expected:
        got.add(int(sock.recv(100)))
    sock.settimeout(0.5)  # nothing more must come (bounded wait for a stray datagram)
    with pytest.raises(TimeoutError):
        got.add(int(sock.recv(100)))
    return got


def test_batch_verdict_and_drops(trio):
    h, r, p = trio
    server = _udp_server(p, 7000)
    client = h.call(lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
    try:
        with QueueRule("t-batch", 12, chain="FORWARD", match=["-p", "udp", "--dport", "7000"],
                       netns=r.ns), NfQueue(12, netns=r.ns) as queue:
            # a burst, all held in the queue, accepted with one batch verdict
            held = []
            for seq in range(300):
                client.sendto(b"%d" % seq, ("198.51.100.1", 7000))
            _serve(queue, lambda q, pkt: held.append(pkt), lambda: len(held) == 300)
            for packet in held:
                queue.accept(packet.packet_id)
            assert queue.flush() == 1
            assert queue.counters.batch_verdicts == 1 and queue.counters.accepted == 300
            assert _drain(server, 300) == set(range(300))

            # every odd datagram dropped, the even ones accepted
            server.settimeout(5)
            for seq in range(300, 400):
                client.sendto(b"%d" % seq, ("198.51.100.1", 7000))

            def odd_dropped(queue, packet):
                number = int(packet.payload[28:])
                if number % 2:
                    queue.drop(packet.packet_id)
                else:
                    queue.accept(packet.packet_id)

            _serve(queue, odd_dropped, lambda: queue.counters.received == 400)
            assert queue.waiting == 0
            assert queue.counters.dropped == 50 and queue.counters.accepted == 350
            assert _drain(server, 50) == set(range(300, 400, 2))
            assert queue.counters.verdict_errors == 0 and queue.counters.enobufs == 0
    finally:
        client.close()
        server.close()


OWNER_SCRIPT = textwrap.dedent("""
    import time
    from ipshift.net.nfqueue import NfQueue, QueueRule
    rule = QueueRule("t-killed", 13, chain="FORWARD", match=["-p", "udp", "--dport", "7100"])
    queue = NfQueue(13)
    print("ready", flush=True)
    time.sleep(120)
""")


def test_rule_gone_after_close_and_after_the_owner_was_killed(trio):
    h, r, p = trio
    with QueueRule("t-close", 14, chain=("PREROUTING", "OUTPUT"), match=["-p", "udp"],
                   netns=r.ns) as rule:
        listing = r.run(["iptables", "-t", "mangle", "-S"]).stdout
        assert "-A PREROUTING -j IPSHIFT-t-close" in listing
        assert "-A OUTPUT -j IPSHIFT-t-close" in listing
        assert "--queue-num 14 --queue-bypass" in listing
        assert QueueRule.chains(netns=r.ns) == ["t-close"]
        with pytest.raises(QueueRuleError, match="remove_stale"):
            QueueRule("t-close", 15, netns=r.ns)
    rule.close()  # idempotent
    assert "IPSHIFT-" not in r.run(["iptables", "-t", "mangle", "-S"]).stdout
    with pytest.raises(QueueRuleError, match="unknown option"):
        QueueRule("t-bad", 16, match=["--no-such-option"], netns=r.ns)
    assert QueueRule.chains(netns=r.ns) == []  # a failed install leaves nothing

    owner = r.spawn([sys.executable, "-c", OWNER_SCRIPT], name="queue-owner")
    owner.wait_ready("ready", 30, "the queue owner")
    with pytest.raises(NfQueueError, match="another socket"):
        NfQueue(13, netns=r.ns)
    owner.signal(signal.SIGKILL)
    owner.wait(10)
    assert QueueRule.chains(netns=r.ns) == ["t-killed"]
    # its socket died with it: the queue is free, and with no reader --queue-bypass lets
    # packets through the stale rule
    server = _udp_server(p, 7100)
    client = h.call(lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
    try:
        client.sendto(b"1", ("198.51.100.1", 7100))
        assert server.recv(100) == b"1"
    finally:
        client.close()
        server.close()
    NfQueue(13, netns=r.ns).close()
    assert QueueRule.remove_stale("t-killed", netns=r.ns)
    assert not QueueRule.remove_stale("t-killed", netns=r.ns)
    assert "IPSHIFT-" not in r.run(["iptables", "-t", "mangle", "-S"]).stdout
