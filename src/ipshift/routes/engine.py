"""The routes engine: detection and decision wired together, still sans-I/O.

    engine = RoutesEngine(config, now)
    engine.link("wan0", admin_up=True, carrier=True, now=now)      # from netlink
    engine.addresses("wan0", [ip_interface("198.51.100.2/26")], now)
    engine.kernel_state(routes, rules, now)                        # dump (owned or not) ...
    engine.kernel_route(route, owned=True, present=True, now=now)  # ... then events
    engine.start(now)
    ... engine.probe_reply("wan0", "icmp", target, seq, now); engine.handle_timer(now)
    for action in engine.actions(): ...                            # SendProbe, InstallRoute, ...

The adapter (daemon.py) is the only caller that touches the kernel.

Restart: `start` looks at what the kernel was found to hold. Owned routes left by a previous
instance (a kill -9) are kept as they are until the detector has judged the uplinks they depend
on, within each uplink's verdict bound (Planner.hold); what those routes show about the previous
verdicts counts until then (an uplink left out was down). Over an empty kernel nothing waits.
"""

from __future__ import annotations

from collections.abc import Iterable

from ipshift.routes.detect import Detector, ProbeKind, SendProbe, UplinkChanged
from ipshift.routes.model import IPAddress, RoutesConfig
from ipshift.routes.plan import IPInterface, KRoute, KRule, PlanAction, Planner

Action = SendProbe | UplinkChanged | PlanAction


class RoutesEngine:
    def __init__(self, config: RoutesConfig, now: float):
        self.config = config
        self.detector = Detector(config.uplinks, now)
        self.planner = Planner(config)
        self.started = False
        self._loading = False  # a full read of the kernel is coming in: no reconcile halfway
        self._out: list[Action] = []
        self._by_dev: dict[str, list[str]] = {}
        for up in config.uplinks:
            self._by_dev.setdefault(up.interface, []).append(up.name)

    # ---- kernel state ----------------------------------------------------------------------
    def link(self, dev: str, admin_up: bool | None, carrier: bool | None, now: float) -> None:
        self.planner.set_link(dev, admin_up, carrier)
        for name in self._by_dev.get(dev, ()):
            self.detector.link(name, bool(admin_up) and bool(carrier), now)
            if admin_up is None:
                self.detector.address(name, False, now)
        self._step(now)

    def addresses(self, dev: str, addrs: Iterable[IPInterface], now: float) -> None:
        addrs = set(addrs)
        self.planner.set_addresses(dev, addrs)
        for name in self._by_dev.get(dev, ()):
            up = self.config.uplink(name)
            if up.source is not None:
                present = any(a.ip == up.source for a in addrs)
            else:
                present = any(a.version == up.family and not a.ip.is_link_local for a in addrs)
            self.detector.address(name, present, now)
        self._step(now)

    def neighbour_failed(self, dev: str, addr: IPAddress, now: float) -> None:
        for name in self._by_dev.get(dev, ()):
            if self.config.uplink(name).gateway == addr:
                self.detector.neighbour_failed(name, now)
        self._step(now)

    def kernel_route(self, route: KRoute, *, owned: bool, present: bool, now: float) -> None:
        self.planner.kernel_route(route, owned=owned, present=present)
        self._step(now)

    def kernel_state(self, routes: Iterable[tuple[KRoute, bool]], rules: Iterable[KRule],
                     now: float, *, links: Iterable[tuple[str, bool, bool]] = (),
                     addresses: dict[str, set[IPInterface]] | None = None) -> None:
        """A full read of the kernel (at start, and again after a resync): devices as (name,
        admin up, carrier), their addresses, every route with whether it is owned (by protocol
        number), the owned rules. Replaces what the engine knew; one reconcile at the end."""
        self._loading = True
        try:
            names = []
            for name, admin_up, carrier in links:
                names.append(name)
                self.link(name, admin_up, carrier, now)
            if addresses is not None:
                for dev in names:
                    self.addresses(dev, addresses.get(dev, set()), now)
            self.planner.load_kernel(routes, rules)
        finally:
            self._loading = False
        self._step(now)

    def kernel_rule(self, rule: KRule, *, present: bool, now: float) -> None:
        self.planner.kernel_rule(rule, present=present)
        self._step(now)

    def applied(self, action: PlanAction, error: str | None, now: float) -> None:
        self.planner.applied(action, error, now)

    # ---- probes and time -------------------------------------------------------------------
    def probe_reply(self, uplink: str, kind: ProbeKind, target: IPAddress, seq: int | None,
                    now: float) -> bool:
        ok = self.detector.probe_reply(uplink, kind, target, seq, now)
        self._step(now)
        return ok

    def start(self, now: float) -> None:
        """Begin: the initial kernel state has been fed; reconcile and start probing. Owned
        routes found in the kernel are held until their uplinks are judged (module docstring)."""
        if self.planner.owns_configured_routes():
            down = self.planner.down_before_restart()
            for name in down:
                self.detector.presume_down(name)
            self.planner.hold({up.name: now + self.detector.verdict_bound(up.name)
                               for up in self.config.uplinks}, down)
        self.started = True
        self.detector.handle_timer(now)
        self._step(now)

    def stop(self) -> None:
        self.planner.teardown()
        self._out.extend(self.planner.actions())

    def handle_timer(self, now: float) -> None:
        self.detector.handle_timer(now)
        if self.started:
            self.planner.handle_timer(now)
        self._step(now)

    def next_timer(self) -> float | None:
        times = [t for t in (self.detector.next_timer(), self.planner.next_timer())
                 if t is not None]
        return min(times) if times else None

    def actions(self) -> list[Action]:
        out, self._out = self._out, []
        return out

    def _step(self, now: float) -> None:
        for act in self.detector.actions():
            if isinstance(act, UplinkChanged):
                self.planner.set_uplink(act.uplink, act.state, act.reason)
            self._out.append(act)
        if self.started and not self._loading and not self.planner.stopping:
            self.planner.reconcile(now)
        self._out.extend(self.planner.actions())
