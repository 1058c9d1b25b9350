"""Raw IP sockets: send complete IPv4/IPv6 packets you built, or send/receive one IP protocol.

    with RawSocket(socket.AF_INET6, netns="ipsh-x-a", device="to-r") as raw:
        raw.send(packet)                 # full packet incl. IPv6 header; dst read from it

`protocol=IPPROTO_RAW` (the default) is send-only and takes whole packets (IP_HDRINCL for IPv4,
IPV6_HDRINCL for IPv6; the kernel still fills in the IPv4 total length, checksum, and a zero id
or source). Any other protocol (e.g. 4 for IP-in-IP, 47 for GRE) receives that protocol: IPv4
reads include the IP header, IPv6 reads start at the payload (the kernel strips the header).
Sending on such a socket passes the payload only, unless `hdrincl=True`.

The socket is created inside `netns` and stays there; use it from any thread. It is
non-blocking: a full send buffer raises `RawSocketError` with errno EAGAIN (count and drop).
"""

from __future__ import annotations

import errno as _errno
import socket
from dataclasses import dataclass

from ipshift.net import netns as _netns
from ipshift.net.errors import NetError
from ipshift.net.sockbase import KernelSocket

IPV6_HDRINCL = 36  # linux/in6.h, Linux >= 4.5
SO_MARK = 36


class RawSocketError(NetError):
    """A raw socket could not be opened, or a send/receive failed."""


@dataclass(frozen=True)
class _Opened:
    sock: socket.socket
    scope_id: int


def _open(
    family: int, protocol: int, device: str | None, mark: int | None, hdrincl: bool
) -> _Opened:
    sock = socket.socket(family, socket.SOCK_RAW | socket.SOCK_CLOEXEC, protocol)
    try:
        if hdrincl:
            if family == socket.AF_INET:
                sock.setsockopt(socket.IPPROTO_IP, socket.IP_HDRINCL, 1)
            else:
                sock.setsockopt(socket.IPPROTO_IPV6, IPV6_HDRINCL, 1)
        scope_id = 0
        if device is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, device.encode())
            scope_id = socket.if_nametoindex(device)
        if mark is not None:
            sock.setsockopt(socket.SOL_SOCKET, SO_MARK, mark)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return _Opened(sock, scope_id)


class RawSocket(KernelSocket):
    """A raw IP socket in namespace `netns`, optionally bound to `device` and marked."""

    def __init__(
        self,
        family: int = socket.AF_INET,
        protocol: int = socket.IPPROTO_RAW,
        *,
        netns: str | None = None,
        device: str | None = None,
        mark: int | None = None,
        hdrincl: bool | None = None,
    ) -> None:
        if family not in (socket.AF_INET, socket.AF_INET6):
            raise ValueError("family must be AF_INET or AF_INET6")
        self.family = family
        self.protocol = protocol
        self.device = device
        self.hdrincl = protocol == socket.IPPROTO_RAW if hdrincl is None else hdrincl
        try:
            opened = _netns.call_in(netns, _open, family, protocol, device, mark, self.hdrincl)
        except OSError as exc:
            where = f" in namespace {netns}" if netns else ""
            on = f" on {device}" if device else ""
            raise RawSocketError(
                f"cannot open raw IPv{4 if family == socket.AF_INET else 6} socket "
                f"(protocol {protocol}){on}{where}: {exc.strerror or exc} (needs CAP_NET_RAW)",
                exc.errno or 0,
            ) from exc
        self._sock = opened.sock
        self._scope_id = opened.scope_id

    def destination_of(self, packet: bytes | bytearray | memoryview) -> str:
        """The destination address in a full packet's IP header."""
        if self.family == socket.AF_INET:
            if len(packet) < 20 or packet[0] >> 4 != 4:
                raise ValueError("not an IPv4 packet (need a 20-byte header, version 4)")
            return socket.inet_ntop(socket.AF_INET, bytes(packet[16:20]))
        if len(packet) < 40 or packet[0] >> 4 != 6:
            raise ValueError("not an IPv6 packet (need a 40-byte header, version 6)")
        return socket.inet_ntop(socket.AF_INET6, bytes(packet[24:40]))

    def send(self, packet: bytes | bytearray | memoryview, dst: str | None = None) -> int:
        """Send one packet; `dst` defaults to the header's destination (hdrincl sockets)."""
        if dst is None:
            if not self.hdrincl:
                raise ValueError("dst is required when the socket does not take IP headers")
            dst = self.destination_of(packet)
        addr: tuple[str, int] | tuple[str, int, int, int]
        if self.family == socket.AF_INET:
            addr = (dst, 0)
        else:
            addr = (dst, 0, 0, self._scope_id)
        try:
            return self._sock.sendto(packet, addr)
        except OSError as exc:
            raise RawSocketError(
                f"raw send to {dst}: {exc.strerror or exc}", exc.errno or 0
            ) from exc

    def recv(self, bufsize: int = 65535) -> tuple[bytes, str] | None:
        """One received packet and its source address, or None when nothing is queued."""
        try:
            data, addr = self._sock.recvfrom(bufsize)
        except BlockingIOError:
            return None
        except OSError as exc:
            if exc.errno == _errno.EAGAIN:
                return None
            raise RawSocketError(f"raw receive: {exc.strerror or exc}", exc.errno or 0) from exc
        return data, str(addr[0])

