"""The ILNP node's control engine (sans-I/O): the ILNP Correspondent Cache, nonces, Locator
Updates, locator selection, mobility and multihoming (RFC 6740, 6741, 6743, 6744).

It decides; the adapter (the node daemon and its tunnel hook) parses and writes packets with
`ipshift.packet.ilnp` and feeds the engine what they say. Identifiers are ints: a NID and an
L64 are 64-bit numbers, a nonce is bytes (4 or 12). Every event takes the clock (`now`,
seconds); nothing here reads a clock, a socket or the kernel.

    engine = NodeEngine(NodeConfig(nid=0x1))
    engine.set_locators({0x20010db800010000: Own(10)}, now)       # netlink, or a schedule
    engine.learned(0x2, {0x20010db800020000: Remote(10, 600)}, now)  # DNS or discovery
    route = engine.outbound(0x2, packet, now)    # None: queued until resolved, or dropped
    verdict = engine.inbound(Arrival(...), now)  # DELIVER / FORWARD(route) / DROP
    engine.locator_update(Arrival(...), update, now)   # an ICMPv6 Locator Update for us
    engine.handle_timer(now); engine.next_deadline()
    for action in engine.actions(): ...          # SendUpdate, Transmit, Resolve, Publish, Note

Decisions (RFC points left open, decided once):

- Preference: lower is preferred (RFC 6742). The remote locator used is the most preferred one
  not expired that this node can reach: directly (it is one of ours) or through a router on
  one of ours. Ties go to a locator we share (direct beats routed), then to the lower number.
- Nonces: each side picks its own (RFC 6744); the peer's is learned from the first packet of
  the session that carries one. A nonce equal to the one we send is accepted too (FreeBSD uses
  one nonce for both directions) and then is the peer's. A Locator Update without the peer's
  nonce, or with another, is a forgery: dropped, counted, logged. Our packets carry our nonce
  until the peer's first packet arrives (a session we start) or for `nonce_hold` (one it
  starts), and after a move (ours or theirs) for `nonce_hold` (0.5 s), at least 3 round-trip
  times, and in any case until our Locator Update is acknowledged (a lost update must not
  leave our packets from a new locator without the nonce that vouches for them).
- A data packet from a known correspondent at a locator we do not have for it is accepted only
  with the right nonce (it may have moved before its LU reached us); without one it is
  dropped (`unknown_locator`): a spoofer cannot inject by guessing a NID.
- Locator Updates: sent to every correspondent heard from or sent to within `active` seconds,
  at once, then retried with linear back-off (interval x try, `lu_tries` in all, as FreeBSD
  does); the ack must repeat the advertised set. A retransmitted advertisement is acked again.
- Replays: an advertisement must come from one of the locators it advertises. Our
  advertisements are numbered: the 16-bit Reserved field (which RFC 6743 says to send as
  zero and to ignore) carries a move counter, 1..65535 and wrapping, and its ack repeats it
  (`lu_sequence`, on by default; off sends zero as the RFC says). From a correspondent that
  numbers its updates, one not newer than the last taken (serial-number order) is a replay or
  a late retransmission of an older set and is dropped, whatever the time; a copy of the
  current one is acked again. From one that does not (Reserved zero: another
  implementation), an advertisement bringing back a set replaced less than `replay_window`
  ago is dropped as a replay (so a node moving back within the window must be numbering).
  The nonce already stops every off-path forger; these stop an on-path one from undoing a
  move by replaying an earlier update. (Beyond that the RFC's nonce offers no more: RFC 6744
  leaves it to IPsec.)
- A locator that expires (its lifetime from the LU or DNS) is removed; a correspondent left
  with none is resolved again.
"""

from __future__ import annotations

import heapq
import logging
import os
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from enum import Enum

log = logging.getLogger("ipshift.ilnp")

ADVERTISE, ACK = 1, 2     # Locator Update operations (RFC 6743)
MAX_QUEUED = 16           # packets kept per correspondent while it is resolved


@dataclass(frozen=True, slots=True)
class Own:
    """One of this node's locators."""

    preference: int = 10
    lifetime: int = 600       # seconds, as advertised


@dataclass(frozen=True, slots=True)
class Remote:
    """A correspondent's locator as learned (DNS, discovery, a Locator Update, a packet)."""

    preference: int
    lifetime: float           # seconds from when it was learned
    source: str = "dns"


@dataclass(frozen=True, slots=True)
class NodeConfig:
    nid: int
    nonce_size: int = 4           # bytes: 4 or 12 (RFC 6744)
    lu_interval: float = 0.25     # s: the n-th retry goes n x this after the one before
    lu_tries: int = 7
    nonce_hold: float = 0.5       # s of nonce in every packet after a move (>= 3 RTT, and
    #                               while our update is not acked)
    active: float = 120.0         # s: a correspondent heard from or sent to is told of moves
    idle: float = 600.0           # s: an ILCC entry this idle is forgotten
    resolve_wait: float = 5.0     # s a packet may wait for its correspondent's locators
    lu_sequence: bool = True      # number our advertisements in the Reserved field
    replay_window: float = 5.0    # s: an advertisement of a set replaced this recently is a
    #                               replay (longer than a retransmitting mover's tries)
    router: bool = False          # forward packets for other nodes by destination locator
    hop_limit: int = 64
    max_correspondents: int = 65536

    def __post_init__(self) -> None:
        if not 0 < self.nid < 1 << 64:
            raise ValueError(f"a NID is a non-zero 64-bit number, not {self.nid:#x}")
        if self.nonce_size not in (4, 12):
            raise ValueError("a nonce is 4 or 12 bytes (RFC 6744)")
        if self.lu_tries < 1 or self.lu_interval <= 0:
            raise ValueError("lu_tries >= 1 and lu_interval > 0")


# --- what the adapter tells the engine ----------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Arrival:
    """An ILNPv6 packet that came in: its I-LVs split, its nonce (or None), the locator of the
    network it arrived on, its hop limit."""

    src_locator: int
    src_nid: int
    dst_locator: int
    dst_nid: int
    nonce: bytes | None
    arrival_locator: int
    hop_limit: int = 64


@dataclass(frozen=True, slots=True)
class LocatorEntry:
    l64: int
    preference: int
    lifetime: int


@dataclass(frozen=True, slots=True)
class Update:
    """A Locator Update as the codec decoded it. `sequence`: the message's Reserved field,
    which ipshift senders fill with their move counter (0: none; see the module docstring)."""

    operation: int
    locators: tuple[LocatorEntry, ...]
    sequence: int = 0


# --- what the engine decides ---------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Route:
    """How a packet to `nid` leaves: from our `local` locator, addressed to `remote`:`nid`,
    handed to the node `next_hop` = (locator, NID) on our network `local` (the destination
    itself, or a router), with our nonce when it must carry one."""

    nid: int
    local: int
    remote: int
    next_hop: tuple[int, int]
    nonce: bytes | None


@dataclass(frozen=True, slots=True)
class Path:
    """The data path's view of one correspondent (`NodeEngine.paths`): packets to it leave
    from `local` for `remote`, handed to `next_hop`; ours carry `nonce_out` until
    `carry_until` (and until its first packet if `carry_first`); packets from it are taken
    from `locators`, or from elsewhere with one of the two nonces (then the engine learns
    the new locator). `carry_pending`: our Locator Update to it is not acked yet (the nonce
    rides whatever the time)."""

    nid: int
    local: int
    remote: int
    next_hop: tuple[int, int]
    nonce_out: bytes
    nonce_in: bytes | None
    carry_until: float
    carry_first: bool
    locators: frozenset[int]
    carry_pending: bool = False


class Verdict(Enum):
    DELIVER = "deliver"     # for this node: to the TUN device
    FORWARD = "forward"     # a router passing it on (see Arrival's destination)
    DROP = "drop"


@dataclass(frozen=True, slots=True)
class Decision:
    verdict: Verdict
    route: Route | None = None     # FORWARD: where to
    reason: str = ""               # DROP: the counter it went to


@dataclass(frozen=True, slots=True)
class SendUpdate:
    """Send a Locator Update (advertisement or ack) to a correspondent along `route`."""

    route: Route
    update: Update
    nonce: bytes


@dataclass(frozen=True, slots=True)
class Transmit:
    """A packet queued while its correspondent was resolved can go now."""

    route: Route
    packet: bytes


@dataclass(frozen=True, slots=True)
class Resolve:
    """Find the locators of `nid` (DNS, discovery); answer with `learned` or `unresolved`."""

    nid: int


@dataclass(frozen=True, slots=True)
class Publish:
    """Our locator set changed: publish it (DNS L64 records)."""

    locators: tuple[LocatorEntry, ...]


@dataclass(frozen=True, slots=True)
class Note:
    level: int
    text: str


Action = SendUpdate | Transmit | Resolve | Publish | Note


# --- the cache ----------------------------------------------------------------------------------
@dataclass(slots=True)
class _Pending:
    """Our advertisement outstanding to one correspondent."""

    locators: tuple[LocatorEntry, ...]
    first_sent: float
    tries: int
    due: float
    sequence: int = 0


@dataclass(slots=True)
class Correspondent:
    """An ILCC entry (RFC 6741 section 5)."""

    nid: int
    nonce_out: bytes
    locators: dict[int, tuple[Remote, float]] = field(default_factory=dict)  # l64 -> (, expiry)
    nonce_in: bytes | None = None
    heard: float = float("-inf")       # last packet from it
    sent: float = float("-inf")        # last packet to it
    nonce_until: float = float("-inf")  # our nonce goes in every packet until then (and
    #                                     until the first packet from it: the session's start)
    resolving_since: float | None = None
    pending: _Pending | None = None
    queue: deque[bytes] = field(default_factory=deque)
    rtt: float | None = None
    replaced: dict[tuple[tuple[int, int], ...], float] = field(default_factory=dict)
    sequence_in: int = 0               # the newest sequence of its advertisements we took
    packets_in: int = 0
    packets_out: int = 0

    def live_locators(self, now: float) -> dict[int, Remote]:
        return {l64: remote for l64, (remote, expiry) in self.locators.items() if expiry > now}


@dataclass
class Counters:
    packets_out: int = 0
    packets_in: int = 0
    forwarded: int = 0
    queued: int = 0
    lu_sent: int = 0
    lu_retransmitted: int = 0
    lu_acked: int = 0
    lu_failed: int = 0
    lu_superseded: int = 0
    lu_received: int = 0
    acks_sent: int = 0
    drops: dict[str, int] = field(default_factory=dict)

    def drop(self, reason: str) -> None:
        self.drops[reason] = self.drops.get(reason, 0) + 1


class NodeEngine:
    def __init__(self, config: NodeConfig, *,
                 random_bytes: Callable[[int], bytes] = os.urandom) -> None:
        self.config = config
        self._random = random_bytes
        self.own: dict[int, Own] = {}
        self.left: dict[int, float] = {}  # our locators removed lately -> until when packets
        #                                   addressed to them are still taken
        self.routers: dict[int, int] = {}          # our locator -> a router's NID on it
        self.ilcc: dict[int, Correspondent] = {}
        self.counters = Counters()
        self.lu_latencies: deque[float] = deque(maxlen=1024)  # advertisement -> ack, seconds
        self.moves = 0
        self._actions: list[Action] = []
        self._sequence = 0  # numbers our advertisements (1..65535, wrapping)
        self._timers: list[tuple[float, int]] = []  # (when, nid): retries, expiries, waits

    # --- our locators ------------------------------------------------------------------------
    def set_locators(self, locators: Mapping[int, Own], now: float) -> None:
        """Our locator set is now `locators` (an address came or went, or a scheduled move):
        every active correspondent is told, and packets carry the nonce for a while."""
        new = dict(locators)
        if new == self.own:
            return
        old = set(self.own)
        self.own = new
        for gone in old - set(new):  # packets already on their way there still arrive
            self.left[gone] = now + self.config.nonce_hold
        for back in set(new) & set(self.left):
            del self.left[back]
        for gone in old - set(new):
            self.routers.pop(gone, None)
        self.moves += 1
        self._sequence = self._sequence % 0xFFFF + 1 if self.config.lu_sequence else 0
        entries = self.advertised()
        self._note(logging.INFO, f"locators now {_l64s(new)} (were {_l64s(old)})")
        self._actions.append(Publish(entries))
        if not new:
            return  # nobody can be told until a locator comes (hard handoff)
        for cn in self.ilcc.values():
            if max(cn.heard, cn.sent) + self.config.active < now:
                continue
            cn.nonce_until = now + self._hold(cn)
            if cn.pending is not None:
                self.counters.lu_superseded += 1  # a newer set replaces it before its ack
            cn.pending = _Pending(entries, now, 0, now, self._sequence)
            self._send_pending(cn, now)

    def set_router(self, locator: int, nid: int | None) -> None:
        """A router (a node that forwards between locators) on our network `locator`."""
        if nid is None:
            self.routers.pop(locator, None)
        else:
            self.routers[locator] = nid

    def advertised(self) -> tuple[LocatorEntry, ...]:
        return tuple(LocatorEntry(l64, own.preference, own.lifetime)
                     for l64, own in sorted(self.own.items(), key=lambda kv: kv[1].preference))

    # --- what we learn about correspondents -------------------------------------------------------
    def learned(self, nid: int, locators: Mapping[int, Remote], now: float) -> None:
        """`nid` can be reached at `locators` (DNS, discovery). A Locator Update's set is newer
        than what DNS says and is kept where they differ."""
        cn = self._entry(nid, now)
        if cn is None:
            return
        for l64, remote in locators.items():
            current = cn.locators.get(l64)
            if current is None or current[0].source != "lu" or remote.source == "lu":
                cn.locators[l64] = (remote, now + remote.lifetime)
                self._timer(now + remote.lifetime, nid)
        cn.resolving_since = None
        self._release(cn, now)

    def unresolved(self, nid: int, now: float) -> None:
        """Resolution of `nid` failed: what waited for it is dropped."""
        cn = self.ilcc.get(nid)
        if cn is None:
            return
        cn.resolving_since = None
        while cn.queue:
            cn.queue.popleft()
            self.counters.drop("unresolved")

    # --- packets ------------------------------------------------------------------------------
    def outbound(self, nid: int, packet: bytes | None, now: float) -> Route | None:
        """A packet from the TUN device to `nid`: its route, or None (queued while `nid` is
        resolved, if `packet` is given, or dropped; counted either way)."""
        if nid == self.config.nid:
            self.counters.drop("to_self")
            return None
        cn = self._entry(nid, now)
        if cn is None:
            return None
        route = self._route(cn, now)
        if route is None:
            if not self.own:
                self.counters.drop("no_locator")
                return None
            if packet is not None and len(cn.queue) < MAX_QUEUED:
                cn.queue.append(bytes(packet))
                self.counters.queued += 1
            else:
                self.counters.drop("unresolved")
            if cn.resolving_since is None:
                cn.resolving_since = now
                self._actions.append(Resolve(nid))
                self._timer(now + self.config.resolve_wait, nid)
            return None
        cn.sent = now
        cn.packets_out += 1
        self.counters.packets_out += 1
        return route

    def inbound(self, arrival: Arrival, now: float) -> Decision:
        """A data packet that came in on `arrival.arrival_locator`."""
        a = arrival
        if a.dst_nid != self.config.nid:
            return self._forward(a)
        if a.dst_locator not in self.own and self.left.get(a.dst_locator, 0.0) <= now:
            return self._drop("not_our_locator")
        cn = self.ilcc.get(a.src_nid)
        if cn is None:
            if a.nonce is None:
                # a session's first packets carry the nonce (RFC 6744 section 2)
                return self._drop("no_nonce")
            cn = self._entry(a.src_nid, now)
            if cn is None:
                return self._drop("cache_full")
            cn.nonce_in = a.nonce
            cn.locators[a.src_locator] = (Remote(100, self.config.idle, "packet"),
                                          now + self.config.idle)
            cn.nonce_until = now + self._hold(cn)  # our first answers teach it our nonce
            self._timer(now + self.config.idle, a.src_nid)
        elif a.nonce is not None:
            if cn.nonce_in is None:
                cn.nonce_in = a.nonce  # its own, or ours used both ways
            elif not self._nonce_ok(cn, a.nonce):
                return self._drop("bad_nonce")
            if a.src_locator not in cn.locators:
                # moved before its update reached us: the nonce vouches for it
                cn.locators[a.src_locator] = (Remote(100, self.config.idle, "packet"),
                                              now + self.config.idle)
        elif a.src_locator not in cn.locators:
            return self._drop("unknown_locator")
        cn.heard = now
        cn.packets_in += 1
        self.counters.packets_in += 1
        return Decision(Verdict.DELIVER)

    def locator_update(self, arrival: Arrival, update: Update, now: float) -> Decision:
        """An ICMPv6 Locator Update for this node (advertisement or ack)."""
        if arrival.dst_nid != self.config.nid:
            return self._forward(arrival)
        self.counters.lu_received += 1
        cn = self.ilcc.get(arrival.src_nid)
        if cn is None:
            self._note(logging.WARNING, f"Locator Update from unknown {arrival.src_nid:#x} "
                                        "dropped")
            return self._drop("lu_unknown_correspondent")
        pending = cn.pending
        if arrival.nonce is not None and cn.nonce_in is None and update.operation == ACK \
                and pending is not None and update.locators == pending.locators \
                and update.sequence == pending.sequence and arrival.src_locator in cn.locators:
            # a one-way flow: we never heard its nonce. An ack from a locator we hold for it,
            # repeating our pending advertisement exactly, teaches it (checked just below)
            cn.nonce_in = arrival.nonce
        if arrival.nonce is None or not self._nonce_ok(cn, arrival.nonce) or \
                cn.nonce_in is None:
            self._note(logging.WARNING, f"Locator Update from {arrival.src_nid:#x} without "
                                        "its nonce: a forgery, dropped")
            return self._drop("lu_bad_nonce")
        if not update.locators:
            return self._drop("lu_malformed")
        cn.heard = now
        if update.operation == ACK:
            pending = cn.pending
            if pending is None or update.locators != pending.locators or \
                    update.sequence != pending.sequence:
                return self._drop("lu_stale_ack")
            latency = now - pending.first_sent
            self.lu_latencies.append(latency)
            if pending.tries == 1:  # Karn: a retransmitted update's ack is no RTT sample
                cn.rtt = latency if cn.rtt is None else 0.875 * cn.rtt + 0.125 * latency
            cn.pending = None
            cn.nonce_until = max(cn.nonce_until, now + self._hold(cn))  # what is in flight
            self.counters.lu_acked += 1
            return Decision(Verdict.DELIVER)
        if update.operation != ADVERTISE:
            return self._drop("lu_malformed")
        if arrival.src_locator not in {e.l64 for e in update.locators}:
            return self._drop("lu_source_not_advertised")
        current = tuple(sorted((l64, r.preference) for l64, (r, _) in cn.locators.items()
                               if r.source == "lu"))
        offered = tuple(sorted((e.l64, e.preference) for e in update.locators))
        if update.sequence:
            if cn.sequence_in and not _newer(update.sequence, cn.sequence_in) and not (
                    update.sequence == cn.sequence_in and offered == current):
                self._note(logging.WARNING, f"Locator Update {update.sequence} from "
                                            f"{nid_text(cn.nid)} is older than {cn.sequence_in}"
                                            ": a replay or a late copy, dropped")
                return self._drop("lu_replayed")
            cn.sequence_in = update.sequence
        elif offered != current:
            replaced = cn.replaced.get(offered)
            if replaced is not None and now - replaced < self.config.replay_window:
                self._note(logging.WARNING, f"Locator Update from {nid_text(cn.nid)} repeats "
                                            "a set it replaced moments ago: a replay, dropped")
                return self._drop("lu_replayed")
            if current:
                cn.replaced[current] = now
                if len(cn.replaced) > 16:
                    del cn.replaced[min(cn.replaced, key=cn.replaced.__getitem__)]
        cn.locators = {e.l64: (Remote(e.preference, e.lifetime, "lu"), now + e.lifetime)
                       for e in update.locators}
        for e in update.locators:
            self._timer(now + e.lifetime, cn.nid)
        cn.nonce_until = max(cn.nonce_until, now + self._hold(cn))
        route = self._route(cn, now, nonce=True)
        if route is None:
            self.counters.drop("lu_ack_unroutable")
        else:
            self._actions.append(SendUpdate(route, Update(ACK, update.locators,
                                                          update.sequence),
                                            cn.nonce_out))
            self.counters.acks_sent += 1
        return Decision(Verdict.DELIVER)

    # --- time ----------------------------------------------------------------------------------
    def handle_timer(self, now: float) -> None:
        while self._timers and self._timers[0][0] <= now:
            _, nid = heapq.heappop(self._timers)
            cn = self.ilcc.get(nid)
            if cn is not None:
                self._due(cn, now)

    def next_deadline(self) -> float | None:
        return self._timers[0][0] if self._timers else None

    next_timer = next_deadline  # the name ipshift.daemon.EnginePump calls

    def touch(self, nid: int, now: float, *, heard: bool = False, sent: bool = False,
              packets_in: int = 0, packets_out: int = 0) -> None:
        """The data path carried packets from (`heard`) or to (`sent`) `nid` since the last
        call: it stays an active correspondent (told of moves) and is not forgotten; the
        counts, where the data path can tell them apart, join the ILCC entry's."""
        cn = self.ilcc.get(nid)
        if cn is None:
            return
        if heard:
            cn.heard = now
        if sent:
            cn.sent = now
        cn.packets_in += packets_in
        cn.packets_out += packets_out

    def receiving(self, now: float) -> frozenset[int]:
        """The locators packets for us may be addressed to: ours, and those we left less
        than `nonce_hold` ago (what was in flight when we moved)."""
        for l64 in [l64 for l64, until in self.left.items() if until <= now]:
            del self.left[l64]
        return frozenset(self.own) | frozenset(self.left)

    def paths(self, now: float) -> dict[int, Path]:
        """What the data path needs per correspondent it can reach now: the route, both
        nonces, until when our nonce rides in every packet, and the locators it may send from.
        Correspondents without a route are left out (their packets come to the engine)."""
        out: dict[int, Path] = {}
        for cn in self.ilcc.values():
            route = self._route(cn, now, count=False)
            if route is None:
                continue
            out[cn.nid] = Path(
                nid=cn.nid, local=route.local, remote=route.remote, next_hop=route.next_hop,
                nonce_out=cn.nonce_out, nonce_in=cn.nonce_in, carry_until=cn.nonce_until,
                carry_first=cn.heard == float("-inf"), carry_pending=cn.pending is not None,
                locators=frozenset(cn.live_locators(now)))
        return out

    def actions(self) -> list[Action]:
        out, self._actions = self._actions, []
        return out

    # --- views ---------------------------------------------------------------------------------
    def correspondents(self) -> Iterator[Correspondent]:
        return iter(self.ilcc.values())

    def status_rows(self, now: float) -> list[dict[str, object]]:
        """The ILCC for `status`: no nonce values, only whether each side's is known."""
        rows: list[dict[str, object]] = []
        for cn in self.ilcc.values():
            route = self._route(cn, now, count=False)
            rows.append({
                "nid": nid_text(cn.nid),
                "locators": [{"l64": l64_text(l64), "preference": r.preference,
                              "source": r.source, "expires_s": round(exp - now, 1)}
                             for l64, (r, exp) in sorted(cn.locators.items())],
                "using": None if route is None else l64_text(route.remote),
                "via": None if route is None or route.next_hop[1] == cn.nid
                else nid_text(route.next_hop[1]),
                "nonce_out": len(cn.nonce_out), "nonce_in": cn.nonce_in is not None,
                "nonce_in_all_packets": cn.nonce_until > now,
                "lu_pending": cn.pending is not None,
                "rtt_ms": None if cn.rtt is None else round(cn.rtt * 1000, 2),
                "packets_in": cn.packets_in, "packets_out": cn.packets_out,
                "idle_s": round(now - max(cn.heard, cn.sent), 1)
                if max(cn.heard, cn.sent) > float("-inf") else None,
            })
        return rows

    # --- internals -----------------------------------------------------------------------------
    def _entry(self, nid: int, now: float) -> Correspondent | None:
        cn = self.ilcc.get(nid)
        if cn is None:
            if len(self.ilcc) >= self.config.max_correspondents:
                self.counters.drop("cache_full")
                return None
            cn = self.ilcc[nid] = Correspondent(nid, self._random(self.config.nonce_size))
            self._timer(now + self.config.idle, nid)
        return cn

    def _nonce_ok(self, cn: Correspondent, nonce: bytes) -> bool:
        return nonce == cn.nonce_in or nonce == cn.nonce_out

    def _hold(self, cn: Correspondent) -> float:
        return max(self.config.nonce_hold, 3 * cn.rtt) if cn.rtt else self.config.nonce_hold

    def _route(self, cn: Correspondent, now: float, *, nonce: bool = False,
               count: bool = True) -> Route | None:
        best: tuple[tuple[int, int, int, int], Route] | None = None
        for l64, remote in cn.live_locators(now).items():
            if l64 in self.own:
                local, hop, direct = l64, (l64, cn.nid), 0
            else:
                via = next(((mine, self.routers[mine]) for mine, _ in
                            sorted(self.own.items(), key=lambda kv: kv[1].preference)
                            if mine in self.routers), None)
                if via is None:
                    continue
                local, hop, direct = via[0], (via[0], via[1]), 1
            # its preference first, then ours for the local end (a network we are leaving
            # is deprecated: worse), then a shared network over a routed one
            key = (remote.preference, self.own[local].preference, direct, l64)
            if best is None or key < best[0]:
                carry = (nonce or cn.nonce_until > now or cn.heard == float("-inf")
                         or cn.pending is not None)
                best = (key, Route(cn.nid, local, l64, hop,
                                   cn.nonce_out if carry else None))
        return None if best is None else best[1]

    def _forward(self, a: Arrival) -> Decision:
        if not self.config.router:
            return self._drop("not_for_us")
        if a.hop_limit <= 1:
            return self._drop("hop_limit")
        if a.dst_locator in self.own:
            hop = (a.dst_locator, a.dst_nid)
            local = a.dst_locator
        else:
            via = next(((mine, nid) for mine, nid in self.routers.items()
                        if mine != a.arrival_locator), None)
            if via is None:
                return self._drop("no_route")
            local, hop = via[0], via
        self.counters.forwarded += 1
        return Decision(Verdict.FORWARD, Route(a.dst_nid, local, a.dst_locator, hop, None))

    def _drop(self, reason: str) -> Decision:
        self.counters.drop(reason)
        return Decision(Verdict.DROP, reason=reason)

    def _send_pending(self, cn: Correspondent, now: float) -> None:
        pending = cn.pending
        assert pending is not None
        route = self._route(cn, now, nonce=True)
        pending.tries += 1
        pending.due = now + self.config.lu_interval * pending.tries
        self._timer(pending.due, cn.nid)
        if route is None:
            self.counters.drop("lu_unroutable")
            return
        self._actions.append(SendUpdate(route, Update(ADVERTISE, pending.locators,
                                                      pending.sequence),
                                        cn.nonce_out))
        if pending.tries == 1:
            self.counters.lu_sent += 1
        else:
            self.counters.lu_retransmitted += 1

    def _due(self, cn: Correspondent, now: float) -> None:
        pending = cn.pending
        if pending is not None and pending.due <= now:
            if pending.tries >= self.config.lu_tries:
                cn.pending = None
                self.counters.lu_failed += 1
                self._note(logging.WARNING, f"no ack from {nid_text(cn.nid)} for our Locator "
                                            f"Update after {pending.tries} tries")
            else:
                self._send_pending(cn, now)
        expired = [l64 for l64, (_, expiry) in cn.locators.items() if expiry <= now]
        for l64 in expired:
            del cn.locators[l64]
        if cn.resolving_since is not None and \
                cn.resolving_since + self.config.resolve_wait <= now:
            self.unresolved(cn.nid, now)
        if max(cn.heard, cn.sent, cn.resolving_since or float("-inf")) + self.config.idle <= now \
                and cn.pending is None:
            del self.ilcc[cn.nid]
            return
        if expired and not cn.locators and cn.resolving_since is None and \
                max(cn.heard, cn.sent) + self.config.active > now:
            cn.resolving_since = now
            self._actions.append(Resolve(cn.nid))
            self._timer(now + self.config.resolve_wait, cn.nid)
        last = max(cn.heard, cn.sent)
        if last > float("-inf") and last + self.config.idle > now:
            self._timer(last + self.config.idle, cn.nid)

    def _release(self, cn: Correspondent, now: float) -> None:
        if not cn.queue:
            return
        route = self._route(cn, now)
        if route is None:
            return
        while cn.queue:
            self._actions.append(Transmit(route, cn.queue.popleft()))
            cn.sent = now
            cn.packets_out += 1
            self.counters.packets_out += 1

    def _timer(self, when: float, nid: int) -> None:
        heapq.heappush(self._timers, (when, nid))

    def _note(self, level: int, text: str) -> None:
        self._actions.append(Note(level, text))


def _newer(a: int, b: int) -> bool:
    """Whether sequence `a` comes after `b` (RFC 1982 serial numbers over 1..65535)."""
    return a != b and (a - b) % 0xFFFF < 0x8000


def nid_text(nid: int) -> str:
    """A NID as four groups of four hex digits (the DNS NID record's presentation)."""
    return ":".join(f"{(nid >> shift) & 0xFFFF:04x}" for shift in (48, 32, 16, 0))


def l64_text(l64: int) -> str:
    """A locator as the /64 prefix it is."""
    return ":".join(f"{(l64 >> shift) & 0xFFFF:x}" for shift in (48, 32, 16, 0)) + "::/64"


def _l64s(locators: object) -> str:
    items = sorted(locators) if isinstance(locators, set | dict) else []
    return ", ".join(l64_text(x) for x in items) or "none"
