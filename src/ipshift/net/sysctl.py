"""sysctls of a network namespace: read one, write one, and ask whether the namespace forwards.

    sysctl.write("net.ipv4.conf.eth0.100.rp_filter", 2, netns="ipsh-x-r")
    sysctl.read(["net", "ipv6", "conf", "eth0.100", "accept_ra"], netns="ipsh-x-r")
    sysctl.forwarding("ipsh-x-r")           # IPv4 or IPv6 forwarding on?

/proc/sys/net shows the namespace of the thread that opens it, so each call runs on a thread
inside `netns` (`netns.call_in`; None: the caller's namespace).

A key is given in one of three forms:
- dotted, "net.ipv4.ip_forward". The interface part of the per-interface keys
  (net.ipv4.conf.IF.KEY, net.ipv6.conf.IF.KEY, net.ipv4.neigh.IF.KEY, net.ipv6.neigh.IF.KEY,
  net.mpls.conf.IF.KEY) is everything between the fourth part and the last, so
  "net.ipv4.conf.eth0.100.rp_filter" names interface eth0.100. As with sysctl(8), a "/" in a
  dotted key stands for a dot inside a part: "net.ipv4.conf.eth0/100.rp_filter".
- slashed, "net/ipv4/conf/eth0.100/rp_filter": dots are part of the names (sysctl(8) too).
- a sequence of parts, ["net", "ipv4", "conf", "eth0.100", "rp_filter"]: nothing to guess.
"""

from __future__ import annotations

import errno
import os
import socket
from collections.abc import Callable, Sequence
from typing import TypeVar

from ipshift.net import netns as _netns
from ipshift.net.errors import NetError

PROC_SYS = "/proc/sys"

T = TypeVar("T")
Key = str | Sequence[str]

# (first parts) of the keys whose next part is an interface name, which may contain dots
_PER_INTERFACE = {
    ("net", "ipv4", "conf"), ("net", "ipv6", "conf"), ("net", "ipv4", "neigh"),
    ("net", "ipv6", "neigh"), ("net", "mpls", "conf"),
}
_FORWARDING_KEYS: dict[int, tuple[str, ...]] = {
    socket.AF_INET: ("net", "ipv4", "ip_forward"),
    socket.AF_INET6: ("net", "ipv6", "conf", "all", "forwarding"),
}


class SysctlError(NetError):
    """A sysctl could not be read or written; one line saying which and what to do."""


def key_parts(key: Key) -> tuple[str, ...]:
    """The path components of `key` under /proc/sys; ValueError for a malformed key."""
    if isinstance(key, str):
        parts = _split(key)
    else:
        parts = tuple(key)
        if not all(isinstance(p, str) for p in parts):
            raise ValueError(f"invalid sysctl key {key!r}: every part must be a string")
    shown = key if isinstance(key, str) else ".".join(parts)
    if not parts:
        raise ValueError("invalid sysctl key '': name one, e.g. net.ipv4.ip_forward")
    for part in parts:
        if part in ("", ".", "..") or "/" in part or "\0" in part or part != part.strip():
            raise ValueError(f"invalid sysctl key {shown!r}: bad part {part!r}")
    return parts


def _split(key: str) -> tuple[str, ...]:
    dot, slash = key.find("."), key.find("/")
    if slash != -1 and (dot == -1 or slash < dot):
        return tuple(key.split("/"))  # slashed: dots belong to the names
    # dotted; a "/" stands for a dot inside a part (sysctl(8))
    parts = tuple(p.replace("/", ".") for p in key.split("."))
    if len(parts) > 5 and parts[:3] in _PER_INTERFACE:
        return (*parts[:3], ".".join(parts[3:-1]), parts[-1])
    return parts


def key_name(key: Key) -> str:
    """`key` in dotted form, as messages show it."""
    return ".".join(key_parts(key))


def key_path(key: Key) -> str:
    return os.path.join(PROC_SYS, *key_parts(key))


def read(key: Key, netns: str | None = None) -> str:
    """The value of `key` in namespace `netns`, without the trailing newline (several values
    stay separated by tabs, as the kernel prints them)."""
    path, name = key_path(key), key_name(key)
    return _in_namespace(netns, lambda: _read_here(path, name, netns))


def write(key: Key, value: str | int | bool, netns: str | None = None) -> None:
    """Set `key` in namespace `netns` (a bool is written as 1 or 0)."""
    path, name = key_path(key), key_name(key)
    text = str(int(value)) if isinstance(value, bool) else str(value)
    if "\n" in text:
        raise ValueError(f"sysctl {name}: a value is one line, not {text!r}")
    _in_namespace(netns, lambda: _write_here(path, name, text, netns))


def forwarding(netns: str | None = None, family: int | None = None) -> bool:
    """Does namespace `netns` forward IPv4 or IPv6 (or only the `family` given)? A family the
    namespace lacks (IPv6 disabled at boot) does not forward."""
    families = [family] if family is not None else [socket.AF_INET, socket.AF_INET6]
    unknown = [f for f in families if f not in _FORWARDING_KEYS]
    if unknown:
        raise ValueError(f"forwarding: family {unknown[0]} is neither AF_INET nor AF_INET6")
    paths = [(os.path.join(PROC_SYS, *_FORWARDING_KEYS[f]), ".".join(_FORWARDING_KEYS[f]))
             for f in families]

    def any_on() -> bool:
        for path, name in paths:
            try:
                if _read_here(path, name, netns).strip() != "0":
                    return True
            except SysctlError as exc:
                if exc.errno != errno.ENOENT:
                    raise
        return False

    return _in_namespace(netns, any_on)


# --- inside the namespace ---------------------------------------------------------------------


def _where(netns: str | None) -> str:
    return f" in namespace {netns}" if netns else ""


def _read_here(path: str, name: str, netns: str | None) -> str:
    try:
        with open(path) as f:
            return f.read().rstrip("\n")
    except OSError as exc:
        raise _error("read", name, netns, exc) from exc


def _write_here(path: str, name: str, text: str, netns: str | None) -> None:
    try:
        # O_WRONLY without O_CREAT: a missing key must not become a new file anywhere
        fd = os.open(path, os.O_WRONLY)
    except OSError as exc:
        raise _error("write", name, netns, exc) from exc
    try:
        os.write(fd, (text + "\n").encode())
    except OSError as exc:
        raise _error("write", name, netns, exc, text) from exc
    finally:
        os.close(fd)


def _error(
    verb: str, name: str, netns: str | None, exc: OSError, value: str | None = None
) -> SysctlError:
    code = exc.errno or 0
    where = _where(netns)
    if code == errno.ENOENT:
        text = (f"sysctl {name} does not exist{where}: check the key (and that the interface "
                "it names exists there)")
    elif code in (errno.EACCES, errno.EPERM):
        text = (f"cannot {verb} sysctl {name}{where}: permission denied (run as root; some keys "
                "are read-only inside a namespace)")
    elif code == errno.EISDIR:
        text = f"sysctl {name}{where} is a group of keys: name one key inside it"
    elif code == errno.EINVAL and value is not None:
        text = f"sysctl {name}{where} refused the value {value!r}: check its type and range"
    else:
        text = f"cannot {verb} sysctl {name}{where}: {os.strerror(code) if code else exc}"
    return SysctlError(text, code)


def _in_namespace(netns: str | None, fn: Callable[[], T]) -> T:
    """fn() on a thread inside `netns`; its SysctlError passes, failing to enter is one too."""
    try:
        return _netns.call_in(netns, fn)
    except SysctlError:
        raise
    except OSError as exc:  # the namespace itself: fn only ever raises SysctlError
        reason = exc.strerror or str(exc)
        raise SysctlError(
            f"cannot enter namespace {netns}: {reason} (is it there? `ip netns list`)",
            exc.errno or 0) from exc
