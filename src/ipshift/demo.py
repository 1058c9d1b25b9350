"""`ipshift demo`: the main job on a built-in default, in throw-away network namespaces.

Each component names its scenario in `ipshift.registry`; `ipshift demo` runs them all in
order, `ipshift demo NAME` one of them. Everything is torn down at the end, on Ctrl-C and
on SIGTERM.
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
from collections.abc import Callable
from typing import Any

from ipshift import registry
from ipshift.ui import UserError, say

# name -> (module with run_demo(args), summary), from the registry of components
SCENARIOS: dict[str, tuple[str, str]] = registry.demo_scenarios()


def _load(name: str) -> Callable[[argparse.Namespace], int]:
    module_name, _ = SCENARIOS[name]
    module = importlib.import_module(module_name)
    func: Callable[[argparse.Namespace], int] = module.run_demo
    return func


def _run(args: argparse.Namespace) -> int:
    if os.geteuid() != 0:
        raise UserError("the demo builds network namespaces and needs root (run with sudo)")
    names = args.scenarios or list(SCENARIOS)
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        raise UserError(f"unknown scenario {unknown[0]!r}; choose from {', '.join(SCENARIOS)}")
    status = 0
    for name in names:
        say(f"=== scenario {name}: {SCENARIOS[name][1]} ===")
        try:
            rc = _load(name)(args)
        except KeyboardInterrupt as exc:
            signum = getattr(exc, "signum", signal.SIGINT)  # lab.Interrupted: SIGTERM, SIGHUP
            say(f"interrupted ({signal.Signals(signum).name}); everything the demo created "
                "has been removed")
            return 128 + signum
        say(f"=== scenario {name}: {'done' if rc == 0 else f'FAILED ({rc})'} ===")
        status = status or rc
    return status


def register(sub: Any) -> None:
    p = sub.add_parser("demo", help="run the built-in demo in network namespaces (root)")
    p.add_argument("scenarios", nargs="*", metavar="SCENARIO",
                   help=f"scenarios to run (default: all of {', '.join(SCENARIOS)})")
    p.add_argument("--seconds", type=float, default=5.0, help="traffic duration per step")
    p.set_defaults(handler=_run)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(_run(argparse.Namespace(scenarios=[], seconds=5.0)))
