"""Dead gateway detection: a sans-I/O engine that schedules probes and judges uplinks.

Fed what happened (carrier and address changes, kernel neighbour states, probe replies) and the
passing of time, it emits `SendProbe` actions and `UplinkChanged` verdicts; it never touches a
socket or reads a clock. Per uplink:

* every target (ICMP echo beyond the gateway, or the gateway itself) is probed each `interval`;
  a probe without reply after `timeout` is lost. A target is down after `down_count` consecutive
  losses (or loss/RTT over the window above the profile's limits), up after `up_count` replies;
* the gateway's neighbour entry is probed with ARP (IPv4) or neighbour solicitation (IPv6) from
  the uplink's source address (the seed's section 3), each `arp_interval`; a kernel neighbour entry
  turning FAILED counts as well;
* the uplink is up when its carrier is up, its source address is present, its gateway answers and
  at least `quorum` targets are up. Carrier or address loss is immediate. An uplink that went
  down comes back only after `hold_down` seconds, doubled per flap within `flap_window`.

Initial state is "unknown", which the decision engine treats as alive (like the kernel does): the
first reply makes it "up", `down_count` losses "down". After a restart, an uplink the previous
instance had judged down (as its routes in the kernel show, `presume_down`) needs `up_count`
replies like any recovery, not just one. `verdict_bound` says how long a first verdict can take.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Literal

from ipshift.routes.model import IPAddress, Profile, UplinkSpec

State = Literal["unknown", "up", "down"]
ProbeKind = Literal["icmp", "arp", "nd"]


@dataclass(frozen=True)
class SendProbe:
    uplink: str
    kind: ProbeKind
    target: IPAddress
    seq: int


@dataclass(frozen=True)
class UplinkChanged:
    uplink: str
    state: State
    previous: State
    reason: str
    at: float


@dataclass
class _Target:
    kind: ProbeKind
    addr: IPAddress
    interval: float
    next_send: float
    seq: int = 0
    outstanding: dict[int, float] = field(default_factory=dict)
    consecutive_lost: int = 0
    consecutive_ok: int = 0
    up: bool | None = None
    results: deque[float | None] = field(default_factory=deque)  # rtt, or None for a loss
    sent: int = 0
    received: int = 0
    reason: str = ""

    def describe(self) -> str:
        return ("gateway " if self.kind != "icmp" else "") + str(self.addr)


@dataclass
class _Uplink:
    spec: UplinkSpec
    icmp: list[_Target]
    gateway: _Target | None
    carrier: bool | None = None
    address: bool | None = None
    state: State = "unknown"
    since: float = 0.0
    reason: str = "starting"
    hold: float = 0.0
    last_up: float | None = None
    transitions: int = 0
    down_before_restart: bool = False  # needs up_count replies for its first "up"

    @property
    def targets(self) -> list[_Target]:
        return self.icmp + ([self.gateway] if self.gateway else [])

    @property
    def probing(self) -> bool:
        return self.carrier is not False


class Detector:
    """Per-uplink probe scheduling and up/down verdicts (see the module docstring)."""

    def __init__(self, uplinks: tuple[UplinkSpec, ...] | list[UplinkSpec], now: float):
        self._uplinks: dict[str, _Uplink] = {}
        self._actions: list[SendProbe | UplinkChanged] = []
        for i, spec in enumerate(uplinks):
            p = spec.profile
            icmp = [
                _Target("icmp", addr, p.interval,
                        now + p.interval * (((i * 7 + j * 3) % 10) / 10.0),
                        results=deque(maxlen=p.window))
                for j, addr in enumerate(spec.targets)
            ]
            gw = None
            if spec.gateway_probe and spec.gateway is not None:
                kind: ProbeKind = "nd" if spec.gateway.version == 6 else "arp"
                gw = _Target(kind, spec.gateway, p.arp_interval,
                             now + p.arp_interval * (((i * 3) % 10) / 10.0),
                             results=deque(maxlen=p.window))
            self._uplinks[spec.name] = _Uplink(spec, icmp, gw, since=now, hold=p.hold_down)

    # ---- inputs ----------------------------------------------------------------------------
    def link(self, uplink: str, carrier: bool, now: float) -> None:
        up = self._uplinks[uplink]
        if up.carrier == carrier:
            return
        up.carrier = carrier
        if not carrier:
            # fresh evidence is needed after the link returns: forget what the targets said
            for t in up.targets:
                t.outstanding.clear()
                t.consecutive_ok = 0
                t.consecutive_lost = 0
                if t.up is not None:
                    t.up = False
                    t.reason = "carrier lost"
        else:
            for t in up.targets:
                t.next_send = now
        self._evaluate(up, now)

    def address(self, uplink: str, present: bool, now: float) -> None:
        up = self._uplinks[uplink]
        if up.address == present:
            return
        up.address = present
        self._evaluate(up, now)

    def presume_down(self, uplink: str) -> None:
        """The previous instance had judged this uplink down: its first "up" needs `up_count`
        echo replies (a recovery), not the single reply that does for an unknown uplink."""
        up = self._uplinks[uplink]
        if up.state == "unknown":
            up.down_before_restart = True
            up.reason = "starting (down before the restart)"

    def neighbour_failed(self, uplink: str, now: float) -> None:
        """The kernel marked the gateway's neighbour entry FAILED (its probes went unanswered)."""
        up = self._uplinks[uplink]
        gw = up.gateway
        if gw is None or gw.up is False:
            return
        gw.up = False
        gw.consecutive_ok = 0
        gw.reason = f"kernel marks gateway {gw.addr} FAILED"
        self._evaluate(up, now)

    def probe_reply(self, uplink: str, kind: ProbeKind, target: IPAddress, seq: int | None,
                    now: float) -> bool:
        """A reply arrived; `seq` None (ARP/ND carry none) answers the oldest outstanding probe.
        Returns False for replies nothing waits for (late, duplicate, unknown)."""
        up = self._uplinks.get(uplink)
        if up is None:
            return False
        for t in up.targets:
            if t.kind == kind and t.addr == target:
                break
        else:
            return False
        if not t.outstanding:
            return False
        if seq is None:
            seq = next(iter(t.outstanding))
        sent = t.outstanding.pop(seq, None)
        if sent is None:
            return False
        if kind != "icmp":
            t.outstanding.clear()  # one neighbour answer stands for every earlier solicitation
        self._record(up, t, now - sent, now)
        return True

    # ---- time ------------------------------------------------------------------------------
    def handle_timer(self, now: float) -> None:
        for up in self._uplinks.values():
            p = up.spec.profile
            for t in up.targets:
                timeout = p.timeout if t.kind == "icmp" else max(p.timeout, t.interval)
                while t.outstanding:
                    seq, sent = next(iter(t.outstanding.items()))
                    if sent + timeout > now:
                        break
                    del t.outstanding[seq]
                    self._record(up, t, None, now)
                if up.probing and t.next_send <= now:
                    t.seq = (t.seq + 1) & 0xFFFF
                    t.outstanding[t.seq] = now
                    t.sent += 1
                    self._actions.append(SendProbe(up.spec.name, t.kind, t.addr, t.seq))
                    # keep the cadence; after a long pause start again from now
                    t.next_send = max(t.next_send + t.interval, now + t.interval / 2)
            self._evaluate(up, now)

    def next_timer(self) -> float | None:
        best: float | None = None
        for up in self._uplinks.values():
            p = up.spec.profile
            for t in up.targets:
                cands = []
                if up.probing:
                    cands.append(t.next_send)
                if t.outstanding:
                    timeout = p.timeout if t.kind == "icmp" else max(p.timeout, t.interval)
                    cands.append(next(iter(t.outstanding.values())) + timeout)
                for c in cands:
                    best = c if best is None else min(best, c)
            if up.state == "down" and self._healthy(up)[0]:
                c = up.since + up.hold
                best = c if best is None else min(best, c)
        return best

    def actions(self) -> list[SendProbe | UplinkChanged]:
        out, self._actions = self._actions, []
        return out

    def verdict_bound(self, uplink: str) -> float:
        """Seconds from the first probe round within which an uplink whose probes are all
        answered, or all lost, gets its first verdict: the first send (within one interval),
        then `down_count` losses or the replies needed, per target, the slowest target last."""
        up = self._uplinks[uplink]
        p = up.spec.profile
        bound = 0.0
        for t in up.targets:
            replies = p.up_count if up.down_before_restart and t.kind == "icmp" else 1
            timeout = p.timeout if t.kind == "icmp" else max(p.timeout, t.interval)
            bound = max(bound, t.interval * (1 + max(p.down_count, replies)) + timeout)
        return bound

    # ---- judgement -------------------------------------------------------------------------
    def _record(self, up: _Uplink, t: _Target, rtt: float | None, now: float) -> None:
        p = up.spec.profile
        t.results.append(rtt)
        if rtt is None:
            t.consecutive_lost += 1
            t.consecutive_ok = 0
        else:
            t.received += 1
            t.consecutive_ok += 1
            t.consecutive_lost = 0
        what = t.describe()
        if t.up is not False:
            reason = ""
            if t.consecutive_lost >= p.down_count:
                reason = f"{what}: {t.consecutive_lost} probes lost in a row"
            elif len(t.results) >= p.window:
                loss = _loss(t.results)
                rtt_ms = _mean_rtt(t.results)
                if p.max_loss is not None and loss > p.max_loss:
                    reason = f"{what}: loss {loss:.0f}% > {p.max_loss:g}%"
                elif p.max_rtt is not None and rtt_ms is not None and rtt_ms > p.max_rtt:
                    reason = f"{what}: rtt {rtt_ms:.0f} ms > {p.max_rtt:g} ms"
            if reason:
                t.up = False
                t.reason = reason
                t.consecutive_ok = 0
        if t.up is not True and rtt is not None:
            first = t.up is None and not (up.down_before_restart and t.kind == "icmp")
            needed = 1 if first else p.up_count
            if t.consecutive_ok >= needed and not self._quality_bad(p, t):
                t.up = True
                t.reason = ""
        self._evaluate(up, now)

    @staticmethod
    def _quality_bad(p: Profile, t: _Target) -> bool:
        if len(t.results) < p.window:
            return False
        # recovering needs the window back under the limits (the recent replies count)
        if p.max_loss is not None and _loss(t.results) > p.max_loss:
            return True
        rtt = _mean_rtt(t.results)
        return p.max_rtt is not None and rtt is not None and rtt > p.max_rtt

    def _healthy(self, up: _Uplink) -> tuple[bool | None, str]:
        """(True: healthy, False: failed, None: undecided yet), with the reason."""
        spec = up.spec
        if up.carrier is False:
            return False, f"carrier lost on {spec.interface}"
        if up.address is False:
            src = spec.source or "address"
            return False, f"{src} missing on {spec.interface}"
        gw = up.gateway
        if gw is not None and gw.up is False:
            return False, gw.reason or f"gateway {gw.addr} does not answer"
        if not up.icmp:
            if gw is not None and gw.up is None:
                return None, ""
            return True, ""
        ups = sum(1 for t in up.icmp if t.up is True)
        downs = [t for t in up.icmp if t.up is False]
        if ups >= spec.quorum and (gw is None or gw.up is True or up.state != "unknown"):
            return True, ""
        if len(up.icmp) - len(downs) < spec.quorum:
            if len(up.icmp) == 1:
                return False, downs[0].reason
            return False, (f"{len(downs)} of {len(up.icmp)} targets down (quorum {spec.quorum}): "
                           + downs[0].reason)
        return None, ""

    def _evaluate(self, up: _Uplink, now: float) -> None:
        healthy, reason = self._healthy(up)
        if healthy is False and up.state != "down":
            p = up.spec.profile
            if up.last_up is not None and now - up.last_up < p.flap_window:
                up.hold = min(max(up.hold * 2, p.hold_down), p.max_hold_down)
            else:
                up.hold = p.hold_down
            self._change(up, "down", reason, now)
        elif healthy is True and up.state != "up":
            if up.state == "down" and now < up.since + up.hold:
                return  # hold-down: wait (next_timer wakes us at since + hold)
            recovered = up.state == "down" or up.down_before_restart
            self._change(up, "up", "probes answered" if recovered else "first replies", now)

    def _change(self, up: _Uplink, state: State, reason: str, now: float) -> None:
        previous = up.state
        up.state = state
        up.since = now
        up.reason = reason
        up.transitions += 1
        if state == "up":
            # a recovery (not the first verdict) starts the flap window
            up.last_up = now if previous == "down" else None
        self._actions.append(UplinkChanged(up.spec.name, state, previous, reason, now))

    # ---- reporting -------------------------------------------------------------------------
    def state(self, uplink: str) -> State:
        return self._uplinks[uplink].state

    def snapshot(self, now: float) -> list[dict[str, object]]:
        rows: list[dict[str, object]] = []
        for up in self._uplinks.values():
            results = [r for t in up.targets for r in t.results]
            rtts = [r for t in up.icmp for r in t.results if r is not None]
            rows.append({
                "uplink": up.spec.name,
                "interface": up.spec.interface,
                "gateway": str(up.spec.gateway) if up.spec.gateway else None,
                "state": up.state,
                "since_s": round(now - up.since, 3),
                "reason": up.reason,
                "rtt_ms": round(1000 * sum(rtts) / len(rtts), 3) if rtts else None,
                "loss_pct": round(_loss(results), 1) if results else None,
                "targets_up": sum(1 for t in up.icmp if t.up is True),
                "targets": len(up.icmp),
                "gateway_answers": None if up.gateway is None else up.gateway.up,
                "probes_sent": sum(t.sent for t in up.targets),
                "replies": sum(t.received for t in up.targets),
                "transitions": up.transitions,
                "hold_down_s": up.hold,
                "profile": up.spec.profile.name,
            })
        return rows

    def counters(self, uplink: str) -> dict[str, int]:
        up = self._uplinks[uplink]
        out: dict[str, int] = {}
        for t in up.targets:
            out[f"{t.kind}_sent"] = out.get(f"{t.kind}_sent", 0) + t.sent
            out[f"{t.kind}_received"] = out.get(f"{t.kind}_received", 0) + t.received
        return out


def _loss(results: deque[float | None] | list[float | None]) -> float:
    if not results:
        return 0.0
    return 100.0 * sum(1 for r in results if r is None) / len(results)


def _mean_rtt(results: deque[float | None]) -> float | None:
    rtts = [r for r in results if r is not None]
    return 1000.0 * sum(rtts) / len(rtts) if rtts else None
