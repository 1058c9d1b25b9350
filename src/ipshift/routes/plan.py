"""The decision engine: which routes and rules the kernel should hold, and how to get there.

A sans-I/O class fed with uplink verdicts, device and address state, and what the kernel reports
about routes and rules; it emits frozen-dataclass actions (install/remove a route or rule, delete
a dead uplink's conntrack entries, run hooks). Policy:

* alternatives (routes with the same table, destination, metric, tos and scope): the first whose
  paths are alive is installed; when none is alive, the first that can be installed is kept (a
  route into a dead gateway loses packets, falling through to another table would send them with
  the wrong source);
* multipath routes keep their alive nexthops with their weights (all of them when none is alive);
* every uplink has its own table (default route via its gateway, for probes and pinned flows) and
  a fwmark rule into it;
* ownership: everything is installed with the daemon's route protocol number; a route key that
  holds a route of another protocol is a conflict and is left alone; removal names the protocol,
  so the kernel never deletes another owner's route for us;
* conntrack: when an uplink goes down its entries (by NAT source address, and by the uplink's
  mark when flows are pinned) are deleted, never the whole table. With failback `move`, the
  entries of an uplink that loses its place to a recovered one are deleted too;
* restart (`hold`): the owned routes a previous instance left in the kernel for configured
  routes are kept as they are until the uplinks their choice depends on have been judged (or
  their verdict bound has passed), so a restart never brings back a route into a gateway that
  was found dead; the kernel's routes also tell which uplinks were down
  (`down_before_restart`), and until judged those count as down for routes to be added. A
  route that is missing is installed at once, and a first start (nothing owned) holds nothing.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass, field

from ipshift.routes.model import (
    RT_SCOPE_LINK,
    RT_SCOPE_UNIVERSE,
    IPAddress,
    IPNetwork,
    Nexthop,
    RoutesConfig,
    RouteSpec,
    RuleSpec,
    UplinkSpec,
    table_name,
)

IPInterface = ipaddress.IPv4Interface | ipaddress.IPv6Interface
RouteKey = tuple[int, int, IPNetwork, int, int]

RETRY_AFTER = 1.0  # seconds before a failed kernel operation is tried again


@dataclass(frozen=True)
class KNexthop:
    dev: str
    gateway: IPAddress | None = None
    weight: int = 1
    onlink: bool = False


@dataclass(frozen=True)
class KRoute:
    """A route as the kernel holds it (normalised so that dumps compare equal)."""

    family: int
    table: int
    dst: IPNetwork
    nexthops: tuple[KNexthop, ...] = ()
    metric: int = 0
    tos: int = 0
    type: str = "unicast"
    scope: int = RT_SCOPE_UNIVERSE
    src: IPAddress | None = None

    @property
    def key(self) -> RouteKey:
        return (self.family, self.table, self.dst, self.metric, self.tos)

    def describe(self) -> str:
        dst = "default" if self.dst.prefixlen == 0 else str(self.dst)
        parts = [dst if self.type == "unicast" else f"{self.type} {dst}"]
        multi = len(self.nexthops) > 1
        for nh in self.nexthops:
            hop = ("nexthop " if multi else "") + (f"via {nh.gateway} " if nh.gateway else "")
            hop += f"dev {nh.dev}" + (f" weight {nh.weight}" if multi and nh.weight != 1 else "")
            parts.append(hop)
        if self.src:
            parts.append(f"src {self.src}")
        if self.metric:
            parts.append(f"metric {self.metric}")
        parts.append(f"table {table_name(self.table)}")
        return " ".join(parts)


#: A rule as the kernel holds it is the configured RuleSpec itself: its `origin` takes no part
#: in equality or hashing, so a rule read back from the kernel equals the one configured.
KRule = RuleSpec


# ---- actions -------------------------------------------------------------------------------
@dataclass(frozen=True)
class InstallRoute:
    route: KRoute
    replace: bool  # an owned route with this key is there already
    previous: KRoute | None = field(default=None, compare=False)  # that route (when replace)


@dataclass(frozen=True)
class RemoveRoute:
    route: KRoute


@dataclass(frozen=True)
class AddRule:
    rule: KRule


@dataclass(frozen=True)
class RemoveRule:
    rule: KRule


@dataclass(frozen=True)
class FlushConntrack:
    """Delete the conntrack entries of one uplink: replies addressed to one of `addresses` (its
    NAT/source addresses) or, when `mark` is set, entries carrying its mark under `mask`."""

    uplink: str
    addresses: tuple[IPAddress, ...]
    mark: int | None = None
    mask: int | None = None
    reason: str = ""


@dataclass(frozen=True)
class RunHook:
    uplink: str
    state: str
    previous: str
    reason: str
    env: tuple[tuple[str, str], ...]


PlanAction = InstallRoute | RemoveRoute | AddRule | RemoveRule | FlushConntrack | RunHook


@dataclass
class _Link:
    admin_up: bool
    carrier: bool


@dataclass
class _Selection:
    uplinks: frozenset[str] = frozenset()
    alive: bool = True
    member: int = 0


@dataclass
class Planner:
    config: RoutesConfig
    uplink_state: dict[str, str] = field(default_factory=dict)
    links: dict[str, _Link] = field(default_factory=dict)
    addresses: dict[str, set[IPInterface]] = field(default_factory=dict)
    installed: dict[RouteKey, KRoute] = field(default_factory=dict)
    foreign: dict[RouteKey, set[KRoute]] = field(default_factory=dict)  # other owners' routes
    rules: set[KRule] = field(default_factory=set)
    retry_at: dict[object, float] = field(default_factory=dict)
    errors: dict[object, str] = field(default_factory=dict)
    selection: dict[RouteKey, _Selection] = field(default_factory=dict)
    stopping: bool = False
    _actions: list[PlanAction] = field(default_factory=list)
    _groups: dict[RouteKey, list[RouteSpec]] = field(default_factory=dict)
    _moves: set[str] = field(default_factory=set)
    _desired: dict[RouteKey, KRoute] | None = None  # cache; None: recompute on next reconcile
    _dirty: set[RouteKey] = field(default_factory=set)  # keys the kernel reported on since
    # restart: keys whose owned route a previous instance left; uplinks not judged yet, with the
    # time their hold ends; uplinks the kernel's routes show were down (until judged)
    held: set[RouteKey] = field(default_factory=set)
    hold_until: dict[str, float] = field(default_factory=dict)
    presumed_down: set[str] = field(default_factory=set)
    _group_uplinks: dict[RouteKey, frozenset[str]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for up in self.config.uplinks:
            self.uplink_state.setdefault(up.name, "unknown")
        for g in self.config.groups().values():
            r = g[0]
            key = (r.family, r.table, r.dst, r.metric, r.tos)
            self._groups[key] = g
            self._group_uplinks[key] = self._uplinks_of([nh for spec in g for nh in spec.nexthops])

    # ---- inputs ----------------------------------------------------------------------------
    def set_uplink(self, name: str, state: str, reason: str = "") -> None:
        previous = self.uplink_state.get(name, "unknown")
        if previous == state:
            return
        self.uplink_state[name] = state
        self._desired = None
        was_down = previous == "down" or name in self.presumed_down  # before a restart, too
        if state != "unknown":  # the engine's own verdict: what was held for it is decided now
            self.hold_until.pop(name, None)
            self.presumed_down.discard(name)
            if not self.hold_until:
                self.held.clear()
        up = self.config.uplink(name)
        s = self.config.settings
        if state == "down" and s.conntrack:
            pinned = s.failback == "stay"
            self._actions.append(FlushConntrack(
                name, self.sources_of(up), up.mark if pinned else None,
                s.mark_mask if pinned else None, reason))
        if state == "up" and was_down and s.failback == "move":
            self._moves.add(name)
        env = (("IPSHIFT_UPLINK", name), ("IPSHIFT_STATE", state),
               ("IPSHIFT_PREVIOUS", previous), ("IPSHIFT_REASON", reason),
               ("IPSHIFT_INTERFACE", up.interface),
               ("IPSHIFT_GATEWAY", str(up.gateway) if up.gateway else ""),
               ("IPSHIFT_SOURCE", ",".join(str(a) for a in self.sources_of(up))),
               ("IPSHIFT_TABLE", str(up.table)))
        if s.hooks:
            self._actions.append(RunHook(name, state, previous, reason, env))

    def set_link(self, dev: str, admin_up: bool | None, carrier: bool | None = None) -> None:
        """Device state; admin_up None: the device is gone."""
        if admin_up is None:
            self.links.pop(dev, None)
            self.addresses.pop(dev, None)
        else:
            self.links[dev] = _Link(admin_up, bool(carrier))
        self._clear_retries()

    def set_addresses(self, dev: str, addrs: Iterable[IPInterface]) -> None:
        self.addresses[dev] = set(addrs)
        self._clear_retries()

    def kernel_route(self, route: KRoute, *, owned: bool, present: bool) -> None:
        """What the kernel reports (dump at start, then events)."""
        key = route.key
        self._dirty.add(key)
        if owned:
            if present:
                self.installed[key] = route
            elif self.installed.get(key) == route:
                del self.installed[key]
        elif present:
            # by identity: the same route reported twice (an event and the dump that follows the
            # subscription, or its owner's replace) is still one route
            self.foreign.setdefault(key, set()).add(route)
        elif key in self.foreign:
            self.foreign[key].discard(route)
            if not self.foreign[key]:
                del self.foreign[key]

    def load_kernel(self, routes: Iterable[tuple[KRoute, bool]], rules: Iterable[KRule]) -> None:
        """A full read of the kernel (start, resync): what it holds replaces what was known;
        `routes` pairs each route with whether it is owned (by protocol number)."""
        self.installed.clear()
        self.foreign.clear()
        for route, owned in routes:
            self.kernel_route(route, owned=owned, present=True)
        self.rules = set(rules)
        self._desired = None  # a route that went without an event is found by a full pass

    def kernel_rule(self, rule: KRule, *, present: bool) -> None:
        if present:
            self.rules.add(rule)
        else:
            self.rules.discard(rule)

    def applied(self, action: PlanAction, error: str | None, now: float) -> None:
        """The adapter's report on one action; a failure is retried after RETRY_AFTER."""
        if error is None:
            return
        if isinstance(action, InstallRoute | RemoveRoute):
            self._dirty.add(action.route.key)
        if isinstance(action, InstallRoute):
            key: object = action.route.key
            if self.installed.get(action.route.key) == action.route:
                if action.replace and action.previous is not None:
                    # a failed replace leaves the old route in place: still ours to replace
                    # (not add) on retry, and to remove on stop
                    self.installed[action.route.key] = action.previous
                else:
                    del self.installed[action.route.key]
        elif isinstance(action, RemoveRoute):
            key = action.route.key
            if "No such process" in error or "ESRCH" in error:
                return  # gone already: that is what we wanted
            self.installed[action.route.key] = action.route
        elif isinstance(action, AddRule):
            key = action.rule
            self.rules.discard(action.rule)
        elif isinstance(action, RemoveRule):
            key = action.rule
            if "No such" in error or "ENOENT" in error:
                return
            self.rules.add(action.rule)
        else:
            return
        self.retry_at[key] = now + RETRY_AFTER
        self.errors[key] = error

    def _clear_retries(self) -> None:
        # a device or address change may be what a failed operation waited for
        self.retry_at.clear()
        self._desired = None

    # ---- desired state ---------------------------------------------------------------------
    def usable(self, nh: Nexthop | KNexthop, src: IPAddress | None) -> bool:
        """Can the kernel take a route through this nexthop now?"""
        if nh.dev is None:
            return False
        link = self.links.get(nh.dev)
        if link is None or not link.admin_up:
            return False
        if src is not None and not self.is_local(src):
            return False
        gw = nh.gateway
        if gw is None or nh.onlink or (gw.version == 6 and gw.is_link_local):
            return True
        return any(gw in a.network for a in self.addresses.get(nh.dev, ()))

    def alive(self, nh: Nexthop | KNexthop, *, presume: bool = True,
              judged: bool = False) -> bool:
        """Can this nexthop carry traffic: its link is up, and its uplink is not judged down
        (nor, with `presume`, shown down by the kernel at a restart and not judged yet; nor,
        with `judged`, still waiting for its first verdict after a restart)."""
        if nh.dev is None:
            return False
        link = self.links.get(nh.dev)
        if link is None or not link.admin_up or not link.carrier:
            return False
        up = self.config.uplink_for(Nexthop(nh.dev, nh.gateway))
        if up is None:
            return True
        if judged and up.name in self.hold_until:
            return False
        if presume and up.name in self.presumed_down:
            return False
        return self.uplink_state.get(up.name) != "down"

    def is_local(self, addr: IPAddress) -> bool:
        return any(a.ip == addr for addrs in self.addresses.values() for a in addrs)

    def sources_of(self, up: UplinkSpec) -> tuple[IPAddress, ...]:
        """The uplink's source (NAT) addresses: the configured one, else the device's address in
        the gateway's subnet, else its global addresses of the family."""
        if up.source is not None:
            return (up.source,)
        # never a link-local address (an IPv6 gateway is usually fe80::1, on the device's
        # fe80::/64): it cannot be a NAT or source address beyond the link
        addrs = [a for a in self.addresses.get(up.interface, ())
                 if a.version == up.family and not a.ip.is_link_local]
        if up.gateway is not None:
            on_net = [a.ip for a in addrs if up.gateway in a.network]
            if on_net:
                return tuple(sorted(on_net))
        return tuple(sorted(a.ip for a in addrs))

    def _kroute(self, spec: RouteSpec, hops: list[Nexthop]) -> KRoute:
        khops = tuple(KNexthop(nh.dev or "", nh.gateway, nh.weight if len(hops) > 1 else 1,
                               nh.onlink) for nh in hops)
        # the scope of the route as configured (with all its nexthops), whichever are chosen:
        # what the parser normalised against, and stable while nexthops come and go
        return KRoute(spec.family, spec.table, spec.dst, khops, spec.metric, spec.tos, spec.type,
                      spec.kernel_scope(), spec.src)

    def choose(self, group: list[RouteSpec], *, judged: bool = False
               ) -> tuple[KRoute | None, _Selection]:
        """The route to install for one alternative group; `judged`: only paths the verdicts
        since a restart say are alive count as alive."""
        fallback: tuple[KRoute, _Selection] | None = None
        for i, spec in enumerate(group):
            if spec.type != "unicast":
                return self._kroute(spec, []), _Selection(frozenset(), True, i)
            usable = [nh for nh in spec.nexthops if self.usable(nh, spec.src)]
            if not usable:
                continue
            alive = [nh for nh in usable if self.alive(nh, judged=judged)]
            if alive:
                return self._kroute(spec, alive), _Selection(self._uplinks_of(alive), True, i)
            if fallback is None:
                fallback = (self._kroute(spec, usable),
                            _Selection(self._uplinks_of(usable), False, i))
        if fallback is not None:
            return fallback
        return None, _Selection(frozenset(), False, -1)

    def _uplinks_of(self, hops: list[Nexthop]) -> frozenset[str]:
        names = set()
        for nh in hops:
            up = self.config.uplink_for(nh)
            if up is not None:
                names.add(up.name)
        return frozenset(names)

    def desired_routes(self) -> tuple[dict[RouteKey, KRoute], dict[RouteKey, _Selection]]:
        routes: dict[RouteKey, KRoute] = {}
        selections: dict[RouteKey, _Selection] = {}
        for key, group in self._groups.items():
            route, sel = self.choose(group)
            selections[key] = sel
            if route is not None:
                routes[route.key] = route
        for up in self.config.uplinks:
            dst = ipaddress.ip_network("::/0" if up.family == 6 else "0.0.0.0/0")
            nh = Nexthop(up.interface, up.gateway)
            srcs = self.sources_of(up)
            src = srcs[0] if srcs else None
            route = KRoute(up.family, up.table, dst, (KNexthop(up.interface, up.gateway),),
                           scope=RT_SCOPE_UNIVERSE if up.gateway or up.family == 6
                           else RT_SCOPE_LINK, src=src)
            if route.key in routes or src is None or not self.usable(nh, src):
                continue
            routes[route.key] = route
        return routes, selections

    def desired_rules(self) -> set[KRule]:
        s = self.config.settings
        rules = set(self.config.rules)
        for up in self.config.uplinks:
            rules.add(KRule(up.family, s.rule_priority, up.table, fwmark=up.mark,
                            fwmask=s.mark_mask))
        return rules

    # ---- restart ---------------------------------------------------------------------------
    def owns_configured_routes(self) -> bool:
        """Does the kernel hold an owned route for a configured key (left by an earlier run)?"""
        return any(key in self._groups for key in self.installed)

    def down_before_restart(self) -> frozenset[str]:
        """Uplinks that the owned routes in the kernel show were judged down when they were
        chosen: left out of a multipath route while usable, or passed over for a later
        alternative. An uplink some route shows alive is never among them; a first alternative
        taken whole tells nothing (it is also what stays when every path is dead)."""
        down: set[str] = set()
        alive: set[str] = set()
        for key, group in self._groups.items():
            current = self.installed.get(key)
            if current is None:
                continue
            passed_over: set[str] = set()
            for spec in group:
                if spec.type != "unicast":
                    break
                usable = [nh for nh in spec.nexthops if self.usable(nh, spec.src)]
                if not usable:
                    continue
                picked = [nh for nh in usable if any(
                    k.dev == nh.dev and k.gateway == nh.gateway for k in current.nexthops)]
                if picked and self._kroute(spec, picked) == current:
                    left_out = self._uplinks_of([nh for nh in usable if nh not in picked])
                    if passed_over or left_out:
                        down |= passed_over | left_out
                        alive |= self._uplinks_of(picked)
                    break
                if any(self.config.uplink_for(nh) is None for nh in usable):
                    break  # passed over for its link, which says nothing of an uplink
                passed_over |= self._uplinks_of(usable)
        return frozenset(down - alive)

    def hold(self, until: dict[str, float], presumed_down: Iterable[str] = ()) -> None:
        """At start over what a previous instance left: keep its owned routes of configured keys
        as they are while an uplink their choice depends on is not judged yet, at most until
        `until[uplink]`; `presumed_down` uplinks count as down until judged."""
        self.held = {key for key in self.installed if key in self._groups}
        involved: set[str] = set()
        for key in self.held:
            involved |= self._group_uplinks[key]
        self.hold_until = {name: at for name, at in until.items()
                           if name in involved and self.uplink_state.get(name) == "unknown"}
        self.presumed_down = {n for n in presumed_down if n in self.hold_until}
        if not self.hold_until:
            self.held.clear()
        self._desired = None

    def _held(self, key: RouteKey) -> bool:
        """Is the owned route at `key` kept from before the restart, waiting for verdicts?"""
        return key in self.held and bool(self._group_uplinks[key] & self.hold_until.keys())

    def _while_held(self, key: RouteKey, current: KRoute) -> KRoute | None:
        """What may replace a held route: nothing while its paths are alive; once a verdict
        (or its link) says one of them is dead, the route the verdicts alone choose, if it
        runs only through uplinks judged alive (never one not judged yet, which could be as
        dead: swapping would flap)."""
        if all(self.alive(nh, presume=False) for nh in current.nexthops):
            return None
        route, selection = self.choose(self._groups[key], judged=True)
        return route if selection.alive and route != current else None

    def _expire_holds(self, now: float) -> None:
        expired = [name for name, at in self.hold_until.items() if at <= now]
        for name in expired:
            del self.hold_until[name]
            self.presumed_down.discard(name)
        if expired:
            if not self.hold_until:
                self.held.clear()
            self._desired = None  # unknown counts as alive now: a full pass

    # ---- reconcile -------------------------------------------------------------------------
    def reconcile(self, now: float) -> None:
        """Emit what brings the kernel to the desired state (idempotent). Incremental: the
        desired routes are recomputed only after a change of uplinks, devices or addresses;
        kernel reports only re-check the keys they touched (10,000 routes stay cheap)."""
        if self.stopping:
            return
        if self._desired is None:
            desired, selections = self.desired_routes()
            self._desired = desired
            self._note_selections(selections)
            keys: Iterable[RouteKey] = list(desired) + [k for k in self.installed
                                                        if k not in desired]
        else:
            desired = self._desired
            keys = [k for k in self._dirty]
        self._dirty = set()
        for key in keys:
            route = desired.get(key)
            current = self.installed.get(key)
            if route is None:
                if current is not None and self.retry_at.get(key, 0.0) <= now \
                        and not self._held(key):
                    self._actions.append(RemoveRoute(current))
                    del self.installed[key]
                continue
            if key in self.foreign:
                self.errors[key] = (f"{route.describe()}: a route not owned by ipshift is in "
                                    "the way; delete it or drop this route from the config")
                continue
            if current == route:
                self.errors.pop(key, None)
                continue
            if self.retry_at.get(key, 0.0) > now:
                continue
            if current is not None and self._held(key):
                route = self._while_held(key, current)
                if route is None:
                    continue
            self._actions.append(InstallRoute(route, replace=current is not None,
                                              previous=current))
            self.installed[key] = route
        self._reconcile_rules(now)

    def _note_selections(self, selections: dict[RouteKey, _Selection]) -> None:
        for key, sel in selections.items():
            old = self.selection.get(key)
            if old is not None and self._moves and self.config.settings.conntrack:
                gained = sel.uplinks - old.uplinks
                lost = old.uplinks - sel.uplinks
                if gained & self._moves:
                    for name in sorted(lost):
                        up = self.config.uplink(name)
                        self._actions.append(FlushConntrack(
                            name, self.sources_of(up), reason=f"failback to {sorted(gained)[0]}"))
            self.selection[key] = sel
        self._moves.clear()

    def _reconcile_rules(self, now: float) -> None:
        want = self.desired_rules()
        for rule in sorted(want - self.rules, key=_rule_order):
            if self.retry_at.get(rule, 0.0) > now:
                continue
            self._actions.append(AddRule(rule))
            self.rules.add(rule)
        for rule in sorted(self.rules - want, key=_rule_order):
            if self.retry_at.get(rule, 0.0) <= now:
                self._actions.append(RemoveRule(rule))
                self.rules.discard(rule)

    def teardown(self) -> None:
        """Remove everything owned (daemon stop)."""
        self.stopping = True
        for route in list(self.installed.values()):
            self._actions.append(RemoveRoute(route))
        self.installed.clear()
        for rule in sorted(self.rules, key=_rule_order):
            self._actions.append(RemoveRule(rule))
        self.rules.clear()

    def next_timer(self) -> float | None:
        times = [*self.retry_at.values(), *self.hold_until.values()]
        return min(times) if times else None

    def handle_timer(self, now: float) -> None:
        self._expire_holds(now)
        due = [key for key, at in self.retry_at.items() if at <= now]
        for key in due:
            del self.retry_at[key]
        if due:
            self._desired = None  # retry with a full pass
        self.reconcile(now)

    def actions(self) -> list[PlanAction]:
        """Pending actions; kernel routes and rules first, so that conntrack entries are deleted
        only once new packets already take the new path, and hooks see the result."""
        out, self._actions = self._actions, []
        out.sort(key=lambda a: 2 if isinstance(a, RunHook)
                 else 1 if isinstance(a, FlushConntrack) else 0)
        return out

    # ---- reporting -------------------------------------------------------------------------
    def route_rows(self, limit: int = 200) -> list[dict[str, object]]:
        """Status rows of the configured routes (problems first; at most `limit`)."""
        rows: list[dict[str, object]] = []
        keys = sorted(self._groups, key=lambda k: (k not in self.foreign and k in self.installed))
        for key in keys[:limit]:
            group = self._groups[key]
            sel = self.selection.get(key)
            installed = self.installed.get(key)
            state = "installed" if installed else "pending"
            if key in self.foreign:
                state = "conflict"
            elif installed and self._held(key):
                state = "held"  # kept from before a restart until its uplinks are judged
            elif sel is not None and installed and not sel.alive:
                state = "no alive path"
            rows.append({
                "route": group[0].describe() if len(group) == 1
                else f"{len(group)} alternatives: {group[0].describe()}",
                "active": installed.describe() if installed else None,
                "member": sel.member + 1 if sel and sel.member >= 0 and len(group) > 1 else None,
                "state": state,
                "error": self.errors.get(key),
            })
        return rows


def _rule_order(r: KRule) -> tuple[int, int, str]:
    return (r.family, r.priority, repr(r))
