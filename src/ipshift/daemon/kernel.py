"""Kernel objects a daemon owns, opened and closed with the runtime's owned-state record.

Every daemon that remaps flows or keeps old addresses on lo did the same bookkeeping around
`net.remap.FlowRemaps` and `net.loaddr.LoAddresses`; it lives here once:

    lo = kept_addresses(rt, netlink, identifier_only=True, adopt=True)
    remaps, adopted = remap_table(rt, Nft(netns), "sacip", name, adopt=True)
    ...
    close_remap_table(rt, remaps); lo.release_all()

With `adopt`, what a killed predecessor of the same instance left (its record's leftovers)
is taken over instead of removed: the remaps stay installed and are returned, the lo
addresses are owned again (the service then acquires those it still needs and calls
`lo.release_unused()`). Without it, the runtime has removed the leftovers before `start`.

Kernel settings a daemon changes (a sysctl) are recorded with their original value before the
change and put back on the way out, or by the next start after a kill -9:

    change_sysctl(rt, "net.ipv4.ip_local_port_range", "8192 8446", netns)
    ...
    restore_sysctl(rt, "net.ipv4.ip_local_port_range", netns)
"""

from __future__ import annotations

import logging

from ipshift.daemon.owned import LO_ADDRESS, NFT_TABLE, SYSCTL, OwnedRecord
from ipshift.daemon.runtime import Runtime
from ipshift.net import sysctl
from ipshift.net.errors import NetError
from ipshift.net.loaddr import LoAddresses
from ipshift.net.netlink import Netlink
from ipshift.net.nft import Nft
from ipshift.net.nfttable import OwnedTable
from ipshift.net.remap import Direction, FlowRemaps, Remap

log = logging.getLogger("ipshift.daemon")


def kept_addresses(rt: Runtime, netlink: Netlink, *, identifier_only: bool = False,
                   adopt: bool = False) -> LoAddresses:
    """Addresses kept on lo, written to the record as they come and go."""
    lo = LoAddresses(netlink, on_change=lambda owned: rt.record.set_items(LO_ADDRESS, owned),
                     identifier_only=identifier_only)
    if adopt:
        left = rt.record.left_over(LO_ADDRESS)
        lo.adopt(left)
        rt.record.settled(LO_ADDRESS, left)
    return lo


def remap_table(rt: Runtime, nft: Nft, owner: str, instance: str, *,
                adopt: bool = False) -> tuple[FlowRemaps, dict[Remap, Direction]]:
    """The instance's remap table (`ipshift_<owner>_<instance>`), recorded; with `adopt`, a
    killed predecessor's table is taken over with its remaps (returned), else it starts
    empty."""
    table = OwnedTable(nft, "inet", owner, instance)
    rt.record.add(NFT_TABLE, table.spec)
    remaps = FlowRemaps(table)
    adopted: dict[Remap, Direction] = {}
    if adopt and table.spec in rt.record.left_over(NFT_TABLE) and table.exists():
        adopted = remaps.adopt()
    else:
        remaps.install(force=True)  # ours: the instance lock says no one else runs
    if adopt:
        for spec in rt.record.left_over(NFT_TABLE):
            if spec != table.spec:
                log.warning("a predecessor left nftables table %s, not this instance's: "
                            "`ipshift daemons --clean` removes it", spec)
        rt.record.settled(NFT_TABLE, [table.spec])
    return remaps, adopted


def close_remap_table(rt: Runtime | None, remaps: FlowRemaps) -> None:
    """Remove the table with every remap, and its record entry (a failure is logged: the
    record keeps it for `ipshift daemons --clean`)."""
    try:
        remaps.delete()
        if rt is not None:
            rt.record.discard(NFT_TABLE, remaps.table.spec)
    except NetError as exc:
        log.warning("removing nftables table %s: %s", remaps.table.name, exc)


def change_sysctl(rt: Runtime, key: str, value: str, netns: str | None) -> None:
    """Set the kernel setting `key` to `value`, its original value recorded first (once per
    key, before the write): a kill -9 right after is undone by the next start
    (runtime.remove_leftovers), a regular stop by `restore_sysctl`."""
    if not any(item.partition("=")[0] == key for item in rt.record.items(SYSCTL)):
        original = " ".join(sysctl.read(key, netns).split())
        rt.record.add(SYSCTL, f"{key}={original}")
    sysctl.write(key, value, netns)


def restore_sysctl(rt: Runtime, key: str, netns: str | None) -> bool:
    """Put `key` back to what it was before this instance changed it (nothing to do if it did
    not). False if the write failed: logged, and the record keeps the original for the next
    start or `ipshift daemons --clean`."""
    for item in rt.record.items(SYSCTL):
        name, _, original = item.partition("=")
        if name != key:
            continue
        try:
            sysctl.write(key, original, netns)
        except (NetError, ValueError) as exc:
            log.warning("cannot restore %s to %s: %s", key, original, exc)
            return False
        rt.record.discard(SYSCTL, item)
    return True


def restore_left_sysctls(record: OwnedRecord, netns: str | None) -> None:
    """Put back the settings a killed predecessor changed; the record forgets each one."""
    for item in record.left_over(SYSCTL):
        key, _, original = item.partition("=")
        try:
            sysctl.write(key, original, netns)
        except (NetError, ValueError) as exc:
            log.warning("cannot restore %s to %s: %s", key, original, exc)
            continue
        log.info("restored %s to %s, left changed by a previous instance", key, original)
        record.settled(SYSCTL, [item])
