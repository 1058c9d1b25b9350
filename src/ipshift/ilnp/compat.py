"""A node that speaks the seed overlay's private format (seedwire.py): sans-I/O.

The seed's nodes form an overlay on one link: every locator is a multicast group
(`seedwire.group_for`), a node joins the groups of its locators, and routers (nodes joined to
several) carry unicast between them. This engine is one such node, so a program of this
project can take part in a seed deployment (or test against the seed's reference peer):

    node = SeedNode(SeedConfig(nid=0x2222, hostname="cn", locators=(L3,), ports={7000}))
    node.start(now)                                    # Join(L3), a solicitation
    node.datagram(data, arrival_locator, source_addr, now)   # from the group socket
    node.send_stp(7000, "mn", 7000, b"hello", now)     # False: unknown host, or no locator
    node.set_locators((L1, L2), now)                   # a move: LUs to every correspondent
    node.timer(now); node.next_deadline()              # solicitations, expiry, retries, leaves
    for action in node.actions(): ...                  # Multicast, Deliver, Join, Leave, Log

Nothing here reads a clock or touches a socket; `now` is seconds on any monotonic clock, and
the solicitation jitter comes from the `rng` handed in. The adapter applies `Multicast(L, b)`
by sending `b` to `group_for(L, uid)` on its interface, and feeds each received datagram with
`locator_of_group(<its destination>)` as the arrival locator.

Decisions where the seed's description leaves things open:

- Routing at every node is backwards learning: a datagram from source locator S that arrived
  on our locator A means S is reached through A (for `route_lifetime`, 30 s). Unicast to
  locator D goes out on D's group if we hold D, else on the group of the learned route; with
  neither it goes out on our primary locator (the first of the current set; counted
  `unrouted`), where a router may know the way. The source locator of every datagram we
  originate is the locator of the group it goes out on (so what others learn is true).
- Discovery is sent on each of our locators' groups (not on the ALL_NODES group, which no node
  joins), with destination locator ALL_NODES and NID 0; each copy names the locator it goes
  out on. Solicitations at start and then every U(wait/2, wait); a solicitation is answered by
  an advertisement on every locator, at most once per `answer_holdoff` (1 s) per soliciting
  node (routers flood, so one solicitation can arrive several times). A neighbour's locators
  are the ones its discovery named or its last LU advertised, each living 3 x wait; a
  neighbour left with none is forgotten. Discovery whose header and body NIDs differ is
  dropped.
- "Every known correspondent" is every neighbour: a move sends one LU advertisement (the full
  new set) to each, addressed to the neighbour's primary locator (the first one known), then
  retries `lu_retries` (3) times at `lu_interval` (1 s) until that neighbour's ack; an ack is
  matched by its sender's NID (the format has nothing else). After the last retry goes
  unanswered for an interval the update is given up (`lu_failed`).
- A correspondent acks every advertisement (a retry too) to the first locator of the
  advertised set (the mover's new primary), or to the update's source locator if the set is
  empty; that ack is what gives the mover a route back through a router at once.
- Unicast is ours when its destination NID is ours, whatever its locator (the NID names the
  node; after a move a stale locator still reaches us through a router).
- Soft handoff is the engine's: `set_locators` joins the new groups at once and leaves the ones
  no longer in the set `handoff` seconds later (10 s, the seed's `handoff_time`); leaving a
  locator deletes the routes through it. The move schedule itself is the adapter's.
- A router forwards unicast that is not its own with the hop limit decremented (dropped when
  it would reach 0), never back onto the locator it came from (the destination heard it there
  already: `on_link`), and floods discovery onto its other locators the same way.
- Own-datagram suppression by source address is the adapter's (it knows its addresses): it
  fills `own_addresses`, and `from_self` is the test. Datagrams naming our own NID as source
  (our discovery flooded back by a router) are dropped here (`own_nid`).
"""

from __future__ import annotations

import ipaddress
import random
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

from ipshift.ilnp.seedwire import (
    ALL_NODES,
    ALL_NODES_NID,
    DEFAULT_HOP_LIMIT,
    MAX_PAYLOAD,
    NH_DISCOVERY,
    NH_LOCATOR_UPDATE,
    NH_STP,
    U64_MAX,
    Body,
    Discovery,
    LocatorUpdate,
    SeedHeader,
    SeedWireError,
    Stp,
    decode_body,
    decode_datagram,
    encode,
    format_locator,
)


@dataclass(frozen=True)
class SeedConfig:
    nid: int
    hostname: str
    #: the locators joined at start (in order: the first is the primary)
    locators: tuple[int, ...]
    #: discovery period: solicitations every U(wait/2, wait), entries live 3 x wait
    wait: float = 30.0
    hop_limit: int = DEFAULT_HOP_LIMIT
    router: bool = False
    #: the uid the groups are named by (the adapter's business; kept here for status)
    uid: int = 0
    #: soft handoff: how long a left locator's group stays joined after a move
    handoff: float = 10.0
    #: STP ports bound at start (bind/unbind change them)
    ports: frozenset[int] = frozenset()
    route_lifetime: float = 30.0
    lu_retries: int = 3
    lu_interval: float = 1.0
    answer_holdoff: float = 1.0

    def __post_init__(self) -> None:
        if not 0 < self.nid <= U64_MAX:
            raise ValueError(f"NID {self.nid:#x}: 1 .. 2^64-1 (0 is the all-nodes NID)")
        if not self.hostname:
            raise ValueError("a node needs a hostname (discovery carries it)")
        for locator in self.locators:
            if not 0 <= locator <= U64_MAX:
                raise ValueError(f"locator {locator:#x} is not a 64-bit value")
        if self.wait <= 0:
            raise ValueError(f"wait {self.wait}: must be positive")
        if not 1 <= self.hop_limit <= 255:
            raise ValueError(f"hop limit {self.hop_limit}: 1..255")
        if self.handoff < 0 or self.lu_interval <= 0 or self.lu_retries < 0:
            raise ValueError("handoff >= 0, lu_interval > 0 and lu_retries >= 0")
        object.__setattr__(self, "ports", frozenset(self.ports))


# --- actions -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Multicast:
    """Send `data` to the group of `locator` (`group_for(locator, uid)`)."""

    locator: int
    data: bytes


@dataclass(frozen=True)
class Deliver:
    """An STP datagram for bound port `port`."""

    port: int
    payload: bytes
    from_hostname: str  # "" when the sender was never discovered
    from_port: int
    from_nid: int = 0


@dataclass(frozen=True)
class Join:
    locator: int


@dataclass(frozen=True)
class Leave:
    locator: int


@dataclass(frozen=True)
class Log:
    """Something worth a line: `event` is one of discovered, expired, moved, left, lu_sent,
    lu_acked, lu_failed, lu_received."""

    event: str
    message: str
    nid: int = 0
    rtt: float | None = None  # lu_acked: seconds from the first send of the update


Action = Multicast | Deliver | Join | Leave | Log


# --- state -------------------------------------------------------------------------------------
@dataclass
class Neighbour:
    nid: int
    hostname: str
    #: locator -> expiry, in the order learned (an LU replaces them all)
    locators: dict[int, float] = field(default_factory=dict)

    @property
    def primary(self) -> int | None:
        return next(iter(self.locators), None)

    @property
    def expiry(self) -> float:
        return max(self.locators.values(), default=0.0)


@dataclass
class Route:
    via: int  # our locator the destination locator is reached through
    expiry: float


@dataclass
class _PendingUpdate:
    locators: tuple[int, ...]
    first_sent: float
    next_at: float
    sent: int = 1


def from_self(source_addr: str, own_addresses: Iterable[str]) -> bool:
    """Whether a datagram's source address is one of ours (a `%scope` suffix is ignored): the
    seed's nodes hear their own multicast and drop it by this test."""
    try:
        source = ipaddress.ip_address(source_addr.split("%", 1)[0])
    except ValueError:
        return False
    for own in own_addresses:
        try:
            if ipaddress.ip_address(own.split("%", 1)[0]) == source:
                return True
        except ValueError:
            continue
    return False


class SeedNode:
    def __init__(self, config: SeedConfig, rng: random.Random | None = None) -> None:
        self.config = config
        self.nid = config.nid
        self.rng = rng or random.Random()
        self.ports: set[int] = set(config.ports)
        #: the locators whose groups are joined now (handoff: old and new), in order
        self.joined: list[int] = []
        #: the current set (what the last move advertised)
        self.current: tuple[int, ...] = tuple(dict.fromkeys(config.locators))
        self.leaving: dict[int, float] = {}
        self.neighbours: dict[int, Neighbour] = {}
        self.routes: dict[int, Route] = {}
        #: the adapter's source addresses (own-datagram suppression)
        self.own_addresses: set[str] = set()
        self.counters: Counter[str] = Counter()
        self.drops: Counter[str] = Counter()
        self.started = False
        self._by_hostname: dict[str, int] = {}
        self._pending: dict[int, _PendingUpdate] = {}
        self._answered: dict[int, float] = {}
        self._next_solicit: float | None = None
        self._out: list[Action] = []

    # --- events ---------------------------------------------------------------------------
    def start(self, now: float) -> None:
        """Join the configured locators and solicit."""
        if self.started:
            return
        self.started = True
        for locator in self.current:
            self._join(locator)
        self._solicit(now)

    def bind(self, port: int) -> None:
        self.ports.add(port)

    def unbind(self, port: int) -> None:
        self.ports.discard(port)

    def actions(self) -> list[Action]:
        out, self._out = self._out, []
        return out

    def datagram(self, data: bytes, arrival_locator: int, source_addr: str, now: float) -> None:
        """A datagram received on the group of `arrival_locator` from `source_addr`."""
        self.counters["received"] += 1
        if self.own_addresses and from_self(source_addr, self.own_addresses):
            self._drop("own_address")
            return
        if arrival_locator not in self.joined:
            self._drop("not_joined")
            return
        try:
            header, payload = decode_datagram(data)
            body = decode_body(header.next_header, payload)
        except SeedWireError as exc:
            self._drop(exc.counter)
            return
        if header.src_nid == self.nid:
            self._drop("own_nid")
            return
        if header.src_locator not in self.joined:
            self.routes[header.src_locator] = Route(arrival_locator,
                                                    now + self.config.route_lifetime)
        if isinstance(body, Discovery):
            self._discovery(header, body, arrival_locator, now)
        elif header.dst_nid == self.nid:
            if isinstance(body, Stp):
                self._stp(header, body)
            elif isinstance(body, LocatorUpdate):
                self._locator_update(header, body, now)
        elif self.config.router:
            self._forward(header, body, arrival_locator, now)
        else:
            self._drop("not_mine")

    def send_stp(self, src_port: int, dst_hostname: str, dst_port: int, payload: bytes,
                 now: float) -> bool:
        """Send an STP datagram to a discovered host; False (and counted) if it cannot go."""
        nid = self._by_hostname.get(dst_hostname)
        neighbour = self.neighbours.get(nid) if nid is not None else None
        if neighbour is None or neighbour.primary is None:
            self._drop("unknown_host")
            return False
        if len(payload) > MAX_PAYLOAD - 4:
            self._drop("too_big")
            return False
        if self._unicast(Stp(src_port, dst_port, bytes(payload)), neighbour.primary,
                         neighbour.nid, now):
            self.counters["stp_sent"] += 1
            return True
        return False

    def set_locators(self, new_set: Iterable[int], now: float) -> None:
        """A move to `new_set`: join what is new now, leave what is gone after the handoff,
        and send every correspondent an LU advertisement (retried until acked)."""
        new = tuple(dict.fromkeys(new_set))
        for locator in new:
            if not 0 <= locator <= U64_MAX:
                raise ValueError(f"locator {locator:#x} is not a 64-bit value")
        if new == self.current:
            return
        self.current = new
        self.counters["moves"] += 1
        for locator in new:
            self.leaving.pop(locator, None)
            if locator not in self.joined:
                self._join(locator)
        self._log("moved", "locators now " + ",".join(format_locator(x) for x in new))
        for neighbour in list(self.neighbours.values()):
            if neighbour.primary is None:
                continue
            self._pending[neighbour.nid] = _PendingUpdate(new, now, now + self.config.lu_interval)
            self._send_update(neighbour, new, now)
        for locator in self.joined:
            if locator not in new and locator not in self.leaving:
                self.leaving[locator] = now + self.config.handoff
        if self.config.handoff == 0:
            self._leave_due(now)

    def timer(self, now: float) -> None:
        self._leave_due(now)
        if self._next_solicit is not None and now >= self._next_solicit:
            self._solicit(now)
        for nid, pending in list(self._pending.items()):
            if now < pending.next_at:
                continue
            neighbour = self.neighbours.get(nid)
            if pending.sent > self.config.lu_retries or neighbour is None:
                del self._pending[nid]
                self.counters["lu_failed"] += 1
                self._log("lu_failed", f"no ack from {self._name(nid)} after "
                          f"{pending.sent} updates", nid)
                continue
            pending.sent += 1
            pending.next_at = now + self.config.lu_interval
            self._send_update(neighbour, pending.locators, now)
        for neighbour in list(self.neighbours.values()):
            for locator, expiry in list(neighbour.locators.items()):
                if expiry <= now:
                    del neighbour.locators[locator]
            if not neighbour.locators:
                self._forget(neighbour)
        for locator, route in list(self.routes.items()):
            if route.expiry <= now:
                del self.routes[locator]
        for nid, at in list(self._answered.items()):
            if at + self.config.answer_holdoff <= now:
                del self._answered[nid]

    def next_deadline(self) -> float | None:
        times: list[float] = list(self.leaving.values())
        if self._next_solicit is not None:
            times.append(self._next_solicit)
        times += (p.next_at for p in self._pending.values())
        times += (min(n.locators.values()) for n in self.neighbours.values() if n.locators)
        times += (r.expiry for r in self.routes.values())
        times += (at + self.config.answer_holdoff for at in self._answered.values())
        return min(times, default=None)

    # --- state for status and tests -------------------------------------------------------
    def neighbour_by_hostname(self, hostname: str) -> Neighbour | None:
        nid = self._by_hostname.get(hostname)
        return self.neighbours.get(nid) if nid is not None else None

    def pending_updates(self) -> set[int]:
        """NIDs whose ack of the last move is still awaited."""
        return set(self._pending)

    def status(self) -> dict[str, object]:
        return {
            "nid": f"{self.nid:x}",
            "hostname": self.config.hostname,
            "router": self.config.router,
            "locators": [format_locator(x) for x in self.current],
            "joined": [format_locator(x) for x in self.joined],
            "neighbours": {
                f"{n.nid:x}": {"hostname": n.hostname,
                               "locators": [format_locator(x) for x in n.locators]}
                for n in self.neighbours.values()
            },
            "routes": {format_locator(d): format_locator(r.via) for d, r in self.routes.items()},
            "pending_updates": sorted(f"{x:x}" for x in self._pending),
            "counters": dict(self.counters),
            "drops": dict(self.drops),
        }

    # --- receiving ------------------------------------------------------------------------
    def _discovery(self, header: SeedHeader, body: Discovery, arrival: int, now: float) -> None:
        if header.dst_locator != ALL_NODES or header.dst_nid != ALL_NODES_NID:
            self._drop("discovery_not_all_nodes")
            return
        if body.nid != header.src_nid:
            self._drop("discovery_nid_mismatch")
            return
        self.counters["discovery_received"] += 1
        self._heard(body.nid, body.hostname, body.locator, now)
        answered = self._answered.get(body.nid)
        if body.solicitation and (answered is None
                                  or now - answered >= self.config.answer_holdoff):
            self._answered[body.nid] = now
            self._discover(solicitation=False)
        if self.config.router:
            if header.hop_limit > 1:
                data = encode(header.forwarded(), body)
                for locator in self.joined:
                    if locator != arrival:
                        self._out.append(Multicast(locator, data))
                        self.counters["flooded"] += 1
            else:
                self.counters["not_flooded_hop_limit"] += 1

    def _heard(self, nid: int, hostname: str, locator: int, now: float) -> None:
        neighbour = self.neighbours.get(nid)
        expiry = now + 3 * self.config.wait
        if neighbour is None:
            neighbour = self.neighbours[nid] = Neighbour(nid, hostname)
            self._log("discovered", f"{hostname} ({nid:x}) at {format_locator(locator)}", nid)
        elif hostname and neighbour.hostname != hostname:
            if self._by_hostname.get(neighbour.hostname) == nid:
                del self._by_hostname[neighbour.hostname]
            neighbour.hostname = hostname
        if hostname:
            self._by_hostname[hostname] = nid
        neighbour.locators[locator] = expiry

    def _stp(self, header: SeedHeader, body: Stp) -> None:
        if body.dst_port not in self.ports:
            self._drop("unbound_port")
            return
        self.counters["delivered"] += 1
        self._out.append(Deliver(body.dst_port, body.payload, self._name(header.src_nid, ""),
                                 body.src_port, header.src_nid))

    def _locator_update(self, header: SeedHeader, body: LocatorUpdate, now: float) -> None:
        nid = header.src_nid
        if body.ack:
            pending = self._pending.pop(nid, None)
            if pending is None:
                self._drop("unexpected_ack")
                return
            self.counters["lu_acked"] += 1
            rtt = now - pending.first_sent
            self._log("lu_acked", f"{self._name(nid)} acked after {rtt * 1000:.1f} ms", nid, rtt)
            return
        self.counters["lu_received"] += 1
        neighbour = self.neighbours.get(nid)
        if neighbour is None:
            neighbour = self.neighbours[nid] = Neighbour(nid, "")
        expiry = now + 3 * self.config.wait
        neighbour.locators = {locator: expiry for locator in body.locators}
        self._log("lu_received", f"{self._name(nid)} moved to "
                  + ",".join(format_locator(x) for x in body.locators), nid)
        to = body.locators[0] if body.locators else header.src_locator
        if self._unicast(LocatorUpdate.acknowledge(), to, nid, now):
            self.counters["lu_acks_sent"] += 1

    def _forward(self, header: SeedHeader, body: Body, arrival: int, now: float) -> None:
        if header.dst_locator == arrival:
            self._drop("on_link")
            return
        if header.hop_limit <= 1:
            self._drop("hop_limit")
            return
        via = self._next_hop(header.dst_locator, now)
        if via is None or via == arrival:
            self._drop("no_route")
            return
        self._out.append(Multicast(via, encode(header.forwarded(), body)))
        self.counters["forwarded"] += 1

    # --- sending --------------------------------------------------------------------------
    def _next_hop(self, locator: int, now: float) -> int | None:
        if locator in self.joined:
            return locator
        route = self.routes.get(locator)
        if route is not None and route.expiry > now and route.via in self.joined:
            return route.via
        return None

    def _primary(self) -> int | None:
        for locator in self.current:
            if locator in self.joined:
                return locator
        return self.joined[0] if self.joined else None

    def _unicast(self, body: Body, dst_locator: int, dst_nid: int, now: float) -> bool:
        via = self._next_hop(dst_locator, now)
        if via is None:
            via = self._primary()
            if via is None:
                self._drop("no_locator")
                return False
            self.counters["unrouted"] += 1
        nh = NH_STP if isinstance(body, Stp) else NH_LOCATOR_UPDATE
        header = SeedHeader(nh, via, self.nid, dst_locator, dst_nid, self.config.hop_limit)
        self._out.append(Multicast(via, encode(header, body)))
        self.counters["sent"] += 1
        return True

    def _send_update(self, neighbour: Neighbour, locators: tuple[int, ...], now: float) -> None:
        if neighbour.primary is None:
            return
        if self._unicast(LocatorUpdate.advertise(locators), neighbour.primary, neighbour.nid,
                         now):
            self.counters["lu_sent"] += 1
            self._log("lu_sent", f"to {self._name(neighbour.nid)} at "
                      f"{format_locator(neighbour.primary)}", neighbour.nid)

    def _discover(self, *, solicitation: bool) -> None:
        for locator in self.joined:
            body = Discovery(self.nid, locator, solicitation, self.config.hostname)
            header = SeedHeader(NH_DISCOVERY, locator, self.nid, ALL_NODES, ALL_NODES_NID,
                                self.config.hop_limit)
            self._out.append(Multicast(locator, encode(header, body)))
        self.counters["solicitations" if solicitation else "advertisements"] += 1

    def _solicit(self, now: float) -> None:
        self._discover(solicitation=True)
        wait = self.config.wait
        self._next_solicit = now + self.rng.uniform(wait / 2, wait)

    # --- membership -----------------------------------------------------------------------
    def _join(self, locator: int) -> None:
        self.joined.append(locator)
        self._out.append(Join(locator))

    def _leave_due(self, now: float) -> None:
        for locator, at in list(self.leaving.items()):
            if at > now:
                continue
            del self.leaving[locator]
            if locator in self.joined:
                self.joined.remove(locator)
                self._out.append(Leave(locator))
                self._log("left", f"left {format_locator(locator)}")
            for dst, route in list(self.routes.items()):
                if route.via == locator:
                    del self.routes[dst]

    # --- helpers --------------------------------------------------------------------------
    def _forget(self, neighbour: Neighbour) -> None:
        del self.neighbours[neighbour.nid]
        if self._by_hostname.get(neighbour.hostname) == neighbour.nid:
            del self._by_hostname[neighbour.hostname]
        self._log("expired", f"{self._name(neighbour.nid, neighbour.hostname)} "
                  "not heard from for 3 x wait", neighbour.nid)

    def _name(self, nid: int, default: str | None = None) -> str:
        neighbour = self.neighbours.get(nid)
        if neighbour is not None and neighbour.hostname:
            return neighbour.hostname
        return f"{nid:x}" if default is None else default

    def _drop(self, reason: str) -> None:
        self.drops[reason] += 1

    def _log(self, event: str, message: str, nid: int = 0, rtt: float | None = None) -> None:
        self._out.append(Log(event, message, nid, rtt))
