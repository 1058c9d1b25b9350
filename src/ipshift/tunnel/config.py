"""Configuration of one tunnel: parsed and checked once, so the data path never sees bad input."""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ipshift.tunnel import wire

if TYPE_CHECKING:
    from ipshift.tunnel.peers import Peer

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPInterface = ipaddress.IPv4Interface | ipaddress.IPv6Interface
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

MAX_QUEUES = 16
MAX_HEADROOM = 256  # bytes a hook may add to a packet (an IPv6 destination option needs 8-24)
AUTH_OVERHEAD = 28  # ipshift.tunnel.auth.OVERHEAD: nonce and tag per authenticated datagram
UDP_HEADER_LEN = 8
MIN_MTU = 576  # IPv4's minimum reassembly size; IPv6 needs 1280 and is checked separately
IPV6_MIN_MTU = 1280  # RFC 8200 section 5
IFNAMSIZ = 16  # Linux interface names: up to 15 bytes and a NUL
IPV4_BROADCAST = ipaddress.IPv4Address("255.255.255.255")


class ConfigError(ValueError):
    """The tunnel configuration is unusable; the message says what to change."""


@dataclass(frozen=True)
class Endpoint:
    """A numeric IP address and UDP port."""

    host: IPAddress
    port: int

    @classmethod
    def parse(cls, text: str, what: str = "endpoint") -> Endpoint:
        """"192.0.2.1:4789" or "[2001:db8::1]:4789"."""
        if text.startswith("["):
            host, sep, port = text[1:].partition("]:")
        else:
            host, sep, port = text.rpartition(":")
            if ":" in host:
                raise ConfigError(f"{what} {text!r}: write IPv6 endpoints as [ADDRESS]:PORT")
        if not sep or not host:
            raise ConfigError(f"{what} {text!r} is not ADDRESS:PORT")
        try:
            address = ipaddress.ip_address(host)
        except ValueError as exc:
            raise ConfigError(f"{what} {text!r}: {host!r} is not an IP address") from exc
        # isdigit() alone also takes "²" and other non-ASCII digits, which int() refuses.
        if not (port.isascii() and port.isdigit()) or not 1 <= int(port) <= 65535:
            raise ConfigError(f"{what} {text!r}: port must be 1..65535")
        return cls(address, int(port))

    @property
    def family(self) -> socket.AddressFamily:
        return socket.AF_INET6 if self.host.version == 6 else socket.AF_INET

    def socket_address(self, port_offset: int = 0) -> tuple[str, int]:
        return (str(self.host), self.port + port_offset)

    def __str__(self) -> str:
        host = f"[{self.host}]" if self.host.version == 6 else str(self.host)
        return f"{host}:{self.port}"


@dataclass(frozen=True)
class AddressMapping:
    """OLD=NEW: an address the rewrite hook replaces."""

    old: IPAddress
    new: IPAddress

    @classmethod
    def parse(cls, text: str, what: str = "rewrite") -> AddressMapping:
        old, sep, new = text.partition("=")
        try:
            mapping = cls(ipaddress.ip_address(old.strip()), ipaddress.ip_address(new.strip()))
        except ValueError as exc:
            raise ConfigError(f"{what} {text!r} is not OLD=NEW with two IP addresses") from exc
        if not sep or mapping.old.version != mapping.new.version:
            raise ConfigError(f"{what} {text!r}: both addresses must be of one IP version")
        if mapping.old == mapping.new:
            raise ConfigError(f"{what} {text!r}: OLD and NEW are the same address")
        return mapping

    def __str__(self) -> str:
        return f"{self.old}={self.new}"


FRAMINGS = ("batch", "packet")


@dataclass(frozen=True)
class TunnelConfig:
    """One tunnel end. Its peers are either one `remote` (a point-to-point tunnel: the peer
    owns the --route prefixes and the subnets of the --address entries) or `peers`, a table
    (ipshift.tunnel.peers) that can change while the tunnel runs.

    With queues > 1 the tunnel uses UDP ports local.port .. local.port + queues - 1 (and the
    same range at every peer): one socket per queue, so each worker has its own flow through
    the underlay. `extra_local`: a second local endpoint of the other IP family, so that IPv4
    and IPv6 peers are served side by side. `serve`: inner destinations this end accepts from
    the tunnel besides its own addresses (a gateway's networks); None accepts any (a relay).
    `headroom`: bytes the tunnel MTU leaves for hooks that add headers. `dynamic`: the table
    may start empty (peers arrive through `update_peers`)."""

    dev: str
    local: Endpoint
    remote: Endpoint | None = None
    addresses: tuple[IPInterface, ...] = ()
    routes: tuple[IPNetwork, ...] = ()
    mtu: int | None = None  # None: the underlay path MTU minus the tunnel overhead
    queues: int = 1
    rewrite_src: tuple[AddressMapping, ...] = ()
    rewrite_dst: tuple[AddressMapping, ...] = ()
    netns: str | None = None
    # "batch": super-packets cross whole, in chunks (wire version 2); "packet": one inner
    # packet per datagram for everything (version 1 only, for peers that speak nothing else).
    framing: str = "batch"
    peers: tuple[Peer, ...] = ()
    extra_local: Endpoint | None = None
    serve: tuple[IPNetwork, ...] | None = ()
    headroom: int = 0
    # A table that may start empty and gets its peers while running (a gateway's clients).
    dynamic: bool = False

    def __post_init__(self) -> None:
        if self.framing not in FRAMINGS:
            raise ConfigError(f"--framing must be one of {', '.join(FRAMINGS)}")
        check_interface_name(self.dev)
        if self.dynamic and self.remote is not None:
            raise ConfigError("a tunnel whose peers come and go has no --remote")
        if not self.dynamic and (self.remote is None) == (not self.peers):
            raise ConfigError("give the peer with --remote ADDR:PORT, or several with --peers "
                              "FILE (not both)")
        if self.remote is not None and self.local.family != self.remote.family:
            raise ConfigError("--local and --remote must both be IPv4 or both be IPv6")
        if self.extra_local is not None and self.extra_local.family == self.local.family:
            raise ConfigError("a second --local must be of the other IP family (one IPv4 and "
                              "one IPv6 endpoint)")
        if not 1 <= self.queues <= MAX_QUEUES:
            raise ConfigError(f"--queues must be 1..{MAX_QUEUES}")
        if not 0 <= self.headroom <= MAX_HEADROOM:
            raise ConfigError(f"--headroom must be 0..{MAX_HEADROOM} bytes")
        ends: list[tuple[Endpoint | None, str]] = [
            (self.local, "--local"), (self.extra_local, "--local"), (self.remote, "--remote")]
        ends += [(peer.endpoint, f"peer {peer.name!r}") for peer in self.peers
                 if peer.endpoint.port]
        for endpoint, what in ends:
            if endpoint is not None and endpoint.port + self.queues - 1 > 65535:
                raise ConfigError(f"{what}: {self.queues} queues need ports up to "
                                  f"{endpoint.port + self.queues - 1}")
        for local in (self.local, self.extra_local):
            if local is not None:
                check_local(local)
        for remote, what in self.remotes():
            check_remote(remote, what)
            check_routes(self.routes, remote, what)
            if self.local.family != remote.family and (
                self.extra_local is None or self.extra_local.family != remote.family
            ):
                raise ConfigError(f"{what} {remote}: no local endpoint of its IP family; give "
                                  f"--local for IPv{remote.host.version} too")
        for what, mappings in (("--rewrite-src", self.rewrite_src),
                               ("--rewrite-dst", self.rewrite_dst)):
            _check_mappings(what, mappings)
        if self.mtu is not None:
            self.check_mtu(self.mtu)

    def remotes(self) -> list[tuple[Endpoint, str]]:
        """Every peer endpoint, with how the configuration names it."""
        if self.remote is not None:
            return [(self.remote, "--remote")]
        return [(peer.endpoint, f"peer {peer.name!r}") for peer in self.peers]

    def locals(self) -> list[Endpoint]:
        return [self.local] if self.extra_local is None else [self.local, self.extra_local]

    @property
    def authenticated(self) -> bool:
        """Does any configured peer authenticate its datagrams (which costs MTU)?"""
        return any(peer.key is not None for peer in self.peers)

    @property
    def overhead(self) -> int:
        """Bytes the tunnel adds to each inner packet: outer IP + UDP + tunnel header (over
        IPv6 if any peer is reached over IPv6, or with no peer yet a local endpoint is IPv6),
        the authentication header and tag if any peer
        has a key, and the headroom left for hooks."""
        remotes = self.remotes()
        # with no peers yet (a dynamic table) the local endpoints say how they will come
        six = any(remote.host.version == 6 for remote, _what in remotes) or (
            not remotes and any(local.host.version == 6 for local in self.locals()))
        auth = AUTH_OVERHEAD if self.authenticated else 0
        return (40 if six else 20) + UDP_HEADER_LEN + wire.HEADER_LEN + auth + self.headroom

    @property
    def ipv6_cause(self) -> str | None:
        """The first option that carries IPv6 through the tunnel (which then needs an MTU of
        at least 1280), or None for an IPv4-only tunnel."""
        for address in self.addresses:
            if address.version == 6:
                return f"--address {address}"
        for route in self.routes:
            if route.version == 6:
                return f"--route {route}"
        for what, mappings in (("--rewrite-src", self.rewrite_src),
                               ("--rewrite-dst", self.rewrite_dst)):
            for mapping in mappings:
                if mapping.old.version == 6:
                    return f"{what} {mapping}"
        for peer in self.peers:
            for entry in (*peer.prefixes, *peer.addresses):
                if entry.version == 6:
                    return f"peer {peer.name!r} ({entry})"
        return None

    def check_mtu(self, mtu: int, underlay_mtu: int | None = None) -> None:
        """Refuse a tunnel MTU outside what the inner IP versions need and UDP can carry.
        `underlay_mtu`: the MTU was derived from it (no --mtu), which the message says."""
        ipv6 = self.ipv6_cause
        lowest = IPV6_MIN_MTU if ipv6 else MIN_MTU
        if lowest <= mtu <= 65535 - self.overhead:
            return
        if underlay_mtu is None:
            message = f"tunnel MTU {mtu} is outside {lowest}..{65535 - self.overhead}"
        else:
            message = (f"the tunnel MTU derived from the underlay MTU {underlay_mtu} (minus "
                       f"{self.overhead} bytes of tunnel overhead) is {mtu}, outside "
                       f"{lowest}..{65535 - self.overhead}")
        if ipv6 and mtu < lowest:
            message += f" (IPv6 needs 1280, and {ipv6} carries IPv6)"
        if underlay_mtu is not None and mtu < lowest:
            message += "; raise the underlay MTU or set --mtu"
        raise ConfigError(message)

    def mtu_for(self, underlay_mtu: int) -> int:
        """The tunnel MTU: the configured one, else what fits one underlay packet."""
        if self.mtu is not None:
            self.check_mtu(self.mtu)
            return self.mtu
        mtu = underlay_mtu - self.overhead
        self.check_mtu(mtu, underlay_mtu)
        return mtu


def check_endpoints(local: Endpoint, remote: Endpoint) -> None:
    """The peer must be one unicast host elsewhere; the local end an address of this host, or
    the unspecified address (bind to any)."""
    check_remote(remote)
    check_local(local)


def check_remote(remote: Endpoint, what: str = "--remote") -> None:
    """A peer endpoint must be one unicast host elsewhere."""
    problem = _not_one_host(remote.host)
    if problem is None and _plain(remote.host).is_unspecified:
        problem = "is unspecified: name the peer's address"
    if problem is None and _plain(remote.host).is_loopback:
        problem = "is a loopback address: the peer must be another host"
    if problem:
        raise ConfigError(f"{what} {remote}: {remote.host} {problem}")


def check_local(local: Endpoint) -> None:
    problem = _not_one_host(local.host)
    if problem:
        raise ConfigError(f"--local {local}: {local.host} {problem}; use an address of this "
                          "host (or 0.0.0.0 / [::] for any)")


def check_routes(routes: Iterable[IPNetwork], remote: Endpoint, what: str = "--remote") -> None:
    """A route through the tunnel must not cover a peer's own address: the tunnel's
    datagrams to the peer would be routed into the tunnel itself."""
    peer = _plain(remote.host)
    for prefix in routes:
        if peer.version == prefix.version and peer in prefix:
            name = "the peer's address" if what == "--remote" else f"the address of {what}"
            raise ConfigError(f"--route {prefix} covers {name} {remote.host}: the "
                              "tunnel would carry its own datagrams; route narrower prefixes "
                              "that leave the peer out")


def remote_problem(config: TunnelConfig, local_addresses: Iterable[str]) -> str | None:
    """Why a peer cannot be where the configuration puts it, given the addresses of this host
    (of the namespace the tunnel runs in) as text, zone suffixes ("%eth0") allowed; None if
    every peer can. A peer that is this host itself would loop the tunnel's datagrams back to
    it. The daemon calls this with what the kernel reports; unparsable entries are skipped."""
    own: set[IPAddress] = set()
    for text in local_addresses:
        try:
            own.add(_plain(ipaddress.ip_address(text.partition("%")[0])))
        except ValueError:
            continue
    for remote, what in config.remotes():
        if _plain(remote.host) in own:
            return (f"{what} {remote}: {remote.host} is an address of this host; name the "
                    "peer's address")
    return None


def _plain(address: IPAddress) -> IPAddress:
    """`address` without a zone, and an IPv4-mapped IPv6 address as the IPv4 address it
    reaches (a socket sends to ::ffff:127.0.0.1 over loopback)."""
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return address.ipv4_mapped
        if address.scope_id:
            return ipaddress.IPv6Address(int(address))
    return address


def _not_one_host(address: IPAddress) -> str | None:
    """Why datagrams to or from `address` do not concern one host, or None."""
    plain = _plain(address)
    if plain.is_multicast:
        return "is a multicast address: a tunnel end is one host"
    if plain == IPV4_BROADCAST:
        return "is the broadcast address: a tunnel end is one host"
    return None


def check_interface_name(name: str) -> None:
    """Refuse a --dev name Linux refuses (dev_valid_name: 1-15 bytes; not "." or ".."; no "/",
    ":" or whitespace), one it would treat as a pattern ("%": tun%d picks a free number), and
    anything but printable ASCII (what other tools, nft rules and logs handle everywhere;
    bytes of argv that are not UTF-8 arrive as surrogate escapes and are caught here too)."""
    if not name.isascii() or not name.isprintable():
        raise ConfigError(f"--dev {name!a}: an interface name is printable ASCII "
                          "(letters, digits, '-', '_', '.')")
    if not 1 <= len(name) <= IFNAMSIZ - 1:
        raise ConfigError(f"--dev {name!r}: an interface name has 1-{IFNAMSIZ - 1} bytes, "
                          f"not {len(name)}")
    if name in (".", ".."):
        raise ConfigError(f"--dev {name!r}: '.' and '..' are not interface names")
    bad = sorted({c for c in name if c in "/:%" or c.isspace()})
    if bad:
        raise ConfigError(f"--dev {name!r}: an interface name cannot contain "
                          f"{', '.join(repr(c) for c in bad)} (no '/', ':', '%' or whitespace)")


def _check_mappings(what: str, mappings: tuple[AddressMapping, ...]) -> None:
    """One rule per address of a direction: two rules with the same OLD (or the same NEW, which
    is OLD of the reverse rule) would make all but the first dead."""
    for side in ("old", "new"):
        seen: dict[IPAddress, AddressMapping] = {}
        for mapping in mappings:
            address = getattr(mapping, side)
            if address in seen:
                raise ConfigError(f"{what} {seen[address]} and {what} {mapping}: two rules "
                                  f"for {address}; one address can have one rule only")
            seen[address] = mapping
