"""The IP-in-IP and GRE side of the tunnel: raw sockets that carry inner packets to and from
peers that speak those encapsulations (RSIP tunnel types 1 and 2) instead of ipshift's UDP
framing. The codecs are `ipshift.tunnel.encap`; this module does the I/O.

    link = RawLink([IPv4Address("192.0.2.1")], netns_name="gw")
    link.send(peer, buf, offset, end, flags, gso_type, gso_size, csum_start, csum_offset)
    for fd in link.fds():                       # when one is readable:
        for arrival in link.receive(fd):        # RawArrival(encapsulation, host, selector, inner)
            ...

Per local address, three raw sockets of its family are bound to it: protocol 4 (IPv4 inside),
41 (IPv6 inside) and 47 (GRE). The kernel builds the outer header on send (source: the bound
address, TTL 64, the inner packet's TOS / traffic class copied through a control message,
fragmentation as the path MTU requires); IPv4 sockets receive the outer header with the packet,
IPv6 sockets do not (the encap docstring says which parser fits).

Send: a packet read from TUN may be a TSO/USO super-packet (`gso.Encapsulator` cuts it) and
may carry a partial L4 checksum. A plain IP-in-IP or GRE peer cannot complete a checksum, so
every packet leaves with its L4 checksum complete, summed here in software. GRE packets carry
the peer's key (RFC 2890) when it has one, never a checksum or a sequence number.

Receive: every raw socket of a protocol sees every packet of that protocol sent to its address,
so several links in one namespace (one per queue) would each get a copy. `share=(index,
count)` makes a link take only the senders whose address falls to it, filtered in the kernel
(a classic BPF program on the outer source address), the way UDP queues each have their port.
"""

from __future__ import annotations

import socket
import struct
from collections import Counter
from collections.abc import Sequence
from ipaddress import IPv4Address, IPv6Address
from typing import NamedTuple, Self

from ipshift.net import netns
from ipshift.net.errors import NetError
from ipshift.net.packetsock import (
    BPF_ABS,
    BPF_JEQ,
    BPF_JMP,
    BPF_K,
    BPF_LD,
    BPF_RET,
    BPF_W,
    BpfInsn,
    attach_filter,
)
from ipshift.net.sockbase import force_buffer
from ipshift.packet import vnet
from ipshift.packet.checksum import complete_partial_checksum, internet_sum
from ipshift.packet.errors import PacketError
from ipshift.packet.protocols import IPPROTO_GRE, IPPROTO_IPIP, IPPROTO_IPV6
from ipshift.tunnel import encap, gso, wire
from ipshift.tunnel.peers import Encapsulation, Peer

# The most one raw receive returns: an IPv4 packet, or an IPv6 payload, of 64 KB.
MAX_PACKET = 0xFFFF
# Receive space per link: packets of one receive() are laid out back to back, and a receive
# is only started with a whole MAX_PACKET of room left.
RECEIVE_SPACE = 4 * (MAX_PACKET + 1)
# Outer headers the kernel adds on send (IPv4 without options / IPv6 without extensions).
OUTER_HEADER_LEN = {4: 20, 6: 40}
# Where an inner packet's L4 header may start at the earliest, per IP version.
_MIN_L4_START = {4: 20, 6: 40}

_U16 = struct.Struct("!H")
_INT = struct.Struct("=i")
# Where the last 32 bits of the outer source address are, from the outer header's start.
_SOURCE_WORD: dict[int, int] = {socket.AF_INET: 12, socket.AF_INET6: 20}
_SKF_NET_OFF = -0x100000  # classic BPF: loads relative to the network header
_BPF_ALU_MOD_K = 0x04 | 0x90 | BPF_K
_PROTOCOLS = (IPPROTO_IPIP, IPPROTO_IPV6, IPPROTO_GRE)
# The control message that sets the outer TOS / traffic class, per outer family.
_TOS_OPTION: dict[int, tuple[int, int]] = {
    socket.AF_INET: (socket.IPPROTO_IP, socket.IP_TOS),
    socket.AF_INET6: (socket.IPPROTO_IPV6, socket.IPV6_TCLASS),
}
_MAX_ROUTES = 4096  # send plans kept (per peer object); one dropped is rebuilt on its next send
_MAX_ENCAPSULATORS = 8  # read buffers segmented from; the forwarder has one or two

Ancillary = list[tuple[int, int, bytes]]
_NO_ANCILLARY: Ancillary = []


class RawSendError(PacketError):
    """A packet read from TUN cannot be sent as IP-in-IP or GRE (not IPv4 or IPv6, a checksum
    position outside it, a super-packet that cannot be cut); counted, dropped."""


class RawLinkError(NetError):
    """The raw sockets of a link could not be opened."""


class RawArrival(NamedTuple):
    """One packet from an IP-in-IP or GRE sender: how it came, the sender's address (text, as
    `peers.endpoint_key` names it), the GRE key (0 without one, and for IP-in-IP), and the
    inner IP packet (a view of the link's receive space, valid until its next receive)."""

    encapsulation: Encapsulation
    host: str
    selector: int
    inner: memoryview


class _Receiver(NamedTuple):
    """What a raw socket receives and how its packets are parsed."""

    sock: socket.socket
    encapsulation: Encapsulation
    protocol: int
    outer_included: bool  # AF_INET: the outer IPv4 header comes with the packet


class _Route:
    """How packets reach one peer: the sockets for IPv4 and IPv6 inner packets, what goes
    before the inner packet (the GRE header, per inner version), and the destination."""

    __slots__ = ("address", "family", "lead4", "lead6", "peer", "sock4", "sock6")

    def __init__(self, peer: Peer, sockets: dict[int, socket.socket] | None) -> None:
        self.peer = peer
        host = peer.endpoint.host
        self.family = socket.AF_INET if host.version == 4 else socket.AF_INET6
        # None: no local address of the peer's family to send from.
        self.address: tuple[str, int] | None = None
        self.sock4: socket.socket | None = None
        self.sock6: socket.socket | None = None
        self.lead4: list[bytes] = []
        self.lead6: list[bytes] = []
        if sockets is None:
            return
        self.address = (str(host), 0)
        if peer.encapsulation is Encapsulation.GRE:
            self.sock4 = self.sock6 = sockets[IPPROTO_GRE]
            self.lead4 = [encap.gre_header(b"\x40", key=peer.gre_key)]
            self.lead6 = [encap.gre_header(b"\x60", key=peer.gre_key)]
        else:
            self.sock4 = sockets[IPPROTO_IPIP]
            self.sock6 = sockets[IPPROTO_IPV6]


def share_filter(family: int, index: int, count: int) -> list[BpfInsn]:
    """A classic BPF program that keeps the packets whose outer source address, its last 32
    bits taken modulo `count`, is `index`."""
    return [
        (BPF_LD | BPF_W | BPF_ABS, 0, 0, (_SKF_NET_OFF + _SOURCE_WORD[family]) & 0xFFFFFFFF),
        (_BPF_ALU_MOD_K, 0, 0, count),
        (BPF_JMP | BPF_JEQ | BPF_K, 0, 1, index),
        (BPF_RET | BPF_K, 0, 0, 0xFFFFFFFF),
        (BPF_RET | BPF_K, 0, 0, 0),
    ]


def _open_sockets(
    addresses: Sequence[IPv4Address | IPv6Address], buffer_bytes: int,
    share: tuple[int, int] | None,
) -> list[tuple[IPv4Address | IPv6Address, int, socket.socket]]:
    """Every (address, protocol, socket) of a link, opened in the calling thread's namespace."""
    opened: list[tuple[IPv4Address | IPv6Address, int, socket.socket]] = []
    try:
        for address in addresses:
            family = socket.AF_INET if address.version == 4 else socket.AF_INET6
            for protocol in _PROTOCOLS:
                try:
                    sock = socket.socket(family, socket.SOCK_RAW | socket.SOCK_CLOEXEC, protocol)
                except OSError as exc:
                    raise RawLinkError(
                        f"cannot open a raw IPv{address.version} socket for protocol "
                        f"{protocol}: {exc.strerror or exc} (needs CAP_NET_RAW)",
                        exc.errno or 0) from exc
                opened.append((address, protocol, sock))
                try:
                    if buffer_bytes:
                        force_buffer(sock, "rcv", buffer_bytes)
                        force_buffer(sock, "snd", buffer_bytes)
                    if share is not None and share[1] > 1:
                        # Before bind: no packet of another share is ever queued.
                        attach_filter(sock, share_filter(family, *share))
                    sock.bind((str(address), 0))
                except OSError as exc:
                    raise RawLinkError(
                        f"cannot bind raw sockets to {address}: {exc.strerror or exc} "
                        "(is the address on this host, in this namespace?)",
                        exc.errno or 0) from exc
    except BaseException:
        for _address, _protocol, sock in opened:
            sock.close()
        raise
    return opened


def overhead(peer: Peer) -> int:
    """Bytes an IP-in-IP or GRE peer's encapsulation adds to each inner packet (for the tunnel
    MTU): the outer header, and GRE's 4 bytes plus 4 for a key."""
    added = OUTER_HEADER_LEN[peer.endpoint.host.version]
    if peer.encapsulation is Encapsulation.GRE:
        added += 4 if peer.gre_key is None else 8
    return added


class PlainSegmenter:
    """Turns a packet read from TUN into complete IP packets, for peers that neither take
    super-packets nor complete checksums. No I/O.

    A super-packet is cut by `gso.Encapsulator` (one per read buffer, kept: it reuses its
    header areas); then every segment's L4 checksum, which holds the segment's pseudo-header
    sum, is completed in its header slot. A lone packet's partial checksum is completed in
    place, in the read buffer."""

    def __init__(self) -> None:
        self._encapsulators: dict[tuple[int, int], tuple[bytearray, gso.Encapsulator]] = {}

    def segment(
        self, buf: bytearray, offset: int, end: int, flags: int, gso_type: int, gso_size: int,
        csum_start: int, csum_offset: int,
    ) -> list[gso.Buffer]:
        """The packet buf[offset:end] (vnet fields given separately, csum_start counted from
        offset) as complete packets: a list alternating each packet's headers and the rest of
        it (empty for a lone packet). It points into buf and into this object's header areas,
        valid until the next call. Raises RawSendError or gso.SegmentError (PacketErrors)."""
        size = end - offset
        if size < 20 or offset < 0 or end > len(buf):
            raise RawSendError("truncated", f"{size}-byte packet at {offset}:{end}")
        version = buf[offset] >> 4
        if version != 4 and version != 6:
            raise RawSendError("bad-version", f"IP version {version} read from TUN")
        if gso_type & vnet.GSO_TYPE_MASK != vnet.GSO_NONE:
            iov, segment = self._encapsulator(buf, offset).encapsulate(
                end, flags, gso_type, gso_size, csum_start, csum_offset)
            if segment:
                return self._complete_segments(iov, csum_start, csum_offset)
            # No more payload than one segment: the packet as it is (its checksum partial).
        if flags & vnet.F_NEEDS_CSUM:
            if csum_start < _MIN_L4_START[version] or csum_start + csum_offset + 2 > size:
                raise RawSendError("vnet-csum", f"checksum at {csum_start}+{csum_offset}, "
                                   f"{size}-byte packet")
            complete_partial_checksum(buf, offset + csum_start, csum_offset, end)
        return [memoryview(buf)[offset:end], b""]

    @staticmethod
    def _complete_segments(iov: gso.IoVec, csum_start: int, csum_offset: int
                           ) -> list[gso.Buffer]:
        # iov alternates [tunnel header + IP/L4 headers] slots and payload slices; the list
        # is the Encapsulator's fresh copy, so its header entries can be replaced.
        l4_at = wire.HEADER_LEN + csum_start
        field_at = l4_at + csum_offset
        pack_into = _U16.pack_into
        for index in range(0, len(iov), 2):
            header = iov[index]
            assert isinstance(header, memoryview)
            # An L4 header's length is a multiple of 4: its sum and the payload's chain.
            pack_into(header, field_at,
                      ~internet_sum(iov[index + 1], internet_sum(header[l4_at:])) & 0xFFFF
                      or 0xFFFF)
            iov[index] = header[wire.HEADER_LEN:]
        return iov

    def _encapsulator(self, buf: bytearray, offset: int) -> gso.Encapsulator:
        entry = self._encapsulators.get((id(buf), offset))
        if entry is not None and entry[0] is buf:
            return entry[1]
        if len(self._encapsulators) >= _MAX_ENCAPSULATORS:
            self._encapsulators.clear()
        encapsulator = gso.Encapsulator(buf, offset)
        self._encapsulators[(id(buf), offset)] = (buf, encapsulator)
        return encapsulator


class RawLink:
    """The IP-in-IP and GRE side of one tunnel end (one queue): raw sockets bound to the local
    underlay addresses.

    `share=(index, count)`: this link receives only from the senders whose address falls to
    it among `count` links in the namespace (one per queue); None or a count of 1: from all.
    Sending is not affected.

    Counters: `send_errors` (datagrams the kernel refused: ENOBUFS, EHOSTUNREACH, ..., and
    packets to a peer of a family no local address has), `receive_errors`, and `malformed`
    (received packets dropped, per `EncapError` reason).

    A read buffer passed to `send` must not be resized afterwards: the segmenter keeps a view
    of it."""

    def __init__(
        self,
        local_addresses: Sequence[IPv4Address | IPv6Address],
        *,
        netns_name: str | None = None,
        buffer_bytes: int = 4 << 20,
        share: tuple[int, int] | None = None,
    ) -> None:
        if share is not None and not 0 <= share[0] < share[1]:
            raise ValueError(f"share {share}: the link's index must be below the count of links")
        self.send_errors = 0
        self.receive_errors = 0
        self.malformed: Counter[str] = Counter()
        self._sockets: list[socket.socket] = []
        self._receivers: dict[int, _Receiver] = {}
        # Per family, the sockets of its first local address by protocol: what sends use.
        self._senders: dict[int, dict[int, socket.socket]] = {}
        self._routes: dict[int, _Route] = {}
        self.segmenter = PlainSegmenter()
        self._tos_ancillary: dict[tuple[int, int], Ancillary] = {}
        self._space = bytearray(RECEIVE_SPACE)
        self._view = memoryview(self._space)
        for _address, protocol, sock in netns.call_in(
            netns_name, _open_sockets, list(local_addresses), buffer_bytes, share
        ):
            self._sockets.append(sock)
            family = sock.family
            self._senders.setdefault(family, {}).setdefault(protocol, sock)
            self._receivers[sock.fileno()] = _Receiver(
                sock,
                Encapsulation.GRE if protocol == IPPROTO_GRE else Encapsulation.IPIP,
                protocol,
                family == socket.AF_INET,
            )

    # --- send ---------------------------------------------------------------------------------
    def send(
        self, peer: Peer, buf: bytearray, offset: int, end: int, flags: int, gso_type: int,
        gso_size: int, csum_start: int, csum_offset: int,
    ) -> int:
        """Send the packet buf[offset:end], as read from TUN with these virtio_net_hdr fields
        (csum_start counted from offset), to `peer` in its encapsulation: a super-packet cut
        into its packets, every L4 checksum completed (`PlainSegmenter`). Returns how many
        datagrams left; send failures are counted, never raised. Raises a PacketError
        (RawSendError, gso.SegmentError) for a packet that cannot be sent."""
        route = self._routes.get(id(peer))
        if route is None or route.peer is not peer:
            route = self._route(peer)
        pieces = self.segmenter.segment(buf, offset, end, flags, gso_type, gso_size, csum_start,
                                        csum_offset)
        first = buf[offset]
        if first >> 4 == 4:
            sock, lead = route.sock4, route.lead4
            tos = buf[offset + 1]
        else:
            sock, lead = route.sock6, route.lead6
            tos = (first & 0x0F) << 4 | buf[offset + 1] >> 4
        address = route.address
        if sock is None or address is None:
            self.send_errors += len(pieces) // 2
            return 0
        ancillary = self._ancillary(route.family, tos) if tos else _NO_ANCILLARY
        sendmsg = sock.sendmsg
        sent = 0
        for index in range(0, len(pieces), 2):
            try:
                sendmsg([*lead, pieces[index], pieces[index + 1]], ancillary, 0, address)
            except OSError:
                self.send_errors += 1
            else:
                sent += 1
        return sent

    def _route(self, peer: Peer) -> _Route:
        if peer.encapsulation is Encapsulation.UDP:
            raise ValueError(f"peer {peer.name!r} uses UDP framing, not a raw link")
        if len(self._routes) >= _MAX_ROUTES:
            self._routes.clear()
        family = socket.AF_INET if peer.endpoint.host.version == 4 else socket.AF_INET6
        route = self._routes[id(peer)] = _Route(peer, self._senders.get(family))
        return route

    def _ancillary(self, family: int, tos: int) -> Ancillary:
        """The control message that sets the outer TOS / traffic class (built once per value)."""
        ancillary = self._tos_ancillary.get((family, tos))
        if ancillary is None:
            level, option = _TOS_OPTION[family]
            ancillary = self._tos_ancillary[(family, tos)] = [(level, option, _INT.pack(tos))]
        return ancillary

    # --- receive ------------------------------------------------------------------------------
    def fds(self) -> list[int]:
        """The raw sockets to poll for reading."""
        return list(self._receivers)

    def receive(self, fd: int, budget: int = 16) -> list[RawArrival]:
        """Up to `budget` packets queued on the raw socket `fd` (never waits). Malformed ones
        are counted in `malformed` by reason and left out; the inner packets returned are
        valid until the next receive on this link."""
        receiver = self._receivers.get(fd)
        if receiver is None:
            raise ValueError(f"fd {fd} is not a socket of this raw link")
        sock, encapsulation, protocol, outer_included = receiver
        receive_into = sock.recvfrom_into
        space = self._space
        view = self._view
        last_start = len(space) - MAX_PACKET - 1
        gre = encapsulation is Encapsulation.GRE
        ipip_protocol = None if outer_included else protocol
        arrivals: list[RawArrival] = []
        position = 0
        for _ in range(budget):
            if position > last_start:
                break  # no room for one more whole packet: the rest waits for the next call
            try:
                nbytes, sender = receive_into(view[position:], 0, socket.MSG_DONTWAIT)
            except BlockingIOError:
                break
            except OSError:
                self.receive_errors += 1
                continue
            end = position + nbytes
            try:
                if gre:
                    found = encap.parse_gre(space, position, end, outer_included=outer_included)
                else:
                    found = encap.parse_ipip(space, position, end, protocol=ipip_protocol)
            except encap.EncapError as exc:
                self.malformed[exc.reason] += 1
                continue
            arrivals.append(RawArrival(encapsulation, sender[0], found.key or 0,
                                       view[found.inner_offset:found.inner_end]))
            position = end
        return arrivals

    # --- lifetime -----------------------------------------------------------------------------
    def close(self) -> None:
        """Close every socket (again: nothing happens)."""
        for sock in self._sockets:
            sock.close()
        self._sockets.clear()
        self._receivers.clear()
        self._senders.clear()
        self._routes.clear()
        self.segmenter = PlainSegmenter()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["MAX_PACKET", "OUTER_HEADER_LEN", "PlainSegmenter", "RawArrival", "RawLink",
           "RawLinkError", "RawSendError", "overhead", "share_filter"]
