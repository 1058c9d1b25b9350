"""Wire format of the control channel.

One JSON object per line, UTF-8. A request is {"id": N, "method": "status", "params": {...}};
the answer is {"id": N, "result": ...} or {"id": N, "error": {"code": "...", "message": "..."}}.
Codes are short words: "bad-request", "unknown-method", "failed", "busy".
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

DEFAULT_DIR = Path(os.environ.get("IPSHIFT_RUN_DIR", "/run/ipshift"))
SUN_PATH_MAX = 107  # bytes of a unix socket path, without the terminating NUL
MAX_REQUEST = 64 * 1024  # a request line: parameters are small; a longer one is refused
MAX_LINE = 16 << 20  # an answer (a status of many thousands of routes) a client accepts


class CtlError(Exception):
    """An error answer, or a malformed control message."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message

    def to_json(self) -> dict[str, str]:
        return {"code": self.code, "message": self.message}


def socket_path(name: str, directory: Path | None = None) -> Path:
    """Default socket of a daemon: /run/ipshift/<name>.sock."""
    return (directory or DEFAULT_DIR) / f"{name}.sock"


def encode_message(obj: dict[str, Any]) -> bytes:
    """One line of strict JSON; NaN and infinities (not JSON) become null."""
    try:
        text = json.dumps(obj, separators=(",", ":"), default=str, allow_nan=False)
    except ValueError:
        text = json.dumps(_finite(obj), separators=(",", ":"), default=str, allow_nan=False)
    return text.encode() + b"\n"


def _finite(value: Any) -> Any:
    if isinstance(value, float) and (value != value or value in (float("inf"), float("-inf"))):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def decode_message(line: bytes) -> dict[str, Any]:
    """Parse one line; raise CtlError("bad-request") for anything that is not a JSON object."""
    if len(line) > MAX_LINE:
        raise CtlError("bad-request", f"message longer than {MAX_LINE} bytes")
    try:
        obj = json.loads(line.decode("utf-8"), parse_constant=_refuse_constant)
    except (ValueError, RecursionError) as exc:
        # UnicodeDecodeError and JSONDecodeError are ValueErrors, and so is an integer of
        # thousands of digits; deep nesting exhausts the recursion limit.
        raise CtlError("bad-request", f"not a JSON line: {str(exc)[:200]}") from exc
    if not isinstance(obj, dict):
        raise CtlError("bad-request", "a control message must be a JSON object")
    return obj


def parse_request(obj: dict[str, Any]) -> tuple[Any, str, dict[str, Any]]:
    """(id, method, params) of a request; raises CtlError("bad-request"). The caller answers
    an error with obj.get("id"), so that a client can match it."""
    method = obj.get("method")
    params = obj.get("params", {})
    if not isinstance(method, str) or not method:
        raise CtlError("bad-request", "request needs a string 'method'")
    if not isinstance(params, dict):
        raise CtlError("bad-request", "'params' must be an object")
    return obj.get("id"), method, params
