"""The UDP proxy's asyncio adapters (runtime Services) for its two overlays.

Both serve the seed's application interface around one `ProxyCore` (ilnp/proxy.py):

- the proxy's UDP socket, bound to 127.0.0.1 only (never every interface), and
- a unix datagram socket for mappings ("<local_udp_port> <remote_hostname> <remote_port>",
  answered with the proxy's UDP port in ASCII, or "error: <reason>"), created 0600 in a
  private directory (default /run/ipshift/ilnp-proxy-<port>.sock), so only its owner (root)
  can add mappings.

`SeedNodeService` (component "ilnp-seed", `ipshift ilnp seed-node CONFIG [PROXY_PORT]`) runs a
`SeedNode` over the seed's multicast groups itself and carries the proxy's datagrams as STP;
without a proxy port it is the node alone (e.g. a router). `TunProxyService` (component
"ilnp-proxy", `ipshift ilnp proxy PROXY_PORT`) sends each datagram with a 4-byte port header
to the remote's application address, which the node daemon routes into its TUN device; the
remote's name is resolved once, when the mapping is made, by an injectable resolver (by
default the node daemon's `resolve` method on its control socket).

The seed node's configuration is an INI file with the seed's keys (`load_seed_config`).
"""

from __future__ import annotations

import asyncio
import configparser
import contextlib
import ipaddress
import logging
import math
import os
import re
import socket
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ipshift.ctl.protocol import CtlError, socket_path
from ipshift.ctl.server import prepare_socket_path
from ipshift.daemon import (
    EnginePump,
    Metric,
    Runtime,
    StartError,
    counter,
    gauge,
)
from ipshift.ilnp.compat import Deliver, Join, Leave, Log, Multicast, SeedConfig, SeedNode
from ipshift.ilnp.proxy import (
    LOOPBACK,
    Added,
    DeliverLocal,
    MappingRequest,
    MoveSchedule,
    ProxyCore,
    ProxyError,
    SeedEngine,
    Send,
)
from ipshift.ilnp.seedwire import (
    DEFAULT_HOP_LIMIT,
    DEFAULT_PORT,
    U64_MAX,
    SeedWireError,
    group_for,
    locator_of_group,
    parse_locator,
)
from ipshift.net import udp
from ipshift.net.errors import NetError

log = logging.getLogger("ipshift.ilnp.proxy")

SEED_COMPONENT = "ilnp-seed"
PROXY_COMPONENT = "ilnp-proxy"
DEFAULT_OVERLAY_PORT = 7701
DEFAULT_NODE = "ilnp0"
READ_BATCH = 64  # datagrams read per wakeup of a socket: others wait for the next one
MAX_DATAGRAM = 65535
MAPPING_QUEUE = 64  # mapping requests waiting to be answered; more are told "busy"
RESOLVE_TIMEOUT = 10.0  # seconds a name may take to resolve
ADDRESS_REFRESH = 5.0  # seconds between reads of the interface's addresses


def mapping_socket(port: int) -> Path:
    """/run/ipshift/ilnp-proxy-<port>.sock: where the proxy on `port` takes mappings."""
    return socket_path(f"{PROXY_COMPONENT}-{port}")


def proxy_control_socket(port: int) -> Path:
    """The tun proxy's control socket (its mapping socket has the runtime's default name)."""
    return socket_path(f"{PROXY_COMPONENT}-{port}.ctl")


def seed_control_socket(hostname: str) -> Path:
    return socket_path(f"{SEED_COMPONENT}-{hostname}")


# --- the seed node's configuration -------------------------------------------------------------
class SeedConfigError(ValueError):
    """A configuration file the seed node cannot run with; str() is one line."""


@dataclass(frozen=True)
class SeedNodeConfig:
    hostname: str
    nid: int
    #: the locators joined at start; the schedule's sets follow every `move_time`
    locators: tuple[int, ...]
    interface: str
    port: int = DEFAULT_PORT
    wait: float = 30.0
    move_time: float = 20.0
    handoff_time: float = 10.0
    hop_limit: int = DEFAULT_HOP_LIMIT
    router: bool = False
    schedule: tuple[tuple[int, ...], ...] = ()
    uid: int | None = None  # None: this process's uid (the seed's groups are named by it)
    lu_retries: int = 3
    lu_interval: float = 1.0
    route_lifetime: float = 30.0
    ignored: tuple[str, ...] = ()  # keys of the file this node does not use

    def group_uid(self) -> int:
        return (os.getuid() if self.uid is None else self.uid) % 65536

    def seed_config(self, ports: Iterable[int] = ()) -> SeedConfig:
        return SeedConfig(nid=self.nid, hostname=self.hostname, locators=self.locators,
                          wait=self.wait, hop_limit=self.hop_limit, router=self.router,
                          uid=self.group_uid(), handoff=self.handoff_time,
                          ports=frozenset(ports), route_lifetime=self.route_lifetime,
                          lu_retries=self.lu_retries, lu_interval=self.lu_interval)

    def move_schedule(self) -> MoveSchedule | None:
        return MoveSchedule(self.schedule, self.move_time) if self.schedule else None


#: canonical key -> the names it has in a file (ours first, then the seed's)
_KEYS: dict[str, tuple[str, ...]] = {
    "hostname": ("hostname",),
    "nid": ("nid",),
    "locators": ("locators",),
    "interface": ("interface", "mcast_interface"),
    "port": ("port", "mcast_port"),
    "wait": ("wait", "wait_time", "discovery_time"),
    "move_time": ("move_time", "move_sleep"),
    "handoff_time": ("handoff_time", "handover_time"),
    "hop_limit": ("hop_limit", "default_hop_limit"),
    "router": ("router",),
    "move_schedule": ("move_schedule", "schedule"),
    "uid": ("uid",),
    "lu_retries": ("lu_retries", "loc_update_retries"),
    "lu_interval": ("lu_interval", "loc_update_retry_wait_time"),
    "route_lifetime": ("route_lifetime", "backwards_learning_ttl"),
}
#: the seed's keys that mean nothing here (its logging, buffers, the demo application)
_SEED_ONLY = frozenset({"log", "buffer_size", "active_uncast_session_ttl"})
#: the seed's demo application settings (its [application] port is not the overlay's port)
_SKIPPED_SECTIONS = frozenset({"application"})
_NAME = re.compile(r"[A-Za-z0-9_.-]{1,63}")
_IFNAME = re.compile(r"[^\s/:]{1,15}")
_HEX = re.compile(r"(0x)?[0-9A-Fa-f]{1,16}")

_Found = dict[str, tuple[str, str]]  # canonical key -> (where "[section] name", value)


def load_seed_config(path: Path) -> SeedNodeConfig:
    """Read an INI file with the seed's keys (its sections [link], [network], [discovery], or
    one section of any name, or none); SeedConfigError with one line naming the file, the
    key and what is wrong."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SeedConfigError(f"cannot read {path}: {getattr(exc, 'strerror', None) or exc}") \
            from exc
    try:
        return parse_seed_config(text)
    except SeedConfigError as exc:
        raise SeedConfigError(f"{path}: {exc}") from None


def parse_seed_config(text: str) -> SeedNodeConfig:
    found, ignored = _collect(_read_ini(text))
    values: dict[str, Any] = {
        "hostname": _hostname(_required(found, "hostname", "the node's name (discovery "
                                                            "carries it)")),
        "nid": _nid(*_required_item(found, "nid", "the node identifier, e.g. ffff:0:0:a")),
        "interface": _interface(*_required_item(found, "interface",
                                                "the multicast interface, e.g. eth0")),
    }
    start, cycle = _locator_sets(found)
    values["locators"], values["schedule"] = start, cycle
    for key, convert in _NUMBERS.items():
        if key in found:
            values[key] = convert(*found[key])
    if "router" in found:
        values["router"] = _boolean(*found["router"])
    return SeedNodeConfig(**values, ignored=tuple(ignored))


def _read_ini(text: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None, inline_comment_prefixes=("#",),
                                       strict=True, default_section="\x00default")
    try:
        try:
            parser.read_string(text)
        except configparser.MissingSectionHeaderError:
            parser = configparser.ConfigParser(interpolation=None, inline_comment_prefixes=("#",),
                                               strict=True, default_section="\x00default")
            parser.read_string("[node]\n" + text)
    except configparser.Error as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise SeedConfigError(f"not an INI file: {first}") from None
    return parser


def _collect(parser: configparser.ConfigParser) -> tuple[_Found, list[str]]:
    names = {name: key for key, aliases in _KEYS.items() for name in aliases}
    found: _Found = {}
    ignored = []
    for section in parser.sections():
        if section.lower() in _SKIPPED_SECTIONS:
            continue
        for name, value in parser.items(section):
            where = f"[{section}] {name}"
            key = names.get(name)
            if key is None:
                if name not in _SEED_ONLY:
                    ignored.append(where)
                continue
            if key in found:
                raise SeedConfigError(f"{where} and {found[key][0]} say the same thing: "
                                      "keep one")
            found[key] = (where, value.strip())
    return found, ignored


def _required_item(found: _Found, key: str, what: str) -> tuple[str, str]:
    if key not in found or not found[key][1]:
        raise SeedConfigError(f"no {key}: give {what}")
    return found[key]


def _required(found: _Found, key: str, what: str) -> str:
    return _required_item(found, key, what)[1]


def _bad(where: str, value: str, why: str) -> SeedConfigError:
    return SeedConfigError(f"{where} = {value[:40]!r}: {why}")


def _hostname(value: str) -> str:
    if not _NAME.fullmatch(value):
        raise SeedConfigError(f"hostname {value[:40]!r}: 1-63 letters, digits, '.', '-', '_'")
    return value


def _nid(where: str, value: str) -> int:
    try:
        nid = parse_locator(value) if ":" in value else _hex(value)
    except (ValueError, SeedWireError):
        raise _bad(where, value, "a NID is hex, e.g. 1111 or ffff:0:0:a") from None
    if not 0 < nid <= U64_MAX:
        raise _bad(where, value, "a NID is 1 .. 2^64-1 (0 is the all-nodes NID)")
    return nid


def _hex(value: str) -> int:
    if not _HEX.fullmatch(value):
        raise ValueError(value)
    return int(value, 16)


def _interface(where: str, value: str) -> str:
    if not _IFNAME.fullmatch(value):
        raise _bad(where, value, "an interface name of 1-15 characters")
    return value


def _locator_list(where: str, value: str, part: str) -> tuple[int, ...]:
    try:
        out = tuple(dict.fromkeys(parse_locator(x) for x in part.split(",") if x.strip()))
    except (ValueError, SeedWireError):
        raise _bad(where, value, "locators are four hex groups each, e.g. "
                                 "2001:db8:0:1, comma-separated") from None
    if not out:
        raise _bad(where, value, "a locator set there is empty")
    return out


def _locator_sets(found: _Found) -> tuple[tuple[int, ...], tuple[tuple[int, ...], ...]]:
    """The start set and the schedule. The seed writes its cycle in `locators` with '-'
    between sets (`a,b - c`: start on a,b, then move to c, back to a,b, ...); `move_schedule`
    lists the sets moved to after the start set (';' or new lines between them)."""
    where, value = _required_item(found, "locators", "the locators to join, e.g. 2001:db8:0:1")
    sets = [_locator_list(where, value, part) for part in value.split("-")]
    if "move_schedule" not in found:
        return sets[0], tuple(sets[1:] + sets[:1]) if len(sets) > 1 else ()
    if len(sets) > 1:
        raise SeedConfigError(f"{where} has a '-' cycle and {found['move_schedule'][0]} a "
                              "schedule: give one of them")
    s_where, s_value = found["move_schedule"]
    parts = [p for p in re.split(r"[;\n]", s_value) if p.strip()]
    return sets[0], tuple(_locator_list(s_where, s_value, p) for p in parts)


def _number(kind: type, low: float, high: float, what: str) -> Callable[[str, str], Any]:
    def convert(where: str, value: str) -> Any:
        try:
            number = kind(value)
        except ValueError:
            raise _bad(where, value, f"must be {what}") from None
        if not (math.isfinite(number) and low <= number <= high):
            raise _bad(where, value, f"must be {what}")
        return number
    return convert


_NUMBERS: dict[str, Callable[[str, str], Any]] = {
    "port": _number(int, 1, 65535, "a UDP port (1-65535)"),
    "wait": _number(float, 0.001, 86400, "a number of seconds above 0"),
    "move_time": _number(float, 0.001, 86400 * 365, "a number of seconds above 0"),
    "handoff_time": _number(float, 0, 86400, "a number of seconds (0 or more)"),
    "hop_limit": _number(int, 1, 255, "a hop limit (1-255)"),
    "uid": _number(int, 0, 2**32 - 1, "a uid (0 or more)"),
    "lu_retries": _number(int, 0, 100, "a count (0-100)"),
    "lu_interval": _number(float, 0.001, 3600, "a number of seconds above 0"),
    "route_lifetime": _number(float, 0.001, 86400, "a number of seconds above 0"),
}


def _boolean(where: str, value: str) -> bool:
    states = configparser.ConfigParser.BOOLEAN_STATES
    if value.lower() not in states:
        raise _bad(where, value, "yes or no")
    return states[value.lower()]


# --- the application interface -----------------------------------------------------------------
SendFn = Callable[[Send], str | None]  # None when sent, else the drop reason
AcceptFn = Callable[[MappingRequest], Awaitable[str | None]]  # the address to send to


class ProxyFront:
    """The proxy's loopback UDP socket and its mapping socket, feeding a `ProxyCore`; the
    overlay is reached through `send` (and `flush` after a batch) and `accept` (which may
    resolve the remote, or raise ProxyError)."""

    def __init__(self, core: ProxyCore, port: int, unix_path: Path, *, send: SendFn,
                 accept: AcceptFn, added: Callable[[Added], None] | None = None,
                 flush: Callable[[], None] | None = None) -> None:
        self.core = core
        self.requested_port = port
        self.unix_path = unix_path
        self._send = send
        self._accept = accept
        self._added = added
        self._flush = flush
        self.udp: socket.socket | None = None
        self.unix: socket.socket | None = None
        self.port = 0
        self.io_errors: Counter[str] = Counter()
        self._queue: asyncio.Queue[tuple[bytes, Any]] = asyncio.Queue(MAPPING_QUEUE)
        self._worker: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def start(self) -> None:
        self._loop = loop = asyncio.get_running_loop()
        self.udp = _loopback_socket(self.requested_port)
        self.port = self.udp.getsockname()[1]
        try:
            self.unix = _mapping_socket(self.unix_path)
        except BaseException:
            self.udp.close()
            self.udp = None
            raise
        loop.add_reader(self.udp, self._app_readable)
        loop.add_reader(self.unix, self._unix_readable)
        self._worker = loop.create_task(self._serve_mappings())

    async def close(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
        for sock in (self.udp, self.unix):
            if sock is not None and self._loop is not None:
                self._loop.remove_reader(sock)
                sock.close()
        if self.unix is not None:
            with contextlib.suppress(OSError):
                self.unix_path.unlink()
        self.udp = self.unix = None

    # --- the application's datagrams ------------------------------------------------------
    def _app_readable(self) -> None:
        assert self.udp is not None
        for data, source in _read_batch(self.udp, self.io_errors):
            send = self.core.app_datagram(source, data)
            if send is None:
                continue
            reason = self._send(send)
            if reason is None:
                self.core.sent(send)
            else:
                self.core.send_failed(reason)
        if self._flush is not None:
            self._flush()

    def deliver(self, action: DeliverLocal | None) -> None:
        if action is None or self.udp is None:
            return
        try:
            self.udp.sendto(action.payload, (LOOPBACK, action.port))
        except OSError:
            self.core.deliver_failed()

    # --- mappings -------------------------------------------------------------------------
    def _unix_readable(self) -> None:
        assert self.unix is not None
        for data, client in _read_batch(self.unix, self.io_errors):
            try:
                self._queue.put_nowait((data, client))
            except asyncio.QueueFull:
                self.core.refuse("busy")
                self._reply(client, "error: busy, try again")

    async def _serve_mappings(self) -> None:
        while True:
            data, client = await self._queue.get()
            self._reply(client, await self._mapping(data))

    async def _mapping(self, data: bytes) -> str:
        try:
            request = self.core.mapping_request(data)
            address = await self._accept(request)
            added = self.core.add(request, asyncio.get_running_loop().time(), address)
        except ProxyError as exc:
            log.info("mapping refused: %s", exc.message)
            return f"error: {exc.message}"
        if added.replaced is not None:
            log.info("mapping of port %d replaced: was %s, now %s", request.local_port,
                     added.replaced.describe(), added.mapping.describe())
        else:
            log.info("mapping of port %d to %s", request.local_port, added.mapping.describe())
        if self._added is not None:
            self._added(added)
        return str(self.port)

    def _reply(self, client: Any, text: str) -> None:
        if not client or self.unix is None:
            self.io_errors["no_reply_address"] += 1
            return
        try:
            self.unix.sendto(text.encode(), client)
        except OSError:
            self.io_errors["reply_failed"] += 1

    def status(self, now: float) -> dict[str, Any]:
        return {"port": self.port, "address": LOOPBACK, "mapping_socket": str(self.unix_path),
                **self.core.status(now), "io_errors": dict(self.io_errors)}


def _loopback_socket(port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC
                         | socket.SOCK_NONBLOCK)
    try:
        sock.bind((LOOPBACK, port))
    except OSError as exc:
        sock.close()
        raise StartError(f"cannot open the proxy's UDP port {LOOPBACK}:{port}: "
                         f"{exc.strerror or exc}") from exc
    return sock


def _mapping_socket(path: Path) -> socket.socket:
    """A unix datagram socket at `path`, 0600 in a private directory."""
    if _answers(path):
        raise StartError(f"another proxy is already running on {path}")
    try:
        prepare_socket_path(path)
    except CtlError as exc:
        raise StartError(exc.message) from exc
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC
                         | socket.SOCK_NONBLOCK)
    old_umask = os.umask(0o177)
    try:
        sock.bind(str(path))
        os.chmod(path, 0o600)
    except OSError as exc:
        sock.close()
        raise StartError(f"cannot create the mapping socket {path}: {exc.strerror or exc}") \
            from exc
    finally:
        os.umask(old_umask)
    return sock


def _answers(path: Path) -> bool:
    """Whether a live datagram socket is bound at `path` (a stale one refuses)."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
    try:
        probe.connect(str(path))
    except OSError:
        return False
    finally:
        probe.close()
    return True


def _read_batch(sock: socket.socket, errors: Counter[str]) -> list[tuple[bytes, Any]]:
    out = []
    for _ in range(READ_BATCH):
        try:
            out.append(sock.recvfrom(MAX_DATAGRAM))
        except BlockingIOError:
            break
        except OSError:
            errors["receive_failed"] += 1
            break
    return out


# --- the seed backend --------------------------------------------------------------------------
class SeedNodeService:
    """A seed overlay node (and, given a port, the proxy into it) on the daemon runtime."""

    component = SEED_COMPONENT
    netns: str | None = None
    adopts: frozenset[str] = frozenset()

    def __init__(self, config: SeedNodeConfig, proxy_port: int | None = None,
                 unix_path: Path | None = None, *, strict_source: bool = False) -> None:
        self.config = config
        self.instance = config.hostname
        self.proxy_port = proxy_port
        self.unix_path = unix_path
        self.node = SeedNode(config.seed_config())
        self.engine = SeedEngine(self.node, config.move_schedule())
        self.core = ProxyCore(strict_source=strict_source)
        self.front: ProxyFront | None = None
        self.sock: socket.socket | None = None
        self.pump: EnginePump | None = None
        self.io_errors: Counter[str] = Counter()
        self._loop: asyncio.AbstractEventLoop | None = None

    async def start(self, rt: Runtime) -> None:
        self._loop = loop = asyncio.get_running_loop()
        for where in self.config.ignored:
            log.info("%s is not used by this node", where)
        self.sock = self._open_overlay()
        try:
            self._refresh_addresses()
        except NetError as exc:
            raise StartError(f"cannot read the addresses of {self.config.interface}: {exc}") \
                from exc
        self.pump = EnginePump(loop, self.engine, self._apply)
        loop.add_reader(self.sock, self._readable)
        self.engine.start(loop.time())
        self.pump.run()
        if self.proxy_port is not None:
            self.front = ProxyFront(self.core, self.proxy_port,
                                    self.unix_path or mapping_socket(self.proxy_port),
                                    send=self._send, accept=_no_resolution,
                                    added=self._mapped, flush=self.pump.run)
            await self.front.start()
            log.info("proxy on %s:%d, mappings on %s", LOOPBACK, self.front.port,
                     self.front.unix_path)
        rt.every(ADDRESS_REFRESH, self._refresh_addresses, "reading the interface's addresses")

    def _open_overlay(self) -> socket.socket:
        try:
            sock = udp.open_multicast(self.config.port, [], self.config.interface,
                                      family=socket.AF_INET6, hops=1)
        except (NetError, ValueError) as exc:
            raise StartError(str(exc)) from exc
        sock.setblocking(False)
        return sock

    async def stop(self) -> None:
        if self.front is not None:
            await self.front.close()
        if self.pump is not None:
            self.pump.stop()
        if self.sock is not None and self._loop is not None:
            self._loop.remove_reader(self.sock)
            self.sock.close()
            self.sock = None

    # --- the overlay ----------------------------------------------------------------------
    def _readable(self) -> None:
        assert self.sock is not None and self.pump is not None
        try:
            batch = udp.recv_batch_with_destination(self.sock, READ_BATCH)
        except (NetError, OSError):
            self.io_errors["receive_failed"] += 1
            batch = []
        now = self.pump.now()
        for got in batch:
            try:
                arrival = locator_of_group(got.destination)
            except SeedWireError:
                self.io_errors["not_a_seed_group"] += 1
                continue
            self.node.datagram(got.data, arrival, str(got.source[0]), now)
        self.pump.run()

    def _apply(self, actions: Iterable[Any]) -> None:
        for action in actions:
            if isinstance(action, Multicast):
                self._multicast(action)
            elif isinstance(action, Join | Leave):
                self._membership(action)
            elif isinstance(action, Deliver):
                self._deliver(action)
            elif isinstance(action, Log):
                log.info("%s: %s", action.event, action.message)

    def _multicast(self, action: Multicast) -> None:
        assert self.sock is not None
        group = group_for(action.locator, self.config.group_uid())
        try:
            self.sock.sendto(action.data, (group, self.config.port))
        except OSError as exc:
            if not self.io_errors["send_failed"]:
                log.warning("cannot send to %s: %s", group, exc.strerror or exc)
            self.io_errors["send_failed"] += 1

    def _membership(self, action: Join | Leave) -> None:
        assert self.sock is not None
        group = group_for(action.locator, self.config.group_uid())
        change = udp.join_group if isinstance(action, Join) else udp.leave_group
        try:
            change(self.sock, group, self.config.interface)
        except (NetError, ValueError) as exc:
            self.io_errors["membership_failed"] += 1
            log.warning("%s", exc)

    def _deliver(self, action: Deliver) -> None:
        if self.front is None:
            self.io_errors["no_proxy"] += 1
            return
        self.front.deliver(self.core.overlay_datagram(action.from_port, action.port,
                                                      action.payload, action.from_hostname))

    def _refresh_addresses(self) -> None:
        from ipshift.net.netlink import Netlink

        with Netlink(self.netns) as nl:
            found = nl.addresses(dev=self.config.interface, family=socket.AF_INET6)
        self.node.own_addresses = {a.address for a in found}

    # --- the proxy ------------------------------------------------------------------------
    def _send(self, send: Send) -> str | None:
        assert self.pump is not None
        ok = self.node.send_stp(send.src_port, send.remote_host, send.dst_port, send.payload,
                                self.pump.now())
        return None if ok else "overlay_refused"

    def _mapped(self, added: Added) -> None:
        self.node.bind(added.mapping.local_port)

    # --- status ---------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        now = self._loop.time() if self._loop is not None else 0.0
        out: dict[str, Any] = {
            "daemon": {"interface": self.config.interface, "port": self.config.port,
                       "uid": self.config.group_uid()},
            "node": self.node.status(),
            "io_errors": dict(self.io_errors),
        }
        if self.engine.schedule is not None:
            out["schedule"] = self.engine.schedule.status()
        if self.front is not None:
            out["proxy"] = self.front.status(now)
        return out

    def metrics(self) -> Iterable[Metric]:
        out = [gauge("ilnp_seed_neighbours", len(self.node.neighbours), "nodes discovered"),
               gauge("ilnp_seed_locators", len(self.node.current), "locators held now")]
        for name, value in sorted(self.node.counters.items()):
            out.append(counter("ilnp_seed_events", value, "node events by kind", kind=name))
        for name, value in sorted(self.node.drops.items()):
            out.append(counter("ilnp_seed_drops", value, "datagrams dropped", reason=name))
        if self.front is not None:
            out += proxy_metrics(self.core)
        return out


async def _no_resolution(request: MappingRequest) -> str | None:
    return None  # the seed overlay finds hosts by name itself (discovery)


def proxy_metrics(core: ProxyCore) -> list[Metric]:
    out = [gauge("ilnp_proxy_mappings", len(core.mappings), "mappings held")]
    for name, value in sorted(core.counters.items()):
        out.append(counter("ilnp_proxy_events", value, "proxy events by kind", kind=name))
    for name, value in sorted(core.drops.items()):
        out.append(counter("ilnp_proxy_drops", value, "datagrams dropped", reason=name))
    for name, value in sorted(core.mapping_errors.items()):
        out.append(counter("ilnp_proxy_mapping_errors", value, "mapping requests refused",
                           reason=name))
    return out


# --- the tun backend ---------------------------------------------------------------------------
Resolver = Callable[[str], str]  # host name -> IPv6 address; raises CtlError or ProxyError


def node_resolver(path: Path) -> Resolver:
    """Ask the node daemon on control socket `path` (its `resolve` method)."""
    from ipshift.ctl.client import request

    def resolve(hostname: str) -> str:
        answer = request(path, "resolve", name=hostname)
        address = answer.get("address") if isinstance(answer, dict) else None
        if not isinstance(address, str):
            raise ProxyError("resolve_failed", f"the node daemon's answer for {hostname} has "
                                               "no address")
        return address
    return resolve


class TunProxyService:
    """The proxy beside the node daemon: one overlay UDP socket on [::]:overlay_port."""

    component = PROXY_COMPONENT
    netns: str | None = None
    adopts: frozenset[str] = frozenset()

    def __init__(self, port: int, resolver: Resolver, *, overlay_port: int =
                 DEFAULT_OVERLAY_PORT, unix_path: Path | None = None,
                 strict_source: bool = False, node: str = "") -> None:
        self.instance = str(port)
        self.port = port
        self.resolver = resolver
        self.overlay_port = overlay_port
        self.node = node
        self.core = ProxyCore(strict_source=strict_source)
        self.front = ProxyFront(self.core, port, unix_path or mapping_socket(port),
                                send=self._send, accept=self._accept)
        self.sock: socket.socket | None = None
        self.io_errors: Counter[str] = Counter()
        self._loop: asyncio.AbstractEventLoop | None = None

    async def start(self, rt: Runtime | None) -> None:
        self._loop = loop = asyncio.get_running_loop()
        self.sock = _overlay_socket(self.overlay_port)
        loop.add_reader(self.sock, self._readable)
        try:
            await self.front.start()
        except BaseException:
            await self.stop()
            raise
        log.info("proxy on %s:%d, overlay on [::]:%d, mappings on %s", LOOPBACK,
                 self.front.port, self.overlay_port, self.front.unix_path)

    async def stop(self) -> None:
        await self.front.close()
        if self.sock is not None and self._loop is not None:
            self._loop.remove_reader(self.sock)
            self.sock.close()
            self.sock = None

    def _readable(self) -> None:
        assert self.sock is not None
        for data, source in _read_batch(self.sock, self.io_errors):
            self.front.deliver(self.core.overlay_frame(data, _normal(source[0])))

    def _send(self, send: Send) -> str | None:
        if self.sock is None or send.address is None:
            return "no_address"
        try:
            self.sock.sendto(send.frame(), (send.address, self.overlay_port))
        except (OSError, ProxyError):
            return "send_failed"
        return None

    async def _accept(self, request: MappingRequest) -> str | None:
        loop = asyncio.get_running_loop()
        try:
            answer = await asyncio.wait_for(
                loop.run_in_executor(None, self.resolver, request.remote_host), RESOLVE_TIMEOUT)
        except CtlError as exc:
            self.core.refuse("resolve_failed")
            raise ProxyError("resolve_failed", f"{request.remote_host}: {exc.message}") \
                from None
        except TimeoutError:
            self.core.refuse("resolve_failed")
            raise ProxyError("resolve_failed", f"{request.remote_host}: no answer within "
                                               f"{RESOLVE_TIMEOUT:g} s") from None
        except ProxyError as exc:
            self.core.refuse(exc.reason)
            raise
        return _checked_address(self.core, request.remote_host, answer)

    def status(self) -> dict[str, Any]:
        now = self._loop.time() if self._loop is not None else 0.0
        return {"daemon": {"overlay_port": self.overlay_port, "node": self.node},
                "proxy": self.front.status(now), "io_errors": dict(self.io_errors)}

    def metrics(self) -> Iterable[Metric]:
        return proxy_metrics(self.core)


def _checked_address(core: ProxyCore, hostname: str, answer: str) -> str:
    try:
        address = ipaddress.IPv6Address(answer)
    except ValueError:
        core.refuse("resolve_failed")
        raise ProxyError("resolve_failed", f"{hostname}: the node daemon answered "
                                           f"{answer[:60]!r}, not an IPv6 address") from None
    return address.compressed


def _normal(address: str) -> str:
    try:
        return ipaddress.ip_address(address.split("%", 1)[0]).compressed
    except ValueError:
        return address


def _overlay_socket(port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC
                         | socket.SOCK_NONBLOCK)
    try:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(("::", port))
    except OSError as exc:
        sock.close()
        raise StartError(f"cannot open the overlay port [::]:{port}: {exc.strerror or exc}") \
            from exc
    return sock
