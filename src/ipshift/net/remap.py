"""Stateless per-flow address and port remaps, held as elements of nft maps in an owned table.

    remaps = FlowRemaps(OwnedTable(Nft(netns), "inet", "sacip", "eth0"))
    remaps.install()                                   # maps, counters and the fixed rules
    moved = Remap("tcp", "192.0.2.10", 40000, "198.51.100.20", 443, new_local="203.0.113.10")
    remaps.add([moved], Direction.INBOUND)             # one libnftables transaction; a
    remaps.add([moved], Direction.OUTBOUND)            # mover's order: see docs/net.md
    remaps.remove([moved])
    remaps.delete()

A `Remap` names a flow as the local sockets see it (`local`:`local_port` <-> `peer`:`peer_port`)
and as it travels on the wire (`new_local`:`new_local_port` <-> `new_peer`:`new_peer_port`;
each defaults to the socket-side value). Outbound packets are rewritten socket -> wire,
inbound packets wire -> socket. A mover changes `new_local`, its peer `new_peer`; resend
changes the local address and port. Protocols: "tcp", "udp" and "icmp" (echo request and reply
of ICMP or ICMPv6, by identifier: `local_port` is the identifier, the peer ports stay 0).

How the kernel applies it. nft can set one field per map lookup, so each rewritten field has
its own map, keyed by the whole flow tuple (`meta l4proto . saddr . sport . daddr . dport`, or
`saddr . daddr . icmp id`) as the packet is at that point. The lookups run in a fixed order,
and a later map's key holds the fields earlier ones already changed; a key that is missing ends
that rule only, so other packets (and unchanged fields) pass untouched. Only changed fields
get an element: a mover's remap is one element per direction. The order keeps the socket-side
addresses in intermediate tuples for as long as possible (outbound: ports before addresses;
inbound: addresses before ports), so an intermediate tuple is one that only the old flows use.

    inbound   prerouting -300            saddr, daddr, sport, dport   before conntrack, which
                                                                      sees socket-side tuples
    outbound  output (type route) +300,  dport, daddr                 local packets are routed
              forward +300                                            again for the new address
              postrouting +300           sport, saddr                 after NAT

Ports are set with `tcp ...`/`udp ...` payload statements so the kernel fixes the L4 checksum
(and for addresses the pseudo-header part); a UDP datagram without checksum (0) has its port
set raw instead, because the kernel's checksum update would turn the 0 into a wrong value.
"""

from __future__ import annotations

import enum
import functools
import ipaddress
import itertools
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

from ipshift.net.errors import ParseError
from ipshift.net.nft import JsonDoc
from ipshift.net.nfttable import OwnedTable

PROTOCOLS = ("tcp", "udp", "icmp")
_PROTO_NUMBERS = {6: "tcp", 17: "udp"}

PRIO_INBOUND = -300  # before conntrack (-200): it keeps the socket-side tuple
PRIO_OUTBOUND = 300  # after NAT (100), so a masqueraded source is remapped as it leaves

# tuple layouts: ports flows (proto, saddr, sport, daddr, dport); icmp flows (saddr, daddr, id)
_PORT_POS = {"saddr": 1, "sport": 2, "daddr": 3, "dport": 4}
_ICMP_POS = {"saddr": 0, "daddr": 1, "id": 2}
#: the order of the lookups per direction; the first `_DEST_STAGES` outbound ones run in the
#: output and forward hooks, the rest in postrouting
_ORDER = {
    ("out", "ports"): ("dport", "daddr", "sport", "saddr"),
    ("in", "ports"): ("saddr", "daddr", "sport", "dport"),
    ("out", "icmp"): ("daddr", "id", "saddr"),
    ("in", "icmp"): ("saddr", "daddr", "id"),
}
_DEST_STAGES = {"ports": 2, "icmp": 1}

FlowTuple = tuple[Any, ...]


class RemapError(ValueError):
    """A remap is invalid or clashes with one installed; str() is one line."""


class RemapParseError(ParseError):
    """A table listing does not hold whole, valid remaps."""


class Direction(enum.Flag):
    INBOUND = 1
    OUTBOUND = 2
    BOTH = INBOUND | OUTBOUND


_DIRS = ((Direction.OUTBOUND, "out"), (Direction.INBOUND, "in"))
_NOTHING: frozenset[Any] = frozenset()
_DIRS_INT = ((Direction.OUTBOUND.value, "out"), (Direction.INBOUND.value, "in"))


@dataclass(frozen=True)
class Remap:
    """One flow's socket-side tuple and its wire tuple; unset new_* fields keep their value.

    Addresses are normalised (`2001:DB8::1` -> `2001:db8::1`), so equal flows compare equal."""

    proto: str
    local: str
    local_port: int
    peer: str
    peer_port: int = 0
    new_local: str = ""
    new_local_port: int = -1
    new_peer: str = ""
    new_peer_port: int = -1

    def __post_init__(self) -> None:
        if self.proto not in PROTOCOLS:
            raise RemapError(f"remap protocol {self.proto!r} is not one of "
                             f"{', '.join(PROTOCOLS)}")
        fix = object.__setattr__  # normalising a frozen dataclass in place
        fix(self, "new_local", self.new_local or self.local)
        fix(self, "new_peer", self.new_peer or self.peer)
        if self.new_local_port == -1:
            fix(self, "new_local_port", self.local_port)
        if self.new_peer_port == -1:
            fix(self, "new_peer_port", self.peer_port)
        versions = set()
        for field in ("local", "peer", "new_local", "new_peer"):
            addr = _address(getattr(self, field), field)
            versions.add(addr.version)
            fix(self, field, str(addr))
        if len(versions) > 1:
            raise RemapError(f"remap {self.describe()} mixes IPv4 and IPv6: all four addresses "
                             "must be of one family")
        for field in ("local_port", "peer_port", "new_local_port", "new_peer_port"):
            port = getattr(self, field)
            if type(port) is not int or not 0 <= port <= 0xFFFF:
                raise RemapError(f"remap {field} {port!r} is not a port number (0-65535)")
        if self.proto == "icmp" and (self.peer_port or self.new_peer_port):
            raise RemapError("an icmp remap carries the echo identifier in local_port and "
                             "new_local_port: leave the peer ports 0")
        if self.inner == self.wire:
            raise RemapError(f"remap {self.describe()} changes nothing: give a new address "
                             "or port")
        # hashed once: remaps are keys of several dicts and caches per operation
        fix(self, "_hash", hash((self.proto, *self.inner, *self.wire)))

    def __hash__(self) -> int:
        return self._hash  # type: ignore[attr-defined, no-any-return]

    @property
    def version(self) -> int:
        return 6 if ":" in self.local else 4

    @property
    def inner(self) -> tuple[str, int, str, int]:
        """(local, local_port, peer, peer_port): the flow as its sockets see it."""
        return (self.local, self.local_port, self.peer, self.peer_port)

    @property
    def wire(self) -> tuple[str, int, str, int]:
        """(new_local, new_local_port, new_peer, new_peer_port): the flow on the wire."""
        return (self.new_local, self.new_local_port, self.new_peer, self.new_peer_port)

    def describe(self) -> str:
        def ep(addr: str, port: int) -> str:
            host = f"[{addr}]" if ":" in addr else addr
            return f"{host} id {port}" if self.proto == "icmp" else f"{host}:{port}"

        text = f"{self.proto} {ep(self.local, self.local_port)} - {ep(self.peer, self.peer_port)}"
        if self.wire != self.inner:
            text += (f" as {ep(self.new_local, self.new_local_port)} - "
                     f"{ep(self.new_peer, self.new_peer_port)}")
        return text


def _address(value: object, field: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    try:
        addr = ipaddress.ip_address(value)  # type: ignore[arg-type]
    except ValueError:
        raise RemapError(f"remap {field} {value!r} is not an IP address") from None
    if addr.is_unspecified or addr.is_multicast:
        raise RemapError(f"remap {field} {addr} is not a unicast address")
    return addr


# --- the fixed part of the table ---------------------------------------------------------------
def _kind(remap: Remap) -> str:
    return "icmp" if remap.proto == "icmp" else "ports"


@functools.lru_cache(maxsize=64)
def map_name(direction: str, version: int, kind: str, field: str) -> str:
    """`out4_saddr`, `in6_dport`, `out4_icmp_id`, ..."""
    return f"{direction}{version}_{'icmp_' if kind == 'icmp' else ''}{field}"


def all_map_names() -> list[str]:
    return [map_name(d, v, kind, f)
            for d in ("out", "in") for v in (4, 6) for kind in ("ports", "icmp")
            for f in _ORDER[(d, kind)]]


def _stage_rules(direction: str, version: int, kind: str, field: str) -> list[str]:
    ip = "ip" if version == 4 else "ip6"
    name = map_name(direction, version, kind, field)
    tail = f"map @{name} counter name \"{name}\""
    if kind == "icmp":
        icmp = "icmp" if version == 4 else "icmpv6"
        key = f"{ip} saddr . {ip} daddr . {icmp} id"
        target = f"{icmp} id" if field == "id" else f"{ip} {field}"
        return [f"{icmp} type {{ echo-request, echo-reply }} {target} set {key} {tail}"]
    key = f"meta l4proto . {ip} saddr . th sport . {ip} daddr . th dport"
    if field.endswith("addr"):
        return [f"meta l4proto {{ tcp, udp }} {ip} {field} set {key} {tail}"]
    offset = 0 if field == "sport" else 16
    return [
        f"meta l4proto tcp tcp {field} set {key} {tail}",
        f"meta l4proto udp udp checksum != 0 udp {field} set {key} {tail}",
        # no checksum (0): set the port raw, without the checksum update
        f"meta l4proto udp udp checksum 0 @th,{offset},16 set {key} {tail}",
    ]


def remap_body() -> str:
    """What FlowRemaps puts into its table (nft syntax): the maps, one named counter per map
    (packets rewritten by that lookup), and the chains with the fixed lookup rules."""
    lines = []
    for direction in ("out", "in"):
        for version in (4, 6):
            ip, addr = ("ip", "ipv4_addr") if version == 4 else ("ip6", "ipv6_addr")
            icmp = "icmp" if version == 4 else "icmpv6"
            for field in _ORDER[(direction, "ports")]:
                value = addr if field.endswith("addr") else "inet_service"
                name = map_name(direction, version, "ports", field)
                lines.append(f"map {name} {{ type inet_proto . {addr} . inet_service . {addr} "
                             f". inet_service : {value}; }}")
            for field in _ORDER[(direction, "icmp")]:
                # typeof: the ICMP identifier has no fixed-size datatype of its own
                value = f"{icmp} id" if field == "id" else f"{ip} {field}"
                name = map_name(direction, version, "icmp", field)
                lines.append(f"map {name} {{ typeof {ip} saddr . {ip} daddr . {icmp} id : "
                             f"{value}; }}")
    lines += [f"counter {name} {{ }}" for name in all_map_names()]

    def chain(name: str, head: str, stages: Iterable[tuple[str, str, int]]) -> None:
        lines.append(f"chain {name} {{")
        if head:
            lines.append(head)
        # a kind's stages stay in their order; kinds never share a map, versions neither
        for direction, kind, index in stages:
            for version in (4, 6):
                order = _ORDER[(direction, kind)]
                lines.extend(_stage_rules(direction, version, kind, order[index]))
        lines.append("}")

    dest = [("out", kind, i) for kind in ("ports", "icmp") for i in range(_DEST_STAGES[kind])]
    chain("outbound_dest", "", dest)
    lines.append(f"chain output {{ type route hook output priority {PRIO_OUTBOUND}; "
                 "policy accept; jump outbound_dest; }")
    lines.append(f"chain forward {{ type filter hook forward priority {PRIO_OUTBOUND}; "
                 "policy accept; jump outbound_dest; }")
    source = [("out", kind, i) for kind in ("ports", "icmp")
              for i in range(_DEST_STAGES[kind], len(_ORDER[("out", kind)]))]
    chain("postrouting", f"type filter hook postrouting priority {PRIO_OUTBOUND}; "
          "policy accept;", source)
    inbound = [("in", kind, i) for kind in ("ports", "icmp")
               for i in range(len(_ORDER[("in", kind)]))]
    chain("prerouting", f"type filter hook prerouting priority {PRIO_INBOUND}; policy accept;",
          inbound)
    return "\n".join(lines) + "\n"


# --- elements of one remap ---------------------------------------------------------------------
def _ends(remap: Remap, direction: str) -> tuple[FlowTuple, FlowTuple]:
    """(tuple before the lookups, tuple after them) of a remap's packets in one direction."""
    local, lport, peer, pport = remap.inner
    nlocal, nlport, npeer, npport = remap.wire
    if remap.proto == "icmp":
        if direction == "out":
            return (local, peer, lport), (nlocal, npeer, nlport)
        return (npeer, nlocal, nlport), (peer, local, lport)
    if direction == "out":
        return (remap.proto, local, lport, peer, pport), (remap.proto, nlocal, nlport, npeer,
                                                          npport)
    return (remap.proto, npeer, npport, nlocal, nlport), (remap.proto, peer, pport, local, lport)


class Lookup(NamedTuple):
    """One map lookup a remap's packets go through: its key, and the new value if the remap
    has an element there (None: the field stays, the lookup must miss). (A named tuple: a
    move of thousands of sessions makes tens of thousands.)"""

    map: str
    key: FlowTuple
    value: str | int | None


def lookups(remap: Remap, direction: Direction) -> Iterator[Lookup]:
    """Every lookup of the remap's packets in `direction` (INBOUND or OUTBOUND or BOTH)."""
    return iter(_lookups(remap, direction.value))


@functools.lru_cache(maxsize=1 << 16)
def _lookups(remap: Remap, direction: int) -> tuple[Lookup, ...]:
    # cached: a move of thousands of sessions asks for the same remaps' lookups several
    # times (slots, elements, clash checks), and they never change
    kind = _kind(remap)
    pos = _ICMP_POS if kind == "icmp" else _PORT_POS
    out = []
    for flag, dname in _DIRS_INT:
        if not direction & flag:
            continue
        current, end = _ends(remap, dname)
        for field in _ORDER[(dname, kind)]:
            i = pos[field]
            name = map_name(dname, remap.version, kind, field)
            if current[i] == end[i]:
                out.append(Lookup(name, current, None))
            else:
                out.append(Lookup(name, current, end[i]))
                current = _with(current, i, end[i])
    return tuple(out)


def _with(flow: FlowTuple, index: int, value: Any) -> FlowTuple:
    """`flow` with field `index` set to `value`."""
    return (*flow[:index], value, *flow[index + 1:])


def _slots(remap: Remap, direction: Direction) -> Iterator[tuple[str, FlowTuple]]:
    """What must be unique to the remap: every lookup key, and where each direction ends (two
    flows rewritten to one tuple could not be told apart on the way back)."""
    return iter(_slot_tuple(remap, direction.value))


@functools.lru_cache(maxsize=1 << 16)
def _slot_tuple(remap: Remap, direction: int) -> tuple[tuple[str, FlowTuple], ...]:
    out = [(lk.map, lk.key) for lk in _lookups(remap, direction)]
    for flag, dname in _DIRS_INT:
        if direction & flag:
            out.append((f"{dname}{remap.version}_{_kind(remap)}_result",
                        _ends(remap, dname)[1]))
    return tuple(out)


def _json_key(key: FlowTuple) -> JsonDoc:
    return {"concat": list(key)}


def element_commands(
    family: str,
    table: str,
    add: Iterable[tuple[Remap, Direction]] = (),
    delete: Iterable[tuple[Remap, Direction]] = (),
) -> list[JsonDoc]:
    """libnftables JSON commands that delete, then add, the elements of these remaps (one
    command per map and verb; run them as one transaction)."""
    commands: list[JsonDoc] = []
    for verb, items in (("delete", delete), ("add", add)):
        per_map: dict[str, list[Any]] = {}
        for remap, direction in items:
            for lk in lookups(remap, direction):
                if lk.value is None:
                    continue
                key = _json_key(lk.key)
                per_map.setdefault(lk.map, []).append(key if verb == "delete" else
                                                      [key, lk.value])
        for name in sorted(per_map):
            commands.append({verb: {"element": {"family": family, "table": table,
                                                "name": name, "elem": per_map[name]}}})
    return commands


def _commands(family: str, table: str, deletes: Iterable[tuple[str, FlowTuple]],
              adds: Iterable[tuple[str, FlowTuple, Any]]) -> list[JsonDoc]:
    """Commands that delete these elements, then add those (one command per map and verb)."""
    commands: list[JsonDoc] = []
    for verb, per_map in (("delete", _by_map((m, _json_key(k)) for m, k in deletes)),
                          ("add", _by_map((m, [_json_key(k), v]) for m, k, v in adds))):
        for name in sorted(per_map):
            commands.append({verb: {"element": {"family": family, "table": table,
                                                "name": name, "elem": per_map[name]}}})
    return commands


def _by_map(items: Iterable[tuple[str, Any]]) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {}
    for name, elem in items:
        out.setdefault(name, []).append(elem)
    return out


# --- reading remaps back from a listing ---------------------------------------------------------
def describe(listing: Mapping[str, Any]) -> dict[Remap, Direction]:
    """The remaps whose elements a table listing (`Nft.list_table`, JSON) holds, with the
    directions they are installed in. Maps of other names are ignored; RemapParseError if the
    elements are malformed or do not form whole remaps."""
    items = listing.get("nftables") if isinstance(listing, Mapping) else None
    if not isinstance(items, list):
        raise RemapParseError("remap listing: no 'nftables' list")
    known = set(all_map_names())
    maps: dict[str, dict[FlowTuple, Any]] = {name: {} for name in known}
    for item in items:
        if not isinstance(item, Mapping) or not isinstance(item.get("map"), Mapping):
            continue
        name = item["map"].get("name")
        if name not in known:
            continue
        elems = item["map"].get("elem", [])
        if not isinstance(elems, list):
            raise RemapParseError(f"remap listing: map {name} has no element list")
        for elem in elems:
            key, value = _parse_element(name, elem)
            if key in maps[name]:
                raise RemapParseError(f"remap listing: map {name} lists a key twice")
            maps[name][key] = value
    found: dict[Remap, Direction] = {}
    for flag, dname in _DIRS:
        for version in (4, 6):
            for kind in ("ports", "icmp"):
                for start, end in _walk_maps(maps, dname, version, kind):
                    remap = _remap_of(dname, kind, start, end)
                    found[remap] = found.get(remap, Direction(0)) | flag
    return found


def _parse_element(name: str, elem: Any) -> tuple[FlowTuple, Any]:
    where = f"remap listing: map {name}"
    if not isinstance(elem, list) or len(elem) != 2 or not isinstance(elem[0], Mapping):
        raise RemapParseError(f"{where}: an element is not [key, value]")
    parts = elem[0].get("concat")
    version = 6 if name[len("out" if name.startswith("out") else "in")] == "6" else 4
    icmp = "_icmp_" in name
    if not isinstance(parts, list) or len(parts) != (3 if icmp else 5):
        raise RemapParseError(f"{where}: a key is not a concatenation of the flow's fields")
    if icmp:
        key: FlowTuple = (_addr(parts[0], version, where), _addr(parts[1], version, where),
                          _port(parts[2], where))
    else:
        proto = parts[0]
        if type(proto) is int:
            proto = _PROTO_NUMBERS.get(proto, proto)
        if proto not in ("tcp", "udp"):
            raise RemapParseError(f"{where}: protocol {str(proto)[:20]!r} is not tcp or udp")
        key = (proto, _addr(parts[1], version, where), _port(parts[2], where),
               _addr(parts[3], version, where), _port(parts[4], where))
    field = name.rsplit("_", 1)[1]
    value = _addr(elem[1], version, where) if field.endswith("addr") else _port(elem[1], where)
    return key, value


def _addr(value: Any, version: int, where: str) -> str:
    try:
        addr = ipaddress.ip_address(value) if isinstance(value, str) else None
    except ValueError:
        addr = None
    if addr is None or addr.version != version:
        raise RemapParseError(f"{where}: {str(value)[:50]!r} is not an IPv{version} address")
    return str(addr)


def _port(value: Any, where: str) -> int:
    if type(value) is not int or not 0 <= value <= 0xFFFF:
        raise RemapParseError(f"{where}: {str(value)[:20]!r} is not a port or identifier")
    return value


def _walk_maps(
    maps: Mapping[str, Mapping[FlowTuple, Any]], direction: str, version: int, kind: str
) -> list[tuple[FlowTuple, FlowTuple]]:
    """(start, end) tuples of the remaps held by one direction's maps: every element is traced
    back to the tuple its packets had before the first lookup, then forward to the end."""
    pos = _ICMP_POS if kind == "icmp" else _PORT_POS
    order = _ORDER[(direction, kind)]
    stages = [(pos[f], maps[map_name(direction, version, kind, f)]) for f in order]
    # undo[k]: tuple after stage k's rewrite -> the tuples before it. Inbound, one flow may
    # arrive under two wire tuples (while its peer learns of a move): both end at its own
    # tuple, and the elements after they meet are shared.
    shared = direction == "in"
    undo: list[dict[FlowTuple, list[FlowTuple]]] = []
    for i, stage in stages:
        back: dict[FlowTuple, list[FlowTuple]] = {}
        for key, value in stage.items():
            after = _with(key, i, value)
            if after in back and not shared:
                raise RemapParseError(f"remap listing: two elements of {direction}{version} "
                                      "rewrite to the same tuple")
            back.setdefault(after, []).append(key)
        undo.append(back)
    starts = set()
    for k, (_, stage) in enumerate(stages):
        for key in stage:
            currents = [key]
            for j in range(k - 1, -1, -1):
                currents = [before for current in currents
                            for before in undo[j].get(current, [current])]
            starts.update(currents)
    used: set[tuple[int, FlowTuple]] = set()
    pairs = []
    for start in sorted(starts, key=repr):
        current = start
        for k, (i, stage) in enumerate(stages):
            if current in stage:
                if (k, current) in used and not shared:
                    raise RemapParseError(f"remap listing: an element of {direction}{version} "
                                          "belongs to two flows")
                used.add((k, current))
                current = _with(current, i, stage[current])
        pairs.append((start, current))
    if len(used) != sum(len(stage) for _, stage in stages):
        raise RemapParseError(f"remap listing: elements of {direction}{version} do not form "
                              "whole remaps")
    return pairs


def _remap_of(direction: str, kind: str, start: FlowTuple, end: FlowTuple) -> Remap:
    if kind == "icmp":
        if direction == "out":
            (local, peer, lport), (nlocal, npeer, nlport) = start, end
        else:
            (npeer, nlocal, nlport), (peer, local, lport) = start, end
        fields: tuple[Any, ...] = ("icmp", local, lport, peer, 0, nlocal, nlport, npeer, 0)
    elif direction == "out":
        (proto, local, lport, peer, pport), (_, nlocal, nlport, npeer, npport) = start, end
        fields = (proto, local, lport, peer, pport, nlocal, nlport, npeer, npport)
    else:
        (proto, npeer, npport, nlocal, nlport), (_, peer, pport, local, lport) = start, end
        fields = (proto, local, lport, peer, pport, nlocal, nlport, npeer, npport)
    try:
        return Remap(*fields)
    except RemapError as exc:
        raise RemapParseError(f"remap listing: {exc}") from None


# --- the remaps of one table ---------------------------------------------------------------------
class FlowRemaps:
    """The remaps of one owned table (family inet), added and removed in batches."""

    def __init__(self, table: OwnedTable) -> None:
        if table.family != "inet":
            raise ValueError(f"flow remaps need an inet table, not {table.family}")
        self.table = table
        self._installed: dict[Remap, Direction] = {}
        # every lookup key and result in use -> the remaps whose packets have it (clashes)
        self._keys: dict[tuple[str, FlowTuple], dict[Remap, None]] = {}
        # every element in the maps -> how many installed (remap, direction) pairs need it
        self._users: dict[tuple[str, FlowTuple], int] = {}
        self.added = 0  # (remap, direction) pairs installed, since the start
        self.removed = 0
        self.transactions = 0
        self.failed = 0

    # --- lifecycle ---------------------------------------------------------------------------
    def install(self, extra: str = "", *, force: bool = False) -> None:
        """Create (or replace) the table with the maps and fixed rules, plus `extra` (nft
        syntax, e.g. a component's own chains). Starts with no remaps."""
        self.table.create(remap_body() + extra, force=force)
        self._forget()

    def delete(self) -> bool:
        """Remove the table with every remap; False if it was not there."""
        gone = self.table.delete()
        self._forget()
        return gone

    def _forget(self) -> None:
        self._installed.clear()
        self._keys.clear()
        self._users.clear()

    # --- changes -------------------------------------------------------------------------------
    def add(self, remaps: Iterable[Remap], direction: Direction = Direction.BOTH) -> int:
        """Install remaps in `direction` in one transaction; returns how many changed (ones
        installed already are skipped). RemapError if one clashes with another."""
        return self.update(add=remaps, direction=direction)[0]

    def remove(self, remaps: Iterable[Remap], direction: Direction = Direction.BOTH) -> int:
        """Remove remaps (in `direction`) in one transaction; ones not installed are skipped."""
        return self.update(remove=remaps, direction=direction)[1]

    def update(
        self,
        *,
        add: Iterable[Remap] = (),
        remove: Iterable[Remap] = (),
        direction: Direction = Direction.BOTH,
    ) -> tuple[int, int]:
        """Remove some remaps and add others in one transaction (e.g. a flow that moves again:
        its old remap out, the new one in, no packet in between sees neither). Returns (added,
        removed). Nothing changes if anything fails."""
        dels: list[tuple[Remap, Direction]] = []
        for remap in dict.fromkeys(remove):
            have = self._installed.get(remap, Direction(0)) & direction
            if have:
                dels.append((remap, have))
        removing = dict(dels)
        # What the slots and elements would be, as changes to the current ones (kept apart
        # until nft has taken the transaction; never a copy of everything installed).
        slot_gone: dict[tuple[str, FlowTuple], set[Remap]] = {}
        slot_new: dict[tuple[str, FlowTuple], dict[Remap, None]] = {}
        users: dict[tuple[str, FlowTuple], int] = {}  # changed counts only

        def count(element: tuple[str, FlowTuple]) -> int:
            return users.get(element, self._users.get(element, 0))

        gone: list[tuple[str, FlowTuple]] = []
        for remap, have in dels:
            for slot in _slots(remap, have):
                slot_gone.setdefault(slot, set()).add(remap)
            for lk in lookups(remap, have):
                if lk.value is not None:
                    element = (lk.map, lk.key)
                    users[element] = count(element) - 1
                    if not users[element]:
                        gone.append(element)
        adds: list[tuple[Remap, Direction]] = []
        new: list[tuple[str, FlowTuple, Any]] = []
        for remap in dict.fromkeys(add):
            if not isinstance(remap, Remap):
                raise RemapError(f"not a Remap: {remap!r}")
            held_dirs = self._installed.get(remap, Direction(0)) & ~removing.get(remap,
                                                                                  Direction(0))
            want = direction & ~held_dirs
            if not want:
                continue
            for slot in _slot_tuple(remap, want.value):
                current, arriving = self._keys.get(slot), slot_new.get(slot)
                if current or arriving:
                    leaving = slot_gone.get(slot, _NOTHING)
                    for other in itertools.chain(current or (), arriving or ()):
                        # One flow may arrive under two wire tuples at once (while its peer
                        # learns of a move): on the way in, both lead to the flow's own
                        # tuple.
                        if other != remap and other not in leaving and not (
                                slot[0].startswith("in") and other.inner == remap.inner):
                            raise RemapError(
                                f"remap {remap.describe()} clashes with {other.describe()}: "
                                f"their packets look alike at {slot[0]}; remove one first")
                if arriving is None:
                    slot_new[slot] = {remap: None}
                else:
                    arriving[remap] = None
            for lk in _lookups(remap, want.value):
                if lk.value is not None:
                    element = (lk.map, lk.key)
                    if not count(element):
                        new.append((lk.map, lk.key, lk.value))
                    users[element] = count(element) + 1
            adds.append((remap, want))
        if not adds and not dels:
            return 0, 0
        commands = _commands("inet", self.table.name, gone, new)
        if commands:
            self.transactions += 1
            try:
                self.table.nft.run_json(commands)
            except Exception:
                self.failed += 1
                raise
        for remap, have in dels:
            left = self._installed[remap] & ~have
            if left:
                self._installed[remap] = left
            else:
                del self._installed[remap]
        for remap, want in adds:
            self._installed[remap] = self._installed.get(remap, Direction(0)) | want
        for slot, leaving in slot_gone.items():
            held = self._keys.get(slot)
            if held is not None:
                for remap in leaving:
                    held.pop(remap, None)
                if not held:
                    del self._keys[slot]
        for slot, arriving in slot_new.items():
            self._keys.setdefault(slot, {}).update(arriving)
        for element, users_now in users.items():
            if users_now:
                self._users[element] = users_now
            else:
                self._users.pop(element, None)
        self.added += len(adds)
        self.removed += len(dels)
        return len(adds), len(dels)

    def adopt(self) -> dict[Remap, Direction]:
        """Take over the remaps a table left by an earlier run holds (a restart): they stay
        installed and are known as if added here. The table must exist."""
        self._forget()
        found = self.read_back()
        for remap, direction in found.items():
            self._installed[remap] = direction
            for slot in _slots(remap, direction):
                self._keys.setdefault(slot, {})[remap] = None
            for lk in lookups(remap, direction):
                if lk.value is not None:
                    element = (lk.map, lk.key)
                    self._users[element] = self._users.get(element, 0) + 1
        return found

    # --- what is there -------------------------------------------------------------------------
    def remaps(self) -> dict[Remap, Direction]:
        """The remaps installed, with their directions."""
        return dict(self._installed)

    def __len__(self) -> int:
        return len(self._installed)

    def read_back(self) -> dict[Remap, Direction]:
        """The remaps the kernel's maps hold (reads the whole table: for checks, not the hot
        path)."""
        return describe(self.table.nft.list_table("inet", self.table.name))

    def packet_counts(self) -> dict[str, int]:
        """Packets rewritten per lookup (map name -> packets) since the table was created;
        lookups that rewrote nothing are left out."""
        doc = self.table.nft.run_json(
            [{"list": {"counters": {"family": "inet", "table": self.table.name}}}])
        counts = {}
        for item in doc.get("nftables", []):
            counter = item.get("counter") if isinstance(item, dict) else None
            if isinstance(counter, dict) and counter.get("packets"):
                counts[str(counter.get("name"))] = int(counter["packets"])
        return counts

    def status(self) -> dict[str, Any]:
        """Counters for a daemon's status document (no kernel call)."""
        by_proto = {p: 0 for p in PROTOCOLS}
        inbound = outbound = 0
        for remap, direction in self._installed.items():
            by_proto[remap.proto] += 1
            inbound += bool(direction & Direction.INBOUND)
            outbound += bool(direction & Direction.OUTBOUND)
        return {
            "table": self.table.spec,
            "remaps": len(self._installed),
            "inbound": inbound,
            "outbound": outbound,
            "elements": len(self._users),
            "by_proto": by_proto,
            "added": self.added,
            "removed": self.removed,
            "transactions": self.transactions,
            "failed_transactions": self.failed,
        }
