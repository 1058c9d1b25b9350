"""Configuration of one tunnel: parsed and checked once, so the data path never sees bad input."""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass

from ipshift.tunnel import wire

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPInterface = ipaddress.IPv4Interface | ipaddress.IPv6Interface
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

MAX_QUEUES = 16
UDP_HEADER_LEN = 8
MIN_MTU = 576  # IPv4's minimum reassembly size; IPv6 needs 1280 and is checked separately


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
        if not port.isdigit() or not 1 <= int(port) <= 65535:
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
        return mapping

    def __str__(self) -> str:
        return f"{self.old}={self.new}"


FRAMINGS = ("batch", "packet")


@dataclass(frozen=True)
class TunnelConfig:
    """One point-to-point tunnel. With queues > 1 the tunnel uses UDP ports local.port ..
    local.port + queues - 1 (and the same range at the remote end): one socket per queue, so
    each worker has its own flow through the underlay."""

    dev: str
    local: Endpoint
    remote: Endpoint
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

    def __post_init__(self) -> None:
        if self.framing not in FRAMINGS:
            raise ConfigError(f"--framing must be one of {', '.join(FRAMINGS)}")
        if not self.dev or len(self.dev.encode()) > 15 or "/" in self.dev or " " in self.dev:
            raise ConfigError(f"--dev {self.dev!r}: an interface name has 1-15 characters")
        if self.local.family != self.remote.family:
            raise ConfigError("--local and --remote must both be IPv4 or both be IPv6")
        if not 1 <= self.queues <= MAX_QUEUES:
            raise ConfigError(f"--queues must be 1..{MAX_QUEUES}")
        for endpoint, what in ((self.local, "--local"), (self.remote, "--remote")):
            if endpoint.port + self.queues - 1 > 65535:
                raise ConfigError(f"{what}: {self.queues} queues need ports up to "
                                  f"{endpoint.port + self.queues - 1}")
        if self.mtu is not None:
            self.check_mtu(self.mtu)

    @property
    def overhead(self) -> int:
        """Bytes the tunnel adds to each inner packet: outer IP + UDP + tunnel header."""
        outer_ip = 40 if self.remote.host.version == 6 else 20
        return outer_ip + UDP_HEADER_LEN + wire.HEADER_LEN

    def check_mtu(self, mtu: int) -> None:
        lowest = 1280 if any(a.version == 6 for a in self.addresses) else MIN_MTU
        if not lowest <= mtu <= 65535 - self.overhead:
            raise ConfigError(
                f"tunnel MTU {mtu} is outside {lowest}..{65535 - self.overhead}"
                + (" (IPv6 needs 1280)" if lowest == 1280 else "")
            )

    def mtu_for(self, underlay_mtu: int) -> int:
        """The tunnel MTU: the configured one, else what fits one underlay packet."""
        mtu = self.mtu if self.mtu is not None else underlay_mtu - self.overhead
        self.check_mtu(mtu)
        return mtu
