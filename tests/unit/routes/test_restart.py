"""Restart after a crash, with a fake clock: a new engine over what a killed one left in the
kernel keeps it as it is until its own detector has judged the uplinks involved."""

import heapq
import ipaddress
import itertools
from dataclasses import replace

from hypothesis import given, settings
from hypothesis import strategies as st

from ipshift.routes import config
from ipshift.routes.detect import SendProbe, UplinkChanged
from ipshift.routes.engine import RoutesEngine
from ipshift.routes.model import Nexthop
from ipshift.routes.plan import (
    AddRule,
    InstallRoute,
    KNexthop,
    KRoute,
    Planner,
    RemoveRoute,
    RemoveRule,
)
from tests.unit.routes.test_plan import ADDRS, DEFAULT4, SEED, SEED3, TABLES, Kernel

RTT = 0.002
SEED3_MULTIPATH = SEED3.replace(
    "nexthop via 203.0.113.1 dev wan1",
    "nexthop via 203.0.113.1 dev wan1 nexthop via 198.51.100.65 dev wan2")


def key(table):
    return (4, table, DEFAULT4, 0, 0)


def devs_of(route):
    return sorted(nh.dev for nh in route.nexthops)


class Site:
    """An engine, the kernel model of test_plan and a network that answers every probe of an
    uplink not in `dead` after RTT; time is whatever `run_until` says."""

    def __init__(self, cfg, kernel, devs, now, dead=()):
        self.cfg = cfg
        self.kernel = kernel
        self.devs = devs
        self.dead = set(dead)
        self.now = now
        self.timeline = []  # (time, action): everything the engine asked for
        self.replies = []
        self._n = itertools.count()
        self.engine = RoutesEngine(cfg, now)
        routes = [(r, owned) for aliases in kernel.routes.values() for r, owned in aliases]
        self.engine.kernel_state(
            routes, set(kernel.rules), now, links=[(d, True, True) for d in devs],
            addresses={d: {ipaddress.ip_interface(ADDRS[d])} for d in devs})
        self.engine.start(now)
        self._drain()

    def _drain(self):
        acts = self.engine.actions()
        self.timeline += [(self.now, a) for a in acts]
        self.kernel.apply(self.engine, [a for a in acts if not isinstance(a, SendProbe)],
                          self.now)
        for p in acts:
            if isinstance(p, SendProbe) and p.uplink not in self.dead:
                heapq.heappush(self.replies, (self.now + RTT, next(self._n), p))

    def run_until(self, end):
        for _ in range(200_000):  # bounded: the engines' timers always move forward
            t_timer = self.engine.next_timer()
            t_reply = self.replies[0][0] if self.replies else None
            t = min(t for t in (t_timer, t_reply, end) if t is not None)
            if t >= end:
                self.now = end
                return self
            self.now = max(t, self.now)
            if t_reply is not None and t_reply <= t:
                _, _, p = heapq.heappop(self.replies)
                self.engine.probe_reply(p.uplink, p.kind, p.target,
                                        p.seq if p.kind == "icmp" else None, self.now)
            else:
                self.engine.handle_timer(self.now)
            self._drain()
        raise AssertionError("the simulation did not reach its end")

    def verdicts(self):
        return [(t, a) for t, a in self.timeline if isinstance(a, UplinkChanged)]

    def first_verdict(self, uplink):
        return min((t for t, a in self.verdicts() if a.uplink == uplink), default=None)

    def changes(self):
        """Kernel changes asked for: routes and rules."""
        return [(t, a) for t, a in self.timeline
                if isinstance(a, InstallRoute | RemoveRoute | AddRule | RemoveRule)]


def seed(profile="fast", text=SEED):
    return config.loads(text, tables=TABLES).with_profile(profile)


DEVS = ("wan0", "wan1", "lan0")
DEVS3 = ("wan0", "wan1", "wan2", "lan0")


def snapshot(kernel):
    return dict(kernel.owned()), set(kernel.rules)


def test_restart_with_the_dead_uplink_still_dead_changes_nothing():
    """The case of a kill -9 while wan0's gateway is dead: the restarted engine installs no
    route through wan0 (nor anything else) before, or after, its detector judges wan0."""
    cfg = seed("default")
    first = Site(cfg, Kernel(), DEVS, 0.0, dead={"wan0"}).run_until(10.0)
    kernel = first.kernel
    assert devs_of(kernel.route(200)) == ["wan1"] and devs_of(kernel.route(100)) == ["wan1"]
    before = snapshot(kernel)

    second = Site(cfg, kernel, DEVS, 20.0, dead={"wan0"})
    rows = {r["active"]: r["state"] for r in second.engine.planner.route_rows()}
    assert [s for a, s in rows.items() if "table 200" in a] == ["held"]
    status = {r["uplink"]: r for r in second.engine.detector.snapshot(20.0)}
    assert status["wan0"]["state"] == "unknown"
    assert "down before the restart" in status["wan0"]["reason"]
    second.run_until(40.0)
    assert second.changes() == []
    assert snapshot(kernel) == before
    judged = {a.uplink: a.state for _, a in second.verdicts()}
    assert judged == {"wan0": "down", "wan1": "up"}
    assert not second.engine.planner.hold_until and not second.engine.planner.held


def test_first_start_over_an_empty_kernel_waits_for_nothing():
    cfg = seed("default")
    site = Site(cfg, Kernel(), DEVS, 0.0, dead={"wan0"})
    assert not site.engine.planner.hold_until
    at_start = [a for t, a in site.changes() if t == 0.0]
    installed = {a.route.key: a.route for a in at_start if isinstance(a, InstallRoute)}
    # everything at once, before any verdict, as the kernel would route (unknown is alive)
    assert devs_of(installed[key(200)]) == ["wan0"]
    assert devs_of(installed[key(100)]) == ["wan0", "wan1"]
    assert len(installed) == 6 and len([a for a in at_start if isinstance(a, AddRule)]) == 7
    site.run_until(10.0)
    assert devs_of(site.kernel.route(200)) == ["wan1"]


def test_an_uplink_that_recovered_meanwhile_returns_after_its_verdict():
    cfg = seed("fast")
    first = Site(cfg, Kernel(), DEVS, 0.0, dead={"wan0"}).run_until(5.0)
    second = Site(cfg, first.kernel, DEVS, 10.0, dead=set()).run_until(20.0)
    up_at = second.first_verdict("wan0")
    (verdict,) = [a for _, a in second.verdicts() if a.uplink == "wan0"]
    assert verdict.state == "up" and verdict.reason == "probes answered"
    wan0_installs = [t for t, a in second.changes() if isinstance(a, InstallRoute)
                     and "wan0" in devs_of(a.route)]
    assert wan0_installs and min(wan0_installs) >= up_at
    # a recovery after a restart needs up_count replies, like any recovery
    p = cfg.uplink("wan0").profile
    assert up_at - 10.0 >= (p.up_count - 1) * p.interval
    assert devs_of(second.kernel.route(200)) == ["wan0"]
    assert devs_of(second.kernel.route(100)) == ["wan0", "wan1"]


def test_an_uplink_that_died_meanwhile_is_replaced_once_judged():
    cfg = seed("fast")
    first = Site(cfg, Kernel(), DEVS, 0.0).run_until(5.0)
    assert devs_of(first.kernel.route(200)) == ["wan0"]
    second = Site(cfg, first.kernel, DEVS, 10.0, dead={"wan0"}).run_until(20.0)
    down_at = second.first_verdict("wan0")
    changes = second.changes()
    assert changes and min(t for t, _ in changes) >= down_at
    (t200,) = [a for _, a in changes if isinstance(a, InstallRoute) and a.route.table == 200]
    assert t200.replace and devs_of(t200.route) == ["wan1"]
    assert devs_of(second.kernel.route(100)) == ["wan1"]


def test_restart_with_every_gateway_dead_does_not_flap():
    """Every uplink dead before and after: the previous run kept the first routes; holding
    until all are judged keeps them (moving to a not yet judged one would flap)."""
    cfg = seed("fast", SEED3_MULTIPATH)
    first = Site(cfg, Kernel(), DEVS3, 0.0, dead={"wan0", "wan1", "wan2"}).run_until(5.0)
    before = snapshot(first.kernel)
    assert devs_of(first.kernel.route(200)) == ["wan0"]
    second = Site(cfg, first.kernel, DEVS3, 10.0, dead={"wan0", "wan1", "wan2"})
    second.run_until(20.0)
    assert second.changes() == []
    assert snapshot(first.kernel) == before


def test_a_held_route_through_a_dead_uplink_moves_to_one_judged_alive():
    """wan0 judged down, wan1 judged up, wan2 not judged yet: table 200 leaves wan0 for wan1
    at once (both verdicts are in), and table 100 keeps wan1 alone until wan2 is judged."""
    cfg = seed("fast", SEED3_MULTIPATH)
    planner = Planner(cfg)
    for dev in DEVS3:
        planner.set_link(dev, True, True)
        planner.set_addresses(dev, [ipaddress.ip_interface(ADDRS[dev])])
    kernel = Kernel()
    planner.reconcile(0.0)
    kernel.apply(planner, planner.actions())
    planner2 = Planner(cfg)
    for dev in DEVS3:
        planner2.set_link(dev, True, True)
        planner2.set_addresses(dev, [ipaddress.ip_interface(ADDRS[dev])])
    planner2.load_kernel([(r, True) for r in kernel.owned().values()], kernel.rules)
    planner2.hold({"wan0": 9.0, "wan1": 9.0, "wan2": 9.0})
    planner2.reconcile(1.0)
    assert planner2.actions() == []
    planner2.set_uplink("wan0", "down")
    planner2.reconcile(1.1)
    acts = [a for a in planner2.actions() if isinstance(a, InstallRoute)]
    assert acts == []  # nothing judged alive to move to yet
    planner2.set_uplink("wan1", "up")
    planner2.reconcile(1.2)
    moved = {a.route.table: devs_of(a.route) for a in planner2.actions()
             if isinstance(a, InstallRoute)}
    assert moved == {200: ["wan1"], 100: ["wan1"]}
    planner2.set_uplink("wan2", "up")
    planner2.reconcile(1.3)
    moved = {a.route.table: devs_of(a.route) for a in planner2.actions()
             if isinstance(a, InstallRoute)}
    assert moved == {100: ["wan1", "wan2"]}


def restarted_planner(cfg, routes, devs=DEVS):
    planner = Planner(cfg)
    for dev in devs:
        planner.set_link(dev, True, True)
        planner.set_addresses(dev, [ipaddress.ip_interface(ADDRS[dev])])
    planner.load_kernel([(r, True) for r in routes], ())
    return planner


def gw(dev):
    return {"wan0": ipaddress.ip_address("198.51.100.1"),
            "wan1": ipaddress.ip_address("203.0.113.1"),
            "wan2": ipaddress.ip_address("198.51.100.65")}[dev]


def route(table, *devs, src=None):
    hops = tuple(KNexthop(d, gw(d)) for d in devs)
    return KRoute(4, table, DEFAULT4, hops, src=None if src is None else
                  ipaddress.ip_address(src))


def test_the_kernels_routes_tell_which_uplinks_were_down():
    cfg = seed()
    t200_wan1 = route(200, "wan1", src="203.0.113.2")
    t200_wan0 = route(200, "wan0", src="198.51.100.2")
    # an alternative passed over, a nexthop left out: wan0 was down
    assert restarted_planner(cfg, [t200_wan1]).down_before_restart() == {"wan0"}
    assert restarted_planner(cfg, [route(100, "wan1")]).down_before_restart() == {"wan0"}
    # the first alternative, a multipath route whole: alive, or everything dead
    assert restarted_planner(cfg, [t200_wan0]).down_before_restart() == set()
    assert restarted_planner(cfg, [route(100, "wan0", "wan1")]).down_before_restart() == set()
    # table 100 shows wan1 down and wan0 alive, table 200 the reverse: a contradiction (say
    # the previous run was killed between two changes) tells nothing
    assert restarted_planner(cfg, [route(100, "wan0"), t200_wan1]).down_before_restart() \
        == set()
    # a route that is no configured alternative (the configuration changed) tells nothing
    other = route(200, "wan1", src="203.0.113.9")
    assert restarted_planner(cfg, [other]).down_before_restart() == set()


def test_a_route_missing_at_restart_is_added_at_once_with_the_previous_verdicts():
    cfg = seed("fast")
    first = Site(cfg, Kernel(), DEVS, 0.0, dead={"wan0"}).run_until(5.0)
    kernel = first.kernel
    gone = kernel.route(200)
    kernel.routes[gone.key].clear()
    second = Site(cfg, kernel, DEVS, 10.0, dead={"wan0"})
    added = [a for t, a in second.changes() if t == 10.0 and isinstance(a, InstallRoute)]
    assert [(a.route.table, devs_of(a.route), a.replace) for a in added] == [
        (200, ["wan1"], False)]  # wan0 was down before (table 100 says so): not chosen
    second.run_until(20.0)
    assert [a for _, a in second.changes() if a not in added] == []


def test_an_uplink_never_judged_gets_its_routes_at_the_bound():
    cfg = seed()
    planner = restarted_planner(cfg, [route(200, "wan1", src="203.0.113.2"),
                                      route(100, "wan1")])
    down = planner.down_before_restart()
    planner.hold({"wan0": 5.0, "wan1": 5.0}, down)
    planner.set_uplink("wan1", "up")
    planner.reconcile(1.0)
    # what is missing goes in at once (table 20 has wan0 alone); what is there stays
    added = [a for a in planner.actions() if isinstance(a, InstallRoute | RemoveRoute)]
    assert {(a.route.table, a.replace) for a in added} >= {(20, False)}
    assert not [a for a in added if a.route.table in (100, 200)]
    assert {r["state"] for r in planner.route_rows()} >= {"held"}
    assert planner.next_timer() == 5.0
    planner.handle_timer(5.0)  # no verdict for wan0: unknown counts as alive again
    moved = {a.route.table: devs_of(a.route) for a in planner.actions()
             if isinstance(a, InstallRoute)}
    assert moved[200] == ["wan0"] and moved[100] == ["wan0", "wan1"]
    assert planner.next_timer() is None and not planner.held


def test_restart_engine_hold_ends_within_the_detectors_bound():
    """An engine whose detector never gets to a verdict (here: no timer ticks, so no probe is
    ever found lost) still lets go of its hold at the bound the detector gives; the uplink then
    counts as alive, as on a first start."""
    cfg = seed("default")
    first = Site(cfg, Kernel(), DEVS, 0.0, dead={"wan0"}).run_until(10.0)
    engine = RoutesEngine(cfg, 20.0)
    routes = [(r, o) for al in first.kernel.routes.values() for r, o in al]
    engine.kernel_state(routes, first.kernel.rules, 20.0,
                        links=[(d, True, True) for d in DEVS],
                        addresses={d: {ipaddress.ip_interface(ADDRS[d])} for d in DEVS})
    engine.start(20.0)
    assert not [a for a in engine.actions() if isinstance(a, InstallRoute | RemoveRoute)]
    bounds = {u.name: engine.detector.verdict_bound(u.name) for u in cfg.uplinks}
    assert engine.planner.hold_until == {name: 20.0 + b for name, b in bounds.items()}
    p = cfg.uplink("wan0").profile
    # wan0 was down: its echo target needs up_count replies, its ARP one reply
    assert bounds["wan0"] == max(p.interval * (1 + max(p.down_count, p.up_count)) + p.timeout,
                                 p.arp_interval * (1 + p.down_count) + p.arp_interval)
    assert engine.next_timer() <= 20.0 + min(bounds.values())
    end = 20.0 + max(bounds.values())
    engine.handle_timer(end)
    back = {a.route.table: devs_of(a.route) for a in engine.actions()
            if isinstance(a, InstallRoute)}
    assert back == {200: ["wan0"], 100: ["wan0", "wan1"]}
    assert not engine.planner.hold_until and not engine.planner.held


OUTCOMES = st.tuples(st.sets(st.sampled_from(["wan0", "wan1", "wan2"])),
                     st.sets(st.sampled_from(["wan0", "wan1", "wan2"])),
                     st.sampled_from(["fast", "default"]))


@settings(max_examples=40, deadline=None)
@given(OUTCOMES)
def test_restart_never_replaces_before_verdicts_and_converges(outcome):
    """Any gateways dead before the kill, any dead after: the restarted engine changes a held
    route only when every uplink it depends on is judged, or for a route through uplinks judged
    alive replacing one through an uplink judged dead; it ends where a run that never stopped
    ends; and with nothing changed meanwhile it changes nothing at all."""
    dead_before, dead_after, profile = outcome
    cfg = seed(profile, SEED3_MULTIPATH)
    first = Site(cfg, Kernel(), DEVS3, 0.0, dead=dead_before).run_until(15.0)
    held = set(first.kernel.owned())
    second = Site(cfg, first.kernel, DEVS3, 20.0, dead=dead_after).run_until(40.0)
    verdicts = second.verdicts()

    def judged(name, t):
        return [a.state for tv, a in verdicts if a.uplink == name and tv <= t][-1:] or [None]

    groups = second.engine.planner._group_uplinks
    for t, act in second.changes():
        if not isinstance(act, InstallRoute | RemoveRoute) or act.route.key not in groups \
                or act.route.key not in held:
            continue
        involved = groups[act.route.key]
        if all(judged(n, t)[0] is not None for n in involved):
            continue
        assert isinstance(act, InstallRoute) and act.previous is not None, (t, act)
        assert all(judged(n, t)[0] == "up" for n in uplinks_of(cfg, act.route)), (t, act)
        assert any(judged(n, t)[0] == "down" for n in uplinks_of(cfg, act.previous)), (t, act)
    if dead_before == dead_after:
        assert second.changes() == []
    desired, _ = second.engine.planner.desired_routes()
    assert second.kernel.owned() == desired
    assert not second.engine.planner.held


def uplinks_of(cfg, route):
    names = set()
    for nh in route.nexthops:
        up = cfg.uplink_for(Nexthop(nh.dev, nh.gateway))
        if up is not None:
            names.add(up.name)
    return names


def test_failback_move_after_a_restart_moves_flows_back_like_any_recovery():
    """failback "move": an uplink down before the restart that comes back takes its flows back
    (the backup's conntrack entries go), as a recovery without the restart would."""
    cfg = seed("fast")
    cfg = replace(cfg, settings=replace(cfg.settings, failback="move"))
    first = Site(cfg, Kernel(), DEVS, 0.0, dead={"wan0"}).run_until(5.0)
    second = Site(cfg, first.kernel, DEVS, 10.0, dead=set()).run_until(20.0)
    moves = [a for a in second.kernel.flushed if a.reason.startswith("failback")]
    assert [(a.uplink, a.reason) for a in moves] == [("wan1", "failback to wan0")]
