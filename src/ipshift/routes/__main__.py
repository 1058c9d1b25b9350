"""`python -m ipshift.routes ...` = `ipshift routes ...` (works before the command is wired)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from ipshift.cli import UserError, setup_logging
from ipshift.routes.cli import register


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ipshift")
    parser.add_argument("-v", "--verbose", action="count", default=0)
    register(parser.add_subparsers(dest="command"))
    rest = list(sys.argv[1:] if argv is None else argv)
    lead = []
    while rest and rest[0] in ("-v", "-vv", "-vvv", "--verbose"):
        lead.append(rest.pop(0))
    args = parser.parse_args([*lead, "routes", *rest])
    setup_logging(args.verbose)
    try:
        rc: int = args.handler(args)
        return rc
    except UserError as exc:
        print(f"ipshift: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
