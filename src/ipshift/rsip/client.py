"""The RSIP client's protocol engine (RFC 3103, the host's side): events in, actions out.
Pure: no I/O, no clock (every event takes `now`, seconds on a monotonic clock).

    engine = ClientEngine(ClientSettings(transport="udp", listens=(80,)), server="192.0.2.1")
    engine.start(now)                          # -> Connect
    engine.connected(now)                      # the control channel is up -> Send(REGISTER)
    engine.receive(data_or_message, now)       # the gateway's answers and asynchronous news
    engine.listening({8080}, now)              # ports with listening sockets (sock_diag)
    engine.handle_timer(now); engine.next_timer()
    engine.stop(now)                           # FREE every bind, DE-REGISTER, then Stopped
    for action in engine.actions(): ...        # Connect, Disconnect, Send, TunnelUp,
                                               # TunnelDown, BindAdded, BindRemoved,
                                               # ListenRefused, Failed, Note, Stopped

The life of a client: REGISTER, ASSIGN_REQUEST_RSAP-IP for a block of ports (the tunnel comes
up with the leased address), a LISTEN_REQUEST per `-l` port and per port an application
starts listening on outside the leases, an EXTEND_REQUEST for every bind at 2/3 of its lease,
and at the end a FREE_REQUEST per bind and a DE-REGISTER_REQUEST.

Requests go one at a time. Over UDP each carries a Message Counter and is retransmitted with
binary exponential backoff from 12.5 ms, six times at most (RFC 3103 sections 5 and 10.1):
an answer is the one carrying the counter of the request in flight, counter 0 marks the
gateway's asynchronous messages, anything else is stale. Over TCP answers come in order: the
request in flight is answered by its response type or an ERROR_RESPONSE (an asynchronous
ERROR_RESPONSE can therefore not be told apart while a request is in flight; this gateway
sends none), and FREE_RESPONSE and DE-REGISTER_RESPONSE that answer nothing are asynchronous.

Failure recovery (RFC 3103 section 10.2): REGISTER_FIRST or BAD_CLIENT_ID, or an asynchronous
DE-REGISTER_RESPONSE, mean the gateway lost the registration: every bind is dropped (the
tunnel goes down), the old client ID is de-registered (its error ignored) and the client
registers and asks again. ALREADY_REGISTERED with the client ID this engine holds (a TCP
connection that broke, a gateway that restarted with its leases) resumes the registration and
checks every bind with an EXTEND; with another ID (this host restarted) that ID is
de-registered first. Before the tunnel was ever up, failures end the client with the seed's
troubleshooting lines (`Failed`); afterwards the client keeps trying, with a backoff of
1, 2, 4 ... 32 s.
"""

from __future__ import annotations

import ipaddress
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import Enum, StrEnum
from typing import Any

from ipshift.rsip import wire
from ipshift.rsip.wire import (
    Address,
    BindId,
    ClientId,
    Error,
    ErrorCode,
    FlowPolicy,
    LeaseTime,
    Message,
    MessageCounter,
    MessageType,
    Ports,
    RsipWireError,
    Tunnel,
    TunnelType,
)

DEFAULT_PORTS = 255           # ports asked for with ASSIGN_REQUEST_RSAP-IP (the seed's default)
MAX_PORTS = 255               # the Ports parameter's count is one byte
EXTEND_AT = 2 / 3             # of a lease, when its extension is asked for
RETRANSMIT_FIRST = 0.0125     # seconds before the first UDP retransmission (RFC 3103 section 5)
RETRIES = 6                   # UDP retransmissions before giving up (seven attempts in all)
ANSWER_TIMEOUT = 10.0         # seconds a TCP request waits for its answer
BACKOFF = (0.0, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0)  # seconds before each new recovery attempt
EXTEND_RETRY_MIN = 1.0        # seconds between extension attempts of a bind about to expire
LISTEN_LINGER = 5.0           # seconds a closed listening port is kept before it is freed
ALREADY_REGISTERED_LIMIT = 3  # de-register-and-register rounds in a row before giving up
COUNTER_MAX = 0xFFFFFFFF

# The seed's troubleshooting lines, verbatim.
CONNECT_FAILED = "Unable to connect to RSIP server"  # + ": reason"
REGISTER_FAILED = "Unable to register with RSIP server"
ASSIGN_FAILED = "Unable to get port assignments!"
MTU_PROBLEM = "Can't send rsip packet. MTU problem."


class TunnelKind(StrEnum):
    UDP = "udp"     # ipshift's UDP framing, granted by the vendor-specific parameter
    IPIP = "ipip"
    GRE = "gre"


# Bytes a tunnel adds to each inner packet over an IPv4 underlay: outer IPv4 header, plus UDP
# and the framing header, or the GRE header (no key, no checksum: what the tunnel sends).
OVERHEAD = {TunnelKind.UDP: 20 + 8 + 4, TunnelKind.IPIP: 20, TunnelKind.GRE: 20 + 4}
MIN_TUNNEL_MTU = 576


def mtu_problem(tunnel_mtu: int, path_mtu: int, kind: TunnelKind) -> str | None:
    """Why a tunnel of `tunnel_mtu` cannot carry full-size packets toward its endpoint over a
    path of `path_mtu`, or None. The rule: a full-size inner packet plus the encapsulation
    must fit the path in one packet; tunnel packets are sent with DF set (the inner
    packet's, for IP-IP and GRE), so a larger one is never delivered and applications see
    connections hang after the handshake (the seed's "packets seem to vanish")."""
    largest = path_mtu - OVERHEAD[kind]
    if tunnel_mtu <= largest:
        return None
    return (f"tunnel MTU {tunnel_mtu} + {OVERHEAD[kind]} bytes of {kind} encapsulation is more "
            f"than the path MTU {path_mtu} toward the gateway: start with -m {largest} or lower")


@dataclass(frozen=True, slots=True)
class ClientSettings:
    """What the client asks for and how it talks (the command line's choices)."""

    transport: str = "tcp"                    # "tcp" or "udp"
    ports: int = DEFAULT_PORTS                # -n: ports in the RSAP-IP block
    listens: tuple[int, ...] = ()             # -l: ports to LISTEN on from the start
    tunnel: TunnelKind = TunnelKind.UDP       # --tunnel: the kind asked for
    tunnel_port: int = 4556                   # this host's UDP port of the UDP framing
    lease: int | None = None                  # seconds asked for (None: the gateway's choice)
    auto_listen: bool = True                  # LISTEN for ports applications start on
    ignored_ports: tuple[tuple[int, int], ...] = ()  # never asked for automatically
    listen_linger: float = LISTEN_LINGER
    retransmit_first: float = RETRANSMIT_FIRST
    retries: int = RETRIES
    answer_timeout: float = ANSWER_TIMEOUT

    def __post_init__(self) -> None:
        if self.transport not in ("tcp", "udp"):
            raise ValueError(f"transport {self.transport!r}: use tcp or udp")
        if not 1 <= self.ports <= MAX_PORTS:
            raise ValueError(f"-n {self.ports}: ask for 1-{MAX_PORTS} ports (the RSIP Ports "
                             "parameter counts them in one byte)")
        for port in self.listens:
            if not 1 <= port <= 0xFFFF:
                raise ValueError(f"-l {port}: a port is 1-65535")
        if len(set(self.listens)) != len(self.listens):
            raise ValueError("-l: a port is given twice; give each once")
        object.__setattr__(self, "tunnel", TunnelKind(self.tunnel))
        if not 1 <= self.tunnel_port <= 0xFFFF:
            raise ValueError(f"--tunnel-port {self.tunnel_port}: a port is 1-65535")
        if self.lease is not None and not 1 <= self.lease <= COUNTER_MAX:
            raise ValueError(f"--lease {self.lease}: give seconds, at least 1")
        for first, last in self.ignored_ports:
            if not 1 <= first <= last <= 0xFFFF:
                raise ValueError(f"--ignore-port {first}-{last}: give FIRST-LAST within "
                                 "1-65535")
        if self.retries < 0 or self.retransmit_first <= 0 or self.answer_timeout <= 0:
            raise ValueError("retransmission timers must be positive")

    def ignores(self, port: int) -> bool:
        return any(first <= port <= last for first, last in self.ignored_ports)


# --- actions ----------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Connect:
    """Open the control channel (TCP connection, or UDP socket) to the server; answer with
    `connected` or `connection_lost`."""


@dataclass(frozen=True, slots=True)
class Disconnect:
    """Close the control channel (a TCP connection that stopped answering)."""

    reason: str


@dataclass(frozen=True, slots=True)
class Send:
    message: Message


@dataclass(frozen=True, slots=True)
class TunnelUp:
    """The leased address and port block, and where the tunnel goes: bring the tunnel up (or
    change it to these values)."""

    address: ipaddress.IPv4Address
    first: int
    last: int
    endpoint: ipaddress.IPv4Address
    kind: TunnelKind
    udp_port: int  # the gateway's tunnel UDP port (0 unless kind is UDP)


@dataclass(frozen=True, slots=True)
class TunnelDown:
    reason: str


@dataclass(frozen=True, slots=True)
class ClientBind:
    """One bind as the client holds it."""

    bind_id: int
    kind: str                         # "ports" (the RSAP-IP block) or "listen"
    address: ipaddress.IPv4Address
    first: int
    last: int
    expires: float
    lease: int                        # seconds granted with the last answer

    @property
    def count(self) -> int:
        return self.last - self.first + 1

    def holds(self, port: int) -> bool:
        return self.first <= port <= self.last


@dataclass(frozen=True, slots=True)
class BindAdded:
    bind: ClientBind


@dataclass(frozen=True, slots=True)
class BindRemoved:
    bind: ClientBind
    reason: str


@dataclass(frozen=True, slots=True)
class ListenRefused:
    """The gateway will not forward `port`: sockets listening on it must go (the application
    then behaves as if another program had the port)."""

    port: int
    reason: str


@dataclass(frozen=True, slots=True)
class Failed:
    """The client cannot go on: `line` is the seed's troubleshooting line, `detail` says why
    and what to do."""

    line: str
    detail: str

    def __str__(self) -> str:
        return f"{self.line} ({self.detail})" if self.detail else self.line


@dataclass(frozen=True, slots=True)
class Note:
    level: str  # "info", "warning", "debug"
    text: str


@dataclass(frozen=True, slots=True)
class Stopped:
    """The stop sequence is over (or could not be carried out): the daemon may finish."""


Action = (Connect | Disconnect | Send | TunnelUp | TunnelDown | BindAdded | BindRemoved
          | ListenRefused | Failed | Note | Stopped)


class Phase(StrEnum):
    IDLE = "idle"
    CONNECTING = "connecting"
    REGISTERING = "registering"
    REGISTERED = "registered"
    ASSIGNED = "assigned"
    WAITING = "waiting"          # for the next recovery attempt
    STOPPING = "de-registering"
    STOPPED = "stopped"
    FAILED = "failed"


class _Purpose(Enum):
    REGISTER = "register"
    FORGET = "forget"            # DE-REGISTER of a stale client ID: any answer will do
    ASSIGN = "assign"
    LISTEN = "listen"
    EXTEND = "extend"
    FREE = "free"
    DEREGISTER = "deregister"


_EXPECTED = {
    _Purpose.REGISTER: MessageType.REGISTER_RESPONSE,
    _Purpose.FORGET: MessageType.DE_REGISTER_RESPONSE,
    _Purpose.ASSIGN: MessageType.ASSIGN_RESPONSE_RSAP_IP,
    _Purpose.LISTEN: MessageType.LISTEN_RESPONSE,
    _Purpose.EXTEND: MessageType.EXTEND_RESPONSE,
    _Purpose.FREE: MessageType.FREE_RESPONSE,
    _Purpose.DEREGISTER: MessageType.DE_REGISTER_RESPONSE,
}
_ASYNCHRONOUS = frozenset({MessageType.ERROR_RESPONSE, MessageType.DE_REGISTER_RESPONSE,
                           MessageType.FREE_RESPONSE})
_LOST_REGISTRATION = frozenset({ErrorCode.REGISTER_FIRST, ErrorCode.BAD_CLIENT_ID})


@dataclass(slots=True)
class _Request:
    purpose: _Purpose
    port: int = 0         # LISTEN
    bind_id: int = 0      # EXTEND, FREE
    client_id: int = 0    # FORGET
    message: Message | None = None
    counter: int | None = None
    attempts: int = 0
    deadline: float = 0.0


class _ListenState(Enum):
    WANTED = "wanted"
    ASKING = "asking"
    HELD = "held"
    FREEING = "freeing"
    REFUSED = "refused"


@dataclass(slots=True)
class _Listen:
    static: bool                      # -l: kept whatever the sockets do
    state: _ListenState = _ListenState.WANTED
    bind_id: int = 0
    absent_since: float | None = None
    reason: str = ""


@dataclass(slots=True)
class _Held:
    bind: ClientBind
    extend_at: float
    extending: bool = False


@dataclass
class ClientCounters:
    sent: dict[str, int] = field(default_factory=dict)
    received: dict[str, int] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)     # ERROR_RESPONSE codes received
    ignored: dict[str, int] = field(default_factory=dict)    # messages dropped, by reason
    retransmissions: int = 0
    gave_up: int = 0
    recoveries: int = 0
    listens_refused: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {"sent": dict(self.sent), "received": dict(self.received),
                "errors": dict(self.errors), "ignored": dict(self.ignored),
                "retransmissions": self.retransmissions, "gave_up": self.gave_up,
                "recoveries": self.recoveries, "listens_refused": self.listens_refused}


class _BadAnswer(Exception):
    """An answer that lacks what it must carry for this client."""


def _bump(table: dict[str, int], key: str) -> None:
    table[key] = table.get(key, 0) + 1


def _error_name(code: int) -> str:
    try:
        return ErrorCode(code).name
    except ValueError:
        return f"error {code}"


# What to do about a refused ASSIGN or REGISTER, said to the user.
_ASSIGN_HINTS: dict[int, str] = {
    ErrorCode.LOCAL_ADDR_UNAVAILABLE: "the server has no public address free; check its POOL",
    ErrorCode.LOCAL_ADDRPORT_UNAVAILABLE: "no block of that many free ports is left; ask for "
                                          "fewer with -n or widen the server's PORT_RANGE",
    ErrorCode.LOCAL_ADDRPORT_INUSE: "the ports are held by another host or rest in quarantine "
                                    "after their release; try again in two minutes",
    ErrorCode.LOCAL_ADDR_UNALLOWED: "the server's POOL does not allow that address",
    ErrorCode.LOCAL_ADDRPORT_UNALLOWED: "the server's policy does not allow these ports; ask "
                                        "for fewer with -n",
    ErrorCode.BAD_TUNNEL_TYPE: "the server does not offer this tunnel; choose another with "
                               "--tunnel",
    ErrorCode.FLOW_POLICY_VIOLATION: "the server demands a flow policy this client does not "
                                     "follow (remote addresses per bind)",
    ErrorCode.REMOTE_ADDR_UNALLOWED: "the server's flow policy refuses any remote address",
}
_REGISTER_HINTS: dict[int, str] = {
    ErrorCode.REGISTRATION_DENIED: "the server refuses more clients; raise MAX_CLIENTS on the "
                                   "server (0 allows five per public address)",
    ErrorCode.USE_TCP: "the server takes RSIP over TCP only; start with --transport tcp",
    ErrorCode.MESSAGE_COUNTER_REQUIRED: "the server wants message counters; use --transport "
                                        "udp or tcp as it expects",
    ErrorCode.UNSUPPORTED_RSIP_VERSION: "the server speaks another RSIP version",
}


class ClientEngine:
    """One client's registration with one RSIP server, its binds, and its tunnel's values."""

    def __init__(self, settings: ClientSettings, server: str | ipaddress.IPv4Address) -> None:
        self.settings = settings
        self.server = ipaddress.IPv4Address(server)
        self.counters = ClientCounters()
        self.phase = Phase.IDLE
        self.client_id: int | None = None
        self.registration_expires: float | None = None
        self.tunnel_kind: TunnelKind | None = None  # what the gateway granted
        self.gateway_udp_port = 0
        self.endpoint: ipaddress.IPv4Address | None = None
        self.flow_policy: tuple[int, int] | None = None
        self.binds: dict[int, _Held] = {}
        self.main: int | None = None                # bind ID of the RSAP-IP block
        self.listens: dict[int, _Listen] = {p: _Listen(static=True) for p in settings.listens}
        self.ever_up = False                        # the tunnel was up once
        self.stopping = False
        self._actions: list[Action] = []
        self._queue: deque[_Request] = deque()
        self._inflight: _Request | None = None
        self._link = "down"                         # "down", "connecting", "up"
        self._counter = 1                           # next UDP message counter
        self._retry_at: float | None = None
        self._backoff = 0                           # index into BACKOFF
        self._forget: int | None = None             # a stale client ID to de-register first
        self._already_registered = 0
        self._present: set[int] = set()             # ports listened on, from the last scan
        self._failed = False
        self._stopped = False
        self._unwanted: set[int] = set()            # binds granted that are to be freed

    # --- events --------------------------------------------------------------------------------
    def start(self, now: float) -> None:
        """Begin: ask for the control channel."""
        if self.phase is not Phase.IDLE:
            return
        self._connect()

    def connected(self, now: float) -> None:
        """The control channel is up: register (again)."""
        if self.stopping or self._link != "connecting":
            return
        self._link = "up"
        self._register_again(now)
        self._pump(now)

    def connection_lost(self, reason: str, now: float) -> None:
        """The control channel failed: a connection refused or broken, an ICMP error."""
        if self._link == "down":
            _bump(self.counters.ignored, "connection_event_while_down")
            return
        self._link = "down"
        self._drop_requests(now)
        if self.stopping:
            self._finish_stop("the connection to the server is gone")
            return
        if not self.ever_up:
            self._fail(f"{CONNECT_FAILED}: {reason}",
                       f"server {self.server}: is rsipd running there and its port open to "
                       "this side (INT_IF)?")
            return
        self._recover(now, f"connection to the server lost: {reason}")

    def receive(self, data: bytes | Message | RsipWireError, now: float) -> None:
        """A message from the server: a datagram's bytes, or what a stream reader made of
        TCP data."""
        if isinstance(data, bytes | bytearray | memoryview):
            try:
                data = wire.decode(bytes(data))
            except RsipWireError as exc:
                data = exc
        if isinstance(data, RsipWireError):
            # RFC 3103 section 9.1.3: a host silently discards a message it finds in error
            _bump(self.counters.ignored, "malformed")
            return
        message = data
        _bump(self.counters.received, message.type.name)
        request = self._answered_by(message)
        if request is None:
            if message.type in _ASYNCHRONOUS:
                self._asynchronous(message, now)
            self._pump(now)
            return
        self._inflight = None
        if request.counter is not None:
            self._counter = request.counter % COUNTER_MAX + 1
        if message.type is MessageType.ERROR_RESPONSE:
            self._refused(request, message, now)
        else:
            try:
                self._answer(request, message, now)
            except (RsipWireError, _BadAnswer) as exc:
                _bump(self.counters.ignored, "bad_answer")
                self._unusable_answer(request, message, str(exc), now)
        self._pump(now)

    def listening(self, ports: Iterable[int], now: float) -> None:
        """The ports that have listening sockets (TCP LISTEN, unconnected bound UDP) on the
        public or the wildcard address, from the daemon's latest look."""
        if not self.settings.auto_listen:
            return
        present = {p for p in ports if not self.settings.ignores(p)}
        self._present = present
        for port in present:
            entry = self.listens.get(port)
            if entry is not None:
                entry.absent_since = None
            elif not self._held_port(port):
                self.listens[port] = _Listen(static=False)
        for port, entry in list(self.listens.items()):
            if entry.static or port in present:
                continue
            if entry.state in (_ListenState.WANTED, _ListenState.REFUSED):
                del self.listens[port]  # gone before it was asked for, or refused and closed
            elif entry.state is _ListenState.HELD and entry.absent_since is None:
                entry.absent_since = now
        self._ask_listens()
        self._pump(now)

    def tunnel_failed(self, line: str, detail: str, now: float) -> None:
        """The daemon could not bring the tunnel up (device, routes, MTU)."""
        self._fail(line, detail)

    def stop(self, now: float) -> None:
        """Free every bind and de-register; `Stopped` when done (at once if not registered)."""
        if self.stopping:
            return
        self.stopping = True
        self._retry_at = None
        self._queue.clear()
        if self.phase is not Phase.FAILED:
            self.phase = Phase.STOPPING
        registering = (self._inflight is not None
                       and self._inflight.purpose is _Purpose.REGISTER)
        if self._link != "up" or (self.client_id is None and not registering):
            self._finish_stop("not registered")
            return
        self._pump(now)

    def handle_timer(self, now: float) -> None:
        request = self._inflight
        if request is not None and request.deadline <= now:
            udp = self.settings.transport == "udp"
            if udp and request.attempts <= self.settings.retries:
                assert request.message is not None
                request.deadline = now + self.settings.retransmit_first * 2 ** request.attempts
                request.attempts += 1
                self.counters.retransmissions += 1
                _bump(self.counters.sent, request.message.type.name)
                self._actions.append(Send(request.message))
            else:
                self._inflight = None
                self.counters.gave_up += 1
                self._gave_up(request, now)
        if self._retry_at is not None and self._retry_at <= now:
            self._retry_at = None
            self._retry(now)
        if not self.stopping and not self._failed:
            self._bind_timers(now)
        self._pump(now)

    def next_timer(self) -> float | None:
        times: list[float] = []
        if self._inflight is not None:
            times.append(self._inflight.deadline)
        if self._retry_at is not None:
            times.append(self._retry_at)
        if not self.stopping and not self._failed:
            for held in self.binds.values():
                times.append(held.bind.expires)
                if not held.extending:
                    times.append(held.extend_at)
            if not self.binds and self.registration_expires is not None \
                    and self.phase in (Phase.REGISTERED, Phase.ASSIGNED):
                times.append(self.registration_expires)
            for entry in self.listens.values():
                if entry.state is _ListenState.HELD and entry.absent_since is not None:
                    times.append(entry.absent_since + self.settings.listen_linger)
        return min(times) if times else None

    def actions(self) -> list[Action]:
        actions, self._actions = self._actions, []
        return actions

    # --- what the daemon reads -----------------------------------------------------------------
    @property
    def main_bind(self) -> ClientBind | None:
        held = self.binds.get(self.main) if self.main is not None else None
        return held.bind if held is not None else None

    def held_ranges(self) -> list[tuple[int, int]]:
        """The port ranges of every bind held, in order."""
        return sorted((h.bind.first, h.bind.last) for h in self.binds.values())

    def status(self, now: float) -> dict[str, Any]:
        binds = []
        for held in sorted(self.binds.values(), key=lambda h: h.bind.bind_id):
            bind = held.bind
            binds.append({"bind_id": bind.bind_id, "kind": bind.kind,
                          "address": str(bind.address), "first": bind.first,
                          "last": bind.last, "count": bind.count,
                          "ports": (str(bind.first) if bind.count == 1
                                    else f"{bind.first}-{bind.last}"),
                          "lease_s": max(0, round(bind.expires - now))})
        registration = (max(0, round(self.registration_expires - now))
                        if self.registration_expires is not None and self.client_id is not None
                        else None)
        return {
            "state": str(self.phase), "client_id": self.client_id,
            "registration_s": registration, "transport": self.settings.transport,
            "server": str(self.server),
            "tunnel_kind": str(self.tunnel_kind) if self.tunnel_kind else None,
            "endpoint": str(self.endpoint) if self.endpoint else None,
            "gateway_udp_port": self.gateway_udp_port or None,
            "binds": binds,
            "listens": {str(port): {"static": e.static, "state": e.state.value,
                                    "bind_id": e.bind_id or None, "reason": e.reason or None}
                        for port, e in sorted(self.listens.items())},
            "ignored_ports": [f"{a}-{b}" for a, b in self.settings.ignored_ports],
            "counters": self.counters.as_dict(),
        }

    # --- requests --------------------------------------------------------------------------------
    def _connect(self) -> None:
        self._link = "connecting"
        self.phase = Phase.CONNECTING
        self._actions.append(Connect())

    def _register_again(self, now: float) -> None:
        self.phase = Phase.REGISTERING
        self._drop_requests(now)
        if self._forget is not None:
            self._queue.append(_Request(_Purpose.FORGET, client_id=self._forget))
        self._queue.append(_Request(_Purpose.REGISTER))

    def _pump(self, now: float) -> None:
        """Send the next request if none is in flight."""
        if self._inflight is not None or self._link != "up" or self._failed_for_good():
            return
        if self.stopping:
            request = self._next_stop_request()
            if request is None:
                self._finish_stop("not registered")
                return
        elif self._unwanted and self.client_id is not None:
            request = _Request(_Purpose.FREE, bind_id=min(self._unwanted))
        elif self._queue:
            request = self._queue.popleft()
        else:
            return
        self._send(request, now)

    def _failed_for_good(self) -> bool:
        return self._failed and not self.stopping

    def _next_stop_request(self) -> _Request | None:
        if self.client_id is None:
            return None
        for bind_id in sorted(self._unwanted | set(self.binds)):
            return _Request(_Purpose.FREE, bind_id=bind_id)
        return _Request(_Purpose.DEREGISTER)

    def _send(self, request: _Request, now: float) -> None:
        params = self._params(request)
        udp = self.settings.transport == "udp"
        if udp:
            request.counter = self._counter
            params.insert(self._counter_position(request), MessageCounter(self._counter))
        request.message = Message(self._request_type(request), tuple(params))
        request.attempts = 1
        request.deadline = now + (self.settings.retransmit_first if udp
                                  else self.settings.answer_timeout)
        self._inflight = request
        _bump(self.counters.sent, request.message.type.name)
        self._actions.append(Send(request.message))

    @staticmethod
    def _request_type(request: _Request) -> MessageType:
        return {
            _Purpose.REGISTER: MessageType.REGISTER_REQUEST,
            _Purpose.FORGET: MessageType.DE_REGISTER_REQUEST,
            _Purpose.ASSIGN: MessageType.ASSIGN_REQUEST_RSAP_IP,
            _Purpose.LISTEN: MessageType.LISTEN_REQUEST,
            _Purpose.EXTEND: MessageType.EXTEND_REQUEST,
            _Purpose.FREE: MessageType.FREE_REQUEST,
            _Purpose.DEREGISTER: MessageType.DE_REGISTER_REQUEST,
        }[request.purpose]

    @staticmethod
    def _counter_position(request: _Request) -> int:
        """Where the Message Counter goes: after the required parameters (RFC 3103 section 9
        lists it first among the optional ones)."""
        return {_Purpose.REGISTER: 0, _Purpose.FORGET: 1, _Purpose.DEREGISTER: 1,
                _Purpose.ASSIGN: 5, _Purpose.LISTEN: 5, _Purpose.EXTEND: 2,
                _Purpose.FREE: 2}[request.purpose]

    def _params(self, request: _Request) -> list[Any]:
        settings = self.settings
        wants_udp = settings.tunnel is TunnelKind.UDP
        purpose = request.purpose
        if purpose is _Purpose.REGISTER:
            return [wire.udp_tunnel_param(settings.tunnel_port)] if wants_udp else []
        if purpose is _Purpose.FORGET:
            return [ClientId(request.client_id)]
        assert self.client_id is not None
        client = ClientId(self.client_id)
        if purpose is _Purpose.DEREGISTER:
            return [client]
        if purpose in (_Purpose.EXTEND, _Purpose.FREE):
            params: list[Any] = [client, BindId(request.bind_id)]
            if purpose is _Purpose.EXTEND and settings.lease:
                params.append(LeaseTime(settings.lease))
            return params
        if purpose is _Purpose.ASSIGN:
            params = [client, Address.dont_care(), Ports.any(settings.ports),
                      Address.dont_care(), Ports.any(1)]
        else:
            # LISTEN on the address of our block: the tunnel device holds that one only
            main = self.main_bind
            local = Address.of(main.address) if main is not None else Address.dont_care()
            params = [client, local, Ports.single(request.port), Address.dont_care(),
                      Ports.any(1)]
        if settings.lease:
            params.append(LeaseTime(settings.lease))
        kind = self.tunnel_kind or settings.tunnel
        params.append(Tunnel(TunnelType.GRE if kind is TunnelKind.GRE else TunnelType.IP_IP))
        if kind is TunnelKind.UDP:
            params.append(wire.udp_tunnel_param(settings.tunnel_port))
        return params

    # --- answers -------------------------------------------------------------------------------
    def _answered_by(self, message: Message) -> _Request | None:
        """The request in flight if `message` answers it; None for asynchronous or stale
        messages (counted)."""
        request = self._inflight
        if self.settings.transport == "udp":
            counter = message.counter
            if counter is None or counter == 0:
                if message.type not in _ASYNCHRONOUS:
                    _bump(self.counters.ignored, "no_counter")
                return None
            if request is None or counter != request.counter:
                _bump(self.counters.ignored, "stale_counter")
                return None
        elif request is None:
            if message.type not in _ASYNCHRONOUS:
                _bump(self.counters.ignored, "unexpected")
            return None
        expected = _EXPECTED[request.purpose]
        if message.type is MessageType.ERROR_RESPONSE:
            return request
        if message.type is not expected:
            if self.settings.transport == "tcp" and message.type in _ASYNCHRONOUS:
                return None
            _bump(self.counters.ignored, "wrong_answer_type")
            return None
        if request.purpose is _Purpose.FREE and message.bind_id != request.bind_id:
            if self.settings.transport == "tcp":
                return None  # a FREE_RESPONSE about another bind: the gateway revoked it
            _bump(self.counters.ignored, "wrong_bind_id")
            return None
        return request

    def _answer(self, request: _Request, message: Message, now: float) -> None:
        purpose = request.purpose
        if purpose is _Purpose.REGISTER:
            self._registered(message, now)
        elif purpose is _Purpose.FORGET:
            if request.client_id == self.client_id:
                self.client_id = None
            self._forget = None
        elif purpose is _Purpose.ASSIGN:
            self._assigned(message, now)
        elif purpose is _Purpose.LISTEN:
            self._listen_granted(request.port, message, now)
        elif purpose is _Purpose.EXTEND:
            self._extended(request.bind_id, message, now)
        elif purpose is _Purpose.FREE:
            self._freed(request.bind_id, "freed")
        elif purpose is _Purpose.DEREGISTER:
            self._finish_stop("de-registered")

    def _registered(self, message: Message, now: float) -> None:
        client_id = message.require(ClientId).value
        lease = message.require(LeaseTime).seconds
        if self.binds:
            # a new registration: whatever the host held before belonged to one the gateway
            # no longer knows (even if it hands out the same client ID again)
            self._drop_binds("the server no longer knows the registration they belonged to")
        self.client_id = client_id
        if self.stopping:
            return  # the stop sequence de-registers it at once
        self._already_registered = 0
        self.registration_expires = now + lease
        policy = message.first(FlowPolicy)
        self.flow_policy = (int(policy.local), int(policy.remote)) if policy else None
        offered = self._offered_tunnels(message)
        kind = self._choose_tunnel(offered)
        if kind is None:
            self._setback(ASSIGN_FAILED, f"the server offers the tunnels "
                                         f"{', '.join(offered) or 'none'} and not "
                                         f"{self.settings.tunnel}; choose one with --tunnel",
                          now)
            return
        self.tunnel_kind = kind
        self.phase = Phase.REGISTERED
        self._note("info", f"registered with RSIP server {self.server} over "
                           f"{self.settings.transport} as client {client_id} (lease {lease} s)")
        self._queue_assign()
        self._ask_listens()

    def _offered_tunnels(self, message: Message) -> list[str]:
        kinds = {int(t.kind) for t in message.all(Tunnel)} or {int(TunnelType.IP_IP)}
        offered = []
        if wire.udp_tunnel_port(message):
            offered.append(TunnelKind.UDP)
        if int(TunnelType.IP_IP) in kinds:
            offered.append(TunnelKind.IPIP)
        if int(TunnelType.GRE) in kinds:
            offered.append(TunnelKind.GRE)
        return [str(k) for k in offered]

    def _choose_tunnel(self, offered: list[str]) -> TunnelKind | None:
        wanted = self.settings.tunnel
        if wanted in offered:
            return wanted
        if wanted is TunnelKind.UDP:
            # a gateway without ipshift's framing: the RFC's own tunnels, IP-IP first
            for fallback in (TunnelKind.IPIP, TunnelKind.GRE):
                if fallback in offered:
                    self._note("warning", f"the server does not offer the UDP tunnel; using "
                                          f"{fallback}")
                    return fallback
        return None

    def _bind_from(self, message: Message, kind: str, now: float) -> tuple[ClientBind, str]:
        """The bind an ASSIGN_RESPONSE_RSAP-IP or LISTEN_RESPONSE grants, and what is wrong
        with it for this client ("" if nothing)."""
        bind_id = message.require(BindId).value
        lease = message.require(LeaseTime).seconds
        addresses = message.all(Address)
        ports = message.all(Ports)
        if not addresses or not ports:
            raise _BadAnswer("no local address and ports")
        local = addresses[0].value
        problem = ""
        address = ipaddress.IPv4Address(0)
        first = last = 0
        if not isinstance(local, ipaddress.IPv4Address) or int(local) == 0:
            problem = "no IPv4 address in the assignment"
        else:
            address = local
            try:
                granted = sorted(set(ports[0].expand()))
            except (ValueError, RsipWireError):
                granted = []
            if not granted or granted[-1] - granted[0] + 1 != len(granted):
                problem = "the ports granted are not one block"
            else:
                first, last = granted[0], granted[-1]
        bind = ClientBind(bind_id, kind, address, first, last, now + lease, lease)
        return bind, problem

    def _grant_tunnel(self, message: Message) -> tuple[TunnelKind, int, ipaddress.IPv4Address]:
        """The tunnel an answer grants: kind, the gateway's UDP port, the endpoint."""
        udp_port = wire.udp_tunnel_port(message)
        tunnel = message.first(Tunnel)
        if udp_port:
            kind = TunnelKind.UDP
        elif tunnel is not None and int(tunnel.kind) == int(TunnelType.GRE):
            kind = TunnelKind.GRE
        elif tunnel is None or int(tunnel.kind) == int(TunnelType.IP_IP):
            kind = TunnelKind.IPIP
        else:
            raise _BadAnswer(f"tunnel type {int(tunnel.kind)} is none this client speaks")
        addresses = message.all(Address)
        endpoint = self.server
        if len(addresses) >= 3 and isinstance(addresses[2].value, ipaddress.IPv4Address) \
                and int(addresses[2].value) != 0:
            endpoint = addresses[2].value
        return kind, udp_port or 0, endpoint

    def _assigned(self, message: Message, now: float) -> None:
        bind, problem = self._bind_from(message, "ports", now)
        if self.stopping:
            self._hold(bind, now)  # for the stop sequence to free
            return
        if self.main is not None:
            _bump(self.counters.ignored, "second_assignment")
            self._unwanted.add(bind.bind_id)
            return
        kind, udp_port, endpoint = self._grant_tunnel(message)
        if not problem and bind.count < self.settings.ports:
            problem = f"{bind.count} ports granted where {self.settings.ports} were asked for"
        if problem:
            # RFC 3103 section 9.9.3: free what the host does not understand
            self._unwanted.add(bind.bind_id)
            self._setback(ASSIGN_FAILED, f"the server's assignment is unusable: {problem}", now)
            return
        self.tunnel_kind, self.gateway_udp_port, self.endpoint = kind, udp_port, endpoint
        self._hold(bind, now)
        self.main = bind.bind_id
        self.phase = Phase.ASSIGNED
        self.ever_up = True
        self._backoff = 0
        self._note("info", f"leased {bind.address} ports {bind.first}-{bind.last} (bind "
                           f"{bind.bind_id}, {bind.lease} s), {kind} tunnel to {endpoint}"
                           + (f" port {udp_port}" if udp_port else ""))
        self._actions.append(BindAdded(bind))
        self._actions.append(TunnelUp(bind.address, bind.first, bind.last, endpoint, kind,
                                      udp_port))
        # a port applications listen on may lie inside the new block: nothing to ask then
        for port, entry in list(self.listens.items()):
            if not entry.static and entry.state is _ListenState.WANTED and bind.holds(port):
                del self.listens[port]
        self._ask_listens()

    @property
    def static_listens_settled(self) -> bool:
        """Whether every -l port has its answer (held or refused)."""
        return all(entry.state in (_ListenState.HELD, _ListenState.REFUSED)
                   for entry in self.listens.values() if entry.static)

    def _listen_granted(self, port: int, message: Message, now: float) -> None:
        bind, problem = self._bind_from(message, "listen", now)
        if self.stopping:
            self._hold(bind, now)  # for the stop sequence to free
            return
        main = self.main_bind
        if not problem and (bind.first, bind.last) != (port, port):
            problem = f"port {bind.first}-{bind.last} granted where {port} was asked for"
        if not problem and main is not None and bind.address != main.address:
            problem = f"granted on {bind.address}, not on the tunnel's {main.address}"
        entry = self.listens.get(port)
        if problem:
            self._unwanted.add(bind.bind_id)
            self._refuse_listen(port, f"the server's answer is unusable: {problem}")
            return
        self._hold(bind, now)
        self._actions.append(BindAdded(bind))
        if entry is None:  # dropped meanwhile (cannot happen for a request in flight)
            entry = self.listens[port] = _Listen(static=False)
        entry.state = _ListenState.HELD
        entry.bind_id = bind.bind_id
        entry.reason = ""
        if not entry.static and port not in self._present and entry.absent_since is None:
            entry.absent_since = now  # closed while it was asked for: the linger starts now
        self._note("info", f"listening on {bind.address} port {port} (bind {bind.bind_id})")

    def _extended(self, bind_id: int, message: Message, now: float) -> None:
        held = self.binds.get(bind_id)
        lease = message.require(LeaseTime).seconds
        if held is None:
            _bump(self.counters.ignored, "extend_of_unknown_bind")
            return
        bind = ClientBind(held.bind.bind_id, held.bind.kind, held.bind.address,
                          held.bind.first, held.bind.last, now + lease, lease)
        self._hold(bind, now)
        if self.phase in (Phase.REGISTERING, Phase.REGISTERED) and self.main is not None:
            self.phase = Phase.ASSIGNED  # a resumed registration proved alive
            self._backoff = 0

    def _freed(self, bind_id: int, reason: str) -> None:
        self._unwanted.discard(bind_id)
        held = self.binds.pop(bind_id, None)
        if held is None:
            return
        self._actions.append(BindRemoved(held.bind, reason))
        if bind_id == self.main:
            self.main = None
            self._actions.append(TunnelDown(reason))
        for port, entry in list(self.listens.items()):
            if entry.bind_id == bind_id:
                if entry.static or (port in self._present and not self.stopping):
                    entry.state, entry.bind_id = _ListenState.WANTED, 0
                else:
                    del self.listens[port]

    def _hold(self, bind: ClientBind, now: float) -> None:
        self.binds[bind.bind_id] = _Held(bind, now + bind.lease * EXTEND_AT)
        if self.registration_expires is None or bind.expires > self.registration_expires:
            self.registration_expires = bind.expires  # R = max(R, B): RFC 3103 section 6

    # --- refusals --------------------------------------------------------------------------------
    def _refused(self, request: _Request, message: Message, now: float) -> None:
        error = message.first(Error)
        code = int(error.code) if error is not None else int(ErrorCode.UNKNOWN_ERROR)
        name = _error_name(code)
        _bump(self.counters.errors, name)
        purpose = request.purpose
        if purpose is _Purpose.FORGET:
            self._forget = None  # RFC 3103 section 10.2.2: this error is to be ignored
            if request.client_id == self.client_id:
                self.client_id = None
            return
        if purpose is _Purpose.DEREGISTER:
            self._finish_stop(f"de-registration answered {name}")
            return
        if self.stopping:
            if code in _LOST_REGISTRATION:
                self._finish_stop(f"the server answered {name}: nothing left to free")
            elif purpose is _Purpose.FREE:
                self._freed(request.bind_id, f"freed (the server answered {name})")
            return
        if code in _LOST_REGISTRATION:
            self._registration_lost(f"the server answered {name}", now)
            return
        if purpose is _Purpose.REGISTER:
            self._register_refused(code, message, now)
        elif purpose is _Purpose.ASSIGN:
            hint = _ASSIGN_HINTS.get(code, "see the server's log")
            self._setback(ASSIGN_FAILED, f"{name}: {hint}", now)
        elif purpose is _Purpose.LISTEN:
            self._refuse_listen(request.port, f"the server answered {name}")
        elif purpose is _Purpose.EXTEND:
            held = self.binds.get(request.bind_id)
            if held is not None:
                held.extending = False
            if code == ErrorCode.BAD_BIND_ID:
                self._bind_lost(request.bind_id, "the server no longer knows it", now)
            else:
                self._note("warning", f"extending bind {request.bind_id} refused: {name}")
                self._retry_extend(request.bind_id, now)
        elif purpose is _Purpose.FREE:
            # the states were out of step (RFC 3103 section 9.12.3): the bind is gone anyway
            self._freed(request.bind_id, f"freed (the server answered {name})")

    def _register_refused(self, code: int, message: Message, now: float) -> None:
        if code == ErrorCode.ALREADY_REGISTERED:
            holder = message.client_id
            if holder is not None and holder == self.client_id and self.binds:
                # our registration lives on (a broken connection, a restarted gateway that
                # kept its leases): check every bind rather than start over
                self._already_registered = 0
                self.phase = Phase.REGISTERED
                self._note("info", f"registration {holder} is still in force; checking its "
                                   "binds")
                for bind_id in sorted(self.binds):
                    self._queue_extend(bind_id)
                self._queue_assign()
                self._ask_listens()
                return
            self._already_registered += 1
            if holder is None or self._already_registered > ALREADY_REGISTERED_LIMIT:
                self._setback(REGISTER_FAILED, "the server says this host is registered "
                                               "already and de-registering does not help; see "
                                               "the server's log", now)
                return
            # RFC 3103 section 10.2.1: our old registration (before a restart): end it first
            if self.binds:
                self._drop_binds("they belonged to an older registration")
            self._forget = holder
            self._register_again(now)
            return
        hint = _REGISTER_HINTS.get(code, "see the server's log")
        self._setback(REGISTER_FAILED, f"{_error_name(code)}: {hint}", now)

    def _refuse_listen(self, port: int, reason: str) -> None:
        entry = self.listens.get(port)
        if entry is None:
            return
        entry.state, entry.bind_id, entry.reason = _ListenState.REFUSED, 0, reason
        self.counters.listens_refused += 1
        self._note("warning", f"port {port} cannot be listened on from the Internet: {reason}"
                   + ("" if entry.static else "; its listening sockets are closed"))
        self._actions.append(ListenRefused(port, reason))

    def _unusable_answer(self, request: _Request, message: Message, problem: str,
                         now: float) -> None:
        """An answer missing what it must carry (RFC 3103 section 9.1.3: discarded)."""
        detail = f"the server's {message.type.name} is unusable: {problem}"
        if self.stopping:
            self._finish_stop(detail)
        elif request.purpose is _Purpose.REGISTER:
            self._setback(REGISTER_FAILED, detail, now)
        elif request.purpose in (_Purpose.ASSIGN, _Purpose.EXTEND) or not self.ever_up:
            self._setback(ASSIGN_FAILED, detail, now)
        elif request.purpose is _Purpose.LISTEN:
            self._refuse_listen(request.port, detail)
        else:
            self._note("warning", detail)

    # --- failures and recovery -----------------------------------------------------------------
    def _gave_up(self, request: _Request, now: float, reason: str | None = None) -> None:
        if reason is None:
            reason = (f"no answer after {self.settings.retries + 1} attempts"
                      if self.settings.transport == "udp" else
                      f"no answer within {self.settings.answer_timeout:g} s")
        if self.stopping:
            self._finish_stop(f"the server did not answer ({reason})")
            return
        what = request.message.type.name if request.message is not None else "request"
        if request.purpose is _Purpose.EXTEND and self.settings.transport == "udp":
            held = self.binds.get(request.bind_id)
            if held is not None:
                held.extending = False
            self._note("warning", f"extending bind {request.bind_id}: {reason}")
            self._retry_extend(request.bind_id, now)
            return
        if not self.ever_up:
            if request.purpose in (_Purpose.REGISTER, _Purpose.FORGET):
                self._fail(f"{CONNECT_FAILED}: {reason}",
                           f"server {self.server} over {self.settings.transport}: is rsipd "
                           "running there and its port open to this side?")
            else:
                self._fail(ASSIGN_FAILED, f"{what}: {reason}")
            return
        if self.settings.transport == "tcp":
            self._link = "down"
            self._actions.append(Disconnect(f"{what}: {reason}"))
        self._recover(now, f"{what}: {reason}")

    def _setback(self, line: str, detail: str, now: float) -> None:
        """A refusal: fatal before the tunnel was ever up, else retried with backoff."""
        if not self.ever_up:
            self._fail(line, detail)
            return
        self._recover(now, f"{line} ({detail})")

    def _registration_lost(self, reason: str, now: float) -> None:
        if self.client_id is not None:
            self._forget = self.client_id
        self.client_id = None
        self.registration_expires = None
        self._unwanted.clear()
        self._drop_binds(reason)
        if not self.ever_up:
            self._fail(REGISTER_FAILED, f"{reason} right after registering; see the server's "
                                        "log")
            return
        self._recover(now, reason)

    def _drop_binds(self, reason: str) -> None:
        for bind_id in sorted(self.binds):
            self._freed(bind_id, reason)

    def _recover(self, now: float, reason: str) -> None:
        delay = BACKOFF[min(self._backoff, len(BACKOFF) - 1)]
        self._backoff += 1
        self.counters.recoveries += 1
        self._drop_requests(now)
        self.phase = Phase.WAITING
        self._note("warning", f"{reason}; trying again" + (f" in {delay:g} s" if delay else ""))
        if delay:
            self._retry_at = now + delay
        else:
            self._retry(now)

    def _retry(self, now: float) -> None:
        if self.stopping:
            return
        if self._link == "up":
            self._register_again(now)
        elif self._link == "down":
            self._connect()

    def _fail(self, line: str, detail: str) -> None:
        if self._failed:
            return
        self._failed = True
        self.phase = Phase.FAILED
        self._queue.clear()
        self._retry_at = None
        self._actions.append(Failed(line, detail))

    def _finish_stop(self, reason: str) -> None:
        if self.phase is Phase.STOPPED or self._stopped:
            return
        self._stopped = True
        self._inflight = None
        self._queue.clear()
        for bind_id in sorted(self.binds):
            self._freed(bind_id, "stopped")
        if self.phase is not Phase.FAILED:
            self.phase = Phase.STOPPED
        self.client_id = None
        self._note("info", f"RSIP client stopped: {reason}")
        self._actions.append(Stopped())

    # --- asynchronous messages -----------------------------------------------------------------
    def _asynchronous(self, message: Message, now: float) -> None:
        client_id = message.client_id
        if client_id is not None and client_id != self.client_id:
            # RFC 3103 section 10.2.1: news about a registration this host does not know
            _bump(self.counters.ignored, "foreign_client_id")
            return
        if message.type is MessageType.DE_REGISTER_RESPONSE:
            if client_id is None:
                _bump(self.counters.ignored, "no_client_id")
                return
            if self.stopping:
                self._finish_stop("the server ended the registration")
                return
            self.client_id = None  # ended by the server: nothing left to de-register
            self._registration_lost("the server ended the registration", now)
        elif message.type is MessageType.FREE_RESPONSE:
            bind_id = message.bind_id
            if bind_id is None or bind_id not in self.binds:
                _bump(self.counters.ignored, "unknown_bind_id")
                return
            self._bind_lost(bind_id, "the server revoked it", now)
        else:
            error = message.first(Error)
            code = int(error.code) if error is not None else int(ErrorCode.UNKNOWN_ERROR)
            _bump(self.counters.errors, _error_name(code))
            if code in _LOST_REGISTRATION and self.client_id is not None and not self.stopping:
                self._registration_lost(f"the server says {_error_name(code)}", now)
            else:
                self._note("warning", f"the RSIP server reports {_error_name(code)}")

    # --- binds over time ------------------------------------------------------------------------
    def _bind_timers(self, now: float) -> None:
        for bind_id, held in list(self.binds.items()):
            if held.bind.expires <= now:
                self._bind_lost(bind_id, "its lease ran out", now)
            elif not held.extending and held.extend_at <= now:
                self._queue_extend(bind_id)
        if not self.binds and self.registration_expires is not None \
                and self.registration_expires <= now and self.client_id is not None \
                and self.phase in (Phase.REGISTERED, Phase.ASSIGNED):
            self._registration_lost("the registration's lease ran out", now)
        for entry in self.listens.values():
            if entry.state is _ListenState.HELD and entry.absent_since is not None \
                    and entry.absent_since + self.settings.listen_linger <= now:
                entry.state = _ListenState.FREEING
                entry.absent_since = None
                self._queue.append(_Request(_Purpose.FREE, bind_id=entry.bind_id))

    def _queue_extend(self, bind_id: int) -> None:
        held = self.binds.get(bind_id)
        if held is None or held.extending:
            return
        held.extending = True
        self._queue.append(_Request(_Purpose.EXTEND, bind_id=bind_id))

    def _retry_extend(self, bind_id: int, now: float) -> None:
        """Try again halfway to the bind's expiry (it expires if no attempt gets through)."""
        held = self.binds.get(bind_id)
        if held is not None:
            held.extend_at = now + max(EXTEND_RETRY_MIN, (held.bind.expires - now) / 2)

    def _bind_lost(self, bind_id: int, reason: str, now: float) -> None:
        held = self.binds.get(bind_id)
        if held is None:
            return
        self._note("warning", f"bind {bind_id} ({held.bind.address} {held.bind.first}-"
                              f"{held.bind.last}) is gone: {reason}")
        main = bind_id == self.main
        self._freed(bind_id, reason)
        if self.stopping or self.client_id is None \
                or self.phase not in (Phase.REGISTERED, Phase.ASSIGNED):
            return  # a registration under way asks for everything anyway
        if main:
            self.phase = Phase.REGISTERED
            self._queue_assign()
        self._ask_listens()

    def _queue_assign(self) -> None:
        busy = self._inflight is not None and self._inflight.purpose is _Purpose.ASSIGN
        if self.main is None and not busy and not any(
                r.purpose is _Purpose.ASSIGN for r in self._queue):
            self._queue.append(_Request(_Purpose.ASSIGN))

    def _drop_requests(self, now: float) -> None:
        """Forget the request in flight and those queued, leaving the binds and listens as
        if they had never been asked: the next registration asks again."""
        self._inflight = None
        self._queue.clear()
        for held in self.binds.values():
            held.extending = False
        for port, entry in self.listens.items():
            if entry.state is _ListenState.ASKING:
                entry.state = _ListenState.WANTED
            elif entry.state is _ListenState.FREEING:
                entry.state = _ListenState.HELD
                if port not in self._present:
                    entry.absent_since = now

    def _held_port(self, port: int) -> bool:
        return any(held.bind.holds(port) for held in self.binds.values())

    def _ask_listens(self) -> None:
        """A LISTEN_REQUEST for every wanted port, once the block is held."""
        if self.stopping or self.main is None or self.client_id is None:
            return
        for port, entry in sorted(self.listens.items()):
            if entry.state is _ListenState.WANTED:
                entry.state = _ListenState.ASKING
                self._queue.append(_Request(_Purpose.LISTEN, port=port))

    def _note(self, level: str, text: str) -> None:
        self._actions.append(Note(level, text))

