"""The peer table: which peer a packet read from TUN goes to, and what a peer may send us.

Pure: no I/O, no clock. The forwarder asks per packet (or per super-packet: all its segments
share one header) and per received batch:

    table.only                                  # the one peer of a one-peer table: no lookup
    peer = table.select(buf, offset, end)       # outbound, by inner destination; None: drop,
    drops.count(table.drop_reason(buf, offset, end))      # ... and why (the rare path)
    peer = table.udp_endpoints.get(sender[:2])  # inbound, once per received batch
    why = table.inbound_verdict(peer, buf, offset, end)   # None: forward; else a DropReason

Outbound, the most specific entry wins: an exact address (a peer owns the whole address),
then an address shared by port ranges (protocol + destination port, or ICMP echo identifier;
for an ICMP error, the port of the packet it quotes), then the longest prefix. A packet to a
port-range address whose port is in no range falls through to the prefixes.

Inbound, a datagram must come from a peer's endpoint, and its inner source must be one the
table routes back to that same peer (the outbound rules applied to the source: strict
reverse-path), or lie in the peer's `extra_sources`. So a peer owning 10.0.0.0/8 may not send
from 10.1.0.0/16 when another peer owns that. Optionally the table lists the inner
destinations this end serves (`local_destinations`); others are dropped (no relaying).

Inner packets are read as little as possible: the version nibble and the addresses at fixed
offsets; protocol and ports only for an address shared by port ranges (IPv6 extension headers
are walked only then, with `ipshift.packet.ipv6.walk_header_chain`).

A table is an immutable snapshot with a generation number. Changes make a new table
(copy-on-write: the indexes are shallow-copied, only what changed is rebuilt), so a forwarder
thread swaps `table = new_table` between batches without a lock. Worker processes receive a
snapshot or a delta through a pipe (`encode_table`, `encode_delta`, `decode_message`).
"""

from __future__ import annotations

import bisect
import heapq
import ipaddress
import re
import socket
import struct
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from enum import IntEnum, StrEnum
from typing import Any

from ipshift.packet.errors import BytesLike, PacketError
from ipshift.packet.icmp import parse_icmp
from ipshift.packet.ipv6 import walk_header_chain
from ipshift.packet.protocols import (
    IPPROTO_DCCP,
    IPPROTO_ICMP,
    IPPROTO_ICMPV6,
    IPPROTO_SCTP,
    IPPROTO_TCP,
    IPPROTO_UDP,
    IPPROTO_UDPLITE,
    IPV6_EXTENSION_HEADERS,
)
from ipshift.packet.transport import (
    ICMP_ECHO_REPLY,
    ICMP_ECHO_REQUEST,
    ICMP_ERROR_TYPES,
    ICMPV6_ECHO_REPLY,
    ICMPV6_ECHO_REQUEST,
    ICMPV6_ERROR_TYPES,
)
from ipshift.packet.view import PORT_PROTOCOLS
from ipshift.tunnel.config import ConfigError, Endpoint, IPAddress, IPNetwork

KEY_LEN = 32  # bytes of a per-peer authentication key (ipshift.tunnel.auth)
MAX_NAME = 63
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@/+-]*\Z")

PROTOCOL_NAMES: dict[str, int] = {
    "tcp": IPPROTO_TCP, "udp": IPPROTO_UDP, "udplite": IPPROTO_UDPLITE, "dccp": IPPROTO_DCCP,
    "sctp": IPPROTO_SCTP, "icmp": IPPROTO_ICMP, "icmpv6": IPPROTO_ICMPV6,
}
_PROTOCOL_TEXT = {number: name for name, number in PROTOCOL_NAMES.items()}

# version/IHL, flags + fragment offset, protocol, source, destination (IPv4 addresses are
# read as numbers: they key the indexes as they are and need no conversion for the prefixes)
_V4 = struct.Struct("!B5xHxB2xII")
# next header, source, destination (the version is read from the first byte)
_V6 = struct.Struct("!6xBx16s16s")
_ECHO_V4 = frozenset({ICMP_ECHO_REQUEST, ICMP_ECHO_REPLY})
_ECHO_V6 = frozenset({ICMPV6_ECHO_REQUEST, ICMPV6_ECHO_REPLY})


class Encapsulation(StrEnum):
    """How a peer's datagrams travel: ipshift's UDP framing, IP-in-IP or GRE (raw sockets,
    `ipshift.tunnel.encap`)."""

    UDP = "udp"
    IPIP = "ipip"
    GRE = "gre"


class DropReason(IntEnum):
    """Why a packet was not forwarded; the forwarder counts each (`DropCounters`)."""

    MALFORMED = 0  # not an IPv4/IPv6 packet whose addresses can be read
    NO_PEER = 1  # outbound: no entry matches the inner destination
    UNKNOWN_ENDPOINT = 2  # inbound: the datagram came from no peer's endpoint
    FOREIGN_SOURCE = 3  # inbound: the inner source is not one this peer may use
    FOREIGN_DESTINATION = 4  # inbound: the inner destination is not served by this end


class DropCounters:
    """Drops per reason, for one forwarder queue (a table snapshot holds no counters)."""

    __slots__ = ("counts",)

    def __init__(self) -> None:
        self.counts = [0] * len(DropReason)

    def count(self, reason: DropReason, packets: int = 1) -> None:
        self.counts[reason] += packets

    def as_dict(self) -> dict[str, int]:
        return {reason.name.lower(): self.counts[reason] for reason in DropReason}


class GenerationError(ValueError):
    """A delta was made for another generation than the table it is applied to: ask for a
    full snapshot."""


class PeerCodecError(PacketError):
    """A serialised peer table or delta is malformed; nothing of it is applied."""


# --- peers ----------------------------------------------------------------------------------
def _address(value: object, what: str) -> IPAddress:
    if isinstance(value, ipaddress.IPv4Address | ipaddress.IPv6Address):
        return value
    try:
        return ipaddress.ip_address(value)  # type: ignore[arg-type]
    except ValueError as exc:
        raise ConfigError(f"{what}: {value!r} is not an IP address") from exc


def _network(value: object, what: str) -> IPNetwork:
    if isinstance(value, ipaddress.IPv4Network | ipaddress.IPv6Network):
        return value
    try:
        return ipaddress.ip_network(value)  # type: ignore[arg-type]
    except ValueError as exc:
        raise ConfigError(f"{what}: {value!r} is not a prefix (ADDRESS/LENGTH with the host "
                          "bits zero)") from exc


# How an address keys the indexes: IPv4 as a number, IPv6 as its 16 bytes.
AddressKey = int | bytes


def address_key(address: IPAddress) -> AddressKey:
    return int(address) if address.version == 4 else address.packed


def _icmp_for(address: IPAddress) -> int:
    return IPPROTO_ICMP if address.version == 4 else IPPROTO_ICMPV6


@dataclass(frozen=True, slots=True)
class PortRange:
    """Ports first..last of `protocol` at `address`, or ICMP echo identifiers when the
    protocol is ICMP (IPv4) or ICMPv6 (IPv6): a share of an address (RSIP, MAP style)."""

    address: IPAddress
    protocol: int
    first: int
    last: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "address", _address(self.address, "port range"))
        if self.protocol not in PORT_PROTOCOLS and self.protocol != _icmp_for(self.address):
            raise ConfigError(f"port range {self.address}/{self.protocol}: protocol "
                              f"{self.protocol} has no ports for IPv{self.address.version}; "
                              "use tcp, udp, udplite, dccp, sctp or icmp")
        if not 0 <= self.first <= self.last <= 0xFFFF:
            raise ConfigError(f"port range {self.address}: {self.first}-{self.last} is not a "
                              "range within 0-65535 (first <= last)")

    @classmethod
    def parse(cls, text: str) -> PortRange:
        """"198.51.100.7/tcp/1024-2047", "2001:db8::7/icmp/0-255" or ".../udp/53"."""
        address, _, rest = text.partition("/")
        name, _, ports = rest.partition("/")
        first, _, last = ports.partition("-")
        try:
            ip = ipaddress.ip_address(address)
            protocol = PROTOCOL_NAMES[name.lower()]
            low = int(first)
            high = int(last) if last else low
        except (ValueError, KeyError) as exc:
            raise ConfigError(f"port range {text!r} is not ADDRESS/PROTOCOL/FIRST-LAST "
                              f"(protocol one of {', '.join(PROTOCOL_NAMES)})") from exc
        if protocol in (IPPROTO_ICMP, IPPROTO_ICMPV6):
            protocol = _icmp_for(ip)
        return cls(ip, protocol, low, high)

    def __str__(self) -> str:
        name = _PROTOCOL_TEXT.get(self.protocol, str(self.protocol))
        return f"{self.address}/{name}/{self.first}-{self.last}"


@dataclass(frozen=True, slots=True)
class Peer:
    """One far end of the tunnel.

    `endpoint`: its underlay address and UDP port (port 0 for ipip and gre). Inner
    destinations routed to it: `prefixes` (longest prefix wins), `addresses` (exact), and
    `port_ranges` (an address shared with other peers by ports). Inner sources it may use
    inbound: whatever the table routes back to it, plus `extra_sources`. `gre_key`: the RFC
    2890 key that identifies it among GRE peers at one address. `key`: its 32-byte
    authentication key (ipshift.tunnel.auth), or None."""

    name: str
    endpoint: Endpoint
    encapsulation: Encapsulation = Encapsulation.UDP
    prefixes: tuple[IPNetwork, ...] = ()
    addresses: tuple[IPAddress, ...] = ()
    port_ranges: tuple[PortRange, ...] = ()
    extra_sources: tuple[IPNetwork, ...] = ()
    gre_key: int | None = None
    key: bytes | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        what = f"peer {self.name!r}"
        if (not isinstance(self.name, str) or len(self.name) > MAX_NAME
                or not _NAME.match(self.name)):
            raise ConfigError(f"{what}: a peer name is 1-{MAX_NAME} letters, digits and "
                              "._:@/+- starting with a letter or digit")
        try:
            encapsulation = Encapsulation(self.encapsulation)
        except ValueError as exc:
            raise ConfigError(f"{what}: encapsulation {self.encapsulation!r} is not one of "
                              f"{', '.join(Encapsulation)}") from exc
        set_ = object.__setattr__
        set_(self, "encapsulation", encapsulation)
        set_(self, "prefixes", tuple(_network(p, what) for p in self.prefixes))
        set_(self, "addresses", tuple(_address(a, what) for a in self.addresses))
        set_(self, "port_ranges", tuple(self.port_ranges))
        set_(self, "extra_sources", tuple(_network(p, what) for p in self.extra_sources))
        if not isinstance(self.endpoint, Endpoint):
            raise ConfigError(f"{what}: the endpoint must be an Endpoint")
        if encapsulation is Encapsulation.UDP:
            if not 1 <= self.endpoint.port <= 0xFFFF:
                raise ConfigError(f"{what}: a udp peer's endpoint needs a port 1-65535")
        elif self.endpoint.port:
            raise ConfigError(f"{what}: an {encapsulation} peer has no port; give its "
                              "endpoint with port 0")
        if self.gre_key is not None and (
            encapsulation is not Encapsulation.GRE or not 0 <= self.gre_key <= 0xFFFFFFFF
        ):
            raise ConfigError(f"{what}: a GRE key (0-4294967295) belongs to gre peers only")
        if self.key is not None and (not isinstance(self.key, bytes) or len(self.key) != KEY_LEN):
            raise ConfigError(f"{what}: an authentication key has {KEY_LEN} bytes")
        for entries, kind in ((self.prefixes, "prefix"), (self.extra_sources, "extra source"),
                              (self.addresses, "address")):
            if len(set(entries)) != len(entries):
                raise ConfigError(f"{what}: the same {kind} is listed twice")
        for entry in self.port_ranges:
            if not isinstance(entry, PortRange):
                raise ConfigError(f"{what}: port ranges must be PortRange entries")
            if entry.address in self.addresses:
                raise ConfigError(f"{what}: {entry.address} is both a whole address and "
                                  "shared by port ranges; give one of the two")
        # Overlaps within the peer are found like overlaps between peers, per address.
        by_address: dict[IPAddress, list[tuple[PortRange, Peer]]] = {}
        for entry in self.port_ranges:
            by_address.setdefault(entry.address, []).append((entry, self))
        for entries_at in by_address.values():
            _PortIndex.build(entries_at)

    @property
    def authenticated(self) -> bool:
        return self.key is not None

    def as_dict(self) -> dict[str, Any]:
        """A JSON-friendly description (the key itself is never included)."""
        endpoint = (str(self.endpoint) if self.encapsulation is Encapsulation.UDP
                    else str(self.endpoint.host))
        return {
            "name": self.name,
            "endpoint": endpoint,
            "encapsulation": str(self.encapsulation),
            "prefixes": [str(p) for p in self.prefixes],
            "addresses": [str(a) for a in self.addresses],
            "port_ranges": [str(r) for r in self.port_ranges],
            "extra_sources": [str(p) for p in self.extra_sources],
            "gre_key": self.gre_key,
            "authenticated": self.authenticated,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], key: bytes | None = None) -> Peer:
        """The inverse of `as_dict` (the key is given separately)."""
        try:
            name = str(data["name"])
            encapsulation = Encapsulation(data.get("encapsulation", "udp"))
            endpoint_text = str(data["endpoint"])
        except KeyError as exc:
            raise ConfigError(f"peer description without {exc.args[0]!r}") from exc
        except ValueError as exc:
            raise ConfigError(f"peer {data.get('name')!r}: encapsulation is one of "
                              f"{', '.join(Encapsulation)}") from exc
        if encapsulation is Encapsulation.UDP:
            endpoint = Endpoint.parse(endpoint_text, f"peer {name!r} endpoint")
        else:
            endpoint = Endpoint(_address(endpoint_text.strip("[]"), f"peer {name!r}"), 0)

        def listed(item: str) -> list[str]:
            value = data.get(item, [])
            if not isinstance(value, list | tuple):
                raise ConfigError(f"peer {name!r}: {item} must be a list")
            return [str(v) for v in value]

        gre_key = data.get("gre_key")
        if gre_key is not None and not isinstance(gre_key, int):
            raise ConfigError(f"peer {name!r}: gre_key must be a number")
        return cls(
            name=name, endpoint=endpoint, encapsulation=encapsulation,
            prefixes=tuple(_network(p, f"peer {name!r}") for p in listed("prefixes")),
            addresses=tuple(_address(a, f"peer {name!r}") for a in listed("addresses")),
            port_ranges=tuple(PortRange.parse(r) for r in listed("port_ranges")),
            extra_sources=tuple(_network(p, f"peer {name!r}") for p in listed("extra_sources")),
            gre_key=gre_key, key=key,
        )


def endpoint_key(peer: Peer) -> tuple[str, int]:
    """How the socket layer names the peer's endpoint: (address as recvfrom reports it,
    UDP port); for a raw-socket peer (address, GRE key or 0)."""
    host = peer.endpoint.host
    family = socket.AF_INET if host.version == 4 else socket.AF_INET6
    selector = peer.endpoint.port
    if peer.encapsulation is Encapsulation.GRE:
        selector = peer.gre_key or 0
    return socket.inet_ntop(family, host.packed), selector


# --- indexes --------------------------------------------------------------------------------
# Port ranges of one protocol at one address: range starts (for bisect), ends, owners.
_Ranges = tuple[list[int], list[int], list[Peer]]


class _PortIndex:
    """The port ranges of one address: per protocol, range starts (for bisect), range ends
    and owners. Immutable; rebuilt when a range of this address changes."""

    __slots__ = ("by_protocol", "entries")

    def __init__(
        self, entries: tuple[tuple[PortRange, Peer], ...],
        by_protocol: dict[int, _Ranges],
    ) -> None:
        self.entries = entries
        self.by_protocol = by_protocol

    @classmethod
    def build(cls, entries: Iterable[tuple[PortRange, Peer]]) -> _PortIndex:
        listed = tuple(sorted(entries, key=lambda e: (e[0].protocol, e[0].first)))
        by_protocol: dict[int, _Ranges] = {}
        previous: tuple[PortRange, Peer] | None = None
        for entry in listed:
            ports, peer = entry
            if previous is not None and previous[0].protocol == ports.protocol and (
                previous[0].last >= ports.first
            ):
                other = previous[1].name
                owners = (f"peer {other!r}" if other == peer.name
                          else f"peers {other!r} and {peer.name!r}")
                raise ConfigError(f"port ranges {previous[0]} and {ports} of {owners} "
                                  "overlap; a port can have one owner only")
            starts, ends, owners_ = by_protocol.setdefault(ports.protocol, ([], [], []))
            starts.append(ports.first)
            ends.append(ports.last)
            owners_.append(peer)
            previous = entry
        return cls(listed, by_protocol)


# (bits to shift an address right, owner per shifted value), longest prefix first
_Levels = tuple[tuple[int, dict[int, Peer]], ...]
# (bits to shift right, shifted values), for membership tests
_Members = tuple[tuple[int, frozenset[int]], ...]


def _members(prefixes: Iterable[IPNetwork], bits: int) -> _Members:
    by_length: dict[int, set[int]] = {}
    for prefix in prefixes:
        if prefix.max_prefixlen == bits:
            by_length.setdefault(prefix.prefixlen, set()).add(
                int(prefix.network_address) >> (bits - prefix.prefixlen))
    return tuple((bits - length, frozenset(values))
                 for length, values in sorted(by_length.items(), reverse=True))


def _is_member(members: _Members, value: int) -> bool:
    for shift, values in members:  # noqa: SIM110 (a loop costs less than any() per packet)
        if value >> shift in values:
            return True
    return False


@dataclass(frozen=True, slots=True)
class _Sources:
    """Extra inner sources a peer may use, per IP version."""

    v4: _Members
    v6: _Members

    @classmethod
    def of(cls, prefixes: Sequence[IPNetwork]) -> _Sources:
        return cls(_members(prefixes, 32), _members(prefixes, 128))

    def allows(self, value: int, version: int) -> bool:
        return _is_member(self.v4 if version == 4 else self.v6, value)


def _covers_everything(peer: Peer) -> bool:
    lengths = {(p.version, p.prefixlen) for p in peer.prefixes + peer.extra_sources}
    return (4, 0) in lengths and (6, 0) in lengths


@dataclass(frozen=True, slots=True)
class TableDelta:
    """What changed from generation `base` to `generation`: peers added or replaced (with
    their slots), peers removed, and the local destinations if they changed."""

    base: int
    generation: int
    upserts: tuple[tuple[int, Peer], ...] = ()
    removals: tuple[str, ...] = ()
    local_changed: bool = False
    local_destinations: tuple[IPNetwork, ...] | None = None


class PeerTable:
    """An immutable snapshot of the peers. See the module docstring for the per-packet use.

    Build one with `PeerTable(peers)`; `with_peers` (and `add`, `remove`, `replace`) return a
    new table one generation on. A conflicting configuration (two owners of an address,
    prefix, port or endpoint) raises ConfigError naming both."""

    __slots__ = (
        "_endpoints",
        "_exact",
        "_extra",
        "_free",
        "_last_delta",
        "_levels",
        "_local",
        "_local4",
        "_local6",
        "_lpm4",
        "_lpm6",
        "_next_slot",
        "_peers",
        "_port_index",
        "_ports",
        "_slots",
        "checks_inbound",
        "generation",
        "only",
        "udp_endpoints",
    )

    generation: int
    _local4: _Members | None
    _local6: _Members | None
    only: Peer | None
    checks_inbound: bool
    udp_endpoints: Mapping[tuple[str, int], Peer]

    def __init__(
        self, peers: Iterable[Peer] = (), *,
        local_destinations: Iterable[IPNetwork] | None = None, generation: int = 1,
    ) -> None:
        self.generation = generation
        self._peers: dict[str, Peer] = {}
        self._slots: dict[str, int] = {}
        self._free: list[int] = []
        self._next_slot = 0
        self._exact: dict[AddressKey, Peer] = {}
        self._ports: dict[AddressKey, dict[int, _Ranges]] = {}  # per address and protocol
        self._port_index: dict[AddressKey, _PortIndex] = {}
        self._levels: dict[tuple[int, int], dict[int, Peer]] = {}  # (bits, length)
        self._endpoints: dict[tuple[Encapsulation, str, int], Peer] = {}
        self.udp_endpoints = {}
        self._extra: dict[str, _Sources] = {}
        self._local: tuple[IPNetwork, ...] | None = None
        self._lpm4: _Levels = ()
        self._lpm6: _Levels = ()
        self._last_delta: TableDelta | None = None
        builder = _Builder(self)
        builder.set_local(local_destinations)
        for peer in peers:
            if peer.name in builder.peers:
                raise ConfigError(f"two peers are named {peer.name!r}; names must differ")
            builder.add(peer, None)
        builder.finish()

    # --- per packet ---------------------------------------------------------------------------
    def select(self, packet: BytesLike, offset: int = 0, end: int | None = None) -> Peer | None:
        """The peer for the IP packet at packet[offset:end], by its destination; None: drop
        it (`drop_reason` says why)."""
        # Written out for speed: it runs once per packet (or super-packet) read from TUN.
        if end is None:
            end = len(packet)
        if end - offset < 20:
            return None
        first = packet[offset]
        if first >> 4 == 4:
            _first, fragment, protocol, _src, dst = _V4.unpack_from(packet, offset)
            peer = self._exact.get(dst)
            if peer is not None:
                return peer
            value = dst
            levels = self._lpm4
        elif first >> 4 == 6 and end - offset >= 40:
            protocol, _src, dst = _V6.unpack_from(packet, offset)
            peer = self._exact.get(dst)
            if peer is not None:
                return peer
            fragment = 0
            value = -1
            levels = self._lpm6
        else:
            return None
        if self._ports:
            ports = self._ports.get(dst)
            if ports is not None:
                if first == 0x45 and protocol in PORT_PROTOCOLS and offset + 24 <= end and not (
                    fragment & 0x1FFF
                ):
                    # IPv4 without options, the usual case: the ports at fixed offsets.
                    ranges = ports.get(protocol)
                    if ranges is not None:
                        port = packet[offset + 22] << 8 | packet[offset + 23]
                        at = bisect.bisect_right(ranges[0], port) - 1
                        if at >= 0 and port <= ranges[1][at]:
                            return ranges[2][at]
                else:
                    peer = _by_port(ports, packet, offset, end, first, fragment, protocol, True)
                    if peer is not None:
                        return peer
        if levels:
            if value < 0:
                value = int.from_bytes(dst, "big")
            for shift, owners in levels:
                peer = owners.get(value >> shift)
                if peer is not None:
                    return peer
        return None

    def drop_reason(self, packet: BytesLike, offset: int = 0,
                    end: int | None = None) -> DropReason:
        """Why `select` found no peer for this packet."""
        if end is None:
            end = len(packet)
        version = packet[offset] >> 4 if end > offset else 0
        if end - offset < (40 if version == 6 else 20) or version not in (4, 6):
            return DropReason.MALFORMED
        return DropReason.NO_PEER

    def inbound_verdict(
        self, peer: Peer, packet: BytesLike, offset: int = 0, end: int | None = None,
    ) -> DropReason | None:
        """None if the IP packet at packet[offset:end], which came from `peer`'s endpoint, may
        be forwarded: its source is one the table routes to `peer` (or one of its
        `extra_sources`) and its destination is served here. Otherwise why not."""
        if end is None:
            end = len(packet)
        if end - offset < 20:
            return DropReason.MALFORMED
        first = packet[offset]
        if first >> 4 == 4:
            _first, fragment, protocol, src, dst = _V4.unpack_from(packet, offset)
            local = self._local4
            levels = self._lpm4
        elif first >> 4 == 6 and end - offset >= 40:
            protocol, src, dst = _V6.unpack_from(packet, offset)
            fragment = 0
            local = self._local6
            levels = self._lpm6
        else:
            return DropReason.MALFORMED
        if local is not None and not _is_member(
            local, dst if first >> 4 == 4 else int.from_bytes(dst, "big")
        ):
            return DropReason.FOREIGN_DESTINATION
        owner = self._exact.get(src)
        if owner is None:
            ports = self._ports.get(src) if self._ports else None
            if ports is not None:
                if first == 0x45 and protocol in PORT_PROTOCOLS and offset + 24 <= end and not (
                    fragment & 0x1FFF
                ):
                    ranges = ports.get(protocol)  # as in select, with the source port
                    if ranges is not None:
                        port = packet[offset + 20] << 8 | packet[offset + 21]
                        at = bisect.bisect_right(ranges[0], port) - 1
                        if at >= 0 and port <= ranges[1][at]:
                            owner = ranges[2][at]
                else:
                    owner = _by_port(ports, packet, offset, end, first, fragment, protocol,
                                     False)
            if owner is None and levels:
                value = src if first >> 4 == 4 else int.from_bytes(src, "big")
                for shift, owners in levels:
                    owner = owners.get(value >> shift)
                    if owner is not None:
                        break
        if owner is peer or (owner is not None and owner.name == peer.name):
            return None
        extra = self._extra.get(peer.name)
        if extra is not None and extra.allows(src if first >> 4 == 4 else
                                              int.from_bytes(src, "big"), first >> 4):
            return None
        return DropReason.FOREIGN_SOURCE

    def allowed(self, peer: Peer, packet: BytesLike, offset: int = 0,
                end: int | None = None) -> bool:
        return self.inbound_verdict(peer, packet, offset, end) is None

    # --- lookups ------------------------------------------------------------------------------
    def peer_by_endpoint(self, host: str, port: int,
                         encapsulation: Encapsulation = Encapsulation.UDP) -> Peer | None:
        """The peer whose endpoint is `host` (text, as recvfrom reports it) and `port`; for
        gre peers `port` is the GRE key (0: none), for ipip peers 0."""
        if encapsulation is Encapsulation.UDP:
            return self.udp_endpoints.get((host, port))
        return self._endpoints.get((encapsulation, host, port))

    def __getitem__(self, name: str) -> Peer:
        return self._peers[name]

    def get(self, name: str) -> Peer | None:
        return self._peers.get(name)

    def __contains__(self, name: object) -> bool:
        return name in self._peers

    def __len__(self) -> int:
        return len(self._peers)

    def __iter__(self) -> Iterator[Peer]:
        return iter(self._peers.values())

    @property
    def peers(self) -> Mapping[str, Peer]:
        return self._peers

    @property
    def slots(self) -> Mapping[str, int]:
        """A small number per peer, kept while the peer exists and reused after it is removed
        (for arrays of per-peer counters); the same in every process fed by the codec."""
        return self._slots

    @property
    def local_destinations(self) -> tuple[IPNetwork, ...] | None:
        return self._local

    # --- changes ------------------------------------------------------------------------------
    def with_peers(self, upserts: Iterable[Peer] = (), removals: Iterable[str] = ()) -> PeerTable:
        """A new table one generation on: `upserts` added or replacing the peer of the same
        name, `removals` gone (unknown names are an error)."""
        new_peers = list(upserts)
        removed = list(removals)
        names = [peer.name for peer in new_peers]
        if len(set(names)) != len(names):
            raise ConfigError("one update names a peer twice; give each peer once")
        for name in removed:
            if name not in self._peers:
                raise ConfigError(f"no peer named {name!r} to remove")
            if name in names:
                raise ConfigError(f"peer {name!r} is both removed and updated")
        table = self._derive(self.generation + 1)
        builder = _Builder(table)
        for name in removed:
            builder.remove(name, keep_slot=False)
        kept = {peer.name: builder.remove(peer.name, keep_slot=True)
                for peer in new_peers if peer.name in builder.peers}
        upserted = tuple((builder.add(peer, kept.get(peer.name), reserved=peer.name in kept),
                          peer) for peer in new_peers)
        builder.finish()
        table._last_delta = TableDelta(self.generation, table.generation, upserted,
                                       tuple(removed))
        return table

    def with_local_destinations(self, prefixes: Iterable[IPNetwork] | None) -> PeerTable:
        """A new table one generation on whose inbound packets must be addressed to one of
        `prefixes` (None: to anything, as when relaying for the peers)."""
        table = self._derive(self.generation + 1)
        builder = _Builder(table)
        builder.set_local(prefixes)
        builder.finish()
        table._last_delta = TableDelta(self.generation, table.generation, (), (), True,
                                       table._local)
        return table

    def add(self, peer: Peer) -> PeerTable:
        if peer.name in self._peers:
            raise ConfigError(f"a peer named {peer.name!r} exists already; update it instead")
        return self.with_peers([peer])

    def replace(self, peer: Peer) -> PeerTable:
        if peer.name not in self._peers:
            raise ConfigError(f"no peer named {peer.name!r} to update")
        return self.with_peers([peer])

    def remove(self, name: str) -> PeerTable:
        return self.with_peers(removals=[name])

    def delta_since(self, older: PeerTable) -> TableDelta:
        """What turns `older` into this table (for workers holding `older`)."""
        last = self._last_delta
        if last is not None and last.base == older.generation:
            return last
        old_peers = older._peers
        upserts = tuple((self._slots[name], peer) for name, peer in self._peers.items()
                        if old_peers.get(name) is not peer and (
                            old_peers.get(name) != peer
                            or older._slots[name] != self._slots[name]))
        removals = tuple(name for name in old_peers if name not in self._peers)
        local_changed = older._local != self._local
        return TableDelta(older.generation, self.generation, upserts, removals, local_changed,
                          self._local)

    def apply(self, delta: TableDelta) -> PeerTable:
        """The table `delta` leads to from this one. GenerationError if it was made for
        another generation; ConfigError if it conflicts (then nothing changes)."""
        if delta.base != self.generation:
            raise GenerationError(f"a delta from generation {delta.base} does not apply to "
                                  f"generation {self.generation}; send a snapshot")
        names = [peer.name for _slot, peer in delta.upserts]
        if len(set(names)) != len(names):
            raise ConfigError("the delta names a peer twice")
        table = self._derive(delta.generation)
        builder = _Builder(table)
        for name in delta.removals:
            if name not in builder.peers:
                raise ConfigError(f"the delta removes peer {name!r}, which is not here")
            builder.remove(name, keep_slot=False)
        for _slot, peer in delta.upserts:
            if peer.name in builder.peers:
                builder.remove(peer.name, keep_slot=False)
        if delta.local_changed:
            builder.set_local(delta.local_destinations)
        for slot, peer in delta.upserts:
            builder.add(peer, slot, reserved=False)
        builder.finish()
        table._last_delta = delta
        return table

    def _derive(self, generation: int) -> PeerTable:
        """A shallow copy sharing every index with this table (copied on first write)."""
        table = PeerTable.__new__(PeerTable)
        for name in PeerTable.__slots__:
            setattr(table, name, getattr(self, name))
        table.generation = generation
        table._last_delta = None
        return table

    def __repr__(self) -> str:
        return f"<PeerTable generation {self.generation}, {len(self._peers)} peers>"


class _Builder:
    """Changes the indexes of a table being made, copying each index dict the first time it
    is written (the table it was derived from keeps the originals, also when a change fails
    half-way)."""

    def __init__(self, table: PeerTable) -> None:
        self.table = table
        self._copied: set[str] = set()
        self._levels_copied: set[tuple[int, int]] = set()
        self._removed: set[str] = set()  # names whose old port ranges are gone
        self._added_ports: dict[AddressKey, list[tuple[PortRange, Peer]]] = {}
        self._touched_ports: set[AddressKey] = set()
        self._used: set[int] | None = None  # slots in use, when a delta names them

    def _own(self, name: str) -> Any:
        value = getattr(self.table, name)
        if name not in self._copied:
            value = value.copy()
            setattr(self.table, name, value)
            self._copied.add(name)
        return value

    @property
    def peers(self) -> dict[str, Peer]:
        return self.table._peers

    def _level(self, bits: int, length: int) -> dict[int, Peer]:
        levels: dict[tuple[int, int], dict[int, Peer]] = self._own("_levels")
        key = (bits, length)
        owners = levels.get(key)
        if owners is None:
            owners = levels[key] = {}
        elif key not in self._levels_copied:
            owners = levels[key] = owners.copy()
        self._levels_copied.add(key)
        return owners

    def set_local(self, prefixes: Iterable[IPNetwork] | None) -> None:
        self.table._local = None if prefixes is None else tuple(
            _network(p, "local destination") for p in prefixes)

    def remove(self, name: str, *, keep_slot: bool) -> int:
        """Take the peer out of every index; returns its slot (freed unless keep_slot)."""
        peer = self._own("_peers").pop(name)
        slot: int = self._own("_slots").pop(name)
        if not keep_slot:
            heapq.heappush(self._own("_free"), slot)
        exact: dict[AddressKey, Peer] = self._own("_exact")
        for address in peer.addresses:
            del exact[address_key(address)]
        for prefix in peer.prefixes:
            owners = self._level(prefix.max_prefixlen, prefix.prefixlen)
            del owners[int(prefix.network_address) >> (prefix.max_prefixlen - prefix.prefixlen)]
        self._removed.add(name)
        for entry in peer.port_ranges:
            self._touched_ports.add(address_key(entry.address))
        kind, host, selector = peer.encapsulation, *endpoint_key(peer)
        if kind is Encapsulation.UDP:
            del self._own("udp_endpoints")[(host, selector)]
        else:
            del self._own("_endpoints")[(kind, host, selector)]
        if name in self.table._extra:
            del self._own("_extra")[name]
        return slot

    def _port_owners(self, packed: AddressKey) -> list[tuple[PortRange, Peer]]:
        """The port ranges at `packed` as they stand in the middle of the changes."""
        index = self.table._port_index.get(packed)
        entries = [] if index is None else [
            entry for entry in index.entries if entry[1].name not in self._removed]
        return entries + self._added_ports.get(packed, [])

    def add(self, peer: Peer, slot: int | None, *, reserved: bool = False) -> int:
        """Add `peer` (its name must be free). Returns its slot: `slot` (one the peer kept
        when `reserved`, else a slot that must be free), or the lowest free one."""
        exact: dict[AddressKey, Peer] = self._own("_exact")
        for address in peer.addresses:
            packed = address_key(address)
            other = exact.get(packed)
            if other is not None:
                raise ConfigError(f"peers {other.name!r} and {peer.name!r} both own "
                                  f"{address}; an address can have one owner only")
            sharing = self._port_owners(packed)
            if sharing:
                raise ConfigError(f"{address} is given whole to peer {peer.name!r} and by port "
                                  f"ranges to peer {sharing[0][1].name!r}; give it one way only")
            exact[packed] = peer
        for prefix in peer.prefixes:
            owners = self._level(prefix.max_prefixlen, prefix.prefixlen)
            key = int(prefix.network_address) >> (prefix.max_prefixlen - prefix.prefixlen)
            other = owners.get(key)
            if other is not None:
                raise ConfigError(f"peers {other.name!r} and {peer.name!r} both own {prefix}; "
                                  "a prefix can have one owner only")
            owners[key] = peer
        for entry in peer.port_ranges:
            packed = address_key(entry.address)
            other = exact.get(packed)
            if other is not None:
                raise ConfigError(f"{entry.address} is given whole to peer {other.name!r} and "
                                  f"by port ranges to peer {peer.name!r}; give it one way only")
            self._added_ports.setdefault(packed, []).append((entry, peer))
            self._touched_ports.add(packed)
        kind, host, selector = peer.encapsulation, *endpoint_key(peer)
        endpoints: dict[Any, Peer]
        where: tuple[Any, ...]
        if kind is Encapsulation.UDP:
            endpoints, where = self._own("udp_endpoints"), (host, selector)
        else:
            endpoints, where = self._own("_endpoints"), (kind, host, selector)
        other = endpoints.get(where)
        if other is not None:
            gre = f" and GRE key {selector}" if kind is Encapsulation.GRE else ""
            raise ConfigError(f"peers {other.name!r} and {peer.name!r} have the same endpoint "
                              f"{peer.as_dict()['endpoint']}{gre}; give each its own")
        endpoints[where] = peer
        if peer.extra_sources:
            self._own("_extra")[peer.name] = _Sources.of(peer.extra_sources)
        self._own("_peers")[peer.name] = peer
        slot = self._slot(peer, slot, reserved)
        self._own("_slots")[peer.name] = slot
        return slot

    def _slot(self, peer: Peer, slot: int | None, reserved: bool) -> int:
        table = self.table
        if slot is None:
            if table._free:
                free: list[int] = self._own("_free")
                return heapq.heappop(free)
            table._next_slot += 1
            return table._next_slot - 1
        if reserved:
            return slot
        # A slot handed over by the table's maker (a delta): it must not be in use.
        if self._used is None:
            self._used = set(table._slots.values())
        if slot in self._used:
            raise ConfigError(f"slot {slot} of peer {peer.name!r} is taken by another peer")
        self._used.add(slot)
        if slot >= table._next_slot:
            table._next_slot = slot + 1
        elif slot in table._free:
            free = self._own("_free")
            free.remove(slot)
            heapq.heapify(free)
        return slot

    def finish(self) -> None:
        """Rebuild what the changes touched: port indexes, the prefix levels, the flags."""
        table = self.table
        if self._touched_ports:
            index: dict[AddressKey, _PortIndex] = self._own("_port_index")
            ports: dict[AddressKey, dict[int, _Ranges]] = self._own("_ports")
            for packed in self._touched_ports:
                entries = self._port_owners(packed)
                if entries:
                    built = index[packed] = _PortIndex.build(entries)
                    ports[packed] = built.by_protocol
                else:
                    index.pop(packed, None)
                    ports.pop(packed, None)
        if "_levels" in self._copied:
            levels = {key: owners for key, owners in table._levels.items() if owners}
            table._levels = levels
            longest_first = sorted(levels, key=lambda key: -key[1])
            table._lpm4 = tuple((32 - length, levels[(bits, length)])
                                for bits, length in longest_first if bits == 32)
            table._lpm6 = tuple((128 - length, levels[(bits, length)])
                                for bits, length in longest_first if bits == 128)
        local = table._local
        table._local4 = None if local is None else _members(local, 32)
        table._local6 = None if local is None else _members(local, 128)
        peers = table._peers
        table.only = next(iter(peers.values())) if len(peers) == 1 else None
        table.checks_inbound = not (
            table.only is not None and local is None and _covers_everything(table.only))


def _by_port(
    ports: dict[int, _Ranges], packet: BytesLike, offset: int, end: int, first: int,
    fragment: int, protocol: int, toward_host: bool,
) -> Peer | None:
    """The owner, among an address's port ranges `ports`, of the port of the host at that
    address (see `_host_port`)."""
    flow = _host_port(packet, offset, end, first, fragment, protocol, toward_host)
    if flow is None:
        return None
    ranges = ports.get(flow[0])
    if ranges is None:
        return None
    port = flow[1]
    at = bisect.bisect_right(ranges[0], port) - 1
    if at >= 0 and port <= ranges[1][at]:
        return ranges[2][at]
    return None


def _host_port(
    packet: BytesLike, offset: int, end: int, first: int, fragment: int, protocol: int,
    toward_host: bool,
) -> tuple[int, int] | None:
    """(protocol, port of the host the table routes by) of the packet, or None when it has
    none: the destination port of a packet toward the host, else its source port; the echo
    identifier of an ICMP echo; for an ICMP error, the host's port in the packet it quotes.
    Fragments after the first carry no port."""
    if first >> 4 == 4:
        if fragment & 0x1FFF or first & 0x0F < 5:
            return None
        l4 = offset + ((first & 0x0F) << 2)
        icmp, echo, errors = IPPROTO_ICMP, _ECHO_V4, ICMP_ERROR_TYPES
    else:
        l4 = offset + 40
        if protocol in IPV6_EXTENSION_HEADERS:
            try:
                chain = walk_header_chain(packet, offset, end)
            except PacketError:
                return None
            if chain.later_fragment:
                return None
            protocol, l4 = chain.protocol, chain.offset
        icmp, echo, errors = IPPROTO_ICMPV6, _ECHO_V6, ICMPV6_ERROR_TYPES
    if protocol in PORT_PROTOCOLS:
        if l4 + 4 > end:
            return None
        at = l4 + 2 if toward_host else l4
        return protocol, packet[at] << 8 | packet[at + 1]
    if protocol != icmp or l4 + 8 > end:
        return None
    kind = packet[l4]
    if kind in echo:
        return protocol, packet[l4 + 4] << 8 | packet[l4 + 5]
    if kind not in errors:
        return None
    # An error about a packet the host sent quotes the host as source, and vice versa.
    try:
        quoted = parse_icmp(memoryview(packet)[:end], offset).quoted
    except PacketError:
        return None
    if quoted is None:
        return None
    if quoted.protocol in PORT_PROTOCOLS:
        port = quoted.sport if toward_host else quoted.dport
        return None if port is None else (quoted.protocol, port)
    if quoted.protocol == icmp and quoted.has_transport_header and len(quoted.transport) >= 6 \
            and quoted.transport[0] in echo:
        return icmp, quoted.transport[4] << 8 | quoted.transport[5]
    return None


# --- serialisation --------------------------------------------------------------------------
# A message: header, then the peers (with their slots), then the removed names.
#   magic "IPSP" | total length u32 | format u8 | kind u8 | generation u64 | base u64 |
#   flags u8 (1: local destinations changed, 2: ... to this list) | [u16 count, prefixes] |
#   u32 peer count | peers | u32 removal count | (u8 length, UTF-8 name)*
# A snapshot always has flag 1, and flag 2 unless it has no local destinations.
# A peer:
#   slot u32 | u8 length, UTF-8 name | encapsulation u8 | address | port u16 |
#   flags u8 (1: GRE key, 2: auth key) | [u32 GRE key] | [32-byte key] |
#   u16 count, prefixes | u16 count, addresses | u16 count, (address, protocol u8, first u16,
#   last u16)* | u16 count, extra source prefixes
# An address is u8 IP version (4 or 6) and 4 or 16 bytes; a prefix is an address and u8 length.
MAGIC = b"IPSP"
FORMAT = 1
KIND_SNAPSHOT = 1
KIND_DELTA = 2
_HEAD = struct.Struct(">4sIBBQQB")
HEAD_LEN = _HEAD.size
_LOCAL_CHANGED = 0x01
_LOCAL_LIST = 0x02
_PEER_GRE_KEY = 0x01
_PEER_AUTH_KEY = 0x02
_ENCAPSULATIONS = (Encapsulation.UDP, Encapsulation.IPIP, Encapsulation.GRE)


def message_length(head: BytesLike) -> int:
    """The total length of the message that starts with `head` (at least 8 bytes), to read
    the rest of it from a pipe."""
    if len(head) < 8 or bytes(head[:4]) != MAGIC:
        raise PeerCodecError("bad-magic", "not a peer table message")
    length = int.from_bytes(head[4:8], "big")
    if length < HEAD_LEN:
        raise PeerCodecError("bad-length", f"message length {length}")
    return length


def encode_table(table: PeerTable) -> bytes:
    """The whole table, for a worker starting from nothing (keys included: send it only to
    this process's own workers)."""
    peers = [(table.slots[peer.name], peer) for peer in table]
    return _encode(KIND_SNAPSHOT, table.generation, 0, peers, (), True, table.local_destinations)


def encode_delta(delta: TableDelta) -> bytes:
    return _encode(KIND_DELTA, delta.generation, delta.base, delta.upserts, delta.removals,
                   delta.local_changed, delta.local_destinations)


def _encode(
    kind: int, generation: int, base: int, peers: Sequence[tuple[int, Peer]],
    removals: Sequence[str], local_changed: bool, local: Sequence[IPNetwork] | None,
) -> bytes:
    out = bytearray(HEAD_LEN)
    flags = 0
    if local_changed:
        flags |= _LOCAL_CHANGED
        if local is not None:
            flags |= _LOCAL_LIST
            out += _prefixes(local)
    out += len(peers).to_bytes(4, "big")
    for slot, peer in peers:
        out += _encode_peer(slot, peer)
    out += len(removals).to_bytes(4, "big")
    for name in removals:
        out += _name(name)
    _HEAD.pack_into(out, 0, MAGIC, len(out), FORMAT, kind, generation, base, flags)
    return bytes(out)


def _name(name: str) -> bytes:
    data = name.encode()
    return bytes([len(data)]) + data


def _address_bytes(address: IPAddress) -> bytes:
    return bytes([address.version]) + address.packed


def _prefixes(prefixes: Sequence[IPNetwork]) -> bytes:
    return len(prefixes).to_bytes(2, "big") + b"".join(
        _address_bytes(p.network_address) + bytes([p.prefixlen]) for p in prefixes)


def _encode_peer(slot: int, peer: Peer) -> bytes:
    flags = (_PEER_GRE_KEY if peer.gre_key is not None else 0) | (
        _PEER_AUTH_KEY if peer.key is not None else 0)
    out = bytearray(slot.to_bytes(4, "big"))
    out += _name(peer.name)
    out.append(_ENCAPSULATIONS.index(peer.encapsulation))
    out += _address_bytes(peer.endpoint.host)
    out += peer.endpoint.port.to_bytes(2, "big")
    out.append(flags)
    if peer.gre_key is not None:
        out += peer.gre_key.to_bytes(4, "big")
    if peer.key is not None:
        out += peer.key
    out += _prefixes(peer.prefixes)
    out += len(peer.addresses).to_bytes(2, "big")
    for address in peer.addresses:
        out += _address_bytes(address)
    out += len(peer.port_ranges).to_bytes(2, "big")
    for entry in peer.port_ranges:
        out += _address_bytes(entry.address)
        out += struct.pack(">BHH", entry.protocol, entry.first, entry.last)
    out += _prefixes(peer.extra_sources)
    return bytes(out)


class _Reader:
    __slots__ = ("data", "pos")

    def __init__(self, data: BytesLike, pos: int) -> None:
        self.data = data
        self.pos = pos

    def take(self, size: int) -> bytes:
        end = self.pos + size
        if end > len(self.data):
            raise PeerCodecError("truncated", f"needs {end} bytes, has {len(self.data)}")
        chunk = bytes(self.data[self.pos:end])
        self.pos = end
        return chunk

    def number(self, size: int) -> int:
        return int.from_bytes(self.take(size), "big")

    def name(self) -> str:
        try:
            return self.take(self.number(1)).decode()
        except UnicodeDecodeError as exc:
            raise PeerCodecError("bad-name", "a peer name that is not UTF-8") from exc

    def address(self) -> IPAddress:
        version = self.number(1)
        if version == 4:
            return ipaddress.IPv4Address(self.take(4))
        if version == 6:
            return ipaddress.IPv6Address(self.take(16))
        raise PeerCodecError("bad-address", f"IP version {version}")

    def prefixes(self, count: int | None = None) -> tuple[IPNetwork, ...]:
        found = []
        for _ in range(self.number(2) if count is None else count):
            address = self.address()
            length = self.number(1)
            try:
                # The class of the version straight away: ip_network() would try IPv4 first
                # and format an error message for every IPv6 prefix.
                found.append(ipaddress.IPv4Network((int(address), length))
                             if address.version == 4 else
                             ipaddress.IPv6Network((int(address), length)))
            except ValueError as exc:
                raise PeerCodecError("bad-prefix", f"{address}/{length}") from exc
        return tuple(found)

    def peer(self) -> tuple[int, Peer]:
        slot = self.number(4)
        name = self.name()
        kind = self.number(1)
        if kind >= len(_ENCAPSULATIONS):
            raise PeerCodecError("bad-encapsulation", f"encapsulation {kind}")
        host = self.address()
        port = self.number(2)
        flags = self.number(1)
        if flags & ~(_PEER_GRE_KEY | _PEER_AUTH_KEY):
            raise PeerCodecError("bad-flags", f"peer flags 0x{flags:x}")
        gre_key = self.number(4) if flags & _PEER_GRE_KEY else None
        key = self.take(KEY_LEN) if flags & _PEER_AUTH_KEY else None
        prefixes = self.prefixes()
        addresses = tuple(self.address() for _ in range(self.number(2)))
        ranges = []
        for _ in range(self.number(2)):
            address = self.address()
            protocol, first, last = struct.unpack(">BHH", self.take(5))
            ranges.append((address, protocol, first, last))
        extra = self.prefixes()
        try:
            peer = Peer(name, Endpoint(host, port), _ENCAPSULATIONS[kind], prefixes, addresses,
                        tuple(PortRange(*entry) for entry in ranges), extra, gre_key, key)
        except ConfigError as exc:
            raise PeerCodecError("bad-peer", str(exc)) from exc
        return slot, peer


def decode_message(data: BytesLike) -> PeerTable | TableDelta:
    """A table (from `encode_table`) or a delta (from `encode_delta`); PeerCodecError if
    malformed or inconsistent."""
    if len(data) < HEAD_LEN:
        raise PeerCodecError("truncated", f"{len(data)}-byte message")
    magic, length, version, kind, generation, base, flags = _HEAD.unpack_from(data)
    if magic != MAGIC:
        raise PeerCodecError("bad-magic", "not a peer table message")
    if length != len(data):
        raise PeerCodecError("bad-length", f"message says {length} bytes, has {len(data)}")
    if version != FORMAT:
        raise PeerCodecError("bad-format", f"format {version}")
    if kind not in (KIND_SNAPSHOT, KIND_DELTA) or flags & ~(_LOCAL_CHANGED | _LOCAL_LIST) or (
        flags & _LOCAL_LIST and not flags & _LOCAL_CHANGED
    ) or (kind == KIND_SNAPSHOT and not flags & _LOCAL_CHANGED):
        raise PeerCodecError("bad-kind", f"kind {kind}, flags 0x{flags:x}")
    reader = _Reader(data, HEAD_LEN)
    local_changed = bool(flags & _LOCAL_CHANGED)
    local = reader.prefixes() if flags & _LOCAL_LIST else None
    peers = [reader.peer() for _ in range(reader.number(4))]
    removals = tuple(reader.name() for _ in range(reader.number(4)))
    if reader.pos != len(data):
        raise PeerCodecError("trailing", f"{len(data) - reader.pos} bytes after the message")
    if kind == KIND_DELTA:
        return TableDelta(base, generation, tuple(peers), removals, local_changed, local)
    if removals or base:
        raise PeerCodecError("bad-snapshot", "a snapshot with removals or a base")
    if len({slot for slot, _ in peers}) != len(peers):
        raise PeerCodecError("bad-slot", "two peers with one slot")
    try:
        table = PeerTable(local_destinations=local, generation=0)
        return table.apply(TableDelta(0, generation, tuple(peers), (), True, local))
    except ConfigError as exc:
        raise PeerCodecError("conflict", str(exc)) from exc


__all__ = [
    "DropCounters",
    "DropReason",
    "Encapsulation",
    "GenerationError",
    "Peer",
    "PeerCodecError",
    "PeerTable",
    "PortRange",
    "TableDelta",
    "address_key",
    "decode_message",
    "encode_delta",
    "encode_table",
    "endpoint_key",
    "message_length",
]
