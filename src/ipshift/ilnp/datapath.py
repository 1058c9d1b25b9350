"""The ILNP node's per-packet hooks on the tunnel: application form <-> ILNPv6 on the wire.

Programs see every node at `APP:<NID>` (the application locator, docs/ilnp.md). A packet read
from the TUN device has APP in both locators; on the way out the hook puts in the locators
the engine chose for that correspondent and, while the engine says so, our nonce; on the way
in it checks what RFC 6741/6744 ask (ours by NID and locator, the source locator one the
correspondent holds, or else its nonce), puts APP back and takes the nonce out.

What the hook cannot decide it hands to the control plane (`CONTROL`): a packet to or from a
correspondent it has no entry for, a Locator Update, a nonce it has not learned yet, a known
nonce from a new locator, a packet for another node (a router's transit). Everything it drops
is counted by reason (`counters`). Pure: the clock is handed in, the state comes from the
engine (`NodeEngine.paths`) through `encode_state` / `apply` (JSON-like, so it could cross to
a worker process).

    path = DataPath(nid, app_locator, rule="ilnp", clock=time.monotonic)
    path.apply(DataPath.encode_state(engine.paths(now), engine.own))   # after each change
    Hooks(outbound=path.outbound, inbound=path.inbound, on_state=path.apply, resizes=True)

Checksums: the application locator is checksum-neutral (its four 16-bit words add up to zero
in ones' complement, `neutral_locator`), so the sum the kernel computed over APP:a and APP:b
equals RFC 6741's sum over the NIDs alone: under the ILNP rule TCP and UDP checksums pass
through untouched; under the plain IPv6 rule (`rule="ipv6"`) and for ICMPv6 they are fixed
incrementally (partial sums of NEEDS_CSUM packets included).
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, Literal, cast

from ipshift.packet.errors import BytesLike, PacketError
from ipshift.packet.ilnp import (
    fill_checksum,
    find_nonce,
    insert_nonce,
    remove_nonce,
    rewrite_locators,
)
from ipshift.tunnel.hooks import CONTROL, DROP, FORWARD, HookResult

if TYPE_CHECKING:
    from ipshift.ilnp.engine import Path
    from ipshift.tunnel.peers import Peer

# payload length, next header, hop limit, source locator and NID, destination locator and NID
_HEADER = struct.Struct("!4xHBBQQQQ")
_DSTOPTS, _ICMPV6, _LOCATOR_UPDATE = 60, 58, 156
# next headers that end the chain at once: no extension header, so no nonce to look for
_UPPER_LAYER = frozenset({6, 17, 58, 132, 33, 136, 59})
DROP_REASONS = ("malformed", "foreign_source", "not_for_us", "not_our_locator", "bad_nonce",
                "unknown_locator", "nonce_refused")


def locator_sum(locator: int) -> int:
    """The ones' complement sum of a locator's four 16-bit words (0xFFFF counts as 0)."""
    total = sum((locator >> shift) & 0xFFFF for shift in (48, 32, 16, 0))
    while total > 0xFFFF:
        total = (total & 0xFFFF) + (total >> 16)
    return 0 if total == 0xFFFF else total


def neutral_locator(locator: int) -> int:
    """The nearest checksum-neutral locator: `locator` with its fourth word chosen so the
    four words sum to zero (the same /48)."""
    base = locator & ~0xFFFF
    return base | (0xFFFF - locator_sum(base)) % 0xFFFF


class _Entry:
    __slots__ = ("carry_first", "carry_pending", "carry_until", "local", "locators",
                 "nonce_in", "nonce_out", "remote", "routed")

    def __init__(self, local: int, remote: int, nonce_out: bytes, nonce_in: bytes | None,
                 carry_until: float, carry_first: bool, locators: frozenset[int],
                 routed: bool = False, carry_pending: bool = False) -> None:
        self.local = local
        self.remote = remote
        self.nonce_out = nonce_out
        self.nonce_in = nonce_in
        self.carry_until = carry_until
        self.carry_first = carry_first
        self.locators = locators
        self.routed = routed
        self.carry_pending = carry_pending  # until our update is acked (not cleared here)


class DataPath:
    def __init__(self, nid: int, app_locator: int, *, rule: str = "ilnp",
                 clock: Callable[[], float], router: bool = False,
                 catch_all: str = "unresolved") -> None:
        """catch_all: the name of the peer that owns the whole application /64: what the
        table sends there has no route yet and goes to the control plane."""
        if locator_sum(app_locator):
            raise ValueError(f"application locator {app_locator:#x} is not checksum-neutral; "
                             f"use {neutral_locator(app_locator):#x}")
        if rule not in ("ilnp", "ipv6"):
            raise ValueError(f"checksum rule must be 'ilnp' or 'ipv6', not {rule!r}")
        self.nid = nid
        self.app = app_locator
        self.rule = cast(Literal["ilnp", "ipv6"], rule)
        self.clock = clock
        self.router = router
        self.catch_all = catch_all
        self.out_by_locator: dict[int, int] = {}  # packets sent from each of our locators
        self.in_by_locator: dict[int, int] = {}   # ... received at each
        self.entries: dict[int, _Entry] = {}
        self.own: frozenset[int] = frozenset()
        self.counters = dict.fromkeys(DROP_REASONS, 0)
        self.counters.update(nonce_added=0, nonce_removed=0, to_control=0, forwarded=0)

    # --- state from the engine ---------------------------------------------------------------
    @staticmethod
    def encode_state(paths: Mapping[int, Path], own: Iterable[int]) -> dict[str, Any]:
        """The engine's view, JSON-like (what `apply` takes)."""
        return {
            "own": sorted(own),
            "paths": [[p.nid, p.local, p.remote, p.nonce_out.hex(),
                       None if p.nonce_in is None else p.nonce_in.hex(),
                       p.carry_until, p.carry_first, sorted(p.locators),
                       p.next_hop[1] != p.nid, p.carry_pending]
                      for p in paths.values()],
        }

    def apply(self, state: Mapping[str, Any]) -> None:
        """Take the state `encode_state` made (the hooks' on_state)."""
        entries = {}
        for nid, local, remote, out, into, until, first, locators, routed, pending in \
                state["paths"]:
            entries[nid] = _Entry(local, remote, bytes.fromhex(out),
                                  None if into is None else bytes.fromhex(into), until, first,
                                  frozenset(locators), routed, pending)
        self.entries = entries
        self.own = frozenset(state["own"])

    # --- the hooks -------------------------------------------------------------------------------
    def outbound(self, buf: bytearray, offset: int, partial: bool,
                 peer: Peer | None = None) -> HookResult:
        """A packet read from TUN (application form) toward its correspondent."""
        if len(buf) - offset < 40 or buf[offset] >> 4 != 6:
            return self._drop("malformed")
        _, _, _, src_loc, src_nid, dst_loc, dst_nid = _HEADER.unpack_from(buf, offset)
        if src_loc != self.app or src_nid != self.nid or dst_loc != self.app:
            return self._drop("foreign_source")
        entry = self.entries.get(dst_nid)
        if entry is None or (peer is not None and peer.name == self.catch_all):
            return self._control(buf, offset, partial, "ipv6")
        try:
            rewrite_locators(buf, entry.local, entry.remote, self.rule, offset, partial=partial)
        except PacketError:
            return self._drop("malformed")
        counts = self.out_by_locator
        counts[entry.local] = counts.get(entry.local, 0) + 1
        if entry.carry_first or entry.carry_pending or self.clock() < entry.carry_until:
            try:
                packet = insert_nonce(buf, entry.nonce_out, offset)
            except PacketError:  # a fragment, AH, too big: it goes without
                self.counters["nonce_refused"] += 1
                return FORWARD
            self.counters["nonce_added"] += 1
            return packet
        return FORWARD

    def needs_whole(self, buf: bytearray, offset: int, peer: Peer | None = None) -> bool:
        """Whether the tunnel must hand this packet read from TUN over whole and send it one
        inner packet per datagram, not as a batch-framed super-packet: `outbound` will add
        the nonce to it (its correspondent's nonce window), or it goes through a router,
        which forwards packets one by one and cannot take a batch apart."""
        if len(buf) - offset < 40:
            return False
        entry = self.entries.get(int.from_bytes(buf[offset + 32:offset + 40], "big"))
        return entry is not None and (entry.routed or entry.carry_first or entry.carry_pending
                                      or self.clock() < entry.carry_until)

    def inbound(self, buf: bytearray, offset: int, partial: bool,
                peer: Peer | None = None) -> HookResult:
        """A packet from the tunnel (ILNPv6) toward this node's programs."""
        if len(buf) - offset < 40 or buf[offset] >> 4 != 6:
            return self._drop("malformed")
        _, next_header, _, src_loc, src_nid, dst_loc, dst_nid = _HEADER.unpack_from(buf, offset)
        if dst_nid != self.nid:
            if self.router:
                return self._control(buf, offset, partial, self.rule)
            return self._drop("not_for_us")
        if dst_loc not in self.own:
            return self._drop("not_our_locator")
        nonce = None
        if next_header not in _UPPER_LAYER:  # extension headers: the nonce may be among them
            try:
                nonce = find_nonce(buf, offset)
            except PacketError:
                return self._drop("malformed")
        if is_locator_update(buf, offset):
            return self._control(buf, offset, partial, self.rule)
        entry = self.entries.get(src_nid)
        if entry is None:  # a new correspondent: the engine decides
            return self._control(buf, offset, partial, self.rule)
        if nonce is not None:
            if nonce != entry.nonce_in and nonce != entry.nonce_out:
                if entry.nonce_in is None:
                    return self._control(buf, offset, partial, self.rule)
                return self._drop("bad_nonce")
            if src_loc not in entry.locators:  # it moved: the engine learns the locator
                return self._control(buf, offset, partial, self.rule)
        elif src_loc not in entry.locators:
            return self._drop("unknown_locator")
        try:
            if nonce is not None:  # first: a packet it cannot be taken out of is refused whole
                packet = bytearray(remove_nonce(buf, offset))
                rewrite_locators(packet, self.app, self.app, self.rule, 0, partial=partial)
            else:
                rewrite_locators(buf, self.app, self.app, self.rule, offset, partial=partial)
        except PacketError:
            return self._drop("malformed")
        entry.carry_first = False
        counts = self.in_by_locator
        counts[dst_loc] = counts.get(dst_loc, 0) + 1
        if nonce is None:
            return FORWARD
        self.counters["nonce_removed"] += 1
        return bytes(packet)

    def transit(self, buf: bytearray) -> tuple[int, int] | None:
        """A router's fast path for a packet for another node (what `inbound` handed to the
        control plane): if its destination locator is one of ours, the next hop is the
        destination itself; the hop limit is decremented in place. None: the engine decides
        (another router, the hop limit spent, not transit at all)."""
        if not self.router or len(buf) < 40 or buf[0] >> 4 != 6:
            return None
        _, _, hop_limit, _, _, dst_loc, dst_nid = _HEADER.unpack_from(buf)
        if dst_nid == self.nid or dst_loc not in self.own or hop_limit <= 1:
            return None
        buf[7] = hop_limit - 1
        self.counters["forwarded"] += 1
        return dst_loc, dst_nid

    def to_application(self, packet: bytearray) -> bytes:
        """A packet the engine accepted, in the form programs see (APP locators, no nonce),
        with a complete checksum."""
        rewrite_locators(packet, self.app, self.app, self.rule)
        return remove_nonce(packet)

    def to_wire(self, packet: bytes, local: int, remote: int, nonce: bytes | None) -> bytes:
        """A packet read from TUN (complete checksum) as it leaves along a route."""
        buf = bytearray(packet)
        rewrite_locators(buf, local, remote, self.rule)
        return bytes(buf) if nonce is None else insert_nonce(buf, nonce)

    def _control(self, buf: bytearray, offset: int, partial: bool, rule: str) -> HookResult:
        """Hand the packet to the control plane, its checksum completed: the copy it gets
        is sent or delivered without the vnet header that said the sum was partial."""
        if partial:
            try:
                fill_checksum(buf, cast(Literal["ilnp", "ipv6"], rule), offset)
            except PacketError:
                return self._drop("malformed")
        self.counters["to_control"] += 1
        return CONTROL

    def _drop(self, reason: str) -> HookResult:
        self.counters[reason] += 1
        return DROP


def is_locator_update(buf: BytesLike, offset: int = 0) -> bool:
    """Whether the ILNPv6 packet at `offset` is an ICMPv6 Locator Update: right after the
    IPv6 header, or after the destination options header with the nonce (the only places
    ILNP puts one)."""
    if len(buf) - offset <= 40:
        return False
    next_header, at = buf[offset + 6], offset + 40
    if next_header == _DSTOPTS:
        if len(buf) - at < 2:
            return False
        next_header, at = buf[at], at + (buf[at + 1] + 1) * 8
    return next_header == _ICMPV6 and at < len(buf) and buf[at] == _LOCATOR_UPDATE
