"""The ILNP node's configuration file (ilnp.config): a full file read as it is, the defaults a
minimal one gets (the derived NID: stable, EUI-64 u bit clear), every wrong key or value a
NodeConfigError whose one line names the key (table-driven), `load` of missing, unreadable
and non-TOML files, and hypothesis: random TOML-like tables raise nothing else."""

from __future__ import annotations

import copy
import ipaddress
import re
import tomllib
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ipshift.ilnp.config import (
    DEFAULT_APP_LOCATOR,
    DEFAULT_DISCOVERY_PORT,
    DEFAULT_PORT,
    ENGINE_KEYS,
    DnsSettings,
    NodeConfigError,
    NodeFileConfig,
    Schedule,
    StaticHost,
    derived_nid,
    load,
    parse,
)
from ipshift.ilnp.datapath import locator_sum, neutral_locator

FUZZ = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])

FULL_TOML = """
name = "mn.ilnp.test."
nid = "0:0:0:11"
interfaces = ["eth1", "eth2"]
device = "ilnp1"
port = 7800
app_locator = "2001:db8:d246::/64"
checksum = "ipv6"
nonce_size = 12
router = true
hop_limit = 32
mtu = 1400
log_level = "debug"
preferences = { eth1 = 10, eth2 = 20 }
discovery = { enabled = false, port = 7802, interval = 2.5, flood = false }

[engine]
lu_interval = 0.5
lu_tries = 5
nonce_hold = 3
active = 60
idle = 120
resolve_wait = 1.5
replay_window = 2
lu_sequence = false

[[hosts]]
name = "cn.ilnp.test."
nid = "0000:0000:0000:0022"
locators = ["2001:db8:2::/64", "2001:db8:3::/64"]
preference = 5

[[hosts]]
name = "r.ilnp.test."
nid = "0211:22ff:fe33:4455"
locators = []

[dns]
server = "2001:db8:53::1"
zone = "ilnp.test."
key_file = "/etc/ipshift/tsig.key"
port = 5353
ttl = 60
timeout = 1

[schedule]
sets = [["2001:db8:1::/64"], ["2001:db8:2::/64", "2001:db8:1::/64"]]
move_time = 30
handoff_time = 5
"""
FULL: dict[str, Any] = tomllib.loads(FULL_TOML)
MINIMAL: dict[str, Any] = {"name": "mn.ilnp.test.", "interfaces": ["eth1"]}
L1, L2, L3 = 0x20010DB800010000, 0x20010DB800020000, 0x20010DB800030000


def l64(text: str) -> int:
    return int(ipaddress.IPv6Network(text).network_address) >> 64


# --- what a good file gives -------------------------------------------------------------------
def test_a_full_file_is_read_as_written() -> None:
    config = parse(FULL, netns="mn")
    assert config == NodeFileConfig(
        name="mn.ilnp.test.", nid=0x11, interfaces=("eth1", "eth2"), device="ilnp1",
        port=7800, app_locator=DEFAULT_APP_LOCATOR, checksum="ipv6", nonce_size=12,
        router=True, hop_limit=32, mtu=1400, preferences={"eth1": 10, "eth2": 20},
        discovery=False, discovery_port=7802, hello_interval=2.5, flood=False,
        hosts=(StaticHost("cn.ilnp.test.", 0x22, ((L2, 5), (L3, 5))),
               StaticHost("r.ilnp.test.", 0x021122FFFE334455, ())),
        dns=DnsSettings("2001:db8:53::1", "ilnp.test.", "/etc/ipshift/tsig.key", 5353, 60, 1),
        schedule=Schedule(((L1,), (L2, L1)), 30.0, 5.0),
        engine={"lu_interval": 0.5, "lu_tries": 5.0, "nonce_hold": 3.0, "active": 60.0,
                "idle": 120.0, "resolve_wait": 1.5, "replay_window": 2.0,
                "lu_sequence": False},
        netns="mn", log_level="debug")
    assert config.instance == "ilnp1"
    assert config.app_address(0x11) == ipaddress.IPv6Address("2001:db8:d246::11")
    assert set(config.engine) == set(ENGINE_KEYS)


def test_a_minimal_file_gets_the_defaults() -> None:
    config = parse(MINIMAL)
    assert config == NodeFileConfig(name="mn.ilnp.test.", nid=derived_nid("mn.ilnp.test."),
                                    interfaces=("eth1",))
    assert (config.device, config.port, config.app_locator, config.checksum) == \
        ("ilnp0", DEFAULT_PORT, DEFAULT_APP_LOCATOR, "ilnp")
    assert (config.nonce_size, config.router, config.hop_limit, config.mtu) == \
        (4, False, 64, None)
    assert (config.discovery, config.discovery_port, config.hello_interval, config.flood) == \
        (True, DEFAULT_DISCOVERY_PORT, 5.0, True)
    assert (config.hosts, config.dns, config.schedule, config.engine, config.preferences) == \
        ((), None, None, {}, {})
    assert config.netns is None and config.log_level == "info"
    assert locator_sum(config.app_locator) == 0


def test_the_default_application_locator_is_the_documented_one() -> None:
    assert ipaddress.IPv6Network((DEFAULT_APP_LOCATOR << 64, 64)) == \
        ipaddress.IPv6Network("2001:db8:d246::/64")


@given(st.text(min_size=1, max_size=253))
def test_the_derived_nid_is_stable_nonzero_and_not_universal(name: str) -> None:
    nid = derived_nid(name)
    assert nid == derived_nid(name) == derived_nid(name.lower())
    assert 0 < nid < 2**64
    assert not nid & 1 << 57  # the EUI-64 u bit (0x02 of the first octet) is clear
    assert parse({"name": name, "interfaces": ["eth0"]}).nid == nid


def test_the_derived_nid_is_a_known_value_and_differs_by_name() -> None:
    # the first 64 bits of SHA-256 of the lower-case name, u bit cleared: a change would move
    # every node's NID. sha256("r.ilnp.test.") starts de ac ba 86: 0xde has the u bit set
    assert f"{derived_nid('r.ilnp.test.'):016x}" == "dcacba86b36401dd"
    assert f"{derived_nid('mn.ilnp.test.'):016x}" == "38c6b353151b42ae"  # clear already
    assert derived_nid("mn.ilnp.test.") == derived_nid("MN.ILNP.TEST.")
    assert derived_nid("mn.ilnp.test.") != derived_nid("cn.ilnp.test.")


def test_a_configured_nid_wins_over_the_derived_one() -> None:
    assert parse(MINIMAL | {"nid": "ABCD:0:0:1"}).nid == 0xABCD_0000_0000_0001


def test_a_neutral_application_locator_of_another_48_is_taken() -> None:
    neutral = neutral_locator(l64("2001:db8:1::/64"))
    text = str(ipaddress.IPv6Network((neutral << 64, 64)))
    assert text == "2001:db8:1:d245::/64"
    config = parse(MINIMAL | {"app_locator": text})
    assert config.app_locator == neutral and locator_sum(neutral) == 0


# --- every mistake names its key --------------------------------------------------------------
def changed(path: str, value: Any) -> dict[str, Any]:
    """FULL with the value at `path` ("dns.port", "hosts.0.nid") replaced, or removed when
    value is REMOVE."""
    data = copy.deepcopy(FULL)
    *parents, last = path.split(".")
    table: Any = data
    for part in parents:
        table = table[int(part)] if isinstance(table, list) else table[part]
    if value is REMOVE:
        del table[last]
    elif isinstance(table, list):
        table[int(last)] = value
    else:
        table[last] = value
    return data


REMOVE = object()

# (where, new value, what the message must name)
MISTAKES: list[tuple[str, Any, str]] = [
    ("nmae", "x", "nmae"),
    ("name", REMOVE, "name"),
    ("name", "", "name"),
    ("name", "x" * 254, "name"),
    ("name", 5, "name"),
    ("nid", "0:0:0:0", "nid"),
    ("nid", "0:0:0:0:1", "nid"),
    ("nid", "00000:0:0:1", "nid"),
    ("nid", "0:0:0:g", "nid"),
    ("nid", 17, "nid"),
    ("interfaces", REMOVE, "interfaces"),
    ("interfaces", [], "interfaces"),
    ("interfaces", "eth1", "interfaces"),
    ("interfaces", ["eth1", 2], "interfaces"),
    ("interfaces", ["a-name-far-too-long"], "interfaces"),
    ("interfaces", ["eth 1"], "interfaces"),
    ("device", "", "device"),
    ("device", "ilnp/0", "device"),
    ("device", 0, "device"),
    ("port", 0, "port"),
    ("port", 65536, "port"),
    ("port", "7700", "port"),
    ("port", 7700.0, "port"),
    ("port", True, "port"),
    ("app_locator", "2001:db8:d246::/48", "app_locator"),
    ("app_locator", "2001:db8:d246::1/64", "app_locator"),
    ("app_locator", "2001:db8:d247::/64", "app_locator"),
    ("app_locator", "192.0.2.0/24", "app_locator"),
    ("app_locator", 5, "app_locator"),
    ("checksum", "rfc6741", "checksum"),
    ("checksum", True, "checksum"),
    ("nonce_size", 8, "nonce_size"),
    ("nonce_size", True, "nonce_size"),
    ("nonce_size", "4", "nonce_size"),
    ("router", "yes", "router"),
    ("router", 1, "router"),
    ("hop_limit", 0, "hop_limit"),
    ("hop_limit", 256, "hop_limit"),
    ("mtu", 1279, "mtu"),
    ("mtu", 65001, "mtu"),
    ("mtu", 1400.5, "mtu"),
    ("log_level", 3, "log_level"),
    ("preferences", [10], "preferences"),
    ("preferences.eth3", 10, "preferences.eth3"),
    ("preferences.eth1", -1, "preferences.eth1"),
    ("preferences.eth1", 65536, "preferences.eth1"),
    ("preferences.eth1", "low", "preferences.eth1"),
    ("discovery", True, "discovery"),
    ("discovery.enabled", "no", "discovery.enabled"),
    ("discovery.port", 0, "discovery.port"),
    ("discovery.interval", 0.01, "discovery.interval"),
    ("discovery.interval", 3601, "discovery.interval"),
    ("discovery.flood", "yes", "discovery.flood"),
    ("discovery.intervall", 3, "discovery.intervall"),
    ("engine", 1, "engine"),
    ("engine.lu_intervall", 1, "engine.lu_intervall"),
    ("engine.lu_interval", 0, "engine.lu_interval"),
    ("engine.lu_interval", 86401, "engine.lu_interval"),
    ("engine.lu_interval", "1s", "engine.lu_interval"),
    ("engine.lu_tries", 2.5, "engine.lu_tries"),
    ("engine.nonce_hold", True, "engine.nonce_hold"),
    ("engine.lu_sequence", 1, "engine.lu_sequence"),
    ("hosts", {"name": "x"}, "hosts"),
    ("hosts.0", "cn", "hosts[0]"),
    ("hosts.1.name", REMOVE, "hosts[1].name"),
    ("hosts.0.nid", REMOVE, "hosts[0].nid"),
    ("hosts.0.nid", "0:0:0:0", "hosts[0].nid"),
    ("hosts.1.locators", "2001:db8:2::/64", "hosts[1].locators"),
    ("hosts.0.locators", ["2001:db8:2::/48"], "hosts[0].locators"),
    ("hosts.0.locators", ["cn.ilnp.test."], "hosts[0].locators"),
    ("hosts.0.preference", 65536, "hosts[0].preference"),
    ("dns", "2001:db8:53::1", "dns"),
    ("dns.server", "ns.ilnp.test.", "dns.server"),
    ("dns.server", REMOVE, "dns.server"),
    ("dns.zone", REMOVE, "dns.zone"),
    ("dns.key_file", 5, "dns.key_file"),
    ("dns.port", 0, "dns.port"),
    ("dns.ttl", -1, "dns.ttl"),
    ("dns.ttl", 1.5, "dns.ttl"),
    ("dns.timeout", 0, "dns.timeout"),
    ("dns.timeout", 61, "dns.timeout"),
    ("schedule", [], "schedule"),
    ("schedule.sets", REMOVE, "schedule.sets"),
    ("schedule.sets", [["2001:db8:1::/64"]], "schedule.sets"),
    ("schedule.sets", ["2001:db8:1::/64", "2001:db8:2::/64"], "schedule.sets"),
    ("schedule.sets", [["2001:db8:1::/64"], ["2001:db8:2::/63"]], "schedule.sets"),
    ("schedule.move_time", 0, "schedule.move_time"),
    ("schedule.handoff_time", -1, "schedule.handoff_time"),
    ("schedule.handoff_time", 30, "schedule.handoff_time"),
]


@pytest.mark.parametrize("where,value,names", MISTAKES,
                         ids=[f"{where}={value!r}"[:50] if value is not REMOVE
                              else f"{where} missing" for where, value, _ in MISTAKES])
def test_every_mistake_is_one_line_naming_the_key(where: str, value: Any, names: str) -> None:
    with pytest.raises(NodeConfigError) as caught:
        parse(changed(where, value))
    message = str(caught.value)
    assert names in message
    assert "\n" not in message


def test_the_unknown_key_message_lists_the_known_ones() -> None:
    with pytest.raises(NodeConfigError, match=r"unknown key.*nmae.*known: .*app_locator"):
        parse(MINIMAL | {"nmae": "x"})


def test_a_non_neutral_application_locator_names_the_neutral_one() -> None:
    with pytest.raises(NodeConfigError, match=r"use 2001:db8:d246::/64"):
        parse(MINIMAL | {"app_locator": "2001:db8:d246:1::/64"})


def test_a_float_nonce_size_is_refused() -> None:
    with pytest.raises(NodeConfigError, match="nonce_size"):
        parse(MINIMAL | {"nonce_size": 4.0})


@pytest.mark.parametrize("where", ["dns.tll", "schedule.move", "hosts.0.prefernce"])
def test_an_unknown_key_in_a_table_is_refused(where: str) -> None:
    with pytest.raises(NodeConfigError, match=where.split(".")[-1]):
        parse(changed(where, 3))


# --- load -------------------------------------------------------------------------------------
def test_load_reads_a_file(tmp_path: Path) -> None:
    path = tmp_path / "node.toml"
    path.write_text(FULL_TOML)
    assert load(path, netns="mn") == parse(FULL, "mn")
    assert load(str(path)) == parse(FULL)


def test_load_of_a_missing_file_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "nowhere.toml"
    with pytest.raises(NodeConfigError) as caught:
        load(path)
    assert str(caught.value) == f"cannot read {path}: No such file or directory"


def test_load_of_a_directory_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(NodeConfigError, match=re.escape(f"cannot read {tmp_path}: ")):
        load(tmp_path)


@pytest.mark.parametrize("text", ['name = "mn', "name = mn.ilnp.test.", "[dns\n",
                                  'name = "a"\nname = "b"\n', "= 1"])
def test_load_of_invalid_toml_is_one_line(tmp_path: Path, text: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(NodeConfigError) as caught:
        load(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: not TOML: ")
    assert "\n" not in message


def test_load_of_valid_toml_with_a_mistake_names_the_key(tmp_path: Path) -> None:
    path = tmp_path / "node.toml"
    path.write_text('name = "mn."\ninterfaces = ["eth1"]\nport = 0\n')
    with pytest.raises(NodeConfigError, match=r"^port: "):
        load(path)


def test_load_of_a_binary_file_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "binary.toml"
    path.write_bytes(b'name = "\xff\xfe"\n')
    with pytest.raises(NodeConfigError, match=re.escape(str(path))):
        load(path)


# --- hypothesis: nothing but NodeConfigError --------------------------------------------------
toml_scalars = (st.booleans() | st.integers(-2**63, 2**63 - 1)
                | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=20)
                | st.sampled_from(["eth1", "2001:db8:1::/64", "0:0:0:11", "::1", "ilnp",
                                   "2001:db8:d246::/64", "2001:db8::/48"]))
toml_values = st.recursive(
    toml_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner,
                                                                max_size=4),
    max_leaves=16)
KEYS = [*sorted(FULL), "nid", "extra", "preferences", "enabled", "port", "sets", "server"]


@FUZZ
@given(st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=10), toml_values,
                       max_size=8))
def test_random_tables_raise_nothing_but_node_config_errors(data: dict[str, Any]) -> None:
    try:
        parse(data)
    except NodeConfigError as exc:
        assert str(exc)  # one line, except where a quoted key holds a newline: it is echoed


@FUZZ
@given(st.sampled_from([key for key in FULL if isinstance(FULL[key], dict)]
                       + ["hosts", "dns", "schedule"]),
       st.dictionaries(st.sampled_from(["enabled", "port", "interval", "eth1", "eth2", "sets",
                                        "move_time", "handoff_time", "flood", "server", "zone",
                                        "key_file", "ttl", "timeout", *ENGINE_KEYS]),
                       toml_values, max_size=6),
       st.booleans())
def test_random_sub_tables_raise_nothing_but_node_config_errors(
        key: str, table: dict[str, Any], into_full: bool) -> None:
    base = copy.deepcopy(FULL if into_full else MINIMAL)
    base[key] = [table] if key == "hosts" else table
    try:
        config = parse(base)
    except NodeConfigError as exc:
        assert str(exc) and "\n" not in str(exc)
    else:
        assert isinstance(config, NodeFileConfig)


@FUZZ
@given(st.sampled_from(sorted(FULL)), toml_values)
def test_one_random_value_in_a_full_file(key: str, value: Any) -> None:
    try:
        parse(FULL | {key: value})
    except NodeConfigError as exc:
        assert "\n" not in str(exc)
