"""Decision engine and the engines wired together, against a simulated kernel."""

import ipaddress
from dataclasses import replace

from hypothesis import given, settings
from hypothesis import strategies as st

from ipshift.routes import config
from ipshift.routes.detect import SendProbe, UplinkChanged
from ipshift.routes.engine import RoutesEngine
from ipshift.routes.plan import (
    AddRule,
    FlushConntrack,
    InstallRoute,
    KNexthop,
    KRoute,
    Planner,
    RemoveRoute,
    RemoveRule,
    RunHook,
)

TABLES = {"main": 254, "default": 253, "local": 255}
SEED = """
ip rule add prio 10 table main
ip rule add prio 20 from 198.51.100.0/26 table 20
ip route append default via 198.51.100.1 dev wan0 src 198.51.100.2 table 20
ip rule add prio 30 from 203.0.113.0/26 table 30
ip route append default via 203.0.113.1 dev wan1 src 203.0.113.2 table 30
ip rule add prio 100 from 192.0.2.0/24 table 100
ip route add default table 100 nexthop via 198.51.100.1 dev wan0 nexthop via 203.0.113.1 dev wan1
ip rule add prio 200 table 200
ip route append default via 198.51.100.1 dev wan0 src 198.51.100.2 table 200
ip route append default via 203.0.113.1 dev wan1 src 203.0.113.2 table 200
"""
ADDRS = {"wan0": "198.51.100.2/26", "wan1": "203.0.113.2/26", "wan2": "198.51.100.66/26",
         "lan0": "192.0.2.1/24"}
DEFAULT4 = ipaddress.ip_network("0.0.0.0/0")


def ip(a):
    return ipaddress.ip_address(a)


class Kernel:
    """A tiny model of the kernel's route tables: aliases per key, owners by protocol."""

    def __init__(self):
        self.routes = {}  # key -> list[(route, owned)]
        self.rules = set()
        self.flushed = []
        self.hooks = []
        self.touched_foreign = False

    def apply(self, engine, actions, now=0.0):
        for act in actions:
            err = None
            if isinstance(act, InstallRoute):
                aliases = self.routes.setdefault(act.route.key, [])
                if any(not owned for _, owned in aliases):
                    self.touched_foreign = True
                if act.replace and aliases:
                    aliases[0] = (act.route, True)
                elif aliases:
                    err = "File exists"
                else:
                    aliases.append((act.route, True))
            elif isinstance(act, RemoveRoute):
                aliases = self.routes.get(act.route.key, [])
                mine = [a for a in aliases if a == (act.route, True)]
                if mine:
                    aliases.remove(mine[0])
                else:
                    err = "No such process"
            elif isinstance(act, AddRule):
                self.rules.add(act.rule)
            elif isinstance(act, RemoveRule):
                self.rules.discard(act.rule)
            elif isinstance(act, FlushConntrack):
                self.flushed.append(act)
            elif isinstance(act, RunHook):
                self.hooks.append(act)
            if err is not None:
                engine.applied(act, err, now)

    def owned(self):
        return {k: r for k, al in self.routes.items() for r, o in al if o}

    def route(self, table):
        return self.owned().get((4, table, DEFAULT4, 0, 0))

    def link_down(self, dev):
        """Admin down: the kernel deletes routes whose every nexthop uses the device."""
        gone = []
        for _key, aliases in self.routes.items():
            for r, owned in list(aliases):
                if r.nexthops and all(nh.dev == dev for nh in r.nexthops):
                    aliases.remove((r, owned))
                    gone.append((r, owned))
        return gone


def build(text=SEED, devs=("wan0", "wan1", "lan0"), hooks=False, failback="stay"):
    cfg = config.loads(text, tables=TABLES)
    cfg = replace(cfg, settings=replace(cfg.settings, failback=failback,
                                        hooks=("/bin/true",) if hooks else ()))
    engine = RoutesEngine(cfg, 0.0)
    for dev in devs:
        engine.link(dev, True, True, 0.0)
        engine.addresses(dev, [ipaddress.ip_interface(ADDRS[dev])], 0.0)
    kernel = Kernel()
    engine.start(0.0)
    kernel.apply(engine, engine.actions())
    return cfg, engine, kernel


def probes(actions):
    return [a for a in actions if isinstance(a, SendProbe)]


def test_seed_initial_state():
    cfg, _engine, kernel = build()
    assert kernel.route(20).nexthops == (KNexthop("wan0", ip("198.51.100.1")),)
    assert kernel.route(20).src == ip("198.51.100.2")
    assert [nh.dev for nh in kernel.route(100).nexthops] == ["wan0", "wan1"]
    assert kernel.route(200).nexthops[0].dev == "wan0"  # the first alternative
    for up in cfg.uplinks:
        own = kernel.route(up.table)
        assert own is not None and own.nexthops[0].gateway == up.gateway
    prios = sorted(r.priority for r in kernel.rules)
    assert prios == [5, 5, 10, 20, 30, 100, 200]
    marks = {(r.fwmark, r.table) for r in kernel.rules if r.fwmark}
    assert marks == {(u.mark, u.table) for u in cfg.uplinks}


def test_uplink_down_moves_routes_and_flushes_only_its_conntrack():
    cfg, engine, kernel = build(hooks=True)
    engine.planner.set_uplink("wan0", "down", "gateway silent")
    engine.planner.reconcile(1.0)
    acts = engine.planner.actions()
    kinds = [type(a).__name__ for a in acts]
    # routes first, then conntrack, then hooks
    last_install = max(i for i, k in enumerate(kinds) if k == "InstallRoute")
    assert kinds.index("FlushConntrack") > last_install
    assert kinds[-1] == "RunHook"
    kernel.apply(engine, acts)
    assert [nh.dev for nh in kernel.route(100).nexthops] == ["wan1"]
    assert kernel.route(200).nexthops[0].dev == "wan1"
    assert kernel.route(20).nexthops[0].dev == "wan0"  # no alternative: kept, never wrong source
    (flush,) = kernel.flushed
    assert flush.uplink == "wan0" and flush.addresses == (ip("198.51.100.2"),)
    assert flush.mark == cfg.uplink("wan0").mark and flush.mask == cfg.settings.mark_mask
    env = dict(kernel.hooks[0].env)
    assert env["IPSHIFT_UPLINK"] == "wan0" and env["IPSHIFT_STATE"] == "down"
    assert env["IPSHIFT_SOURCE"] == "198.51.100.2" and env["IPSHIFT_INTERFACE"] == "wan0"

    engine.planner.set_uplink("wan0", "up", "probes answered")
    engine.planner.reconcile(2.0)
    kernel.apply(engine, engine.planner.actions())
    assert [nh.dev for nh in kernel.route(100).nexthops] == ["wan0", "wan1"]
    assert kernel.route(200).nexthops[0].dev == "wan0"
    assert len(kernel.flushed) == 1  # failback "stay": nothing deleted on the way back


def test_failback_move_deletes_the_backup_uplinks_entries():
    _cfg, engine, kernel = build(failback="move")
    for state in ("down", "up"):
        engine.planner.set_uplink("wan0", state)
        engine.planner.reconcile(1.0)
        kernel.apply(engine, engine.planner.actions())
    assert [f.uplink for f in kernel.flushed] == ["wan0", "wan1"]
    assert kernel.flushed[0].mark is None  # no pinning with failback "move"


def test_all_dead_keeps_the_first_route_and_all_nexthops():
    _cfg, engine, kernel = build()
    for name in ("wan0", "wan1"):
        engine.planner.set_uplink(name, "down")
    engine.planner.reconcile(1.0)
    kernel.apply(engine, engine.planner.actions())
    assert [nh.dev for nh in kernel.route(100).nexthops] == ["wan0", "wan1"]
    assert kernel.route(200).nexthops[0].dev == "wan0"
    rows = engine.planner.route_rows()
    assert any(r["state"] == "no alive path" for r in rows)


def test_reconcile_is_idempotent_and_restart_adopts_owned_state():
    cfg, engine, kernel = build()
    engine.planner.reconcile(1.0)
    assert engine.planner.actions() == []
    # a new daemon (kill -9 and restart) sees the kernel's owned routes: nothing to do
    engine2 = RoutesEngine(cfg, 5.0)
    for dev in ("wan0", "wan1", "lan0"):
        engine2.link(dev, True, True, 5.0)
        engine2.addresses(dev, [ipaddress.ip_interface(ADDRS[dev])], 5.0)
    for route in kernel.owned().values():
        engine2.kernel_route(route, owned=True, present=True, now=5.0)
    for rule in kernel.rules:
        engine2.kernel_rule(rule, present=True, now=5.0)
    engine2.start(5.0)
    acts = [a for a in engine2.actions() if not isinstance(a, SendProbe)]
    assert acts == []


def test_stale_owned_routes_are_removed_on_start():
    cfg, _engine, _kernel = build()
    stale = KRoute(4, 100, ipaddress.ip_network("198.51.100.128/25"),
                   (KNexthop("wan0", ip("198.51.100.1")),))
    engine2 = RoutesEngine(cfg, 0.0)
    engine2.kernel_route(stale, owned=True, present=True, now=0.0)
    engine2.start(0.0)
    assert RemoveRoute(stale) in engine2.actions()


def test_foreign_routes_are_never_touched():
    cfg, _engine, _ = build()
    kernel = Kernel()
    foreign = KRoute(4, 200, DEFAULT4, (KNexthop("wan1", ip("203.0.113.1")),))
    kernel.routes[foreign.key] = [(foreign, False)]
    engine2 = RoutesEngine(cfg, 0.0)
    for dev in ("wan0", "wan1", "lan0"):
        engine2.link(dev, True, True, 0.0)
        engine2.addresses(dev, [ipaddress.ip_interface(ADDRS[dev])], 0.0)
    engine2.kernel_route(foreign, owned=False, present=True, now=0.0)
    engine2.start(0.0)
    kernel.apply(engine2, engine2.actions())
    assert not kernel.touched_foreign
    assert kernel.routes[foreign.key] == [(foreign, False)]
    row = [r for r in engine2.planner.route_rows() if r["state"] == "conflict"]
    assert row and "not owned by ipshift" in row[0]["error"]
    engine2.stop()
    kernel.apply(engine2, engine2.actions())
    assert kernel.routes[foreign.key] == [(foreign, False)]
    assert kernel.owned() == {} and kernel.rules == set()


def test_routes_deleted_by_the_kernel_come_back_with_the_link():
    cfg, engine, kernel = build()
    engine.link("wan0", False, False, 1.0)
    gone = kernel.link_down("wan0")
    for r, owned in gone:
        engine.kernel_route(r, owned=owned, present=False, now=1.0)
    kernel.apply(engine, engine.actions())
    assert kernel.route(20) is None  # device down: nothing the kernel would take
    assert [nh.dev for nh in kernel.route(100).nexthops] == ["wan1"]
    engine.link("wan0", True, True, 2.0)
    kernel.apply(engine, engine.actions())
    assert kernel.route(20) is not None and kernel.route(cfg.uplink("wan0").table) is not None
    # the multipath nexthop waits for the uplink's verdict (down since the carrier loss)
    assert engine.detector.state("wan0") == "down"
    assert [nh.dev for nh in kernel.route(100).nexthops] == ["wan1"]


def test_failed_operations_are_retried():
    _cfg, engine, kernel = build()
    route = kernel.route(20)
    engine.kernel_route(route, owned=True, present=False, now=1.0)
    (act,) = [a for a in engine.actions() if isinstance(a, InstallRoute)]
    engine.applied(act, "Network is unreachable", 1.0)
    engine.handle_timer(1.5)
    assert not [a for a in engine.actions() if isinstance(a, InstallRoute)]
    assert engine.next_timer() is not None
    engine.handle_timer(2.1)
    assert [a for a in engine.actions() if isinstance(a, InstallRoute)]


def test_static_route_waits_for_its_device():
    text = ("ip route add 203.0.113.0/26 table 100 proto static nexthop dev ppp0 "
            "nexthop via 192.0.2.254 dev lan0\n")
    _cfg, engine, kernel = build(text, devs=("lan0",))
    key = (4, 100, ipaddress.ip_network("203.0.113.0/26"), 0, 0)
    assert [nh.dev for nh in kernel.owned()[key].nexthops] == ["lan0"]
    engine.link("ppp0", True, True, 1.0)
    kernel.apply(engine, engine.actions())
    assert [nh.dev for nh in kernel.owned()[key].nexthops] == ["ppp0", "lan0"]


def test_engine_end_to_end_silent_gateway():
    cfg, engine, kernel = build()
    cfg = config.loads(SEED, tables=TABLES).with_profile("fast")
    engine = RoutesEngine(cfg, 0.0)
    for dev in ("wan0", "wan1", "lan0"):
        engine.link(dev, True, True, 0.0)
        engine.addresses(dev, [ipaddress.ip_interface(ADDRS[dev])], 0.0)
    kernel = Kernel()
    engine.start(0.0)
    dead = set()
    now = 0.0
    changes = []
    while now < 5.0:
        acts = engine.actions()
        kernel.apply(engine, acts, now)
        changes += [a for a in acts if isinstance(a, UplinkChanged)]
        for p in probes(acts):
            if p.uplink not in dead:
                engine.probe_reply(p.uplink, p.kind, p.target, p.seq, now + 0.001)
        if now >= 2.0:
            dead.add("wan0")
        now = max(engine.next_timer() or now + 0.01, now + 0.001)
        engine.handle_timer(now)
    assert [c.state for c in changes if c.uplink == "wan0"][-1] == "down"
    assert [nh.dev for nh in kernel.route(100).nexthops] == ["wan1"]
    assert kernel.flushed[0].uplink == "wan0"


EVENTS = st.lists(st.tuples(
    st.sampled_from(["up", "down", "link-", "link+", "kernel-del", "foreign+", "foreign-",
                     "restart"]),
    st.sampled_from(["wan0", "wan1", "wan2"]),
    st.sampled_from([20, 30, 100, 200])), max_size=30)

SEED3 = SEED + """
ip route append default via 198.51.100.65 dev wan2 src 198.51.100.66 table 200
"""


@settings(max_examples=150, deadline=None)
@given(EVENTS)
def test_random_events_keep_alive_paths_and_never_touch_foreign_routes(events):
    cfg = config.loads(SEED3.replace(
        "nexthop via 203.0.113.1 dev wan1",
        "nexthop via 203.0.113.1 dev wan1 nexthop via 198.51.100.65 dev wan2"), tables=TABLES)
    devs = ("wan0", "wan1", "wan2", "lan0")
    engine = RoutesEngine(cfg, 0.0)
    for dev in devs:
        engine.link(dev, True, True, 0.0)
        engine.addresses(dev, [ipaddress.ip_interface(ADDRS[dev])], 0.0)
    kernel = Kernel()
    engine.start(0.0)
    kernel.apply(engine, engine.actions())
    state = {d: "unknown" for d in ("wan0", "wan1", "wan2")}
    linked = dict.fromkeys(devs, True)
    foreign_keys = set()
    now = 0.0
    for ev, dev, table in events:
        now += 1.5
        key = (4, table, DEFAULT4, 0, 0)
        if ev in ("up", "down"):
            state[dev] = ev
            engine.planner.set_uplink(dev, ev)
            engine._step(now)
        elif ev in ("link-", "link+"):
            linked[dev] = ev == "link+"
            engine.link(dev, linked[dev], linked[dev], now)
            if not linked[dev]:
                for r, owned in kernel.link_down(dev):
                    if not owned:
                        foreign_keys.discard(r.key)
                    engine.kernel_route(r, owned=owned, present=False, now=now)
        elif ev == "kernel-del":
            owned = kernel.owned().get(key)
            if owned is not None:
                kernel.routes[key].remove((owned, True))
                engine.kernel_route(owned, owned=True, present=False, now=now)
        elif ev == "foreign+" and key not in foreign_keys:
            f = KRoute(4, table, DEFAULT4, (KNexthop(dev, ip("192.0.2.254")),))
            kernel.routes.setdefault(key, []).append((f, False))
            foreign_keys.add(key)
            engine.kernel_route(f, owned=False, present=True, now=now)
        elif ev == "foreign-" and key in foreign_keys:
            f = next(r for r, o in kernel.routes[key] if not o)
            kernel.routes[key].remove((f, False))
            foreign_keys.discard(key)
            engine.kernel_route(f, owned=False, present=False, now=now)
        elif ev == "restart":
            engine = RoutesEngine(cfg, now)
            for d in devs:
                engine.link(d, linked[d], linked[d], now)
                engine.addresses(d, [ipaddress.ip_interface(ADDRS[d])], now)
            for _k, aliases in kernel.routes.items():
                for r, owned in aliases:
                    engine.kernel_route(r, owned=owned, present=True, now=now)
            for rule in kernel.rules:
                engine.kernel_rule(rule, present=True, now=now)
            for d, s in state.items():
                if s != "unknown":
                    engine.planner.set_uplink(d, s)
            engine.start(now)
        acts = [a for a in engine.actions() if not isinstance(a, SendProbe)]
        kernel.apply(engine, acts, now)
        assert not kernel.touched_foreign
    # retries due, and past any hold of a restart (uplinks never judged then count as alive)
    now += 60.0
    engine.handle_timer(now)
    kernel.apply(engine, [a for a in engine.actions() if not isinstance(a, SendProbe)], now)
    assert not engine.planner.hold_until and not engine.planner.held

    def alive(nh):
        # the test's link model, and the engine's own uplink verdicts: "up"/"down" events above
        # go straight to the planner, link events through the detector, which keeps an uplink
        # whose link returned down until a probe answers
        return linked[nh.dev] and engine.planner.alive(nh)

    owned = kernel.owned()
    for key, group in engine.planner._groups.items():
        if key in foreign_keys:
            continue  # left alone (checked by touched_foreign above)
        any_alive = any(alive(nh) for r in group for nh in r.nexthops)
        if any_alive:
            route = owned.get(key)
            assert route is not None, key
            assert all(alive(nh) for nh in route.nexthops), (key, route)
    # every uplink with its link up has its own table
    for up in cfg.uplinks:
        if linked[up.interface]:
            assert (4, up.table, DEFAULT4, 0, 0) in owned
    # stop removes everything owned and nothing else
    engine.stop()
    kernel.apply(engine, engine.actions(), now)
    assert kernel.owned() == {} and kernel.rules == set()
    for key in foreign_keys:
        assert [o for _, o in kernel.routes[key]] == [False]


def echo_through_the_kernel(planner, steps=6):
    """Reconcile, and report every route change back as the daemon reads it (to_route, then
    from_route): returns the route actions of each step. Converged when the last is empty."""
    from ipshift.routes.kernel import from_route, to_route

    history = []
    for i in range(steps):
        planner.reconcile(float(i))
        acts = [a for a in planner.actions() if isinstance(a, InstallRoute | RemoveRoute)]
        history.append(acts)
        for a in acts:
            reported = from_route(to_route(a.route, 73))
            planner.kernel_route(reported, owned=True, present=isinstance(a, InstallRoute))
        if not acts:
            break
    return history


def planner_with(text, addrs, toml=False):
    cfg = config.loads(text, toml=toml, tables=TABLES)
    planner = Planner(cfg)
    for dev, addr in addrs.items():
        planner.set_link(dev, True, True)
        planner.set_addresses(dev, [ipaddress.ip_interface(a) for a in addr.split()])
    return cfg, planner


def test_ipv6_metric_1024_and_scope_converge():
    """What the daemon installs is what the kernel reports back: an IPv6 route configured with
    metric 1024 or with a scope is installed once and stays (no delete, no endless replace)."""
    text = ("ip -6 route add 2001:db8:10::/48 via 2001:db8:1::1 dev wan0 metric 1024\n"
            "ip -6 route add 2001:db8:20::/48 dev wan0 scope link\n")
    _cfg, planner = planner_with(text, {"wan0": "2001:db8:1::2/64"})
    history = echo_through_the_kernel(planner)
    assert history[-1] == []
    assert len(history) == 2  # everything at once, then nothing
    assert not [a for acts in history for a in acts if isinstance(a, RemoveRoute)]
    assert {str(k[2]) for k in planner.installed} == {"2001:db8:10::/48", "2001:db8:20::/48",
                                                      "::/0"}


def test_explicit_global_scope_route_is_an_alternative():
    """`scope global` next to a route without a scope: one alternative group; the route via
    eth0 takes over when eth1 is down (before, the eth1 group replaced the eth0 one)."""
    text = ("ip route append 203.0.113.0/24 via 192.0.2.1 dev eth0\n"
            "ip route append 203.0.113.0/24 via 198.51.100.1 dev eth1 scope global\n")
    _cfg, planner = planner_with(text, {"eth0": "192.0.2.2/24", "eth1": "198.51.100.2/24"})
    planner.set_uplink("eth0", "down")
    history = echo_through_the_kernel(planner)
    key = (4, 254, ipaddress.ip_network("203.0.113.0/24"), 0, 0)
    assert planner.installed[key].nexthops[0].dev == "eth1"
    planner.set_uplink("eth0", "up")
    planner.set_uplink("eth1", "down")
    history = echo_through_the_kernel(planner)
    assert planner.installed[key].nexthops[0].dev == "eth0"
    assert history[-1] == []


def test_rules_written_in_long_form_are_kept_on_restart():
    """`from 0.0.0.0/0`, `to ::/0`, `fwmark X/0xffffffff` and mark_mask 0xffffffff: the kernel
    dumps these rules in short form; the restarted daemon must keep, not replace, them."""
    from ipshift.net.netlink import Rule
    from ipshift.routes.kernel import from_rule, to_rule

    text = ('ip = """\n'
            "ip rule add prio 100 from 0.0.0.0/0 table 100\n"
            "ip -6 rule add prio 102 to ::/0 table 100\n"
            "ip rule add prio 101 fwmark 0x1/0xffffffff table 100\n"
            "ip route add default via 192.0.2.1 dev eth0 table 100\n"
            '"""\n[daemon]\nmark_mask = 0xffffffff\n')
    cfg, planner = planner_with(text, {"eth0": "192.0.2.2/24"}, toml=True)
    wanted = planner.desired_rules()
    # what a dump of these rules reports (FRA_SRC/FRA_DST absent for /0, FRA_FWMASK
    # 0xffffffff), and the round trip through to_rule
    planner.rules = {from_rule(Rule(priority=100, table=100, proto=73)),
                     from_rule(Rule(priority=102, table=100, family=10, proto=73)),
                     from_rule(Rule(priority=101, table=100, fwmark=1, fwmask=0xFFFFFFFF,
                                    proto=73)),
                     from_rule(Rule(priority=5, table=cfg.uplinks[0].table, fwmark=1,
                                    fwmask=0xFFFFFFFF, proto=73))}
    assert planner.rules == wanted
    assert {from_rule(to_rule(r, 73)) for r in wanted} == wanted
    planner.reconcile(0.0)
    assert not [a for a in planner.actions() if isinstance(a, AddRule | RemoveRule)]


def test_a_foreign_route_reported_twice_is_one_route():
    """The same foreign route reported twice (the event and the dump after subscribing, or its
    owner's replace) and deleted once: the key is free again and the configured route goes in."""
    _cfg, planner = planner_with("ip route add 203.0.113.0/24 via 192.0.2.1 dev eth0",
                                 {"eth0": "192.0.2.2/24"})
    foreign = KRoute(4, 254, ipaddress.ip_network("203.0.113.0/24"),
                     (KNexthop("eth0", ip("192.0.2.9")),))
    planner.kernel_route(foreign, owned=False, present=True)
    planner.kernel_route(foreign, owned=False, present=True)
    planner.reconcile(0.0)
    assert not [a for a in planner.actions() if isinstance(a, InstallRoute)
                and a.route.table == 254]
    planner.kernel_route(foreign, owned=False, present=False)
    planner.reconcile(1.0)
    (act,) = [a for a in planner.actions() if isinstance(a, InstallRoute)]
    assert act.route.nexthops[0].gateway == ip("192.0.2.1")
    assert not [r for r in planner.route_rows() if r["state"] == "conflict"]


def test_link_local_address_is_never_an_uplinks_source():
    text = ('[[uplink]]\ninterface = "wan0"\ngateway = "fe80::1"\n'
            'targets = ["2001:db8:ffff::1"]\n[[route]]\nfamily = 6\nuplink = "wan0"\n')
    cfg, planner = planner_with(text, {"wan0": "fe80::2/64 2001:db8:1::2/64"}, toml=True)
    up = cfg.uplink("wan0")
    assert planner.sources_of(up) == (ip("2001:db8:1::2"),)
    planner.reconcile(0.0)
    own = [a.route for a in planner.actions()
           if isinstance(a, InstallRoute) and a.route.table == up.table]
    assert [r.src for r in own] == [ip("2001:db8:1::2")]
    # only a link-local address: no source, so no own-table route (it waits for one)
    planner.set_addresses("wan0", [ipaddress.ip_interface("fe80::2/64")])
    assert planner.sources_of(up) == ()


def test_a_failed_replace_keeps_the_old_route_owned():
    _cfg, engine, kernel = build()
    old = kernel.route(200)
    engine.planner.set_uplink("wan0", "down")
    engine._step(1.0)
    acts = engine.actions()
    (act,) = [a for a in acts if isinstance(a, InstallRoute) and a.route.table == 200]
    assert act.replace and act.route.nexthops[0].dev == "wan1"
    engine.applied(act, "Network is unreachable", 1.0)  # the kernel kept the old route
    assert engine.planner.installed[old.key] == old
    engine.handle_timer(2.5)
    (retry,) = [a for a in engine.actions() if isinstance(a, InstallRoute)
                and a.route.table == 200]
    assert retry.replace  # a replace again, not an add that would meet EEXIST
    engine.applied(retry, "Network is unreachable", 2.5)
    engine.stop()  # a stop in that window removes the old route
    assert RemoveRoute(old) in engine.actions()
