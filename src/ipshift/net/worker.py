"""A thread that entered one network namespace for good, and runs kernel calls submitted to it.

Some kernel handles are bound to the namespace (and, in pyroute2 0.9, to the thread) they were
created on: pyroute2's synchronous `IPRoute` keeps a per-thread event loop, and libnftables opens
its netlink socket when its context is created and resolves interface names in the calling
thread's namespace. Adapters therefore create such handles on an `NsWorker` and run every call
there. One round trip costs a few tens of microseconds (see docs/net.md).

Sockets that only need to be *created* inside a namespace (raw, packet, sock_diag, netlink
event sockets) do not need a worker: they keep their namespace for life, so the adapters create
them with `netns.call_in` and use them from any thread.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

from ipshift.net import netns

T = TypeVar("T")

_Job = tuple[Future[Any], Callable[..., Any], tuple[Any, ...], dict[str, Any]]


class WorkerClosedError(RuntimeError):
    """A call was submitted to a worker that has been closed."""


class NsWorker:
    """Run callables one at a time on a thread that lives inside namespace `netns`.

    `netns=None` gives a worker in the caller's current namespace (still a thread of its own,
    so handles with thread affinity are always used from one thread).
    """

    def __init__(self, netns_name: str | None = None, *, name: str = "ipshift-net") -> None:
        self.netns = netns_name
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._closed = False
        self._lock = threading.Lock()
        started: Future[None] = Future()
        label = f"{name}[{netns_name}]" if netns_name else name
        self._thread = threading.Thread(target=self._run, args=(started,), name=label, daemon=True)
        self._thread.start()
        started.result()  # re-raises a failure to enter the namespace here, in the caller

    def _run(self, started: Future[None]) -> None:
        try:
            ctx = netns.entered(self.netns)
            ctx.__enter__()
        except BaseException as exc:
            started.set_exception(exc)
            return
        started.set_result(None)
        try:
            while True:
                job = self._jobs.get()
                if job is None:
                    break
                fut, fn, args, kwargs = job
                if not fut.set_running_or_notify_cancel():
                    continue
                try:
                    fut.set_result(fn(*args, **kwargs))
                except BaseException as exc:  # delivered to the caller
                    fut.set_exception(exc)
        finally:
            ctx.__exit__(None, None, None)

    @property
    def on_worker(self) -> bool:
        return threading.current_thread() is self._thread

    def submit(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> Future[T]:
        """Queue fn(*args, **kwargs); `await asyncio.wrap_future(...)` it from asyncio."""
        fut: Future[T] = Future()
        with self._lock:
            if self._closed:
                raise WorkerClosedError(f"namespace worker {self._thread.name} is closed")
            self._jobs.put((fut, fn, args, kwargs))
        return fut

    def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run fn on the worker and return its result (inline when already on the worker)."""
        if self.on_worker:
            return fn(*args, **kwargs)
        return self.submit(fn, *args, **kwargs).result()

    def close(self, timeout: float = 5.0) -> None:
        """Finish queued calls, then stop the thread. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._jobs.put(None)
        if not self.on_worker:
            self._thread.join(timeout)

    @property
    def closed(self) -> bool:
        return self._closed
