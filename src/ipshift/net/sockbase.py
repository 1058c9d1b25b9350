"""What every socket adapter of net/ shares: opening a netlink socket (in a namespace), forcing
buffer sizes, and the close/context-manager protocol.

    sock = open_netlink(NETLINK_NETFILTER, netns="ns1", rcvbuf=4 << 20, timeout=10.0)

    class Conntrack(KernelSocket):      # gets fileno(), close(), `with Conntrack() as ct:`
        def __init__(self, ...): self._sock = open_netlink(...)
"""

from __future__ import annotations

import asyncio
import socket
from typing import Self

from ipshift.net import netns as _netns

SO_SNDBUFFORCE = 32
SO_RCVBUFFORCE = 33


def force_buffer(sock: socket.socket, which: str, size: int) -> None:
    """Set the receive ("rcv") or send ("snd") buffer to `size` bytes, above the sysctl limit
    when allowed (CAP_NET_ADMIN), else as large as the limit lets it be."""
    force, plain = ((SO_RCVBUFFORCE, socket.SO_RCVBUF) if which == "rcv"
                    else (SO_SNDBUFFORCE, socket.SO_SNDBUF))
    try:
        sock.setsockopt(socket.SOL_SOCKET, force, size)
    except PermissionError:
        sock.setsockopt(socket.SOL_SOCKET, plain, size)


def _open_netlink_here(protocol: int, groups: int, rcvbuf: int | None, sndbuf: int | None,
                       timeout: float | None, blocking: bool) -> socket.socket:
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, protocol)
    try:
        if rcvbuf:
            force_buffer(sock, "rcv", rcvbuf)
        if sndbuf:
            force_buffer(sock, "snd", sndbuf)
        if timeout is not None:
            sock.settimeout(timeout)
        elif not blocking:
            sock.setblocking(False)
        sock.bind((0, groups))
    except BaseException:
        sock.close()
        raise
    return sock


def open_netlink(protocol: int, *, netns: str | None = None, groups: int = 0,
                 rcvbuf: int | None = None, sndbuf: int | None = None,
                 timeout: float | None = None, blocking: bool = True) -> socket.socket:
    """A bound netlink socket of `protocol` in namespace `netns` (None: the caller's).
    With `timeout`, every wait is bounded; with blocking=False (and no timeout) it never
    waits (for an asyncio reader). Raises OSError."""
    return _netns.call_in(netns, _open_netlink_here, protocol, groups, rcvbuf, sndbuf, timeout,
                          blocking)


async def readable(fd: int) -> None:
    """Wait until `fd` is readable (for `async` readers of non-blocking sockets)."""
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    loop.add_reader(fd, wake)
    try:
        await ready
    finally:
        loop.remove_reader(fd)


class KernelSocket:
    """Base of the adapters that own one socket in `self._sock`."""

    _sock: socket.socket

    def fileno(self) -> int:
        return self._sock.fileno()

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
