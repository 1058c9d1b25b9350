"""The gateway's persisted leases (SQLite), so clients keep their binds across a restart.

Expiry times are stored on the wall clock (the engine's monotonic `now` does not survive a
restart) and turned back into the running clock on load. Writes are batched: the daemon calls
`save` with the clients changed since the last call, in one transaction; a stop saves at once.

The file is created 0600 in a 0700 directory: it names every host and what it holds.
"""

from __future__ import annotations

import ipaddress
import os
import sqlite3
from collections.abc import Iterable
from pathlib import Path

from ipshift.rsip.leases import Bind, BindKind, Client

SCHEMA = """
CREATE TABLE IF NOT EXISTS clients (
    client_id INTEGER PRIMARY KEY, host TEXT NOT NULL UNIQUE, transport TEXT NOT NULL,
    expires REAL NOT NULL, next_bind INTEGER NOT NULL, tunnel_port INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS binds (
    client_id INTEGER NOT NULL REFERENCES clients(client_id) ON DELETE CASCADE,
    bind_id INTEGER NOT NULL, kind TEXT NOT NULL, address TEXT NOT NULL, first INTEGER NOT NULL,
    last INTEGER NOT NULL, expires REAL NOT NULL, tunnel INTEGER NOT NULL,
    PRIMARY KEY (client_id, bind_id));
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""
SCHEMA_VERSION = "1"


class StoreError(Exception):
    """The lease file cannot be used; the message says why and what to do."""


class LeaseStore:
    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
            os.close(fd)
            self.db = sqlite3.connect(path, isolation_level=None)
            self.db.executescript("PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL; "
                                  "PRAGMA foreign_keys=ON;" + SCHEMA)
            row = self.db.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
            if row is None:
                self.db.execute("INSERT INTO meta VALUES ('schema', ?)", (SCHEMA_VERSION,))
            elif row[0] != SCHEMA_VERSION:
                raise StoreError(f"lease file {path} has schema {row[0]}, this version reads "
                                 f"{SCHEMA_VERSION}; move it aside to start empty")
        except (OSError, sqlite3.Error) as exc:
            raise StoreError(f"cannot open the lease file {path}: {exc}; check the "
                             "directory (STATE_DIR) or move the file aside") from exc

    def load(self, now: float, wall: float) -> list[Client]:
        """Every persisted client, expiry times moved onto the running clock."""
        shift = now - wall
        clients: dict[int, Client] = {}
        try:
            for cid, host, transport, expires, next_bind, tunnel_port in self.db.execute(
                    "SELECT client_id, host, transport, expires, next_bind, tunnel_port "
                    "FROM clients"):
                clients[cid] = Client(cid, host, transport, expires + shift,
                                      next_bind=next_bind, tunnel_port=tunnel_port)
            for cid, bind_id, kind, address, first, last, expires, tunnel in self.db.execute(
                    "SELECT client_id, bind_id, kind, address, first, last, expires, tunnel "
                    "FROM binds"):
                client = clients.get(cid)
                if client is None:
                    continue
                client.binds[bind_id] = Bind(cid, bind_id, BindKind(kind),
                                             ipaddress.IPv4Address(address), first, last,
                                             expires + shift, tunnel)
        except (sqlite3.Error, ValueError) as exc:
            raise StoreError(f"the lease file {self.path} is damaged ({exc}); move it aside "
                             "to start empty") from exc
        return list(clients.values())

    def save(self, changed: Iterable[Client], removed: Iterable[int], now: float,
             wall: float) -> None:
        shift = wall - now
        with self.db:
            self.db.execute("BEGIN")
            for client_id in removed:
                self.db.execute("DELETE FROM clients WHERE client_id=?", (client_id,))
            for client in changed:
                self.db.execute("DELETE FROM clients WHERE client_id=? OR host=?",
                                (client.client_id, client.host))
                self.db.execute("INSERT INTO clients VALUES (?, ?, ?, ?, ?, ?)", (
                    client.client_id, client.host, client.transport, client.expires + shift,
                    client.next_bind, client.tunnel_port))
                self.db.executemany("INSERT INTO binds VALUES (?, ?, ?, ?, ?, ?, ?, ?)", [
                    (client.client_id, b.bind_id, str(b.kind), str(b.address), b.first,
                     b.last, b.expires + shift, b.tunnel)
                    for b in client.binds.values() if b.kind is not BindKind.MAPPING])

    def clear(self) -> None:
        with self.db:
            self.db.execute("DELETE FROM clients")

    def close(self) -> None:
        self.db.close()
