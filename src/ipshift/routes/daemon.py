"""`ipshift routes run`: the asyncio adapter around RoutesEngine, a service on the daemon
runtime (ipshift.daemon: single instance per name and namespace, control socket, metrics,
signals, systemd readiness).

It feeds the engine from netlink (links, addresses, routes, rules, neighbours), from the probe
sockets of each uplink and from the clock, and applies the engine's actions at once: kernel
routes and rules, then conntrack deletions, then hooks. Start reconciles with what the kernel
holds (idempotent; a kill -9 and restart leaves nothing stale and nothing doubled); SIGTERM or
`ipshift routes stop` removes everything the daemon installed. The engine is driven by the
runtime's EnginePump: events in, actions applied in `_apply`, one timer.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import logging
import os
import signal
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from ipshift.daemon import ROUTE_PROTOCOL, EnginePump, Metric, Runtime, StartError
from ipshift.net.errors import NetError
from ipshift.net.netlink import (
    Address,
    KernelWatcher,
    Link,
    Neighbour,
    Route,
    Rule,
)
from ipshift.net.netlink.watch import CHANGED, REMOVED
from ipshift.net.probe import ArpSocket, EchoSocket, NeighbourSolicitSocket, close_all
from ipshift.routes.detect import SendProbe, UplinkChanged
from ipshift.routes.engine import Action, RoutesEngine
from ipshift.routes.kernel import KernelAdapter, from_route, from_rule
from ipshift.routes.model import RoutesConfig, UplinkSpec
from ipshift.routes.plan import (
    AddRule,
    FlushConntrack,
    InstallRoute,
    IPInterface,
    RemoveRoute,
    RemoveRule,
    RunHook,
)

log = logging.getLogger("ipshift.routes")

WATCHED = ("link", "address", "route", "rule", "neighbour")

HOOK_TERM_GRACE = 1.0  # seconds a hook gets after SIGTERM at shutdown before SIGKILL
DRAIN_TIMEOUT = 5.0  # seconds other pending work (conntrack deletions) gets at shutdown


@dataclass
class _Prober:
    spec: UplinkSpec
    source: str | None
    echo: EchoSocket | None = None
    arp: ArpSocket | None = None
    nd: NeighbourSolicitSocket | None = None
    gw_mac: bytes | None = None
    last_l2_reply: float = -1e9
    error: str | None = None

    def close(self) -> None:
        close_all(self.echo, self.arp, self.nd)
        self.echo = self.arp = self.nd = None


@dataclass
class Stats:
    started: float = field(default_factory=time.time)
    routes_applied: int = 0
    rules_applied: int = 0
    kernel_errors: int = 0
    conntrack_deleted: dict[str, int] = field(default_factory=dict)
    hooks_run: int = 0
    hook_failures: int = 0
    probes_sent: dict[tuple[str, str], int] = field(default_factory=dict)
    transitions: dict[tuple[str, str], int] = field(default_factory=dict)
    last_apply_ms: float | None = None
    max_apply_ms: float = 0.0
    last_change: dict[str, float] = field(default_factory=dict)  # uplink -> wall clock
    resyncs: int = 0
    startup_s: float | None = None  # reading the kernel + first reconcile applied


class RoutesDaemon:
    """The routes daemon as a runtime service (`component`, `instance`, `start`, `stop`,
    `status`, `metrics`)."""

    component = "routes"
    adopts = frozenset({ROUTE_PROTOCOL})  # owned routes and rules are handed to the engine

    def __init__(self, cfg: RoutesConfig, *, netns: str | None = None) -> None:
        self.cfg = cfg
        self.instance = cfg.settings.name
        self.netns = netns
        self.stats = Stats()
        self._rt: Runtime | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.pump: EnginePump | None = None
        self._probers: dict[str, _Prober] = {}
        self._addrs: dict[str, set[IPInterface]] = {}
        self._links: dict[str, Link] = {}
        self._hook_procs: set[asyncio.subprocess.Process] = set()
        self.kernel: KernelAdapter | None = None
        self.engine: RoutesEngine | None = None
        self.watcher: KernelWatcher | None = None
        self.ready = False

    # ---- lifecycle -------------------------------------------------------------------------
    @property
    def stopping(self) -> bool:
        return self._rt is None or self._rt.stopping

    async def start(self, rt: Runtime) -> None:
        self._rt = rt
        self._loop = rt.loop
        rt.record.settled(ROUTE_PROTOCOL)  # the kernel itself says what is owned (by protocol)
        rt.record.add(ROUTE_PROTOCOL, str(self.cfg.settings.protocol))
        try:
            self._start_kernel(rt.loop.time())
        except NetError as exc:
            raise StartError(f"routes: {exc}") from exc
        assert self.engine is not None
        self.pump = EnginePump(rt.loop, self.engine, self._apply)
        self.pump.run()
        self.ready = True
        log.info("routes: running with %d uplinks, %d rules, %d routes (profile %s)",
                 len(self.cfg.uplinks), len(self.cfg.rules), len(self.cfg.routes),
                 self.cfg.settings.profile)

    async def stop(self) -> None:
        self._shutdown()
        await self._drain_tasks()
        if self._rt is not None and self.kernel is not None:
            self._rt.record.discard(ROUTE_PROTOCOL, str(self.cfg.settings.protocol))

    def _start_kernel(self, now: float) -> None:
        t0 = time.monotonic()
        self.kernel = KernelAdapter(self.cfg, self.netns)
        # subscribes, then dumps: the view is the kernel state the engine starts from, and
        # nothing that happens in between is missed
        self.watcher = KernelWatcher(self.netns, WATCHED, netlink=self.kernel.nl)
        self.engine = RoutesEngine(self.cfg, now)
        self._load_kernel_state(now)
        if self.cfg.settings.failback == "stay" and self.cfg.uplinks:
            self.kernel.install_pinning()
        else:
            # the table is ours by name: one left by an earlier "stay" daemon (kill -9) would
            # keep pinning flows
            self._remove_pinning()
        for up in self.cfg.uplinks:
            self._ensure_prober(up)
        assert self._loop is not None
        self._loop.add_reader(self.watcher.fileno(), self._on_netlink)
        self.engine.start(now)
        self._apply(self.engine.actions())
        self.stats.startup_s = time.monotonic() - t0

    def _load_kernel_state(self, now: float) -> None:
        """Read links, addresses, routes and rules; the engine reconciles only once everything
        is in (and at start, only in `engine.start`, which holds what a killed run left)."""
        assert self.kernel is not None and self.engine is not None
        self._read_kernel_state(now)

    def _read_kernel_state(self, now: float) -> None:
        """From the watcher's view (current: it was just loaded or resynced)."""
        assert self.kernel is not None and self.engine is not None and self.watcher is not None
        view = self.watcher
        self._links = {link.name: link for link in view.links()}
        self._addrs = self.kernel.addresses(view.view.addresses())
        self.engine.kernel_state(
            self.kernel.routes(view.routes()), self.kernel.owned_rules(view.rules()), now,
            links=[(link.name, link.up, link.carrier) for link in self._links.values()],
            addresses=self._addrs)

    def _shutdown(self) -> None:
        if self.pump is not None:
            self.pump.stop()
        if self._loop is not None and self.watcher is not None:
            with contextlib.suppress(Exception):
                self._loop.remove_reader(self.watcher.fileno())
        for p in self._probers.values():
            self._remove_readers(p)
            p.close()
        if self.engine is not None and self.kernel is not None:
            self.engine.stop()
            self._apply([a for a in self.engine.actions() if not isinstance(a, SendProbe)])
            self._remove_pinning()
        if self.watcher is not None:
            self.watcher.close()
        if self.kernel is not None:
            self.kernel.close()
            log.info("routes: stopped; every route and rule it installed is removed")

    def _remove_pinning(self) -> None:
        assert self.kernel is not None
        try:
            self.kernel.remove_pinning()  # missing_ok: nothing to do when there is none
        except NetError as exc:
            level = logging.ERROR if self.cfg.settings.failback == "stay" else logging.INFO
            log.log(level, "routes: could not remove the nftables table %s: %s",
                    self.cfg.settings.nft_table, exc)

    async def _drain_tasks(self) -> None:
        """End what is still running at shutdown: hook processes the daemon started get SIGTERM,
        then SIGKILL after HOOK_TERM_GRACE (cancelling communicate() would leave them running);
        other tasks (conntrack deletions) get DRAIN_TIMEOUT, then are cancelled."""
        self._signal_hooks(signal.SIGTERM)
        if self._rt is None:
            return
        if self._hook_procs:
            await self._rt.drain_tasks(HOOK_TERM_GRACE)
            self._signal_hooks(signal.SIGKILL)
        await self._rt.drain_tasks(DRAIN_TIMEOUT)
        self._signal_hooks(signal.SIGKILL)  # a hook task cancelled while starting its process

    def _signal_hooks(self, sig: int) -> None:
        for proc in list(self._hook_procs):
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(sig)  # by PID: our own child, not yet reaped

    # ---- probes ----------------------------------------------------------------------------
    def _ensure_prober(self, up: UplinkSpec) -> None:
        """(Re)open an uplink's probe sockets when its device or source address changed."""
        assert self.engine is not None and self._loop is not None
        sources = self.engine.planner.sources_of(up)
        source = str(sources[0]) if sources else None
        current = self._probers.get(up.name)
        link = self._links.get(up.interface)
        if current is not None and current.source == source and (current.echo or not link):
            return
        if current is not None:
            self._remove_readers(current)
            current.close()
        prober = _Prober(up, source)
        self._probers[up.name] = prober
        if link is None:
            prober.error = f"device {up.interface} does not exist"
            return
        ident = (os.getpid() + 7919 * (self.cfg.uplinks.index(up) + 1)) & 0xFFFF
        try:
            if up.targets:
                prober.echo = EchoSocket(up.family, up.interface, source, mark=up.mark,
                                         ident=ident)
                self._loop.add_reader(prober.echo.fileno(), self._on_echo, prober)
            if up.gateway_probe and up.gateway is not None and source is not None:
                if up.family == 4:
                    prober.arp = ArpSocket(up.interface, source)
                    self._loop.add_reader(prober.arp.fileno(), self._on_arp, prober)
                else:
                    mac = None
                    if link.address:
                        with contextlib.suppress(ValueError):
                            mac = bytes(int(x, 16) for x in link.address.split(":"))
                    prober.nd = NeighbourSolicitSocket(up.interface, source, mac)
                    self._loop.add_reader(prober.nd.fileno(), self._on_nd, prober)
        except NetError as exc:
            prober.error = str(exc)
            log.warning("routes: uplink %s: %s", up.name, exc)

    def _remove_readers(self, p: _Prober) -> None:
        if self._loop is None:
            return
        for s in (p.echo, p.arp, p.nd):
            if s is not None:
                with contextlib.suppress(Exception):
                    self._loop.remove_reader(s.fileno())

    def _send_probe(self, act: SendProbe, now: float) -> None:
        p = self._probers.get(act.uplink)
        key = (act.uplink, act.kind)
        self.stats.probes_sent[key] = self.stats.probes_sent.get(key, 0) + 1
        if p is None:
            return
        if act.kind == "icmp" and p.echo is not None:
            p.echo.send(str(act.target), act.seq)
        elif act.kind == "arp" and p.arp is not None:
            interval = p.spec.profile.arp_interval
            recent = now - p.last_l2_reply < 3 * interval
            p.arp.send(str(act.target), p.gw_mac if recent else None)
        elif act.kind == "nd" and p.nd is not None:
            recent = now - p.last_l2_reply < 3 * p.spec.profile.arp_interval
            p.nd.send(str(act.target), unicast=recent)

    def _on_echo(self, p: _Prober) -> None:
        assert self.engine is not None and self._loop is not None and p.echo is not None
        now = self._loop.time()
        for src, seq in p.echo.recv():
            self.engine.probe_reply(p.spec.name, "icmp", ipaddress.ip_address(src), seq, now)
        self._pump(now)

    def _on_arp(self, p: _Prober) -> None:
        assert self.engine is not None and self._loop is not None and p.arp is not None
        now = self._loop.time()
        for ip, mac in p.arp.recv():
            if p.spec.gateway is not None and ip == str(p.spec.gateway):
                p.gw_mac = mac
                p.last_l2_reply = now
                self.engine.probe_reply(p.spec.name, "arp", p.spec.gateway, None, now)
        self._pump(now)

    def _on_nd(self, p: _Prober) -> None:
        assert self.engine is not None and self._loop is not None and p.nd is not None
        now = self._loop.time()
        for target in p.nd.recv():
            if p.spec.gateway is not None and ipaddress.ip_address(target) == p.spec.gateway:
                p.last_l2_reply = now
                self.engine.probe_reply(p.spec.name, "nd", p.spec.gateway, None, now)
        self._pump(now)

    # ---- netlink ---------------------------------------------------------------------------
    def _on_netlink(self) -> None:
        """Feed the engine what changed in the watcher's view. The watcher re-reads what the
        kernel changes without telling (IPv4 routes dropped with a link) and reports it like
        any other change; after an overrun it re-reads everything (`resynced`)."""
        assert self.engine is not None and self._loop is not None and self.watcher is not None
        now = self._loop.time()
        try:
            changes = self.watcher.read()
        except NetError as exc:
            log.error("routes: cannot read the kernel state: %s", exc)
            return
        if self.watcher.resynced:
            log.warning("routes: netlink events overran; re-read the kernel state")
            self._reload(now)
            return
        reprobe = False
        proto = self.cfg.settings.protocol
        for change in changes:
            obj, gone = change.obj, change.action == REMOVED
            if isinstance(obj, Link):
                if gone:
                    self._links.pop(obj.name, None)
                    self.engine.link(obj.name, None, None, now)
                else:
                    if isinstance(change.previous, Link) and change.previous.name != obj.name:
                        self._links.pop(change.previous.name, None)  # renamed
                        self.engine.link(change.previous.name, None, None, now)
                    self._links[obj.name] = obj
                    self.engine.link(obj.name, obj.up, obj.carrier, now)
                reprobe = reprobe or change.action != CHANGED
            elif isinstance(obj, Address):
                if obj.dev is None:
                    continue
                addrs = self.kernel_addresses(obj.dev)
                self._addrs[obj.dev] = addrs
                self.engine.addresses(obj.dev, addrs, now)
                reprobe = True
            elif isinstance(obj, Route):
                if isinstance(change.previous, Route):
                    self._route_change(change.previous, False, now)
                self._route_change(obj, not gone, now)
            elif isinstance(obj, Rule):
                if isinstance(change.previous, Rule) and change.previous.proto == proto:
                    self.engine.kernel_rule(from_rule(change.previous), present=False, now=now)
                if obj.proto == proto:
                    self.engine.kernel_rule(from_rule(obj), present=not gone, now=now)
            elif isinstance(obj, Neighbour) and not gone and obj.failed and obj.dev:
                self.engine.neighbour_failed(obj.dev, ipaddress.ip_address(obj.dst), now)
        self._pump(now)
        if reprobe:
            for up in self.cfg.uplinks:
                self._ensure_prober(up)

    def kernel_addresses(self, dev: str) -> set[IPInterface]:
        assert self.kernel is not None and self.watcher is not None
        return self.kernel.addresses(self.watcher.addresses_of(dev)).get(dev, set())

    def _route_change(self, route: Route, present: bool, now: float) -> None:
        assert self.engine is not None
        k = from_route(route)
        if k is None or route.table == 255:
            return
        self.engine.kernel_route(k, owned=route.proto == self.cfg.settings.protocol,
                                 present=present, now=now)

    def _reload(self, now: float) -> None:
        """Hand the engine the whole (re-read) view and reconcile."""
        assert self.engine is not None
        self.stats.resyncs += 1
        self._load_kernel_state(now)
        for up in self.cfg.uplinks:
            self._ensure_prober(up)
        self.engine.handle_timer(now)
        self._pump(now)

    def _resync(self, now: float) -> None:
        """Re-read everything from the kernel and reconcile (a change was refused because the
        kernel held something the view did not show)."""
        assert self.watcher is not None
        try:
            self.watcher.resync()
        except NetError as exc:
            log.error("routes: cannot read the kernel state: %s", exc)
            return
        self._reload(now)

    # ---- actions ---------------------------------------------------------------------------
    def _pump(self, now: float) -> None:
        if self.pump is not None:
            self.pump.run()
        else:  # still starting: the pump drains and arms the timer once start is done
            assert self.engine is not None
            self._apply(self.engine.actions())

    def _apply(self, actions: Iterable[Action]) -> None:
        assert self.engine is not None and self.kernel is not None and self._loop is not None
        changed_at: float | None = None
        routes: list[InstallRoute | RemoveRoute] = []
        for act in actions:
            now = self._loop.time()
            if isinstance(act, InstallRoute | RemoveRoute):
                routes.append(act)  # sent together, many per netlink datagram
                continue
            if routes:
                self._route_ops(routes, now)
                routes = []
            if isinstance(act, SendProbe):
                self._send_probe(act, now)
            elif isinstance(act, UplinkChanged):
                self._on_change(act)
                changed_at = act.at if changed_at is None else min(changed_at, act.at)
            elif isinstance(act, AddRule | RemoveRule):
                self._kernel_op(act, now)
            elif isinstance(act, FlushConntrack):
                if changed_at is not None:
                    self._note_apply(changed_at)
                    changed_at = None
                self._spawn(self._flush(act))
            elif isinstance(act, RunHook):
                self._spawn(self._hooks(act))
        if routes:
            self._route_ops(routes, self._loop.time())
        if changed_at is not None:
            self._note_apply(changed_at)

    def _route_ops(self, ops: list[InstallRoute | RemoveRoute], now: float) -> None:
        assert self.engine is not None and self.kernel is not None and self._loop is not None
        try:
            results = self.kernel.apply_routes(ops)
        except OSError as exc:
            log.error("routes: netlink batch failed: %s", exc)
            results = [(exc.errno or 0, str(exc))] * len(ops)
        stale = False
        for act, res in zip(ops, results, strict=True):
            verb = "delete" if isinstance(act, RemoveRoute) else (
                "replace" if act.replace else "add")
            if res is None:
                self.stats.routes_applied += 1
                if len(ops) <= 50:
                    log.info("routes: %s %s", verb, act.route.describe())
                continue
            err, text = res
            if isinstance(act, RemoveRoute) and err in (errno.ESRCH, errno.ENOENT):
                continue  # gone already
            self.stats.kernel_errors += 1
            if isinstance(act, InstallRoute) and err == errno.EEXIST:
                stale = True  # a route appeared that we did not know of: re-read, then decide
                continue
            log.warning("routes: %s %s: %s", verb, act.route.describe(), text)
            self.engine.applied(act, text, now)
        if len(ops) > 50:
            log.info("routes: %d route changes applied", len(ops))
        if stale:
            self._loop.call_soon(self._resync, now)

    def _note_apply(self, since: float) -> None:
        assert self._loop is not None
        ms = 1000.0 * (self._loop.time() - since)
        self.stats.last_apply_ms = ms
        self.stats.max_apply_ms = max(self.stats.max_apply_ms, ms)

    def _kernel_op(self, act: AddRule | RemoveRule, now: float) -> None:
        assert self.engine is not None and self.kernel is not None
        try:
            if isinstance(act, AddRule):
                self.kernel.add_rule(act.rule)
            else:
                self.kernel.remove_rule(act.rule)
            self.stats.rules_applied += 1
        except NetError as exc:
            gone = exc.errno in (errno.ESRCH, errno.ENOENT) or "No such" in str(exc)
            if isinstance(act, RemoveRule) and gone:
                return
            if isinstance(act, AddRule) and exc.errno == errno.EEXIST:
                return  # an identical owned rule is there already
            self.stats.kernel_errors += 1
            log.warning("routes: %s", exc)
            self.engine.applied(act, str(exc), now)

    def _on_change(self, act: UplinkChanged) -> None:
        key = (act.uplink, act.state)
        self.stats.transitions[key] = self.stats.transitions.get(key, 0) + 1
        self.stats.last_change[act.uplink] = time.time()
        log.info("routes: uplink %s %s (%s)", act.uplink, act.state, act.reason)

    def _spawn(self, coro: Any) -> None:
        assert self._rt is not None
        self._rt.spawn(coro, "routes task")

    async def _flush(self, act: FlushConntrack) -> None:
        assert self.kernel is not None and self._loop is not None
        try:
            n = await self._loop.run_in_executor(None, self.kernel.flush_conntrack, act)
        except (NetError, ValueError) as exc:
            log.warning("routes: conntrack deletion for %s failed: %s", act.uplink, exc)
            return
        self.stats.conntrack_deleted[act.uplink] = \
            self.stats.conntrack_deleted.get(act.uplink, 0) + n
        log.info("routes: deleted %d conntrack entries of uplink %s", n, act.uplink)

    async def _hooks(self, act: RunHook) -> None:
        env = dict(os.environ)
        env.update(dict(act.env))
        for hook in self.cfg.settings.hooks:
            if self.stopping:
                break  # stopping: start no more hooks
            self.stats.hooks_run += 1
            try:
                proc = await asyncio.create_subprocess_exec(
                    hook, env=env, stdin=asyncio.subprocess.DEVNULL,
                    stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
            except OSError as exc:
                self.stats.hook_failures += 1
                log.warning("routes: hook %s: %s", hook, exc.strerror or exc)
                continue
            self._hook_procs.add(proc)
            try:
                out, _ = await asyncio.wait_for(proc.communicate(),
                                                self.cfg.settings.hook_timeout)
            except TimeoutError:
                proc.kill()
                await proc.wait()
                self.stats.hook_failures += 1
                log.warning("routes: hook %s killed after %gs", hook,
                            self.cfg.settings.hook_timeout)
                continue
            finally:
                self._hook_procs.discard(proc)
            if proc.returncode and self.stopping:
                self.stats.hook_failures += 1
                log.warning("routes: hook %s ended at shutdown (%d)", hook, proc.returncode)
                break
            if proc.returncode:
                self.stats.hook_failures += 1
                text = out.decode(errors="replace").strip().splitlines()
                log.warning("routes: hook %s exited %d%s", hook, proc.returncode,
                            f": {text[-1]}" if text else "")

    # ---- status and metrics ----------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        if self.engine is None or self._loop is None:
            return {"daemon": {"state": "starting"}}
        now = self._loop.time()
        wall = time.time()
        uplinks = []
        for row in self.engine.detector.snapshot(now):
            name = str(row["uplink"])
            p = self._probers.get(name)
            since = float(row["since_s"])  # type: ignore[arg-type]
            uplinks.append({
                "uplink": name,
                "interface": row["interface"],
                "gateway": row["gateway"],
                "state": row["state"],
                "rtt_ms": row["rtt_ms"],
                "loss_pct": row["loss_pct"],
                "targets_up": f"{row['targets_up']}/{row['targets']}",
                "last_change": time.strftime("%Y-%m-%dT%H:%M:%S",
                                             time.localtime(wall - since)),
                "since_s": round(since, 3),
                "reason": row["reason"],
                "transitions": row["transitions"],
                "probes_sent": row["probes_sent"],
                "replies": row["replies"],
                "hold_down_s": row["hold_down_s"],
                "profile": row["profile"],
                "source": str(p.source) if p and p.source else None,
                "probe_error": p.error if p else None,
            })
        s = self.stats
        return {
            "daemon": {
                "config": self.cfg.source,
                "protocol": self.cfg.settings.protocol,
                "failback": self.cfg.settings.failback,
                "routes_applied": s.routes_applied,
                "rules_applied": s.rules_applied,
                "kernel_errors": s.kernel_errors,
                "conntrack_deleted": sum(s.conntrack_deleted.values()),
                "hooks_run": s.hooks_run,
                "last_apply_ms": None if s.last_apply_ms is None else round(s.last_apply_ms, 3),
                "max_apply_ms": round(s.max_apply_ms, 3),
                "startup_s": None if s.startup_s is None else round(s.startup_s, 3),
                "installed_routes": len(self.engine.planner.installed),
                "owned_rules": len(self.engine.planner.rules),
            },
            "uplinks": uplinks,
            "routes": self.engine.planner.route_rows(),
        }

    def metrics(self) -> list[Metric]:
        from ipshift.routes.metrics import routes_metrics

        metrics: list[Metric] = routes_metrics(self.status(), self.stats)
        return metrics
