"""Addresses kept on `lo` while something needs them, with a use count.

A host whose address changed keeps its old address local so that sockets bound to it (and
flows remapped to the new address on the wire) still work: there is no dummy link type on
this kernel, so the address goes on `lo` as a /32 or /128. Several users (mappings, sessions)
may need the same address; it is added on the first `acquire` and removed on the last
`release`, and only if this holder added it (an address that was already local is left
alone). `on_change` is told the set of addresses this holder added, so the owner can record it
(the daemon runtime's owned-state record) and a restart after kill -9 can remove them:

    lo = LoAddresses(netlink, on_change=lambda owned: record_set(owned))
    lo.acquire("192.0.2.7"); ...; lo.release("192.0.2.7"); lo.release_all()
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Callable, Iterable

from ipshift.net.errors import NetError
from ipshift.net.netlink import Netlink

log = logging.getLogger("ipshift.net")

RT_SCOPE_HOST = 254


def host_cidr(addr: str) -> str:
    """`addr` as the host prefix it gets on lo (ADDRESS/32 or ADDRESS/128)."""
    ip = ipaddress.ip_address(addr)
    return f"{ip}/{32 if ip.version == 4 else 128}"


class LoAddresses:
    """With `identifier_only`, a kept address serves the sockets already bound to it and is
    never picked as the source of anything new: IPv4 addresses get host scope, IPv6 ones a
    preferred lifetime of 0 (deprecated; RFC 6724 source selection avoids them)."""

    def __init__(self, netlink: Netlink, *,
                 on_change: Callable[[frozenset[str]], None] | None = None,
                 identifier_only: bool = False) -> None:
        self.netlink = netlink
        self.on_change = on_change
        self.identifier_only = identifier_only
        self.users: dict[str, int] = {}  # address -> holders that need it local
        self.owned: set[str] = set()  # the ones this holder added (and will remove), as CIDRs

    def acquire(self, addr: str) -> None:
        """Keep `addr` local until the matching release."""
        cidr = host_cidr(addr)
        if self.users.get(cidr, 0) == 0 and cidr not in self.owned:
            local = {a.address for a in self.netlink.addresses()}
            if str(ipaddress.ip_address(addr)) not in local:
                if not self.identifier_only:
                    self.netlink.add_address("lo", cidr, nodad=True)
                elif ipaddress.ip_address(addr).version == 4:
                    self.netlink.add_address("lo", cidr, nodad=True, scope=RT_SCOPE_HOST)
                else:  # valid forever, deprecated at once
                    self.netlink.add_address("lo", cidr, nodad=True, preferred_lft=0)
                self.owned.add(cidr)
                self._changed()
                log.info("keeping address %s on lo", cidr)
        self.users[cidr] = self.users.get(cidr, 0) + 1

    def adopt(self, cidrs: Iterable[str]) -> None:
        """Addresses an earlier run of this holder added (its record, after a restart): owned
        again, so that the last release removes them. `release_unused` removes the ones no
        one acquires."""
        local = {f"{a.address}/{a.prefixlen}" for a in self.netlink.addresses(dev="lo")}
        for cidr in cidrs:
            if cidr in local:
                self.owned.add(cidr)
        self._changed()

    def release_unused(self) -> None:
        for cidr in sorted(self.owned - set(self.users)):
            self.owned.discard(cidr)
            self._delete(cidr)
        self._changed()

    def release(self, addr: str) -> None:
        cidr = host_cidr(addr)
        left = self.users.get(cidr, 0) - 1
        if left > 0:
            self.users[cidr] = left
            return
        self.users.pop(cidr, None)
        if cidr in self.owned:
            self.owned.discard(cidr)
            self._delete(cidr)
            self._changed()

    def release_all(self) -> None:
        for cidr in sorted(self.owned):
            self._delete(cidr)
        changed = bool(self.owned)
        self.owned.clear()
        self.users.clear()
        if changed:
            self._changed()

    def _delete(self, cidr: str) -> None:
        try:
            self.netlink.del_address("lo", cidr)
            log.info("removed address %s from lo", cidr)
        except NetError:
            pass  # already gone (someone removed it, or the namespace went)

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change(frozenset(self.owned))


def remove_addresses(cidrs: Iterable[str], netns: str | None = None) -> list[str]:
    """Remove the given host addresses from lo where present (recovery after a crash); the
    ones that were there and are now gone."""
    removed = []
    with Netlink(netns) as nl:
        present = {a.cidr for a in nl.addresses("lo")}
        for cidr in cidrs:
            try:
                cidr = host_cidr(cidr.split("/")[0])
            except ValueError:
                continue  # not an address: a damaged record
            if cidr not in present:
                continue
            try:
                nl.del_address("lo", cidr)
                removed.append(cidr)
            except NetError as exc:
                log.warning("cannot remove %s from lo: %s", cidr, exc)
    return removed
