"""The sacip engine with a fake clock: two (or three) engines joined by an in-memory network
that delivers each Send to the engine owning the address, from the address it was sent from."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import pytest

from ipshift.net.remap import Direction, Remap
from ipshift.sacip import wire
from ipshift.sacip.config import PinnedPeer, SacipConfig
from ipshift.sacip.crypto import Identity
from ipshift.sacip.engine import (
    INBOUND_GRACE,
    Flow,
    KeepAddress,
    ReleaseAddress,
    Remaps,
    RememberPeer,
    ResetFlows,
    SacipEngine,
    Send,
)

PORT = wire.PORT
OLD, NEW, NEWER = "192.0.2.10", "198.51.100.10", "198.51.100.20"
SERVER = "203.0.113.5"
MOVER_FLOW = Flow("tcp", OLD, 40000, SERVER, 22)
PEER_FLOW = Flow("tcp", SERVER, 22, OLD, 40000)


def _rng(start: int = 1) -> object:
    counter = itertools.count(start)
    return lambda n: bytes((next(counter) + i) & 0xFF for i in range(n))


@dataclass
class Host:
    name: str
    engine: SacipEngine
    addresses: set[str]
    log: list[object] = field(default_factory=list)  # every action, in order

    def drain(self) -> list[object]:
        got = self.engine.actions()
        self.log.extend(got)
        return got


class Net:
    """Delivers datagrams between hosts; `drop` loses everything to or from an address."""

    def __init__(self, *hosts: Host) -> None:
        self.hosts = list(hosts)
        self.now = 100.0
        self.dropped: set[str] = set()
        self.sent: list[tuple[str, Send]] = []  # (from host, action): what an on-path sees

    def owner(self, address: str) -> Host | None:
        return next((h for h in self.hosts if address in h.addresses), None)

    def source_of(self, host: Host, send: Send) -> str:
        if send.source is not None:
            return send.source
        family = ":" in send.address
        return sorted(a for a in host.addresses if (":" in a) == family)[0]

    def run(self, rounds: int = 20) -> None:
        for _ in range(rounds):
            moved = False
            for host in self.hosts:
                for action in host.drain():
                    if isinstance(action, Send):
                        moved = True
                        self.deliver(host, action)
            if not moved:
                return

    def deliver(self, host: Host, send: Send) -> None:
        source = self.source_of(host, send)
        self.sent.append((host.name, send))
        target = self.owner(send.address)
        if target is None or send.address in self.dropped or source in self.dropped:
            return
        target.engine.datagram(send.data, (source, PORT), send.address, self.now)

    def tick(self, seconds: float) -> None:
        self.now += seconds
        for host in self.hosts:
            host.engine.handle_timer(self.now)
        self.run()


def host(name: str, addresses: set[str], **config: object) -> Host:
    identity = Identity.generate()
    start = 1 + sum(name.encode()) * 7919  # each host its own (deterministic) randomness
    engine = SacipEngine(SacipConfig(**config), identity, 100.0,  # type: ignore[arg-type]
                         rng=_rng(start))  # type: ignore[arg-type]
    return Host(name, engine, addresses)


def remaps_of(h: Host) -> list[Remaps]:
    return [a for a in h.log if isinstance(a, Remaps)]


@pytest.fixture
def pair() -> tuple[Net, Host, Host]:
    mover = host("mover", {OLD, NEW, NEWER})
    peer = host("peer", {SERVER})
    mover.addresses = {OLD}
    net = Net(mover, peer)
    mover.engine.sessions([MOVER_FLOW], net.now)
    peer.engine.sessions([PEER_FLOW], net.now)
    net.run()
    return net, mover, peer


def move(net: Net, mover: Host, old: str, new: str) -> None:
    mover.addresses.discard(old)
    mover.addresses.add(new)
    mover.engine.address_gone(old, net.now)
    for gone, peer_address in mover.engine.wanted_sources():
        mover.engine.source_for(gone, peer_address, new, net.now)
    net.run()


def test_greeting_makes_an_association_both_ways(pair: tuple[Net, Host, Host]) -> None:
    _net, mover, peer = pair
    m, p = mover.engine.status(), peer.engine.status()
    assert [x["state"] for x in m["peers"]] == ["ready"]
    assert [x["state"] for x in p["peers"]] == ["ready"]
    assert m["peers"][0]["fingerprint"] == peer.engine.identity.fingerprint
    assert p["peers"][0]["fingerprint"] == mover.engine.identity.fingerprint
    # trust on first use: both remembered the other
    assert any(isinstance(a, RememberPeer) and a.address == SERVER for a in mover.log)


def test_a_move_installs_mover_inbound_then_peer_then_mover_outbound(
        pair: tuple[Net, Host, Host]) -> None:
    net, mover, peer = pair
    order: list[tuple[str, Direction]] = []
    for h in (mover, peer):
        original = h.drain

        def drain(h: Host = h, original: object = original) -> list[object]:
            got = original()  # type: ignore[operator]
            order.extend((h.name, a.direction) for a in got if isinstance(a, Remaps))
            return got  # type: ignore[no-any-return]

        h.drain = drain  # type: ignore[method-assign]
    move(net, mover, OLD, NEW)
    assert order == [("mover", Direction.INBOUND), ("peer", Direction.INBOUND),
                     ("peer", Direction.OUTBOUND), ("mover", Direction.OUTBOUND)]
    assert KeepAddress(OLD) in mover.log
    expected_mover = Remap("tcp", OLD, 40000, SERVER, 22, new_local=NEW)
    expected_peer = Remap("tcp", SERVER, 22, OLD, 40000, new_peer=NEW)
    assert remaps_of(mover)[0].add == (expected_mover,)
    assert remaps_of(mover)[1].add == (expected_mover,)
    assert remaps_of(peer)[0].add == (expected_peer,)
    assert mover.engine.moved_total == 1 and peer.engine.moved_total == 1
    assert mover.engine.status()["sessions"][0]["now"] == "tcp 198.51.100.10:40000 - " \
                                                          "203.0.113.5:22"


def test_a_second_move_replaces_the_remap_rather_than_chaining(
        pair: tuple[Net, Host, Host]) -> None:
    net, mover, peer = pair
    move(net, mover, OLD, NEW)
    move(net, mover, NEW, NEWER)
    final_mover = Remap("tcp", OLD, 40000, SERVER, 22, new_local=NEWER)
    first_mover = Remap("tcp", OLD, 40000, SERVER, 22, new_local=NEW)
    last_in, last_out = remaps_of(mover)[-2], remaps_of(mover)[-1]
    # the earlier wire tuple is still let in while the peer may send to it ...
    assert last_in == Remaps((final_mover,), (), Direction.INBOUND)
    assert last_out == Remaps((final_mover,), (first_mover,), Direction.OUTBOUND)
    final_peer = Remap("tcp", SERVER, 22, OLD, 40000, new_peer=NEWER)
    first_peer = Remap("tcp", SERVER, 22, OLD, 40000, new_peer=NEW)
    assert remaps_of(peer)[-2:] == [Remaps((final_peer,), (), Direction.INBOUND),
                                    Remaps((final_peer,), (first_peer,), Direction.OUTBOUND)]
    # ... and no longer after the grace time: one remap per session and direction
    net.tick(INBOUND_GRACE + 0.1)
    assert remaps_of(mover)[-1] == Remaps((), (first_mover,), Direction.INBOUND)
    assert remaps_of(peer)[-1] == Remaps((), (first_peer,), Direction.INBOUND)
    # the old address stays kept once, not once per move
    assert [a for a in mover.log if isinstance(a, KeepAddress)] == [KeepAddress(OLD)]


def test_both_ends_move_one_after_the_other(pair: tuple[Net, Host, Host]) -> None:
    net, mover, peer = pair
    move(net, mover, OLD, NEW)
    move(net, peer, SERVER, "203.0.113.77")
    want_mover = Remap("tcp", OLD, 40000, SERVER, 22, new_local=NEW, new_peer="203.0.113.77")
    want_peer = Remap("tcp", SERVER, 22, OLD, 40000, new_local="203.0.113.77", new_peer=NEW)
    assert remaps_of(mover)[-1].add == (want_mover,)
    assert remaps_of(peer)[-1].add == (want_peer,)


def test_a_vanished_session_releases_its_remap_and_address(pair: tuple[Net, Host, Host]) -> None:
    net, mover, _peer = pair
    move(net, mover, OLD, NEW)
    mover.engine.sessions([], net.now)
    got = mover.drain()
    assert ReleaseAddress(OLD) in got
    removed = {(r.direction, r.remove) for r in got if isinstance(r, Remaps)}
    remap = Remap("tcp", OLD, 40000, SERVER, 22, new_local=NEW)
    assert removed == {(Direction.INBOUND, (remap,)), (Direction.OUTBOUND, (remap,))}


def test_break_before_make_waits_for_an_address(pair: tuple[Net, Host, Host]) -> None:
    net, mover, _peer = pair
    mover.addresses.discard(OLD)
    mover.engine.address_gone(OLD, net.now)
    assert mover.engine.wanted_sources() == [(OLD, SERVER)]
    net.tick(5.0)  # no address yet: nothing moves, nothing is given up
    assert mover.engine.status()["pending"] == {OLD: 1}
    mover.addresses.add(NEW)
    mover.engine.source_for(OLD, SERVER, NEW, net.now)
    net.run()
    assert mover.engine.moved_total == 1


def test_no_new_address_within_the_timeout_gives_up(pair: tuple[Net, Host, Host]) -> None:
    net, mover, _peer = pair
    mover.engine.address_gone(OLD, net.now)
    net.tick(mover.engine.config.move_timeout + 1)
    assert mover.engine.lost_total == 1 and mover.engine.status()["pending"] == {}


def test_a_peer_without_sacip_is_found_and_its_sessions_reset_if_asked() -> None:
    mover = host("mover", {OLD}, reset_unpreservable=True)
    silent = Flow("tcp", OLD, 40001, "203.0.113.9", 80)
    net = Net(mover)  # nobody owns 203.0.113.9: its daemon never answers
    mover.engine.sessions([silent], net.now)
    net.run()
    for _ in range(10):
        net.tick(1.0)
    assert mover.engine.status()["peers"][0]["state"] == "no-sacip"
    move(net, mover, OLD, NEW)
    resets = [a for a in mover.log if isinstance(a, ResetFlows)]
    assert resets and resets[0].flows == (silent,)
    assert "no sacip" in resets[0].reason


def test_a_forged_or_replayed_notice_moves_nothing(pair: tuple[Net, Host, Host]) -> None:
    net, mover, peer = pair
    move(net, mover, OLD, NEW)
    # replay every datagram the mover sent, from where it came
    for who, send in list(net.sent):
        if who == "mover":
            peer.engine.datagram(send.data, (send.source or OLD, PORT), send.address, net.now)
    assert peer.engine.counters.get("sealed_replay", 0) == 2  # notice, response
    assert peer.engine.counters.get("hellos_replayed", 0) == 1
    # bytes that look sealed but are not
    association = next(iter(peer.engine.by_index))
    forged = wire.Sealed(association, 10**6, bytes(64)).encode()
    peer.engine.datagram(forged, (NEWER, PORT), SERVER, net.now)
    assert peer.engine.counters.get("sealed_auth") == 1
    assert not [a for a in peer.drain() if isinstance(a, Remaps)]


def test_a_peer_cannot_move_another_peers_sessions(pair: tuple[Net, Host, Host]) -> None:
    net, _mover, peer = pair
    intruder = host("intruder", {"198.51.100.66"})
    net.hosts.append(intruder)
    # the intruder gets an association with the peer by a session of its own
    intruder.engine.sessions([Flow("tcp", "198.51.100.66", 5000, SERVER, 22)], net.now)
    peer.engine.sessions([PEER_FLOW, Flow("tcp", SERVER, 22, "198.51.100.66", 5000)], net.now)
    net.run()
    # and claims to be the mover's old address
    notice = wire.Notice(1, OLD, "198.51.100.66", SERVER, (wire.Session(6, 40000, 22),))
    association = intruder.engine.peers[SERVER].current
    assert association is not None
    peer.engine.datagram(association.seal(notice.encode()), ("198.51.100.66", PORT), SERVER,
                         net.now)
    assert peer.engine.counters.get("notices_not_this_peer") == 1
    assert not [a for a in peer.drain() if isinstance(a, Remaps)]


def test_a_challenge_that_did_not_reach_the_new_address_is_not_answered(
        pair: tuple[Net, Host, Host]) -> None:
    net, mover, peer = pair
    net.dropped.add(NEW)  # the new address is not the mover's after all: nothing reaches it
    move(net, mover, OLD, NEW)
    assert peer.engine.moved_total == 0 and mover.engine.moved_total == 0
    assert not [a for a in peer.log if isinstance(a, Remaps)]
    for _ in range(20):
        net.tick(1.0)
    assert mover.engine.lost_total == 1  # given up after the notice retries


def test_pinned_trust_refuses_an_unpinned_key() -> None:
    mover = host("mover", {OLD}, trust="pinned",
                 peers=(PinnedPeer("other", "SHA256:" + "A" * 43),))
    peer = host("peer", {SERVER})
    net = Net(mover, peer)
    mover.engine.sessions([MOVER_FLOW], net.now)
    net.run()
    assert mover.engine.counters.get("keys_refused") == 1
    assert mover.engine.status()["peers"][0]["state"] == "refused"


def test_tofu_refuses_a_changed_key_for_a_known_address() -> None:
    mover = host("mover", {OLD})
    mover.engine.known[SERVER] = "SHA256:" + "B" * 43
    peer = host("peer", {SERVER})
    net = Net(mover, peer)
    mover.engine.sessions([MOVER_FLOW], net.now)
    net.run()
    assert mover.engine.counters.get("keys_refused") == 1


def test_malformed_datagrams_are_counted_by_reason(pair: tuple[Net, Host, Host]) -> None:
    net, _mover, peer = pair
    for junk in (b"", b"\x01", b"\x09\x01" + bytes(100), bytes(3000)):
        peer.engine.datagram(junk, ("198.51.100.99", PORT), SERVER, net.now)
    assert sum(v for k, v in peer.engine.counters.items() if k.startswith("malformed")) == 4


def test_many_sessions_move_in_one_go() -> None:
    mover = host("mover", {OLD})
    peer = host("peer", {SERVER})
    net = Net(mover, peer)
    flows = [Flow("tcp", OLD, 20000 + i, SERVER, 443) for i in range(2000)]
    mover.engine.sessions(flows, net.now)
    peer.engine.sessions([Flow("tcp", SERVER, 443, OLD, 20000 + i) for i in range(2000)],
                         net.now)
    net.run()
    move(net, mover, OLD, NEW)
    assert mover.engine.moved_total == 2000 and peer.engine.moved_total == 2000
    notices = [s for who, s in net.sent if who == "mover" and s.source == NEW]
    assert len(notices) >= 2000 // wire.MAX_NOTICE_SESSIONS


def test_both_ends_move_at_the_same_moment() -> None:
    """Each notice goes to the other's old address; the mover's old one is no longer
    reachable, the peer's still is. The peer learns first, then its own notice (resent to
    where the mover is now) still names the session by the mover's old wire tuple."""
    mover = host("mover", {OLD})
    peer = host("peer", {SERVER})
    net = Net(mover, peer)
    mover.engine.sessions([MOVER_FLOW], net.now)
    peer.engine.sessions([PEER_FLOW], net.now)
    net.run()
    net.dropped.add(OLD)  # the mover's old subnet is gone from the routers
    mover.addresses = {NEW}
    peer.addresses = {SERVER, "203.0.113.77"}  # its old address still reaches it
    mover.engine.address_gone(OLD, net.now)
    peer.engine.address_gone(SERVER, net.now)
    mover.engine.source_for(OLD, SERVER, NEW, net.now)
    peer.engine.source_for(SERVER, OLD, "203.0.113.77", net.now)
    net.run()
    for _ in range(10):
        net.tick(0.2)
    assert mover.engine.moved_total == 2 and peer.engine.moved_total == 2  # own + followed
    want_mover = Remap("tcp", OLD, 40000, SERVER, 22, new_local=NEW, new_peer="203.0.113.77")
    want_peer = Remap("tcp", SERVER, 22, OLD, 40000, new_local="203.0.113.77", new_peer=NEW)
    installed_out = {h.name: [r for r in remaps_of(h) if r.direction & Direction.OUTBOUND][-1]
                     for h in (mover, peer)}
    assert want_mover in installed_out["mover"].add
    assert want_peer in installed_out["peer"].add


def test_greetings_from_anyone_do_not_pile_up() -> None:
    """A peer that no session needs is forgotten once quiet for ASSOCIATION_IDLE."""
    from ipshift.sacip.engine import ASSOCIATION_IDLE

    peer = host("peer", {SERVER})
    strangers = [host(f"s{i}", {f"198.51.100.{100 + i}"}) for i in range(5)]
    net = Net(peer, *strangers)
    for i, stranger in enumerate(strangers):
        stranger.engine.sessions([Flow("tcp", f"198.51.100.{100 + i}", 5000, SERVER, 22)],
                                 net.now)
    net.run()
    assert len(peer.engine.peers) == 5
    peer.engine.sessions([], net.now + ASSOCIATION_IDLE + 1)
    assert peer.engine.peers == {} and peer.engine.by_index == {}
    assert peer.engine.counters["peers_forgotten"] == 5
