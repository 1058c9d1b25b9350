"""An nftables table owned by one daemon instance: created or replaced in one transaction,
deleted on exit, and found again after a kill -9.

    table = OwnedTable(Nft(netns), "inet", "sacip", "eth0")     # table inet ipshift_sacip_eth0
    table.create('''
        chain inbound { type filter hook prerouting priority -300; policy accept; }
    ''')                                                        # replaces a leftover, never doubles
    ...
    table.delete()                                              # False if it was not there
    remove_stale_tables(Nft(netns), "sacip")                    # tables whose creator is gone

The table name derives from the owner and the instance (`table_name`). The table carries a
comment naming its creator process, `owner=sacip pid=1234 start=5678 pidns=4026531836
instance=eth0` (start: the process's start time in clock ticks since boot, so a reused PID is
not taken for the creator; pidns: the PID namespace the PID belongs to). `remove_stale_tables`
reads it to decide which tables are left over; a table without such a comment is never touched.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass

from ipshift.net.errors import NetError, ParseError
from ipshift.net.nft import FAMILIES, Nft, NftError

log = logging.getLogger("ipshift.net")

PREFIX = "ipshift_"
TABLE_NAME_MAX = 64  # nft allows 256; long names make listings unreadable
OWNER_RE = re.compile(r"[a-z][a-z0-9]{0,15}\Z")
INSTANCE_MAX = 64  # as the daemon runtime's instance names
COMMENT_MAX = 128  # nft refuses longer comments ("comment too long")
_SAFE_INSTANCE = "._-@+:"  # kept as they are in the comment; everything else %-escaped


class OwnedTableError(NetError):
    """The table cannot be created or removed; str() is one line."""


class TableMarkError(ParseError):
    """A table comment is not an ownership mark."""


def table_name(owner: str, instance: str) -> str:
    """`ipshift_<owner>_<instance>`: letters, digits and `_` only, at most TABLE_NAME_MAX
    characters. An instance name that had to be changed (other characters, too long) gets a
    short hash of the original, so two instances never share a table."""
    _check_owner(owner)
    _check_instance(instance)
    prefix = f"{PREFIX}{owner}_"
    clean = "".join(c if c.isascii() and (c.isalnum() or c == "_") else "_" for c in instance)
    if clean == instance and len(prefix) + len(clean) <= TABLE_NAME_MAX:
        return prefix + clean
    digest = hashlib.sha256(instance.encode()).hexdigest()[:8]
    room = TABLE_NAME_MAX - len(prefix) - len(digest) - 1
    return f"{prefix}{clean[:room]}_{digest}"


def _check_owner(owner: str) -> None:
    if not isinstance(owner, str) or not OWNER_RE.match(owner):
        raise ValueError(f"owner {owner!r} must be 1-16 lowercase letters and digits, "
                         "starting with a letter (e.g. 'sacip')")


def _check_instance(instance: str) -> None:
    if not isinstance(instance, str) or not instance or len(instance) > INSTANCE_MAX \
            or not instance.isprintable():
        raise ValueError(f"instance {instance!r} must be 1-{INSTANCE_MAX} printable characters")


# --- the ownership mark -------------------------------------------------------------------------
@dataclass(frozen=True)
class TableMark:
    """Who created a table: the owner, the instance, and the creating process."""

    owner: str
    instance: str  # possibly shortened to fit the comment (then `instance_cut`)
    pid: int
    start: int  # the process's start time, clock ticks since boot (/proc/PID/stat field 22)
    pidns: int  # inode of the PID namespace `pid` belongs to
    instance_cut: bool = False

    def format(self) -> str:
        """The comment text (at most COMMENT_MAX characters; the instance is cut to fit)."""
        head = f"owner={self.owner} pid={self.pid} start={self.start} pidns={self.pidns}"
        pieces = [urllib.parse.quote(c, safe=_SAFE_INSTANCE) for c in self.instance]
        full = f"{head} instance={''.join(pieces)}"
        if len(full) <= COMMENT_MAX and not self.instance_cut:
            return full
        room = COMMENT_MAX - len(head) - len(" cut=1 instance=")
        kept = ""
        for piece in pieces:  # whole characters only
            if len(kept) + len(piece) > room:
                break
            kept += piece
        return f"{head} cut=1 instance={kept}"

    @classmethod
    def parse(cls, comment: str) -> TableMark:
        """The mark in a table comment; TableMarkError if it is not one."""
        fields: dict[str, str] = {}
        for word in comment.split(" "):
            key, sep, value = word.partition("=")
            if not sep or not key or key in fields:
                raise TableMarkError(f"not an ipshift table mark: {comment[:60]!r}")
            fields[key] = value
        try:
            owner = fields["owner"]
            pid, start, pidns = int(fields["pid"]), int(fields["start"]), int(fields["pidns"])
            instance = urllib.parse.unquote(fields.get("instance", ""), errors="strict")
        except (KeyError, ValueError, UnicodeDecodeError) as exc:
            raise TableMarkError(f"not an ipshift table mark: {comment[:60]!r}") from exc
        if not OWNER_RE.match(owner) or min(pid, start, pidns) < 0 \
                or not set(fields) <= {"owner", "pid", "start", "pidns", "instance", "cut"}:
            raise TableMarkError(f"not an ipshift table mark: {comment[:60]!r}")
        return cls(owner, instance, pid, start, pidns, fields.get("cut") == "1")


def process_start(pid: int) -> int | None:
    """Start time of process `pid` (clock ticks since boot), None if there is no such process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    # the command name (field 2) may hold spaces and parentheses: count from its last ")"
    fields = stat[stat.rfind(b")") + 2:].split()
    try:
        return int(fields[19])
    except (IndexError, ValueError):
        return None


def pid_namespace() -> int:
    return os.stat("/proc/self/ns/pid").st_ino


def own_mark(owner: str, instance: str) -> TableMark:
    """The mark this process puts on the tables it creates."""
    pid = os.getpid()
    return TableMark(owner, instance, pid, process_start(pid) or 0, pid_namespace())


def creator_alive(mark: TableMark) -> bool:
    """Whether the process that created a marked table still runs. A mark from another PID
    namespace cannot be judged from here and counts as alive (it is left alone)."""
    if mark.pidns != pid_namespace():
        return True
    return process_start(mark.pid) == mark.start


# --- the table ----------------------------------------------------------------------------------
class OwnedTable:
    """The one nft table of (owner, instance) in the namespace of `nft`."""

    def __init__(self, nft: Nft, family: str, owner: str, instance: str) -> None:
        if family not in FAMILIES:
            raise ValueError(f"unknown nftables family {family!r} (one of {', '.join(FAMILIES)})")
        self.nft = nft
        self.family = family
        self.owner = owner
        self.instance = instance
        self.name = table_name(owner, instance)  # checks owner and instance
        self.mark = own_mark(owner, instance)

    def __repr__(self) -> str:
        return f"<OwnedTable {self.family} {self.name}>"

    @property
    def spec(self) -> str:
        """`FAMILY NAME`, as the daemon runtime's owned-state record keeps tables."""
        return f"{self.family} {self.name}"

    def create(self, body: str = "", *, force: bool = False) -> None:
        """Create the table with `body` (nft syntax: what goes inside `table ... { }`), or
        replace the one there, in one transaction: never two, never a moment with a half-built
        table. A table held by another running process is refused unless `force`."""
        if not force:
            holder = self.kernel_mark()
            if holder is not None and (holder.pid, holder.start) != (self.mark.pid,
                                                                      self.mark.start) \
                    and creator_alive(holder):
                raise OwnedTableError(
                    f"nftables table {self.spec} belongs to running process {holder.pid}: "
                    "stop that instance first")
        # `table` (add) first, so that the delete finds a table even on a fresh start
        text = (f"table {self.spec}\n"
                f"delete table {self.spec}\n"
                f"table {self.spec} {{\n"
                f"comment \"{self.mark.format()}\"\n"
                f"{body}\n}}\n")
        try:
            self.nft.run(text)
        except NftError as exc:
            raise OwnedTableError(
                f"cannot create nftables table {self.spec}: {_reason(exc)}") from exc

    def delete(self) -> bool:
        """Remove the table and everything in it; False if it was not there."""
        try:
            return self.nft.delete_table(self.family, self.name)
        except NftError as exc:
            raise OwnedTableError(
                f"cannot delete nftables table {self.spec}: {_reason(exc)}") from exc

    def exists(self) -> bool:
        return self.nft.table_exists(self.family, self.name)

    def kernel_mark(self) -> TableMark | None:
        """The mark on the table in the kernel; None if the table or its mark is missing."""
        return _read_mark(self.nft, self.family, self.name)


def _reason(exc: NftError) -> str:
    """nft's message plus the input line it points at (libnftables echoes it after the
    message), so an error deep in a body names its line."""
    message = str(exc).removeprefix("nft: ")
    message = message.split(" (in: ", 1)[0]
    lines = exc.detail.splitlines()
    for i, line in enumerate(lines):
        if "Error:" in line and i + 1 < len(lines) and lines[i + 1].strip():
            return f"{message} (at: {' '.join(lines[i + 1].split())[:100]})"
    return message


def _read_mark(nft: Nft, family: str, name: str) -> TableMark | None:
    try:
        comment = nft.table_comment(family, name)
    except NftError:
        return None  # gone (or never there)
    if comment is None:
        return None
    try:
        return TableMark.parse(comment)
    except TableMarkError:
        return None


# --- finding tables again -----------------------------------------------------------------------
@dataclass(frozen=True)
class FoundTable:
    family: str
    name: str
    mark: TableMark | None  # None: no ipshift mark (never removed as stale)

    @property
    def spec(self) -> str:
        return f"{self.family} {self.name}"


def owned_tables(nft: Nft, owner: str) -> list[FoundTable]:
    """The tables in the namespace of `nft` whose name says they belong to `owner`."""
    _check_owner(owner)
    prefix = f"{PREFIX}{owner}_"
    found = []
    for family, name in nft.tables():
        if name.startswith(prefix):
            mark = _read_mark(nft, family, name)
            if mark is not None and mark.owner != owner:
                mark = None
            found.append(FoundTable(family, name, mark))
    return found


def remove_stale_tables(
    nft: Nft, owner: str, *, is_live: Callable[[FoundTable], bool] | None = None
) -> list[str]:
    """Delete the tables of `owner` whose instance is not live; returns their `FAMILY NAME`.

    By default an instance is live while the process that created its table runs (same PID
    and start time). `is_live` replaces that test, e.g. with the instance locks a caller holds
    (compare `found.name` with `table_name(owner, instance)`). Tables without an ipshift mark
    are left alone: nothing says whose they are."""
    removed = []
    for found in owned_tables(nft, owner):
        if found.mark is None:
            log.warning("nftables table %s has no ipshift owner mark: left alone", found.spec)
            continue
        live = is_live(found) if is_live is not None else creator_alive(found.mark)
        if live:
            continue
        try:
            if nft.delete_table(found.family, found.name):
                log.info("removed nftables table %s left by %s %s (pid %d)", found.spec,
                         owner, found.mark.instance, found.mark.pid)
                removed.append(found.spec)
        except NftError as exc:
            raise OwnedTableError(f"cannot remove the stale nftables table {found.spec}: "
                                  f"{_reason(exc)}") from exc
    return removed
