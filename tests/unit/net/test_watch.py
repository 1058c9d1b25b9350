"""KernelView (the watcher's view and diff, no kernel) and KernelWatcher around fake I/O."""

import dataclasses
import socket

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ipshift.net.netlink import (
    ADDED,
    CHANGED,
    IFA_F_SECONDARY,
    IFF_LOWER_UP,
    IFF_UP,
    NUD_REACHABLE,
    NUD_STALE,
    REMOVED,
    RT_TABLE_LOCAL,
    Address,
    Change,
    EventsOverrunError,
    KernelView,
    KernelWatcher,
    Link,
    Neighbour,
    NetlinkEvent,
    NextHop,
    Route,
)


def link(index, name, up=True, carrier=True):
    flags = (IFF_UP if up else 0) | (IFF_LOWER_UP if carrier else 0)
    return Link(index, name, up=up, carrier=carrier, flags=flags)


def addr(cidr, index=2, dev="eth0", **kw):
    address, plen = cidr.split("/")
    return Address(address, int(plen), index, dev, **kw)


def new(obj):
    return NetlinkEvent("new", obj)


def gone(obj):
    return NetlinkEvent("del", obj)


def summary(changes):
    return [(c.action, c.kind, c.dev) for c in changes]


LINKS = [link(1, "lo"), link(2, "eth0"), link(3, "eth1")]
ROUTE = Route("0.0.0.0/0", gateway="192.0.2.254", dev="eth0", ifindex=2)
ROUTE6 = Route("2001:db8:9::/48", gateway="2001:db8:1::1", dev="eth1", metric=1024, ifindex=3)


@pytest.fixture
def view():
    v = KernelView()
    first = v.load(LINKS, [addr("192.0.2.1/24")], [ROUTE, ROUTE6],
                   [Neighbour("192.0.2.254", 2, "eth0", state=NUD_REACHABLE)])
    assert {c.action for c in first} == {ADDED} and len(first) == 3 + 1 + 2 + 1
    return v


def test_events_report_added_removed_changed(view):
    changes = view.apply([
        new(addr("192.0.2.10/24", flags=IFA_F_SECONDARY)),
        new(Neighbour("192.0.2.254", 2, "eth0", state=NUD_STALE)),
        gone(addr("192.0.2.1/24")),
    ])
    assert summary(changes) == [("added", "address", "eth0"), ("changed", "neighbour", "eth0"),
                                ("removed", "address", "eth0")]
    assert changes[1].previous is not None and changes[1].previous.state == NUD_REACHABLE
    assert [a.cidr for a in view.addresses_of("eth0")] == ["192.0.2.10/24"]
    assert view.addresses_of("eth0")[0].secondary
    assert view.neighbour("192.0.2.254", "eth0").state == NUD_STALE


def test_an_event_that_changes_nothing_reports_nothing(view):
    assert view.apply([new(addr("192.0.2.1/24")), new(LINKS[1]), new(ROUTE)]) == []
    assert view.apply([gone(addr("198.51.100.1/24"))]) == []  # never had it


def test_route_kernel_state_is_a_change(view):
    """Route equality leaves out flags (linkdown, dead); the view does not."""
    linkdown = Route(ROUTE.dst, gateway=ROUTE.gateway, dev="eth0", ifindex=2, flags=16)
    (change,) = view.apply([new(linkdown)])
    assert change.action == CHANGED and change.obj.linkdown and not change.previous.linkdown


def test_link_down_makes_routes_stale_and_the_dump_reports_what_went_silently(view):
    assert view.stale == frozenset()
    (change,) = view.apply([new(link(2, "eth0", up=False, carrier=False))])
    assert change.action == CHANGED and not change.obj.up and change.previous.up
    assert view.stale == {"route", "neighbour"}
    # the kernel dropped the IPv4 default route without a word; the re-dump says so
    assert summary(view.reload("route", [ROUTE6])) == [("removed", "route", "eth0")]
    assert "route" not in view.stale and view.routes() == [ROUTE6]


def test_a_link_that_goes_takes_its_addresses_and_neighbours(view):
    changes = view.apply([gone(LINKS[1])])
    assert summary(changes) == [("removed", "link", "eth0"), ("removed", "address", "eth0"),
                                ("removed", "neighbour", "eth0")]
    assert view.link("eth0") is None and view.addresses_of("eth0") == []
    assert "route" in view.stale
    # the kernel's own notifications for them, coming late, change nothing
    assert view.apply([gone(addr("192.0.2.1/24")), new(addr("192.0.2.7/24"))]) == []


def test_ipv4_address_removal_makes_routes_stale_but_ipv6_does_not(view):
    view.apply([new(addr("2001:db8:1::5/64", index=3, dev="eth1"))])
    view.apply([gone(addr("2001:db8:1::5/64", index=3, dev="eth1"))])
    assert view.stale == frozenset()
    view.apply([gone(addr("192.0.2.1/24"))])
    assert view.stale == {"route"}


def test_dump_pairs_a_replaced_route_as_a_change(view):
    moved = Route("0.0.0.0/0", gateway="192.0.2.253", dev="eth0", ifindex=2)
    (change,) = view.reload("route", [moved, ROUTE6])
    assert change.action == CHANGED and change.previous == ROUTE and change.obj == moved


def test_route_in_an_occupied_slot_is_settled_by_a_dump(view):
    """A notification for another route of the same destination and metric may be a replace, an
    appended path or another device's route: the view asks for a dump instead of guessing."""
    other = Route(ROUTE6.dst, gateway="2001:db8:1::2", dev="eth1", metric=1024, ifindex=3)
    assert view.apply([new(other)]) == []
    assert view.stale == {"route"}
    multipath = Route(ROUTE6.dst, metric=1024, nexthops=(
        NextHop("2001:db8:1::1", "eth1"), NextHop("2001:db8:1::2", "eth1")))
    changes = view.reload("route", [ROUTE, multipath])
    assert summary(changes) == [("changed", "route", "eth1")]
    # deleting one path of it announces only that path: not in the view, so a dump again
    assert view.apply([gone(ROUTE6)]) == []
    assert view.stale == {"route"}


def test_lifetimes_count_down_between_dumps_without_being_a_change(view):
    timed = addr("198.51.100.5/24", valid_lft=300, preferred_lft=100)
    view.apply([new(timed)])
    later = addr("198.51.100.5/24", valid_lft=290, preferred_lft=90)
    assert view.reload("address", [addr("192.0.2.1/24"), later]) == []
    assert view.addresses_of("eth0")[1].valid_lft == 290  # but the view has the new numbers
    # a notification that says the lifetimes changed is a change (the address was refreshed)
    (change,) = view.apply([new(addr("198.51.100.5/24", valid_lft=600, preferred_lft=600))])
    assert change.action == CHANGED and change.previous.valid_lft == 290


def test_changes_of_unwatched_kinds_are_not_reported():
    v = KernelView(kinds=("address",))
    assert summary(v.load(LINKS, [addr("192.0.2.1/24")], [ROUTE])) == [
        ("added", "address", "eth0")]
    assert v.routes() == []  # not watched, not kept
    assert v.apply([new(link(2, "eth0", up=False)), new(ROUTE)]) == []
    assert v.link("eth0") is not None and not v.link("eth0").up  # links are always kept
    assert v.stale == frozenset()  # routes are not watched: nothing to re-dump
    with pytest.raises(ValueError, match="unknown kinds"):
        KernelView(kinds=("address", "rules"))


def test_names_come_from_the_links_and_follow_a_rename(view):
    nameless = Address("192.0.2.20", 24, 2)
    (change,) = view.apply([new(nameless)])
    assert change.obj.dev == "eth0"
    hopless = Route("203.0.113.0/24", nexthops=(NextHop("192.0.2.254", None, ifindex=2),))
    (change,) = view.apply([new(hopless)])
    assert change.obj.nexthops[0].dev == "eth0" and change.dev == "eth0"
    view.apply([new(link(2, "wan0"))])
    assert view.link("eth0") is None and view.link("wan0").index == 2
    assert {a.dev for a in view.addresses_of("wan0")} == {"wan0"}
    assert view.neighbour("192.0.2.254", "wan0") is not None
    assert "route" in view.stale


# --- the changes are exactly the difference ------------------------------------------------------

POOL_ADDRESSES = [addr(c, index=i, dev=d, **kw) for c in ("192.0.2.1/24", "2001:db8::1/64")
                  for i, d in ((2, "eth0"), (3, "eth1"))
                  for kw in ({}, {"valid_lft": 60, "preferred_lft": 30}, {"flags": 0x80})]
POOL_NEIGHBOURS = [Neighbour(dst, i, d, state=s) for dst in ("192.0.2.254", "fe80::1")
                   for i, d in ((2, "eth0"), (3, "eth1")) for s in (NUD_REACHABLE, NUD_STALE)]
POOL_LINKS = [link(i, n, up=u) for i, n in ((2, "eth0"), (3, "eth1")) for u in (True, False)]
events_strategy = st.lists(
    st.tuples(st.sampled_from(["new", "del"]),
              st.sampled_from(POOL_ADDRESSES + POOL_NEIGHBOURS + POOL_LINKS)),
    max_size=30)


def _snapshot(v):
    return ({lk.index: lk for lk in v.links()},
            {(a.ifindex, a.address, a.prefixlen): a for a in v.addresses()},
            {(n.ifindex, n.dst): n for n in v.neighbours()})


def _replay(snapshot, changes):
    links, addresses, neighbours = (dict(part) for part in snapshot)
    for c in changes:
        obj = c.obj
        if isinstance(obj, Link):
            table, key = links, obj.index
        elif isinstance(obj, Address):
            table, key = addresses, (obj.ifindex, obj.address, obj.prefixlen)
        else:
            table, key = neighbours, (obj.ifindex, obj.dst)
        if c.action == REMOVED:
            assert key in table
            del table[key]
        else:
            assert (key in table) == (c.action == CHANGED)
            table[key] = obj
    return links, addresses, neighbours


@settings(max_examples=300, deadline=None)
@given(events_strategy)
def test_changes_replayed_on_the_old_view_give_the_new_one(events):
    v = KernelView(kinds=("link", "address", "neighbour"))
    v.load([link(1, "lo"), link(2, "eth0"), link(3, "eth1")])
    before = _snapshot(v)
    changes = v.apply(NetlinkEvent(action, obj) for action, obj in events)
    assert all(isinstance(c, Change) for c in changes)
    assert _replay(before, changes) == _snapshot(v)


@settings(max_examples=200, deadline=None)
@given(events_strategy, st.lists(st.sampled_from(POOL_ADDRESSES), max_size=6))
def test_a_dump_after_any_events_makes_the_view_the_dump(events, truth):
    v = KernelView(kinds=("link", "address", "neighbour"))
    v.load([link(1, "lo"), link(2, "eth0"), link(3, "eth1")])
    v.apply(NetlinkEvent(action, obj) for action, obj in events)
    before = _snapshot(v)
    changes = v.reload("link", [link(1, "lo"), link(2, "eth0"), link(3, "eth1")])
    changes += v.reload("address", truth)
    expected = {(a.ifindex, a.address, a.prefixlen): a for a in truth}
    assert {k: a.cidr for k, a in _snapshot(v)[1].items()} == {
        k: a.cidr for k, a in expected.items()}
    replayed = _replay(before, changes)[1]
    assert set(replayed) == set(expected)


# --- the watcher around fake I/O -----------------------------------------------------------------


class FakeEvents:
    """Stands in for NetlinkEvents: queued batches, and an overrun when told."""

    def __init__(self, kinds=("link", "address", "route", "neighbour")):
        self.kinds = tuple(kinds)
        self.names = {}
        self.batches = []
        self.closed = False
        self.reads = 0

    def fileno(self):
        return -1

    def read(self, max_datagrams=64):
        self.reads += 1
        if not self.batches:
            return []
        batch = self.batches.pop(0)
        if batch == "overrun":
            raise EventsOverrunError("overrun", 105)
        return batch

    def close(self):
        self.closed = True


class FakeNetlink:
    """Stands in for Netlink's dumps: the kernel's state, as the test sets it."""

    def __init__(self):
        self.links_now = list(LINKS)
        self.addresses_now = [addr("192.0.2.1/24")]
        self.routes_now = [ROUTE, ROUTE6]
        self.neighbours_now = []
        self.dumped = []
        self.closed = False

    def links(self):
        self.dumped.append("link")
        return list(self.links_now)

    def addresses(self):
        self.dumped.append("address")
        return list(self.addresses_now)

    def routes(self, table=254):
        assert table is None  # every table
        self.dumped.append("route")
        return list(self.routes_now)

    def neighbours(self):
        self.dumped.append("neighbour")
        return list(self.neighbours_now)

    def close(self):
        self.closed = True


@pytest.fixture
def fakes():
    events, nl = FakeEvents(), FakeNetlink()
    watcher = KernelWatcher(events=events, netlink=nl)
    yield watcher, events, nl
    watcher.close()
    assert events.closed and not nl.closed  # a Netlink the caller gave stays open


def test_watcher_dumps_once_subscribed_and_names_follow_the_dump(fakes):
    watcher, events, nl = fakes
    assert nl.dumped == ["link", "address", "route", "neighbour"]
    assert events.names == {1: "lo", 2: "eth0", 3: "eth1"}
    assert [a.cidr for a in watcher.addresses_of("eth0")] == ["192.0.2.1/24"]
    assert watcher.read() == [] and not watcher.resynced


def test_watcher_redumps_what_went_stale(fakes):
    watcher, events, nl = fakes
    nl.dumped.clear()
    nl.routes_now = [ROUTE6]
    events.batches.append([new(link(2, "eth0", up=False))])
    changes = watcher.read()
    assert summary(changes) == [("changed", "link", "eth0"), ("removed", "route", "eth0")]
    assert nl.dumped == ["neighbour", "route"] and watcher.redumps == 2
    assert not watcher.resynced


def test_overrun_drops_the_queue_and_resyncs_to_the_kernel(fakes):
    watcher, events, nl = fakes
    calls = []
    watcher.on_addresses_changed("eth0", lambda dev, addrs: calls.append(
        (dev, [a.cidr for a in addrs])))
    watcher.on_addresses_changed("eth1", lambda dev, addrs: calls.append(
        (dev, [a.cidr for a in addrs])))
    # the kernel lost notifications; what is still queued may predate them
    nl.addresses_now = [addr("192.0.2.1/24"), addr("198.51.100.7/24", index=3, dev="eth1")]
    events.batches += ["overrun", [new(addr("203.0.113.9/24"))], "overrun", []]
    changes = watcher.read()
    assert watcher.resynced and watcher.resyncs == 1
    assert summary(changes) == [("added", "address", "eth1")]
    assert events.batches == []  # drained, stale notification dropped
    assert [a.cidr for a in watcher.addresses_of("eth0")] == ["192.0.2.1/24"]
    assert calls == [("eth0", ["192.0.2.1/24"]), ("eth1", ["198.51.100.7/24"])]
    assert watcher.read() == [] and not watcher.resynced  # the flag lasts one read


def test_address_callbacks_only_for_their_device_and_can_unsubscribe(fakes):
    watcher, events, _ = fakes
    calls = []
    stop = watcher.on_addresses_changed("eth0", lambda dev, addrs: calls.append(len(addrs)))
    events.batches += [[new(addr("192.0.2.2/24"))],
                       [new(addr("2001:db8::2/64", index=3, dev="eth1"))],
                       [new(Neighbour("192.0.2.9", 2, "eth0"))]]
    watcher.read()
    watcher.read()
    watcher.read()
    assert calls == [2]
    stop()
    events.batches.append([gone(addr("192.0.2.2/24"))])
    watcher.read()
    assert calls == [2]


def test_watcher_refuses_what_it_cannot_do():
    with pytest.raises(ValueError, match="not subscribed"):
        KernelWatcher(events=FakeEvents(kinds=("address",)), netlink=FakeNetlink(),
                      kinds=("address",))
    with pytest.raises(ValueError, match="unknown kinds"):
        KernelWatcher(kinds=("addresses",))
    events = FakeEvents(kinds=("link", "route"))
    watcher = KernelWatcher(events=events, netlink=FakeNetlink(), kinds=("route",))
    with pytest.raises(ValueError, match="does not watch addresses"):
        watcher.on_addresses_changed("eth0", lambda dev, addrs: None)
    assert watcher.addresses_of("eth0") == []
    watcher.close()


def test_a_failed_dump_closes_what_the_watcher_opened():
    class Broken(FakeNetlink):
        def links(self):
            raise OSError("netlink dump failed")

    events = FakeEvents()
    with pytest.raises(OSError):
        KernelWatcher(events=events, netlink=Broken())
    assert events.closed


def test_change_dev_and_kind():
    assert Change(ADDED, LINKS[1]).dev == "eth0"
    assert Change(ADDED, ROUTE).kind == "route"
    multipath = Route("203.0.113.0/24", table=RT_TABLE_LOCAL,
                      nexthops=(NextHop("192.0.2.1", "eth1"),))
    assert Change(REMOVED, multipath).dev == "eth1"
    assert Change(ADDED, addr("2001:db8::1/64")).obj.family == socket.AF_INET6


def test_bridge_forwarding_entries_are_not_neighbours(view):
    """A bridge's FDB notifications come as neighbour messages without an IP address."""
    fdb = Neighbour("None", 2, "eth0", lladdr="02:00:00:00:00:01", state=0x80)
    assert view.apply([new(fdb), gone(fdb)]) == []
    assert view.reload("neighbour", [fdb]) == [
        Change(REMOVED, Neighbour("192.0.2.254", 2, "eth0", state=NUD_REACHABLE))]
    assert view.neighbours() == []


def test_rules_when_asked_for():
    from ipshift.net.netlink import Rule

    mine = Rule(1000, table=100, src="192.0.2.0/24", proto=73)
    v = KernelView(kinds=("rule",))
    assert summary(v.load(LINKS, rules=[mine])) == [("added", "rule", None)]
    assert v.apply([new(mine)]) == []
    other_owner = Rule(1000, table=100, src="192.0.2.0/24", proto=4)
    (change,) = v.apply([new(other_owner)])  # equal but for the protocol: a change
    assert change.action == CHANGED and change.previous.proto == 73
    by_iif = Rule(1001, table=101, iif="eth1")
    assert summary(v.apply([new(by_iif), gone(mine)])) == [
        ("added", "rule", "eth1"), ("removed", "rule", None)]
    assert v.rules() == [by_iif] and v.rules(socket.AF_INET6) == []
    assert summary(v.reload("rule", [])) == [("removed", "rule", "eth1")]


# routes that share slots (destination and metric) in every way the kernel lets them
POOL_ROUTES = [Route(dst, gateway=gateway, dev=dev, metric=metric, ifindex=index, flags=flags)
               for dst, gateways in (("2001:db8:9::/48", ("fe80::1", "fe80::2")),
                                     ("198.51.100.0/24", ("192.0.2.254", "192.0.2.253")))
               for gateway, dev, index in zip(gateways, ("eth0", "eth1"), (2, 3), strict=True)
               for metric in (None, 1024) for flags in (0, 16)]


def _routes_after(changes, before):
    now = {r: r for r in before}
    for c in changes:
        if c.action == REMOVED:
            assert c.obj in now
            del now[c.obj]
        elif c.action == CHANGED and c.previous != c.obj:  # one route took another's place
            assert c.previous in now and c.obj not in now
            del now[c.previous]
            now[c.obj] = c.obj
        else:
            assert (c.obj in now) == (c.action == CHANGED)
            now[c.obj] = c.obj
    return {r: _astuple(r) for r in now.values()}


def _astuple(route):
    return dataclasses.astuple(route)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["new", "del"]), st.sampled_from(POOL_ROUTES)),
                max_size=25),
       st.lists(st.sampled_from(POOL_ROUTES), max_size=5, unique=True))
def test_route_changes_describe_the_view_and_a_dump_settles_it(events, truth):
    v = KernelView(kinds=("route",))
    v.load(LINKS)
    before = v.routes()
    changes = v.apply(NetlinkEvent(action, obj) for action, obj in events)
    assert _routes_after(changes, before) == {r: _astuple(r) for r in v.routes()}
    before = v.routes()
    settled = v.reload("route", truth)
    assert v.stale == frozenset()
    assert _routes_after(settled, before) == {r: _astuple(r) for r in truth}
