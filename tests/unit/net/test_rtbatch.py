"""The batched route encoder, decoded by pyroute2 as an independent oracle, and its ack parser
on malformed input."""

import errno
import socket
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pyroute2.netlink.rtnl.rtmsg import rtmsg

from ipshift.net.netlink import RT_SCOPE_LINK, RT_SCOPE_NOWHERE, RT_SCOPE_UNIVERSE, NextHop, Route
from ipshift.net.rtbatch import RTM_DELROUTE, RTM_NEWROUTE, acks, encode_route

INDEX = {"wan0": 3, "wan1": 4}


def decode(data: bytes) -> tuple[int, int, int, rtmsg]:
    length, kind, flags, seq, _pid = struct.unpack_from("=IHHII", data)
    assert length == len(data)
    msg = rtmsg(data)
    msg.decode()
    return kind, flags, seq, msg


def test_multipath_route_with_source_metric_and_table_above_255() -> None:
    route = Route("198.51.100.128/25", table=7300, proto=73, metric=5, src="198.51.100.2",
                  nexthops=(NextHop("198.51.100.1", "wan0", weight=2),
                            NextHop("203.0.113.1", "wan1", weight=3)))
    kind, flags, seq, msg = decode(encode_route("replace", route, INDEX.__getitem__, 42))
    assert kind == RTM_NEWROUTE and seq == 42 and flags & 0x100 and flags & 0x400
    assert msg["proto"] == 73 and msg["dst_len"] == 25 and msg["table"] == 0
    assert msg["scope"] == RT_SCOPE_UNIVERSE
    assert msg.get_attr("RTA_TABLE") == 7300 and msg.get_attr("RTA_PRIORITY") == 5
    assert msg.get_attr("RTA_DST") == "198.51.100.128"
    assert msg.get_attr("RTA_PREFSRC") == "198.51.100.2"
    hops = msg.get_attr("RTA_MULTIPATH")
    assert [(h["oif"], h["hops"], h.get_attr("RTA_GATEWAY")) for h in hops] == [
        (3, 1, "198.51.100.1"), (4, 2, "203.0.113.1")]


def test_single_next_hop_defaults_like_netlink() -> None:
    """Scope as `ip` would choose it; a device route is link scope; onlink and MTU encoded."""
    direct = Route("192.0.2.0/24", dev="wan0", table=100, proto=73, mtu=1400)
    _, flags, _, msg = decode(encode_route("add", direct, INDEX.__getitem__, 1))
    assert flags & 0x200  # add: fail if it exists
    assert msg["scope"] == RT_SCOPE_LINK and msg.get_attr("RTA_OIF") == 3
    assert msg.get_attr("RTA_METRICS").get_attr("RTAX_MTU") == 1400
    onlink = Route("0.0.0.0/0", gateway="203.0.113.1", dev="wan1", onlink=True, proto=73)
    _, _, _, msg = decode(encode_route("add", onlink, INDEX.__getitem__, 2))
    assert msg["flags"] & 4 and msg["dst_len"] == 0 and msg.get_attr("RTA_DST") is None
    assert msg.get_attr("RTA_GATEWAY") == "203.0.113.1" and msg["table"] == 254
    six = Route("2001:db8:5::/48", gateway="2001:db8:1::2", dev="wan0", type="unicast")
    _, _, _, msg = decode(encode_route("add", six, INDEX.__getitem__, 3))
    assert msg["family"] == socket.AF_INET6 and msg.get_attr("RTA_GATEWAY") == "2001:db8:1::2"
    hole = Route("203.0.113.0/24", type="blackhole", proto=73)
    _, _, _, msg = decode(encode_route("add", hole, INDEX.__getitem__, 4))
    assert msg["type"] == 6


def test_delete_is_bound_to_the_protocol_and_matches_any_scope() -> None:
    route = Route("198.51.100.0/26", table=20, proto=73)
    kind, flags, _, msg = decode(encode_route("del", route, INDEX.__getitem__, 43))
    assert kind == RTM_DELROUTE and not flags & 0x400
    assert msg["proto"] == 73 and msg["scope"] == RT_SCOPE_NOWHERE


def test_routes_that_cannot_be_encoded_are_clear_errors() -> None:
    with pytest.raises(ValueError, match="unknown route change"):
        encode_route("flush", Route("192.0.2.0/24"), INDEX.__getitem__, 1)
    with pytest.raises(ValueError, match="unknown route type"):
        encode_route("add", Route("192.0.2.0/24", type="wormhole"), INDEX.__getitem__, 1)
    with pytest.raises(ValueError, match="nexthop object"):
        encode_route("add", Route("192.0.2.0/24", nhid=5), INDEX.__getitem__, 1)
    with pytest.raises(ValueError, match="gateway"):
        encode_route("add", Route("192.0.2.0/24", gateway="2001:db8::1"), INDEX.__getitem__, 1)
    with pytest.raises(ValueError, match="weight"):
        encode_route("add", Route("192.0.2.0/24", nexthops=(NextHop("192.0.2.1", weight=0),)),
                     INDEX.__getitem__, 1)
    with pytest.raises(ValueError, match="destination"):
        encode_route("add", Route("192.0.2.1/24"), INDEX.__getitem__, 1)
    with pytest.raises(KeyError):
        encode_route("add", Route("192.0.2.0/24", dev="gone0"), INDEX.__getitem__, 1)


def ack(seq: int, err: int) -> bytes:
    return struct.pack("=IHHII", 36, 2, 0, seq, 0) + struct.pack("=i", -err) + b"\0" * 16


def test_acks_by_sequence() -> None:
    assert acks(ack(43, errno.EEXIST) + ack(44, 0)) == [(43, errno.EEXIST), (44, 0)]


def test_a_damaged_message_ends_the_acks_before_it_count() -> None:
    assert acks(ack(7, 0) + b"\xff\xff\x00\x00" + bytes(12)) == [(7, 0)]


@settings(max_examples=300)
@given(st.binary(max_size=200), st.binary(max_size=64))
def test_acks_never_crash_on_garbage(prefix: bytes, junk: bytes) -> None:
    result = acks(prefix + junk)
    assert all(isinstance(seq, int) and isinstance(err, int) for seq, err in result)
