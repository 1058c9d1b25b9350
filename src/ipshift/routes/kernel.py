"""The routes daemon's kernel adapter: the engines' objects to and from net/ (netlink, nftables,
conntrack), and the nftables ruleset that pins flows to their uplink.

Ownership: every route and rule the daemon installs carries its route protocol number
(`protocol`, 73 by default; `ip route show proto 73`). Routes and rules with another protocol are
never changed or deleted: deletions name the protocol, so the kernel itself refuses to match
anything else. No state file is needed: a restarted daemon finds what it owns in the kernel.

Pinning (failback "stay"): a connection is marked with its uplink's mark when it first leaves
through (or arrives from) that uplink; later packets of the connection from the LAN side and from
the host itself carry the mark, and the uplink's fwmark rule routes them through its own table.
So a flow stays on its uplink when another one recovers, and replies to connections that came in
through an uplink leave through it.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import socket
from collections.abc import Iterable, Sequence

from ipshift.net.conntrack import Conntrack, ConntrackEntry
from ipshift.net.netlink import Address, Link, Netlink, NextHop, Route, Rule
from ipshift.net.rtbatch import RouteBatch
from ipshift.routes.model import V6_DEFAULT_METRIC, IPAddress, RoutesConfig
from ipshift.routes.plan import (
    FlushConntrack,
    InstallRoute,
    IPInterface,
    KNexthop,
    KRoute,
    KRule,
    RemoveRoute,
)


def _af(family: int) -> int:
    return socket.AF_INET6 if family == 6 else socket.AF_INET


def to_route(k: KRoute, proto: int) -> Route:
    metric = k.metric if k.family == 4 else (k.metric or V6_DEFAULT_METRIC)
    common = {"dst": str(k.dst), "table": k.table, "src": str(k.src) if k.src else None,
              "metric": metric, "proto": proto, "scope": k.scope, "type": k.type}
    if len(k.nexthops) == 1:
        nh = k.nexthops[0]
        return Route(gateway=str(nh.gateway) if nh.gateway else None, dev=nh.dev,
                     onlink=nh.onlink, **common)  # type: ignore[arg-type]
    hops = tuple(NextHop(str(nh.gateway) if nh.gateway else None, nh.dev, nh.weight, nh.onlink)
                 for nh in k.nexthops)
    return Route(nexthops=hops, **common)  # type: ignore[arg-type]


def from_route(r: Route) -> KRoute | None:
    """The engine's view of a kernel route; None for what it never manages (local, broadcast,
    nexthop-object routes)."""
    if r.type not in ("unicast", "blackhole", "unreachable", "prohibit", "throw") or r.nhid:
        return None
    dst = ipaddress.ip_network(r.dst, strict=False)
    family = dst.version
    if r.nexthops:
        hops = tuple(KNexthop(h.dev or "", _ip(h.gateway), h.weight if len(r.nexthops) > 1 else 1,
                              h.onlink) for h in r.nexthops)
    elif r.dev or r.gateway:
        hops = (KNexthop(r.dev or "", _ip(r.gateway), 1, r.onlink),)
    else:
        hops = ()
    metric = int(r.metric or 0)
    if family == 6 and metric == V6_DEFAULT_METRIC:
        metric = 0
    scope = 0 if family == 6 else int(r.scope or 0)
    return KRoute(family, r.table, dst, hops, metric, 0, r.type, scope, _ip(r.src))


def _ip(value: str | None) -> IPAddress | None:
    return ipaddress.ip_address(value) if value else None


def to_rule(k: KRule, proto: int) -> Rule:
    return Rule(priority=k.priority, table=k.table if k.action == "lookup" else 0,
                family=_af(k.family), src=str(k.src) if k.src else None,
                dst=str(k.dst) if k.dst else None, fwmark=k.fwmark,
                # no mask: the full mask, which the kernel implies only for a non-zero mark
                fwmask=k.fwmask if k.fwmark is None or k.fwmask is not None else 0xFFFFFFFF,
                iif=k.iif, oif=k.oif, action=k.action, proto=proto)


def from_rule(r: Rule) -> KRule:
    # The kernel omits FRA_FWMARK for mark 0: `fwmark 0/0xffffffff` comes back as a mask alone.
    # KRule itself drops the default mask 0xffffffff and a mask without a mark.
    fwmark = r.fwmark if r.fwmark is not None or not r.fwmask else 0
    return KRule(6 if r.family == socket.AF_INET6 else 4, r.priority,
                 r.table if r.action == "lookup" else 0, r.action,
                 ipaddress.ip_network(r.src) if r.src else None,
                 ipaddress.ip_network(r.dst) if r.dst else None, r.iif, r.oif, fwmark, r.fwmask)


def interfaces_of(addrs: Iterable[tuple[str, int]]) -> set[IPInterface]:
    return {ipaddress.ip_interface(f"{a}/{p}") for a, p in addrs}


def pin_ruleset(cfg: RoutesConfig) -> str:
    """The nftables table that pins connections to their uplink (see the module docstring)."""
    s = cfg.settings
    mask = s.mark_mask
    keep = ~mask & 0xFFFFFFFF
    devs: dict[str, int] = {}
    for up in cfg.uplinks:
        devs[up.interface] = devs.get(up.interface, 0) + 1
    names = ", ".join(f'"{d}"' for d in devs)

    def set_ct(mark: int) -> str:
        return f"ct mark and {mask:#x} == 0x0 ct mark set ct mark and {keep:#x} or {mark:#x}"

    def restore(mark: int) -> str:
        return (f"ct mark and {mask:#x} == {mark:#x} "
                f"meta mark set meta mark and {keep:#x} or {mark:#x}")

    pre, out, post = [], [], []
    for up in cfg.uplinks:
        shared = devs[up.interface] > 1
        nexthop = ""
        if shared:
            if up.gateway is None:
                continue
            nexthop = f" rt {'ip6' if up.family == 6 else 'ip'} nexthop {up.gateway}"
        if not shared:
            pre.append(f'    iifname "{up.interface}" {set_ct(up.mark)}')
        pre.append(f"    iifname != {{ {names} }} {restore(up.mark)}")
        out.append(f"    {restore(up.mark)}")
        post.append(f'    oifname "{up.interface}"{nexthop} {set_ct(up.mark)}')
    return "\n".join([
        f"table inet {s.nft_table} {{",
        "  chain prerouting {",
        "    type filter hook prerouting priority mangle; policy accept;",
        *pre,
        "  }",
        "  chain output {",
        "    type route hook output priority mangle; policy accept;",
        *out,
        "  }",
        "  chain postrouting {",
        "    type filter hook postrouting priority mangle; policy accept;",
        *post,
        "  }",
        "}",
    ]) + "\n"


def conntrack_victims(
    entries: Iterable[ConntrackEntry], act: FlushConntrack
) -> list[ConntrackEntry]:
    """The entries a FlushConntrack means: replies to the uplink's addresses, or its mark."""
    addrs = {str(a) for a in act.addresses}
    out = []
    for e in entries:
        pinned = act.mark is not None and act.mask is not None and e.mark & act.mask == act.mark
        if e.reply.dst in addrs or pinned:
            out.append(e)
    return out


class KernelAdapter:
    """Blocking kernel operations for the daemon (each well under a millisecond but 10,000
    routes; the daemon runs big batches off the event loop)."""

    def __init__(self, cfg: RoutesConfig, netns: str | None = None):
        self.cfg = cfg
        self.proto = cfg.settings.protocol
        self.netns = netns
        self.nl = Netlink(netns)
        self._ct: Conntrack | None = None
        self._batch: RouteBatch | None = None

    # ---- reading ---------------------------------------------------------------------------
    def links(self) -> list[Link]:
        return self.nl.links()

    def addresses(self, addresses: Iterable[Address] | None = None
                  ) -> dict[str, set[IPInterface]]:
        """Usable addresses by device, of `addresses` (a watcher's view) or read now."""
        out: dict[str, set[IPInterface]] = {}
        for a in self.nl.addresses() if addresses is None else addresses:
            if a.dev is None or a.tentative or a.dadfailed:
                continue
            out.setdefault(a.dev, set()).add(ipaddress.ip_interface(a.cidr))
        return out

    def routes(self, routes: Iterable[Route] | None = None) -> list[tuple[KRoute, bool]]:
        """Every route the engine may care about, with whether the daemon owns it, of
        `routes` (a watcher's view) or read now."""
        out = []
        for r in self.nl.routes(None) if routes is None else routes:
            k = from_route(r)
            if k is not None and r.table != 255:
                out.append((k, r.proto == self.proto))
        return out

    def owned_rules(self, rules: Iterable[Rule] | None = None) -> list[KRule]:
        return [from_rule(r) for r in (self.nl.rules() if rules is None else rules)
                if r.proto == self.proto]

    # ---- changing --------------------------------------------------------------------------
    def install_route(self, k: KRoute, replace: bool) -> None:
        route = to_route(k, self.proto)
        if replace:
            self.nl.replace_route(route)
        else:
            self.nl.add_route(route)

    def remove_route(self, k: KRoute) -> None:
        self.nl.del_route(to_route(k, self.proto))

    def apply_routes(self, ops: Sequence[InstallRoute | RemoveRoute]
                     ) -> list[tuple[int, str] | None]:
        """Many route changes in few datagrams; (errno, text) per refused change."""
        if self._batch is None:
            self._batch = RouteBatch(self.netns)
        # A delete names the protocol, so only an owned route matches, and any scope.
        todo = [("del", dataclasses.replace(to_route(a.route, self.proto), scope=None))
                if isinstance(a, RemoveRoute)
                else ("replace" if a.replace else "add", to_route(a.route, self.proto))
                for a in ops]
        cache: dict[str, int] = {}

        def index_of(dev: str) -> int:
            if dev not in cache:
                cache[dev] = self.nl.index(dev)
            return cache[dev]

        return self._batch.apply(todo, index_of)

    def add_rule(self, k: KRule) -> None:
        self.nl.add_rule(to_rule(k, self.proto))

    def remove_rule(self, k: KRule) -> None:
        self.nl.del_rule(to_rule(k, self.proto))  # names the protocol: only an owned rule

    def flush_conntrack(self, act: FlushConntrack) -> int:
        if self._ct is None:
            self._ct = Conntrack(self.netns)
        deleted = 0
        for addr in act.addresses:
            deleted += self._ct.delete_matching(reply_dst=str(addr))
        if act.mark is not None:
            deleted += self._ct.delete_many(conntrack_victims(self._ct.entries(), act))
        return deleted

    def install_pinning(self) -> None:
        from ipshift.net.nft import Nft

        t = self.cfg.settings.nft_table
        with Nft(self.netns) as nft:
            # atomic replace: whatever an earlier run left goes, the new table comes in one go
            nft.run(f"add table inet {t}\ndelete table inet {t}\n" + pin_ruleset(self.cfg))

    def remove_pinning(self) -> None:
        from ipshift.net.nft import Nft

        with Nft(self.netns) as nft:
            nft.delete_table("inet", self.cfg.settings.nft_table, missing_ok=True)

    def close(self) -> None:
        if self._ct is not None:
            self._ct.close()
        if self._batch is not None:
            self._batch.close()
        self.nl.close()
