"""nftables through libnftables' JSON API, in process (no `nft` subprocess per call).

    with Nft(netns="ipsh-x-r") as nft:
        nft.run("add table inet ipshift")                       # nft syntax
        nft.run_json([{"add": {"map": {...}}}])                  # JSON commands
        nft.add_map_elements("inet", "ipshift", "flows", {("192.0.2.1", 80): "198.51.100.1"})
        nft.delete_table("inet", "ipshift")

A small ctypes binding over `libnftables.so.1` (Debian's python3-nftables is not importable from
a virtualenv and is not on PyPI). One context per `Nft`; in another namespace the context is
created and used on an `NsWorker` thread inside it, because libnftables opens its netlink socket
at context creation and resolves interface names in the calling thread's namespace.

Input may be nft syntax or JSON: with JSON output enabled libnftables tries JSON first and falls
back to the nft grammar. Output (listings, `echo`) is JSON, except from `run_text`, which gives
nft's own text (the only form that shows a table's comment in nftables 1.0.6).
"""

from __future__ import annotations

import ctypes
import json
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, TypeVar

from ipshift.net.errors import NetError
from ipshift.net.worker import NsWorker

T = TypeVar("T")

LIBNFTABLES = "libnftables.so.1"

# enum nft_ctx_output_flags (nftables/libnftables.h)
NFT_CTX_OUTPUT_HANDLE = 1 << 3
NFT_CTX_OUTPUT_JSON = 1 << 4
NFT_CTX_OUTPUT_ECHO = 1 << 5
NFT_CTX_OUTPUT_TERSE = 1 << 11

FAMILIES = ("ip", "ip6", "inet", "arp", "bridge", "netdev")

JsonDoc = dict[str, Any]


class NftError(NetError):
    """nft refused a command; the message is nft's first error line and the command."""

    def __init__(self, message: str, detail: str = "", command: str = "") -> None:
        super().__init__(message)
        self.detail = detail
        self.command = command


class _Lib:
    """The libnftables entry points, loaded once per process."""

    _instance: _Lib | None = None
    _lock = threading.Lock()

    def __init__(self) -> None:
        try:
            lib = ctypes.CDLL(LIBNFTABLES)
        except OSError as exc:
            raise NftError(
                f"cannot load {LIBNFTABLES}: {exc} (install the libnftables1 package)"
            ) from exc
        c_ctx = ctypes.c_void_p
        self.ctx_new = lib.nft_ctx_new
        self.ctx_new.restype = c_ctx
        self.ctx_new.argtypes = [ctypes.c_uint32]
        self.ctx_free = lib.nft_ctx_free
        self.ctx_free.restype = None
        self.ctx_free.argtypes = [c_ctx]
        self.set_flags = lib.nft_ctx_output_set_flags
        self.set_flags.restype = None
        self.set_flags.argtypes = [c_ctx, ctypes.c_uint]
        self.buffer_output = lib.nft_ctx_buffer_output
        self.buffer_output.restype = ctypes.c_int
        self.buffer_output.argtypes = [c_ctx]
        self.buffer_error = lib.nft_ctx_buffer_error
        self.buffer_error.restype = ctypes.c_int
        self.buffer_error.argtypes = [c_ctx]
        self.run = lib.nft_run_cmd_from_buffer
        self.run.restype = ctypes.c_int
        self.run.argtypes = [c_ctx, ctypes.c_char_p]
        self.get_output = lib.nft_ctx_get_output_buffer
        self.get_output.restype = ctypes.c_char_p
        self.get_output.argtypes = [c_ctx]
        self.get_error = lib.nft_ctx_get_error_buffer
        self.get_error.restype = ctypes.c_char_p
        self.get_error.argtypes = [c_ctx]

    @classmethod
    def get(cls) -> _Lib:
        with cls._lock:
            if cls._instance is None:
                cls._instance = cls()
            return cls._instance


def error_line(detail: str, command: str = "") -> str:
    """Reduce libnftables' error buffer (message, echoed input, caret line) to one line."""
    message = ""
    for line in detail.splitlines():
        if "Error:" in line:
            message = line.split("Error:", 1)[1].strip()
            break
    if not message:
        message = next((ln.strip() for ln in detail.splitlines() if ln.strip()), "failed")
    cmd = " ".join(command.split())
    if len(cmd) > 120:
        cmd = cmd[:117] + "..."
    return f"nft: {message}" + (f" (in: {cmd})" if cmd else "")


def concat(*parts: Any) -> JsonDoc:
    """A concatenated key (`a . b`) in nft JSON."""
    return {"concat": list(parts)}


def _key(value: Any) -> Any:
    return concat(*value) if isinstance(value, tuple) else value


class Nft:
    """One libnftables context, in the caller's namespace or in namespace `netns`."""

    def __init__(self, netns: str | None = None) -> None:
        self.netns = netns
        self._lib = _Lib.get()
        self._lock = threading.Lock()
        self._worker = NsWorker(netns, name="ipshift-nft") if netns is not None else None
        self._ctx: int | None = self._call(self._new_ctx)

    # --- plumbing --------------------------------------------------------------------------
    def _call(self, fn: Callable[..., T], *args: Any) -> T:
        if self._worker is not None:
            return self._worker.call(fn, *args)
        with self._lock:
            return fn(*args)

    def _new_ctx(self) -> int:
        ctx = self._lib.ctx_new(0)
        if not ctx:
            raise NftError("nft: cannot create a libnftables context")
        self._lib.set_flags(ctx, NFT_CTX_OUTPUT_JSON | NFT_CTX_OUTPUT_HANDLE)
        if self._lib.buffer_output(ctx) != 0 or self._lib.buffer_error(ctx) != 0:
            self._lib.ctx_free(ctx)
            raise NftError("nft: cannot buffer libnftables output")
        return int(ctx)

    def _run_raw(self, text: str, echo: bool, flags: int | None = None) -> str:
        ctx = self._ctx
        if ctx is None:
            raise NftError("nft: the context is closed")
        if flags is None:
            flags = NFT_CTX_OUTPUT_JSON | NFT_CTX_OUTPUT_HANDLE
            flags |= NFT_CTX_OUTPUT_ECHO if echo else 0
        self._lib.set_flags(ctx, flags)
        rc = self._lib.run(ctx, text.encode())
        out = (self._lib.get_output(ctx) or b"").decode(errors="replace")
        err = (self._lib.get_error(ctx) or b"").decode(errors="replace")
        if rc != 0:
            raise NftError(error_line(err, text), err, text)
        return out

    # --- commands --------------------------------------------------------------------------
    def run(self, text: str, *, echo: bool = False) -> str:
        """Run nft commands (nft syntax, or a JSON document as text); returns the output."""
        return self._call(self._run_raw, text, echo)

    def run_text(self, text: str, *, terse: bool = False) -> str:
        """Run nft commands (nft syntax only) and return nft's text output, as the `nft` command
        prints it; `terse` leaves set and map elements out of listings."""
        return self._call(self._run_raw, text, False, NFT_CTX_OUTPUT_TERSE if terse else 0)

    def table_comment(self, family: str, name: str) -> str | None:
        """The comment of a table (None if it has none); NftError if there is no such table.

        libnftables 1.0.6 neither reads nor prints table comments in JSON, so this reads the
        terse text listing (elements left out: cheap even for big maps)."""
        out = self.run_text(f"list table {_family(family)} {_name(name)}", terse=True)
        return parse_table_comment(out)

    def run_json(
        self, commands: Mapping[str, Any] | Sequence[Mapping[str, Any]], *, echo: bool = False
    ) -> JsonDoc:
        """Run JSON commands (`{"nftables": [...]}` or just the list) as one transaction.

        Returns the parsed output (`{}` when nft printed nothing); with `echo=True` the output
        holds the created objects with their handles.
        """
        doc = commands if isinstance(commands, Mapping) else {"nftables": list(commands)}
        out = self.run(json.dumps(doc), echo=echo)
        return parse_output(out)

    def list_ruleset(self) -> JsonDoc:
        return parse_output(self.run("list ruleset"))

    def list_table(self, family: str, name: str) -> JsonDoc:
        return parse_output(self.run(f"list table {_family(family)} {_name(name)}"))

    def tables(self) -> list[tuple[str, str]]:
        """(family, name) of every table in the namespace."""
        doc = parse_output(self.run("list tables"))
        return [
            (item["table"]["family"], item["table"]["name"])
            for item in doc.get("nftables", [])
            if "table" in item
        ]

    def table_exists(self, family: str, name: str) -> bool:
        return (_family(family), name) in self.tables()

    def ensure_table(self, family: str, name: str) -> None:
        """Create the table unless it exists (`add table` leaves an existing one untouched)."""
        self.run_json([{"add": {"table": {"family": _family(family), "name": _name(name)}}}])

    def delete_table(self, family: str, name: str, *, missing_ok: bool = True) -> bool:
        """Delete a table with everything in it; False if it was not there (and missing_ok)."""
        cmd = [{"delete": {"table": {"family": _family(family), "name": _name(name)}}}]
        try:
            self.run_json(cmd)
        except NftError as exc:
            if missing_ok and "No such file or directory" in exc.detail:
                return False
            raise
        return True

    def add_elements(
        self, family: str, table: str, set_name: str, elements: Iterable[Any], *, batch: int = 1000
    ) -> int:
        """Add set elements (a tuple becomes a concatenation), `batch` per transaction."""
        return self._elements("add", family, table, set_name, (_key(e) for e in elements), batch)

    def delete_elements(
        self, family: str, table: str, set_name: str, elements: Iterable[Any], *, batch: int = 1000
    ) -> int:
        """Delete set or map elements by key; a missing element fails the whole batch."""
        return self._elements(
            "delete", family, table, set_name, (_key(e) for e in elements), batch
        )

    def add_map_elements(
        self,
        family: str,
        table: str,
        map_name: str,
        items: Mapping[Any, Any] | Iterable[tuple[Any, Any]],
        *,
        batch: int = 1000,
    ) -> int:
        """Add map entries key -> value (tuple keys/values become concatenations)."""
        pairs = items.items() if isinstance(items, Mapping) else items
        elems = ([_key(k), _key(v)] for k, v in pairs)
        return self._elements("add", family, table, map_name, elems, batch)

    def flush_set(self, family: str, table: str, set_name: str) -> None:
        """Remove every element of a set or map."""
        self.run_json(
            [{"flush": {"set": {"family": _family(family), "table": table, "name": set_name}}}]
        )

    def _elements(
        self, verb: str, family: str, table: str, name: str, elems: Iterable[Any], batch: int
    ) -> int:
        if batch < 1:
            raise ValueError("batch must be at least 1")
        fam = _family(family)
        total = 0
        chunk: list[Any] = []

        def flush() -> None:
            self.run_json(
                [{verb: {"element": {"family": fam, "table": table, "name": name, "elem": chunk}}}]
            )

        for elem in elems:
            chunk.append(elem)
            if len(chunk) >= batch:
                flush()
                total += len(chunk)
                chunk = []
        if chunk:
            flush()
            total += len(chunk)
        return total

    # --- lifecycle -------------------------------------------------------------------------
    def close(self) -> None:
        """Free the context and stop the namespace worker. Idempotent."""
        if self._ctx is not None:
            ctx, self._ctx = self._ctx, None
            self._call(self._lib.ctx_free, ctx)
        if self._worker is not None:
            self._worker.close()

    def __enter__(self) -> Nft:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def parse_output(out: str) -> JsonDoc:
    """libnftables' JSON output as a dict (`{}` for no output)."""
    if not out.strip():
        return {}
    try:
        doc = json.loads(out)
    except json.JSONDecodeError as exc:
        raise NftError(f"nft: output is not JSON: {exc}", out) from exc
    if not isinstance(doc, dict):
        raise NftError("nft: output is not a JSON object", out)
    return doc


def parse_table_comment(listing: str) -> str | None:
    """The comment of the first table in nft's text listing, or None.

    nft prints it as the first line inside the table block: `comment "..."` (nft strings
    cannot contain a double quote, so the first and last quote delimit it)."""
    lines = iter(listing.split("\n"))  # nft ends lines with \n; a comment may hold other breaks
    for line in lines:
        if line.startswith("table ") and line.rstrip().endswith("{"):
            break
    else:
        return None
    for line in lines:
        stripped = line.strip()
        if not stripped:
            continue
        if stripped.startswith('comment "') and stripped.endswith('"') and len(stripped) > 9:
            return stripped[len('comment "'):-1]
        return None
    return None


def _family(family: str) -> str:
    if family not in FAMILIES:
        raise ValueError(f"unknown nftables family {family!r} (one of {', '.join(FAMILIES)})")
    return family


def _name(name: str) -> str:
    if not name or not all(c.isalnum() or c in "_-." for c in name) or name[0].isdigit():
        raise ValueError(f"invalid nftables name {name!r}")
    return name
