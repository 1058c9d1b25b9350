"""Per-packet hooks of the tunnel data path: what a component (RSIP, ILNP) may do to the
packets of a peer, and the verdicts a hook returns.

A hook is called as `hook(buffer, offset, partial, peer)` for the IP packet at
`buffer[offset:]` (its IP length fields say where it ends), `partial` telling whether its L4
checksum field holds a NEEDS_CSUM partial sum, `peer` the peer it goes to (outbound: chosen
by the inner destination before the hook runs) or came from (inbound). It returns:

- `FORWARD` (True): forward it, rewritten in place or not (same length);
- `DROP` (False): drop it (counted as a hook drop, for the peer and the queue);
- `CONTROL`: do not forward it; the data path hands a copy to `Hooks.control` (ILNP Locator
  Updates, keepalives) and counts it;
- a bytes-like object: the packet replaced by these bytes, of any length (an IPv6
  destination-options header inserted or removed). The change must lie before the L4 header
  (its offset moves by the length difference, its checksum is left to the hook); the tunnel
  MTU must leave room for what is added (`TunnelConfig.headroom`).

Where the hook runs, and so what it sees:

- outbound, once per read from TUN, before segmentation: for a TSO super-packet it sees the
  whole super-packet (its headers describe all of it). A replacement leaves the fast paths:
  the packet is copied and sent one inner packet per datagram;
- inbound, once per packet written to TUN, after reassembly: a packet received whole; for a
  run of TCP segments coalesced into one write, or a batch-framed super-packet, it sees the
  first segment (or the super-packet's headers) and what it does carries over to all of
  them. A replacement is honoured for packets received whole; for a coalesced run or a
  super-packet it is refused (dropped and counted in `resize_refused`): a sender whose
  outbound hook changes lengths sends packets one per datagram, so the receiving hook sees
  them whole.

With no hooks the fast paths run untouched; with a hook that keeps lengths they stay in use
(the hook is called from them).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, TypeAlias

if TYPE_CHECKING:
    from ipshift.tunnel.peers import Peer


class _Control:
    """The verdict: hand the packet to the control plane."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "CONTROL"


FORWARD: Final = True
DROP: Final = False
CONTROL: Final = _Control()

HookResult: TypeAlias = "bool | _Control | bytes | bytearray | memoryview"
#: hook(buffer, offset, partial, peer) -> HookResult (see the module docstring).
PeerHook: TypeAlias = "Callable[[bytearray, int, bool, Peer], HookResult]"
#: control(peer, direction, packet): a packet a hook handed over; direction "outbound" (read
#: from TUN) or "inbound" (received from the peer). Called on the forwarding thread (or in a
#: queue worker's parent, see TunnelDaemon): it must be quick and thread-safe.
ControlSink: TypeAlias = "Callable[[Peer, str, bytes], None]"
#: stranger(sender, datagram): a UDP datagram (tunnel header included) from an endpoint no
#: peer has, e.g. a correspondent that moved to an address nobody has told the table of yet.
#: Called on the forwarding thread, once per datagram: it must be quick and thread-safe.
StrangerSink: TypeAlias = "Callable[[tuple[str, int], bytes], None]"

OUTBOUND: Final = "outbound"
INBOUND: Final = "inbound"


@dataclass(frozen=True)
class Hooks:
    """The hooks of one tunnel. `outbound` sees packets read from TUN before they are
    encapsulated, `inbound` packets coming out of the tunnel before they are written;
    `control` receives the packets a hook answered CONTROL for; `resizes` says the hooks may
    return replacements of another length. `on_state(state)` is called in
    every queue worker with what `TunnelDaemon.update_hook_state(state)` sent (JSON-like), for
    hooks whose tables change at run time. `stranger` receives the datagrams of endpoints no
    peer has (still counted as `foreign`), instead of their being dropped unseen: a component
    whose correspondents move (ILNP) learns new endpoints from them. One queue only."""

    outbound: PeerHook | None = None
    inbound: PeerHook | None = None
    control: ControlSink | None = None
    on_state: Callable[[Mapping[str, Any]], None] | None = None
    # The hooks may return replacements of another length: the data path then shows them
    # whole packets (super-packets copied out of the batch slots, no coalescing of received
    # segments), which costs a copy per super-packet.
    resizes: bool = False
    stranger: StrangerSink | None = None
    # whole(buffer, offset, peer): True if the outbound hook may replace this packet read
    # from TUN (its headers at buffer[offset:]), so batch framing must show it the whole
    # packet and send it one inner packet per datagram: a hook that resizes only some
    # packets (ILNP's nonce for a while after a move) keeps batch framing for the others.
    whole: Callable[[bytearray, int, Peer], bool] | None = None

    def __bool__(self) -> bool:
        return self.outbound is not None or self.inbound is not None


def compose(first: PeerHook | None, second: PeerHook | None) -> PeerHook | None:
    """One hook doing `first`, then `second` on what `first` forwards (also on its
    replacement)."""
    if first is None:
        return second
    if second is None:
        return first

    def both(buf: bytearray, offset: int, partial: bool, peer: Peer) -> HookResult:
        result = first(buf, offset, partial, peer)
        if result is True:
            return second(buf, offset, partial, peer)
        if result is False or result is CONTROL or not result:
            return result
        replaced = bytearray(result)  # type: ignore[arg-type]
        after = second(replaced, 0, partial, peer)
        return replaced if after is True else after

    return both


def packet_length(buffer: bytearray | memoryview | bytes, offset: int) -> int:
    """The length of the IP packet at buffer[offset:] by its own header (0 if unreadable)."""
    if len(buffer) - offset < 20:
        return 0
    version = buffer[offset] >> 4
    if version == 4:
        return buffer[offset + 2] << 8 | buffer[offset + 3]
    if version == 6 and len(buffer) - offset >= 40:
        return (buffer[offset + 4] << 8 | buffer[offset + 5]) + 40
    return 0


__all__ = [
    "CONTROL",
    "DROP",
    "FORWARD",
    "INBOUND",
    "OUTBOUND",
    "ControlSink",
    "HookResult",
    "Hooks",
    "PeerHook",
    "StrangerSink",
    "compose",
    "packet_length",
]
