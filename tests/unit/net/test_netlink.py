"""Pure pieces of ipshift.net.netlink: event parsing, nexthop JSON, route helpers."""

import json
import socket

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pyroute2.netlink.rtnl import RTM_DELLINK, RTM_NEWADDR, RTM_NEWLINK, RTM_NEWNEIGH, RTM_NEWROUTE
from pyroute2.netlink.rtnl.ifaddrmsg import ifaddrmsg
from pyroute2.netlink.rtnl.ifinfmsg import ifinfmsg
from pyroute2.netlink.rtnl.ndmsg import ndmsg
from pyroute2.netlink.rtnl.rtmsg import rtmsg

from ipshift.net.errors import NetError, ParseError
from ipshift.net.netlink import (
    IFA_F_DEPRECATED,
    IFA_F_NOPREFIXROUTE,
    IFA_F_PERMANENT,
    IFA_F_SECONDARY,
    IFA_F_TEMPORARY,
    IFF_LOWER_UP,
    IFF_UP,
    INFINITY_LIFE_TIME,
    NUD_FAILED,
    NUD_REACHABLE,
    RT_SCOPE_HOST,
    RT_SCOPE_LINK,
    RT_SCOPE_UNIVERSE,
    Address,
    Link,
    Neighbour,
    NextHop,
    NexthopObject,
    Route,
    default_scope,
    nexthop_argv,
    parse_events,
    parse_nexthops,
)


def _encode(msg, msg_type):
    msg["header"]["type"] = msg_type
    msg.encode()
    return bytes(msg.data)


def _link(index, name, flags=IFF_UP | IFF_LOWER_UP, msg_type=RTM_NEWLINK):
    m = ifinfmsg()
    m["index"] = index
    m["flags"] = flags
    m["attrs"] = [("IFLA_IFNAME", name), ("IFLA_MTU", 1400), ("IFLA_OPERSTATE", "UP")]
    return _encode(m, msg_type)


def _route(oif):
    m = rtmsg()
    m["family"] = socket.AF_INET
    m["dst_len"] = 24
    m["table"] = 100
    m["proto"] = 4
    m["type"] = 1
    m["attrs"] = [("RTA_DST", "192.0.2.0"), ("RTA_OIF", oif), ("RTA_GATEWAY", "198.51.100.1"),
                  ("RTA_TABLE", 100), ("RTA_PRIORITY", 7)]
    return _encode(m, RTM_NEWROUTE)


def _multipath_route():
    m = rtmsg()
    m["family"] = socket.AF_INET6
    m["dst_len"] = 64
    m["table"] = 254
    m["type"] = 1
    m["attrs"] = [
        ("RTA_DST", "2001:db8:5::"),
        ("RTA_MULTIPATH", [
            {"attrs": [("RTA_GATEWAY", "2001:db8::2")], "hops": 2, "oif": 3, "flags": 16},
            {"attrs": [("RTA_GATEWAY", "2001:db8::3")], "hops": 0, "oif": 3, "flags": 0},
        ]),
    ]
    return _encode(m, RTM_NEWROUTE)


def test_link_then_route_in_one_datagram_gets_the_name():
    names = {}
    events = parse_events(_link(7, "up0") + _route(7), names)
    assert [e.action for e in events] == ["new", "new"]
    link, route = events[0].obj, events[1].obj
    assert isinstance(link, Link) and link.name == "up0" and link.up and link.carrier
    assert link.mtu == 1400
    assert isinstance(route, Route)
    assert route.dst == "192.0.2.0/24" and route.gateway == "198.51.100.1"
    assert route.dev == "up0" and route.table == 100 and route.metric == 7
    assert names == {7: "up0"}


def test_link_delete_forgets_the_name():
    names = {7: "up0"}
    events = parse_events(_link(7, "up0", msg_type=RTM_DELLINK), names)
    assert events[0].action == "del"
    assert names == {}


def test_multipath_weight_is_hops_plus_one_and_flags_are_kept():
    (event,) = parse_events(_multipath_route(), {3: "eth0"})
    route = event.obj
    assert isinstance(route, Route)
    assert route.dst == "2001:db8:5::/64"
    assert [h.weight for h in route.nexthops] == [3, 1]
    assert route.nexthops[0].linkdown and not route.nexthops[1].linkdown
    assert all(h.dev == "eth0" for h in route.nexthops)
    # kernel state is not part of equality
    assert route.nexthops[0] == NextHop("2001:db8::2", "eth0", weight=3)


def test_address_and_neighbour_events():
    a = ifaddrmsg()
    a["family"] = socket.AF_INET
    a["prefixlen"] = 24
    a["index"] = 2
    a["attrs"] = [("IFA_ADDRESS", "192.0.2.1"), ("IFA_LOCAL", "192.0.2.1")]
    n = ndmsg()
    n["family"] = socket.AF_INET
    n["ifindex"] = 2
    n["state"] = NUD_FAILED
    n["attrs"] = [("NDA_DST", "192.0.2.254")]
    events = parse_events(_encode(a, RTM_NEWADDR) + _encode(n, RTM_NEWNEIGH), {2: "eth0"})
    addr, neigh = events[0].obj, events[1].obj
    assert isinstance(addr, Address) and addr.cidr == "192.0.2.1/24" and addr.dev == "eth0"
    assert addr.peer is None
    assert isinstance(neigh, Neighbour) and neigh.failed and not neigh.reachable
    assert neigh.state_names == ("FAILED",)


def test_unrelated_messages_are_skipped():
    assert parse_events(b"") == []
    # NLMSG_DONE
    done = (20).to_bytes(4, "little") + (3).to_bytes(2, "little") + bytes(14)
    assert parse_events(done) == []


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=300))
def test_parse_events_fuzz_raises_only_parse_error(data):
    try:
        events = parse_events(data, {})
    except ParseError:
        return
    assert isinstance(events, list)


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_parse_events_fuzz_mutated_real_messages(data):
    blob = bytearray(_link(7, "up0") + _route(7) + _multipath_route())
    for _ in range(data.draw(st.integers(1, 8))):
        pos = data.draw(st.integers(0, len(blob) - 1))
        blob[pos] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(blob)))
    try:
        parse_events(bytes(blob[:cut]), {})
    except ParseError:
        pass


# --- nexthop objects ---------------------------------------------------------------------

REAL_NEXTHOPS = (
    '[{"id":1,"gateway":"192.0.2.2","dev":"va","scope":"link","protocol":"unspec","flags":[]},'
    '{"id":2,"gateway":"198.51.100.2","dev":"vb","scope":"link","protocol":"unspec",'
    '"flags":["dead","linkdown"]},'
    '{"id":10,"group":[{"id":1,"weight":3},{"id":2}],"scope":"global","protocol":"unspec",'
    '"flags":[]},{"id":11,"blackhole":null,"protocol":"unspec","flags":[]}]'
)


def test_parse_real_nexthop_output():
    nhs = parse_nexthops(REAL_NEXTHOPS)
    assert [n.id for n in nhs] == [1, 2, 10, 11]
    assert nhs[0] == NexthopObject(1, gateway="192.0.2.2", dev="va")
    assert nhs[1].dead and nhs[1].linkdown
    assert nhs[2].group == ((1, 3), (2, 1))
    assert nhs[3].blackhole and not nhs[0].blackhole
    assert parse_nexthops("") == []


def test_nexthop_argv_round_trip_shapes():
    assert nexthop_argv(NexthopObject(1, gateway="192.0.2.2", dev="va")) == [
        "id", "1", "via", "192.0.2.2", "dev", "va"]
    assert nexthop_argv(NexthopObject(10, group=((1, 3), (2, 1)))) == ["id", "10", "group", "1,3/2"]
    assert nexthop_argv(NexthopObject(3, blackhole=True)) == ["id", "3", "blackhole"]
    with pytest.raises(ValueError):
        nexthop_argv(NexthopObject(0, gateway="192.0.2.2"))
    with pytest.raises(ValueError):
        nexthop_argv(NexthopObject(4, group=((1, 0),)))


@pytest.mark.parametrize("text", [
    "{", "[1]", '{"id": 1}', '[{"id": "x"}]', '[{"id": 1, "group": 5}]',
    '[{"id": 1, "group": [{"id": "a"}]}]', '[{"id": 1, "gateway": "not-an-ip"}]',
    '[{"id": 1, "flags": [1]}]', '[{"id": 1, "dev": 5}]', '[{"id": true}]',
])
def test_parse_nexthops_rejects_malformed(text):
    with pytest.raises(ParseError):
        parse_nexthops(text)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 300) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.sampled_from(["id", "gateway", "dev", "group", "weight", "flags",
                                       "blackhole", "family", "protocol", "fdb"]),
                      children, max_size=5),
    max_leaves=20,
)


@settings(max_examples=400, deadline=None)
@given(json_values)
def test_parse_nexthops_fuzz_json(value):
    try:
        out = parse_nexthops(json.dumps(value))
    except ParseError:
        return
    assert all(isinstance(n, NexthopObject) for n in out)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=100))
def test_parse_nexthops_fuzz_text(text):
    try:
        parse_nexthops(text)
    except ParseError:
        pass


def test_parse_error_is_a_net_error_with_one_line():
    with pytest.raises(NetError) as info:
        parse_nexthops("{")
    assert "\n" not in str(info.value)


# --- route helpers -----------------------------------------------------------------------

def test_default_scope_follows_ip_route():
    assert default_scope(Route("192.0.2.0/24", dev="eth0")) == RT_SCOPE_LINK
    assert default_scope(Route("0.0.0.0/0", gateway="192.0.2.1")) == RT_SCOPE_UNIVERSE
    assert default_scope(Route("192.0.2.1/32", type="local", dev="lo")) == RT_SCOPE_HOST
    assert default_scope(Route("192.0.2.0/24", type="blackhole")) == RT_SCOPE_UNIVERSE
    assert default_scope(Route("192.0.2.0/24", nhid=3)) == RT_SCOPE_UNIVERSE
    assert default_scope(Route("192.0.2.0/24", dev="eth0", scope=200)) == 200


def test_route_equality_ignores_kernel_state_and_family():
    assert Route("192.0.2.0/24", dev="a", flags=16, ifindex=4) == Route("192.0.2.0/24", dev="a")
    assert Route("2001:db8::/32").family == socket.AF_INET6
    assert Route("0.0.0.0/0", gateway="192.0.2.1").is_default
    text = Route("203.0.113.0/24", table=100, nexthops=(NextHop("192.0.2.1", "a", 2),)).describe()
    assert "table 100" in text and "weight 2" in text


def test_neighbour_state_names():
    n = Neighbour("192.0.2.1", 2, state=NUD_REACHABLE, ext_flags=1)
    assert n.reachable and n.managed and n.state_names == ("REACHABLE",)
    assert Neighbour("192.0.2.1", 2).state_names == ("NONE",)


def test_event_reader_skips_and_counts_malformed_datagrams():
    import struct

    from ipshift.net.netlink import NetlinkEvents

    events = NetlinkEvents.__new__(NetlinkEvents)  # a datagram socket stands in for netlink
    rx, tx = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    rx.setblocking(False)
    events._sock, events.names, events.malformed = rx, {}, 0
    try:
        tx.send(struct.pack("=IHHII", 16, RTM_NEWLINK, 0, 0, 0))  # header without a body
        tx.send(_link(4, "wan0"))
        got = events.read()
        assert [e.obj.name for e in got] == ["wan0"] and events.malformed == 1
        assert events.read() == []
    finally:
        rx.close()
        tx.close()


# --- address flags and lifetimes (IFA_FLAGS, IFA_CACHEINFO) ---------------------------------------


def _address(family, address, prefixlen, *, flags=None, ifa_flags=0, lifetimes=None):
    m = ifaddrmsg()
    m["family"] = family
    m["prefixlen"] = prefixlen
    m["index"] = 2
    m["flags"] = ifa_flags
    attrs = [("IFA_ADDRESS", address)]
    if family == socket.AF_INET:
        attrs.append(("IFA_LOCAL", address))
    if flags is not None:
        attrs.append(("IFA_FLAGS", flags))
    if lifetimes is not None:
        valid, preferred = lifetimes
        attrs.append(("IFA_CACHEINFO", {"ifa_preferred": preferred, "ifa_valid": valid,
                                        "cstamp": 100, "tstamp": 200}))
    m["attrs"] = attrs
    return _encode(m, RTM_NEWADDR)


def _one_address(data):
    (event,) = parse_events(data, {2: "eth0"})
    assert isinstance(event.obj, Address)
    return event.obj


def test_secondary_and_permanent_come_from_ifa_flags():
    primary = _one_address(_address(socket.AF_INET, "192.0.2.1", 24, flags=IFA_F_PERMANENT,
                                    lifetimes=(INFINITY_LIFE_TIME, INFINITY_LIFE_TIME)))
    assert primary.permanent and not primary.secondary and primary.forever
    assert primary.valid_lft is None and primary.preferred_lft is None
    second = _one_address(_address(socket.AF_INET, "192.0.2.10", 24,
                                   flags=IFA_F_SECONDARY | IFA_F_PERMANENT))
    assert second.secondary and second.permanent and not second.temporary


def test_the_same_bit_is_temporary_for_ipv6():
    temp = _one_address(_address(socket.AF_INET6, "2001:db8::5", 64, flags=IFA_F_TEMPORARY,
                                 lifetimes=(86400, 3600)))
    assert temp.temporary and not temp.secondary and not temp.permanent
    assert (temp.valid_lft, temp.preferred_lft) == (86400, 3600) and not temp.forever


def test_ifa_flags_attribute_wins_over_the_eight_bit_field():
    """Flags above 0x80 (noprefixroute, ...) exist only in IFA_FLAGS."""
    a = _one_address(_address(socket.AF_INET6, "2001:db8::6", 64,
                              flags=IFA_F_NOPREFIXROUTE | IFA_F_DEPRECATED, ifa_flags=0))
    assert a.noprefixroute and a.deprecated
    old_kernel = _one_address(_address(socket.AF_INET, "192.0.2.3", 24, ifa_flags=0x81))
    assert old_kernel.secondary and old_kernel.permanent and not old_kernel.noprefixroute


def test_a_zero_preferred_lifetime_is_not_forever():
    a = _one_address(_address(socket.AF_INET6, "2001:db8::7", 64, flags=IFA_F_DEPRECATED,
                              lifetimes=(30, 0)))
    assert (a.valid_lft, a.preferred_lft) == (30, 0)


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_parse_events_fuzz_mutated_address_messages(data):
    blob = bytearray(_address(socket.AF_INET, "192.0.2.1", 24, flags=0x281, lifetimes=(60, 30))
                     + _address(socket.AF_INET6, "2001:db8::5", 64, flags=1,
                                lifetimes=(INFINITY_LIFE_TIME, 5)))
    for _ in range(data.draw(st.integers(1, 8))):
        pos = data.draw(st.integers(0, len(blob) - 1))
        blob[pos] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(blob)))
    try:
        events = parse_events(bytes(blob[:cut]), {})
    except ParseError:
        return
    for event in events:
        if isinstance(event.obj, Address):
            assert event.obj.valid_lft is None or 0 <= event.obj.valid_lft < INFINITY_LIFE_TIME


def test_lifetimes_for_add_address_are_checked_before_the_kernel_sees_them():
    from ipshift.net.netlink.client import _lifetimes

    assert _lifetimes(None, None) == {}
    assert _lifetimes(300, None) == {"valid_lft": 300, "preferred_lft": 300}
    assert _lifetimes(None, 60) == {"valid_lft": INFINITY_LIFE_TIME, "preferred_lft": 60}
    assert _lifetimes(300, 0) == {"valid_lft": 300, "preferred_lft": 0}
    for valid, preferred in ((0, None), (10, 20), (-1, None), (None, INFINITY_LIFE_TIME)):
        with pytest.raises(ValueError) as info:
            _lifetimes(valid, preferred)
        assert "\n" not in str(info.value)
