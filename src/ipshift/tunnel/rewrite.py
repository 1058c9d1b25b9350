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
    """The rewrite rules of one tunnel, as forwarder hooks."""

    def __init__(
        self, src: Sequence[AddressMapping] = (), dst: Sequence[AddressMapping] = ()
    ) -> None:
        self.outbound_rules = [FlowRewrite.source(m.old.packed, m.new.packed) for m in src] + [
            FlowRewrite.destination(m.old.packed, m.new.packed) for m in dst
        ]
        # Replies come back addressed to the new address: map it back to the old one.
        self.inbound_rules = [rule.reverse() for rule in self.outbound_rules]

    def __bool__(self) -> bool:
        return bool(self.outbound_rules)

    def hooks(self, counters: Counters) -> Hooks:
        """Hooks that apply these rules and count into `counters`."""
        return Hooks(
            outbound=self._hook(self.outbound_rules, counters),
            inbound=self._hook(self.inbound_rules, counters),
        )

    @staticmethod
    def _hook(rules: list[FlowRewrite], counters: Counters) -> PacketHook:
        def rewrite(buf: bytearray, offset: int, partial: bool) -> bool:
            try:
                for rule in rules:
                    if rule.apply(buf, offset, partial):
                        counters.rewritten += 1
                        return True
            except PacketError as exc:
                # A packet the rewriter cannot parse must not slip through unrewritten.
                log.debug("rewrite refused a packet: %s", exc)
                return False
            return True

        return rewrite

