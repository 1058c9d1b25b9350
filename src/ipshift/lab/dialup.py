"""A dial-on-demand link emulator that behaves like pppd in demand mode (this kernel has no PPP).

Two TUN devices form a point-to-point link: `--dev` (default ppp0) in the namespace this runs in
(the dialing host) and `--isp-dev` in the ISP's namespace; this process carries packets between
them once the link is "up". Like pppd with `demand`:

- the interface is up from the start with a placeholder local address and a default route;
- the first outgoing packet starts "dialing"; packets sent meanwhile are queued (bounded);
- after `--delay` seconds the link gets a fresh address from the ISP pool (a different one on
  every dial), the placeholder is removed, the queued packets are released **with their stale
  source address** (as pppd does), and the ip-up hook runs with pppd's arguments:
  `$1` interface, `$2` tty, `$3` speed, `$4` local address, `$5` remote address, `$6` ipparam;
- with `--rexmit`, as pppd >= 2.4.5 (demand_rexmit): after IPCP it sleeps 1 s, sends the
  queued IPv4 packets itself **with the new source address** (checksums fixed), and only then
  runs ip-up;
- after `--idle` seconds without traffic it hangs up, runs ip-down, and restores the placeholder.

SIGUSR1 hangs up at once; SIGTERM ends the emulator (both TUN devices vanish with it).
Progress is printed on stdout as `dialup: ...` lines that tests and the demo wait for.
"""

from __future__ import annotations

import argparse
import ipaddress
import itertools
import os
import select
import signal
import subprocess
import sys
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from ipshift.net import netns
from ipshift.net.tun import TunDevice, open_tun
from ipshift.packet.rewrite import FlowRewrite

MAX_PACKET = 65535


def _say(text: str) -> None:
    stamp = time.strftime("%H:%M:%S") + f".{int(time.time() * 1000) % 1000:03d}"
    print(f"dialup: {text} [{stamp}]", flush=True)


def _ip(ns: str | None, *args: str) -> None:
    argv = ["ip", *(["-n", ns] if ns else []), *args]
    res = subprocess.run(argv, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {res.stderr.strip()}")


def _ip_batch(ns: str | None, commands: list[str]) -> None:
    """Several `ip` commands in one process: link-up should cost what pppd's ioctls cost."""
    argv = ["ip", *(["-n", ns] if ns else []), "-batch", "-"]
    res = subprocess.run(argv, input="\n".join(commands) + "\n", capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {res.stderr.strip()}")


def address_pool(spec: str) -> Iterator[str]:
    """Cycle through a pool given as FIRST-LAST (v4 or v6); a new address on every dial."""
    first_s, _, last_s = spec.partition("-")
    first = ipaddress.ip_address(first_s)
    last = ipaddress.ip_address(last_s or first_s)
    if first.version != last.version or int(last) < int(first):
        raise ValueError(f"bad address pool {spec!r}: want FIRST-LAST of one family")
    count = int(last) - int(first) + 1
    for i in itertools.cycle(range(count)):
        yield str(ipaddress.ip_address(int(first) + i))


@dataclass
class DialupConfig:
    dev: str = "ppp0"
    isp_ns: str = ""
    isp_dev: str = "ppp-isp"
    placeholder: str = "192.0.2.99"
    remote: str = "203.0.113.1"
    pool: str = "203.0.113.100-203.0.113.199"
    placeholder6: str | None = None
    pool6: str | None = None
    delay: float = 1.0
    idle: float = 0.0  # 0: never hang up by itself
    ip_up: str | None = None
    ip_down: str | None = None
    ipparam: str = ""
    queue: int = 64
    default_route: bool = True
    # pppd >= 2.4.5 in demand mode: after IPCP it sleeps 1 s, then sends the queued IPv4
    # packets again itself with the new source (demand_rexmit), and only then runs ip-up
    rexmit: bool = False


@dataclass
class DialupLink:
    cfg: DialupConfig
    home: TunDevice | None = None
    isp: TunDevice | None = None
    state: str = "down"  # down -> dialing -> up -> down
    local: str | None = None
    local6: str | None = None
    dial_done_at: float = 0.0
    last_traffic: float = 0.0
    queued: deque[bytes] = field(default_factory=deque)
    dropped: int = 0
    dials: int = 0
    rexmit_at: float = 0.0
    _pool: Iterator[str] | None = None
    _pool6: Iterator[str] | None = None
    _hangup_requested: bool = False

    def setup(self) -> None:
        cfg = self.cfg
        self._pool = address_pool(cfg.pool)
        self._pool6 = address_pool(cfg.pool6) if cfg.pool6 else None
        self.home = open_tun(cfg.dev, vnet_hdr=False, offloads=0)
        self.isp = open_tun(cfg.isp_dev, vnet_hdr=False, offloads=0, netns_name=cfg.isp_ns)
        # Addresses with the same peer count as one subnet: without promotion, removing the
        # placeholder (primary) would take the new address (secondary) with it.
        with open(f"/proc/sys/net/ipv4/conf/{cfg.dev}/promote_secondaries", "w") as f:
            f.write("1\n")
        _ip(None, "addr", "add", cfg.placeholder, "peer", cfg.remote, "dev", cfg.dev)
        if cfg.placeholder6:
            _ip(None, "-6", "addr", "add", f"{cfg.placeholder6}/128", "dev", cfg.dev, "nodad")
        _ip(None, "link", "set", cfg.dev, "up")
        if cfg.default_route:
            _ip(None, "route", "replace", "default", "dev", cfg.dev)
            if cfg.placeholder6:
                _ip(None, "-6", "route", "replace", "default", "dev", cfg.dev)
        _ip(cfg.isp_ns, "addr", "add", f"{cfg.remote}/32", "dev", cfg.isp_dev)
        _ip(cfg.isp_ns, "link", "set", cfg.isp_dev, "up")
        _say(f"ready dev={cfg.dev} placeholder={cfg.placeholder} state=down")

    # --- state changes --------------------------------------------------------------------
    def _start_dial(self, now: float) -> None:
        self.state = "dialing"
        self.dial_done_at = now + self.cfg.delay
        _say(f"dialing (first packet seen, link up in {self.cfg.delay:g}s)")

    def _link_up(self, now: float) -> None:
        cfg = self.cfg
        assert self._pool is not None and self.isp is not None
        self.dials += 1
        self.local = next(self._pool)
        # pppd order: the new address first, then the placeholder goes (removing the last address
        # of a device would flush its routes).
        home = [f"addr add {self.local} peer {cfg.remote} dev {cfg.dev}",
                f"addr del {cfg.placeholder} peer {cfg.remote} dev {cfg.dev}"]
        isp = [f"route replace {self.local} dev {cfg.isp_dev}"]
        if self._pool6 is not None and cfg.placeholder6:
            self.local6 = next(self._pool6)
            home += [f"addr add {self.local6}/128 dev {cfg.dev} nodad",
                     f"addr del {cfg.placeholder6}/128 dev {cfg.dev}"]
            isp.append(f"route replace {self.local6} dev {cfg.isp_dev}")
        _ip_batch(None, home)
        _ip_batch(cfg.isp_ns, isp)
        self.last_traffic = now
        if cfg.rexmit:
            # pppd's demand_rexmit: the addresses are set, packets stay queued, 1 s of sleep
            self.state = "rexmit"
            self.rexmit_at = now + 1.0
            _say(f"ipcp local={self.local} remote={cfg.remote}"
                 + (f" local6={self.local6}" if self.local6 else "")
                 + " (pppd's demand_rexmit in 1s)")
            return
        self.state = "up"
        released = len(self.queued)
        while self.queued:
            os.write(self.isp.fd, self.queued.popleft())  # stale source, as pppd sends them
        _say(f"up local={self.local} remote={cfg.remote}"
             + (f" local6={self.local6}" if self.local6 else "")
             + f" released={released} dropped={self.dropped}")
        self._hook(cfg.ip_up)

    def _rexmit(self, now: float) -> None:
        """demand_rexmit(PPP_IP, newip): every queued IPv4 packet gets the new source (IP and
        TCP/UDP checksums fixed, a zero UDP checksum left zero, TTL unchanged) and goes out;
        IPv6 packets go out as they are (IPV6CP calls it without a new address). Then the
        link passes traffic and ip-up runs, as in pppd's ipcp_up."""
        assert self.isp is not None and self.local is not None
        new = ipaddress.ip_address(self.local).packed
        rewritten = 0
        while self.queued:
            packet = bytearray(self.queued.popleft())
            if packet and packet[0] >> 4 == 4 and len(packet) >= 20:
                rewrite = FlowRewrite(src=(bytes(packet[12:16]), new), icmp_errors=False)
                rewritten += rewrite.apply(packet)
            os.write(self.isp.fd, bytes(packet))
        self.state = "up"
        self.last_traffic = now
        _say(f"up local={self.local} remote={self.cfg.remote}"
             + (f" local6={self.local6}" if self.local6 else "")
             + f" rexmit={rewritten} dropped={self.dropped}")
        self._hook(self.cfg.ip_up)

    def hang_up(self) -> None:
        cfg = self.cfg
        if self.state not in ("up", "rexmit"):
            self.state = "down"
            self.queued.clear()
            return
        self._hook(cfg.ip_down)
        _ip(None, "addr", "add", cfg.placeholder, "peer", cfg.remote, "dev", cfg.dev)
        _ip(None, "addr", "del", str(self.local), "peer", cfg.remote, "dev", cfg.dev)
        _ip(cfg.isp_ns, "route", "del", str(self.local), "dev", cfg.isp_dev)
        if self.local6 and cfg.placeholder6:
            _ip(None, "-6", "addr", "add", f"{cfg.placeholder6}/128", "dev", cfg.dev, "nodad")
            _ip(None, "-6", "addr", "del", f"{self.local6}/128", "dev", cfg.dev)
            _ip(cfg.isp_ns, "-6", "route", "del", self.local6, "dev", cfg.isp_dev)
        if cfg.default_route:
            _ip(None, "route", "replace", "default", "dev", cfg.dev)
            if cfg.placeholder6:
                _ip(None, "-6", "route", "replace", "default", "dev", cfg.dev)
        _say(f"down (was local={self.local})")
        self.state = "down"
        self.local = self.local6 = None
        self.dropped = 0

    def _hook(self, script: str | None) -> None:
        if not script:
            return
        cfg = self.cfg
        env = dict(os.environ, IFNAME=cfg.dev, IPLOCAL=str(self.local), IPREMOTE=cfg.remote,
                   IPLOCAL6=self.local6 or "", DEVICE="/dev/net/tun", SPEED="0")
        args = [script, cfg.dev, "/dev/net/tun", "0", str(self.local), cfg.remote, cfg.ipparam]
        # pppd runs its scripts without waiting for them; so do we.
        subprocess.Popen(args, env=env, stdin=subprocess.DEVNULL, start_new_session=True)

    # --- the loop -------------------------------------------------------------------------
    def request_hangup(self) -> None:
        self._hangup_requested = True

    def run(self, stop_at: float | None = None) -> None:
        assert self.home is not None and self.isp is not None
        home_fd, isp_fd = self.home.fd, self.isp.fd
        while stop_at is None or time.monotonic() < stop_at:
            now = time.monotonic()
            if self._hangup_requested:
                self._hangup_requested = False
                self.hang_up()
            timeout = 1.0
            if self.state == "dialing":
                timeout = max(0.0, self.dial_done_at - now)
            elif self.state == "rexmit":
                timeout = max(0.0, self.rexmit_at - now)
            elif self.state == "up" and self.cfg.idle > 0:
                timeout = max(0.0, self.last_traffic + self.cfg.idle - now)
            try:
                readable, _, _ = select.select([home_fd, isp_fd], [], [], min(timeout, 1.0))
            except InterruptedError:
                continue
            now = time.monotonic()
            for fd in readable:
                data = os.read(fd, MAX_PACKET)
                if fd == home_fd:
                    self._from_home(data, now)
                elif self.state in ("up", "rexmit"):
                    os.write(home_fd, data)
                    self.last_traffic = now
            if self.state == "dialing" and now >= self.dial_done_at:
                self._link_up(now)
            elif self.state == "rexmit" and now >= self.rexmit_at:
                self._rexmit(now)
            elif (self.state == "up" and self.cfg.idle > 0
                  and now - self.last_traffic >= self.cfg.idle):
                _say("idle timeout")
                self.hang_up()

    def _from_home(self, data: bytes, now: float) -> None:
        assert self.isp is not None
        if self.state == "up":
            os.write(self.isp.fd, data)
            self.last_traffic = now
            return
        if self.state == "down":
            self._start_dial(now)
        if len(self.queued) < self.cfg.queue:
            self.queued.append(data)
        else:
            self.dropped += 1

    def close(self) -> None:
        for dev in (self.home, self.isp):
            if dev is not None:
                dev.close()


def parse_args(argv: Sequence[str] | None = None) -> DialupConfig:
    p = argparse.ArgumentParser(prog="python -m ipshift.lab.dialup", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dev", default="ppp0")
    p.add_argument("--isp-ns", required=True, help="namespace of the ISP side")
    p.add_argument("--isp-dev", default="ppp-isp")
    p.add_argument("--placeholder", default="192.0.2.99", help="local address before dialing")
    p.add_argument("--remote", default="203.0.113.1", help="the ISP's end of the link")
    p.add_argument("--pool", default="203.0.113.100-203.0.113.199")
    p.add_argument("--placeholder6", help="IPv6 placeholder address (enables IPv6)")
    p.add_argument("--pool6", help="IPv6 pool FIRST-LAST")
    p.add_argument("--delay", type=float, default=1.0, help="seconds from first packet to up")
    p.add_argument("--idle", type=float, default=0.0, help="hang up after idle seconds (0: never)")
    p.add_argument("--ip-up")
    p.add_argument("--ip-down")
    p.add_argument("--ipparam", default="")
    p.add_argument("--queue", type=int, default=64, help="packets kept while dialing")
    p.add_argument("--no-default-route", dest="default_route", action="store_false")
    p.add_argument("--rexmit", action="store_true",
                   help="as pppd >= 2.4.5: after IPCP, sleep 1 s, resend the queued IPv4 "
                        "packets with the new source, then run ip-up")
    a = p.parse_args(argv)
    return DialupConfig(**vars(a))


def main(argv: Sequence[str] | None = None) -> int:
    cfg = parse_args(argv)
    if not netns.exists(cfg.isp_ns):
        print(f"dialup: no namespace {cfg.isp_ns}", file=sys.stderr)
        return 2
    link = DialupLink(cfg)

    def on_term(signum: int, frame: object) -> None:
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGUSR1, lambda s, f: link.request_hangup())
    try:
        link.setup()
        link.run()
    except KeyboardInterrupt:
        pass
    finally:
        link.close()
        _say("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
