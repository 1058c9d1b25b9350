"""The seed's configuration language: `ip rule` and `ip route` command lines (iproute2 syntax).

    ip rule add prio 20 from 198.51.100.0/24 table 20
    ip route append default via 198.51.100.1 dev wan0 src 198.51.100.2 table 20
    ip route add default table 100 \\
        nexthop via 198.51.100.1 dev wan0 weight 2 \\
        nexthop via 203.0.113.1 dev wan1
    ip route add 203.0.113.0/26 table 100 proto static dev wan0

`parse_commands` turns such text into RouteSpec/RuleSpec objects and a list of problems, one line
each, that point at the offending line. Comments (#) and backslash continuations work as in a
shell script, so the seed's examples can be used as they are written. Commands other than
`ip rule`/`ip route` (iptables, ipchains, ifconfig...) are reported and skipped: NAT belongs to
nftables/iptables, which the daemon does not manage.
"""

from __future__ import annotations

import ipaddress
import re
import shlex
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

from ipshift.routes.model import (
    ROUTE_TYPES,
    SCOPE_NAMES,
    TABLE_NAMES,
    IPAddress,
    IPNetwork,
    Nexthop,
    RouteSpec,
    RuleSpec,
)

RT_TABLES_FILES = (
    Path("/etc/iproute2/rt_tables"),
    Path("/usr/share/iproute2/rt_tables"),
    Path("/usr/lib/iproute2/rt_tables"),
)


@dataclass(frozen=True)
class Problem:
    where: str  # "file:line" or "file"
    message: str
    severity: str = "error"  # "error" stops the daemon; "warning" is printed and ignored

    def __str__(self) -> str:
        tag = "" if self.severity == "error" else "warning: "
        text = f"{self.where}: {tag}{self.message}" if self.where else f"{tag}{self.message}"
        # one line whatever the input held: control characters (a NUL, a carriage return) are
        # shown escaped, never written to the terminal
        return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


IFNAMSIZ = 16  # Linux: an interface name is at most IFNAMSIZ - 1 bytes
_IFNAME_REFUSED = set('/:"*\\')


def interface_problem(name: str) -> str | None:
    """Why `name` cannot be a Linux interface name here, or None: at most 15 bytes, not `.` or
    `..`, no '/', ':' or whitespace (the kernel's rules); no '"', '*' or '\\' either, nor control
    characters (the name is written into an nftables rule, where those quote or match more)."""
    shown = repr(name) if len(name) <= 40 else repr(name[:40]) + "..."
    if not name:
        return "an interface name is empty"
    if name in (".", ".."):
        return f"{shown} is not an interface name"
    size = len(name.encode("utf-8", "surrogatepass"))
    if size > IFNAMSIZ - 1:
        return (f"interface name {shown} is {size} bytes; Linux interface names have at most "
                f"{IFNAMSIZ - 1}: give the device's name as `ip link` shows it")
    bad = sorted({c for c in name if c in _IFNAME_REFUSED or c.isspace() or not c.isprintable()})
    if bad:
        return (f"interface name {shown} contains {' '.join(repr(c) for c in bad)}: an "
                "interface name has no whitespace, control characters or any of / : \" * \\")
    return None


class IprouteError(ValueError):
    """One malformed command; the message is the one-line explanation."""


# iproute2 reads numbers with strtoul(..., 0): ASCII decimal, 0x hex or 0 octal. No signs, no
# underscores, no other scripts' digits ("²".isdigit() and int("٣") are both true in Python).
_NUMBER = re.compile(r"0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*")


def parse_number(word: str) -> int | None:
    """The value of an iproute2 unsigned number, None when `word` is not one."""
    if _NUMBER.fullmatch(word) is None:
        return None
    if word[:2] in ("0x", "0X"):
        return int(word, 16)
    return int(word, 8) if word.startswith("0") else int(word, 10)


def system_table_names() -> dict[str, int]:
    """Table names from iproute2's rt_tables files (plus main/default/local)."""
    names = dict(TABLE_NAMES)
    files: list[Path] = []
    for base in RT_TABLES_FILES:
        files.append(base)
        d = base.with_name("rt_tables.d")
        if d.is_dir():
            files.extend(sorted(d.glob("*.conf")))
    for f in files:
        try:
            text = f.read_text()
        except OSError:
            continue
        for line in text.splitlines():
            parts = line.split("#", 1)[0].split()
            value = parse_number(parts[0]) if len(parts) >= 2 else None
            if value is not None:
                names.setdefault(parts[1], value)
    return names


def logical_lines(text: str) -> Iterator[tuple[int, str]]:
    """(first line number, text) of each command: comments stripped, continuations joined."""
    buf: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), 1):
        line = _strip_comment(raw)
        if not buf:
            start = number
        if line.rstrip().endswith("\\"):
            buf.append(line.rstrip()[:-1])
            continue
        buf.append(line)
        joined = " ".join(part.strip() for part in buf).strip()
        buf = []
        if joined:
            yield start, joined
    if buf:
        joined = " ".join(part.strip() for part in buf).strip()
        if joined:
            yield start, joined


def _strip_comment(line: str) -> str:
    quote = ""
    for i, ch in enumerate(line):
        if quote:
            if ch == quote:
                quote = ""
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i]
    return line


class Parser:
    """Accumulates rules and routes from command lines with iproute2's add/append semantics."""

    def __init__(self, tables: dict[str, int] | None = None):
        self.tables = tables if tables is not None else system_table_names()
        self.routes: list[RouteSpec] = []
        self.rules: list[RuleSpec] = []
        self._by_key: dict[tuple[object, ...], list[RouteSpec]] = {}  # alternatives, in order
        self.problems: list[Problem] = []

    # ---- entry points ----------------------------------------------------------------------
    def feed(self, text: str, source: str = "") -> None:
        for number, line in logical_lines(text):
            where = f"{source}:{number}" if source else f"line {number}"
            try:
                self.command(line, where)
            except IprouteError as exc:
                self.problems.append(Problem(where, str(exc)))

    def command(self, line: str, where: str) -> None:
        try:
            words = shlex.split(line)
        except ValueError as exc:
            raise IprouteError(f"cannot split the line: {exc}") from exc
        if not words:
            return
        prog = words[0].rsplit("/", 1)[-1]
        if prog != "ip":
            self.problems.append(Problem(
                where, f"`{prog}` skipped: only `ip rule` and `ip route` lines are read here "
                "(set NAT up with nftables or iptables yourself)", "warning"))
            return
        args = words[1:]
        family: int | None = None
        while args and args[0].startswith("-"):
            opt = args.pop(0)
            if opt in ("-4",):
                family = 4
            elif opt in ("-6",):
                family = 6
            elif opt in ("-f", "-family") and args:
                fam = args.pop(0)
                family = {"inet": 4, "inet6": 6}.get(fam)
                if family is None:
                    raise IprouteError(f"unsupported family {fam!r} (use inet or inet6)")
            else:
                raise IprouteError(f"unsupported ip option {opt!r}")
        if not args:
            raise IprouteError("`ip` needs an object: rule or route")
        obj = args.pop(0)
        if "route".startswith(obj) and len(obj) >= 2:
            self._route(args, family, where)
        elif "rule".startswith(obj) and len(obj) >= 2:
            self._rule(args, family, where)
        else:
            raise IprouteError(f"`ip {obj}` is not understood here; only `ip rule` and "
                               "`ip route` configure the daemon")

    # ---- helpers ---------------------------------------------------------------------------
    def table(self, word: str) -> int:
        value = parse_number(word)
        if value is not None:
            if not 0 < value < 2**32:
                raise IprouteError(f"table {word} is out of range 1..4294967295")
            return value
        if word in self.tables:
            return self.tables[word]
        raise IprouteError(f"unknown table {word!r}: use a number or a name from rt_tables")

    @staticmethod
    def number(word: str, what: str, maximum: int = 2**32 - 1) -> int:
        value = parse_number(word)
        if value is None:
            raise IprouteError(f"{what} {word!r} is not a number")
        if not 0 <= value <= maximum:
            raise IprouteError(f"{what} {word} is out of range 0..{maximum}")
        return value

    @staticmethod
    def device(word: str) -> str:
        problem = interface_problem(word)
        if problem:
            raise IprouteError(problem)
        return word

    @staticmethod
    def address(word: str, family: int | None, what: str = "address") -> IPAddress:
        if "%" in word:
            raise IprouteError(f"{what} {word!r}: a zone id (%DEV) is not accepted; give the "
                               "device with `dev`")
        try:
            addr = ipaddress.ip_address(word)
        except ValueError as exc:
            raise IprouteError(f"{what} {word!r} is not an IP address") from exc
        if family is not None and addr.version != family:
            raise IprouteError(f"{what} {word} is IPv{addr.version} in an IPv{family} command")
        return addr

    @staticmethod
    def prefix(word: str, family: int | None) -> IPNetwork:
        fam = family or 4
        if word in ("default", "all", "any"):
            return ipaddress.ip_network("::/0" if fam == 6 else "0.0.0.0/0")
        if "%" in word:
            raise IprouteError(f"prefix {word!r}: a zone id (%DEV) is not accepted")
        try:
            net = ipaddress.ip_network(word, strict=True)
        except ValueError as exc:
            try:
                ipaddress.ip_network(word, strict=False)
            except ValueError:
                raise IprouteError(f"{word!r} is not a prefix") from exc
            raise IprouteError(f"prefix {word} has host bits set") from exc
        if family is not None and net.version != family:
            raise IprouteError(f"prefix {word} is IPv{net.version} in an IPv{family} command")
        return net

    # ---- ip rule ---------------------------------------------------------------------------
    def _rule(self, args: list[str], family: int | None, where: str) -> None:
        if not args:
            raise IprouteError("`ip rule` needs a command: add, append or del")
        cmd = args.pop(0)
        if cmd not in ("add", "append", "prepend", "insert", "del", "delete"):
            raise IprouteError(f"`ip rule {cmd}` is not a configuration command "
                               "(use add or del)")
        fields: dict[str, object] = {}
        fam = family
        action = "lookup"
        table = 254
        table_given = False
        invert = False
        it = iter(args)

        def need(word: str) -> str:
            value = next(it, None)
            if value is None:
                raise IprouteError(f"`{word}` needs a value")
            return value

        for word in it:
            if word == "not":
                raise IprouteError("`not` rules are not supported; write the rule positively")
            elif word in ("from", "to"):
                value = need(word)
                if value == "all":
                    continue
                net = self.prefix(value if "/" in value else _host(value), fam)
                fam = fam or net.version
                fields["src" if word == "from" else "dst"] = net
            elif word in ("prio", "priority", "pref", "preference", "order"):
                fields["priority"] = self.number(need(word), "priority")
            elif word in ("table", "lookup"):
                table = self.table(need(word))
                table_given = True
            elif word in ("iif", "dev"):
                fields["iif"] = self.device(need(word))
            elif word == "oif":
                fields["oif"] = self.device(need(word))
            elif word == "fwmark":
                value = need(word)
                mark, _, mask = value.partition("/")
                fwmark = self.number(mark, "fwmark")
                if mask:
                    fields["fwmark"] = fwmark
                    fields["fwmask"] = self.number(mask, "fwmark mask")
                elif fwmark:
                    fields["fwmark"] = fwmark
                # `fwmark 0` alone: the kernel gives mark 0 mask 0, a rule that ignores marks
            elif word in ("tos", "dsfield"):
                raise IprouteError("`tos` in rules is not supported")
            elif word in ("unreachable", "blackhole", "prohibit"):
                action = word
            elif word == "type":
                action = need(word)
                if action == "unicast":
                    action = "lookup"
                if action not in ("lookup", "unreachable", "blackhole", "prohibit"):
                    raise IprouteError(f"rule type {action!r} is not supported")
            elif word in ("nat", "map-to"):
                raise IprouteError("`nat` in rules was removed from Linux in 2.6: drop it and "
                                   "masquerade with nftables/iptables instead")
            elif word in ("proto", "protocol"):
                need(word)  # the daemon marks what it owns with its own protocol
            else:
                raise IprouteError(f"`ip rule` option {word!r} is not supported")
        if "priority" not in fields:
            raise IprouteError("give the rule a priority (`prio N`): without one the kernel "
                               "picks it and the rule cannot be owned reliably")
        if action != "lookup" and table_given:
            raise IprouteError(f"a {action} rule takes no table")
        rule = RuleSpec(family=fam or 4, table=table if action == "lookup" else 0, action=action,
                        invert=invert, origin=where, **fields)  # type: ignore[arg-type]
        if cmd in ("del", "delete"):
            before = len(self.rules)
            self.rules = [r for r in self.rules if not _same_rule(r, rule)]
            if len(self.rules) == before:
                raise IprouteError("`ip rule del` matches no rule given before it")
            return
        for other in self.rules:
            if _same_rule(other, rule):
                raise IprouteError(f"the same rule is given twice (first at {other.origin})")
        self.rules.append(rule)

    # ---- ip route --------------------------------------------------------------------------
    def _route(self, args: list[str], family: int | None, where: str) -> None:
        if not args:
            raise IprouteError("`ip route` needs a command: add, append, replace or del")
        cmd = args.pop(0)
        if cmd not in ("add", "append", "replace", "prepend", "change", "del", "delete"):
            raise IprouteError(f"`ip route {cmd}` is not a configuration command "
                               "(use add, append, replace, prepend or del)")
        route = self._route_spec(args, family, where)
        key = route.group_key()
        group = self._by_key.get(key, [])
        if cmd in ("del", "delete"):
            victims = [r for r in group if not route.nexthops or r.nexthops == route.nexthops]
            if not victims:
                raise IprouteError("`ip route del` matches no route given before it")
            self.routes.remove(victims[0])
            group.remove(victims[0])
            return
        if cmd == "add" and group:
            raise IprouteError(
                f"route {route.describe()} exists already ({group[0].origin}); use "
                "`ip route append` to make it an alternative")
        if cmd in ("replace", "change"):
            if group:
                self.routes[self.routes.index(group[0])] = route
                group[0] = route
                return
            if cmd == "change":
                raise IprouteError("`ip route change` matches no route given before it")
        if cmd == "prepend" and group:
            self.routes.insert(self.routes.index(group[0]), route)
            group.insert(0, route)
            return
        for other in group:
            if other.nexthops == route.nexthops and other.src == route.src:
                raise IprouteError(f"the same route is given twice (first at {other.origin})")
        self.routes.append(route)
        self._by_key.setdefault(key, []).append(route)

    def _route_spec(self, args: list[str], family: int | None, where: str) -> RouteSpec:
        fam = family
        rtype = "unicast"
        dst: IPNetwork | None = None
        table = 254
        metric = 0
        scope: int | None = None
        src: IPAddress | None = None
        tos = 0
        static = False
        main_hop: dict[str, object] = {}
        hops: list[Nexthop] = []
        it = iter(args)

        def need(word: str) -> str:
            value = next(it, None)
            if value is None:
                raise IprouteError(f"`{word}` needs a value")
            return value

        current = main_hop
        for word in it:
            if word in ROUTE_TYPES and dst is None:
                rtype = word
            elif word == "to":
                if dst is not None:
                    raise IprouteError("the destination is given twice")
                dst = self.prefix(need(word), fam)
                fam = fam if dst.prefixlen == 0 else fam or dst.version
            elif word == "nexthop":
                if current is not main_hop or hops:
                    hops.append(self._nexthop(current, fam))
                elif main_hop:
                    raise IprouteError("give `via`/`dev` either before the nexthops or inside "
                                       "each `nexthop`, not both")
                current = {}
            elif word == "via":
                value = need(word)
                if value in ("inet", "inet6"):
                    value = need(word)
                addr = self.address(value, None, "gateway")
                if fam is not None and addr.version != fam:
                    raise IprouteError(f"gateway {addr} is IPv{addr.version} in an "
                                       f"IPv{fam} route")
                fam = fam or addr.version
                current["gateway"] = addr
            elif word in ("dev", "oif"):
                current["dev"] = self.device(need(word))
            elif word == "weight":
                weight = self.number(need(word), "weight", 256)
                if weight < 1:
                    raise IprouteError("weight must be 1..256")
                current["weight"] = weight
            elif word == "onlink":
                current["onlink"] = True
            elif word == "table":
                table = self.table(need(word))
            elif word in ("metric", "priority", "preference"):
                metric = self.number(need(word), "metric")
            elif word == "scope":
                value = need(word)
                scope = SCOPE_NAMES.get(value)
                if scope is None:
                    scope = self.number(value, "scope", 255)
            elif word == "src":
                src = self.address(need(word), fam, "source")
                fam = fam or src.version
            elif word in ("proto", "protocol"):
                value = need(word)
                static = value in ("static", "4")
            elif word in ("tos", "dsfield"):
                raise IprouteError("`tos` routes are not supported")
            elif dst is None and not word.startswith("-"):
                if word in ("default", "all", "any"):
                    dst = self.prefix(word, fam)  # family still open: fixed below
                else:
                    dst = self.prefix(word if "/" in word else _host(word), fam)
                    fam = fam or dst.version
            else:
                raise IprouteError(f"`ip route` option {word!r} is not supported")
        if dst is None:
            raise IprouteError("the route has no destination (a prefix or `default`)")
        if fam is not None and dst.version != fam:
            # `default` was read before the family was known
            if dst.prefixlen == 0:
                dst = self.prefix("default", fam)
            else:
                raise IprouteError(f"destination {dst} does not match the gateway's family")
        multipath = current is not main_hop
        if multipath:
            hops.append(self._nexthop(current, fam))
        elif main_hop:
            hops = [self._nexthop(main_hop, fam)]
        if rtype == "unicast" and not hops:
            raise IprouteError("a unicast route needs `via GATEWAY`, `dev DEVICE` or nexthops")
        if rtype != "unicast" and hops:
            raise IprouteError(f"a {rtype} route takes no gateway or device")
        if src is not None and src.version != dst.version:
            raise IprouteError(f"source {src} does not match the route's family")
        if not multipath and "weight" in main_hop:
            raise IprouteError("`weight` belongs to a `nexthop`")
        return RouteSpec(family=dst.version, table=table, dst=dst, nexthops=tuple(hops),
                         metric=metric, scope=scope, type=rtype, src=src, tos=tos,
                         multipath=multipath, static=static, origin=where)

    @staticmethod
    def _nexthop(fields: dict[str, object], family: int | None) -> Nexthop:
        if not fields.get("dev") and not fields.get("gateway"):
            raise IprouteError("a nexthop needs `via GATEWAY` and/or `dev DEVICE`")
        if not fields.get("dev"):
            raise IprouteError(f"give the device of gateway {fields['gateway']} (`dev NAME`): "
                               "the daemon watches uplinks by device")
        return Nexthop(dev=str(fields["dev"]), gateway=fields.get("gateway"),  # type: ignore[arg-type]
                       weight=int(fields.get("weight", 1)),  # type: ignore[call-overload]
                       onlink=bool(fields.get("onlink", False)))


def _host(word: str) -> str:
    return word + ("/128" if ":" in word else "/32")


def _same_rule(a: RuleSpec, b: RuleSpec) -> bool:
    return replace(a, origin="") == replace(b, origin="")


def parse_commands(
    text: str, source: str = "", *, tables: dict[str, int] | None = None
) -> tuple[list[RuleSpec], list[RouteSpec], list[Problem]]:
    parser = Parser(tables)
    parser.feed(text, source)
    return parser.rules, parser.routes, parser.problems

