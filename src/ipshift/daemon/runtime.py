"""The one runtime every ipshift daemon runs on.

A component writes a `Service` (its daemon glue: open what it needs in `start`, remove it in
`stop`, describe itself in `status` and `metrics`) and hands it to `run_service`:

    service = RoutesService(cfg, netns=None)
    return run_service(service, DaemonOptions(socket=path, metrics=args.metrics))

`run_service` does, in this order and nowhere else:
1. checks the socket path and the metrics address (one line and exit 2 if unusable);
2. takes the single-instance lock of (component, instance name, network namespace): a second
   instance is refused before any kernel state is touched, whatever its --socket;
3. reads the instance's owned-state record: what a killed predecessor left (`rt.record`);
   the runtime removes leftover nft tables and lo addresses unless the service adopts them
   (`Service.adopts`), and the service deals with the rest in `start`;
4. serves the control socket (status, stop, metrics, plus the service's methods) and, with
   `--metrics`, Prometheus;
5. `await service.start(rt)`; then READY=1 to systemd and an INFO line;
6. waits for SIGTERM/SIGINT/SIGHUP, `stop` on the control socket, or `rt.fail(...)`;
   SIGUSR1 logs the status;
7. `await service.stop()`, then closes the control socket and the metrics server, removes the
   record if nothing is held any more, and releases the lock.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from ipshift import __version__
from ipshift.ctl.protocol import CtlError, socket_path
from ipshift.ctl.server import CtlServer, Handler, socket_path_problem
from ipshift.daemon import metrics as metrics_mod
from ipshift.daemon.instance import Instance, InstanceError, InstanceLock
from ipshift.daemon.metrics import Metric, counter, gauge
from ipshift.daemon.notify import sd_notify
from ipshift.daemon.owned import (
    LO_ADDRESS,
    NFT_TABLE,
    QUEUE_RULE,
    ROUTE_PROTOCOL,
    SYSCTL,
    OwnedRecord,
)
from ipshift.ui import UserError

log = logging.getLogger("ipshift.daemon")

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


class StartError(Exception):
    """The service cannot start; str() is one line saying why and what to do."""


class Service(Protocol):
    component: str  # "routes", "resend", "tunnel", ...
    instance: str  # the instance name: a config's name, an interface, a device
    netns: str | None  # the namespace it works in (None: the process's own)
    adopts: frozenset[str]  # owned-state kinds the service takes over itself at start

    async def start(self, rt: Runtime) -> None: ...
    async def stop(self) -> None: ...
    def status(self) -> dict[str, Any]: ...
    def metrics(self) -> Iterable[Metric]: ...


@dataclass(frozen=True)
class DaemonOptions:
    socket: Path | None = None  # control socket (default: <run dir>/<component>-<name>.sock)
    metrics: str | None = None  # ADDRESS:PORT for Prometheus, or None
    run_dir: Path | None = None  # locks and owned-state records (default: /run/ipshift)


class Runtime:
    """What a running service gets from the runtime (`start(rt)`)."""

    def __init__(self, service: Service, instance: Instance, socket: Path,
                 record: OwnedRecord) -> None:
        self.service = service
        self.instance = instance
        self.socket = socket
        self.record = record
        self.ctl = CtlServer(socket, name=f"{instance.component}-{instance.name}")
        self.started = time.time()
        self.state = "starting"
        self.exit_status = 0
        self.loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._periodic: list[asyncio.TimerHandle] = []
        self.task_failures = 0

    # --- for services -------------------------------------------------------------------------
    def method(self, name: str, handler: Handler) -> None:
        """Serve another control method."""
        self.ctl.method(name, handler)

    def request_stop(self) -> None:
        self._stop.set()

    def fail(self, reason: str) -> None:
        """The service cannot go on: log why, stop, exit 1."""
        log.error("%s: %s", self.instance.describe(), reason)
        self.exit_status = 1
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def spawn(self, coro: Awaitable[Any], name: str = "") -> asyncio.Task[Any]:
        """Run `coro` as a task the runtime tracks; its exception is logged, not lost."""
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)

        def done(t: asyncio.Task[Any]) -> None:
            self._tasks.discard(t)
            if not t.cancelled() and t.exception() is not None:
                self.task_failures += 1
                log.error("%s failed: %s", name or "task", t.exception())

        task.add_done_callback(done)
        return task

    async def drain_tasks(self, timeout: float) -> None:
        """Wait for tracked tasks up to `timeout`, then cancel what is left."""
        if not self._tasks:
            return
        _, pending = await asyncio.wait(set(self._tasks), timeout=timeout)
        for t in pending:
            t.cancel()
        if pending:
            await asyncio.wait(pending, timeout=1.0)

    def every(self, interval: float, job: Callable[[], None], what: str) -> None:
        """Call `job` every `interval` seconds. An exception is logged once per run of
        failures (with the count when it recovers), never kills the daemon."""
        failing = [0]

        def tick() -> None:
            if self._stop.is_set():
                return
            try:
                job()
            except Exception as exc:
                if failing[0] == 0:
                    log.warning("%s failed: %s", what, exc)
                failing[0] += 1
            else:
                if failing[0]:
                    log.warning("%s works again after %d failure%s", what, failing[0],
                                "" if failing[0] == 1 else "s")
                    failing[0] = 0
            self._periodic.append(self.loop.call_later(interval, tick))
            if len(self._periodic) > 16:
                self._periodic = [h for h in self._periodic if not h.cancelled()][-8:]

        self._periodic.append(self.loop.call_later(interval, tick))

    # --- control --------------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        """The status envelope: the runtime's `daemon` block, then the service's document
        (whose own `daemon` block, if any, is merged into the runtime's)."""
        inst = self.instance
        head: dict[str, Any] = {
            "component": inst.component,
            "name": inst.name,
            "state": self.state,
            "pid": os.getpid(),
            "netns": inst.netns,
            "uptime_s": round(time.time() - self.started, 1),
            "socket": str(self.socket),
            "version": __version__,
        }
        body = dict(self.service.status()) if self.state != "starting" else {}
        extra = body.pop("daemon", None)
        if isinstance(extra, dict):
            head.update(extra)
        return {"daemon": head, **body}

    def metrics(self) -> list[Metric]:
        prefix = f"ipshift_{self.instance.component}"
        out = [gauge(f"{prefix}_uptime_seconds", time.time() - self.started,
                     "seconds since the daemon started")]
        for key, value in self.ctl.counters().items():
            kind = gauge if key == "connections" else counter
            out.append(kind(f"ipshift_control_{key}", value, "control socket " + key))
        if self.state == "running":
            out.extend(self.service.metrics())
        return out

    def metrics_threadsafe(self) -> list[Metric]:
        """metrics() computed on the event loop, for the exporter's thread."""
        if not self.loop.is_running():
            return self.metrics()

        async def get() -> list[Metric]:
            return self.metrics()

        return asyncio.run_coroutine_threadsafe(get(), self.loop).result(5.0)

    def _ctl_stop(self, params: dict[str, Any]) -> dict[str, Any]:
        self.loop.call_soon(self._stop.set)
        return {"stopping": True}

    def _log_status(self) -> None:
        try:
            log.info("status %s", json.dumps(self.status(), default=str, sort_keys=True))
            # a service may answer SIGUSR1 itself too (rsipd writes the seed's status file)
            hook = getattr(self.service, "on_status_signal", None)
            if hook is not None:
                hook()
        except Exception as exc:  # a status that fails must not end the daemon
            log.warning("status failed: %s", exc)

    # --- the lifecycle --------------------------------------------------------------------------
    async def serve(self, options: DaemonOptions) -> int:
        self.ctl.method("status", lambda params: self.status())
        self.ctl.method("stop", self._ctl_stop)
        self.ctl.method("metrics", lambda params: [m.as_json() for m in self.metrics()])
        exporter: Any = None
        installed: list[int] = []
        try:
            try:
                await self.ctl.start()
            except CtlError as exc:
                raise StartError(exc.message) from exc
            if options.metrics:
                try:
                    exporter = metrics_mod.serve(options.metrics, self.metrics_threadsafe)
                except metrics_mod.MetricsError as exc:
                    raise StartError(str(exc)) from exc
            for sig in STOP_SIGNALS:
                self.loop.add_signal_handler(sig, self._stop.set)
                installed.append(sig)
            self.loop.add_signal_handler(signal.SIGUSR1, self._log_status)
            installed.append(signal.SIGUSR1)
            remove_leftovers(self.record, self.instance.netns, self.service.adopts)
            try:
                await self.service.start(self)
            except StartError:
                raise
            except (OSError, ValueError) as exc:
                raise StartError(str(exc)) from exc
            self.state = "running"
            sd_notify("READY=1", f"STATUS={self.instance.describe()} running")
            log.info("%s running (pid %d, control socket %s)", self.instance.describe(),
                     os.getpid(), self.socket)
            await self._stop.wait()
            self.state = "stopping"
            sd_notify("STOPPING=1")
            return self.exit_status
        finally:
            self.state = "stopping"
            for handle in self._periodic:
                handle.cancel()
            try:
                await self.service.stop()
            except Exception:
                log.exception("%s: stopping failed", self.instance.describe())
                self.exit_status = 1
            await self.drain_tasks(1.0)
            await self.ctl.close()
            if exporter is not None:
                with contextlib.suppress(Exception):
                    exporter.shutdown()
            for signum in installed:
                self.loop.remove_signal_handler(signum)
            if not any(self.record.current.values()):
                self.record.remove()


def remove_leftovers(record: OwnedRecord, netns: str | None, adopted: frozenset[str]) -> None:
    """Remove the nft tables, routes, queue rules and lo addresses a killed predecessor left,
    and put back the kernel settings it changed (those kinds the service does not adopt); the
    record forgets each as it goes."""
    if NFT_TABLE not in adopted and record.left_over(NFT_TABLE):
        from ipshift.net.errors import NetError
        from ipshift.net.nft import Nft

        with Nft(netns) as nft:
            for item in record.left_over(NFT_TABLE):
                family, _, name = item.partition(" ")
                try:
                    if nft.delete_table(family, name):
                        log.info("removed nftables table %s %s left by a previous instance",
                                 family, name)
                except NetError as exc:
                    log.warning("cannot remove the leftover nftables table %s: %s", item, exc)
                    continue
                record.settled(NFT_TABLE, [item])
    if ROUTE_PROTOCOL not in adopted and record.left_over(ROUTE_PROTOCOL):
        removed = remove_protocol_routes(record.left_over(ROUTE_PROTOCOL), netns)
        if removed:
            log.info("removed %d routes and rules left by a previous instance", removed)
        record.settled(ROUTE_PROTOCOL)
    if QUEUE_RULE not in adopted and record.left_over(QUEUE_RULE):
        from ipshift.net.errors import NetError
        from ipshift.net.nfqueue import QueueRule

        for item in record.left_over(QUEUE_RULE):
            family, table, owner = [*item.split(" "), "", "", ""][:3]
            try:
                if QueueRule.remove_stale(owner, family=6 if family == "6" else 4,
                                          netns=netns, table=table or "mangle"):
                    log.info("removed the NFQUEUE chain of %s left by a previous instance",
                             owner)
            except (NetError, ValueError) as exc:
                log.warning("cannot remove the leftover queue rule %s: %s", item, exc)
                continue
            record.settled(QUEUE_RULE, [item])
    if LO_ADDRESS not in adopted and record.left_over(LO_ADDRESS):
        from ipshift.net.loaddr import remove_addresses

        gone = remove_addresses(record.left_over(LO_ADDRESS), netns)
        for cidr in gone:
            log.info("removed address %s from lo, left by a previous instance", cidr)
        record.settled(LO_ADDRESS)
    if SYSCTL not in adopted and record.left_over(SYSCTL):
        from ipshift.daemon.kernel import restore_left_sysctls

        restore_left_sysctls(record, netns)


def remove_protocol_routes(protocols: Iterable[str], netns: str | None) -> int:
    """Delete every route and rule marked with one of `protocols` (routing protocol numbers
    an instance owned); how many."""
    from ipshift.net.errors import NetError
    from ipshift.net.netlink import Netlink

    wanted = {int(p) for p in protocols if p.isdigit() and 0 < int(p) < 256}
    count = 0
    with Netlink(netns) as nl:
        for route in nl.routes(None):
            if route.proto in wanted and route.table != 255:
                try:
                    nl.del_route(route)
                    count += 1
                except NetError:
                    pass  # gone meanwhile
        for rule in nl.rules():
            if rule.proto in wanted:
                try:
                    nl.del_rule(rule)
                    count += 1
                except NetError:
                    pass
    return count


class _Watched(Protocol):
    def fileno(self) -> int: ...
    def close(self) -> None: ...


def close_watched(loop: asyncio.AbstractEventLoop | None, thing: _Watched | None) -> None:
    """Stop watching `thing` (a socket, a KernelWatcher: what a daemon gave to
    `loop.add_reader`) and close it; a loop already closed or a reader never added is fine."""
    if thing is None:
        return
    if loop is not None:
        with contextlib.suppress(Exception):  # the loop may be closed, or never watched it
            loop.remove_reader(thing.fileno())
    thing.close()


def default_socket(component: str, name: str) -> Path:
    return socket_path(f"{component}-{name}")


def run_service(service: Service, options: DaemonOptions) -> int:
    """Run `service` until it is told to stop; the exit status. Problems found before the
    service runs raise UserError (one line, exit 2)."""
    from ipshift.ctl import protocol

    try:
        instance = Instance(service.component, service.instance, service.netns,
                            options.run_dir or protocol.DEFAULT_DIR)
    except InstanceError as exc:
        raise UserError(str(exc)) from exc
    sock = options.socket or default_socket(service.component, service.instance)
    problem = socket_path_problem(sock)
    if problem:
        raise UserError(problem)
    if options.metrics:
        problem = metrics_mod.address_problem(options.metrics)
        if problem:
            raise UserError(problem)
    lock = InstanceLock(instance)
    try:
        lock.acquire()
    except InstanceError as exc:
        raise UserError(str(exc)) from exc
    try:
        record = OwnedRecord(instance.record_path)

        async def main() -> int:
            rt = Runtime(service, instance, sock, record)
            return await rt.serve(options)

        try:
            return asyncio.run(main())
        except StartError as exc:
            raise UserError(str(exc)) from exc
    finally:
        lock.release()
