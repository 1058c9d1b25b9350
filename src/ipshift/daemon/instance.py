"""Who a daemon is: (component, instance name, network namespace), and the lock that keeps
that identity to one process.

The lock is an flock(2) on a file inside the run directory's private `instances/`
subdirectory (0700, owned by root), so an unprivileged user can neither take it nor read it,
and the kernel releases it however the holder ends (kill -9 included). It is keyed by the
instance, not by the control socket path: a second instance is refused whatever `--socket`
says. The owned-state record of the instance (see owned.py) sits beside the lock.
"""

from __future__ import annotations

import errno
import fcntl
import os
from dataclasses import dataclass
from pathlib import Path

from ipshift.ctl.protocol import DEFAULT_DIR, CtlError
from ipshift.ctl.server import ensure_private_dir

MAX_NAME = 64  # an instance name goes into file names, socket names and nft table names
_NAME_EXTRA = set("._-@+:%")


class InstanceError(Exception):
    """The instance cannot be started as asked; str() is one line for the user."""


def name_problem(name: str, what: str = "instance name") -> str | None:
    """Why `name` cannot name an instance, or None."""
    if not name:
        return f"the {what} is empty"
    if len(name) > MAX_NAME:
        return f"the {what} {name[:20]!r}... is {len(name)} characters; at most {MAX_NAME}"
    if name.startswith(".") or not all(c.isascii() and (c.isalnum() or c in _NAME_EXTRA)
                                       for c in name):
        return (f"the {what} {name!r} may use only letters, digits and . _ - @ + : % "
                "(and may not start with a dot)")
    return None


def netns_inode(netns: str | None = None) -> int:
    """The inode of a network namespace: its identity, whatever name it is reached by."""
    path = f"/run/netns/{netns}" if netns else "/proc/self/ns/net"
    try:
        return os.stat(path).st_ino
    except OSError as exc:
        raise InstanceError(f"network namespace {netns or 'of this process'}: "
                            f"{exc.strerror or exc}") from exc


@dataclass(frozen=True)
class Instance:
    component: str
    name: str
    netns: str | None = None
    run_dir: Path = DEFAULT_DIR

    def __post_init__(self) -> None:
        for value, what in ((self.component, "component name"), (self.name, "instance name")):
            problem = name_problem(value, what)
            if problem:
                raise InstanceError(problem)

    @property
    def key(self) -> str:
        """Unique per (component, name, namespace) on this host."""
        return f"{self.component}.{self.name}.{netns_inode(self.netns)}"

    @property
    def directory(self) -> Path:
        return self.run_dir / "instances"

    @property
    def lock_path(self) -> Path:
        return self.directory / f"{self.key}.lock"

    @property
    def record_path(self) -> Path:
        return self.directory / f"{self.key}.json"

    def describe(self) -> str:
        where = f" in namespace {self.netns}" if self.netns else ""
        return f"{self.component} {self.name!r}{where}"


class InstanceLock:
    """Held from before any kernel state is touched until everything is removed again."""

    def __init__(self, instance: Instance) -> None:
        self.instance = instance
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock or raise InstanceError naming the running instance's PID."""
        inst = self.instance
        try:
            ensure_private_dir(inst.directory)
        except CtlError as exc:
            raise InstanceError(exc.message) from exc
        try:
            fd = os.open(inst.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW,
                         0o600)
        except OSError as exc:
            raise InstanceError(f"cannot open the instance lock {inst.lock_path}: "
                                f"{exc.strerror or exc}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = _read_pid(fd)
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                pid = f" (pid {holder})" if holder else ""
                raise InstanceError(f"another {inst.describe()} is already running{pid}; "
                                    "stop it first") from None
            raise InstanceError(f"cannot lock {inst.lock_path}: {exc.strerror or exc}") \
                from exc
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        if self._fd is None:
            return
        # The file stays: removing it would let a newcomer lock a fresh inode while a third
        # process still waits on the old one. It is a few bytes in a tmpfs.
        os.ftruncate(self._fd, 0)
        os.close(self._fd)
        self._fd = None


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode().strip()
        return int(text) if text.isdigit() else None
    except (OSError, ValueError):
        return None
