"""In-place rewriting for the per-packet hot path.

`FlowRewrite` changes the addresses and/or ports of one flow in a writable buffer and updates
the IPv4 header checksum and the TCP/UDP/UDP-Lite/DCCP/ICMPv6 checksum incrementally, with
deltas computed once when the rewrite is created (RFC 1624). `decrement_hop_limit` and
`set_hop_limit` change the TTL / hop limit, keeping the IPv4 header checksum right.
"""

from __future__ import annotations

import ipaddress
import struct

from ipshift.packet.checksum import (
    apply_delta,
    apply_delta_partial,
    checksum_delta,
    ones_add,
    word_delta,
)
from ipshift.packet.errors import BytesLike, PacketError, WritableBuffer
from ipshift.packet.ipv4 import source_route_destination
from ipshift.packet.ipv6 import walk_header_chain
from ipshift.packet.protocols import (
    IPPROTO_DCCP,
    IPPROTO_ICMP,
    IPPROTO_ICMPV6,
    IPPROTO_TCP,
    IPPROTO_UDP,
    IPPROTO_UDPLITE,
)
from ipshift.packet.transport import ICMP_ERROR_TYPES, ICMPV6_ERROR_TYPES
from ipshift.packet.view import parse_packet

AddressLike = str | bytes | ipaddress.IPv4Address | ipaddress.IPv6Address

_V4 = struct.Struct("!BxHxxHxBH4s4s")  # version/IHL, total length, fragment, protocol, csum, addrs
_V4_WRITE = struct.Struct("!H4s4s")  # header checksum, src, dst (at offset 10)
_V6 = struct.Struct("!BxxxHBx16s16s")  # version, payload length, next header, addresses
_V6_WRITE = struct.Struct("!16s16s")
_U16 = struct.Struct("!H")
_PORTS = struct.Struct("!HH")
_unpack_v4_fast = struct.Struct("!BxHxxHxBH4s4s6xH8xH").unpack_from
_pack_u16 = _U16.pack_into
_unpack_u16 = _U16.unpack_from
_unpack_v6 = _V6.unpack_from
_pack_v6_write = _V6_WRITE.pack_into
_unpack_ports = _PORTS.unpack_from
_pack_ports = _PORTS.pack_into
_pack_v4_write = _V4_WRITE.pack_into

# Upper layers whose checksum covers a pseudo-header: protocol -> (checksum offset, smallest
# header, has ports, a zero checksum means "none"). ICMPv4 is not here: it has no pseudo-header.
_PSEUDO_HEADER_PROTOCOLS: dict[int, tuple[int, int, bool, bool]] = {
    IPPROTO_TCP: (16, 20, True, False),
    IPPROTO_UDP: (6, 8, True, True),
    IPPROTO_UDPLITE: (6, 8, True, False),
    IPPROTO_DCCP: (6, 12, True, False),
    IPPROTO_ICMPV6: (2, 8, False, False),
}
_V4_PSEUDO_HEADER_PROTOCOLS = frozenset(_PSEUDO_HEADER_PROTOCOLS) - {IPPROTO_ICMPV6}


def _address(value: AddressLike) -> bytes:
    if isinstance(value, bytes):
        if len(value) not in (4, 16):
            raise ValueError(f"an address is 4 or 16 bytes, not {len(value)}")
        return value
    return ipaddress.ip_address(value).packed


class FlowRewrite:
    """Rewrite source and/or destination address and port of one flow, in place.

    Each of `src`, `dst`, `sport`, `dport` is an (old, new) pair or None for "leave alone".
    `apply` rewrites a packet whose fields equal the old values and returns True; a packet of
    another flow (or of the other IP version) is left untouched and gives False. Fields a packet
    does not carry (ports of ICMP or of a non-first fragment) are skipped.

    Checksums: the IPv4 header checksum and the upper-layer checksum of TCP, UDP, UDP-Lite,
    DCCP and ICMPv6 get the precomputed delta. With ``partial_checksum=True`` (the packet came
    with VIRTIO_NET_HDR_F_NEEDS_CSUM) the upper-layer field holds the non-complemented
    pseudo-header sum: only the address delta is added to it, and port changes need nothing,
    as the device sums the ports when it completes the checksum.

    With `icmp_errors` (the default), an ICMP or ICMPv6 error whose quoted packet belongs to
    the reverse direction (a router's answer to a packet this flow's reverse rewrite sent) gets
    the quoted packet rewritten too, so the local stack recognises its own packet. ICMP has no
    ports: the error itself matches by address, its quote by addresses and ports.
    """

    __slots__ = (
        "_addr_delta",
        "_dst_delta",
        "_fast",
        "_fast_v6",
        "_full_delta",
        "_new_dport",
        "_new_dst",
        "_new_sport",
        "_new_src",
        "_old_dport",
        "_old_dst",
        "_old_sport",
        "_old_src",
        "_port_delta",
        "_quoted",
        "_rewrites_ports",
        "_src_delta",
        "_version",
        "dport",
        "dst",
        "sport",
        "src",
    )

    def __init__(
        self,
        *,
        src: tuple[AddressLike, AddressLike] | None = None,
        dst: tuple[AddressLike, AddressLike] | None = None,
        sport: tuple[int, int] | None = None,
        dport: tuple[int, int] | None = None,
        icmp_errors: bool = True,
    ) -> None:
        self.src = (_address(src[0]), _address(src[1])) if src else None
        self.dst = (_address(dst[0]), _address(dst[1])) if dst else None
        sizes = {len(a) for pair in (self.src, self.dst) if pair for a in pair}
        if len(sizes) > 1:
            raise ValueError("all addresses of a FlowRewrite must be of one IP version")
        #: 4 or 6; 0 for a ports-only rewrite, which applies to both versions.
        self._version = (4 if sizes.pop() == 4 else 6) if sizes else 0
        for pair in (sport, dport):
            if pair and not all(0 <= port <= 0xFFFF for port in pair):
                raise ValueError(f"ports must be 0..65535, not {pair}")
        self.sport = sport
        self.dport = dport

        # None marks "do not compare, do not change"; the hot path reads these flat slots.
        self._old_src: bytes | None = self.src[0] if self.src else None
        self._new_src: bytes | None = self.src[1] if self.src else None
        self._old_dst: bytes | None = self.dst[0] if self.dst else None
        self._new_dst: bytes | None = self.dst[1] if self.dst else None
        self._old_sport: int | None = sport[0] if sport else None
        self._new_sport: int | None = sport[1] if sport else None
        self._old_dport: int | None = dport[0] if dport else None
        self._new_dport: int | None = dport[1] if dport else None
        self._src_delta = checksum_delta(*self.src) if self.src else 0
        self._dst_delta = checksum_delta(*self.dst) if self.dst else 0
        self._addr_delta = ones_add(self._src_delta, self._dst_delta)
        self._port_delta = 0
        self._rewrites_ports = bool(sport or dport)
        if sport or dport:
            old = _PORTS.pack(sport[0] if sport else 0, dport[0] if dport else 0)
            new = _PORTS.pack(sport[1] if sport else 0, dport[1] if dport else 0)
            self._port_delta = checksum_delta(old, new)
        self._full_delta = ones_add(self._addr_delta, self._port_delta)
        # What the fast path of `apply` needs, in one attribute.
        self._fast = (
            self._version != 6,
            self._old_src,
            self._old_dst,
            self._new_src,
            self._new_dst,
            self._addr_delta,
            (
                (self._old_sport, self._old_dport, self._new_sport, self._new_dport,
                 self._full_delta)
                if self._rewrites_ports
                else None
            ),
        )
        self._fast_v6 = (self._version != 4, *self._fast[1:])
        # An ICMP error travels back: the packet it quotes has source and destination swapped.
        self._quoted = (
            FlowRewrite(src=self.dst, dst=self.src, sport=dport, dport=sport, icmp_errors=False)
            if icmp_errors
            else None
        )

    @classmethod
    def source(cls, old: AddressLike, new: AddressLike) -> FlowRewrite:
        """Rewrite the source address `old` into `new`."""
        return cls(src=(old, new))

    @classmethod
    def destination(cls, old: AddressLike, new: AddressLike) -> FlowRewrite:
        """Rewrite the destination address `old` into `new`."""
        return cls(dst=(old, new))

    def reverse(self) -> FlowRewrite:
        """The rewrite for the replies: they arrive addressed to the new source (and from the
        new destination, ports likewise) and must be turned back into the old ones."""
        return FlowRewrite(
            src=(self.dst[1], self.dst[0]) if self.dst else None,
            dst=(self.src[1], self.src[0]) if self.src else None,
            sport=(self.dport[1], self.dport[0]) if self.dport else None,
            dport=(self.sport[1], self.sport[0]) if self.sport else None,
            icmp_errors=self._quoted is not None,
        )

    def __repr__(self) -> str:
        parts = [
            f"{name} {ipaddress.ip_address(pair[0])} -> {ipaddress.ip_address(pair[1])}"
            for name, pair in (("src", self.src), ("dst", self.dst))
            if pair
        ]
        parts += [
            f"{name} {ports[0]} -> {ports[1]}"
            for name, ports in (("sport", self.sport), ("dport", self.dport))
            if ports
        ]
        return f"FlowRewrite({', '.join(parts) or 'nothing'})"

    # -- hot path ------------------------------------------------------------------------------
    def apply(self, buf: WritableBuffer, offset: int = 0, partial_checksum: bool = False) -> bool:
        """Rewrite the packet at `buf[offset:]` in place if it belongs to this flow.

        Returns False (packet untouched) for another flow; raises PacketError for a malformed
        packet (also left untouched).
        """
        # Fast path: an unfragmented (or first fragment) IPv4 TCP or UDP packet with a 20-byte
        # header; one unpack reads the IPv4 header and both candidate checksum fields (UDP at
        # 26, TCP at 36). Everything else takes the general path, `_apply_general`.
        try:
            first, total, fragment, protocol, header_sum, src, dst, udp_sum, tcp_sum = (
                _unpack_v4_fast(buf, offset)
            )
        except struct.error:
            return self._apply_general(buf, offset, partial_checksum)
        if first != 0x45:
            if first >> 4 == 6:
                return self._version != 4 and self._apply_v6(buf, offset, partial_checksum)
            return self._apply_general(buf, offset, partial_checksum)
        fast, old_src, old_dst, new_src, new_dst, delta, ports = self._fast
        if not fast or fragment & 0x1FFF:
            return self._apply_general(buf, offset, partial_checksum)
        if (old_src is not None and src != old_src) or (old_dst is not None and dst != old_dst):
            return False
        if protocol == IPPROTO_TCP:
            checksum_at = offset + 36
            value = tcp_sum
            smallest = 40  # IPv4 and TCP headers
        elif protocol == IPPROTO_UDP:
            checksum_at = offset + 26
            value = udp_sum
            smallest = 28
        else:
            return self._apply_general(buf, offset, partial_checksum)
        if not smallest <= total <= len(buf) - offset:
            return self._apply_general(buf, offset, partial_checksum)
        full_delta = delta
        if ports is not None:
            old_sport, old_dport, new_sport, new_dport, full_delta = ports
            sport, dport = _unpack_ports(buf, offset + 20)
            if (old_sport is not None and sport != old_sport) or (
                old_dport is not None and dport != old_dport
            ):
                return False
            _pack_ports(
                buf,
                offset + 20,
                sport if new_sport is None else new_sport,
                dport if new_dport is None else new_dport,
            )
        if partial_checksum:  # the device sums the ports: only the addresses count
            value += delta
            value = (value & 0xFFFF) + (value >> 16) or 0xFFFF
        elif value or protocol == IPPROTO_TCP:  # an IPv4 UDP checksum of 0 means "none"
            value = 0xFFFF - value + full_delta  # RFC 1624 eqn. 3, as in `apply_delta`
            value = (value & 0xFFFF) + (value >> 16)
            value = 0xFFFF - value if value else 0
            if not value and protocol == IPPROTO_UDP:
                value = 0xFFFF  # a computed 0 is sent as 0xFFFF
        _pack_u16(buf, checksum_at, value)
        header_sum = 0xFFFF - header_sum + delta
        header_sum = (header_sum & 0xFFFF) + (header_sum >> 16)
        _pack_v4_write(
            buf, offset + 10, 0xFFFF - header_sum if header_sum else 0, new_src or src,
            new_dst or dst,
        )
        return True

    def _apply_general(self, buf: WritableBuffer, offset: int, partial: bool) -> bool:
        try:
            version = buf[offset] >> 4
        except IndexError:
            raise PacketError("truncated", "empty packet") from None
        if version == 4:
            return self._version != 6 and self._apply_v4(buf, offset, partial)
        if version == 6:
            return self._version != 4 and self._apply_v6(buf, offset, partial)
        raise PacketError("bad-version", f"IP version {version}")

    def _apply_v4(self, buf: WritableBuffer, offset: int, partial: bool) -> bool:
        try:
            first, total, fragment, protocol, header_sum, src, dst = _V4.unpack_from(buf, offset)
        except struct.error:
            raise PacketError("truncated", "IPv4 header needs 20 bytes") from None
        old_src = self._old_src
        old_dst = self._old_dst
        if (old_src is not None and src != old_src) or (old_dst is not None and dst != old_dst):
            return False
        start = offset + ((first & 15) << 2)
        end = offset + total
        if not offset + 20 <= start <= end <= len(buf):
            parse_packet(buf, offset)  # raises the precise error
            raise PacketError("length-mismatch", "IPv4 lengths do not fit")  # pragma: no cover
        # The upper layer first: it may still refuse the packet (ports, truncation), and then
        # nothing must have been written.
        if not fragment & 0x1FFF:
            delta = self._addr_delta
            if old_dst is not None and start - offset > 20 and source_route_destination(
                buf, offset + 20, start
            ) >= 0:
                delta = self._src_delta  # the pseudo-header holds the route's final destination
            if protocol in _V4_PSEUDO_HEADER_PROTOCOLS and not self._update_transport(
                buf, protocol, start, end, partial, delta
            ):
                return False
            elif protocol == IPPROTO_ICMP and self._quoted is not None:
                self._update_icmp_error(buf, start, end, partial)
        if old_src is not None or old_dst is not None:
            total_sum = (~header_sum & 0xFFFF) + self._addr_delta
            total_sum = (total_sum & 0xFFFF) + (total_sum >> 16)
            _V4_WRITE.pack_into(
                buf,
                offset + 10,
                ~total_sum & 0xFFFF if total_sum else 0,
                self._new_src or src,
                self._new_dst or dst,
            )
        return True

    def _apply_v6(self, buf: WritableBuffer, offset: int, partial: bool) -> bool:
        try:
            _, length, protocol, src, dst = _unpack_v6(buf, offset)
        except struct.error:
            raise PacketError("truncated", "IPv6 header needs 40 bytes") from None
        fast, old_src, old_dst, new_src, new_dst, delta, ports = self._fast_v6
        if (old_src is not None and src != old_src) or (old_dst is not None and dst != old_dst):
            return False
        start = offset + 40
        end = start + length
        if end > len(buf):
            raise PacketError("truncated", f"payload length exceeds the {len(buf) - offset} bytes")
        if fast and ports is None and protocol in (IPPROTO_TCP, IPPROTO_UDP):
            # Fast path: no extension headers, addresses only. It refuses what
            # `_update_transport` refuses: a header shorter than 20 (TCP) or 8 (UDP) bytes.
            if protocol == IPPROTO_TCP:
                checksum_at = start + 16
                smallest = 20
            else:
                checksum_at = start + 6
                smallest = 8
            if end - start < smallest:
                raise PacketError("truncated", f"protocol {protocol} header cut short")
            (value,) = _unpack_u16(buf, checksum_at)
            if partial:
                value += delta
                value = (value & 0xFFFF) + (value >> 16) or 0xFFFF
            elif value or protocol == IPPROTO_TCP:  # UDP checksum 0: none (RFC 6935 over IPv6)
                value = 0xFFFF - value + delta
                value = (value & 0xFFFF) + (value >> 16)
                value = 0xFFFF - value if value else 0
                if not value and protocol == IPPROTO_UDP:
                    value = 0xFFFF
            _pack_u16(buf, checksum_at, value)
            _pack_v6_write(buf, offset + 8, new_src or src, new_dst or dst)
            return True
        if protocol not in _PSEUDO_HEADER_PROTOCOLS:
            chain = walk_header_chain(buf, offset, end)
            protocol = -1 if chain.later_fragment else chain.protocol
            start = chain.offset
            if chain.pseudo_src_offset != offset + 8 or chain.pseudo_dst_offset != offset + 24:
                # The pseudo-header takes a routing header's final destination or a home
                # address instead of the header's field: that field's change does not count.
                delta = ones_add(
                    self._src_delta if chain.pseudo_src_offset == offset + 8 else 0,
                    self._dst_delta if chain.pseudo_dst_offset == offset + 24 else 0,
                )
        if protocol in _PSEUDO_HEADER_PROTOCOLS and not self._update_transport(
            buf, protocol, start, end, partial, delta
        ):
            return False
        if old_src is not None or old_dst is not None:
            _pack_v6_write(buf, offset + 8, new_src or src, new_dst or dst)
        return True

    def _update_transport(
        self,
        buf: WritableBuffer,
        protocol: int,
        start: int,
        end: int,
        partial: bool,
        addr_delta: int,
    ) -> bool:
        """Rewrite ports and update the pseudo-header checksum of the upper layer at `start`.
        `addr_delta` is the change of the pseudo-header addresses. False if the ports are not
        this flow's (then nothing has been written)."""
        checksum_at, smallest, has_ports, zero_is_none = _PSEUDO_HEADER_PROTOCOLS[protocol]
        if end - start < smallest:
            raise PacketError("truncated", f"protocol {protocol} header cut short")
        delta = addr_delta
        if has_ports and self._rewrites_ports:
            sport, dport = _PORTS.unpack_from(buf, start)
            old_sport = self._old_sport
            old_dport = self._old_dport
            if (old_sport is not None and sport != old_sport) or (
                old_dport is not None and dport != old_dport
            ):
                return False
            new_sport = self._new_sport
            new_dport = self._new_dport
            _PORTS.pack_into(
                buf,
                start,
                sport if new_sport is None else new_sport,
                dport if new_dport is None else new_dport,
            )
            if not partial:  # a partial checksum does not cover the ports yet
                delta = ones_add(delta, self._port_delta)
        checksum_at += start
        (value,) = _U16.unpack_from(buf, checksum_at)
        if protocol == IPPROTO_ICMPV6 and buf[start] in ICMPV6_ERROR_TYPES and self._quoted:
            change = self._quoted.rewrite_quoted(buf, start + 8, end, start)
            if change is not None and not partial:
                delta = ones_add(delta, change)
        if partial:
            value = apply_delta_partial(value, addr_delta)
        elif not zero_is_none:
            value = apply_delta(value, delta)
        elif value:  # a UDP datagram without checksum stays without (IPv6: RFC 6935)
            value = apply_delta(value, delta) or 0xFFFF
        _U16.pack_into(buf, checksum_at, value)
        return True

    def _update_icmp_error(self, buf: WritableBuffer, start: int, end: int, partial: bool) -> None:
        """ICMPv4: rewrite a quoted packet and update the ICMP checksum (no pseudo-header)."""
        if end - start < 8 or buf[start] not in ICMP_ERROR_TYPES or self._quoted is None:
            return
        change = self._quoted.rewrite_quoted(buf, start + 8, end, start)
        if change is not None and not partial:
            (value,) = _U16.unpack_from(buf, start + 2)
            _U16.pack_into(buf, start + 2, apply_delta(value, change))

    def rewrite_quoted(
        self, buf: WritableBuffer, start: int, end: int, align: int = 0
    ) -> int | None:
        """Rewrite the packet an ICMP error quotes at `buf[start:end]` (often truncated) if it
        belongs to this flow, updating its own checksums as far as they are in the quote.

        Returns the ones' complement sum of the change of its bytes (for the enclosing
        checksum, whose 16-bit words start at `align`), or None if it is not of this flow.
        """
        if end - start < 20:
            return None
        version = buf[start] >> 4
        if version == 4 and self._version != 6:
            first, _, fragment, protocol, header_sum, src, dst = _V4.unpack_from(buf, start)
            header_end = start + ((first & 15) << 2)
            if header_end - start < 20 or header_end > end:
                return None
        elif version == 6 and self._version != 4 and end - start >= 40:
            _, _, protocol, src, dst = _V6.unpack_from(buf, start)
            header_end = start + 40
            fragment = 0
            header_sum = -1
        else:
            return None
        if (self._old_src is not None and src != self._old_src) or (
            self._old_dst is not None and dst != self._old_dst
        ):
            return None
        if (start - align) & 1:
            return None  # cannot happen for a quote after an 8-byte ICMP header
        entry = _PSEUDO_HEADER_PROTOCOLS.get(protocol) if not fragment & 0x1FFF else None
        ports_quoted = entry is not None and entry[2] and end - header_end >= 4
        if ports_quoted and self._rewrites_ports:
            sport, dport = _PORTS.unpack_from(buf, header_end)
            if (self._old_sport is not None and sport != self._old_sport) or (
                self._old_dport is not None and dport != self._old_dport
            ):
                return None  # the quote is another flow's (same addresses, other ports)
        before = bytes(buf[start:end])
        new_src = self._new_src or src
        new_dst = self._new_dst or dst
        if header_sum >= 0:
            total = (~header_sum & 0xFFFF) + self._addr_delta
            total = (total & 0xFFFF) + (total >> 16)
            _V4_WRITE.pack_into(buf, start + 10, ~total & 0xFFFF if total else 0, new_src, new_dst)
        else:
            _V6_WRITE.pack_into(buf, start + 8, new_src, new_dst)
        if entry is not None:
            # A quote is a stored copy: its checksum gets the full-checksum rule.
            checksum_at, _, _, zero_is_none = entry
            delta = self._addr_delta
            if ports_quoted and self._rewrites_ports:
                _PORTS.pack_into(
                    buf,
                    header_end,
                    sport if self._new_sport is None else self._new_sport,
                    dport if self._new_dport is None else self._new_dport,
                )
                delta = self._full_delta
            checksum_at += header_end
            if checksum_at + 2 <= end:
                (value,) = _U16.unpack_from(buf, checksum_at)
                if not zero_is_none:
                    _U16.pack_into(buf, checksum_at, apply_delta(value, delta))
                elif value:
                    _U16.pack_into(buf, checksum_at, apply_delta(value, delta) or 0xFFFF)
        # The enclosing checksum covers every byte that changed; sum the change in one go.
        after = bytes(buf[start:end])
        if len(before) & 1:
            before += b"\0"
            after += b"\0"
        return checksum_delta(before, after)


def _hop_limit_offset(buf: BytesLike, offset: int) -> tuple[int, int]:
    """(version, offset of the TTL / hop limit octet) of the packet at `offset`."""
    if len(buf) - offset < 20:
        raise PacketError("truncated", "IP header cut short")
    version = buf[offset] >> 4
    if version == 4:
        if (buf[offset] & 15) < 5:
            raise PacketError("bad-ihl", f"IHL {buf[offset] & 15} is below 5")
        return 4, offset + 8
    if version == 6:
        if len(buf) - offset < 40:
            raise PacketError("truncated", "IPv6 header needs 40 bytes")
        return 6, offset + 7
    raise PacketError("bad-version", f"IP version {version}")


def set_hop_limit(buf: WritableBuffer, value: int, offset: int = 0) -> None:
    """Set the TTL (IPv4, updating the header checksum) or hop limit (IPv6)."""
    if not 0 <= value <= 255:
        raise ValueError(f"a TTL / hop limit is 0..255, not {value}")
    version, at = _hop_limit_offset(buf, offset)
    old = buf[at]
    buf[at] = value
    if version == 4:
        # The TTL is the high octet of the 16-bit word it shares with the protocol.
        (header_sum,) = _U16.unpack_from(buf, offset + 10)
        _U16.pack_into(buf, offset + 10, apply_delta(header_sum, word_delta(old << 8, value << 8)))


def decrement_hop_limit(buf: WritableBuffer, offset: int = 0) -> int:
    """Decrement the TTL / hop limit as a router does and return the new value.

    A packet whose value reaches 0 must be dropped (and an ICMP time exceeded sent); a value
    that is already 0 is left at 0.
    """
    _, at = _hop_limit_offset(buf, offset)
    value = buf[at]
    if value:
        set_hop_limit(buf, value - 1, offset)
        return value - 1
    return 0
