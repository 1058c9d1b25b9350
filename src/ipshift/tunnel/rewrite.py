"""The address-rewrite hook: stateless 1:1 address translation on the tunnel path.

`--rewrite-src OLD=NEW` turns source OLD into NEW on packets entering the tunnel and destination
NEW back into OLD on packets leaving it; `--rewrite-dst OLD=NEW` does the same for the
destination. This is the shape of ILNP locator rewriting (ipshift.ilnp uses the same hooks).

Each rule is an `ipshift.packet.FlowRewrite`, whose checksum deltas are computed once per rule;
a packet read from TUN with a partial checksum (NEEDS_CSUM) gets the pseudo-header rule (the
delta added to the non-complemented sum), any other the RFC 1624 full-checksum rule. Getting
this wrong goes unnoticed on local delivery and only shows after a forwarded hop that
completes checksums in software (docs/tunnel.md, tests/netns/test_tunnel_forward.py).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from ipshift.packet import FlowRewrite, PacketError
from ipshift.tunnel.config import AddressMapping
from ipshift.tunnel.forwarder import Counters, Hooks
from ipshift.tunnel.gso import PacketHook

log = logging.getLogger("ipshift.tunnel")


class AddressRewriter:
    """The rewrite rules of one tunnel, as forwarder hooks.

    A packet gets at most one rule that changes its source and one that changes its
    destination, both applied (one after the other, each updating the checksums by its own
    delta): a packet can match a --rewrite-src and a --rewrite-dst rule at once."""

    def __init__(
        self, src: Sequence[AddressMapping] = (), dst: Sequence[AddressMapping] = ()
    ) -> None:
        source = [FlowRewrite.source(m.old.packed, m.new.packed) for m in src]
        destination = [FlowRewrite.destination(m.old.packed, m.new.packed) for m in dst]
        # (rules changing the source, rules changing the destination) of each direction.
        self.outbound = (source, destination)
        # Replies come back addressed to the new address: map it back to the old one. The
        # reverse of a source rule changes the destination and vice versa.
        self.inbound = ([rule.reverse() for rule in destination],
                        [rule.reverse() for rule in source])
        self.outbound_rules = source + destination
        self.inbound_rules = self.inbound[0] + self.inbound[1]

    def __bool__(self) -> bool:
        return bool(self.outbound_rules)

    def hooks(self, counters: Counters) -> Hooks:
        """Hooks that apply these rules and count into `counters`."""
        return Hooks(
            outbound=self._hook(*self.outbound, counters),
            inbound=self._hook(*self.inbound, counters),
        )

    @staticmethod
    def _hook(
        source: list[FlowRewrite], destination: list[FlowRewrite], counters: Counters
    ) -> PacketHook:
        def rewrite(buf: bytearray, offset: int, partial: bool) -> bool:
            changed = False
            try:
                # The first matching rule of each kind; the destination rules match on the
                # destination, which a source rule leaves alone.
                for rule in source:
                    if rule.apply(buf, offset, partial):
                        changed = True
                        break
                for rule in destination:
                    if rule.apply(buf, offset, partial):
                        changed = True
                        break
            except PacketError as exc:
                # A packet the rewriter cannot parse must not slip through unrewritten (nor
                # half rewritten).
                log.debug("rewrite refused a packet: %s", exc)
                return False
            if changed:
                counters.rewritten += 1
            return True

        return rewrite
