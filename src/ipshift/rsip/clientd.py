"""The RSIP client as a daemon (`rsipclient`, `ipshift rsip client`): a runtime Service.

It feeds the engine (ipshift.rsip.client) from the control channel to the server (TCP, or a
connected UDP socket) and from a look at the listening sockets every second (sock_diag), and
applies its actions. What it owns while the tunnel is up:

- the tunnel device (`rsip0`, ipshift.tunnel: one peer, the gateway's tunnel endpoint, UDP
  framing when granted, else IP-IP or GRE) holding the leased address as a /32;
- routes 0.0.0.0/1 and 128.0.0.0/1 through it with the leased address as source (connected
  routes stay more specific, so the private network stays direct), and a /32 route pinning
  the server and the tunnel endpoint to the path they had when they are not on a connected
  network (a default route would otherwise lead them into the tunnel); all marked with
  routing protocol PROTOCOL;
- net.ipv4.ip_local_port_range narrowed to the leased block (the original value is in the
  owned-state record, so the next start restores it after a kill -9);
- the owned nft table `ip ipshift_rsipclient_DEV`, which keeps what leaves through the tunnel
  inside the leases: ICMP echo identifiers, and the source ports of new flows from ports no
  bind holds, are translated into the block.

Everything goes on SIGTERM after a FREE per bind and a DE-REGISTER; after a kill -9 the
device is gone with the process, the runtime removes the nft table and the routes, and the
next start restores the port range, then registers again (the gateway's ALREADY_REGISTERED
leads to a de-registration of the old client ID first).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass, field
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
    counter,
    gauge,
    run_service,
)
from ipshift.daemon.kernel import change_sysctl, restore_sysctl
from ipshift.net.errors import NetError
from ipshift.net.netlink import Netlink, Route
from ipshift.net.nft import Nft
from ipshift.net.nfttable import OwnedTable
from ipshift.net.sockdiag import TCP_LISTEN, SockDiag, SocketInfo
from ipshift.rsip import wire
from ipshift.rsip.client import (
    MIN_TUNNEL_MTU,
    MTU_PROBLEM,
    OVERHEAD,
    BindAdded,
    BindRemoved,
    ClientEngine,
    ClientSettings,
    Connect,
    Disconnect,
    Failed,
    ListenRefused,
    Note,
    Send,
    Stopped,
    TunnelDown,
    TunnelKind,
    TunnelUp,
    mtu_problem,
)
from ipshift.tunnel.config import ConfigError, Endpoint, TunnelConfig, check_interface_name
from ipshift.tunnel.daemon import TunnelDaemon, TunnelError
from ipshift.tunnel.peers import Encapsulation, Peer

log = logging.getLogger("ipshift.rsip.client")

COMPONENT = "rsipclient"
PROTOCOL = 75                 # routing protocol number of the client's routes
PORT_RANGE_KEY = "net.ipv4.ip_local_port_range"
INTERNET = ("0.0.0.0/1", "128.0.0.0/1")  # together all of IPv4, each less specific than
                                         # any connected route, more than a default route
PEER_NAME = "gateway"
START_TIMEOUT = 30.0          # seconds start waits for the tunnel to come up
CONNECT_TIMEOUT = 10.0
STOP_TIMEOUT = 5.0            # seconds the stop waits for FREE and DE-REGISTER answers
READ_SIZE = 65536
UDP_UNCONNECTED = 7           # sock_diag state of a bound, unconnected UDP socket
_WILDCARDS = (ipaddress.IPv4Address(0), ipaddress.IPv6Address(0))
_ENCAPSULATIONS = {TunnelKind.UDP: Encapsulation.UDP, TunnelKind.IPIP: Encapsulation.IPIP,
                   TunnelKind.GRE: Encapsulation.GRE}


@dataclass(frozen=True)
class ClientConfig:
    """One client: the server, the tunnel device and the engine's settings."""

    server: ipaddress.IPv4Address | None = None  # None: the default route's gateway
    port: int = wire.PORT
    dev: str = "rsip0"
    mtu: int | None = None                       # None: what the path to the gateway allows
    settings: ClientSettings = field(default_factory=ClientSettings)
    scan_interval: float = 1.0
    netns: str | None = None

    def __post_init__(self) -> None:
        if not 1 <= self.port <= 0xFFFF:
            raise ValueError(f"-p {self.port}: a port is 1-65535")
        try:
            check_interface_name(self.dev)
        except ConfigError as exc:
            raise ValueError(str(exc)) from exc
        if self.mtu is not None and not MIN_TUNNEL_MTU <= self.mtu <= 65535 - 64:
            raise ValueError(f"-m {self.mtu}: a tunnel MTU is {MIN_TUNNEL_MTU}-{65535 - 64}")
        if not 0.1 <= self.scan_interval <= 3600:
            raise ValueError(f"--scan-interval {self.scan_interval}: give 0.1-3600 seconds")
        if self.server is not None and (self.server.is_unspecified or self.server.is_multicast
                                        or self.server.is_loopback):
            raise ValueError(f"-s {self.server}: name the RSIP server's own address")


@dataclass
class _DataPlane:
    """What the tunnel's current values installed."""

    tunnel: TunnelDaemon
    address: ipaddress.IPv4Address
    endpoint: ipaddress.IPv4Address
    kind: TunnelKind
    udp_port: int
    mtu: int
    first: int
    last: int
    pinned: list[Route] = field(default_factory=list)


class ClientService:
    component = COMPONENT
    adopts = frozenset({TUN_DEVICE})  # a TUN device dies with the process that held it

    def __init__(self, config: ClientConfig) -> None:
        self.config = config
        self.instance = config.dev
        self.netns = config.netns
        self.engine: ClientEngine | None = None
        self.plane: _DataPlane | None = None
        self.local: ipaddress.IPv4Address | None = None  # our address toward the server
        self._rt: Runtime | None = None
        self._pump: EnginePump | None = None
        self._nft: Nft | None = None
        self._table: OwnedTable | None = None
        self._diag: SockDiag | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._udp: asyncio.DatagramTransport | None = None
        self._connection = 0  # number of the current control connection (stale ones ignored)
        self._started: asyncio.Future[Failed | None] | None = None
        self._stopped = asyncio.Event()
        self._used: dict[int, int] = {}  # bind ID -> sockets using its ports
        self.counters = {"send_failed": 0, "sockets_closed": 0, "scan_failed": 0,
                         "data_plane_errors": 0}

    # --- start ---------------------------------------------------------------------------------
    async def start(self, rt: Runtime) -> None:
        self._rt = rt
        rt.record.settled(TUN_DEVICE)  # gone with the process that held it
        server = self.config.server or self._default_gateway()
        loop = asyncio.get_running_loop()
        self.engine = ClientEngine(self.config.settings, server)
        self._pump = EnginePump(loop, self.engine, self._apply)
        self._nft = Nft(self.netns)
        self._table = OwnedTable(self._nft, "ip", COMPONENT, self.config.dev)
        try:
            self._diag = SockDiag(self.netns)
        except NetError as exc:
            raise StartError(f"cannot watch listening sockets: {exc}") from exc
        self._started = loop.create_future()
        self.engine.start(self._pump.now())
        self._pump.run()
        try:
            failure = await asyncio.wait_for(asyncio.shield(self._started), START_TIMEOUT)
        except TimeoutError:
            raise StartError(f"Unable to get port assignments! (no tunnel within "
                             f"{START_TIMEOUT:g} s; see the log)") from None
        if failure is not None:
            raise StartError(str(failure))
        rt.every(self.config.scan_interval, self._scan, "looking at listening sockets")
        rt.every(1.0, self._check_tunnel, "watching the tunnel")
        self._scan()

    def _default_gateway(self) -> ipaddress.IPv4Address:
        try:
            with Netlink(self.netns) as nl:
                routes = [r for r in nl.routes(family=socket.AF_INET, dst="0.0.0.0/0")
                          if r.gateway]
        except NetError as exc:
            raise StartError(f"cannot read the routes: {exc}") from exc
        if not routes:
            raise StartError("no RSIP server given and no default gateway to assume: give "
                             "-s SERVER")
        return ipaddress.IPv4Address(routes[0].gateway)

    # --- the control channel -------------------------------------------------------------------
    async def _connect(self) -> None:
        """Open the channel the engine asked for; tell it how that went."""
        assert self.engine is not None and self._pump is not None
        self._close_channel()
        self._connection += 1
        number = self._connection
        server = (str(self.engine.server), self.config.port)
        loop = asyncio.get_running_loop()
        try:
            if self.config.settings.transport == "udp":
                transport, _ = await loop.create_datagram_endpoint(
                    lambda: _UdpChannel(self, number), remote_addr=server)
                self._udp = transport
                sockname = transport.get_extra_info("sockname")
            else:
                reader, writer = await asyncio.wait_for(asyncio.open_connection(*server),
                                                        CONNECT_TIMEOUT)
                self._writer = writer
                sockname = writer.get_extra_info("sockname")
                self._rt_spawn(self._read_stream(reader, number), "reading from the server")
        except (OSError, TimeoutError) as exc:
            if number == self._connection:
                reason = _reason(exc)
                self.engine.connection_lost(reason, self._pump.now())
                self._pump.run()
            return
        if number != self._connection:
            return
        self.local = ipaddress.IPv4Address(sockname[0])
        self.engine.connected(self._pump.now())
        self._pump.run()

    async def _read_stream(self, reader: asyncio.StreamReader, number: int) -> None:
        stream = wire.StreamReader()
        reason = "the server closed the connection"
        try:
            while number == self._connection:
                data = await reader.read(READ_SIZE)
                if not data:
                    break
                assert self.engine is not None and self._pump is not None
                for item in stream.feed(data):
                    self.engine.receive(item, self._pump.now())
                self._pump.run()
                if stream.broken:
                    reason = "the server's stream is malformed"
                    break
        except OSError as exc:
            reason = _reason(exc)
        if number == self._connection and self.engine is not None and self._pump is not None:
            self._close_channel()
            self.engine.connection_lost(reason, self._pump.now())
            self._pump.run()

    def datagram(self, data: bytes, number: int) -> None:
        if number != self._connection or self.engine is None or self._pump is None:
            return
        self.engine.receive(data, self._pump.now())
        self._pump.run()

    def datagram_error(self, exc: Exception, number: int) -> None:
        """An ICMP error on the UDP channel (port unreachable: nothing listens)."""
        if number != self._connection or self.engine is None or self._pump is None:
            return
        reason = _reason(exc)
        self._close_channel()
        self.engine.connection_lost(reason, self._pump.now())
        self._pump.run()

    def _close_channel(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._udp is not None:
            self._udp.close()
            self._udp = None

    def _rt_spawn(self, coro: Any, what: str) -> None:
        assert self._rt is not None
        self._rt.spawn(coro, what)

    # --- actions -------------------------------------------------------------------------------
    def _apply(self, actions: Sequence[Any]) -> None:
        for action in actions:
            if isinstance(action, Send):
                self._send(action)
            elif isinstance(action, Connect):
                self._rt_spawn(self._connect(), "connecting to the RSIP server")
            elif isinstance(action, Disconnect):
                log.warning("closing the connection to the server: %s", action.reason)
                self._connection += 1  # its reader's news are stale from now on
                self._close_channel()
            elif isinstance(action, TunnelUp):
                self._tunnel_up(action)
            elif isinstance(action, TunnelDown):
                stopping = self.engine is not None and self.engine.stopping
                log.log(logging.INFO if stopping else logging.WARNING, "tunnel %s down: %s",
                        self.config.dev, action.reason)
                self._tear_down()
            elif isinstance(action, BindAdded | BindRemoved):
                self._held_changed()
            elif isinstance(action, ListenRefused):
                self._close_listeners(action.port, action.reason)
            elif isinstance(action, Failed):
                self._failed(action)
            elif isinstance(action, Note):
                log.log(logging.DEBUG if action.level == "debug" else
                        logging.WARNING if action.level == "warning" else logging.INFO,
                        "%s", action.text)
            elif isinstance(action, Stopped):
                self._stopped.set()
        self._maybe_started()

    def _send(self, action: Send) -> None:
        data = wire.encode(action.message)
        try:
            if self._udp is not None:
                self._udp.sendto(data)
            elif self._writer is not None and not self._writer.is_closing():
                self._writer.write(data)
            else:
                self.counters["send_failed"] += 1
        except OSError:
            self.counters["send_failed"] += 1

    def _failed(self, failure: Failed) -> None:
        if self._started is not None and not self._started.done():
            self._started.set_result(failure)
            return
        if self._rt is not None:
            self._rt.fail(str(failure))

    def _maybe_started(self) -> None:
        """Ready (systemd's READY=1, `start` returns) once the tunnel is up and every -l port
        has its answer: a unit that needs port 80 can start after this one."""
        if self._started is None or self._started.done() or self.plane is None or \
                self.engine is None or not self.engine.static_listens_settled:
            return
        self._started.set_result(None)

    # --- the data plane ------------------------------------------------------------------------
    def _tunnel_up(self, up: TunnelUp) -> None:
        assert self.engine is not None and self._pump is not None
        plane = self.plane
        if plane is not None and (plane.address, plane.endpoint, plane.kind, plane.udp_port) \
                == (up.address, up.endpoint, up.kind, up.udp_port):
            plane.first, plane.last = up.first, up.last
        else:
            self._tear_down(keep_port_range=True)
            try:
                self.plane = self._open_tunnel(up)
            except _PlaneError as exc:
                self.engine.tunnel_failed(exc.line, exc.detail, self._pump.now())
                return
        try:
            self._narrow_port_range(up.first, up.last)
            self._held_changed()
        except (NetError, OSError, ValueError) as exc:
            self.engine.tunnel_failed("Unable to set default route", str(exc), self._pump.now())
            return
        assert self.plane is not None
        log.info("%s up: %s ports %d-%d, %s tunnel to %s, MTU %d; Internet traffic leaves "
                 "through it", self.config.dev, up.address, up.first, up.last, up.kind,
                 up.endpoint if not up.udp_port else f"{up.endpoint}:{up.udp_port}",
                 self.plane.mtu)
        self._maybe_started()

    def _path_mtu(self, nl: Netlink, endpoint: ipaddress.IPv4Address) -> int:
        route = nl.lookup(str(endpoint))
        if route.mtu:
            return route.mtu
        if route.dev:
            return nl.link(route.dev).mtu or 1500
        return 1500

    def _open_tunnel(self, up: TunnelUp) -> _DataPlane:
        assert self._rt is not None and self.local is not None
        config, rt = self.config, self._rt
        try:
            with Netlink(self.netns) as nl:
                path_mtu = self._path_mtu(nl, up.endpoint)
        except NetError as exc:
            raise _PlaneError("Unable to create tunnel", f"no route to the tunnel endpoint "
                                                         f"{up.endpoint}: {exc}") from exc
        mtu = config.mtu if config.mtu is not None else path_mtu - OVERHEAD[up.kind]
        problem = mtu_problem(mtu, path_mtu, up.kind)
        if problem:
            raise _PlaneError(MTU_PROBLEM, problem)
        peer = Peer(PEER_NAME, Endpoint(up.endpoint, up.udp_port if up.kind is TunnelKind.UDP
                                        else 0),
                    _ENCAPSULATIONS[up.kind], prefixes=(ipaddress.IPv4Network("0.0.0.0/0"),))
        try:
            tunnel_config = TunnelConfig(
                dev=config.dev, local=Endpoint(self.local, config.settings.tunnel_port),
                peers=(peer,), addresses=(ipaddress.IPv4Interface(f"{up.address}/32"),),
                mtu=mtu, netns=self.netns)
        except ConfigError as exc:
            raise _PlaneError("Unable to create tunnel", str(exc)) from exc
        tunnel = TunnelDaemon(tunnel_config)
        try:
            tunnel.open()
            rt.record.add(TUN_DEVICE, config.dev)
            tunnel.start()
        except (TunnelError, NetError, OSError) as exc:
            tunnel.close()
            rt.record.discard(TUN_DEVICE, config.dev)
            raise _PlaneError("Unable to create tunnel", str(exc)) from exc
        plane = _DataPlane(tunnel, up.address, up.endpoint, up.kind, up.udp_port, tunnel.mtu,
                           up.first, up.last)
        self.plane = plane
        try:
            self._route(plane)
        except (NetError, OSError) as exc:
            raise _PlaneError("Unable to set default route", str(exc)) from exc
        return plane

    def _route(self, plane: _DataPlane) -> None:
        """Pin the server and the tunnel endpoint to their present path if it is not a
        connected network, then route the Internet through the tunnel."""
        assert self._rt is not None and self.engine is not None
        self._rt.record.add(ROUTE_PROTOCOL, str(PROTOCOL))
        with Netlink(self.netns) as nl:
            for host in dict.fromkeys((self.engine.server, plane.endpoint)):
                path = nl.lookup(str(host))
                if path.gateway and path.dev != self.config.dev:
                    pin = Route(f"{host}/32", gateway=path.gateway, dev=path.dev,
                                proto=PROTOCOL)
                    nl.replace_route(pin)
                    plane.pinned.append(pin)
            for prefix in INTERNET:
                nl.replace_route(Route(prefix, dev=self.config.dev, src=str(plane.address),
                                       proto=PROTOCOL))

    def _narrow_port_range(self, first: int, last: int) -> None:
        assert self._rt is not None
        change_sysctl(self._rt, PORT_RANGE_KEY, f"{first} {last}", self.netns)

    def _held_changed(self) -> None:
        """Rewrite the nft table for the binds held now (one transaction)."""
        plane, engine = self.plane, self.engine
        if plane is None or engine is None or self._table is None or self._rt is None:
            return
        held = ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in engine.held_ranges())
        if not held:
            return
        dev, target = self.config.dev, f"{plane.address}:{plane.first}-{plane.last}"
        body = (f"set held {{ type inet_service; flags interval; elements = {{ {held} }} }}\n"
                "chain keep_ports {\n"
                "  type nat hook postrouting priority srcnat; policy accept;\n"
                f'  oifname "{dev}" meta l4proto icmp snat to {target}\n'
                f'  oifname "{dev}" meta l4proto {{ tcp, udp }} th sport != @held '
                f"snat to {target}\n"
                "}")
        self._rt.record.add(NFT_TABLE, self._table.spec)
        try:
            self._table.create(body, force=True)
        except NetError as exc:
            self.counters["data_plane_errors"] += 1
            log.warning("cannot keep ICMP identifiers and source ports in the block: %s", exc)

    def _tear_down(self, *, keep_port_range: bool = False) -> None:
        """Remove what the tunnel's values installed (each part on its own: one failure does
        not keep the rest)."""
        rt, plane = self._rt, self.plane
        self.plane = None
        if plane is not None:
            if plane.pinned:
                try:
                    with Netlink(self.netns) as nl:
                        for pin in plane.pinned:
                            with contextlib.suppress(NetError):
                                nl.del_route(pin)
                except NetError as exc:
                    log.warning("removing the routes to the server: %s", exc)
            plane.tunnel.close()  # the device takes its address and routes along
            if rt is not None:
                rt.record.discard(TUN_DEVICE, self.config.dev)
                rt.record.discard(ROUTE_PROTOCOL, str(PROTOCOL))
        if self._table is not None and rt is not None and self._table.spec in \
                rt.record.items(NFT_TABLE):
            try:
                self._table.delete()
                rt.record.discard(NFT_TABLE, self._table.spec)
            except NetError as exc:
                log.warning("removing nftables table %s: %s", self._table.spec, exc)
        if not keep_port_range and rt is not None:
            restore_sysctl(rt, PORT_RANGE_KEY, self.netns)

    def _check_tunnel(self) -> None:
        plane = self.plane
        if plane is None or self._rt is None:
            return
        if not plane.tunnel.alive():
            self._rt.fail("the tunnel's forwarding stopped unexpectedly")
            return
        plane.tunnel.follow_forwarding()

    # --- listening sockets ---------------------------------------------------------------------
    def _ours(self, info: SocketInfo) -> bool:
        """Is the socket's local address one the gateway's binds concern (the public one, or
        any address)?"""
        try:
            address = ipaddress.ip_address(info.src.partition("%")[0])
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        public = self.plane.address if self.plane is not None else None
        return address in _WILDCARDS or address == public

    def _listeners(self) -> list[SocketInfo]:
        assert self._diag is not None
        tcp = self._diag.sockets("tcp", states=1 << TCP_LISTEN)
        udp = [s for s in self._diag.sockets("udp")
               if s.state == UDP_UNCONNECTED and not s.dport]
        return [s for s in tcp + udp if s.sport and self._ours(s)]

    def _scan(self) -> None:
        """Which ports applications listen on, and how many sockets use each bind."""
        if self._diag is None or self.engine is None or self._pump is None:
            return
        try:
            listeners = self._listeners()
            everything = [s for proto in ("tcp", "udp") for s in self._diag.sockets(proto)
                          if self._ours(s)]
        except NetError as exc:
            self.counters["scan_failed"] += 1
            raise NetError(f"sock_diag: {exc}") from exc
        used: dict[int, int] = {}
        for held in self.engine.binds.values():
            bind = held.bind
            used[bind.bind_id] = sum(1 for s in everything if bind.first <= s.sport <= bind.last)
        self._used = used
        self.engine.listening({s.sport for s in listeners}, self._pump.now())
        self._pump.run()

    def _close_listeners(self, port: int, reason: str) -> None:
        """The gateway will not forward `port`: close the sockets listening on it, so the
        application sees what it would if another program held the port."""
        if self._diag is None:
            return
        try:
            victims = [s for s in self._listeners() if s.sport == port]
            for info in victims:
                try:
                    self._diag.destroy(info)
                    self.counters["sockets_closed"] += 1
                except NetError as exc:
                    log.warning("cannot close the socket listening on port %d: %s", port, exc)
        except NetError as exc:
            log.warning("cannot look for sockets on port %d: %s", port, exc)
            return
        if victims:
            log.warning("closed %d socket(s) listening on port %d: the RSIP server refused "
                        "the port (%s)", len(victims), port, reason)

    # --- status --------------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        engine, pump = self.engine, self._pump
        if engine is None or pump is None:
            return {}
        state = engine.status(pump.now())
        binds = state.pop("binds")
        for row in binds:
            row["used"] = self._used.get(row["bind_id"], 0)
        plane = self.plane
        main = engine.main_bind
        summary = str(engine.phase)
        if main is not None:
            summary += f" {main.address} {main.first}-{main.last}"
        doc: dict[str, Any] = {
            "daemon": {"summary": summary},
            "client": {**{k: state.pop(k) for k in ("state", "client_id", "registration_s",
                                                       "transport", "server")},
                       "port": self.config.port, "tunnel": self.config.dev,
                       "local": str(self.local) if self.local else None,
                       "tunnel_kind": state.pop("tunnel_kind"),
                       "endpoint": state.pop("endpoint"),
                       "gateway_udp_port": state.pop("gateway_udp_port"),
                       "mtu": plane.mtu if plane is not None else None,
                       "port_range": (f"{plane.first}-{plane.last}" if plane is not None
                                      else None)},
            "binds": binds,
            **state,
            "service": dict(self.counters),
        }
        if plane is not None:
            doc["tunnel_counters"] = plane.tunnel.counters().as_dict()
        return doc

    def metrics(self) -> list[Metric]:
        engine = self.engine
        if engine is None:
            return []
        counters = engine.counters
        out = [gauge("rsipclient_binds", len(engine.binds), "binds held"),
               gauge("rsipclient_ports", sum(h.bind.count for h in engine.binds.values()),
                     "ports leased"),
               gauge("rsipclient_tunnel_up", 1 if self.plane is not None else 0,
                     "1 while the tunnel carries traffic"),
               counter("rsipclient_retransmissions_total", counters.retransmissions,
                       "UDP requests sent again"),
               counter("rsipclient_recoveries_total", counters.recoveries,
                       "times the registration was sought again"),
               counter("rsipclient_listens_refused_total", counters.listens_refused,
                       "ports the server would not forward")]
        for name, value in counters.sent.items():
            out.append(counter("rsipclient_sent_total", value, "requests sent", type=name))
        for name, value in counters.received.items():
            out.append(counter("rsipclient_received_total", value, "messages received",
                               type=name))
        for name, value in counters.ignored.items():
            out.append(counter("rsipclient_ignored_total", value, "messages ignored",
                               reason=name))
        return out

    # --- stop ----------------------------------------------------------------------------------
    async def stop(self) -> None:
        engine, pump = self.engine, self._pump
        if engine is not None and pump is not None:
            engine.stop(pump.now())
            pump.run()
            try:
                await asyncio.wait_for(self._stopped.wait(), STOP_TIMEOUT)
            except TimeoutError:
                log.warning("the RSIP server did not confirm the de-registration within %g s",
                            STOP_TIMEOUT)
            pump.stop()
        self._connection += 1
        self._close_channel()
        self._tear_down()
        if self._diag is not None:
            self._diag.close()
            self._diag = None
        if self._nft is not None:
            self._nft.close()
            self._nft = None


def _reason(exc: BaseException) -> str:
    """The system's words for a failed socket call ("Connection refused"), without asyncio's
    wrapping ("Connect call failed (...)")."""
    if isinstance(exc, TimeoutError):
        return "Connection timed out"
    if isinstance(exc, OSError) and exc.errno:
        return os.strerror(exc.errno)
    return str(exc) or type(exc).__name__


class _PlaneError(Exception):
    def __init__(self, line: str, detail: str) -> None:
        super().__init__(f"{line} ({detail})")
        self.line = line
        self.detail = detail


class _UdpChannel(asyncio.DatagramProtocol):
    def __init__(self, service: ClientService, number: int) -> None:
        self.service = service
        self.number = number

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        self.service.datagram(data, self.number)

    def error_received(self, exc: Exception) -> None:
        self.service.datagram_error(exc, self.number)


def run_client(config: ClientConfig, *, socket_path: Path | None,
               metrics: str | None = None) -> int:
    """The client in the foreground until SIGTERM/SIGINT or `ipshift rsip client stop`."""
    return run_service(ClientService(config), DaemonOptions(socket=socket_path,
                                                            metrics=metrics))
