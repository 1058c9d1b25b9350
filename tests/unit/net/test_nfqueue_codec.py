"""nfnetlink_queue codec: layouts checked against hand-packed bytes of the kernel header's
structs, build -> parse round trips, the verdict planner against a model of the kernel's queue,
and fuzzing (arbitrary and mutated bytes raise only NfQueueParseError)."""

import itertools
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ipshift.net import nlmsg
from ipshift.net.errors import NetError, ParseError
from ipshift.net.nfqueue_codec import (
    MAX_PAYLOAD,
    NF_ACCEPT,
    NF_DROP,
    NF_REPEAT,
    NFQA_CFG_F_FAIL_OPEN,
    NFQA_CFG_F_GSO,
    NFQA_SKB_CSUMNOTREADY,
    NFQA_SKB_GSO,
    NFQNL_CFG_CMD_BIND,
    NFQNL_CFG_CMD_UNBIND,
    NFQNL_COPY_PACKET,
    NFQNL_MSG_VERDICT,
    NetlinkAck,
    NfQueueError,
    NfQueueParseError,
    PendingVerdict,
    QueueConfig,
    QueuedPacket,
    Verdict,
    build_config,
    build_packet_message,
    build_verdict,
    parse_config,
    parse_datagram,
    parse_packet_message,
    parse_requests,
    parse_verdict,
    plan_verdicts,
)

# Independent packing of <linux/netfilter/nfnetlink_queue.h>: nlmsghdr is host order, nfgenmsg
# res_id and every attribute value network order, attributes padded to 4 bytes.


def _nla(kind, value):
    size = 4 + len(value)
    return struct.pack("=HH", size, kind) + value + b"\0" * (-size % 4)


def _msg(msg_type, flags, seq, family, res_id, attrs):
    body = struct.pack("!BBH", family, 0, res_id) + attrs
    return struct.pack("=IHHII", 16 + len(body), msg_type, flags, seq, 0) + body


IP_PACKET = bytes.fromhex("4500001c0001000040110000c0000201c6336401") + bytes(8)


def test_bind_config_layout():
    data = build_config(QueueConfig(7, command=NFQNL_CFG_CMD_BIND, copy_mode=NFQNL_COPY_PACKET,
                                    copy_range=0xFFFF, maxlen=2048,
                                    flags=NFQA_CFG_F_FAIL_OPEN | NFQA_CFG_F_GSO,
                                    mask=NFQA_CFG_F_FAIL_OPEN | NFQA_CFG_F_GSO), seq=9)
    expected = _msg(
        3 << 8 | 2, 0x5, 9, 0, 7,
        _nla(1, bytes([1, 0, 0, 0]))                      # NFQA_CFG_CMD: bind, pf 0
        + _nla(2, struct.pack("!IB", 0xFFFF, 2))          # NFQA_CFG_PARAMS: packed, 5 bytes
        + _nla(3, struct.pack("!I", 2048))                # NFQA_CFG_QUEUE_MAXLEN
        + _nla(4, struct.pack("!I", 5))                   # NFQA_CFG_MASK
        + _nla(5, struct.pack("!I", 5)),                  # NFQA_CFG_FLAGS
    )
    assert data == expected
    (cfg,) = parse_requests(data)
    assert cfg == QueueConfig(7, command=1, copy_mode=2, copy_range=0xFFFF, maxlen=2048,
                              flags=5, mask=5)


def test_unbind_and_no_ack():
    data = build_config(QueueConfig(300, command=NFQNL_CFG_CMD_UNBIND), seq=1, ack=False)
    assert data == _msg(3 << 8 | 2, 0x1, 1, 0, 300, _nla(1, bytes([2, 0, 0, 0])))
    assert parse_requests(data) == [QueueConfig(300, command=2)]


def test_verdict_layouts():
    v = build_verdict(Verdict(7, 42, NF_ACCEPT, mark=0x10, payload=IP_PACKET), seq=3)
    assert v == _msg(3 << 8 | 1, 0x1, 3, 0, 7,
                     _nla(2, struct.pack("!II", 1, 42)) + _nla(3, struct.pack("!I", 0x10))
                     + _nla(10, IP_PACKET))
    batch = build_verdict(Verdict(7, 99, NF_ACCEPT, batch=True), seq=4)
    assert batch == _msg(3 << 8 | 3, 0x1, 4, 0, 7, _nla(2, struct.pack("!II", 1, 99)))
    assert parse_requests(v + batch) == [
        Verdict(7, 42, NF_ACCEPT, mark=0x10, payload=IP_PACKET),
        Verdict(7, 99, NF_ACCEPT, batch=True),
    ]


def test_kernel_packet_message_parses():
    attrs = (
        _nla(1, struct.pack("!IHB", 5, 0x0800, 3))        # packet header: 7 bytes, padded
        + _nla(6, struct.pack("!I", 2))                   # outdev
        + _nla(3, struct.pack("!I", 0xABC))               # mark
        + _nla(9, struct.pack("!H2x8s", 6, b"\x02\0\0\0\0\x01"))   # hwaddr
        + _nla(4, struct.pack("!QQ", 1700000000, 250))    # timestamp
        + _nla(14, struct.pack("!I", NFQA_SKB_CSUMNOTREADY | NFQA_SKB_GSO))
        + _nla(10, IP_PACKET[:20])                        # payload, cut to the copy range
        + _nla(13, struct.pack("!I", len(IP_PACKET)))     # cap len: the real length
        + _nla(11, _nla(1, b"\0\0\0\0"))                  # conntrack: ignored
    )
    data = _msg(3 << 8 | 0, 0, 0, 2, 7, attrs)
    (packet,) = parse_datagram(data)
    assert packet == QueuedPacket(
        queue_num=7, packet_id=5, hw_protocol=0x0800, hook=3, payload=IP_PACKET[:20],
        family=2, mark=0xABC, outdev=2, hwaddr=b"\x02\0\0\0\0\x01",
        timestamp=(1700000000, 250), cap_len=len(IP_PACKET),
        skb_info=NFQA_SKB_CSUMNOTREADY | NFQA_SKB_GSO)
    assert packet.truncated and packet.length == len(IP_PACKET)
    assert packet.checksum_partial and packet.gso and not packet.checksum_not_verified
    assert packet.hook_name == "OUTPUT"


def test_datagram_with_error_ack_and_other_messages():
    error = struct.pack("=IHHII", 36, nlmsg.NLMSG_ERROR, 0, 11, 0) + struct.pack("=i", -2) \
        + bytes(16)
    done = struct.pack("=IHHII", 20, nlmsg.NLMSG_DONE, 0, 12, 0) + bytes(4)
    packet = build_packet_message(QueuedPacket(1, 8, 0x86DD, 0, b"\x60" + bytes(39)))
    items = parse_datagram(error + done + packet)
    assert items[0] == NetlinkAck(11, 2)
    assert isinstance(items[1], QueuedPacket) and items[1].packet_id == 8
    assert len(items) == 2


def test_malformed_messages_raise_the_one_error():
    assert issubclass(NfQueueParseError, ParseError)
    assert issubclass(NfQueueParseError, NfQueueError)
    assert issubclass(NfQueueError, NetError)
    no_header = _msg(3 << 8, 0, 0, 2, 1, _nla(10, b"x"))
    short_mark = _msg(3 << 8, 0, 0, 2, 1, _nla(1, struct.pack("!IHB", 1, 8, 0))
                      + _nla(3, b"\0\0"))
    big_hwaddr = _msg(3 << 8, 0, 0, 2, 1, _nla(1, struct.pack("!IHB", 1, 8, 0))
                      + _nla(9, struct.pack("!H2x8s", 9, bytes(8))))
    for data in (no_header, short_mark, big_hwaddr, b"\x01\x02", no_header[:-1]):
        with pytest.raises(NfQueueParseError):
            parse_datagram(data)
    with pytest.raises(NfQueueParseError):
        parse_verdict(NFQNL_MSG_VERDICT, b"\0\0")
    with pytest.raises(NfQueueParseError):
        parse_requests(_msg(1 << 8 | 1, 0, 0, 0, 0, b""))  # a ctnetlink message


def test_builders_refuse_what_the_wire_cannot_carry():
    with pytest.raises(ValueError, match="at most"):
        build_verdict(Verdict(1, 1, NF_ACCEPT, payload=bytes(MAX_PAYLOAD + 1)))
    build_verdict(Verdict(1, 1, NF_ACCEPT, payload=bytes(MAX_PAYLOAD)))
    with pytest.raises(ValueError, match="batch"):
        build_verdict(Verdict(1, 1, NF_ACCEPT, payload=b"x", batch=True))
    with pytest.raises(ValueError, match="go together"):
        build_config(QueueConfig(1, flags=1))
    with pytest.raises(ValueError):
        build_config(QueueConfig(70000, command=1))
    with pytest.raises(ValueError):
        build_verdict(Verdict(1, 1 << 32, NF_ACCEPT))


# --- round trips -------------------------------------------------------------------------------

u8 = st.integers(0, 0xFF)
u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFFFFFF)
opt_u32 = st.none() | u32

packets = st.builds(
    QueuedPacket,
    queue_num=u16, packet_id=u32, hw_protocol=u16, hook=u8,
    payload=st.binary(max_size=300), family=u8, mark=u32,
    indev=opt_u32, outdev=opt_u32, physindev=opt_u32, physoutdev=opt_u32,
    hwaddr=st.none() | st.binary(max_size=8),
    timestamp=st.none() | st.tuples(st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1)),
    cap_len=opt_u32, skb_info=u32, uid=opt_u32, gid=opt_u32,
)


@st.composite
def configs(draw):
    flags = draw(opt_u32)
    return QueueConfig(
        queue_num=draw(u16), command=draw(st.none() | u8),
        copy_mode=draw(st.none() | u8), copy_range=draw(u32), maxlen=draw(opt_u32),
        flags=flags, mask=None if flags is None else draw(u32),
    )


@st.composite
def verdicts(draw):
    batch = draw(st.booleans())
    return Verdict(queue_num=draw(u16), packet_id=draw(u32), verdict=draw(u32),
                   mark=draw(opt_u32),
                   payload=None if batch else draw(st.none() | st.binary(max_size=300)),
                   batch=batch)


@settings(max_examples=300, deadline=None)
@given(packets, u32)
def test_packet_round_trip(packet, seq):
    data = build_packet_message(packet, seq)
    (parsed,) = parse_datagram(data)
    assert parsed == packet


@settings(max_examples=300, deadline=None)
@given(configs(), u32)
def test_config_round_trip(config, seq):
    parsed = parse_requests(build_config(config, seq))[0]
    if config.copy_mode is None:  # the range travels only with the mode
        config = QueueConfig(**{**_fields(config), "copy_range": 0})
    if config.command is None:
        config = QueueConfig(**{**_fields(config), "pf": 0})
    assert parsed == config


def _fields(obj):
    return {name: getattr(obj, name) for name in obj.__dataclass_fields__}


@settings(max_examples=300, deadline=None)
@given(st.lists(verdicts(), min_size=1, max_size=5), u32)
def test_verdicts_round_trip_in_one_datagram(items, seq):
    data = b"".join(build_verdict(v, seq) for v in items)
    assert parse_requests(data) == items


# --- the verdict planner against a model of the kernel's queue ----------------------------------


def _kernel_apply(queue, data, verdicts_seen):
    """What nfnetlink_queue does with the messages of one datagram, in order."""
    for request in parse_requests(data):
        if request.batch:
            taken = [pid for pid in queue if pid <= request.packet_id]
            assert taken, "the kernel answers an empty batch with ENOENT"
            for pid in taken:
                queue.remove(pid)
                verdicts_seen[pid] = (request.verdict, None, request.mark)
        else:
            assert request.packet_id in queue, "a verdict for a packet not queued"
            queue.remove(request.packet_id)
            verdicts_seen[request.packet_id] = (request.verdict, request.payload, request.mark)


decisions = st.sampled_from([
    None, None,  # undecided
    PendingVerdict(NF_ACCEPT), PendingVerdict(NF_ACCEPT), PendingVerdict(NF_ACCEPT),
    PendingVerdict(NF_DROP), PendingVerdict(NF_ACCEPT, b"new"), PendingVerdict(NF_ACCEPT, None, 7),
    PendingVerdict(NF_REPEAT),
])


@settings(max_examples=500, deadline=None)
@given(st.lists(decisions, max_size=60), st.integers(0, 5), st.integers(1, 2**32 - 80))
def test_plan_gives_every_decided_packet_its_verdict_and_no_other(choices, unreceived, first):
    waiting = [first + i for i in range(len(choices))]
    decided = {pid: c for pid, c in zip(waiting, choices, strict=True) if c is not None}
    seqs = itertools.count(1)
    plan = plan_verdicts(3, waiting, decided, seqs)
    queue = waiting + [first + len(choices) + i for i in range(unreceived)]
    seen = {}
    _kernel_apply(queue, b"".join(p.message for p in plan), seen)
    assert seen == {pid: (d.verdict, d.payload, d.mark) for pid, d in decided.items()}
    assert queue == [pid for pid in waiting if pid not in decided] + queue[len(queue) -
                                                                          unreceived:]
    assert sorted(pid for p in plan for pid in p.packet_ids) == sorted(decided)


def test_plan_batches_a_run_of_accepts():
    decided = {pid: PendingVerdict(NF_ACCEPT) for pid in range(1, 201)}
    plan = plan_verdicts(1, range(1, 201), decided, itertools.count())
    assert [(p.kind, len(p.packet_ids)) for p in plan] == [("batch", 200)]
    # an undecided packet first: the accepts after it cannot be batched
    plan = plan_verdicts(1, range(0, 201), decided, itertools.count())
    assert {p.kind for p in plan} == {"accept"} and len(plan) == 200
    # a drop in the middle splits the run in two batches
    decided[100] = PendingVerdict(NF_DROP)
    plan = plan_verdicts(1, range(1, 201), decided, itertools.count())
    assert [(p.kind, len(p.packet_ids)) for p in plan] == [
        ("batch", 99), ("drop", 1), ("batch", 100)]


# --- fuzzing -----------------------------------------------------------------------------------

_PARSERS = (parse_datagram, parse_requests, parse_packet_message, parse_config,
            lambda data: parse_verdict(NFQNL_MSG_VERDICT, data))


@settings(max_examples=1500, deadline=None)
@given(st.binary(max_size=300))
def test_arbitrary_bytes_raise_only_the_parse_error(data):
    for parse in _PARSERS:
        try:
            parse(data)
        except NfQueueParseError:
            pass


@settings(max_examples=1500, deadline=None)
@given(packets, st.lists(st.tuples(st.integers(0, 10_000), u8), min_size=1, max_size=6),
       st.integers(0, 10_000))
def test_mutated_messages_raise_only_the_parse_error(packet, flips, cut):
    data = bytearray(build_packet_message(packet, 1)
                     + build_verdict(Verdict(1, 2, NF_ACCEPT, payload=b"abc"), 2))
    for at, value in flips:
        data[at % len(data)] = value
    data = bytes(data[: max(1, cut % (len(data) + 1))])
    for parse in _PARSERS:
        try:
            parse(data)
        except NfQueueParseError:
            pass
    try:
        for msg in nlmsg.messages(data):
            parse_packet_message(msg.body)
    except ParseError:  # the framing's own error; the codec's wraps it
        pass
