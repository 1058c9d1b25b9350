"""Network namespaces: create, delete, list, and run code or programs inside one.

Entering a namespace is per thread on Linux (setns with CLONE_NEWNET affects only the calling
thread), so `call_in` runs a function on a short-lived thread that has entered the namespace:
sockets it opens (netlink, nftables, raw) belong to that namespace for their whole life.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import subprocess
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TypeVar

NETNS_DIR = "/run/netns"
CLONE_NEWNET = 0x40000000

T = TypeVar("T")

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


class NetnsError(OSError):
    """A namespace could not be created, entered or removed."""


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise NetnsError(err, f"setns: {os.strerror(err)}")


def path(name: str) -> str:
    return os.path.join(NETNS_DIR, name)


def exists(name: str) -> bool:
    return os.path.exists(path(name))


def list_names() -> list[str]:
    try:
        return sorted(os.listdir(NETNS_DIR))
    except FileNotFoundError:
        return []


def create(name: str) -> None:
    res = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
    if res.returncode != 0:
        raise NetnsError(f"cannot create namespace {name}: {res.stderr.strip()}")


def delete(name: str) -> None:
    """Remove a namespace; a missing one is not an error (cleanup must be idempotent)."""
    if not exists(name):
        return
    res = subprocess.run(["ip", "netns", "del", name], capture_output=True, text=True)
    if res.returncode != 0 and exists(name):
        raise NetnsError(f"cannot delete namespace {name}: {res.stderr.strip()}")


@contextmanager
def entered(name: str | None) -> Iterator[None]:
    """Switch the calling thread into namespace `name` for the block (None: stay put)."""
    if name is None:
        yield
        return
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        try:
            target = os.open(path(name), os.O_RDONLY)
        except FileNotFoundError:
            raise NetnsError(f"network namespace {name!r} does not exist "
                             "(see `ip netns list`)") from None
        try:
            _setns(target)
        finally:
            os.close(target)
        try:
            yield
        finally:
            _setns(own)
    finally:
        os.close(own)


def call_in(name: str | None, fn: Callable[..., T], *args: object) -> T:
    """Run fn(*args) inside namespace `name` on a dedicated thread and return its result."""
    if name is None:
        return fn(*args)
    result: list[T] = []
    error: list[BaseException] = []

    def runner() -> None:
        try:
            with entered(name):
                result.append(fn(*args))
        except BaseException as exc:  # re-raised in the caller's thread
            error.append(exc)

    thread = threading.Thread(target=runner, name=f"netns-{name}", daemon=True)
    thread.start()
    thread.join()
    if error:
        raise error[0]
    return result[0]


def wrap_argv(name: str | None, argv: Sequence[str]) -> list[str]:
    """The command line that runs argv inside namespace `name` (unchanged for None)."""
    if name is None:
        return list(argv)
    return ["ip", "netns", "exec", name, *argv]
