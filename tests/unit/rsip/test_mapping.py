"""The PCP / NAT-PMP mapping engine with a fake clock and an in-memory port authority."""

from __future__ import annotations

import ipaddress
import itertools
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ipshift.rsip import pcpwire
from ipshift.rsip.leases import LeasePolicy, Leases
from ipshift.rsip.mapping import (
    ANNOUNCE_INTERVALS,
    AddForward,
    AddPeer,
    Forward,
    LookupFlow,
    MappingEngine,
    PcpConfig,
    RemoteFilter,
    RemoveForward,
    RemovePeer,
    Send,
    SetFilters,
)
from ipshift.rsip.pcpwire import (
    Filter,
    MapData,
    Opcode,
    PcpRequest,
    PcpResponse,
    PeerData,
    PmpAddressRequest,
    PmpAddressResponse,
    PmpErrorResponse,
    PmpMapRequest,
    PmpMapResponse,
    PmpOpcode,
    PmpResult,
    PreferFailure,
    Result,
    ThirdParty,
    UnknownOption,
)

V4 = ipaddress.IPv4Address
EXTERNAL = V4("203.0.113.1")
INSIDE = V4("192.0.2.1")
NETWORK = ipaddress.IPv4Network("192.0.2.0/24")
A, B = "192.0.2.10", "192.0.2.11"
REMOTE = V4("198.51.100.7")
ANY = V4(0)
NONCE = b"n" * 12
OTHER_NONCE = b"x" * 12
T0 = 1000.0
TCP, UDP = 6, 17


class MemoryAuthority:
    """The lease engine's contract, in memory: ports 20000-20009 of EXTERNAL, plus any
    suggested port that is free."""

    def __init__(self, first: int = 20000, count: int = 10) -> None:
        self.range = range(first, first + count)
        self.held: dict[int, str] = {}
        self.released: list[int] = []

    def claim(self, owner: str, address: V4, protocol: int, port: int | None,
              lifetime: float, now: float) -> int | None:
        if address != EXTERNAL:
            return None
        if port is not None and port not in self.held:
            self.held[port] = owner
            return port
        for candidate in self.range:
            if candidate not in self.held:
                self.held[candidate] = owner
                return candidate
        return None

    def release(self, owner: str, address: V4, protocol: int, port: int, now: float) -> None:
        assert self.held.get(port) == owner, f"{owner} releases {port} it does not hold"
        del self.held[port]
        self.released.append(port)


def engine(**overrides: Any) -> tuple[MappingEngine, MemoryAuthority]:
    settings_: dict[str, Any] = {"external_address": EXTERNAL, "internal_address": INSIDE,
                                 "internal_interface": "lan0", "internal_networks": (NETWORK,),
                                 "announce": False}
    settings_.update(overrides)
    authority = MemoryAuthority()
    return MappingEngine(PcpConfig(**settings_), authority, T0), authority


def map_request(port: int = 8080, suggested: int = 0, lifetime: int = 3600,
                client: str = A, nonce: bytes = NONCE, protocol: int = TCP,
                options: tuple[pcpwire.Option, ...] = (),
                suggested_address: pcpwire.IPAddress = ANY) -> bytes:
    return PcpRequest(Opcode.MAP, lifetime, V4(client),
                      MapData(nonce, protocol, port, suggested, suggested_address),
                      options).encode()


def peer_request(port: int = 40000, lifetime: int = 600, client: str = A,
                 nonce: bytes = NONCE, remote: pcpwire.IPAddress = REMOTE,
                 remote_port: int = 443, suggested: int = 0,
                 options: tuple[pcpwire.Option, ...] = ()) -> bytes:
    return PcpRequest(Opcode.PEER, lifetime, V4(client),
                      PeerData(nonce, TCP, port, suggested, V4(0), remote_port, remote),
                      options).encode()


def ask(e: MappingEngine, data: bytes, client: str = A, now: float = T0,
        **where: Any) -> PcpResponse:
    reply = e.receive(data, (client, 5000), now, **where)
    assert reply is not None
    return pcpwire.decode_pcp_response(reply)


def forwards(actions: list[Any]) -> list[Any]:
    return [a for a in actions if not isinstance(a, Send)]


# --- MAP -----------------------------------------------------------------------------------------
def test_map_creates_a_forward_on_the_suggested_port() -> None:
    e, authority = engine()
    response = ask(e, map_request(8080, 8080))
    assert response.result is Result.SUCCESS and response.lifetime == 3600
    assert isinstance(response.data, MapData)
    assert (response.data.external_address, response.data.external_port) == (EXTERNAL, 8080)
    assert response.data.nonce == NONCE and response.data.internal_port == 8080
    forward = Forward(EXTERNAL, TCP, 8080, V4(A), 8080)
    assert e.actions() == [AddForward(forward)]
    assert authority.held == {8080: "pcp 192.0.2.10"}
    assert e.counters["map.created"] == 1 and e.counters["pcp.MAP.SUCCESS"] == 1


def test_refresh_keeps_the_port_and_renews_the_lifetime() -> None:
    e, _ = engine()
    first = ask(e, map_request(8080))
    e.actions()
    again = ask(e, map_request(8080, lifetime=7200), now=T0 + 100)
    assert again.result is Result.SUCCESS and again.lifetime == 7200
    assert isinstance(first.data, MapData) and isinstance(again.data, MapData)
    assert again.data.external_port == first.data.external_port
    assert e.actions() == []
    assert e.next_timer() == T0 + 100 + 7200
    assert e.counters["map.refreshed"] == 1


def test_a_mapping_answers_its_nonce_only() -> None:
    e, authority = engine()
    ask(e, map_request(8080))
    e.actions()
    refused = ask(e, map_request(8080, nonce=OTHER_NONCE), now=T0 + 600)
    assert refused.result is Result.NOT_AUTHORIZED
    assert refused.lifetime == 3000  # what is left of the existing mapping
    deleted = ask(e, map_request(8080, lifetime=0, nonce=OTHER_NONCE), now=T0 + 600)
    assert deleted.result is Result.NOT_AUTHORIZED
    assert e.actions() == [] and len(e) == 1 and authority.held
    assert e.counters["map.nonce_mismatch"] == 2


def test_delete_removes_the_forward_and_is_idempotent() -> None:
    e, authority = engine()
    ask(e, map_request(8080, 8080))
    e.actions()
    request = map_request(8080, lifetime=0, suggested=1234, suggested_address=V4("1.2.3.4"))
    for _ in range(2):
        response = ask(e, request)
        assert response.result is Result.SUCCESS and response.lifetime == 0
        assert isinstance(response.data, MapData)
        # the suggested fields are copied back (section 15.1)
        assert (response.data.external_port, response.data.external_address) == (
            1234, V4("1.2.3.4"))
    assert e.actions() == [RemoveForward(Forward(EXTERNAL, TCP, 8080, V4(A), 8080))]
    assert authority.held == {} and authority.released == [8080]
    assert e.counters["map.deleted"] == 1 and e.counters["map.delete_absent"] == 1


def test_suggested_port_of_another_host_gives_another_port() -> None:
    e, _ = engine()
    ask(e, map_request(8080, 8080, client=A))
    other = ask(e, map_request(8080, 8080, client=B), client=B)
    assert isinstance(other.data, MapData)
    assert other.data.external_port == 20000
    assert e.counters["port.assigned"] == 1


def test_prefer_failure_refuses_instead_of_another_port() -> None:
    e, authority = engine()
    ask(e, map_request(8080, 8080, client=A))
    e.actions()
    held = dict(authority.held)
    refused = ask(e, map_request(8080, 8080, client=B, options=(PreferFailure(),)), client=B)
    assert refused.result is Result.CANNOT_PROVIDE_EXTERNAL
    assert refused.lifetime == pcpwire.SHORT_ERROR_LIFETIME
    assert e.actions() == [] and authority.held == held  # no state change
    granted = ask(e, map_request(9090, 9090, client=B, options=(PreferFailure(),)), client=B)
    assert granted.result is Result.SUCCESS and granted.options == (PreferFailure(),)
    # an existing mapping asked for another port with PREFER_FAILURE
    moved = ask(e, map_request(9090, 9091, client=B, options=(PreferFailure(),)), client=B)
    assert moved.result is Result.CANNOT_PROVIDE_EXTERNAL


@pytest.mark.parametrize("request_bytes", [
    map_request(8080, 0, options=(PreferFailure(),)),                  # no port suggested
    map_request(8080, 8080, lifetime=0, options=(PreferFailure(),)),   # with a delete
    map_request(8080, lifetime=0, options=(Filter(128, 0, REMOTE),)),  # FILTER with a delete
])
def test_options_that_make_no_sense_are_malformed_option(request_bytes: bytes) -> None:
    e, _ = engine()
    assert ask(e, request_bytes).result is Result.MALFORMED_OPTION


def test_lifetimes_are_clamped() -> None:
    e, _ = engine()
    assert ask(e, map_request(1, lifetime=10)).lifetime == 120
    assert ask(e, map_request(2, lifetime=10**8)).lifetime == 86400
    e2, _ = engine(min_lifetime=2, max_lifetime=600)
    assert ask(e2, map_request(1, lifetime=1)).lifetime == 2


def test_expiry_removes_the_forward_and_frees_the_port() -> None:
    e, authority = engine()
    ask(e, map_request(8080, 8080, lifetime=200))
    ask(e, map_request(9090, 9090, lifetime=400))
    e.actions()
    assert e.next_timer() == T0 + 200
    e.handle_timer(T0 + 199)
    assert e.actions() == []
    e.handle_timer(T0 + 200)
    assert e.actions() == [RemoveForward(Forward(EXTERNAL, TCP, 8080, V4(A), 8080))]
    assert 8080 not in authority.held and e.next_timer() == T0 + 400
    assert e.counters["map.expired"] == 1


def test_a_refreshed_mapping_does_not_expire_at_its_first_time() -> None:
    e, _ = engine()
    ask(e, map_request(8080, lifetime=200))
    ask(e, map_request(8080, lifetime=3600), now=T0 + 100)
    e.actions()
    e.handle_timer(T0 + 200)
    assert e.actions() == [] and len(e) == 1
    assert e.next_timer() == T0 + 3700


def test_unsupported_protocols_and_wildcards() -> None:
    e, _ = engine()
    assert ask(e, map_request(0, protocol=TCP)).result is Result.UNSUPP_PROTOCOL
    assert ask(e, map_request(0, protocol=0)).result is Result.UNSUPP_PROTOCOL
    assert ask(e, map_request(80, protocol=132)).result is Result.UNSUPP_PROTOCOL
    assert ask(e, map_request(80, protocol=0)).result is Result.MALFORMED_REQUEST
    # deleting a wildcard mapping that does not exist succeeds
    assert ask(e, map_request(0, protocol=0, lifetime=0)).result is Result.SUCCESS


def test_tcp_and_udp_of_one_host_share_an_external_port() -> None:
    e, authority = engine()
    tcp = ask(e, map_request(5000, 5000, protocol=TCP))
    udp = ask(e, map_request(5000, 5000, protocol=UDP))
    assert isinstance(tcp.data, MapData) and isinstance(udp.data, MapData)
    assert tcp.data.external_port == udp.data.external_port == 5000
    assert authority.held == {5000: "pcp 192.0.2.10"}
    ask(e, map_request(5000, protocol=TCP, lifetime=0))
    assert 5000 in authority.held  # still used by the UDP mapping
    ask(e, map_request(5000, protocol=UDP, lifetime=0))
    assert authority.held == {}
    # another internal port of the same host cannot take the same external port
    ask(e, map_request(6000, 6000))
    second = ask(e, map_request(6001, 6000))
    assert isinstance(second.data, MapData) and second.data.external_port != 6000


def test_pcp_ports_and_reserved_ports_are_never_suggested() -> None:
    e, _ = engine(reserved_ports=frozenset({(TCP, 4555)}))
    for port, protocol in ((5351, UDP), (5350, UDP), (4555, TCP), (80, TCP)):
        response = ask(e, map_request(port, port, protocol=protocol))
        assert isinstance(response.data, MapData)
        assert response.data.external_port in range(20000, 20010)


def test_foreign_suggested_address_is_a_hint_only() -> None:
    e, _ = engine()
    response = ask(e, map_request(8080, 8080, suggested_address=V4("198.51.100.99")))
    assert isinstance(response.data, MapData)
    assert response.data.external_address == EXTERNAL
    refused = ask(e, map_request(9090, 9090, suggested_address=V4("198.51.100.99"),
                                 options=(PreferFailure(),)))
    assert refused.result is Result.CANNOT_PROVIDE_EXTERNAL


def test_quotas() -> None:
    e, _ = engine(max_per_host=2, max_mappings=3)
    assert ask(e, map_request(1)).result is Result.SUCCESS
    assert ask(e, map_request(2)).result is Result.SUCCESS
    assert ask(e, map_request(3)).result is Result.USER_EX_QUOTA
    assert ask(e, map_request(1, client=B), client=B).result is Result.SUCCESS
    assert ask(e, map_request(2, client=B), client=B).result is Result.NO_RESOURCES
    e2, _ = engine()
    for port in range(10):
        ask(e2, map_request(port + 1))
    assert ask(e2, map_request(99)).result is Result.NO_RESOURCES  # the authority is empty
    assert e2.counters["port.exhausted"] == 1


def test_no_external_address_is_a_network_failure() -> None:
    e, _ = engine(external_address=V4(0))
    assert ask(e, map_request(80)).result is Result.NETWORK_FAILURE
    reply = e.receive(PmpAddressRequest().encode(), (A, 5000), T0)
    assert reply is not None
    assert pcpwire.decode_pmp_response(reply) == PmpAddressResponse(
        PmpResult.NETWORK_FAILURE, 0, V4(0))


# --- options ------------------------------------------------------------------------------------
def test_third_party_is_refused_unless_enabled() -> None:
    e, _ = engine()
    response = ask(e, map_request(80, options=(ThirdParty(V4(B)),)))
    # RFC 6887 sections 7.3 and 13.1: a prohibited THIRD_PARTY is UNSUPP_OPTION
    assert response.result is Result.UNSUPP_OPTION
    assert response.options == (ThirdParty(V4(B)),)  # an error response returns all options
    assert e.counters["third_party.refused"] == 1


def test_third_party_when_enabled() -> None:
    e, _ = engine(third_party=True,
                  third_party_clients=(ipaddress.IPv4Network("192.0.2.10/32"),))
    granted = ask(e, map_request(80, 8000, options=(ThirdParty(V4(B)),)))
    assert granted.result is Result.SUCCESS and granted.options == (ThirdParty(V4(B)),)
    assert e.actions() == [AddForward(Forward(EXTERNAL, TCP, 8000, V4(B), 80))]
    assert ask(e, map_request(81, options=(ThirdParty(V4(A)),))).result is \
        Result.MALFORMED_REQUEST
    assert ask(e, map_request(82, options=(ThirdParty(V4("198.51.100.1")),))).result is \
        Result.NOT_AUTHORIZED
    unauthorized = ask(e, map_request(83, client="192.0.2.12",
                                      options=(ThirdParty(V4(B)),)), client="192.0.2.12")
    assert unauthorized.result is Result.UNSUPP_OPTION


def test_unknown_options() -> None:
    e, _ = engine()
    assert ask(e, map_request(80, options=(UnknownOption(5, b"abcd"),))).result is \
        Result.UNSUPP_OPTION
    ignored = ask(e, map_request(80, options=(UnknownOption(200, b"abcd"),)))
    assert ignored.result is Result.SUCCESS and ignored.options == ()


def test_filters_are_kept_added_and_cleared() -> None:
    e, _ = engine(max_filters=2)
    net = Filter(120, 0, V4("198.51.100.0"))
    host = Filter(128, 5000, REMOTE)
    created = ask(e, map_request(8080, 8080, options=(net,)))
    assert created.options == (net,)
    forward = Forward(EXTERNAL, TCP, 8080, V4(A), 8080)
    wanted_net = RemoteFilter(ipaddress.IPv4Network("198.51.100.0/24"), 0)
    assert e.actions() == [AddForward(forward, (wanted_net,))]
    ask(e, map_request(8080, 8080, options=(host,)))
    wanted_host = RemoteFilter(ipaddress.IPv4Network("198.51.100.7/32"), 5000)
    assert e.actions() == [SetFilters(forward, (wanted_net, wanted_host))]
    too_many = ask(e, map_request(8080, options=(Filter(128, 0, V4("198.51.100.9")),)))
    assert too_many.result is Result.EXCESSIVE_REMOTE_PEERS and e.actions() == []
    ask(e, map_request(8080, options=(Filter(0, 0, V4(0)), host)))
    assert e.actions() == [SetFilters(forward, (wanted_host,))]
    ask(e, map_request(8080, options=(Filter(0, 0, V4(0)),)))
    assert e.actions() == [SetFilters(forward, ())]
    v6 = Filter(64, 0, ipaddress.IPv6Address("2001:db8::"))
    assert ask(e, map_request(8080, options=(v6,))).result is Result.MALFORMED_OPTION


# --- header checks ------------------------------------------------------------------------------
def test_address_mismatch() -> None:
    e, _ = engine()
    response = ask(e, map_request(80, client=B), client=A)
    assert response.result is Result.ADDRESS_MISMATCH
    assert response.lifetime == pcpwire.LONG_ERROR_LIFETIME
    assert e.actions() == []


@pytest.mark.parametrize("version", [1, 3, 255])
def test_other_versions_get_unsupp_version_naming_2(version: int) -> None:
    e, _ = engine()
    data = bytes((version,)) + map_request(80)[1:]
    response = ask(e, data)
    assert response.result is Result.UNSUPP_VERSION and response.version == 2
    assert e.counters["pcp.MAP.UNSUPP_VERSION"] == 1


def test_version_answers_with_one_protocol_off() -> None:
    natpmp_only, _ = engine(pcp=False)
    reply = natpmp_only.receive(map_request(80), (A, 5000), T0 + 3)
    assert reply is not None
    assert pcpwire.decode_pmp_response(reply) == PmpErrorResponse(
        0, PmpResult.UNSUPPORTED_VERSION, 3)
    pcp_only, _ = engine(natpmp=False)
    response = ask(pcp_only, PmpAddressRequest().encode())
    assert response.result is Result.UNSUPP_VERSION and response.version == 2
    assert len(pcp_only.receive(PmpAddressRequest().encode(), (A, 1), T0) or b"") == 24


def test_malformed_requests() -> None:
    e, _ = engine()
    good = map_request(80)
    assert e.receive(good[:1], (A, 1), T0) is None              # < 2 bytes: dropped
    assert e.receive(good[:20], (A, 1), T0) is None             # < 24 bytes: dropped
    assert e.receive(good[:1] + b"\x81" + good[2:], (A, 1), T0) is None  # a response
    odd = ask(e, good + b"\x00")
    assert odd.result is Result.MALFORMED_REQUEST
    huge = e.receive(good + bytes(1200), (A, 1), T0)
    assert huge is not None and len(huge) == 1100
    short_map = e.receive(good[:40], (A, 1), T0)  # a MAP of 16 data bytes, copied back
    assert short_map is not None and short_map[3] == Result.MALFORMED_REQUEST
    assert short_map[12:24] == good[12:24]  # not parsed: the client address's tail stays
    unknown = good[:1] + b"\x09" + good[2:]
    reply = e.receive(unknown, (A, 1), T0)
    assert reply is not None and reply[3] == Result.UNSUPP_OPCODE and reply[24:] == good[24:]
    bad_option = e.receive(good + bytes((1, 0, 0, 20)), (A, 1), T0)
    assert bad_option is not None and bad_option[3] == Result.MALFORMED_OPTION
    assert e.counters["malformed.pcp.short"] == 2 and e.counters["malformed.pcp.response"] == 1


def test_disabled_opcodes() -> None:
    e, _ = engine(map=False, peer=False)
    assert ask(e, map_request(80)).result is Result.UNSUPP_OPCODE
    assert ask(e, peer_request()).result is Result.UNSUPP_OPCODE


# --- where requests may come from --------------------------------------------------------------
def test_requests_from_elsewhere_are_ignored() -> None:
    e, _ = engine()
    request = map_request(80)
    assert e.receive(request, (A, 1), T0, inside=False) is None
    assert e.receive(request, (A, 1), T0, destination=str(EXTERNAL)) is None
    assert e.receive(map_request(80, client="198.51.100.5"), ("198.51.100.5", 1), T0) is None
    assert e.receive(request, ("2001:db8::1", 1), T0) is None
    assert e.receive(b"", (A, 1), T0) is None
    assert e.receive(request, (A, 1), T0, destination=str(INSIDE)) is not None
    assert {k: v for k, v in e.counters.items() if k.startswith("drop.")} == {
        "drop.outside": 1, "drop.destination": 1, "drop.foreign_source": 1,
        "drop.not_ipv4": 1, "drop.empty": 1}
    assert len(e) == 1


def test_a_flooding_host_is_rate_limited_alone() -> None:
    e, _ = engine(host_rate=10.0, host_burst=5.0)
    announce = PcpRequest(Opcode.ANNOUNCE, 0, V4(A)).encode()
    answered = [e.receive(announce, (A, 1), T0) is not None for _ in range(8)]
    assert answered == [True] * 5 + [False] * 3
    other = PcpRequest(Opcode.ANNOUNCE, 0, V4(B)).encode()
    assert e.receive(other, (B, 1), T0) is not None
    assert e.receive(announce, (A, 1), T0 + 0.1) is not None  # one token back
    assert e.counters["drop.rate_limited"] == 3


# --- ANNOUNCE and the epoch ---------------------------------------------------------------------
def test_announce_request_and_epoch() -> None:
    e, _ = engine()
    response = ask(e, PcpRequest(Opcode.ANNOUNCE, 0, V4(A)).encode(), now=T0 + 42.7)
    assert (response.result, response.lifetime, response.epoch) == (Result.SUCCESS, 0, 42)
    refused = ask(e, PcpRequest(Opcode.ANNOUNCE, 0, V4(A), None,
                                (PreferFailure(),)).encode())
    assert refused.result is Result.UNSUPP_OPTION


def test_start_announces_ten_times_with_doubling_intervals() -> None:
    e, _ = engine(announce=True)
    sent: list[tuple[float, Send]] = []
    now = T0
    for _ in range(40):
        e.handle_timer(now)
        sent += [(now, a) for a in e.actions() if isinstance(a, Send)]
        at = e.next_timer()
        if at is None:
            break
        now = at
    times = sorted({t for t, _ in sent})
    assert len(times) == 10
    gaps = [round(b - a, 3) for a, b in itertools.pairwise(times)]
    assert gaps == list(ANNOUNCE_INTERVALS)
    for when, action in sent:
        assert action.destination == ("224.0.0.1", 5350)
        if action.data[0] == 2:
            assert pcpwire.decode_pcp_response(action.data) == PcpResponse(
                Opcode.ANNOUNCE, Result.SUCCESS, 0, int(when - T0))
        else:
            assert pcpwire.decode_pmp_response(action.data) == PmpAddressResponse(
                PmpResult.SUCCESS, int(when - T0), EXTERNAL)


def test_a_new_external_address_drops_every_mapping_and_restarts_the_epoch() -> None:
    e, authority = engine()
    ask(e, map_request(8080))
    e.actions()
    new = V4("203.0.113.2")
    e.set_external_address(new, T0 + 500)
    actions = e.actions()
    assert isinstance(actions[0], RemoveForward) and authority.held == {}
    assert e.epoch(T0 + 501) == 1
    e.handle_timer(T0 + 500)
    assert any(isinstance(a, Send) for a in e.actions())


# --- PEER ---------------------------------------------------------------------------------------
def test_peer_for_an_existing_flow_keeps_its_port() -> None:
    e, authority = engine()
    assert e.receive(peer_request(), (A, 5000), T0) is None
    [lookup] = e.actions()
    assert lookup == LookupFlow(lookup.token, TCP, V4(A), 40000, REMOTE, 443)
    e.flow_found(lookup.token, (EXTERNAL, 40000), T0 + 0.01)
    add, send = e.actions()
    pin = add.pin if isinstance(add, AddPeer) else None
    assert pin is not None and (pin.external_address, pin.external_port) == (EXTERNAL, 40000)
    assert isinstance(send, Send) and send.destination == (A, 5000)
    response = pcpwire.decode_pcp_response(send.data)
    assert response.result is Result.SUCCESS
    assert isinstance(response.data, PeerData) and response.data.external_port == 40000
    assert authority.held == {40000: "pcp 192.0.2.10"}
    # a refresh is answered at once, and never shortens the mapping
    again = ask(e, peer_request(lifetime=0), now=T0 + 100)
    assert again.result is Result.SUCCESS and again.lifetime == 500
    e.handle_timer(T0 + 601)
    assert e.actions() == [RemovePeer(pin)] and authority.held == {}


def test_peer_for_a_new_flow_claims_a_port_or_the_suggested_one() -> None:
    e, _ = engine()
    e.receive(peer_request(suggested=7000), (A, 5000), T0)
    [lookup] = e.actions()
    e.flow_found(lookup.token, None, T0)
    add, send = e.actions()
    assert isinstance(add, AddPeer) and add.pin.external_port == 7000
    # someone else's suggested port: PEER implies PREFER_FAILURE (section 12.1)
    e.receive(peer_request(suggested=7000, client=B), (B, 5000), T0)
    [lookup] = e.actions()
    e.flow_found(lookup.token, None, T0)
    [send] = e.actions()
    assert isinstance(send, Send)
    assert pcpwire.decode_pcp_response(send.data).result is Result.CANNOT_PROVIDE_EXTERNAL


def test_peer_shares_the_port_of_the_hosts_map_mapping() -> None:
    e, authority = engine()
    ask(e, map_request(40000, 8080))
    e.actions()
    e.receive(peer_request(40000), (A, 5000), T0)
    [lookup] = e.actions()
    e.flow_found(lookup.token, None, T0)
    add, _ = e.actions()
    assert isinstance(add, AddPeer) and add.pin.external_port == 8080
    assert list(authority.held) == [8080]


def test_peer_errors() -> None:
    e, _ = engine()
    assert ask(e, peer_request(options=(PreferFailure(),))).result is Result.MALFORMED_REQUEST
    assert ask(e, peer_request(options=(Filter(128, 0, REMOTE),))).result is \
        Result.MALFORMED_OPTION
    for remote in (V4("127.0.0.1"), V4("224.0.0.5"), V4(0), V4(A), EXTERNAL,
                   ipaddress.IPv6Address("2001:db8::1")):
        assert ask(e, peer_request(remote=remote)).result is Result.MALFORMED_REQUEST
    assert ask(e, peer_request(remote_port=0)).result is Result.MALFORMED_REQUEST


def test_a_lookup_never_answered_is_forgotten() -> None:
    e, _ = engine()
    e.receive(peer_request(), (A, 5000), T0)
    [lookup] = e.actions()
    assert e.next_timer() == T0 + 2.0
    e.handle_timer(T0 + 2.0)
    e.flow_found(lookup.token, None, T0 + 3)
    assert e.actions() == [] and e.counters["peer.lookup_stale"] == 1


# --- NAT-PMP ------------------------------------------------------------------------------------
def pmp(e: MappingEngine, request: Any, client: str = A, now: float = T0) -> Any:
    reply = e.receive(request.encode(), (client, 5000), now)
    assert reply is not None
    return pcpwire.decode_pmp_response(reply)


def test_natpmp_public_address_and_mapping() -> None:
    e, _ = engine()
    assert pmp(e, PmpAddressRequest(), now=T0 + 7) == PmpAddressResponse(
        PmpResult.SUCCESS, 7, EXTERNAL)
    request = PmpMapRequest(PmpOpcode.MAP_TCP, 8080, 8080, 3600)
    assert pmp(e, request) == PmpMapResponse(PmpOpcode.MAP_TCP, PmpResult.SUCCESS, 0, 8080,
                                             8080, 3600)
    assert e.actions() == [AddForward(Forward(EXTERNAL, TCP, 8080, V4(A), 8080))]
    # a retransmission (or a renewal asking another port) gets the same port back
    again = pmp(e, PmpMapRequest(PmpOpcode.MAP_TCP, 8080, 9999, 60))
    assert (again.external_port, again.lifetime) == (8080, 60)
    assert e.actions() == []


def test_natpmp_lifetime_is_shortened_never_lengthened() -> None:
    e, _ = engine()
    assert pmp(e, PmpMapRequest(PmpOpcode.MAP_UDP, 53, 0, 5)).lifetime == 5
    assert pmp(e, PmpMapRequest(PmpOpcode.MAP_UDP, 54, 0, 10**9)).lifetime == 86400


def test_natpmp_delete_one_and_all() -> None:
    e, authority = engine()
    for port in (2001, 2002, 2003):
        pmp(e, PmpMapRequest(PmpOpcode.MAP_UDP, port, port, 600))
    pmp(e, PmpMapRequest(PmpOpcode.MAP_TCP, 2001, 2001, 600))
    e.actions()
    one = pmp(e, PmpMapRequest(PmpOpcode.MAP_UDP, 2001, 0, 0))
    assert (one.result, one.internal_port, one.external_port, one.lifetime) == (
        PmpResult.SUCCESS, 2001, 0, 0)
    everything = pmp(e, PmpMapRequest(PmpOpcode.MAP_UDP, 0, 0, 0))
    assert everything.result is PmpResult.SUCCESS
    removed = e.actions()
    assert len(removed) == 3 and all(isinstance(a, RemoveForward) for a in removed)
    assert list(authority.held) == [2001]  # the TCP mapping stays


def test_natpmp_cannot_delete_a_pcp_mapping() -> None:
    e, _ = engine()
    ask(e, map_request(8080, protocol=UDP))
    response = pmp(e, PmpMapRequest(PmpOpcode.MAP_UDP, 8080, 0, 0))
    assert response.result is PmpResult.NOT_AUTHORIZED and len(e) == 1


def test_natpmp_companion_port_is_reserved_for_the_same_host() -> None:
    e, _ = engine()
    pmp(e, PmpMapRequest(PmpOpcode.MAP_TCP, 80, 8080, 600))
    other_host = pmp(e, PmpMapRequest(PmpOpcode.MAP_UDP, 80, 8080, 600), client=B)
    assert other_host.external_port != 8080
    same_host = pmp(e, PmpMapRequest(PmpOpcode.MAP_UDP, 80, 8080, 600))
    assert same_host.external_port == 8080


def test_natpmp_refusals() -> None:
    e, _ = engine(max_per_host=1)
    pmp(e, PmpMapRequest(PmpOpcode.MAP_TCP, 1, 0, 600))
    assert pmp(e, PmpMapRequest(PmpOpcode.MAP_TCP, 2, 0, 600)).result is \
        PmpResult.OUT_OF_RESOURCES
    assert pmp(e, PmpMapRequest(PmpOpcode.MAP_TCP, 0, 0, 600)).result is \
        PmpResult.NOT_AUTHORIZED
    unknown = e.receive(b"\x00\x05\x00\x00\x01\x02\x03\x04", (A, 1), T0)
    assert unknown == b"\x00\x85\x00\x05\x01\x02\x03\x04"
    assert e.receive(b"\x00\x82" + bytes(10), (A, 1), T0) is None  # a response: ignored
    disabled, _ = engine(map=False)
    assert pmp(disabled, PmpMapRequest(PmpOpcode.MAP_TCP, 1, 0, 600)).result is \
        PmpResult.NOT_AUTHORIZED


# --- with the real lease engine -----------------------------------------------------------------
def test_with_the_lease_engine_tcp_and_udp_share_one_claim() -> None:
    leases = Leases(LeasePolicy(pool=(EXTERNAL,), port_range=(30000, 30009)))
    e = MappingEngine(PcpConfig(EXTERNAL, INSIDE, "lan0", (NETWORK,), announce=False),
                      leases, T0)
    tcp = ask(e, map_request(5000, 5000, protocol=TCP))
    udp = ask(e, map_request(5000, 5000, protocol=UDP))
    assert isinstance(tcp.data, MapData) and isinstance(udp.data, MapData)
    assert tcp.data.external_port == udp.data.external_port == 5000
    anywhere = ask(e, map_request(6000))
    assert isinstance(anywhere.data, MapData) and anywhere.data.external_port == 30000
    e.actions()
    e.handle_timer(T0 + 3600)
    assert len(e) == 0 and len(e.actions()) == 3


# --- never a crash, always counted --------------------------------------------------------------
@settings(max_examples=400)
@given(st.binary(max_size=1200), st.sampled_from([A, B, "198.51.100.1", "2001:db8::2"]),
       st.booleans())
def test_any_datagram_is_answered_or_dropped_and_counted(data: bytes, client: str,
                                                          inside: bool) -> None:
    e, authority = engine()
    before = sum(e.counters.values())
    reply = e.receive(data, (client, 5000), T0, inside=inside)
    assert sum(e.counters.values()) > before
    if reply is not None:
        assert len(reply) <= 1100
    assert len(authority.held) == len(e)


@settings(max_examples=200)
@given(st.lists(st.tuples(st.sampled_from(["map", "delete", "pmp", "peer", "tick"]),
                          st.integers(1, 4), st.sampled_from([A, B])), max_size=30))
def test_claims_always_match_the_mappings(steps: list[tuple[str, int, str]]) -> None:
    e, authority = engine(min_lifetime=10)
    now = T0
    for kind, port, client in steps:
        if kind == "map":
            e.receive(map_request(port, 8080, lifetime=30, client=client), (client, 1), now)
        elif kind == "delete":
            e.receive(map_request(port, lifetime=0, client=client), (client, 1), now)
        elif kind == "pmp":
            e.receive(PmpMapRequest(PmpOpcode.MAP_UDP, port, 8080, 20).encode(), (client, 1),
                      now)
        elif kind == "peer":
            e.receive(peer_request(port, client=client), (client, 1), now)
            for action in e.actions():
                if isinstance(action, LookupFlow):
                    e.flow_found(action.token, None, now)
        else:
            now += 15
            e.handle_timer(now)
        e.actions()
        owners = {f"pcp {m.internal_address}" for m in e.mappings()}
        assert set(authority.held.values()) <= owners
        assert {m.external_port for m in e.mappings()} == set(authority.held)
