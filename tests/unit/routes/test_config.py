"""Configuration: the seed's iproute2 syntax, TOML, uplink inference and one-line problems."""

import ipaddress
import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ipshift.routes import config
from ipshift.routes.config import ConfigError
from ipshift.routes.iproute import Parser, logical_lines, parse_commands

EXAMPLES = Path(__file__).resolve().parents[3] / "examples" / "routes"
TABLES = {"main": 254, "default": 253, "local": 255}

SEED_MASQUERADE = """
# First, check the link routes by destination
ip rule add prio 10 table main
ip rule add prio 20 from 198.51.100.0/26 table 20
ip route append default via 198.51.100.1 dev wan0 src 198.51.100.2 table 20
ip rule add prio 30 from 203.0.113.0/26 table 30
ip route append default via 203.0.113.1 dev wan1 src 203.0.113.2 table 30
ip rule add prio 100 from 192.0.2.0/24 table 100
ip route add default table 100 \\
        nexthop via 198.51.100.1 dev wan0 \\
        nexthop via 203.0.113.1 dev wan1
ip rule add prio 200 table 200
ip route append default via 198.51.100.1 dev wan0 src 198.51.100.2 table 200
ip route append default via 203.0.113.1 dev wan1 src 203.0.113.2 table 200
"""


def test_seed_masquerade_example_parses_as_written():
    cfg = config.loads(SEED_MASQUERADE, tables=TABLES)
    assert [r.priority for r in cfg.rules] == [10, 20, 30, 100, 200]
    assert cfg.rules[0].table == 254 and cfg.rules[1].src == ipaddress.ip_network(
        "198.51.100.0/26")
    multipath = [r for r in cfg.routes if r.table == 100]
    assert len(multipath) == 1 and multipath[0].multipath
    assert [nh.dev for nh in multipath[0].nexthops] == ["wan0", "wan1"]
    alternatives = cfg.groups()[(4, 200, ipaddress.ip_network("0.0.0.0/0"), 0, 0, None)]
    assert [r.nexthops[0].dev for r in alternatives] == ["wan0", "wan1"]
    # uplinks inferred from the gateways, sources from the single-path routes
    assert [(u.name, str(u.gateway), str(u.source)) for u in cfg.uplinks] == [
        ("wan0", "198.51.100.1", "198.51.100.2"), ("wan1", "203.0.113.1", "203.0.113.2")]
    assert all(u.targets == (u.gateway,) and u.gateway_probe for u in cfg.uplinks)
    assert len({u.table for u in cfg.uplinks}) == 2 and len({u.mark for u in cfg.uplinks}) == 2


def test_example_files_check_clean():
    for path in sorted(EXAMPLES.iterdir()):
        cfg, problems = config.check(path, tables=TABLES)
        errors = [str(p) for p in problems if p.severity == "error"]
        assert cfg is not None and not errors, (path, errors)


def test_static_routes_and_multipath_weights():
    text = """
    ip route add 203.0.113.0/26 table 100 proto static nexthop dev ppp0 \\
        nexthop via 192.0.2.1 dev eth0 weight 3
    ip route add 198.51.100.0/24 table 100 proto static dev wan0
    """
    rules, routes, problems = parse_commands(text, tables=TABLES)
    assert not problems and not rules
    assert routes[0].static and routes[0].multipath
    assert [(nh.dev, nh.weight) for nh in routes[0].nexthops] == [("ppp0", 1), ("eth0", 3)]
    assert routes[1].nexthops[0].gateway is None and routes[1].static


def test_alternative_direct_and_gatewayed_routes():
    text = """
    ip route append 203.0.113.0/26 via 192.0.2.1 dev eth0
    ip route append 203.0.113.0/26 via 192.0.2.2 dev eth0
    ip route append 203.0.113.0/26 via 198.51.100.1 dev eth1
    """
    cfg = config.loads(text, tables=TABLES)
    assert len(cfg.groups()) == 1
    names = [u.name for u in cfg.uplinks]
    # two gateways on one device: uplinks are named device-gateway
    assert names == ["eth0-192.0.2.1", "eth0-192.0.2.2", "eth1"]


def test_ipv6_routes_and_rules():
    text = """
    ip -6 rule add prio 20 from 2001:db8:1::/48 table 20
    ip -6 route append default via 2001:db8:1::1 dev wan0 table 20
    ip route append default via fe80::1 dev wan1 table 20
    """
    cfg = config.loads(text, tables=TABLES)
    assert cfg.rules[0].family == 6
    assert [r.family for r in cfg.routes] == [6, 6]
    assert {u.family for u in cfg.uplinks} == {6}


@pytest.mark.parametrize("line, fragment", [
    ("ip route add default via 198.51.100.1", "give the device"),
    ("ip route add default table 100 via 198.51.100.1 dev wan0 weight 2", "weight"),
    ("ip rule add from 192.0.2.0/24 table 100", "priority"),
    ("ip rule add prio 100 from 192.0.2.0/24 table 100 nat 0", "nat"),
    ("ip route add default via 198.51.100.1 dev wan0 realm 3", "realm"),
    ("ip route add 203.0.113.1/26 dev wan0", "host bits"),
    ("ip route add default via 2001:db8::1 dev wan0 src 198.51.100.2", "IPv"),
    ("ip route add default table nosuch via 198.51.100.1 dev wan0", "unknown table"),
    ("ip link set wan0 up", "ip link"),
    ("ip route flush table 100", "not a configuration command"),
    ("ip route add default", "needs"),
])
def test_problems_are_one_line_and_name_the_line(line, fragment):
    _, _, problems = parse_commands("\n" + line + "\n", "f.ip", tables=TABLES)
    assert len(problems) == 1
    text = str(problems[0])
    assert "\n" not in text and text.startswith("f.ip:2:") and fragment in text


def test_add_twice_needs_append():
    text = ("ip route add default via 198.51.100.1 dev wan0\n"
            "ip route add default via 203.0.113.1 dev wan1\n")
    _, routes, problems = parse_commands(text, tables=TABLES)
    assert len(routes) == 1 and "append" in str(problems[0])


def test_other_commands_are_warnings():
    text = "ipchains -A forward -s 192.0.2.0/24 -j MASQ\nip rule add prio 10 table main\n"
    rules, _, problems = parse_commands(text, tables=TABLES)
    assert len(rules) == 1 and problems[0].severity == "warning"


def test_replace_prepend_delete():
    p = Parser(TABLES)
    p.feed("ip route append default via 198.51.100.1 dev wan0\n"
           "ip route prepend default via 203.0.113.1 dev wan1\n"
           "ip route replace default via 198.51.100.9 dev wan0\n"
           "ip route append default via 198.51.100.2 dev wan0\n"
           "ip route del default via 198.51.100.1 dev wan0\n")
    assert not p.problems
    # prepend puts wan1 first, replace swaps the first of the group (as the kernel does)
    assert [str(r.nexthops[0].gateway) for r in p.routes] == ["198.51.100.9", "198.51.100.2"]


def test_logical_lines_comments_and_continuations():
    text = "a b # comment\n# only comment\nc \\\n  d\\\n e\n'#x' y\n"
    assert list(logical_lines(text)) == [(1, "a b"), (3, "c d e"), (6, "'#x' y")]


def test_toml_uplinks_rules_routes(tmp_path):
    hook = tmp_path / "hook.sh"
    hook.write_text("#!/bin/sh\n")
    hook.chmod(0o755)
    (tmp_path / "extra.ip").write_text("ip rule add prio 10 table main\n")
    path = tmp_path / "r.toml"
    path.write_text(f"""
include = ["extra.ip"]
[daemon]
profile = "fast"
hooks = ["{hook}"]
failback = "move"
metrics = "127.0.0.1:9465"

[[uplink]]
name = "isp1"
interface = "wan0"
gateway = "198.51.100.1"
source = "198.51.100.2"
targets = ["203.0.113.200", "203.0.113.201"]
quorum = 1
interval = 0.1

[[uplink]]
name = "isp2"
interface = "wan1"
gateway = "203.0.113.1"
profile = "default"

[[rule]]
priority = 100
from = "192.0.2.0/24"
table = 100

[[route]]
table = 100
nexthops = [{{ uplink = "isp1", weight = 2 }}, {{ uplink = "isp2" }}]

[[route]]
table = 200
uplink = "isp1"
src = "198.51.100.2"

[[route]]
table = 200
uplink = "isp2"
""")
    cfg = config.load(path, tables=TABLES)
    isp1, isp2 = cfg.uplinks
    assert isp1.profile.interval == 0.1 and isp1.profile.down_count == 10
    assert isp1.targets == (ipaddress.ip_address("203.0.113.200"),
                            ipaddress.ip_address("203.0.113.201"))
    assert isp2.profile.name == "default" and isp2.targets == (isp2.gateway,)
    assert cfg.settings.failback == "move" and cfg.settings.hooks == (str(hook),)
    assert [r.priority for r in cfg.rules] == [10, 100]
    mp = cfg.routes[0]
    assert mp.multipath and [nh.weight for nh in mp.nexthops] == [2, 1]
    assert len(cfg.groups()) == 2


@pytest.mark.parametrize("body, fragment", [
    ('[daemon]\nfailback = "never"\n', "failback"),
    ('[daemon]\nprofile = "turbo"\n', "unknown profile"),
    ('[daemon]\nhooks = ["/nonexistent/hook"]\n', "does not exist"),
    ('[daemon]\nmetrics = "9465"\n', "ADDRESS:PORT"),
    ('[daemon]\nbogus = 1\n', "unknown key"),
    ('[[uplink]]\ninterface = "wan0"\ngateway = "198.51.100.1"\nquorum = 3\n', "quorum"),
    ('[[uplink]]\ninterface = "wan0"\ngateway = "198.51.100.1"\ninterval = 0\n', "positive"),
    ('[[uplink]]\ngateway = "198.51.100.1"\n', "interface"),
    ('[[uplink]]\ninterface = "wan0"\ngateway = "2001:db8::1"\nsource = "198.51.100.2"\n',
     "IPv"),
    ('[[route]]\nuplink = "nope"\n', "no [[uplink]]"),
    ('[[route]]\ntable = 255\nvia = "198.51.100.1"\ndev = "wan0"\n', "local table"),
    ('[[rule]]\npriority = 5\ntable = 100\n', "rule_priority"),
    ('ip = "ip route add default dev"\n', "needs a value"),
    ('', "nothing to do"),
    ('x = [\n', "not valid TOML"),
])
def test_toml_problems(tmp_path, body, fragment):
    path = tmp_path / "c.toml"
    path.write_text(body)
    _cfg, problems = config.check(path, tables=TABLES)
    errors = [str(p) for p in problems if p.severity == "error"]
    assert errors, body
    assert any(fragment in e for e in errors), errors
    assert all("\n" not in e for e in errors)
    with pytest.raises(ConfigError):
        config.load(path, tables=TABLES)


def test_missing_file_is_one_line():
    _, problems = config.check("/nonexistent/routes.toml")
    assert len(problems) == 1 and "cannot read" in str(problems[0])


WORDS = st.sampled_from(["ip", "route", "rule", "add", "append", "default", "via", "dev",
                         "nexthop", "weight", "table", "prio", "from", "src", "proto", "static",
                         "198.51.100.1", "wan0", "100", "2", "192.0.2.0/24", "\\", "#", "-6",
                         "metric", "scope", "link", "onlink", "blackhole", "2001:db8::1", "not",
                         "fwmark", "0x10/0xff", "lookup", "main", "del", "replace"])


@settings(max_examples=400, deadline=None)
@given(st.lists(st.lists(WORDS, max_size=14), max_size=6))
def test_parser_never_crashes(lines):
    """Any word salad yields routes/rules or one-line problems, never an exception."""
    text = "\n".join(" ".join(words) for words in lines)
    _rules, routes, problems = parse_commands(text, tables=TABLES)
    for p in problems:
        assert "\n" not in str(p)
    for r in routes:
        assert all(nh.dev for nh in r.nexthops)
        assert r.family == r.dst.version


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=300))
def test_parser_fuzz_text(text):
    parse_commands(text, tables=TABLES)


@pytest.mark.parametrize("line, fragment", [
    ("ip route add 192.0.2.0/24 dev eth0 table \u00b2", "unknown table"),
    ("ip rule add prio 10 table \u00b2", "unknown table"),
    ("ip route add 192.0.2.0/24 dev eth0 table \u0663", "unknown table"),
    ("ip rule add prio \u0661\u0660 table main", "not a number"),
    ("ip route add 192.0.2.0/24 dev eth0 metric 1_000", "not a number"),
    ("ip route add 192.0.2.0/24 dev eth0 metric +5", "not a number"),
    ("ip route add 2001:db8::/32 via fe80::1%eth9 dev eth0", "zone id"),
    ("ip -6 rule add prio 10 from fe80::1%eth0 table main", "zone id"),
    ("ip route add 192.0.2.0/24 to 198.51.100.0/24 dev eth0", "given twice"),
])
def test_numbers_are_ascii_and_addresses_have_no_zone(line, fragment):
    """iproute2 reads numbers with strtoul: Python's int() accepts more ("\u00b2".isdigit() is
    true but int() refuses it, int("\u0663") is 3, "1_000" is 1000); every such word is one of the
    parser's own problems, never an exception and never a silent value."""
    rules, routes, problems = parse_commands(line, "f.ip", tables=TABLES)
    assert not rules and not routes
    assert len(problems) == 1 and fragment in str(problems[0]), problems


def test_numbers_in_iproute2_bases():
    p = Parser(TABLES)
    p.feed("ip route add 192.0.2.0/24 dev eth0 table 0x10 metric 010\n"
           "ip rule add prio 0x20 fwmark 0x10/0xff table 100\n")
    assert not p.problems
    assert (p.routes[0].table, p.routes[0].metric) == (16, 8)
    assert (p.rules[0].priority, p.rules[0].fwmark, p.rules[0].fwmask) == (32, 16, 255)


@pytest.mark.parametrize("body, fragment", [
    ('[daemon]\nhooks = 5\n', "hooks"),
    ('include = 3\n', "include"),
    ('include = [3]\n', "include"),
    ('[[route]]\ndst = "192.0.2.0/24"\nnexthops = 5\n', "nexthops"),
    ('[[route]]\ndst = "192.0.2.0/24"\nnexthops = "x"\n', "nexthops"),
    ('[[uplink]]\ninterface = "wan1"\ngateway = 5\n', "gateway"),
    ('[[uplink]]\ninterface = "wan1"\ngateway = "fe80::1%wan1"\n', "zone id"),
    ('[[uplink]]\ninterface = "wan1"\ngateway = "198.51.100.1"\ntable = "\u0663"\n', "table"),
])
def test_toml_values_of_the_wrong_type_are_config_errors(tmp_path, body, fragment):
    text = 'ip = "ip route add default via 192.0.2.1 dev wan0"\n' + body
    with pytest.raises(ConfigError) as err:
        config.loads(text, toml=True, tables=TABLES)
    assert fragment in str(err.value) and "\n" not in str(err.value)
    path = tmp_path / "c.toml"
    path.write_text(text)
    _cfg, problems = config.check(path, tables=TABLES)
    assert any(fragment in str(p) for p in problems if p.severity == "error"), problems


UPLINK = '[[uplink]]\ninterface = "wan1"\ngateway = "198.51.100.1"\n'


@pytest.mark.parametrize("body, fragment", [
    (UPLINK + "interval = nan\n", "finite"),
    (UPLINK + "timeout = inf\n", "finite"),
    (UPLINK + "hold_down = nan\n", "finite"),
    ("[daemon]\nhook_timeout = nan\n", "finite"),
    ("[daemon]\nhook_timeout = -1\n", "positive"),
    ("[daemon]\nmark_mask = -256\n", "mark_mask"),
    ("[daemon]\nmark_mask = 0x100000000\n", "mark_mask"),
    ("[daemon]\nmark_mask = 0\n", "mark_mask"),
    # five uplinks (wan0 from the route), marks 0x10000..0x50000: under the mask 0x20000 is 0
    # and 0x30000 is 0x10000, another uplink's mark
    ("[daemon]\nmark_mask = 0xd0000\n" + "".join(
        f'[[uplink]]\ninterface = "w{i}"\ngateway = "198.51.100.{i + 1}"\n' for i in range(4)),
     "too few bits"),
    ("[daemon]\nmark_mask = 0x30000\n" + "".join(
        f'[[uplink]]\ninterface = "w{i}"\ngateway = "198.51.100.{i + 1}"\n' for i in range(3)),
     "too few bits"),
    (UPLINK + "table = 8589934592\n", "out of range"),
    (UPLINK + "table = -5\n", "out of range"),
    ("[daemon]\ntable_base = 4294967295\n" + UPLINK, "out of range"),
])
def test_settings_and_uplinks_are_validated(body, fragment):
    text = 'ip = "ip route add default via 192.0.2.1 dev wan0"\n' + body
    with pytest.raises(ConfigError) as err:
        config.loads(text, toml=True, tables=TABLES)
    assert fragment in str(err.value), str(err.value)


def test_marks_fit_a_contiguous_mask():
    text = ("[daemon]\nmark_mask = 0x70000\n" + "".join(
        f'[[uplink]]\ninterface = "w{i}"\ngateway = "198.51.100.{i + 1}"\n' for i in range(7)))
    cfg = config.loads(text, toml=True, tables=TABLES)
    masked = [u.mark & cfg.settings.mark_mask for u in cfg.uplinks]
    assert all(masked) and len(set(masked)) == 7
    assert all(u.mark & ~cfg.settings.mark_mask == 0 for u in cfg.uplinks)


def test_explicit_default_scope_is_no_scope():
    """`scope global` on a route via a gateway (and `scope link` on a device route) is what the
    kernel gives it anyway: the route is an alternative of the same routes written without it."""
    text = ("ip route append 203.0.113.0/24 via 192.0.2.1 dev eth0\n"
            "ip route append 203.0.113.0/24 via 198.51.100.1 dev eth1 scope global\n"
            "ip route append 203.0.113.0/24 dev eth2 scope link\n")
    cfg = config.loads(text, tables=TABLES)
    (group,) = cfg.groups().values()
    assert [r.nexthops[0].dev for r in group] == ["eth0", "eth1", "eth2"]
    assert all(r.scope is None for r in group)
    # a scope that really differs cannot share the route key: an error, not a lost route
    text = ("ip route append 203.0.113.0/24 via 192.0.2.1 dev eth0\n"
            "ip route append 203.0.113.0/24 via 198.51.100.1 dev eth1 onlink scope link\n")
    with pytest.raises(ConfigError, match="another scope"):
        config.loads(text, tables=TABLES)


def test_ipv6_routes_take_the_kernels_form():
    """IPv6: metric 1024 is the kernel's metric 0, and routes have no scope."""
    text = ("ip -6 route append 2001:db8:1::/48 via 2001:db8::1 dev wan0 metric 1024\n"
            "ip -6 route append 2001:db8:1::/48 dev wan1 scope link\n"
            "ip -6 route append 2001:db8:2::/48 dev wan1 scope host metric 0\n")
    cfg = config.loads(text, tables=TABLES)
    assert [(r.metric, r.scope) for r in cfg.routes] == [(0, None)] * 3
    assert len(cfg.groups()) == 2


@pytest.mark.parametrize("line", [
    "ip rule add prio 100 from 0.0.0.0/0 table 100",
    "ip rule add prio 100 from all to 0.0.0.0/0 table 100",
    "ip -6 rule add prio 100 to ::/0 table 100",
    "ip rule add prio 100 fwmark 0x1/0xffffffff table 100",
    "ip rule add prio 100 fwmark 0 table 100",
])
def test_rules_take_the_kernels_form(line):
    (rule,), _, problems = parse_commands(line, tables=TABLES)
    assert not problems
    assert rule.src is None and rule.dst is None and rule.fwmask is None
    if "fwmark 0 " in line:
        assert rule.fwmark is None  # mark 0 alone gets mask 0 in the kernel: no mark match
    plain = parse_commands(line.replace("0x1/0xffffffff", "0x1"), tables=TABLES)[0][0]
    assert rule == plain


# ---- hostile configurations: one line each, and check and run agree -----------------------
ROUTE_VIA_WAN0 = '[[route]]\ntable = 100\nvia = "198.51.100.1"\ndev = "wan0"\n'


def _no_kernel(*args):
    raise AssertionError("the daemon went on to the kernel")


def one_line_everywhere(path, fragment, monkeypatch, capsys):
    """`check` finds the problem (exit 1, one line per problem, the first naming it); `load`
    raises ConfigError; `run` says it in one line and exits 2 before anything else."""
    from ipshift import cli

    cfg, problems = config.check(path, tables=TABLES)
    errors = [str(p) for p in problems if p.severity == "error"]
    assert cfg is None or errors
    assert errors and fragment in errors[0], errors
    assert all("\n" not in e and "\r" not in e and e.isprintable() for e in errors)
    with pytest.raises(ConfigError):
        config.load(path, tables=TABLES)
    assert cli.main(["routes", "check", "-c", str(path)]) == 1
    out = capsys.readouterr()
    assert fragment in out.out.splitlines()[0]
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    # should the configuration pass after all, the daemon must not go on to a kernel
    monkeypatch.setattr("ipshift.ctl.protocol.DEFAULT_DIR", path.parent)
    monkeypatch.setattr("ipshift.routes.daemon.KernelAdapter", _no_kernel)
    assert cli.main(["routes", "run", "-c", str(path), "--socket",
                     str(path.parent / "s.sock")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and fragment in lines[0], lines


@pytest.mark.parametrize("body", [
    "x = " + "[" * 100_000 + "\n",
    "x = " + "{a = " * 5_000 + "1" + "}" * 5_000 + "\n",
    "x = [" + "{a = [" * 2_000 + "\n",
])
def test_deeply_nested_toml_is_one_line(tmp_path, monkeypatch, capsys, body):
    path = tmp_path / "deep.toml"
    path.write_text(body)
    one_line_everywhere(path, "nested too deeply", monkeypatch, capsys)
    with pytest.raises(ConfigError, match="nested too deeply"):
        config.loads(body, toml=True, tables=TABLES)


@pytest.mark.parametrize("name, fragment", [
    ("n" * 300, "300 characters"),
    ("n" * 65, "65 characters"),
    ("", "empty"),
    (".", "dot"),
    ("..", "dot"),
    ("a/b", "letters, digits"),
    ("a:b", "nftables"),
    ("a@b", "nftables"),
    ("a b", "letters, digits"),
    ("r\u00e9seau", "letters, digits"),
    ("a\\u0000b", "letters, digits"),
])
def test_daemon_names_that_cannot_name_a_socket_lock_and_table(tmp_path, monkeypatch, capsys,
                                                                name, fragment):
    path = tmp_path / "routes.toml"
    path.write_text(f'[daemon]\nname = "{name}"\n' + ROUTE_VIA_WAN0)
    one_line_everywhere(path, fragment, monkeypatch, capsys)


@pytest.mark.parametrize("name", ["routes", "n" * 64, "isp-a.b_2", "R2"])
def test_daemon_names_within_the_limits(name):
    cfg = config.loads(f'[daemon]\nname = "{name}"\n' + ROUTE_VIA_WAN0, toml=True,
                       tables=TABLES)
    assert cfg.settings.name == name
    assert len(f"/run/ipshift/{name}.sock") < 108


@pytest.mark.parametrize("interface, fragment", [
    ("w" * 31, "31 bytes"),
    ("w" * 16, "16 bytes"),
    ("\u00e9" * 8, "16 bytes"),  # 8 characters, 16 bytes
    (".", "not an interface name"),
    ("..", "not an interface name"),
    ("wan/0", "'/'"),
    ("wan:0", "':'"),
    ("wan 0", "' '"),
    ("wan\\t0", "'\\t'"),
    ("wan\\u00010", "'\\x01'"),
    ("wan*", "'*'"),
    ('wan\\"0', "'\"'"),
])
def test_interface_names_the_kernel_or_nftables_would_refuse(tmp_path, monkeypatch, capsys,
                                                             interface, fragment):
    path = tmp_path / "routes.toml"
    path.write_text(f'[[uplink]]\ninterface = "{interface}"\ngateway = "198.51.100.1"\n')
    one_line_everywhere(path, fragment, monkeypatch, capsys)


@pytest.mark.parametrize("line", [
    "ip route add default via 198.51.100.1 dev {dev} table 100",
    "ip route add default table 100 nexthop via 198.51.100.1 dev {dev}",
    "ip route add 203.0.113.0/24 oif {dev}",
    "ip rule add prio 10 iif {dev} table main",
    "ip rule add prio 10 oif {dev} table main",
])
def test_interface_names_in_iproute2_lines(tmp_path, monkeypatch, capsys, line):
    path = tmp_path / "routes.ip"
    path.write_text("ip route add 192.0.2.0/24 dev lan0\n" + line.format(dev="w" * 31) + "\n")
    one_line_everywhere(path, "31 bytes", monkeypatch, capsys)
    assert config.check(path, tables=TABLES)[1][0].where == f"{path}:2"
    ok = config.loads("ip route add 192.0.2.0/24 dev lan0\n" + line.format(dev="w" * 15),
                      tables=TABLES)
    assert len(ok.routes) + len(ok.rules) == 2


@pytest.mark.parametrize("body, fragment", [
    ('[[uplink]]\nname = "' + "u" * 65 + '"\ninterface = "wan0"\ngateway = "198.51.100.1"\n',
     "65 characters"),
    ('[[uplink]]\nname = "isp 1"\ninterface = "wan0"\ngateway = "198.51.100.1"\n', "whitespace"),
    ('[[uplink]]\nname = "isp\\n1"\ninterface = "wan0"\ngateway = "198.51.100.1"\n',
     "whitespace"),
    ('[[uplink]]\nname = ""\ninterface = "wan0"\ngateway = "198.51.100.1"\n', "empty"),
])
def test_uplink_names_go_into_hooks_and_logs(tmp_path, monkeypatch, capsys, body, fragment):
    path = tmp_path / "routes.toml"
    path.write_text(body)
    one_line_everywhere(path, fragment, monkeypatch, capsys)


@pytest.mark.parametrize("suffix", [".toml", ".ip"])
@pytest.mark.parametrize("data, fragment", [
    (bytes(range(256)) * 4, "UTF-8"),
    (b"\xff\xfe[daemon]\n", "UTF-8"),
    (b"\x00" * 64, ""),
    (b"ip route add default via 198.51.100.1 dev wa\x00n0\n", ""),
])
def test_binary_and_non_utf8_configs_are_one_line(tmp_path, monkeypatch, capsys, suffix, data,
                                                   fragment):
    path = tmp_path / f"routes{suffix}"
    path.write_bytes(data)
    one_line_everywhere(path, fragment, monkeypatch, capsys)


def test_an_include_that_never_ends_or_has_a_nul_in_its_name(tmp_path, monkeypatch):
    monkeypatch.setattr(config, "MAX_CONFIG_BYTES", 1 << 16)
    top = tmp_path / "routes.toml"
    top.write_text('include = ["/dev/zero"]\n' + ROUTE_VIA_WAN0)
    _, problems = config.check(top)
    assert "larger than" in str(problems[0]) and "/dev/zero" in str(problems[0])
    top.write_text('include = ["a\\u0000b"]\n' + ROUTE_VIA_WAN0)
    _, problems = config.check(top)
    assert "NUL" in str(problems[0]) and "\x00" not in str(problems[0])
    _, problems = config.check("/dev/zero")
    assert len(problems) == 1 and "larger than" in str(problems[0])


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=400), st.sampled_from([".toml", ".ip"]))
def test_any_bytes_give_a_config_or_one_line_problems(data, suffix):
    """Whatever a file holds: check never raises, and every problem is one printable line."""
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / f"routes{suffix}"
        path.write_bytes(data)
        _cfg, problems = config.check(path, tables=TABLES)
    for p in problems:
        assert str(p).isprintable(), str(p)
