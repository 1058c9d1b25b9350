"""What a routes configuration says: uplinks, probe profiles, rules, routes and daemon settings.

Plain frozen dataclasses shared by the parser, the engines and the daemon. Addresses are
`ipaddress` objects; a route's or rule's `origin` says where it was written ("file:line") so every
problem can point at its line.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field, replace
from typing import Literal

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# Route/rule protocol number that marks what the daemon owns (rtnetlink RTPROT_*; values >=
# RTPROT_STATIC are not interpreted by the kernel). 73 is unused by iproute2's rt_protos list.
DEFAULT_PROTOCOL = 73

# The kernel stores an IPv6 route's metric 0 as 1024 (IP6_RT_PRIO_USER).
V6_DEFAULT_METRIC = 1024

# Well-known table names of iproute2.
TABLE_NAMES = {"main": 254, "default": 253, "local": 255, "unspec": 0}
RT_SCOPE_UNIVERSE = 0
RT_SCOPE_LINK = 253
RT_SCOPE_HOST = 254
SCOPE_NAMES = {"global": RT_SCOPE_UNIVERSE, "universe": RT_SCOPE_UNIVERSE, "site": 200,
               "link": RT_SCOPE_LINK, "host": RT_SCOPE_HOST}
ROUTE_TYPES = ("unicast", "blackhole", "unreachable", "prohibit", "throw")
RULE_ACTIONS = ("lookup", "blackhole", "unreachable", "prohibit")

Failback = Literal["stay", "move"]


def family_of(addr: IPAddress | IPNetwork) -> int:
    return 6 if addr.version == 6 else 4


@dataclass(frozen=True)
class Profile:
    """Probe timing and thresholds of one uplink (see PROFILES for the built-in ones).

    A target is down after `down_count` consecutive probes without a reply within `timeout`, or
    when the loss (percent) or mean RTT (ms) over the last `window` probes exceeds `max_loss` /
    `max_rtt`; it is up again after `up_count` consecutive replies. An uplink that went down stays
    down at least `hold_down` seconds, doubled for each flap within `flap_window` (capped at
    `max_hold_down`).
    """

    name: str
    interval: float
    timeout: float
    down_count: int
    up_count: int
    arp_interval: float
    hold_down: float
    max_hold_down: float
    flap_window: float
    window: int
    max_loss: float | None = None
    max_rtt: float | None = None

    def detection_bound(self) -> float:
        """Worst-case seconds from a silent gateway until its targets are declared down."""
        return self.interval * self.down_count + self.timeout

    def false_alarms_per_day(self, loss: float) -> float:
        """Expected false 'down' verdicts per day for one target at round-trip loss `loss` (0..1):
        down_count consecutive losses, one chance per probe."""
        per_probe = loss**self.down_count * (1 - loss)
        return per_probe * 86400 / self.interval


PROFILES: dict[str, Profile] = {
    # <= 1 s: 20 probes/s, 10 misses; 0.1 false alarms/day per target at 19 % round-trip loss
    # (10 % each way), ~1e-3 with two targets and quorum 1.
    "fast": Profile("fast", interval=0.05, timeout=0.25, down_count=10, up_count=10,
                    arp_interval=0.25, hold_down=1.0, max_hold_down=30.0, flap_window=30.0,
                    window=40),
    # <= 3 s: 5 probes/s, 10 misses; 0.03 false alarms/day per target at 19 % round-trip loss.
    "default": Profile("default", interval=0.2, timeout=0.5, down_count=10, up_count=10,
                       arp_interval=1.0, hold_down=5.0, max_hold_down=120.0, flap_window=120.0,
                       window=50),
    # OpenWrt mwan3track's built-in defaults (interval 10, timeout 4, down 5, up 5): a baseline.
    "mwan3": Profile("mwan3", interval=10.0, timeout=4.0, down_count=5, up_count=5,
                     arp_interval=10.0, hold_down=0.0, max_hold_down=0.0, flap_window=0.0,
                     window=5),
}

PROFILE_FIELDS = ("interval", "timeout", "down_count", "up_count", "arp_interval", "hold_down",
                  "max_hold_down", "flap_window", "window", "max_loss", "max_rtt")


@dataclass(frozen=True)
class Nexthop:
    dev: str | None
    gateway: IPAddress | None = None
    weight: int = 1
    onlink: bool = False

    def describe(self) -> str:
        parts = []
        if self.gateway is not None:
            parts.append(f"via {self.gateway}")
        if self.dev:
            parts.append(f"dev {self.dev}")
        if self.weight != 1:
            parts.append(f"weight {self.weight}")
        if self.onlink:
            parts.append("onlink")
        return " ".join(parts)


@dataclass(frozen=True)
class RouteSpec:
    """One configured route. Routes with equal `group_key()` are alternatives (the seed's
    definition: same table, destination, prefix length, metric and scope): the first alive one is
    installed. A route given with `nexthop` keywords is multipath: its alive nexthops are kept."""

    family: int
    table: int
    dst: IPNetwork
    nexthops: tuple[Nexthop, ...] = ()
    metric: int = 0
    scope: int | None = None  # None: derived (link for device-only routes, else universe)
    type: str = "unicast"
    src: IPAddress | None = None
    tos: int = 0
    multipath: bool = False
    static: bool = False  # `proto static`: keep across device state changes (all owned routes are)
    origin: str = ""

    def __post_init__(self) -> None:
        # The kernel's form, so that what is configured equals what a dump reports: IPv6 has no
        # route scopes and stores metric 0 as 1024; an explicit scope equal to the one the
        # route gets anyway is no scope.
        if self.family == 6:
            object.__setattr__(self, "scope", None)
            if self.metric == V6_DEFAULT_METRIC:
                object.__setattr__(self, "metric", 0)
        elif self.scope is not None and self.scope == self.default_scope():
            object.__setattr__(self, "scope", None)

    def default_scope(self) -> int:
        """The scope of the route when none is given: link for an IPv4 route whose nexthops all
        lack a gateway, universe otherwise (IPv6 routes have no scope)."""
        if self.family == 4 and self.type == "unicast" and self.nexthops \
                and all(nh.gateway is None for nh in self.nexthops):
            return RT_SCOPE_LINK
        return RT_SCOPE_UNIVERSE

    def kernel_scope(self) -> int:
        return self.default_scope() if self.scope is None else self.scope

    def group_key(self) -> tuple[int, int, IPNetwork, int, int, int | None]:
        return (self.family, self.table, self.dst, self.metric, self.tos, self.scope)

    def describe(self) -> str:
        dst = "default" if self.dst.prefixlen == 0 else str(self.dst)
        head = dst if self.type == "unicast" else f"{self.type} {dst}"
        hops = " ".join(("nexthop " if self.multipath else "") + nh.describe()
                        for nh in self.nexthops)
        extra = f" src {self.src}" if self.src else ""
        extra += f" metric {self.metric}" if self.metric else ""
        return f"{head} {hops}{extra} table {table_name(self.table)}".replace("  ", " ")


@dataclass(frozen=True)
class RuleSpec:
    family: int
    priority: int
    table: int = 254
    action: str = "lookup"
    src: IPNetwork | None = None
    dst: IPNetwork | None = None
    iif: str | None = None
    oif: str | None = None
    fwmark: int | None = None
    fwmask: int | None = None
    tos: int = 0
    invert: bool = False
    origin: str = field(default="", compare=False)  # where it was written; not identity

    def __post_init__(self) -> None:
        # The kernel's form (what a dump reports), so that a configured rule equals the rule
        # read back: no FRA_SRC/FRA_DST for a /0 prefix; a mark's mask 0xffffffff is the
        # default (None); no mask without a mark.
        if self.src is not None and self.src.prefixlen == 0:
            object.__setattr__(self, "src", None)
        if self.dst is not None and self.dst.prefixlen == 0:
            object.__setattr__(self, "dst", None)
        if self.fwmark is None or self.fwmask == 0xFFFFFFFF:
            object.__setattr__(self, "fwmask", None)

    def describe(self) -> str:
        parts = [f"prio {self.priority}"]
        if self.invert:
            parts.append("not")
        parts.append(f"from {self.src}" if self.src else "from all")
        if self.dst:
            parts.append(f"to {self.dst}")
        if self.iif:
            parts.append(f"iif {self.iif}")
        if self.oif:
            parts.append(f"oif {self.oif}")
        if self.fwmark is not None:
            parts.append(f"fwmark {self.fwmark:#x}" + (f"/{self.fwmask:#x}" if self.fwmask else ""))
        parts.append(f"lookup {table_name(self.table)}" if self.action == "lookup"
                     else self.action)
        return " ".join(parts)


@dataclass(frozen=True)
class UplinkSpec:
    """A gateway (or point-to-point device) the daemon watches.

    `targets` get ICMP echo (the gateway itself when none are given); `quorum` of them must answer
    for the uplink to be up. `gateway_probe` adds ARP (IPv4) / neighbour solicitations (IPv6) to
    the gateway, sent with the uplink's source address. `table` and `mark` are the uplink's own
    routing table and firewall mark: probes and pinned flows are routed through them.
    """

    name: str
    interface: str
    family: int
    gateway: IPAddress | None
    source: IPAddress | None
    targets: tuple[IPAddress, ...]
    quorum: int
    profile: Profile
    gateway_probe: bool = True
    table: int = 0
    mark: int = 0
    origin: str = ""

    def matches(self, nh: Nexthop) -> bool:
        if nh.dev != self.interface:
            return False
        return nh.gateway == self.gateway


@dataclass(frozen=True)
class Settings:
    name: str = "routes"  # control socket /run/ipshift/<name>.sock
    protocol: int = DEFAULT_PROTOCOL
    table_base: int = 7300  # uplink i gets table table_base + i
    rule_priority: int = 5  # priority of the per-uplink fwmark rules (probes and pinned flows)
    mark_mask: int = 0x00FF0000
    failback: Failback = "stay"
    conntrack: bool = True  # delete a dead uplink's conntrack entries
    hooks: tuple[str, ...] = ()
    hook_timeout: float = 30.0
    metrics: str | None = None  # "ADDRESS:PORT" for Prometheus
    profile: str = "default"

    @property
    def mark_shift(self) -> int:
        mask = self.mark_mask
        shift = 0
        while mask and not mask & 1:
            mask >>= 1
            shift += 1
        return shift

    def mark_for(self, index: int) -> int:
        return (index + 1) << self.mark_shift

    @property
    def nft_table(self) -> str:
        return f"ipshift_{self.name}".replace("-", "_")


@dataclass(frozen=True)
class RoutesConfig:
    settings: Settings = field(default_factory=Settings)
    uplinks: tuple[UplinkSpec, ...] = ()
    rules: tuple[RuleSpec, ...] = ()
    routes: tuple[RouteSpec, ...] = ()
    source: str = ""

    def uplink(self, name: str) -> UplinkSpec:
        for up in self.uplinks:
            if up.name == name:
                return up
        raise KeyError(name)

    def uplink_for(self, nh: Nexthop) -> UplinkSpec | None:
        for up in self.uplinks:
            if up.matches(nh):
                return up
        if nh.gateway is not None:
            return None
        # a device-only nexthop follows the uplink on that device when there is exactly one
        on_dev = [up for up in self.uplinks if up.interface == nh.dev]
        return on_dev[0] if len(on_dev) == 1 else None

    def groups(self) -> dict[tuple[int, int, IPNetwork, int, int, int | None], list[RouteSpec]]:
        """Alternative groups in configuration order."""
        out: dict[tuple[int, int, IPNetwork, int, int, int | None], list[RouteSpec]] = {}
        for r in self.routes:
            out.setdefault(r.group_key(), []).append(r)
        return out

    def with_profile(self, name: str) -> RoutesConfig:
        """The same configuration with every uplink on profile `name` (bench, demo, --profile)."""
        prof = PROFILES[name]
        ups = tuple(replace(u, profile=prof) for u in self.uplinks)
        return replace(self, uplinks=ups, settings=replace(self.settings, profile=name))


def table_name(table: int) -> str:
    for name, num in TABLE_NAMES.items():
        if num == table and name != "unspec":
            return name
    return str(table)
