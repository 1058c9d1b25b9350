"""Benchmark registry, result table and JSON output.

A benchmark is a function decorated with @benchmark that returns Rows. Each Row carries the
ipshift figure and the figures of its baselines measured in the same run, so ratios are
meaningful on a noisy machine even when absolute figures are not.
"""

from __future__ import annotations

import importlib
import json
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ipshift import registry

RESULTS_DIR = Path(__file__).resolve().parent / "results"

# Modules under bench/ that register benchmarks, from the registry of components.
BENCH_MODULES: tuple[str, ...] = registry.bench_modules()


@dataclass
class Row:
    metric: str
    unit: str
    ipshift: float
    baselines: dict[str, float] = field(default_factory=dict)
    better: str = "lower"  # "lower" or "higher": which direction is good for this metric
    target: str = ""  # human-readable target, e.g. "<= 0.5 us"
    target_met: bool | None = None
    notes: str = ""

    def ratios(self) -> dict[str, float]:
        """How many times better ipshift is than each baseline (>1 means better)."""
        out: dict[str, float] = {}
        for name, value in self.baselines.items():
            if value <= 0 or self.ipshift <= 0:
                continue
            out[name] = value / self.ipshift if self.better == "lower" else self.ipshift / value
        return out


@dataclass
class Context:
    quick: bool = False  # shorter runs, for smoke tests of the benchmarks themselves
    extra: dict[str, Any] = field(default_factory=dict)


BenchFunc = Callable[[Context], list[Row]]


@dataclass
class Benchmark:
    name: str
    description: str
    func: BenchFunc
    needs_root: bool = False


REGISTRY: dict[str, Benchmark] = {}


def benchmark(name: str, description: str, *, needs_root: bool = False) -> Callable[
    [BenchFunc], BenchFunc
]:
    def wrap(func: BenchFunc) -> BenchFunc:
        REGISTRY[name] = Benchmark(name, description, func, needs_root)
        return func

    return wrap


def load_all() -> dict[str, Benchmark]:
    for mod in BENCH_MODULES:
        importlib.import_module(mod)
    return REGISTRY


def _fmt(value: float) -> str:
    if value == 0:
        return "0"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 1:
        return f"{value:.2f}"
    return f"{value:.3g}"


def format_table(name: str, rows: Sequence[Row]) -> str:
    lines = [f"== {name} =="]
    header = f"{'metric':44} {'unit':12} {'ipshift':>10}  baselines (ratio: x better)  target"
    lines.append(header)
    lines.append("-" * len(header))
    for row in rows:
        ratios = row.ratios()
        base = ", ".join(
            f"{bn} {_fmt(bv)} ({_fmt(ratios[bn])}x)" if bn in ratios else f"{bn} {_fmt(bv)}"
            for bn, bv in row.baselines.items()
        )
        verdict = ""
        if row.target:
            verdict = row.target + (
                "" if row.target_met is None else (" ok" if row.target_met else " MISSED")
            )
        lines.append(f"{row.metric:44} {row.unit:12} {_fmt(row.ipshift):>10}  {base}  {verdict}")
        if row.notes:
            lines.append(f"{'':44}   {row.notes}")
    return "\n".join(lines)


def machine_info() -> dict[str, Any]:
    return {
        "kernel": platform.release(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
    }


def write_results(name: str, rows: Sequence[Row], elapsed: float) -> Path:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    doc = {
        "benchmark": name,
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "elapsed_s": round(elapsed, 3),
        "machine": machine_info(),
        "rows": [dict(asdict(r), ratios=r.ratios()) for r in rows],
    }
    path.write_text(json.dumps(doc, indent=2) + "\n")
    return path


def run(names: Sequence[str] = (), *, quick: bool = False, write: bool = True) -> int:
    registry = load_all()
    unknown = [n for n in names if n not in registry]
    if unknown:
        print(f"unknown benchmark(s): {', '.join(unknown)}; known: {', '.join(registry)}",
              file=sys.stderr)
        return 2
    selected = [registry[n] for n in (names or registry)]
    status = 0
    for bench in selected:
        if bench.needs_root and os.geteuid() != 0:
            print(f"== {bench.name} == skipped: needs root (network namespaces)")
            continue
        start = time.monotonic()
        rows = bench.func(Context(quick=quick))
        elapsed = time.monotonic() - start
        print(format_table(bench.name, rows))
        if write and not quick:
            print(f"   results: {write_results(bench.name, rows, elapsed)}")
        print()
        if any(r.target_met is False for r in rows):
            status = 1
    return status
