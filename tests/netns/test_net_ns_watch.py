"""KernelWatcher against a real kernel: what it reports, and that its view is the kernel's."""

import asyncio
import select
import socket
import time

import pytest

from ipshift.net.netlink import (
    ADDED,
    CHANGED,
    REMOVED,
    RT_SCOPE_UNIVERSE,
    RT_TABLE_MAIN,
    Address,
    KernelWatcher,
    Link,
    Netlink,
    Route,
)

pytestmark = pytest.mark.netns


@pytest.fixture
def pair(lab):
    """Host a linked to b, a Netlink handle in a, and a watcher of everything in a."""
    a, b = lab.host("a"), lab.host("b")
    lab.link(a, b, "192.0.2.1/24", "192.0.2.2/24", v6=("2001:db8:1::1/64", "2001:db8:1::2/64"))
    with Netlink(a.ns) as nl, KernelWatcher(a.ns, netlink=nl) as watcher:
        yield a, nl, watcher


def collect(watcher, done, timeout=10.0):
    """Read changes until done(changes) holds; bounded by `timeout` seconds."""
    changes = []
    deadline = time.monotonic() + timeout
    while not done(changes):
        left = deadline - time.monotonic()
        if left <= 0:
            pytest.fail(f"the watcher did not report it within {timeout}s; it saw {changes}")
        select.select([watcher.fileno()], [], [], min(left, 0.5))
        changes += watcher.read()
    return changes


def has(action, kind, test=lambda obj: True):
    return lambda changes: any(c.action == action and c.kind == kind and test(c.obj)
                               for c in changes)


def view_of(watcher):
    return ({(a.cidr, a.dev) for a in watcher.view.addresses()},
            set(watcher.routes()),
            {(lk.name, lk.up) for lk in watcher.links()})


def kernel_view(nl):
    return ({(a.cidr, a.dev) for a in nl.addresses()}, set(nl.routes(None)),
            {(lk.name, lk.up) for lk in nl.links()})


def test_the_first_view_is_the_kernel_state(pair):
    _, nl, watcher = pair
    assert view_of(watcher) == kernel_view(nl)
    assert {a.cidr for a in watcher.addresses_of("to-b", socket.AF_INET)} == {"192.0.2.1/24"}
    assert watcher.link("to-b").up and watcher.read() == []


def test_a_link_going_down_and_the_routes_it_takes(pair):
    _a, nl, watcher = pair
    nl.set_link("to-b", up=False)
    v4_route_gone = has(REMOVED, "route", lambda r: r.dst == "192.0.2.0/24")
    link_down = has(CHANGED, "link", lambda lk: lk.name == "to-b" and not lk.up)
    changes = collect(watcher, lambda ch: link_down(ch) and v4_route_gone(ch))
    # the kernel announced no IPv4 route removal: the watcher re-read the routes itself
    assert watcher.redumps >= 1
    assert not watcher.link("to-b").up
    assert next(c for c in changes if c.kind == "link").previous.up
    assert not [r for r in watcher.routes(RT_TABLE_MAIN) if r.dev == "to-b"]
    assert view_of(watcher) == kernel_view(nl)


def test_an_address_added_and_removed(pair):
    _, nl, watcher = pair
    heard = []
    watcher.on_addresses_changed("to-b", lambda dev, addrs: heard.append(
        {x.cidr for x in addrs}))
    nl.add_address("to-b", "192.0.2.10/24")
    changes = collect(watcher, has(ADDED, "address", lambda x: x.cidr == "192.0.2.10/24"))
    added = next(c.obj for c in changes if c.kind == "address")
    assert isinstance(added, Address) and added.dev == "to-b" and added.secondary
    assert "192.0.2.10/24" in heard[-1]
    nl.del_address("to-b", "192.0.2.10/24")
    collect(watcher, has(REMOVED, "address", lambda x: x.cidr == "192.0.2.10/24"))
    assert "192.0.2.10/24" not in heard[-1]
    assert "192.0.2.10/24" not in {x.cidr for x in watcher.addresses_of("to-b")}


def test_a_route_added(pair):
    _, nl, watcher = pair
    route = Route("203.0.113.0/24", gateway="192.0.2.2", dev="to-b", metric=50,
                  scope=RT_SCOPE_UNIVERSE)
    nl.add_route(route)
    changes = collect(watcher, has(ADDED, "route", lambda r: r.dst == "203.0.113.0/24"))
    assert [c.obj for c in changes if c.kind == "route"] == [route]
    assert route in watcher.routes(RT_TABLE_MAIN, socket.AF_INET)


def test_an_overrun_resyncs_to_the_kernel_view(lab):
    """A receive buffer of the kernel's minimum and 300 address changes in one burst: the
    kernel drops notifications, and the watcher re-reads the addresses instead."""
    a, b = lab.host("a"), lab.host("b")
    lab.link(a, b, "192.0.2.1/24", "192.0.2.2/24")
    with Netlink(a.ns) as nl, KernelWatcher(a.ns, ("link", "address"), rcvbuf=1,
                                            netlink=nl) as watcher:
        heard = []
        watcher.on_addresses_changed("to-b", lambda dev, addrs: heard.append(len(addrs)))
        a.ip_batch([f"addr add 203.0.113.{i}/32 dev to-b" for i in range(1, 201)]
                   + [f"addr add 2001:db8:5::{i:x}/128 dev to-b nodad" for i in range(1, 101)])
        changes = []
        for _ in range(1000):  # bounded: drain every queued datagram
            batch = watcher.read()
            if not batch and not watcher.resynced:
                break
            changes += batch
        assert watcher.resyncs >= 1
        expected = {(x.cidr, x.dev) for x in nl.addresses()}
        assert {(x.cidr, x.dev) for x in watcher.view.addresses()} == expected
        assert len(watcher.addresses_of("to-b")) == len(nl.addresses("to-b")) >= 301
        assert heard and heard[-1] == len(nl.addresses("to-b"))
        # every address added is reported once, whether by a notification or by the resync
        added = [c.obj.cidr for c in changes if c.action == ADDED]
        assert len(added) == len(set(added)) == 300


def test_next_changes_from_asyncio(pair):
    _a, nl, watcher = pair

    async def main():
        waiting = asyncio.ensure_future(watcher.next_changes())
        await asyncio.sleep(0)
        await asyncio.to_thread(nl.set_link, "to-b", mtu=1400)
        return await asyncio.wait_for(waiting, timeout=10)

    changes = asyncio.run(main())
    links = [c.obj for c in changes if isinstance(c.obj, Link)]
    assert links and links[-1].mtu == 1400 and watcher.link("to-b").mtu == 1400


def test_after_many_kinds_of_change_the_view_is_still_the_kernels(pair):
    a, nl, watcher = pair
    nl.add_address("to-b", "198.51.100.1/24")
    nl.add_route(Route("203.0.113.0/25", gateway="198.51.100.9", dev="to-b"))
    nl.add_route(Route("2001:db8:7::/48", gateway="2001:db8:1::2", dev="to-b", metric=1024))
    nl.replace_route(Route("2001:db8:7::/48", gateway="2001:db8:1::3", dev="to-b", metric=1024))
    nl.set_neighbour("192.0.2.77", "to-b", "02:00:00:00:00:77")
    nl.del_address("to-b", "198.51.100.1/24")  # takes the route through it, silently
    a.ip("link", "add", "extra0", "type", "veth", "peer", "name", "extra1")
    a.ip("link", "set", "extra0", "up")
    a.ip("link", "del", "extra0")
    collect(watcher, has(REMOVED, "link", lambda lk: lk.name == "extra0"))
    for _ in range(100):  # bounded: whatever is still queued
        if not watcher.read():
            break
    assert view_of(watcher) == kernel_view(nl)
    assert {(n.dst, n.dev) for n in watcher.neighbours()} == {
        (n.dst, n.dev) for n in nl.neighbours()}


def test_rules_are_watched_when_asked_for(lab):
    from ipshift.net.netlink import Rule

    a, b = lab.host("a"), lab.host("b")
    lab.link(a, b, "192.0.2.1/24", "192.0.2.2/24")
    with Netlink(a.ns) as nl, KernelWatcher(a.ns, ("rule",), netlink=nl) as watcher:
        assert set(watcher.rules()) == set(nl.rules())  # the kernel's default rules
        rule = Rule(1000, table=100, src="203.0.113.0/24", proto=73)
        nl.add_rule(rule)
        collect(watcher, has(ADDED, "rule", lambda r: r == rule and r.proto == 73))
        nl.del_rule(rule)
        collect(watcher, has(REMOVED, "rule", lambda r: r == rule))
        assert set(watcher.rules()) == set(nl.rules())
