"""The seed-format node engine with a fake clock: discovery, STP, routers, moves with soft
handoff and Locator Updates (acks, retries, failures), expiry, and every drop counted. A small
in-memory link carries each Multicast to the nodes that joined its locator (the adapter's
job, done here without sockets)."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ipshift.ilnp.compat import (
    Deliver,
    Join,
    Leave,
    Log,
    Multicast,
    SeedConfig,
    SeedNode,
    from_self,
)
from ipshift.ilnp.seedwire import (
    ALL_NODES,
    NH_DISCOVERY,
    NH_LOCATOR_UPDATE,
    NH_STP,
    Discovery,
    LocatorUpdate,
    SeedHeader,
    Stp,
    decode,
    encode,
)

L1, L2, L3 = 0x20010DB800000001, 0x20010DB800000002, 0x20010DB800000003
MN, CN, R = 0x1111, 0x2222, 0x3333


def node(nid: int, hostname: str, locators: tuple[int, ...], **kw: object) -> SeedNode:
    config = SeedConfig(nid=nid, hostname=hostname, locators=locators, **kw)  # type: ignore[arg-type]
    return SeedNode(config, random.Random(nid))


@dataclass
class Link:
    """One shared link: a Multicast reaches every other node that joined the locator."""

    nodes: dict[str, SeedNode] = field(default_factory=dict)
    members: dict[str, set[int]] = field(default_factory=dict)
    delivered: dict[str, list[Deliver]] = field(default_factory=dict)
    logs: dict[str, list[Log]] = field(default_factory=dict)
    sent: list[tuple[str, Multicast]] = field(default_factory=list)
    muted: set[str] = field(default_factory=set)  # nodes whose sending is lost
    now: float = 0.0

    def add(self, name: str, engine: SeedNode) -> SeedNode:
        self.nodes[name] = engine
        self.members[name] = set()
        self.delivered[name] = []
        self.logs[name] = []
        engine.own_addresses = {self.address(name)}
        engine.start(self.now)
        self.pump()
        return engine

    def address(self, name: str) -> str:
        return f"fe80::{list(self.nodes).index(name) + 1:x}"

    def pump(self) -> None:
        for _ in range(1000):
            busy = False
            for name, engine in list(self.nodes.items()):
                for action in engine.actions():
                    busy = True
                    self.apply(name, action)
            if not busy:
                return
        raise AssertionError("the nodes never went quiet")

    def apply(self, name: str, action: object) -> None:
        if isinstance(action, Join):
            assert action.locator not in self.members[name]
            self.members[name].add(action.locator)
        elif isinstance(action, Leave):
            self.members[name].remove(action.locator)
        elif isinstance(action, Deliver):
            self.delivered[name].append(action)
        elif isinstance(action, Log):
            self.logs[name].append(action)
        elif isinstance(action, Multicast):
            assert action.locator in self.members[name], "sent on a group not joined"
            self.sent.append((name, action))
            if name in self.muted:
                return
            for other, engine in self.nodes.items():
                if other != name and action.locator in self.members[other]:
                    engine.datagram(action.data, action.locator, self.address(name), self.now)

    def advance(self, until: float, step: float = 0.01) -> None:
        while self.now < until - 1e-9:
            self.now = min(until, self.now + step)
            for engine in self.nodes.values():
                deadline = engine.next_deadline()
                if deadline is not None and deadline <= self.now:
                    engine.timer(self.now)
            self.pump()

    def events(self, name: str, event: str) -> list[Log]:
        return [log for log in self.logs[name] if log.event == event]


def seed_site(**mn_kw: object) -> Link:
    """The seed's topology: a mobile node on L1, a correspondent on L3, a router on all
    three; everyone discovered."""
    link = Link()
    link.add("r", node(R, "r", (L1, L2, L3), router=True, wait=4.0))
    link.add("cn", node(CN, "cn", (L3,), ports=frozenset({7000}), wait=4.0))
    link.add("mn", node(MN, "mn", (L1,), wait=4.0, handoff=1.0, **mn_kw))
    return link


# --- start and discovery ---------------------------------------------------------------------
def test_start_joins_and_solicits_on_every_locator() -> None:
    engine = node(MN, "mn", (L1, L2), wait=30.0)
    engine.start(100.0)
    actions = engine.actions()
    assert actions[:2] == [Join(L1), Join(L2)]
    sent = [a for a in actions if isinstance(a, Multicast)]
    assert [a.locator for a in sent] == [L1, L2]
    for action in sent:
        header, body = decode(action.data)
        assert (header.next_header, header.dst_locator, header.dst_nid) == (NH_DISCOVERY,
                                                                           ALL_NODES, 0)
        assert header.src_locator == action.locator == body.locator  # type: ignore[union-attr]
        assert body == Discovery(MN, action.locator, True, "mn")
    deadline = engine.next_deadline()
    assert deadline is not None and 115.0 <= deadline <= 130.0
    engine.start(100.0)  # twice is once
    assert engine.actions() == []


def test_solicitations_repeat_within_wait() -> None:
    link = Link()
    engine = link.add("a", node(MN, "a", (L1,), wait=10.0))
    link.advance(100.0, step=0.5)
    assert 10 <= engine.counters["solicitations"] <= 21  # at start, then every 5..10 s


def test_discovery_across_the_router() -> None:
    link = seed_site()
    mn, cn, r = link.nodes["mn"], link.nodes["cn"], link.nodes["r"]
    assert set(mn.neighbours) == {CN, R}
    assert set(cn.neighbours) == {MN, R}
    assert set(r.neighbours) == {MN, CN}
    assert list(cn.neighbours[MN].locators) == [L1]
    assert mn.neighbour_by_hostname("cn").nid == CN  # type: ignore[union-attr]
    # mn learned that L3 is behind its L1 from cn's flooded advertisement
    assert mn.routes[L3].via == L1
    assert {log.nid for log in link.events("mn", "discovered")} == {R, CN}
    assert r.counters["flooded"] > 0
    assert mn.drops["own_nid"] == 0  # the router never floods back onto the arrival locator


def test_a_solicitation_is_answered_once_per_holdoff() -> None:
    engine = node(CN, "cn", (L3,), wait=30.0)
    engine.start(0.0)
    engine.actions()
    solicitation = encode(SeedHeader(NH_DISCOVERY, L3, MN, ALL_NODES, 0),
                          Discovery(MN, L3, True, "mn"))
    engine.datagram(solicitation, L3, "fe80::9", 5.0)
    engine.datagram(solicitation, L3, "fe80::9", 5.5)
    assert engine.counters["advertisements"] == 1
    engine.datagram(solicitation, L3, "fe80::9", 6.0)
    assert engine.counters["advertisements"] == 2
    answer = next(a for a in engine.actions() if isinstance(a, Multicast))
    assert decode(answer.data)[1] == Discovery(CN, L3, False, "cn")


# --- STP -------------------------------------------------------------------------------------
def test_stp_through_the_router_with_the_hop_limit_decremented() -> None:
    link = seed_site()
    mn = link.nodes["mn"]
    link.sent.clear()
    assert mn.send_stp(5000, "cn", 7000, b"seq 1", link.now)
    link.pump()
    assert link.delivered["cn"] == [Deliver(7000, b"seq 1", "mn", 5000, MN)]
    (first, out), (second, fwd) = link.sent
    assert (first, out.locator, second, fwd.locator) == ("mn", L1, "r", L3)
    h1, h2 = decode(out.data)[0], decode(fwd.data)[0]
    assert (h1.src_locator, h1.dst_locator, h1.hop_limit) == (L1, L3, 3)
    assert h2 == h1.forwarded()


def test_stp_to_an_unbound_port_or_an_unknown_host_is_dropped() -> None:
    link = seed_site()
    mn, cn = link.nodes["mn"], link.nodes["cn"]
    assert mn.send_stp(5000, "cn", 7001, b"x", link.now)
    link.pump()
    assert cn.drops["unbound_port"] == 1 and link.delivered["cn"] == []
    assert not mn.send_stp(5000, "nobody", 7000, b"x", link.now)
    assert mn.drops["unknown_host"] == 1
    cn.unbind(7000)
    mn.send_stp(5000, "cn", 7000, b"x", link.now)
    link.pump()
    assert cn.drops["unbound_port"] == 2
    cn.bind(7000)
    mn.send_stp(5000, "cn", 7000, b"x", link.now)
    link.pump()
    assert len(link.delivered["cn"]) == 1


def test_without_a_route_unicast_goes_out_on_the_primary_locator() -> None:
    engine = node(MN, "mn", (L2, L1), wait=30.0)
    engine.start(0.0)
    engine.actions()
    advert = encode(SeedHeader(NH_DISCOVERY, L3, CN, ALL_NODES, 0, 3),
                    Discovery(CN, L3, False, "cn"))
    engine.datagram(advert, L1, "fe80::2", 0.0)
    engine.routes.clear()
    assert engine.send_stp(1, "cn", 2, b"", 0.0)
    (out,) = [a for a in engine.actions() if isinstance(a, Multicast)]
    assert out.locator == L2 and decode(out.data)[0].src_locator == L2
    assert engine.counters["unrouted"] == 1


# --- moves and Locator Updates -----------------------------------------------------------------
def stream(link: Link, seconds: float, rate: float = 100.0, start_seq: int = 0) -> int:
    """mn sends a numbered stream to cn:7000 for `seconds`; returns the next sequence number."""
    mn, seq, t_end = link.nodes["mn"], start_seq, link.now + seconds
    while link.now < t_end - 1e-9:
        assert mn.send_stp(5000, "cn", 7000, b"seq %d" % seq, link.now)
        seq += 1
        link.pump()
        link.advance(link.now + 1 / rate, step=1 / rate)
    return seq


def test_moves_with_soft_handoff_lose_nothing() -> None:
    link = seed_site()
    mn = link.nodes["mn"]
    seq = 0
    schedule = [(L2,), (L1,), (L1, L2), (L2,), (L1,)]
    for new in schedule:
        seq = stream(link, 2.0, start_seq=seq)
        mn.set_locators(new, link.now)
        link.pump()
    seq = stream(link, 2.0, start_seq=seq)
    got = [int(d.payload.split()[1]) for d in link.delivered["cn"]]
    assert got == list(range(seq))  # none lost, none doubled, in order
    acked = link.events("mn", "lu_acked")
    assert [a.nid for a in acked].count(CN) == len(schedule)
    assert all(a.rtt is not None and a.rtt < 0.5 for a in acked)
    assert mn.counters["lu_failed"] == 0 and not mn.pending_updates()
    # the last update put L1 first (a discovery answered during a handoff may add others)
    assert link.nodes["cn"].neighbours[MN].primary == L1
    assert link.members["mn"] == {L1}  # the handoffs are over: L2 left
    assert mn.joined == [L1]


def test_a_move_joins_at_once_and_leaves_after_the_handoff() -> None:
    link = seed_site()
    mn = link.nodes["mn"]
    t0 = link.now
    mn.set_locators([L2], t0)
    link.pump()
    assert link.members["mn"] == {L1, L2}
    assert [log.event for log in link.logs["mn"]][-1] in ("lu_sent", "lu_acked")
    # the ack came back through the router onto L2: the route to L3 goes via L2 now
    assert mn.routes[L3].via == L2
    link.advance(t0 + 0.99)
    assert link.members["mn"] == {L1, L2}
    link.advance(t0 + 1.02)
    assert link.members["mn"] == {L2}
    assert link.events("mn", "left")
    assert all(route.via != L1 for route in mn.routes.values())
    mn.set_locators([L2], link.now)  # no change, no move
    assert mn.counters["moves"] == 1


def test_updates_are_retried_three_times_then_given_up() -> None:
    link = seed_site()
    mn = link.nodes["mn"]
    link.muted.add("cn")  # cn hears, never answers
    t0 = link.now
    mn.set_locators([L2], t0)
    link.pump()
    link.advance(t0 + 5.0)
    to_cn = [log for log in link.events("mn", "lu_sent") if log.nid == CN]
    assert len(to_cn) == 4  # the first and three retries, 1 s apart
    assert link.nodes["cn"].counters["lu_received"] == 4
    assert [log.nid for log in link.events("mn", "lu_failed")] == [CN]
    assert [log.nid for log in link.events("mn", "lu_acked")] == [R]
    assert mn.counters["lu_failed"] == 1 and not mn.pending_updates()


def test_an_ack_stops_the_retries() -> None:
    link = seed_site()
    mn = link.nodes["mn"]
    link.muted.add("cn")
    t0 = link.now
    mn.set_locators([L2], t0)
    link.pump()
    link.advance(t0 + 1.5)
    link.muted.clear()
    link.advance(t0 + 5.0)
    to_cn = [log for log in link.events("mn", "lu_sent") if log.nid == CN]
    assert len(to_cn) == 3  # t0, t0+1, t0+2 (acked)
    assert CN in [log.nid for log in link.events("mn", "lu_acked")]
    assert link.nodes["cn"].drops["unexpected_ack"] == 0
    assert not link.events("mn", "lu_failed")


def test_a_correspondent_acks_to_the_first_advertised_locator() -> None:
    engine = node(CN, "cn", (L3,))
    engine.start(0.0)
    engine.actions()
    lu = encode(SeedHeader(NH_LOCATOR_UPDATE, L1, MN, L3, CN), LocatorUpdate.advertise([L2, L1]))
    engine.datagram(lu, L3, "fe80::1", 1.0)
    (ack,) = [a for a in engine.actions() if isinstance(a, Multicast)]
    header, body = decode(ack.data)
    assert body == LocatorUpdate.acknowledge()
    assert (header.dst_locator, header.dst_nid, header.src_locator) == (L2, MN, L3)
    assert list(engine.neighbours[MN].locators) == [L2, L1]
    assert engine.neighbours[MN].hostname == ""
    empty = encode(SeedHeader(NH_LOCATOR_UPDATE, L1, MN, L3, CN), LocatorUpdate.advertise([]))
    engine.datagram(empty, L3, "fe80::1", 2.0)
    (ack,) = [a for a in engine.actions() if isinstance(a, Multicast)]
    assert decode(ack.data)[0].dst_locator == L1  # nothing advertised: back to the source
    engine.timer(2.0)
    assert MN not in engine.neighbours  # left with no locator: forgotten


# --- expiry ------------------------------------------------------------------------------------
def test_neighbours_and_routes_expire() -> None:
    link = seed_site()
    mn = link.nodes["mn"]
    link.muted.update({"cn", "r"})
    t0 = link.now
    link.advance(t0 + 11.0, step=0.25)
    assert CN in mn.neighbours  # 3 x wait = 12 s
    link.advance(t0 + 12.5, step=0.25)
    assert mn.neighbours == {}
    assert {log.nid for log in link.events("mn", "expired")} == {CN, R}
    link.advance(t0 + 31.0, step=0.5)
    assert mn.routes == {}


# --- drops -------------------------------------------------------------------------------------
def drop_engine(**kw: object) -> SeedNode:
    engine = node(CN, "cn", (L3,), ports=frozenset({7000}), **kw)
    engine.start(0.0)
    engine.own_addresses = {"fe80::2"}
    engine.actions()
    return engine


@pytest.mark.parametrize(("data", "arrival", "source", "reason"), [
    (b"short", L3, "fe80::1", "malformed_truncated"),
    (b"\x60" + bytes(39), L3, "fe80::1", "malformed_bad_version"),
    (encode(SeedHeader(NH_STP, L1, MN, L3, CN), Stp(1, 7000))[:-1], L3, "fe80::1",
     "malformed_truncated"),
    (encode(SeedHeader(NH_STP, L1, MN, L3, CN), Stp(1, 7000)), L2, "fe80::1", "not_joined"),
    (encode(SeedHeader(NH_STP, L1, MN, L3, CN), Stp(1, 7000)), L3, "fe80::2%to-sw",
     "own_address"),
    (encode(SeedHeader(NH_STP, L1, CN, L3, MN), Stp(1, 7000)), L3, "fe80::1", "own_nid"),
    (encode(SeedHeader(NH_STP, L1, MN, L3, R), Stp(1, 7000)), L3, "fe80::1", "not_mine"),
    (encode(SeedHeader(NH_STP, L1, MN, L3, CN), Stp(1, 7001)), L3, "fe80::1", "unbound_port"),
    (encode(SeedHeader(NH_LOCATOR_UPDATE, L1, MN, L3, CN), LocatorUpdate(True)), L3, "fe80::1",
     "unexpected_ack"),
    (encode(SeedHeader(NH_DISCOVERY, L1, MN, L3, CN), Discovery(MN, L1, True, "mn")), L3,
     "fe80::1", "discovery_not_all_nodes"),
    (encode(SeedHeader(NH_DISCOVERY, L1, MN, ALL_NODES, 0), Discovery(R, L1, True, "mn")), L3,
     "fe80::1", "discovery_nid_mismatch"),
    (SeedHeader(99, L1, MN, L3, CN).encode(0), L3, "fe80::1", "malformed_unknown_next_header"),
])
def test_every_drop_is_counted_by_reason(data: bytes, arrival: int, source: str,
                                         reason: str) -> None:
    engine = drop_engine()
    engine.datagram(data, arrival, source, 1.0)
    assert dict(engine.drops) == {reason: 1}
    assert engine.counters["received"] == 1
    assert [a for a in engine.actions() if isinstance(a, (Deliver, Multicast))] == []


@pytest.mark.parametrize(("header", "arrival", "reason"), [
    (SeedHeader(NH_STP, L1, MN, L1, CN), L1, "on_link"),  # cn heard it on L1 itself
    (SeedHeader(NH_STP, L1, MN, L3, CN, hop_limit=1), L1, "hop_limit"),
    (SeedHeader(NH_STP, L1, MN, 0x20010DB800000009, CN), L1, "no_route"),
])
def test_router_drops_are_counted(header: SeedHeader, arrival: int, reason: str) -> None:
    engine = node(R, "r", (L1, L2, L3), router=True)
    engine.start(0.0)
    engine.actions()
    engine.datagram(encode(header, Stp(1, 2)), arrival, "fe80::1", 1.0)
    assert dict(engine.drops) == {reason: 1}
    assert engine.counters["forwarded"] == 0


def test_router_forwards_by_backwards_learning() -> None:
    far = 0x20010DB800000009
    engine = node(R, "r", (L1, L2), router=True)
    engine.start(0.0)
    engine.actions()
    # something from locator `far` arrived on L2: far is behind L2 for 30 s
    engine.datagram(encode(SeedHeader(NH_STP, far, CN, L2, 0x7777), Stp(1, 2)), L2, "fe80::5",
                    1.0)
    engine.datagram(encode(SeedHeader(NH_STP, L1, MN, far, CN), Stp(1, 2)), L1, "fe80::1", 2.0)
    out = [a for a in engine.actions() if isinstance(a, Multicast)]
    assert [a.locator for a in out] == [L2]
    assert decode(out[0].data)[0].hop_limit == 2
    engine.timer(31.5)
    engine.datagram(encode(SeedHeader(NH_STP, L1, MN, far, CN), Stp(1, 2)), L1, "fe80::1", 31.5)
    assert engine.drops["no_route"] == 1


def test_router_does_not_flood_discovery_at_the_last_hop() -> None:
    engine = node(R, "r", (L1, L2), router=True)
    engine.start(0.0)
    engine.actions()
    advert = Discovery(MN, L1, False, "mn")
    engine.datagram(encode(SeedHeader(NH_DISCOVERY, L1, MN, ALL_NODES, 0, 1), advert), L1,
                    "fe80::1", 1.0)
    assert [a for a in engine.actions() if isinstance(a, Multicast)] == []
    assert engine.counters["not_flooded_hop_limit"] == 1
    engine.datagram(encode(SeedHeader(NH_DISCOVERY, L1, MN, ALL_NODES, 0, 2), advert), L1,
                    "fe80::1", 1.0)
    (flood,) = [a for a in engine.actions() if isinstance(a, Multicast)]
    assert flood.locator == L2 and decode(flood.data)[0].hop_limit == 1


@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow], max_examples=300)
@given(st.lists(st.binary(max_size=80), max_size=8), st.booleans())
def test_any_bytes_never_raise(datagrams: list[bytes], router: bool) -> None:
    engine = node(CN, "cn", (L1, L3), ports=frozenset({7000}), router=router)
    engine.start(0.0)
    for i, data in enumerate(datagrams):
        engine.datagram(data, L3, "fe80::1", float(i))
        engine.timer(float(i))
    engine.actions()
    assert engine.counters["received"] == len(datagrams)


# --- helpers and config ------------------------------------------------------------------------
def test_from_self() -> None:
    own = {"fe80::1", "2001:db8::1"}
    assert from_self("fe80::1%to-sw", own)
    assert from_self("2001:db8:0::1", own)
    assert not from_self("fe80::2", own)
    assert not from_self("garbage", own)
    assert not from_self("fe80::1", {"garbage"})


@pytest.mark.parametrize("kw", [
    {"nid": 0}, {"hostname": ""}, {"wait": 0}, {"hop_limit": 0}, {"locators": (1 << 64,)},
    {"handoff": -1},
])
def test_config_is_checked(kw: dict[str, object]) -> None:
    base: dict[str, object] = {"nid": MN, "hostname": "mn", "locators": (L1,)}
    with pytest.raises(ValueError):
        SeedConfig(**{**base, **kw})  # type: ignore[arg-type]


def test_status_is_plain_data() -> None:
    link = seed_site()
    status = link.nodes["mn"].status()
    assert status["locators"] == ["2001:db8:0:1"]
    assert status["neighbours"]["2222"]["hostname"] == "cn"  # type: ignore[index]
