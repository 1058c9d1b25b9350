"""`NetlinkEvents`: a subscription to rtnetlink notifications in one namespace, read without
blocking (from asyncio, a selector, or `KernelWatcher`)."""

from __future__ import annotations

import errno as _errno
import logging
import socket
from collections.abc import AsyncIterator, Sequence

from ipshift.net import netns as _netns
from ipshift.net.errors import ParseError
from ipshift.net.netlink.objects import NetlinkError, NetlinkEvent
from ipshift.net.netlink.parse import parse_events
from ipshift.net.sockbase import readable

log = logging.getLogger("ipshift.net")

RTMGRP_LINK = 0x1
RTMGRP_NEIGH = 0x4
RTMGRP_IPV4_IFADDR = 0x10
RTMGRP_IPV4_ROUTE = 0x40
RTMGRP_IPV4_RULE = 0x80
RTMGRP_IPV6_IFADDR = 0x100
RTMGRP_IPV6_ROUTE = 0x400
RTMGRP_IPV6_RULE = 1 << (19 - 1)

EVENT_GROUPS = {
    "link": RTMGRP_LINK,
    "address": RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR,
    "route": RTMGRP_IPV4_ROUTE | RTMGRP_IPV6_ROUTE,
    "rule": RTMGRP_IPV4_RULE | RTMGRP_IPV6_RULE,
    "neighbour": RTMGRP_NEIGH,
}
NETLINK_ROUTE = 0
SO_RCVBUFFORCE = 33


class EventsOverrunError(NetlinkError):
    """The kernel dropped notifications (socket buffer full): re-read the state you track."""


class NetlinkEvents:
    """A subscription to rtnetlink notifications in namespace `netns`.

    Use from asyncio with `async for event in events:` (or `await events.next_batch()`), or
    register `fileno()` with a selector and call `read()` when readable. `read()` never blocks.
    On overrun, `read()` raises `EventsOverrunError` once (ending an `async for`): the caller
    must resynchronise by dumping what it tracks (links, routes...) and can then iterate again.
    A datagram that cannot be parsed is logged and counted in `malformed`, never raised.
    Note: IPv4 routes the kernel drops with a link that goes down are not announced (IPv6 ones
    are): on a link-down event, re-read the routes you own.
    """

    def __init__(
        self,
        netns: str | None = None,
        kinds: Sequence[str] = ("link", "address", "route", "neighbour"),
        *,
        rcvbuf: int = 4 << 20,
    ) -> None:
        unknown = set(kinds) - set(EVENT_GROUPS)
        if unknown:
            raise ValueError(f"unknown event kinds {sorted(unknown)}: use {sorted(EVENT_GROUPS)}")
        groups = 0
        for kind in kinds:
            groups |= EVENT_GROUPS[kind]
        self.netns = netns
        self.kinds = tuple(kinds)
        self._sock, names = _netns.call_in(netns, _open_event_socket, groups, rcvbuf)
        self.names: dict[int, str] = names
        self.malformed = 0  # datagrams that could not be parsed (logged, skipped)

    def fileno(self) -> int:
        return self._sock.fileno()

    def read(self, max_datagrams: int = 64) -> list[NetlinkEvent]:
        """Every event queued now (up to `max_datagrams` datagrams); [] if none."""
        events: list[NetlinkEvent] = []
        for _ in range(max_datagrams):
            try:
                data = self._sock.recv(1 << 16)
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno == _errno.ENOBUFS:
                    raise EventsOverrunError(
                        "netlink events overran the socket buffer: resynchronise state",
                        _errno.ENOBUFS,
                    ) from exc
                raise
            try:
                events.extend(parse_events(data, self.names))
            except ParseError as exc:  # counted and logged, never fatal
                self.malformed += 1
                log.warning("netlink events: %s", exc)
        return events

    async def next_batch(self) -> list[NetlinkEvent]:
        """Wait until at least one event is there and return all that are queued."""
        while True:
            events = self.read()
            if events:
                return events
            await readable(self.fileno())

    def __aiter__(self) -> AsyncIterator[NetlinkEvent]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[NetlinkEvent]:
        while True:
            for event in await self.next_batch():
                yield event

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> NetlinkEvents:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _open_event_socket(groups: int, rcvbuf: int) -> tuple[socket.socket, dict[int, str]]:
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_ROUTE)
    try:
        try:
            sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, rcvbuf)
        except PermissionError:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.bind((0, groups))
        sock.setblocking(False)
        names = dict(socket.if_nameindex())  # after bind: no rename can slip in between
    except BaseException:
        sock.close()
        raise
    return sock, names

