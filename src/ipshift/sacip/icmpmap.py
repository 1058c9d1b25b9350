"""ICMP errors about moved sessions, mapped back to what the sockets know. Pure.

The stateless remaps do not touch ICMP errors: an error a router sends about a moved
session's packet (above all "fragmentation needed" / "packet too big", PMTU discovery) quotes
the packet as it was on the wire — the new addresses — and the kernel finds no socket for it.
The daemon queues arriving ICMP errors (NFQUEUE) and asks `map_error`, which rewrites the
quoted packet back to the socket-side tuple and the error's own destination back to the
socket's address, checksums updated incrementally:

    changed = map_error(buf, lookup)     # lookup(proto, wire_local, lport, wire_peer, pport)
                                         #   -> (socket local, socket peer) or None
    queue.replace(packet_id, buf) if changed else queue.accept(packet_id)

Errors about other packets are left alone (False). A malformed packet raises PacketError
(the daemon counts it and lets it pass unchanged: it is not its business to drop it).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable

from ipshift.packet.errors import PacketError
from ipshift.packet.icmp import parse_icmp, rewrite_quoted
from ipshift.packet.rewrite import FlowRewrite

PROTO_NAMES = {6: "tcp", 17: "udp"}
# ICMP errors that quote a packet (RFC 792/4443): unreachable, time exceeded, parameter
# problem; ICMPv6 adds packet too big
ICMP_ERRORS = (3, 11, 12)
ICMPV6_ERRORS = (1, 2, 3, 4)

Lookup = Callable[[str, str, int, str, int], "tuple[str, str] | None"]


def map_error(buf: bytearray, lookup: Lookup) -> bool:
    """Rewrite the ICMP error in `buf` (a whole IP packet) if it quotes a moved session's
    packet; True if it changed."""
    message = parse_icmp(buf, 0)
    quote = message.quoted
    if quote is None or quote.sport is None or quote.dport is None:
        return False
    proto = PROTO_NAMES.get(quote.protocol)
    if proto is None:
        return False
    wire_local = str(ipaddress.ip_address(quote.src))
    wire_peer = str(ipaddress.ip_address(quote.dst))
    found = lookup(proto, wire_local, quote.sport, wire_peer, quote.dport)
    if found is None:
        return False
    local, peer = found
    if (local, peer) == (wire_local, wire_peer):
        return False
    rewrite_quoted(buf, 0, src=local, dst=peer)
    outer = str(ipaddress.ip_address(message.dst))
    if outer == wire_local and local != wire_local:
        FlowRewrite(dst=(wire_local, local), icmp_errors=False).apply(buf, 0)
    return True


__all__ = ["ICMPV6_ERRORS", "ICMP_ERRORS", "PacketError", "map_error"]
