"""Tunnel configuration and the `ipshift tunnel` command line."""

from __future__ import annotations

import argparse
import ipaddress
import re

import pytest

from ipshift.tunnel.cli import config_from_args, register
from ipshift.tunnel.config import (
    AddressMapping,
    ConfigError,
    Endpoint,
    TunnelConfig,
    remote_problem,
)
from ipshift.ui import UserError

A = Endpoint.parse("192.0.2.1:4789")
B = Endpoint.parse("192.0.2.2:4789")


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="ipshift")
    parser.add_argument("-v", "--verbose", action="count", default=0)
    register(parser.add_subparsers(dest="command"))
    return parser.parse_args(["tunnel", *argv])


def test_endpoints() -> None:
    assert A.host == ipaddress.ip_address("192.0.2.1") and A.port == 4789
    six = Endpoint.parse("[2001:db8::1]:5000")
    assert str(six) == "[2001:db8::1]:5000" and six.socket_address(2) == ("2001:db8::1", 5002)
    assert str(A) == "192.0.2.1:4789"


@pytest.mark.parametrize(
    "text", ["192.0.2.1", "192.0.2.1:", ":80", "host:80", "192.0.2.1:0", "192.0.2.1:70000",
             "2001:db8::1:80", "[2001:db8::1]", "[2001:db8::1]:x", "192.0.2.1:-1"],
)
def test_bad_endpoints(text: str) -> None:
    with pytest.raises(ConfigError):
        Endpoint.parse(text)


@pytest.mark.parametrize("port", ["\u00b2", "\u0668\u0660", "\uff18\uff10", "8\u00b9"])
def test_ports_are_ascii_digits(port: str) -> None:
    """"²" passes str.isdigit() and "٨٠" even int(): both must be a ConfigError, not a
    traceback or port 80."""
    with pytest.raises(ConfigError, match="port must be"):
        Endpoint.parse(f"192.0.2.1:{port}", "--local")
    args = parse("run", "--dev", "tun7", "--local", f"192.0.2.1:{port}", "--remote",
                 "192.0.2.2:4789")
    with pytest.raises(UserError, match="--local"):
        config_from_args(args)


def test_mappings() -> None:
    mapping = AddressMapping.parse("203.0.113.1=198.51.100.7")
    assert str(mapping) == "203.0.113.1=198.51.100.7"
    for bad in ("203.0.113.1", "203.0.113.1=2001:db8::1", "x=y", "=203.0.113.1"):
        with pytest.raises(ConfigError):
            AddressMapping.parse(bad)


@pytest.mark.parametrize("text", ["203.0.113.1=203.0.113.1", "2001:db8::1 = 2001:db8:0::1"])
def test_mapping_to_itself_is_refused(text: str) -> None:
    with pytest.raises(ConfigError, match="same address"):
        AddressMapping.parse(text, "--rewrite-src")


@pytest.mark.parametrize(
    ("field", "rules"),
    [
        ("rewrite_src", ["203.0.113.1=198.51.100.7", "203.0.113.1=198.51.100.8"]),  # same OLD
        ("rewrite_dst", ["2001:db8::1=2001:db8::7", "2001:db8::1=2001:db8::8"]),
        ("rewrite_src", ["203.0.113.1=198.51.100.7", "203.0.113.2=198.51.100.7"]),  # same NEW
    ],
)
def test_two_rules_for_one_address_are_refused(field: str, rules: list[str]) -> None:
    mappings = tuple(AddressMapping.parse(r) for r in rules)
    with pytest.raises(ConfigError, match="two rules for"):
        TunnelConfig("tun0", A, B, **{field: mappings})  # type: ignore[arg-type]
    # one rule per direction for the same address is fine: they act on different fields
    TunnelConfig("tun0", A, B, rewrite_src=mappings[:1], rewrite_dst=mappings[:1])


@pytest.mark.parametrize(
    "name", ["", ".", "..", "a:b", "tun 0", "tun\t0", " tun0", "tun0\n", "a/b", "tun%d",
             "a" * 16, "\u00e9" * 8, "tun\u00a00", "tun\x000", "\u00e9" * 7, "caf\u00e9",
             "\udcff\udcfe", "tun\x7f"],
)
def test_bad_interface_names(name: str) -> None:
    """Linux's rules (1-15 bytes, not "." or "..", no "/", ":" or whitespace), no "%"
    (tun%d: the kernel would pick another name), and printable ASCII only."""
    with pytest.raises(ConfigError, match="--dev"):
        TunnelConfig(name, A, B)


@pytest.mark.parametrize("name", ["tun0", "a" * 15, "my-tun.1_x", "...", ".a", "t@n+1=~"])
def test_good_interface_names(name: str) -> None:
    assert TunnelConfig(name, A, B).dev == name


def test_config_checks() -> None:
    TunnelConfig("tun0", A, B)
    with pytest.raises(ConfigError, match="both be IPv4"):
        TunnelConfig("tun0", A, Endpoint.parse("[2001:db8::2]:4789"))
    with pytest.raises(ConfigError, match="queues"):
        TunnelConfig("tun0", A, B, queues=0)
    with pytest.raises(ConfigError, match="ports up to"):
        TunnelConfig("tun0", Endpoint.parse("192.0.2.1:65535"), B, queues=2)
    with pytest.raises(ConfigError, match="interface name"):
        TunnelConfig("a-very-long-interface-name", A, B)
    with pytest.raises(ConfigError, match="MTU"):
        TunnelConfig("tun0", A, B, mtu=100)
    with pytest.raises(ConfigError, match="IPv6 needs 1280"):
        TunnelConfig("tun0", A, B, mtu=1200, addresses=(ipaddress.ip_interface("2001:db8::1/64"),))


@pytest.mark.parametrize(
    ("options", "cause"),
    [
        ({"addresses": (ipaddress.ip_interface("2001:db8::1/64"),)}, "--address 2001:db8::1/64"),
        ({"routes": (ipaddress.ip_network("2001:db8:b::/64"),)}, "--route 2001:db8:b::/64"),
        ({"rewrite_src": (AddressMapping.parse("2001:db8::1=2001:db8::7"),)},
         "--rewrite-src 2001:db8::1=2001:db8::7"),
        ({"rewrite_dst": (AddressMapping.parse("2001:db8::2=2001:db8::8"),)},
         "--rewrite-dst 2001:db8::2=2001:db8::8"),
    ],
)
def test_ipv6_anywhere_needs_1280(options: dict[str, object], cause: str) -> None:
    """IPv6 through the tunnel by address, route or rewrite rule: the MTU must be 1280 or
    more, set (--mtu) or derived from the underlay; the error names the cause."""
    with pytest.raises(ConfigError, match="IPv6 needs 1280") as error:
        TunnelConfig("tun0", A, B, mtu=1200, **options)  # type: ignore[arg-type]
    assert cause in str(error.value)
    config = TunnelConfig("tun0", A, B, **options)  # type: ignore[arg-type]
    assert config.mtu_for(1312) == 1280
    with pytest.raises(ConfigError, match="IPv6 needs 1280") as error:
        config.mtu_for(1300)  # 1268 left for the tunnel
    assert cause in str(error.value) and "underlay MTU 1300" in str(error.value)
    # an IPv4-only tunnel gets by with less
    assert TunnelConfig("tun0", A, B, mtu=1200).mtu_for(1300) == 1200
    assert TunnelConfig("tun0", A, B).mtu_for(1300) == 1268


def test_mtu_follows_the_underlay() -> None:
    assert TunnelConfig("tun0", A, B).overhead == 32
    assert TunnelConfig("tun0", A, B).mtu_for(1500) == 1468
    six = TunnelConfig("tun0", Endpoint.parse("[2001:db8::1]:1"), Endpoint.parse("[2001:db8::2]:1"))
    assert six.mtu_for(1500) == 1448
    assert TunnelConfig("tun0", A, B, mtu=1400).mtu_for(9000) == 1400


def test_command_line() -> None:
    args = parse("run", "--dev", "tun7", "--local", "192.0.2.1:4789", "--remote", "192.0.2.2:4789",
                 "--address", "203.0.113.1/30", "--address", "2001:db8:ff::1/64",
                 "--route", "198.51.100.0/24", "--route", "2001:db8:b::/64", "--mtu", "1400",
                 "--queues", "2", "--rewrite-src", "203.0.113.1=198.51.100.9",
                 "--rewrite-dst", "198.51.100.1=198.51.100.2")
    config = config_from_args(args)
    assert config.dev == "tun7" and config.queues == 2 and config.mtu == 1400
    assert [str(a) for a in config.addresses] == ["203.0.113.1/30", "2001:db8:ff::1/64"]
    assert [str(r) for r in config.routes] == ["198.51.100.0/24", "2001:db8:b::/64"]
    assert [str(m) for m in config.rewrite_src] == ["203.0.113.1=198.51.100.9"]
    assert [str(m) for m in config.rewrite_dst] == ["198.51.100.1=198.51.100.2"]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--address", "203.0.113.1"], None),  # a bare address is a /32: fine
        (["--address", "nonsense"], "ADDRESS/PREFIXLEN"),
        (["--route", "nonsense"], "prefix"),
        (["--queues", "99"], "queues"),
        (["--rewrite-src", "1.2.3.4"], "OLD=NEW"),
    ],
)
def test_command_line_errors_are_user_errors(extra: list[str], message: str | None) -> None:
    args = parse("run", "--dev", "tun7", "--local", "192.0.2.1:4789", "--remote",
                 "192.0.2.2:4789", *extra)
    if message is None:
        config_from_args(args)
        return
    with pytest.raises(UserError, match=message):
        config_from_args(args)


def test_status_command_parses() -> None:
    args = parse("status", "--dev", "tun7", "--json")
    assert args.dev == "tun7" and args.json


def test_run_without_root_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from ipshift.cli import main

    monkeypatch.setattr("os.geteuid", lambda: 65534)
    monkeypatch.setattr("ipshift.tunnel.daemon.run_daemon",
                        lambda *a, **k: pytest.fail("started anyway"))
    assert main(["tunnel", "run", "--dev", "tq0", "--local", "192.0.2.1:4789",
                 "--remote", "192.0.2.2:4789"]) == 2


@pytest.mark.parametrize(("remote", "message"), [
    ("0.0.0.0:4789", "unspecified"), ("[::]:4789", "unspecified"),
    ("255.255.255.255:4789", "broadcast"), ("224.0.0.1:4789", "multicast"),
    ("[ff02::1]:4789", "multicast"), ("127.0.0.1:4789", "loopback"), ("[::1]:4789", "loopback"),
    ("127.9.9.9:4789", "loopback"), ("[::ffff:127.0.0.1]:4789", "loopback"),
    ("[::ffff:224.0.0.1]:4789", "multicast"), ("[::ffff:0.0.0.0]:4789", "unspecified"),
])
def test_a_peer_is_one_unicast_host_elsewhere(remote: str, message: str) -> None:
    local = "[2001:db8::1]:4789" if remote.startswith("[") else "192.0.2.1:4789"
    with pytest.raises(ConfigError, match=message) as info:
        TunnelConfig("tun0", Endpoint.parse(local), Endpoint.parse(remote))
    assert str(info.value).startswith(f"--remote {Endpoint.parse(remote)}: ")
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(("route", "remote"), [
    ("192.0.2.0/24", "192.0.2.2:4789"), ("0.0.0.0/0", "192.0.2.2:4789"),
    ("192.0.2.2/32", "192.0.2.2:4789"), ("2001:db8::/32", "[2001:db8::2]:4789"),
    ("::/0", "[2001:db8::2]:4789"), ("192.0.2.0/24", "[::ffff:192.0.2.2]:4789"),
])
def test_a_route_covering_the_peer_is_refused(route: str, remote: str) -> None:
    """The tunnel's own datagrams to the peer would be routed into the tunnel."""
    local = "[2001:db8::1]:4789" if remote.startswith("[") else "192.0.2.1:4789"
    with pytest.raises(ConfigError, match=re.escape(f"--route {route} covers the peer")):
        TunnelConfig("tun0", Endpoint.parse(local), Endpoint.parse(remote),
                     routes=(ipaddress.ip_network("198.51.100.0/24"),
                             ipaddress.ip_network(route)))


def test_routes_beside_the_peer_are_fine() -> None:
    routes = tuple(ipaddress.ip_network(r) for r in ("192.0.2.0/31", "192.0.2.3/32",
                                                     "198.51.100.0/24", "2001:db8::/32", "::/0"))
    assert TunnelConfig("tun0", A, B, routes=routes).routes == routes


@pytest.mark.parametrize("local", ["239.1.1.1:4789", "255.255.255.255:4789", "[ff02::1]:4789",
                                   "[ff05::2]:4789"])
def test_a_multicast_or_broadcast_local_end_is_refused(local: str) -> None:
    remote = "[2001:db8::2]:4789" if local.startswith("[") else "192.0.2.2:4789"
    with pytest.raises(ConfigError, match=re.escape(f"--local {local}: ") + ".* a tunnel end is "
                       "one host"):
        TunnelConfig("tun0", Endpoint.parse(local), Endpoint.parse(remote))


@pytest.mark.parametrize(("local", "remote"), [("0.0.0.0:4789", "192.0.2.2:4789"),
                                               ("[::]:4789", "[2001:db8::2]:4789")])
def test_an_unspecified_local_end_binds_any(local: str, remote: str) -> None:
    assert TunnelConfig("tun0", Endpoint.parse(local), Endpoint.parse(remote)).local.port == 4789


def test_the_peer_being_this_host_is_found() -> None:
    """The daemon hands in the namespace's addresses; the check itself is pure."""
    config = TunnelConfig("tun0", A, B)
    assert remote_problem(config, ["192.0.2.1", "fe80::1%eth0", "not an address"]) is None
    assert remote_problem(config, []) is None
    problem = remote_problem(config, ["fe80::1%eth0", str(B.host)])
    assert problem == ("--remote 192.0.2.2:4789: 192.0.2.2 is an address of this host; name "
                       "the peer's address")
    six = TunnelConfig("tun0", Endpoint.parse("[2001:db8::1]:1"),
                       Endpoint.parse("[fe80::2%eth0]:1"))
    assert remote_problem(six, ["fe80::2%eth1"])  # the same address, whatever the zone
    assert remote_problem(six, ["fe80::3%eth0"]) is None
    mapped = TunnelConfig("tun0", Endpoint.parse("[::]:1"), Endpoint.parse("[::ffff:192.0.2.2]:1"))
    assert remote_problem(mapped, ["192.0.2.2"])  # reached over IPv4


def test_dev_bytes_that_are_not_utf8_are_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    from ipshift.cli import main

    rc = main(["tunnel", "run", "--dev", b"\xff\xfe".decode(errors="surrogateescape"),
               "--local", "192.0.2.1:4789", "--remote", "192.0.2.2:4789"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "--dev" in err[0]
