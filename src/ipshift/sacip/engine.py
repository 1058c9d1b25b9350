"""The sacip engine: sessions, peers, moves and the notice protocol, sans-I/O.

    engine = SacipEngine(config, identity, known={"192.0.2.7": "SHA256:..."}, now=now)
    engine.sessions(flows, now)                  # every sock_diag scan: established sessions
    engine.address_gone("192.0.2.10", now)       # netlink: a global address left its interface
    for old, peer in engine.wanted_sources():    # after any address change: the daemon asks
        engine.source_for(old, peer, new, now)   #   the kernel which source reaches the peer
    engine.datagram(data, ("198.51.100.7", 7366), arrived_on="203.0.113.10", now=now)
    engine.handle_timer(now); engine.next_timer()
    for action in engine.actions(): ...          # Send, Remaps, KeepAddress, ReleaseAddress,
                                                 # ResetFlows, RememberPeer, Report

A session is known by its socket-side tuple (`Flow`: what the application's socket shows, as
sock_diag reports it) and travels on the wire under its current addresses (`_Session.wire_local`,
`wire_peer`). A remap (`ipshift.net.remap.Remap`) joins the two while they differ: one per
session, whatever the number of moves (A -> B -> C replaces A->B by A->C).

A move, on the host that moved (the mover), when address `old` leaves its interface:
1. `old` is kept on lo for the sessions whose sockets use it (KeepAddress);
2. the daemon finds the new source for each peer (`wanted_sources`/`source_for`): at once in
   a make-before-break move, once an address comes back in a break-before-make one;
3. the mover installs the inbound half of the new remap (new -> socket address), then sends
   the peer a sealed NOTICE from the new address;
4. the peer checks the notice (sealed in the association of the peer it names, sessions that
   are that peer's), challenges the new address (return routability: a sealed cookie sent
   to it), and on the right RESPONSE installs both halves of its remap and ACKs;
5. the mover installs the outbound half. (This order, inbound first, then the peer, then
   outbound, is the one that never shows a peer an address it cannot answer.)

Associations come from a two-message handshake (`sacip.crypto`) made while the sessions'
path still works: as soon as a session with a new peer address is seen. A peer that never
answers is one without sacip: its sessions are reported as not preservable at a move (and
reset at once with `reset_unpreservable`).
"""

from __future__ import annotations

import collections
import dataclasses
import heapq
import ipaddress
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ipshift.net.remap import Direction, Remap
from ipshift.sacip import wire
from ipshift.sacip.config import SacipConfig
from ipshift.sacip.crypto import (
    Association,
    CryptoError,
    HandshakeError,
    Identity,
    Initiator,
    fingerprint,
    respond,
)

HELLO_RETRY = (0.25, 0.5, 1.0, 2.0)  # seconds between HELLO attempts; then no sacip there
NO_SACIP_RETRY = 30.0  # how often a peer found without sacip is tried again
NOTICE_RETRY = (0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 3.2)  # then the move has failed
ASSOCIATION_IDLE = 120.0  # a peer no session needs is forgotten after this long quiet
INBOUND_GRACE = 5.0  # seconds an old wire tuple is still let in after a move
# Notices per second a peer may send (token bucket), with this burst: a move of 100,000
# sessions is about 435 notices; each costs us one sealed challenge.
NOTICE_RATE = 500.0
NOTICE_BURST = 1000.0
MAX_ASSOCIATIONS = 4  # per peer: crossing handshakes, replayed HELLOs
ANSWERED_KEPT = 4096  # HELLOs remembered as answered (a replay of one is ignored)
HANDSHAKE_RATE = 50.0  # handshakes per second answered, from everyone together
HANDSHAKE_BURST = 100.0
STATUS_SESSIONS = 200  # sessions listed in status (all are counted)
PROTO_NAMES = {6: "tcp", 17: "udp"}
PROTO_NUMBERS = {"tcp": 6, "udp": 17}


@dataclass(frozen=True, order=True)
class Flow:
    """A session as its socket shows it (sock_diag): proto "tcp" or "udp"."""

    proto: str
    local: str
    local_port: int
    peer: str
    peer_port: int

    def describe(self) -> str:
        def ep(addr: str, port: int) -> str:
            return f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"
        return f"{self.proto} {ep(self.local, self.local_port)} - {ep(self.peer, self.peer_port)}"


# --- actions ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Send:
    address: str
    port: int
    data: bytes
    source: str | None = None  # the local address to send from (None: the kernel's choice)


@dataclass(frozen=True)
class Remaps:
    """One transaction on the flow remaps: `remove` out and `add` in, in `direction`."""

    add: tuple[Remap, ...]
    remove: tuple[Remap, ...]
    direction: Direction


@dataclass(frozen=True)
class KeepAddress:
    address: str  # keep it local (on lo) while sessions use it


@dataclass(frozen=True)
class ReleaseAddress:
    address: str


@dataclass(frozen=True)
class ResetFlows:
    flows: tuple[Flow, ...]  # destroy these sockets (sock_diag): the application sees a reset
    reason: str


@dataclass(frozen=True)
class RememberPeer:
    address: str
    fingerprint: str  # trust on first use: write it to the known-peers file


@dataclass(frozen=True)
class Report:
    level: str  # "info", "warning", "debug"
    message: str


Action = Send | Remaps | KeepAddress | ReleaseAddress | ResetFlows | RememberPeer | Report


# --- state --------------------------------------------------------------------------------------
@dataclass(eq=False)  # one object per session: compared and hashed by identity
class _Session:
    flow: Flow
    wire_local: str
    wire_peer: str
    inbound: Remap | None = None  # what is installed, per direction
    outbound: Remap | None = None
    moving: bool = False
    moves: int = 0
    old_keys: list[tuple[str, str, int, str, int]] = field(default_factory=list)
    old_keys_until: float | None = None  # earlier wire tuples still name it until then
    holds_local: bool = False  # it keeps its socket address on lo
    # the local wire address the peer has confirmed (outbound uses it; it differs from
    # wire_local while a move of ours is not confirmed yet)
    out_local: str = ""
    # inbound remaps of earlier wire tuples, kept while packets may still arrive under them
    # (expiry time; None: until the move in progress is confirmed)
    inbound_extra: dict[Remap, float | None] = field(default_factory=dict)

    def target(self, local: str | None = None) -> Remap | None:
        """The remap the current wire addresses call for (None: the wire is the socket's);
        `local` instead of the wire's local address (the one the peer has confirmed)."""
        flow = self.flow
        wire_local = self.wire_local if local is None else local
        if wire_local == flow.local and self.wire_peer == flow.peer:
            return None
        return Remap(flow.proto, flow.local, flow.local_port, flow.peer, flow.peer_port,
                     new_local=wire_local, new_peer=self.wire_peer)

    def wire_key(self) -> tuple[str, str, int, str, int]:
        f = self.flow
        return (f.proto, self.wire_local, f.local_port, self.wire_peer, f.peer_port)


@dataclass(eq=False)
class _Peer:
    """A correspondent's daemon, as found at `address` (its current wire address)."""

    address: str
    state: str = "new"  # new, handshaking, ready, no-sacip, refused
    public: bytes | None = None
    associations: dict[int, Association] = field(default_factory=dict)  # by local index
    current: Association | None = None
    initiator: Initiator | None = None
    tries: int = 0
    next_try: float = 0.0
    last_heard: float = 0.0
    created: float = 0.0
    tokens: float = NOTICE_BURST
    tokens_at: float = 0.0
    counters: dict[str, int] = field(default_factory=dict)

    @property
    def fingerprint(self) -> str | None:
        return fingerprint(self.public) if self.public else None


@dataclass
class _Move:
    """Sessions moving from `old` to `new` toward one peer (one notice, or a few)."""

    seq: int
    old: str
    new: str
    peer: _Peer
    sessions: list[_Session]
    notice: wire.Notice
    tries: int = 0
    next_try: float = 0.0
    started: float = 0.0


@dataclass
class _Challenge:
    """A notice we received, waiting for the mover's answer at its new address."""

    peer: _Peer
    notice: wire.Notice
    cookie: bytes
    tries: int = 0
    next_try: float = 0.0


class SacipEngine:
    def __init__(self, config: SacipConfig, identity: Identity, now: float, *,
                 known: Mapping[str, str] | None = None,
                 rng: Callable[[int], bytes] = os.urandom) -> None:
        self.config = config
        self.identity = identity
        self.rng = rng
        self.known: dict[str, str] = dict(known or {})  # address -> fingerprint (tofu)
        self.pinned = {p.fingerprint: p.name for p in config.peers}
        self.sessions_by_flow: dict[Flow, _Session] = {}
        self.by_wire: dict[tuple[str, str, int, str, int], _Session] = {}
        self.peers: dict[str, _Peer] = {}  # by wire address
        self.by_index: dict[int, tuple[Association, _Peer]] = {}
        self.kept: dict[str, int] = {}  # address on lo -> sessions whose socket uses it
        self.pending: dict[str, tuple[float, set[_Session]]] = {}  # old -> (since, sessions)
        # (id of the peer, seq) -> move: the peer may move meanwhile
        self.moves: dict[tuple[int, int], _Move] = {}
        self.challenges: dict[tuple[int, int], _Challenge] = {}  # (local index, seq)
        self.counters: dict[str, int] = {}
        self.moved_total = 0
        self.lost_total = 0
        # seconds from a new address being usable (at once in a make-before-break move) to
        # the sessions' move confirmed, the latest first
        self.move_seconds: collections.deque[float] = collections.deque(maxlen=100)
        self._seq = int.from_bytes(rng(2), "big")
        # (when, id, session): earlier wire tuples that stop counting then
        self._grace: list[tuple[float, int, _Session]] = []
        self._answered: dict[bytes, None] = {}  # ephemeral keys of HELLOs answered lately
        self._handshake_tokens = HANDSHAKE_BURST
        self._handshake_at = now
        self._out: list[Action] = []

    # --- helpers ----------------------------------------------------------------------------
    def _count(self, what: str, peer: _Peer | None = None, n: int = 1) -> None:
        self.counters[what] = self.counters.get(what, 0) + n
        if peer is not None:
            peer.counters[what] = peer.counters.get(what, 0) + n

    def _report(self, level: str, message: str) -> None:
        self._out.append(Report(level, message))

    def _new_index(self) -> int:
        while True:
            index = int.from_bytes(self.rng(8), "big") or 1
            if index not in self.by_index:
                return index

    def actions(self) -> list[Action]:
        out, self._out = self._out, []
        return out

    # --- sessions (sock_diag) -----------------------------------------------------------------
    def sessions(self, flows: Iterable[Flow], now: float) -> None:
        """A full scan of the established sessions. New ones are followed (and their peer's
        daemon greeted); vanished ones lose their remaps and kept addresses."""
        current = set()
        greet = set()
        known = self.sessions_by_flow
        for flow in flows:
            if flow in known:
                current.add(flow)
                continue
            if flow.proto not in PROTO_NUMBERS or self._ignored(flow):
                continue
            current.add(flow)
            self._follow(_Session(flow, flow.local, flow.peer), now)
            greet.add(flow.peer)
        gone_in: list[Remap] = []
        gone_out: list[Remap] = []
        for flow in [f for f in known if f not in current]:
            self._forget(known[flow], gone_in, gone_out)
        # one transaction per direction, however many sessions ended
        if gone_in:
            self._out.append(Remaps((), tuple(gone_in), Direction.INBOUND))
        if gone_out:
            self._out.append(Remaps((), tuple(gone_out), Direction.OUTBOUND))
        for address in greet:
            self._greet(address, now)
        self._prune_peers(now)

    def _prune_peers(self, now: float) -> None:
        """Forget peers no session needs any more once they have been quiet for
        ASSOCIATION_IDLE (greetings from anyone must not pile up)."""
        wanted = {s.wire_peer for s in self.sessions_by_flow.values()}
        for address, peer in list(self.peers.items()):
            if address in wanted or now - max(peer.last_heard, peer.created) < ASSOCIATION_IDLE:
                continue
            if any(move.peer is peer for move in self.moves.values()) or any(
                    c.peer is peer for c in self.challenges.values()):
                continue
            del self.peers[address]
            if peer not in self.peers.values():
                for index in peer.associations:
                    self.by_index.pop(index, None)
                self._count("peers_forgotten")

    def adopt(self, remap: Remap, now: float) -> None:
        """A remap found in the kernel at start (left by this daemon before a restart)."""
        flow = Flow(remap.proto, remap.local, remap.local_port, remap.peer, remap.peer_port)
        session = _Session(flow, remap.new_local, remap.new_peer, inbound=remap, outbound=remap)
        self._follow(session, now)
        self._greet(session.wire_peer, now)  # the associations went with the old run

    def _ignored(self, flow: Flow) -> bool:
        peer = ipaddress.ip_address(flow.peer)
        local = ipaddress.ip_address(flow.local)
        if peer.is_loopback or peer.is_link_local or peer.is_multicast or local.is_loopback:
            return True
        if local.is_link_local or peer == local:
            return True
        return self.config.excluded(flow.peer)

    def _follow(self, session: _Session, now: float) -> None:
        session.out_local = session.out_local or session.wire_local
        self.sessions_by_flow[session.flow] = session
        self.by_wire[session.wire_key()] = session
        if session.wire_local != session.flow.local:
            self._hold(session)

    def _forget(self, session: _Session, gone_in: list[Remap],
                gone_out: list[Remap]) -> None:
        """Drop a session that ended; its remaps are added to the removal lists."""
        del self.sessions_by_flow[session.flow]
        for key in [*session.old_keys, session.wire_key()]:
            if self.by_wire.get(key) is session:
                del self.by_wire[key]
        if session.inbound is not None:
            gone_in.append(session.inbound)
        if session.outbound is not None:
            gone_out.append(session.outbound)
        gone_in.extend(session.inbound_extra)
        session.inbound_extra.clear()
        if session.holds_local:
            session.holds_local = False
            self._release(session.flow.local)
        for since_sessions in self.pending.values():
            since_sessions[1].discard(session)

    def _hold(self, session: _Session) -> None:
        if not session.holds_local:
            session.holds_local = True
            self._keep(session.flow.local)

    def _keep(self, address: str) -> None:
        count = self.kept.get(address, 0)
        if count == 0:
            self._out.append(KeepAddress(address))
        self.kept[address] = count + 1

    def _release(self, address: str) -> None:
        left = self.kept.get(address, 0) - 1
        if left > 0:
            self.kept[address] = left
            return
        self.kept.pop(address, None)
        self._out.append(ReleaseAddress(address))

    # --- handshakes ---------------------------------------------------------------------------
    def _greet(self, address: str, now: float) -> None:
        peer = self.peers.get(address)
        if peer is None:
            peer = self.peers[address] = _Peer(address, created=now)
        if peer.state == "new":
            self._send_hello(peer, now)

    def _send_hello(self, peer: _Peer, now: float) -> None:
        index = self._new_index()
        peer.initiator = Initiator(self.identity, index, rng=self.rng)
        peer.state = "handshaking" if peer.current is None else peer.state
        peer.tries += 1
        peer.next_try = now + HELLO_RETRY[min(peer.tries, len(HELLO_RETRY)) - 1]
        self._count("hellos_sent", peer)
        self._out.append(Send(peer.address, self.config.port, peer.initiator.hello().encode()))

    def _trusted(self, address: str, public: bytes) -> str | None:
        """Why the key may not be used for `address` (None: it may)."""
        print_ = fingerprint(public)
        if print_ in self.pinned:
            return None
        if self.config.trust == "pinned":
            return f"key {print_} is not pinned in the configuration"
        known = self.known.get(address)
        if known is not None and known != print_:
            return (f"{address} showed key {print_}, but {known} before: refused (if the "
                    "peer's key really changed, remove it from the known-peers file)")
        if known is None:
            self.known[address] = print_
            self._out.append(RememberPeer(address, print_))
            self._report("info", f"trusting {address} on first use: {print_}")
        return None

    def _associated(self, peer: _Peer, association: Association, now: float) -> None:
        reason = self._trusted(peer.address, association.peer_public)
        if reason is not None:
            peer.state = "refused"
            self._count("keys_refused", peer)
            self._report("warning", f"sacip peer {peer.address}: {reason}")
            return
        if peer.public is not None and peer.public != association.peer_public:
            self._count("keys_refused", peer)
            self._report("warning", f"sacip peer {peer.address} answered with another key")
            return
        peer.public = association.peer_public
        # Handshakes may cross (both ends greet at once) and a HELLO may be replayed: keep a
        # few associations (any may seal what arrives) and send with one the peer has proven
        # it holds: one this end started, or one a sealed message arrived in.
        peer.associations[association.local_index] = association
        self.by_index[association.local_index] = (association, peer)
        while len(peer.associations) > MAX_ASSOCIATIONS:
            oldest = next(index for index, a in peer.associations.items()
                          if a is not peer.current)
            del peer.associations[oldest]
            self.by_index.pop(oldest, None)
        if association.initiator or peer.current is None:
            peer.current = association
        peer.state = "ready"
        peer.tries = 0
        peer.last_heard = now
        self._count("associations", peer)

    def _handshake_allowed(self, now: float) -> bool:
        self._handshake_tokens = min(HANDSHAKE_BURST, self._handshake_tokens
                                     + (now - self._handshake_at) * HANDSHAKE_RATE)
        self._handshake_at = now
        if self._handshake_tokens < 1:
            return False
        self._handshake_tokens -= 1
        return True

    # --- datagrams ----------------------------------------------------------------------------
    def datagram(self, data: bytes, sender: tuple[str, int], arrived_on: str | None,
                 now: float) -> None:
        """A datagram on the sacip port from `sender`, to local address `arrived_on`."""
        address = str(ipaddress.ip_address(sender[0]))
        try:
            message = wire.decode_datagram(data)
        except wire.WireError as exc:
            self._count(f"malformed_{exc.reason}")
            return
        if isinstance(message, wire.Hello):
            self._hello(message, address, now)
        elif isinstance(message, wire.HelloAck):
            self._hello_ack(message, address, now)
        else:
            self._sealed(message, address, arrived_on, now)

    def _hello(self, hello: wire.Hello, address: str, now: float) -> None:
        if not self._handshake_allowed(now):
            self._count("hellos_rate_limited")
            return
        if hello.ephemeral in self._answered:
            self._count("hellos_replayed")  # answered once; a replay changes nothing
            return
        peer = self.peers.get(address) or self.peers.setdefault(address,
                                                                _Peer(address, created=now))
        index = self._new_index()
        try:
            ack, association = respond(self.identity, hello, index, rng=self.rng)
        except CryptoError as exc:
            self._count(f"hello_{exc.reason}")
            return
        self._answered[hello.ephemeral] = None
        if len(self._answered) > ANSWERED_KEPT:
            del self._answered[next(iter(self._answered))]
        self._associated(peer, association, now)
        if peer.state == "ready":
            self._out.append(Send(address, self.config.port, ack.encode()))

    def _hello_ack(self, ack: wire.HelloAck, address: str, now: float) -> None:
        peer = self.peers.get(address)
        if peer is None or peer.initiator is None:
            self._count("unexpected_hello_acks")
            return
        try:
            association = peer.initiator.complete(ack)
        except CryptoError as exc:
            self._count(f"hello_ack_{exc.reason}", peer)
            return
        peer.initiator = None
        self._associated(peer, association, now)

    def _sealed(self, sealed: wire.Sealed, address: str, arrived_on: str | None,
                now: float) -> None:
        found = self.by_index.get(sealed.receiver_index)
        if found is None:
            self._count("unknown_association")
            return
        association, peer = found
        try:
            plain = association.open(sealed)
        except CryptoError as exc:
            self._count(f"sealed_{exc.reason}", peer)  # sealed_auth, sealed_replay
            return
        try:
            message = wire.decode_inner(plain)
        except wire.WireError as exc:
            self._count(f"malformed_inner_{exc.reason}", peer)
            return
        peer.last_heard = now
        if peer.current is not association and not (peer.current and peer.current.initiator):
            peer.current = association  # the peer proved it holds this one
        if isinstance(message, wire.Notice):
            self._notice(message, peer, association, address, now)
        elif isinstance(message, wire.Challenge):
            self._challenge(message, peer, association, arrived_on)
        elif isinstance(message, wire.Response):
            self._response(message, peer, association, now)
        elif isinstance(message, wire.Ack):
            self._ack(message, peer, now)
        elif isinstance(message, wire.Ping):
            self._seal(peer, association, wire.Pong(message.nonce), address)

    def _seal(self, peer: _Peer, association: Association, message: Any, address: str,
              source: str | None = None) -> None:
        self._out.append(Send(address, self.config.port,
                              association.seal(message.encode()), source))

    # --- the mover ----------------------------------------------------------------------------
    def address_gone(self, address: str, now: float) -> None:
        """A global address left its interface: the sessions on it are to move."""
        address = str(ipaddress.ip_address(address))
        sessions = {s for s in self.sessions_by_flow.values() if s.wire_local == address}
        if not sessions:
            return
        for session in sessions:
            self._hold(session)  # the socket's own address must stay local
            session.moving = True
        since, waiting = self.pending.get(address, (now, set()))
        self.pending[address] = (since, waiting | sessions)
        self._count("moves_started")
        self._report("info", f"{address} is gone: {len(sessions)} session(s) to move")

    def address_back(self, address: str, now: float) -> None:
        """An address came back before its sessions moved: they simply stay."""
        address = str(ipaddress.ip_address(address))
        entry = self.pending.pop(address, None)
        if entry is None:
            return
        for session in entry[1]:
            session.moving = False
            if session.holds_local and session.wire_local == session.flow.local:
                session.holds_local = False
                self._release(session.flow.local)

    def wanted_sources(self) -> list[tuple[str, str]]:
        """(old address, peer address) pairs whose new source the daemon should look up."""
        return sorted({(old, s.wire_peer) for old, (_since, sessions) in self.pending.items()
                       for s in sessions})

    def source_for(self, old: str, peer_address: str, new: str, now: float) -> None:
        """The kernel's source address toward `peer_address` now, an address of an interface
        (not one kept on lo): move the sessions that left `old` toward that peer to `new`
        (which may be their sockets' own address again: the remap then goes)."""
        ip = ipaddress.ip_address(new)
        new = str(ip)
        if (new == old or ip.version != ipaddress.ip_address(old).version
                or ip.is_link_local or ip.is_loopback or ip.is_multicast or ip.is_unspecified):
            return  # not a source a session can move to (e.g. IPv6 link-local in a gap)
        entry = self.pending.get(old)
        if entry is None:
            return
        sessions = [s for s in entry[1] if s.wire_peer == peer_address]
        if not sessions:
            return
        entry[1].difference_update(sessions)
        if not entry[1]:
            del self.pending[old]
        peer = self.peers.get(peer_address)
        if peer is None or peer.current is None:
            self._unpreservable(sessions, peer, "the peer has no sacip daemon (no answer)"
                                if peer is not None and peer.state == "no-sacip"
                                else "no association with the peer's daemon")
            return
        # 1. the inbound half first: packets to `new` reach the sockets from now on. The
        # session is found under its new wire tuple too (a notice of the peer may cross
        # ours); the old one is dropped once the peer has confirmed.
        adds: list[Remap] = []
        for session in sessions:
            session.old_keys.append(session.wire_key())
            session.wire_local = new
            self.by_wire[session.wire_key()] = session
            target = session.target()
            if session.inbound is not None and session.inbound != target:
                # the peer still sends to the old wire tuple until it knows
                session.inbound_extra[session.inbound] = None
            if target is not None and target != session.inbound:
                session.inbound_extra.pop(target, None)
                adds.append(target)
            session.inbound = target
        if adds:
            self._out.append(Remaps(tuple(adds), (), Direction.INBOUND))
        # 2. the notice(s), from the new address
        items = [wire.Session(PROTO_NUMBERS[s.flow.proto], s.flow.local_port, s.flow.peer_port)
                 for s in sessions]
        seq0 = self._next_seq(len(items))
        notices = wire.notices(seq0, old, new, peer_address, items)
        first = 0
        for notice in notices:
            part = sessions[first:first + len(notice.sessions)]
            first += len(notice.sessions)
            move = _Move(notice.seq, old, new, peer, part, notice, started=now)
            self.moves[(id(peer), notice.seq)] = move
            self._send_notice(move, now)

    def _next_seq(self, sessions: int) -> int:
        self._seq = (self._seq + 1) & 0xFFFFFFFF
        seq = self._seq
        self._seq = (self._seq + sessions // max(1, wire.MAX_NOTICE_SESSIONS) + 1) & 0xFFFFFFFF
        return seq

    def _send_notice(self, move: _Move, now: float) -> None:
        peer = move.peer
        assert peer.current is not None
        move.tries += 1
        move.next_try = now + NOTICE_RETRY[min(move.tries, len(NOTICE_RETRY)) - 1]
        self._count("notices_sent", peer)
        self._seal(peer, peer.current, move.notice, peer.address, source=move.new)

    def _challenge(self, challenge: wire.Challenge, peer: _Peer, association: Association,
                   arrived_on: str | None) -> None:
        move = self.moves.get((id(peer), challenge.seq))
        if move is None:
            self._count("challenges_unexpected", peer)
            return
        if arrived_on is not None and str(ipaddress.ip_address(arrived_on)) != move.new:
            self._count("challenges_elsewhere", peer)  # not at the new address: no proof
            return
        self._seal(peer, association, wire.Response(challenge.seq, challenge.cookie),
                   peer.address, source=move.new)

    def _ack(self, ack: wire.Ack, peer: _Peer, now: float) -> None:
        move = self.moves.pop((id(peer), ack.seq), None)
        if move is None or len(ack.results) != len(move.sessions):
            self._count("acks_unexpected", peer)
            return
        done: list[_Session] = []
        lost: list[_Session] = []
        for session, result in zip(move.sessions, ack.results, strict=True):
            (done if result == wire.MOVED else lost).append(session)
        # 3. the outbound half: the sessions leave with the new address
        adds, removes = [], []
        for session in done:
            session.out_local = session.wire_local  # the peer knows it now
            target = session.target()
            if session.outbound is not None and session.outbound != target:
                removes.append(session.outbound)
            if target is not None and target != session.outbound:
                adds.append(target)
            session.outbound = target
            for extra in session.inbound_extra:
                session.inbound_extra[extra] = self._graced(session, now)
            # A notice of the peer sent before it learned of this move still names the
            # session by its old wire tuple (both ends moving at once): keep that a while.
            session.old_keys_until = self._graced(session, now)
            session.moving = False
            session.moves += 1
        if adds or removes:
            self._out.append(Remaps(tuple(adds), tuple(removes), Direction.OUTBOUND))
        self.moved_total += len(done)
        self._count("sessions_moved", peer, len(done))
        if done:
            self.move_seconds.appendleft(now - move.started)
            took = 1000 * (now - move.started)
            self._report("info", f"moved {len(done)} session(s) with {peer.address} from "
                                 f"{move.old} to {move.new} in {took:.1f} ms")
        if lost:
            self._unpreservable(lost, peer, "the peer does not know them")

    def _drop_old_keys(self, session: _Session) -> None:
        for key in session.old_keys:
            if key != session.wire_key() and self.by_wire.get(key) is session:
                del self.by_wire[key]
        session.old_keys.clear()
        session.old_keys_until = None

    def _unpreservable(self, sessions: list[_Session], peer: _Peer | None, why: str) -> None:
        self.lost_total += len(sessions)
        self._count("sessions_not_preservable", peer, len(sessions))
        names = ", ".join(s.flow.describe() for s in sessions[:3])
        more = f" and {len(sessions) - 3} more" if len(sessions) > 3 else ""
        self._report("warning", f"cannot keep {names}{more}: {why}")
        for session in sessions:
            session.moving = False
        if self.config.reset_unpreservable:
            self._out.append(ResetFlows(tuple(s.flow for s in sessions), why))

    # --- the peer of a mover ------------------------------------------------------------------
    def _notice(self, notice: wire.Notice, peer: _Peer, association: Association,
                address: str, now: float) -> None:
        elapsed = now - peer.tokens_at
        peer.tokens = min(NOTICE_BURST, peer.tokens + elapsed * NOTICE_RATE)
        peer.tokens_at = now
        if peer.tokens < 1:
            self._count("notices_rate_limited", peer)
            return
        peer.tokens -= 1
        key = (association.local_index, notice.seq)
        pending = self.challenges.get(key)
        if pending is not None:  # a retransmitted notice: challenge again
            self._send_challenge(pending, association, now)
            return
        # The notice must be about this peer's own sessions: sent in the association of
        # the daemon found at the address it says it leaves.
        if self.peers.get(notice.old) is not peer:
            self._count("notices_not_this_peer", peer)
            self._report("warning", f"sacip peer {peer.address} sent a notice about "
                                    f"{notice.old}, which is not its address: refused")
            return
        challenge = _Challenge(peer, notice, self.rng(16))
        self.challenges[key] = challenge
        self._count("notices_received", peer)
        self._send_challenge(challenge, association, now)

    def _send_challenge(self, challenge: _Challenge, association: Association,
                        now: float) -> None:
        challenge.tries += 1
        challenge.next_try = now + 5.0  # forgotten after this if unanswered
        self._count("challenges_sent", challenge.peer)
        self._seal(challenge.peer, association,
                   wire.Challenge(challenge.notice.seq, challenge.cookie),
                   challenge.notice.new)

    def _response(self, response: wire.Response, peer: _Peer, association: Association,
                  now: float) -> None:
        key = (association.local_index, response.seq)
        challenge = self.challenges.get(key)
        if challenge is None or challenge.peer is not peer:
            self._count("responses_unexpected", peer)
            return
        if response.cookie != challenge.cookie:
            self._count("responses_wrong_cookie", peer)
            return
        del self.challenges[key]
        notice = challenge.notice
        results = []
        in_adds: list[Remap] = []
        out_adds: list[Remap] = []
        out_removes: list[Remap] = []
        for item in notice.sessions:
            proto = PROTO_NAMES.get(item.proto, "")
            session = self.by_wire.get((proto, notice.receiver, item.receiver_port,
                                        notice.old, item.sender_port))
            if session is None:
                results.append(wire.UNKNOWN)
                continue
            old_key = session.wire_key()
            session.wire_peer = notice.new
            del self.by_wire[old_key]
            self.by_wire[session.wire_key()] = session
            target = session.target()
            # Outbound switches now, from the local address the mover knows (ours may be
            # moving too: until it confirms, we still send from the old one). Inbound keeps
            # the old wire tuple a while (the mover's packets still in flight, or sent
            # before our ACK reached it), and lets in both our addresses while we move.
            outbound = session.target(session.out_local)
            if session.outbound is not None and session.outbound != outbound:
                out_removes.append(session.outbound)
            if outbound is not None and outbound != session.outbound:
                out_adds.append(outbound)
            session.outbound = outbound
            if session.inbound is not None and session.inbound != target:
                session.inbound_extra[session.inbound] = self._graced(session, now)
            if target is not None:
                session.inbound_extra.pop(target, None)
                if target != session.inbound:
                    in_adds.append(target)
            if outbound is not None and outbound != target:
                session.inbound_extra[outbound] = None  # until our own move is confirmed
                in_adds.append(outbound)
            session.inbound = target
            session.moves += 1
            results.append(wire.MOVED)
        if in_adds:
            self._out.append(Remaps(tuple(in_adds), (), Direction.INBOUND))
        if out_adds or out_removes:
            self._out.append(Remaps(tuple(out_adds), tuple(out_removes), Direction.OUTBOUND))
        # The peer is found at its new address from now on (and still at the old one for
        # sessions that did not move with it).
        self.peers[notice.new] = peer
        if self.peers.get(notice.old) is peer and not any(
                s.wire_peer == notice.old for s in self.sessions_by_flow.values()):
            del self.peers[notice.old]
        peer.address = notice.new
        moved = results.count(wire.MOVED)
        self.moved_total += moved
        self._count("sessions_followed", peer, moved)
        self._report("info", f"{notice.old} moved to {notice.new}: {moved} session(s) "
                             f"follow, {len(results) - moved} unknown here")
        self._seal(peer, association, wire.Ack(notice.seq, tuple(results)), notice.new)

    # --- timers -------------------------------------------------------------------------------
    def _graced(self, session: _Session, now: float) -> float:
        """When an earlier wire tuple of `session` stops counting (and its timer)."""
        until = now + INBOUND_GRACE
        heapq.heappush(self._grace, (until, id(session), session))
        return until

    def next_timer(self) -> float | None:
        times = [p.next_try for p in self.peers.values()
                 if p.state in ("handshaking", "no-sacip") or p.initiator is not None]
        times += [m.next_try for m in self.moves.values()]
        times += [c.next_try for c in self.challenges.values()]
        times += [since + self.config.move_timeout for since, _ in self.pending.values()]
        if self._grace:
            times.append(self._grace[0][0])
        return min(times, default=None)

    def handle_timer(self, now: float) -> None:
        for peer in list(self.peers.values()):
            if peer.next_try > now:
                continue
            if peer.state == "handshaking" or (peer.initiator is not None
                                               and peer.state != "no-sacip"):
                if peer.tries >= len(HELLO_RETRY):
                    peer.initiator = None
                    if peer.current is None:
                        peer.state = "no-sacip"
                        peer.next_try = now + NO_SACIP_RETRY
                        self._count("peers_without_sacip", peer)
                        self._report("info", f"{peer.address} does not answer on port "
                                             f"{self.config.port}: no sacip there; its "
                                             "sessions cannot be kept across a move")
                else:
                    self._send_hello(peer, now)
            elif peer.state == "no-sacip":
                peer.tries = 0
                self._send_hello(peer, now)
        for move_key, move in list(self.moves.items()):
            if move.next_try > now:
                continue
            if move.tries >= len(NOTICE_RETRY):
                del self.moves[move_key]
                self._unpreservable(move.sessions, move.peer, "the peer never confirmed the "
                                    "move")
            else:
                self._send_notice(move, now)
        for key, challenge in list(self.challenges.items()):
            if challenge.next_try <= now:
                del self.challenges[key]
                self._count("challenges_unanswered", challenge.peer)
        expired = []
        due = []
        while self._grace and self._grace[0][0] <= now:
            due.append(heapq.heappop(self._grace)[2])
        for session in dict.fromkeys(due):
            if self.sessions_by_flow.get(session.flow) is not session:
                continue  # gone meanwhile (its remaps went with it)
            if session.old_keys_until is not None and session.old_keys_until <= now:
                self._drop_old_keys(session)
            for remap, until in list(session.inbound_extra.items()):
                if until is not None and until <= now:
                    del session.inbound_extra[remap]
                    expired.append(remap)
        if expired:
            self._out.append(Remaps((), tuple(expired), Direction.INBOUND))
        for old, (since, sessions) in list(self.pending.items()):
            if since + self.config.move_timeout <= now:
                del self.pending[old]
                if sessions:
                    self._unpreservable(sorted(sessions, key=lambda s: s.flow), None,
                                        f"no new address within {self.config.move_timeout:g} s")

    def socket_side(self, proto: str, wire_local: str, local_port: int, wire_peer: str,
                    peer_port: int) -> tuple[str, str] | None:
        """(socket local, socket peer) of the session known on the wire by this tuple."""
        session = self.by_wire.get((proto, wire_local, local_port, wire_peer, peer_port))
        if session is None:
            return None
        return session.flow.local, session.flow.peer

    # --- status -------------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        sessions = []
        listed = heapq.nsmallest(STATUS_SESSIONS, self.sessions_by_flow.values(),
                                 key=lambda s: s.flow)
        for session in listed:
            item: dict[str, Any] = {"flow": session.flow.describe()}
            if session.target() is not None:
                wire_flow = dataclasses.replace(session.flow, local=session.wire_local,
                                                peer=session.wire_peer)
                item["now"] = wire_flow.describe()
            if session.moving:
                item["moving"] = True
            if session.moves:
                item["moves"] = session.moves
            sessions.append(item)
        peers = []
        seen: set[int] = set()
        for address, peer in sorted(self.peers.items()):
            if id(peer) in seen:
                continue
            seen.add(id(peer))
            peers.append({"address": address, "state": peer.state,
                          "fingerprint": peer.fingerprint,
                          "name": self.pinned.get(peer.fingerprint or "", None),
                          "counters": dict(sorted(peer.counters.items()))})
        return {"fingerprint": self.identity.fingerprint, "sessions": sessions,
                "sessions_total": len(self.sessions_by_flow),
                "move_ms": [round(1000 * t, 2) for t in self.move_seconds],
                "peers": peers, "kept": sorted(self.kept),
                "pending": {old: len(s) for old, (_t, s) in self.pending.items()},
                "moved": self.moved_total, "not_preservable": self.lost_total,
                "counters": dict(sorted(self.counters.items()))}


__all__ = [
    "Action",
    "Flow",
    "HandshakeError",
    "KeepAddress",
    "ReleaseAddress",
    "Remaps",
    "RememberPeer",
    "Report",
    "ResetFlows",
    "SacipEngine",
    "Send",
]
