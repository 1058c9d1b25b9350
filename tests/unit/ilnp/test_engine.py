"""The ILNP node engine with a fake clock: sessions, nonces, Locator Updates across moves,
forgeries and replays, multihoming, routers, timers. A small in-memory network carries what
the engines decide between them (the adapter's job, done here without packets)."""

from __future__ import annotations

from dataclasses import dataclass, field

from hypothesis import given, settings
from hypothesis import strategies as st

from ipshift.ilnp.engine import (
    ACK,
    ADVERTISE,
    Arrival,
    LocatorEntry,
    NodeConfig,
    NodeEngine,
    Own,
    Publish,
    Remote,
    Resolve,
    Route,
    SendUpdate,
    Transmit,
    Update,
    Verdict,
    l64_text,
    nid_text,
)

L1, L2, L3 = 0x20010DB800010000, 0x20010DB800020000, 0x20010DB800030000
MN, CN, R = 0x1111, 0x2222, 0x3333


def counter_nonces() -> object:
    count = iter(range(1, 1 << 30))
    return lambda size: next(count).to_bytes(size, "big")


def engine(nid: int, **kw: object) -> NodeEngine:
    return NodeEngine(NodeConfig(nid=nid, **kw), random_bytes=counter_nonces())  # type: ignore[arg-type]


@dataclass
class Net:
    """Delivers data packets and Locator Updates between engines along their routes.
    `links` is which locators each node holds (a packet to next hop (L, N) arrives only if N
    holds L)."""

    nodes: dict[int, NodeEngine] = field(default_factory=dict)
    #: (to, from, nonce) of every data packet delivered
    delivered: list[tuple[int, int, bytes | None]] = field(default_factory=list)
    lost: int = 0

    def add(self, e: NodeEngine) -> NodeEngine:
        self.nodes[e.config.nid] = e
        return e

    def carry(self, src: int, route: Route, now: float, update: Update | None = None,
              nonce: bytes | None = None, hop_limit: int = 64) -> None:
        hop_locator, hop_nid = route.next_hop
        node = self.nodes.get(hop_nid)
        if node is None or hop_locator not in node.own:
            self.lost += 1
            return
        arrival = Arrival(route.local, src, route.remote, route.nid,
                          nonce if update is not None else route.nonce, hop_locator, hop_limit)
        if update is not None:
            decision = node.locator_update(arrival, update, now)
        else:
            decision = node.inbound(arrival, now)
        if decision.verdict is Verdict.DELIVER and update is None:
            self.delivered.append((hop_nid, src, arrival.nonce))
        if decision.verdict is Verdict.FORWARD:
            # a router passes it on: the addresses stay the sender's, the hop changes
            assert decision.route is not None
            hop_locator, hop_nid = decision.route.next_hop
            hop = self.nodes.get(hop_nid)
            if hop is None or hop_locator not in hop.own:
                self.lost += 1
                return
            arrival = Arrival(route.local, src, route.remote, route.nid, arrival.nonce,
                              hop_locator, hop_limit - 1)
            if update is not None:
                hop.locator_update(arrival, update, now)
            elif hop.inbound(arrival, now).verdict is Verdict.DELIVER:
                self.delivered.append((hop_nid, src, arrival.nonce))

    def send(self, src: int, dst: int, now: float) -> Route | None:
        """A data packet src -> dst (resolved first if need be, as the adapter would)."""
        route = self.nodes[src].outbound(dst, b"data", now)
        if route is not None:
            self.carry(src, route, now)
        else:
            self.run(now)
        return route

    def run(self, now: float) -> None:
        """Deliver every pending action until the network is quiet."""
        for _ in range(100):
            busy = False
            for nid, node in self.nodes.items():
                node.handle_timer(now)
                for action in node.actions():
                    if isinstance(action, SendUpdate):
                        busy = True
                        self.carry(nid, action.route, now, action.update, action.nonce)
                    elif isinstance(action, Transmit):
                        busy = True
                        self.carry(nid, action.route, now)
                    elif isinstance(action, Resolve):
                        target = self.nodes.get(action.nid)
                        if target is not None:
                            busy = True
                            node.learned(action.nid, {l64: Remote(o.preference, 600)
                                                      for l64, o in target.own.items()}, now)
            if not busy:
                return


def pair(now: float = 0.0) -> tuple[Net, NodeEngine, NodeEngine]:
    net = Net()
    mn, cn = net.add(engine(MN)), net.add(engine(CN))
    mn.set_locators({L1: Own(10)}, now)
    cn.set_locators({L1: Own(10)}, now)
    for e in (mn, cn):
        e.actions()
    return net, mn, cn


def test_a_session_resolves_queues_and_carries_the_nonce_until_answered() -> None:
    net, mn, cn = pair()
    assert mn.outbound(CN, b"first", 0.0) is None          # unknown: resolved first
    acts = mn.actions()
    assert Resolve(CN) in acts and mn.counters.queued == 1
    mn.learned(CN, {L1: Remote(10, 600)}, 0.01)
    (tx,) = [a for a in mn.actions() if isinstance(a, Transmit)]
    assert tx.packet == b"first" and tx.route.nonce == mn.ilcc[CN].nonce_out
    net.carry(MN, tx.route, 0.01)
    # CN learned the session with MN's nonce and the locator it came from
    entry = cn.ilcc[MN]
    assert entry.nonce_in == mn.ilcc[CN].nonce_out and L1 in entry.locators
    # CN's answers carry its own nonce for a while; MN learns it and stops sending its own
    back = cn.outbound(MN, b"answer", 0.02)
    assert back is not None and back.nonce == entry.nonce_out
    net.carry(CN, back, 0.02)
    assert mn.ilcc[CN].nonce_in == entry.nonce_out
    later = mn.outbound(CN, b"more", 0.03)
    assert later is not None and later.nonce is None
    assert cn.outbound(MN, b"x", 10.0).nonce is None  # type: ignore[union-attr]


def test_soft_handoff_is_advertised_acked_and_followed() -> None:
    net, mn, cn = pair()
    net.send(MN, CN, 0.0)
    net.run(0.0)
    net.send(CN, MN, 0.01)
    cn.set_locators({L1: Own(10), L2: Own(10)}, 0.0)  # CN is on L2 too
    mn.set_locators({L1: Own(10), L2: Own(20)}, 1.0)  # make before break: L2 joins
    acts = mn.actions()
    assert any(isinstance(a, Publish) for a in acts)
    (lu,) = [a for a in acts if isinstance(a, SendUpdate)]
    assert lu.update.operation == ADVERTISE and lu.nonce == mn.ilcc[CN].nonce_out
    assert [e.l64 for e in lu.update.locators] == [L1, L2]
    net.carry(MN, lu.route, 1.0, lu.update, lu.nonce)
    assert set(cn.ilcc[MN].locators) == {L1, L2}
    net.run(1.001)  # CN's ack
    assert mn.ilcc[CN].pending is None and mn.counters.lu_acked == 1
    assert mn.lu_latencies[-1] <= 0.002
    # break: L1 goes; CN now sends to L2, with its nonce for a while after the move
    mn.set_locators({L2: Own(10)}, 2.0)
    net.run(2.0)
    route = cn.outbound(MN, b"d", 2.1)
    assert route is not None and route.remote == L2 and route.nonce is not None
    assert cn.outbound(MN, b"d", 10.0).nonce is None  # type: ignore[union-attr]
    assert mn.moves == 3 and cn.counters.acks_sent == 2


def test_forged_and_replayed_updates_are_dropped() -> None:
    net, mn, cn = pair()
    net.send(MN, CN, 0.0)
    net.send(CN, MN, 0.0)
    good = mn.ilcc[CN].nonce_out
    arrival = Arrival(L2, MN, L1, CN, b"\xde\xad\xbe\xef", L1)
    forged = Update(ADVERTISE, (LocatorEntry(L2, 10, 600),))
    assert cn.locator_update(arrival, forged, 1.0).reason == "lu_bad_nonce"
    no_nonce = Arrival(L2, MN, L1, CN, None, L1)
    assert cn.locator_update(no_nonce, forged, 1.0).reason == "lu_bad_nonce"
    stranger = Arrival(L2, 0x9999, L1, CN, good, L1)
    assert cn.locator_update(stranger, forged, 1.0).reason == "lu_unknown_correspondent"
    # from a locator it does not advertise
    elsewhere = Arrival(L3, MN, L1, CN, good, L1)
    assert cn.locator_update(elsewhere, forged, 1.0).reason == "lu_source_not_advertised"
    assert set(cn.ilcc[MN].locators) == {L1}
    # a real move to L2, then the replay of the older update to L1 is refused
    first = Update(ADVERTISE, (LocatorEntry(L1, 10, 600),))
    assert cn.locator_update(Arrival(L1, MN, L1, CN, good, L1), first, 2.0).verdict is \
        Verdict.DELIVER
    cn.set_locators({L1: Own(10), L2: Own(10)}, 2.0)
    assert cn.locator_update(Arrival(L2, MN, L2, CN, good, L2), forged, 3.0).verdict is \
        Verdict.DELIVER
    assert cn.locator_update(Arrival(L1, MN, L1, CN, good, L1), first, 3.5).reason == \
        "lu_replayed"
    assert set(cn.ilcc[MN].locators) == {L2}
    # a retransmission of the current one is acked again, and much later a move back is fine
    assert cn.locator_update(Arrival(L2, MN, L2, CN, good, L2), forged, 3.6).verdict is \
        Verdict.DELIVER
    assert cn.locator_update(Arrival(L1, MN, L1, CN, good, L1), first, 20.0).verdict is \
        Verdict.DELIVER
    assert cn.counters.drops["lu_bad_nonce"] == 2
    notes = [a.text for a in cn.actions() if hasattr(a, "text")]
    assert any("forgery" in t for t in notes) and any("replay" in t for t in notes)


def test_data_from_an_unknown_locator_needs_the_nonce() -> None:
    net, mn, cn = pair()
    net.send(MN, CN, 0.0)
    net.send(CN, MN, 0.0)
    assert cn.inbound(Arrival(L3, MN, L1, CN, None, L1), 1.0).reason == "unknown_locator"
    wrong = cn.inbound(Arrival(L3, MN, L1, CN, b"\x00\x00\x00\x09", L1), 1.0)
    assert wrong.reason == "bad_nonce"
    good = cn.inbound(Arrival(L3, MN, L1, CN, mn.ilcc[CN].nonce_out, L1), 1.0)
    assert good.verdict is Verdict.DELIVER and L3 in cn.ilcc[MN].locators
    # a new session must start with a nonce
    assert cn.inbound(Arrival(L1, 0x4444, L1, CN, None, L1), 1.0).reason == "no_nonce"
    assert cn.inbound(Arrival(L1, MN, L2, CN, None, L1), 1.0).reason == "not_our_locator"


def test_unanswered_updates_are_retried_with_linear_backoff_then_given_up() -> None:
    net, mn, _ = pair()
    net.send(MN, CN, 0.0)
    net.send(CN, MN, 0.0)
    mn.set_locators({L2: Own(10)}, 1.0)  # CN is not on L2 and there is no router: all lost
    sent = [a for a in mn.actions() if isinstance(a, SendUpdate)]
    assert len(sent) == 0 and mn.counters.drops["lu_unroutable"] == 1
    mn.set_locators({L1: Own(10), L2: Own(10)}, 1.0)
    times = []
    now = 1.0
    for _ in range(40):
        deadline = mn.next_deadline()
        assert deadline is not None
        now = deadline
        mn.handle_timer(now)
        if any(isinstance(a, SendUpdate) for a in mn.actions()):
            times.append(round(now - 1.0, 3))
        if mn.counters.lu_failed:
            break
    assert times == [0.25, 0.75, 1.5, 2.5, 3.75, 5.25]  # the first went at once; 7 in all
    assert mn.counters.lu_retransmitted == 6 and mn.counters.lu_failed == 1
    assert mn.ilcc[CN].pending is None


def test_multihoming_prefers_and_fails_over() -> None:
    net = Net()
    mn, cn = net.add(engine(MN)), net.add(engine(CN))
    mn.set_locators({L1: Own(10), L2: Own(10)}, 0.0)
    cn.set_locators({L1: Own(20), L2: Own(10)}, 0.0)
    mn.learned(CN, {L1: Remote(20, 600), L2: Remote(10, 600)}, 0.0)
    route = mn.outbound(CN, b"x", 0.0)
    assert route is not None and route.remote == L2 and route.local == L2
    net.carry(MN, route, 0.0)
    cn.learned(MN, {L1: Remote(10, 600), L2: Remote(10, 600)}, 0.0)  # as DNS says
    net.send(CN, MN, 0.0)
    net.run(0.0)
    # CN's L2 dies: it tells MN, whose traffic moves to L1
    cn.set_locators({L1: Own(20)}, 1.0)
    net.run(1.0)
    route = mn.outbound(CN, b"x", 1.1)
    assert route is not None and route.remote == L1
    assert cn.counters.lu_acked == 1


def test_a_router_forwards_between_locators_with_a_hop_limit() -> None:
    net = Net()
    mn, cn = net.add(engine(MN)), net.add(engine(CN))
    router = net.add(engine(R, router=True))
    router.set_locators({L1: Own(10), L3: Own(10)}, 0.0)
    mn.set_locators({L1: Own(10)}, 0.0)
    cn.set_locators({L3: Own(10)}, 0.0)
    mn.set_router(L1, R)
    cn.set_router(L3, R)
    mn.learned(CN, {L3: Remote(10, 600)}, 0.0)
    route = mn.outbound(CN, b"x", 0.0)
    assert route is not None and route.next_hop == (L1, R) and route.remote == L3
    net.carry(MN, route, 0.0)
    assert (CN, MN, route.nonce) in net.delivered and router.counters.forwarded == 1
    assert router.inbound(Arrival(L1, MN, L3, CN, None, L1, hop_limit=1), 0.0).reason == \
        "hop_limit"
    assert cn.inbound(Arrival(L1, MN, L3, 0x7777, None, L3), 0.0).reason == "not_for_us"
    # CN answers; the MN moves from L1 to L2 (also the router's): the LU goes via the router
    net.send(CN, MN, 0.1)
    router.set_locators({L1: Own(10), L2: Own(10), L3: Own(10)}, 0.2)
    mn.set_locators({L2: Own(10)}, 1.0)
    mn.set_router(L2, R)
    mn.actions()
    mn.set_locators({L1: Own(10), L2: Own(10)}, 1.0)
    net.run(1.0)
    assert mn.counters.lu_acked >= 1


def test_idle_correspondents_are_forgotten_and_unresolved_queues_dropped() -> None:
    net, mn, _ = pair()
    assert mn.outbound(0x5555, b"q", 0.0) is None
    assert mn.actions() == [Resolve(0x5555)]
    mn.handle_timer(5.0)  # resolve_wait
    assert mn.counters.drops["unresolved"] == 1
    net.send(MN, CN, 0.0)
    mn.handle_timer(700.0)
    assert CN not in mn.ilcc and 0x5555 not in mn.ilcc
    assert mn.next_deadline() is None


def test_no_locator_drops_and_config_errors() -> None:
    e = engine(MN)
    e.learned(CN, {L1: Remote(10, 600)}, 0.0)
    assert e.outbound(CN, b"x", 0.0) is None and e.counters.drops["no_locator"] == 1
    assert e.outbound(MN, b"x", 0.0) is None and e.counters.drops["to_self"] == 1
    for bad in ({"nid": 0}, {"nid": 1 << 64}, {"nid": 1, "nonce_size": 8}):
        try:
            NodeConfig(**bad)  # type: ignore[arg-type]
        except ValueError:
            continue
        raise AssertionError(f"{bad} accepted")


def test_status_rows_show_no_nonce_values() -> None:
    net, mn, _ = pair()
    net.send(MN, CN, 0.0)
    rows = mn.status_rows(0.5)
    assert rows[0]["nid"] == nid_text(CN) == "0000:0000:0000:2222"
    assert rows[0]["using"] == l64_text(L1) == "2001:db8:1:0::/64"
    assert rows[0]["nonce_out"] == 4 and rows[0]["nonce_in"] is False
    assert mn.ilcc[CN].nonce_out.hex() not in repr(rows)


@settings(max_examples=80, deadline=None)
@given(st.lists(st.tuples(
    st.sampled_from(["move", "send", "back", "tick", "forge", "ack", "learn"]),
    st.sets(st.sampled_from([L1, L2, L3]), max_size=3),
    st.floats(0.0, 3.0)), max_size=40))
def test_random_events_never_raise_and_timers_drain(events: list) -> None:  # type: ignore[type-arg]
    net, mn, cn = pair()
    cn.set_locators({L1: Own(10), L2: Own(10), L3: Own(10)}, 0.0)
    now = 0.0
    for kind, locs, dt in events:
        now += dt
        if kind == "move":
            mn.set_locators({loc: Own(10) for loc in locs}, now)
        elif kind == "send":
            net.send(MN, CN, now)
        elif kind == "back":
            net.send(CN, MN, now)
        elif kind == "forge":
            cn.locator_update(Arrival(L1, MN, L1, CN, b"\x01\x02\x03\x04", L1),
                              Update(ADVERTISE, tuple(LocatorEntry(x, 1, 9) for x in locs)), now)
        elif kind == "ack":
            mn.locator_update(Arrival(L1, CN, L1, MN, cn.ilcc[MN].nonce_out
                                      if MN in cn.ilcc else None, L1),
                              Update(ACK, tuple(LocatorEntry(x, 1, 9) for x in locs)), now)
        elif kind == "learn":
            mn.learned(CN, {x: Remote(10, 2.0) for x in locs}, now)
        net.run(now)
    for e in (mn, cn):
        e.handle_timer(now + 10_000)
        deadline = e.next_deadline()
        assert deadline is None or deadline > now + 10_000


def test_a_one_way_sender_learns_the_nonce_from_the_ack_of_its_update() -> None:
    from ipshift.ilnp.engine import (
        ACK,
        Arrival,
        NodeConfig,
        NodeEngine,
        Own,
        Remote,
        SendUpdate,
        Update,
    )
    from ipshift.ilnp.engine import LocatorEntry as Entry

    l1, l2, l3 = 0x20010DB800010000, 0x20010DB800020000, 0x20010DB800030000
    me = NodeEngine(NodeConfig(nid=0x11), random_bytes=lambda n: b"\x01" * n)
    me.set_locators({l1: Own(10)}, 0.0)
    me.learned(0x22, {l1: Remote(10, 600)}, 0.0)
    assert me.outbound(0x22, b"x", 0.0) is not None  # we only send: its nonce is unknown
    me.set_locators({l1: Own(10), l2: Own(10)}, 1.0)
    sent = [a for a in me.actions() if isinstance(a, SendUpdate)][-1]
    ack = Update(ACK, sent.update.locators, sent.update.sequence)
    # a forged ack from a locator it does not have is refused, its nonce not learned
    forged = Arrival(l3, 0x22, l1, 0x11, b"\x09" * 4, l1)
    assert me.locator_update(forged, ack, 1.001).reason == "lu_bad_nonce"
    assert me.ilcc[0x22].nonce_in is None
    # a stale ack (not the pending advertisement) teaches nothing either
    stale = Update(ACK, (Entry(l1, 10, 600),), sent.update.sequence)
    assert me.locator_update(Arrival(l1, 0x22, l1, 0x11, b"\x07" * 4, l1), stale,
                             1.001).reason == "lu_bad_nonce"
    real = Arrival(l1, 0x22, l1, 0x11, b"\x07" * 4, l1)
    assert me.locator_update(real, ack, 1.002).verdict.value == "deliver"
    assert me.ilcc[0x22].nonce_in == b"\x07" * 4 and me.counters.lu_acked == 1


def test_the_local_end_leaves_a_deprecated_network_first() -> None:
    from ipshift.ilnp.engine import NodeConfig, NodeEngine, Own, Remote

    l1, l2 = 0x20010DB800010000, 0x20010DB800020000
    me = NodeEngine(NodeConfig(nid=0x11))
    me.set_locators({l1: Own(10), l2: Own(10)}, 0.0)
    me.learned(0x22, {l1: Remote(10, 600), l2: Remote(10, 600)}, 0.0)
    assert me.outbound(0x22, b"x", 0.0).local == l1  # type: ignore[union-attr]
    me.set_locators({l1: Own(110), l2: Own(10)}, 1.0)  # l1 deprecated
    route = me.outbound(0x22, b"x", 1.0)
    assert route is not None and (route.local, route.remote) == (l2, l2)


def test_the_nonce_rides_until_our_update_is_acked_and_nonce_hold_after() -> None:
    from ipshift.ilnp.engine import (
        ACK,
        Arrival,
        NodeConfig,
        NodeEngine,
        Own,
        Remote,
        SendUpdate,
        Update,
    )

    l1, l2 = 0x20010DB800010000, 0x20010DB800020000
    me = NodeEngine(NodeConfig(nid=0x11, nonce_hold=0.5), random_bytes=lambda n: b"\x01" * n)
    me.set_locators({l1: Own(10)}, 0.0)
    me.learned(0x22, {l1: Remote(10, 600), l2: Remote(10, 600)}, 0.0)
    me.outbound(0x22, b"x", 0.0)
    me.inbound(Arrival(l1, 0x22, l1, 0x11, b"\x02" * 4, l1), 0.1)  # its nonce, its answer
    assert me.outbound(0x22, b"x", 5.0).nonce is None  # type: ignore[union-attr]
    me.set_locators({l2: Own(10)}, 10.0)  # a move: its update is lost, no ack for a while
    sent = [a for a in me.actions() if isinstance(a, SendUpdate)][-1]
    me.handle_timer(10.3)
    me.handle_timer(10.8)  # two retries, still no ack
    assert me.outbound(0x22, b"x", 12.0).nonce == b"\x01" * 4  # type: ignore[union-attr]
    assert me.paths(12.0)[0x22].carry_pending
    ack = Update(ACK, sent.update.locators, sent.update.sequence)
    me.locator_update(Arrival(l2, 0x22, l2, 0x11, b"\x02" * 4, l2), ack, 12.0)
    assert not me.paths(12.1)[0x22].carry_pending
    assert me.outbound(0x22, b"x", 12.1).nonce is not None  # type: ignore[union-attr]
    assert me.outbound(0x22, b"x", 13.0).nonce is None  # type: ignore[union-attr]
