"""`Netlink`: rtnetlink requests in one namespace through pyroute2's `IPRoute`, kept on an
`NsWorker` thread (pyroute2 0.9's synchronous API is bound to the thread that made it)."""

from __future__ import annotations

import errno as _errno
import ipaddress
import os
import socket
from collections.abc import Iterable
from typing import Any

from ipshift.net.netlink.constants import (
    _ROUTE_TYPE_IDS,
    _RULE_ACTION_IDS,
    IFA_F_NODAD,
    IFA_F_NOPREFIXROUTE,
    INFINITY_LIFE_TIME,
    NTF_EXT_MANAGED,
    NTF_USE,
    NUD_NONE,
    NUD_PERMANENT,
    RT_SCOPE_NOWHERE,
    RT_TABLE_LOCAL,
    RT_TABLE_MAIN,
    RTNH_F_ONLINK,
)
from ipshift.net.netlink.nexthop import nexthop_argv, parse_nexthops, run_ip
from ipshift.net.netlink.objects import (
    Address,
    Link,
    Neighbour,
    NetlinkError,
    NexthopObject,
    Route,
    Rule,
    _family_of,
    _interface,
    _ip,
    _network,
    default_scope,
)
from ipshift.net.netlink.parse import (
    address_from_msg,
    link_from_msg,
    neighbour_from_msg,
    route_from_msg,
    rule_from_msg,
)
from ipshift.net.worker import NsWorker


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
        replace: bool = False, valid_lft: int | None = None, preferred_lft: int | None = None,
        noprefixroute: bool = False, scope: int | None = None,
    ) -> None:
        """Add `cidr` (address/prefixlen) to `dev`; replace=True makes it idempotent (and
        updates the lifetimes of an address that is there). `valid_lft` / `preferred_lft` are
        seconds (None: forever; the kernel removes the address when the valid one runs out and
        marks it deprecated when the preferred one does); `noprefixroute` keeps the kernel from
        adding the subnet's route; `scope` is the address's scope (RT_SCOPE_*; an IPv4
        address of host scope is never picked as a source)."""
        iface = _interface(cidr)
        kwargs = self._addr_kwargs(dev, iface, peer)
        if scope is not None:
            kwargs["scope"] = scope
        flags = 0
        if nodad and iface.version == 6:
            flags |= IFA_F_NODAD
        if noprefixroute:
            flags |= IFA_F_NOPREFIXROUTE
        if flags:
            kwargs["flags"] = flags
        kwargs.update(_lifetimes(valid_lft, preferred_lft))
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
        return run_ip(self.netns, *args, what=what, timeout=timeout)

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


def _strerror(code: int) -> str:
    return os.strerror(code) if code else "failed"


def _lifetimes(valid: int | None, preferred: int | None) -> dict[str, int]:
    """pyroute2 arguments for IFA_CACHEINFO; none when both lifetimes are forever (the kernel's
    default, which also marks the address IFA_F_PERMANENT)."""
    if valid is None and preferred is None:
        return {}
    forever = INFINITY_LIFE_TIME
    # the kernel refuses a valid lifetime of 0; a preferred one of 0 deprecates at once
    for name, value, least in (("valid_lft", valid, 1), ("preferred_lft", preferred, 0)):
        if value is not None and not least <= value < forever:
            raise ValueError(
                f"{name} {value} out of range {least}..{forever - 1} seconds (None: forever)")
    valid_s = forever if valid is None else valid
    preferred_s = valid_s if preferred is None else preferred
    if preferred_s > valid_s:
        raise ValueError(f"preferred_lft {preferred_s} is longer than valid_lft {valid_s}")
    return {"valid_lft": valid_s, "preferred_lft": preferred_s}
