"""The RSIP gateway's protocol engine (RFC 3103 section 9, RFC 3104): requests in, answers
and data-plane changes out. Pure: no I/O, no clock.

    engine = GatewayEngine(Leases(policy), GatewaySettings(tunnel_port=4556))
    engine.receive(datagram_or_message, Origin("udp", "192.0.2.10", 4555), now)
    for action in engine.actions():    # Send, ClientRoutes, Persist, Note
        ...
    engine.handle_timer(now)           # lease expiry: asynchronous FREE / DE-REGISTER

Over UDP every request carries a Message Counter and is executed at most once (RFC 3103
section 10.1): the answer is kept, keyed by the sender's address, port and counter, and a
retransmission gets the same answer again without a second lease. Answers over UDP echo the
counter; asynchronous messages carry counter 0.

A host is identified by its private address (RFC 3103 section 10.6): a request naming a
client ID that is not the sender's own is answered BAD_CLIENT_ID, whatever else it asks.
"""

from __future__ import annotations

import ipaddress
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ipshift.rsip import wire
from ipshift.rsip.leases import Bind, BindKind, Client, LeaseError, Leases
from ipshift.rsip.wire import (
    Address,
    BindId,
    ClientId,
    ErrorCode,
    FlowPolicy,
    FlowPolicyKind,
    Indicator,
    LeaseTime,
    Message,
    MessageCounter,
    MessageType,
    Method,
    Ports,
    RsipMethod,
    RsipWireError,
    Tunnel,
    TunnelType,
)

REPLAY_MEMORY = 60.0      # seconds a UDP answer is kept for retransmissions
REPLAY_ENTRIES = 65536    # answers kept at most (oldest dropped first)
MAX_QUERY_TUPLES = 64     # addresses answered in one QUERY_RESPONSE

# The numbers of a host's request types that the gateway implements, and what it answers.
_ANSWERS = {
    MessageType.REGISTER_REQUEST: MessageType.REGISTER_RESPONSE,
    MessageType.DE_REGISTER_REQUEST: MessageType.DE_REGISTER_RESPONSE,
    MessageType.ASSIGN_REQUEST_RSA_IP: MessageType.ASSIGN_RESPONSE_RSA_IP,
    MessageType.ASSIGN_REQUEST_RSAP_IP: MessageType.ASSIGN_RESPONSE_RSAP_IP,
    MessageType.EXTEND_REQUEST: MessageType.EXTEND_RESPONSE,
    MessageType.FREE_REQUEST: MessageType.FREE_RESPONSE,
    MessageType.QUERY_REQUEST: MessageType.QUERY_RESPONSE,
    MessageType.LISTEN_REQUEST: MessageType.LISTEN_RESPONSE,
}


@dataclass(frozen=True, slots=True)
class Origin:
    """Where a request came from: its transport, the host's address and port, and for TCP
    the daemon's number for the connection (asynchronous messages go back on it)."""

    transport: str
    host: str
    port: int
    connection: int = 0


@dataclass(frozen=True, slots=True)
class Send:
    origin: Origin
    message: Message


@dataclass(frozen=True, slots=True)
class Lease:
    """One bind as the data plane needs it."""

    bind_id: int
    address: ipaddress.IPv4Address
    first: int
    last: int
    whole: bool


@dataclass(frozen=True, slots=True)
class ClientRoute:
    """What the data plane must know of one client: its tunnel and what it holds."""

    client_id: int
    host: str
    tunnel: int          # RFC 3103 tunnel type, or UDP_TUNNEL
    tunnel_port: int     # its UDP port for ipshift's framing (0 otherwise)
    leases: tuple[Lease, ...]


@dataclass(frozen=True, slots=True)
class ClientRoutes:
    """Clients whose data-plane state changed: `routes` to install (a client without leases
    has none), `removed` client IDs to forget."""

    routes: tuple[ClientRoute, ...]
    removed: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Persist:
    """Clients to write to the store, and client IDs to delete from it."""

    clients: tuple[Client, ...]
    removed: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Note:
    """Something worth a log line (`level`: "info", "warning", "debug")."""

    level: str
    text: str


Action = Send | ClientRoutes | Persist | Note

UDP_TUNNEL = 0x100  # the tunnel "type" of ipshift's UDP framing (granted by vendor parameter)


@dataclass(frozen=True, slots=True)
class GatewaySettings:
    tunnel_port: int = 4556                   # the gateway's tunnel UDP port
    tunnels: tuple[int, ...] = (UDP_TUNNEL, TunnelType.IP_IP, TunnelType.GRE)
    local_networks: tuple[ipaddress.IPv4Network, ...] = ()  # answered "local" to QUERY
    rsa_ip: bool = True


@dataclass
class GatewayCounters:
    requests: dict[str, int] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)
    replayed: int = 0
    malformed: int = 0
    async_sent: int = 0


class GatewayEngine:
    def __init__(self, leases: Leases, settings: GatewaySettings | None = None) -> None:
        self.leases = leases
        self.settings = settings or GatewaySettings()
        self.counters = GatewayCounters()
        self._actions: list[Action] = []
        self._answers: OrderedDict[tuple[str, int, int], tuple[float, Message]] = OrderedDict()
        self._origins: dict[int, Origin] = {}  # where each client last spoke from

    # --- events ----------------------------------------------------------------------------

    def receive(self, data: bytes | Message | RsipWireError, origin: Origin, now: float) -> None:
        """One request: raw bytes (UDP), or a message or error from a TCP stream reader."""
        if isinstance(data, bytes | bytearray | memoryview):
            try:
                data = wire.decode(bytes(data))
            except RsipWireError as exc:
                data = exc
        if isinstance(data, RsipWireError):
            self.counters.malformed += 1
            self._count_error(data.error)
            self._send(origin, wire.error_response(data.error, client_id=data.client_id,
                                                   counter=data.counter))
            return
        message = data
        self.counters.requests[message.type.name] = (
            self.counters.requests.get(message.type.name, 0) + 1)
        counter = message.counter
        if origin.transport == "udp":
            if counter is None:
                self._refuse(origin, ErrorCode.MESSAGE_COUNTER_REQUIRED, message)
                return
            key = (origin.host, origin.port, counter)
            kept = self._answers.get(key)
            if kept is not None:
                self.counters.replayed += 1
                self._actions.append(Send(origin, kept[1]))
                return
        answer = self._answer(message, origin, now)
        if origin.transport == "udp" and counter is not None:
            self._answers[(origin.host, origin.port, counter)] = (now + REPLAY_MEMORY, answer)
            if len(self._answers) > REPLAY_ENTRIES:
                self._answers.popitem(last=False)
        self._actions.append(Send(origin, answer))
        self._flush_changes()

    def handle_timer(self, now: float) -> None:
        while self._answers:
            key, (until, _) = next(iter(self._answers.items()))
            if until > now:
                break
            del self._answers[key]
        for gone in self.leases.expire(now):
            origin = self._origins.get(gone.client_id)
            if gone.bind_id is None:
                self._origins.pop(gone.client_id, None)
                self._note("info", f"client {gone.client_id} ({gone.host}): registration "
                           "expired")
                message = Message(MessageType.DE_REGISTER_RESPONSE, (ClientId(gone.client_id),
                                                                     MessageCounter(0)))
            else:
                self._note("info", f"client {gone.client_id} ({gone.host}): bind "
                           f"{gone.bind_id} expired")
                message = Message(MessageType.FREE_RESPONSE, (
                    ClientId(gone.client_id), BindId(gone.bind_id), MessageCounter(0)))
            if origin is not None:
                self.counters.async_sent += 1
                self._send(origin, message)
        self._flush_changes()

    def next_timer(self) -> float | None:
        times = [t for t in (self.leases.next_expiry(),) if t is not None]
        if self._answers:
            times.append(next(iter(self._answers.values()))[0])
        return min(times) if times else None

    def actions(self) -> list[Action]:
        actions, self._actions = self._actions, []
        return actions

    def restore(self, clients: Sequence[Client], now: float) -> None:
        """Persisted clients after a restart: their data plane comes back at once."""
        gone = self.leases.restore(clients, now)
        for item in gone:
            self._note("info", f"client {item.client_id} ({item.host}): "
                       f"{'registration' if item.bind_id is None else f'bind {item.bind_id}'} "
                       "expired while the gateway was down")
        self._flush_changes()

    def stop_all(self, now: float) -> None:
        """The gateway stops for good: every client is told (DE-REGISTER_RESPONSE)."""
        for client_id in list(self.leases.clients):
            origin = self._origins.get(client_id)
            self.leases.deregister(client_id, now)
            if origin is not None:
                self._send(origin, Message(MessageType.DE_REGISTER_RESPONSE,
                                           (ClientId(client_id), MessageCounter(0))))
        self._flush_changes()

    # --- requests --------------------------------------------------------------------------

    def _answer(self, message: Message, origin: Origin, now: float) -> Message:
        handler = _HANDLERS.get(message.type)
        if handler is None:
            code = (ErrorCode.UNSUPPORTED_MESSAGE if message.type in _GATEWAY_ONLY
                    else ErrorCode.ILLEGAL_MESSAGE)
            if message.type is MessageType.ASSIGN_REQUEST_RSIPSEC:
                code = ErrorCode.IPSEC_UNALLOWED
            return self._error(code, message)
        try:
            answer: Message = handler(self, message, origin, now)
        except LeaseError as exc:
            self._note("debug", f"{origin.host}: {message.type.name} refused: {exc}")
            return self._error(ErrorCode(int(exc.refusal)), message, exc.client_id)
        except _Refused as exc:
            return self._error(exc.code, message)
        except RsipWireError as exc:
            return self._error(exc.error, message)
        if origin.transport == "udp" and message.counter is not None:
            answer = Message(answer.type, (*answer.params, MessageCounter(message.counter)))
        return answer

    def _client(self, message: Message, origin: Origin) -> Client:
        client = self.leases.client(message.client_id, origin.host)
        self._origins[client.client_id] = origin
        if origin.transport == "udp":
            client.udp_source = (origin.host, origin.port)
        return client

    def _register(self, message: Message, origin: Origin, now: float) -> Message:
        client = self.leases.register(origin.host, origin.transport, now)
        self._origins[client.client_id] = origin
        wanted_udp = wire.udp_tunnel_port(message)
        if wanted_udp:
            client.tunnel_port = wanted_udp
        self._note("info", f"client {client.client_id} ({origin.host}) registered over "
                   f"{origin.transport}")
        params: list[Any] = [ClientId(client.client_id),
                             LeaseTime(round(client.expires - now)),
                             FlowPolicy(FlowPolicyKind.MACRO, FlowPolicyKind.NO_POLICY)]
        if self.settings.rsa_ip:
            params.append(Method(RsipMethod.RSA_IP))
        params.append(Method(RsipMethod.RSAP_IP))
        params += [Tunnel(kind) for kind in self.settings.tunnels if kind != UDP_TUNNEL]
        if wanted_udp and UDP_TUNNEL in self.settings.tunnels:
            params.append(wire.udp_tunnel_param(self.settings.tunnel_port))
        return Message(MessageType.REGISTER_RESPONSE, tuple(params))

    def _deregister(self, message: Message, origin: Origin, now: float) -> Message:
        client = self._client(message, origin)
        self.leases.deregister(client.client_id, now)
        self._origins.pop(client.client_id, None)
        self._note("info", f"client {client.client_id} ({origin.host}) de-registered")
        return Message(MessageType.DE_REGISTER_RESPONSE, (ClientId(client.client_id),))

    def _assign(self, message: Message, origin: Origin, now: float, *,
                listen: bool = False) -> Message:
        client = self._client(message, origin)
        addresses = message.all(Address)
        ports_params = message.all(Ports)
        if len(addresses) < 2 or len(ports_params) < 2:
            raise _wire_error(ErrorCode.MISSING_PARAM, "local and remote address and ports")
        local, remote = addresses[0], addresses[1]
        remote_ports = ports_params[1]
        del remote, remote_ports  # no remote flow policy: any remote is fine (9.8.3)
        tunnel = self._tunnel_or_refuse(message, client)
        wanted = _local_address(local)
        asked = ports_params[0]
        if asked.ports:
            try:
                ports: tuple[int, ...] | None = asked.expand()
            except (ValueError, RsipWireError):
                raise _wire_error(ErrorCode.BAD_PARAM, "local ports") from None
            count = len(ports or ())
        else:
            ports = None
            # "don't care" ports: as many as asked; a host asking RSAP-IP for one (or none)
            # gets the default block, since one ephemeral port is of no use
            count = max(asked.number, 1) if listen else (
                asked.number if asked.number > 1 else self.leases.policy.block)
        lease = message.first(LeaseTime)
        bind = self.leases.assign_ports(client.client_id, wanted, ports, count,
                                        lease.seconds if lease else None, now,
                                        tunnel=tunnel, listen=listen)
        self._note("info", f"client {client.client_id} ({origin.host}): "
                   f"{'listen' if listen else 'ports'} {bind.address} "
                   f"{bind.first}-{bind.last} as bind {bind.bind_id}")
        params: list[Any] = [ClientId(client.client_id), BindId(bind.bind_id),
                             Address.of(bind.address), Ports.block(bind.first, bind.count),
                             Address.dont_care(), Ports.any(1)]
        lease_param = LeaseTime(round(bind.expires - now))
        tunnel_param = Tunnel(TunnelType.IP_IP if tunnel == UDP_TUNNEL else tunnel)
        if listen:
            params += [tunnel_param, lease_param]   # LISTEN_RESPONSE: tunnel type first
        else:
            params += [lease_param, tunnel_param]
        if tunnel == UDP_TUNNEL:
            params.append(wire.udp_tunnel_param(self.settings.tunnel_port))
        kind = MessageType.LISTEN_RESPONSE if listen else MessageType.ASSIGN_RESPONSE_RSAP_IP
        return Message(kind, tuple(params))

    def _listen(self, message: Message, origin: Origin, now: float) -> Message:
        return self._assign(message, origin, now, listen=True)

    def _assign_address(self, message: Message, origin: Origin, now: float) -> Message:
        client = self._client(message, origin)
        addresses = message.all(Address)
        remote_ports = message.first(Ports)
        if len(addresses) < 2 or remote_ports is None:
            raise _wire_error(ErrorCode.MISSING_PARAM, "local and remote address, remote ports")
        tunnel = self._tunnel_or_refuse(message, client)
        lease = message.first(LeaseTime)
        bind = self.leases.assign_address(client.client_id, _local_address(addresses[0]),
                                          lease.seconds if lease else None, now, tunnel=tunnel)
        self._note("info", f"client {client.client_id} ({origin.host}): address "
                   f"{bind.address} as bind {bind.bind_id}")
        params: list[Any] = [
            ClientId(client.client_id), BindId(bind.bind_id), Address.of(bind.address),
            Address.dont_care(), Ports.any(1), LeaseTime(round(bind.expires - now)),
            Tunnel(TunnelType.IP_IP if tunnel == UDP_TUNNEL else tunnel)]
        if tunnel == UDP_TUNNEL:
            params.append(wire.udp_tunnel_param(self.settings.tunnel_port))
        return Message(MessageType.ASSIGN_RESPONSE_RSA_IP, tuple(params))

    def _extend(self, message: Message, origin: Origin, now: float) -> Message:
        client = self._client(message, origin)
        lease = message.first(LeaseTime)
        bind = self.leases.extend(client.client_id, message.require(BindId).value,
                                  lease.seconds if lease else None, now)
        return Message(MessageType.EXTEND_RESPONSE, (
            ClientId(client.client_id), BindId(bind.bind_id),
            LeaseTime(round(bind.expires - now))))

    def _free(self, message: Message, origin: Origin, now: float) -> Message:
        client = self._client(message, origin)
        bind = self.leases.free(client.client_id, message.require(BindId).value, now)
        self._note("info", f"client {client.client_id} ({origin.host}): bind "
                   f"{bind.bind_id} freed")
        return Message(MessageType.FREE_RESPONSE, (ClientId(client.client_id),
                                                   BindId(bind.bind_id)))

    def _query(self, message: Message, origin: Origin, now: float) -> Message:
        client = self._client(message, origin)
        params: list[Any] = [ClientId(client.client_id)]
        local = self.settings.local_networks
        asked = [a for a in message.all(Address)
                 if isinstance(a.value, ipaddress.IPv4Address)]
        indicators = [i.value for i in message.all(Indicator)]
        if not indicators:
            for network in local[:MAX_QUERY_TUPLES]:
                params += [Indicator(2), Address.of(network.network_address),
                           _netmask(network.netmask)]
            return Message(MessageType.QUERY_RESPONSE, tuple(params))
        # Tuples: an address tuple is (indicator 1, address); a network tuple is
        # (indicator 2, network address, netmask): walk them in order.
        values = iter(asked)
        for indicator in indicators[:MAX_QUERY_TUPLES]:
            address = next(values, None)
            if address is None:
                break
            assert isinstance(address.value, ipaddress.IPv4Address)
            if indicator == 2:
                mask = next(values, None)
                if mask is None:
                    break
                assert isinstance(mask.value, ipaddress.IPv4Address)
                try:
                    net = ipaddress.IPv4Network(f"{address.value}/{mask.value}", strict=False)
                except ValueError:
                    continue
                inside = any(net.subnet_of(n) for n in local)
                params += [Indicator(2 if inside else 4), Address.of(net.network_address),
                           _netmask(net.netmask)]
            else:
                inside = any(address.value in n for n in local)
                params += [Indicator(1 if inside else 3), Address.of(address.value)]
        return Message(MessageType.QUERY_RESPONSE, tuple(params))

    # --- helpers ---------------------------------------------------------------------------

    def _tunnel_or_refuse(self, message: Message, client: Client) -> int:
        port = wire.udp_tunnel_port(message)
        if port:
            client.tunnel_port = port
        asked = [t.kind for t in message.all(Tunnel)]
        offered = self.settings.tunnels
        if client.tunnel_port and UDP_TUNNEL in offered and (
                not asked or TunnelType.IP_IP in asked):
            return UDP_TUNNEL
        for kind in asked or [TunnelType.IP_IP]:
            if kind in offered and kind != UDP_TUNNEL:
                return int(kind)
        raise _wire_error(ErrorCode.BAD_TUNNEL_TYPE, f"tunnel types {asked} are not offered")

    def _error(self, code: ErrorCode, message: Message | None,
               client_id: int | None = None) -> Message:
        self._count_error(code)
        counter = message.counter if message is not None else None
        if client_id is None and message is not None:
            client_id = message.client_id
        return wire.error_response(code, client_id=client_id, counter=counter)

    def _refuse(self, origin: Origin, code: ErrorCode, message: Message) -> None:
        self._send(origin, self._error(code, message))

    def _count_error(self, code: ErrorCode) -> None:
        self.counters.errors[code.name] = self.counters.errors.get(code.name, 0) + 1

    def _send(self, origin: Origin, message: Message) -> None:
        self._actions.append(Send(origin, message))

    def _note(self, level: str, text: str) -> None:
        self._actions.append(Note(level, text))

    def _flush_changes(self) -> None:
        changed, removed = self.leases.take_changes()
        if not changed and not removed:
            return
        clients = tuple(self.leases.clients[c] for c in sorted(changed)
                        if c in self.leases.clients)
        self._actions.append(ClientRoutes(tuple(route_of(c) for c in clients),
                                          tuple(sorted(removed))))
        self._actions.append(Persist(clients, tuple(sorted(removed))))

    def status_rows(self, now: float) -> list[dict[str, Any]]:
        """One row per bind, for the status document and the SIGUSR1 status file."""
        rows = []
        for client in self.leases.clients.values():
            for bind in client.binds.values():
                rows.append(bind_row(client, bind, now))
        return rows


def route_of(client: Client) -> ClientRoute:
    return ClientRoute(client.client_id, client.host,
                       next((b.tunnel for b in client.binds.values()), TunnelType.IP_IP),
                       client.tunnel_port,
                       tuple(Lease(b.bind_id, b.address, b.first, b.last,
                                   b.kind is BindKind.ADDRESS)
                             for b in client.binds.values() if b.kind is not BindKind.MAPPING))


def bind_row(client: Client, bind: Bind, now: float) -> dict[str, Any]:
    return {
        "client": client.host, "address": str(bind.address), "state": "ASSIGNED",
        "client_id": client.client_id, "bind_id": bind.bind_id,
        "lease_s": max(0, round(bind.expires - now)),
        "registration_s": max(0, round(client.expires - now)),
        "tunnel": tunnel_name(client.client_id), "tunnel_type": tunnel_text(bind.tunnel),
        "transport": client.transport.upper(), "kind": str(bind.kind),
        "first": bind.first, "count": bind.count,
    }


def tunnel_name(client_id: int) -> str:
    """The seed's name for the tunnel towards a client ("rsip1x1")."""
    return f"rsip{client_id}x1"


def tunnel_text(kind: int) -> str:
    return {UDP_TUNNEL: "udp", TunnelType.IP_IP: "ipip", TunnelType.GRE: "gre"}.get(kind, "?")


def _local_address(address: Address) -> ipaddress.IPv4Address | None:
    """The local address a host asks for; None for "don't care" (or all zeros)."""
    value = address.value
    if value is None:
        return None
    if isinstance(value, ipaddress.IPv4Address):
        return None if int(value) == 0 else value
    raise _wire_error(ErrorCode.BAD_PARAM, "the local address must be IPv4 or don't care")


class _Refused(Exception):
    """A request the gateway answers with an ERROR_RESPONSE of `code`."""

    def __init__(self, code: ErrorCode, detail: str) -> None:
        super().__init__(detail)
        self.code = code


def _wire_error(code: ErrorCode, detail: str) -> _Refused:
    return _Refused(code, detail)


def _netmask(mask: ipaddress.IPv4Address) -> Address:
    return Address(wire.AddressType.IPV4_NETMASK, mask)


_GATEWAY_ONLY = frozenset(_ANSWERS.values()) | {MessageType.ERROR_RESPONSE,
                                                 MessageType.ASSIGN_RESPONSE_RSIPSEC}

_HANDLERS: dict[MessageType, Any] = {
    MessageType.REGISTER_REQUEST: GatewayEngine._register,
    MessageType.DE_REGISTER_REQUEST: GatewayEngine._deregister,
    MessageType.ASSIGN_REQUEST_RSA_IP: GatewayEngine._assign_address,
    MessageType.ASSIGN_REQUEST_RSAP_IP: GatewayEngine._assign,
    MessageType.EXTEND_REQUEST: GatewayEngine._extend,
    MessageType.FREE_REQUEST: GatewayEngine._free,
    MessageType.QUERY_REQUEST: GatewayEngine._query,
    MessageType.LISTEN_REQUEST: GatewayEngine._listen,
}
