"""The one way a daemon drives a sans-I/O engine (DESIGN.md, "Sans-I/O engines").

    pump = EnginePump(loop, engine, apply_actions)
    engine.packet_in(data, pump.now())   # feed an event ...
    pump.run()                           # ... then drain: actions applied, timer re-armed

`run()` takes the engine's actions and hands them to `apply` in one list, repeats while
applying them made the engine produce more (bounded), and re-arms a single loop timer at
`engine.next_timer()`, whose expiry calls `engine.handle_timer(now)` and drains again. The
engine never sees the loop or a clock other than the `now` it is given.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from typing import Any, Protocol

log = logging.getLogger("ipshift.daemon")

MAX_ROUNDS = 100  # actions answered at once can create more; a loop here is a bug, not work


class Engine(Protocol):
    def handle_timer(self, now: float) -> None: ...
    def next_timer(self) -> float | None: ...
    def actions(self) -> Sequence[Any]: ...


class EnginePump:
    def __init__(self, loop: asyncio.AbstractEventLoop, engine: Engine,
                 apply: Callable[[Sequence[Any]], None], *,
                 after: Callable[[], None] | None = None) -> None:
        self.loop = loop
        self.engine = engine
        self.apply = apply
        self.after = after  # called after each drain (e.g. to adjust sockets to the state)
        self.stopped = False
        self.rounds_cut = 0  # drains that hit MAX_ROUNDS (counted: a bug to report)
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None

    def now(self) -> float:
        return self.loop.time()

    def run(self) -> None:
        """Drain and apply the engine's actions, then re-arm the timer."""
        for _ in range(MAX_ROUNDS):
            actions = self.engine.actions()
            if not actions:
                break
            self.apply(actions)
        else:
            self.rounds_cut += 1
            log.error("engine %s kept producing actions; stopped after %d rounds",
                      type(self.engine).__name__, MAX_ROUNDS)
        if self.after is not None:
            self.after()
        self._rearm()

    def stop(self) -> None:
        self.stopped = True
        if self._timer is not None:
            self._timer.cancel()
        self._timer = None
        self._timer_at = None

    def _rearm(self) -> None:
        if self.stopped:
            return
        at = self.engine.next_timer()
        if at == self._timer_at and self._timer is not None:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = at
        self._timer = None if at is None else self.loop.call_at(at, self._expired)

    def _expired(self) -> None:
        self._timer = None
        self._timer_at = None
        self.engine.handle_timer(self.loop.time())
        self.run()
