"""pyroute2 rtnetlink messages -> the package's dataclasses, and `parse_events` for one datagram
of notifications. Pure: no sockets; malformed input raises `ParseError`."""

from __future__ import annotations

import socket
import struct
from collections.abc import Callable, Mapping
from typing import Any

from ipshift.net.errors import ParseError
from ipshift.net.netlink.constants import (
    IFF_LOWER_UP,
    IFF_UP,
    INFINITY_LIFE_TIME,
    ROUTE_TYPES,
    RTA_NH_ID,
    RTNH_F_ONLINK,
    RULE_ACTIONS,
)
from ipshift.net.netlink.objects import (
    Address,
    Link,
    Neighbour,
    NetlinkEvent,
    NextHop,
    Route,
    Rule,
)


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

