"""Blocking client of the control channel, used by the CLI's status/stop commands."""

from __future__ import annotations

import itertools
import socket
from pathlib import Path
from typing import Any

from ipshift.ctl.protocol import MAX_LINE, CtlError, decode_message, encode_message


class CtlClient:
    def __init__(self, path: Path, *, timeout: float = 5.0):
        self.path = path
        self._ids = itertools.count(1)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(timeout)
        try:
            self._sock.connect(str(path))
        except FileNotFoundError as exc:
            self._sock.close()
            raise CtlError("not-running", f"no daemon listens on {path} (is it running?)") from exc
        except OSError as exc:
            self._sock.close()
            raise CtlError("not-running", f"cannot reach {path}: {exc.strerror}") from exc
        self._buf = b""

    def call(self, method: str, **params: Any) -> Any:
        req_id = next(self._ids)
        self._sock.sendall(encode_message({"id": req_id, "method": method, "params": params}))
        while b"\n" not in self._buf:
            chunk = self._sock.recv(65536)
            if not chunk:
                raise CtlError("closed", f"the daemon on {self.path} closed the connection")
            self._buf += chunk
            if len(self._buf) > MAX_LINE:
                raise CtlError("bad-answer", "answer too long")
        line, self._buf = self._buf.split(b"\n", 1)
        answer = decode_message(line)
        if "error" in answer:
            err = answer["error"] or {}
            raise CtlError(str(err.get("code", "failed")), str(err.get("message", "")))
        return answer.get("result")

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> CtlClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def request(path: Path, method: str, **params: Any) -> Any:
    """One call on a fresh connection."""
    with CtlClient(path) as client:
        return client.call(method, **params)
