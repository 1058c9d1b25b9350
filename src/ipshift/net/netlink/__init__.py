"""rtnetlink through pyroute2: links, addresses, routes (incl. multipath), rules, neighbours,
nexthop objects, and an event subscription usable from asyncio.

    with Netlink(netns="ipsh-x-r") as nl:
        nl.add_route(Route("203.0.113.0/24", nexthops=(NextHop("192.0.2.1", "eth0", weight=3),
                                                          NextHop("198.51.100.1", "eth1"))))
        for route in nl.routes(table=RT_TABLE_MAIN):
            ...

Everything returns plain frozen dataclasses (`Link`, `Address`, `Route`, `NextHop`, `Rule`,
`Neighbour`, `NexthopObject`), never pyroute2 messages. A `Netlink` keeps one pyroute2 `IPRoute`
on an `NsWorker` thread inside its namespace (pyroute2 0.9's synchronous API is thread-bound);
create one per namespace and keep it for the life of a daemon.

pyroute2 0.9.7 facts this module works around: multipath weight is `hops` = weight - 1;
`flush_routes()` deletes only part of a large table per call (`delete_routes` lists first, then
deletes); there are no nexthop objects (`ip -json nexthop` is used instead) and routes that use one
(`nhid`) are added with `ip route`; RTA_NH_ID is not decoded (read from the raw attribute).
"""

from __future__ import annotations

import asyncio
import errno as _errno
import ipaddress
import json
import logging
import socket
import struct
import subprocess
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ipshift.net import netns as _netns
from ipshift.net.errors import NetError, ParseError
from ipshift.net.worker import NsWorker

log = logging.getLogger("ipshift.net")

# routing tables
RT_TABLE_UNSPEC = 0
RT_TABLE_DEFAULT = 253
RT_TABLE_MAIN = 254
RT_TABLE_LOCAL = 255

# route protocols (rtnetlink.h)
RTPROT_UNSPEC = 0
RTPROT_REDIRECT = 1
RTPROT_KERNEL = 2
RTPROT_BOOT = 3
RTPROT_STATIC = 4
RTPROT_RA = 9
RTPROT_DHCP = 16

# scopes
RT_SCOPE_UNIVERSE = 0
RT_SCOPE_SITE = 200
RT_SCOPE_LINK = 253
RT_SCOPE_HOST = 254
RT_SCOPE_NOWHERE = 255

# next-hop flags (RTNH_F_*)
RTNH_F_DEAD = 1
RTNH_F_PERVASIVE = 2
RTNH_F_ONLINK = 4
RTNH_F_OFFLOAD = 8
RTNH_F_LINKDOWN = 16

ROUTE_TYPES = {
    0: "unspec", 1: "unicast", 2: "local", 3: "broadcast", 4: "anycast", 5: "multicast",
    6: "blackhole", 7: "unreachable", 8: "prohibit", 9: "throw", 10: "nat",
}
_ROUTE_TYPE_IDS = {v: k for k, v in ROUTE_TYPES.items()}

# rule actions (FR_ACT_*)
RULE_ACTIONS = {1: "lookup", 2: "goto", 3: "nop", 6: "blackhole", 7: "unreachable",
                8: "prohibit"}
_RULE_ACTION_IDS = {v: k for k, v in RULE_ACTIONS.items()}

# neighbour states and flags
NUD_INCOMPLETE = 0x01
NUD_REACHABLE = 0x02
NUD_STALE = 0x04
NUD_DELAY = 0x08
NUD_PROBE = 0x10
NUD_FAILED = 0x20
NUD_NOARP = 0x40
NUD_PERMANENT = 0x80
NUD_NONE = 0x00
NUD_NAMES = {
    NUD_INCOMPLETE: "INCOMPLETE", NUD_REACHABLE: "REACHABLE", NUD_STALE: "STALE",
    NUD_DELAY: "DELAY", NUD_PROBE: "PROBE", NUD_FAILED: "FAILED", NUD_NOARP: "NOARP",
    NUD_PERMANENT: "PERMANENT",
}
NTF_USE = 0x01
NTF_PROXY = 0x08
NTF_ROUTER = 0x80
NTF_EXT_MANAGED = 0x01  # in NDA_FLAGS_EXT

# link flags
IFF_UP = 0x1
IFF_LOWER_UP = 0x10000

# address flags
IFA_F_NODAD = 0x02
IFA_F_DADFAILED = 0x08
IFA_F_DEPRECATED = 0x20
IFA_F_TENTATIVE = 0x40
IFA_F_PERMANENT = 0x80

RTA_NH_ID = 30
INFINITY_LIFE_TIME = 0xFFFFFFFF


class NetlinkError(NetError):
    """An rtnetlink request failed; names the request and the kernel's reason."""


# --- plain data ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Link:
    index: int
    name: str
    up: bool = False  # administratively up (IFF_UP)
    carrier: bool = False  # lower layer up (IFF_LOWER_UP)
    operstate: str = "UNKNOWN"
    mtu: int = 0
    address: str | None = None  # link-layer address
    kind: str | None = None  # "veth", "tun", "bridge", ... (None for plain devices)
    master: int | None = None
    flags: int = 0


@dataclass(frozen=True)
class Address:
    address: str
    prefixlen: int
    ifindex: int
    dev: str | None = None
    scope: int = RT_SCOPE_UNIVERSE
    flags: int = 0
    peer: str | None = None  # point-to-point peer (IFA_ADDRESS differing from IFA_LOCAL)
    valid_lft: int | None = None  # seconds; None = forever
    preferred_lft: int | None = None

    @property
    def family(self) -> int:
        return socket.AF_INET6 if ":" in self.address else socket.AF_INET

    @property
    def cidr(self) -> str:
        return f"{self.address}/{self.prefixlen}"

    @property
    def tentative(self) -> bool:
        return bool(self.flags & IFA_F_TENTATIVE)

    @property
    def dadfailed(self) -> bool:
        return bool(self.flags & IFA_F_DADFAILED)

    @property
    def deprecated(self) -> bool:
        return bool(self.flags & IFA_F_DEPRECATED)


@dataclass(frozen=True)
class NextHop:
    """One path of a multipath route. `weight` is the real weight (pyroute2's hops + 1)."""

    gateway: str | None = None
    dev: str | None = None
    weight: int = 1
    onlink: bool = False
    # kernel-reported state, not part of equality
    flags: int = field(default=0, compare=False)
    ifindex: int | None = field(default=None, compare=False)

    @property
    def dead(self) -> bool:
        return bool(self.flags & RTNH_F_DEAD)

    @property
    def linkdown(self) -> bool:
        return bool(self.flags & RTNH_F_LINKDOWN)


@dataclass(frozen=True)
class Route:
    """A route. Equality covers what can be set; `flags` and `ifindex` are kernel state.

    `dst` is a network in CIDR form ("0.0.0.0/0" and "::/0" for default routes; "default" is
    accepted when adding). `src` is the preferred source address (RTA_PREFSRC). `metric` None
    means the kernel default (0 for IPv4, 1024 for IPv6). `scope` None picks what `ip route`
    would: host for local routes, link for unicast routes without a gateway, else universe.
    `nhid` refers to a nexthop object instead of gateway/dev/nexthops.
    """

    dst: str
    gateway: str | None = None
    dev: str | None = None
    table: int = RT_TABLE_MAIN
    src: str | None = None
    metric: int | None = None
    proto: int = RTPROT_STATIC
    scope: int | None = None
    type: str = "unicast"
    nexthops: tuple[NextHop, ...] = ()
    nhid: int | None = None
    mtu: int | None = None
    onlink: bool = False
    flags: int = field(default=0, compare=False)
    ifindex: int | None = field(default=None, compare=False)

    @property
    def family(self) -> int:
        return socket.AF_INET6 if ":" in self.dst else socket.AF_INET

    @property
    def is_default(self) -> bool:
        return self.dst.endswith("/0")

    @property
    def linkdown(self) -> bool:
        return bool(self.flags & RTNH_F_LINKDOWN)

    def describe(self) -> str:
        parts = [self.dst if self.type == "unicast" else f"{self.type} {self.dst}"]
        if self.nhid is not None:
            parts.append(f"nhid {self.nhid}")
        if self.gateway:
            parts.append(f"via {self.gateway}")
        if self.dev:
            parts.append(f"dev {self.dev}")
        for hop in self.nexthops:
            parts.append(f"nexthop via {hop.gateway} dev {hop.dev} weight {hop.weight}")
        if self.table != RT_TABLE_MAIN:
            parts.append(f"table {self.table}")
        if self.metric is not None:
            parts.append(f"metric {self.metric}")
        return " ".join(parts)


@dataclass(frozen=True)
class Rule:
    """A policy routing rule. `src`/`dst` are CIDR networks; `family` follows them when given."""

    priority: int
    table: int = RT_TABLE_MAIN
    family: int = socket.AF_INET
    src: str | None = None
    dst: str | None = None
    fwmark: int | None = None
    fwmask: int | None = None
    iif: str | None = None
    oif: str | None = None
    action: str = "lookup"
    suppress_prefixlen: int | None = None
    proto: int | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        families = {socket.AF_INET6 if ":" in v else socket.AF_INET
                    for v in (self.src, self.dst) if v}
        if len(families) > 1:
            raise ValueError(f"rule {self.priority} mixes IPv4 and IPv6 selectors")
        if families:
            object.__setattr__(self, "family", families.pop())


@dataclass(frozen=True)
class Neighbour:
    dst: str
    ifindex: int
    dev: str | None = None
    lladdr: str | None = None
    state: int = NUD_NONE
    flags: int = 0
    ext_flags: int = 0
    probes: int | None = None

    @property
    def family(self) -> int:
        return socket.AF_INET6 if ":" in self.dst else socket.AF_INET

    @property
    def state_names(self) -> tuple[str, ...]:
        if self.state == NUD_NONE:
            return ("NONE",)
        return tuple(name for bit, name in NUD_NAMES.items() if self.state & bit)

    @property
    def reachable(self) -> bool:
        return bool(self.state & (NUD_REACHABLE | NUD_PERMANENT | NUD_NOARP))

    @property
    def failed(self) -> bool:
        return bool(self.state & NUD_FAILED)

    @property
    def managed(self) -> bool:
        return bool(self.ext_flags & NTF_EXT_MANAGED)

    @property
    def router(self) -> bool:
        return bool(self.flags & NTF_ROUTER)


@dataclass(frozen=True)
class NexthopObject:
    """A kernel nexthop object (`ip nexthop`): a gateway/device, a blackhole, or a group of
    other objects given as (id, weight) pairs."""

    id: int
    gateway: str | None = None
    dev: str | None = None
    group: tuple[tuple[int, int], ...] = ()
    blackhole: bool = False
    onlink: bool = False
    fdb: bool = False
    family: int | None = field(default=None, compare=False)
    protocol: str | None = field(default=None, compare=False)
    flags: tuple[str, ...] = field(default=(), compare=False)

    @property
    def dead(self) -> bool:
        return "dead" in self.flags

    @property
    def linkdown(self) -> bool:
        return "linkdown" in self.flags


@dataclass(frozen=True)
class NetlinkEvent:
    """One rtnetlink notification: `action` is "new" or "del"."""

    action: str
    obj: Link | Address | Route | Rule | Neighbour


# --- pyroute2 message -> dataclass -----------------------------------------------------------


def _attrs_of(msg: Any) -> Callable[[str], Any]:
    """Attribute lookup by name after one pass over the message. pyroute2's get_attr rescans
    (and re-wraps) every attribute on each call, which dominated the decoding cost."""
    slots: dict[str, Any] = {}
    for slot in msg["attrs"]:
        name = slot[0]
        if name not in slots:
            slots[name] = slot

    def get(name: str) -> Any:
        slot = slots.get(name)
        return None if slot is None else slot[1]

    return get


def _raw_u32_attr(msg: Any, nla_type: int) -> int | None:
    """Value of an attribute pyroute2 does not decode (it keeps the raw buffer and offset)."""
    for slot in msg["attrs"]:
        if slot[0] != "UNKNOWN":
            continue
        value = slot[1]
        try:
            length, kind = struct.unpack_from("=HH", value.data, value.offset)
            if kind == nla_type and length >= 8:
                return int(struct.unpack_from("=I", value.data, value.offset + 4)[0])
        except (AttributeError, TypeError, struct.error):
            continue
    return None


def _name(names: Mapping[int, str], index: int | None) -> str | None:
    if not index:
        return None
    return names.get(index)


def link_from_msg(msg: Any) -> Link:
    attr = _attrs_of(msg)
    flags = int(msg["flags"] or 0)
    linkinfo = attr("IFLA_LINKINFO")
    kind = linkinfo.get_attr("IFLA_INFO_KIND") if linkinfo is not None else None
    return Link(
        index=int(msg["index"]),
        name=str(attr("IFLA_IFNAME") or ""),
        up=bool(flags & IFF_UP),
        carrier=bool(flags & IFF_LOWER_UP),
        operstate=str(attr("IFLA_OPERSTATE") or "UNKNOWN"),
        mtu=int(attr("IFLA_MTU") or 0),
        address=attr("IFLA_ADDRESS"),
        kind=kind,
        master=attr("IFLA_MASTER"),
        flags=flags,
    )


def address_from_msg(msg: Any, names: Mapping[int, str]) -> Address:
    attr = _attrs_of(msg)
    family = msg["family"]
    addr = attr("IFA_ADDRESS")
    local = attr("IFA_LOCAL")
    peer = None
    if family == socket.AF_INET and local is not None:
        if addr is not None and addr != local:
            peer = addr
        addr = local
    elif local is not None and addr is not None and local != addr:  # IPv6 peer address
        peer, addr = addr, local
    flags = attr("IFA_FLAGS")
    if flags is None:
        flags = msg["flags"]
    index = int(msg["index"])
    cache = attr("IFA_CACHEINFO")
    valid = preferred = None
    if cache is not None:
        v, p = cache.get("ifa_valid"), cache.get("ifa_preferred")
        valid = None if v in (None, INFINITY_LIFE_TIME) else int(v)
        preferred = None if p in (None, INFINITY_LIFE_TIME) else int(p)
    label = attr("IFA_LABEL")
    return Address(
        address=str(addr),
        prefixlen=int(msg["prefixlen"]),
        ifindex=index,
        dev=names.get(index) or (label.split(":")[0] if label else None),
        scope=int(msg["scope"]),
        flags=int(flags),
        peer=peer,
        valid_lft=valid,
        preferred_lft=preferred,
    )


def route_from_msg(msg: Any, names: Mapping[int, str]) -> Route:
    attr = _attrs_of(msg)
    family = msg["family"]
    dst = attr("RTA_DST")
    if dst is None:
        dst = "::" if family == socket.AF_INET6 else "0.0.0.0"
    hops: list[NextHop] = []
    for hop in attr("RTA_MULTIPATH") or ():
        oif = hop.get("oif")
        hflags = int(hop.get("flags") or 0)
        hops.append(
            NextHop(
                gateway=hop.get_attr("RTA_GATEWAY"),
                dev=_name(names, oif),
                weight=int(hop.get("hops") or 0) + 1,
                onlink=bool(hflags & RTNH_F_ONLINK),
                flags=hflags,
                ifindex=oif or None,
            )
        )
    oif = attr("RTA_OIF")
    metrics = attr("RTA_METRICS")
    mtu = metrics.get_attr("RTAX_MTU") if metrics is not None else None
    table = attr("RTA_TABLE")
    rflags = int(msg["flags"] or 0)
    return Route(
        dst=f"{dst}/{msg['dst_len']}",
        gateway=attr("RTA_GATEWAY"),
        dev=_name(names, oif),
        table=int(table if table is not None else msg["table"]),
        src=attr("RTA_PREFSRC"),
        metric=attr("RTA_PRIORITY"),
        proto=int(msg["proto"]),
        scope=int(msg["scope"]),
        type=ROUTE_TYPES.get(int(msg["type"]), str(msg["type"])),
        nexthops=tuple(hops),
        nhid=_raw_u32_attr(msg, RTA_NH_ID),
        mtu=mtu,
        onlink=bool(rflags & RTNH_F_ONLINK),
        flags=rflags,
        ifindex=oif,
    )


def rule_from_msg(msg: Any) -> Rule:
    attr = _attrs_of(msg)
    family = int(msg["family"])
    src = attr("FRA_SRC")
    dst = attr("FRA_DST")
    table = attr("FRA_TABLE")
    return Rule(
        priority=int(attr("FRA_PRIORITY") or 0),
        table=int(table if table is not None else msg["table"]),
        family=family,
        src=f"{src}/{msg['src_len']}" if src is not None else None,
        dst=f"{dst}/{msg['dst_len']}" if dst is not None else None,
        fwmark=attr("FRA_FWMARK"),
        fwmask=attr("FRA_FWMASK"),
        iif=attr("FRA_IIFNAME"),
        oif=attr("FRA_OIFNAME"),
        action=RULE_ACTIONS.get(int(msg["action"]), str(msg["action"])),
        suppress_prefixlen=_suppress(attr("FRA_SUPPRESS_PREFIXLEN")),
        proto=attr("FRA_PROTOCOL"),
    )


def _suppress(value: Any) -> int | None:
    if value is None or value in (0xFFFFFFFF, -1):
        return None
    return int(value)


def neighbour_from_msg(msg: Any, names: Mapping[int, str]) -> Neighbour:
    attr = _attrs_of(msg)
    index = int(msg["ifindex"])
    return Neighbour(
        dst=str(attr("NDA_DST")),
        ifindex=index,
        dev=names.get(index),
        lladdr=attr("NDA_LLADDR"),
        state=int(msg["state"]),
        flags=int(msg["flags"]),
        ext_flags=int(attr("NDA_FLAGS_EXT") or 0),
        probes=attr("NDA_PROBES"),
    )


_EVENT_CONVERTERS: dict[str, tuple[str, Callable[[Any, Mapping[int, str]], Any]]] = {
    "RTM_NEWLINK": ("new", lambda m, n: link_from_msg(m)),
    "RTM_DELLINK": ("del", lambda m, n: link_from_msg(m)),
    "RTM_NEWADDR": ("new", address_from_msg),
    "RTM_DELADDR": ("del", address_from_msg),
    "RTM_NEWROUTE": ("new", route_from_msg),
    "RTM_DELROUTE": ("del", route_from_msg),
    "RTM_NEWRULE": ("new", lambda m, n: rule_from_msg(m)),
    "RTM_DELRULE": ("del", lambda m, n: rule_from_msg(m)),
    "RTM_NEWNEIGH": ("new", neighbour_from_msg),
    "RTM_DELNEIGH": ("del", neighbour_from_msg),
}


def parse_events(data: bytes, names: dict[int, str] | None = None) -> list[NetlinkEvent]:
    """Turn one datagram of rtnetlink notifications into events.

    `names` maps ifindex -> name for filling in `dev`; link events update it in place (so a
    route event after a link event in the same datagram gets the name). Malformed input raises
    `ParseError`; unrelated message types are skipped.
    """
    from pyroute2.netlink.rtnl.marshal import MarshalRtnl

    if names is None:
        names = {}
    events: list[NetlinkEvent] = []
    try:
        messages = list(MarshalRtnl().parse(data))
    except Exception as exc:  # pyroute2 raises many kinds on garbage
        raise ParseError(f"malformed rtnetlink datagram ({len(data)} bytes): {exc}") from exc
    for msg in messages:
        event = msg.get("event")
        conv = _EVENT_CONVERTERS.get(event) if isinstance(event, str) else None
        if conv is None:
            continue
        if msg["header"].get("error") is not None:
            raise ParseError(f"malformed {event} message: {msg['header']['error']}")
        action, fn = conv
        try:
            obj = fn(msg, names)
        except Exception as exc:
            raise ParseError(f"malformed {event} message: {exc!r}") from exc
        if isinstance(obj, Link):
            if action == "new" and obj.name:
                names[obj.index] = obj.name
            elif action == "del":
                names.pop(obj.index, None)
        events.append(NetlinkEvent(action, obj))
    return events


# --- requests ---------------------------------------------------------------------------------


def _network(value: str, what: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    if value == "default":
        value = "0.0.0.0/0"
    try:
        return ipaddress.ip_network(value, strict=True)
    except ValueError as exc:
        raise ValueError(f"invalid {what} {value!r}: {exc}") from exc


def _ip(value: str, what: str) -> str:
    try:
        return str(ipaddress.ip_address(value))
    except ValueError as exc:
        raise ValueError(f"invalid {what} {value!r}: {exc}") from exc


def _family_of(*values: str | None) -> int | None:
    for v in values:
        if v:
            return socket.AF_INET6 if ":" in v else socket.AF_INET
    return None


def default_scope(route: Route) -> int:
    if route.scope is not None:
        return route.scope
    if route.type in ("local", "nat"):
        return RT_SCOPE_HOST
    if route.type in ("broadcast", "multicast", "anycast"):
        return RT_SCOPE_LINK
    if (
        route.type == "unicast"
        and route.gateway is None
        and not route.nexthops
        and route.nhid is None
    ):
        return RT_SCOPE_LINK
    return RT_SCOPE_UNIVERSE


class Netlink:
    """rtnetlink in namespace `netns` (None: the caller's). One per namespace; thread-safe."""

    def __init__(self, netns: str | None = None) -> None:
        self.netns = netns
        self._worker = NsWorker(netns, name="ipshift-netlink")
        self._names: dict[int, str] = {}
        try:
            self._ipr: Any = self._worker.call(self._open)
        except BaseException:
            self._worker.close()
            raise

    @staticmethod
    def _open() -> Any:
        from pyroute2 import IPRoute

        return IPRoute()

    # --- plumbing --------------------------------------------------------------------------
    def _request(self, what: str, method: str, *args: Any, **kwargs: Any) -> Any:
        from pyroute2.netlink.exceptions import NetlinkError as PyrNetlinkError

        def run() -> Any:
            try:
                result = getattr(self._ipr, method)(*args, **kwargs)
                # dumps are generators in some pyroute2 paths: read them on this thread
                return list(result) if result is not None else []
            except PyrNetlinkError as exc:
                code = int(exc.code or 0)
                detail = exc.args[1] if len(exc.args) > 1 and exc.args[1] else _strerror(code)
                raise NetlinkError(f"{what}: {detail}", code) from exc

        return self._worker.call(run)

    def _index(self, dev: str) -> int:
        index = self._names_rev().get(dev)
        if index is None:
            self._refresh_names()
            index = self._names_rev().get(dev)
        if index is None:
            raise NetlinkError(f"no such interface {dev!r}", _errno.ENODEV)
        return index

    def _names_rev(self) -> dict[str, int]:
        return {v: k for k, v in self._names.items()}

    def _refresh_names(self) -> dict[int, str]:
        self._names = {link.index: link.name for link in self.links()}
        return self._names

    def _names_for(self, indexes: Iterable[int | None]) -> dict[int, str]:
        if any(i and i not in self._names for i in indexes):
            self._refresh_names()
        return self._names

    # --- links -----------------------------------------------------------------------------
    def links(self) -> list[Link]:
        links = [link_from_msg(m) for m in self._request("list links", "link", "dump")]
        self._names = {link.index: link.name for link in links}
        return links

    def link(self, dev: str | int) -> Link:
        index = dev if isinstance(dev, int) else self._index(dev)
        msgs = self._request(f"get link {dev}", "link", "get", index=index)
        if not msgs:
            raise NetlinkError(f"no such interface {dev!r}", _errno.ENODEV)
        return link_from_msg(msgs[0])

    def index(self, dev: str) -> int:
        """The ifindex of interface `dev` (NetlinkError if there is none)."""
        self._refresh_names()
        return self._index(dev)

    def set_link(
        self, dev: str | int, *, up: bool | None = None, mtu: int | None = None,
        gso_max_size: int | None = None,
    ) -> None:
        """Set a link up/down, its MTU, and the largest TSO super-packet it takes whole
        (gso_max_size: locally generated TCP is built to fit; a larger forwarded super-packet
        is cut into single packets in software before the device)."""
        index = dev if isinstance(dev, int) else self._index(dev)
        kwargs: dict[str, Any] = {}
        if up is not None:
            kwargs["state"] = "up" if up else "down"
        if mtu is not None:
            kwargs["mtu"] = mtu
        if gso_max_size is not None:
            kwargs["gso_max_size"] = gso_max_size
        if kwargs:
            desc = " ".join(f"{k} {v}" for k, v in kwargs.items())
            self._request(f"set link {dev} {desc}", "link", "set", index=index, **kwargs)

    # --- addresses -------------------------------------------------------------------------
    def addresses(self, dev: str | None = None, family: int | None = None) -> list[Address]:
        kwargs: dict[str, Any] = {}
        if family is not None:
            kwargs["family"] = family
        if dev is not None:
            kwargs["index"] = self._index(dev)
        msgs = self._request("list addresses", "addr", "dump", **kwargs)
        names = self._names_for(int(m["index"]) for m in msgs)
        out = [address_from_msg(m, names) for m in msgs]
        if dev is not None:  # kernel-side filtering is not guaranteed without strict checking
            out = [a for a in out if a.ifindex == kwargs["index"]]
        if family is not None:
            out = [a for a in out if a.family == family]
        return out

    def add_address(
        self, dev: str, cidr: str, *, peer: str | None = None, nodad: bool = False,
        replace: bool = False,
    ) -> None:
        """Add `cidr` (address/prefixlen) to `dev`; replace=True makes it idempotent."""
        iface = _interface(cidr)
        kwargs = self._addr_kwargs(dev, iface, peer)
        if nodad and iface.version == 6:
            kwargs["flags"] = IFA_F_NODAD
        verb = "replace" if replace else "add"
        self._request(f"address {verb} {cidr} dev {dev}", "addr", verb, **kwargs)

    def del_address(self, dev: str, cidr: str, *, peer: str | None = None) -> None:
        iface = _interface(cidr)
        kwargs = self._addr_kwargs(dev, iface, peer)
        self._request(f"address del {cidr} dev {dev}", "addr", "del", **kwargs)

    def _addr_kwargs(
        self, dev: str, iface: ipaddress.IPv4Interface | ipaddress.IPv6Interface, peer: str | None
    ) -> dict[str, Any]:
        addr = str(iface.ip)
        kwargs: dict[str, Any] = {
            "index": self._index(dev),
            "prefixlen": iface.network.prefixlen,
            "family": socket.AF_INET6 if iface.version == 6 else socket.AF_INET,
            "local": addr,
            "address": _ip(peer, "peer address") if peer else addr,
        }
        return kwargs

    # --- routes ----------------------------------------------------------------------------
    def routes(
        self,
        table: int | None = RT_TABLE_MAIN,
        *,
        family: int | None = None,
        proto: int | None = None,
        dst: str | None = None,
        dev: str | None = None,
    ) -> list[Route]:
        """Routes of `table` (None: every table), optionally filtered."""
        kwargs: dict[str, Any] = {}
        if family is not None:
            kwargs["family"] = family
        if table is not None:
            kwargs["table"] = table
        msgs = self._request("list routes", "route", "dump", **kwargs)
        hop_indexes = [h.get("oif") for m in msgs for h in (m.get_attr("RTA_MULTIPATH") or ())]
        names = self._names_for([m.get_attr("RTA_OIF") for m in msgs] + hop_indexes)
        out = [route_from_msg(m, names) for m in msgs]
        want_dst = str(_network(dst, "destination")) if dst is not None else None
        return [
            r for r in out
            if (table is None or r.table == table)
            and (family is None or r.family == family)
            and (proto is None or r.proto == proto)
            and (want_dst is None or r.dst == want_dst)
            and (dev is None or r.dev == dev or any(h.dev == dev for h in r.nexthops))
        ]

    def add_route(self, route: Route) -> None:
        """Add a route; NetlinkError with errno EEXIST if it exists already."""
        self._route_change("add", route)

    def replace_route(self, route: Route) -> None:
        """Add or replace the route with the same dst/table/metric (and tos)."""
        self._route_change("replace", route)

    def del_route(self, route: Route) -> None:
        """Delete a route. Fields left None/empty match anything (like `ip route del`)."""
        self._route_change("del", route)

    def delete_routes(
        self, table: int, *, proto: int | None = None, family: int | None = None
    ) -> int:
        """Delete every route of `table` (optionally only of one protocol); returns the count.

        Lists first and deletes one by one: pyroute2's flush_routes() stops early on big tables.
        """
        count = 0
        for route in self.routes(table, proto=proto, family=family):
            if route.type in ("broadcast", "local") and table == RT_TABLE_LOCAL:
                continue
            try:
                self.del_route(route)
                count += 1
            except NetlinkError as exc:
                if exc.errno != _errno.ESRCH:  # gone meanwhile is fine
                    raise
        return count

    def lookup(
        self, dst: str, *, src: str | None = None, fwmark: int | None = None,
        iif: str | None = None, oif: str | None = None,
    ) -> Route:
        """What the kernel would do for a packet to `dst` (`ip route get`)."""
        addr = _ip(dst, "destination")
        kwargs: dict[str, Any] = {"dst": addr, "family": _family_of(addr)}
        if src is not None:
            kwargs["src"] = _ip(src, "source")
        if fwmark is not None:
            kwargs["mark"] = fwmark
        if iif is not None:
            kwargs["iif"] = self._index(iif)
        if oif is not None:
            kwargs["oif"] = self._index(oif)
        msgs = self._request(f"route get {dst}", "route", "get", **kwargs)
        if not msgs:
            raise NetlinkError(f"route get {dst}: no answer", _errno.ENETUNREACH)
        names = self._names_for([msgs[0].get_attr("RTA_OIF")])
        return route_from_msg(msgs[0], names)

    def _route_change(self, verb: str, route: Route) -> None:
        if route.nhid is not None and verb != "del":
            self._route_via_ip(verb, route)
            return
        kwargs = self._route_kwargs(route, verb)
        self._request(f"route {verb} {route.describe()}", "route", verb, **kwargs)

    def _route_kwargs(self, route: Route, verb: str) -> dict[str, Any]:
        net = _network(route.dst, "destination")
        family = socket.AF_INET6 if net.version == 6 else socket.AF_INET
        if route.type not in _ROUTE_TYPE_IDS:
            raise ValueError(f"unknown route type {route.type!r}")
        kwargs: dict[str, Any] = {
            "family": family,
            "dst_len": net.prefixlen,
            "table": route.table,
            "type": _ROUTE_TYPE_IDS[route.type],
        }
        if net.prefixlen:
            kwargs["dst"] = str(net.network_address)
        if verb == "del":
            kwargs["scope"] = route.scope if route.scope is not None else RT_SCOPE_NOWHERE
            if route.proto:
                kwargs["proto"] = route.proto
        else:
            kwargs["scope"] = default_scope(route)
            kwargs["proto"] = route.proto
        if route.gateway:
            kwargs["gateway"] = _ip(route.gateway, "gateway")
        if route.dev:
            kwargs["oif"] = self._index(route.dev)
        if route.src:
            kwargs["prefsrc"] = _ip(route.src, "preferred source")
        if route.metric is not None:
            kwargs["priority"] = route.metric
        if route.mtu is not None:
            kwargs["metrics"] = {"mtu": route.mtu}
        if route.onlink:
            kwargs["flags"] = RTNH_F_ONLINK
        if route.nexthops:
            hops = []
            for hop in route.nexthops:
                if not 1 <= hop.weight <= 256:
                    raise ValueError(f"nexthop weight {hop.weight} out of range 1..256")
                spec: dict[str, Any] = {"hops": hop.weight - 1}
                if hop.gateway:
                    spec["gateway"] = _ip(hop.gateway, "nexthop gateway")
                if hop.dev:
                    spec["oif"] = self._index(hop.dev)
                if hop.onlink:
                    spec["flags"] = RTNH_F_ONLINK
                hops.append(spec)
            kwargs["multipath"] = hops
        return kwargs

    def _route_via_ip(self, verb: str, route: Route) -> None:
        """Routes using a nexthop object: pyroute2 0.9.7 cannot encode RTA_NH_ID."""
        net = _network(route.dst, "destination")
        argv = ["-6" if net.version == 6 else "-4", "route", verb, str(net),
                "nhid", str(route.nhid), "table", str(route.table), "proto", str(route.proto)]
        if route.type != "unicast":
            argv[3:3] = [route.type]
        if route.metric is not None:
            argv += ["metric", str(route.metric)]
        if route.src:
            argv += ["src", _ip(route.src, "preferred source")]
        if route.mtu is not None:
            argv += ["mtu", str(route.mtu)]
        self.ip(*argv, what=f"route {verb} {route.describe()}")

    # --- rules -----------------------------------------------------------------------------
    def rules(self, family: int | None = None) -> list[Rule]:
        """IPv4 and IPv6 rules (or one family)."""
        families = [family] if family is not None else [socket.AF_INET, socket.AF_INET6]
        out: list[Rule] = []
        for fam in families:
            msgs = self._request("list rules", "rule", "dump", family=fam)
            out.extend(rule_from_msg(m) for m in msgs if m["family"] == fam)
        return out

    def add_rule(self, rule: Rule) -> None:
        self._rule_change("add", rule)

    def del_rule(self, rule: Rule) -> None:
        self._rule_change("del", rule)

    def _rule_change(self, verb: str, rule: Rule) -> None:
        family = _family_of(rule.src, rule.dst) or rule.family
        if rule.action not in _RULE_ACTION_IDS:
            raise ValueError(f"unknown rule action {rule.action!r}")
        kwargs: dict[str, Any] = {
            "family": family,
            "priority": rule.priority,
            "action": _RULE_ACTION_IDS[rule.action],
        }
        if rule.action == "lookup":
            kwargs["table"] = rule.table
        for key, value in (("src", rule.src), ("dst", rule.dst)):
            if value:
                net = _network(value, f"rule {key}")
                kwargs[key] = str(net.network_address)
                kwargs[f"{key}_len"] = net.prefixlen
        if rule.fwmark is not None:
            kwargs["fwmark"] = rule.fwmark
        if rule.fwmask is not None:
            kwargs["fwmask"] = rule.fwmask
        if rule.iif:
            kwargs["iifname"] = rule.iif
        if rule.oif:
            kwargs["oifname"] = rule.oif
        if rule.suppress_prefixlen is not None:
            kwargs["suppress_prefixlen"] = rule.suppress_prefixlen
        if rule.proto is not None:
            # On delete, the kernel then matches only a rule of that protocol (the owner's).
            kwargs["protocol"] = rule.proto
        self._request(f"rule {verb} priority {rule.priority}", "rule", verb, **kwargs)

    # --- neighbours ------------------------------------------------------------------------
    def neighbours(self, dev: str | None = None, family: int | None = None) -> list[Neighbour]:
        kwargs: dict[str, Any] = {}
        if family is not None:
            kwargs["family"] = family
        msgs = self._request("list neighbours", "neigh", "dump", **kwargs)
        names = self._names_for(int(m["ifindex"]) for m in msgs)
        out = [neighbour_from_msg(m, names) for m in msgs if m.get_attr("NDA_DST")]
        if dev is not None:
            out = [n for n in out if n.dev == dev]
        if family is not None:
            out = [n for n in out if n.family == family]
        return out

    def neighbour(self, dst: str, dev: str) -> Neighbour | None:
        addr = _ip(dst, "neighbour")
        for n in self.neighbours(dev):
            if n.dst == addr:
                return n
        return None

    def set_neighbour(
        self, dst: str, dev: str, lladdr: str | None = None, *, state: int = NUD_PERMANENT
    ) -> None:
        """Create or replace a neighbour entry (`ip neigh replace`)."""
        addr = _ip(dst, "neighbour")
        kwargs: dict[str, Any] = {
            "dst": addr, "ifindex": self._index(dev), "state": state,
            "family": _family_of(addr),
        }
        if lladdr is not None:
            kwargs["lladdr"] = lladdr
        self._request(f"neigh replace {dst} dev {dev}", "neigh", "replace", **kwargs)

    def probe_neighbour(self, dst: str, dev: str) -> None:
        """Make the kernel (re)resolve `dst` now: NTF_USE, as `ip neigh replace ... use`."""
        addr = _ip(dst, "neighbour")
        self._request(
            f"neigh probe {dst} dev {dev}", "neigh", "replace", dst=addr,
            ifindex=self._index(dev), state=NUD_NONE, flags=NTF_USE, family=_family_of(addr),
        )

    def add_managed_neighbour(self, dst: str, dev: str) -> None:
        """A `managed` entry: the kernel keeps resolving it on its own (NTF_EXT_MANAGED)."""
        addr = _ip(dst, "neighbour")
        self._request(
            f"neigh add {dst} dev {dev} managed", "neigh", "replace", dst=addr,
            ifindex=self._index(dev), state=NUD_NONE, NDA_FLAGS_EXT=NTF_EXT_MANAGED,
            family=_family_of(addr),
        )

    def del_neighbour(self, dst: str, dev: str) -> None:
        addr = _ip(dst, "neighbour")
        self._request(
            f"neigh del {dst} dev {dev}", "neigh", "del", dst=addr, ifindex=self._index(dev),
            family=_family_of(addr),
        )

    # --- nexthop objects (through `ip -json nexthop`) ----------------------------------------
    def ip(self, *args: str, what: str | None = None, timeout: float = 10.0) -> str:
        """Run `ip -n NETNS ARGS` (for what pyroute2 lacks); NetlinkError on failure."""
        argv = ["ip", *(["-n", self.netns] if self.netns else []), *args]
        try:
            res = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
        except FileNotFoundError as exc:
            raise NetlinkError("the `ip` program (iproute2) is not installed") from exc
        except subprocess.TimeoutExpired as exc:
            raise NetlinkError(f"{' '.join(argv)}: timed out after {timeout}s") from exc
        if res.returncode != 0:
            reason = (res.stderr or res.stdout).strip().splitlines()
            text = reason[0] if reason else f"exit status {res.returncode}"
            raise NetlinkError(f"{what or ' '.join(args)}: {text}", _ip_errno(text))
        return res.stdout

    def nexthops(self) -> list[NexthopObject]:
        return parse_nexthops(self.ip("-json", "-d", "nexthop", "show", what="list nexthops"))

    def add_nexthop(self, nh: NexthopObject, *, replace: bool = False) -> None:
        verb = "replace" if replace else "add"
        self.ip("nexthop", verb, *nexthop_argv(nh), what=f"nexthop {verb} id {nh.id}")

    def del_nexthop(self, nh_id: int) -> None:
        self.ip("nexthop", "del", "id", str(nh_id), what=f"nexthop del id {nh_id}")

    # --- lifecycle -------------------------------------------------------------------------
    def close(self) -> None:
        if self._worker.closed:
            return
        try:
            self._worker.call(self._ipr.close)
        finally:
            self._worker.close()

    def __enter__(self) -> Netlink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _interface(cidr: str) -> ipaddress.IPv4Interface | ipaddress.IPv6Interface:
    try:
        return ipaddress.ip_interface(cidr)
    except ValueError as exc:
        raise ValueError(f"invalid address {cidr!r}: {exc}") from exc


def _strerror(code: int) -> str:
    import os

    return os.strerror(code) if code else "failed"


_IP_ERRORS = {
    "File exists": _errno.EEXIST,
    "No such process": _errno.ESRCH,
    "No such file or directory": _errno.ENOENT,
    "No such device": _errno.ENODEV,
    "Invalid argument": _errno.EINVAL,
    "Network is unreachable": _errno.ENETUNREACH,
    "Operation not permitted": _errno.EPERM,
}


def _ip_errno(text: str) -> int:
    for phrase, code in _IP_ERRORS.items():
        if phrase in text:
            return code
    return 0


# --- nexthop objects: `ip -json nexthop` parsing ----------------------------------------------


def nexthop_argv(nh: NexthopObject) -> list[str]:
    """The `ip nexthop add` arguments after the verb."""
    if nh.id <= 0:
        raise ValueError(f"nexthop id must be positive, not {nh.id}")
    argv = ["id", str(nh.id)]
    if nh.group:
        parts = []
        for member, weight in nh.group:
            if not 1 <= weight <= 256:
                raise ValueError(f"nexthop group weight {weight} out of range 1..256")
            parts.append(f"{member},{weight}" if weight != 1 else str(member))
        argv += ["group", "/".join(parts)]
    elif nh.blackhole:
        argv.append("blackhole")
    else:
        if nh.gateway:
            argv += ["via", _ip(nh.gateway, "nexthop gateway")]
        if nh.dev:
            argv += ["dev", nh.dev]
        if nh.onlink:
            argv.append("onlink")
    if nh.fdb:
        argv.append("fdb")
    return argv


def parse_nexthops(text: str) -> list[NexthopObject]:
    """Parse `ip -json [-d] nexthop show` output; ParseError on anything unexpected."""
    if not text.strip():
        return []
    try:
        doc = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise ParseError(f"`ip -json nexthop` output is not JSON: {exc}") from exc
    if not isinstance(doc, list):
        raise ParseError("`ip -json nexthop` output is not a JSON list")
    return [_nexthop_from_json(item) for item in doc]


def _nexthop_from_json(item: Any) -> NexthopObject:
    if not isinstance(item, dict):
        raise ParseError(f"nexthop entry is not an object: {item!r:.60}")
    nh_id = item.get("id")
    if not isinstance(nh_id, int) or isinstance(nh_id, bool) or nh_id <= 0:
        raise ParseError(f"nexthop entry without a valid id: {item!r:.60}")
    group: list[tuple[int, int]] = []
    raw_group = item.get("group", [])
    if not isinstance(raw_group, list):
        raise ParseError(f"nexthop {nh_id}: group is not a list")
    for member in raw_group:
        if not isinstance(member, dict):
            raise ParseError(f"nexthop {nh_id}: group member is not an object")
        mid, weight = member.get("id"), member.get("weight", 1)
        if (
            not isinstance(mid, int) or isinstance(mid, bool)
            or not isinstance(weight, int) or isinstance(weight, bool)
        ):
            raise ParseError(f"nexthop {nh_id}: bad group member {member!r:.60}")
        group.append((mid, weight))
    gateway = _opt_str(item, "gateway", nh_id)
    if gateway is not None:
        try:
            gateway = str(ipaddress.ip_address(gateway))
        except ValueError as exc:
            raise ParseError(f"nexthop {nh_id}: bad gateway {gateway!r:.60}") from exc
    flags = item.get("flags", [])
    if not isinstance(flags, list) or not all(isinstance(f, str) for f in flags):
        raise ParseError(f"nexthop {nh_id}: flags is not a list of strings")
    family = {"inet": socket.AF_INET, "inet6": socket.AF_INET6}.get(
        str(item.get("family", "")), _family_of(gateway)
    )
    return NexthopObject(
        id=nh_id,
        gateway=gateway,
        dev=_opt_str(item, "dev", nh_id),
        group=tuple(group),
        # iproute2 prints presence flags as `"blackhole": null`
        blackhole="blackhole" in item and item["blackhole"] is not False,
        onlink="onlink" in flags,
        fdb="fdb" in item and item["fdb"] is not False,
        family=family,
        protocol=_opt_str(item, "protocol", nh_id),
        flags=tuple(flags),
    )


def _opt_str(item: dict[str, Any], key: str, nh_id: int) -> str | None:
    value = item.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise ParseError(f"nexthop {nh_id}: {key} is not a string")
    return value


# --- events -----------------------------------------------------------------------------------

RTMGRP_LINK = 0x1
RTMGRP_NEIGH = 0x4
RTMGRP_IPV4_IFADDR = 0x10
RTMGRP_IPV4_ROUTE = 0x40
RTMGRP_IPV4_RULE = 0x80
RTMGRP_IPV6_IFADDR = 0x100
RTMGRP_IPV6_ROUTE = 0x400
RTMGRP_IPV6_RULE = 1 << (19 - 1)

EVENT_GROUPS = {
    "link": RTMGRP_LINK,
    "address": RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR,
    "route": RTMGRP_IPV4_ROUTE | RTMGRP_IPV6_ROUTE,
    "rule": RTMGRP_IPV4_RULE | RTMGRP_IPV6_RULE,
    "neighbour": RTMGRP_NEIGH,
}
NETLINK_ROUTE = 0
SO_RCVBUFFORCE = 33


class EventsOverrunError(NetlinkError):
    """The kernel dropped notifications (socket buffer full): re-read the state you track."""


class NetlinkEvents:
    """A subscription to rtnetlink notifications in namespace `netns`.

    Use from asyncio with `async for event in events:` (or `await events.next_batch()`), or
    register `fileno()` with a selector and call `read()` when readable. `read()` never blocks.
    On overrun, `read()` raises `EventsOverrunError` once (ending an `async for`): the caller
    must resynchronise by dumping what it tracks (links, routes...) and can then iterate again.
    A datagram that cannot be parsed is logged and counted in `malformed`, never raised.
    Note: IPv4 routes the kernel drops with a link that goes down are not announced (IPv6 ones
    are): on a link-down event, re-read the routes you own.
    """

    def __init__(
        self,
        netns: str | None = None,
        kinds: Sequence[str] = ("link", "address", "route", "neighbour"),
        *,
        rcvbuf: int = 4 << 20,
    ) -> None:
        unknown = set(kinds) - set(EVENT_GROUPS)
        if unknown:
            raise ValueError(f"unknown event kinds {sorted(unknown)}: use {sorted(EVENT_GROUPS)}")
        groups = 0
        for kind in kinds:
            groups |= EVENT_GROUPS[kind]
        self.netns = netns
        self.kinds = tuple(kinds)
        self._sock, names = _netns.call_in(netns, _open_event_socket, groups, rcvbuf)
        self.names: dict[int, str] = names
        self.malformed = 0  # datagrams that could not be parsed (logged, skipped)

    def fileno(self) -> int:
        return self._sock.fileno()

    def read(self, max_datagrams: int = 64) -> list[NetlinkEvent]:
        """Every event queued now (up to `max_datagrams` datagrams); [] if none."""
        events: list[NetlinkEvent] = []
        for _ in range(max_datagrams):
            try:
                data = self._sock.recv(1 << 16)
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno == _errno.ENOBUFS:
                    raise EventsOverrunError(
                        "netlink events overran the socket buffer: resynchronise state",
                        _errno.ENOBUFS,
                    ) from exc
                raise
            try:
                events.extend(parse_events(data, self.names))
            except ParseError as exc:  # counted and logged, never fatal
                self.malformed += 1
                log.warning("netlink events: %s", exc)
        return events

    async def next_batch(self) -> list[NetlinkEvent]:
        """Wait until at least one event is there and return all that are queued."""
        loop = asyncio.get_running_loop()
        while True:
            events = self.read()
            if events:
                return events
            ready: asyncio.Future[None] = loop.create_future()
            fd = self.fileno()

            def wake(fut: asyncio.Future[None] = ready) -> None:
                if not fut.done():
                    fut.set_result(None)

            loop.add_reader(fd, wake)
            try:
                await ready
            finally:
                loop.remove_reader(fd)

    def __aiter__(self) -> AsyncIterator[NetlinkEvent]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[NetlinkEvent]:
        while True:
            for event in await self.next_batch():
                yield event

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> NetlinkEvents:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _open_event_socket(groups: int, rcvbuf: int) -> tuple[socket.socket, dict[int, str]]:
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_ROUTE)
    try:
        try:
            sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, rcvbuf)
        except PermissionError:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.bind((0, groups))
        sock.setblocking(False)
        names = dict(socket.if_nameindex())  # after bind: no rename can slip in between
    except BaseException:
        sock.close()
        raise
    return sock, names
