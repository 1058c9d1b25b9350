"""Blocking client of the control channel, used by the CLI's status/stop commands."""

from __future__ import annotations

import errno
import itertools
import os
import socket
import stat
from pathlib import Path
from typing import Any

from ipshift.ctl.protocol import (
    MAX_LINE,
    SUN_PATH_MAX,
    CtlError,
    decode_message,
    encode_message,
)


class CtlClient:
    def __init__(self, path: Path, *, timeout: float = 5.0):
        self.path = path
        self._ids = itertools.count(1)
        if len(os.fsencode(str(path))) > SUN_PATH_MAX:
            raise CtlError("bad-path", f"{str(path)[:60]}... is longer than a unix socket path "
                                       f"may be ({SUN_PATH_MAX} bytes)")
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(timeout)
        try:
            self._sock.connect(str(path))
        except OSError as exc:
            self._sock.close()
            raise connect_error(path, exc) from exc
        self._buf = bytearray()

    def call(self, method: str, **params: Any) -> Any:
        """The result of `method`; raises CtlError for an error answer and for anything that
        goes wrong on the way (timeout, closed connection, malformed answer)."""
        req_id = next(self._ids)
        try:
            self._sock.sendall(encode_message({"id": req_id, "method": method,
                                               "params": params}))
            while b"\n" not in self._buf:
                chunk = self._sock.recv(65536)
                if not chunk:
                    raise CtlError("closed", f"the daemon on {self.path} closed the connection")
                self._buf += chunk
                if len(self._buf) > MAX_LINE:
                    raise CtlError("bad-answer", "answer too long")
        except TimeoutError as exc:
            raise CtlError("timeout", f"the daemon on {self.path} did not answer within "
                                      f"{self._sock.gettimeout()} s") from exc
        except OSError as exc:
            raise CtlError("closed", f"talking to {self.path}: {exc.strerror or exc}") from exc
        end = self._buf.index(b"\n")
        line = bytes(self._buf[:end])
        del self._buf[:end + 1]
        try:
            answer = decode_message(line)
        except CtlError as exc:
            raise CtlError("bad-answer", exc.message) from exc
        if answer.get("id") not in (req_id, None):
            raise CtlError("bad-answer", f"answer to request {answer.get('id')!r}, "
                                         f"not {req_id}")
        if "error" in answer:
            err = answer["error"]
            if not isinstance(err, dict):
                err = {"message": str(err)}
            raise CtlError(str(err.get("code", "failed")), str(err.get("message", "")))
        return answer.get("result")

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> CtlClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def connect_error(path: Path, exc: OSError) -> CtlError:
    """What a failed connect to a control socket means, said plainly."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        return CtlError("not-running", f"no daemon listens on {path} (is it running?)")
    except PermissionError:
        return CtlError("permission", f"permission denied on {path}: run as root")
    except OSError as stat_exc:
        return CtlError("not-running", f"cannot reach {path}: {stat_exc.strerror or stat_exc}")
    if exc.errno in (errno.EACCES, errno.EPERM):
        return CtlError("permission", f"permission denied on {path}: run as root")
    if not stat.S_ISSOCK(mode):
        return CtlError("not-a-socket", f"{path} is not a control socket")
    if isinstance(exc, ConnectionRefusedError):
        return CtlError("not-running", f"no daemon listens on {path} (a stale socket: is it "
                                       "running?)")
    if isinstance(exc, TimeoutError) or exc.errno == errno.EAGAIN:
        return CtlError("timeout", f"the daemon on {path} does not accept connections (busy?)")
    return CtlError("not-running", f"cannot reach {path}: {exc.strerror or exc}")


def request(path: Path, method: str, **params: Any) -> Any:
    """One call on a fresh connection."""
    with CtlClient(path) as client:
        return client.call(method, **params)
