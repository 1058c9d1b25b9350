"""`ipshift bench`: runs the benchmarks kept in the bench/ folder of a source checkout."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from ipshift.ui import UserError


def _find_checkout() -> Path:
    candidates = [Path.cwd(), Path(__file__).resolve().parents[2]]
    for root in candidates:
        if (root / "bench" / "harness.py").is_file():
            return root
    raise UserError("benchmarks live in a source checkout: run this from the ipshift repository")


def _run(args: argparse.Namespace) -> int:
    root = _find_checkout()
    sys.path.insert(0, str(root))
    from bench import harness

    if args.list:
        for name, b in harness.load_all().items():
            print(f"{name:20} {b.description}{'  (root)' if b.needs_root else ''}")
        return 0
    result: int = harness.run(args.names, quick=args.quick)
    return result


def register(sub: Any) -> None:
    p = sub.add_parser("bench", help="run benchmarks (ipshift beside its baselines)")
    p.add_argument("names", nargs="*", help="benchmarks to run (default: all)")
    p.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    p.add_argument("--quick", action="store_true", help="short smoke run, writes no results")
    p.set_defaults(handler=_run)
