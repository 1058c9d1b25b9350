"""Tunnel configuration and the `ipshift tunnel` command line."""

from __future__ import annotations

import argparse
import ipaddress

import pytest

from ipshift.cli import UserError
from ipshift.tunnel.cli import config_from_args, register
from ipshift.tunnel.config import AddressMapping, ConfigError, Endpoint, TunnelConfig

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


def test_mappings() -> None:
    mapping = AddressMapping.parse("203.0.113.1=198.51.100.7")
    assert str(mapping) == "203.0.113.1=198.51.100.7"
    for bad in ("203.0.113.1", "203.0.113.1=2001:db8::1", "x=y", "=203.0.113.1"):
        with pytest.raises(ConfigError):
            AddressMapping.parse(bad)


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
