"""Running a tunnel: the TUN device, its link settings, the sockets and the forwarding workers.

Kernel objects it owns: the TUN device (non-persistent, so it disappears with the process even
after kill -9, taking its addresses and routes along) and the control socket
/run/ipshift/tunnel-<dev>.sock (a stale one is replaced on start). As a daemon it runs on the
runtime (`TunnelService`, ipshift.daemon): one instance per device name and namespace.

Workers: one queue is forwarded by a thread of this process; with --queues N (IFF_MULTI_QUEUE)
each queue gets a worker process of its own, because the GIL would serialise threads. The
kernel spreads flows over the queues; each queue has its own UDP port pair, so the flows stay
apart in the underlay too. Workers publish their counters into shared memory twice a second.
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import multiprocessing.sharedctypes
import os
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Any

from ipshift.daemon import (
    TUN_DEVICE,
    DaemonOptions,
    Metric,
    Runtime,
    StartError,
    counter,
    run_service,
)
from ipshift.net import sysctl, tun, udp
from ipshift.net.errors import NetError
from ipshift.net.netlink import Netlink, Route
from ipshift.tunnel import batch
from ipshift.tunnel.config import TunnelConfig, remote_problem
from ipshift.tunnel.forwarder import Counters, Forwarder, Hooks, QueuePump
from ipshift.tunnel.rewrite import AddressRewriter

log = logging.getLogger("ipshift.tunnel")

PUBLISH_INTERVAL = 0.5  # seconds between a worker's counter updates to the parent
DEFAULT_UNDERLAY_MTU = 1500
TUN_GSO_MAX_SIZE = 0x10000  # a new TUN device's gso_max_size


class TunnelError(Exception):
    """The tunnel cannot start; the message says why and what to do."""


def ctl_name(dev: str) -> str:
    """The control socket name of the tunnel on `dev` (`ipshift ctl tunnel-<dev>`)."""
    return f"tunnel-{dev}"


class TunnelDaemon:
    """One tunnel. open() creates and configures everything, start() starts forwarding,
    close() undoes both; `with TunnelDaemon(config) as daemon:` does all three."""

    def __init__(self, config: TunnelConfig) -> None:
        self.config = config
        self.rewriter = AddressRewriter(config.rewrite_src, config.rewrite_dst)
        self.device: tun.TunDevice | None = None
        self.sockets: list[socket.socket] = []
        self.mtu = 0
        self.chunk: int | None = None  # batch framing's chunk size (the MTU); None: per packet
        self.gso_max_size = TUN_GSO_MAX_SIZE  # the largest TSO super-packet the device builds
        self._forwarder: Forwarder | None = None
        self._local_counters: list[Counters] = []
        self._workers: list[multiprocessing.process.BaseProcess] = []
        self._shared: Any = None  # RawArray of the workers' counters
        self._started = time.monotonic()

    # --- lifecycle ----------------------------------------------------------------------------
    def __enter__(self) -> TunnelDaemon:
        try:
            self.open()
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def open(self) -> None:
        """Create the TUN device, set its MTU, addresses and routes, open the sockets."""
        config = self.config
        with Netlink(config.netns) as nl:
            problem = remote_problem(config, (a.address for a in nl.addresses()))
        if problem:
            raise TunnelError(problem)
        if config.queues > 1:
            # Queues attach to an existing multi-queue device: never to another tunnel's.
            with Netlink(config.netns) as nl:
                try:
                    nl.index(config.dev)
                except NetError:
                    pass
                else:
                    raise TunnelError(f"a device named {config.dev} exists already (another "
                                      "tunnel?); pick another --dev")
        try:
            self.device = tun.open_tun(config.dev, queues=config.queues, netns_name=config.netns)
        except (tun.TunError, ValueError) as exc:
            raise TunnelError(str(exc)) from exc
        try:
            self._configure_link()
        except (NetError, OSError, ValueError) as exc:
            raise TunnelError(f"cannot configure {config.dev}: {exc}") from exc
        for index in range(config.queues):
            local = config.local.socket_address(index)
            remote = config.remote.socket_address(index)
            try:
                self.sockets.append(udp.open_udp(local, remote, netns_name=config.netns))
            except OSError as exc:
                raise TunnelError(
                    f"cannot use UDP {local[0]} port {local[1]}: {exc.strerror} (is the address "
                    f"on this host and the port free?)"
                ) from exc

    def _configure_link(self) -> None:
        config = self.config
        assert self.device is not None
        with Netlink(config.netns) as nl:
            underlay = DEFAULT_UNDERLAY_MTU
            try:
                path = nl.lookup(str(config.remote.host))
                if path.dev:
                    underlay = nl.link(path.dev).mtu or DEFAULT_UNDERLAY_MTU
            except NetError as exc:
                log.warning("no route to %s yet (%s); assuming an MTU of %d on the way",
                            config.remote.host, exc, DEFAULT_UNDERLAY_MTU)
            self.mtu = config.mtu_for(underlay)
            if config.framing == "batch":
                if self.mtu >= batch.MIN_CHUNK:
                    # A chunk datagram is as large as a full-size packet's datagram.
                    self.chunk = self.mtu
                else:
                    log.warning("tunnel MTU %d is below %d: using per-packet framing",
                                self.mtu, batch.MIN_CHUNK)
            self._set_gso_max_size(nl, sysctl.forwarding(config.netns))
            nl.set_link(config.dev, mtu=self.mtu, up=True)
            for address in config.addresses:
                nl.add_address(config.dev, str(address), nodad=True, replace=True)
            for prefix in config.routes:
                nl.replace_route(Route(str(prefix), dev=config.dev))

    def _set_gso_max_size(self, nl: Netlink, forwarding: bool) -> bool:
        """Give the device the gso_max_size that suits a host or a router; True if it changed.

        Nothing is forwarded into the device on a host, so only local TCP builds super-packets:
        have it build them small enough for one UDP send (two sends, and joining them, cost a
        third of the throughput). On a router that limit would make the kernel cut every larger
        forwarded super-packet into single packets in software before it reaches us (one read
        per packet), so there TSO keeps the kernel's 64 KB: a full super-packet takes two UDP
        sends and the far end joins the two GRO batches again."""
        wanted = TUN_GSO_MAX_SIZE
        if self.chunk and not forwarding:
            family = socket.AF_INET6 if self.config.remote.host.version == 6 else socket.AF_INET
            wanted = batch.BatchEncoder.one_send_limit(self.chunk, udp.max_batch(family))
        if wanted == self.gso_max_size:
            return False
        nl.set_link(self.config.dev, gso_max_size=wanted)
        self.gso_max_size = wanted
        return True

    def follow_forwarding(self) -> bool:
        """Re-read whether the namespace forwards IP (it may be switched on or off while the
        tunnel runs) and adapt the device's gso_max_size to it; True if it changed. The CLI
        daemon calls this every second."""
        if self.device is None or not self.chunk:
            return False
        forwarding = sysctl.forwarding(self.config.netns)
        try:
            with Netlink(self.config.netns) as nl:
                changed = self._set_gso_max_size(nl, forwarding)
        except NetError as exc:
            log.warning("cannot set gso_max_size of %s: %s", self.config.dev, exc)
            return False
        if changed:
            log.info("IP forwarding is %s: gso_max_size of %s is now %d",
                     "on" if forwarding else "off", self.config.dev, self.gso_max_size)
        return changed

    def start(self) -> None:
        """Start forwarding: a thread for one queue, worker processes for several."""
        assert self.device is not None and self.sockets
        self.device.set_blocking(False)
        self._started = time.monotonic()
        if self.config.queues == 1:
            counters = Counters()
            self._local_counters = [counters]
            pump = QueuePump(self.device.fd, self.sockets[0], hooks=self._hooks(counters),
                             counters=counters, chunk=self.chunk)
            self._forwarder = Forwarder([pump])
            self._forwarder.start(f"tunnel-{self.config.dev}")
            return
        size = Counters.size()
        self._shared = multiprocessing.sharedctypes.RawArray(
            ctypes.c_uint64, size * self.config.queues
        )
        context = multiprocessing.get_context("fork")
        for index in range(self.config.queues):
            worker = context.Process(
                target=_worker_main,
                args=(self.device.fds[index], self.sockets[index], self.rewriter, self._shared,
                      index, self.chunk, os.getpid()),
                name=f"tunnel-{self.config.dev}-q{index}",
                daemon=True,
            )
            worker.start()
            self._workers.append(worker)

    def _hooks(self, counters: Counters) -> Hooks | None:
        return self.rewriter.hooks(counters) if self.rewriter else None

    def alive(self) -> bool:
        if self._forwarder is not None:
            return self._forwarder.alive()
        return bool(self._workers) and all(w.is_alive() for w in self._workers)

    def stop(self, timeout: float = 5.0) -> None:
        """Stop forwarding (the device stays until close())."""
        if self._forwarder is not None:
            self._forwarder.stop(timeout)
            self._forwarder.close()
            self._forwarder = None
        deadline = time.monotonic() + timeout
        for worker in self._workers:
            if worker.is_alive() and worker.pid is not None:
                os.kill(worker.pid, signal.SIGTERM)
        for worker in self._workers:
            worker.join(max(0.1, deadline - time.monotonic()))
            if worker.is_alive():
                log.warning("worker %s did not stop; killing it", worker.name)
                worker.kill()
                worker.join(1.0)
        self._workers = []

    def close(self) -> None:
        """Stop, close the sockets and the device (which removes it, its addresses, routes)."""
        self.stop()
        for sock in self.sockets:
            sock.close()
        self.sockets = []
        if self.device is not None:
            self.device.close()

    # --- status -------------------------------------------------------------------------------
    def counters(self) -> Counters:
        total = Counters()
        for counters in self._local_counters:
            total.add(counters)
        if self._shared is not None:
            size = Counters.size()
            for index in range(self.config.queues):
                total.add(Counters.from_array(self._shared[index * size:(index + 1) * size]))
        return total

    def status(self) -> dict[str, Any]:
        config = self.config
        return {
            "tunnel": {
                "device": config.dev,
                "local": str(config.local),
                "remote": str(config.remote),
                "mtu": self.mtu,
                "framing": config.framing if self.chunk else "packet",
                "gso_max_size": self.gso_max_size,
                "queues": config.queues,
                "rewrites": [f"src {m}" for m in config.rewrite_src]
                + [f"dst {m}" for m in config.rewrite_dst],
                "uptime_s": round(time.monotonic() - self._started, 1),
                "running": self.alive(),
            },
            "counters": self.counters().as_dict(),
        }


def _worker_main(
    tun_fd: int, sock: socket.socket, rewriter: AddressRewriter, shared: Any, index: int,
    chunk: int | None, parent: int,
) -> None:
    """A queue's worker process: forward until SIGTERM (also sent when the daemon dies, even
    by kill -9: the worker holds a queue of the device, which would outlive it), publishing
    counters."""
    _die_with_parent(parent)
    signal.set_wakeup_fd(-1)  # the parent's asyncio wake-up fd is not ours
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the parent, which stops us
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    counters = Counters()
    pump = QueuePump(tun_fd, sock, hooks=rewriter.hooks(counters) if rewriter else None,
                     counters=counters, chunk=chunk)
    forwarder = Forwarder([pump])
    signal.signal(signal.SIGTERM, lambda signum, frame: forwarder.stop())
    size = Counters.size()
    done = threading.Event()

    def publish() -> None:
        shared[index * size:(index + 1) * size] = counters.as_array()

    def publisher() -> None:
        while not done.wait(PUBLISH_INTERVAL):
            publish()

    threading.Thread(target=publisher, name="counters", daemon=True).start()
    try:
        forwarder.run()
    finally:
        done.set()
        publish()


def _die_with_parent(parent: int) -> None:
    """Have the kernel send SIGTERM when the process that forked us dies
    (PR_SET_PDEATHSIG), and go at once if it died already."""
    libc = ctypes.CDLL(None, use_errno=True)
    pr_set_pdeathsig = 1
    if libc.prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0) != 0:
        log.warning("prctl(PR_SET_PDEATHSIG): %s", os.strerror(ctypes.get_errno()))
    if os.getppid() != parent:
        os._exit(0)


class TunnelService:
    """The tunnel as a daemon on the runtime (ipshift.daemon): `ipshift tunnel run`."""

    component = "tunnel"
    adopts = frozenset({TUN_DEVICE})  # a device dies with its holder: nothing to remove

    def __init__(self, config: TunnelConfig) -> None:
        self.config = config
        self.instance = config.dev
        self.netns = config.netns
        self.daemon: TunnelDaemon | None = None
        self._rt: Runtime | None = None

    async def start(self, rt: Runtime) -> None:
        self._rt = rt
        rt.record.settled(TUN_DEVICE)
        daemon = TunnelDaemon(self.config)
        try:
            daemon.open()
            rt.record.add(TUN_DEVICE, self.config.dev)
            daemon.start()
        except TunnelError as exc:
            daemon.close()
            rt.record.discard(TUN_DEVICE, self.config.dev)
            raise StartError(str(exc)) from exc
        self.daemon = daemon
        rt.every(1.0, self._check, "following IP forwarding")
        config = self.config
        log.info("tunnel %s up: %s <-> %s, MTU %d, %d queue(s)", config.dev, config.local,
                 config.remote, daemon.mtu, config.queues)

    def _check(self) -> None:
        assert self.daemon is not None and self._rt is not None
        if not self.daemon.alive():
            self._rt.fail("forwarding stopped unexpectedly")
            return
        self.daemon.follow_forwarding()

    async def stop(self) -> None:
        if self.daemon is None:
            return
        counters = self.daemon.counters()
        self.daemon.close()
        self.daemon = None
        if self._rt is not None:
            self._rt.record.discard(TUN_DEVICE, self.config.dev)
        log.info("tunnel %s down; %s", self.config.dev, counters.as_dict())

    def status(self) -> dict[str, Any]:
        if self.daemon is None:
            return {}
        return self.daemon.status()

    def metrics(self) -> list[Metric]:
        if self.daemon is None:
            return []
        dev = self.config.dev
        return [counter(f"ipshift_tunnel_{name}", value, f"tunnel {name.replace('_', ' ')}",
                        dev=dev)
                for name, value in self.daemon.counters().as_dict().items()]


def run_daemon(config: TunnelConfig, *, socket_path: Path | None,
               metrics: str | None = None) -> int:
    """Foreground tunnel for the CLI: until SIGTERM/SIGINT or `ipshift tunnel stop`."""
    return run_service(TunnelService(config), DaemonOptions(socket=socket_path, metrics=metrics))
