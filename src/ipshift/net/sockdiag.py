"""sock_diag (NETLINK_SOCK_DIAG, inet_diag): list TCP/UDP sockets, and destroy one.

    with SockDiag(netns="ipsh-x-a") as diag:
        for s in diag.sockets("tcp", src="192.0.2.1"):
            print(s.state_name, s.src, s.sport, s.dst, s.dport, s.uid, s.inode)
        diag.destroy(s)        # SOCK_DESTROY: the owner sees ECONNABORTED

A small implementation of its own (messages built and parsed here, fuzzed in the unit tests):
pyroute2 0.9.7's DiagSocket has no SOCK_DESTROY and ignores netlink errors. Address and port
filters are applied here after the dump (the kernel's filter bytecode is not worth it for the
socket counts of a host). SOCK_DESTROY needs CONFIG_INET_DIAG_DESTROY (present here); without
it the kernel answers EOPNOTSUPP and `destroy` raises `SockDiagError` saying so.
"""

from __future__ import annotations

import errno as _errno
import ipaddress
import itertools
import os
import socket
import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass

from ipshift.net import nlmsg
from ipshift.net.errors import NetError, ParseError
from ipshift.net.nlmsg import NLMSG_DONE, NLMSG_ERROR
from ipshift.net.sockbase import KernelSocket, open_netlink

NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
SOCK_DESTROY = 21
NLM_F_REQUEST = 0x1
NLM_F_MULTI = 0x2
NLM_F_ACK = 0x4
NLM_F_DUMP = 0x300

INET_DIAG_SHUTDOWN = 8
INET_DIAG_MARK = 15
INET_DIAG_NOCOOKIE = 0xFFFFFFFF

TCP_STATES = {
    1: "ESTABLISHED", 2: "SYN_SENT", 3: "SYN_RECV", 4: "FIN_WAIT1", 5: "FIN_WAIT2",
    6: "TIME_WAIT", 7: "CLOSE", 8: "CLOSE_WAIT", 9: "LAST_ACK", 10: "LISTEN", 11: "CLOSING",
    12: "NEW_SYN_RECV",
}
TCP_LISTEN = 10
ALL_STATES = 0xFFFFFFFF

PROTOCOLS = {"tcp": socket.IPPROTO_TCP, "udp": socket.IPPROTO_UDP}

_SOCKID = struct.Struct("!HH16s16s")  # ports and addresses are big-endian
_SOCKID_TAIL = struct.Struct("=III")  # if, cookie[2]: host order
_REQ_HEAD = struct.Struct("=BBBxI")
_MSG_HEAD = struct.Struct("=BBBB")
_MSG_TAIL = struct.Struct("=IIIII")  # expires, rqueue, wqueue, uid, inode
SOCKID_LEN = _SOCKID.size + _SOCKID_TAIL.size  # 48
REQ_LEN = _REQ_HEAD.size + SOCKID_LEN  # 56
MSG_LEN = _MSG_HEAD.size + SOCKID_LEN + _MSG_TAIL.size  # 72


class SockDiagError(NetError):
    """A sock_diag request failed (errno from the kernel)."""


@dataclass(frozen=True)
class SocketInfo:
    family: int
    protocol: int
    state: int
    src: str
    sport: int
    dst: str
    dport: int
    ifindex: int = 0
    cookie: int = 0
    uid: int = 0
    inode: int = 0
    rqueue: int = 0
    wqueue: int = 0
    mark: int | None = None

    @property
    def state_name(self) -> str:
        if self.protocol == socket.IPPROTO_UDP:
            return {1: "ESTABLISHED", 7: "UNCONN"}.get(self.state, str(self.state))
        return TCP_STATES.get(self.state, str(self.state))

    @property
    def listening(self) -> bool:
        return self.protocol == socket.IPPROTO_TCP and self.state == TCP_LISTEN


# --- wire format --------------------------------------------------------------------------


def _pack_addr(family: int, addr: str) -> bytes:
    raw = socket.inet_pton(family, addr)
    return raw.ljust(16, b"\0")


def pack_sockid(
    family: int, src: str, sport: int, dst: str, dport: int, ifindex: int = 0,
    cookie: int | None = None,
) -> bytes:
    if cookie is None:
        lo = hi = INET_DIAG_NOCOOKIE
    else:
        lo, hi = cookie & 0xFFFFFFFF, cookie >> 32
    return _SOCKID.pack(
        sport, dport, _pack_addr(family, src), _pack_addr(family, dst)
    ) + _SOCKID_TAIL.pack(ifindex, lo, hi)


def build_request(
    msg_type: int, flags: int, seq: int, family: int, protocol: int, states: int,
    sockid: bytes | None = None,
) -> bytes:
    """An nlmsghdr + inet_diag_req_v2 message."""
    if sockid is None:
        sockid = bytes(SOCKID_LEN)
    if len(sockid) != SOCKID_LEN:
        raise ValueError("inet_diag_sockid must be 48 bytes")
    body = _REQ_HEAD.pack(family, protocol, 0, states & 0xFFFFFFFF) + sockid
    return nlmsg.message(msg_type, flags, seq, body)


def build_dump_request(family: int, protocol: int, states: int = ALL_STATES, seq: int = 1) -> bytes:
    return build_request(SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST | NLM_F_DUMP, seq, family, protocol,
                         states)


def build_destroy_request(info: SocketInfo, seq: int = 1) -> bytes:
    sockid = pack_sockid(info.family, info.src, info.sport, info.dst, info.dport, info.ifindex,
                         info.cookie)
    return build_request(SOCK_DESTROY, NLM_F_REQUEST | NLM_F_ACK, seq, info.family,
                         info.protocol, ALL_STATES, sockid)


def _unpack_addr(family: int, raw: bytes) -> str:
    if family == socket.AF_INET:
        return socket.inet_ntop(socket.AF_INET, raw[:4])
    return socket.inet_ntop(socket.AF_INET6, raw)


def parse_socket_info(body: bytes, protocol: int) -> SocketInfo:
    """One inet_diag_msg (the payload after the nlmsghdr) with its attributes."""
    if len(body) < MSG_LEN:
        raise ParseError(f"inet_diag_msg too short: {len(body)} bytes, need {MSG_LEN}")
    family, state, _timer, _retrans = _MSG_HEAD.unpack_from(body, 0)
    if family not in (socket.AF_INET, socket.AF_INET6):
        raise ParseError(f"inet_diag_msg with unknown family {family}")
    off = _MSG_HEAD.size
    sport, dport, src, dst = _SOCKID.unpack_from(body, off)
    off += _SOCKID.size
    ifindex, c0, c1 = _SOCKID_TAIL.unpack_from(body, off)
    off += _SOCKID_TAIL.size
    _expires, rqueue, wqueue, uid, inode = _MSG_TAIL.unpack_from(body, off)
    off += _MSG_TAIL.size
    mark = None
    for kind, value in _attributes(body, off):
        if kind == INET_DIAG_MARK and len(value) >= 4:
            mark = struct.unpack_from("=I", value)[0]
    return SocketInfo(
        family=family, protocol=protocol, state=state,
        src=_unpack_addr(family, src), sport=sport, dst=_unpack_addr(family, dst), dport=dport,
        ifindex=ifindex, cookie=c0 | (c1 << 32), uid=uid, inode=inode, rqueue=rqueue,
        wqueue=wqueue, mark=mark,
    )


def _attributes(data: bytes, off: int) -> Iterator[tuple[int, bytes]]:
    return nlmsg.attributes(data, off, "rtattr")


@dataclass
class _Batch:
    sockets: list[SocketInfo]
    done: bool
    error: int  # 0 = none / ack


def parse_messages(data: bytes, protocol: int, seq: int | None = None) -> _Batch:
    """Split one datagram into messages: sockets, end of dump, or an error/ack.

    With `seq`, messages answering other requests (left over after an error) are skipped.
    """
    out = _Batch([], False, 0)
    for msg in nlmsg.messages(data):
        if seq is not None and msg.seq != seq:
            continue
        if msg.type == NLMSG_ERROR:
            out.error = nlmsg.error_code(msg.body)
            out.done = True
        elif msg.type == NLMSG_DONE:
            out.error = nlmsg.error_code(msg.body, required=False)
            out.done = True
        elif msg.type == SOCK_DIAG_BY_FAMILY:
            out.sockets.append(parse_socket_info(msg.body, protocol))
    return out


# --- the adapter ------------------------------------------------------------------------------


def _protocol(protocol: str | int) -> int:
    if isinstance(protocol, int):
        return protocol
    try:
        return PROTOCOLS[protocol]
    except KeyError:
        raise ValueError(f"protocol must be one of {sorted(PROTOCOLS)}, not {protocol!r}") from None


def _norm(addr: str | None) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """An address filter as an address object; an IPv4-mapped IPv6 address becomes the IPv4
    address it maps (a dual-stack socket reports its IPv4 peers that way)."""
    if addr is None:
        return None
    try:
        return _plain(ipaddress.ip_address(addr))
    except ValueError as exc:
        raise ValueError(f"invalid address filter {addr!r}") from exc


def _plain(
    address: ipaddress.IPv4Address | ipaddress.IPv6Address,
) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _same(want: ipaddress.IPv4Address | ipaddress.IPv6Address | None, have: str) -> bool:
    """Does a socket's address (as the kernel printed it) equal the filter? Compared as
    addresses, not strings: inet_ntop and ipaddress spell some IPv6 addresses differently."""
    if want is None:
        return True
    try:
        return _plain(ipaddress.ip_address(have)) == want
    except ValueError:
        return False


class SockDiag(KernelSocket):
    """sock_diag in namespace `netns`. Calls are serialised per object and bounded by `timeout`."""

    def __init__(self, netns: str | None = None, *, timeout: float = 5.0) -> None:
        self.netns = netns
        self._seq = itertools.count(1)
        self._lock = threading.Lock()
        try:
            self._sock = open_netlink(NETLINK_SOCK_DIAG, netns=netns, timeout=timeout)
        except OSError as exc:
            raise SockDiagError(f"cannot open sock_diag socket: {exc.strerror or exc}",
                                exc.errno or 0) from exc

    def _exchange(self, request: bytes, protocol: int, what: str) -> list[SocketInfo]:
        with self._lock:
            return self._exchange_locked(request, protocol, what)

    def _exchange_locked(self, request: bytes, protocol: int, what: str) -> list[SocketInfo]:
        out: list[SocketInfo] = []
        seq = nlmsg.HEADER.unpack_from(request)[3]
        try:
            self._sock.send(request)
            while True:
                batch = parse_messages(self._sock.recv(1 << 16), protocol, seq)
                out.extend(batch.sockets)
                if batch.error:
                    raise SockDiagError(f"{what}: {_explain(batch.error)}", batch.error)
                if batch.done:
                    return out
        except TimeoutError as exc:
            raise SockDiagError(f"{what}: no answer from the kernel", _errno.ETIMEDOUT) from exc
        except OSError as exc:
            if isinstance(exc, NetError):
                raise
            raise SockDiagError(f"{what}: {exc.strerror or exc}", exc.errno or 0) from exc

    def sockets(
        self,
        protocol: str | int = "tcp",
        family: int | None = None,
        *,
        states: int = ALL_STATES,
        src: str | None = None,
        dst: str | None = None,
        sport: int | None = None,
        dport: int | None = None,
    ) -> list[SocketInfo]:
        """Sockets of `protocol` ("tcp"/"udp"), both families unless one is given."""
        proto = _protocol(protocol)
        want_src, want_dst = _norm(src), _norm(dst)
        families = [family] if family is not None else [socket.AF_INET, socket.AF_INET6]
        out: list[SocketInfo] = []
        for fam in families:
            req = build_dump_request(fam, proto, states, next(self._seq))
            out.extend(self._exchange(req, proto, f"sock_diag dump {protocol}"))
        return [
            s for s in out
            if _same(want_src, s.src) and _same(want_dst, s.dst)
            and (sport is None or s.sport == sport)
            and (dport is None or s.dport == dport)
        ]

    def destroy(self, info: SocketInfo) -> None:
        """Abort one socket (SOCK_DESTROY); its owner gets ECONNABORTED."""
        req = build_destroy_request(info, next(self._seq))
        what = f"destroy {info.src}:{info.sport} -> {info.dst}:{info.dport}"
        self._exchange(req, info.protocol, what)

    def destroy_matching(
        self, protocol: str | int = "tcp", *, src: str | None = None, dst: str | None = None,
        sport: int | None = None, dport: int | None = None, states: int = ALL_STATES,
    ) -> int:
        """Destroy every socket matching a non-empty address/port filter; returns the count."""
        if src is None and dst is None and sport is None and dport is None:
            raise ValueError("refusing to destroy every socket: give an address or port filter")
        count = 0
        for info in self.sockets(protocol, states=states, src=src, dst=dst, sport=sport,
                                 dport=dport):
            try:
                self.destroy(info)
                count += 1
            except SockDiagError as exc:
                if exc.errno != _errno.ENOENT:
                    raise
        return count


def _explain(code: int) -> str:
    if code == _errno.EOPNOTSUPP:
        return "not supported by this kernel (needs CONFIG_INET_DIAG_DESTROY)"
    return os.strerror(code)
