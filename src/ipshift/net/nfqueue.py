"""NFQUEUE: packets the kernel hands to user space for a verdict, and the iptables rule that
feeds a queue.

    with QueueRule("sacip", 7, chain="PREROUTING", match=["-p", "icmp"], netns="ipsh-x-r"), \\
         NfQueue(7, netns="ipsh-x-r") as queue:
        loop.add_reader(queue.fileno(), on_readable)

    def on_readable():
        for packet in queue.receive(64):
            buf = bytearray(packet.payload)
            if fix(buf):                          # e.g. packet.icmp.rewrite_quoted
                queue.replace(packet.packet_id, buf)
            else:
                queue.accept(packet.packet_id)
        queue.flush()                             # one sendmsg for the whole batch

The kernel here has no nft `queue` statement; `iptables -j NFQUEUE` (iptables-nft) feeds the
queue instead. `QueueRule` owns an iptables chain named after its owner (`IPSHIFT-<owner>`),
jumped to from the built-in chains it is given, holding `-j NFQUEUE --queue-num N
--queue-bypass`: with no program bound to the queue, packets pass. `close()` removes all of
it; `QueueRule.remove_stale(owner)` removes what a killed process left.

Verdicts are queued and sent by `flush()`: a run of plain accepts that covers every packet
still waiting up to its last id becomes one NFQNL_MSG_VERDICT_BATCH, the rest one verdict
message each, all in as few sendmsg calls as the socket's send buffer allows.
"""

from __future__ import annotations

import errno as _errno
import itertools
import os
import re
import select
import shlex
import socket
import subprocess
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass

from ipshift.net import netns as _netns
from ipshift.net.nfqueue_codec import (
    MAX_PAYLOAD,
    NETLINK_NETFILTER,
    NF_ACCEPT,
    NF_DROP,
    NFQA_CFG_F_FAIL_OPEN,
    NFQA_CFG_F_GSO,
    NFQNL_CFG_CMD_BIND,
    NFQNL_CFG_CMD_UNBIND,
    NFQNL_COPY_PACKET,
    NetlinkAck,
    NfQueueError,
    NfQueueParseError,
    PendingVerdict,
    PlannedMessage,
    QueueConfig,
    QueuedPacket,
    build_config,
    parse_datagram,
    plan_verdicts,
)
from ipshift.net.sockbase import KernelSocket, force_buffer, open_netlink

__all__ = [
    "NfQueue",
    "NfQueueError",
    "QueueCounters",
    "QueueRule",
    "QueueRuleError",
    "QueuedPacket",
]

_RECV_BUFFER = 1 << 17  # one message: a 64 KiB payload and its attributes
_SEND_CHUNK = 1 << 17  # bytes of verdicts per sendmsg (below the forced send buffer)
_IOV_MAX = 1024


@dataclass
class QueueCounters:
    """What a queue has seen and done since it was opened."""

    received: int = 0
    malformed: int = 0  # datagrams that did not parse (their packets are dropped at unbind)
    accepted: int = 0
    dropped: int = 0
    replaced: int = 0
    enobufs: int = 0  # receive buffer overflows (fail-open: those packets were accepted)
    verdict_errors: int = 0  # verdicts the kernel refused (e.g. an id no longer queued)
    verdict_messages: int = 0  # verdict messages sent, a batch counting once
    batch_verdicts: int = 0  # of which NFQNL_MSG_VERDICT_BATCH
    sends: int = 0  # sendmsg calls

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


class NfQueue(KernelSocket):
    """Queue `queue_num` bound in namespace `netns` (None: the caller's).

    `copy_range` bytes of each packet are copied to user space; `maxlen` packets may wait in
    the kernel; with `fail_open`, packets that find the queue (or the socket buffer) full are
    accepted instead of dropped, and `close()` accepts those still waiting for a verdict. With
    `gso`, GSO packets are queued whole instead of segmented first, and packets may carry a
    partial checksum (`QueuedPacket.checksum_partial`).

    The socket is non-blocking: give `fileno()` to an asyncio reader and call `receive()`
    when it is readable. Thread-safe. Raises `NfQueueError` (one line) when the queue cannot
    be bound: in use by another socket, no CAP_NET_ADMIN, no nfnetlink_queue in the kernel.
    """

    def __init__(
        self,
        queue_num: int,
        *,
        netns: str | None = None,
        copy_range: int = 0xFFFF,
        maxlen: int = 1024,
        fail_open: bool = True,
        gso: bool = False,
        rcvbuf: int = 8 << 20,
        timeout: float = 5.0,
    ) -> None:
        if not 0 <= queue_num <= 0xFFFF:
            raise ValueError(f"a queue number is 0..65535, not {queue_num}")
        if not 0 < copy_range <= 0xFFFF or maxlen < 1:
            raise ValueError("copy_range is 1..65535 and maxlen at least 1")
        self.queue_num = queue_num
        self.netns = netns
        self.fail_open = fail_open
        self.timeout = timeout
        self.counters = QueueCounters()
        self.last_error = ""  # the latest verdict error, for a status line
        self._where = f"NFQUEUE {queue_num}" + (f" in namespace {netns}" if netns else "")
        self._seq = itertools.count(1)
        self._lock = threading.RLock()
        self._buf = bytearray(_RECV_BUFFER)
        self._backlog: list[QueuedPacket] = []
        # ids received and not yet answered, in queue order (dicts keep insertion order)
        self._outstanding: dict[int, None] = {}
        self._pending: dict[int, PendingVerdict] = {}
        self._closed = False
        try:
            self._sock = open_netlink(NETLINK_NETFILTER, netns=netns, rcvbuf=rcvbuf,
                                      blocking=False)
            force_buffer(self._sock, "snd", _SEND_CHUNK * 4)
        except OSError as exc:
            raise NfQueueError(f"cannot open a netfilter netlink socket for {self._where}: "
                               f"{exc.strerror or exc}", exc.errno or 0) from exc
        flags = (NFQA_CFG_F_FAIL_OPEN if fail_open else 0) | (NFQA_CFG_F_GSO if gso else 0)
        config = QueueConfig(queue_num, command=NFQNL_CFG_CMD_BIND, copy_mode=NFQNL_COPY_PACKET,
                             copy_range=copy_range, maxlen=maxlen, flags=flags,
                             mask=NFQA_CFG_F_FAIL_OPEN | NFQA_CFG_F_GSO)
        try:
            err = self._request(config)
        except BaseException:
            self._sock.close()
            raise
        if err:
            self._sock.close()
            raise NfQueueError(f"cannot bind {self._where}: {_bind_reason(err)}", err)

    # -- requests with an answer ----------------------------------------------------------------
    def _request(self, config: QueueConfig) -> int:
        """Send a config message and wait (bounded) for its answer; returns the errno (0: ok).
        Packets that arrive meanwhile are kept for `receive`."""
        seq = next(self._seq) & 0xFFFFFFFF
        try:
            self._sock.send(build_config(config, seq))
        except OSError as exc:
            raise NfQueueError(f"{self._where}: config request failed: {exc.strerror or exc}",
                               exc.errno or 0) from exc
        deadline = time.monotonic() + self.timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise NfQueueError(f"{self._where}: no answer from the kernel within "
                                   f"{self.timeout:g} s", _errno.ETIMEDOUT)
            readable, _, _ = select.select([self._sock], [], [], left)
            if not readable:
                continue
            for item in self._read_datagram() or ():
                if isinstance(item, NetlinkAck):
                    if item.seq == seq:
                        return item.errno
                    self._count_verdict_error(item)
                else:
                    self._backlog.append(item)

    def _read_datagram(self) -> list[QueuedPacket | NetlinkAck] | None:
        """What one datagram holds; [] if it failed (counted), None when none is queued."""
        try:
            size = self._sock.recv_into(self._buf, 0, socket.MSG_TRUNC)
        except (BlockingIOError, InterruptedError):
            return None
        except OSError as exc:
            if exc.errno == _errno.ENOBUFS:  # the kernel could not deliver some packets
                self.counters.enobufs += 1
                return []
            raise NfQueueError(f"{self._where}: receive failed: {exc.strerror or exc}",
                               exc.errno or 0) from exc
        if size > len(self._buf):
            self.counters.malformed += 1
            return []
        try:
            items = parse_datagram(bytes(memoryview(self._buf)[:size]))
        except NfQueueParseError:
            self.counters.malformed += 1
            return []
        for item in items:
            if isinstance(item, QueuedPacket):
                self._outstanding[item.packet_id] = None
                self.counters.received += 1
        return items

    def _count_verdict_error(self, ack: NetlinkAck) -> None:
        if ack.errno:
            self.counters.verdict_errors += 1
            self.last_error = f"a verdict was refused: {os.strerror(ack.errno)}"

    # -- receiving -----------------------------------------------------------------------------
    def receive(self, max_packets: int = 64) -> list[QueuedPacket]:
        """The packets queued now (at most `max_packets`); never waits. Each needs a verdict:
        `accept`, `drop` or `replace`, then `flush`."""
        with self._lock:
            out = self._backlog[:max_packets]
            del self._backlog[:max_packets]
            # bounded: every datagram is a packet, an ack, or a counted failure
            for _ in range(2 * max_packets + 8):
                if len(out) >= max_packets:
                    break
                items = self._read_datagram()
                if items is None:
                    break
                for item in items:
                    if isinstance(item, NetlinkAck):
                        self._count_verdict_error(item)
                    elif len(out) < max_packets:
                        out.append(item)
                    else:
                        self._backlog.append(item)
            return out

    @property
    def waiting(self) -> int:
        """Packets received and not yet answered (verdicts queued but not flushed count)."""
        return len(self._outstanding)

    # -- verdicts ------------------------------------------------------------------------------
    def verdict(self, packet_id: int, verdict: int, payload: bytes | bytearray | None = None,
                mark: int | None = None) -> None:
        """Queue a verdict (NF_ACCEPT, NF_DROP, ...) for a received packet; `flush` sends it."""
        if payload is not None and len(payload) > MAX_PAYLOAD:
            raise ValueError(f"a replaced payload is at most {MAX_PAYLOAD} bytes")
        if mark is not None and not 0 <= mark <= 0xFFFFFFFF:
            raise ValueError(f"a mark takes 32 bits, not {mark}")
        with self._lock:
            if packet_id not in self._outstanding:
                raise ValueError(f"packet {packet_id} is not waiting for a verdict on "
                                 f"{self._where}")
            if packet_id in self._pending:
                raise ValueError(f"packet {packet_id} has a verdict already")
            self._pending[packet_id] = PendingVerdict(
                verdict, bytes(payload) if payload is not None else None, mark)

    def accept(self, packet_id: int, *, mark: int | None = None) -> None:
        self.verdict(packet_id, NF_ACCEPT, mark=mark)

    def drop(self, packet_id: int) -> None:
        self.verdict(packet_id, NF_DROP)

    def replace(self, packet_id: int, payload: bytes | bytearray, *,
                mark: int | None = None) -> None:
        """Accept the packet with `payload` in its place (checksums are the caller's)."""
        self.verdict(packet_id, NF_ACCEPT, payload, mark)

    def flush(self) -> int:
        """Send the queued verdicts; returns how many verdict messages went out. Raises
        NfQueueError if the kernel refused a send (the verdicts not sent stay queued)."""
        with self._lock:
            if not self._pending:
                return 0
            plan = plan_verdicts(self.queue_num, self._outstanding, self._pending, self._seqs())
            sent = 0
            try:
                for chunk in _chunks(plan):
                    self._sock.sendmsg([item.message for item in chunk])
                    self.counters.sends += 1
                    for item in chunk:
                        self._settle(item.packet_ids, item.kind)
                        sent += 1
            except OSError as exc:
                raise NfQueueError(f"{self._where}: sending verdicts failed: "
                                   f"{exc.strerror or exc}", exc.errno or 0) from exc
            return sent

    def _seqs(self) -> Iterator[int]:
        while True:
            yield next(self._seq) & 0xFFFFFFFF

    def _settle(self, ids: tuple[int, ...], kind: str) -> None:
        for pid in ids:
            self._outstanding.pop(pid, None)
            pending = self._pending.pop(pid, None)
            if kind == "replace":
                self.counters.replaced += 1
            elif pending is not None and pending.verdict == NF_DROP:
                self.counters.dropped += 1
            elif pending is not None and pending.verdict == NF_ACCEPT:
                self.counters.accepted += 1
        self.counters.verdict_messages += 1
        if kind == "batch":
            self.counters.batch_verdicts += 1

    # -- closing -------------------------------------------------------------------------------
    def close(self) -> None:
        """Send the queued verdicts (and, with fail_open, accept what still waits), unbind the
        queue and close the socket. Without fail_open, the kernel drops what still waits."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            try:
                if self.fail_open:
                    for pid in self._outstanding:
                        if pid not in self._pending:
                            self._pending[pid] = PendingVerdict(NF_ACCEPT, None, None)
                self.flush()
                self._request(QueueConfig(self.queue_num, command=NFQNL_CFG_CMD_UNBIND))
            except NfQueueError:
                pass  # closing the socket unbinds the queue too
            finally:
                self._sock.close()


def _chunks(plan: list[PlannedMessage]) -> list[list[PlannedMessage]]:
    """The plan cut into sendmsg calls, in order (each below the socket's send buffer)."""
    chunks: list[list[PlannedMessage]] = []
    current: list[PlannedMessage] = []
    size = 0
    for item in plan:
        if current and (size + len(item.message) > _SEND_CHUNK or len(current) >= _IOV_MAX):
            chunks.append(current)
            current, size = [], 0
        current.append(item)
        size += len(item.message)
    if current:
        chunks.append(current)
    return chunks


def _bind_reason(err: int) -> str:
    if err in (_errno.EPERM, _errno.EBUSY):
        return (f"{os.strerror(err)} (another socket holds this queue: use another queue "
                "number or stop that program; or CAP_NET_ADMIN is missing)")
    if err in (_errno.EINVAL, _errno.EOPNOTSUPP, _errno.ENOENT, _errno.EPROTONOSUPPORT):
        return f"{os.strerror(err)} (does this kernel have nfnetlink_queue?)"
    return os.strerror(err)


# --- the iptables rule that feeds a queue ----------------------------------------------------

CHAIN_PREFIX = "IPSHIFT-"
_OWNER = re.compile(r"[A-Za-z0-9_.-]{1,20}")  # iptables chain names have at most 28 characters
_IPTABLES_TIMEOUT = 30.0


class QueueRuleError(NfQueueError):
    """An iptables command for a queue rule failed."""


def _iptables(family: int) -> str:
    if family in (4, socket.AF_INET):
        return "iptables"
    if family in (6, socket.AF_INET6):
        return "ip6tables"
    raise ValueError(f"family must be 4 or 6, not {family}")


def _run_iptables(family: int, netns: str | None, args: Sequence[str],
                  check: bool = True) -> subprocess.CompletedProcess[str]:
    argv = [_iptables(family), "-w", *args]
    where = f" in namespace {netns}" if netns else ""
    try:
        res = subprocess.run(_netns.wrap_argv(netns, argv), capture_output=True, text=True,
                             timeout=_IPTABLES_TIMEOUT)
    except FileNotFoundError as exc:
        raise QueueRuleError(f"{argv[0]} not found: install the iptables package "
                             "(iptables-nft feeds NFQUEUE)") from exc
    except subprocess.TimeoutExpired as exc:
        raise QueueRuleError(f"{shlex.join(argv)}{where} did not finish within "
                             f"{_IPTABLES_TIMEOUT:g} s", _errno.ETIMEDOUT) from exc
    if check and res.returncode != 0:
        lines = (res.stderr or res.stdout).strip().splitlines()
        raise QueueRuleError(f"{shlex.join(argv)}{where} failed: "
                             f"{lines[0] if lines else f'exit status {res.returncode}'}")
    return res


class QueueRule:
    """An owned iptables chain `IPSHIFT-<owner>` in `table` of namespace `netns` that sends
    the packets matching `match` (iptables arguments, e.g. ["-p", "icmp"]) to queue
    `queue_num`, jumped to from the start of each built-in chain in `chain`. `match` may
    also be several such lists (a packet matching any of them is queued).

    Installed when created; `close()` removes the jumps and the chain. With `bypass`
    (--queue-bypass), packets pass while no program is bound to the queue. A chain of the same
    owner that exists already is refused: remove a killed predecessor's with `remove_stale`.
    """

    def __init__(
        self,
        owner: str,
        queue_num: int,
        *,
        chain: str | Sequence[str] = "PREROUTING",
        match: Sequence[str] | Sequence[Sequence[str]] = (),
        family: int = 4,
        netns: str | None = None,
        table: str = "mangle",
        bypass: bool = True,
    ) -> None:
        if not _OWNER.fullmatch(owner):
            raise ValueError(f"a queue rule owner is 1-20 letters, digits, '_', '.' or '-', "
                             f"not {owner!r}")
        if not 0 <= queue_num <= 0xFFFF:
            raise ValueError(f"a queue number is 0..65535, not {queue_num}")
        _iptables(family)
        self.owner = owner
        self.queue_num = queue_num
        self.hooks = (chain,) if isinstance(chain, str) else tuple(chain)
        if not self.hooks:
            raise ValueError("a queue rule needs at least one chain to jump from")
        # one match (iptables arguments), or several: one queueing rule each
        matches: list[Sequence[str]] = (
            [match] if not match or isinstance(match[0], str)  # type: ignore[list-item]
            else list(match))
        self.matches: tuple[tuple[str, ...], ...] = tuple(tuple(m) for m in matches)
        self.match = self.matches[0]
        self.family = family
        self.netns = netns
        self.table = table
        self.chain_name = CHAIN_PREFIX + owner
        self._installed = False
        target = ["-j", "NFQUEUE", "--queue-num", str(queue_num)]
        if bypass:
            target.append("--queue-bypass")
        res = self._run(["-N", self.chain_name], check=False)
        if res.returncode != 0:
            if "exists" in res.stderr:
                raise QueueRuleError(
                    f"iptables chain {self.chain_name} exists in table {table}{self._where}: "
                    f"another instance runs, or a killed one left it "
                    f"(QueueRule.remove_stale({owner!r}) removes it)", _errno.EEXIST)
            self._run(["-N", self.chain_name])  # raises with iptables' own line
        self._installed = True
        try:
            for one in self.matches:
                self._run(["-A", self.chain_name, *one, *target])
            for hook in self.hooks:
                self._run(["-I", hook, "1", "-j", self.chain_name])
        except BaseException:
            self.close()
            raise

    @property
    def _where(self) -> str:
        return f" of namespace {self.netns}" if self.netns else ""

    def _run(self, args: Sequence[str], check: bool = True) -> subprocess.CompletedProcess[str]:
        return _run_iptables(self.family, self.netns, ["-t", self.table, *args], check)

    def close(self) -> None:
        """Remove the jumps and the chain (whatever is left of them; idempotent)."""
        if self._installed:
            self._installed = False
            _remove(self.owner, self.family, self.netns, self.table)

    def __enter__(self) -> QueueRule:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @staticmethod
    def remove_stale(owner: str, *, family: int = 4, netns: str | None = None,
                     table: str = "mangle") -> bool:
        """Remove chain `IPSHIFT-<owner>` and every jump to it (left by a killed process);
        False if there was none."""
        if not _OWNER.fullmatch(owner):
            raise ValueError(f"not a queue rule owner: {owner!r}")
        return _remove(owner, family, netns, table)

    @staticmethod
    def chains(*, family: int = 4, netns: str | None = None, table: str = "mangle") -> list[str]:
        """The owners of the `IPSHIFT-*` chains in `table` (to find stale ones)."""
        res = _run_iptables(family, netns, ["-t", table, "-S"])
        return [line.split()[1][len(CHAIN_PREFIX):] for line in res.stdout.splitlines()
                if line.startswith("-N " + CHAIN_PREFIX)]


def _remove(owner: str, family: int, netns: str | None, table: str) -> bool:
    name = CHAIN_PREFIX + owner
    listing = _run_iptables(family, netns, ["-t", table, "-S"]).stdout.splitlines()
    removed = False
    for line in listing:
        words = shlex.split(line)
        # "-A <chain> ... -j IPSHIFT-<owner>": delete it by its own specification
        if (len(words) >= 4 and words[0] == "-A" and words[1] != name
                and words[-2:] == ["-j", name]):
            _run_iptables(family, netns, ["-t", table, "-D", *words[1:]])
            removed = True
    if f"-N {name}" in listing:
        _run_iptables(family, netns, ["-t", table, "-F", name])
        _run_iptables(family, netns, ["-t", table, "-X", name])
        removed = True
    return removed
