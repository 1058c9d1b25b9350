"""Loading and checking a routes configuration.

Two input forms, freely mixed:

* TOML (`*.toml`): `[daemon]` settings, `[[uplink]]`, `[[rule]]` and `[[route]]` tables, plus
  `ip = '''...'''` text and `include = ["file.ip"]` in the seed's iproute2 syntax;
* any other file is read as iproute2 command lines (the seed's examples as they are written).

Uplinks that are not declared are inferred: every gateway a route uses (with its device) becomes
an uplink named after its device, probed with ICMP echo and ARP/ND, its source address taken from
the route that names one. `load` raises ConfigError with the first error; `check` returns every
problem, one line each.
"""

from __future__ import annotations

import math
import os
import socket
import tomllib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ipshift.daemon.instance import MAX_NAME, name_problem
from ipshift.routes.iproute import (
    IprouteError,
    Parser,
    Problem,
    interface_problem,
    parse_number,
)
from ipshift.routes.model import (
    PROFILE_FIELDS,
    PROFILES,
    ROUTE_TYPES,
    SCOPE_NAMES,
    IPAddress,
    Nexthop,
    Profile,
    RoutesConfig,
    RouteSpec,
    RuleSpec,
    Settings,
    UplinkSpec,
    table_name,
)


class ConfigError(ValueError):
    """The configuration cannot be used; str() is the first problem, one line."""

    def __init__(self, problems: list[Problem]):
        super().__init__(str(problems[0]) if problems else "invalid configuration")
        self.problems = problems


SETTINGS_KEYS = {"name", "protocol", "table_base", "rule_priority", "mark_mask", "failback",
                 "conntrack", "hooks", "hook_timeout", "metrics", "profile"}
UPLINK_KEYS = {"name", "interface", "gateway", "source", "targets", "quorum", "profile",
               "gateway_probe", "table", *PROFILE_FIELDS}
RULE_KEYS = {"priority", "from", "to", "table", "iif", "oif", "fwmark", "action", "tos", "not",
             "family"}
ROUTE_KEYS = {"dst", "table", "via", "dev", "uplink", "src", "metric", "scope", "type", "static",
              "nexthops", "tos", "onlink", "family"}
NEXTHOP_KEYS = {"via", "dev", "weight", "uplink", "onlink"}
MAX_CONFIG_BYTES = 64 << 20  # 10,000 routes take about 1 MiB
MAX_UPLINK_NAME = 64  # hooks' environment, status, metrics labels, log lines
TOO_DEEP = ("TOML nested too deeply (arrays or inline tables within one another): "
            "write it flatter")


@dataclass
class _Draft:
    """Uplink fields as written, before defaults and inference."""

    name: str
    interface: str
    gateway: IPAddress | None
    source: IPAddress | None
    targets: tuple[IPAddress, ...] | None
    quorum: int | None
    profile: str | None
    overrides: dict[str, Any]
    gateway_probe: bool | None
    table: int | None
    origin: str
    declared: bool


class _Loader:
    def __init__(self, path: Path, tables: dict[str, int] | None):
        self.path = path
        self.parser = Parser(tables)
        self.problems = self.parser.problems
        self.settings = Settings()
        self.drafts: list[_Draft] = []
        self.where = str(path)

    def error(self, where: str, message: str) -> None:
        self.problems.append(Problem(where, message))

    def warn(self, where: str, message: str) -> None:
        self.problems.append(Problem(where, message, "warning"))

    # ---- reading ---------------------------------------------------------------------------
    def read(self) -> None:
        try:
            text = _read_text(self.path)
        except _UnreadableError as exc:
            raise ConfigError([Problem(str(self.path), str(exc))]) from exc
        if self.path.suffix != ".toml":
            self.parser.feed(text, str(self.path))
            return
        self.toml(_parse_toml(text, str(self.path)))

    def toml(self, doc: dict[str, Any]) -> None:
        known = {"daemon", "uplink", "rule", "route", "ip", "include"}
        for key in doc:
            if key not in known:
                self.error(self.where, f"unknown section or key `{key}` (known: "
                                       f"{', '.join(sorted(known))})")
        self.settings_from(doc.get("daemon", {}))
        for i, up in enumerate(_tables(doc.get("uplink", []), "uplink", self), 1):
            self.uplink_from(up, f"{self.where}: [[uplink]] {i}")
        incs = doc.get("include", [])
        incs = [incs] if isinstance(incs, str) else incs
        if not isinstance(incs, list) or not all(isinstance(i, str) for i in incs):
            self.error(self.where, "`include` must be a file name or a list of file names")
            incs = []
        for inc in incs:
            p = Path(inc)
            if not p.is_absolute():
                p = self.path.parent / p
            try:
                self.parser.feed(_read_text(p), str(p))
            except _UnreadableError as exc:
                self.error(self.where, f"include {p}: {exc}")
        if "ip" in doc:
            if isinstance(doc["ip"], str):
                self.parser.feed(doc["ip"], f"{self.where}: ip")
            else:
                self.error(self.where, "`ip` must be a string of iproute2 command lines")
        for i, r in enumerate(_tables(doc.get("rule", []), "rule", self), 1):
            self.rule_from(r, f"{self.where}: [[rule]] {i}")
        for i, r in enumerate(_tables(doc.get("route", []), "route", self), 1):
            self.route_from(r, f"{self.where}: [[route]] {i}")

    def settings_from(self, d: Any) -> None:
        where = f"{self.where}: [daemon]"
        if not isinstance(d, dict):
            self.error(where, "[daemon] must be a table")
            return
        for key in d:
            if key not in SETTINGS_KEYS:
                known = ", ".join(sorted(SETTINGS_KEYS))
                self.error(where, f"unknown key `{key}` (known: {known})")
        s = self.settings
        try:
            if "name" in d:
                s = replace(s, name=_str(d["name"], "name"))
            if "protocol" in d:
                s = replace(s, protocol=_int(d["protocol"], "protocol"))
            if "table_base" in d:
                s = replace(s, table_base=_int(d["table_base"], "table_base"))
            if "rule_priority" in d:
                s = replace(s, rule_priority=_int(d["rule_priority"], "rule_priority"))
            if "mark_mask" in d:
                s = replace(s, mark_mask=_int(d["mark_mask"], "mark_mask"))
            if "failback" in d:
                s = replace(s, failback=_str(d["failback"], "failback"))  # type: ignore[arg-type]
            if "conntrack" in d:
                s = replace(s, conntrack=_bool(d["conntrack"], "conntrack"))
            if "hooks" in d:
                hooks = d["hooks"]
                hooks = [hooks] if isinstance(hooks, str) else hooks
                if not isinstance(hooks, list):
                    raise IprouteError("`hooks` must be a program or a list of programs")
                s = replace(s, hooks=tuple(_str(h, "hooks") for h in hooks))
            if "hook_timeout" in d:
                s = replace(s, hook_timeout=_float(d["hook_timeout"], "hook_timeout"))
                if s.hook_timeout <= 0:
                    raise IprouteError("`hook_timeout` must be positive")
            if "metrics" in d:
                s = replace(s, metrics=_str(d["metrics"], "metrics") or None)
            if "profile" in d:
                s = replace(s, profile=_str(d["profile"], "profile"))
        except IprouteError as exc:
            self.error(where, str(exc))
        self.settings = s

    def uplink_from(self, d: dict[str, Any], where: str) -> None:
        for key in d:
            if key not in UPLINK_KEYS:
                self.error(where, f"unknown key `{key}` (known: {', '.join(sorted(UPLINK_KEYS))})")
        try:
            interface = _str(d.get("interface", ""), "interface")
            if not interface:
                raise IprouteError("needs `interface`")
            name = _str(d.get("name", interface), "name")
            gw = _addr(d["gateway"], "gateway") if d.get("gateway") else None
            src = _addr(d["source"], "source") if d.get("source") else None
            targets = None
            if "targets" in d:
                raw = d["targets"]
                if not isinstance(raw, list):
                    raise IprouteError("`targets` must be a list of addresses")
                targets = tuple(_addr(t, "target") for t in raw)
            quorum = _int(d["quorum"], "quorum") if "quorum" in d else None
            profile = _str(d["profile"], "profile") if "profile" in d else None
            overrides = {k: d[k] for k in PROFILE_FIELDS if k in d}
            probe = _bool(d["gateway_probe"], "gateway_probe") if "gateway_probe" in d else None
            table = _int(d["table"], "table") if "table" in d else None
        except IprouteError as exc:
            self.error(where, str(exc))
            return
        self.drafts.append(_Draft(name, interface, gw, src, targets, quorum, profile, overrides,
                                  probe, table, where, True))

    def rule_from(self, d: dict[str, Any], where: str) -> None:
        for key in d:
            if key not in RULE_KEYS:
                self.error(where, f"unknown key `{key}` (known: {', '.join(sorted(RULE_KEYS))})")
        words = ["ip"]
        if "family" in d:
            words.append("-6" if str(d["family"]) in ("6", "inet6", "ipv6") else "-4")
        words += ["rule", "add"]
        if d.get("not"):
            words.append("not")
        for key, word in (("priority", "prio"), ("from", "from"), ("to", "to"), ("iif", "iif"),
                          ("oif", "oif"), ("fwmark", "fwmark"), ("tos", "tos")):
            if key in d:
                words += [word, str(d[key])]
        action = str(d.get("action", "lookup"))
        if action == "lookup":
            if "table" in d:
                words += ["table", str(d["table"])]
        else:
            words.append(action)
        self._command(words, where)

    def route_from(self, d: dict[str, Any], where: str) -> None:
        for key in d:
            if key not in ROUTE_KEYS:
                self.error(where, f"unknown key `{key}` (known: {', '.join(sorted(ROUTE_KEYS))})")
        words = ["ip"]
        if "family" in d:
            words.append("-6" if str(d["family"]) in ("6", "inet6", "ipv6") else "-4")
        words += ["route", "append"]
        rtype = str(d.get("type", "unicast"))
        if rtype != "unicast":
            words.append(rtype)
        words.append(str(d.get("dst", "default")))
        for key in ("table", "metric", "scope", "src", "tos"):
            if key in d:
                words += [key, str(d[key])]
        if d.get("static"):
            words += ["proto", "static"]
        try:
            words += self._hop_words(d, where)
            hops = d.get("nexthops", [])
            if not isinstance(hops, list):
                raise IprouteError("`nexthops` must be a list of tables")
            for hop in hops:
                if not isinstance(hop, dict):
                    raise IprouteError("`nexthops` must be a list of tables")
                for key in hop:
                    if key not in NEXTHOP_KEYS:
                        raise IprouteError(f"unknown nexthop key `{key}` (known: "
                                           f"{', '.join(sorted(NEXTHOP_KEYS))})")
                words.append("nexthop")
                words += self._hop_words(hop, where)
                if "weight" in hop:
                    words += ["weight", str(hop["weight"])]
        except IprouteError as exc:
            self.error(where, str(exc))
            return
        self._command(words, where)

    def _hop_words(self, d: dict[str, Any], where: str) -> list[str]:
        words: list[str] = []
        if "uplink" in d:
            name = str(d["uplink"])
            match = [u for u in self.drafts if u.name == name]
            if not match:
                raise IprouteError(f"no [[uplink]] named {name!r} (declare uplinks before "
                                   "the routes that use them)")
            up = match[0]
            if up.gateway is not None:
                words += ["via", str(up.gateway)]
            words += ["dev", up.interface]
        if "via" in d:
            words += ["via", str(d["via"])]
        if "dev" in d:
            words += ["dev", str(d["dev"])]
        if d.get("onlink"):
            words.append("onlink")
        return words

    def _command(self, words: list[str], where: str) -> None:
        try:
            self.parser.command(" ".join(_quote(w) for w in words), where)
        except IprouteError as exc:
            self.error(where, str(exc))

    # ---- building --------------------------------------------------------------------------
    def build(self) -> RoutesConfig:
        s = self.settings
        if s.profile not in PROFILES:
            self.error(self.where, f"unknown profile {s.profile!r} (known: {', '.join(PROFILES)})")
            s = replace(s, profile="default")
        drafts = list(self.drafts)
        known = {(d.interface, d.gateway) for d in drafts}
        # infer uplinks from the gateways routes use
        for route in self.parser.routes:
            for nh in route.nexthops:
                if nh.gateway is None or nh.dev is None or (nh.dev, nh.gateway) in known:
                    continue
                known.add((nh.dev, nh.gateway))
                drafts.append(_Draft(nh.dev, nh.dev, nh.gateway, None, None, None, None, {}, None,
                                     None, route.origin, False))
        # name inferred uplinks after their device, or device-gateway when a device has several
        per_dev: dict[str, int] = {}
        for d in drafts:
            per_dev[d.interface] = per_dev.get(d.interface, 0) + 1
        for d in drafts:
            if not d.declared and per_dev[d.interface] > 1:
                d.name = f"{d.interface}-{d.gateway}"
        # source addresses from single-path routes that name one
        sources: dict[tuple[str | None, IPAddress | None], IPAddress] = {}
        for route in self.parser.routes:
            if route.src is not None and len(route.nexthops) == 1:
                nh = route.nexthops[0]
                sources.setdefault((nh.dev, nh.gateway), route.src)
        for d in drafts:
            if d.source is None:
                d.source = sources.get((d.interface, d.gateway))
        uplinks: list[UplinkSpec] = []
        names: dict[str, str] = {}
        for index, d in enumerate(drafts):
            if d.name in names:
                self.error(d.origin, f"uplink name {d.name!r} is used twice (also {names[d.name]})")
                continue
            names[d.name] = d.origin
            up = self._uplink(d, index, s)
            if up is not None:
                uplinks.append(up)
        cfg = RoutesConfig(settings=s, uplinks=tuple(uplinks), rules=tuple(self.parser.rules),
                           routes=tuple(self.parser.routes), source=str(self.path))
        self.validate(cfg)
        return cfg

    def _uplink(self, d: _Draft, index: int, s: Settings) -> UplinkSpec | None:
        where = d.origin
        prof_name = d.profile or s.profile
        if prof_name not in PROFILES:
            self.error(where, f"unknown profile {prof_name!r} (known: {', '.join(PROFILES)})")
            return None
        profile = PROFILES[prof_name]
        try:
            profile = _override(profile, d.overrides)
        except IprouteError as exc:
            self.error(where, str(exc))
            return None
        family = 4
        for a in (d.gateway, d.source, *(d.targets or ())):
            if a is not None:
                family = a.version
                break
        for what, a in (("gateway", d.gateway), ("source", d.source)):
            if a is not None and a.version != family:
                self.error(where, f"{what} {a} is IPv{a.version}, the uplink is IPv{family}")
        targets = d.targets if d.targets is not None else (
            (d.gateway,) if d.gateway is not None else ())
        for t in targets:
            if t.version != family:
                self.error(where, f"target {t} is IPv{t.version}, the uplink is IPv{family}")
        quorum = d.quorum if d.quorum is not None else min(1, len(targets))
        if targets and not 1 <= quorum <= len(targets):
            self.error(where, f"quorum {quorum} must be 1..{len(targets)} (the number of targets)")
        if not targets and d.gateway is None:
            self.warn(where, f"uplink {d.name} has no gateway and no targets: only its carrier "
                             "is watched")
        probe = d.gateway_probe if d.gateway_probe is not None else d.gateway is not None
        table = d.table if d.table is not None else s.table_base + index
        return UplinkSpec(name=d.name, interface=d.interface, family=family, gateway=d.gateway,
                          source=d.source, targets=targets, quorum=quorum, profile=profile,
                          gateway_probe=probe and d.gateway is not None, table=table,
                          mark=s.mark_for(index), origin=where)

    # ---- checks ----------------------------------------------------------------------------
    def validate(self, cfg: RoutesConfig) -> None:
        s = cfg.settings
        where = self.where
        problem = daemon_name_problem(s.name)
        if problem:
            self.error(f"{where}: [daemon]", problem)
        for up in cfg.uplinks:
            problem = interface_problem(up.interface) or uplink_name_problem(up.name)
            if problem:
                self.error(up.origin, problem)
        if s.failback not in ("stay", "move"):
            self.error(where, f"failback must be `stay` or `move`, not {s.failback!r}")
        if not 5 <= s.protocol <= 255:
            self.error(where, f"protocol {s.protocol} must be 5..255 (0-4 belong to the kernel)")
        mask = s.mark_mask
        if not 0 < mask <= 0xFFFFFFFF:
            self.error(where, f"mark_mask {mask:#x} must be a non-zero 32-bit mask "
                              "(1..0xffffffff)")
        else:
            # uplink i gets mark (i + 1) << (the mask's lowest bit): each must lie inside the
            # mask, or it is 0 or another uplink's mark under the mask (and sets foreign bits)
            marks: dict[int, str] = {}
            for up in cfg.uplinks:
                if up.mark & ~mask or not up.mark & mask or up.mark & mask in marks:
                    self.error(where, f"mark_mask {mask:#x} has too few bits for "
                                      f"{len(cfg.uplinks)} uplinks: uplink {up.name}'s mark "
                                      f"{up.mark:#x} is not inside it (use contiguous bits)")
                    break
                marks[up.mark & mask] = up.name
        if not 1 <= s.rule_priority <= 32765:
            self.error(where, f"rule_priority {s.rule_priority} must be 1..32765")
        for rule in cfg.rules:
            if rule.priority == s.rule_priority:
                self.error(rule.origin, f"priority {rule.priority} is the daemon's own "
                                        "rule_priority; choose another or change rule_priority")
        for hook in s.hooks:
            if not os.path.isfile(hook):
                self.error(where, f"hook {hook} does not exist")
            elif not os.access(hook, os.X_OK):
                self.error(where, f"hook {hook} is not executable (chmod +x {hook})")
        if s.metrics:
            problem = metrics_problem(s.metrics)
            if problem:
                self.error(where, problem)
        own_tables = {u.table: u for u in cfg.uplinks}
        config_tables = {r.table for r in cfg.routes}
        for up in cfg.uplinks:
            if up.table in (253, 254, 255, 0):
                self.error(up.origin, f"uplink {up.name}: table {table_name(up.table)} is "
                                      "not usable as an uplink's own table")
            elif not 0 < up.table < 2**32:
                self.error(up.origin, f"uplink {up.name}: table {up.table} is out of range "
                                      "1..4294967295")
            if up.table in config_tables and up.table >= s.table_base:
                self.error(up.origin, f"uplink {up.name}: its table {up.table} is also used by "
                                      "configured routes; change table_base")
        seen_pairs: dict[tuple[str, IPAddress | None], str] = {}
        for up in cfg.uplinks:
            key = (up.interface, up.gateway)
            if key in seen_pairs:
                self.error(up.origin, f"uplink {up.name} repeats device {up.interface} gateway "
                                      f"{up.gateway} of uplink {seen_pairs[key]}")
            seen_pairs[key] = up.name
        by_src: dict[IPAddress, str] = {}
        for up in cfg.uplinks:
            if up.source is None:
                continue
            if up.source in by_src and s.conntrack:
                self.warn(up.origin, f"uplinks {by_src[up.source]} and {up.name} share source "
                                     f"{up.source}: a failover of one also deletes the other's "
                                     "connections")
            by_src.setdefault(up.source, up.name)
        for route in cfg.routes:
            if route.table == 255:
                self.error(route.origin, "the local table belongs to the kernel")
            if route.table in own_tables and route.table >= s.table_base:
                self.error(route.origin, f"table {route.table} is uplink "
                                         f"{own_tables[route.table].name}'s own table")
            for nh in route.nexthops:
                if nh.gateway is not None and nh.gateway.version != route.family:
                    self.error(route.origin, f"gateway {nh.gateway} is not IPv{route.family}")
        first_of: dict[tuple[object, ...], RouteSpec] = {}
        for route in cfg.routes:
            other = first_of.setdefault(route.group_key()[:5], route)
            if other.scope != route.scope:
                # the kernel knows a route by table, destination, metric and tos: the daemon
                # owns one route per such key, so these could not both be installed
                self.error(route.origin, f"same table, destination and metric as "
                                         f"{other.origin} but another scope: give both the "
                                         "same scope (alternatives) or different metrics")
        tables_with_routes = {r.table for r in cfg.routes} | {253, 254, 255}
        for rule in cfg.rules:
            if rule.action == "lookup" and rule.table not in tables_with_routes:
                self.warn(rule.origin, f"rule looks up table {table_name(rule.table)}, which no "
                                       "configured route fills")
        if not cfg.routes and not cfg.uplinks:
            self.error(where, "nothing to do: no routes and no uplinks")

    def live_checks(self, cfg: RoutesConfig) -> None:
        """Warnings about the machine this runs on (devices that do not exist, rp_filter)."""
        devices = {nh.dev for r in cfg.routes for nh in r.nexthops if nh.dev}
        devices |= {u.interface for u in cfg.uplinks}
        for dev in sorted(devices):
            try:
                socket.if_nametoindex(dev)
            except OSError:
                self.warn(self.where, f"device {dev} does not exist here (yet); its routes wait "
                                      "for it")
                continue
            try:
                rp = Path(f"/proc/sys/net/ipv4/conf/{dev}/rp_filter").read_text().strip()
                rp_all = Path("/proc/sys/net/ipv4/conf/all/rp_filter").read_text().strip()
            except OSError:
                continue
            if max(int(rp), int(rp_all)) == 1 and any(u.interface == dev for u in cfg.uplinks):
                self.warn(self.where, f"rp_filter=1 (strict) on {dev} drops probe replies while "
                                      f"{dev} is not the best path: set "
                                      f"net.ipv4.conf.{dev}.rp_filter=2")


def daemon_name_problem(name: str) -> str | None:
    """Why `name` cannot name a routes daemon, or None. It names the instance (its lock and
    owned-state record), the control socket <name>.sock and the nftables table ipshift_<name>,
    whose names take only letters, digits and . _ -."""
    if name and len(name) <= MAX_NAME and not all(c.isascii() and (c.isalnum() or c in "._-")
                                                   for c in name):
        return (f"the daemon name {name!r} may use only letters, digits and . _ - (it also "
                "names the nftables table ipshift_<name>)")
    return name_problem(name, "daemon name")  # the runtime's rules: length, no leading dot


def uplink_name_problem(name: str) -> str | None:
    """Why `name` cannot name an uplink, or None: it goes into hooks' environment, status
    lines, metrics labels and logs, so it is short, printable and has no whitespace."""
    if not name:
        return "an uplink name is empty"
    if len(name) > MAX_UPLINK_NAME:
        return (f"uplink name {name[:20]!r}... is {len(name)} characters; at most "
                f"{MAX_UPLINK_NAME}")
    if not all(c.isprintable() and not c.isspace() for c in name):
        return f"uplink name {name!r} has whitespace or control characters"
    return None


def metrics_problem(value: str) -> str | None:
    """Why a metrics address (`ADDRESS:PORT`, from the file or --metrics) is unusable, or None."""
    host, _, port = value.rpartition(":")
    ok = port.isascii() and port.isdigit() and 0 < int(port) < 65536
    if not host.strip("[]") or not ok:
        return f"metrics {value!r} must be ADDRESS:PORT, e.g. 127.0.0.1:9465"
    return None


class _UnreadableError(Exception):
    """A configuration file cannot be read; str() says why, in one line."""


def _read_text(path: Path) -> str:
    """A configuration file's text: UTF-8, at most MAX_CONFIG_BYTES (read no further, so that
    /dev/zero or an endless pipe cannot exhaust memory)."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise _UnreadableError(f"cannot read: {exc.strerror or exc}") from exc
    except ValueError as exc:  # a NUL in the file name
        raise _UnreadableError("cannot read: the file name holds a NUL character") from exc
    if len(data) > MAX_CONFIG_BYTES:
        raise _UnreadableError(f"cannot read: larger than {MAX_CONFIG_BYTES >> 20} MiB; is it "
                               "the configuration?")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _UnreadableError(_not_utf8(exc)) from exc


def _parse_toml(text: str, source: str) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([Problem(source, f"not valid TOML: {exc}")]) from exc
    except RecursionError as exc:
        # tomllib recurses once per nested array or inline table
        raise ConfigError([Problem(source, TOO_DEEP)]) from exc


def _tables(value: Any, what: str, loader: _Loader) -> list[dict[str, Any]]:
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        loader.error(loader.where, f"[[{what}]] entries must be tables")
        return []
    return value


def _not_utf8(exc: UnicodeDecodeError) -> str:
    return f"cannot read: not UTF-8 text (byte {exc.object[exc.start]:#04x} at offset {exc.start})"


def _quote(word: str) -> str:
    return word if word and all(c.isalnum() or c in "./:-_" for c in word) else repr(word)


def _str(value: Any, key: str) -> str:
    if not isinstance(value, str):
        raise IprouteError(f"`{key}` must be a string")
    return value


def _int(value: Any, key: str) -> int:
    if isinstance(value, str):
        number = parse_number(value)
        if number is None:
            raise IprouteError(f"`{key}` must be an integer")
        return number
    if not isinstance(value, int) or isinstance(value, bool):
        raise IprouteError(f"`{key}` must be an integer")
    return value


def _float(value: Any, key: str) -> float:
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise IprouteError(f"`{key}` must be a number")
    if not math.isfinite(value):
        raise IprouteError(f"`{key}` must be a finite number, not {value}")
    return float(value)


def _bool(value: Any, key: str) -> bool:
    if not isinstance(value, bool):
        raise IprouteError(f"`{key}` must be true or false")
    return value


def _addr(value: Any, key: str) -> IPAddress:
    if not isinstance(value, str):
        raise IprouteError(f"{key} {value!r} must be a string holding an IP address")
    return Parser.address(value, None, key)


def _override(profile: Profile, overrides: dict[str, Any]) -> Profile:
    if not overrides:
        return profile
    values: dict[str, Any] = {}
    for key, value in overrides.items():
        if key in ("down_count", "up_count", "window"):
            v: float | int | None = _int(value, key)
            if v is not None and v < 1:
                raise IprouteError(f"`{key}` must be at least 1")
        elif key in ("max_loss", "max_rtt") and value is False:
            v = None
        else:
            v = _float(value, key)
            if key in ("interval", "timeout", "arp_interval") and v <= 0:
                raise IprouteError(f"`{key}` must be positive")
            if key == "max_loss" and not 0 < v <= 100:
                raise IprouteError("`max_loss` is a percentage, 0 < max_loss <= 100")
            if v < 0:
                raise IprouteError(f"`{key}` must not be negative")
        values[key] = v
    return replace(profile, name=f"{profile.name}+", **values)


def load(path: str | Path, *, tables: dict[str, int] | None = None) -> RoutesConfig:
    """Read a configuration; raise ConfigError if it has errors (warnings are kept aside)."""
    cfg, problems = check(path, tables=tables)
    errors = [p for p in problems if p.severity == "error"]
    if errors or cfg is None:
        raise ConfigError(errors or problems)
    return cfg


def check(path: str | Path, *, tables: dict[str, int] | None = None,
          live: bool = False) -> tuple[RoutesConfig | None, list[Problem]]:
    """Every problem of a configuration, one line each, and the configuration if usable."""
    loader = _Loader(Path(path), tables)
    try:
        loader.read()
    except ConfigError as exc:
        return None, exc.problems
    cfg = loader.build()
    if live:
        loader.live_checks(cfg)
    return cfg, loader.problems


def loads(text: str, *, toml: bool = False, source: str = "<text>",
          tables: dict[str, int] | None = None) -> RoutesConfig:
    """Parse configuration text (tests, demo, bench)."""
    loader = _Loader(Path(source + (".toml" if toml else "")), tables)
    if toml:
        loader.toml(_parse_toml(text, source))
    else:
        loader.parser.feed(text, source)
    cfg = loader.build()
    errors = [p for p in loader.problems if p.severity == "error"]
    if errors:
        raise ConfigError(errors)
    return cfg


__all__ = ["ROUTE_TYPES", "SCOPE_NAMES", "ConfigError", "Nexthop", "RouteSpec", "RuleSpec",
           "check", "load", "loads", "metrics_problem"]
