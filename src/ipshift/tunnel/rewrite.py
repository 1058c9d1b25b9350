"""The address-rewrite hook: stateless 1:1 address translation on the tunnel path.

`--rewrite-src OLD=NEW` turns source OLD into NEW on packets entering the tunnel and destination
NEW back into OLD on packets leaving it; `--rewrite-dst OLD=NEW` does the same for the
destination. This is the shape of ILNP locator rewriting (ipshift.ilnp uses the same hooks).

Besides whole addresses, IPv6 /64 prefixes can be mapped (`PrefixMapping`, the locator half
of an ILNP address): the interface identifier stays, so one rule's checksum delta is the same
for every address under the prefix; a FlowRewrite per address met is built once and cached.
An exact address rule wins over a prefix rule. The rules can be replaced while the tunnel
runs (`RewriteRules`, `TunnelDaemon.set_rewrites`).

Each rule is an `ipshift.packet.FlowRewrite`, whose checksum deltas are computed once per rule;
a packet read from TUN with a partial checksum (NEEDS_CSUM) gets the pseudo-header rule (the
delta added to the non-complemented sum), any other the RFC 1624 full-checksum rule. Getting
this wrong goes unnoticed on local delivery and only shows after a forwarded hop that
completes checksums in software (docs/tunnel.md, tests/netns/test_tunnel_forward.py).
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ipshift.packet import FlowRewrite, PacketError
from ipshift.tunnel.config import AddressMapping, ConfigError
from ipshift.tunnel.forwarder import Counters
from ipshift.tunnel.hooks import Hooks, PeerHook

if TYPE_CHECKING:
    from ipshift.tunnel.peers import Peer

log = logging.getLogger("ipshift.tunnel")

PREFIX_BITS = 64  # a prefix rule maps the upper half of an IPv6 address
_CACHE_LIMIT = 4096  # FlowRewrites built for prefix rules and kept, per rule set


@dataclass(frozen=True)
class PrefixMapping:
    """OLD/64=NEW/64: an IPv6 /64 prefix replaced, the interface identifier kept."""

    old: ipaddress.IPv6Network
    new: ipaddress.IPv6Network

    def __post_init__(self) -> None:
        for network in (self.old, self.new):
            if not isinstance(network, ipaddress.IPv6Network) or \
                    network.prefixlen != PREFIX_BITS:
                raise ConfigError(f"prefix rewrite {self}: both sides are IPv6 /64 prefixes")
        if self.old == self.new:
            raise ConfigError(f"prefix rewrite {self}: OLD and NEW are the same prefix")

    @classmethod
    def parse(cls, text: str, what: str = "prefix rewrite") -> PrefixMapping:
        old, _sep, new = text.partition("=")
        try:
            return cls(ipaddress.IPv6Network(old.strip()), ipaddress.IPv6Network(new.strip()))
        except ValueError as exc:
            raise ConfigError(f"{what} {text!r} is not OLD/64=NEW/64 with two IPv6 /64 "
                              "prefixes (host bits zero)") from exc

    def __str__(self) -> str:
        return f"{self.old}={self.new}"


@dataclass(frozen=True)
class RewriteRules:
    """The rewrite state of a tunnel: whole addresses and /64 prefixes, for the source and
    the destination of packets entering the tunnel (leaving it, the reverse)."""

    src: tuple[AddressMapping, ...] = ()
    dst: tuple[AddressMapping, ...] = ()
    src_prefixes: tuple[PrefixMapping, ...] = ()
    dst_prefixes: tuple[PrefixMapping, ...] = ()

    def __post_init__(self) -> None:
        for what, mappings in (("src", self.src), ("dst", self.dst),
                               ("src prefix", self.src_prefixes),
                               ("dst prefix", self.dst_prefixes)):
            for side in ("old", "new"):
                seen: set[Any] = set()
                for mapping in mappings:
                    value = getattr(mapping, side)
                    if value in seen:
                        raise ConfigError(f"rewrite {what}: two rules for {value}; one "
                                          "address or prefix can have one rule only")
                    seen.add(value)

    def __bool__(self) -> bool:
        return bool(self.src or self.dst or self.src_prefixes or self.dst_prefixes)

    def as_dict(self) -> dict[str, list[str]]:
        return {"src": [str(m) for m in self.src], "dst": [str(m) for m in self.dst],
                "src_prefixes": [str(m) for m in self.src_prefixes],
                "dst_prefixes": [str(m) for m in self.dst_prefixes]}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RewriteRules:
        unknown = set(data) - {"src", "dst", "src_prefixes", "dst_prefixes"}
        if unknown:
            raise ConfigError(f"rewrite rules: unknown key(s) {', '.join(sorted(unknown))}")

        def listed(key: str) -> list[str]:
            value = data.get(key, [])
            if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
                raise ConfigError(f"rewrite rules: {key} must be a list of OLD=NEW strings")
            return list(value)

        return cls(
            src=tuple(AddressMapping.parse(m, "rewrite src") for m in listed("src")),
            dst=tuple(AddressMapping.parse(m, "rewrite dst") for m in listed("dst")),
            src_prefixes=tuple(PrefixMapping.parse(m, "rewrite src prefix")
                               for m in listed("src_prefixes")),
            dst_prefixes=tuple(PrefixMapping.parse(m, "rewrite dst prefix")
                               for m in listed("dst_prefixes")),
        )


class _PrefixRules:
    """/64 rules of one kind (source or destination) of one direction."""

    __slots__ = ("_at", "_cache", "_make", "_map")

    def __init__(self, mappings: Sequence[tuple[bytes, bytes]], source: bool) -> None:
        self._map = dict(mappings)  # old 8-byte prefix -> new 8-byte prefix
        self._at = 8 if source else 24  # where the address starts in the IPv6 header
        self._make = FlowRewrite.source if source else FlowRewrite.destination
        self._cache: dict[bytes, FlowRewrite] = {}

    def __bool__(self) -> bool:
        return bool(self._map)

    def apply(self, buf: bytearray, offset: int, partial: bool) -> bool:
        if buf[offset] >> 4 != 6 or len(buf) - offset < 40:
            return False
        at = offset + self._at
        new = self._map.get(bytes(buf[at:at + 8]))
        if new is None:
            return False
        old = bytes(buf[at:at + 16])
        rule = self._cache.get(old)
        if rule is None:
            if len(self._cache) >= _CACHE_LIMIT:
                self._cache.clear()
            rule = self._cache[old] = self._make(old, new + old[8:])
        return rule.apply(buf, offset, partial)


def _prefix_pairs(mappings: Sequence[PrefixMapping], reverse: bool) -> list[tuple[bytes, bytes]]:
    pairs = [(m.old.network_address.packed[:8], m.new.network_address.packed[:8])
             for m in mappings]
    return [(new, old) for old, new in pairs] if reverse else pairs


class AddressRewriter:
    """The rewrite rules of one tunnel, as forwarder hooks.

    A packet gets at most one rule that changes its source and one that changes its
    destination, both applied (one after the other, each updating the checksums by its own
    delta): a packet can match a --rewrite-src and a --rewrite-dst rule at once."""

    def __init__(
        self, src: Sequence[AddressMapping] = (), dst: Sequence[AddressMapping] = (),
        src_prefixes: Sequence[PrefixMapping] = (), dst_prefixes: Sequence[PrefixMapping] = (),
    ) -> None:
        self.rules = RewriteRules(tuple(src), tuple(dst), tuple(src_prefixes),
                                  tuple(dst_prefixes))
        source = [FlowRewrite.source(m.old.packed, m.new.packed) for m in src]
        destination = [FlowRewrite.destination(m.old.packed, m.new.packed) for m in dst]
        # (rules changing the source, rules changing the destination, and the /64 rules of
        # each) of each direction.
        self.outbound = (source, destination, _PrefixRules(_prefix_pairs(src_prefixes, False),
                                                           True),
                         _PrefixRules(_prefix_pairs(dst_prefixes, False), False))
        # Replies come back addressed to the new address: map it back to the old one. The
        # reverse of a source rule changes the destination and vice versa.
        self.inbound = ([rule.reverse() for rule in destination],
                        [rule.reverse() for rule in source],
                        _PrefixRules(_prefix_pairs(dst_prefixes, True), True),
                        _PrefixRules(_prefix_pairs(src_prefixes, True), False))
        self.outbound_rules = source + destination
        self.inbound_rules = self.inbound[0] + self.inbound[1]

    @classmethod
    def of(cls, rules: RewriteRules) -> AddressRewriter:
        return cls(rules.src, rules.dst, rules.src_prefixes, rules.dst_prefixes)

    def __bool__(self) -> bool:
        return bool(self.rules)

    def hooks(self, counters: Counters) -> Hooks:
        """Hooks that apply these rules and count into `counters`."""
        return Hooks(
            outbound=self._hook(*self.outbound, counters),
            inbound=self._hook(*self.inbound, counters),
        )

    @staticmethod
    def _hook(
        source: list[FlowRewrite], destination: list[FlowRewrite], source_prefixes: _PrefixRules,
        destination_prefixes: _PrefixRules, counters: Counters,
    ) -> PeerHook:
        source_prefix = source_prefixes.apply if source_prefixes else None
        destination_prefix = destination_prefixes.apply if destination_prefixes else None

        def rewrite(buf: bytearray, offset: int, partial: bool, peer: Peer | None = None) -> bool:
            changed = False
            try:
                # The first matching rule of each kind; the destination rules match on the
                # destination, which a source rule leaves alone. A whole address wins over
                # its /64.
                for rule in source:
                    if rule.apply(buf, offset, partial):
                        changed = True
                        break
                else:
                    if source_prefix is not None and source_prefix(buf, offset, partial):
                        changed = True
                for rule in destination:
                    if rule.apply(buf, offset, partial):
                        changed = True
                        break
                else:
                    if destination_prefix is not None and \
                            destination_prefix(buf, offset, partial):
                        changed = True
            except PacketError as exc:
                # A packet the rewriter cannot parse must not slip through unrewritten (nor
                # half rewritten).
                log.debug("rewrite refused a packet: %s", exc)
                return False
            if changed:
                counters.rewritten += 1
            return True

        return rewrite
