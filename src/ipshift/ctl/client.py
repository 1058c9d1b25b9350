"""Blocking client of the control channel, used by the CLI's status/stop commands."""

from __future__ import annotations

import errno
import itertools
import os
import socket
import stat
import struct
from pathlib import Path
from typing import Any

from ipshift.ctl.protocol import (
    MAX_LINE,
    MAX_REQUEST,
    SUN_PATH_MAX,
    CtlError,
    decode_message,
    encode_message,
)

#: codes of a CtlError raised because the daemon could not be reached at all (as opposed to
#: an answer, or a connection that broke later)
CONNECT_FAILURES = frozenset({"not-running", "permission", "not-a-socket", "bad-path",
                              "timeout", "unreachable"})
RECV_SIZE = 256 * 1024  # bytes read at a time: a large status arrives in few reads
MAX_MESSAGE_SHOWN = 500  # characters of a daemon's error message passed on to the user


class CtlClient:
    def __init__(self, path: Path, *, timeout: float = 5.0):
        self.path = path
        self._ids = itertools.count(1)
        size = len(os.fsencode(str(path)))
        if size > SUN_PATH_MAX:
            raise CtlError("bad-path", f"socket path {str(path)[:60]}... is {size} bytes; a unix "
                                       f"socket path has at most {SUN_PATH_MAX}: use a shorter "
                                       "one")
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            # Blocking, so that a daemon whose accept queue is full is waited for (the kernel
            # bounds that wait by SO_SNDTIMEO) instead of failing at once with EAGAIN.
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, _timeval(timeout))
            self._sock.connect(str(path))
        except OSError as exc:
            self._sock.close()
            raise connect_error(path, exc, timeout) from exc
        self._sock.settimeout(timeout)
        self._buf = bytearray()

    def call(self, method: str, /, **params: Any) -> Any:
        """The result of `method`; raises CtlError for an error answer and for anything that
        goes wrong on the way (timeout, closed connection, malformed or oversized answer).
        `method` is positional-only, so that any parameter name (even "method") can be sent."""
        req_id = next(self._ids)
        data = encode_message({"id": req_id, "method": method, "params": params},
                              finite_only=True)
        if len(data) > MAX_REQUEST:
            raise CtlError("bad-request", f"a request of {len(data)} bytes is longer than the "
                                          f"{MAX_REQUEST} a daemon reads: send fewer parameters")
        try:
            self._sock.sendall(data)
            line = self._read_line()
        except TimeoutError as exc:
            raise CtlError("timeout", f"the daemon on {self.path} did not answer within "
                                      f"{self._sock.gettimeout()} s") from exc
        except OSError as exc:
            raise CtlError("closed", f"talking to {self.path}: {exc.strerror or exc}") from exc
        try:
            answer = decode_message(line)
        except CtlError as exc:
            raise CtlError("bad-answer", exc.message) from exc
        if answer.get("id") not in (req_id, None):
            raise CtlError("bad-answer", f"answer to request {str(answer.get('id'))[:40]}, "
                                         f"not {req_id}")
        if "error" in answer:
            err = answer["error"]
            if not isinstance(err, dict):
                err = {"message": err}
            raise CtlError(_one_line(err.get("code", "failed"), 40),
                           _one_line(err.get("message", ""), MAX_MESSAGE_SHOWN))
        return answer.get("result")

    def _read_line(self) -> bytes:
        """The next answer line, without its newline; at most MAX_LINE bytes are buffered."""
        end = self._buf.find(b"\n")
        while end < 0:
            chunk = self._sock.recv(RECV_SIZE)
            if not chunk:
                raise CtlError("closed", f"the daemon on {self.path} closed the connection")
            found = chunk.find(b"\n")  # only the new bytes are searched
            if found >= 0:
                end = len(self._buf) + found
            self._buf += chunk
            if (end if end >= 0 else len(self._buf)) > MAX_LINE:
                raise CtlError("bad-answer", f"the answer from {self.path} is longer than "
                                             f"{MAX_LINE >> 20} MiB")
        line = bytes(self._buf[:end])
        del self._buf[:end + 1]
        return line

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> CtlClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _timeval(seconds: float) -> bytes:
    seconds = max(seconds, 0.001)  # a zero SO_SNDTIMEO would mean waiting for ever
    whole = int(seconds)
    return struct.pack("@ll", whole, int((seconds - whole) * 1_000_000))


def _one_line(value: object, limit: int) -> str:
    """A daemon's word for the user: one line, bounded."""
    text = " ".join(str(value).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def connect_error(path: Path, exc: OSError, timeout: float | None = None) -> CtlError:
    """What a failed connect to a control socket means, said plainly (the path is looked at
    again: ECONNREFUSED means nobody listens on a socket, or that the path is no socket)."""
    if exc.errno in (errno.EACCES, errno.EPERM):
        return CtlError("permission", f"permission denied on {path}: run as root")
    if exc.errno == errno.EAGAIN or isinstance(exc, TimeoutError):
        waited = f" within {timeout:g} s" if timeout is not None else ""
        return CtlError("timeout", f"the daemon on {path} did not accept the connection"
                                   f"{waited} (busy or stuck?); try again")
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        return CtlError("not-running", f"no daemon listens on {path} (is it running?)")
    except NotADirectoryError:
        return CtlError("not-a-socket", f"{path} is not a control socket (a part of the path "
                                        "is not a directory)")
    except PermissionError:
        return CtlError("permission", f"permission denied on {path}: run as root")
    except OSError as stat_exc:
        return CtlError("bad-path", f"cannot reach {path}: {stat_exc.strerror or stat_exc}")
    if not stat.S_ISSOCK(mode):
        return CtlError("not-a-socket", f"{path} is not a control socket")
    if isinstance(exc, ConnectionRefusedError | FileNotFoundError):
        return CtlError("not-running", f"no daemon listens on {path} (a stale socket: is it "
                                       "running?)")
    return CtlError("unreachable", f"cannot reach {path}: {exc.strerror or exc}")


def request(path: Path, method: str, /, **params: Any) -> Any:
    """One call on a fresh connection."""
    with CtlClient(path) as client:
        return client.call(method, **params)
