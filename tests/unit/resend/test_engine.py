"""The ip_resend engine with a fake clock; packets built by scapy, checked by scapy."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.all import DNS, DNSQR, ICMP, IP, TCP, UDP, IPv6, Raw, raw
from scapy.layers.inet6 import ICMPv6EchoReply, ICMPv6EchoRequest

from ipshift.net.remap import Remap
from ipshift.resend.daemon import remap_of
from ipshift.resend.engine import (
    CheckFlows,
    CycleDone,
    LookupOrigin,
    MapFlow,
    Resend,
    ResendConfig,
    ResendEngine,
    UnmapFlow,
    WakeupError,
)
from ipshift.resend.flows import describe

OLD, NEW, DNS_SRV = "192.0.2.99", "203.0.113.100", "203.0.113.53"
OLD6, NEW6, DNS6 = "2001:db8:ffff::99", "2001:db8:100::10", "2001:db8:53::53"


def dns_query(name="www.example.test", qtype="A", sport=40000, src=OLD, dst=DNS_SRV, qid=1):
    ip = IP(src=src, dst=dst) if ":" not in src else IPv6(src=src, dst=dst)
    return raw(ip / UDP(sport=sport, dport=53) / DNS(id=qid, qd=DNSQR(qname=name, qtype=qtype)))


def dns_reply(sport=40000, dst=NEW, src=DNS_SRV, qid=1):
    ip = IP(src=src, dst=dst) if ":" not in src else IPv6(src=src, dst=dst)
    return raw(ip / UDP(sport=53, dport=sport) / DNS(id=qid, qr=1))


def syn(seq=1000, sport=50000, src=OLD, dst="198.51.100.80"):
    return raw(IP(src=src, dst=dst) / TCP(sport=sport, dport=22, flags="S", seq=seq))


def kinds(actions):
    return [type(a).__name__ for a in actions]


def assert_valid_rewrite(data, new_src, ttl):
    pkt = IP(data) if data[0] >> 4 == 4 else IPv6(data)
    assert pkt.src == new_src
    if data[0] >> 4 == 4:
        assert pkt.ttl == ttl
        fresh = IP(raw(pkt))
        del fresh.chksum
        fresh = IP(raw(fresh))
        assert fresh.chksum == pkt.chksum
    else:
        assert pkt.hlim == ttl
    layer = pkt.payload
    field = "chksum" if hasattr(layer, "chksum") else "cksum"  # ICMPv6 names it cksum
    original = getattr(layer, field)
    delattr(layer, field)
    rebuilt = (IP if data[0] >> 4 == 4 else IPv6)(raw(pkt))
    assert getattr(rebuilt.payload, field) == original


def test_dns_cycle_maps_before_resending_and_unmaps_after_linger():
    e = ResendEngine(ResendConfig(linger=1.0))
    e.packet_out(dns_query(), 0.0)
    assert e.state == "captured"
    assert kinds(e.actions()) == ["LookupOrigin"]
    assert e.next_timer() == 10.0  # -w default
    answer = e.wakeup(NEW, 1.0)
    assert answer == "resent 1 packet(s)"
    acts = e.actions()
    assert kinds(acts) == ["MapFlow", "Resend"]  # the map must exist before the reply can come
    m = acts[0].mapping
    assert (m.peer, m.peer_port, m.outer_addr, m.outer_port) == (DNS_SRV, 53, NEW, 40000)
    assert (m.inner_addr, m.inner_port, m.keep_inner_local) == (OLD, 40000, True)
    assert_valid_rewrite(acts[1].data, NEW, ttl=63)
    e.packet_in(dns_reply(), 1.1)
    assert e.state == "holding" and e.actions() == []
    e.handle_timer(e.next_timer())
    acts = e.actions()
    assert kinds(acts) == ["UnmapFlow", "CycleDone"]
    assert acts[0].mapping == m and not acts[1].rearm
    assert e.state == "done"


def test_parallel_a_aaaa_on_one_socket_are_both_resent_and_retransmissions_are_not():
    e = ResendEngine()
    e.packet_out(dns_query(qtype="A", qid=1), 0.0)
    e.packet_out(dns_query(qtype="AAAA", qid=2), 0.001)
    e.packet_out(dns_query(qtype="A", qid=1), 0.5)  # the resolver's retransmission
    assert e.counters.captured == 2 and e.counters.duplicates == 1
    e.actions()
    e.wakeup(NEW, 1.0)
    acts = e.actions()
    assert kinds(acts) == ["MapFlow", "Resend", "Resend"]  # one flow, two packets


def test_tcp_syn_retransmission_is_one_packet_and_mapping_lives_with_the_connection():
    e = ResendEngine(ResendConfig(linger=0.5, check_interval=2.0))
    e.packet_out(syn(), 0.0)
    e.packet_out(syn(), 1.0)  # same seq: retransmission
    assert e.counters.captured == 1
    e.actions()
    e.wakeup(NEW, 1.5)
    m = e.actions()[0].mapping
    synack = raw(IP(src="198.51.100.80", dst=NEW) / TCP(sport=22, dport=50000, flags="SA"))
    e.packet_in(synack, 1.6)
    e.handle_timer(2.1)  # linger over: a TCP mapping stays
    assert e.actions() == [] and e.state == "holding"
    e.handle_timer(3.5)  # liveness check
    acts = e.actions()
    assert acts == [CheckFlows((m,))]
    e.flows_gone([m], 4.0)
    assert kinds(e.actions()) == ["UnmapFlow", "CycleDone"]


def test_unchanged_address_resends_nothing():
    e = ResendEngine()
    e.packet_out(dns_query(src=NEW), 0.0)
    e.actions()
    assert "unchanged" in e.wakeup(NEW, 1.0)
    acts = e.actions()
    assert not any(isinstance(a, Resend | MapFlow) for a in acts)
    assert isinstance(acts[-1], CycleDone) and e.state == "done"


def test_wakeup_without_capture_and_out_of_sync_messages():
    e = ResendEngine()
    with pytest.raises(WakeupError):
        e.wakeup("garbage!", 0.0)
    with pytest.raises(WakeupError):
        e.wakeup("   ", 0.0)
    assert e.state == "armed" and e.counters.bad_messages == 2  # still waiting
    assert e.wakeup(NEW, 1.0) == "nothing captured"
    assert e.state == "done"
    p = ResendEngine(ResendConfig(persistent=True))
    assert p.wakeup(NEW, 1.0) == "nothing captured"
    assert p.state == "linkup"  # link is up: capture nothing until it goes down
    p.packet_out(dns_query(src=NEW), 2.0)
    assert p.counters.captured == 0
    p.address_lost(NEW, 3.0)
    assert p.state == "armed"
    p.packet_out(dns_query(), 4.0)
    assert p.state == "captured"


def test_wakeup_wait_expires():
    e = ResendEngine(ResendConfig(wakeup_wait=3.0, persistent=True))
    e.packet_out(dns_query(), 0.0)
    e.actions()
    e.handle_timer(3.0)
    acts = e.actions()
    assert acts == [CycleDone("no wakeup within the wait limit", True)]
    assert e.state == "armed"


def test_stop_and_term_messages():
    e = ResendEngine(ResendConfig(persistent=True))
    e.packet_out(dns_query(), 0.0)
    assert e.wakeup("stop", 1.0) == "stopped"
    assert e.state == "armed" and not e.terminate
    e.packet_out(dns_query(), 2.0)
    e.wakeup(NEW, 3.0)
    e.actions()
    assert e.wakeup("term", 4.0) == "terminating"
    acts = e.actions()
    assert kinds(acts) == ["UnmapFlow", "CycleDone"] and e.terminate and e.state == "done"


def test_r0_resends_only_and_R_watches_without_mapping():
    e = ResendEngine(ResendConfig(response_wait=0))
    e.packet_out(dns_query(), 0.0)
    e.actions()
    e.wakeup(NEW, 1.0)
    assert kinds(e.actions()) == ["Resend", "CycleDone"]
    w = ResendEngine(ResendConfig(translate=False))
    w.packet_out(dns_query(), 0.0)
    assert w.actions() == []  # no conntrack lookup either
    w.wakeup(NEW, 1.0)
    assert kinds(w.actions()) == ["Resend"]
    w.packet_in(dns_reply(), 1.2)
    assert kinds(w.actions()) == ["CycleDone"]


def test_unanswered_flow_is_unmapped_at_response_deadline():
    e = ResendEngine(ResendConfig(response_wait=5.0, linger=1.0))
    e.packet_out(dns_query(), 0.0)
    e.actions()
    e.wakeup(NEW, 1.0)
    e.actions()
    e.handle_timer(6.0)
    assert kinds(e.actions()) == ["UnmapFlow", "CycleDone"]


def test_masqueraded_flow_maps_to_the_lan_host():
    e = ResendEngine()
    e.packet_out(dns_query(sport=61000), 0.0)
    (lookup,) = e.actions()
    assert isinstance(lookup, LookupOrigin)
    e.origin_found(lookup.flow, "198.51.100.20", 45000)
    e.wakeup(NEW, 1.0)
    m = e.actions()[0].mapping
    assert (m.inner_addr, m.inner_port, m.keep_inner_local) == ("198.51.100.20", 45000, False)
    assert (m.outer_addr, m.outer_port) == (NEW, 61000)
    # replies to the new address and the masqueraded port go to the LAN host's own
    assert remap_of(m) == Remap("udp", "198.51.100.20", 45000, m.peer, m.peer_port,
                                new_local=NEW, new_local_port=61000)


def test_ipv6_and_mixed_wakeup():
    e = ResendEngine()
    e.packet_out(dns_query(src=OLD6, dst=DNS6), 0.0)
    ping = raw(IPv6(src=OLD6, dst=DNS6) / ICMPv6EchoRequest(id=7, seq=1))
    e.packet_out(ping, 0.0)
    e.packet_out(dns_query(), 0.0)
    e.actions()
    answer = e.wakeup(f"{NEW} {NEW6}", 1.0)
    assert answer == "resent 3 packet(s)"
    acts = e.actions()
    resends = [a for a in acts if isinstance(a, Resend)]
    for r in resends:
        assert_valid_rewrite(r.data, NEW6 if r.version == 6 else NEW, ttl=63)
    maps = [a.mapping for a in acts if isinstance(a, MapFlow)]
    icmp = next(m for m in maps if m.proto == 58)
    assert remap_of(icmp) == Remap("icmp", OLD6, 7, DNS6, new_local=NEW6, new_local_port=7)
    reply = raw(IPv6(src=DNS6, dst=NEW6) / ICMPv6EchoReply(id=7, seq=1))
    e.packet_in(reply, 1.1)
    assert e.counters.replies == 1


def test_v6_only_wakeup_skips_v4_packets():
    e = ResendEngine()
    e.packet_out(dns_query(), 0.0)
    e.actions()
    assert "1 skipped" in e.wakeup(NEW6, 1.0)


def test_capture_is_bounded():
    e = ResendEngine(ResendConfig(max_packets=3))
    for port in range(10):
        e.packet_out(dns_query(sport=40000 + port), 0.0)
    assert e.counters.captured == 3 and e.counters.overflow == 7


def test_describe_ignores_what_is_not_resent():
    assert describe(raw(IP(src=OLD, dst=DNS_SRV) / ICMP(type=0)), outgoing=True) is None
    frag = raw(IP(src=OLD, dst=DNS_SRV, frag=10, proto=17) / Raw(b"x" * 16))
    assert describe(frag, outgoing=True) is None
    assert describe(b"\x45\x00", outgoing=True) == "truncated"


@settings(max_examples=1000, deadline=None)
@given(st.binary(max_size=120), st.booleans())
def test_garbage_packets_never_raise(data, out):
    e = ResendEngine()
    e.packet_out(dns_query(), 0.0)
    e.wakeup(NEW, 0.5)
    e.actions()
    if out:
        e2 = ResendEngine()
        e2.packet_out(data, 0.0)
    else:
        e.packet_in(data, 1.0)


EVENTS = st.lists(
    st.tuples(
        st.sampled_from(["query", "syn", "reply", "synack", "wakeup", "stop", "timer", "gone",
                         "lost", "garbage"]),
        st.floats(min_value=0, max_value=3),
    ),
    max_size=30,
)


@settings(max_examples=300, deadline=None)
@given(EVENTS, st.booleans())
def test_every_mapping_is_removed_when_a_cycle_ends(events, persistent):
    e = ResendEngine(ResendConfig(persistent=persistent, wakeup_wait=2, response_wait=2,
                                  linger=0.5, check_interval=1))
    now, live = 0.0, set()
    for kind, dt in events:
        now += dt
        if kind == "query":
            e.packet_out(dns_query(sport=40000 + int(dt * 10)), now)
        elif kind == "syn":
            e.packet_out(syn(seq=int(dt * 100)), now)
        elif kind == "reply":
            e.packet_in(dns_reply(sport=40000 + int(dt * 10)), now)
        elif kind == "synack":
            e.packet_in(raw(IP(src="198.51.100.80", dst=NEW) / TCP(sport=22, dport=50000,
                                                                    flags="SA")), now)
        elif kind == "wakeup":
            e.wakeup(NEW, now)
        elif kind == "stop":
            e.wakeup("stop", now)
        elif kind == "timer" and e.next_timer() is not None:
            now = max(now, e.next_timer())
            e.handle_timer(now)
        elif kind == "gone":
            e.flows_gone(list(live), now)
        elif kind == "lost":
            e.address_lost(NEW, now)
        elif kind == "garbage":
            with pytest.raises(WakeupError):
                e.wakeup("not an address", now)
        for a in e.actions():
            if isinstance(a, MapFlow):
                assert a.mapping not in live
                live.add(a.mapping)
            elif isinstance(a, UnmapFlow):
                live.remove(a.mapping)
            elif isinstance(a, CycleDone):
                assert not live  # a finished cycle leaves no mapping behind
        if e.state in ("armed", "captured", "linkup", "done"):
            assert not live


def test_packets_a_resend_cannot_help_are_not_captured():
    """TTL 1 (the resent copy would leave with 0), fragments (one fragment cannot be
    reassembled), link-scoped and multicast destinations (no reply comes to the new address)."""
    e = ResendEngine()
    e.packet_out(raw(IP(src=OLD, dst=DNS_SRV, ttl=1) / UDP(sport=33434, dport=33434)), 0.0)
    e.packet_out(raw(IP(src=OLD, dst=DNS_SRV, ttl=0) / UDP(sport=33435, dport=33434)), 0.0)
    first_fragment = raw(IP(src=OLD, dst=DNS_SRV, flags="MF") / UDP(sport=5, dport=6) / Raw(
        b"x" * 64))
    e.packet_out(first_fragment, 0.0)
    solicit = raw(IPv6(src=OLD6, dst="ff02::1:2", hlim=1) / UDP(sport=546, dport=547))
    e.packet_out(solicit, 0.0)
    e.packet_out(raw(IPv6(src=OLD6, dst="ff05::1:3") / UDP(sport=546, dport=547)), 0.0)
    e.packet_out(raw(IP(src=OLD, dst="169.254.1.1") / UDP(sport=7, dport=7)), 0.0)
    assert e.state == "armed" and e.counters.captured == 0 and e.counters.ignored == 6
    e.packet_out(raw(IP(src=OLD, dst=DNS_SRV, ttl=2) / UDP(sport=33436, dport=33434)), 0.0)
    assert e.counters.captured == 1
    e.actions()
    e.wakeup(NEW, 1.0)
    (resend,) = [a for a in e.actions() if isinstance(a, Resend)]
    assert IP(resend.data).ttl == 1


def test_link_padding_is_not_resent():
    packet = dns_query()
    e = ResendEngine()
    e.packet_out(packet + bytes(6), 0.0)  # Ethernet pads short frames
    e.actions()
    e.wakeup(NEW, 1.0)
    (resend,) = [a for a in e.actions() if isinstance(a, Resend)]
    assert len(resend.data) == len(packet)
    assert_valid_rewrite(resend.data, NEW, ttl=63)


def test_one_busy_flow_does_not_keep_the_others_mapped():
    """Each UDP/ICMP mapping lingers after its own last reply: a TCP download started while
    dialing does not keep the DNS mapping alive."""
    e = ResendEngine(ResendConfig(linger=1.0, check_interval=1000.0))
    e.packet_out(dns_query(), 0.0)
    e.packet_out(syn(), 0.0)
    e.actions()
    e.wakeup(NEW, 1.0)
    maps = {a.mapping.proto: a.mapping for a in e.actions() if isinstance(a, MapFlow)}
    e.packet_in(dns_reply(), 1.1)
    data = raw(IP(src="198.51.100.80", dst=NEW) / TCP(sport=22, dport=50000, flags="A"))
    e.packet_in(data, 1.2)
    assert e.state == "holding" and e.wants_replies
    unmapped = []
    now = 1.2
    while now < 60.0:  # a segment every 0.5 s for a minute
        now += 0.5
        e.packet_in(data, now)
        timer = e.next_timer()
        if timer is not None and timer <= now:
            e.handle_timer(now)
        unmapped += [a.mapping for a in e.actions() if isinstance(a, UnmapFlow)]
    assert unmapped == [maps[17]]  # the DNS mapping ended 1 s after its reply; TCP stays
    assert not e.wants_replies  # only TCP is left: followed in conntrack, not by reading


def test_a_udp_flow_that_keeps_talking_keeps_its_mapping():
    e = ResendEngine(ResendConfig(linger=1.0, check_interval=1000.0))
    e.packet_out(dns_query(), 0.0)
    e.actions()
    e.wakeup(NEW, 1.0)
    e.actions()
    for step in range(1, 6):
        e.packet_in(dns_reply(), 1.0 + step * 0.8)
        e.handle_timer(1.0 + step * 0.8)
    assert e.state == "holding" and not any(isinstance(a, UnmapFlow) for a in e.actions())
    e.handle_timer(e.next_timer())
    assert kinds(e.actions()) == ["UnmapFlow", "CycleDone"]


def test_a_routed_source_is_neither_resent_nor_mapped():
    e = ResendEngine()
    e.packet_out(dns_query(src="198.51.100.20"), 0.0)  # a routed LAN host, not masqueraded
    (lookup,) = e.actions()
    e.foreign_source(lookup.flow)
    assert e.state == "armed" and e.counters.ignored == 1
    e.packet_out(dns_query(src="198.51.100.20", qid=2), 0.1)  # the same flow again
    assert e.state == "armed" and e.counters.captured == 1
    e.packet_out(dns_query(), 0.2)  # this host's own
    e.actions()
    e.wakeup(NEW, 1.0)
    maps = [a.mapping for a in e.actions() if isinstance(a, MapFlow)]
    assert [(m.inner_addr, m.keep_inner_local) for m in maps] == [(OLD, True)]


@pytest.mark.parametrize("message", [
    "0.0.0.0", "::", "224.0.0.1", "127.0.0.2", "fe80::1", "fe80::1%ppp0", "169.254.0.9",
    "203.0.113.7 198.51.100.9",
])
def test_wakeup_refuses_addresses_that_cannot_be_the_new_one(message):
    e = ResendEngine()
    e.packet_out(dns_query(), 0.0)
    e.actions()
    with pytest.raises(WakeupError, match="still waiting"):
        e.wakeup(message, 1.0)
    assert e.state == "captured" and e.counters.bad_messages == 1
    assert e.wakeup(f"{NEW} {NEW6}", 1.5).startswith("resent 1")


def test_a_remapped_echo_identifier_is_restored():
    e = ResendEngine()
    e.packet_out(raw(IP(src=OLD, dst=DNS_SRV) / ICMP(id=1001, seq=1)), 0.0)
    (lookup,) = e.actions()
    e.origin_found(lookup.flow, "198.51.100.20", 7)  # masquerading changed id 7 to 1001
    e.wakeup(NEW, 1.0)
    (m,) = [a.mapping for a in e.actions() if isinstance(a, MapFlow)]
    assert remap_of(m) == Remap("icmp", "198.51.100.20", 7, DNS_SRV, new_local=NEW,
                                new_local_port=1001)


@pytest.mark.parametrize("message", ["2001:db8:50::77%eth0", f"{NEW} 2001:db8:50::77%1"])
def test_a_wakeup_address_with_a_zone_is_refused(message):
    """It used to be accepted and then fail inside nftables: the link's global address has
    no zone."""
    e = ResendEngine()
    e.packet_out(dns_query(), 0.0)
    e.actions()
    with pytest.raises(WakeupError, match="without it; still waiting") as info:
        e.wakeup(message, 1.0)
    assert "\n" not in str(info.value) and "2001:db8:50::77%" in str(info.value)
    assert e.counters.bad_messages == 1 and e.state == "captured"
    assert not [a for a in e.actions() if isinstance(a, MapFlow | Resend)]
    assert e.wakeup(f"{NEW} 2001:db8:50::77", 1.5).startswith("resent 1")  # without zones


WAKEUP_WORDS = st.sampled_from(["203.0.113.100", "2001:db8:100::10", "fe80::1", "%eth0", "%",
                                ",", " ", "stop", "term", "::", "0.0.0.0", "1", "\x00", "\u00e9",
                                "2001:db8::1%", "::ffff:203.0.113.9"])


@settings(max_examples=400, deadline=None)
@given(st.lists(WAKEUP_WORDS | st.text(max_size=8), max_size=8))
def test_wakeup_fuzz_only_typed_errors(words):
    """Whatever ip_resend_wakeup sends: an answer, or one WakeupError line."""
    e = ResendEngine()
    e.packet_out(dns_query(), 0.0)
    e.actions()
    try:
        answer = e.wakeup("".join(words), 1.0)
    except WakeupError as exc:
        assert str(exc).endswith("still waiting")
    else:
        assert isinstance(answer, str)
    for action in e.actions():
        if isinstance(action, MapFlow):
            assert "%" not in action.mapping.outer_addr


def test_a_reply_while_captured_means_the_link_was_already_up():
    # started while the link is up: ordinary traffic is captured, then its reply comes
    e = ResendEngine(ResendConfig(persistent=False))
    e.present = {NEW}
    e.packet_out(dns_query(src=NEW), 0.0)
    assert e.state == "captured"
    e.packet_in(dns_reply(dst=NEW), 0.05)
    assert e.state == "linkup" and e.link_addresses == {NEW}
    assert not any(isinstance(a, Resend | MapFlow | CycleDone) for a in e.actions())
    e.handle_timer(20.0)  # the wakeup limit means nothing now
    assert e.state == "linkup"
    e.packet_out(dns_query(src=NEW, sport=40001), 21.0)
    assert e.counters.captured == 1  # nothing more captured while up
    # the link goes down (its address leaves): the next dial is captured and resent
    e.present = {OLD}
    e.address_lost(NEW, 30.0)
    assert e.state == "armed"
    e.packet_out(dns_query(), 31.0)
    assert e.state == "captured"
    e.present = {NEW}
    assert "resent" in e.wakeup(NEW, 32.0)


def test_a_stale_reply_during_a_dial_does_not_count_as_the_link_up():
    # the placeholder is gone when a reply to it could come back: still a dial
    e = ResendEngine()
    e.present = {OLD}
    e.packet_out(dns_query(), 0.0)
    e.present = {NEW}  # IPCP replaced the placeholder
    e.packet_in(dns_reply(dst=OLD), 1.0)
    assert e.state == "captured"
    assert "resent" in e.wakeup(NEW, 1.1)


def test_a_later_one_shot_start_hands_the_next_dial_to_the_running_instance():
    e = ResendEngine()
    e.present = {OLD}
    e.packet_out(syn(), 0.0)
    e.present = {NEW}
    assert "resent" in e.wakeup(NEW, 1.0)
    e.packet_in(raw(IP(src="198.51.100.80", dst=NEW) / TCP(sport=22, dport=50000,
                                                            flags="SA")), 1.1)
    assert e.state == "holding"  # the TCP mapping lives with its connection
    assert "takes over" in e.take_over_next_dial()
    e.address_lost(NEW, 5.0)  # the link goes down: the cycle ends, and it arms again
    assert e.state == "armed" and not e.handover
    e.packet_out(dns_query(), 6.0)
    assert e.state == "captured"
    assert "resent" in e.wakeup("203.0.113.101", 7.0)
    assert e.take_over_next_dial().startswith("takes over")
    p = ResendEngine(ResendConfig(persistent=True))
    assert "persistently" in p.take_over_next_dial()
    assert ResendEngine().take_over_next_dial() == "is armed for the next dial"


def test_a_packet_the_link_resent_itself_is_not_resent_again_and_its_reply_delivered():
    # pppd >= 2.4.5 (demand_rexmit): the queued query leaves again with the new source
    # (unseen by the interface's taps) before ip-up runs the wakeup; its reply is seen
    e = ResendEngine()
    e.present = {OLD}
    e.packet_out(dns_query(), 0.0)
    e.packet_out(dns_query(sport=40001, qid=2), 0.0)
    e.actions()
    e.present = {NEW}
    e.packet_in(dns_reply(dst=NEW), 1.01)  # the answer to pppd's copy of the first
    acts = e.actions()
    assert kinds(acts) == ["MapFlow", "Reinject"] and e.counters.sent_by_link == 1
    assert acts[0].mapping.outer_addr == NEW and acts[0].mapping.inner_addr == OLD
    delivered = IP(acts[1].data)
    assert (delivered.dst, delivered[UDP].dport) == (OLD, 40000)
    fresh = delivered.copy()
    del fresh[UDP].chksum
    assert IP(raw(fresh))[UDP].chksum == delivered[UDP].chksum  # checksum updated
    assert e.state == "captured"  # not taken for the link being up
    answer = e.wakeup(NEW, 1.5)
    assert answer == ("resent 1 packet(s), 1 already resent by the link (pppd), "
                      "replies mapped")
    acts = e.actions()
    assert kinds(acts).count("Resend") == 1 and kinds(acts).count("MapFlow") == 1
    # TCP is resent anyway: the kernel reset the server's half of the first handshake
    t = ResendEngine()
    t.present = {NEW}
    t.packet_out(syn(), 0.0)
    t.packet_in(raw(IP(src="198.51.100.80", dst=NEW) / TCP(sport=22, dport=50000,
                                                            flags="SA")), 1.0)
    assert t.counters.sent_by_link == 0 and "resent 1" in t.wakeup(NEW, 1.5)
