"""The peers file: what a good file gives, one line naming file, peer and key for every bad
one, key files read with their checks, and the control requests built from peers."""

from __future__ import annotations

import ipaddress
import json
import os
import re
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ipshift.tunnel import peerfile
from ipshift.tunnel.auth import format_key_file
from ipshift.tunnel.config import ConfigError, Endpoint
from ipshift.tunnel.peerfile import (
    PEER_KEYS,
    PeerEntry,
    load_peer_entries,
    load_peers,
    parse_peer_entries,
    parse_peers,
    peer_description,
    peer_request,
    replace_request,
)
from ipshift.tunnel.peers import Encapsulation, Peer, PortRange

KEY = bytes(range(32))
EXAMPLE = Path(__file__).parents[3] / "examples" / "tunnel-peers.toml"

GOOD = """
# a branch office and a GRE router
[[peer]]
name = "branch1"
endpoint = "192.0.2.2:4789"
encapsulation = "udp"
prefixes = ["198.51.100.0/26", "2001:db8:1::/48"]
addresses = ["203.0.113.9"]
port_ranges = ["203.0.113.7/tcp/1024-2047", "203.0.113.7/icmp/0-99"]
extra_sources = ["192.0.2.128/25"]

[[peer]]
name = "legacy"
endpoint = "[2001:db8::5]"
encapsulation = "gre"
gre_key = 7
prefixes = ["198.51.100.128/25"]
"""


def toml_value(value: object) -> str:
    """A value in TOML: JSON's strings, numbers, booleans and arrays are TOML's too; tables
    are written inline."""
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {toml_value(v)}"
                               for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return json.dumps(value)


def peers_toml(*tables: dict[str, object]) -> str:
    return "".join("[[peer]]\n" + "".join(f"{json.dumps(k)} = {toml_value(v)}\n"
                                          for k, v in table.items())
                   for table in tables)


def one_line_error(text: str, *, source: str = "peers.toml") -> str:
    with pytest.raises(ConfigError) as info:
        parse_peer_entries(text, source)
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"{source}: "), message
    return message


def key_file(path: Path, mode: int = 0o600) -> Path:
    path.write_text(format_key_file(KEY, "test key"))
    path.chmod(mode)
    return path


# --- good files -------------------------------------------------------------------------------
def test_a_good_file_gives_its_peers() -> None:
    branch, legacy = parse_peers(GOOD)
    assert branch == Peer(
        "branch1", Endpoint.parse("192.0.2.2:4789"),
        prefixes=(ipaddress.ip_network("198.51.100.0/26"),
                  ipaddress.ip_network("2001:db8:1::/48")),
        addresses=(ipaddress.ip_address("203.0.113.9"),),
        port_ranges=(PortRange.parse("203.0.113.7/tcp/1024-2047"),
                     PortRange.parse("203.0.113.7/icmp/0-99")),
        extra_sources=(ipaddress.ip_network("192.0.2.128/25"),))
    assert legacy.encapsulation is Encapsulation.GRE and legacy.gre_key == 7
    assert legacy.endpoint == Endpoint(ipaddress.ip_address("2001:db8::5"), 0)
    assert branch.key is None and legacy.key is None


def test_a_table_has_the_keys_of_a_peer_description() -> None:
    described = Peer("a", Endpoint.parse("192.0.2.2:1")).as_dict()
    assert set(PEER_KEYS) == set(described) - {"authenticated"} | {"key_file"}


def test_an_empty_file_has_no_peers() -> None:
    assert parse_peers("") == ()
    assert parse_peers("# nothing yet\n") == ()


def test_only_name_and_endpoint_are_needed() -> None:
    (peer,) = parse_peers(peers_toml({"name": "a", "endpoint": "192.0.2.2:1"}))
    assert peer == Peer("a", Endpoint.parse("192.0.2.2:1"))


def test_key_files_are_read_beside_the_peers_file(tmp_path: Path) -> None:
    key_file(tmp_path / "a.key")
    path = tmp_path / "peers.toml"
    path.write_text(peers_toml({"name": "a", "endpoint": "192.0.2.2:1", "key_file": "a.key"},
                               {"name": "b", "endpoint": "192.0.2.3:1"}))
    a, b = load_peers(path)
    assert a.key == KEY and a.authenticated and b.key is None
    entries = load_peer_entries(str(path))
    assert entries[0].key_file == tmp_path / "a.key" and entries[0].key_file.is_absolute()
    assert entries[0].peer.key is None  # left to whoever reads it (the daemon)


def test_relative_key_files_of_a_text_are_found_in_its_directory(tmp_path: Path) -> None:
    key_file(tmp_path / "a.key")
    text = peers_toml({"name": "a", "endpoint": "192.0.2.2:1", "key_file": "a.key"})
    (peer,) = parse_peers(text, directory=tmp_path)
    assert peer.key == KEY
    absolute = peers_toml({"name": "a", "endpoint": "192.0.2.2:1",
                           "key_file": str(tmp_path / "a.key")})
    assert parse_peers(absolute, directory=Path("/nonexistent"))[0].key == KEY


def test_the_example_file_is_good() -> None:
    entries = load_peer_entries(EXAMPLE)
    names = [entry.peer.name for entry in entries]
    assert names == ["branch1", "host-a", "host-b", "legacy-gre"]
    assert entries[0].key_file == EXAMPLE.parent / "branch1.key"


# --- bad files: one line naming file, peer and key ---------------------------------------------
def table(**fields: object) -> str:
    return peers_toml({"name": "a", "endpoint": "192.0.2.2:4789", **fields})


@pytest.mark.parametrize(("text", "expected"), [
    ("peer = [", "not valid TOML"),
    ("a = " + "[" * 5000, "nest too deeply"),
    ("peers = 1", "unknown key 'peers' at the top"),
    ('[peer]\nname = "a"', "[[peer]] table (double brackets)"),
    ("peer = [1]", "peer #1: a peer is a [[peer]] table, not the number 1"),
    ('[[peer]]\nendpoint = "192.0.2.2:1"', "peer #1: name: missing"),
    ('[[peer]]\nname = "a"', "peer 'a': endpoint: missing"),
    ('[[peer]]\nname = 5\nendpoint = "192.0.2.2:1"', "peer #1: name: must be a string"),
    (table(colour="red"), "peer 'a': colour: unknown key; a peer has name, endpoint"),
    (table(authenticated=True), "peer 'a': authenticated: unknown key"),
    (table(endpoint=4789), "peer 'a': endpoint: must be a string, not the number 4789"),
    (table(endpoint="192.0.2.2"), "peer 'a': endpoint: '192.0.2.2' is not ADDRESS:PORT"),
    (table(endpoint="2001:db8::2:4789"), "endpoint: '2001:db8::2:4789': write IPv6"),
    (table(endpoint="192.0.2.2:0"), "endpoint: '192.0.2.2:0': port must be 1..65535"),
    (table(endpoint="host:4789"), "endpoint: 'host:4789': 'host' is not an IP address"),
    (table(encapsulation="gre"), "endpoint: '192.0.2.2:4789': a gre peer's endpoint is its "
                                 "address alone"),
    (table(encapsulation="ipip"), "endpoint: '192.0.2.2:4789': an ipip peer's endpoint"),
    (table(encapsulation="vxlan"), "peer 'a': encapsulation: 'vxlan' is not one of udp, "
                                   "ipip, gre"),
    (table(encapsulation=1), "encapsulation: must be a string"),
    (table(prefixes="198.51.100.0/24"), "prefixes: must be a list of strings, not the string"),
    (table(prefixes=[1]), "prefixes: must be a list of strings, not a list of non-strings"),
    (table(prefixes=["198.51.100.1/24"]), "prefixes: '198.51.100.1/24' has host bits set; "
                                          "write 198.51.100.0/24"),
    (table(prefixes=["nonsense"]), "prefixes: 'nonsense' is not a prefix"),
    (table(prefixes=["198.51.100.0/24", "198.51.100.0/24"]), "prefixes: 198.51.100.0/24 is "
                                                             "listed twice"),
    (table(extra_sources=["192.0.2.1/24"]), "extra_sources: '192.0.2.1/24' has host bits"),
    (table(addresses=["203.0.113.300"]), "addresses: '203.0.113.300' is not an IP address"),
    (table(addresses=["2001:db8::1", "2001:db8:0::1"]), "addresses: 2001:db8:0::1 is listed "
                                                        "twice"),
    (table(port_ranges=["203.0.113.7/tcp"]), "port_ranges: port range '203.0.113.7/tcp' is "
                                             "not ADDRESS/PROTOCOL/FIRST-LAST"),
    (table(port_ranges=["203.0.113.7/tcp/9-1"]), "port_ranges: port range 203.0.113.7: 9-1"),
    (table(port_ranges=["203.0.113.7/gre/1-2"]), "port_ranges: port range"),
    (table(port_ranges=["203.0.113.7/tcp/1-9", "203.0.113.7/tcp/5-20"]), "overlap"),
    (table(addresses=["203.0.113.7"], port_ranges=["203.0.113.7/tcp/1-9"]),
     "203.0.113.7 is both a whole address and shared by port ranges"),
    (table(gre_key=7), "peer 'a': a GRE key (0-4294967295) belongs to gre peers only"),
    (table(gre_key="7"), "gre_key: must be a whole number, not the string '7'"),
    (table(gre_key=True), "gre_key: must be a whole number, not true/false"),
    (table(gre_key=1.5), "gre_key: must be a whole number, not the number 1.5"),
    (table(key_file=""), "key_file: must be the path of a key file"),
    (table(key_file="a\0b"), "key_file: must be the path of a key file"),
    (table(key_file=["a"]), "key_file: must be a string"),
    (table(name="a b"), "peer 'a b': a peer name is 1-63 letters"),
    (table(name="x" * 64), "a peer name is 1-63"),
    (peers_toml({"name": "a", "endpoint": "192.0.2.2:1"}, {"name": "a", "endpoint":
                                                           "192.0.2.3:1"}),
     "peer #2: name: 'a' is already the name of peer #1; names must differ"),
    (peers_toml({"name": "a", "endpoint": "192.0.2.2:1", "prefixes": ["198.51.100.0/24"]},
                {"name": "b", "endpoint": "192.0.2.3:1", "prefixes": ["198.51.100.0/24"]}),
     "peers 'a' and 'b' both own 198.51.100.0/24"),
    (peers_toml({"name": "a", "endpoint": "192.0.2.2:1"}, {"name": "b", "endpoint":
                                                           "192.0.2.2:1"}),
     "peers 'a' and 'b' have the same endpoint 192.0.2.2:1"),
])
def test_bad_files_are_one_line_naming_file_peer_and_key(text: str, expected: str) -> None:
    assert expected in one_line_error(text)


def test_the_source_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "site.toml"
    path.write_text(table(gre_key="x"))
    with pytest.raises(ConfigError, match=f"^{re.escape(str(path))}: peer 'a': gre_key: "):
        load_peers(path)


@pytest.mark.parametrize(("mode", "expected"), [
    (0o644, "chmod 600"),
    (0o640, "open to group or others"),
])
def test_key_files_open_to_others_are_refused(tmp_path: Path, mode: int, expected: str) -> None:
    key_file(tmp_path / "a.key", mode)
    path = tmp_path / "peers.toml"
    path.write_text(table(key_file="a.key"))
    where = re.escape(f"{path}: peer 'a': key_file: ")
    with pytest.raises(ConfigError, match=f"^{where}.*{expected}"):
        load_peers(path)


def test_a_missing_or_linked_key_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "peers.toml"
    path.write_text(table(key_file="missing.key"))
    with pytest.raises(ConfigError, match=r"key_file: cannot open key file .*missing.key: No such"):
        load_peers(path)
    (tmp_path / "link.key").symlink_to(key_file(tmp_path / "real.key"))
    path.write_text(table(key_file="link.key"))
    with pytest.raises(ConfigError, match=r"key_file: cannot open key file .*link.key"):
        load_peers(path)


def test_a_key_file_that_holds_no_key_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "a.key"
    bad.write_text("# nothing here\n")
    bad.chmod(0o600)
    with pytest.raises(ConfigError, match=r"key_file: .*exactly one key line"):
        parse_peers(table(key_file=str(bad)))


def test_unreadable_peers_files_are_one_line(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match=r"cannot read peers file .*missing.toml: No such"):
        load_peers(tmp_path / "missing.toml")
    with pytest.raises(ConfigError, match="cannot read peers file"):
        load_peers(tmp_path)  # a directory
    binary = tmp_path / "binary.toml"
    binary.write_bytes(b"[[peer]]\nname = \"\xff\"\n")
    with pytest.raises(ConfigError, match="not UTF-8 text at byte 17"):
        load_peers(binary)
    big = tmp_path / "big.toml"
    big.write_text("# " + "x" * 100 + "\n")
    monkeypatch.setattr(peerfile, "MAX_PEERS_FILE", 64)
    with pytest.raises(ConfigError, match="larger than a peers file"):
        load_peer_entries(big)


# --- control requests -------------------------------------------------------------------------
def test_requests_describe_peers_as_peer_from_dict_reads_them(tmp_path: Path) -> None:
    branch, legacy = parse_peers(GOOD)
    request = peer_request(branch, "keys/b.key")
    assert request["key_file"] == os.path.abspath("keys/b.key")
    assert Peer.from_dict(request["peer"]) == branch
    # what goes without saying is left out, so a large table fits in one request
    assert peer_description(Peer("c", Endpoint.parse("192.0.2.9:1"))) == {
        "name": "c", "endpoint": "192.0.2.9:1"}
    assert peer_request(legacy, None) == {"peer": peer_description(legacy), "key_file": None}
    assert "authenticated" not in peer_description(Peer("k", Endpoint.parse("192.0.2.9:1"),
                                                        key=KEY))


def test_the_replace_request_names_key_files_by_peer(tmp_path: Path) -> None:
    key_file(tmp_path / "a.key")
    path = tmp_path / "peers.toml"
    path.write_text(peers_toml({"name": "a", "endpoint": "192.0.2.2:1", "key_file": "a.key"},
                               {"name": "b", "endpoint": "192.0.2.3:1"}))
    request = replace_request(load_peer_entries(path))
    assert [Peer.from_dict(d).name for d in request["peers"]] == ["a", "b"]
    assert request["key_files"] == {"a": str(tmp_path / "a.key")}
    assert replace_request([]) == {"peers": [], "key_files": {}}


# --- properties -------------------------------------------------------------------------------
addresses4 = st.integers(0, 2**32 - 1).map(ipaddress.IPv4Address)
addresses6 = st.integers(0, 2**128 - 1).map(ipaddress.IPv6Address)
prefixes = st.one_of(
    st.tuples(addresses4, st.integers(0, 32)), st.tuples(addresses6, st.integers(0, 128)),
).map(lambda pair: ipaddress.ip_network(f"{pair[0]}/{pair[1]}", strict=False))


@st.composite
def peers(draw: st.DrawFn) -> Peer:
    encapsulation = draw(st.sampled_from(list(Encapsulation)))
    host = draw(st.one_of(addresses4, addresses6))
    port = draw(st.integers(1, 65535)) if encapsulation is Encapsulation.UDP else 0
    return Peer(
        draw(st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._:@/+-]{0,20}", fullmatch=True)),
        Endpoint(host, port), encapsulation,
        prefixes=tuple(draw(st.sets(prefixes, max_size=3))),
        addresses=tuple(draw(st.sets(st.one_of(addresses4, addresses6), max_size=3))),
        extra_sources=tuple(draw(st.sets(prefixes, max_size=2))),
        gre_key=draw(st.none() | st.integers(0, 2**32 - 1))
        if encapsulation is Encapsulation.GRE else None,
    )


@settings(max_examples=200, deadline=None)
@given(peers())
def test_a_peer_written_as_its_description_reads_back_the_same(peer: Peer) -> None:
    (entry,) = parse_peer_entries(peers_toml(peer_description(peer)))
    assert entry == PeerEntry(peer)


toml_scalars = st.one_of(
    st.text(max_size=30), st.integers(-2**63, 2**63 - 1), st.booleans(),
    st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from(["192.0.2.2:4789", "[2001:db8::2]:1", "192.0.2.2", "198.51.100.0/24",
                     "203.0.113.7/tcp/1-9", "203.0.113.7", "udp", "ipip", "gre", "a", ""]),
)
toml_values = st.recursive(toml_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4),
    st.dictionaries(st.text(max_size=8), inner, max_size=3)), max_leaves=8)
peer_tables = st.dictionaries(
    st.one_of(st.sampled_from(PEER_KEYS), st.text(max_size=8)), toml_values, max_size=9)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(peer_tables, max_size=3),
       st.dictionaries(st.text(max_size=8).filter(lambda key: key != "peer"), toml_values,
                       max_size=2))
def test_junk_values_are_a_config_error_never_another(tables: list[dict[str, Any]],
                                                      top: dict[str, Any]) -> None:
    text = "".join(f"{json.dumps(k)} = {toml_value(v)}\n" for k, v in top.items())
    text += peers_toml(*tables)
    try:
        entries = parse_peer_entries(text, "junk.toml", directory=Path("/nonexistent"))
    except ConfigError as exc:
        assert "\n" not in str(exc)
        return
    assert len(entries) == len(tables) and not top


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=200))
def test_junk_text_is_a_config_error_never_another(text: str) -> None:
    try:
        parse_peer_entries(text)
    except ConfigError as exc:
        assert "\n" not in str(exc)
