"""The UDP proxy: the mapping datagram and the tun frame (fuzzed: malformed input is a counted
ProxyError, never a crash), the mapping table's decisions, the move schedule and the seed
engine on a fake clock, the seed node's INI file, and the tun adapter on loopback with a
resolver standing in for the node daemon."""

from __future__ import annotations

import asyncio
import os
import socket
import stat
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ipshift.ctl.protocol import CtlError
from ipshift.ilnp import proxycli
from ipshift.ilnp.compat import Join, Multicast, SeedConfig, SeedNode
from ipshift.ilnp.proxy import (
    MAX_HOSTNAME,
    DeliverLocal,
    MappingRequest,
    MoveSchedule,
    ProxyCore,
    ProxyError,
    SeedEngine,
    Send,
    decode_frame,
    encode_frame,
    parse_mapping,
)
from ipshift.ilnp.proxyd import (
    SeedConfigError,
    SeedNodeService,
    TunProxyService,
    load_seed_config,
    parse_seed_config,
)
from ipshift.ilnp.seedwire import parse_locator

FUZZ = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow], max_examples=300)
L1, L2, L3 = (parse_locator(x) for x in ("2001:db8:0:1", "2001:db8:0:2", "2001:db8:0:3"))

_label = st.from_regex(r"[A-Za-z0-9_]([A-Za-z0-9_-]{0,20}[A-Za-z0-9_])?", fullmatch=True)
hostnames = st.lists(_label, min_size=1, max_size=4).map(".".join)
ports = st.integers(1, 65535)


# --- the mapping datagram ----------------------------------------------------------------------
def test_the_seeds_datagram_parses() -> None:
    assert parse_mapping(b"10001 cn 10001") == MappingRequest(10001, "cn", 10001)
    assert parse_mapping(b"5001\tryan-pc.example 7\n") == MappingRequest(5001,
                                                                          "ryan-pc.example", 7)
    assert MappingRequest(1, "a", 65535).encode() == b"1 a 65535"


@pytest.mark.parametrize(("data", "reason"), [
    (b"", "empty"),
    (b" \n", "empty"),
    (b"10001 cn", "fields"),
    (b"10001 cn 10001 extra", "fields"),
    (b"0 cn 10001", "bad_local_port"),
    (b"65536 cn 10001", "bad_local_port"),
    (b"+1 cn 10001", "bad_local_port"),
    (b"1_0 cn 10001", "bad_local_port"),
    (b"10001 cn 123456", "bad_remote_port"),
    (b"10001 cn -1", "bad_remote_port"),
    (b"10001 -cn 1", "bad_hostname"),
    (b"10001 cn- 1", "bad_hostname"),
    (b"10001 a..b 1", "bad_hostname"),
    (b"10001 a/b 1", "bad_hostname"),
    (b"10001 " + b"a" * 64 + b" 1", "bad_hostname"),
    (b"10001 caf\xc3\xa9 1", "not_ascii"),
    (b"1 " + b"a." * 200 + b"a 1", "too_long"),
])
def test_malformed_mapping_is_one_clear_error(data: bytes, reason: str) -> None:
    core = ProxyCore()
    with pytest.raises(ProxyError) as info:
        core.mapping_request(data)
    assert info.value.reason == reason
    assert "\n" not in info.value.message and info.value.message
    assert core.mapping_errors == {reason: 1}
    assert core.counters["mapping_requests"] == 1


def test_hostname_of_253_characters_is_the_limit() -> None:
    name = ".".join(["a" * 63] * 3 + ["b" * 61])
    assert len(name) == MAX_HOSTNAME
    assert parse_mapping(f"1 {name} 2".encode()).remote_host == name
    with pytest.raises(ProxyError, match="at most 253"):
        parse_mapping(f"1 {name}c 2".encode())


@FUZZ
@given(st.binary(max_size=400))
def test_any_bytes_parse_or_are_refused(data: bytes) -> None:
    core = ProxyCore()
    try:
        request = core.mapping_request(data)
    except ProxyError as exc:
        assert core.mapping_errors[exc.reason] == 1
    else:
        assert 1 <= request.local_port <= 65535 and 1 <= request.remote_port <= 65535
        assert parse_mapping(request.encode()) == request


@FUZZ
@given(ports, hostnames, ports)
def test_every_valid_request_round_trips(local: int, host: str, remote: int) -> None:
    request = MappingRequest(local, host, remote)
    assert parse_mapping(request.encode()) == request


# --- the tun frame -----------------------------------------------------------------------------
@FUZZ
@given(ports, ports, st.binary(max_size=200))
def test_frame_round_trips(src: int, dst: int, payload: bytes) -> None:
    data = encode_frame(src, dst, payload)
    assert data[:4] == src.to_bytes(2, "big") + dst.to_bytes(2, "big")
    assert decode_frame(data) == (src, dst, payload)


@FUZZ
@given(st.binary(max_size=64))
def test_any_frame_decodes_or_is_counted(data: bytes) -> None:
    core = ProxyCore()
    core.add(MappingRequest(10001, "cn", 10001), 0.0, "2001:db8::2")
    result = core.overlay_frame(data, "2001:db8::2")
    dropped = sum(core.drops.values())
    assert core.counters["overlay_received"] == 1
    assert (result is None) == (dropped == 1)
    if result is not None:
        assert result.port == 10001 and result.payload == data[4:]


def test_malformed_frames_are_named() -> None:
    for data, reason in ((b"", "short_frame"), (b"\x00\x01\x00", "short_frame"),
                         (b"\x00\x00\x27\x11x", "zero_port"), (b"\x00\x07\x00\x00x",
                                                               "zero_port")):
        with pytest.raises(ProxyError) as info:
            decode_frame(data)
        assert info.value.reason == reason
    with pytest.raises(ProxyError):
        encode_frame(0, 1, b"")


# --- the mapping table's decisions -------------------------------------------------------------
def test_datagrams_follow_the_mapping_both_ways() -> None:
    core = ProxyCore()
    added = core.add(MappingRequest(10001, "cn", 10002), 1.0)
    assert added.replaced is None
    send = core.app_datagram(("127.0.0.1", 10001), b"hello")
    assert send == Send("cn", None, 10001, 10002, b"hello")
    core.sent(send)
    assert core.overlay_datagram(10002, 10001, b"back", "cn") == DeliverLocal(10001, b"back")
    assert core.overlay_datagram(7, 10001, b"anyone", "other") == DeliverLocal(10001,
                                                                               b"anyone")
    assert core.rows(3.0) == [{"local_port": 10001, "remote_host": "cn", "remote_port": 10002,
                               "address": None, "sent": 1, "delivered": 2, "age_s": 2.0}]


def test_unmapped_and_foreign_datagrams_are_dropped_and_counted() -> None:
    core = ProxyCore()
    core.add(MappingRequest(10001, "cn", 10002), 0.0)
    assert core.app_datagram(("127.0.0.1", 10005), b"x") is None
    assert core.app_datagram(("127.0.0.2", 10001), b"x") is None
    assert core.overlay_datagram(1, 10005, b"x", "cn") is None
    assert core.drops == {"app_no_mapping": 1, "not_local_source": 1, "overlay_no_mapping": 1}
    assert core.counters["app_received"] == 2 and core.counters["overlay_received"] == 1


def test_a_new_mapping_replaces_the_old_and_says_so() -> None:
    core = ProxyCore()
    core.add(MappingRequest(10001, "cn", 10002), 0.0)
    added = core.add(MappingRequest(10001, "r", 9), 1.0)
    assert added.replaced is not None and added.replaced.remote_host == "cn"
    assert core.mappings[10001].remote_host == "r"
    assert core.counters["mappings_added"] == 1 and core.counters["mappings_replaced"] == 1
    send = core.app_datagram(("127.0.0.1", 10001), b"x")
    assert send is not None and (send.remote_host, send.dst_port) == ("r", 9)


def test_the_table_is_bounded() -> None:
    core = ProxyCore(max_mappings=2)
    core.add(MappingRequest(1, "a", 1), 0.0)
    core.add(MappingRequest(2, "a", 1), 0.0)
    with pytest.raises(ProxyError, match="2 mappings"):
        core.add(MappingRequest(3, "a", 1), 0.0)
    core.add(MappingRequest(2, "b", 1), 0.0)  # replacing needs no room
    assert core.mapping_errors == {"table_full": 1}


def test_strict_source_delivers_only_from_the_mapped_remote() -> None:
    core = ProxyCore(strict_source=True)
    core.add(MappingRequest(10001, "cn", 10002), 0.0)
    core.add(MappingRequest(10003, "cn", 10002), 0.0, "2001:db8::2")
    assert core.overlay_datagram(1, 10001, b"x", "mallory") is None
    assert core.overlay_datagram(1, 10001, b"x", "cn") == DeliverLocal(10001, b"x")
    assert core.overlay_frame(encode_frame(1, 10003, b"y"), "2001:db8::9") is None
    assert core.overlay_frame(encode_frame(1, 10003, b"y"), "2001:db8::2") is not None
    assert core.drops == {"wrong_sender": 2}


# --- the move schedule and the seed engine -----------------------------------------------------
def test_schedule_cycles_one_move_per_interval() -> None:
    schedule = MoveSchedule([(L2,), (L1, L2)], 2.0)
    assert schedule.due(100.0) is None  # not started
    schedule.start(10.0)
    assert schedule.due(11.9) is None
    assert schedule.due(12.0) == (L2,)
    assert schedule.due(12.5) is None
    assert schedule.due(14.0) == (L1, L2)
    assert schedule.due(16.1) == (L2,)
    assert schedule.due(60.0) == (L1, L2)  # late: one move, and the next from now on
    assert schedule.next_at == 62.0
    assert schedule.moves == 4


@pytest.mark.parametrize("sets", [[], [()], [(1 << 64,)]])
def test_schedule_refuses_what_cannot_be_moved_to(sets: list[tuple[int, ...]]) -> None:
    with pytest.raises(ValueError):
        MoveSchedule(sets, 1.0)


def test_seed_engine_moves_the_node_on_its_schedule() -> None:
    node = SeedNode(SeedConfig(nid=0x1111, hostname="mn", locators=(L1,), wait=30.0,
                               handoff=1.0))
    engine = SeedEngine(node, MoveSchedule([(L2,), (L1,)], 5.0))
    engine.start(0.0)
    first = engine.actions()
    assert Join(L1) in first and any(isinstance(a, Multicast) for a in first)
    assert engine.next_timer() == 5.0  # the move comes before the next solicitation (15-30)
    engine.handle_timer(5.0)
    assert Join(L2) in engine.actions() and node.current == (L2,)
    assert engine.next_timer() == 6.0  # the handoff's end: L1 is left then
    engine.handle_timer(6.0)
    assert node.joined == [L2]
    engine.handle_timer(10.0)
    assert node.current == (L1,)


def test_seed_engine_without_schedule_is_the_node() -> None:
    node = SeedNode(SeedConfig(nid=0x2, hostname="r", locators=(L1, L2), router=True))
    engine = SeedEngine(node)
    engine.start(0.0)
    assert engine.next_timer() == node.next_deadline()


# --- the seed node's INI file ------------------------------------------------------------------
SEED_STYLE = """
[link]
log = true
mcast_port      = 10001
mcast_interface = eth0   # the seed's inline comment
buffer_size     = 1440

[network]
locators = 2001:db8:0:1 - 2001:db8:0:2, 2001:db8:0:3
move_time = 2.5
handover_time = 1
nid = ffff:0:0:a
default_hop_limit = 4

[discovery]
hostname = alice
wait_time = 30

[application]
port = 1000
"""


def test_the_seeds_own_file_is_read_with_numbers_as_numbers() -> None:
    config = parse_seed_config(SEED_STYLE)
    assert config.hostname == "alice" and config.nid == 0xFFFF00000000000A
    assert config.interface == "eth0" and config.port == 10001  # not [application] port
    assert config.locators == (L1,)
    assert config.schedule == ((L2, L3), (L1,))  # the seed's '-' cycle, back to the start
    assert (config.move_time, config.handoff_time, config.wait) == (2.5, 1.0, 30.0)
    assert config.hop_limit == 4 and not config.router
    assert config.ignored == ()


def test_a_flat_file_with_our_keys() -> None:
    config = parse_seed_config("hostname = mn\nnid = 1111\nlocators = 2001:db8:0:1\n"
                               "interface = to-sw\nwait = 2\nrouter = yes\n"
                               "move_schedule = 2001:db8:0:2; 2001:db8:0:1,2001:db8:0:2\n"
                               "uid = 1000\ncolour = blue\n")
    assert config.nid == 0x1111 and config.router and config.port == 10000
    assert config.schedule == ((L2,), (L1, L2))
    assert config.group_uid() == 1000 and config.seed_config().uid == 1000
    assert config.ignored == ("[node] colour",)
    schedule = config.move_schedule()
    assert schedule is not None and schedule.interval == 20.0


@pytest.mark.parametrize(("text", "expected"), [
    ("port = ten", "[node] port = 'ten': must be a UDP port (1-65535)"),
    ("port = 70000", "[node] port = '70000': must be a UDP port"),
    ("wait_time = nan", "[node] wait_time = 'nan': must be a number of seconds above 0"),
    ("move_time = -1", "[node] move_time = '-1': must be a number of seconds above 0"),
    ("handoff_time = 1e999", "[node] handoff_time = '1e999'"),
    ("hop_limit = 3.5", "[node] hop_limit = '3.5': must be a hop limit (1-255)"),
    ("router = maybe", "[node] router = 'maybe': yes or no"),
    ("nid = 0", "[node] nid = '0': a NID is 1 .. 2^64-1"),
    ("nid = xyz", "[node] nid = 'xyz': a NID is hex"),
    ("locators = 2001:db8:0:1:5", "[node] locators = '2001:db8:0:1:5': locators are four hex"),
    ("locators = 2001:db8:0:1 -", "[node] locators = '2001:db8:0:1 -': a locator set there"),
    ("mcast_interface = eth0", "[node] mcast_interface and [node] interface say the same"),
])
def test_a_bad_value_is_one_line_naming_key_and_value(text: str, expected: str) -> None:
    base = {"hostname": "mn", "nid": "1111", "locators": "2001:db8:0:1", "interface": "eth0"}
    key = text.split("=")[0].strip()
    lines = [f"{k} = {v}" for k, v in base.items() if k != key] + [text]
    with pytest.raises(SeedConfigError) as info:
        parse_seed_config("\n".join(lines) + "\n")
    message = str(info.value)
    assert expected in message and "\n" not in message


@pytest.mark.parametrize(("text", "expected"), [
    ("nid = 1\nlocators = 2001:db8:0:1\ninterface = e", "no hostname"),
    ("hostname = a\nlocators = 2001:db8:0:1\ninterface = e", "no nid"),
    ("hostname = a\nnid = 1\ninterface = e", "no locators"),
    ("hostname = a\nnid = 1\nlocators = 2001:db8:0:1", "no interface"),
    ("hostname = a\nnid = 1\nlocators = 2001:db8:0:1-2001:db8:0:2\ninterface = e\n"
     "move_schedule = 2001:db8:0:3", "give one of them"),
    ("[a]\nx = 1\n[a]\ny = 2\n", "not an INI file"),
    ("hostname = a b\nnid = 1\nlocators = 2001:db8:0:1\ninterface = e", "hostname 'a b'"),
])
def test_missing_or_contradicting_keys(text: str, expected: str) -> None:
    with pytest.raises(SeedConfigError, match=expected):
        parse_seed_config(text)


def test_the_file_is_named_in_the_error(tmp_path: Path) -> None:
    path = tmp_path / "node.ini"
    path.write_text("hostname = mn\nnid = 1111\nlocators = 2001:db8:0:1\ninterface = e\n"
                    "wait = soon\n")
    with pytest.raises(SeedConfigError, match=rf"^{path}: \[node\] wait = 'soon'"):
        load_seed_config(path)
    with pytest.raises(SeedConfigError, match="cannot read"):
        load_seed_config(tmp_path / "missing.ini")


def test_the_seed_service_binds_a_mapped_port() -> None:
    config = parse_seed_config("hostname = mn\nnid = 1111\nlocators = 2001:db8:0:1\n"
                               "interface = e\n")
    service = SeedNodeService(config, 10000)
    assert service.instance == "mn" and service.component == "ilnp-seed"
    added = service.core.add(MappingRequest(10001, "cn", 10001), 0.0)
    service._mapped(added)
    assert 10001 in service.node.ports


# --- the tun adapter on loopback ---------------------------------------------------------------
def _free_port(family: socket.AddressFamily, host: str) -> int:
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        probe.bind((host, 0))
        port: int = probe.getsockname()[1]
        return port


def _app(port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", port))
    sock.setblocking(False)
    return sock


async def _recv(sock: socket.socket, timeout: float = 5.0) -> tuple[bytes, Any]:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        try:
            return sock.recvfrom(2048)
        except BlockingIOError:
            await asyncio.sleep(0.01)
    raise AssertionError("nothing arrived")


def _run_proxy(tmp_path: Path, resolver: Callable[[str], str],
               body: Callable[[TunProxyService, Path], Awaitable[None]]) -> TunProxyService:
    unix = tmp_path / "run" / "proxy.sock"
    service = TunProxyService(0, resolver, overlay_port=_free_port(socket.AF_INET6, "::"),
                              unix_path=unix)

    async def main() -> None:
        await service.start(None)
        try:
            await body(service, unix)
        finally:
            await service.stop()

    asyncio.run(asyncio.wait_for(main(), 30))
    return service


async def _create(unix: Path, *args: str) -> int:
    """proxy-create run beside the proxy's event loop; its exit status."""
    loop = asyncio.get_running_loop()
    code: int = await loop.run_in_executor(None, proxycli.main,
                                           ["proxy-create", *args, "--unix", str(unix)])
    return code


def test_two_programs_talk_through_the_overlay_socket(tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """Both mappings point at this host (::1), so a datagram leaves by the overlay socket
    and comes back in by it: the whole tun path without a daemon."""
    asked: list[str] = []
    a_port, b_port = (_free_port(socket.AF_INET, "127.0.0.1") for _ in range(2))

    def resolver(name: str) -> str:
        asked.append(name)
        return "0:0::1"

    async def body(service: TunProxyService, unix: Path) -> None:
        assert stat.S_IMODE(os.stat(unix).st_mode) == 0o600
        assert (await _create(unix, str(a_port), "self", str(b_port))) == 0
        assert (await _create(unix, str(b_port), "self", str(a_port))) == 0
        a, b = _app(a_port), _app(b_port)
        proxy = ("127.0.0.1", service.front.port)
        try:
            a.sendto(b"ping", proxy)
            assert await _recv(b) == (b"ping", proxy)
            b.sendto(b"pong", proxy)
            assert await _recv(a) == (b"pong", proxy)
        finally:
            a.close()
            b.close()

    service = _run_proxy(tmp_path, resolver, body)
    out = capsys.readouterr().out.split()
    assert out == [str(service.front.port)] * 2
    assert asked == ["self", "self"]
    assert [row["address"] for row in service.core.rows(0.0)] == ["::1", "::1"]
    assert service.core.counters["sent"] == 2 and service.core.counters["delivered"] == 2
    assert not (tmp_path / "run" / "proxy.sock").exists()  # removed at stop


def test_resolution_errors_reach_proxy_create(tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    def resolver(name: str) -> str:
        if name == "odd":
            return "192.0.2.1"
        raise CtlError("failed", f"no such host {name}")

    async def body(service: TunProxyService, unix: Path) -> None:
        assert (await _create(unix, "10001", "nowhere", "10001")) == 1
        assert (await _create(unix, "10001", "odd", "10001")) == 1
        loop = asyncio.get_running_loop()
        answer = await loop.run_in_executor(None, proxycli.send_mapping, unix,
                                            b"10001 cn", 5.0)
        assert answer.startswith("error: a mapping request has 3 fields")

    service = _run_proxy(tmp_path, resolver, body)
    err = capsys.readouterr().err.splitlines()
    assert err == ["error: nowhere: no such host nowhere",
                   "error: odd: the node daemon answered '192.0.2.1', not an IPv6 address"]
    assert service.core.mappings == {}
    assert service.core.mapping_errors == {"resolve_failed": 2, "fields": 1}


def test_a_stranger_on_the_overlay_port_is_counted(tmp_path: Path) -> None:
    async def body(service: TunProxyService, unix: Path) -> None:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as stranger:
            for data in (b"\x00", encode_frame(9, 4242, b"unmapped")):
                stranger.sendto(data, ("::1", service.overlay_port))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 5
        while service.core.counters["overlay_received"] < 2 and loop.time() < deadline:
            await asyncio.sleep(0.01)

    service = _run_proxy(tmp_path, lambda name: "::1", body)
    assert service.core.drops == {"short_frame": 1, "overlay_no_mapping": 1}


def test_proxy_create_without_a_proxy_is_one_line(tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    assert proxycli.main(["proxy-create", "10001", "cn", "10001", "--unix",
                          str(tmp_path / "none.sock")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"ipshift ilnp: no proxy listens on {tmp_path / 'none.sock'} (is it running?)"
    assert proxycli.main(["proxy-create", "10001", "a..b", "10001", "--unix", "x"]) == 2
    assert "host name 'a..b'" in capsys.readouterr().err


def test_two_proxies_in_one_place_refuse_to_share_a_mapping_socket(tmp_path: Path) -> None:
    from ipshift.daemon import StartError

    async def body(service: TunProxyService, unix: Path) -> None:
        other = TunProxyService(0, lambda name: "::1", unix_path=unix,
                                overlay_port=_free_port(socket.AF_INET6, "::"))
        with pytest.raises(StartError, match="another proxy is already running"):
            await other.start(None)
        assert unix.exists()  # the running one keeps its socket

    _run_proxy(tmp_path, lambda name: "::1", body)
