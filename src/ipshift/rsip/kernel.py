"""The gateway's kernel state around the tunnel: diverting leased ports to it.

Packets to a leased (public address, port) arrive at the gateway addressed to one of its own
addresses, so the kernel would deliver them locally. The owned nft table marks them in
prerouting, and a policy rule sends marked packets to a routing table whose only route is the
tunnel device; the tunnel's peer table then picks the client by (address, protocol, port).

    prerouting (mangle):  from the tunnel device     -> ct mark |= MARK (flows hosts started)
                          ct mark & MARK             -> mark |= MARK   (their replies, ICMP
                                                        errors about them: RELATED shares it)
                          daddr leased whole         -> mark |= MARK   (echo requests dropped)
                          daddr . dport in @leases   -> mark |= MARK   (TCP, UDP)
                          echo reply, daddr . id in @echo   -> mark |= MARK
                                                        (the same blocks: ICMP identifiers)

The last two only match packets in conntrack's original direction: a reply to a flow the
gateway itself started, or masqueraded for a host that speaks no RSIP, stays with that flow
even when its public port happens to lie in a leased block.
    rule  pref 0 fwmark MARK/MARK lookup TABLE        (before `lookup local`)
    route default dev TUNNEL table TABLE

The rule must be looked at before the local table (pref 0). Rules of equal preference keep
the order they were added in, so the local rule is put back behind ours, never missing for a
moment: local copy at pref 1, delete local 0, add ours at 0, add local 0, delete the copy.
The rule and the route carry the routing protocol PROTOCOL, so the runtime removes them after
a kill -9 (the record's route_protocol) and the local rule stays where it always was.

Packets from the tunnel have a local source address (the leased one): the tunnel device gets
accept_local=1 and rp_filter=0 (it disappears with the device).
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Iterable

from ipshift.net import sysctl
from ipshift.net.errors import NetError
from ipshift.net.netlink import Netlink, Route
from ipshift.net.netlink.objects import Rule
from ipshift.net.nft import Nft
from ipshift.net.nfttable import OwnedTable

log = logging.getLogger("ipshift.rsip")

PROTOCOL = 74        # routing protocol number of the gateway's rule and route
TABLE = 4555         # the routing table that leads into the tunnel
MARK = 0x01000000    # the packet and conntrack mark bit of diverted traffic
RT_TABLE_LOCAL = 255


def table_body(tunnel_dev: str) -> str:
    return f"""
set leases {{ type ipv4_addr . inet_service; flags interval; }}
set echo {{ typeof ip daddr . icmp id; flags interval; }}
set whole {{ type ipv4_addr; }}
chain divert {{
    type filter hook prerouting priority mangle; policy accept;
    iifname "{tunnel_dev}" ct mark set ct mark | {MARK:#x} return
    ct mark & {MARK:#x} == {MARK:#x} meta mark set meta mark | {MARK:#x} return
    ip daddr @whole icmp type echo-request drop
    ip daddr @whole meta mark set meta mark | {MARK:#x} return
    ct direction original meta l4proto {{ tcp, udp }} ip daddr . th dport @leases \
        meta mark set meta mark | {MARK:#x} return
    ct direction original icmp type echo-reply ip daddr . icmp id @echo \
        meta mark set meta mark | {MARK:#x} return
}}
"""


class Diversion:
    """The owned nft table and the leased elements in it (`change` applies a difference)."""

    def __init__(self, table: OwnedTable, tunnel_dev: str) -> None:
        self.table = table
        self.tunnel_dev = tunnel_dev
        self.leases: set[str] = set()   # "ADDRESS . FIRST-LAST"
        self.whole: set[str] = set()

    def install(self) -> None:
        self.table.create(table_body(self.tunnel_dev), force=True)
        self.leases.clear()
        self.whole.clear()

    def change(self, add: Iterable[str], remove: Iterable[str], add_whole: Iterable[str],
               remove_whole: Iterable[str]) -> None:
        """Add and remove elements (one nft transaction; its cost is that of the change,
        whatever the sets hold)."""
        add, remove = set(add) - self.leases, set(remove) & self.leases
        add_whole, remove_whole = set(add_whole) - self.whole, set(remove_whole) & self.whole
        commands = []
        spec = self.table.spec
        for name, gone, new in (("leases", remove, add), ("echo", remove, add),
                                ("whole", remove_whole, add_whole)):
            if gone:
                commands.append(f"delete element {spec} {name} {{ {', '.join(sorted(gone))} }}")
            if new:
                commands.append(f"add element {spec} {name} {{ {', '.join(sorted(new))} }}")
        if commands:
            self.table.nft.run("\n".join(commands) + "\n")
        self.leases = (self.leases - remove) | add
        self.whole = (self.whole - remove_whole) | add_whole


def lease_element(address: ipaddress.IPv4Address, first: int, last: int) -> str:
    return f"{address} . {first}-{last}" if first != last else f"{address} . {first}"


def install_routing(nl: Netlink, tunnel_dev: str) -> None:
    """The route into the tunnel and the mark rule ahead of the local table."""
    nl.replace_route(Route("0.0.0.0/0", dev=tunnel_dev, table=TABLE, proto=PROTOCOL))
    ours = Rule(0, table=TABLE, fwmark=MARK, fwmask=MARK, proto=PROTOCOL)
    rules = nl.rules(family=2)
    if any(r.fwmark == MARK and r.table == TABLE for r in rules):
        return  # already there (a restart over a killed predecessor's state)
    local_copy = Rule(1, table=RT_TABLE_LOCAL)
    had_copy = any(r.priority == 1 and r.table == RT_TABLE_LOCAL for r in rules)
    if not had_copy:
        nl.add_rule(local_copy)
    try:
        nl.del_rule(Rule(0, table=RT_TABLE_LOCAL))
        try:
            nl.add_rule(ours)
        finally:
            nl.add_rule(Rule(0, table=RT_TABLE_LOCAL))
    finally:
        if not had_copy:
            nl.del_rule(local_copy)


def remove_routing(nl: Netlink) -> None:
    for rule in nl.rules(family=2):
        if rule.proto == PROTOCOL:
            try:
                nl.del_rule(rule)
            except NetError as exc:
                log.warning("removing the rule into the tunnel: %s", exc)
    try:
        nl.del_route(Route("0.0.0.0/0", table=TABLE, proto=PROTOCOL))
    except NetError:
        pass  # gone with the tunnel device


def prepare_tunnel_device(dev: str, netns: str | None) -> None:
    """Accept packets from the tunnel whose source is one of this host's addresses."""
    sysctl.write(("net", "ipv4", "conf", dev, "accept_local"), 1, netns)
    sysctl.write(("net", "ipv4", "conf", dev, "rp_filter"), 0, netns)


def strict_rp_filter(netns: str | None) -> bool:
    try:
        return sysctl.read(("net", "ipv4", "conf", "all", "rp_filter"), netns).strip() == "1"
    except (OSError, NetError):
        return False


def owned_table(nft: Nft, instance: str) -> OwnedTable:
    return OwnedTable(nft, "ip", "rsip", instance)
