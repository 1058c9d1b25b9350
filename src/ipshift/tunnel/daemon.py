"""Running a tunnel: the TUN device, its link settings, the sockets and the forwarding workers.

Kernel objects it owns: the TUN device (non-persistent, so it disappears with the process even
after kill -9, taking its addresses and routes along) and the control socket
/run/ipshift/tunnel-<dev>.sock (a stale one is replaced on start). As a daemon it runs on the
runtime (`TunnelService`, ipshift.daemon): one instance per device name and namespace.

Workers: one queue is forwarded by a thread of this process; with --queues N (IFF_MULTI_QUEUE)
each queue gets a worker process of its own, because the GIL would serialise threads. The
kernel spreads flows over the queues; each queue has its own UDP port pair, so the flows stay
apart in the underlay too. Workers publish their counters into shared memory twice a second;
per-peer counters live in a shared mapping they write directly.

Changes while running (`update_peers`, `set_local_destinations`, `set_rewrites`,
`update_hook_state`): the daemon keeps the authoritative `PeerTable`; the forwarding thread
gets the new table between two reads (Forwarder.call_soon), a worker process gets the table's
delta (or a snapshot) through its control pipe and acknowledges the generation it applied, so
an update returns once every queue forwards with it.
"""

from __future__ import annotations

import ctypes
import dataclasses
import ipaddress
import itertools
import json
import logging
import multiprocessing
import multiprocessing.sharedctypes
import os
import select
import signal
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from ipshift.ctl.protocol import CtlError
from ipshift.daemon import (
    TUN_DEVICE,
    DaemonOptions,
    Metric,
    Runtime,
    StartError,
    counter,
    gauge,
    run_service,
)
from ipshift.net import sysctl, tun, udp
from ipshift.net.errors import NetError
from ipshift.net.netlink import Netlink, Route
from ipshift.packet import vnet
from ipshift.tunnel import auth, batch, wire
from ipshift.tunnel.config import (
    ConfigError,
    Endpoint,
    IPNetwork,
    TunnelConfig,
    remote_problem,
)
from ipshift.tunnel.forwarder import (
    DEFAULT_PEER_SLOTS,
    Counters,
    Forwarder,
    PeerCounterArray,
    QueuePump,
)
from ipshift.tunnel.hooks import INBOUND, OUTBOUND, ControlSink, Hooks, compose
from ipshift.tunnel.peerfile import load_peers
from ipshift.tunnel.peers import (
    GenerationError,
    Peer,
    PeerCodecError,
    PeerTable,
    decode_message,
    encode_delta,
    encode_table,
)
from ipshift.tunnel.raw import RawLink
from ipshift.tunnel.rewrite import AddressRewriter, RewriteRules

log = logging.getLogger("ipshift.tunnel")

PUBLISH_INTERVAL = 0.5  # seconds between a worker's counter updates to the parent
UPDATE_TIMEOUT = 2.0  # seconds an update waits for every queue to apply it
PEER_NAME = "peer"  # the one peer of a --remote tunnel
METRIC_PEERS = 256  # peers whose counters are exported as metrics
DEFAULT_UNDERLAY_MTU = 1500
MTU_PROBES = 8  # peers whose path MTU is looked up at start
TUN_GSO_MAX_SIZE = 0x10000  # a new TUN device's gso_max_size


class TunnelError(Exception):
    """The tunnel cannot start; the message says why and what to do."""


def ctl_name(dev: str) -> str:
    """The control socket name of the tunnel on `dev` (`ipshift ctl tunnel-<dev>`)."""
    return f"tunnel-{dev}"


class TunnelDaemon:
    """One tunnel. open() creates and configures everything, start() starts forwarding,
    close() undoes both; `with TunnelDaemon(config) as daemon:` does all three."""

    def __init__(self, config: TunnelConfig, hooks: Hooks | None = None) -> None:
        """hooks: a component's own hooks (they see the peer; see ipshift.tunnel.hooks),
        composed with the rewrite rules: outbound the component's hook runs first, inbound
        last, so it sees packets as this host does."""
        if hooks is not None and hooks.stranger is not None and config.queues > 1:
            raise TunnelError("a stranger sink needs a tunnel of one queue (--queues 1)")
        self.config = config
        self.component_hooks = hooks
        self.rewrites = RewriteRules(config.rewrite_src, config.rewrite_dst)
        self.rewriter = AddressRewriter.of(self.rewrites)
        self.table = initial_table(config)
        self.peer_counters = PeerCounterArray(DEFAULT_PEER_SLOTS, config.queues)
        self.device: tun.TunDevice | None = None
        self.sockets: list[socket.socket] = []  # per queue, one per local endpoint
        self._raw_links: list[RawLink] = []
        self._pump: QueuePump | None = None
        self._channels: list[_WorkerChannel] = []
        self._update_lock = threading.Lock()
        self._control_counts = {"sent": 0, "delivered": 0, "send_errors": 0, "write_errors": 0}
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
            for endpoint in config.locals():
                local = endpoint.socket_address(index)
                # A point-to-point tunnel keeps its socket connected: the kernel filters
                # senders and reports ICMP errors; peers from a table share unconnected ones.
                remote = (config.remote.socket_address(index)
                          if config.remote is not None and
                          config.remote.family == endpoint.family else None)
                try:
                    # with an endpoint of each family, each socket takes its own: the IPv6
                    # one must not also claim the IPv4 port (a wildcard is dual-stack)
                    self.sockets.append(udp.open_udp(
                        local, remote, netns_name=config.netns,
                        v6only=config.extra_local is not None))
                except OSError as exc:
                    raise TunnelError(
                        f"cannot use UDP {local[0]} port {local[1]}: {exc.strerror} (is the "
                        "address on this host and the port free?)"
                    ) from exc
        if config.remote is None:
            self._open_raw_links()

    def _configure_link(self) -> None:
        config = self.config
        assert self.device is not None
        with Netlink(config.netns) as nl:
            underlays = []
            # The smallest MTU toward the first peers (a large table is not walked here).
            for remote, _what in config.remotes()[:MTU_PROBES]:
                try:
                    path = nl.lookup(str(remote.host))
                    if path.dev:
                        underlays.append(nl.link(path.dev).mtu or DEFAULT_UNDERLAY_MTU)
                except NetError as exc:
                    log.warning("no route to %s yet (%s); assuming an MTU of %d on the way",
                                remote.host, exc, DEFAULT_UNDERLAY_MTU)
            underlay = min(underlays, default=DEFAULT_UNDERLAY_MTU)
            self.mtu = config.mtu_for(underlay)
            if config.framing == "batch":
                if self.mtu >= batch.MIN_CHUNK:
                    # A chunk datagram is as large as a full-size packet's datagram.
                    self.chunk = self.mtu
                else:
                    log.warning("tunnel MTU %d is below %d: using per-packet framing",
                                self.mtu, batch.MIN_CHUNK)
            self._set_gso_max_size(nl, sysctl.forwarding(config.netns))
            self._no_link_local(config)
            nl.set_link(config.dev, mtu=self.mtu, up=True)
            for address in config.addresses:
                nl.add_address(config.dev, str(address), nodad=True, replace=True)
            for prefix in config.routes:
                nl.replace_route(Route(str(prefix), dev=config.dev))

    @staticmethod
    def _no_link_local(config: TunnelConfig) -> None:
        """No IPv6 link-local address on the device: a tunnel to many peers is no link, and
        the address would send router solicitations and MLD reports into the tunnel, which
        the far end can only count as packets it does not serve."""
        try:
            sysctl.write(("net", "ipv6", "conf", config.dev, "addr_gen_mode"), 1, config.netns)
        except NetError as exc:  # IPv6 disabled on this host: nothing to generate
            log.debug("left %s's IPv6 address generation alone: %s", config.dev, exc)

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
            family = self.config.local.family
            wanted = batch.BatchEncoder.one_send_limit(self.chunk, self._per_send(family))
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

    def _per_send(self, family: socket.AddressFamily) -> int:
        overhead = auth.OVERHEAD * udp.MAX_SEGMENTS if self.config.authenticated else 0
        return udp.max_batch(family) - overhead

    def _open_raw_links(self) -> None:
        """Raw sockets for IP-in-IP and GRE peers, one set per queue (a table may gain such
        peers while running). The queues share the senders by a kernel filter: each raw
        socket would otherwise get its own copy of every packet. Their overhead (20-48 bytes)
        never exceeds the UDP framing's, so the tunnel MTU suits them too."""
        addresses = [endpoint.host for endpoint in self.config.locals()]
        queues = self.config.queues
        for index in range(queues):
            try:
                self._raw_links.append(RawLink(addresses, netns_name=self.config.netns,
                                               share=(index, queues) if queues > 1 else None))
            except (OSError, NetError) as exc:
                raise TunnelError(f"cannot open raw sockets for IP-in-IP and GRE peers: "
                                  f"{exc}") from exc

    def _queue_sockets(self, index: int) -> list[socket.socket]:
        per_queue = len(self.config.locals())
        return self.sockets[index * per_queue:(index + 1) * per_queue]

    def start(self) -> None:
        """Start forwarding: a thread for one queue, worker processes for several."""
        assert self.device is not None and self.sockets
        self.device.set_blocking(False)
        self._started = time.monotonic()
        if self.config.queues == 1:
            counters = Counters()
            self._local_counters = [counters]
            self._pump = self._pump_for(0, counters)
            self._forwarder = Forwarder([self._pump])
            self._forwarder.start(f"tunnel-{self.config.dev}")
            return
        size = Counters.size()
        self._shared = multiprocessing.sharedctypes.RawArray(
            ctypes.c_uint64, size * self.config.queues
        )
        context = multiprocessing.get_context("fork")
        for index in range(self.config.queues):
            channel = _WorkerChannel()
            worker = context.Process(
                target=_worker_main,
                args=(self, index, channel, os.getpid()),
                name=f"tunnel-{self.config.dev}-q{index}",
                daemon=True,
            )
            worker.start()
            channel.parent_side()
            self._channels.append(channel)
            self._workers.append(worker)
        hooks = self.component_hooks
        if hooks is not None and hooks.control is not None:
            # Packets the workers' hooks hand to the control plane come up a pipe each.
            threading.Thread(target=self._relay_control, args=(hooks.control,),
                             name=f"tunnel-{self.config.dev}-control", daemon=True).start()

    def _relay_control(self, sink: ControlSink) -> None:
        """Hand what the workers' hooks diverted to the component's sink (a thread)."""
        readers = {channel.events_r: _EventReader() for channel in self._channels}
        while readers:
            try:
                ready, _, _ = select.select(list(readers), [], [], 1.0)
            except (OSError, ValueError):
                return  # closed by stop()
            for fd in ready:
                try:
                    data = os.read(fd, 1 << 20)
                except OSError:
                    data = b""
                if not data:
                    del readers[fd]
                    continue
                for name, direction, packet in readers[fd].feed(data):
                    peer = self.table.get(name)
                    if peer is not None:
                        try:
                            sink(peer, direction, packet)
                        except Exception:
                            log.exception("the control sink failed on a diverted packet")

    def _pump_for(self, index: int, counters: Counters,
                  control: ControlSink | None = None) -> QueuePump:
        hooks = self._hooks(counters, control)
        return QueuePump(
            self.device.fds[index] if self.device is not None else -1,
            self._queue_sockets(index), hooks=hooks, counters=counters,
            chunk=self.chunk, table=self.table, queue=index,
            raw=self._raw_links[index] if self._raw_links else None,
            peer_counters=self.peer_counters, authenticated=self.config.authenticated)

    def _hooks(self, counters: Counters, control: ControlSink | None = None) -> Hooks | None:
        """The hooks of one queue: the component's composed with the rewrite rules.
        control: where diverted packets go instead of the component's sink (a worker's
        pipe to the daemon)."""
        rewrite = self.rewriter.hooks(counters) if self.rewriter else None
        component = self.component_hooks
        if component is not None and control is not None and component.control is not None:
            component = dataclasses.replace(component, control=control)
        if component is None:
            return rewrite
        if rewrite is None:
            return component
        return Hooks(outbound=compose(component.outbound, rewrite.outbound),
                     inbound=compose(rewrite.inbound, component.inbound),
                     control=component.control, on_state=component.on_state,
                     resizes=component.resizes, stranger=component.stranger,
                     whole=component.whole)

    # --- packets of the control plane -------------------------------------------------------------
    def send_packet(self, endpoint: Endpoint, packet: bytes) -> bool:
        """Send one inner IP packet (complete checksums) to the UDP `endpoint` in the per-packet
        framing, from the first socket of its family: a component's own packets (an ILNP
        Locator Update, a packet that waited for its correspondent), beside the data path.
        False (counted in `send_errors`) if it could not be sent. Thread-safe."""
        sock = next((s for s in self._queue_sockets(0) if s.family == endpoint.family), None)
        if sock is None:
            self._control_counts["send_errors"] += 1
            return False
        try:
            sock.sendmsg([wire.PLAIN_HEADER, packet], [], 0, endpoint.socket_address())
        except OSError as exc:
            self._control_counts["send_errors"] += 1
            log.debug("sending a control packet to %s: %s", endpoint, exc)
            return False
        self._control_counts["sent"] += 1
        return True

    def deliver(self, packet: bytes) -> bool:
        """Write one inner IP packet (complete checksums) to the TUN device as if it came out
        of the tunnel: a packet the control plane accepted. Thread-safe (a TUN write is one
        packet); False (counted) if the device refused it."""
        if self.device is None:
            return False
        try:
            os.writev(self.device.fds[0], [vnet.PLAIN, packet])
        except OSError as exc:
            self._control_counts["write_errors"] += 1
            log.debug("writing a control packet to %s: %s", self.config.dev, exc)
            return False
        self._control_counts["delivered"] += 1
        return True

    # --- changes while running ----------------------------------------------------------------
    def update_peers(self, upserts: Iterable[Peer] = (), removals: Iterable[str] = (), *,
                     wait: bool = True) -> int:
        """Add or replace (by name) and remove peers while forwarding; returns the new table
        generation, in force in every queue when this returns. ConfigError (nothing changed)
        for a conflicting update. wait=False (one queue only: a forwarding thread of this
        process): return at once; the forwarder applies the changes it is handed in order,
        so a control plane that must not stall (ILNP's) still gets them in sequence."""
        with self._update_lock:
            upserts = list(upserts)
            removals = list(removals)
            self._check_peers(upserts)
            slots = [self.table.slots[name] for name in removals if name in self.table.slots]
            table = self.table.with_peers(upserts, removals)
            self._push_table(table, wait=wait)
            # No queue counts for the removed peers any more: clear their rows for whoever
            # gets the slot next.
            for slot in slots:
                for queue in range(self.config.queues):
                    self.peer_counters.reset(queue, slot)
            return table.generation

    def replace_peers(self, peers: Iterable[Peer]) -> int:
        """Make the table exactly `peers` (unchanged ones keep their state)."""
        peers = list(peers)
        names = {peer.name for peer in peers}
        current = self.table.peers
        upserts = [peer for peer in peers if current.get(peer.name) != peer]
        removals = [name for name in current if name not in names]
        return self.update_peers(upserts, removals)

    def set_local_destinations(self, prefixes: Iterable[IPNetwork] | None) -> int:
        """Which inner destinations this end accepts from the tunnel (None: any)."""
        with self._update_lock:
            table = self.table.with_local_destinations(
                None if prefixes is None else tuple(prefixes))
            self._push_table(table)
            return table.generation

    def _check_peers(self, peers: Iterable[Peer]) -> None:
        if self.config.remote is not None:
            raise ConfigError("this tunnel has one --remote peer; start it with --peers FILE "
                              "to change peers while it runs")
        families = {endpoint.family for endpoint in self.config.locals()}
        for peer in peers:
            family = socket.AF_INET6 if peer.endpoint.host.version == 6 else socket.AF_INET
            if family not in families:
                raise ConfigError(f"peer {peer.name!r}: this tunnel has no local IPv"
                                  f"{peer.endpoint.host.version} endpoint (--local)")
            if peer.key is not None and not self.config.authenticated:
                log.warning("peer %s has a key but the tunnel MTU leaves no room for the "
                            "authentication overhead (start with a keyed peer in the file); "
                            "its large packets will be fragmented", peer.name)

    def _push_table(self, table: PeerTable, *, wait: bool = True) -> None:
        old = self.table
        self.table = table
        if self._pump is not None and self._forwarder is not None:
            pump = self._pump
            self._run_on_forwarder(lambda: pump.set_table(table), wait=wait)
        elif self._channels:
            try:
                message = encode_delta(table.delta_since(old))
            except Exception:
                message = encode_table(table)
            self._broadcast(_KIND_TABLE, message, table)

    def set_rewrites(self, rules: RewriteRules) -> None:
        """Replace the rewrite rules (addresses and /64 prefixes) while forwarding."""
        with self._update_lock:
            self.rewrites = rules
            self.rewriter = AddressRewriter.of(rules)
            if self._pump is not None and self._forwarder is not None:
                pump = self._pump
                hooks = self._hooks(pump.counters)
                self._run_on_forwarder(lambda: setattr(pump, "hooks", hooks))
            elif self._channels:
                self._broadcast(_KIND_REWRITE, json.dumps(rules.as_dict()).encode(), None)

    def update_hook_state(self, state: Mapping[str, Any], *, wait: bool = True) -> None:
        """Hand `state` (JSON-like) to the component hooks' on_state in every queue
        (wait=False: as for `update_peers`)."""
        hooks = self.component_hooks
        if hooks is None or hooks.on_state is None:
            raise ConfigError("the tunnel's hooks take no state")
        on_state = hooks.on_state
        with self._update_lock:
            if self._forwarder is not None:
                self._run_on_forwarder(lambda: on_state(state), wait=wait)
            elif self._channels:
                self._broadcast(_KIND_HOOK_STATE, json.dumps(state).encode(), None)

    def _run_on_forwarder(self, call: Callable[[], None], *, wait: bool = True) -> None:
        assert self._forwarder is not None
        if not wait:
            self._forwarder.call_soon(call)
            return
        done = threading.Event()

        def run() -> None:
            try:
                call()
            finally:
                done.set()

        self._forwarder.call_soon(run)
        if not done.wait(UPDATE_TIMEOUT):
            log.warning("the forwarding thread did not take a change within %.0f s",
                        UPDATE_TIMEOUT)

    def _broadcast(self, kind: int, payload: bytes, table: PeerTable | None) -> None:
        snapshot = encode_table(table) if table is not None else b""
        for channel in self._channels:
            channel.send(kind, payload)
        deadline = time.monotonic() + UPDATE_TIMEOUT
        for channel in self._channels:
            answer = channel.wait_ack(deadline)
            if answer == _ACK_RESYNC and table is not None:
                # The worker missed a generation: give it the whole table.
                channel.send(_KIND_TABLE, snapshot)
                answer = channel.wait_ack(deadline)
            if answer is None:
                log.warning("a queue worker did not take a change within %.0f s",
                            UPDATE_TIMEOUT)

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
        for channel in self._channels:
            channel.close()
        self._channels = []
        self._pump = None

    def close(self) -> None:
        """Stop, close the sockets and the device (which removes it, its addresses, routes)."""
        self.stop()
        for sock in self.sockets:
            sock.close()
        self.sockets = []
        for link in self._raw_links:
            link.close()
        self._raw_links = []
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
        table = self.table
        return {
            "tunnel": {
                "device": config.dev,
                "local": [str(endpoint) for endpoint in config.locals()],
                "remote": str(config.remote) if config.remote is not None else None,
                "peers": len(table),
                "generation": table.generation,
                "serves": ("any" if table.local_destinations is None
                           else [str(p) for p in table.local_destinations]),
                "mtu": self.mtu,
                "framing": config.framing if self.chunk else "packet",
                "gso_max_size": self.gso_max_size,
                "queues": config.queues,
                "rewrites": [f"src {m}" for m in self.rewrites.src]
                + [f"dst {m}" for m in self.rewrites.dst]
                + [f"src {m}" for m in self.rewrites.src_prefixes]
                + [f"dst {m}" for m in self.rewrites.dst_prefixes],
                "uptime_s": round(time.monotonic() - self._started, 1),
                "running": self.alive(),
            },
            "counters": self.counters().as_dict(),
            "control_plane": dict(self._control_counts),
            "raw": self._raw_status(),
        }

    def _raw_status(self) -> dict[str, Any]:
        """The raw link's own counters (those of this process's queue; workers keep theirs)."""
        links = self._raw_links if self._forwarder is not None else []
        malformed: dict[str, int] = {}
        for link in links:
            for reason, count in link.malformed.items():
                malformed[reason] = malformed.get(reason, 0) + count
        return {"send_errors": sum(link.send_errors for link in links),
                "receive_errors": sum(link.receive_errors for link in links),
                "malformed": malformed}

    def peer_counters_of(self, name: str) -> dict[str, int]:
        """The counters of peer `name`, summed over the queues."""
        slot = self.table.slots.get(name)
        if slot is None:
            raise ConfigError(f"no peer named {name!r}")
        return self.peer_counters.read(slot)

    def peers_status(self) -> dict[str, Any]:
        """Every peer with its counters (`ipshift tunnel peers`)."""
        counters = self.counters()
        return {
            "generation": self.table.generation,
            "peers": [dict(peer.as_dict(), counters=self.peer_counters_of(peer.name))
                      for peer in self.table],
            "drops": {"no_peer": counters.no_peer, "unknown_endpoint": counters.foreign,
                      "foreign_source": counters.foreign_source,
                      "foreign_destination": counters.foreign_destination,
                      "malformed": counters.malformed, "auth_refused": counters.auth_refused,
                      "reports_refused": counters.reports_refused},
        }


def initial_table(config: TunnelConfig) -> PeerTable:
    """The peer table a tunnel starts with. A --remote tunnel has one peer, which owns the
    --route prefixes and the subnets of the --address entries (and may send from those, and
    from what --rewrite-dst maps back); inbound packets must be addressed to the device's
    addresses, the --serve prefixes or what --rewrite-src maps back (with `serve` None: to
    anything)."""
    serve: tuple[IPNetwork, ...] | None = None
    if config.serve is not None:
        own = tuple(ipaddress.ip_network(a.ip) for a in config.addresses)
        mapped = tuple(ipaddress.ip_network(m.old) for m in config.rewrite_src)
        serve = tuple(dict.fromkeys(own + mapped + tuple(config.serve)))
    if config.remote is None:
        return PeerTable(config.peers, local_destinations=serve)
    prefixes = tuple(dict.fromkeys(
        tuple(config.routes) + tuple(a.network for a in config.addresses)))
    extra = tuple(ipaddress.ip_network(m.old) for m in config.rewrite_dst
                  if not any(m.old in p for p in prefixes))
    peer = Peer(PEER_NAME, config.remote, prefixes=prefixes, extra_sources=extra)
    return PeerTable([peer], local_destinations=serve)


# Messages from the daemon to a queue worker: length (4 bytes), kind (1 byte), payload. The
# worker answers each with 1 byte: applied, or "send a snapshot".
_FRAME = struct.Struct(">IB")
_KIND_TABLE = 1  # encode_table / encode_delta bytes
_KIND_REWRITE = 2  # RewriteRules.as_dict() as JSON
_KIND_HOOK_STATE = 3  # JSON for Hooks.on_state
_KIND_DIVERTED = 4  # worker -> daemon: a packet a hook diverted (_EVENT, name, packet)
_EVENT = struct.Struct(">BB")  # peer name length, inbound
_ACK_APPLIED = b"\x01"
_ACK_RESYNC = b"\x02"
_ACK_FAILED = b"\x03"
MAX_MESSAGE = 64 << 20


class _WorkerChannel:
    """The pipes between the daemon and one queue worker."""

    def __init__(self) -> None:
        self.to_worker_r, self.to_worker_w = os.pipe2(os.O_CLOEXEC)
        self.to_parent_r, self.to_parent_w = os.pipe2(os.O_CLOEXEC)
        # Packets diverted by the worker's hooks (non-blocking: a full pipe drops them).
        self.events_r, self.events_w = os.pipe2(os.O_CLOEXEC)
        os.set_blocking(self.events_w, False)

    def parent_side(self) -> None:
        """In the daemon after the fork: close the worker's ends."""
        for fd in (self.to_worker_r, self.to_parent_w, self.events_w):
            os.close(fd)
        self.to_worker_r = self.to_parent_w = self.events_w = -1

    def diverted(self, peer: Peer, direction: str, packet: bytes) -> None:
        """In the worker: pass a packet a hook diverted up to the daemon (best effort)."""
        name = peer.name.encode()
        body = _EVENT.pack(len(name), direction == INBOUND) + name + packet
        try:
            os.write(self.events_w, _FRAME.pack(len(body), _KIND_DIVERTED) + body)
        except (BlockingIOError, OSError):
            log.debug("control pipe full: a diverted packet of %s dropped", peer.name)

    def send(self, kind: int, payload: bytes) -> None:
        data = memoryview(_FRAME.pack(len(payload), kind) + payload)
        while data:
            data = data[os.write(self.to_worker_w, data):]

    def wait_ack(self, deadline: float) -> bytes | None:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not select.select([self.to_parent_r], [], [], remaining)[0]:
            return None
        answer = os.read(self.to_parent_r, 1)
        return answer or None

    def close(self) -> None:
        for fd in (self.to_worker_r, self.to_worker_w, self.to_parent_r, self.to_parent_w,
                   self.events_r, self.events_w):
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self.to_worker_r = self.to_worker_w = self.to_parent_r = self.to_parent_w = -1
        self.events_r = self.events_w = -1


class _EventReader:
    """Frames of diverted packets from one worker, as they arrive."""

    def __init__(self) -> None:
        self.buffer = bytearray()

    def feed(self, data: bytes) -> list[tuple[str, str, bytes]]:
        self.buffer += data
        out = []
        while len(self.buffer) >= _FRAME.size:
            length, _kind = _FRAME.unpack_from(self.buffer)
            if len(self.buffer) < _FRAME.size + length:
                break
            body = bytes(self.buffer[_FRAME.size:_FRAME.size + length])
            del self.buffer[:_FRAME.size + length]
            size, inbound = _EVENT.unpack_from(body)
            name = body[_EVENT.size:_EVENT.size + size].decode(errors="replace")
            out.append((name, INBOUND if inbound else OUTBOUND, body[_EVENT.size + size:]))
        return out


class _WorkerInbox:
    """The worker's end of its channel: reads frames as they come and applies them to its
    pump between two reads (it runs on the forwarding thread, as a Forwarder reader)."""

    def __init__(self, channel: _WorkerChannel, pump: QueuePump, daemon: TunnelDaemon,
                 counters: Counters) -> None:
        self.fd = channel.to_worker_r
        self.reply = channel.to_parent_w
        self.control = channel.diverted
        self.pump = pump
        self.daemon = daemon
        self.counters = counters
        self.buffer = bytearray()
        os.set_blocking(self.fd, False)

    def readable(self) -> None:
        try:
            data = os.read(self.fd, 1 << 20)
        except BlockingIOError:
            return
        if not data:
            return  # the daemon is gone; PR_SET_PDEATHSIG ends us
        self.buffer += data
        while len(self.buffer) >= _FRAME.size:
            length, kind = _FRAME.unpack_from(self.buffer)
            if length > MAX_MESSAGE or len(self.buffer) < _FRAME.size + length:
                break
            payload = bytes(self.buffer[_FRAME.size:_FRAME.size + length])
            del self.buffer[:_FRAME.size + length]
            os.write(self.reply, self._apply(kind, payload))

    def _apply(self, kind: int, payload: bytes) -> bytes:
        pump = self.pump
        try:
            if kind == _KIND_TABLE:
                message = decode_message(payload)
                table = message if isinstance(message, PeerTable) else pump.table.apply(message)
                pump.set_table(table)
            elif kind == _KIND_REWRITE:
                rules = RewriteRules.from_dict(json.loads(payload))
                self.daemon.rewrites = rules
                self.daemon.rewriter = AddressRewriter.of(rules)
                pump.hooks = self.daemon._hooks(self.counters, self.control)
            elif kind == _KIND_HOOK_STATE:
                hooks = self.daemon.component_hooks
                if hooks is not None and hooks.on_state is not None:
                    hooks.on_state(json.loads(payload))
        except GenerationError:
            return _ACK_RESYNC
        except (PeerCodecError, ConfigError, ValueError) as exc:
            log.error("queue worker refused a change: %s", exc)
            return _ACK_FAILED
        return _ACK_APPLIED


def _worker_main(daemon: TunnelDaemon, index: int, channel: _WorkerChannel,
                 parent: int) -> None:
    """A queue's worker process: forward until SIGTERM (also sent when the daemon dies, even
    by kill -9: the worker holds a queue of the device, which would outlive it), publishing
    counters and taking changes from its channel."""
    _die_with_parent(parent)
    signal.set_wakeup_fd(-1)  # the parent's asyncio wake-up fd is not ours
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the parent, which stops us
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    os.close(channel.to_worker_w)
    os.close(channel.to_parent_r)
    os.close(channel.events_r)
    counters = Counters()
    pump = daemon._pump_for(index, counters, control=channel.diverted)
    forwarder = Forwarder([pump])
    inbox = _WorkerInbox(channel, pump, daemon, counters)
    forwarder.add_reader(inbox.fd, inbox.readable)
    signal.signal(signal.SIGTERM, lambda signum, frame: forwarder.stop())
    shared = daemon._shared
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
        far = str(config.remote) if config.remote is not None else f"{len(daemon.table)} peers"
        log.info("tunnel %s up: %s <-> %s, MTU %d, %d queue(s)", config.dev,
                 " ".join(str(e) for e in config.locals()), far, daemon.mtu, config.queues)
        for name, handler in (("peers", self._peers), ("peer-set", self._peer_set),
                              ("peer-remove", self._peer_remove),
                              ("peers-replace", self._peers_replace),
                              ("peers-load", self._peers_load),
                              ("rewrites", self._rewrites)):
            rt.method(name, _refusing(handler))

    # --- control methods ----------------------------------------------------------------------
    def _live(self) -> TunnelDaemon:
        if self.daemon is None:
            raise ConfigError("the tunnel is not running")
        return self.daemon

    def _peers(self, params: Mapping[str, Any]) -> dict[str, Any]:
        return self._live().peers_status()

    def _peer_set(self, params: Mapping[str, Any]) -> dict[str, Any]:
        daemon = self._live()
        peer = _peer_from(params.get("peer"), params.get("key_file"))
        added = peer.name not in daemon.table
        generation = daemon.update_peers([peer])
        log.info("peer %s %s (generation %d)", peer.name, "added" if added else "updated",
                 generation)
        return {"generation": generation, "added": added}

    def _peer_remove(self, params: Mapping[str, Any]) -> dict[str, Any]:
        name = params.get("name")
        if not isinstance(name, str):
            raise ConfigError("peer-remove needs the peer's name")
        generation = self._live().update_peers(removals=[name])
        log.info("peer %s removed (generation %d)", name, generation)
        return {"generation": generation}

    def _peers_replace(self, params: Mapping[str, Any]) -> dict[str, Any]:
        entries = params.get("peers")
        key_files = params.get("key_files") or {}
        if not isinstance(entries, list) or not isinstance(key_files, dict):
            raise ConfigError("peers-replace needs a list of peers (and a map of key files)")
        peers = [_peer_from(entry, key_files.get(entry.get("name"))
                            if isinstance(entry, dict) else None) for entry in entries]
        generation = self._live().replace_peers(peers)
        log.info("peers replaced: %d peers (generation %d)", len(peers), generation)
        return {"generation": generation}

    def _peers_load(self, params: Mapping[str, Any]) -> dict[str, Any]:
        # The daemon reads the file itself: a request is at most 64 KiB, a file of thousands
        # of peers is not, and the key files it names are the daemon's to read anyway.
        path = params.get("path")
        if not isinstance(path, str) or not os.path.isabs(path):
            raise ConfigError("peers-load needs the peers file's absolute path")
        peers = load_peers(path)
        if not peers:
            raise ConfigError(f"{path} lists no peers; a tunnel keeps at least one")
        generation = self._live().replace_peers(peers)
        log.info("peers of %s in force: %d peers (generation %d)", path, len(peers), generation)
        return {"generation": generation, "peers": len(peers)}

    def _rewrites(self, params: Mapping[str, Any]) -> dict[str, Any]:
        daemon = self._live()
        if params.get("rules") is not None:
            rules = params["rules"]
            if not isinstance(rules, dict):
                raise ConfigError("rewrites: rules must be an object of lists")
            daemon.set_rewrites(RewriteRules.from_dict(rules))
        return {"rules": daemon.rewrites.as_dict()}

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
        metrics = [counter(f"ipshift_tunnel_{name}", value,
                           f"tunnel {name.replace('_', ' ')}", dev=dev)
                   for name, value in self.daemon.counters().as_dict().items()
                   if name != "table_generation"]
        table = self.daemon.table
        metrics.append(gauge("ipshift_tunnel_peers", len(table), "peers in the table", dev=dev))
        metrics.append(gauge("ipshift_tunnel_table_generation", table.generation,
                             "peer table generation", dev=dev))
        # Per peer, for the first peers only: a scrape of 10,000 peers x 16 series would
        # cost more than it tells (`ipshift tunnel peers` has them all).
        for peer in itertools.islice(table, METRIC_PEERS):
            for name, value in self.daemon.peer_counters_of(peer.name).items():
                metrics.append(counter(f"ipshift_tunnel_peer_{name}", value,
                                       f"tunnel peer {name.replace('_', ' ')}", dev=dev,
                                       peer=peer.name))
        return metrics


def _refusing(handler: Callable[[Mapping[str, Any]], Any]) -> Callable[[dict[str, Any]], Any]:
    """A control method whose ConfigError is the client's one-line answer, not a failure."""
    def method(params: dict[str, Any]) -> Any:
        try:
            return handler(params)
        except ConfigError as exc:
            raise CtlError("refused", str(exc)) from exc

    return method


def _peer_from(entry: object, key_file: object) -> Peer:
    """A peer from a control request: its description and, optionally, its key file."""
    if not isinstance(entry, dict):
        raise ConfigError("a peer is an object with name, endpoint, encapsulation, ...")
    if key_file is not None and not isinstance(key_file, str):
        raise ConfigError("key_file must be a path")
    key = auth.read_key_file(key_file) if key_file else None
    return Peer.from_dict(entry, key=key)


def run_daemon(config: TunnelConfig, *, socket_path: Path | None,
               metrics: str | None = None) -> int:
    """Foreground tunnel for the CLI: until SIGTERM/SIGINT or `ipshift tunnel stop`."""
    return run_service(TunnelService(config), DaemonOptions(socket=socket_path, metrics=metrics))
