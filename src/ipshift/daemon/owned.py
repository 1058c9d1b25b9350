"""The record of what a daemon instance holds in the kernel (nft tables, addresses kept on lo,
TUN devices, the routing protocol number it marks routes and rules with, ...), written to disk
each time it changes, so that the next start of the same instance finds what a killed
predecessor left and removes it, or hands it to its engine, instead of leaving it stale or
adding it twice.

Items are short strings under a kind, e.g. ("nft_table", "inet ipshift_resend_ppp0"),
("lo_address", "192.0.2.7/32"). The file lives beside the instance lock (instance.py) and is
rewritten atomically (write, fsync, rename).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path

log = logging.getLogger("ipshift.daemon")

#: kinds the runtime itself knows how to remove (runtime.remove_leftovers)
NFT_TABLE = "nft_table"  # "FAMILY NAME"
LO_ADDRESS = "lo_address"  # "ADDRESS/PREFIXLEN"
TUN_DEVICE = "tun_device"  # "NAME"
ROUTE_PROTOCOL = "route_protocol"  # "NUMBER": routes and rules the instance marks with it
QUEUE_RULE = "queue_rule"  # "FAMILY TABLE OWNER": an iptables chain feeding an NFQUEUE
SYSCTL = "sysctl"  # "KEY=ORIGINAL VALUE": a kernel setting changed, put back on the way out


class OwnedRecord:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.current: dict[str, list[str]] = {}
        self.previous: dict[str, list[str]] = self._load()

    def _load(self) -> dict[str, list[str]]:
        """What the last instance of this name recorded (empty if it stopped cleanly)."""
        try:
            doc = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            log.warning("ignoring an unreadable owned-state record %s: %s", self.path, exc)
            return {}
        owned = doc.get("owned") if isinstance(doc, dict) else None
        if not isinstance(owned, dict):
            return {}
        return {str(k): [str(i) for i in v] for k, v in owned.items() if isinstance(v, list)}

    def left_over(self, kind: str) -> list[str]:
        return list(self.previous.get(kind, ()))

    def settled(self, kind: str, items: Iterable[str] | None = None) -> None:
        """The previous instance's `items` of `kind` (all, by default) are dealt with."""
        if items is None:
            self.previous.pop(kind, None)
        else:
            gone = set(items)
            left = [i for i in self.previous.get(kind, ()) if i not in gone]
            if left:
                self.previous[kind] = left
            else:
                self.previous.pop(kind, None)
        self.save()

    def add(self, kind: str, item: str) -> None:
        items = self.current.setdefault(kind, [])
        if item not in items:
            items.append(item)
            self.save()

    def set_items(self, kind: str, items: Iterable[str]) -> None:
        """What is held of `kind` is exactly `items` now (e.g. `LoAddresses(on_change=...)`:
        `lambda owned: rt.record.set_items(LO_ADDRESS, owned)`)."""
        wanted = sorted(set(items))
        if wanted == sorted(self.current.get(kind, ())):
            return
        if wanted:
            self.current[kind] = wanted
        else:
            self.current.pop(kind, None)
        self.save()

    def discard(self, kind: str, item: str) -> None:
        items = self.current.get(kind)
        if items and item in items:
            items.remove(item)
            if not items:
                del self.current[kind]
            self.save()

    def items(self, kind: str) -> list[str]:
        return list(self.current.get(kind, ()))

    def save(self) -> None:
        """Write what is held now plus what a predecessor left and is not yet dealt with (a
        crash halfway through the start must not forget it)."""
        merged: dict[str, list[str]] = {k: list(v) for k, v in self.previous.items()}
        for kind, items in self.current.items():
            merged.setdefault(kind, [])
            merged[kind] += [i for i in items if i not in merged[kind]]
        if not merged:
            self.remove()
            return
        tmp = self.path.with_name(self.path.name + ".tmp")
        data = json.dumps({"pid": os.getpid(), "owned": merged}, indent=1, sort_keys=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, data.encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.path)

    def remove(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
