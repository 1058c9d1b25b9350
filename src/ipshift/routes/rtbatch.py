"""Batched route changes over one rtnetlink socket: many RTM_NEWROUTE/RTM_DELROUTE messages per
datagram, each acknowledged on its own.

pyroute2 (through net.netlink) needs ~0.7 ms per route here, so 10,000 routes take 7 s; encoding
the few attributes a route needs with struct and sending 256 messages per datagram takes a
fraction of that (bench/bench_routes.py measures both). Adapter-local for now: a candidate for
net/netlink.py.
"""

from __future__ import annotations

import errno as _errno
import itertools
import os
import socket
import struct
from collections.abc import Callable, Sequence

from ipshift.net import netns as _netns
from ipshift.net import nlmsg
from ipshift.net.errors import ParseError
from ipshift.net.nlmsg import NLMSG_ERROR
from ipshift.routes.plan import KRoute

NETLINK_ROUTE = 0
RTM_NEWROUTE = 24
RTM_DELROUTE = 25
NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4
NLM_F_REPLACE = 0x100
NLM_F_EXCL = 0x200
NLM_F_CREATE = 0x400
RTA_DST, RTA_OIF, RTA_GATEWAY, RTA_PRIORITY, RTA_PREFSRC, RTA_MULTIPATH, RTA_TABLE = (
    1, 4, 5, 6, 7, 9, 15)
RTNH_F_ONLINK = 4
RT_SCOPE_NOWHERE = 255
ROUTE_TYPE_IDS = {"unicast": 1, "blackhole": 6, "unreachable": 7, "prohibit": 8, "throw": 9}
V6_DEFAULT_METRIC = 1024

_RTMSG = struct.Struct("=BBBBBBBBI")
_RTNH = struct.Struct("=HBBi")


def _attr(kind: int, payload: bytes) -> bytes:
    return nlmsg.attr(kind, payload)


def encode_route(verb: str, route: KRoute, proto: int, index_of: Callable[[str], int],
                 seq: int) -> bytes:
    """One request: verb "add" (create, fail if present), "replace" or "del" (protocol-bound,
    so only an owned route can match)."""
    af = socket.AF_INET6 if route.family == 6 else socket.AF_INET
    table_u8 = route.table if route.table < 256 else 0
    if verb == "del":
        msg_type, flags = RTM_DELROUTE, NLM_F_REQUEST | NLM_F_ACK
        scope = RT_SCOPE_NOWHERE
    else:
        msg_type = RTM_NEWROUTE
        flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | (
            NLM_F_REPLACE if verb == "replace" else NLM_F_EXCL)
        scope = route.scope
    rflags = RTNH_F_ONLINK if len(route.nexthops) == 1 and route.nexthops[0].onlink else 0
    body = _RTMSG.pack(af, route.dst.prefixlen, 0, 0, table_u8, proto, scope,
                       ROUTE_TYPE_IDS[route.type], rflags)
    attrs = [_attr(RTA_TABLE, struct.pack("=I", route.table))]
    if route.dst.prefixlen:
        attrs.append(_attr(RTA_DST, route.dst.network_address.packed))
    metric = route.metric if route.family == 4 else (route.metric or V6_DEFAULT_METRIC)
    if metric or route.family == 6:
        attrs.append(_attr(RTA_PRIORITY, struct.pack("=I", metric)))
    if route.src is not None:
        attrs.append(_attr(RTA_PREFSRC, route.src.packed))
    if len(route.nexthops) == 1:
        nh = route.nexthops[0]
        if nh.gateway is not None:
            attrs.append(_attr(RTA_GATEWAY, nh.gateway.packed))
        if nh.dev:
            attrs.append(_attr(RTA_OIF, struct.pack("=i", index_of(nh.dev))))
    elif route.nexthops:
        hops = b""
        for nh in route.nexthops:
            inner = _attr(RTA_GATEWAY, nh.gateway.packed) if nh.gateway is not None else b""
            hops += _RTNH.pack(_RTNH.size + len(inner), RTNH_F_ONLINK if nh.onlink else 0,
                               nh.weight - 1, index_of(nh.dev)) + inner
        attrs.append(_attr(RTA_MULTIPATH, hops))
    payload = body + b"".join(attrs)
    return nlmsg.message(msg_type, flags, seq, payload)


class RouteBatch:
    """An rtnetlink socket that applies many route changes at once."""

    def __init__(self, netns: str | None = None, *, per_datagram: int = 256):
        self.per_datagram = per_datagram
        self._seq = itertools.count(1)
        self._sock: socket.socket = _netns.call_in(netns, _open)

    def apply(self, ops: Sequence[tuple[str, KRoute]], proto: int,
              index_of: Callable[[str], int]) -> list[tuple[int, str] | None]:
        """Results in order: None, or (errno, strerror) for a change the kernel refused."""
        results: list[tuple[int, str] | None] = [None] * len(ops)
        for start in range(0, len(ops), self.per_datagram):
            chunk = ops[start:start + self.per_datagram]
            by_seq: dict[int, int] = {}
            data = []
            for i, (verb, route) in enumerate(chunk, start):
                seq = next(self._seq) & 0xFFFFFFFF
                try:
                    data.append(encode_route(verb, route, proto, index_of, seq))
                except OSError as exc:  # a device that does not exist (any more)
                    results[i] = (exc.errno or _errno.ENODEV, exc.strerror or str(exc))
                    continue
                by_seq[seq] = i
            if not by_seq:
                continue
            self._sock.send(b"".join(data))
            while by_seq:
                buf = self._sock.recv(1 << 20)
                for seq, err in _acks(buf):
                    i = by_seq.pop(seq, -1)
                    if i >= 0 and err:
                        results[i] = (err, os.strerror(err))
        return results

    def close(self) -> None:
        self._sock.close()


def _open() -> socket.socket:
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_ROUTE)
    for opt, force in ((socket.SO_SNDBUF, 32), (socket.SO_RCVBUF, 33)):
        try:
            sock.setsockopt(socket.SOL_SOCKET, force, 8 << 20)
        except OSError:
            sock.setsockopt(socket.SOL_SOCKET, opt, 8 << 20)
    sock.settimeout(10.0)
    sock.bind((0, 0))
    return sock


def _acks(buf: bytes) -> list[tuple[int, int]]:
    out = []
    try:
        for msg in nlmsg.messages(buf):
            if msg.type == NLMSG_ERROR and len(msg.body) >= 4:
                out.append((msg.seq, nlmsg.error_code(msg.body)))
    except ParseError:
        pass  # acks before a damaged message still count; the rest are retried
    return out
