"""ipshift.net.udp multicast helpers without a lab: packet-info parsing, argument checks, and
destinations reported for datagrams over loopback."""

import errno
import socket
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ipshift.net import udp
from ipshift.net.errors import ParseError
from ipshift.net.udp import MulticastError, ReceivedDatagram, destination_of


def _v4_info(ifindex, local, destination):
    data = struct.pack("=i4s4s", ifindex, socket.inet_aton(local), socket.inet_aton(destination))
    return (socket.IPPROTO_IP, udp.IP_PKTINFO, data)


def _v6_info(destination, ifindex):
    data = struct.pack("=16sI", socket.inet_pton(socket.AF_INET6, destination), ifindex)
    return (socket.IPPROTO_IPV6, socket.IPV6_PKTINFO, data)


def test_destination_of_reads_the_header_destination_and_interface():
    # ipi_spec_dst is the local address a reply would use; ipi_addr is where it was sent
    assert destination_of([_v4_info(3, "192.0.2.2", "239.1.2.3")]) == ("239.1.2.3", 3)
    assert destination_of([_v6_info("ff12::1234", 7)]) == ("ff12::1234", 7)
    other = (socket.SOL_SOCKET, socket.SCM_RIGHTS, b"\0" * 4)
    assert destination_of([other, _v6_info("2001:db8::1", 2)]) == ("2001:db8::1", 2)
    assert destination_of([]) is None and destination_of([other]) is None


@pytest.mark.parametrize("item", [
    (socket.IPPROTO_IP, udp.IP_PKTINFO, b"\0" * 11),
    (socket.IPPROTO_IPV6, socket.IPV6_PKTINFO, b"\0" * 19),
])
def test_short_packet_info_is_a_parse_error(item):
    with pytest.raises(ParseError):
        destination_of([item])


@settings(max_examples=400, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([socket.IPPROTO_IP, socket.IPPROTO_IPV6, 1]),
                          st.sampled_from([udp.IP_PKTINFO, socket.IPV6_PKTINFO, 1, 104]),
                          st.binary(max_size=40)), max_size=4))
def test_destination_of_fuzz(ancillary):
    try:
        found = destination_of(ancillary)
    except ParseError:
        return
    assert found is None or (isinstance(found[0], str) and isinstance(found[1], int))


@pytest.mark.parametrize(("groups", "kwargs", "match"), [
    (["192.0.2.1"], {}, "not a multicast address"),
    (["239.1.2.3", "ff12::1"], {}, "mix IPv4 and IPv6"),
    (["ff12::1"], {"family": socket.AF_INET}, "mix IPv4 and IPv6"),
    ([], {}, "give groups to join, or family="),
    (["not-an-address"], {}, "invalid multicast group"),
    (["239.1.2.3"], {"hops": 256}, "hops 256 out of range"),
])
def test_open_multicast_checks_its_arguments_first(groups, kwargs, match):
    with pytest.raises(ValueError, match=match):
        udp.open_multicast(5000, groups, "lo", **kwargs)


@pytest.fixture
def loopback_pair():
    """A receiver with IP_PKTINFO on 127.0.0.1 and a sender: loopback only."""
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        rx.setsockopt(socket.IPPROTO_IP, udp.IP_PKTINFO, 1)
        rx.bind(("127.0.0.1", 0))
        yield rx, tx
    finally:
        rx.close()
        tx.close()


def test_received_datagrams_tell_their_destination(loopback_pair):
    rx, tx = loopback_pair
    assert udp.recv_batch_with_destination(rx) == []
    for i in range(3):
        tx.sendto(b"x%d" % i, rx.getsockname())
    got = udp.recv_batch_with_destination(rx, max_datagrams=2)
    got += udp.recv_batch_with_destination(rx)
    assert [g.data for g in got] == [b"x0", b"x1", b"x2"]
    first = got[0]
    assert isinstance(first, ReceivedDatagram)
    assert first.destination == "127.0.0.1" and first.ifindex == socket.if_nametoindex("lo")
    assert first.source == ("127.0.0.1", tx.getsockname()[1])
    data, source, destination, ifindex = first  # a tuple too
    assert (data, source[0], destination, ifindex) == (
        b"x0", "127.0.0.1", "127.0.0.1", socket.if_nametoindex("lo"))


def test_a_datagram_longer_than_the_buffer_is_an_error_not_a_cut(loopback_pair):
    rx, tx = loopback_pair
    tx.sendto(b"y" * 100, rx.getsockname())
    with pytest.raises(MulticastError, match="longer than 10 bytes"):
        udp.recv_with_destination(rx, bufsize=10)


def test_without_packet_info_the_error_says_how_to_get_it():
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        rx.bind(("127.0.0.1", 0))
        tx.sendto(b"z", rx.getsockname())
        with pytest.raises(MulticastError, match="open the socket with open_multicast"):
            udp.recv_with_destination(rx)
    finally:
        rx.close()
        tx.close()


def test_interface_index_and_membership_errors():
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        assert udp.interface_index(sock, "lo") == socket.if_nametoindex("lo")
        assert udp.interface_index(sock, 42) == 42
        with pytest.raises(MulticastError) as info:
            udp.interface_index(sock, "ipshnope0")
        assert info.value.errno == errno.ENODEV and "no interface ipshnope0" in str(info.value)
        with pytest.raises(MulticastError, match="1 to 15 bytes"):
            udp.interface_index(sock, "x" * 16)
        with pytest.raises(ValueError, match="not of this socket's family"):
            udp.join_group(sock, "ff12::1", "lo")
        with pytest.raises(ValueError, match="not a multicast address"):
            udp.leave_group(sock, "192.0.2.1", "lo")
    finally:
        sock.close()
