"""asyncio server side of the control channel, embedded by every daemon.

The socket directory is created 0700 and the socket 0600 (only root talks to daemons). On start
a leftover socket file is removed if nobody answers on it; if a live daemon answers, start fails
with a clear message instead of stealing its socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import os
import socket
import stat
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from ipshift.ctl.protocol import (
    MAX_LINE,
    CtlError,
    decode_message,
    encode_message,
    parse_request,
)

log = logging.getLogger("ipshift.ctl")

Handler = Callable[[dict[str, Any]], Any | Awaitable[Any]]


def prepare_socket_path(path: Path) -> None:
    """Make the directory private and clear a stale socket; refuse if a live server owns it."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    st = path.parent.stat()
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise CtlError(
            "unsafe",
            f"{path.parent} is writable by other users; make it 0700 (chmod go-w {path.parent})",
        )
    if st.st_uid != os.geteuid():
        raise CtlError("unsafe", f"{path.parent} belongs to another user (uid {st.st_uid})")
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise CtlError("exists", f"{path} exists and is not a socket; remove it or choose "
                                 "another socket path")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(0.5)
    try:
        probe.connect(str(path))
    except ConnectionRefusedError:
        path.unlink(missing_ok=True)  # stale: nobody listens
    except OSError as exc:
        # A full backlog (EAGAIN), a timeout: someone may be there. Never take it over.
        raise CtlError("busy", f"{path} did not answer as a stale socket would "
                               f"({exc.strerror or exc}); is another instance running?") from exc
    else:
        raise CtlError("busy", f"another instance is already running on {path}")
    finally:
        probe.close()


class CtlServer:
    """Serves registered methods on a unix socket. `status` and `ping` are always there."""

    def __init__(self, path: Path, *, name: str = "ipshift"):
        self.path = path
        self.name = name
        self.methods: dict[str, Handler] = {"ping": lambda params: {"pong": True}}
        self.errors = 0  # malformed requests seen (counted, logged, never fatal)
        self._server: asyncio.AbstractServer | None = None
        self._identity: tuple[int, int] | None = None  # (device, inode) of our socket file

    def method(self, name: str, handler: Handler) -> None:
        self.methods[name] = handler

    async def start(self) -> None:
        prepare_socket_path(self.path)
        old_umask = os.umask(0o177)
        try:
            self._server = await asyncio.start_unix_server(
                self._serve, path=str(self.path), limit=MAX_LINE + 1
            )
        finally:
            os.umask(old_umask)
        os.chmod(self.path, 0o600)
        st = self.path.lstat()
        self._identity = (st.st_dev, st.st_ino)
        log.debug("control socket %s", self.path)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
            self._server = None
        # Only our own socket file: another instance may have replaced a removed one.
        with contextlib.suppress(FileNotFoundError):
            st = self.path.lstat()
            if self._identity == (st.st_dev, st.st_ino):
                self.path.unlink()
        self._identity = None

    async def dispatch(self, line: bytes) -> dict[str, Any]:
        req_id: Any = None
        try:
            request = decode_message(line)
            req_id = request.get("id")  # so that an error about the rest still names it
            _, method, params = parse_request(request)
            handler = self.methods.get(method)
            if handler is None:
                raise CtlError(
                    "unknown-method",
                    f"unknown method {method!r}; known: {', '.join(sorted(self.methods))}",
                )
            result = handler(params)
            if inspect.isawaitable(result):
                result = await result
            return {"id": req_id, "result": result}
        except CtlError as exc:
            if exc.code == "bad-request":
                self.errors += 1
                log.warning("control: %s", exc.message)
            return {"id": req_id, "error": exc.to_json()}
        except Exception as exc:  # a failing handler must not take the daemon down
            log.exception("control method failed")
            return {"id": req_id, "error": {"code": "failed", "message": str(exc)}}

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    line = await reader.readline()
                except (asyncio.LimitOverrunError, ValueError):
                    self.errors += 1
                    writer.write(encode_message(
                        {"id": None, "error": {"code": "bad-request", "message": "line too long"}}
                    ))
                    break
                if not line:
                    break
                if not line.strip():
                    continue
                writer.write(encode_message(await self.dispatch(line)))
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        except asyncio.CancelledError:
            pass  # the server is closing; asyncio 3.11 logs a cancelled handler as an error
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
