"""Conntrack filters (pure): validation, matching, and the refusal to flush everything."""

import itertools
import socket
import struct
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ipshift.net import nlmsg
from ipshift.net.conntrack import (
    CTA_FILTER,
    CTA_ID,
    CTA_MARK,
    CTA_PROTOINFO,
    CTA_PROTOINFO_TCP,
    CTA_PROTOINFO_TCP_STATE,
    CTA_STATUS,
    CTA_TIMEOUT,
    CTA_TUPLE_ORIG,
    CTA_TUPLE_REPLY,
    CTA_ZONE,
    IPS_ASSURED,
    IPS_SRC_NAT,
    MSG_CT_DELETE,
    MSG_CT_GET,
    NLM_F_ACK,
    NLM_F_DUMP,
    NLM_F_REQUEST,
    Conntrack,
    ConntrackEntry,
    ConntrackFilter,
    FlowTuple,
    _attrs,
    _nla,
    _tuple_attrs,
    build_delete_request,
    build_dump_request,
    parse_messages,
    parse_tuple,
)
from ipshift.net.errors import NetError, ParseError


def _entry(reply_dst="198.51.100.254", sport=5000):
    return ConntrackEntry(
        orig=FlowTuple("192.0.2.1", "203.0.113.9", socket.IPPROTO_UDP, sport, 53),
        reply=FlowTuple("203.0.113.9", reply_dst, socket.IPPROTO_UDP, 53, sport),
        status=IPS_ASSURED | IPS_SRC_NAT,
        mark=7,
    )


def test_match_on_reply_destination_only():
    f = ConntrackFilter(reply_dst="198.51.100.254")
    assert f.matches(_entry())
    assert not f.matches(_entry(reply_dst="203.0.113.254"))
    assert f.effective_family == socket.AF_INET


def test_all_given_fields_must_match():
    f = ConntrackFilter(proto=socket.IPPROTO_UDP, orig_sport=5000, mark=7)
    assert f.matches(_entry())
    assert not f.matches(_entry(sport=5001))
    assert not ConntrackFilter(proto=socket.IPPROTO_TCP).matches(_entry())


def test_addresses_are_normalised_and_validated():
    assert ConntrackFilter(reply_dst="2001:db8:0::1").reply_dst == "2001:db8::1"
    with pytest.raises(ValueError, match="reply_dst"):
        ConntrackFilter(reply_dst="not-an-address")
    with pytest.raises(ValueError, match="mixes"):
        ConntrackFilter(orig_src="192.0.2.1", reply_dst="2001:db8::1")


def test_empty_filter_is_detected():
    assert ConntrackFilter().empty
    assert not ConntrackFilter(mark=0).empty


def test_entry_properties():
    e = _entry()
    assert e.assured and e.snat and not e.dnat and not e.seen_reply
    assert e.family == socket.AF_INET and e.proto == socket.IPPROTO_UDP


# --- ctnetlink wire format ---------------------------------------------------------------


def _wire(entry, seq=1, tcp_state=None):
    """An IPCTNL_MSG_CT_NEW message as the kernel sends it."""

    def tup(t):
        icmp = (t.icmp_id, t.icmp_type, t.icmp_code)
        return _tuple_attrs(t.family, t.src, t.dst, t.proto, t.sport, t.dport, icmp)

    attrs = _nla(CTA_TUPLE_ORIG, tup(entry.orig), True) + _nla(CTA_TUPLE_REPLY, tup(entry.reply),
                                                               True)
    attrs += _nla(CTA_STATUS, struct.pack("!I", entry.status))
    attrs += _nla(CTA_TIMEOUT, struct.pack("!I", entry.timeout or 0))
    attrs += _nla(CTA_MARK, struct.pack("!I", entry.mark))
    attrs += _nla(CTA_ID, struct.pack("!I", entry.id or 0))
    if entry.zone is not None:
        attrs += _nla(CTA_ZONE, struct.pack("!H", entry.zone))
    if tcp_state is not None:
        attrs += _nla(CTA_PROTOINFO, _nla(CTA_PROTOINFO_TCP, _nla(CTA_PROTOINFO_TCP_STATE,
                                                                  bytes([tcp_state])), True), True)
    body = struct.pack("=BBH", entry.family, 0, 0) + attrs
    return struct.pack("=IHHII", 16 + len(body), 0x100, 2, seq, 0) + body


def _done(seq=1):
    return struct.pack("=IHHIIi", 20, 3, 2, seq, 0, 0)


def _ack(seq, err=0):
    return struct.pack("=IHHIIi", 36, 2, 0, seq, 0, -err) + bytes(16)


ENTRIES = [
    ConntrackEntry(
        FlowTuple("192.0.2.1", "203.0.113.9", 17, 5000, 53),
        FlowTuple("203.0.113.9", "198.51.100.254", 17, 53, 5000),
        status=IPS_ASSURED | IPS_SRC_NAT, timeout=30, mark=7, id=99, zone=3),
    ConntrackEntry(
        FlowTuple("2001:db8:1::1", "2001:db8:2::1", 6, 40000, 443),
        FlowTuple("2001:db8:2::1", "2001:db8:2::ff", 6, 443, 40000),
        status=IPS_ASSURED, timeout=100, id=5, tcp_state="ESTABLISHED"),
    ConntrackEntry(
        FlowTuple("192.0.2.1", "198.51.100.1", 1, icmp_id=77, icmp_type=8, icmp_code=0),
        FlowTuple("198.51.100.1", "192.0.2.1", 1, icmp_id=77, icmp_type=0, icmp_code=0),
        timeout=29, id=6),
    ConntrackEntry(
        FlowTuple("2001:db8:1::1", "2001:db8:2::1", 58, icmp_id=9, icmp_type=128, icmp_code=0),
        FlowTuple("2001:db8:2::1", "2001:db8:1::1", 58, icmp_id=9, icmp_type=129, icmp_code=0),
        timeout=29, id=7),
]


@pytest.mark.parametrize("entry", ENTRIES)
def test_entry_round_trip(entry):
    state = 3 if entry.tcp_state else None
    reply = parse_messages(_wire(entry, tcp_state=state) + _done())
    assert reply.done and reply.entries == [entry]


def test_dump_request_v4_filter_goes_to_the_kernel_v6_does_not():
    req = build_dump_request(ConntrackFilter(reply_dst="198.51.100.254", proto=17), seq=3)
    length, mtype, flags, seq, _ = struct.unpack_from("=IHHII", req)
    assert (length, mtype, flags, seq) == (len(req), MSG_CT_GET, NLM_F_REQUEST | NLM_F_DUMP, 3)
    assert req[16] == socket.AF_INET
    attrs = _attrs(req[20:], "test")
    assert CTA_TUPLE_REPLY in attrs and CTA_FILTER in attrs
    req6 = build_dump_request(ConntrackFilter(reply_dst="2001:db8::1"))
    assert req6[16] == socket.AF_INET6 and _attrs(req6[20:], "test") == {}
    req_all = build_dump_request(ConntrackFilter())
    assert req_all[16] == 0 and len(req_all) == 20
    req_mark = build_dump_request(ConntrackFilter(mark=5))
    assert CTA_MARK in _attrs(req_mark[20:], "test")


def test_delete_request_names_tuple_id_and_zone():
    req = build_delete_request(ENTRIES[0], seq=8)
    _, mtype, flags, seq, _ = struct.unpack_from("=IHHII", req)
    assert (mtype, flags, seq) == (MSG_CT_DELETE, NLM_F_REQUEST | NLM_F_ACK, 8)
    attrs = _attrs(req[20:], "test")
    assert struct.unpack("!I", attrs[CTA_ID])[0] == 99
    assert struct.unpack("!H", attrs[CTA_ZONE])[0] == 3
    # the original tuple parses back to what was asked for
    assert parse_tuple(attrs[CTA_TUPLE_ORIG]) == ENTRIES[0].orig


def test_acks_and_errors_by_sequence():
    reply = parse_messages(_ack(1) + _ack(2, 2) + _ack(3, 1))
    assert reply.acks == {1: 0, 2: 2, 3: 1} and not reply.entries


@pytest.mark.parametrize("data", [
    b"\x00", struct.pack("=IHHII", 4, 0x100, 0, 1, 0),
    struct.pack("=IHHII", 60, 0x100, 0, 1, 0),
    struct.pack("=IHHII", 18, 0x100, 0, 1, 0) + b"\x02\x00",
    struct.pack("=IHHII", 20, 0x100, 0, 1, 0) + bytes(4),  # no tuples
    struct.pack("=IHHII", 16, 2, 0, 1, 0),
])
def test_malformed_raises_parse_error(data):
    with pytest.raises(ParseError):
        parse_messages(data)


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=400))
def test_fuzz_random_bytes(data):
    try:
        parse_messages(data)
    except ParseError:
        pass


@settings(max_examples=400, deadline=None)
@given(st.data())
def test_fuzz_mutated_real_messages(data):
    blob = bytearray(b"".join(_wire(e, tcp_state=3) for e in ENTRIES) + _done())
    for _ in range(data.draw(st.integers(1, 6))):
        blob[data.draw(st.integers(0, len(blob) - 1))] = data.draw(st.integers(0, 255))
    try:
        reply = parse_messages(bytes(blob[: data.draw(st.integers(0, len(blob)))]))
    except ParseError:
        return
    assert all(isinstance(e, ConntrackEntry) for e in reply.entries)


def test_zone_0_is_the_default_zone_the_kernel_leaves_out():
    assert _entry().zone is None
    assert ConntrackFilter(zone=0).matches(_entry())
    assert not ConntrackFilter(zone=5).matches(_entry())


class _LateKernel:
    """ctnetlink whose answer to the first dump comes late: its tail is still queued when the
    caller, after a timeout, asks again."""

    def __init__(self) -> None:
        self.queue: list[bytes | Exception] = []
        self.requests = 0

    @staticmethod
    def _entry(seq: int, sport: int) -> bytes:
        orig = _tuple_attrs(socket.AF_INET, "192.0.2.1", "198.51.100.1", 17, sport, 53)
        reply = _tuple_attrs(socket.AF_INET, "198.51.100.1", "192.0.2.1", 17, 53, sport)
        body = struct.pack("!BBH", 2, 0, 0) + _nla(CTA_TUPLE_ORIG, orig, True) + _nla(
            CTA_TUPLE_REPLY, reply, True)
        return nlmsg.message(MSG_CT_GET & 0xFF00, 2, seq, body)

    def send(self, data: bytes) -> None:
        self.requests += 1
        seq = nlmsg.HEADER.unpack_from(data)[3]
        done = nlmsg.message(nlmsg.NLMSG_DONE, 2, seq, bytes(4))
        if self.requests == 1:
            self.queue += [self._entry(seq, 1000), TimeoutError(),
                           self._entry(seq, 1001) + done]
        else:
            self.queue += [b"".join(self._entry(seq, port) for port in (2000, 2001)) + done]

    def recv(self, size: int) -> bytes:
        item = self.queue.pop(0)
        if isinstance(item, Exception):
            raise item
        return item


def test_a_late_tail_of_an_earlier_dump_is_not_taken_for_the_answer():
    ct = Conntrack.__new__(Conntrack)  # the adapter around a fake kernel socket
    ct.netns = None
    ct._seq = itertools.count(1)
    ct._lock = threading.Lock()
    ct._sock = _LateKernel()  # type: ignore[assignment]
    with pytest.raises(NetError):
        ct.entries(orig_dst="198.51.100.1")
    assert [e.orig.sport for e in ct.entries(orig_dst="198.51.100.1")] == [2000, 2001]


def test_ipv6_addresses_are_spelled_like_the_filters():
    """inet_ntop writes ::1:2 as ::0.1.0.2; a filter for ::1:2 must still match."""
    orig = _tuple_attrs(socket.AF_INET6, "::1:2", "2001:db8::1", 17, 1000, 53)
    tup = parse_tuple(orig)
    assert tup.src == "::1:2"
    assert ConntrackFilter(orig_src="::1:2").matches(
        ConntrackEntry(orig=tup, reply=tup))
