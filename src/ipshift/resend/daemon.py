"""The asyncio adapter of resend: feeds the engine from packet sockets and the control socket,
and applies its actions with raw sockets, nftables, conntrack and netlink.

Kernel objects it owns, all removed on exit and on start (reconcile after a kill -9):
- nftables table `inet ipshift_resend_<interface>` holding the per-flow rewrites;
- old addresses it put on `lo`, recorded in the state file next to the control socket.
"""

from __future__ import annotations

import asyncio
import errno as _errno
import json
import logging
import os
import signal
import socket
from pathlib import Path
from typing import Any

from ipshift.ctl import CtlError
from ipshift.ctl.server import CtlServer
from ipshift.net.conntrack import Conntrack
from ipshift.net.errors import NetError
from ipshift.net.netlink import Netlink
from ipshift.net.nft import Nft
from ipshift.net.packetsock import PacketSocket
from ipshift.net.rawsock import RawSocket
from ipshift.resend.engine import (
    Action,
    CheckFlows,
    CycleDone,
    FlowMapping,
    LookupOrigin,
    MapFlow,
    Resend,
    ResendConfig,
    ResendEngine,
    UnmapFlow,
    WakeupError,
)
from ipshift.resend.flows import PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP

log = logging.getLogger("ipshift.resend")

PRIO_INBOUND = -300  # before conntrack (-200): it must see the mapped (old) destination
PRIO_OUTBOUND = 300  # after NAT (100): the source is changed last, conntrack saw the old one
ADDRESS_POLL = 1.0  # seconds between checks that the link's address is still there


def table_name(interface: str) -> str:
    return "ipshift_resend_" + "".join(c if c.isalnum() else "_" for c in interface)


def mapping_rules(m: FlowMapping) -> tuple[str, str]:
    """nft rule bodies (inbound for prerouting, outbound for postrouting) of one mapping."""
    ipk = "ip" if m.version == 4 else "ip6"
    if m.proto in (PROTO_TCP, PROTO_UDP):
        l4 = "tcp" if m.proto == PROTO_TCP else "udp"
        inbound = (f"{ipk} saddr {m.peer} {ipk} daddr {m.outer_addr} "
                   f"{l4} sport {m.peer_port} {l4} dport {m.outer_port} "
                   f"{ipk} daddr set {m.inner_addr}")
        if m.inner_port != m.outer_port:
            inbound += f" {l4} dport set {m.inner_port}"
        outbound = (f"{ipk} saddr {m.inner_addr} {ipk} daddr {m.peer} "
                    f"{l4} sport {m.inner_port} {l4} dport {m.peer_port} "
                    f"{ipk} saddr set {m.outer_addr}")
        if m.inner_port != m.outer_port:
            outbound += f" {l4} sport set {m.outer_port}"
    elif m.proto in (PROTO_ICMP, PROTO_ICMPV6):
        icmp = "icmp" if m.proto == PROTO_ICMP else "icmpv6"
        inbound = (f"{ipk} saddr {m.peer} {ipk} daddr {m.outer_addr} "
                   f"{icmp} type echo-reply {icmp} id {m.outer_port} "
                   f"{ipk} daddr set {m.inner_addr}")
        outbound = (f"{ipk} saddr {m.inner_addr} {ipk} daddr {m.peer} "
                    f"{icmp} type echo-request {icmp} id {m.inner_port} "
                    f"{ipk} saddr set {m.outer_addr}")
        if m.inner_port != m.outer_port:  # masquerading changed the echo identifier
            inbound += f" {icmp} id set {m.inner_port}"
            outbound += f" {icmp} id set {m.outer_port}"
    else:
        raise ValueError(f"no mapping for protocol {m.proto}")
    return inbound, outbound


class ResendDaemon:
    def __init__(
        self,
        config: ResendConfig,
        *,
        outgoing: str,
        snoop: str,
        socket_path: Path,
        netns: str | None = None,
    ) -> None:
        self.config = config
        self.outgoing = outgoing
        self.snoop = snoop
        self.socket_path = socket_path
        self.state_path = socket_path.with_name(socket_path.name + ".state")
        self.netns = netns
        self.table = table_name(outgoing)
        self.engine = ResendEngine(config)
        self._ctl = CtlServer(socket_path, name="ip_resend")
        self._nft: Nft | None = None
        self._lock: socket.socket | None = None  # see _lock_interface
        self._netlink: Netlink | None = None
        self._conntrack: Conntrack | None = None
        self._out_sock: PacketSocket | None = None
        self._in_sock: PacketSocket | None = None
        self._raw: dict[int, RawSocket] = {}
        self._handles: dict[FlowMapping, tuple[int, int]] = {}
        self._lo_users: dict[str, int] = {}  # old address -> mappings that need it local
        self._lo_owned: set[str] = set()  # the ones we put on lo (and will remove)
        self._stop = asyncio.Event()
        self._wake = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self.errors = 0

    # --- lifecycle ------------------------------------------------------------------------
    async def run(self) -> int:
        self._loop = asyncio.get_running_loop()
        self._ctl.method("wakeup", self._on_wakeup)
        self._ctl.method("status", lambda params: self.status())
        try:
            await self._ctl.start()
        except CtlError as exc:
            log.error("%s", exc.message)
            return 2
        try:
            try:
                self._open_kernel()
            except (NetError, OSError) as exc:
                log.error("cannot start on %s: %s", self.outgoing, exc)
                return 1
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                self._loop.add_signal_handler(sig, self.request_stop)
            log.info("ip_resend on %s (snooping %s): armed", self.outgoing, self.snoop)
            await self._main_loop()
            return 0
        finally:
            # The kernel state first: the socket going away tells a successor it may start,
            # and its table must not be deleted by us after that.
            self._close_kernel()
            await self._ctl.close()

    def request_stop(self) -> None:
        self._stop.set()
        self._wake.set()

    def _open_kernel(self) -> None:
        self._netlink = Netlink(self.netns)
        self._netlink.index(self.outgoing)  # fails clearly if the interface does not exist
        self._lock_interface()
        self._nft = Nft(self.netns)
        self._reconcile()
        self._nft.run(
            f"add table inet {self.table}\n"
            f"add chain inet {self.table} inbound {{ type filter hook prerouting priority "
            f"{PRIO_INBOUND}; policy accept; }}\n"
            f"add chain inet {self.table} outbound {{ type filter hook postrouting priority "
            f"{PRIO_OUTBOUND}; policy accept; }}\n"
        )
        self._conntrack = Conntrack(self.netns)
        self._update_sockets()

    def _lock_interface(self) -> None:
        """One instance per interface and namespace, whatever its control socket: the nftables
        table is named after the interface, and a second instance would take it over. The
        lock is an abstract unix socket name: no file, and released by the kernel however
        the holder ends."""
        ns = f"/run/netns/{self.netns}" if self.netns else "/proc/self/ns/net"
        lock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        try:
            lock.bind(f"\0ipshift-resend-{os.stat(ns).st_ino}-{self.table}")
        except OSError as exc:
            lock.close()
            if exc.errno != _errno.EADDRINUSE:
                raise
            raise OSError(_errno.EBUSY, f"another ip_resend already runs on {self.outgoing} "
                                        "(with another control socket)") from None
        self._lock = lock

    def _reconcile(self) -> None:
        """Remove what an earlier instance on this interface left (killed before cleaning)."""
        assert self._nft is not None and self._netlink is not None
        if self._nft.delete_table("inet", self.table):
            log.info("removed a stale nftables table %s", self.table)
        try:
            stale = json.loads(self.state_path.read_text()).get("lo_addresses", [])
        except (OSError, ValueError, AttributeError):
            stale = []
        for addr in stale:
            self._del_lo(str(addr))
        self.state_path.unlink(missing_ok=True)

    def _close_kernel(self) -> None:
        for sock in (self._out_sock, self._in_sock, *self._raw.values()):
            if sock is not None:
                sock.close()
        self._out_sock = self._in_sock = None
        self._raw.clear()
        if self._nft is not None:
            try:
                self._nft.delete_table("inet", self.table)
            except NetError as exc:
                log.warning("removing nftables table %s: %s", self.table, exc)
            self._nft.close()
        for addr in list(self._lo_owned):
            self._del_lo(addr)
        self._lo_owned.clear()
        self._lo_users.clear()
        self.state_path.unlink(missing_ok=True)
        for handle in (self._conntrack, self._netlink):
            if handle is not None:
                handle.close()
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    # --- the loop -------------------------------------------------------------------------
    async def _main_loop(self) -> None:
        assert self._loop is not None
        next_poll = 0.0
        while not self._stop.is_set():
            now = self._loop.time()
            timer = self.engine.next_timer()
            if timer is not None and timer <= now:
                self.engine.handle_timer(now)
                self._pump()
                continue
            if self.engine.link_addresses and now >= next_poll:
                self._poll_addresses(now)
                next_poll = now + ADDRESS_POLL
            wait = 3600.0 if timer is None else timer - now
            if self.engine.link_addresses:
                wait = min(wait, max(0.0, next_poll - now))
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=max(wait, 0.0))
            except TimeoutError:
                pass

    def _pump(self) -> None:
        """Apply the engine's actions (which may produce more) and adjust the sockets."""
        for _ in range(100):  # actions answered synchronously can create more; bounded
            actions = self.engine.actions()
            if not actions:
                break
            for action in actions:
                try:
                    self._apply(action)
                except (NetError, OSError, ValueError) as exc:
                    self.errors += 1
                    log.error("%s failed: %s", type(action).__name__, exc)
        self._update_sockets()
        if self.engine.state == "done" or self.engine.terminate:
            self._stop.set()
        self._wake.set()  # the loop re-reads the timer (and the stop flag)

    def _apply(self, action: Action) -> None:
        if isinstance(action, LookupOrigin):
            self._lookup_origin(action)
        elif isinstance(action, MapFlow):
            self._map(action.mapping)
        elif isinstance(action, UnmapFlow):
            self._unmap(action.mapping)
        elif isinstance(action, Resend):
            self._raw_socket(action.version).send(action.data)
        elif isinstance(action, CheckFlows):
            self._check_flows(action)
        elif isinstance(action, CycleDone):
            log.info("cycle done: %s", action.reason)

    # --- packets --------------------------------------------------------------------------
    def _update_sockets(self) -> None:
        """Read only what the state needs: outgoing packets while capturing, incoming ones from
        the first capture until the replies are in; a busy link costs nothing the rest of the
        time."""
        assert self._loop is not None
        want_out = self.engine.state in ("armed", "captured")
        # open for replies before the wakeup (they can arrive right after the resend) and
        # while UDP/ICMP mappings linger; closed while only TCP mappings remain
        want_in = self.engine.wants_replies
        if want_out and self._out_sock is None:
            self._out_sock = PacketSocket(self.snoop, netns=self.netns, direction="out")
            self._loop.add_reader(self._out_sock.fileno(), self._read, self._out_sock, True)
        elif not want_out and self._out_sock is not None:
            self._loop.remove_reader(self._out_sock.fileno())
            self._out_sock.close()
            self._out_sock = None
        if want_in and self._in_sock is None:
            self._in_sock = PacketSocket(self.outgoing, netns=self.netns, direction="in")
            self._loop.add_reader(self._in_sock.fileno(), self._read, self._in_sock, False)
        elif not want_in and self._in_sock is not None:
            self._loop.remove_reader(self._in_sock.fileno())
            self._in_sock.close()
            self._in_sock = None

    def _read(self, sock: PacketSocket, outgoing: bool) -> None:
        assert self._loop is not None
        now = self._loop.time()
        try:
            batch = sock.recv_batch(64)
        except NetError as exc:
            self.errors += 1
            log.warning("%s", exc)
            return
        for pkt in batch:
            if outgoing:
                self.engine.packet_out(pkt.data, now)
            else:
                self.engine.packet_in(pkt.data, now)
        self._pump()

    def _raw_socket(self, version: int) -> RawSocket:
        sock = self._raw.get(version)
        if sock is None:
            family = socket.AF_INET if version == 4 else socket.AF_INET6
            sock = RawSocket(family, socket.IPPROTO_RAW, netns=self.netns, device=self.outgoing)
            self._raw[version] = sock
        return sock

    # --- control --------------------------------------------------------------------------
    def _on_wakeup(self, params: dict[str, Any]) -> str:
        assert self._loop is not None
        message = params.get("message")
        if not isinstance(message, str):
            raise CtlError("bad-request", "wakeup needs a string 'message'")
        try:
            answer = self.engine.wakeup(message, self._loop.time())
        except WakeupError as exc:
            log.warning("wakeup message refused: %s", exc)
            raise CtlError("bad-message", str(exc)) from exc
        self._pump()
        return answer

    def status(self) -> dict[str, Any]:
        doc = self.engine.status()
        doc.update({
            "interface": self.outgoing,
            "snoop": self.snoop,
            "socket": str(self.socket_path),
            "persistent": self.config.persistent,
            "lo_addresses": sorted(self._lo_owned),
            "errors": self.errors,
        })
        return doc

    # --- kernel state ---------------------------------------------------------------------
    def _lookup_origin(self, action: LookupOrigin) -> None:
        assert self._conntrack is not None
        flow = action.flow
        entries = self._conntrack.entries(reply_src=flow.remote, reply_dst=flow.local,
                                          proto=flow.proto)
        for entry in entries:
            r = entry.reply
            if flow.proto in (PROTO_TCP, PROTO_UDP):
                if (r.sport, r.dport) != (flow.remote_port, flow.local_port):
                    continue
                origin = (entry.orig.src, entry.orig.sport)
            elif r.icmp_id == flow.local_port:
                origin = (entry.orig.src, entry.orig.icmp_id)
            else:
                continue
            if origin[0] != flow.local and origin[1] is not None:
                log.info("%s was masqueraded from %s:%s", flow, origin[0], origin[1])
                self.engine.origin_found(flow, origin[0], int(origin[1]))
                return
            break
        # Not masqueraded: this host's own packet, or one routed from a network behind it,
        # whose replies do not depend on the link's address.
        assert self._netlink is not None
        try:
            local = {a.address for a in self._netlink.addresses()}
        except NetError as exc:
            log.warning("cannot list local addresses: %s", exc)
            return
        if flow.local not in local:
            log.info("%s comes from a routed network, not from this host: not resent", flow)
            self.engine.foreign_source(flow)

    def _map(self, m: FlowMapping) -> None:
        assert self._nft is not None and self._conntrack is not None
        if m.keep_inner_local:
            self._add_lo(m.inner_addr)
        else:
            # A masqueraded flow: its old entry (LAN host -> peer, translated to the old address)
            # may outlive the address. Left in place, the mapped reply would clash with it and
            # conntrack would remap the reply's port; the LAN host's resolver drops that.
            stale = self._conntrack.delete_matching(
                orig_src=m.inner_addr, orig_dst=m.peer, proto=m.proto,
                orig_sport=m.inner_port, orig_dport=m.peer_port,
            )
            if stale:
                log.info("dropped %d stale masquerade entr%s of %s:%d", stale,
                         "y" if stale == 1 else "ies", m.inner_addr, m.inner_port)
        inbound, outbound = mapping_rules(m)
        handles = []
        for chain, body in (("inbound", inbound), ("outbound", outbound)):
            out = self._nft.run(f"add rule inet {self.table} {chain} {body}", echo=True)
            handles.append(_handle_of(out))
        self._handles[m] = (handles[0], handles[1])
        log.info("mapped %s: replies to %s:%d go to %s:%d", m.peer, m.outer_addr, m.outer_port,
                 m.inner_addr, m.inner_port)

    def _unmap(self, m: FlowMapping) -> None:
        assert self._nft is not None
        handles = self._handles.pop(m, None)
        if handles is not None:
            for chain, handle in zip(("inbound", "outbound"), handles, strict=True):
                try:
                    self._nft.run(f"delete rule inet {self.table} {chain} handle {handle}")
                except NetError as exc:
                    log.warning("removing rule %d: %s", handle, exc)
        if m.keep_inner_local:
            self._release_lo(m.inner_addr)

    def _check_flows(self, action: CheckFlows) -> None:
        assert self._conntrack is not None and self._loop is not None
        gone = []
        for m in action.mappings:
            alive = self._conntrack.entries(orig_src=m.inner_addr, orig_dst=m.peer, proto=m.proto,
                                            orig_sport=m.inner_port, orig_dport=m.peer_port)
            if not alive:
                gone.append(m)
        if gone:
            self.engine.flows_gone(gone, self._loop.time())

    def _poll_addresses(self, now: float) -> None:
        assert self._netlink is not None
        try:
            present = {a.address for a in self._netlink.addresses(self.outgoing)}
        except NetError:
            present = set()  # the interface itself is gone: so are its addresses
        for addr in list(self.engine.link_addresses):
            if addr not in present:
                self.engine.address_lost(addr, now)
        self._pump()

    def _add_lo(self, addr: str) -> None:
        """Keep `addr` local while mappings need it; only addresses we added are removed."""
        assert self._netlink is not None
        if self._lo_users.get(addr, 0) == 0 and addr not in self._lo_owned:
            local = {a.address for a in self._netlink.addresses()}
            if addr not in local:
                prefix = 32 if ":" not in addr else 128
                self._netlink.add_address("lo", f"{addr}/{prefix}", nodad=True)
                self._lo_owned.add(addr)
                self._save_state()
                log.info("keeping old address %s on lo while its flows are mapped", addr)
        self._lo_users[addr] = self._lo_users.get(addr, 0) + 1

    def _release_lo(self, addr: str) -> None:
        users = self._lo_users.get(addr, 0) - 1
        if users > 0:
            self._lo_users[addr] = users
            return
        self._lo_users.pop(addr, None)
        if addr in self._lo_owned:
            self._lo_owned.discard(addr)
            self._del_lo(addr)
            self._save_state()

    def _del_lo(self, addr: str) -> None:
        if self._netlink is None:
            return
        prefix = 32 if ":" not in addr else 128
        try:
            self._netlink.del_address("lo", f"{addr}/{prefix}")
        except NetError:
            pass  # already gone

    def _save_state(self) -> None:
        owned = sorted(self._lo_owned)
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"lo_addresses": owned}))
        tmp.replace(self.state_path)


def _handle_of(echo_output: str) -> int:
    """The handle of the rule an `add rule` with echo created (JSON output)."""
    doc = json.loads(echo_output)
    for item in doc.get("nftables", []):
        rule = item.get("add", {}).get("rule") or item.get("rule")
        if rule and "handle" in rule:
            return int(rule["handle"])
    raise ValueError("nft did not report the new rule's handle")


def run_daemon(config: ResendConfig, *, outgoing: str, snoop: str, socket: Path,
               netns: str | None = None) -> int:
    daemon = ResendDaemon(config, outgoing=outgoing, snoop=snoop, socket_path=socket,
                          netns=netns)
    return asyncio.run(daemon.run())
