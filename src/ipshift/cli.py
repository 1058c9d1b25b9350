"""The one `ipshift` command. Each component contributes its subcommands through a
`register(subparsers)` function in its cli module, named in `ipshift.registry`."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Callable, Sequence

from ipshift import __version__, registry
from ipshift.ui import UserError, setup_logging

Handler = Callable[[argparse.Namespace], int]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ipshift",
        description="Tools for hosts and routers whose IP addresses do not stay put.",
    )
    parser.add_argument("--version", action="version", version=f"ipshift {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in registry.command_modules():
        module = importlib.import_module(name)
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Handler | None = getattr(args, "handler", None)
    if handler is None:
        parser.print_help()
        return 2
    setup_logging(args.verbose)
    try:
        status = handler(args)
        sys.stdout.flush()  # here, where a closed pipe can still be handled
        return status
    except UserError as exc:
        print(f"ipshift: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # the reader went away (`| head`): quiet, as shell tools are, and no complaint from
        # the interpreter's final flush either
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
