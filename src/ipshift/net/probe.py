"""Probe sockets bound to one uplink: ICMP echo, ARP and IPv6 neighbour solicitation.

Every socket is pinned to its uplink so that a probe never leaves through another one: bound to
the device (SO_BINDTODEVICE), sent from the uplink's source address, and marked (SO_MARK) so a
policy rule can route it through the uplink's own table even while the uplink's routes are
withdrawn elsewhere. ARP requests carry the route's preferred source address as the sender
(the seed's section 3), not whatever address the kernel would pick.

    echo = EchoSocket(4, "wan0", "198.51.100.2", mark=0x10000, ident=0x4242)
    echo.send("203.0.113.200", seq=1)
    for src, seq in echo.recv(): ...

All sockets are non-blocking; `fileno()` goes to `loop.add_reader`. Send errors (device down,
no route, address gone) are returned as False and count as a lost probe, never raised: the
detector decides what a silent uplink means. Malformed packets are skipped and counted.
The messages themselves are built and parsed by `ipshift.packet.icmp` and `ipshift.packet.nd`.
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
import struct

from ipshift.net.errors import NetError
from ipshift.packet.arp import ARP_REPLY, BROADCAST_MAC, ETH_P_ARP, ArpPacket
from ipshift.packet.errors import PacketError
from ipshift.packet.icmp import ICMP_ECHO_REPLY, ICMPV6_ECHO_REPLY, echo_message
from ipshift.packet.nd import (
    ND_NEIGHBOR_ADVERT,
    build_neighbour_solicit,
    parse_neighbour_advert,
    solicited_node,
)
from ipshift.packet.protocols import IPPROTO_ICMP, IPPROTO_ICMPV6
from ipshift.packet.transport import ICMPHeader

SO_MARK = 36
IP_FREEBIND = 15
IPV6_FREEBIND = 78
SOL_RAW = 255
ICMP_FILTER = 1
ICMP6_FILTER = 1


class ProbeSocketError(NetError):
    """A probe socket could not be opened (one line: what, where, why)."""


def _base_socket(
    family: int, kind: int, proto: int, device: str, mark: int | None
) -> socket.socket:
    sock = socket.socket(family, kind | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, device.encode())
        if mark is not None:
            sock.setsockopt(socket.SOL_SOCKET, SO_MARK, mark)
    except BaseException:
        sock.close()
        raise
    return sock


def _bind_source(sock: socket.socket, family: int, source: str | None, scope_id: int) -> None:
    if source is None:
        return
    # freebind: the socket can exist before the address does (it comes and goes with the link)
    if family == socket.AF_INET:
        sock.setsockopt(socket.IPPROTO_IP, IP_FREEBIND, 1)
        sock.bind((source, 0))
    else:
        sock.setsockopt(socket.IPPROTO_IPV6, IPV6_FREEBIND, 1)
        addr = ipaddress.IPv6Address(source)
        sock.bind((source, 0, 0, scope_id if addr.is_link_local else 0))


class EchoSocket:
    """ICMP (IPv4) or ICMPv6 echo requests through one device, from one source address."""

    def __init__(self, family: int, device: str, source: str | None, *, mark: int | None = None,
                 ident: int = 0, payload: bytes = b"ipshift-routes") -> None:
        self.family = socket.AF_INET6 if family in (6, socket.AF_INET6) else socket.AF_INET
        self.device = device
        self.source = source
        self.ident = ident & 0xFFFF
        self.payload = payload
        self.malformed = 0
        self.send_errors = 0
        proto = IPPROTO_ICMPV6 if self.family == socket.AF_INET6 else IPPROTO_ICMP
        try:
            self._scope = socket.if_nametoindex(device)
            self._sock = _base_socket(self.family, socket.SOCK_RAW, proto, device, mark)
        except OSError as exc:
            raise ProbeSocketError(f"cannot open an echo socket on {device}: "
                                   f"{exc.strerror or exc}", exc.errno or 0) from exc
        try:
            if self.family == socket.AF_INET:
                # receive only echo replies (the filter's set bits block types)
                self._sock.setsockopt(SOL_RAW, ICMP_FILTER,
                                      struct.pack("=I", ~(1 << ICMP_ECHO_REPLY) & 0xFFFFFFFF))
            else:
                self._sock.setsockopt(socket.IPPROTO_ICMPV6, ICMP6_FILTER,
                                      _icmp6_filter(ICMPV6_ECHO_REPLY))
            _bind_source(self._sock, self.family, source, self._scope)
        except OSError as exc:
            self._sock.close()
            raise ProbeSocketError(f"cannot bind an echo socket to {source} on {device}: "
                                   f"{exc.strerror or exc}", exc.errno or 0) from exc

    def fileno(self) -> int:
        return self._sock.fileno()

    def send(self, target: str, seq: int) -> bool:
        if self.family == socket.AF_INET:
            addr: tuple[object, ...] = (target, 0)
            message = echo_message(4, self.ident, seq & 0xFFFF, self.payload)
        else:
            ip6 = ipaddress.IPv6Address(target)
            addr = (target, 0, 0, self._scope if ip6.is_link_local else 0)
            # the kernel computes ICMPv6 checksums on raw sockets
            message = echo_message(6, self.ident, seq & 0xFFFF, self.payload)
        try:
            self._sock.sendto(message, addr)
        except OSError:
            self.send_errors += 1
            return False
        return True

    def recv(self, limit: int = 64) -> list[tuple[str, int]]:
        """(source, sequence) of the echo replies queued now that carry our identifier."""
        out: list[tuple[str, int]] = []
        for _ in range(limit):
            try:
                data, addr = self._sock.recvfrom(2048)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                break
            try:
                offset = 0
                if self.family == socket.AF_INET:
                    if not data or data[0] >> 4 != 4:
                        raise PacketError("bad-version", "not IPv4")
                    offset = (data[0] & 0x0F) * 4
                hdr = ICMPHeader.parse(data, offset)
            except PacketError:
                self.malformed += 1
                continue
            want = ICMP_ECHO_REPLY if self.family == socket.AF_INET else ICMPV6_ECHO_REPLY
            if hdr.type != want or hdr.identifier != self.ident:
                continue
            src = addr[0].split("%", 1)[0]
            out.append((str(ipaddress.ip_address(src)), hdr.sequence))
        return out

    def close(self) -> None:
        self._sock.close()


class ArpSocket:
    """ARP requests on one Ethernet device with a given sender address; replies to it."""

    def __init__(self, device: str, source: str) -> None:
        self.device = device
        self.source = ipaddress.IPv4Address(source)
        self.malformed = 0
        self.send_errors = 0
        try:
            self._sock = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC
                                       | socket.SOCK_NONBLOCK, socket.htons(ETH_P_ARP))
        except OSError as exc:
            raise ProbeSocketError(f"cannot open an ARP socket: {exc.strerror or exc}",
                                   exc.errno or 0) from exc
        try:
            self._sock.bind((device, ETH_P_ARP))
            name = self._sock.getsockname()
            self.mac = bytes(name[4][:6])
        except OSError as exc:
            self._sock.close()
            raise ProbeSocketError(f"cannot bind an ARP socket to {device}: "
                                   f"{exc.strerror or exc}", exc.errno or 0) from exc
        if len(self.mac) != 6 or not any(self.mac):
            self._sock.close()
            raise ProbeSocketError(f"{device} has no Ethernet address: ARP probes need one")

    def fileno(self) -> int:
        return self._sock.fileno()

    def send(self, target: str, dst_mac: bytes | None = None) -> bool:
        """Who has `target`? Unicast to `dst_mac` when known (like the kernel's PROBE state),
        else broadcast."""
        pkt = ArpPacket.request(self.mac, self.source, target).pack()
        try:
            self._sock.sendto(pkt, (self.device, ETH_P_ARP, 0, 0, dst_mac or BROADCAST_MAC))
        except OSError:
            self.send_errors += 1
            return False
        return True

    def recv(self, limit: int = 64) -> list[tuple[str, bytes]]:
        """(sender address, sender MAC) of replies addressed to our source."""
        out: list[tuple[str, bytes]] = []
        for _ in range(limit):
            try:
                data = self._sock.recv(256)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                break
            try:
                pkt = ArpPacket.parse(data)
            except PacketError:
                self.malformed += 1
                continue
            if pkt.op == ARP_REPLY and pkt.target_ip == self.source:
                out.append((str(pkt.sender_ip), pkt.sender_mac))
        return out

    def close(self) -> None:
        self._sock.close()


class NeighbourSolicitSocket:
    """IPv6 neighbour solicitations for a gateway on one device; advertisements back."""

    def __init__(self, device: str, source: str | None, mac: bytes | None = None) -> None:
        self.device = device
        self.source = source
        self.mac = mac
        self.malformed = 0
        self.send_errors = 0
        try:
            self._scope = socket.if_nametoindex(device)
            self._sock = _base_socket(socket.AF_INET6, socket.SOCK_RAW, IPPROTO_ICMPV6, device,
                                      None)
        except OSError as exc:
            raise ProbeSocketError(f"cannot open a neighbour solicitation socket on {device}: "
                                   f"{exc.strerror or exc}", exc.errno or 0) from exc
        try:
            for opt in (socket.IPV6_UNICAST_HOPS, socket.IPV6_MULTICAST_HOPS):
                self._sock.setsockopt(socket.IPPROTO_IPV6, opt, 255)  # RFC 4861: hop limit 255
            self._sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_IF, self._scope)
            self._sock.setsockopt(socket.IPPROTO_ICMPV6, ICMP6_FILTER,
                                  _icmp6_filter(ND_NEIGHBOR_ADVERT))
            _bind_source(self._sock, socket.AF_INET6, source, self._scope)
        except OSError as exc:
            self._sock.close()
            raise ProbeSocketError(f"cannot set up neighbour solicitations on {device}: "
                                   f"{exc.strerror or exc}", exc.errno or 0) from exc

    def fileno(self) -> int:
        return self._sock.fileno()

    def send(self, target: str, unicast: bool = False) -> bool:
        tgt = ipaddress.IPv6Address(target)
        body = build_neighbour_solicit(tgt, self.mac)
        dst = tgt if unicast else solicited_node(tgt)
        scope = self._scope if dst.is_link_local or dst.is_multicast else 0
        try:
            self._sock.sendto(body, (str(dst), 0, 0, scope))
        except OSError:
            self.send_errors += 1
            return False
        return True

    def recv(self, limit: int = 64) -> list[str]:
        """Target addresses of the advertisements queued now."""
        out: list[str] = []
        for _ in range(limit):
            try:
                data = self._sock.recv(2048)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                break
            try:
                out.append(str(parse_neighbour_advert(data)))
            except PacketError:
                self.malformed += 1
        return out

    def close(self) -> None:
        self._sock.close()


def _icmp6_filter(*passed: int) -> bytes:
    words = [0xFFFFFFFF] * 8  # block all ...
    for t in passed:  # ... but these
        words[t >> 5] &= ~(1 << (t & 31)) & 0xFFFFFFFF
    return struct.pack("=8I", *words)


def close_all(*socks: EchoSocket | ArpSocket | NeighbourSolicitSocket | None) -> None:
    for s in socks:
        if s is not None:
            with contextlib.suppress(OSError):
                s.close()
