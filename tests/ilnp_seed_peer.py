#!/usr/bin/env python3
"""A reference peer of the seed ILNP overlay, written from the seed's description alone (stdlib
only, no ipshift import): it stands for the original implementation in the namespace tests.

One node: UDP port 10000 on every node; each locator L is the multicast group
ff12:0:<uid mod 65536>:0:<L>, joined on one interface; the locator a datagram arrived on is
the low 64 bits of its destination group (IPV6_PKTINFO). 40-byte header (version 0, payload
length, next header 42 STP / 43 discovery / 44 locator update, hop limit, source locator and
NID, destination locator and NID). Routing by backwards learning (source locator -> arrival
locator, 30 s); unicast goes out on the destination's group if joined, else on the learned
route's, else on the primary locator. Discovery on every joined locator to ff02:0:0:1 / NID 0;
solicitations at start and every U(wait/2, wait); every solicitation answered on all locators;
routers flood it (hop limit - 1); entries live 3 x wait. A move (schedule-driven, soft handoff)
sends an LU advertisement to every neighbour, retried 3 times at 1 s until acked; acks go to
the first advertised locator.

Prints one JSON line per event on stdout: ready, discovered, expired, moved, left, lu_sent,
lu_acked, lu_failed, lu_received, received (with `seq` for a --send-to stream), stream_done.

    ilnp_seed_peer.py --interface eth0 --hostname mn --nid 1111 --locators 2001:db8:0:1 \\
        --move-schedule "2001:db8:0:2;2001:db8:0:1" --move-time 2 --handoff-time 1 \\
        --send-to cn:7000 --rate 100 --count 1000
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import random
import select
import socket
import struct
import sys
import tempfile
import time
from typing import Any

NH_STP, NH_DISC, NH_LU = 42, 43, 44
ALL_NODES = 0xFF02000000000001
HDR = struct.Struct("!IHBBQQQQ")
ROUTE_LIFE, LU_RETRIES, LU_INTERVAL = 30.0, 3, 1.0
IPV6_MULTICAST_ALL = 29


def parse_loc(text: str) -> int:
    """'2001:db8:0:1' (four hex groups, '::' allowed) -> the 64-bit locator."""
    head, _, tail = text.strip().partition("::")
    left, right = [g for g in head.split(":") if g], [g for g in tail.split(":") if g]
    groups = left + ["0"] * (4 - len(left) - len(right)) + right
    if len(groups) != 4 or not all(1 <= len(g) <= 4 for g in groups):
        raise ValueError(f"bad locator {text!r}: four hex groups, e.g. 2001:db8:0:1")
    return int("".join(g.zfill(4) for g in groups), 16)


def loc_text(value: int) -> str:
    return ":".join(f"{(value >> s) & 0xFFFF:x}" for s in (48, 32, 16, 0))


def group(locator: int, uid: int) -> str:
    return str(ipaddress.IPv6Address((0xFF12 << 112) | ((uid % 65536) << 80) | locator))


def emit(event: str, **fields: object) -> None:
    print(json.dumps({"t": round(time.monotonic(), 4), "event": event, **fields}), flush=True)


def own_addresses(ifname: str) -> set[str]:
    found = set()
    with open("/proc/net/if_inet6") as f:
        for line in f:
            parts = line.split()
            if parts[-1] == ifname:
                found.add(str(ipaddress.IPv6Address(bytes.fromhex(parts[0]))))
    return found


class Peer:
    def __init__(self, a: argparse.Namespace) -> None:
        self.a, self.nid, self.uid = a, int(a.nid, 16), os.getuid() % 65536
        self.ifindex = socket.if_nametoindex(a.interface)
        self.own = own_addresses(a.interface)
        s = self.sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.setsockopt(socket.IPPROTO_IPV6, IPV6_MULTICAST_ALL, 0)
        except OSError:
            pass
        s.bind(("::", a.port))
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_RECVPKTINFO, 1)
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_IF, self.ifindex)
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_LOOP, 1)  # as the seed did
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_HOPS, 1)
        self.joined: list[int] = []
        self.current = [parse_loc(x) for x in a.locators.split(",") if x]
        self.leaving: dict[int, float] = {}
        self.neigh: dict[int, dict[str, Any]] = {}      # nid -> {"host", "locs": {loc: expiry}}
        self.routes: dict[int, tuple[int, float]] = {}   # locator -> (via, expiry)
        self.pending: dict[int, list[Any]] = {}   # nid -> [locators, first, next_at, sent]
        self.answered: dict[int, float] = {}
        self.ports = set(a.listen)
        self.proxy_map: dict[int, tuple[str, int]] = {}  # client UDP port -> (host, port)
        self.udp = self.unix = None
        if a.udp_proxy is not None:  # loopback only (the seed bound every interface)
            self.udp = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
            self.udp.bind(("::1", a.udp_proxy))
            path = a.unix or os.path.join(tempfile.gettempdir(), f"ilnp-seed-{a.hostname}.sock")
            if os.path.exists(path):
                os.unlink(path)
            self.unix = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            self.unix.bind(path)
        self.schedule = [[parse_loc(x) for x in s.split(",") if x]
                         for s in (a.move_schedule or "").split(";") if s]
        self.moves = 0
        for loc in self.current:
            self.join(loc)

    # --- membership and sending -------------------------------------------------------------
    def mreq(self, loc: int) -> bytes:
        return socket.inet_pton(socket.AF_INET6, group(loc, self.uid)) + struct.pack("@I",
                                                                                    self.ifindex)

    def join(self, loc: int) -> None:
        self.sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_JOIN_GROUP, self.mreq(loc))
        self.joined.append(loc)

    def leave(self, loc: int) -> None:
        self.sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_LEAVE_GROUP, self.mreq(loc))
        self.joined.remove(loc)
        self.routes = {d: r for d, r in self.routes.items() if r[0] != loc}
        emit("left", locator=loc_text(loc))

    def send(self, via: int, nh: int, hl: int, sl: int, sn: int, dl: int, dn: int,
             body: bytes) -> None:
        data = HDR.pack(0, len(body), nh, hl, sl, sn, dl, dn) + body
        self.sock.sendto(data, (group(via, self.uid), self.a.port, 0, self.ifindex))

    def unicast(self, nh: int, body: bytes, dl: int, dn: int, now: float) -> None:
        via = self.next_hop(dl, now)
        if via is None:
            via = next((x for x in self.current if x in self.joined), self.joined[0])
        self.send(via, nh, self.a.hop_limit, via, self.nid, dl, dn, body)

    def next_hop(self, dl: int, now: float) -> int | None:
        if dl in self.joined:
            return dl
        route = self.routes.get(dl)
        return route[0] if route and route[1] > now and route[0] in self.joined else None

    def discover(self, solicit: bool) -> None:
        for loc in self.joined:
            body = struct.pack("!QQB", self.nid, loc, int(solicit)) + self.a.hostname.encode()
            self.send(loc, NH_DISC, self.a.hop_limit, loc, self.nid, ALL_NODES, 0, body)

    def host_of(self, nid: int) -> str:
        return self.neigh.get(nid, {}).get("host") or f"{nid:x}"

    def nid_of(self, host: str) -> int | None:
        return next((n for n, e in self.neigh.items() if e["host"] == host and e["locs"]), None)

    def send_lu(self, nid: int, locs: list[int], now: float) -> None:
        dl = next(iter(self.neigh[nid]["locs"]))
        self.unicast(NH_LU, b"\x01" + b"".join(struct.pack("!Q", x) for x in locs), dl, nid, now)
        emit("lu_sent", to=self.host_of(nid), locator=loc_text(dl))

    # --- receiving --------------------------------------------------------------------------
    def on_datagram(self, data: bytes, src: str, dst: bytes, now: float) -> None:
        if src.split("%")[0] in self.own:
            return
        d = int.from_bytes(dst, "big")
        arrival = d & ((1 << 64) - 1)
        if d >> 64 != (0xFF12 << 48) | (self.uid << 16) or arrival not in self.joined:
            return
        if len(data) < HDR.size:
            return
        ver, length, nh, hl, sl, sn, dl, dn = HDR.unpack_from(data)
        body = data[HDR.size:]
        if ver >> 28 or length != len(body) or sn == self.nid:
            return
        if sl not in self.joined:
            self.routes[sl] = (arrival, now + ROUTE_LIFE)
        if nh == NH_DISC and len(body) >= 17:
            nid, loc, kind = struct.unpack_from("!QQB", body)
            host = body[17:].decode(errors="replace")
            if nid not in self.neigh:
                emit("discovered", host=host, nid=f"{nid:x}", locator=loc_text(loc))
                self.neigh[nid] = {"host": host, "locs": {}}
            self.neigh[nid]["host"] = host
            self.neigh[nid]["locs"][loc] = now + 3 * self.a.wait
            if kind == 1 and now - self.answered.get(nid, -1e9) >= 1.0:
                self.answered[nid] = now
                self.discover(False)
            if self.a.router and hl > 1:
                for loc in self.joined:
                    if loc != arrival:
                        self.send(loc, nh, hl - 1, sl, sn, dl, dn, body)
        elif nh in (NH_STP, NH_LU) and dn == self.nid:
            if nh == NH_STP and len(body) >= 4:
                sport, dport = struct.unpack_from("!HH", body)
                self.on_stp(sn, sport, dport, body[4:])
            elif nh == NH_LU and body == b"\x00":
                pending = self.pending.pop(sn, None)
                if pending:
                    emit("lu_acked", host=self.host_of(sn),
                         rtt_ms=round((now - pending[1]) * 1000, 3))
            elif nh == NH_LU and body[:1] == b"\x01" and (len(body) - 1) % 8 == 0:
                locs = [struct.unpack_from("!Q", body, 1 + 8 * i)[0]
                        for i in range((len(body) - 1) // 8)]
                entry = self.neigh.setdefault(sn, {"host": "", "locs": {}})
                entry["locs"] = {x: now + 3 * self.a.wait for x in locs}
                emit("lu_received", host=self.host_of(sn), locators=[loc_text(x) for x in locs])
                self.unicast(NH_LU, b"\x00", locs[0] if locs else sl, sn, now)
        elif nh in (NH_STP, NH_LU) and self.a.router and dl != arrival and hl > 1:
            via = self.next_hop(dl, now)
            if via is not None and via != arrival:
                self.send(via, nh, hl - 1, sl, sn, dl, dn, body)

    def on_stp(self, sn: int, sport: int, dport: int, payload: bytes) -> None:
        if dport in self.proxy_map and self.udp is not None:
            self.udp.sendto(payload, ("::1", dport))
        elif dport in self.ports:
            fields: dict[str, object] = {"host": self.host_of(sn), "port": dport,
                                         "from_port": sport}
            if payload.startswith(b"seq "):
                fields["seq"] = int(payload[4:])
            else:
                fields["len"] = len(payload)
            emit("received", **fields)

    def send_stp(self, sport: int, host: str, dport: int, payload: bytes, now: float) -> bool:
        nid = self.nid_of(host)
        if nid is None:
            return False
        dl = next(iter(self.neigh[nid]["locs"]))
        self.unicast(NH_STP, struct.pack("!HH", sport, dport) + payload, dl, nid, now)
        return True

    # --- time -------------------------------------------------------------------------------
    def move(self, now: float) -> None:
        new = self.schedule[self.moves % len(self.schedule)]
        self.moves += 1
        self.current = list(new)
        for loc in new:
            self.leaving.pop(loc, None)
            if loc not in self.joined:
                self.join(loc)
        emit("moved", locators=[loc_text(x) for x in new], move=self.moves)
        for nid, entry in self.neigh.items():
            if entry["locs"]:
                self.pending[nid] = [list(new), now, now + LU_INTERVAL, 1]
                self.send_lu(nid, new, now)
        for loc in self.joined:
            if loc not in new and loc not in self.leaving:
                self.leaving[loc] = now + self.a.handoff_time

    def tick(self, now: float) -> None:
        for loc, at in list(self.leaving.items()):
            if at <= now:
                del self.leaving[loc]
                self.leave(loc)
        for nid, p in list(self.pending.items()):
            if p[2] <= now:
                if p[3] > LU_RETRIES or not self.neigh.get(nid, {}).get("locs"):
                    del self.pending[nid]
                    emit("lu_failed", host=self.host_of(nid))
                else:
                    p[2], p[3] = now + LU_INTERVAL, p[3] + 1
                    self.send_lu(nid, p[0], now)
        for nid, entry in list(self.neigh.items()):
            entry["locs"] = {x: t for x, t in entry["locs"].items() if t > now}
            if not entry["locs"]:
                del self.neigh[nid]
                emit("expired", host=entry["host"])

    def run(self) -> None:
        a, start = self.a, time.monotonic()
        next_solicit, next_move = start, start + a.move_time
        host, _, port = (a.send_to or "").rpartition(":")
        sent, stream_start = 0, None
        emit("ready", host=a.hostname, nid=f"{self.nid:x}", group=group(self.current[0], self.uid)
             if self.current else None)
        socks = [s for s in (self.sock, self.udp, self.unix) if s is not None]
        while True:
            now = time.monotonic()
            if now >= next_solicit:
                self.discover(True)
                next_solicit = now + random.uniform(a.wait / 2, a.wait)
            if self.schedule and now >= next_move:
                self.move(now)
                next_move += a.move_time
            self.tick(now)
            if a.send_to and sent < a.count:
                if stream_start is None and self.nid_of(host) is not None:
                    stream_start = now
                while stream_start is not None and sent < a.count and \
                        now >= stream_start + sent / a.rate:
                    if not self.send_stp(int(port), host, int(port), b"seq %d" % sent, now):
                        break
                    sent += 1
                if sent == a.count:
                    emit("stream_done", count=sent, moves=self.moves)
            timeout = 0.01 if a.send_to and sent < a.count else 0.05
            for s in select.select(socks, [], [], timeout)[0]:
                self.readable(s, time.monotonic())

    def readable(self, s: socket.socket, now: float) -> None:
        if s is self.sock:
            data, anc, _flags, src = s.recvmsg(65535, socket.CMSG_SPACE(20))
            for level, kind, value in anc:
                if level == socket.IPPROTO_IPV6 and kind == socket.IPV6_PKTINFO:
                    self.on_datagram(data, src[0], value[:16], now)
        elif s is self.unix:  # "<local_udp_port> <remote_hostname> <remote_port>"
            data, client = s.recvfrom(1024)
            try:
                local, host, remote = data.decode().split()
                self.proxy_map[int(local)] = (host, int(remote))
            except ValueError:
                return
            if client and self.udp is not None:
                s.sendto(str(self.udp.getsockname()[1]).encode(), client)
        elif s is self.udp:
            data, (_addr, sport, *_rest) = s.recvfrom(65535)
            if sport in self.proxy_map:
                host, dport = self.proxy_map[sport]
                self.send_stp(sport, host, dport, data, now)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--interface", required=True)
    p.add_argument("--hostname", required=True)
    p.add_argument("--nid", required=True, help="hex")
    p.add_argument("--locators", required=True, help="L1,L2 (four hex groups each)")
    p.add_argument("--router", action="store_true")
    p.add_argument("--move-schedule", default="", help='"L1;L2;L1,L2": sets cycled')
    p.add_argument("--move-time", type=float, default=20.0)
    p.add_argument("--handoff-time", type=float, default=10.0)
    p.add_argument("--wait", type=float, default=30.0)
    p.add_argument("--hop-limit", type=int, default=3)
    p.add_argument("--udp-proxy", type=int, default=None, metavar="PORT")
    p.add_argument("--unix", default=None, help="the proxy's unix datagram socket path")
    p.add_argument("--listen", type=int, action="append", default=[], metavar="PORT",
                   help="an STP port whose datagrams are reported as `received` events")
    p.add_argument("--send-to", default=None, metavar="HOST:PORT")
    p.add_argument("--rate", type=float, default=100.0)
    p.add_argument("--count", type=int, default=100)
    p.add_argument("--port", type=int, default=10000)
    args = p.parse_args(argv)
    try:
        Peer(args).run()
    except KeyboardInterrupt:
        pass
    except OSError as exc:
        print(f"ilnp_seed_peer: {exc}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
