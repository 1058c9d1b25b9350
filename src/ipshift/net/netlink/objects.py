"""The plain data of the package: frozen dataclasses for what rtnetlink describes, the one error
it raises, and pure checks and defaults for the values callers give. No I/O."""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass, field

from ipshift.net.errors import NetError
from ipshift.net.netlink.constants import (
    IFA_F_DADFAILED,
    IFA_F_DEPRECATED,
    IFA_F_NOPREFIXROUTE,
    IFA_F_PERMANENT,
    IFA_F_SECONDARY,
    IFA_F_TEMPORARY,
    IFA_F_TENTATIVE,
    NTF_EXT_MANAGED,
    NTF_ROUTER,
    NUD_FAILED,
    NUD_NAMES,
    NUD_NOARP,
    NUD_NONE,
    NUD_PERMANENT,
    NUD_REACHABLE,
    RT_SCOPE_HOST,
    RT_SCOPE_LINK,
    RT_SCOPE_UNIVERSE,
    RT_TABLE_MAIN,
    RTNH_F_DEAD,
    RTNH_F_LINKDOWN,
    RTPROT_STATIC,
)


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
    """An interface address. `flags` are IFA_FLAGS (IFA_F_*); `valid_lft` and `preferred_lft`
    are the seconds left as the kernel reported them (None: forever); they count down, so a
    later read of the same address reports smaller ones."""

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

    @property
    def secondary(self) -> bool:
        """IPv4: another address of the same subnet came first on the device (it is removed
        with that primary unless net.ipv4.conf.DEV.promote_secondaries is set)."""
        return self.family == socket.AF_INET and bool(self.flags & IFA_F_SECONDARY)

    @property
    def temporary(self) -> bool:
        """IPv6: a privacy address (the same flag bit as IPv4's secondary)."""
        return self.family == socket.AF_INET6 and bool(self.flags & IFA_F_TEMPORARY)

    @property
    def permanent(self) -> bool:
        """Added with an infinite valid lifetime; not learnt from router advertisements."""
        return bool(self.flags & IFA_F_PERMANENT)

    @property
    def noprefixroute(self) -> bool:
        """The kernel adds no prefix route for this address."""
        return bool(self.flags & IFA_F_NOPREFIXROUTE)

    @property
    def forever(self) -> bool:
        """Neither lifetime runs out."""
        return self.valid_lft is None and self.preferred_lft is None


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


# --- checks and defaults for values callers give ----------------------------------------------


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



def _interface(cidr: str) -> ipaddress.IPv4Interface | ipaddress.IPv6Interface:
    try:
        return ipaddress.ip_interface(cidr)
    except ValueError as exc:
        raise ValueError(f"invalid address {cidr!r}: {exc}") from exc
