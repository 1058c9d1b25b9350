"""The PCP / NAT-PMP port forwards in the kernel: one owned nft table of maps and sets.

Every mapping is a few elements of fixed maps, never a rule of its own, so the kernel looks a
packet up in one hash whatever the number of mappings, and adding the 10,000th mapping costs
what the first did (one libnftables transaction; several mappings share one).

    table ip ipshift_pcp_<instance>
      map forwards   ext addr . proto . ext port  : int addr . int port   DNAT in
      set targets    int addr . proto . int port                          forward accept
      map outbound   int addr . proto . int port  : ext addr . ext port   SNAT out (a MAP
                                                                          mapping is both ways)
      map peers      int addr . proto . int port . remote addr . remote port : ext addr . ext port
                                                                          PEER pins, before it
      set filtered   ext addr . proto . ext port                          FILTERed forwards ...
      set allowed    ext addr . proto . ext port . remote prefix . remote ports (intervals)
                                                                          ... let in only these

    prerouting -150 (before NAT): from outside, to a filtered forward, not allowed -> drop
    prerouting dstnat - 1:        dnat to the forwards map
    forward filter - 1:           DNATed to a target -> accept
    postrouting srcnat - 1:       hairpin (INT_IF in and out, DNATed) -> masquerade;
                                  out of another interface: the PEER pins, then outbound

The NAT chains run one priority ahead of the usual ones, so a masquerade elsewhere (the
gateway's own NAT) does not pick another port first: netfilter takes the first NAT binding
of a hook.

Flows: removing a forward also ends the conntrack entries of flows that came in through it
(they would otherwise live on without a forward); adding a UDP forward ends entries of
earlier, unanswered datagrams to that port (conntrack would otherwise keep sending their
retransmissions to the gateway itself, skipping the new DNAT). Finding them means a
conntrack dump, which walks the kernel's whole conntrack hash (about 10 ms here, whatever
the number of flows), so it is kept off the request path: `apply` queues the work,
`take_flow_work` hands it over in one piece, and `end_flows` (on a worker thread) does it
with one dump per protocol and address. `lookup_flow` finds the external port the kernel
gave an outbound flow (PEER).

    portmap = PortMap(OwnedTable(Nft(netns), "ip", "pcp", "default"), "eth1")
    portmap.install()
    portmap.apply(actions)        # AddForward, RemoveForward, SetFilters, AddPeer, RemovePeer
    work = portmap.take_flow_work()
    if work: portmap.end_flows(work)      # from a worker thread
    portmap.delete()
"""

from __future__ import annotations

import ipaddress
import logging
import threading
from collections.abc import Sequence
from typing import Any

from ipshift.net.conntrack import Conntrack, ConntrackFilter
from ipshift.net.errors import NetError
from ipshift.net.nft import NftError, concat
from ipshift.net.nfttable import OwnedTable
from ipshift.rsip.mapping import (
    PROTOCOL_NAMES,
    AddForward,
    AddPeer,
    Forward,
    LookupFlow,
    PeerPin,
    RemoteFilter,
    RemoveForward,
    RemovePeer,
    SetFilters,
)

log = logging.getLogger("ipshift.rsip")

OWNER = "pcp"
FAMILY = "ip"

Change = AddForward | RemoveForward | SetFilters | AddPeer | RemovePeer
ForwardKey = tuple[ipaddress.IPv4Address, int, int]
#: (protocol, external address) -> (ports whose flows end, ports whose unanswered UDP goes)
FlowWork = dict[tuple[int, ipaddress.IPv4Address], tuple[set[int], set[int]]]
PeerKey = tuple[ipaddress.IPv4Address, int, int, ipaddress.IPv4Address, int]


def table_body(internal_interface: str) -> str:
    """The table's sets, maps and chains (nft syntax, inside `table ip NAME { }`)."""
    inside = f'"{internal_interface}"'
    key3 = "ipv4_addr . inet_proto . inet_service"
    return f"""
map forwards {{ type {key3} : ipv4_addr . inet_service; }}
set targets {{ type {key3}; }}
map outbound {{ type {key3} : ipv4_addr . inet_service; }}
map peers {{ type {key3} . ipv4_addr . inet_service : ipv4_addr . inet_service; }}
set filtered {{ type {key3}; }}
set allowed {{ type {key3} . ipv4_addr . inet_service; flags interval; }}
chain filter_in {{
    type filter hook prerouting priority -150; policy accept;
    iifname != {inside} ip daddr . meta l4proto . th dport @filtered \
        ip daddr . meta l4proto . th dport . ip saddr . th sport != @allowed drop
}}
chain nat_in {{
    type nat hook prerouting priority dstnat - 1; policy accept;
    dnat ip to ip daddr . meta l4proto . th dport map @forwards
}}
chain forward_in {{
    type filter hook forward priority filter - 1; policy accept;
    ct status dnat ip daddr . meta l4proto . th dport @targets accept
}}
chain nat_out {{
    type nat hook postrouting priority srcnat - 1; policy accept;
    iifname {inside} oifname {inside} ct status dnat \
        ip daddr . meta l4proto . th dport @targets masquerade
    oifname != {inside} snat ip to ip saddr . meta l4proto . th sport . ip daddr . th dport \
        map @peers
    oifname != {inside} snat ip to ip saddr . meta l4proto . th sport map @outbound
}}
"""


def _proto(protocol: int) -> str:
    name = PROTOCOL_NAMES.get(protocol)
    if name is None:
        raise ValueError(f"protocol {protocol} cannot be forwarded (tcp or udp only)")
    return name


def _forward_key(forward: Forward) -> ForwardKey:
    return (forward.external_address, forward.protocol, forward.external_port)


def _peer_key(pin: PeerPin) -> PeerKey:
    return (pin.internal_address, pin.protocol, pin.internal_port, pin.remote_address,
            pin.remote_port)


class PortMap:
    """The forwards, filters and pins installed in the table, and the commands to change
    them. Not thread-safe: one event loop drives it."""

    def __init__(self, table: OwnedTable, internal_interface: str) -> None:
        if table.family != FAMILY:
            raise ValueError(f"the PCP table is an {FAMILY} table, not {table.family}")
        self.table = table
        self.internal_interface = internal_interface
        self.forwards: dict[ForwardKey, Forward] = {}
        self.filters: dict[ForwardKey, tuple[RemoteFilter, ...]] = {}
        self.peers: dict[PeerKey, PeerPin] = {}
        self.failures = 0           # transactions that had to be split (a bug to report)
        self.flows_ended = 0
        self._flow_work: FlowWork = {}
        self._conntrack: Conntrack | None = None
        self._conntrack_lock = threading.Lock()

    # --- lifecycle ---------------------------------------------------------------------------
    def install(self) -> None:
        """Create the table empty (replacing what a killed predecessor left)."""
        self.table.create(table_body(self.internal_interface), force=True)
        self.forwards.clear()
        self.filters.clear()
        self.peers.clear()

    def delete(self) -> bool:
        return self.table.delete()

    def close(self) -> None:
        if self._conntrack is not None:
            self._conntrack.close()
            self._conntrack = None

    def __len__(self) -> int:
        return len(self.forwards) + len(self.peers)

    # --- changes -----------------------------------------------------------------------------
    def apply(self, changes: Sequence[Change]) -> list[Change]:
        """Make the changes in one transaction; the changes that could not be made (after
        trying each alone when the transaction failed) are returned and logged."""
        if not changes:
            return []
        plan = _Plan(self)
        for change in changes:
            plan.add(change)
        try:
            if plan.commands:
                self.table.nft.run_json(plan.commands)
        except NftError as exc:
            self.failures += 1
            log.warning("nftables: %d PCP changes in one transaction failed (%s); trying each "
                        "alone", len(changes), exc)
            return self._one_by_one(changes)
        plan.commit()
        return []

    def _one_by_one(self, changes: Sequence[Change]) -> list[Change]:
        failed = []
        for change in changes:
            plan = _Plan(self)
            plan.add(change)
            try:
                if plan.commands:
                    self.table.nft.run_json(plan.commands)
            except NftError as exc:
                log.warning("nftables: %s failed: %s", type(change).__name__, exc)
                failed.append(change)
                continue
            plan.commit()
        return failed

    # --- conntrack ---------------------------------------------------------------------------
    def _ct(self) -> Conntrack:
        with self._conntrack_lock:  # the loop and a worker thread may both ask first
            if self._conntrack is None:
                self._conntrack = Conntrack(self.table.nft.netns)
            return self._conntrack

    def _queue_flows(self, ended: Sequence[Forward], stale_udp: Sequence[Forward]) -> None:
        for forwards, slot in ((ended, 0), (stale_udp, 1)):
            for forward in forwards:
                key = (forward.protocol, forward.external_address)
                self._flow_work.setdefault(key, (set(), set()))[slot].add(forward.external_port)

    @property
    def flow_work_queued(self) -> bool:
        return bool(self._flow_work)

    def take_flow_work(self) -> FlowWork:
        """The conntrack work queued since the last call; forwards made again meanwhile are
        left out (their new flows must live)."""
        work, self._flow_work = self._flow_work, {}
        for (protocol, address), (ended, _stale) in work.items():
            ended -= {port for port in ended if (address, protocol, port) in self.forwards}
        return {key: sets for key, sets in work.items() if sets[0] or sets[1]}

    def end_flows(self, work: FlowWork) -> int:
        """Delete the conntrack entries `work` names (safe on a worker thread: it touches
        conntrack only); how many. Failures are logged: the forwards stand regardless."""
        ended_now = 0
        try:
            ct = self._ct()
            for (protocol, address), (ended, stale) in work.items():
                doomed = [entry for entry in ct.entries(ConntrackFilter(
                    proto=protocol, orig_dst=str(address)))
                    if entry.orig.dport in ended
                    or (entry.orig.dport in stale and not entry.dnat)]
                if doomed:
                    ended_now += ct.delete_many(doomed)
        except (NetError, ValueError) as exc:
            log.warning("conntrack: cannot end the flows of changed PCP forwards: %s", exc)
        self.flows_ended += ended_now
        return ended_now

    def lookup_flow(self, lookup: LookupFlow) -> tuple[ipaddress.IPv4Address, int] | None:
        """The external address and port the kernel gave the outbound flow, or None if it
        tracks no such flow or does not translate it."""
        entries = self._ct().entries(ConntrackFilter(
            proto=lookup.protocol, orig_src=str(lookup.internal_address),
            orig_dst=str(lookup.remote_address), orig_sport=lookup.internal_port,
            orig_dport=lookup.remote_port))
        for entry in entries:
            reply = entry.reply
            if entry.snat and reply.dport is not None:
                return ipaddress.IPv4Address(reply.dst), reply.dport
        return None


class _Overlay(dict[Any, Any]):
    """Changes to one of the portmap's dicts, applied on commit (copying a dict of 10,000
    forwards per transaction would make the cost grow with the table)."""

    GONE = object()

    def __init__(self, base: dict[Any, Any]) -> None:
        super().__init__()
        self.base = base

    def look(self, key: Any) -> Any:
        value = self[key] if key in self else self.base.get(key)
        return None if value is self.GONE else value

    def put(self, key: Any, value: Any) -> None:
        self[key] = self.GONE if value is None else value

    def commit(self) -> None:
        for key, value in self.items():
            if value is self.GONE:
                self.base.pop(key, None)
            else:
                self.base[key] = value


class _Plan:
    """The JSON commands of a set of changes, checked against what the table holds (so a
    transaction never adds twice or deletes what is not there), and the bookkeeping to do
    once it succeeded."""

    def __init__(self, portmap: PortMap) -> None:
        self.portmap = portmap
        self.commands: list[dict[str, Any]] = []
        self.forwards = _Overlay(portmap.forwards)
        self.filters = _Overlay(portmap.filters)
        self.peers = _Overlay(portmap.peers)
        self.ended: list[Forward] = []
        self.stale_udp: list[Forward] = []

    def _element(self, verb: str, name: str, elements: list[Any]) -> None:
        if elements:
            table = self.portmap.table
            self.commands.append({verb: {"element": {
                "family": FAMILY, "table": table.name, "name": name, "elem": elements}}})

    def add(self, change: Change) -> None:
        if isinstance(change, AddForward):
            self._add_forward(change.forward, change.filters)
        elif isinstance(change, RemoveForward):
            self._remove_forward(change.forward, change.reset_flows)
        elif isinstance(change, SetFilters):
            self._set_filters(change.forward, change.filters)
        elif isinstance(change, AddPeer):
            key = _peer_key(change.pin)
            old = self.peers.look(key)
            if old == change.pin:
                return
            if old is not None:
                self._element("delete", "peers", [self._peer_elem(old)[0]])
            self._element("add", "peers", [self._peer_elem(change.pin)])
            self.peers.put(key, change.pin)
        elif isinstance(change, RemovePeer):
            key = _peer_key(change.pin)
            pin = self.peers.look(key)
            if pin is not None:
                self._element("delete", "peers", [self._peer_elem(pin)[0]])
                self.peers.put(key, None)

    @staticmethod
    def _peer_elem(pin: PeerPin) -> list[Any]:
        return [concat(str(pin.internal_address), _proto(pin.protocol), pin.internal_port,
                       str(pin.remote_address), pin.remote_port),
                concat(str(pin.external_address), pin.external_port)]

    def _add_forward(self, forward: Forward, filters: tuple[RemoteFilter, ...]) -> None:
        key = _forward_key(forward)
        old = self.forwards.look(key)
        if old == forward:
            self._set_filters(forward, filters)
            return
        if old is not None:
            self._remove_forward(old, False)
        proto = _proto(forward.protocol)
        ext = str(forward.external_address)
        internal = str(forward.internal_address)
        self._element("add", "forwards", [[concat(ext, proto, forward.external_port),
                                           concat(internal, forward.internal_port)]])
        self._element("add", "targets", [concat(internal, proto, forward.internal_port)])
        self._element("add", "outbound", [[concat(internal, proto, forward.internal_port),
                                           concat(ext, forward.external_port)]])
        self.forwards.put(key, forward)
        self._set_filters(forward, filters)
        if forward.protocol == 17:
            self.stale_udp.append(forward)

    def _remove_forward(self, forward: Forward, reset_flows: bool) -> None:
        key = _forward_key(forward)
        installed = self.forwards.look(key)
        if installed is None:
            return
        self.forwards.put(key, None)
        self._set_filters(installed, ())
        proto = _proto(installed.protocol)
        internal = str(installed.internal_address)
        self._element("delete", "forwards", [concat(str(installed.external_address), proto,
                                                    installed.external_port)])
        self._element("delete", "targets", [concat(internal, proto, installed.internal_port)])
        self._element("delete", "outbound", [concat(internal, proto, installed.internal_port)])
        if reset_flows:
            self.ended.append(installed)

    def _set_filters(self, forward: Forward, filters: tuple[RemoteFilter, ...]) -> None:
        key = _forward_key(forward)
        old = self.filters.look(key) or ()
        if old == filters:
            return
        proto = _proto(forward.protocol)
        ext = str(forward.external_address)
        head = concat(ext, proto, forward.external_port)

        def allowed(item: RemoteFilter) -> Any:
            network = {"prefix": {"addr": str(item.network.network_address),
                                  "len": item.network.prefixlen}}
            ports: Any = item.port if item.port else {"range": [0, 65535]}
            return concat(ext, proto, forward.external_port, network, ports)

        gone = [f for f in old if f not in filters]
        new = [f for f in filters if f not in old]
        if old and not filters:
            self._element("delete", "filtered", [head])
        self._element("delete", "allowed", [allowed(f) for f in gone])
        self._element("add", "allowed", [allowed(f) for f in new])
        if filters and not old:
            self._element("add", "filtered", [head])
        self.filters.put(key, filters or None)

    def commit(self) -> None:
        for overlay in (self.forwards, self.filters, self.peers):
            overlay.commit()
        self.portmap._queue_flows(self.ended, self.stale_udp)
