"""Netlink adapter against a real kernel, inside lab namespaces."""

import asyncio
import errno
import socket

import pytest

from ipshift.net.netlink import (
    NUD_PERMANENT,
    RT_TABLE_MAIN,
    RTPROT_STATIC,
    Link,
    Netlink,
    NetlinkError,
    NetlinkEvents,
    NextHop,
    NexthopObject,
    Route,
    Rule,
)
from ipshift.net.rtbatch import RouteBatch

pytestmark = pytest.mark.netns


@pytest.fixture
def pair(lab):
    """Host a with two uplinks (to b1, to b2) and a Netlink handle in a."""
    a, b1, b2 = lab.host("a"), lab.host("b1"), lab.host("b2")
    lab.link(a, b1, "192.0.2.1/24", "192.0.2.2/24", v6=("2001:db8:1::1/64", "2001:db8:1::2/64"))
    lab.link(a, b2, "198.51.100.1/24", "198.51.100.2/24",
             v6=("2001:db8:2::1/64", "2001:db8:2::2/64"))
    with Netlink(a.ns) as nl:
        yield a, nl


def test_links_index_mtu_and_state(pair):
    _, nl = pair
    names = {link.name for link in nl.links()}
    assert names == {"lo", "to-b1", "to-b2"}
    index = nl.index("to-b1")
    assert nl.link(index).name == "to-b1"
    nl.set_link("to-b1", mtu=1400)
    assert nl.link("to-b1").mtu == 1400
    nl.set_link("to-b1", up=False)
    assert not nl.link("to-b1").up
    nl.set_link("to-b1", up=True)
    assert nl.link("to-b1").up
    with pytest.raises(NetlinkError) as info:
        nl.index("nope0")
    assert info.value.errno == errno.ENODEV and "nope0" in str(info.value)


def test_addresses_v4_v6_add_list_del(pair):
    a, nl = pair
    nl.add_address("to-b1", "192.0.2.10/24")
    nl.add_address("to-b1", "2001:db8:1::10/64", nodad=True)
    nl.add_address("lo", "203.0.113.7/32")
    cidrs = {x.cidr for x in nl.addresses("to-b1")}
    assert {"192.0.2.1/24", "192.0.2.10/24", "2001:db8:1::10/64"} <= cidrs
    v6 = nl.addresses("to-b1", family=socket.AF_INET6)
    assert all(x.family == socket.AF_INET6 for x in v6)
    assert any(x.address == "2001:db8:1::10" and not x.tentative for x in v6)
    assert "203.0.113.7/32" in {x.cidr for x in nl.addresses("lo")}
    with pytest.raises(NetlinkError) as info:
        nl.add_address("to-b1", "192.0.2.10/24")
    assert info.value.errno == errno.EEXIST
    nl.add_address("to-b1", "192.0.2.10/24", replace=True)  # idempotent form
    nl.del_address("to-b1", "192.0.2.10/24")
    nl.del_address("to-b1", "2001:db8:1::10/64")
    cidrs = {x.cidr for x in nl.addresses("to-b1")}
    assert "192.0.2.10/24" not in cidrs and "2001:db8:1::10/64" not in cidrs
    # the kernel agrees
    assert "192.0.2.10" not in a.ip("addr", "show", "dev", "to-b1")


def test_routes_in_tables_with_metric_src_mtu(pair):
    a, nl = pair
    routes = [
        Route("0.0.0.0/0", gateway="192.0.2.2", table=100, metric=10),
        Route("203.0.113.0/25", dev="to-b2", table=100, src="198.51.100.1", mtu=1400),
        Route("203.0.113.128/25", type="blackhole", table=100),
        Route("::/0", gateway="2001:db8:2::2", table=100, metric=20),
    ]
    for r in routes:
        nl.add_route(r)
    listed = nl.routes(100)
    for r in routes:
        assert r in listed or any(x.dst == r.dst and x.gateway == r.gateway for x in listed)
    v4 = {r.dst: r for r in nl.routes(100, family=socket.AF_INET)}
    assert v4["0.0.0.0/0"].metric == 10 and v4["0.0.0.0/0"].dev == "to-b1"
    assert v4["203.0.113.0/25"].src == "198.51.100.1" and v4["203.0.113.0/25"].mtu == 1400
    assert v4["203.0.113.128/25"].type == "blackhole"
    assert v4["0.0.0.0/0"].proto == RTPROT_STATIC
    assert "default via 192.0.2.2" in a.ip("route", "show", "table", "100")
    with pytest.raises(NetlinkError) as info:
        nl.add_route(routes[0])
    assert info.value.errno == errno.EEXIST and "table 100" in str(info.value)
    nl.replace_route(Route("0.0.0.0/0", gateway="198.51.100.2", table=100, metric=10))
    assert nl.routes(100, dst="0.0.0.0/0", family=socket.AF_INET)[0].gateway == "198.51.100.2"
    nl.del_route(Route("203.0.113.0/25", table=100))
    assert not nl.routes(100, dst="203.0.113.0/25")
    with pytest.raises(NetlinkError) as info:  # table 100 is not consulted without a rule
        nl.lookup("203.0.113.5")
    assert info.value.errno == errno.ENETUNREACH
    assert nl.lookup("198.51.100.77").dev == "to-b2"
    assert nl.delete_routes(100) == 3
    assert nl.routes(100) == []
    with pytest.raises(ValueError, match="host bits"):
        nl.add_route(Route("192.0.2.5/24", table=100))


def test_multipath_weights_v4_and_v6(pair):
    a, nl = pair
    r4 = Route("203.0.113.0/24", table=100, nexthops=(
        NextHop("192.0.2.2", "to-b1", weight=3), NextHop("198.51.100.2", "to-b2", weight=1)))
    r6 = Route("2001:db8:99::/48", table=100, nexthops=(
        NextHop("2001:db8:1::2", "to-b1", weight=2), NextHop("2001:db8:2::2", "to-b2")))
    nl.add_route(r4)
    nl.add_route(r6)
    text = a.ip("route", "show", "table", "100")
    assert "nexthop via 192.0.2.2 dev to-b1 weight 3" in text
    assert "nexthop via 198.51.100.2 dev to-b2 weight 1" in text
    (got4,) = nl.routes(100, family=socket.AF_INET)
    assert got4.nexthops == r4.nexthops
    (got6,) = nl.routes(100, family=socket.AF_INET6)
    assert [(h.gateway, h.dev, h.weight) for h in got6.nexthops] == [
        ("2001:db8:1::2", "to-b1", 2), ("2001:db8:2::2", "to-b2", 1)]
    # carrier loss on one uplink shows up as a linkdown next hop
    a.ip("link", "set", "to-b2", "down")
    (after,) = nl.routes(100, family=socket.AF_INET)
    down = {h.dev: h for h in after.nexthops}
    assert down["to-b2"].dead or down["to-b2"].linkdown
    a.ip("link", "set", "to-b2", "up")
    nl.del_route(Route("203.0.113.0/24", table=100))
    nl.del_route(Route("2001:db8:99::/48", table=100))
    assert nl.routes(100) == []


def test_delete_routes_of_a_big_table(pair):
    a, nl = pair
    for i in range(300):
        third = 100 + i // 256
        net = f"198.51.{third}.{i % 256}/32" if third == 100 else f"203.0.113.{i % 256}/32"
        nl.add_route(Route(net, type="blackhole", table=200))
    assert len(nl.routes(200)) == 300
    assert nl.delete_routes(200) == 300
    assert a.ip("route", "show", "table", "200").strip() == ""


def test_rules_add_list_del(pair):
    a, nl = pair
    rules = [
        Rule(1000, table=100, src="192.0.2.0/24"),
        Rule(1001, table=101, fwmark=0x10, fwmask=0xF0),
        Rule(1002, table=102, dst="2001:db8:99::/48"),
        Rule(1003, table=RT_TABLE_MAIN, suppress_prefixlen=0),
        Rule(1004, table=103, iif="to-b1", family=socket.AF_INET6),
    ]
    for rule in rules:
        nl.add_rule(rule)
    listed = nl.rules()
    for rule in rules:
        assert rule in listed, rule
    text = a.ip("rule", "show")
    assert "1001:\tfrom all fwmark 0x10/0xf0 lookup 101" in text
    assert "1003:\tfrom all lookup main suppress_prefixlength 0" in text
    for rule in rules:
        nl.del_rule(rule)
    assert not [r for r in nl.rules() if 1000 <= r.priority <= 1004]


def test_rule_delete_names_its_protocol(pair):
    """A delete that names a protocol leaves a rule of another protocol alone (a daemon only
    ever deletes what it owns)."""
    _, nl = pair
    theirs = Rule(1010, table=110, src="203.0.113.0/24", proto=4)
    nl.add_rule(theirs)
    with pytest.raises(NetlinkError):
        nl.del_rule(Rule(1010, table=110, src="203.0.113.0/24", proto=73))
    assert [r.proto for r in nl.rules() if r.priority == 1010] == [4]
    nl.del_rule(theirs)
    assert not [r for r in nl.rules() if r.priority == 1010]


def test_route_batch_adds_replaces_and_deletes_only_its_own(pair):
    a, nl = pair
    mine = [Route(f"203.0.113.{i}/32", gateway="192.0.2.2", dev="to-b1", table=120, proto=73)
            for i in range(0, 200, 2)]
    mine.append(Route("2001:db8:77::/48", table=120, proto=73, metric=7, nexthops=(
        NextHop("2001:db8:1::2", "to-b1", weight=2), NextHop("2001:db8:2::2", "to-b2"))))
    theirs = Route("203.0.113.1/32", gateway="198.51.100.2", dev="to-b2", table=120, proto=4)
    nl.add_route(theirs)
    with RouteBatch(a.ns, per_datagram=32) as batch:
        assert batch.apply([("add", r) for r in mine], nl.index) == [None] * len(mine)
        again = batch.apply([("add", mine[0]), ("replace", mine[1]),
                             ("add", Route("203.0.113.9/32", dev="gone0", table=120)),
                             ("add", Route("203.0.113.10/32", gateway="2001:db8::1",
                                           table=120))], nl.index)
        assert again[0] is not None and again[0][0] == errno.EEXIST
        assert again[1] is None
        assert again[2] is not None and again[2][0] == errno.ENODEV
        assert again[3] is not None and again[3][0] == errno.EINVAL
        listed = {r.dst: r for r in nl.routes(120)}
        assert len(listed) == len(mine) + 1
        assert listed["203.0.113.0/32"].gateway == "192.0.2.2"
        assert listed["203.0.113.0/32"].proto == 73
        six = listed["2001:db8:77::/48"]
        assert six.metric == 7 and [(h.gateway, h.weight) for h in six.nexthops] == [
            ("2001:db8:1::2", 2), ("2001:db8:2::2", 1)]
        # Deleting everything as protocol 73 leaves the protocol-4 route.
        victims = [("del", Route(r.dst, table=120, proto=73)) for r in [*mine, theirs]]
        results = batch.apply(victims, nl.index)
        assert results[:-1] == [None] * len(mine)
        assert results[-1] is not None and results[-1][0] == errno.ESRCH
    assert [r.dst for r in nl.routes(120)] == ["203.0.113.1/32"]


def test_neighbours_probe_managed_permanent(pair):
    a, nl = pair
    nl.set_neighbour("192.0.2.77", "to-b1", "02:00:00:00:00:77")
    nl.probe_neighbour("192.0.2.2", "to-b1")
    nl.add_managed_neighbour("198.51.100.2", "to-b2")
    entries = {n.dst: n for n in nl.neighbours(family=socket.AF_INET)}
    assert entries["192.0.2.77"].state == NUD_PERMANENT
    assert entries["192.0.2.77"].lladdr == "02:00:00:00:00:77"
    assert "192.0.2.2" in entries  # probing created the entry (resolving or resolved)
    assert entries["198.51.100.2"].managed
    assert "managed" in a.ip("neigh", "show", "198.51.100.2", "dev", "to-b2")
    nl.del_neighbour("192.0.2.77", "to-b1")
    assert nl.neighbour("192.0.2.77", "to-b1") is None


def test_nexthop_objects_and_routes_using_them(pair):
    _, nl = pair
    nl.add_nexthop(NexthopObject(1, gateway="192.0.2.2", dev="to-b1"))
    nl.add_nexthop(NexthopObject(2, gateway="198.51.100.2", dev="to-b2"))
    nl.add_nexthop(NexthopObject(10, group=((1, 3), (2, 1))))
    by_id = {n.id: n for n in nl.nexthops()}
    assert by_id[1] == NexthopObject(1, gateway="192.0.2.2", dev="to-b1")
    assert by_id[10].group == ((1, 3), (2, 1))
    nl.add_route(Route("203.0.113.0/24", nhid=10, table=100))
    (route,) = nl.routes(100)
    assert route.nhid == 10
    assert {h.weight for h in route.nexthops} == {3, 1}
    nl.del_route(Route("203.0.113.0/24", table=100))
    nl.del_nexthop(10)
    with pytest.raises(NetlinkError) as info:
        nl.add_nexthop(NexthopObject(1, gateway="192.0.2.2", dev="to-b1"))
    assert info.value.errno == errno.EEXIST
    nl.del_nexthop(1)
    nl.del_nexthop(2)
    assert nl.nexthops() == []


def test_link_down_event_is_seen(pair):
    a, nl = pair

    def link_down(e):
        return isinstance(e.obj, Link) and e.obj.name == "to-b2" and not e.obj.up

    def route_gone(e):
        # IPv6 announces the routes it drops with the link; IPv4 drops them silently
        return e.action == "del" and isinstance(e.obj, Route) and e.obj.dev == "to-b2"

    async def main():
        with NetlinkEvents(a.ns, kinds=("link", "address", "route")) as events:
            nl.set_link("to-b2", up=False)
            seen = []

            async def until_both():
                async for event in events:
                    seen.append(event)
                    if any(map(link_down, seen)) and any(map(route_gone, seen)):
                        return

            await asyncio.wait_for(until_both(), timeout=10)
            return seen

    seen = asyncio.run(main())
    assert any(map(link_down, seen))
    gone = [e.obj for e in seen if route_gone(e)]
    assert gone


def test_secondary_flag_and_lifetimes_read_back(pair):
    a, nl = pair
    nl.add_address("to-b1", "192.0.2.10/24")  # the subnet's second address: secondary
    nl.add_address("to-b2", "203.0.113.5/24", valid_lft=300, preferred_lft=100)
    nl.add_address("to-b2", "2001:db8:2::5/64", nodad=True, valid_lft=600, preferred_lft=0)
    nl.add_address("to-b2", "203.0.113.130/25", noprefixroute=True)
    by_cidr = {x.cidr: x for x in nl.addresses()}
    first, second = by_cidr["192.0.2.1/24"], by_cidr["192.0.2.10/24"]
    assert not first.secondary and second.secondary
    assert first.permanent and first.forever and first.valid_lft is None
    timed = by_cidr["203.0.113.5/24"]
    assert not timed.permanent and not timed.secondary
    assert timed.valid_lft is not None and 0 < timed.valid_lft <= 300
    assert timed.preferred_lft is not None and timed.preferred_lft <= 100
    six = by_cidr["2001:db8:2::5/64"]
    assert six.deprecated and six.preferred_lft == 0 and six.valid_lft is not None
    assert not six.temporary and not six.secondary
    quiet = by_cidr["203.0.113.130/25"]
    assert quiet.noprefixroute and quiet.permanent
    assert nl.routes(dst="203.0.113.128/25") == []  # no prefix route for it
    assert nl.routes(dst="203.0.113.0/24") != []
    # the kernel agrees
    assert "secondary" in a.ip("-4", "addr", "show", "dev", "to-b1")
    shown = a.ip_json("-6", "addr", "show", "dev", "to-b2")[0]["addr_info"]
    (six_shown,) = [x for x in shown if x["local"] == "2001:db8:2::5"]
    assert 0 < six_shown["valid_life_time"] <= 600 and six_shown["preferred_life_time"] == 0
    # replace refreshes the lifetimes of an address that is there, and forever again
    nl.add_address("to-b2", "203.0.113.5/24", replace=True, valid_lft=3000, preferred_lft=3000)
    longer = {x.cidr: x for x in nl.addresses("to-b2")}["203.0.113.5/24"]
    assert longer.valid_lft is not None and longer.valid_lft > 300
    nl.add_address("to-b2", "203.0.113.5/24", replace=True)
    refreshed = {x.cidr: x for x in nl.addresses("to-b2")}["203.0.113.5/24"]
    assert refreshed.forever and refreshed.permanent
    with pytest.raises(ValueError, match="longer than valid_lft"):
        nl.add_address("to-b2", "203.0.113.6/24", valid_lft=10, preferred_lft=20)


def test_sysctl_in_a_namespace(pair, lab):
    from ipshift.net import sysctl

    a, _ = pair
    b1 = lab.nodes["b1"]
    a.ip("link", "add", "x0.100", "type", "veth", "peer", "name", "x1.100")
    host_value = sysctl.read("net.ipv4.ip_forward")
    assert not sysctl.forwarding(a.ns)
    sysctl.write("net.ipv6.conf.all.forwarding", 1, netns=a.ns)
    assert sysctl.forwarding(a.ns) and not sysctl.forwarding(a.ns, socket.AF_INET)
    assert sysctl.read("net.ipv4.ip_forward") == host_value  # ours is untouched
    assert not sysctl.forwarding(b1.ns)
    # an interface name with a dot, in dotted, slashed and list form
    sysctl.write("net.ipv4.conf.x0.100.rp_filter", 2, netns=a.ns)
    assert sysctl.read("net/ipv4/conf/x0.100/rp_filter", a.ns) == "2"
    assert sysctl.read(["net", "ipv4", "conf", "x0.100", "rp_filter"], a.ns) == "2"
    assert sysctl.read("net.ipv4.conf.x1.100.rp_filter", a.ns) != "2"
    assert a.run(["cat", "/proc/sys/net/ipv4/conf/x0.100/rp_filter"]).stdout.strip() == "2"
    with pytest.raises(sysctl.SysctlError) as info:
        sysctl.read("net.ipv4.conf.to-b9.rp_filter", a.ns)
    assert info.value.errno == errno.ENOENT and f"in namespace {a.ns}" in str(info.value)
    with pytest.raises(sysctl.SysctlError, match="refused the value"):
        sysctl.write("net.ipv4.conf.x0.100.rp_filter", "many", netns=a.ns)
