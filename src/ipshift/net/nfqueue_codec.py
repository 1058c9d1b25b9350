"""nfnetlink_queue messages, built and parsed here (pure: no I/O).

    cfg = build_config(QueueConfig(7, command=NFQNL_CFG_CMD_BIND, copy_mode=NFQNL_COPY_PACKET,
                                   copy_range=0xFFFF, maxlen=1024,
                                   flags=NFQA_CFG_F_FAIL_OPEN, mask=NFQA_CFG_F_FAIL_OPEN), seq=1)
    for item in parse_datagram(data):        # QueuedPacket, or NetlinkAck for an error/ack
        ...
    build_verdict(Verdict(7, packet.packet_id, NF_ACCEPT), seq=2)
    build_verdict(Verdict(7, highest_id, NF_ACCEPT, batch=True), seq=3)   # every id <= highest

The layouts are those of <linux/netfilter/nfnetlink_queue.h>: an nfgenmsg whose resource id
is the queue number (network byte order), then attributes; every multi-byte field inside them
is big-endian. The obsolete per-family bind (NFQNL_CFG_CMD_PF_BIND) is never needed: Linux
(since 3.8) ignores it, and a config message carrying it is ignored as a whole.

Both directions are here (the kernel's side too), so every message round-trips in the unit
tests. Malformed input raises `NfQueueParseError` and nothing else (fuzzed).
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import NamedTuple

from ipshift.net import nlmsg
from ipshift.net.errors import NetError, ParseError

NETLINK_NETFILTER = 12
NFNL_SUBSYS_QUEUE = 3

NFQNL_MSG_PACKET = 0
NFQNL_MSG_VERDICT = 1
NFQNL_MSG_CONFIG = 2
NFQNL_MSG_VERDICT_BATCH = 3

# packet attributes (enum nfqnl_attr_type)
NFQA_PACKET_HDR = 1
NFQA_VERDICT_HDR = 2
NFQA_MARK = 3
NFQA_TIMESTAMP = 4
NFQA_IFINDEX_INDEV = 5
NFQA_IFINDEX_OUTDEV = 6
NFQA_IFINDEX_PHYSINDEV = 7
NFQA_IFINDEX_PHYSOUTDEV = 8
NFQA_HWADDR = 9
NFQA_PAYLOAD = 10
NFQA_CT = 11
NFQA_CT_INFO = 12
NFQA_CAP_LEN = 13
NFQA_SKB_INFO = 14
NFQA_EXP = 15
NFQA_UID = 16
NFQA_GID = 17

# config attributes (enum nfqnl_attr_config)
NFQA_CFG_CMD = 1
NFQA_CFG_PARAMS = 2
NFQA_CFG_QUEUE_MAXLEN = 3
NFQA_CFG_MASK = 4
NFQA_CFG_FLAGS = 5

NFQNL_CFG_CMD_NONE = 0
NFQNL_CFG_CMD_BIND = 1
NFQNL_CFG_CMD_UNBIND = 2
NFQNL_CFG_CMD_PF_BIND = 3  # obsolete: ignored by the kernel
NFQNL_CFG_CMD_PF_UNBIND = 4  # obsolete: ignored by the kernel

NFQNL_COPY_NONE = 0
NFQNL_COPY_META = 1
NFQNL_COPY_PACKET = 2

NFQA_CFG_F_FAIL_OPEN = 1 << 0  # accept, not drop, what does not fit in the queue or socket
NFQA_CFG_F_CONNTRACK = 1 << 1
NFQA_CFG_F_GSO = 1 << 2  # queue GSO packets whole (they may come with partial checksums)
NFQA_CFG_F_UID_GID = 1 << 3
NFQA_CFG_F_SECCTX = 1 << 4

NFQA_SKB_CSUMNOTREADY = 1 << 0  # partial checksum: the field holds the pseudo-header sum
NFQA_SKB_GSO = 1 << 1  # larger than the device MTU: segmented later
NFQA_SKB_CSUM_NOTVERIFIED = 1 << 2

# verdicts (include/uapi/linux/netfilter.h)
NF_DROP = 0
NF_ACCEPT = 1
NF_STOLEN = 2
NF_QUEUE = 3
NF_REPEAT = 4
NF_STOP = 5
VERDICT_NAMES = {NF_DROP: "drop", NF_ACCEPT: "accept", NF_STOLEN: "stolen", NF_QUEUE: "queue",
                 NF_REPEAT: "repeat", NF_STOP: "stop"}

# netfilter hooks of the inet families
NF_INET_PRE_ROUTING = 0
NF_INET_LOCAL_IN = 1
NF_INET_FORWARD = 2
NF_INET_LOCAL_OUT = 3
NF_INET_POST_ROUTING = 4
HOOK_NAMES = {NF_INET_PRE_ROUTING: "PREROUTING", NF_INET_LOCAL_IN: "INPUT",
              NF_INET_FORWARD: "FORWARD", NF_INET_LOCAL_OUT: "OUTPUT",
              NF_INET_POST_ROUTING: "POSTROUTING"}

#: The largest payload an attribute can carry (its 16-bit length includes a 4-byte header);
#: the kernel clamps a larger copy range to it.
MAX_PAYLOAD = 0xFFFF - nlmsg.ATTR.size

_PACKET_HDR = struct.Struct("!IHB")  # packet id, hardware protocol, hook (packed: 7 bytes)
_VERDICT_HDR = struct.Struct("!II")  # verdict, packet id
_CFG_CMD = struct.Struct("!BxH")  # command, pad, protocol family
_CFG_PARAMS = struct.Struct("!IB")  # copy range, copy mode (packed: 5 bytes)
_HWADDR = struct.Struct("!H2x8s")  # address length, pad, address
_TIMESTAMP = struct.Struct("!QQ")  # seconds, microseconds
_U32 = struct.Struct("!I")


class NfQueueError(NetError):
    """An NFQUEUE operation failed (bind, verdicts, the rule that feeds a queue)."""


class NfQueueParseError(ParseError, NfQueueError):
    """A malformed nfnetlink_queue message."""


class QueuedPacket(NamedTuple):
    """One packet the kernel queued to user space, waiting for a verdict.

    `payload` is the IP packet (its first `copy_range` bytes); `cap_len` is the packet's real
    length when the payload was cut short (None when it is whole). `indev`, `outdev`,
    `physindev`, `physoutdev` are interface indexes where the hook knows them.
    (A named tuple, not a dataclass: it is made once per packet, three times faster.)
    """

    queue_num: int
    packet_id: int
    hw_protocol: int
    hook: int
    payload: bytes = b""
    family: int = 0
    mark: int = 0
    indev: int | None = None
    outdev: int | None = None
    physindev: int | None = None
    physoutdev: int | None = None
    hwaddr: bytes | None = None
    timestamp: tuple[int, int] | None = None  # (seconds, microseconds)
    cap_len: int | None = None
    skb_info: int = 0
    uid: int | None = None
    gid: int | None = None

    @property
    def length(self) -> int:
        """The packet's real length (more than len(payload) when truncated)."""
        return self.cap_len if self.cap_len is not None else len(self.payload)

    @property
    def truncated(self) -> bool:
        """True if `payload` is only the start of the packet: it must not be replaced."""
        return self.cap_len is not None and self.cap_len > len(self.payload)

    @property
    def checksum_partial(self) -> bool:
        """The upper-layer checksum field holds the pseudo-header sum (only with
        NFQA_CFG_F_GSO): rewrite addresses with the partial-checksum rule."""
        return bool(self.skb_info & NFQA_SKB_CSUMNOTREADY)

    @property
    def gso(self) -> bool:
        """A GSO super-packet, larger than the MTU (only with NFQA_CFG_F_GSO)."""
        return bool(self.skb_info & NFQA_SKB_GSO)

    @property
    def checksum_not_verified(self) -> bool:
        return bool(self.skb_info & NFQA_SKB_CSUM_NOTVERIFIED)

    @property
    def hook_name(self) -> str:
        return HOOK_NAMES.get(self.hook, str(self.hook))


@dataclass(frozen=True, slots=True)
class QueueConfig:
    """An NFQNL_MSG_CONFIG: a command (bind, unbind) and/or parameters of queue `queue_num`.
    None leaves a setting out of the message (the kernel keeps what it has)."""

    queue_num: int
    command: int | None = None
    pf: int = 0  # only read by the obsolete per-family commands
    copy_mode: int | None = None
    copy_range: int = 0
    maxlen: int | None = None
    flags: int | None = None
    mask: int | None = None  # which bits of `flags` to change; required with flags


@dataclass(frozen=True, slots=True)
class Verdict:
    """A verdict on packet `packet_id` of queue `queue_num`; with `batch`, on every packet
    queued with an id up to and including `packet_id` (NFQNL_MSG_VERDICT_BATCH: no payload).
    `payload`, if given, replaces the packet; `mark`, if given, sets its mark."""

    queue_num: int
    packet_id: int
    verdict: int
    mark: int | None = None
    payload: bytes | None = None
    batch: bool = False


class NetlinkAck(NamedTuple):
    """An NLMSG_ERROR: the answer to request `seq` (errno 0: an acknowledgement)."""

    seq: int
    errno: int


# --- building ----------------------------------------------------------------------------------


def _u16_range(value: int, what: str) -> None:
    if not 0 <= value <= 0xFFFF:
        raise ValueError(f"{what} takes 16 bits, not {value}")


def _u32_range(value: int, what: str) -> None:
    if not 0 <= value <= 0xFFFFFFFF:
        raise ValueError(f"{what} takes 32 bits, not {value}")


def _u32_attr(kind: int, value: int, what: str) -> bytes:
    _u32_range(value, what)
    return nlmsg.attr(kind, _U32.pack(value))


def _queue_message(msg_type: int, flags: int, seq: int, family: int, queue_num: int,
                   attrs: bytes) -> bytes:
    _u16_range(queue_num, "a queue number")
    _u32_range(seq, "a netlink sequence number")
    return nlmsg.netfilter_message(NFNL_SUBSYS_QUEUE, msg_type, flags, seq, family, queue_num,
                                   attrs)


def build_config(config: QueueConfig, seq: int = 0, *, ack: bool = True) -> bytes:
    """An NFQNL_MSG_CONFIG message. A bind and the parameters go in one message: the kernel
    binds first, then applies the rest."""
    attrs = b""
    if config.command is not None:
        if not 0 <= config.command <= 0xFF:
            raise ValueError(f"a queue config command takes 8 bits, not {config.command}")
        _u16_range(config.pf, "a protocol family")
        attrs += nlmsg.attr(NFQA_CFG_CMD, _CFG_CMD.pack(config.command, config.pf))
    if config.copy_mode is not None:
        if not 0 <= config.copy_mode <= 0xFF:
            raise ValueError(f"a copy mode takes 8 bits, not {config.copy_mode}")
        _u32_range(config.copy_range, "a copy range")
        attrs += nlmsg.attr(NFQA_CFG_PARAMS, _CFG_PARAMS.pack(config.copy_range,
                                                              config.copy_mode))
    if config.maxlen is not None:
        attrs += _u32_attr(NFQA_CFG_QUEUE_MAXLEN, config.maxlen, "a queue length")
    if (config.flags is None) != (config.mask is None):
        raise ValueError("queue flags and their mask go together")
    if config.flags is not None and config.mask is not None:
        attrs += _u32_attr(NFQA_CFG_MASK, config.mask, "a flag mask")
        attrs += _u32_attr(NFQA_CFG_FLAGS, config.flags, "queue flags")
    flags = nlmsg.NLM_F_REQUEST | (nlmsg.NLM_F_ACK if ack else 0)
    return _queue_message(NFQNL_MSG_CONFIG, flags, seq, 0, config.queue_num, attrs)


def build_verdict(verdict: Verdict, seq: int = 0) -> bytes:
    """An NFQNL_MSG_VERDICT, or an NFQNL_MSG_VERDICT_BATCH if `verdict.batch`. No ack is asked
    for: the kernel answers only a failed verdict (NLMSG_ERROR with the message's seq)."""
    _u32_range(verdict.verdict, "a verdict")
    _u32_range(verdict.packet_id, "a packet id")
    attrs = nlmsg.attr(NFQA_VERDICT_HDR, _VERDICT_HDR.pack(verdict.verdict, verdict.packet_id))
    if verdict.mark is not None:
        attrs += _u32_attr(NFQA_MARK, verdict.mark, "a mark")
    if verdict.payload is not None:
        if verdict.batch:
            raise ValueError("a batch verdict cannot replace payloads")
        if len(verdict.payload) > MAX_PAYLOAD:
            raise ValueError(f"a replaced payload is at most {MAX_PAYLOAD} bytes, "
                             f"not {len(verdict.payload)}")
        attrs += nlmsg.attr(NFQA_PAYLOAD, verdict.payload)
    msg_type = NFQNL_MSG_VERDICT_BATCH if verdict.batch else NFQNL_MSG_VERDICT
    return _queue_message(msg_type, nlmsg.NLM_F_REQUEST, seq, 0, verdict.queue_num, attrs)


def build_packet_message(packet: QueuedPacket, seq: int = 0) -> bytes:
    """The NFQNL_MSG_PACKET the kernel would send for `packet` (for tests and replays)."""
    _u32_range(packet.packet_id, "a packet id")
    _u16_range(packet.hw_protocol, "a hardware protocol")
    if not 0 <= packet.hook <= 0xFF or not 0 <= packet.family <= 0xFF:
        raise ValueError("hook and family take 8 bits each")
    if len(packet.payload) > MAX_PAYLOAD:
        raise ValueError(f"a queued payload is at most {MAX_PAYLOAD} bytes")
    attrs = nlmsg.attr(NFQA_PACKET_HDR,
                       _PACKET_HDR.pack(packet.packet_id, packet.hw_protocol, packet.hook))
    for kind, value in ((NFQA_IFINDEX_INDEV, packet.indev),
                        (NFQA_IFINDEX_OUTDEV, packet.outdev),
                        (NFQA_IFINDEX_PHYSINDEV, packet.physindev),
                        (NFQA_IFINDEX_PHYSOUTDEV, packet.physoutdev)):
        if value is not None:
            attrs += _u32_attr(kind, value, "an interface index")
    if packet.mark:
        attrs += _u32_attr(NFQA_MARK, packet.mark, "a mark")
    if packet.hwaddr is not None:
        if len(packet.hwaddr) > 8:
            raise ValueError("a hardware address is at most 8 bytes here")
        attrs += nlmsg.attr(NFQA_HWADDR, _HWADDR.pack(len(packet.hwaddr), packet.hwaddr))
    if packet.timestamp is not None:
        seconds, micros = packet.timestamp
        if not 0 <= seconds < 1 << 64 or not 0 <= micros < 1 << 64:
            raise ValueError("timestamp fields take 64 bits")
        attrs += nlmsg.attr(NFQA_TIMESTAMP, _TIMESTAMP.pack(seconds, micros))
    if packet.uid is not None:
        attrs += _u32_attr(NFQA_UID, packet.uid, "a uid")
    if packet.gid is not None:
        attrs += _u32_attr(NFQA_GID, packet.gid, "a gid")
    if packet.skb_info:
        attrs += _u32_attr(NFQA_SKB_INFO, packet.skb_info, "skb info")
    attrs += nlmsg.attr(NFQA_PAYLOAD, packet.payload)
    if packet.cap_len is not None:
        attrs += _u32_attr(NFQA_CAP_LEN, packet.cap_len, "a capture length")
    return _queue_message(NFQNL_MSG_PACKET, 0, seq, packet.family, packet.queue_num, attrs)


class PendingVerdict(NamedTuple):
    """A verdict decided for a queued packet and not sent yet."""

    verdict: int
    payload: bytes | None = None
    mark: int | None = None

    @property
    def plain_accept(self) -> bool:
        return self.verdict == NF_ACCEPT and self.payload is None and self.mark is None


class PlannedMessage(NamedTuple):
    """One verdict message of a plan: the packets it answers, and what it does to them
    ("batch", "accept", "drop", "replace", or the verdict's number for other verdicts)."""

    message: bytes
    packet_ids: tuple[int, ...]
    kind: str


def plan_verdicts(queue_num: int, waiting: Iterable[int], decided: Mapping[int, PendingVerdict],
                  seqs: Iterator[int], *, min_batch: int = 2) -> list[PlannedMessage]:
    """The verdict messages that send `decided` for packets `waiting` (ids in queue order).

    A batch verdict answers every packet still queued with an id up to its own, so a run of
    plain accepts (at least `min_batch` long) becomes one NFQNL_MSG_VERDICT_BATCH only while
    no packet before it is undecided; every other decision is one NFQNL_MSG_VERDICT. The
    messages must be sent in the order given."""
    plan: list[PlannedMessage] = []
    run: list[int] = []

    def single(pid: int, pending: PendingVerdict) -> PlannedMessage:
        message = build_verdict(Verdict(queue_num, pid, pending.verdict, pending.mark,
                                        pending.payload), next(seqs))
        if pending.payload is not None:
            kind = "replace"
        else:
            kind = {NF_ACCEPT: "accept", NF_DROP: "drop"}.get(pending.verdict,
                                                                str(pending.verdict))
        return PlannedMessage(message, (pid,), kind)

    def end_run() -> None:
        if len(run) >= min_batch:
            message = build_verdict(Verdict(queue_num, run[-1], NF_ACCEPT, batch=True),
                                    next(seqs))
            plan.append(PlannedMessage(message, tuple(run), "batch"))
        else:
            plan.extend(single(pid, decided[pid]) for pid in run)
        run.clear()

    undecided_before = False
    left = len(decided)
    for pid in waiting:
        if not left:
            break  # the packets after the last decided one wait on
        pending = decided.get(pid)
        if pending is None:
            end_run()
            undecided_before = True
            continue
        left -= 1
        if pending.plain_accept and not undecided_before:
            run.append(pid)
        else:
            end_run()
            plan.append(single(pid, pending))
    end_run()
    return plan


# --- parsing -----------------------------------------------------------------------------------


def _attrs(body: bytes, what: str) -> dict[int, bytes]:
    try:
        return dict(nlmsg.attributes(body, nlmsg.NFGENMSG.size, what))
    except ParseError as exc:
        raise NfQueueParseError(str(exc)) from None


def _header(body: bytes, what: str) -> tuple[int, int]:
    try:
        return nlmsg.netfilter_header(body, what)
    except ParseError as exc:
        raise NfQueueParseError(str(exc)) from None


def _u32(attrs: dict[int, bytes], kind: int, what: str) -> int | None:
    value = attrs.get(kind)
    if value is None:
        return None
    if len(value) != 4:
        raise NfQueueParseError(f"nfqueue {what} attribute of {len(value)} bytes, not 4")
    return int(_U32.unpack(value)[0])


def _fixed(attrs: dict[int, bytes], kind: int, layout: struct.Struct,
           what: str) -> tuple[int, ...] | None:
    value = attrs.get(kind)
    if value is None:
        return None
    if len(value) < layout.size:
        raise NfQueueParseError(f"nfqueue {what} attribute of {len(value)} bytes, "
                                f"needs {layout.size}")
    return tuple(layout.unpack_from(value))


_unpack_attr = nlmsg.ATTR.unpack_from
_unpack_u32 = _U32.unpack_from
_unpack_packet_hdr = _PACKET_HDR.unpack_from
#: u32 attributes of a packet message -> their index in `parse_packet_message`'s list
_PACKET_U32 = {NFQA_MARK: 0, NFQA_IFINDEX_INDEV: 1, NFQA_IFINDEX_OUTDEV: 2,
               NFQA_IFINDEX_PHYSINDEV: 3, NFQA_IFINDEX_PHYSOUTDEV: 4, NFQA_CAP_LEN: 5,
               NFQA_SKB_INFO: 6, NFQA_UID: 7, NFQA_GID: 8}


def parse_packet_message(body: bytes) -> QueuedPacket:
    """An NFQNL_MSG_PACKET body (after the netlink header)."""
    # One pass over the attributes with the fields in locals: this runs for every packet.
    size = len(body)
    if size < nlmsg.NFGENMSG.size:
        raise NfQueueParseError("nfqueue packet message shorter than its nfgenmsg header")
    header: tuple[int, int, int] | None = None
    payload = b""
    hwaddr: bytes | None = None
    stamp: tuple[int, int] | None = None
    u32: list[int | None] = [None] * 9
    off = nlmsg.NFGENMSG.size
    while off + 4 <= size:
        length, kind = _unpack_attr(body, off)
        end = off + length
        if length < 4 or end > size:
            raise NfQueueParseError(f"bad nfqueue packet attribute length {length} at offset "
                                    f"{off}")
        kind &= nlmsg.NLA_TYPE_MASK
        start = off + 4
        if kind == NFQA_PAYLOAD:
            payload = body[start:end]
        elif kind in _PACKET_U32:
            if length != 8:
                raise NfQueueParseError(f"nfqueue attribute {kind} of {length - 4} bytes, not 4")
            u32[_PACKET_U32[kind]] = _unpack_u32(body, start)[0]
        elif kind == NFQA_PACKET_HDR:
            if length - 4 < _PACKET_HDR.size:
                raise NfQueueParseError("nfqueue packet header attribute cut short")
            header = _unpack_packet_hdr(body, start)
        elif kind == NFQA_HWADDR:
            if length - 4 < _HWADDR.size:
                raise NfQueueParseError("nfqueue hardware address attribute cut short")
            hw_size = body[start] << 8 | body[start + 1]
            if hw_size > 8:
                raise NfQueueParseError(f"nfqueue hardware address length {hw_size} exceeds 8")
            hwaddr = body[start + 4 : start + 4 + hw_size]
        elif kind == NFQA_TIMESTAMP:
            if length - 4 < _TIMESTAMP.size:
                raise NfQueueParseError("nfqueue timestamp attribute cut short")
            seconds, micros = _TIMESTAMP.unpack_from(body, start)
            stamp = (seconds, micros)
        off = (end + 3) & ~3
    if header is None:
        raise NfQueueParseError("nfqueue packet message without a packet header")
    mark, indev, outdev, physindev, physoutdev, cap_len, skb_info, uid, gid = u32
    return QueuedPacket(body[2] << 8 | body[3], header[0], header[1], header[2], payload,
                        body[0], mark or 0, indev, outdev, physindev, physoutdev, hwaddr, stamp,
                        cap_len, skb_info or 0, uid, gid)


def parse_config(body: bytes) -> QueueConfig:
    """An NFQNL_MSG_CONFIG body (what the kernel reads; for tests)."""
    _, queue_num = _header(body, "nfqueue config")
    attrs = _attrs(body, "nfqueue config")
    cmd = _fixed(attrs, NFQA_CFG_CMD, _CFG_CMD, "config command")
    params = _fixed(attrs, NFQA_CFG_PARAMS, _CFG_PARAMS, "config parameters")
    return QueueConfig(
        queue_num=queue_num,
        command=cmd[0] if cmd else None,
        pf=cmd[1] if cmd else 0,
        copy_mode=params[1] if params else None,
        copy_range=params[0] if params else 0,
        maxlen=_u32(attrs, NFQA_CFG_QUEUE_MAXLEN, "queue length"),
        flags=_u32(attrs, NFQA_CFG_FLAGS, "flags"),
        mask=_u32(attrs, NFQA_CFG_MASK, "flag mask"),
    )


def parse_verdict(msg_type: int, body: bytes) -> Verdict:
    """An NFQNL_MSG_VERDICT or NFQNL_MSG_VERDICT_BATCH body (`msg_type` without the
    subsystem byte; what the kernel reads; for tests)."""
    if msg_type not in (NFQNL_MSG_VERDICT, NFQNL_MSG_VERDICT_BATCH):
        raise NfQueueParseError(f"nfqueue message type {msg_type} is not a verdict")
    _, queue_num = _header(body, "nfqueue verdict")
    attrs = _attrs(body, "nfqueue verdict")
    header = _fixed(attrs, NFQA_VERDICT_HDR, _VERDICT_HDR, "verdict header")
    if header is None:
        raise NfQueueParseError("nfqueue verdict without a verdict header")
    return Verdict(
        queue_num=queue_num,
        packet_id=header[1],
        verdict=header[0],
        mark=_u32(attrs, NFQA_MARK, "mark"),
        payload=attrs.get(NFQA_PAYLOAD),
        batch=msg_type == NFQNL_MSG_VERDICT_BATCH,
    )


def parse_datagram(data: bytes) -> list[QueuedPacket | NetlinkAck]:
    """What one datagram from the queue socket holds: queued packets and error answers (or
    acks), in order; other messages (NLMSG_DONE, NOOP, other subsystems) are skipped."""
    out: list[QueuedPacket | NetlinkAck] = []
    try:
        for msg in nlmsg.messages(data):
            if msg.type == nlmsg.NLMSG_ERROR:
                out.append(NetlinkAck(msg.seq, nlmsg.error_code(msg.body)))
            elif msg.type == NFNL_SUBSYS_QUEUE << 8 | NFQNL_MSG_PACKET:
                out.append(parse_packet_message(msg.body))
    except NfQueueParseError:
        raise
    except ParseError as exc:
        raise NfQueueParseError(str(exc)) from None
    return out


def parse_requests(data: bytes) -> list[QueueConfig | Verdict]:
    """The config and verdict messages of a datagram sent to the kernel (for tests)."""
    out: list[QueueConfig | Verdict] = []
    try:
        for msg in nlmsg.messages(data):
            if msg.type >> 8 != NFNL_SUBSYS_QUEUE:
                raise NfQueueParseError(f"netlink message type {msg.type:#x} is not nfqueue")
            kind = msg.type & 0xFF
            if kind == NFQNL_MSG_CONFIG:
                out.append(parse_config(msg.body))
            else:
                out.append(parse_verdict(kind, msg.body))
    except NfQueueParseError:
        raise
    except ParseError as exc:
        raise NfQueueParseError(str(exc)) from None
    return out
