"""PCP and NAT-PMP port mappings on the RSIP gateway: the sans-I/O engine.

    engine = MappingEngine(config, authority, now)      # authority: the lease engine
    reply = engine.receive(datagram, ("192.0.2.10", 40000), now, destination="192.0.2.1")
    for action in engine.actions(): ...     # AddForward, RemoveForward, SetFilters, AddPeer,
                                            # RemovePeer, LookupFlow, Send, Report
    engine.flow_found(token, ("203.0.113.1", 40000) or None, now)   # answer to LookupFlow
    engine.handle_timer(now); engine.next_timer()

One UDP port (5351) carries both protocols: a first byte 0 is NAT-PMP (RFC 6886), 2 is PCP
(RFC 6887); any other version gets a PCP UNSUPP_VERSION answer naming version 2 (with PCP
turned off: NAT-PMP's own "unsupported version" answer, naming 0).

A mapping is a port forward: (external address, protocol, external port) -> (internal
address, internal port). External ports come from the `PortAuthority` (the lease engine),
so PCP, NAT-PMP and RSIP never hand out the same port; a host's TCP and UDP mappings of one
external port share one claim. `AddForward` is queued before `receive` returns, so a daemon
that applies the actions before sending the reply answers only once the forward exists.

PEER (RFC 6887 section 12) is about an outbound flow: the engine asks the daemon whether the
kernel already tracks it (`LookupFlow`); if so, its external port is kept (pinned for the
lifetime), if not, a port is claimed and pinned before the first packet leaves. The reply
then comes as a `Send` action.

Decisions follow RFC 6887 sections 8.2, 11.3, 12.3, 13 and 15 and RFC 6886 section 3; where
the RFCs leave a choice, docs/rsip-pcp.md says which was taken. Every decision is counted
(`counters`).
"""

from __future__ import annotations

import collections
import heapq
import ipaddress
import itertools
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from ipshift.rsip import pcpwire
from ipshift.rsip.pcpwire import (
    Filter,
    MapData,
    NatPmpWireError,
    Opcode,
    PcpRequest,
    PcpResponse,
    PcpWireError,
    PeerData,
    PmpAddressRequest,
    PmpAddressResponse,
    PmpErrorResponse,
    PmpMapRequest,
    PmpMapResponse,
    PmpResult,
    PreferFailure,
    Result,
    ThirdParty,
    UnknownOption,
)

IPv4 = ipaddress.IPv4Address
TCP, UDP = 6, 17
PROTOCOL_NAMES = {TCP: "tcp", UDP: "udp"}
#: PCP itself: RFC 6887 section 11.3 forbids mapping external UDP 5350 and 5351
PCP_PORTS = frozenset({(UDP, pcpwire.CLIENT_PORT), (UDP, pcpwire.SERVER_PORT)})
ANNOUNCE_INTERVALS = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0)  # ten sends in all
LOOKUP_TIMEOUT = 2.0      # a PEER lookup the daemon never answered is forgotten after this
MAX_PENDING = 256         # PEER lookups outstanding at once
MAX_BUCKETS = 4096        # hosts whose request rate is tracked at once
STATUS_MAPPINGS = 200     # mappings listed in status (all are counted)


class PortAuthority(Protocol):
    """Who owns the gateway's public ports (ipshift.rsip.leases.Leases)."""

    def claim(self, owner: str, address: IPv4, protocol: int, port: int | None,
              lifetime: float, now: float) -> int | None:
        """Reserve `port` (or, if None or taken, any free port of the leasable range) of
        `protocol` at the external `address` for `owner` until now+lifetime; the port
        granted, or None when nothing is free."""
        ...

    def release(self, owner: str, address: IPv4, protocol: int, port: int,
                now: float) -> None:
        """A forward on `port` ended: the port rests in quarantine before anyone gets it."""
        ...

    def unclaim(self, owner: str, address: IPv4, protocol: int, port: int) -> None:
        """A claim no forward ever used (the port was not the one wanted): free at once, no
        quarantine, so a host asking for taken ports cannot lock the range up."""
        ...


@dataclass(frozen=True)
class PcpConfig:
    """What the responder needs (docs/rsip-pcp.md, "Configuration")."""

    external_address: IPv4                 # the public address mappings are made on
    internal_address: IPv4                 # the gateway on INT_IF: requests must come here
    internal_interface: str                # INT_IF: requests from elsewhere are ignored
    internal_networks: tuple[ipaddress.IPv4Network, ...] = ()  # who may ask (empty: anyone
                                                                # on INT_IF)
    instance: str = "default"              # names the nft table: ipshift_pcp_<instance>
    netns: str | None = None
    port: int = pcpwire.SERVER_PORT
    pcp: bool = True                       # answer PCP (version 2)
    natpmp: bool = True                    # answer NAT-PMP (version 0)
    map: bool = True                       # MAP and NAT-PMP mapping requests
    peer: bool = True                      # PEER requests
    third_party: bool = False              # honour the THIRD_PARTY option ...
    third_party_clients: tuple[ipaddress.IPv4Network, ...] = ()  # ... from these (empty: all)
    min_lifetime: int = 120                # PCP lifetimes are clamped to min..max seconds
    max_lifetime: int = 86400              # (NAT-PMP ones only to max: RFC 6886 3.3)
    suggest_range: tuple[int, int] = (1024, 65535)  # suggested external ports granted
    reserved_ports: frozenset[tuple[int, int]] = frozenset()  # (protocol, port) never mapped
    max_per_host: int = 1024               # mappings per internal host (USER_EX_QUOTA)
    max_mappings: int = 65536              # mappings in all (NO_RESOURCES)
    max_filters: int = 8                   # FILTER prefixes per mapping
    host_rate: float = 1000.0              # requests per second per host (then dropped)
    host_burst: float = 1000.0
    announce: bool = True                  # ANNOUNCE (and NAT-PMP's address) on start
    reset_flows: bool = True               # end the flows of a forward that goes away

    def __post_init__(self) -> None:
        if not self.pcp and not self.natpmp:
            raise ValueError("PCP and NAT-PMP are both off: turn one on or do not start the "
                             "responder")
        if not 1 <= self.min_lifetime <= self.max_lifetime <= 0xFFFFFFFF:
            raise ValueError(f"lifetimes {self.min_lifetime}-{self.max_lifetime} s are not "
                             "1 <= min <= max")
        low, high = self.suggest_range
        if not 1 <= low <= high <= 0xFFFF:
            raise ValueError(f"suggested port range {low}-{high} is not within 1-65535")
        if not 1 <= self.port <= 0xFFFF:
            raise ValueError(f"PCP port {self.port} is not 1-65535")
        if min(self.max_per_host, self.max_mappings, self.max_filters) < 1:
            raise ValueError("mapping limits must be at least 1")
        if self.host_rate <= 0 or self.host_burst < 1:
            raise ValueError("host_rate must be positive and host_burst at least 1")

    def clamp(self, lifetime: int) -> int:
        return min(max(lifetime, self.min_lifetime), self.max_lifetime)


# --- actions ------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Forward:
    """External (address, protocol, port) forwarded to an internal address and port."""

    external_address: IPv4
    protocol: int
    external_port: int
    internal_address: IPv4
    internal_port: int

    def describe(self) -> str:
        name = PROTOCOL_NAMES.get(self.protocol, str(self.protocol))
        return (f"{name} {self.external_address}:{self.external_port} -> "
                f"{self.internal_address}:{self.internal_port}")


@dataclass(frozen=True, slots=True)
class RemoteFilter:
    """A FILTER: packets to the forward only from `network` (and `port`; 0: any port)."""

    network: ipaddress.IPv4Network
    port: int = 0


@dataclass(frozen=True, slots=True)
class PeerPin:
    """An outbound flow pinned to an external port (PEER)."""

    protocol: int
    internal_address: IPv4
    internal_port: int
    remote_address: IPv4
    remote_port: int
    external_address: IPv4
    external_port: int


@dataclass(frozen=True, slots=True)
class AddForward:
    forward: Forward
    filters: tuple[RemoteFilter, ...] = ()


@dataclass(frozen=True, slots=True)
class RemoveForward:
    forward: Forward
    reset_flows: bool = True  # also end the flows that came in through it


@dataclass(frozen=True, slots=True)
class SetFilters:
    forward: Forward
    filters: tuple[RemoteFilter, ...]  # the whole new list (empty: no filtering)


@dataclass(frozen=True, slots=True)
class AddPeer:
    pin: PeerPin


@dataclass(frozen=True, slots=True)
class RemovePeer:
    pin: PeerPin


@dataclass(frozen=True, slots=True)
class LookupFlow:
    """Does the kernel track this outbound flow, and on which external address and port?
    Answer with `MappingEngine.flow_found(token, ...)`."""

    token: int
    protocol: int
    internal_address: IPv4
    internal_port: int
    remote_address: IPv4
    remote_port: int


@dataclass(frozen=True, slots=True)
class Send:
    data: bytes
    destination: tuple[str, int]


@dataclass(frozen=True, slots=True)
class Report:
    level: str  # "info", "warning", "debug"
    message: str


Action = (AddForward | RemoveForward | SetFilters | AddPeer | RemovePeer | LookupFlow | Send
          | Report)

MapKey = tuple[IPv4, int, int]                  # internal address, protocol, internal port
PeerKey = tuple[IPv4, int, int, IPv4, int]      # ... remote address, remote port


@dataclass(eq=False)
class _Mapping:
    kind: str                     # "map" (inbound forward) or "peer" (pinned outbound flow)
    origin: str                   # "pcp" or "natpmp"
    internal_address: IPv4
    protocol: int
    internal_port: int
    external_address: IPv4
    external_port: int
    nonce: bytes | None           # PCP's mapping nonce (None: made by NAT-PMP)
    created: float
    expires: float
    filters: tuple[Filter, ...] = ()
    remote: tuple[IPv4, int] | None = None
    live: bool = True

    @property
    def owner(self) -> str:
        return owner_of(self.internal_address)

    def forward(self) -> Forward:
        return Forward(self.external_address, self.protocol, self.external_port,
                       self.internal_address, self.internal_port)

    def pin(self) -> PeerPin:
        assert self.remote is not None
        return PeerPin(self.protocol, self.internal_address, self.internal_port,
                       self.remote[0], self.remote[1], self.external_address,
                       self.external_port)


@dataclass
class _Claim:
    owner: str
    protocol: int  # the protocol it was claimed for at the authority
    users: int = 0


@dataclass
class _Use:
    """The mappings of one internal endpoint on one external port (a MAP and its PEERs)."""

    internal: IPv4
    internal_port: int
    count: int = 0


@dataclass
class _PendingPeer:
    data: bytes
    request: PcpRequest
    internal: IPv4
    source: tuple[str, int]
    lifetime: int
    deadline: float
    options: tuple[pcpwire.Option, ...]


@dataclass
class _Bucket:
    tokens: float
    at: float


class _Refused(Exception):
    """A request answered with a PCP error (raised inside the handlers, caught once)."""

    def __init__(self, result: Result, lifetime: int | None = None) -> None:
        super().__init__(result.name)
        self.result = result
        self.lifetime = lifetime


def owner_of(internal: IPv4) -> str:
    """The owner name the authority holds a host's mappings under."""
    return f"pcp {internal}"


def remote_filters(filters: tuple[Filter, ...]) -> tuple[RemoteFilter, ...]:
    out: list[RemoteFilter] = []
    for item in filters:
        network = item.network()
        if isinstance(network, ipaddress.IPv4Network):
            entry = RemoteFilter(network, item.remote_port)
            if entry not in out:
                out.append(entry)
    return tuple(out)


@dataclass
class _Counters:
    counts: collections.Counter[str] = field(default_factory=collections.Counter)

    def __call__(self, key: str, by: int = 1) -> None:
        self.counts[key] += by


class MappingEngine:
    def __init__(self, config: PcpConfig, authority: PortAuthority, now: float) -> None:
        self.config = config
        self.authority = authority
        self.external_address: IPv4 | None = (
            config.external_address if int(config.external_address) else None)
        self.epoch_start = now
        self.count = _Counters()
        self._maps: dict[MapKey, _Mapping] = {}
        self._peers: dict[PeerKey, _Mapping] = {}
        self._per_host: collections.Counter[IPv4] = collections.Counter()
        self._claims: dict[tuple[IPv4, int], _Claim] = {}
        # (external address, protocol, external port) -> the internal endpoint using it, and
        # (internal address, protocol, internal port) -> its external address and port
        self._by_external: dict[tuple[IPv4, int, int], _Use] = {}
        self._by_endpoint: dict[MapKey, tuple[IPv4, int]] = {}
        self._timers: list[tuple[float, int, _Mapping]] = []
        self._sequence = itertools.count()
        self._pending: dict[int, _PendingPeer] = {}
        self._tokens = itertools.count(1)
        self._announce_at: list[float] = []
        self._buckets: dict[IPv4, _Bucket] = {}
        self._actions: list[Action] = []
        if config.announce:
            self._schedule_announcements(now)

    # --- what the daemon reads -------------------------------------------------------------
    @property
    def counters(self) -> collections.Counter[str]:
        return self.count.counts

    def epoch(self, now: float) -> int:
        """Seconds since the mapping table started (RFC 6887 section 8.5), 32 bits."""
        return int(max(now - self.epoch_start, 0.0)) & 0xFFFFFFFF

    def actions(self) -> list[Action]:
        out, self._actions = self._actions, []
        return out

    def __len__(self) -> int:
        return len(self._maps) + len(self._peers)

    def sizes(self) -> tuple[int, int]:
        """(port forwards, PEER pins) held."""
        return len(self._maps), len(self._peers)

    def mappings(self) -> Iterator[_Mapping]:
        yield from self._maps.values()
        yield from self._peers.values()

    def status(self, now: float) -> dict[str, Any]:
        rows = []
        for mapping in itertools.islice(self.mappings(), STATUS_MAPPINGS):
            row: dict[str, Any] = {
                "kind": mapping.kind, "origin": mapping.origin,
                "protocol": PROTOCOL_NAMES.get(mapping.protocol, mapping.protocol),
                "internal": f"{mapping.internal_address}:{mapping.internal_port}",
                "external": f"{mapping.external_address}:{mapping.external_port}",
                "expires_s": round(mapping.expires - now, 1),
            }
            if mapping.remote is not None:
                row["remote"] = f"{mapping.remote[0]}:{mapping.remote[1]}"
            if mapping.filters:
                row["filters"] = [f"{f.network()} port {f.remote_port or 'any'}"
                                  for f in mapping.filters]
            rows.append(row)
        return {
            "external_address": str(self.external_address) if self.external_address else None,
            "epoch": self.epoch(now),
            "mappings": len(self._maps), "peers": len(self._peers),
            "hosts": len(self._per_host), "pending_lookups": len(self._pending),
            "list": rows,
            "counters": dict(sorted(self.counters.items())),
        }

    # --- time ------------------------------------------------------------------------------
    def next_timer(self) -> float | None:
        times = []
        while self._timers and not self._current(self._timers[0]):
            heapq.heappop(self._timers)
        if self._timers:
            times.append(self._timers[0][0])
        if self._announce_at:
            times.append(self._announce_at[0])
        if self._pending:
            times.append(min(p.deadline for p in self._pending.values()))
        return min(times) if times else None

    @staticmethod
    def _current(entry: tuple[float, int, _Mapping]) -> bool:
        return entry[2].live and entry[2].expires == entry[0]

    def handle_timer(self, now: float) -> None:
        while self._timers and self._timers[0][0] <= now:
            entry = heapq.heappop(self._timers)
            if self._current(entry):
                self._remove(entry[2], now, "expired")
        while self._announce_at and self._announce_at[0] <= now:
            self._announce_at.pop(0)
            self._announce(now)
        for token in [t for t, p in self._pending.items() if p.deadline <= now]:
            del self._pending[token]
            self.count("peer.lookup_timeout")

    def _schedule_announcements(self, now: float) -> None:
        at = now
        self._announce_at = [at]
        for interval in ANNOUNCE_INTERVALS:
            at += interval
            self._announce_at.append(at)

    def _announce(self, now: float) -> None:
        destination = (pcpwire.ANNOUNCE_GROUP, pcpwire.CLIENT_PORT)
        epoch = self.epoch(now)
        if self.config.pcp:
            self._actions.append(Send(pcpwire.announce(epoch), destination))
            self.count("announce.pcp")
        if self.config.natpmp:
            result = PmpResult.SUCCESS if self.external_address else PmpResult.NETWORK_FAILURE
            address = self.external_address or IPv4(0)
            self._actions.append(Send(PmpAddressResponse(result, epoch, address).encode(),
                                      destination))
            self.count("announce.natpmp")

    def set_external_address(self, address: IPv4 | None, now: float) -> None:
        """The public address changed (or went: None): every mapping on the old one goes,
        the epoch starts again and clients are told (RFC 6887 sections 8.5 and 14.1)."""
        if address is not None and not int(address):
            address = None
        if address == self.external_address:
            return
        for mapping in list(self.mappings()):
            self._remove(mapping, now, "renumbered")
        self.external_address = address
        self.epoch_start = now
        self._schedule_announcements(now)
        self._actions.append(Report("info", f"PCP: external address now {address}; mappings "
                                            "dropped, clients told (ANNOUNCE)"))

    def release_all(self, now: float) -> None:
        """Give every claimed port back (the daemon removes the kernel state itself)."""
        for mapping in list(self.mappings()):
            self._forget(mapping, now)
        self._pending.clear()

    # --- requests --------------------------------------------------------------------------
    def receive(self, data: bytes, source: tuple[str, int], now: float, *,
                destination: str | None = None, inside: bool = True) -> bytes | None:
        """A datagram that came to the PCP port from `source`; the reply to send back to
        `source`, or None. `destination` is the address it was sent to and `inside` whether
        it came in on INT_IF (when the socket cannot tell, leave the defaults)."""
        host = self._admit(data, source, now, destination, inside)
        if host is None:
            return None
        if data[0] == pcpwire.NATPMP_VERSION and self.config.natpmp:
            return self._natpmp(data, host, now)
        if self.config.pcp:
            return self._pcp(data, host, source, now)
        return self._natpmp(data, host, now)  # NAT-PMP only: it answers other versions

    def _admit(self, data: bytes, source: tuple[str, int], now: float,
               destination: str | None, inside: bool) -> IPv4 | None:
        try:
            host = IPv4(source[0])
        except ValueError:
            self._drop("not_ipv4")
            return None
        if not inside:
            self._drop("outside")
            return None
        if destination is not None and destination != str(self.config.internal_address):
            self._drop("destination")
            return None
        networks = self.config.internal_networks
        if networks and not any(host in net for net in networks):
            self._drop("foreign_source")
            return None
        if not data:
            self._drop("empty")
            return None
        if not self._within_rate(host, now):
            self._drop("rate_limited")
            return None
        return host

    def _drop(self, reason: str) -> None:
        """Count a request that gets no answer."""
        self.count(f"drop.{reason}")

    def _within_rate(self, host: IPv4, now: float) -> bool:
        bucket = self._buckets.get(host)
        config = self.config
        if bucket is None:
            if len(self._buckets) >= MAX_BUCKETS:
                self._prune_buckets(now)
            bucket = self._buckets[host] = _Bucket(config.host_burst, now)
        else:
            elapsed = max(now - bucket.at, 0.0)  # a clock never goes back; a caller might
            bucket.tokens = min(config.host_burst, bucket.tokens + elapsed * config.host_rate)
            bucket.at = max(bucket.at, now)
        if bucket.tokens < 1.0:
            return False
        bucket.tokens -= 1.0
        return True

    def _prune_buckets(self, now: float) -> None:
        """Forget hosts whose bucket has filled up again (they lose nothing by it)."""
        config = self.config
        full = [h for h, b in self._buckets.items()
                if b.tokens + (now - b.at) * config.host_rate >= config.host_burst]
        for host in full:
            del self._buckets[host]
        if len(self._buckets) >= MAX_BUCKETS:  # a flood of sources: start over
            self._buckets.clear()

    # --- PCP ---------------------------------------------------------------------------------
    def _pcp(self, data: bytes, host: IPv4, source: tuple[str, int],
             now: float) -> bytes | None:
        epoch = self.epoch(now)
        try:
            header = pcpwire.decode_pcp_header(data)
        except PcpWireError as exc:
            return self._wire_error(data, exc, epoch)
        if header.client_address != host:
            return self._error(data, "pcp", header.opcode, Result.ADDRESS_MISMATCH, epoch)
        try:
            request = pcpwire.decode_pcp_request(data)
        except PcpWireError as exc:
            return self._wire_error(data, exc, epoch)
        opcode = request.opcode
        reply: bytes | None
        try:
            if opcode is Opcode.ANNOUNCE:
                reply = self._announce_request(request, epoch)
            elif opcode is Opcode.MAP:
                reply = self._map(request, host, now)
            else:
                reply = self._peer(data, request, host, source, now)
        except _Refused as refused:
            return self._error(data, "pcp", opcode, refused.result, epoch, refused.lifetime)
        if reply is not None:
            self.count(f"pcp.{opcode.name}.SUCCESS")
        return reply

    def _wire_error(self, data: bytes, exc: PcpWireError, epoch: int) -> bytes | None:
        self.count(f"malformed.pcp.{exc.reason}")
        if exc.result is None:
            self._drop("pcp_unanswered")
            return None
        opcode = data[1] & 0x7F if len(data) > 1 else 0
        return self._error(data, "pcp", opcode, exc.result, epoch, parsed=False)

    def _error(self, data: bytes, protocol: str, opcode: int, result: Result, epoch: int,
               lifetime: int | None = None, *, parsed: bool = True) -> bytes:
        name = Opcode(opcode).name if opcode in tuple(Opcode) else str(opcode)
        self.count(f"{protocol}.{name}.{result.name}")
        return pcpwire.pcp_error(data, result, pcpwire.error_lifetime(result)
                                 if lifetime is None else lifetime, epoch, parsed=parsed)

    def _announce_request(self, request: PcpRequest, epoch: int) -> bytes:
        if any(not isinstance(o, UnknownOption) or o.mandatory for o in request.options):
            # THIRD_PARTY, PREFER_FAILURE and FILTER mean nothing to ANNOUNCE (section 13)
            raise _Refused(Result.UNSUPP_OPTION)
        return PcpResponse(Opcode.ANNOUNCE, Result.SUCCESS, 0, epoch).encode()

    def _options(self, request: PcpRequest, host: IPv4) -> tuple[
            IPv4, bool, tuple[Filter, ...], tuple[pcpwire.Option, ...]]:
        """The internal address (THIRD_PARTY), PREFER_FAILURE, the FILTERs and the options
        processed (echoed in a success response), in the order they came."""
        internal = host
        prefer = False
        filters: list[Filter] = []
        processed: list[pcpwire.Option] = []
        for option in request.options:
            if isinstance(option, UnknownOption):
                if option.mandatory:
                    raise _Refused(Result.UNSUPP_OPTION)
                continue
            if isinstance(option, ThirdParty):
                internal = self._third_party(option, host)
            elif isinstance(option, PreferFailure):
                if request.opcode is Opcode.PEER:
                    raise _Refused(Result.MALFORMED_REQUEST)  # section 12.1
                prefer = True
            elif isinstance(option, Filter):
                if request.opcode is Opcode.PEER:
                    raise _Refused(Result.MALFORMED_OPTION)
                if not option.clears and not isinstance(option.remote_address, IPv4):
                    raise _Refused(Result.MALFORMED_OPTION)  # an IPv6 peer on IPv4 NAT
                filters.append(option)
            processed.append(option)
        return internal, prefer, tuple(filters), tuple(processed)

    def _third_party(self, option: ThirdParty, host: IPv4) -> IPv4:
        config = self.config
        allowed = config.third_party and (not config.third_party_clients or any(
            host in net for net in config.third_party_clients))
        if not allowed:
            # RFC 6887 sections 7.3 and 13.1: a disabled or unauthorized THIRD_PARTY is
            # UNSUPP_OPTION
            self.count("third_party.refused")
            raise _Refused(Result.UNSUPP_OPTION)
        if option.address == host:
            raise _Refused(Result.MALFORMED_REQUEST)
        target = option.address
        if not isinstance(target, IPv4) or (config.internal_networks and not any(
                target in net for net in config.internal_networks)):
            raise _Refused(Result.NOT_AUTHORIZED)
        self.count("third_party.accepted")
        return target

    def _map(self, request: PcpRequest, host: IPv4, now: float) -> bytes:
        data = request.data
        assert isinstance(data, MapData)
        if not self.config.map:
            raise _Refused(Result.UNSUPP_OPCODE)
        internal, prefer, filters, processed = self._options(request, host)
        if data.protocol == 0 and data.internal_port != 0:
            raise _Refused(Result.MALFORMED_REQUEST)
        if request.lifetime == 0:
            if prefer or filters:
                raise _Refused(Result.MALFORMED_OPTION)  # section 11.3, 13.3
            return self._map_delete(request, data, internal, processed, now)
        if prefer and data.external_port == 0:
            raise _Refused(Result.MALFORMED_OPTION)  # section 13.2
        if data.protocol not in PROTOCOL_NAMES or data.internal_port == 0:
            raise _Refused(Result.UNSUPP_PROTOCOL)  # no all-ports or all-protocols mappings
        external = self.external_address
        if external is None:
            raise _Refused(Result.NETWORK_FAILURE)
        lifetime = self.config.clamp(request.lifetime)
        key = (internal, data.protocol, data.internal_port)
        mapping = self._maps.get(key)
        if mapping is not None:
            if mapping.nonce is not None and mapping.nonce != data.nonce:
                self.count("map.nonce_mismatch")
                raise _Refused(Result.NOT_AUTHORIZED, self._remaining(mapping, now))
            if prefer and not self._is_suggested(mapping, data):
                raise _Refused(Result.CANNOT_PROVIDE_EXTERNAL)
            new_filters = self._merge_filters(mapping.filters, filters)
            mapping.nonce = data.nonce
            mapping.origin = "pcp"
            self._extend(mapping, now + lifetime)
            if new_filters != mapping.filters:
                old = remote_filters(mapping.filters)
                mapping.filters = new_filters
                if remote_filters(new_filters) != old:
                    self._actions.append(SetFilters(mapping.forward(),
                                                    remote_filters(new_filters)))
            self.count("map.refreshed")
        else:
            new_filters = self._merge_filters((), filters)
            self._check_quota(internal)
            port = self._claim_port(internal, data.protocol, data.internal_port,
                                    data.external_address, data.external_port, prefer,
                                    lifetime, now)
            mapping = _Mapping("map", "pcp", internal, data.protocol, data.internal_port,
                               external, port, data.nonce, now, now + lifetime, new_filters)
            self._add(mapping, key)
            self._actions.append(AddForward(mapping.forward(), remote_filters(new_filters)))
            self.count("map.created")
        reply = MapData(data.nonce, data.protocol, data.internal_port, mapping.external_port,
                        mapping.external_address)
        return PcpResponse(Opcode.MAP, Result.SUCCESS, lifetime, self.epoch(now), reply,
                           processed).encode()

    def _map_delete(self, request: PcpRequest, data: MapData, internal: IPv4,
                    processed: tuple[pcpwire.Option, ...], now: float) -> bytes:
        mapping = self._maps.get((internal, data.protocol, data.internal_port))
        if mapping is None:
            self.count("map.delete_absent")  # success: a retransmitted delete (section 15.1)
        elif mapping.nonce is not None and mapping.nonce != data.nonce:
            self.count("map.nonce_mismatch")
            raise _Refused(Result.NOT_AUTHORIZED, self._remaining(mapping, now))
        else:
            self._remove(mapping, now, "deleted")
        # the suggested fields are copied into the assigned ones (section 15.1)
        return PcpResponse(Opcode.MAP, Result.SUCCESS, 0, self.epoch(now), data,
                           processed).encode()

    def _is_suggested(self, mapping: _Mapping, data: MapData) -> bool:
        address = data.external_address
        return data.external_port == mapping.external_port and (
            pcpwire.is_unspecified(address) or address == mapping.external_address)

    def _merge_filters(self, current: tuple[Filter, ...],
                       added: tuple[Filter, ...]) -> tuple[Filter, ...]:
        """Section 13.3: new filters add to the old; prefix length 0 clears what came
        before it."""
        merged = list(current)
        for item in added:
            if item.clears:
                merged = []
            elif item not in merged:
                merged.append(item)
        if len(merged) > self.config.max_filters:
            raise _Refused(Result.EXCESSIVE_REMOTE_PEERS)
        return tuple(merged)

    def _peer(self, data: bytes, request: PcpRequest, host: IPv4, source: tuple[str, int],
              now: float) -> bytes | None:
        peer = request.data
        assert isinstance(peer, PeerData)
        if not self.config.peer:
            raise _Refused(Result.UNSUPP_OPCODE)
        internal, _prefer, _filters, processed = self._options(request, host)
        if peer.protocol == 0 or peer.internal_port == 0 or peer.remote_port == 0:
            raise _Refused(Result.MALFORMED_REQUEST)
        if peer.protocol not in PROTOCOL_NAMES:
            raise _Refused(Result.UNSUPP_PROTOCOL)
        remote = peer.remote_address
        if not self._valid_remote(remote):
            raise _Refused(Result.MALFORMED_REQUEST)  # section 12.3
        assert isinstance(remote, IPv4)
        if self.external_address is None:
            raise _Refused(Result.NETWORK_FAILURE)
        lifetime = self.config.clamp(request.lifetime)  # PEER never shortens (section 15)
        key = (internal, peer.protocol, peer.internal_port, remote, peer.remote_port)
        mapping = self._peers.get(key)
        if mapping is not None:
            return self._peer_refresh(mapping, peer, lifetime, processed, now)
        self._check_quota(internal)
        if len(self._pending) >= MAX_PENDING:
            self._drop("peer_lookups_full")
            return None
        token = next(self._tokens)
        self._pending[token] = _PendingPeer(data, request, internal, source, lifetime,
                                            now + LOOKUP_TIMEOUT, processed)
        self._actions.append(LookupFlow(token, peer.protocol, internal, peer.internal_port,
                                        remote, peer.remote_port))
        self.count("peer.lookup")
        return None

    def _peer_refresh(self, mapping: _Mapping, peer: PeerData, lifetime: int,
                      processed: tuple[pcpwire.Option, ...], now: float) -> bytes:
        if mapping.nonce is not None and mapping.nonce != peer.nonce:
            self.count("peer.nonce_mismatch")
            raise _Refused(Result.NOT_AUTHORIZED, self._remaining(mapping, now))
        mapping.nonce = peer.nonce
        self._extend(mapping, max(mapping.expires, now + lifetime))
        self.count("peer.refreshed")
        return self._peer_success(mapping, peer, processed, now)

    def _peer_success(self, mapping: _Mapping, peer: PeerData,
                      processed: tuple[pcpwire.Option, ...], now: float) -> bytes:
        reply = PeerData(peer.nonce, peer.protocol, peer.internal_port, mapping.external_port,
                         mapping.external_address, peer.remote_port, peer.remote_address)
        return PcpResponse(Opcode.PEER, Result.SUCCESS, self._remaining(mapping, now),
                           self.epoch(now), reply, processed).encode()

    def _valid_remote(self, remote: pcpwire.IPAddress) -> bool:
        if not isinstance(remote, IPv4):
            return False
        if (remote.is_unspecified or remote.is_loopback or remote.is_multicast
                or remote.is_link_local or remote == IPv4("255.255.255.255")
                or remote == self.external_address or remote == self.config.internal_address):
            return False
        return not any(remote in net for net in self.config.internal_networks)

    def flow_found(self, token: int, external: tuple[IPv4, int] | None, now: float) -> None:
        """The daemon's answer to LookupFlow `token`: the external address and port the
        kernel uses for the flow, or None if it tracks no such flow. Queues the reply."""
        pending = self._pending.pop(token, None)
        if pending is None:
            self.count("peer.lookup_stale")
            return
        request = pending.request
        peer = request.data
        assert isinstance(peer, PeerData) and isinstance(peer.remote_address, IPv4)
        epoch = self.epoch(now)
        key = (pending.internal, peer.protocol, peer.internal_port, peer.remote_address,
               peer.remote_port)
        try:
            mapping = self._peers.get(key)
            if mapping is not None:  # a retransmission answered meanwhile
                reply = self._peer_refresh(mapping, peer, pending.lifetime, pending.options,
                                           now)
            else:
                self._check_quota(pending.internal)
                mapping = self._peer_create(pending, peer, external, now)
                reply = self._peer_success(mapping, peer, pending.options, now)
            self.count("pcp.PEER.SUCCESS")
        except _Refused as refused:
            reply = self._error(pending.data, "pcp", Opcode.PEER, refused.result, epoch,
                                refused.lifetime)
        self._actions.append(Send(reply, pending.source))

    def _peer_create(self, pending: _PendingPeer, peer: PeerData,
                     external: tuple[IPv4, int] | None, now: float) -> _Mapping:
        internal = pending.internal
        assert isinstance(peer.remote_address, IPv4)
        if external is not None:
            # the flow exists: keep its external port (suggestions are ignored, 12.3)
            address, port = external
            if not self._take(internal, peer.internal_port, address, peer.protocol, port,
                              pending.lifetime, now):
                self.count("peer.port_conflict")
                raise _Refused(Result.NO_RESOURCES)
            self.count("peer.existing_flow")
        else:
            address = self.external_address or IPv4(0)
            suggested = not pcpwire.is_unspecified(peer.external_address) or peer.external_port
            port = self._claim_port(internal, peer.protocol, peer.internal_port,
                                    peer.external_address, peer.external_port,
                                    bool(suggested), pending.lifetime, now)
            self.count("peer.new_flow")
        mapping = _Mapping("peer", "pcp", internal, peer.protocol, peer.internal_port, address,
                           port, peer.nonce, now, now + pending.lifetime,
                           remote=(peer.remote_address, peer.remote_port))
        self._add(mapping, (internal, peer.protocol, peer.internal_port, peer.remote_address,
                            peer.remote_port))
        self._actions.append(AddPeer(mapping.pin()))
        self.count("peer.created")
        return mapping

    # --- NAT-PMP -----------------------------------------------------------------------------
    def _natpmp(self, data: bytes, host: IPv4, now: float) -> bytes | None:
        epoch = self.epoch(now)
        try:
            request = pcpwire.decode_pmp_request(data)
        except NatPmpWireError as exc:
            self.count(f"malformed.natpmp.{exc.reason}")
            if exc.result is PmpResult.UNSUPPORTED_VERSION:
                self.count("natpmp.UNSUPPORTED_VERSION")
                return PmpErrorResponse(0, PmpResult.UNSUPPORTED_VERSION, epoch).encode()
            if exc.result is PmpResult.UNSUPPORTED_OPCODE:
                self.count("natpmp.UNSUPPORTED_OPCODE")
                return pcpwire.pmp_unsupported_opcode(data, epoch)
            self._drop("natpmp_unanswered")
            return None
        if isinstance(request, PmpAddressRequest):
            external = self.external_address
            result = PmpResult.SUCCESS if external else PmpResult.NETWORK_FAILURE
            self.count(f"natpmp.PUBLIC_ADDRESS.{result.name}")
            return PmpAddressResponse(result, epoch, external or IPv4(0)).encode()
        result, port, lifetime = self._natpmp_map(request, host, now)
        self.count(f"natpmp.{request.opcode.name}.{result.name}")
        return PmpMapResponse(request.opcode, result, epoch, request.internal_port, port,
                              lifetime).encode()

    def _natpmp_map(self, request: PmpMapRequest, host: IPv4,
                    now: float) -> tuple[PmpResult, int, int]:
        """(result, external port, lifetime) of a NAT-PMP mapping request."""
        protocol = request.protocol
        if not self.config.map:
            return PmpResult.NOT_AUTHORIZED, 0, 0
        if request.lifetime == 0:
            return self._natpmp_delete(request, host, now), 0, 0
        if request.internal_port == 0:
            return PmpResult.NOT_AUTHORIZED, 0, 0
        external = self.external_address
        if external is None:
            return PmpResult.NETWORK_FAILURE, 0, 0
        # RFC 6886 3.3: the gateway may shorten a lifetime, and should not lengthen it
        lifetime = max(min(request.lifetime, self.config.max_lifetime), 1)
        key = (host, protocol, request.internal_port)
        mapping = self._maps.get(key)
        if mapping is not None:  # a renewal or a retransmission: the same port back
            self._extend(mapping, now + lifetime)
            self.count("map.refreshed")
            return PmpResult.SUCCESS, mapping.external_port, lifetime
        try:
            self._check_quota(host)
            port = self._claim_port(host, protocol, request.internal_port, IPv4(0),
                                    request.external_port, False, lifetime, now)
        except _Refused:
            return PmpResult.OUT_OF_RESOURCES, 0, 0
        mapping = _Mapping("map", "natpmp", host, protocol, request.internal_port, external,
                           port, None, now, now + lifetime)
        self._add(mapping, key)
        self._actions.append(AddForward(mapping.forward()))
        self.count("map.created")
        return PmpResult.SUCCESS, port, lifetime

    def _natpmp_delete(self, request: PmpMapRequest, host: IPv4, now: float) -> PmpResult:
        """RFC 6886 3.4: one mapping, or with internal port 0 all of the host's mappings of
        the protocol; a mapping made through PCP (it has a nonce) is not NAT-PMP's to
        delete."""
        protocol = request.protocol
        if request.internal_port:
            targets = [m for m in (self._maps.get((host, protocol, request.internal_port)),)
                       if m is not None]
        else:
            targets = [m for (addr, proto, _), m in self._maps.items()
                       if addr == host and proto == protocol]
        refused = False
        for mapping in targets:
            if mapping.nonce is not None:
                refused = True
                continue
            self._remove(mapping, now, "deleted")
        if refused:
            self.count("natpmp.delete_pcp_mapping")
            return PmpResult.NOT_AUTHORIZED
        if not targets:
            self.count("map.delete_absent")
        return PmpResult.SUCCESS

    # --- the mapping table -------------------------------------------------------------------
    def _check_quota(self, internal: IPv4) -> None:
        if self._per_host[internal] >= self.config.max_per_host:
            self.count("quota.host")
            raise _Refused(Result.USER_EX_QUOTA)
        if len(self) >= self.config.max_mappings:
            self.count("quota.total")
            raise _Refused(Result.NO_RESOURCES)

    @staticmethod
    def _remaining(mapping: _Mapping, now: float) -> int:
        return max(int(mapping.expires - now + 0.5), 0)

    def _usable_suggestion(self, protocol: int, port: int) -> bool:
        low, high = self.config.suggest_range
        return (low <= port <= high and (protocol, port) not in PCP_PORTS
                and (protocol, port) not in self.config.reserved_ports)

    def _claim_port(self, internal: IPv4, protocol: int, internal_port: int,
                    suggested_address: pcpwire.IPAddress, suggested_port: int, exact: bool,
                    lifetime: int, now: float) -> int:
        """An external port for a new mapping of `internal`: the suggested one if it can be
        had, else (unless `exact`: CANNOT_PROVIDE_EXTERNAL) the port of the host's other
        mapping of the same internal endpoint, else any the authority has (none:
        NO_RESOURCES)."""
        external = self.external_address
        assert external is not None
        address_ok = (pcpwire.is_unspecified(suggested_address)
                      or suggested_address == external)
        if suggested_port and address_ok and self._usable_suggestion(protocol, suggested_port) \
                and self._take(internal, internal_port, external, protocol, suggested_port,
                               lifetime, now):
            self.count("port.suggested")
            return suggested_port
        if exact:
            self.count("port.suggestion_refused")
            raise _Refused(Result.CANNOT_PROVIDE_EXTERNAL)
        sibling = self._sibling_port(internal, protocol, internal_port)
        if sibling is not None and self._take(internal, internal_port, external, protocol,
                                              sibling, lifetime, now):
            self.count("port.shared")
            return sibling
        port = self._claim_any(internal, external, protocol, lifetime, now)
        if port is None:
            self.count("port.exhausted")
            raise _Refused(Result.NO_RESOURCES)
        self.count("port.assigned")
        return port

    def _sibling_port(self, internal: IPv4, protocol: int, internal_port: int) -> int | None:
        """The external port of the host's MAP or PEER mapping of the same internal endpoint:
        mappings are endpoint-independent (RFC 6887 section 11.3, item 4)."""
        place = self._by_endpoint.get((internal, protocol, internal_port))
        return None if place is None else place[1]

    def _take(self, internal: IPv4, internal_port: int, address: IPv4, protocol: int,
              port: int, lifetime: int, now: float) -> bool:
        """Claim exactly `port` for `internal`, or share the claim it holds already: its TCP
        and UDP mappings of one port, a MAP and the PEERs of one internal endpoint."""
        use = self._by_external.get((address, protocol, port))
        if use is not None and (use.internal, use.internal_port) != (internal, internal_port):
            return False  # the same host, another internal port: the forwards would collide
        owner = owner_of(internal)
        claim = self._claims.get((address, port))
        if claim is not None:
            if claim.owner != owner:
                return False
            claim.users += 1
            return True
        granted = self.authority.claim(owner, address, protocol, port, lifetime, now)
        if granted != port:
            if granted is not None:
                self.authority.unclaim(owner, address, protocol, granted)
            return False
        self._claims[(address, port)] = _Claim(owner, protocol, 1)
        return True

    def _claim_any(self, internal: IPv4, address: IPv4, protocol: int, lifetime: int,
                   now: float) -> int | None:
        owner = owner_of(internal)
        refused: list[int] = []
        try:
            for _ in range(8):  # the authority's range should not hold PCP's own ports
                port = self.authority.claim(owner, address, protocol, None, lifetime, now)
                if port is None:
                    return None
                if (address, port) in self._claims or not self._usable_port(protocol, port):
                    refused.append(port)
                    continue
                self._claims[(address, port)] = _Claim(owner, protocol, 1)
                return port
            return None
        finally:
            for port in refused:
                if (address, port) not in self._claims:
                    self.authority.unclaim(owner, address, protocol, port)

    def _usable_port(self, protocol: int, port: int) -> bool:
        return (protocol, port) not in PCP_PORTS and \
            (protocol, port) not in self.config.reserved_ports

    def _add(self, mapping: _Mapping, key: Any) -> None:
        if mapping.kind == "map":
            self._maps[key] = mapping
        else:
            self._peers[key] = mapping
        self._per_host[mapping.internal_address] += 1
        external = (mapping.external_address, mapping.protocol, mapping.external_port)
        use = self._by_external.get(external)
        if use is None:
            use = self._by_external[external] = _Use(mapping.internal_address,
                                                     mapping.internal_port)
        use.count += 1
        self._by_endpoint.setdefault(
            (mapping.internal_address, mapping.protocol, mapping.internal_port),
            (mapping.external_address, mapping.external_port))
        self._push_timer(mapping)

    def _extend(self, mapping: _Mapping, expires: float) -> None:
        if expires != mapping.expires:
            mapping.expires = expires
            self._push_timer(mapping)

    def _push_timer(self, mapping: _Mapping) -> None:
        heapq.heappush(self._timers, (mapping.expires, next(self._sequence), mapping))
        if len(self._timers) > 4 * len(self) + 1024:  # refreshes leave stale entries behind
            self._timers = [entry for entry in self._timers if self._current(entry)]
            heapq.heapify(self._timers)

    def _remove(self, mapping: _Mapping, now: float, why: str) -> None:
        if not mapping.live:
            return
        self._forget(mapping, now)
        if mapping.kind == "map":
            self._actions.append(RemoveForward(mapping.forward(), self.config.reset_flows))
            self.count(f"map.{why}")
        else:
            self._actions.append(RemovePeer(mapping.pin()))
            self.count(f"peer.{why}")

    def _forget(self, mapping: _Mapping, now: float) -> None:
        """Out of the tables, and its port back to the authority once no mapping uses it."""
        mapping.live = False
        if mapping.kind == "map":
            self._maps.pop((mapping.internal_address, mapping.protocol, mapping.internal_port),
                           None)
        else:
            assert mapping.remote is not None
            self._peers.pop((mapping.internal_address, mapping.protocol, mapping.internal_port,
                             *mapping.remote), None)
        self._per_host[mapping.internal_address] -= 1
        if self._per_host[mapping.internal_address] <= 0:
            del self._per_host[mapping.internal_address]
        external = (mapping.external_address, mapping.protocol, mapping.external_port)
        use = self._by_external.get(external)
        if use is not None:
            use.count -= 1
            if use.count <= 0:
                del self._by_external[external]
                endpoint = (mapping.internal_address, mapping.protocol, mapping.internal_port)
                if self._by_endpoint.get(endpoint) == (mapping.external_address,
                                                       mapping.external_port):
                    del self._by_endpoint[endpoint]
        place = (mapping.external_address, mapping.external_port)
        claim = self._claims.get(place)
        if claim is not None:
            claim.users -= 1
            if claim.users <= 0:
                del self._claims[place]
                self.authority.release(claim.owner, mapping.external_address, claim.protocol,
                                       mapping.external_port, now)
