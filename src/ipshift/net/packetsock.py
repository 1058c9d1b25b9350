"""AF_PACKET snooping: see the IP packets an interface sends and receives.

    with PacketSocket("to-r", netns="ipsh-x-a", direction="out") as snoop:
        async for pkt in snoop:            # Snooped(pkttype, protocol, data)
            ...

SOCK_DGRAM packet socket: `data` starts at the IP header (no link-layer header). `pkttype` is
the kernel's sll_pkttype (PACKET_OUTGOING for what the host sends, PACKET_HOST / BROADCAST /
MULTICAST / OTHERHOST for what it receives); `protocol` is the EtherType (0x0800, 0x86DD).

Filtering happens in the kernel: a classic BPF program (SO_ATTACH_FILTER) keeps only the wanted
EtherTypes and direction (via the skb ancillary loads, so it works without a link header), and
`direction="in"` also sets PACKET_IGNORE_OUTGOING. The filter is attached before the socket is
bound, so no unfiltered packet is ever queued.

Cost: Python has no recvmmsg, so every packet is one recvfrom syscall plus one SIOCGIFNAME ioctl
that CPython makes to name the interface: a few microseconds per packet (docs/net.md). Fine for
watching control traffic or the first packets of a flow, not for bulk data.
"""

from __future__ import annotations

import ctypes
import socket
import struct
from collections.abc import AsyncIterator, Iterable, Sequence
from typing import NamedTuple

from ipshift.net import netns as _netns
from ipshift.net.errors import NetError
from ipshift.net.sockbase import KernelSocket, readable

ETH_P_ALL = 0x0003
ETH_P_IP = 0x0800
ETH_P_IPV6 = 0x86DD
ETH_P_ARP = 0x0806

PACKET_HOST = 0
PACKET_BROADCAST = 1
PACKET_MULTICAST = 2
PACKET_OTHERHOST = 3
PACKET_OUTGOING = 4

SOL_PACKET = 263
PACKET_IGNORE_OUTGOING = 23
SO_ATTACH_FILTER = 26
SO_RCVBUFFORCE = 33

# classic BPF opcodes (linux/filter.h)
BPF_LD = 0x00
BPF_JMP = 0x05
BPF_RET = 0x06
BPF_W = 0x00
BPF_ABS = 0x20
BPF_JEQ = 0x10
BPF_K = 0x00
SKF_AD_OFF = -0x1000
SKF_AD_PROTOCOL = 0
SKF_AD_PKTTYPE = 4

DIRECTIONS = ("both", "in", "out")

BpfInsn = tuple[int, int, int, int]  # (code, jt, jf, k)


class PacketSocketError(NetError):
    """A packet socket could not be opened or read."""


class Snooped(NamedTuple):
    pkttype: int
    protocol: int
    data: bytes

    @property
    def outgoing(self) -> bool:
        return self.pkttype == PACKET_OUTGOING


def bpf_program(
    protocols: Sequence[int] | None = (ETH_P_IP, ETH_P_IPV6),
    direction: str = "both",
    snaplen: int = 0xFFFF,
) -> list[BpfInsn]:
    """A classic BPF program keeping `protocols` (EtherTypes; None: all) in `direction`.

    Uses only ancillary loads (protocol, pkttype), so it is independent of the link header.
    Accepted packets are cut to `snaplen` bytes.
    """
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, not {direction!r}")
    protos = list(protocols) if protocols is not None else []
    if protocols is not None and not protos:
        raise ValueError("no protocols to keep (None keeps every protocol)")
    if len(protos) > 200:
        raise ValueError("too many protocols for one filter")
    prog: list[BpfInsn] = []
    # Layout: [protocol checks] [direction check] accept reject
    dir_len = 0 if direction == "both" else 2
    n_proto = len(protos)
    if protos:
        prog.append((BPF_LD | BPF_W | BPF_ABS, 0, 0, (SKF_AD_OFF + SKF_AD_PROTOCOL) & 0xFFFFFFFF))
        for i, proto in enumerate(protos):
            # offsets are relative to the next instruction
            to_pass = n_proto - 1 - i  # past the remaining checks: start of direction check
            to_reject = to_pass + dir_len + 1  # past direction check and accept
            is_last = i == n_proto - 1
            prog.append((BPF_JMP | BPF_JEQ | BPF_K, to_pass, to_reject if is_last else 0, proto))
    if direction != "both":
        prog.append((BPF_LD | BPF_W | BPF_ABS, 0, 0, (SKF_AD_OFF + SKF_AD_PKTTYPE) & 0xFFFFFFFF))
        if direction == "out":
            prog.append((BPF_JMP | BPF_JEQ | BPF_K, 0, 1, PACKET_OUTGOING))
        else:
            prog.append((BPF_JMP | BPF_JEQ | BPF_K, 1, 0, PACKET_OUTGOING))
    prog.append((BPF_RET | BPF_K, 0, 0, snaplen))
    prog.append((BPF_RET | BPF_K, 0, 0, 0))
    return prog


def pack_program(prog: Iterable[BpfInsn]) -> bytes:
    """struct sock_filter[] as bytes."""
    return b"".join(struct.pack("=HBBI", code, jt, jf, k) for code, jt, jf, k in prog)


def attach_filter(sock: socket.socket, prog: Sequence[BpfInsn]) -> None:
    """SO_ATTACH_FILTER: the kernel copies the program during the call."""
    code = ctypes.create_string_buffer(pack_program(prog))
    fprog = struct.pack("HL", len(prog), ctypes.addressof(code))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)


def _open(
    ifname: str | None, prog: list[BpfInsn], ignore_outgoing: bool, rcvbuf: int
) -> socket.socket:
    if ifname is None:
        sock = socket.socket(
            socket.AF_PACKET, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC, socket.htons(ETH_P_ALL)
        )
    else:  # protocol 0 receives nothing until bound: filter first, then bind
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC, 0)
    try:
        try:
            sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, rcvbuf)
        except PermissionError:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        attach_filter(sock, prog)
        if ignore_outgoing:
            sock.setsockopt(SOL_PACKET, PACKET_IGNORE_OUTGOING, 1)
        sock.setblocking(False)
        if ifname is not None:
            sock.bind((ifname, ETH_P_ALL))
        else:  # drop what was queued before the filter was attached
            while True:
                try:
                    sock.recv(1)
                except BlockingIOError:
                    break
    except BaseException:
        sock.close()
        raise
    return sock


class PacketSocket(KernelSocket):
    """Snoop IP packets on `ifname` (None: every interface) inside namespace `netns`."""

    def __init__(
        self,
        ifname: str | None,
        *,
        netns: str | None = None,
        direction: str = "both",
        protocols: Sequence[int] | None = (ETH_P_IP, ETH_P_IPV6),
        snaplen: int = 0xFFFF,
        rcvbuf: int = 4 << 20,
    ) -> None:
        prog = bpf_program(protocols, direction, snaplen)
        self.ifname = ifname
        self.direction = direction
        self._bufsize = max(snaplen, 1)
        try:
            self._sock = _netns.call_in(netns, _open, ifname, prog, direction == "in", rcvbuf)
        except OSError as exc:
            where = f" in namespace {netns}" if netns else ""
            raise PacketSocketError(
                f"cannot open packet socket on {ifname or 'all interfaces'}{where}: "
                f"{exc.strerror or exc} (needs CAP_NET_RAW and an existing interface)",
                exc.errno or 0,
            ) from exc

    def recv(self) -> Snooped | None:
        """One packet, or None when nothing is queued (never blocks)."""
        try:
            data, addr = self._sock.recvfrom(self._bufsize)
        except BlockingIOError:
            return None
        except OSError as exc:
            raise PacketSocketError(f"packet socket receive: {exc.strerror or exc}",
                                    exc.errno or 0) from exc
        return Snooped(addr[2], addr[1], data)

    def recv_batch(self, max_packets: int = 64) -> list[Snooped]:
        """Up to `max_packets` queued packets (never blocks)."""
        out: list[Snooped] = []
        for _ in range(max_packets):
            pkt = self.recv()
            if pkt is None:
                break
            out.append(pkt)
        return out

    async def next_batch(self, max_packets: int = 64) -> list[Snooped]:
        """Wait until a packet is there and return what is queued (up to `max_packets`)."""
        while True:
            batch = self.recv_batch(max_packets)
            if batch:
                return batch
            await readable(self.fileno())

    def __aiter__(self) -> AsyncIterator[Snooped]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[Snooped]:
        while True:
            for pkt in await self.next_batch():
                yield pkt

