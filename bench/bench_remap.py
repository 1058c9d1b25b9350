"""remap: cost of installing and removing per-flow remaps, map elements vs one rule per flow.

ipshift: `FlowRemaps` (net/remap.py) — a remap is up to four elements of fixed nft maps, and a
batch of them is one libnftables JSON transaction; removal deletes the elements by key.

Baseline, measured in the same run on the same remaps: the way resend has done it so far — one
nft rule per flow and direction (match the 4-tuple, set address and port), each added with its
own `add rule` call with echo so that the handle can be parsed from the output, and deleted by
handle one call at a time. It is reimplemented here (components are not imported by benchmarks
of the net layer).

Every remap changes the local address and port (resend's case): four map elements, or two
rules, per remap. Everything runs in a throw-away namespace through `Nft(netns)` (the same
worker-thread hop for both). Also measured: remaps added one per call, as a daemon adds flows
as they appear.
"""

from __future__ import annotations

import itertools
import json
import statistics
import time
from collections.abc import Callable

from bench.harness import Context, Row, benchmark
from ipshift.lab import Lab
from ipshift.net.nft import Nft
from ipshift.net.nfttable import OwnedTable
from ipshift.net.remap import FlowRemaps, Remap

RULE_TABLE = "ipshift_benchrules"


def make_remaps(count: int) -> list[Remap]:
    """`count` distinct UDP flows of hosts in 192.0.2.0/24 to resolvers in 198.51.100.0/24,
    each moved to an address of 203.0.113.0/24 and another port."""
    remaps = []
    for i in range(count):
        host, port = divmod(i, 250)
        remaps.append(Remap(
            "udp", f"192.0.2.{host % 250 + 1}", 20000 + port + 250 * (host // 250),
            f"198.51.100.{i % 7 + 1}", 53,
            new_local=f"203.0.113.{i % 250 + 1}", new_local_port=40000 + i % 20000))
    return remaps


def rule_bodies(remap: Remap) -> tuple[str, str]:
    """The baseline's rule bodies (inbound for prerouting, outbound for postrouting)."""
    ip = "ip" if remap.version == 4 else "ip6"
    l4 = remap.proto
    inbound = (f"{ip} saddr {remap.peer} {ip} daddr {remap.new_local} "
               f"{l4} sport {remap.peer_port} {l4} dport {remap.new_local_port} "
               f"{ip} daddr set {remap.local} {l4} dport set {remap.local_port}")
    outbound = (f"{ip} saddr {remap.local} {ip} daddr {remap.peer} "
                f"{l4} sport {remap.local_port} {l4} dport {remap.peer_port} "
                f"{ip} saddr set {remap.new_local} {l4} sport set {remap.new_local_port}")
    return inbound, outbound


def handle_of(echo_output: str) -> int:
    """The handle of the rule an `add rule` with echo created (JSON output)."""
    doc = json.loads(echo_output)
    for item in doc.get("nftables", []):
        rule = item.get("add", {}).get("rule") or item.get("rule")
        if rule and "handle" in rule:
            return int(rule["handle"])
    raise ValueError("nft did not report the new rule's handle")


class RulePerFlow:
    """The baseline: a table with an inbound and an outbound chain, one rule per flow each."""

    def __init__(self, nft: Nft) -> None:
        self.nft = nft
        self.handles: dict[Remap, tuple[int, int]] = {}
        nft.run(f"table inet {RULE_TABLE}\n"
                f"delete table inet {RULE_TABLE}\n"
                f"add table inet {RULE_TABLE}\n"
                f"add chain inet {RULE_TABLE} inbound {{ type filter hook prerouting "
                "priority -300; policy accept; }\n"
                f"add chain inet {RULE_TABLE} outbound {{ type filter hook postrouting "
                "priority 300; policy accept; }\n")

    def preload(self, remaps: list[Remap], chunk: int = 500) -> None:
        """Fill the table fast (many rules per call, no echo): the size a sample runs at."""
        for i in range(0, len(remaps), chunk):
            lines = []
            for remap in remaps[i:i + chunk]:
                inbound, outbound = rule_bodies(remap)
                lines.append(f"add rule inet {RULE_TABLE} inbound {inbound}")
                lines.append(f"add rule inet {RULE_TABLE} outbound {outbound}")
            self.nft.run("\n".join(lines))

    def add(self, remap: Remap) -> None:
        inbound, outbound = rule_bodies(remap)
        handles = []
        for chain, body in (("inbound", inbound), ("outbound", outbound)):
            out = self.nft.run(f"add rule inet {RULE_TABLE} {chain} {body}", echo=True)
            handles.append(handle_of(out))
        self.handles[remap] = (handles[0], handles[1])

    def remove(self, remap: Remap) -> None:
        for chain, handle in zip(("inbound", "outbound"), self.handles.pop(remap), strict=True):
            self.nft.run(f"delete rule inet {RULE_TABLE} {chain} handle {handle}")

    def close(self) -> None:
        self.nft.delete_table("inet", RULE_TABLE)


def _timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _each(items: list[Remap], fn: Callable[[Remap], object]) -> float:
    """Seconds per item of fn called once per item."""
    return _timed(lambda: [fn(r) for r in items]) / len(items)


def _flow_remaps(nft: Nft, remaps: list[Remap], extra: list[Remap], full: int, reps: int,
                 out: dict[str, float]) -> None:
    """FlowRemaps: all remaps in one call (median of `reps`), the first `full` of them in one
    call, and `extra` one per call with nothing installed and with all remaps installed."""
    table = FlowRemaps(OwnedTable(nft, "inet", "bench", "remap"))
    table.install()
    try:
        adds, removes = [], []
        for _ in range(reps):
            adds.append(_timed(lambda: table.add(remaps)))
            if len(table) != len(remaps):
                raise RuntimeError("not every remap was installed")
            removes.append(_timed(lambda: table.remove(remaps)))
            if len(table) != 0:
                raise RuntimeError("not every remap was removed")
        out["batch_add"] = statistics.median(adds) / len(remaps)
        out["batch_remove"] = statistics.median(removes) / len(remaps)
        out["full_add"] = _timed(lambda: table.add(remaps[:full])) / full
        out["full_remove"] = _timed(lambda: table.remove(remaps[:full])) / full
        out["each_add_0"] = _each(extra, lambda r: table.add([r]))
        out["each_remove_0"] = _each(extra, lambda r: table.remove([r]))
        table.add(remaps)
        out["each_add_n"] = _each(extra, lambda r: table.add([r]))
        out["each_remove_n"] = _each(extra, lambda r: table.remove([r]))
    finally:
        table.delete()


def _rule_per_flow(nft: Nft, remaps: list[Remap], extra: list[Remap], full: int,
                   sizes: list[int], sample: int, out: dict[str, float]) -> None:
    """The baseline: the first `full` remaps added and removed one by one, all timed; then, at
    each size in `sizes`, `sample` remaps added and removed with that many installed."""
    rules = RulePerFlow(nft)
    try:
        out["full_add"] = _each(remaps[:full], rules.add)
        out["full_remove"] = _each(remaps[:full], rules.remove)
    finally:
        rules.close()
    for size in sizes:
        rules = RulePerFlow(nft)
        try:
            rules.preload(remaps[:size])
            out[f"add_{size}"] = _each(extra[:sample], rules.add)
            out[f"remove_{size}"] = _each(extra[:sample], rules.remove)
        finally:
            rules.close()


@benchmark("remap", "install/remove 10,000 flow remaps: nft map elements vs one rule per flow",
           needs_root=True)
def run(ctx: Context) -> list[Row]:
    count = 1000 if ctx.quick else 10_000
    full = 200 if ctx.quick else 1000  # the baseline's fully timed run
    sizes = [0, full, count // 4, count // 2, count]
    sample = 5 if ctx.quick else 10
    flows = make_remaps(count + 100)
    remaps, extra = flows[:count], flows[count:]
    ours: dict[str, float] = {}
    base: dict[str, float] = {}
    with Lab("bench-remap") as lab, Nft(lab.host("n").ns) as nft:
        _flow_remaps(nft, remaps, extra, full, 1 if ctx.quick else 3, ours)
        _rule_per_flow(nft, remaps, extra, full, sizes, sample, base)

    # The baseline's cost grows with the rules installed (libnftables reads the table back
    # for every echoed rule): its average over an install from 0 to `count` remaps (or over
    # removing them all) is the integral of the sampled cost, piecewise linear between the
    # sizes, divided by `count`. The fully timed run up to `full` checks the method.
    def average(verb: str, upto: int) -> float:
        points = [(n, base[f"{verb}_{n}"]) for n in sizes]
        area = 0.0
        for (n0, c0), (n1, c1) in itertools.pairwise(points):
            if n0 >= upto:
                break
            right = min(n1, upto)
            c_right = c0 + (c1 - c0) * (right - n0) / (n1 - n0)
            area += (c0 + c_right) / 2 * (right - n0)
        return area / upto

    us = 1e6
    name = "rule per flow (add rule + echo, delete by handle)"
    est = "rule per flow, integrated from samples"

    def notes(verb: str) -> str:
        samples = "/".join(f"{base[f'{verb}_{n}'] * 1e3:,.1f}" for n in sizes)
        return (f"baseline ms per remap with {'/'.join(f'{n:,}' for n in sizes)} installed: "
                f"{samples}; check: {full:,} one by one measured "
                f"{base[f'full_{verb}'] * us:,.0f} us/remap, samples say "
                f"{average(verb, full) * us:,.0f}")

    return [
        Row(f"install {count:,} remaps, one transaction", "us/remap", ours["batch_add"] * us,
            {est: average("add", count) * us},
            notes="udp remaps, address and port both ways (4 elements or 2 rules each); "
                  + notes("add")),
        Row(f"remove {count:,} remaps, one transaction", "us/remap",
            ours["batch_remove"] * us, {est: average("remove", count) * us},
            notes=notes("remove")),
        Row(f"install {full:,} remaps, one transaction", "us/remap", ours["full_add"] * us,
            {name: base["full_add"] * us}, notes="baseline fully timed, one remap at a time"),
        Row(f"remove {full:,} remaps, one transaction", "us/remap", ours["full_remove"] * us,
            {name: base["full_remove"] * us}),
        Row("add one remap per call, none installed", "us/remap", ours["each_add_0"] * us,
            {name: base["add_0"] * us}),
        Row("remove one remap per call, none installed", "us/remap",
            ours["each_remove_0"] * us, {name: base["remove_0"] * us}),
        Row(f"add one remap per call, {count:,} installed", "us/remap",
            ours["each_add_n"] * us, {name: base[f"add_{count}"] * us},
            notes=f"ipshift: {len(extra)} calls; baseline: {sample} calls"),
        Row(f"remove one remap per call, {count:,} installed", "us/remap",
            ours["each_remove_n"] * us, {name: base[f"remove_{count}"] * us}),
    ]
