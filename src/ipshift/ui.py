"""What every command and daemon shares with the person at the terminal: one-line user errors,
the logging set-up (stderr, optionally syslog) and the demo's narration.

It sits below every component (it imports nothing of ipshift), so a component's CLI, daemon
and demo use it without importing the top-level `ipshift.cli` or `ipshift.demo`.
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import sys
import time


class UserError(Exception):
    """A problem the user can fix; printed as one line, exit status 2."""


def setup_logging(verbosity: int, *, syslog: bool = False, ident: str = "ipshift") -> None:
    """Warnings by default; each -v one level more for ipshift's own loggers (libraries such
    as pyroute2 stay at warnings: their debug output is noise to a user). With `syslog`, the
    same records also go to /dev/log as `ident[pid]`."""
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if syslog and os.path.exists("/dev/log"):
        try:
            handler = logging.handlers.SysLogHandler(address="/dev/log")
            handler.setFormatter(logging.Formatter(f"{ident}[%(process)d]: %(message)s"))
            handlers.append(handler)
        except OSError:
            pass  # no syslog daemon here: stderr is enough
    logging.basicConfig(
        level=logging.WARNING,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
        handlers=handlers,
        force=True,
    )
    logging.getLogger("ipshift").setLevel(max(logging.WARNING - 10 * verbosity, logging.DEBUG))


def say(text: str) -> None:
    """Narration line of the demo, flushed at once so the demo reads live."""
    stamp = time.strftime("%H:%M:%S")
    print(f"[{stamp}] {text}", flush=True)
