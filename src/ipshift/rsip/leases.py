"""The lease engine: who holds which public address and ports, until when.

Pure: no I/O, no clock (every method takes `now`, seconds on a monotonic clock). One
`Leases` serves the RSIP gateway and its PCP/NAT-PMP responder (`claim`/`release`, the
`PortAuthority` of ipshift.rsip.mapping), so the two never hand out the same port.

Resources are (public address, port block). A port leased by RSIP belongs to its host for
TCP, UDP and ICMP echo identifiers alike (the host's stack picks the protocol); a whole
address (RSA-IP) is every port of every protocol. Freed blocks stay in quarantine for
`quarantine` seconds (RFC 3102 section 6.1: a port reused too soon would get the previous
holder's late packets).

    leases = Leases(LeasePolicy(pool=(ip_address("203.0.113.1"),)))
    client = leases.register("192.0.2.10", "tcp", now)
    bind = leases.assign_ports(client.client_id, None, None, 255, None, now)   # or a LeaseError
    leases.expire(now)      # -> binds and registrations that ran out; next_expiry() says when
"""

from __future__ import annotations

import bisect
import heapq
import ipaddress
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from enum import IntEnum, StrEnum

IPv4 = ipaddress.IPv4Address

MIN_LEASE = 10.0  # seconds: a shorter requested lease is raised to this
UNPRIVILEGED = 1024  # the first port a PCP/NAT-PMP host may name outside LISTEN_RANGE
PORT_SPACE = (1, 0xFFFF)


class Refusal(IntEnum):
    """Why a request is refused: the RFC 3103 error numbers (ipshift.rsip.wire.ErrorCode)."""

    REGISTER_FIRST = 301
    ALREADY_REGISTERED = 302
    REGISTRATION_DENIED = 304
    BAD_CLIENT_ID = 305
    BAD_BIND_ID = 306
    LOCAL_ADDR_UNAVAILABLE = 308
    LOCAL_ADDRPORT_UNAVAILABLE = 309
    LOCAL_ADDR_INUSE = 310
    LOCAL_ADDRPORT_INUSE = 311
    LOCAL_ADDR_UNALLOWED = 312
    LOCAL_ADDRPORT_UNALLOWED = 313


class LeaseError(Exception):
    """A request the policy or the pool cannot grant; `.refusal` is the RFC error."""

    def __init__(self, refusal: Refusal, detail: str, client_id: int | None = None) -> None:
        super().__init__(detail)
        self.refusal = refusal
        self.client_id = client_id


class BindKind(StrEnum):
    PORTS = "ports"      # RSAP-IP: a block of ephemeral ports
    LISTEN = "listen"    # LISTEN: well-known ports asked for by number
    ADDRESS = "address"  # RSA-IP: the whole address
    MAPPING = "mapping"  # a PCP / NAT-PMP port forward


@dataclass(frozen=True, slots=True)
class LeasePolicy:
    """The gateway's resources and rules (the config file's POOL, PORT_RANGE, ...)."""

    pool: tuple[IPv4, ...]
    port_range: tuple[int, int] = (8192, 32767)
    listen_range: tuple[int, int] = (1, 1023)
    block: int = 255            # ports per RSAP-IP bind when the host does not say
    max_block: int = 4096       # the most ports one bind may ask for
    max_clients: int = 0        # 0: five per public address (the seed's rule)
    max_binds: int = 64         # per client
    register_lease: float = 600.0
    bind_lease: float = 600.0
    max_lease: float = 86400.0
    quarantine: float = 120.0
    whole_addresses: bool = True  # RSA-IP allowed for pool addresses other than `own`
    own: tuple[IPv4, ...] = ()    # the gateway's own addresses: never leased whole

    def __post_init__(self) -> None:
        if not self.pool:
            raise ValueError("POOL is empty: give at least one public address")
        for low, high in (self.port_range, self.listen_range):
            if not PORT_SPACE[0] <= low <= high <= PORT_SPACE[1]:
                raise ValueError(f"port range {low}-{high} is not within 1-65535")
        if not 1 <= self.block <= self.max_block:
            raise ValueError(f"a port block of {self.block} is not within 1-{self.max_block}")

    @property
    def client_limit(self) -> int:
        return self.max_clients or 5 * len(self.pool)


@dataclass(slots=True)
class Bind:
    """Resources held by one client under one bind ID."""

    client_id: int
    bind_id: int
    kind: BindKind
    address: IPv4
    first: int
    last: int
    expires: float
    tunnel: int = 1              # RFC 3103 tunnel type (ipshift.rsip.wire.TunnelType)
    protocol: int = 0            # MAPPING only: the protocol the forward is for

    @property
    def count(self) -> int:
        return self.last - self.first + 1


@dataclass(slots=True)
class Client:
    """One registered host."""

    client_id: int
    host: str                    # its private address: how RSIP identifies a host
    transport: str               # "tcp" or "udp": fixed for the registration
    expires: float
    binds: dict[int, Bind] = field(default_factory=dict)
    next_bind: int = 1
    tunnel_port: int = 0         # its tunnel UDP port when it uses ipshift's UDP framing
    udp_source: tuple[str, int] | None = None  # where asynchronous UDP messages go

    def take_bind_id(self) -> int:
        bind_id = self.next_bind
        self.next_bind = bind_id % 0xFFFFFFFF + 1
        return bind_id


@dataclass(frozen=True, slots=True)
class Expired:
    """A bind (bind_id set) or a whole registration (bind_id None) ran out."""

    client_id: int
    bind_id: int | None
    host: str


Holder = tuple[int, int] | float  # (client, bind), or the end of a quarantine


class _Holdings:
    """Blocks taken at one address: sorted starts, their ends and holders (a bind, or a
    quarantine until a time)."""

    __slots__ = ("ends", "holders", "starts", "whole")

    def __init__(self) -> None:
        self.starts: list[int] = []
        self.ends: list[int] = []
        self.holders: list[tuple[int, int] | float] = []  # (client, bind) or quarantine end
        self.whole: tuple[int, int] | None = None  # (client, bind) holding the address

    def __len__(self) -> int:
        return len(self.starts)

    def overlaps(self, first: int, last: int) -> bool:
        i = bisect.bisect_right(self.starts, last) - 1
        return i >= 0 and self.ends[i] >= first

    def add(self, first: int, last: int, holder: tuple[int, int] | float) -> None:
        i = bisect.bisect_left(self.starts, first)
        self.starts.insert(i, first)
        self.ends.insert(i, last)
        self.holders.insert(i, holder)

    def remove(self, first: int) -> tuple[int, int] | float | None:
        i = bisect.bisect_left(self.starts, first)
        if i == len(self.starts) or self.starts[i] != first:
            return None
        del self.starts[i], self.ends[i]
        return self.holders.pop(i)

    def find_gap(self, low: int, high: int, size: int, hint: int) -> int | None:
        """The first start >= hint (then from low) of `size` free ports within low..high."""
        for begin, end in ((max(hint, low), high), (low, min(hint + size - 2, high))):
            port = begin
            i = bisect.bisect_right(self.starts, port) - 1
            if i >= 0 and self.ends[i] >= port:
                port = self.ends[i] + 1
            i += 1
            while port + size - 1 <= end:
                if i < len(self.starts) and self.starts[i] <= port + size - 1:
                    port = max(port, self.ends[i] + 1)
                    i += 1
                    continue
                return port
        return None

    def holders_in(self, first: int, last: int) -> Iterator[tuple[int, int, Holder]]:
        i = max(bisect.bisect_right(self.starts, first) - 1, 0)
        while i < len(self.starts) and self.starts[i] <= last:
            if self.ends[i] >= first:
                yield self.starts[i], self.ends[i], self.holders[i]
            i += 1


class Leases:
    """Registrations and binds of every client, with their expiry."""

    def __init__(self, policy: LeasePolicy) -> None:
        self.policy = policy
        self.clients: dict[int, Client] = {}
        self._by_host: dict[str, int] = {}
        self._holdings: dict[IPv4, _Holdings] = {a: _Holdings() for a in policy.pool}
        self._hint: dict[IPv4, int] = {a: policy.port_range[0] for a in policy.pool}
        self._mapping_owners: dict[str, int] = {}
        self._next_client = 1
        # (expiry, registration?, client, bind or 0): a registration's timer comes after its
        # binds' of the same moment; stale entries are skipped
        self._timers: list[tuple[float, bool, int, int]] = []
        self._quarantine: list[tuple[float, IPv4, int]] = []
        self.changed: set[int] = set()  # clients whose state changed since the last take
        self.removed: set[int] = set()

    # --- registrations -------------------------------------------------------------------

    def client_of(self, host: str) -> Client | None:
        client_id = self._by_host.get(host)
        return None if client_id is None else self.clients[client_id]

    def register(self, host: str, transport: str, now: float) -> Client:
        existing = self.client_of(host)
        if existing is not None:
            raise LeaseError(Refusal.ALREADY_REGISTERED, f"{host} is already registered as "
                             f"client {existing.client_id}", existing.client_id)
        if len(self.clients) >= self.policy.client_limit:
            raise LeaseError(Refusal.REGISTRATION_DENIED, f"{len(self.clients)} clients are "
                             "registered, MAX_CLIENTS allows no more")
        client_id = self._next_client
        while client_id in self.clients:
            client_id = client_id % 0xFFFFFFFF + 1
        self._next_client = client_id % 0xFFFFFFFF + 1
        client = Client(client_id, host, transport, now + self.policy.register_lease)
        self._insert(client)
        return client

    def _insert(self, client: Client) -> None:
        self.clients[client.client_id] = client
        self._by_host[client.host] = client.client_id
        self._timer(client.expires, client.client_id, 0)
        self._touch(client.client_id)

    def client(self, client_id: int | None, host: str) -> Client:
        """The registration `host` refers to with `client_id` (RFC 3103 error otherwise)."""
        own = self.client_of(host)
        if own is None:
            raise LeaseError(Refusal.REGISTER_FIRST, f"{host} is not registered")
        if client_id != own.client_id:
            raise LeaseError(Refusal.BAD_CLIENT_ID, f"{host} is client {own.client_id}, "
                             f"not {client_id}", own.client_id)
        return own

    def deregister(self, client_id: int, now: float) -> list[Bind]:
        client = self.clients.pop(client_id)
        del self._by_host[client.host]
        binds = list(client.binds.values())
        for bind in binds:
            self._release(bind, now)
        client.binds.clear()
        self.changed.discard(client_id)
        self.removed.add(client_id)
        return binds

    # --- binds -----------------------------------------------------------------------------

    def _lease(self, wanted: float | None, default: float) -> float:
        if wanted is None or wanted <= 0:
            return default
        return min(max(float(wanted), MIN_LEASE), self.policy.max_lease)

    def _room(self, client: Client) -> None:
        if len(client.binds) >= self.policy.max_binds:
            raise LeaseError(Refusal.LOCAL_ADDRPORT_UNAVAILABLE, f"client {client.client_id} "
                             f"already holds {len(client.binds)} binds (the most allowed)",
                             client.client_id)

    def _addresses(self, wanted: IPv4 | None, client_id: int, ports: bool) -> list[IPv4]:
        if wanted is None:
            return list(self.policy.pool)
        if wanted not in self._holdings:
            code = Refusal.LOCAL_ADDR_UNALLOWED if not ports else Refusal.LOCAL_ADDRPORT_UNALLOWED
            raise LeaseError(code, f"{wanted} is not in the POOL", client_id)
        return [wanted]

    def assign_ports(self, client_id: int, address: IPv4 | None, ports: Sequence[int] | None,
                     count: int, lease: float | None, now: float, *, tunnel: int = 1,
                     listen: bool = False) -> Bind:
        """RSAP-IP (a block of `count` ports anywhere in PORT_RANGE, or the given `ports`)
        or LISTEN (`listen`: the given ports may lie in LISTEN_RANGE too)."""
        client = self.clients[client_id]
        self._room(client)
        wanted: tuple[int, int] | None = None
        if ports:
            first, last = min(ports), max(ports)
            if last - first + 1 != len(set(ports)):
                raise LeaseError(Refusal.LOCAL_ADDRPORT_UNALLOWED, "the ports asked for are "
                                 "not one contiguous block", client_id)
            if not (self._within(self.policy.port_range, first, last)
                    or (listen and self._within(self.policy.listen_range, first, last))):
                allowed = self._range_text(listen)
                raise LeaseError(Refusal.LOCAL_ADDRPORT_UNALLOWED, f"ports {first}-{last} are "
                                 f"outside {allowed}", client_id)
            wanted = (first, last)
            count = last - first + 1
        if not 1 <= count <= self.policy.max_block:
            raise LeaseError(Refusal.LOCAL_ADDRPORT_UNALLOWED, f"{count} ports asked for; a "
                             f"bind holds 1-{self.policy.max_block}", client_id)
        in_use = False
        for candidate in self._addresses(address, client_id, True):
            held = self._holdings[candidate]
            if held.whole is not None:
                in_use = True
                continue
            if wanted is not None:
                if held.overlaps(*wanted):
                    in_use = True
                    continue
                first = wanted[0]
            else:
                low, high = self.policy.port_range
                gap = held.find_gap(low, high, count, self._hint[candidate])
                if gap is None:
                    continue
                first = gap
                self._hint[candidate] = first + count if first + count <= high else low
            kind = BindKind.LISTEN if listen else BindKind.PORTS
            return self._add_bind(client, kind, candidate, first, first + count - 1,
                                  self._lease(lease, self.policy.bind_lease), now, tunnel)
        if in_use:
            raise LeaseError(Refusal.LOCAL_ADDRPORT_INUSE, "the ports asked for are held by "
                             "another host (or in quarantine after their release)", client_id)
        raise LeaseError(Refusal.LOCAL_ADDRPORT_UNAVAILABLE, f"no block of {count} free ports "
                         "is left in PORT_RANGE", client_id)

    @staticmethod
    def _within(bounds: tuple[int, int], first: int, last: int) -> bool:
        return bounds[0] <= first and last <= bounds[1]

    def _range_text(self, listen: bool) -> str:
        low, high = self.policy.port_range
        text = f"PORT_RANGE {low}-{high}"
        if listen:
            low, high = self.policy.listen_range
            text += f" and LISTEN_RANGE {low}-{high}"
        return text

    def assign_address(self, client_id: int, address: IPv4 | None, lease: float | None,
                       now: float, *, tunnel: int = 1) -> Bind:
        """RSA-IP: a whole pool address, none of whose ports are held."""
        client = self.clients[client_id]
        self._room(client)
        candidates = self._addresses(address, client_id, False)
        for candidate in candidates:
            if not self.policy.whole_addresses or candidate in self.policy.own:
                continue
            held = self._holdings[candidate]
            if held.whole is None and not len(held):
                return self._add_bind(client, BindKind.ADDRESS, candidate, *PORT_SPACE,
                                      self._lease(lease, self.policy.bind_lease), now, tunnel)
        if address is not None:
            if address in self.policy.own or not self.policy.whole_addresses:
                raise LeaseError(Refusal.LOCAL_ADDR_UNALLOWED, f"{address} is not leased as a "
                                 "whole address (the gateway's own, or RSA-IP is off)",
                                 client_id)
            raise LeaseError(Refusal.LOCAL_ADDR_INUSE, f"{address} is in use", client_id)
        raise LeaseError(Refusal.LOCAL_ADDR_UNAVAILABLE, "no pool address is free to lease "
                         "whole", client_id)

    def _add_bind(self, client: Client, kind: BindKind, address: IPv4, first: int, last: int,
                  lease: float, now: float, tunnel: int, protocol: int = 0) -> Bind:
        bind = Bind(client.client_id, client.take_bind_id(), kind, address, first, last,
                    now + lease, tunnel, protocol)
        self._hold(bind)
        client.binds[bind.bind_id] = bind
        self._timer(bind.expires, client.client_id, bind.bind_id)
        self._stretch(client, bind.expires)
        self._touch(client.client_id)
        return bind

    def _hold(self, bind: Bind) -> None:
        held = self._holdings[bind.address]
        if bind.kind is BindKind.ADDRESS:
            held.whole = (bind.client_id, bind.bind_id)
        else:
            held.add(bind.first, bind.last, (bind.client_id, bind.bind_id))

    def _stretch(self, client: Client, expires: float) -> None:
        """R = max(R, B) (RFC 3103 section 6)."""
        if expires > client.expires:
            client.expires = expires
            self._timer(expires, client.client_id, 0)

    def extend(self, client_id: int, bind_id: int, lease: float | None, now: float) -> Bind:
        client = self.clients[client_id]
        bind = client.binds.get(bind_id)
        if bind is None:
            raise LeaseError(Refusal.BAD_BIND_ID, f"client {client_id} holds no bind "
                             f"{bind_id}", client_id)
        bind.expires = now + self._lease(lease, self.policy.bind_lease)
        self._timer(bind.expires, client_id, bind_id)
        self._stretch(client, bind.expires)
        self._touch(client_id)
        return bind

    def free(self, client_id: int, bind_id: int, now: float) -> Bind:
        client = self.clients[client_id]
        bind = client.binds.pop(bind_id, None)
        if bind is None:
            raise LeaseError(Refusal.BAD_BIND_ID, f"client {client_id} holds no bind "
                             f"{bind_id}", client_id)
        self._release(bind, now)
        self._touch(client_id)
        return bind

    def _release(self, bind: Bind, now: float) -> None:
        held = self._holdings[bind.address]
        until = now + self.policy.quarantine
        if bind.kind is BindKind.ADDRESS:
            held.whole = None
            # the whole address rests in quarantine as one block covering every port
            held.add(PORT_SPACE[0], PORT_SPACE[1], until)
            heapq.heappush(self._quarantine, (until, bind.address, PORT_SPACE[0]))
            return
        held.remove(bind.first)
        held.add(bind.first, bind.last, until)
        heapq.heappush(self._quarantine, (until, bind.address, bind.first))

    def _timer(self, when: float, client_id: int, bind_id: int) -> None:
        heapq.heappush(self._timers, (when, not bind_id, client_id, bind_id))

    def _touch(self, client_id: int) -> None:
        self.changed.add(client_id)

    # --- time ------------------------------------------------------------------------------

    def next_expiry(self) -> float | None:
        times = [t[0] for t in self._timers[:1]] + [q[0] for q in self._quarantine[:1]]
        return min(times) if times else None

    def expire(self, now: float) -> list[Expired]:
        """Drop what ran out by `now`: binds first, then registrations without binds."""
        gone: list[Expired] = []
        while self._quarantine and self._quarantine[0][0] <= now:
            until, address, first = heapq.heappop(self._quarantine)
            held = self._holdings[address]
            for start, _end, holder in list(held.holders_in(first, first)):
                if start == first and holder == until:
                    held.remove(first)
        while self._timers and self._timers[0][0] <= now:
            when, _, client_id, bind_id = heapq.heappop(self._timers)
            client = self.clients.get(client_id)
            if client is None:
                continue
            if bind_id:
                bind = client.binds.get(bind_id)
                if bind is None or bind.expires != when:
                    continue
                del client.binds[bind_id]
                self._release(bind, now)
                self._touch(client_id)
                gone.append(Expired(client_id, bind_id, client.host))
            elif client.expires == when:
                if client.binds:  # cannot happen (R >= every B) unless restored oddly
                    self._stretch(client, max(b.expires for b in client.binds.values()))
                    continue
                self.deregister(client_id, now)
                gone.append(Expired(client_id, None, client.host))
        return gone

    # --- PCP / NAT-PMP (ipshift.rsip.mapping.PortAuthority) ----------------------------------

    def claim(self, owner: str, address: IPv4, protocol: int, port: int | None,
              lifetime: float, now: float) -> int | None:
        """Reserve `port` (or any free port of PORT_RANGE) at `address` for a port forward.

        A port asked for by number is given if it is free and unprivileged (1024 and up, as
        miniupnpd allows by default) or in LISTEN_RANGE (well-known ports the operator lets
        hosts take); otherwise another port of PORT_RANGE comes back, which the caller may
        refuse. So a host cannot take the gateway's own ssh port unless LISTEN_RANGE says so.
        The forward's lifetime is the caller's to keep: it calls `release` when it ends."""
        if address not in self._holdings:
            return None
        held = self._holdings[address]
        if held.whole is not None:
            return None
        key = self._mapping_owner(owner)
        if port is not None and self._leasable(port) and not held.overlaps(port, port):
            first = port
        else:
            low, high = self.policy.port_range
            gap = held.find_gap(low, high, 1, self._hint[address])
            if gap is None:
                return None
            first = gap
            self._hint[address] = first + 1 if first < high else low
        held.add(first, first, (key, first))
        return first

    def release(self, owner: str, address: IPv4, protocol: int, port: int, now: float) -> None:
        held = self._holdings.get(address)
        if held is None:
            return
        key = self._mapping_owner(owner)
        for start, _end, holder in list(held.holders_in(port, port)):
            if start == port and holder == (key, port):
                held.remove(port)
                held.add(port, port, now + self.policy.quarantine)
                heapq.heappush(self._quarantine, (now + self.policy.quarantine, address, port))

    def unclaim(self, owner: str, address: IPv4, protocol: int, port: int) -> None:
        """Take back a claim no forward used, at once (no quarantine)."""
        held = self._holdings.get(address)
        if held is None:
            return
        key = self._mapping_owner(owner)
        for start, _end, holder in list(held.holders_in(port, port)):
            if start == port and holder == (key, port):
                held.remove(port)

    def _leasable(self, port: int) -> bool:
        low, high = self.policy.listen_range
        return UNPRIVILEGED <= port <= PORT_SPACE[1] or low <= port <= high

    def _mapping_owner(self, owner: str) -> int:
        # Port forwards are held under negative "client" numbers, one per owner, given out in
        # order: no RSIP client and no other owner can share one.
        number = self._mapping_owners.get(owner)
        if number is None:
            number = self._mapping_owners[owner] = -len(self._mapping_owners) - 1
        return number

    # --- views and persistence -------------------------------------------------------------

    def binds(self) -> Iterator[Bind]:
        for client in self.clients.values():
            yield from client.binds.values()

    def restore(self, clients: Iterable[Client], now: float) -> list[Expired]:
        """Take back persisted clients (ipshift.rsip.store) after a restart; what ran out
        while the gateway was down expires at once. Binds that collide with earlier ones
        (a corrupt store) are dropped."""
        for client in clients:
            kept: dict[int, Bind] = {}
            for bind in client.binds.values():
                held = self._holdings.get(bind.address)
                if held is None or held.whole is not None or (
                        bind.kind is BindKind.ADDRESS and len(held)) or (
                        bind.kind is not BindKind.ADDRESS and held.overlaps(bind.first,
                                                                            bind.last)):
                    continue
                self._hold(bind)
                kept[bind.bind_id] = bind
                self._timer(bind.expires, client.client_id, bind.bind_id)
            client.binds = kept
            self._insert(client)
            self._next_client = max(self._next_client, client.client_id % 0xFFFFFFFF + 1)
        return self.expire(now)

    def take_changes(self) -> tuple[set[int], set[int]]:
        """Clients changed and removed since the last call (for the store)."""
        changed, removed = self.changed, self.removed
        self.changed, self.removed = set(), set()
        return changed - removed, removed

    def usage(self) -> dict[str, int]:
        ports = sum(b.count for b in self.binds() if b.kind is not BindKind.ADDRESS)
        return {"clients": len(self.clients), "binds": sum(len(c.binds) for c in
                                                           self.clients.values()),
                "ports": ports, "quarantined": len(self._quarantine)}
