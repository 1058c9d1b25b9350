"""The ILNP node's configuration file (TOML), read and checked once: every mistake is one
line naming the key and what it takes. docs/ilnp.md, "Configuration", shows a whole file.

    name = "mn.ilnp.test."          # this node's name (DNS, discovery, proxy-create)
    nid = "0000:0000:0000:0011"     # optional: default derived from the name
    interfaces = ["eth1", "eth2"]   # underlay networks: their addresses ending in the NID
                                    # (I-LVs) are this node's locators
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ipshift.ilnp.datapath import locator_sum, neutral_locator

DEFAULT_APP_LOCATOR = 0x20010DB8D2460000  # 2001:db8:d246::/64: checksum-neutral
DEFAULT_PORT = 7700
DEFAULT_DISCOVERY_PORT = 7702
_IFNAME = re.compile(r"[A-Za-z0-9_.:-]{1,15}\Z")


class NodeConfigError(ValueError):
    """The configuration file is unusable; the message says which key and why."""


@dataclass(frozen=True)
class StaticHost:
    name: str
    nid: int
    locators: tuple[tuple[int, int], ...]  # (l64, preference)


@dataclass(frozen=True)
class DnsSettings:
    server: str
    zone: str
    key_file: str
    port: int = 53
    ttl: int = 30
    timeout: float = 2.0


@dataclass(frozen=True)
class Schedule:
    """Locator sets cycled like the seed's experiments: each set is used for `move_time`
    seconds; at a change the old and new sets are both used for `handoff_time` first (soft
    handoff; 0: hard)."""

    sets: tuple[tuple[int, ...], ...]
    move_time: float = 20.0
    handoff_time: float = 10.0


@dataclass(frozen=True)
class NodeFileConfig:
    name: str
    nid: int
    interfaces: tuple[str, ...]
    device: str = "ilnp0"
    port: int = DEFAULT_PORT
    app_locator: int = DEFAULT_APP_LOCATOR
    checksum: str = "ilnp"
    nonce_size: int = 4
    router: bool = False
    hop_limit: int = 64
    mtu: int | None = None
    preferences: dict[str, int] = field(default_factory=dict)
    ipv4_locators: dict[str, int] = field(default_factory=dict)  # IPv4 interface -> its L64
    discovery: bool = True
    discovery_port: int = DEFAULT_DISCOVERY_PORT
    hello_interval: float = 5.0
    flood: bool = True  # a router passes hellos on to its other links
    hosts: tuple[StaticHost, ...] = ()
    dns: DnsSettings | None = None
    schedule: Schedule | None = None
    engine: dict[str, float | bool] = field(default_factory=dict)
    netns: str | None = None
    log_level: str = "info"

    @property
    def instance(self) -> str:
        return self.device

    def app_address(self, nid: int) -> ipaddress.IPv6Address:
        return ipaddress.IPv6Address(self.app_locator << 64 | nid)


ENGINE_KEYS = ("lu_interval", "lu_tries", "nonce_hold", "active", "idle", "resolve_wait",
               "replay_window", "lu_sequence")
_TOP = {"name", "nid", "interfaces", "device", "port", "app_locator", "checksum", "nonce_size",
        "router", "hop_limit", "mtu", "preferences", "discovery", "hosts", "dns", "schedule",
        "engine", "log_level", "ipv4_locators"}


def derived_nid(name: str) -> int:
    """A stable NID from a name (when none is configured): 64 bits of its SHA-256, with the
    EUI-64 universal/local bit clear (RFC 4291: not a globally unique identifier)."""
    value = int.from_bytes(hashlib.sha256(name.lower().encode()).digest()[:8], "big")
    return (value & ~(1 << 57)) or 1


def parse_id64(text: object, what: str) -> int:
    if not isinstance(text, str) or not re.fullmatch(r"[0-9a-fA-F]{1,4}(:[0-9a-fA-F]{1,4}){3}",
                                                     text):
        raise NodeConfigError(f"{what}: {text!r} is not four groups of hex digits "
                              "(0000:0000:0000:0011)")
    value = int("".join(g.zfill(4) for g in text.split(":")), 16)
    if not value:
        raise NodeConfigError(f"{what}: a NID is not zero")
    return value


def parse_l64(text: object, what: str) -> int:
    try:
        if not isinstance(text, str):
            raise TypeError(text)
        prefix = ipaddress.IPv6Network(text)
    except (ValueError, TypeError):
        raise NodeConfigError(f"{what}: {text!r} is not an IPv6 /64 prefix "
                              "(2001:db8:1::/64)") from None
    if prefix.prefixlen != 64:
        raise NodeConfigError(f"{what}: {text} is a /{prefix.prefixlen}; a locator is a /64")
    return int(prefix.network_address) >> 64


def _want(value: Any, kind: type | tuple[type, ...], what: str, text: str) -> Any:
    if not isinstance(value, kind) or (isinstance(value, bool) and kind in (int, float)):
        raise NodeConfigError(f"{what}: {text}, not {value!r}")
    return value


def _number(table: dict[str, Any], key: str, default: float, low: float, high: float,
            what: str, integer: bool = False) -> Any:
    value: Any = table.get(key, default)
    ok = isinstance(value, int) or (isinstance(value, float) and not integer)
    if isinstance(value, bool) or not ok or not low <= value <= high:
        kind = "a whole number" if integer else "a number"
        raise NodeConfigError(f"{what}{key}: {kind} {low:g}..{high:g}, not {value!r}")
    return value


def load(path: str | Path, netns: str | None = None) -> NodeFileConfig:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise NodeConfigError(f"cannot read {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise NodeConfigError(f"{path} is not UTF-8 text") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise NodeConfigError(f"{path}: not TOML: {exc}") from None
    return parse(data, netns)


def parse(data: dict[str, Any], netns: str | None = None) -> NodeFileConfig:
    unknown = set(data) - _TOP
    if unknown:
        raise NodeConfigError(f"unknown key(s) {', '.join(sorted(unknown))}; known: "
                              f"{', '.join(sorted(_TOP))}")
    name = _want(data.get("name"), str, "name", "this node's name, e.g. \"mn.ilnp.test.\"")
    if not 0 < len(name) <= 253:
        raise NodeConfigError("name: 1-253 characters")
    nid = parse_id64(data["nid"], "nid") if "nid" in data else derived_nid(name)
    interfaces = tuple(_want(data.get("interfaces"), list, "interfaces",
                             "a list of underlay interface names"))
    if not interfaces or not all(isinstance(i, str) and _IFNAME.match(i) for i in interfaces):
        raise NodeConfigError("interfaces: one or more interface names")
    device = _want(data.get("device", "ilnp0"), str, "device", "a TUN device name")
    if not _IFNAME.match(device):
        raise NodeConfigError(f"device: {device!r} is not an interface name")
    app = parse_l64(data.get("app_locator", "2001:db8:d246::/64"), "app_locator")
    if locator_sum(app):
        good = ipaddress.IPv6Network((neutral_locator(app) << 64, 64))
        raise NodeConfigError(f"app_locator: its 16-bit words must add up to zero (ones' "
                              f"complement) so checksums need no change; use {good}")
    checksum = data.get("checksum", "ilnp")
    if checksum not in ("ilnp", "ipv6"):
        raise NodeConfigError(f"checksum: \"ilnp\" (RFC 6741) or \"ipv6\", not {checksum!r}")
    nonce_size = data.get("nonce_size", 4)
    if type(nonce_size) is not int or nonce_size not in (4, 12):
        raise NodeConfigError(f"nonce_size: 4 or 12 (RFC 6744), not {nonce_size!r}")
    preferences = _want(data.get("preferences", {}), dict, "preferences",
                        "a table interface = preference")
    for dev in preferences:
        if dev not in interfaces:
            raise NodeConfigError(f"preferences.{_shown(dev)}: not one of interfaces")
        _number(preferences, dev, 10, 0, 0xFFFF, "preferences.", integer=True)
    ipv4 = _want(data.get("ipv4_locators", {}), dict, "ipv4_locators",
                 "a table interface = \"L64 prefix\" for IPv4 networks")
    for dev in ipv4:
        if dev not in interfaces:
            raise NodeConfigError(f"ipv4_locators.{_shown(dev)}: not one of interfaces")
    ipv4_locators = {dev: parse_l64(value, f"ipv4_locators.{_shown(dev)}")
                     for dev, value in ipv4.items()}
    if len(set(ipv4_locators.values())) != len(ipv4_locators):
        raise NodeConfigError("ipv4_locators: one locator per IPv4 network")
    discovery = _want(data.get("discovery", {}), dict, "discovery",
                      "a table (enabled, port, interval, flood)")
    unknown_discovery = set(discovery) - {"enabled", "port", "interval", "flood"}
    if unknown_discovery:
        raise NodeConfigError(f"discovery.{_shown(sorted(unknown_discovery)[0])}: unknown; known: "
                              "enabled, port, interval, flood")
    engine = _want(data.get("engine", {}), dict, "engine", "a table of engine settings")
    for key in engine:
        if key not in ENGINE_KEYS:
            raise NodeConfigError(f"engine.{_shown(key)}: unknown; known: "
                                  f"{', '.join(ENGINE_KEYS)}")
        if key == "lu_sequence":
            _want(engine[key], bool, "engine.lu_sequence", "true or false")
        else:
            _number(engine, key, 1, 0.001, 86400, "engine.", integer=key == "lu_tries")
    mtu = data.get("mtu")
    if mtu is not None:
        _number(data, "mtu", 1400, 1280, 65000, "", integer=True)
    return NodeFileConfig(
        name=name, nid=nid, interfaces=interfaces, device=device,
        port=_number(data, "port", DEFAULT_PORT, 1, 65535, "", integer=True),
        app_locator=app, checksum=checksum, nonce_size=nonce_size,
        router=_want(data.get("router", False), bool, "router", "true or false"),
        hop_limit=_number(data, "hop_limit", 64, 1, 255, "", integer=True), mtu=mtu,
        preferences=dict(preferences), ipv4_locators=ipv4_locators,
        discovery=_want(discovery.get("enabled", True), bool, "discovery.enabled",
                        "true or false"),
        discovery_port=_number(discovery, "port", DEFAULT_DISCOVERY_PORT, 1, 65535,
                               "discovery.", integer=True),
        hello_interval=_number(discovery, "interval", 5.0, 0.1, 3600, "discovery."),
        flood=_want(discovery.get("flood", True), bool, "discovery.flood", "true or false"),
        hosts=tuple(_host(h, i) for i, h in enumerate(_want(
            data.get("hosts", []), list, "hosts", "a list of [[hosts]] tables"))),
        dns=_dns(data["dns"]) if "dns" in data else None,
        schedule=_schedule(data["schedule"]) if "schedule" in data else None,
        engine={k: v if isinstance(v, bool) else float(v) for k, v in engine.items()},
        netns=netns,
        log_level=_want(data.get("log_level", "info"), str, "log_level", "debug, info, ..."),
    )


def _known(table: dict[str, Any], what: str, keys: tuple[str, ...]) -> None:
    unknown = sorted(set(table) - set(keys))
    if unknown:
        raise NodeConfigError(f"{what}.{_shown(unknown[0])}: unknown; known: {', '.join(keys)}")


def _shown(key: str) -> str:
    """A key as the user wrote it, or quoted when it holds anything odd (one line always)."""
    return key if key.isprintable() and key.isascii() else repr(key)


def _host(entry: Any, index: int) -> StaticHost:
    what = f"hosts[{index}]"
    _want(entry, dict, what, "a table with name, nid, locators")
    _known(entry, what, ("name", "nid", "locators", "preference"))
    name = _want(entry.get("name"), str, f"{what}.name", "a host name")
    locators = _want(entry.get("locators"), list, f"{what}.locators", "a list of /64s")
    pref = _number(entry, "preference", 10, 0, 0xFFFF, f"{what}.", integer=True)
    return StaticHost(name, parse_id64(entry.get("nid"), f"{what}.nid"),
                      tuple((parse_l64(x, f"{what}.locators"), pref) for x in locators))


def _dns(table: Any) -> DnsSettings:
    _want(table, dict, "dns", "a table (server, zone, key_file, port, ttl, timeout)")
    _known(table, "dns", ("server", "zone", "key_file", "port", "ttl", "timeout"))
    server = _want(table.get("server"), str, "dns.server", "the DNS server's address")
    try:
        ipaddress.ip_address(server)
    except ValueError:
        raise NodeConfigError(f"dns.server: {server!r} is not an IP address") from None
    return DnsSettings(
        server=server,
        zone=_want(table.get("zone"), str, "dns.zone", "the zone updated, e.g. \"ilnp.test.\""),
        key_file=_want(table.get("key_file"), str, "dns.key_file",
                       "the TSIG key file (ALGORITHM:NAME:SECRET)"),
        port=_number(table, "port", 53, 1, 65535, "dns.", integer=True),
        ttl=_number(table, "ttl", 30, 0, 86400, "dns.", integer=True),
        timeout=_number(table, "timeout", 2.0, 0.1, 60, "dns."))


def _schedule(table: Any) -> Schedule:
    _want(table, dict, "schedule", "a table (sets, move_time, handoff_time)")
    _known(table, "schedule", ("sets", "move_time", "handoff_time"))
    sets = _want(table.get("sets"), list, "schedule.sets", "a list of lists of /64s")
    parsed = tuple(tuple(parse_l64(x, "schedule.sets") for x in _want(
        s, list, "schedule.sets", "lists of /64s")) for s in sets)
    if len(parsed) < 2:
        raise NodeConfigError("schedule.sets: at least two locator sets to cycle")
    move = _number(table, "move_time", 20.0, 0.1, 86400, "schedule.")
    handoff = _number(table, "handoff_time", 10.0, 0, 86400, "schedule.")
    if handoff >= move:
        raise NodeConfigError("schedule.handoff_time must be shorter than move_time")
    return Schedule(parsed, float(move), float(handoff))
