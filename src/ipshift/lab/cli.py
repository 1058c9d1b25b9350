"""`ipshift lab`: inspect and clean namespace labs."""

from __future__ import annotations

import argparse
from typing import Any

from ipshift.lab import topology
from ipshift.net import netns


def _clean(args: argparse.Namespace) -> int:
    removed = topology.clean(everything=args.all)
    for ns in removed:
        print(f"removed namespace {ns}")
    if not removed:
        print("nothing to clean")
    return 0


def _list(args: argparse.Namespace) -> int:
    names = [n for n in netns.list_names() if n.startswith(topology.NS_PREFIX)]
    for n in names:
        print(n)
    if not names:
        print("no lab namespaces")
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser("lab", help="namespace labs used by tests, demos and benchmarks")
    lab_sub = p.add_subparsers(dest="lab_command", metavar="ACTION", required=True)
    c = lab_sub.add_parser("clean", help="remove namespaces left by interrupted runs")
    c.add_argument("--all", action="store_true",
                   help="also remove namespaces of runs that are still alive")
    c.set_defaults(handler=_clean)
    ls = lab_sub.add_parser("list", help="list lab namespaces on this machine")
    ls.set_defaults(handler=_list)
