"""asyncio server side of the control channel, embedded by every daemon (through the daemon
runtime, `ipshift.daemon`).

The socket directory is created 0700 and the socket 0600 (only root talks to daemons). On start
a leftover socket file is removed if nobody answers on it; if a live daemon answers, start fails
with a clear message instead of stealing its socket.

What a client can cost the daemon is bounded: at most `max_connections` at once (one more is
told "busy" and closed), a request line of at most MAX_REQUEST bytes, `idle_timeout` seconds to
send a complete request, `write_timeout` seconds to take an answer; running out of file
descriptors pauses accepting for a moment and is logged once per burst, not once per attempt.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import inspect
import logging
import os
import socket
import stat
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from ipshift.ctl.protocol import (
    MAX_REQUEST,
    SUN_PATH_MAX,
    CtlError,
    decode_message,
    encode_message,
    parse_request,
)

log = logging.getLogger("ipshift.ctl")

Handler = Callable[[dict[str, Any]], Any | Awaitable[Any]]

MAX_CONNECTIONS = 32  # control clients at once; people and scripts, not a fleet
IDLE_TIMEOUT = 30.0  # seconds a connection may take to send its next complete request
WRITE_TIMEOUT = 10.0  # seconds a client may take to read an answer
ACCEPT_BACKOFF = 0.5  # seconds accepting pauses when the process is out of descriptors
_RESOURCE_ERRNOS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


def socket_path_problem(path: Path) -> str | None:
    """Why `path` cannot be a unix socket path, or None."""
    size = len(os.fsencode(str(path)))
    if size > SUN_PATH_MAX:
        return (f"socket path {str(path)[:60]}... is {size} bytes; a unix socket path has at "
                f"most {SUN_PATH_MAX}: choose a shorter one")
    return None


def ensure_private_dir(directory: Path) -> None:
    """Create `directory` 0700 (parents too), or check that an existing one is ours and not
    open to other users; a 0755 directory of ours is tightened to 0700. Raises CtlError
    ("unsafe"/"exists") with one fixable line."""
    try:
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        st = directory.stat()
    except FileExistsError as exc:
        raise CtlError("exists", f"{directory} exists and is not a directory") from exc
    except OSError as exc:
        raise CtlError("unsafe", f"cannot create {directory}: {exc.strerror or exc}") from exc
    if not stat.S_ISDIR(st.st_mode):
        raise CtlError("exists", f"{directory} exists and is not a directory")
    if st.st_uid != os.geteuid():
        raise CtlError("unsafe", f"{directory} belongs to another user (uid {st.st_uid}); "
                                 "remove it or choose another directory")
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise CtlError(
            "unsafe",
            f"{directory} is writable by other users; make it 0700 (chmod go-w {directory})",
        )
    if stat.S_IMODE(st.st_mode) != 0o700:
        with contextlib.suppress(OSError):
            os.chmod(directory, 0o700)  # ours: nobody else needs to look inside


def prepare_socket_path(path: Path) -> None:
    """Make the directory private and clear a stale socket; refuse if a live server owns it."""
    problem = socket_path_problem(path)
    if problem:
        raise CtlError("bad-path", problem)
    ensure_private_dir(path.parent)
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
    """Serves registered methods on a unix socket. `ping` is always there."""

    def __init__(self, path: Path, *, name: str = "ipshift",
                 max_connections: int = MAX_CONNECTIONS, idle_timeout: float = IDLE_TIMEOUT,
                 write_timeout: float = WRITE_TIMEOUT) -> None:
        self.path = path
        self.name = name
        self.max_connections = max_connections
        self.idle_timeout = idle_timeout
        self.write_timeout = write_timeout
        self.methods: dict[str, Handler] = {"ping": lambda params: {"pong": True}}
        self.errors = 0  # malformed requests seen (counted, logged, never fatal)
        self.refused = 0  # connections turned away because `max_connections` were open
        self.timeouts = 0  # connections closed for idling or not reading their answers
        self.accept_failures = 0  # accept() errors (out of descriptors, ...)
        self._listener: socket.socket | None = None
        self._accept_task: asyncio.Task[None] | None = None
        self._clients: set[asyncio.Task[None]] = set()
        self._identity: tuple[int, int] | None = None  # (device, inode) of our socket file

    def method(self, name: str, handler: Handler) -> None:
        self.methods[name] = handler

    @property
    def connections(self) -> int:
        return len(self._clients)

    def counters(self) -> dict[str, int]:
        return {"bad_requests": self.errors, "refused": self.refused,
                "timeouts": self.timeouts, "accept_failures": self.accept_failures,
                "connections": self.connections}

    async def start(self) -> None:
        prepare_socket_path(self.path)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        old_umask = os.umask(0o177)
        try:
            listener.bind(str(self.path))
        except OSError as exc:
            listener.close()
            raise CtlError("bad-path", f"cannot create {self.path}: {exc.strerror or exc}") \
                from exc
        finally:
            os.umask(old_umask)
        os.chmod(self.path, 0o600)
        listener.listen(64)
        listener.setblocking(False)
        st = self.path.lstat()
        self._identity = (st.st_dev, st.st_ino)
        self._listener = listener
        self._accept_task = asyncio.get_running_loop().create_task(self._accept_loop())
        log.debug("control socket %s", self.path)

    async def close(self) -> None:
        if self._accept_task is not None:
            self._accept_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._accept_task
            self._accept_task = None
        for task in list(self._clients):
            task.cancel()
        if self._clients:
            await asyncio.wait(list(self._clients), timeout=1.0)
        if self._listener is not None:
            self._listener.close()
            self._listener = None
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

    # --- connections ---------------------------------------------------------------------------
    async def _accept_loop(self) -> None:
        assert self._listener is not None
        loop = asyncio.get_running_loop()
        failing = 0  # accept() failures in the current burst
        while True:
            try:
                conn, _ = await loop.sock_accept(self._listener)
            except OSError as exc:
                if exc.errno not in _RESOURCE_ERRNOS:
                    if exc.errno in (errno.ECONNABORTED, errno.EPROTO, errno.EINTR):
                        continue  # the client gave up while queued: nothing to do
                    raise
                self.accept_failures += 1
                if failing == 0:
                    log.warning("control socket %s: cannot accept (%s); pausing new "
                                "connections while it lasts", self.path,
                                exc.strerror or exc)
                failing += 1
                await asyncio.sleep(ACCEPT_BACKOFF)
                continue
            if failing:
                log.warning("control socket %s: accepting again after %d failed attempt%s",
                            self.path, failing, "" if failing == 1 else "s")
                failing = 0
            if len(self._clients) >= self.max_connections:
                self.refused += 1
                _refuse(conn, self.max_connections)
                continue
            task = loop.create_task(self._serve(conn))
            self._clients.add(task)
            task.add_done_callback(self._clients.discard)

    async def _serve(self, conn: socket.socket) -> None:
        try:
            reader, writer = await asyncio.open_unix_connection(sock=conn,
                                                                limit=MAX_REQUEST + 1)
        except OSError:
            conn.close()
            return
        try:
            while True:
                try:
                    line = await asyncio.wait_for(reader.readline(), self.idle_timeout)
                except TimeoutError:
                    self.timeouts += 1
                    break
                except (asyncio.LimitOverrunError, ValueError):
                    self.errors += 1
                    writer.write(encode_message({"id": None, "error": {
                        "code": "bad-request",
                        "message": f"request longer than {MAX_REQUEST} bytes"}}))
                    break
                if not line:
                    break
                if not line.strip():
                    continue
                answer = await self.dispatch(line)
                try:
                    data = encode_message(answer)
                except CtlError as exc:  # a method returned what JSON cannot carry
                    log.error("control: answer to %s: %s", answer.get("id"), exc.message)
                    data = encode_message({"id": None, "error": {
                        "code": "failed", "message": "the answer could not be encoded"}})
                writer.write(data)
                try:
                    await asyncio.wait_for(writer.drain(), self.write_timeout)
                except TimeoutError:
                    self.timeouts += 1
                    break
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        except asyncio.CancelledError:
            pass  # the server is closing
        finally:
            # what is written is sent if the client reads it soon; one that does not read
            # is cut off rather than waited for
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.drain(), 1.0)
            writer.transport.abort()


def _refuse(conn: socket.socket, limit: int) -> None:
    """Tell a client over the limit why, without ever blocking on it, and close."""
    try:
        conn.setblocking(False)
        conn.send(encode_message({"id": None, "error": {
            "code": "busy", "message": f"the daemon serves at most {limit} control "
                                       "connections at once; try again"}}))
    except OSError:
        pass
    finally:
        conn.close()
