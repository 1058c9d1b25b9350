"""Multicast UDP between namespaces on a bridge: groups joined on one interface, and each
datagram's destination (the group) and arrival interface reported."""

import select
import socket

import pytest

from ipshift.net import udp
from ipshift.net.udp import MulticastError

pytestmark = pytest.mark.netns

PORT = 30001  # any port: the namespaces are ours
GROUPS = {
    socket.AF_INET: ("239.192.0.1", "239.192.0.2"),
    socket.AF_INET6: ("ff12::5151:1", "ff12::5151:2"),  # link-local scope, transient
}


@pytest.fixture
def site(lab):
    """Hosts a, b and c on one bridge, with documentation-range unicast addresses."""
    sw = lab.switch("sw")
    hosts = {}
    for i, name in enumerate(("a", "b", "c"), start=1):
        node = lab.host(name)
        lab.link(node, sw, [f"192.0.2.{i}/24"], None, v6=(f"2001:db8:1::{i}/64", None))
        hosts[name] = node
    return hosts


@pytest.fixture
def sockets():
    opened = []

    def keep(sock):
        opened.append(sock)
        return sock

    yield keep
    for sock in opened:
        sock.close()


def receive(sock, timeout=5.0):
    """The next datagram on `sock`, waiting at most `timeout` seconds for it."""
    readable, _, _ = select.select([sock], [], [], timeout)
    if not readable:
        pytest.fail(f"no datagram within {timeout}s on {sock.getsockname()}")
    return udp.recv_with_destination(sock)


@pytest.mark.parametrize("family", [socket.AF_INET, socket.AF_INET6], ids=["ipv4", "ipv6"])
def test_datagrams_report_the_group_they_were_sent_to(site, sockets, family):
    a, b, c = site["a"], site["b"], site["c"]
    first, second = GROUPS[family]
    on_first = sockets(udp.open_multicast(PORT, [first], "to-sw", b.ns))
    # same port, other group: it must not hear the first group (IP_MULTICAST_ALL off)
    on_second = sockets(udp.open_multicast(PORT, [second], "to-sw", b.ns))
    also_first = sockets(udp.open_multicast(PORT, [first], "to-sw", c.ns))
    sender = sockets(udp.open_multicast(0, [], "to-sw", a.ns, family=family))
    ifindex_b = b.call(socket.if_nametoindex, "to-sw")

    sender.sendto(b"to the first group", (first, PORT))
    got = receive(on_first)
    assert got.data == b"to the first group"
    assert got.destination == first and got.ifindex == ifindex_b
    sources = {"192.0.2.1"} if family == socket.AF_INET else {
        "2001:db8:1::1", *(x["local"] for x in a.ip_json("-6", "addr", "show", "dev", "to-sw")
                           [0]["addr_info"])}
    assert got.source[0] in sources
    assert receive(also_first).destination == first  # every member hears it

    # Delivery to all the sockets of b happens in one pass per datagram: had `on_second` been
    # handed the first datagram, it would be queued before this one.
    sender.sendto(b"to the second group", (second, PORT))
    got = receive(on_second)
    assert (got.data, got.destination) == (b"to the second group", second)
    assert udp.recv_batch_with_destination(on_second) == []


@pytest.mark.parametrize("family", [socket.AF_INET, socket.AF_INET6], ids=["ipv4", "ipv6"])
def test_leave_and_join_again(site, sockets, family):
    a, b = site["a"], site["b"]
    first, second = GROUPS[family]
    member = sockets(udp.open_multicast(PORT, [first, second], "to-sw", b.ns))
    witness = sockets(udp.open_multicast(PORT, [first], "to-sw", b.ns))
    sender = sockets(udp.open_multicast(0, [], "to-sw", a.ns, family=family))
    udp.leave_group(member, first, "to-sw")
    with pytest.raises(MulticastError, match="not a member"):
        udp.leave_group(member, first, "to-sw")
    sender.sendto(b"left", (first, PORT))
    assert receive(witness).data == b"left"  # delivered in b; `member` had it or never will
    sender.sendto(b"still in", (second, PORT))
    assert receive(member).data == b"still in"  # so the first one never came
    udp.join_group(member, first, "to-sw")
    with pytest.raises(MulticastError, match=r"joined .* already"):
        udp.join_group(member, first, "to-sw")
    sender.sendto(b"back", (first, PORT))
    assert receive(member).destination == first


@pytest.mark.parametrize("family", [socket.AF_INET, socket.AF_INET6], ids=["ipv4", "ipv6"])
def test_own_multicast_comes_back_only_when_asked(site, sockets, family):
    a = site["a"]
    group = GROUPS[family][0]
    quiet = sockets(udp.open_multicast(PORT, [group], "to-sw", a.ns))
    level, loop = ((socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP) if family == socket.AF_INET
                   else (socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_LOOP))
    assert quiet.getsockopt(level, loop) == 0
    talker = sockets(udp.open_multicast(PORT + 1, [group], "to-sw", a.ns, loopback=True))
    assert talker.getsockopt(level, loop) == 1
    talker.sendto(b"hello me", (group, PORT + 1))
    got = receive(talker)
    assert (got.data, got.destination) == (b"hello me", group)


def test_errors_name_the_interface_and_the_group(site, sockets):
    b = site["b"]
    with pytest.raises(MulticastError) as info:
        udp.open_multicast(PORT, ["239.192.0.1"], "to-nowhere", b.ns)
    assert "no interface to-nowhere" in str(info.value) and "\n" not in str(info.value)
    sock = sockets(udp.open_multicast(PORT, ["239.192.0.1"], "to-sw", b.ns))
    with pytest.raises(MulticastError, match=r"joined 239\.192\.0\.1 on to-sw already"):
        udp.join_group(sock, "239.192.0.1", "to-sw")
    with pytest.raises(MulticastError, match="cannot open a UDP socket on port"):
        udp.open_multicast(PORT, ["239.192.0.1"], "to-sw", b.ns, reuse_address=False)
