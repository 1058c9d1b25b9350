"""The RSIP gateway as a daemon (`rsipd`, `ipshift rsip server`): a runtime Service.

It owns: the control sockets (TCP and UDP, port 4555, on INT_IF's address only), the tunnel
device and its sockets (ipshift.tunnel, every client a peer), the owned nft table and the
rule and route that divert leased ports into the tunnel (ipshift.rsip.kernel), the lease
file (SQLite; it outlives the daemon on purpose: a restart keeps every lease), the status
file written on SIGUSR1, and the PCP/NAT-PMP responder when PCP=yes.

Feeding the engine and applying its actions is all it does: Send -> a socket, ClientRoutes ->
tunnel peers and nft set elements, Persist -> the store (batched, twice a second), Note -> the
log.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import socket
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ipshift.daemon import (
    NFT_TABLE,
    ROUTE_PROTOCOL,
    TUN_DEVICE,
    DaemonOptions,
    EnginePump,
    Metric,
    Runtime,
    StartError,
    close_watched,
    counter,
    gauge,
    run_service,
)
from ipshift.net import sysctl
from ipshift.net.errors import NetError
from ipshift.net.netlink import Netlink
from ipshift.net.netlink.watch import KernelWatcher
from ipshift.net.nft import Nft
from ipshift.rsip import kernel, wire
from ipshift.rsip.config import GatewayConfig, python_log_level
from ipshift.rsip.gateway import (
    UDP_TUNNEL,
    ClientRoute,
    ClientRoutes,
    GatewayEngine,
    GatewaySettings,
    Note,
    Origin,
    Persist,
    Send,
    tunnel_name,
)
from ipshift.rsip.leases import Client, LeasePolicy, Leases
from ipshift.rsip.store import LeaseStore, StoreError
from ipshift.tunnel.config import Endpoint, TunnelConfig
from ipshift.tunnel.daemon import TunnelDaemon, TunnelError
from ipshift.tunnel.peers import Encapsulation, Peer, PortRange

log = logging.getLogger("ipshift.rsip")

SAVE_INTERVAL = 0.5       # seconds between lease-file writes
ROUTE_BATCH = 0.005       # seconds data-plane changes gather before one tunnel and nft update
MAX_CONNECTIONS = 1024    # TCP control connections at once
MAX_PER_HOST = 4          # ... from one host
READ_SIZE = 65536
_PROTOCOLS = (socket.IPPROTO_TCP, socket.IPPROTO_UDP, socket.IPPROTO_ICMP)
_TUNNEL_KINDS = {"udp": UDP_TUNNEL, "ipip": wire.TunnelType.IP_IP, "gre": wire.TunnelType.GRE}


def _elements(route: ClientRoute | None) -> tuple[set[str], set[str]]:
    """A client's nft elements: its port leases and its whole addresses."""
    if route is None:
        return set(), set()
    return ({kernel.lease_element(lease.address, lease.first, lease.last)
             for lease in route.leases if not lease.whole},
            {str(lease.address) for lease in route.leases if lease.whole})


def tunnel_device(name: str) -> str:
    return f"rsipd-{name}"[:15]


def peer_of(route: ClientRoute) -> Peer:
    """A client as a tunnel peer: its leased ports (TCP, UDP and ICMP echo identifiers) and
    whole addresses are its; it may send from nothing else."""
    host = ipaddress.ip_address(route.host)
    if route.tunnel == UDP_TUNNEL:
        endpoint, encapsulation = Endpoint(host, route.tunnel_port), Encapsulation.UDP
    elif route.tunnel == wire.TunnelType.GRE:
        endpoint, encapsulation = Endpoint(host, 0), Encapsulation.GRE
    else:
        endpoint, encapsulation = Endpoint(host, 0), Encapsulation.IPIP
    ranges = tuple(PortRange(lease.address, proto, lease.first, lease.last)
                   for lease in route.leases if not lease.whole for proto in _PROTOCOLS)
    addresses = tuple(dict.fromkeys(lease.address for lease in route.leases if lease.whole))
    return Peer(tunnel_name(route.client_id), endpoint, encapsulation,
                addresses=addresses, port_ranges=ranges)


class GatewayService:
    component = "rsip"
    adopts = frozenset({TUN_DEVICE})

    def __init__(self, config: GatewayConfig) -> None:
        self.config = config
        self.instance = config.name
        self.netns = config.netns
        self.engine: GatewayEngine | None = None
        self.tunnel: TunnelDaemon | None = None
        self.store: LeaseStore | None = None
        self.diversion: kernel.Diversion | None = None
        self.responder: Any = None
        self.internal: ipaddress.IPv4Interface | None = None
        self.internal6: ipaddress.IPv6Address | None = None  # hosts on an IPv6 inside
        self.own: ipaddress.IPv4Address | None = None
        self._rt: Runtime | None = None
        self._pump: EnginePump | None = None
        self._nft: Nft | None = None
        self._routes: dict[int, ClientRoute] = {}
        self._changed: dict[int, ClientRoute | None] = {}  # data-plane changes not yet applied
        self._held: list[Send] = []                        # answers waiting for them
        self._route_flush: asyncio.TimerHandle | None = None
        self._watcher: KernelWatcher | None = None  # EXT_IF's address
        self._pending: dict[int, Client] = {}
        self._pending_removed: set[int] = set()
        self._connections: dict[int, asyncio.StreamWriter] = {}
        self._next_connection = 1
        self._udp: dict[int, asyncio.DatagramTransport] = {}  # by address family
        self._tcp: list[asyncio.AbstractServer] = []
        self._routing = False
        self.counters = {"send_failed": 0, "refused_connections": 0, "peer_update_failed": 0,
                         "async_undeliverable": 0}

    # --- start ---------------------------------------------------------------------------------
    async def start(self, rt: Runtime) -> None:
        self._rt = rt
        config = self.config
        logging.getLogger("ipshift.rsip").setLevel(python_log_level(config.log_level))
        self.internal, self.internal6, self.own, local_nets = self._interfaces()
        pool = config.pool or (self.own,)
        self._warn_port_conflict()
        try:
            policy = LeasePolicy(pool=pool, port_range=config.port_range,
                                 listen_range=config.listen_range, block=config.block,
                                 max_clients=config.max_clients,
                                 register_lease=config.lease_time, bind_lease=config.lease_time,
                                 whole_addresses=config.rsa_ip, own=(self.own,))
        except ValueError as exc:
            raise StartError(str(exc)) from exc
        tunnels = tuple(_TUNNEL_KINDS[t] for t in config.tunnels)
        self.engine = GatewayEngine(Leases(policy), GatewaySettings(
            tunnel_port=config.tunnel_port, tunnels=tunnels, local_networks=local_nets,
            rsa_ip=config.rsa_ip))
        try:
            self.store = LeaseStore(config.lease_file)
        except StoreError as exc:
            raise StartError(str(exc)) from exc
        self._open_tunnel(rt)
        self._open_kernel(rt)
        loop = asyncio.get_running_loop()
        self._pump = EnginePump(loop, self.engine, self._apply)
        clients = self.store.load(loop.time(), time.time())
        self.engine.restore(clients, loop.time())
        self._pump.run()
        if self._route_flush is not None:
            self._flush_routes()  # the data plane of every lease before the first answer
        if clients:
            log.info("took back %d clients and %d binds from %s", len(self.engine.leases.clients),
                     sum(1 for _ in self.engine.leases.binds()), config.lease_file)
        await self._open_control(loop)
        if config.pcp:
            await self._start_responder(rt)
        self._watch_external(loop)
        rt.every(SAVE_INTERVAL, self._save, "writing the lease file")
        rt.every(1.0, self._check_tunnel, "watching the tunnel")
        rt.method("dump", lambda params: self.write_status_file())
        rt.method("leases", lambda params: {"binds": self._rows()})
        log.info("rsip gateway on %s (%s), public %s, %d pool address(es), ports %d-%d, "
                 "listen %d-%d, tunnels %s", config.int_if, self.internal.ip,
                 config.ext_if, len(pool), *config.port_range, *config.listen_range,
                 " ".join(config.tunnels))

    def _interfaces(self) -> tuple[ipaddress.IPv4Interface, ipaddress.IPv6Address | None,
                                   ipaddress.IPv4Address, tuple[ipaddress.IPv4Network, ...]]:
        config = self.config
        try:
            with Netlink(config.netns) as nl:
                internal = [a for a in nl.addresses(config.int_if, socket.AF_INET)]
                external = [a for a in nl.addresses(config.ext_if, socket.AF_INET)]
                inside6 = [ipaddress.IPv6Address(a.address)
                           for a in nl.addresses(config.int_if, socket.AF_INET6)
                           if not ipaddress.IPv6Address(a.address).is_link_local]
        except NetError as exc:
            raise StartError(f"cannot read the addresses of {config.int_if} and "
                             f"{config.ext_if}: {exc}") from exc
        if not internal:
            raise StartError(f"INT_IF {config.int_if} has no IPv4 address (or does not "
                             "exist): clients reach the gateway there")
        if not external:
            raise StartError(f"EXT_IF {config.ext_if} has no IPv4 address (or does not "
                             "exist): its address is the public one leased out")
        inside = ipaddress.IPv4Interface(f"{internal[0].address}/{internal[0].prefixlen}")
        own = ipaddress.IPv4Address(external[0].address)
        nets = tuple(ipaddress.IPv4Interface(f"{a.address}/{a.prefixlen}").network
                     for a in internal)
        return inside, (inside6[0] if inside6 else None), own, nets

    def _watch_external(self, loop: asyncio.AbstractEventLoop) -> None:
        """Follow EXT_IF's address: a new public address (DHCP, PPP) moves the PCP mappings
        (clients told with a new epoch); RSIP leases of an address the gateway lost are said
        to be stranded, since POOL is the configuration's."""
        try:
            watcher = KernelWatcher(self.config.netns, ("link", "address"))
        except NetError as exc:
            log.warning("cannot watch %s's address: %s", self.config.ext_if, exc)
            return
        watcher.on_addresses_changed(self.config.ext_if, self._external_changed)
        loop.add_reader(watcher.fileno(), watcher.read)
        self._watcher = watcher

    def _external_changed(self, dev: str, addresses: Sequence[Any]) -> None:
        v4 = [ipaddress.IPv4Address(a.address) for a in addresses if ":" not in a.address]
        new = v4[0] if v4 else None
        if new == self.own or (new is None and self.own is None):
            return
        old, self.own = self.own, new
        if new is None:
            log.warning("EXT_IF %s lost its address %s: Internet traffic of every client "
                        "stops until it comes back", dev, old)
        else:
            log.warning("EXT_IF %s's address changed from %s to %s", dev, old, new)
        if self.engine is None:
            return
        pool = self.engine.leases.policy.pool
        if old is not None:
            stranded = sum(1 for bind in self.engine.leases.binds() if bind.address == old)
            if stranded:
                log.warning("%d bind(s) lease %s, which EXT_IF no longer has: their hosts "
                            "reach nothing until it returns", stranded, old)
        if new is not None and new not in pool:
            log.warning("%s is not in POOL (%s): list it there and restart to lease it",
                        new, ", ".join(map(str, pool)))
        if self.responder is not None and (new is None or new in pool):
            self.responder.external_address_changed(new)

    def _warn_port_conflict(self) -> None:
        try:
            low, high = (int(v) for v in sysctl.read("net.ipv4.ip_local_port_range",
                                                     self.config.netns).split())
        except (NetError, ValueError, OSError):
            return
        first, last = self.config.port_range
        if first <= high and low <= last:
            log.warning("Conflict with the local ports %d-%d of the gateway itself: PORT_RANGE "
                        "%d-%d overlaps them; a port could be used twice. Set PORT_RANGE "
                        "apart from net.ipv4.ip_local_port_range", low, high, first, last)

    def _open_tunnel(self, rt: Runtime) -> None:
        assert self.internal is not None
        dev = tunnel_device(self.config.name)
        rt.record.settled(TUN_DEVICE)
        tunnel = TunnelDaemon(TunnelConfig(
            dev=dev, local=Endpoint(self.internal.ip, self.config.tunnel_port), dynamic=True,
            extra_local=(Endpoint(self.internal6, self.config.tunnel_port)
                         if self.internal6 is not None else None),
            serve=None, mtu=self.config.mtu, netns=self.config.netns))
        try:
            tunnel.open()
            rt.record.add(TUN_DEVICE, dev)
            kernel.prepare_tunnel_device(dev, self.config.netns)
            tunnel.start()
        except (TunnelError, NetError, OSError) as exc:
            tunnel.close()
            rt.record.discard(TUN_DEVICE, dev)
            raise StartError(f"Unable to create tunnel: {exc}") from exc
        self.tunnel = tunnel
        if kernel.strict_rp_filter(self.config.netns):
            log.warning("net.ipv4.conf.all.rp_filter is 1 (strict): packets from RSIP hosts "
                        "carry the gateway's own address and will be dropped; set it to 2")

    def _open_kernel(self, rt: Runtime) -> None:
        dev = tunnel_device(self.config.name)
        self._nft = Nft(self.config.netns)
        table = kernel.owned_table(self._nft, self.config.name)
        rt.record.add(NFT_TABLE, table.spec)
        rt.record.add(ROUTE_PROTOCOL, str(kernel.PROTOCOL))
        self.diversion = kernel.Diversion(table, dev)
        try:
            self.diversion.install()
            with Netlink(self.config.netns) as nl:
                kernel.install_routing(nl, dev)
            self._routing = True
            sysctl.write("net.ipv4.ip_forward", 1, self.config.netns)
        except (NetError, OSError) as exc:
            raise StartError(f"cannot divert leased ports to the tunnel: {exc}") from exc

    async def _open_control(self, loop: asyncio.AbstractEventLoop) -> None:
        """TCP and UDP on INT_IF's addresses only (and its IPv6 one, if it has one)."""
        assert self.internal is not None
        addresses = [str(self.internal.ip)]
        if self.internal6 is not None:
            addresses.append(str(self.internal6))
        for host in addresses:
            address = (host, self.config.port)
            try:
                udp_sock = _bound(socket.SOCK_DGRAM, address, self.config.int_if)
                tcp_sock = _bound(socket.SOCK_STREAM, address, self.config.int_if)
                tcp_sock.listen(128)
            except OSError as exc:
                raise StartError(f"cannot listen on {host} port {address[1]}: "
                                 f"{exc.strerror} (another rsipd? change PORT)") from exc
            transport, _ = await loop.create_datagram_endpoint(
                lambda: _UdpControl(self), sock=udp_sock)
            self._udp[udp_sock.family] = transport
            self._tcp.append(await asyncio.start_server(self._serve_connection, sock=tcp_sock))

    async def _start_responder(self, rt: Runtime) -> None:
        from ipshift.rsip.responder import PcpResponder, responder_config

        assert self.engine is not None and self.own is not None and self.internal is not None
        responder = PcpResponder(responder_config(self.config, self.own, self.internal),
                                 self.engine.leases)
        await responder.start(rt)
        self.responder = responder

    # --- control traffic -----------------------------------------------------------------------
    def datagram(self, data: bytes, source: tuple[str, int]) -> None:
        assert self.engine is not None and self._pump is not None
        self.engine.receive(data, Origin("udp", source[0], source[1]), self._pump.now())
        self._pump.run()

    async def _serve_connection(self, reader: asyncio.StreamReader,
                                writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        host, port = str(peer[0]), int(peer[1])
        same_host = sum(1 for w in self._connections.values()
                        if w.get_extra_info("peername")[0] == host)
        if len(self._connections) >= MAX_CONNECTIONS or same_host >= MAX_PER_HOST:
            self.counters["refused_connections"] += 1
            writer.close()
            return
        number = self._next_connection
        self._next_connection += 1
        self._connections[number] = writer
        origin = Origin("tcp", host, port, number)
        stream = wire.StreamReader()
        try:
            while not stream.broken:
                data = await reader.read(READ_SIZE)
                if not data:
                    break
                assert self.engine is not None and self._pump is not None
                for item in stream.feed(data):
                    self.engine.receive(item, origin, self._pump.now())
                self._pump.run()
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            self._connections.pop(number, None)
            writer.close()

    # --- actions -------------------------------------------------------------------------------
    def _apply(self, actions: Sequence[Any]) -> None:
        # answers go once the data plane is as they say (a bind there, an expired one gone)
        hold = self._route_flush is not None or any(isinstance(a, ClientRoutes)
                                                    for a in actions)
        for action in actions:
            if isinstance(action, Send):
                if hold:
                    self._held.append(action)
                else:
                    self._send(action)
            elif isinstance(action, ClientRoutes):
                self._route(action)
            elif isinstance(action, Persist):
                for client in action.clients:
                    self._pending[client.client_id] = client
                    self._pending_removed.discard(client.client_id)
                for client_id in action.removed:
                    self._pending.pop(client_id, None)
                    self._pending_removed.add(client_id)
            elif isinstance(action, Note):
                log.log(logging.DEBUG if action.level == "debug" else
                        logging.WARNING if action.level == "warning" else logging.INFO,
                        "%s", action.text)

    def _send(self, action: Send) -> None:
        data = wire.encode(action.message)
        origin = action.origin
        try:
            if origin.transport == "udp":
                family = socket.AF_INET6 if ":" in origin.host else socket.AF_INET
                self._udp[family].sendto(data, (origin.host, origin.port))
                return
            writer = self._connections.get(origin.connection)
            if writer is None or writer.is_closing():
                self.counters["async_undeliverable"] += 1
                return
            writer.write(data)
        except OSError:
            self.counters["send_failed"] += 1

    def _route(self, action: ClientRoutes) -> None:
        """Gather data-plane changes for ROUTE_BATCH: each costs a new peer table (and its
        nft elements) however small it is, so a burst of registrations is applied at once.
        Answers sent meanwhile wait for it, so a host never uses a bind the tunnel does not
        know yet."""
        for route in action.routes:
            self._changed[route.client_id] = route if route.leases else None
        for client_id in action.removed:
            self._changed[client_id] = None
        if self._route_flush is None:
            self._route_flush = asyncio.get_running_loop().call_later(ROUTE_BATCH,
                                                                      self._flush_routes)

    def _flush_routes(self) -> None:
        assert self.tunnel is not None and self.diversion is not None
        if self._route_flush is not None:
            self._route_flush.cancel()
            self._route_flush = None
        changed, self._changed = self._changed, {}
        upserts: list[Peer] = []
        removals: list[str] = []
        add: set[str] = set()
        remove: set[str] = set()
        add_whole: set[str] = set()
        remove_whole: set[str] = set()
        for client_id, route in changed.items():
            old = self._routes.get(client_id)
            if old == route:
                continue
            old_ports, old_whole = _elements(old)
            new_ports, new_whole = _elements(route)
            remove |= old_ports - new_ports
            add |= new_ports - old_ports
            remove_whole |= old_whole - new_whole
            add_whole |= new_whole - old_whole
            if route is not None:
                self._routes[client_id] = route
                upserts.append(peer_of(route))
            else:
                del self._routes[client_id]
                removals.append(tunnel_name(client_id))
        if upserts or removals:
            try:
                self.tunnel.update_peers(upserts, removals)
            except (ValueError, TunnelError, NetError) as exc:
                self.counters["peer_update_failed"] += 1
                log.warning("cannot update the tunnel's clients: %s", exc)
        try:
            self.diversion.change(add, remove, add_whole, remove_whole)
        except NetError as exc:
            log.warning("cannot update the diverted ports: %s", exc)
        held, self._held = self._held, []
        for send in held:
            self._send(send)

    def _save(self) -> None:
        if self.store is None or (not self._pending and not self._pending_removed):
            return
        assert self._pump is not None
        changed, removed = list(self._pending.values()), list(self._pending_removed)
        self._pending.clear()
        self._pending_removed.clear()
        self.store.save(changed, removed, self._pump.now(), time.time())

    def _check_tunnel(self) -> None:
        assert self.tunnel is not None and self._rt is not None
        if not self.tunnel.alive():
            self._rt.fail("the tunnel's forwarding stopped unexpectedly")
            return
        self.tunnel.follow_forwarding()

    # --- status --------------------------------------------------------------------------------
    def _rows(self) -> list[dict[str, Any]]:
        if self.engine is None or self._pump is None:
            return []
        return self.engine.status_rows(self._pump.now())

    def status_table(self) -> str:
        """The seed's status file: one line per bind."""
        lines = [f"RSIP server status file. {time.strftime('%a %b %d %H:%M:%S %Y')}",
                 f"{'Client':<16} {'Leased Address':<16} {'STATE':<9} {'ID':<5} {'BID':<5} "
                 f"{'LT':<5} {'RLT':<5} {'TUNNEL':<10} {'PROTO':<5} PORTS"]
        for row in self._rows():
            ports = (f"{row['first']}({row['count']})" if row["count"] == 1
                     else f"{row['first']}...({row['count']})")
            if row["kind"] == "address":
                ports = "*"
            lines.append(f"{row['client']:<16} {row['address']:<16} {row['state']:<9} "
                         f"{row['client_id']:05d} {row['bind_id']:05d} {row['lease_s']:05d} "
                         f"{row['registration_s']:05d} {row['tunnel']:<10} "
                         f"{row['transport']:<5} {ports}")
        return "\n".join(lines) + "\n"

    def write_status_file(self) -> dict[str, Any]:
        path = self.config.status_file
        try:
            path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
            tmp = path.with_name(path.name + ".tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
            with os.fdopen(fd, "w") as out:
                out.write(self.status_table())
            os.replace(tmp, path)
        except OSError as exc:
            log.warning("cannot write the status file %s: %s", path, exc)
            return {"written": None, "error": str(exc)}
        log.info("status written to %s", path)
        return {"written": str(path), "table": self.status_table()}

    def on_status_signal(self) -> None:
        """SIGUSR1 (the runtime calls this): the seed's status file."""
        self.write_status_file()

    def status(self) -> dict[str, Any]:
        engine = self.engine
        if engine is None:
            return {}
        counters = engine.counters
        status: dict[str, Any] = {
            "daemon": {"summary": f"{len(engine.leases.clients)} clients"},
            "gateway": {"int_if": self.config.int_if, "ext_if": self.config.ext_if,
                        "internal": str(self.internal), "public": str(self.own),
                        "internal6": str(self.internal6) if self.internal6 else None,
                        "pool": [str(a) for a in engine.leases.policy.pool],
                        "port_range": "-".join(map(str, self.config.port_range)),
                        "listen_range": "-".join(map(str, self.config.listen_range)),
                        "tunnel_port": self.config.tunnel_port,
                        "tunnels": list(self.config.tunnels),
                        "lease_file": str(self.config.lease_file)},
            "usage": engine.leases.usage(),
            "binds": self._rows(),
            "requests": dict(counters.requests), "errors": dict(counters.errors),
            "replayed": counters.replayed, "malformed": counters.malformed,
            "service": dict(self.counters),
        }
        if self.tunnel is not None:
            status["tunnel"] = {"device": self.tunnel.config.dev,
                                "counters": self.tunnel.counters().as_dict(),
                                "clients": {name: self.tunnel.peer_counters_of(name)
                                            for name in list(self.tunnel.table.peers)[:256]}}
        if self.responder is not None:
            status["pcp"] = self.responder.status()
        return status

    def metrics(self) -> list[Metric]:
        if self.engine is None:
            return []
        usage = self.engine.leases.usage()
        out = [gauge("rsip_clients", usage["clients"], "registered RSIP hosts"),
               gauge("rsip_binds", usage["binds"], "binds held"),
               gauge("rsip_ports", usage["ports"], "ports leased"),
               counter("rsip_malformed_total", self.engine.counters.malformed,
                       "malformed requests")]
        for name, value in self.engine.counters.requests.items():
            out.append(counter("rsip_requests_total", value, "requests by type", type=name))
        for name, value in self.engine.counters.errors.items():
            out.append(counter("rsip_errors_total", value, "error responses by code",
                               error=name))
        if self.responder is not None:
            out += list(self.responder.metrics())
        return out

    # --- stop ----------------------------------------------------------------------------------
    async def stop(self) -> None:
        close_watched(asyncio.get_running_loop(), self._watcher)
        self._watcher = None
        if self._route_flush is not None:
            self._flush_routes()  # the answers it holds still go out
        if self.responder is not None:
            await self.responder.stop()
            self.responder = None
        for server in self._tcp:
            server.close()
        for writer in list(self._connections.values()):
            writer.close()
        for transport in self._udp.values():
            transport.close()
        if self._pump is not None:
            self._pump.stop()
        try:
            self._save()
        except Exception as exc:  # the lease file must not keep the rest from going away
            log.warning("cannot write the lease file: %s", exc)
        if self.store is not None:
            self.store.close()
        rt = self._rt
        if self._routing:
            try:
                with Netlink(self.config.netns) as nl:
                    kernel.remove_routing(nl)
                if rt is not None:
                    rt.record.discard(ROUTE_PROTOCOL, str(kernel.PROTOCOL))
            except NetError as exc:
                log.warning("removing the rule into the tunnel: %s", exc)
        if self.diversion is not None:
            try:
                self.diversion.table.delete()
                if rt is not None:
                    rt.record.discard(NFT_TABLE, self.diversion.table.spec)
            except NetError as exc:
                log.warning("removing nftables table %s: %s", self.diversion.table.spec, exc)
        if self.tunnel is not None:
            self.tunnel.close()
            if rt is not None:
                rt.record.discard(TUN_DEVICE, self.tunnel.config.dev)
            self.tunnel = None
        if self._nft is not None:
            self._nft.close()


class _UdpControl(asyncio.DatagramProtocol):
    def __init__(self, service: GatewayService) -> None:
        self.service = service

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        self.service.datagram(data, (str(addr[0]), int(addr[1])))

    def error_received(self, exc: Exception) -> None:
        self.service.counters["send_failed"] += 1


def _bound(kind: socket.SocketKind, address: tuple[str, int], device: str) -> socket.socket:
    family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
    sock = socket.socket(family, kind)
    try:
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # only the internal side: a request arriving on EXT_IF never reaches this socket
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, device.encode())
        sock.bind(address)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


def run_daemon(config: GatewayConfig, *, socket_path: Path | None,
               metrics: str | None = None) -> int:
    from ipshift.daemon.runtime import default_socket

    return run_service(GatewayService(config), DaemonOptions(
        socket=socket_path or default_socket("rsip", config.name), metrics=metrics))
