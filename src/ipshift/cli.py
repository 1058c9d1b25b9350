"""The one `ipshift` command. Each component contributes its subcommands through a
`register(subparsers)` function in its cli module, named in `ipshift.registry`."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import signal
import sys
from collections.abc import Callable, Sequence

from ipshift import __version__, registry
from ipshift.ui import UserError, setup_logging

Handler = Callable[[argparse.Namespace], int]

EXIT_BROKEN_PIPE = 128 + signal.SIGPIPE  # what a shell reports for a tool SIGPIPE ended


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
    try:
        try:
            parser = build_parser()
            args = parser.parse_args(argv)
            handler: Handler | None = getattr(args, "handler", None)
            if handler is None:
                parser.print_help()
                return 2
            setup_logging(args.verbose)
            try:
                return handler(args)
            except UserError as exc:
                print(f"ipshift: {exc}", file=sys.stderr)
                return 2
            except KeyboardInterrupt:
                return 130
        finally:
            # A reader that went away (`| head`) shows here, where it can be handled, and not
            # in the interpreter's final flush; also after --help, which exits by SystemExit.
            if sys.stdout is not None and not sys.stdout.closed:
                sys.stdout.flush()
    except BrokenPipeError:
        # quiet, as shell tools are; what is still buffered goes nowhere instead of raising
        # again at exit
        with contextlib.suppress(OSError, ValueError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            os.close(devnull)
        return EXIT_BROKEN_PIPE
