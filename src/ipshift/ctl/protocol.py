"""Wire format of the control channel.

One JSON object per line, UTF-8. A request is {"id": N, "method": "status", "params": {...}};
the answer is {"id": N, "result": ...} or {"id": N, "error": {"code": "...", "message": "..."}}.
Codes are short words: "bad-request", "unknown-method", "failed", "busy".
Strict JSON both ways: NaN and Infinity are refused when read and never written.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

DEFAULT_DIR = Path(os.environ.get("IPSHIFT_RUN_DIR", "/run/ipshift"))
SUN_PATH_MAX = 107  # bytes of a unix socket path, without the terminating NUL
# A request is small: a daemon reads at most MAX_REQUEST bytes of one. An answer may be large (a
# status of tens of thousands of routes): MAX_LINE bounds what a client buffers for one.
MAX_REQUEST = 64 * 1024
MAX_LINE = 16 << 20


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


def encode_message(obj: dict[str, Any], *, finite_only: bool = False) -> bytes:
    """One line of strict JSON: never NaN or Infinity, which JSON does not have.

    An answer may hold a value not measured yet (a float NaN): it is sent as null. With
    `finite_only` (a request, whose parameters its caller chose) such a value is refused with
    CtlError("bad-request") instead. What JSON cannot carry at all (a circular structure,
    nesting past the recursion limit, a key that is not text or a number) is
    CtlError("unencodable")."""
    try:
        return _dumps(obj).encode() + b"\n"
    except ValueError:
        pass  # NaN or Infinity somewhere, or worse, which the second attempt tells apart
    except (TypeError, RecursionError) as exc:  # a key JSON has no form for; too deep
        raise _unencodable(exc) from exc
    try:
        text = _dumps(_finite(obj))
    except (ValueError, TypeError, RecursionError) as exc:
        raise _unencodable(exc) from exc
    if finite_only:
        raise CtlError("bad-request", "NaN and Infinity are not JSON numbers: send finite "
                                      "numbers (or null)")
    return text.encode() + b"\n"


def _unencodable(exc: Exception) -> CtlError:
    return CtlError("unencodable", f"cannot send this message as JSON: {str(exc)[:200]}")


def _dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"), default=str, allow_nan=False)


def _finite(value: Any) -> Any:
    """`value` with every NaN or infinite float (values and keys) made JSON: null, or the
    key's text."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {(str(k) if isinstance(k, float) and not math.isfinite(k) else k): _finite(v)
                for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


class _NotJson(ValueError):
    """A number JSON does not have, met while decoding."""


def _refuse_constant(name: str) -> Any:
    raise _NotJson(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e999 parses as infinity: refused like Infinity itself
        raise _NotJson(f"{text[:40]} is out of range (at most about 1.8e308)")
    return value


def decode_message(line: bytes, *, limit: int = MAX_LINE) -> dict[str, Any]:
    """Parse one line of at most `limit` bytes; raise CtlError("bad-request") for anything
    that is not a JSON object, including NaN, Infinity and numbers too large for a float
    (Python's json reads them; JSON has no such numbers, and they could not be sent back)."""
    if len(line) > limit:
        raise CtlError("bad-request", f"message longer than {limit} bytes")
    try:
        obj = json.loads(line.decode("utf-8"), parse_constant=_refuse_constant,
                         parse_float=_finite_float)
    except _NotJson as exc:
        raise CtlError("bad-request", f"not JSON: {exc}") from exc
    except RecursionError as exc:
        raise CtlError("bad-request", "not JSON: nested too deeply") from exc
    except ValueError as exc:
        # UnicodeDecodeError and JSONDecodeError are ValueErrors, and so is an integer of
        # thousands of digits
        raise CtlError("bad-request", f"not JSON: {str(exc)[:200]}") from exc
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
