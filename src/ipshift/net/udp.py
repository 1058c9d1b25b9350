"""UDP sockets for bulk data paths: segmentation offload (UDP_SEGMENT) on send and receive
coalescing (UDP_GRO).

- Send: one `sendmsg` of up to ~64 KB carries many datagrams; a UDP_SEGMENT control message
  says how long each is (all equal except possibly the last). The kernel splits late (in GSO, or
  in the NIC), so the per-datagram cost is paid once per batch.
- Receive: with UDP_GRO on, one `recvmsg` may return several datagrams that arrived back to back
  from the same peer, concatenated, with their common size in a UDP_GRO control message.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Sequence
from typing import Any

from ipshift.net import netns

SOL_UDP = 17
UDP_SEGMENT = 103
UDP_GRO = 104
SO_SNDBUFFORCE = 32
SO_RCVBUFFORCE = 33

# Limits of one UDP_SEGMENT send (net/ipv4/udp.c): at most this many segments, and the whole
# batch must fit one IP packet's length field.
MAX_SEGMENTS = 64
MAX_BATCH_V4 = 0xFFFF - 20 - 8
MAX_BATCH_V6 = 0xFFFF - 8
# What one GRO receive can return at most (an IP length field's worth of payload).
MAX_RECEIVE = 0xFFFF

_SEGMENT_CMSG = struct.Struct("=H")
_GRO_CMSG = struct.Struct("=i")
GRO_ANCILLARY_SPACE = socket.CMSG_SPACE(_GRO_CMSG.size)

Address = tuple[Any, ...]  # (host, port) or (host, port, flowinfo, scope_id)


def family_of(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def max_batch(family: socket.AddressFamily) -> int:
    """The most payload bytes one UDP_SEGMENT send may carry on this family."""
    return MAX_BATCH_V6 if family == socket.AF_INET6 else MAX_BATCH_V4


def _set_buffer(sock: socket.socket, force: int, plain: int, size: int) -> None:
    try:
        # FORCE ignores net.core.[rw]mem_max; it needs CAP_NET_ADMIN.
        sock.setsockopt(socket.SOL_SOCKET, force, size)
    except PermissionError:
        sock.setsockopt(socket.SOL_SOCKET, plain, size)


def _open_here(
    local: Address, remote: Address | None, gro: bool, buffer_bytes: int, reuse_port: bool
) -> socket.socket:
    sock = socket.socket(family_of(str(local[0])), socket.SOCK_DGRAM)
    try:
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if buffer_bytes:
            _set_buffer(sock, SO_SNDBUFFORCE, socket.SO_SNDBUF, buffer_bytes)
            _set_buffer(sock, SO_RCVBUFFORCE, socket.SO_RCVBUF, buffer_bytes)
        if gro:
            sock.setsockopt(SOL_UDP, UDP_GRO, 1)
        sock.bind(local)
        if remote is not None:
            sock.connect(remote)
    except BaseException:
        sock.close()
        raise
    return sock


def open_udp(
    local: Address,
    remote: Address | None = None,
    *,
    gro: bool = True,
    buffer_bytes: int = 8 << 20,
    reuse_port: bool = False,
    netns_name: str | None = None,
) -> socket.socket:
    """A UDP socket bound to `local` (and connected to `remote` when given) in namespace
    netns_name, with UDP_GRO on and large buffers. The family follows the local address."""
    return netns.call_in(netns_name, _open_here, local, remote, gro, buffer_bytes, reuse_port)


def send_segments(
    sock: socket.socket,
    buffers: Sequence[bytes | bytearray | memoryview],
    segment_size: int,
    address: Address | None = None,
) -> int:
    """Send the concatenation of buffers as datagrams of segment_size bytes (the last may be
    shorter) in one sendmsg. segment_size 0 sends one datagram. Returns the bytes sent. The
    batch may hold at most MAX_SEGMENTS datagrams and `max_batch(family)` bytes."""
    ancillary = _segment_cmsgs.get(segment_size)
    if ancillary is None:
        ancillary = [(SOL_UDP, UDP_SEGMENT, _SEGMENT_CMSG.pack(segment_size))] if segment_size \
            else []
        if len(_segment_cmsgs) < 64:
            _segment_cmsgs[segment_size] = ancillary
    if address is None:
        return sock.sendmsg(buffers, ancillary)
    return sock.sendmsg(buffers, ancillary, 0, address)


def set_segment_size(sock: socket.socket, size: int) -> None:
    """Make every send on `sock` longer than `size` bytes go out as datagrams of `size` bytes
    (UDP_SEGMENT as a socket option: no control message per send). 0 turns it off."""
    sock.setsockopt(SOL_UDP, UDP_SEGMENT, size)


# Control messages per segment size: built once, a tunnel uses one or two sizes.
_segment_cmsgs: dict[int, list[tuple[int, int, bytes]]] = {}


def receive_segments(
    sock: socket.socket, buffer: bytearray | memoryview, flags: int = 0
) -> tuple[int, int, Address]:
    """Receive into buffer. Returns (bytes, segment size, sender): the bytes are one datagram
    (segment size 0) or several back-to-back datagrams of segment size each, the last possibly
    shorter. Raises BlockingIOError on a non-blocking socket (or with MSG_DONTWAIT in flags)
    when nothing is queued."""
    nbytes, ancillary, _flags, sender = sock.recvmsg_into([buffer], GRO_ANCILLARY_SPACE, flags)
    return nbytes, gro_segment_size(ancillary) if ancillary else 0, sender


def gro_segment_size(ancillary: Sequence[tuple[int, int, bytes]]) -> int:
    """The UDP_GRO segment size in recvmsg ancillary data, 0 if there is none."""
    for level, kind, data in ancillary:
        if level == SOL_UDP and kind == UDP_GRO:
            return int(_GRO_CMSG.unpack_from(data)[0])
    return 0
