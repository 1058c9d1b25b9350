"""UDP sockets for bulk data paths: segmentation offload (UDP_SEGMENT) on send and receive
coalescing (UDP_GRO).

- Send: one `sendmsg` of up to ~64 KB carries many datagrams; a UDP_SEGMENT control message
  says how long each is (all equal except possibly the last). The kernel splits late (in GSO, or
  in the NIC), so the per-datagram cost is paid once per batch.
- Receive: with UDP_GRO on, one `recvmsg` may return several datagrams that arrived back to back
  from the same peer, concatenated, with their common size in a UDP_GRO control message.

And UDP sockets for multicast control protocols: `open_multicast` joins IPv4/IPv6 groups on one
interface, and `recv_with_destination` tells each datagram's destination (the group) and the
interface it arrived on (IP_PKTINFO / IPV6_PKTINFO).
"""

from __future__ import annotations

import errno
import fcntl
import ipaddress
import socket
import struct
from collections.abc import Sequence
from typing import Any, NamedTuple

from ipshift.net import netns
from ipshift.net.errors import NetError, ParseError

_call_in = netns.call_in  # open_multicast's `netns` argument hides the module

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
    local: Address, remote: Address | None, gro: bool, buffer_bytes: int, reuse_port: bool,
    v6only: bool = False,
) -> socket.socket:
    sock = socket.socket(family_of(str(local[0])), socket.SOCK_DGRAM)
    try:
        if v6only and sock.family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
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
    v6only: bool = False,
) -> socket.socket:
    """A UDP socket bound to `local` (and connected to `remote` when given) in namespace
    netns_name, with UDP_GRO on and large buffers. The family follows the local address.
    v6only: an IPv6 socket takes IPv6 only (beside an IPv4 socket on the same port)."""
    return netns.call_in(netns_name, _open_here, local, remote, gro, buffer_bytes, reuse_port,
                         v6only)


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


# --- multicast: join groups on one interface, learn where each datagram arrived ----------------

# linux/in.h and linux/in6.h values CPython does not name
IP_PKTINFO = 8
IP_MULTICAST_ALL = 49
IPV6_MULTICAST_ALL = 29
SIOCGIFINDEX = 0x8933

_IN_PKTINFO = struct.Struct("=i4s4s")  # ipi_ifindex, ipi_spec_dst, ipi_addr (header destination)
_IN6_PKTINFO = struct.Struct("=16sI")  # ipi6_addr, ipi6_ifindex
_IP_MREQN = struct.Struct("=4s4si")  # imr_multiaddr, imr_address, imr_ifindex
_IPV6_MREQ = struct.Struct("=16sI")  # ipv6mr_multiaddr, ipv6mr_interface
_IFREQ_INDEX = struct.Struct("=16si20x")  # ifr_name, ifr_ifindex, padding to sizeof(ifreq)
PKTINFO_ANCILLARY_SPACE = socket.CMSG_SPACE(max(_IN_PKTINFO.size, _IN6_PKTINFO.size))

Interface = str | int  # a name, or an ifindex


class MulticastError(NetError):
    """A multicast socket could not be opened, join or leave a group; one line."""


class ReceivedDatagram(NamedTuple):
    """One datagram with where it arrived: `destination` is the address it was sent to (the
    group, for multicast) and `ifindex` the interface it came in on."""

    data: bytes
    source: Address
    destination: str
    ifindex: int


def open_multicast(
    port: int,
    groups: Sequence[str],
    interface: Interface,
    netns: str | None = None,
    *,
    family: socket.AddressFamily | None = None,
    loopback: bool = False,
    hops: int = 1,
    reuse_address: bool = True,
    buffer_bytes: int = 0,
) -> socket.socket:
    """A UDP socket on `port` (all addresses) in namespace `netns` that has joined `groups` on
    `interface` and reports each datagram's destination and arrival interface
    (`recv_with_destination`). It receives only the groups it joined (IP_MULTICAST_ALL off, so
    not those other sockets of the host joined), sends multicast out of `interface` with `hops`
    as TTL / hop limit, and hears its own multicast only with `loopback`. The family follows the
    groups (give `family` to join none, e.g. for a sender). Several such sockets may share a port
    (`reuse_address`). Blocking, like any new socket: use `recv_batch_with_destination` or
    MSG_DONTWAIT to poll."""
    chosen = _group_family(groups, family)
    if not 0 <= port <= 0xFFFF:
        raise ValueError(f"UDP port {port} out of range 0..65535")
    if not 0 <= hops <= 255:
        raise ValueError(f"multicast hops {hops} out of range 0..255")
    return _call_in(netns, _open_multicast_here, chosen, port, list(groups), interface,
                    loopback, hops, reuse_address, buffer_bytes)


def _group_family(
    groups: Sequence[str], family: socket.AddressFamily | None
) -> socket.AddressFamily:
    families = {_multicast_family(g) for g in groups}
    if family is not None:
        families.add(family)
    if not families:
        raise ValueError("open_multicast: give groups to join, or family= for a socket without")
    if len(families) > 1:
        raise ValueError(f"open_multicast: groups {list(groups)} mix IPv4 and IPv6; "
                         "open one socket per family")
    return families.pop()


def _multicast_family(group: str) -> socket.AddressFamily:
    try:
        addr = ipaddress.ip_address(group)
    except ValueError as exc:
        raise ValueError(f"invalid multicast group {group!r}: {exc}") from exc
    if not addr.is_multicast:
        raise ValueError(f"{group} is not a multicast address (IPv4 224.0.0.0/4, IPv6 ff00::/8)")
    return socket.AF_INET6 if addr.version == 6 else socket.AF_INET


def _open_multicast_here(
    family: socket.AddressFamily, port: int, groups: list[str], interface: Interface,
    loopback: bool, hops: int, reuse_address: bool, buffer_bytes: int,
) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
    try:
        try:
            if reuse_address:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if buffer_bytes:
                _set_buffer(sock, SO_RCVBUFFORCE, socket.SO_RCVBUF, buffer_bytes)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            _multicast_all_off(sock, family)
            sock.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", port))
        except OSError as exc:
            raise MulticastError(
                f"cannot open a UDP socket on port {port}: {_reason(exc)}", exc.errno or 0
            ) from exc
        ifindex = interface_index(sock, interface)
        try:
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_IF, ifindex)
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_LOOP, int(loopback))
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_HOPS, hops)
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_RECVPKTINFO, 1)
            else:
                sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF,
                                _IP_MREQN.pack(bytes(4), bytes(4), ifindex))
                sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, int(loopback))
                sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, hops)
                sock.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
        except OSError as exc:
            raise MulticastError(f"cannot send multicast out of {interface}: {_reason(exc)}",
                                 exc.errno or 0) from exc
        for group in groups:
            join_group(sock, group, ifindex)
    except BaseException:
        sock.close()
        raise
    return sock


def _multicast_all_off(sock: socket.socket, family: socket.AddressFamily) -> None:
    """Deliver only the groups this socket joined: by default Linux hands a socket bound to the
    wildcard address the groups every other socket of the namespace joined, too."""
    if family == socket.AF_INET6:
        try:
            sock.setsockopt(socket.IPPROTO_IPV6, IPV6_MULTICAST_ALL, 0)
        except OSError as exc:  # before Linux 4.20 IPv6 has no such option (and no such leak)
            if exc.errno != errno.ENOPROTOOPT:
                raise
    else:
        sock.setsockopt(socket.IPPROTO_IP, IP_MULTICAST_ALL, 0)


def interface_index(sock: socket.socket, interface: Interface) -> int:
    """The ifindex of `interface` in the namespace `sock` belongs to (an int is taken as is);
    MulticastError if there is no such interface there."""
    if isinstance(interface, int):
        return interface
    name = interface.encode()
    if not name or len(name) >= 16:
        raise MulticastError(f"invalid interface name {interface!r}: 1 to 15 bytes")
    try:
        answer = fcntl.ioctl(sock.fileno(), SIOCGIFINDEX, _IFREQ_INDEX.pack(name, 0))
    except OSError as exc:
        if exc.errno == errno.ENODEV:
            raise MulticastError(f"no interface {interface} in this namespace: check its name",
                                 errno.ENODEV) from exc
        raise MulticastError(f"cannot look up interface {interface}: {_reason(exc)}",
                             exc.errno or 0) from exc
    return int(_IFREQ_INDEX.unpack(answer)[1])


def join_group(sock: socket.socket, group: str, interface: Interface) -> None:
    """Join multicast `group` on `interface` (IP_ADD_MEMBERSHIP / IPV6_JOIN_GROUP)."""
    _membership(sock, group, interface, join=True)


def leave_group(sock: socket.socket, group: str, interface: Interface) -> None:
    """Leave a group joined with `join_group` or `open_multicast`."""
    _membership(sock, group, interface, join=False)


def _membership(sock: socket.socket, group: str, interface: Interface, *, join: bool) -> None:
    family = _multicast_family(group)
    if family != sock.family:
        raise ValueError(f"{group} is not of this socket's family: open one socket per family")
    ifindex = interface_index(sock, interface)
    packed = socket.inet_pton(family, group)
    try:
        if family == socket.AF_INET6:
            option = socket.IPV6_JOIN_GROUP if join else socket.IPV6_LEAVE_GROUP
            sock.setsockopt(socket.IPPROTO_IPV6, option, _IPV6_MREQ.pack(packed, ifindex))
        else:
            option = socket.IP_ADD_MEMBERSHIP if join else socket.IP_DROP_MEMBERSHIP
            sock.setsockopt(socket.IPPROTO_IP, option, _IP_MREQN.pack(packed, bytes(4), ifindex))
    except OSError as exc:
        verb = "join" if join else "leave"
        code = exc.errno or 0
        if join and code == errno.EADDRINUSE:
            text = f"this socket has joined {group} on {interface} already"
        elif not join and code in (errno.EADDRNOTAVAIL, errno.EINVAL, errno.ENOENT):
            text = f"cannot leave {group} on {interface}: this socket is not a member"
        elif code == errno.ENOBUFS:
            text = (f"cannot join {group} on {interface}: too many groups for one socket "
                    "(IPv4: net.ipv4.igmp_max_memberships)")
        elif code == errno.ENODEV:
            text = f"cannot {verb} {group}: no interface {interface} (or it is down)"
        else:
            text = f"cannot {verb} {group} on {interface}: {_reason(exc)}"
        raise MulticastError(text, code) from exc


def recv_with_destination(
    sock: socket.socket, bufsize: int = MAX_RECEIVE, flags: int = 0
) -> ReceivedDatagram:
    """Receive one datagram with its destination address and arrival interface. The socket
    needs IP_PKTINFO / IPV6_RECVPKTINFO on (`open_multicast` sets it). Raises BlockingIOError on
    a non-blocking socket (or with MSG_DONTWAIT) when nothing is queued."""
    data, ancillary, msg_flags, source = sock.recvmsg(bufsize, PKTINFO_ANCILLARY_SPACE, flags)
    if msg_flags & socket.MSG_TRUNC:
        raise MulticastError(f"a datagram from {source[0]} was longer than {bufsize} bytes: "
                             "receive with a larger bufsize")
    found = destination_of(ancillary)
    if found is None:
        raise MulticastError("the datagram came without IP_PKTINFO / IPV6_PKTINFO: open the "
                             "socket with open_multicast (or turn packet info on)")
    return ReceivedDatagram(data, source, found[0], found[1])


def recv_batch_with_destination(
    sock: socket.socket, max_datagrams: int = 64, bufsize: int = MAX_RECEIVE
) -> list[ReceivedDatagram]:
    """Every datagram queued now (at most `max_datagrams`) without blocking; [] if none."""
    out: list[ReceivedDatagram] = []
    for _ in range(max_datagrams):
        try:
            out.append(recv_with_destination(sock, bufsize, socket.MSG_DONTWAIT))
        except BlockingIOError:
            break
    return out


def destination_of(ancillary: Sequence[tuple[int, int, bytes]]) -> tuple[str, int] | None:
    """(destination address, ifindex) from recvmsg ancillary data, None without packet info;
    ParseError for a packet-info message of the wrong size."""
    for level, kind, data in ancillary:
        if level == socket.IPPROTO_IP and kind == IP_PKTINFO:
            if len(data) < _IN_PKTINFO.size:
                raise ParseError(f"IP_PKTINFO of {len(data)} bytes, not {_IN_PKTINFO.size}")
            ifindex, _local, destination = _IN_PKTINFO.unpack_from(data)
            return socket.inet_ntop(socket.AF_INET, destination), int(ifindex)
        if level == socket.IPPROTO_IPV6 and kind == socket.IPV6_PKTINFO:
            if len(data) < _IN6_PKTINFO.size:
                raise ParseError(f"IPV6_PKTINFO of {len(data)} bytes, not {_IN6_PKTINFO.size}")
            destination6, ifindex6 = _IN6_PKTINFO.unpack_from(data)
            return socket.inet_ntop(socket.AF_INET6, destination6), int(ifindex6)
    return None


def _reason(exc: OSError) -> str:
    return exc.strerror or str(exc)


# --- unicast with packet info: answer from the address a datagram came to ----------------------
def open_with_destination(
    family: socket.AddressFamily, port: int, *, netns_name: str | None = None,
    buffer_bytes: int = 1 << 20,
) -> socket.socket:
    """A non-blocking UDP socket on `port` of every address of `family` (IPv6 only for
    AF_INET6) in namespace netns_name, with packet info on: `recv_with_destination` tells
    which local address each datagram came to, and `send_from` picks the source address."""
    return netns.call_in(netns_name, _open_with_destination_here, family, port, buffer_bytes)


def _open_with_destination_here(family: socket.AddressFamily, port: int,
                                buffer_bytes: int) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
    try:
        if buffer_bytes:
            _set_buffer(sock, SO_RCVBUFFORCE, socket.SO_RCVBUF, buffer_bytes)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_RECVPKTINFO, 1)
            sock.bind(("::", port))
        else:
            sock.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
            sock.bind(("0.0.0.0", port))
    except OSError as exc:
        sock.close()
        version = "IPv6" if family == socket.AF_INET6 else "IPv4"
        raise NetError(f"cannot open UDP port {port} ({version}): {_reason(exc)}",
                       exc.errno or 0) from exc
    return sock


def send_from(sock: socket.socket, data: bytes, address: Address, source: str | None) -> int:
    """Send one datagram to `address` from local address `source` (None: the kernel picks)."""
    if source is None:
        return sock.sendto(data, address)
    if sock.family == socket.AF_INET6:
        info = _IN6_PKTINFO.pack(socket.inet_pton(socket.AF_INET6, source), 0)
        ancillary = [(socket.IPPROTO_IPV6, socket.IPV6_PKTINFO, info)]
    else:
        info = _IN_PKTINFO.pack(0, socket.inet_pton(socket.AF_INET, source), bytes(4))
        ancillary = [(socket.IPPROTO_IP, IP_PKTINFO, info)]
    return sock.sendmsg([data], ancillary, 0, address)
