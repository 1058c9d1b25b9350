"""A current view of a namespace's links, addresses, routes and neighbours, kept up to date by
rtnetlink notifications and re-read after an overrun.

- `KernelView` is sans-I/O: it takes dumps (`load`, `reload`) and notifications (`apply`) and
  returns what changed as `Change`s. It also says which kinds it can no longer trust (`stale`):
  the kernel drops IPv4 routes silently with a link that goes down or an address that goes away,
  and some IPv6 route notifications do not say which route they replace.
- `KernelWatcher` is the I/O around it: subscribes first (`NetlinkEvents`), then dumps
  (`Netlink`), so nothing in between is missed; `read()` applies what is queued, re-dumps the
  stale kinds, and after an overrun drops what is queued and re-reads everything (`resynced`).

    watcher = KernelWatcher("ipsh-x-a", kinds=("link", "address"))
    watcher.on_addresses_changed("eth0", lambda dev, addrs: ...)
    loop.add_reader(watcher.fileno(), watcher.read)
    watcher.addresses_of("eth0")        # the view, at any time
"""

from __future__ import annotations

import dataclasses
import ipaddress
import socket
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from ipshift.net.netlink.client import Netlink
from ipshift.net.netlink.events import EventsOverrunError, NetlinkEvents
from ipshift.net.netlink.objects import Address, Link, Neighbour, NetlinkEvent, Route, Rule
from ipshift.net.sockbase import readable

KINDS = ("link", "address", "route", "rule", "neighbour")
DEFAULT_KINDS = ("link", "address", "route", "neighbour")
ADDED, REMOVED, CHANGED = "added", "removed", "changed"

Watched = Link | Address | Route | Rule | Neighbour
AddressesCallback = Callable[[str, list[Address]], None]
_Dev = TypeVar("_Dev", Address, Neighbour)

_KIND_OF: dict[type, str] = {
    Link: "link", Address: "address", Route: "route", Rule: "rule", Neighbour: "neighbour",
}


@dataclass(frozen=True)
class Change:
    """One difference in the view: `obj` as it is now ("removed": as it was last seen), and for
    "changed" the object it replaced."""

    action: str  # ADDED, REMOVED or CHANGED
    obj: Watched
    previous: Watched | None = None

    @property
    def kind(self) -> str:
        return _KIND_OF[type(self.obj)]

    @property
    def dev(self) -> str | None:
        """The interface it concerns (a link's own name; a multipath route's first hop; a
        rule's input, else output interface)."""
        obj = self.obj
        if isinstance(obj, Link):
            return obj.name
        if isinstance(obj, Rule):
            return obj.iif or obj.oif
        if isinstance(obj, Route) and obj.dev is None and obj.nexthops:
            return obj.nexthops[0].dev
        return obj.dev


AddressKey = tuple[str, int, str | None]  # address, prefixlen, peer (per ifindex)


def _address_key(a: Address) -> AddressKey:
    return (a.address, a.prefixlen, a.peer)


def _route_slot(r: Route) -> tuple[int, int, str, int]:
    """What a route replace names: the kernel replaces a route of the same family, table,
    destination and metric (IPv4: and TOS, which ipshift never sets)."""
    return (r.family, r.table, r.dst, r.metric or 0)


def _identical(a: Watched, b: Watched) -> bool:
    """Equal including the fields left out of equality (kernel state: route and next-hop
    flags, ifindex)."""
    return a == b and dataclasses.astuple(a) == dataclasses.astuple(b)


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _same_address(a: Address, b: Address) -> bool:
    """Equal but for the lifetimes, which count down between two dumps."""
    return dataclasses.replace(a, valid_lft=None, preferred_lft=None) == dataclasses.replace(
        b, valid_lft=None, preferred_lft=None)


class KernelView:
    """What a namespace has, by kind, built from dumps and notifications; no I/O.

    Links are always kept (names, and what a link going away takes with it); the other kinds
    only when named in `kinds`, and changes are reported only for the kinds named.
    """

    def __init__(self, kinds: Sequence[str] = DEFAULT_KINDS) -> None:
        unknown = set(kinds) - set(KINDS)
        if unknown:
            raise ValueError(f"unknown kinds {sorted(unknown)}: use {list(KINDS)}")
        self.kinds = tuple(kinds)
        self.loaded = False
        self._links: dict[int, Link] = {}
        self._index_of: dict[str, int] = {}
        self._addresses: dict[int, dict[AddressKey, Address]] = {}
        self._routes: dict[Route, Route] = {}  # by what can be set; the value has kernel state
        self._slots: Counter[tuple[int, int, str, int]] = Counter()  # routes per _route_slot
        self._neighbours: dict[tuple[int, str], Neighbour] = {}
        self._rules: dict[Rule, Rule] = {}  # by equality, which leaves the protocol out
        self._stale: set[str] = set()

    # --- reading the view ------------------------------------------------------------------
    def link(self, dev: str | int) -> Link | None:
        index = dev if isinstance(dev, int) else self._index_of.get(dev)
        return self._links.get(index) if index is not None else None

    def links(self) -> list[Link]:
        return list(self._links.values())

    def addresses_of(self, dev: str | int, family: int | None = None) -> list[Address]:
        """The addresses of `dev` in the kernel's order (an IPv4 primary before its
        secondaries); [] for an interface that does not exist."""
        index = dev if isinstance(dev, int) else self._index_of.get(dev)
        found = self._addresses.get(index, {}) if index is not None else {}
        return [a for a in found.values() if family is None or a.family == family]

    def addresses(self, family: int | None = None) -> list[Address]:
        return [a for per_dev in self._addresses.values() for a in per_dev.values()
                if family is None or a.family == family]

    def routes(self, table: int | None = None, family: int | None = None) -> list[Route]:
        return [r for r in self._routes.values()
                if (table is None or r.table == table) and (family is None or r.family == family)]

    def neighbours(self, dev: str | None = None) -> list[Neighbour]:
        index = self._index_of.get(dev) if dev is not None else None
        if dev is not None and index is None:
            return []
        return [n for n in self._neighbours.values() if index is None or n.ifindex == index]

    def rules(self, family: int | None = None) -> list[Rule]:
        return [r for r in self._rules.values() if family is None or r.family == family]

    def neighbour(self, dst: str, dev: str) -> Neighbour | None:
        index = self._index_of.get(dev)
        return self._neighbours.get((index, dst)) if index is not None else None

    @property
    def stale(self) -> frozenset[str]:
        """Kinds to re-dump (and hand to `reload`): notifications alone no longer describe them."""
        return frozenset(self._stale)

    # --- dumps -------------------------------------------------------------------------------
    def load(
        self,
        links: Iterable[Link],
        addresses: Iterable[Address] = (),
        routes: Iterable[Route] = (),
        neighbours: Iterable[Neighbour] = (),
        rules: Iterable[Rule] = (),
    ) -> list[Change]:
        """Replace the view with a dump of every watched kind; returns the differences (all
        "added" on the first load)."""
        changes = self.reload("link", links)
        objects: Iterable[Watched]
        for kind, objects in (("address", addresses), ("route", routes), ("rule", rules),
                              ("neighbour", neighbours)):
            if kind in self.kinds:
                changes += self.reload(kind, objects)
        self.loaded = True
        return changes

    def reload(self, kind: str, objects: Iterable[Watched]) -> list[Change]:
        """Replace one kind with a dump of it; returns the differences."""
        self._stale.discard(kind)
        if kind == "link":
            return self._reload_links([o for o in objects if isinstance(o, Link)])
        if kind == "address":
            return self._reload_addresses([o for o in objects if isinstance(o, Address)])
        if kind == "route":
            return self._reload_routes([o for o in objects if isinstance(o, Route)])
        if kind == "neighbour":
            return self._reload_neighbours([o for o in objects if isinstance(o, Neighbour)])
        if kind == "rule":
            return self._reload_rules([o for o in objects if isinstance(o, Rule)])
        raise ValueError(f"unknown kind {kind!r}: use {list(KINDS)}")

    def _reload_links(self, links: list[Link]) -> list[Change]:
        old = self._links
        self._links = {link.index: link for link in links}
        self._index_of = {link.name: link.index for link in links}
        changes: list[Change] = []
        for index, link in self._links.items():
            before = old.get(index)
            if before is None:
                changes.append(Change(ADDED, link))
            elif not _identical(before, link):
                changes.append(Change(CHANGED, link, before))
        for index, link in old.items():
            if index not in self._links:
                changes.append(Change(REMOVED, link))
        return self._reported(changes)

    def _reload_addresses(self, addresses: list[Address]) -> list[Change]:
        old = self._addresses
        self._addresses = {}
        for a in addresses:
            self._addresses.setdefault(a.ifindex, {})[_address_key(a)] = self._named(a)
        changes: list[Change] = []
        for index, per_dev in self._addresses.items():
            before_dev = old.get(index, {})
            for key, a in per_dev.items():
                before = before_dev.get(key)
                if before is None:
                    changes.append(Change(ADDED, a))
                elif not _same_address(before, a):
                    changes.append(Change(CHANGED, a, before))
        for index, before_dev in old.items():
            for key, a in before_dev.items():
                if key not in self._addresses.get(index, {}):
                    changes.append(Change(REMOVED, a))
        return self._reported(changes)

    def _reload_routes(self, routes: list[Route]) -> list[Change]:
        old = self._routes
        self._routes = {}
        for r in map(self._named_route, routes):
            self._routes[r] = r
        self._slots = Counter(_route_slot(r) for r in self._routes)
        changes: list[Change] = []
        added = [r for r in self._routes.values() if r not in old]
        removed = [r for r in old.values() if r not in self._routes]
        for r in self._routes.values():
            before = old.get(r)
            if before is not None and not _identical(before, r):
                changes.append(Change(CHANGED, r, before))
        # a route that took another's place (same family, table, destination, metric) is a change
        gone_by_slot: dict[tuple[int, int, str, int], list[Route]] = {}
        for r in removed:
            gone_by_slot.setdefault(_route_slot(r), []).append(r)
        for r in added:
            candidates = gone_by_slot.get(_route_slot(r))
            if candidates and len(candidates) == 1 and sum(
                    _route_slot(x) == _route_slot(r) for x in added) == 1:
                before = candidates.pop()
                removed.remove(before)
                changes.append(Change(CHANGED, r, before))
            else:
                changes.append(Change(ADDED, r))
        changes += [Change(REMOVED, r) for r in removed]
        return self._reported(changes)

    def _reload_neighbours(self, neighbours: list[Neighbour]) -> list[Change]:
        old = self._neighbours
        self._neighbours = {(n.ifindex, n.dst): self._named(n) for n in neighbours
                            if _is_ip(n.dst)}
        changes: list[Change] = []
        for key, n in self._neighbours.items():
            before = old.get(key)
            if before is None:
                changes.append(Change(ADDED, n))
            elif before != n:
                changes.append(Change(CHANGED, n, before))
        changes += [Change(REMOVED, n) for key, n in old.items() if key not in self._neighbours]
        return self._reported(changes)

    def _reload_rules(self, rules: list[Rule]) -> list[Change]:
        old = self._rules
        self._rules = {r: r for r in rules}
        changes: list[Change] = []
        for r in self._rules.values():
            before = old.get(r)
            if before is None:
                changes.append(Change(ADDED, r))
            elif not _identical(before, r):
                changes.append(Change(CHANGED, r, before))
        changes += [Change(REMOVED, r) for r in old.values() if r not in self._rules]
        return self._reported(changes)

    # --- notifications ---------------------------------------------------------------------
    def apply(self, events: Iterable[NetlinkEvent]) -> list[Change]:
        """Apply notifications in the order the kernel sent them; returns the differences."""
        changes: list[Change] = []
        for event in events:
            obj, gone = event.obj, event.action == "del"
            if isinstance(obj, Link):
                changes += self._apply_link(obj, gone)
            elif isinstance(obj, Address) and "address" in self.kinds:
                changes += self._apply_address(self._named(obj), gone)
            elif isinstance(obj, Route) and "route" in self.kinds:
                changes += self._apply_route(self._named_route(obj), gone)
            elif isinstance(obj, Rule) and "rule" in self.kinds:
                changes += self._apply_rule(obj, gone)
            elif isinstance(obj, Neighbour) and "neighbour" in self.kinds and _is_ip(obj.dst):
                # (bridge forwarding entries come as neighbours without an IP address)
                changes += self._apply_neighbour(self._named(obj), gone)
        return self._reported(changes)

    def _apply_link(self, link: Link, gone: bool) -> list[Change]:
        before = self._links.get(link.index)
        if gone:
            if before is None:
                return []
            del self._links[link.index]
            if self._index_of.get(before.name) == link.index:
                del self._index_of[before.name]
            return [Change(REMOVED, before), *self._forget_device(link.index)]
        self._links[link.index] = link
        if before is not None and before.name != link.name:
            if self._index_of.get(before.name) == link.index:
                del self._index_of[before.name]
            self._rename(link.index, link.name)
        self._index_of[link.name] = link.index
        if before is None:
            return [Change(ADDED, link)]
        if _identical(before, link):
            return []
        if (before.up, before.carrier) != (link.up, link.carrier):
            # IPv4 routes go (admin down) or turn linkdown (carrier) without a notification
            self._mark_stale("route", "neighbour")
        return [Change(CHANGED, link, before)]

    def _forget_device(self, index: int) -> list[Change]:
        """What goes with a link: its addresses and neighbours (the kernel's notifications for
        them may come later or not at all) and, silently for IPv4, its routes."""
        changes = [Change(REMOVED, a) for a in self._addresses.pop(index, {}).values()]
        for key in [k for k in self._neighbours if k[0] == index]:
            changes.append(Change(REMOVED, self._neighbours.pop(key)))
        self._mark_stale("route")
        return changes

    def _rename(self, index: int, name: str) -> None:
        per_dev = self._addresses.get(index, {})
        for address_key, a in per_dev.items():
            per_dev[address_key] = dataclasses.replace(a, dev=name)
        for neighbour_key, n in self._neighbours.items():
            if neighbour_key[0] == index:
                self._neighbours[neighbour_key] = dataclasses.replace(n, dev=name)
        self._mark_stale("route")  # their `dev` names the old name

    def _apply_address(self, a: Address, gone: bool) -> list[Change]:
        key = _address_key(a)
        before = self._addresses.get(a.ifindex, {}).get(key)
        if gone:
            if a.family == socket.AF_INET:
                self._mark_stale("route")  # IPv4 routes with it as source go silently
            if before is None:
                return []
            del self._addresses[a.ifindex][key]
            return [Change(REMOVED, before)]
        if a.ifindex not in self._links:
            return []  # an address of a link already gone: a late notification
        self._addresses.setdefault(a.ifindex, {})[key] = a
        if before is None:
            return [Change(ADDED, a)]
        return [] if _identical(before, a) else [Change(CHANGED, a, before)]

    def _apply_route(self, r: Route, gone: bool) -> list[Change]:
        before = self._routes.get(r)
        slot = _route_slot(r)
        if gone:
            if before is not None:
                del self._routes[r]
                self._slots[slot] -= 1
                if not self._slots[slot]:
                    del self._slots[slot]
                return [Change(REMOVED, before)]
            if self._slots[slot]:
                # one path of an IPv6 multipath route (the kernel announces paths one by one)
                self._mark_stale("route")
            return []
        if before is not None:
            self._routes[r] = r
            return [] if _identical(before, r) else [Change(CHANGED, r, before)]
        if self._slots[slot]:
            # a replace, an appended path, or a route of another device in the same slot:
            # the notification does not say which; the dump it asks for will report it
            self._mark_stale("route")
            return []
        self._routes[r] = r
        self._slots[slot] += 1
        return [Change(ADDED, r)]

    def _apply_rule(self, rule: Rule, gone: bool) -> list[Change]:
        before = self._rules.get(rule)
        if gone:
            if before is None:
                return []
            del self._rules[rule]
            return [Change(REMOVED, before)]
        self._rules[rule] = rule
        if before is None:
            return [Change(ADDED, rule)]
        return [] if _identical(before, rule) else [Change(CHANGED, rule, before)]

    def _apply_neighbour(self, n: Neighbour, gone: bool) -> list[Change]:
        key = (n.ifindex, n.dst)
        before = self._neighbours.get(key)
        if gone:
            if before is None:
                return []
            del self._neighbours[key]
            return [Change(REMOVED, before)]
        if n.ifindex not in self._links:
            return []
        self._neighbours[key] = n
        if before is None:
            return [Change(ADDED, n)]
        return [] if before == n else [Change(CHANGED, n, before)]

    # --- helpers -----------------------------------------------------------------------------
    def _mark_stale(self, *kinds: str) -> None:
        self._stale.update(k for k in kinds if k in self.kinds)

    def _reported(self, changes: list[Change]) -> list[Change]:
        if "link" in self.kinds:
            return changes
        return [c for c in changes if not isinstance(c.obj, Link)]

    def _named(self, obj: _Dev) -> _Dev:
        """Fill in a device name the notification could not (a link seen after it)."""
        if obj.dev is None and obj.ifindex in self._links:
            return dataclasses.replace(obj, dev=self._links[obj.ifindex].name)
        return obj

    def _named_route(self, route: Route) -> Route:
        if route.dev is None and route.ifindex in self._links:
            route = dataclasses.replace(route, dev=self._links[route.ifindex].name)
        if any(h.dev is None and h.ifindex in self._links for h in route.nexthops):
            route = dataclasses.replace(route, nexthops=tuple(
                dataclasses.replace(h, dev=self._links[h.ifindex].name)
                if h.dev is None and h.ifindex in self._links else h
                for h in route.nexthops))
        return route



# --- the I/O around the view ------------------------------------------------------------------


class EventSource(Protocol):
    """What `KernelWatcher` reads notifications from (a `NetlinkEvents`)."""

    kinds: tuple[str, ...]
    names: dict[int, str]

    def fileno(self) -> int: ...
    def read(self, max_datagrams: int = 64) -> list[NetlinkEvent]: ...
    def close(self) -> None: ...


class Dumper(Protocol):
    """What `KernelWatcher` dumps the kernel's state with (a `Netlink`)."""

    def links(self) -> list[Link]: ...
    def addresses(self) -> list[Address]: ...
    def routes(self, table: int | None = ...) -> list[Route]: ...
    def neighbours(self) -> list[Neighbour]: ...
    def rules(self) -> list[Rule]: ...
    def close(self) -> None: ...


class KernelWatcher:
    """A `KernelView` of namespace `netns`, kept current by rtnetlink notifications.

    Register `fileno()` with a loop (`loop.add_reader(w.fileno(), w.read)`) or await
    `next_changes()`. `read()` never blocks on notifications; it dumps over netlink only when
    the view needs it (a link went down, an overrun), which takes a few milliseconds for the
    tables of a host. After an overrun it returns the differences a full re-read found and sets
    `resynced` until the next `read()`: re-evaluate everything then.

    Give `netlink=` to share a `Netlink` the caller has (it stays open on `close()`), and
    `events=` for a `NetlinkEvents` subscribed to "link" and the watched kinds (it is closed with
    the watcher, which must be its only reader).
    """

    # Datagrams dropped at most after an overrun before re-reading: those queued then may be
    # older than the ones the kernel lost. Bounded, so a notification storm cannot stall us.
    DRAIN_LIMIT = 4096

    def __init__(
        self,
        netns: str | None = None,
        kinds: Sequence[str] = DEFAULT_KINDS,
        *,
        rcvbuf: int = 4 << 20,
        netlink: Dumper | None = None,
        events: EventSource | None = None,
        max_datagrams: int = 64,
    ) -> None:
        self.view = KernelView(kinds)  # raises on unknown kinds before anything is opened
        self.netns = netns
        self.kinds = self.view.kinds
        self.resynced = False  # the last read() re-read everything
        self.resyncs = 0  # re-reads after an overrun (or a resync() call)
        self.redumps = 0  # re-dumps of one kind the view asked for (a link went down, ...)
        self.max_datagrams = max_datagrams
        self._on_addresses: dict[str, list[AddressesCallback]] = {}
        subscribe = tuple(dict.fromkeys(("link", *self.kinds)))  # links: names, what goes away
        if events is not None:
            missing = set(subscribe) - set(events.kinds)
            if missing:
                raise ValueError(f"the events given are not subscribed to {sorted(missing)}")
        self._own_netlink = netlink is None
        self._netlink: Dumper | None = netlink
        # subscribe first, then dump: what changes in between is queued, and applied by read()
        self._events = events if events is not None else NetlinkEvents(
            netns, subscribe, rcvbuf=rcvbuf)
        try:
            if self._netlink is None:
                self._netlink = Netlink(netns)
            self._load()
        except BaseException:
            self.close()
            raise

    # --- the view ------------------------------------------------------------------------------
    def link(self, dev: str | int) -> Link | None:
        return self.view.link(dev)

    def links(self) -> list[Link]:
        return self.view.links()

    def addresses_of(self, dev: str | int, family: int | None = None) -> list[Address]:
        return self.view.addresses_of(dev, family)

    def routes(self, table: int | None = None, family: int | None = None) -> list[Route]:
        return self.view.routes(table, family)

    def neighbours(self, dev: str | None = None) -> list[Neighbour]:
        return self.view.neighbours(dev)

    def rules(self, family: int | None = None) -> list[Rule]:
        return self.view.rules(family)

    def on_addresses_changed(
        self, dev: str, callback: AddressesCallback
    ) -> Callable[[], None]:
        """Call `callback(dev, addresses_of(dev))` from `read()` whenever an address of `dev`
        comes, goes or changes (flags, lifetimes), when `dev` itself comes or goes, and after
        every resync. Returns a function that unsubscribes."""
        if "address" not in self.kinds:
            raise ValueError("this watcher does not watch addresses: add 'address' to kinds")
        self._on_addresses.setdefault(dev, []).append(callback)

        def unsubscribe() -> None:
            callbacks = self._on_addresses.get(dev, [])
            if callback in callbacks:
                callbacks.remove(callback)
            if not callbacks:
                self._on_addresses.pop(dev, None)

        return unsubscribe

    # --- reading -------------------------------------------------------------------------------
    def fileno(self) -> int:
        return self._events.fileno()

    def read(self) -> list[Change]:
        """Apply what is queued now (up to `max_datagrams` datagrams) and return the changes;
        [] if nothing changed. Re-dumps what the view can no longer trust; re-reads everything
        after an overrun."""
        self.resynced = False
        try:
            events = self._events.read(self.max_datagrams)
        except EventsOverrunError:
            return self._dispatch(self.resync())
        changes = self.view.apply(events)
        for kind in sorted(self.view.stale):
            self.redumps += 1
            changes += self.view.reload(kind, self._dump_kind(kind))
        return self._dispatch(changes)

    def resync(self) -> list[Change]:
        """Drop what is queued and re-read every watched kind; returns the differences.
        `read()` calls it after an overrun; callers may too (it sets `resynced`)."""
        for _ in range(self.DRAIN_LIMIT // max(self.max_datagrams, 1)):
            try:
                if not self._events.read(self.max_datagrams):
                    break
            except EventsOverrunError:
                continue
        self.resyncs += 1
        self.resynced = True
        return self._load()

    async def next_changes(self) -> list[Change]:
        """Wait until something changed (or a resync happened) and return the changes."""
        while True:
            changes = self.read()
            if changes or self.resynced:
                return changes
            await readable(self.fileno())

    def _dispatch(self, changes: list[Change]) -> list[Change]:
        """Call the address callbacks of the devices these changes concern."""
        if not self._on_addresses:
            return changes
        devs: set[str | None] = set()
        if self.resynced:
            devs.update(self._on_addresses)
        else:
            for c in changes:
                if isinstance(c.obj, Address):
                    devs.add(c.obj.dev)
                elif isinstance(c.obj, Link) and c.action != CHANGED:
                    devs.add(c.obj.name)
                elif (isinstance(c.obj, Link) and isinstance(c.previous, Link)
                      and c.previous.name != c.obj.name):  # renamed: both names are concerned
                    devs |= {c.previous.name, c.obj.name}
        for dev in sorted(d for d in devs if d is not None and d in self._on_addresses):
            addresses = self.view.addresses_of(dev)
            for callback in list(self._on_addresses.get(dev, ())):
                callback(dev, addresses)
        return changes

    def _load(self) -> list[Change]:
        """Dump every watched kind and make it the view."""
        links = self._dump_kind("link")
        rest = {kind: self._dump_kind(kind) if kind in self.kinds else []
                for kind in ("address", "route", "neighbour", "rule")}
        return self.view.load(links, rest["address"], rest["route"], rest["neighbour"],
                              rest["rule"])

    def _dump_kind(self, kind: str) -> list[Any]:
        assert self._netlink is not None
        if kind == "link":
            links = self._netlink.links()
            # notifications name devices from this map: bring it up to date with the dump
            self._events.names.clear()
            self._events.names.update({link.index: link.name for link in links})
            return links
        if kind == "address":
            return self._netlink.addresses()
        if kind == "route":
            return self._netlink.routes(None)
        if kind == "rule":
            return self._netlink.rules()
        return self._netlink.neighbours()

    # --- lifecycle -----------------------------------------------------------------------------
    def close(self) -> None:
        self._events.close()
        if self._own_netlink and self._netlink is not None:
            self._netlink.close()
            self._netlink = None

    def __enter__(self) -> KernelWatcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
