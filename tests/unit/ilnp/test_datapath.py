"""The ILNP node's per-packet hooks (ilnp.datapath.DataPath): application form (APP:<NID> at
both ends) out to ILNPv6 on the wire and back, the nonce window with a fake clock, every
verdict of the inbound checks (RFC 6741/6744), both checksum rules including the partial sums
of NEEDS_CSUM packets, and hypothesis: nothing fed to a hook raises, counters only grow.

Packets are built with scapy; the wire form of a correspondent's packet under the ILNP rule
is scapy's plain IPv6 checksum converted with packet.ilnp.convert_checksum."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scapy.layers.inet import TCP, UDP
from scapy.layers.inet6 import (
    HBHOptUnknown,
    ICMPv6EchoRequest,
    IPv6,
    IPv6ExtHdrDestOpt,
    IPv6ExtHdrFragment,
    IPv6ExtHdrHopByHop,
)
from scapy.layers.ipsec import AH
from scapy.packet import Packet

from ipshift.ilnp.datapath import (
    DROP_REASONS,
    DataPath,
    is_locator_update,
    locator_sum,
    neutral_locator,
)
from ipshift.ilnp.engine import Path
from ipshift.packet import ilnp
from ipshift.packet.checksum import complete_partial_checksum, pseudo_header_sum
from ipshift.packet.ilnp import LocatorEntry, LocatorUpdate, Rule
from ipshift.tunnel.config import Endpoint
from ipshift.tunnel.hooks import CONTROL, DROP, FORWARD, HookResult
from ipshift.tunnel.peers import Peer

FUZZ = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])

APP = 0x20010DB8D2460000  # 2001:db8:d246::/64, the default application locator (neutral)
L_OURS, L_OURS2 = 0x20010DB800010000, 0x20010DB800030000  # this node's locators
L_PEER, L_NEW = 0x20010DB800020000, 0x20010DB800040000  # the correspondent's; one it has not
ME, N, STRANGER = 0x0000000000000011, 0x021122FFFE334455, 0x0000000000000033
NONCE_OUT = bytes.fromhex("a1b2c3d4")  # ours, carried out
NONCE_IN = bytes.fromhex("5e6f7081")  # the correspondent's, expected in
WRONG = bytes.fromhex("deadbeef")
RULES: tuple[Rule, ...] = ("ilnp", "ipv6")
PROTOS = ("tcp", "udp", "icmpv6")
CHECKSUM_AT = {"tcp": 16, "udp": 6, "icmpv6": 2}  # within the transport header
PAYLOAD = b"ilnp datapath payload"


def address(locator: int, nid: int) -> str:
    return str(ilnp.ilv(locator, nid))


def layer(proto: str) -> Packet:
    # dport 2: read as a fragment header by a mutated chain, it is an offset-0 last fragment
    return {"tcp": TCP(sport=40000, dport=2, flags="PA", seq=7),
            "udp": UDP(sport=40000, dport=2),
            "icmpv6": ICMPv6EchoRequest(id=7, seq=1)}[proto]


def app_packet(proto: str = "udp", src: tuple[int, int] = (APP, ME),
               dst: tuple[int, int] = (APP, N)) -> bytearray:
    """What a program writes to TUN: plain IPv6 checksum over the APP addresses."""
    return bytearray(bytes(IPv6(src=address(*src), dst=address(*dst)) / layer(proto) / PAYLOAD))


def wire_packet(proto: str = "udp", rule: Rule = "ilnp", nonce: bytes | None = None,
                src: tuple[int, int] = (L_PEER, N),
                dst: tuple[int, int] = (L_OURS, ME)) -> bytearray:
    """What the correspondent sends: ILNPv6 with its checksum under `rule`."""
    buf = bytearray(bytes(IPv6(src=address(*src), dst=address(*dst)) / layer(proto) / PAYLOAD))
    if proto != "icmpv6":
        ilnp.convert_checksum(buf, "ipv6", rule)
    if nonce is not None:
        buf = bytearray(ilnp.insert_nonce(buf, nonce))
    assert ilnp.verify_checksum(buf, rule)
    return buf


def make_path(**changes: object) -> Path:
    fields: dict[str, object] = {
        "nid": N, "local": L_OURS, "remote": L_PEER, "next_hop": (L_PEER, N),
        "nonce_out": NONCE_OUT, "nonce_in": NONCE_IN, "carry_until": 0.0,
        "carry_first": False, "locators": frozenset({L_PEER}),
    }
    fields.update(changes)
    return Path(**fields)  # type: ignore[arg-type]


def make_datapath(rule: Rule = "ilnp", *, router: bool = False, now: float = 100.0,
                  paths: Iterable[Path] | None = None,
                  own: Iterable[int] = (L_OURS, L_OURS2),
                  **path_changes: object) -> tuple[DataPath, list[float]]:
    """A DataPath with one correspondent N loaded, and the list behind its clock."""
    clock = [now]
    path = DataPath(ME, APP, rule=rule, clock=lambda: clock[0], router=router)
    loaded = list(paths) if paths is not None else [make_path(**path_changes)]
    path.apply(DataPath.encode_state({p.nid: p for p in loaded}, own))
    return path, clock


def peer(name: str) -> Peer:
    return Peer(name, Endpoint.parse("192.0.2.2:7700"))


def addresses(buf: bytes | bytearray) -> tuple[tuple[int, int], tuple[int, int]]:
    return ilnp.split_ilv(bytes(buf[8:24])), ilnp.split_ilv(bytes(buf[24:40]))


def checksum_field(buf: bytes | bytearray, proto: str, at: int = 40) -> bytes:
    return bytes(buf[at + CHECKSUM_AT[proto]:at + CHECKSUM_AT[proto] + 2])


def without_checksum(buf: bytes | bytearray, proto: str) -> bytes:
    """The transport header and payload with the checksum field zeroed."""
    segment = bytearray(buf[40:])
    segment[CHECKSUM_AT[proto]:CHECKSUM_AT[proto] + 2] = b"\0\0"
    return bytes(segment)


def drops(path: DataPath) -> dict[str, int]:
    return {reason: path.counters[reason] for reason in DROP_REASONS if path.counters[reason]}


# --- the application locator ------------------------------------------------------------------
def test_the_default_application_locator_is_checksum_neutral() -> None:
    assert locator_sum(APP) == 0
    assert neutral_locator(APP) == APP


@given(st.integers(0, 2**64 - 1))
def test_locator_sum_is_the_ones_complement_sum_of_the_words(locator: int) -> None:
    words = sum((locator >> shift) & 0xFFFF for shift in (48, 32, 16, 0))
    assert locator_sum(locator) == words % 0xFFFF


@given(st.integers(0, 2**64 - 1))
def test_neutral_locator_is_neutral_and_in_the_same_48(locator: int) -> None:
    neutral = neutral_locator(locator)
    assert locator_sum(neutral) == 0
    assert neutral >> 16 == locator >> 16
    DataPath(ME, neutral, clock=lambda: 0.0)  # accepted


def test_a_non_neutral_application_locator_is_refused_naming_the_neutral_one() -> None:
    bad = 0x20010DB8D2460001
    with pytest.raises(ValueError, match=f"{neutral_locator(bad):#x}") as caught:
        DataPath(ME, bad, clock=lambda: 0.0)
    assert "not checksum-neutral" in str(caught.value)
    assert neutral_locator(bad) == APP


def test_an_unknown_checksum_rule_is_refused() -> None:
    with pytest.raises(ValueError, match="'ilnp' or 'ipv6'"):
        DataPath(ME, APP, rule="rfc", clock=lambda: 0.0)


def test_the_state_survives_json_as_a_worker_would_get_it() -> None:
    state = DataPath.encode_state({N: make_path(nonce_in=None)}, [L_OURS2, L_OURS])
    again = json.loads(json.dumps(state))
    assert again["own"] == sorted([L_OURS, L_OURS2])
    path = DataPath(ME, APP, clock=lambda: 100.0)
    path.apply(again)
    assert path.own == {L_OURS, L_OURS2}
    assert path.outbound(app_packet(), 0, False) is FORWARD
    # a later state replaces the earlier one whole
    path.apply(DataPath.encode_state({}, [L_OURS]))
    assert path.outbound(app_packet(), 0, False) is CONTROL


# --- outbound: TUN -> wire --------------------------------------------------------------------
@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("proto", PROTOS)
def test_outbound_puts_in_the_chosen_locators(rule: Rule, proto: str) -> None:
    path, _ = make_datapath(rule)
    buf = app_packet(proto)
    before = bytes(buf)
    assert path.outbound(buf, 0, False) is FORWARD
    assert addresses(buf) == ((L_OURS, ME), (L_PEER, N))
    assert ilnp.find_nonce(buf) is None  # the window is over
    assert without_checksum(buf, proto) == without_checksum(before, proto)  # ports, payload
    if proto == "icmpv6":  # always the full addresses: fixed, right under both rules
        assert ilnp.verify_checksum(buf, "ipv6") and ilnp.verify_checksum(buf, "ilnp")
    elif rule == "ilnp":  # the neutral APP locator: the kernel's sum is already RFC 6741's
        assert checksum_field(buf, proto) == checksum_field(before, proto)
        assert ilnp.verify_checksum(buf, "ilnp")
    else:
        assert ilnp.verify_checksum(buf, "ipv6")
    assert path.out_by_locator == {L_OURS: 1}
    assert path.outbound(app_packet(proto), 0, False) is FORWARD
    assert path.out_by_locator == {L_OURS: 2}
    assert drops(path) == {}


def test_outbound_carries_the_nonce_until_carry_until_then_not() -> None:
    path, clock = make_datapath(now=10.0, carry_until=12.5)
    for now, carried in ((10.0, True), (12.4, True), (12.5, False), (30.0, False)):
        clock[0] = now
        buf = app_packet("tcp")
        result = path.outbound(buf, 0, False)
        if carried:
            assert isinstance(result, bytes)
            assert ilnp.find_nonce(result) == NONCE_OUT
            assert addresses(result) == ((L_OURS, ME), (L_PEER, N))
            assert ilnp.verify_checksum(result, "ilnp")
            assert result.endswith(PAYLOAD)
        else:
            assert result is FORWARD
            assert ilnp.find_nonce(buf) is None
    assert path.counters["nonce_added"] == 2


@pytest.mark.parametrize("nonce", [NONCE_OUT, bytes(range(12))])
def test_outbound_carries_the_nonce_until_the_first_answer_when_carry_first(
        nonce: bytes) -> None:
    path, _ = make_datapath(now=100.0, carry_until=0.0, carry_first=True, nonce_out=nonce)
    first = path.outbound(app_packet(), 0, False)
    assert isinstance(first, bytes) and ilnp.find_nonce(first) == nonce
    assert isinstance(path.outbound(app_packet(), 0, False), bytes)  # still no answer
    # the correspondent answers (without a nonce, from a locator we hold)
    assert path.inbound(wire_packet(), 0, False) is FORWARD
    buf = app_packet()
    assert path.outbound(buf, 0, False) is FORWARD
    assert ilnp.find_nonce(buf) is None


def test_outbound_without_an_entry_goes_to_the_control_plane_untouched() -> None:
    path, _ = make_datapath()
    buf = app_packet(dst=(APP, STRANGER))
    before = bytes(buf)
    assert path.outbound(buf, 0, False) is CONTROL
    assert bytes(buf) == before
    assert path.counters["to_control"] == 1 and path.out_by_locator == {}


def test_outbound_to_the_catch_all_peer_goes_to_the_control_plane() -> None:
    path, _ = make_datapath()
    buf = app_packet()
    assert path.outbound(buf, 0, False, peer("unresolved")) is CONTROL
    assert addresses(buf) == ((APP, ME), (APP, N))
    # a routed peer is fine, and so is the catch-all under another name
    assert path.outbound(app_packet(), 0, False, peer("r1")) is FORWARD
    other = DataPath(ME, APP, clock=lambda: 100.0, catch_all="nowhere")
    other.apply(DataPath.encode_state({N: make_path()}, [L_OURS]))
    assert other.outbound(app_packet(), 0, False, peer("unresolved")) is FORWARD
    assert other.outbound(app_packet(), 0, False, peer("nowhere")) is CONTROL


@pytest.mark.parametrize("src,dst", [
    ((APP, STRANGER), (APP, N)),   # another NID
    ((L_OURS, ME), (APP, N)),      # already a real locator
    ((APP, ME), (L_PEER, N)),      # destination not in application form
])
def test_outbound_from_anything_but_app_me_is_dropped(src: tuple[int, int],
                                                      dst: tuple[int, int]) -> None:
    path, _ = make_datapath()
    buf = app_packet(src=src, dst=dst)
    before = bytes(buf)
    assert path.outbound(buf, 0, False) is DROP
    assert drops(path) == {"foreign_source": 1}
    assert bytes(buf) == before


@pytest.mark.parametrize("data", [b"", b"\x60" * 39, bytes(IPv6())[:20],
                                  b"\x45" + bytes(59)])
def test_outbound_of_a_short_or_non_ipv6_packet_is_dropped_as_malformed(data: bytes) -> None:
    path, _ = make_datapath()
    assert path.outbound(bytearray(data), 0, False) is DROP
    assert drops(path) == {"malformed": 1}


def test_outbound_of_a_packet_longer_than_its_buffer_is_dropped_as_malformed() -> None:
    path, _ = make_datapath()
    buf = app_packet()[:-4]
    assert path.outbound(buf, 0, False) is DROP
    assert drops(path) == {"malformed": 1}


def test_outbound_nonce_refused_for_a_fragment_goes_without() -> None:
    path, _ = make_datapath(carry_first=True)
    buf = bytearray(bytes(IPv6(src=address(APP, ME), dst=address(APP, N))
                          / IPv6ExtHdrFragment(m=1, id=9) / UDP(sport=1, dport=2) / PAYLOAD))
    assert path.outbound(buf, 0, False) is FORWARD
    assert addresses(buf) == ((L_OURS, ME), (L_PEER, N))
    assert path.counters["nonce_refused"] == 1 and path.counters["nonce_added"] == 0


def test_outbound_at_an_offset_leaves_the_bytes_before_alone() -> None:
    path, _ = make_datapath(carry_first=True)
    buf = bytearray(b"\xee" * 10) + app_packet("tcp")
    result = path.outbound(buf, 10, False)
    assert isinstance(result, bytes)
    assert buf[:10] == b"\xee" * 10
    assert ilnp.find_nonce(result) == NONCE_OUT
    assert ilnp.verify_checksum(result, "ilnp")


def _partial(buf: bytearray, proto: str) -> bytearray:
    """Mark the packet NEEDS_CSUM as TUN does: the field holds the plain IPv6 pseudo-header
    sum over its (APP) addresses, not complemented."""
    at = 40 + CHECKSUM_AT[proto]
    buf[at:at + 2] = pseudo_header_sum(buf[8:24], buf[24:40], buf[6],
                                       len(buf) - 40).to_bytes(2, "big")
    return buf


@pytest.mark.parametrize("carry", [False, True])
@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("proto", PROTOS)
def test_outbound_partial_sums_complete_right(rule: Rule, proto: str, carry: bool) -> None:
    path, _ = make_datapath(rule, carry_first=carry)
    buf = _partial(app_packet(proto), proto)
    result = path.outbound(buf, 0, True)
    packet = bytearray(result) if isinstance(result, bytes) else buf
    assert (result is FORWARD) != carry
    start = 40 + (8 if carry else 0)  # the nonce's destination options header comes first
    complete_partial_checksum(packet, start, CHECKSUM_AT[proto])
    assert addresses(packet) == ((L_OURS, ME), (L_PEER, N))
    assert ilnp.verify_checksum(packet, "ipv6" if proto == "icmpv6" else rule)
    assert (ilnp.find_nonce(packet) == NONCE_OUT) == carry


@pytest.mark.parametrize("proto", ["tcp", "udp"])
def test_outbound_partial_to_the_control_plane_is_completed(proto: str) -> None:
    path, _ = make_datapath()
    buf = _partial(app_packet(proto, dst=(APP, STRANGER)), proto)
    assert not ilnp.verify_checksum(buf, "ipv6")
    assert path.outbound(buf, 0, True) is CONTROL
    assert ilnp.verify_checksum(buf, "ipv6")  # sent or delivered without the vnet header


# --- inbound: wire -> TUN ---------------------------------------------------------------------
@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("proto", PROTOS)
def test_inbound_from_a_known_locator_is_put_in_application_form(rule: Rule,
                                                                proto: str) -> None:
    path, _ = make_datapath(rule)
    buf = wire_packet(proto, rule)
    assert path.inbound(buf, 0, False) is FORWARD
    assert addresses(buf) == ((APP, N), (APP, ME))
    assert ilnp.verify_checksum(buf, "ipv6")  # what the kernel checks, over APP addresses
    assert bytes(buf).endswith(PAYLOAD)
    assert path.in_by_locator == {L_OURS: 1}
    assert path.inbound(wire_packet(proto, rule), 0, False) is FORWARD
    assert path.in_by_locator == {L_OURS: 2}
    assert drops(path) == {}


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("proto", PROTOS)
@pytest.mark.parametrize("nonce", [NONCE_IN, NONCE_OUT])  # FreeBSD: one nonce both ways
def test_inbound_with_the_right_nonce_comes_out_without_it(rule: Rule, proto: str,
                                                           nonce: bytes) -> None:
    path, _ = make_datapath(rule)
    buf = wire_packet(proto, rule, nonce)
    result = path.inbound(buf, 0, False)
    assert isinstance(result, bytes)
    assert ilnp.find_nonce(result) is None
    assert len(result) == len(buf) - 8
    assert result[6] == {"tcp": 6, "udp": 17, "icmpv6": 58}[proto]
    assert addresses(result) == ((APP, N), (APP, ME))
    assert ilnp.verify_checksum(result, "ipv6")
    assert result.endswith(PAYLOAD)
    assert path.counters["nonce_removed"] == 1


def test_inbound_with_a_12_byte_nonce_comes_out_without_it() -> None:
    nonce = bytes(range(12))
    path, _ = make_datapath(nonce_in=nonce)
    result = path.inbound(wire_packet("tcp", nonce=nonce), 0, False)
    assert isinstance(result, bytes) and ilnp.find_nonce(result) is None
    assert addresses(result) == ((APP, N), (APP, ME))
    assert ilnp.verify_checksum(result, "ipv6") and result.endswith(PAYLOAD)


def test_inbound_with_a_wrong_nonce_is_dropped() -> None:
    path, _ = make_datapath()
    buf = wire_packet(nonce=WRONG)
    before = bytes(buf)
    assert path.inbound(buf, 0, False) is DROP
    assert drops(path) == {"bad_nonce": 1}
    assert bytes(buf) == before
    # from a new locator too: a wrong nonce never teaches a locator
    assert path.inbound(wire_packet(nonce=WRONG, src=(L_NEW, N)), 0, False) is DROP
    assert drops(path) == {"bad_nonce": 2}


def test_inbound_from_an_unknown_locator_without_nonce_is_dropped() -> None:
    path, _ = make_datapath()
    assert path.inbound(wire_packet(src=(L_NEW, N)), 0, False) is DROP
    assert drops(path) == {"unknown_locator": 1}
    assert path.in_by_locator == {}


def test_inbound_from_an_unknown_locator_with_the_right_nonce_goes_to_the_engine() -> None:
    path, _ = make_datapath()
    buf = wire_packet(nonce=NONCE_IN, src=(L_NEW, N))
    before = bytes(buf)
    assert path.inbound(buf, 0, False) is CONTROL
    assert bytes(buf) == before  # the engine gets it as it came
    assert path.counters["to_control"] == 1 and drops(path) == {}


@pytest.mark.parametrize("nonce", [None, NONCE_IN])
def test_inbound_from_an_unknown_nid_goes_to_the_engine(nonce: bytes | None) -> None:
    path, _ = make_datapath()
    assert path.inbound(wire_packet(nonce=nonce, src=(L_PEER, STRANGER)), 0, False) is CONTROL
    assert path.counters["to_control"] == 1


def test_inbound_with_a_nonce_before_the_peers_is_learned_goes_to_the_engine() -> None:
    path, _ = make_datapath(nonce_in=None)
    assert path.inbound(wire_packet(nonce=WRONG), 0, False) is CONTROL
    assert path.counters["to_control"] == 1 and drops(path) == {}
    # and without a nonce from a known locator it is plain data
    assert path.inbound(wire_packet(), 0, False) is FORWARD


@pytest.mark.parametrize("router", [False, True])
def test_inbound_for_another_nid(router: bool) -> None:
    path, _ = make_datapath(router=router)
    buf = wire_packet(dst=(L_OURS, STRANGER))
    if router:  # transit: the engine forwards it
        assert path.inbound(buf, 0, False) is CONTROL
        assert drops(path) == {}
    else:
        assert path.inbound(buf, 0, False) is DROP
        assert drops(path) == {"not_for_us": 1}


def test_inbound_for_our_nid_at_a_locator_we_do_not_have_is_dropped() -> None:
    path, _ = make_datapath()
    assert path.inbound(wire_packet(dst=(L_NEW, ME)), 0, False) is DROP
    assert path.inbound(wire_packet(dst=(APP, ME)), 0, False) is DROP
    assert drops(path) == {"not_our_locator": 2}
    # the second locator we hold is fine
    assert path.inbound(wire_packet(dst=(L_OURS2, ME)), 0, False) is FORWARD
    assert path.in_by_locator == {L_OURS2: 1}


def _locator_update(nonce: bytes | None, src: tuple[int, int] = (L_NEW, N)) -> bytearray:
    update = LocatorUpdate.advertisement([LocatorEntry(L_NEW, 10, 30)])
    return bytearray(ilnp.locator_update_packet(address(*src), address(L_OURS, ME), update,
                                                nonce=nonce))


@pytest.mark.parametrize("nonce", [None, NONCE_IN, WRONG])
@pytest.mark.parametrize("src", [(L_NEW, N), (L_PEER, N), (L_PEER, STRANGER)])
def test_a_locator_update_always_goes_to_the_engine(nonce: bytes | None,
                                                    src: tuple[int, int]) -> None:
    path, _ = make_datapath()
    buf = _locator_update(nonce, src)
    assert is_locator_update(buf)
    assert path.inbound(buf, 0, False) is CONTROL
    assert ilnp.parse_locator_update_packet(buf).nonce == nonce  # handed over intact
    assert drops(path) == {}


def test_is_locator_update_both_ways() -> None:
    for nonce in (None, NONCE_IN, bytes(12)):
        assert is_locator_update(_locator_update(nonce))
        framed = b"\xee" * 14 + _locator_update(nonce)
        assert is_locator_update(framed, 14)
        assert not is_locator_update(framed)
    assert not is_locator_update(wire_packet("icmpv6"))  # an echo request
    assert not is_locator_update(wire_packet("icmpv6", nonce=NONCE_IN))
    assert not is_locator_update(wire_packet("udp", nonce=NONCE_IN))
    assert not is_locator_update(wire_packet("tcp"))
    whole = _locator_update(NONCE_IN)
    assert not is_locator_update(whole[:40])
    assert not is_locator_update(whole[:41])  # the options header cut short
    assert not is_locator_update(whole[:48])  # nothing after it
    assert not is_locator_update(b"")


def test_inbound_of_a_short_or_non_ipv6_packet_is_dropped_as_malformed() -> None:
    path, _ = make_datapath()
    for data in (b"", bytes(39), b"\x45" + bytes(59)):
        assert path.inbound(bytearray(data), 0, False) is DROP
    assert drops(path) == {"malformed": 3}


def test_inbound_with_a_broken_options_header_is_dropped_as_malformed() -> None:
    path, _ = make_datapath()
    buf = wire_packet(nonce=NONCE_IN)
    buf[41] = 40  # the options header claims 328 bytes
    assert path.inbound(buf, 0, False) is DROP
    assert drops(path) == {"malformed": 1}


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("proto", ["tcp", "udp"])
def test_inbound_partial_to_the_control_plane_is_completed(rule: Rule, proto: str) -> None:
    path, _ = make_datapath(rule)
    buf = wire_packet(proto, rule, src=(L_PEER, STRANGER))
    at = 40 + CHECKSUM_AT[proto]
    buf[at:at + 2] = b"\x12\x34"
    assert path.inbound(buf, 0, True) is CONTROL
    assert ilnp.verify_checksum(buf, rule)


@pytest.mark.parametrize("header", ["fragment", "ah"])
def test_inbound_of_a_fragment_with_the_right_nonce_does_not_raise(header: str) -> None:
    path, _ = make_datapath()
    extra = (IPv6ExtHdrFragment(m=1, id=9) if header == "fragment"
             else AH(nh=17, payloadlen=4, spi=1, icv=bytes(12)))
    buf = bytearray(bytes(IPv6(src=address(L_PEER, N), dst=address(L_OURS, ME))
                          / IPv6ExtHdrDestOpt(options=[HBHOptUnknown(otype=0x8B,
                                                                     optdata=NONCE_IN)])
                          / extra / UDP(sport=1, dport=2) / PAYLOAD))
    assert ilnp.find_nonce(buf) == NONCE_IN
    result = path.inbound(buf, 0, False)
    assert result is DROP or result is CONTROL or isinstance(result, bytes)


def test_inbound_checks_a_nonce_behind_a_hop_by_hop_header() -> None:
    path, _ = make_datapath()
    buf = bytearray(bytes(IPv6(src=address(L_PEER, N), dst=address(L_OURS, ME))
                          / IPv6ExtHdrHopByHop()
                          / IPv6ExtHdrDestOpt(options=[HBHOptUnknown(otype=0x8B,
                                                                     optdata=WRONG)])
                          / UDP(sport=1, dport=2) / PAYLOAD))
    assert ilnp.find_nonce(buf) == WRONG
    assert path.inbound(buf, 0, False) is DROP
    assert drops(path) == {"bad_nonce": 1}


# --- the engine's copies: to_wire and to_application -----------------------------------------
@pytest.mark.parametrize("nonce", [None, NONCE_OUT, bytes(range(12))])
@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("proto", PROTOS)
def test_to_wire_and_to_application_round_trip(rule: Rule, proto: str,
                                               nonce: bytes | None) -> None:
    path, _ = make_datapath(rule)
    original = bytes(app_packet(proto))
    wire = path.to_wire(original, L_OURS2, L_NEW, nonce)
    assert addresses(wire) == ((L_OURS2, ME), (L_NEW, N))
    assert ilnp.find_nonce(wire) == nonce
    assert ilnp.verify_checksum(wire, "ipv6" if proto == "icmpv6" else rule)
    back = path.to_application(bytearray(wire))
    assert back == original


# --- hypothesis: nothing raises, counters only grow -------------------------------------------
def _verdict_ok(result: HookResult) -> bool:
    return result is FORWARD or result is DROP or result is CONTROL or \
        isinstance(result, bytes | bytearray | memoryview)


def _feed(path: DataPath, hook: Callable[..., HookResult], data: bytes, offset: int,
          partial: bool) -> None:
    before = dict(path.counters)
    out_before, in_before = dict(path.out_by_locator), dict(path.in_by_locator)
    result = hook(bytearray(data), offset, partial)
    assert _verdict_ok(result)
    assert set(path.counters) == set(before)
    assert all(path.counters[key] >= before[key] for key in before)
    for now, then in ((path.out_by_locator, out_before), (path.in_by_locator, in_before)):
        assert all(now.get(key, 0) >= count for key, count in then.items())


@FUZZ
@given(data=st.binary(max_size=200), offset=st.integers(0, 8), partial=st.booleans(),
       router=st.booleans(), rule=st.sampled_from(RULES))
def test_hooks_take_any_bytes(data: bytes, offset: int, partial: bool, router: bool,
                              rule: Rule) -> None:
    path, _ = make_datapath(rule, router=router, carry_first=True)
    _feed(path, path.outbound, data, offset, partial)
    _feed(path, path.inbound, data, offset, partial)
    # an IPv6 header with our addresses in front of random bytes reaches the deeper checks
    for head in (app_packet()[:40], wire_packet()[:40], wire_packet(nonce=NONCE_IN)[:40]):
        _feed(path, path.outbound, bytes(head) + data, 0, partial)
        _feed(path, path.inbound, bytes(head) + data, 0, partial)


SEEDS = [bytes(app_packet(proto)) for proto in PROTOS] + [
    bytes(wire_packet(proto, rule, nonce)) for proto in PROTOS for rule in RULES
    for nonce in (None, NONCE_IN)] + [bytes(_locator_update(NONCE_IN)),
                                      bytes(_locator_update(None))]


@FUZZ
@given(seed=st.sampled_from(SEEDS), cut=st.integers(0, 200),
       flips=st.lists(st.tuples(st.integers(0, 199), st.integers(0, 255)), max_size=4),
       partial=st.booleans(), router=st.booleans(), rule=st.sampled_from(RULES))
def test_hooks_take_truncated_and_mutated_packets(seed: bytes, cut: int,
                                                  flips: list[tuple[int, int]],
                                                  partial: bool, router: bool,
                                                  rule: Rule) -> None:
    data = bytearray(seed[:cut] if cut < len(seed) else seed)
    for at, value in flips:
        if at < len(data):
            data[at] = value
    path, _ = make_datapath(rule, router=router, carry_first=True)
    _feed(path, path.outbound, bytes(data), 0, partial)
    _feed(path, path.inbound, bytes(data), 0, partial)


@FUZZ
@given(st.lists(st.tuples(st.sampled_from(SEEDS), st.booleans(), st.booleans()),
                min_size=1, max_size=12))
def test_counters_only_grow_over_a_run_of_packets(
        run: list[tuple[bytes, bool, bool]]) -> None:
    path, clock = make_datapath(carry_until=100.5)
    for step, (data, outward, partial) in enumerate(run):
        clock[0] = 100.0 + step * 0.25
        _feed(path, path.outbound if outward else path.inbound, data, 0, partial)

