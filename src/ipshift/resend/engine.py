"""The ip_resend decision engine: sans-I/O, no clock, no sockets.

One cycle of a demand-dial link, as the adapter feeds it:

    armed      nothing seen yet; the first outgoing packets are captured (bounded, de-duplicated)
    captured   packets held; waiting up to `wakeup_wait` for the wakeup message with the new address
    awaiting   packets re-sent with the new source; waiting up to `response_wait` for the replies,
               which the kernel maps back to the old address by per-flow rewrites we installed
    holding    all replies in; each UDP/ICMP mapping lingers briefly after its own last reply,
               TCP mappings stay while the connection lives (the adapter reports flows that
               are gone)
    linkup     (persistent mode) cycle over while the link is up: nothing is captured until the
               link goes down (a `stop` message, or the new address leaving the interface)
    done       cycle over: the daemon exits

The adapter applies the actions in order: mappings before resends, so no reply can beat its map.
"""

from __future__ import annotations

import ipaddress
import logging
from dataclasses import dataclass, field, replace

from ipshift.packet import PacketError
from ipshift.packet.rewrite import FlowRewrite
from ipshift.resend.flows import (
    PROTO_ICMP,
    PROTO_ICMPV6,
    PROTO_TCP,
    FlowKey,
    PacketInfo,
    describe,
    not_beyond_link,
    rewrite_source,
)

log = logging.getLogger("ipshift.resend")

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True)
class ResendConfig:
    wakeup_wait: float = 10.0  # -w: longest wait for the wakeup after the first capture
    response_wait: float = 10.0  # -r/-R: longest wait for the replies after resending
    translate: bool = True  # False with -R: watch for replies but map nothing
    persistent: bool = False  # re-arm after each cycle instead of ending
    max_packets: int = 64  # packets kept per cycle
    linger: float = 1.0  # a UDP/ICMP mapping stays this long after its flow's last reply
    check_interval: float = 2.0  # how often TCP mappings are checked for liveness

    @property
    def maps_replies(self) -> bool:
        """Whether replies are mapped back (not with -R, not with -r 0)."""
        return self.translate and self.response_wait > 0


# --- actions -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class FlowMapping:
    """A per-flow rewrite the kernel applies in both directions.

    `inner` is the endpoint the application's socket uses (the old address, or a LAN host's
    address and port behind masquerading); `outer` is what the link now carries (the new address).
    Inbound packets from `peer` to `outer` get `inner` as destination; outbound packets from
    `inner` to `peer` get `outer` as source. `keep_inner_local` says the old address must stay
    a local address (on lo) so the socket bound to it still receives.
    """

    version: int
    proto: int
    peer: str
    peer_port: int
    outer_addr: str
    outer_port: int
    inner_addr: str
    inner_port: int
    keep_inner_local: bool


@dataclass(frozen=True)
class LookupOrigin:
    """Ask conntrack where a captured (post-NAT) packet came from before masquerading."""

    flow: FlowKey


@dataclass(frozen=True)
class MapFlow:
    mapping: FlowMapping


@dataclass(frozen=True)
class UnmapFlow:
    mapping: FlowMapping


@dataclass(frozen=True)
class Resend:
    """Send this packet (already rewritten) out of the outgoing interface."""

    version: int
    data: bytes


@dataclass(frozen=True)
class Reinject:
    """Deliver this packet (a reply rewritten to the captured socket's address and port) to
    the local stack, or on to the LAN host it is for."""

    version: int
    data: bytes


@dataclass(frozen=True)
class CheckFlows:
    """Report (via flows_gone) which of these TCP mappings no longer have a connection."""

    mappings: tuple[FlowMapping, ...]


@dataclass(frozen=True)
class CycleDone:
    reason: str
    rearm: bool


Action = LookupOrigin | MapFlow | UnmapFlow | Resend | Reinject | CheckFlows | CycleDone


@dataclass
class _Captured:
    info: PacketInfo
    data: bytes
    inner_addr: str
    inner_port: int
    keep_inner_local: bool = True
    sent_as: str | None = None  # the link sent it again itself, with this source address


@dataclass
class _Flow:
    mapping: FlowMapping | None
    key: FlowKey
    answered: bool = False
    last_reply: float = 0.0


@dataclass
class Counters:
    captured: int = 0
    duplicates: int = 0
    overflow: int = 0
    ignored: int = 0
    malformed: int = 0
    resent: int = 0
    replies: int = 0
    cycles: int = 0
    bad_messages: int = 0
    sent_by_link: int = 0  # captured packets the link itself sent again with the new address


class WakeupError(ValueError):
    """A wakeup message that is not an address, `stop` or `term`."""


@dataclass
class ResendEngine:
    config: ResendConfig = field(default_factory=ResendConfig)
    state: str = "armed"
    counters: Counters = field(default_factory=Counters)
    terminate: bool = False  # set by `term`: the adapter exits after applying the actions
    _captured: list[_Captured] = field(default_factory=list)
    _seen: set[tuple[object, ...]] = field(default_factory=set)
    _flows: dict[FlowKey, _Flow] = field(default_factory=dict)
    _foreign: set[FlowKey] = field(default_factory=set)  # flows of routed sources (this cycle)
    _deadline: float | None = None
    _next_check: float | None = None
    _actions: list[Action] = field(default_factory=list)
    last_cycle: str = ""
    #: the addresses of the last wakeup while the link is up; the adapter reports their loss
    link_addresses: set[str] = field(default_factory=set)
    #: the interface's addresses now (the adapter keeps this up to date)
    present: set[str] = field(default_factory=set)
    #: a later one-shot instance handed its dial to this one (see `take_over_next_dial`)
    handover: bool = False

    # --- events ---------------------------------------------------------------------------
    def packet_out(self, data: bytes, now: float) -> None:
        """An outgoing packet seen on the snoop interface."""
        if self.state not in ("armed", "captured"):
            return
        info = describe(data, outgoing=True)
        if info is None:
            self.counters.ignored += 1
            return
        if isinstance(info, str):
            self.counters.malformed += 1
            log.debug("ignoring malformed outgoing packet: %s", info)
            return
        if info.dedup in self._seen:
            self.counters.duplicates += 1
            return
        if len(self._captured) >= self.config.max_packets:
            self.counters.overflow += 1
            return
        if info.key in self._foreign:
            self.counters.ignored += 1
            return
        self._seen.add(info.dedup)
        self._captured.append(_Captured(info, bytes(data[:info.size]), info.key.local,
                                        info.key.local_port))
        self.counters.captured += 1
        if self.state == "armed":
            self.state = "captured"
            self._deadline = now + self.config.wakeup_wait
            log.info("captured first packet %s; waiting up to %gs for the wakeup",
                     info.key, self.config.wakeup_wait)
        if self.config.maps_replies and not any(
            c.info.key == info.key for c in self._captured[:-1]
        ):
            self._actions.append(LookupOrigin(info.key))

    def _sent_by_link(self, info: PacketInfo, data: bytes) -> bool:
        """Whether incoming `info` answers a captured packet that left again with the
        interface's new address: the link resent it itself (pppd >= 2.4.5's demand_rexmit
        rewrites the queued IPv4 packets after IPCP and only then runs ip-up; its packets do
        not pass the interface's taps, but their replies do). A resend would reach the server
        a second time, so it is not resent; its replies are mapped back from now on, and this
        first one, which came before any mapping, is delivered to the captured socket here.
        TCP is left to the resend: the kernel has already reset the server's half of the
        handshake it could not match, so the SYN must go again."""
        key = info.key
        if key.proto == PROTO_TCP:
            return False
        for c in self._captured:
            ck = c.info.key
            if c.sent_as is None and ck.local != key.local and (
                    ck.version, ck.proto, ck.local_port, ck.remote, ck.remote_port) == (
                    key.version, key.proto, key.local_port, key.remote, key.remote_port):
                c.sent_as = key.local
                self.counters.sent_by_link += 1
                log.info("a reply to %s at %s: the link resent it itself (pppd's "
                         "demand_rexmit); not resending, replies mapped", ck, key.local)
                if self.config.maps_replies:
                    self._map(c, key.local)
                    try:
                        self._actions.append(Reinject(key.version, _deliver_to(
                            data, key.local, key.local_port, c.inner_addr, c.inner_port)))
                    except PacketError as exc:
                        self.counters.malformed += 1
                        log.debug("cannot deliver the first reply of %s: %s", ck, exc)
                return True
        return False

    def _map(self, c: _Captured, new: str) -> None:
        """The flow of captured packet `c` as it looks with source `new`, its replies mapped
        back (once per flow)."""
        key = c.info.key
        reply_key = replace(key, local=new)
        if reply_key in self._flows:
            return
        mapping = None
        if self.config.maps_replies:
            mapping = FlowMapping(
                version=key.version, proto=key.proto, peer=key.remote,
                peer_port=key.remote_port, outer_addr=new, outer_port=key.local_port,
                inner_addr=c.inner_addr, inner_port=c.inner_port,
                keep_inner_local=c.keep_inner_local,
            )
            self._actions.append(MapFlow(mapping))
        self._flows[reply_key] = _Flow(mapping, reply_key)

    def origin_found(self, flow: FlowKey, addr: str, port: int) -> None:
        """Conntrack says `flow` was masqueraded from addr:port (a LAN host)."""
        for c in self._captured:
            if c.info.key == flow and (addr, port) != (flow.local, flow.local_port):
                c.inner_addr, c.inner_port, c.keep_inner_local = addr, port, False

    def foreign_source(self, flow: FlowKey) -> None:
        """`flow`'s source is neither an address of this host nor masqueraded by it (a routed
        network behind it): its replies reach that network whatever the link's address, so it
        is neither resent nor mapped."""
        kept = [c for c in self._captured if c.info.key != flow]
        self.counters.ignored += len(self._captured) - len(kept)
        self._captured = kept
        self._foreign.add(flow)
        if self.state == "captured" and not kept:
            self.state = "armed"
            self._deadline = None

    def wakeup(self, message: str, now: float) -> str:
        """A message from ip_resend_wakeup; returns the answer for it. Raises WakeupError."""
        text = message.strip()
        if text == "term":
            self._end_cycle("terminated by message", rearm=False)
            self.terminate = True
            return "terminating"
        if text == "stop":
            self.link_addresses.clear()
            self._end_cycle("stopped by message", rearm=self.config.persistent)
            return "stopped"
        try:
            addresses = [ipaddress.ip_address(a) for a in text.replace(",", " ").split()]
        except ValueError:
            self.counters.bad_messages += 1
            raise WakeupError(
                f"not an address, 'stop' or 'term': {text[:60]!r}; still waiting"
            ) from None
        if not addresses:
            self.counters.bad_messages += 1
            raise WakeupError("empty wakeup message; still waiting")
        for address in addresses:
            why = not_beyond_link(address)
            if why is None and isinstance(address, ipaddress.IPv6Address) and address.scope_id:
                # nftables and the packets carry no zone: send the address without it
                why = (f"a zone (%{address.scope_id}) belongs to link-local addresses only; "
                       "send the address without it")
            if why is not None:
                self.counters.bad_messages += 1
                raise WakeupError(f"{address} cannot be the link's new address: {why}; "
                                  "still waiting")
        if len({a.version for a in addresses}) != len(addresses):
            self.counters.bad_messages += 1
            raise WakeupError("more than one new address of one family; still waiting")
        if self.state in ("awaiting", "holding"):
            return "busy: already resent for this cycle"
        self.link_addresses = {str(a) for a in addresses}
        if self.state == "linkup":
            return "link already up; nothing captured"
        if self.state == "armed" or not self._captured:
            self._end_cycle("wakeup with nothing captured", rearm=self.config.persistent)
            return "nothing captured"
        return self._resend(addresses, now)

    def take_over_next_dial(self) -> str:
        """A new one-shot instance for this interface was started (pppd's ip-down runs the
        seed's `exec ip_resend -o $1` while this cycle's mappings may still live, e.g. a TCP
        connection's): instead of a second instance, this one arms for the next dial when
        its cycle ends. Returns what to tell the new instance."""
        if self.config.persistent:
            return "runs persistently: it arms for every dial"
        if self.state == "armed":
            return "is armed for the next dial"
        if self.state == "done":
            return "is ending"
        self.handover = True
        return f"takes over: it arms for the next dial when this cycle ({self.state}) ends"

    def packet_in(self, data: bytes, now: float) -> None:
        """An incoming packet on the outgoing interface (before the kernel's rewrite)."""
        if self.state not in ("captured", "awaiting", "holding"):
            return
        info = describe(data, outgoing=False)
        if info is None or isinstance(info, str):
            return
        if self.state == "captured":
            # A reply to a captured packet, to an address the interface holds now: the link
            # carries traffic with it. (During a dial the placeholder is gone by the time a
            # stale reply could come back, so that one never counts.) A reply to one the link
            # resent itself with its new address is the other case.
            if info.key.local in self.present:
                if any(c.info.key == info.key for c in self._captured):
                    self._link_was_up(info.key.local)
                else:
                    self._sent_by_link(info, bytes(data[:info.size]))
            return
        flow = self._flows.get(info.key)
        if flow is None:
            return
        self.counters.replies += 1
        flow.last_reply = now
        if not flow.answered:
            flow.answered = True
            log.info("reply for %s arrived", flow.key)
        if self.state == "awaiting":
            if all(f.answered for f in self._flows.values()):
                self._all_answered(now)
        elif flow.key.proto != PROTO_TCP:
            self._deadline = self._linger_deadline()  # this flow's mapping lingers on

    def _link_was_up(self, address: str) -> None:
        """A captured packet got its reply: the link was up with its source address (an
        instance started while the link was up, or traffic between ip-up and the wakeup), so
        what was captured is ordinary traffic, not the first packets of a dial. Nothing is
        resent; the engine waits, as after a wakeup, for that address to go."""
        log.info("a reply to %s arrived: the link is up with %s; ordinary traffic, not a dial",
                 address, address)
        self.counters.ignored += len(self._captured)
        self._captured.clear()
        self._seen.clear()
        self._foreign.clear()
        self._deadline = None
        self.link_addresses = {address}
        self.state = "linkup"

    def flows_gone(self, mappings: list[FlowMapping], now: float) -> None:
        """The adapter found no connection any more for these (TCP) mappings."""
        gone = set(mappings)
        for key, flow in list(self._flows.items()):
            if flow.mapping in gone:
                self._actions.append(UnmapFlow(flow.mapping))
                del self._flows[key]
        self._maybe_finish()

    def address_lost(self, addr: str, now: float) -> None:
        """The new address left the interface (the link went down): mappings are moot, and a
        persistent engine captures again for the next dial."""
        if addr not in self.link_addresses:
            return
        self.link_addresses.clear()
        if self.state == "linkup":
            self.state = "armed"
            log.info("address %s left the interface: re-armed", addr)
        elif self.state in ("awaiting", "holding"):
            self._end_cycle(f"address {addr} left the interface", rearm=self.config.persistent)

    def handle_timer(self, now: float) -> None:
        if self._deadline is not None and now >= self._deadline:
            self._deadline = None
            if self.state == "captured":
                self._end_cycle("no wakeup within the wait limit", rearm=self.config.persistent)
            elif self.state == "awaiting":
                unanswered = [f for f in self._flows.values() if not f.answered]
                log.info("%d flow(s) got no reply within %gs", len(unanswered),
                         self.config.response_wait)
                for f in unanswered:
                    self._drop_flow(f)
                self._all_answered(now)
            elif self.state == "holding":
                for f in list(self._flows.values()):
                    if f.key.proto != PROTO_TCP and f.last_reply + self.config.linger <= now:
                        self._drop_flow(f)
                self._deadline = self._linger_deadline()
                self._maybe_finish()
        if self._next_check is not None and now >= self._next_check:
            tcp = tuple(f.mapping for f in self._flows.values()
                        if f.mapping is not None and f.key.proto == PROTO_TCP)
            if tcp:
                self._actions.append(CheckFlows(tcp))
            self._next_check = now + self.config.check_interval if self._flows else None

    def next_timer(self) -> float | None:
        times = [t for t in (self._deadline, self._next_check) if t is not None]
        return min(times) if times else None

    def actions(self) -> list[Action]:
        out, self._actions = self._actions, []
        return out

    def status(self) -> dict[str, object]:
        return {
            "state": self.state,
            "link_addresses": sorted(self.link_addresses),
            "captured": [str(c.info.key) for c in self._captured],
            "mappings": [
                {"flow": str(f.key), "answered": f.answered,
                 "inner": f"{f.mapping.inner_addr}:{f.mapping.inner_port}" if f.mapping else None,
                 "outer": f"{f.mapping.outer_addr}:{f.mapping.outer_port}" if f.mapping else None}
                for f in self._flows.values()
            ],
            "counters": vars(self.counters).copy(),
            "last_cycle": self.last_cycle,
        }

    # --- internals ------------------------------------------------------------------------
    def _resend(self, addresses: list[IPAddress], now: float) -> str:
        by_version: dict[int, str] = {a.version: str(a) for a in addresses}
        resends: list[Resend] = []
        unchanged = skipped = by_link = 0
        for c in self._captured:
            key = c.info.key
            new = by_version.get(key.version)
            if new is None:
                skipped += 1
                continue
            if new == key.local:
                unchanged += 1  # the seed's duplicate bug: same address, nothing to resend
                continue
            self._map(c, new)  # how the replies will look, mapped before they come
            if c.sent_as == new:
                by_link += 1  # it left with this address already: a resend would duplicate it
                continue
            try:
                resends.append(Resend(key.version, rewrite_source(c.data, new)))
            except PacketError as exc:  # captured packets were checked: not expected
                self.counters.malformed += 1
                log.warning("not resending %s: %s", key, exc)
        self._actions.extend(resends)
        self.counters.resent += len(resends)
        parts = [f"resent {len(resends)} packet(s)"]
        if unchanged:
            parts.append(f"{unchanged} unchanged (address did not change)")
        if skipped:
            parts.append(f"{skipped} skipped (no new address of their family)")
        if by_link:
            parts.append(f"{by_link} already resent by the link (pppd), replies mapped")
        answer = ", ".join(parts)
        log.info("wakeup %s: %s", " ".join(by_version.values()), answer)
        self._captured.clear()
        self._seen.clear()
        if not resends and not by_link:
            self._end_cycle("nothing to resend", rearm=self.config.persistent)
            return answer
        if self.config.response_wait <= 0:
            # -r 0: resend only; nothing mapped, nothing awaited
            self._flows.clear()
            self._end_cycle("resent; not waiting for replies (-r 0)",
                            rearm=self.config.persistent)
            return answer
        self.state = "awaiting"
        self._deadline = now + self.config.response_wait
        if self.config.translate:
            self._next_check = now + self.config.check_interval
        return answer

    def _all_answered(self, now: float) -> None:
        if not self.config.translate:
            self._end_cycle("replies seen (-R: not translated)", rearm=self.config.persistent)
            return
        self.state = "holding"
        self._deadline = self._linger_deadline()
        self._maybe_finish()

    def _linger_deadline(self) -> float | None:
        """When the next UDP/ICMP mapping has lingered long enough after its last reply."""
        ends = [f.last_reply + self.config.linger for f in self._flows.values()
                if f.key.proto != PROTO_TCP]
        return min(ends) if ends else None

    @property
    def wants_replies(self) -> bool:
        """Whether incoming packets still matter: from the first capture until every reply is
        in, then while UDP/ICMP mappings linger (TCP mappings live as long as their connection)."""
        if self.state in ("captured", "awaiting"):
            return True
        return self.state == "holding" and any(
            f.key.proto != PROTO_TCP for f in self._flows.values())

    def _drop_flow(self, flow: _Flow) -> None:
        if flow.mapping is not None:
            self._actions.append(UnmapFlow(flow.mapping))
        self._flows.pop(flow.key, None)

    def _maybe_finish(self) -> None:
        if self.state in ("awaiting", "holding") and not self._flows:
            self._end_cycle("all flows finished", rearm=self.config.persistent)

    def _end_cycle(self, reason: str, *, rearm: bool) -> None:
        if self.handover and not self.terminate:
            rearm, self.handover = True, False
        for flow in list(self._flows.values()):
            self._drop_flow(flow)
        self._captured.clear()
        self._seen.clear()
        self._foreign.clear()
        self._deadline = self._next_check = None
        self.counters.cycles += 1
        self.last_cycle = reason
        if not rearm:
            self.state = "done"
        else:
            self.state = "linkup" if self.link_addresses else "armed"
        log.info("cycle over: %s%s", reason, "; re-armed" if rearm else "")
        self._actions.append(CycleDone(reason, rearm))


def _deliver_to(data: bytes, local: str, local_port: int, inner: str, inner_port: int) -> bytes:
    """A copy of incoming `data` (to local:local_port) addressed to inner:inner_port, its
    checksums updated."""
    buf = bytearray(data)
    rewrite = FlowRewrite(dst=(ipaddress.ip_address(local).packed,
                               ipaddress.ip_address(inner).packed),
                          dport=(local_port, inner_port) if local_port != inner_port else None,
                          icmp_errors=False)
    if not rewrite.apply(buf):
        raise PacketError("not-rewritten", "reply does not match its flow")
    return bytes(buf)


__all__ = [
    "PROTO_ICMP",
    "PROTO_ICMPV6",
    "Action",
    "CheckFlows",
    "CycleDone",
    "FlowMapping",
    "LookupOrigin",
    "MapFlow",
    "Reinject",
    "Resend",
    "ResendConfig",
    "ResendEngine",
    "UnmapFlow",
    "WakeupError",
]
