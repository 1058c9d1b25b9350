"""PCP and NAT-PMP codecs: RFC layouts byte by byte, round trips, and malformed input always
one typed error (hypothesis)."""

from __future__ import annotations

import ipaddress
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ipshift.rsip import pcpwire
from ipshift.rsip.pcpwire import (
    Filter,
    MapData,
    NatPmpWireError,
    Opcode,
    PcpRequest,
    PcpResponse,
    PcpWireError,
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
V6 = ipaddress.IPv6Address
CLIENT = V4("192.0.2.10")
EXTERNAL = V4("203.0.113.1")
NONCE = bytes(range(12))
MAPPED = bytes(10) + b"\xff\xff"


# --- layouts -------------------------------------------------------------------------------------
def test_map_request_layout_matches_rfc_6887_figures_2_and_9() -> None:
    request = PcpRequest(Opcode.MAP, 3600, CLIENT,
                         MapData(NONCE, 6, 8080, 8081, EXTERNAL))
    expected = (struct.pack("!BBHI", 2, 1, 0, 3600) + MAPPED + CLIENT.packed
                + NONCE + bytes((6, 0, 0, 0)) + struct.pack("!HH", 8080, 8081)
                + MAPPED + EXTERNAL.packed)
    assert request.encode() == expected
    assert len(expected) == 60
    assert pcpwire.decode_pcp_request(expected) == request


def test_peer_request_layout_matches_figure_11() -> None:
    remote = V4("198.51.100.7")
    data = PeerData(NONCE, 17, 5000, 0, V4(0), 53, remote)
    encoded = PcpRequest(Opcode.PEER, 120, CLIENT, data).encode()
    assert len(encoded) == 80
    assert encoded[60:64] == struct.pack("!HH", 53, 0)
    assert encoded[64:80] == MAPPED + remote.packed
    assert pcpwire.decode_pcp_request(encoded).data == data


def test_response_header_layout_matches_figure_3() -> None:
    response = PcpResponse(Opcode.MAP, Result.NOT_AUTHORIZED, 1800, 77,
                           MapData(NONCE, 6, 80, 80, EXTERNAL))
    encoded = response.encode()
    assert encoded[:12] == struct.pack("!BBBBII", 2, 0x81, 0, 2, 1800, 77)
    assert encoded[12:24] == bytes(12)
    assert pcpwire.decode_pcp_response(encoded) == response


def test_options_are_padded_and_keep_their_semantic_length() -> None:
    options = (ThirdParty(V4("192.0.2.20")), PreferFailure(),
               Filter(120, 0, V4("198.51.100.0")), UnknownOption(0x80, b"\x01\x02\x03"))
    encoded = pcpwire.encode_options(options)
    # THIRD_PARTY 4+16, PREFER_FAILURE 4+0, FILTER 4+20, unknown 4+3+1 padding
    assert len(encoded) == 20 + 4 + 24 + 8
    assert encoded[:4] == bytes((1, 0, 0, 16))
    assert encoded[20:24] == bytes((2, 0, 0, 0))
    assert encoded[24:28] == bytes((3, 0, 0, 20))
    assert encoded[28:32] == bytes((0, 120, 0, 0))
    assert encoded[48:52] == bytes((0x80, 0, 0, 3))
    assert encoded[55] == 0
    assert pcpwire.decode_options(encoded) == options


def test_filter_network_and_prefix_rules() -> None:
    item = Filter(120, 443, V4("198.51.100.77"))
    assert item.network() == ipaddress.IPv4Network("198.51.100.0/24")
    assert Filter(0, 0, V4(0)).clears
    with pytest.raises(ValueError):
        Filter(95, 0, V4("198.51.100.1"))  # IPv4 prefixes are 96..128 on the wire
    assert Filter(64, 0, V6("2001:db8::")).network() == ipaddress.IPv6Network("2001:db8::/64")


def test_announce_is_a_bare_success_header() -> None:
    encoded = pcpwire.announce(42)
    assert encoded == struct.pack("!BBBBII", 2, 0x80, 0, 0, 0, 42) + bytes(12)


def test_natpmp_layouts_match_rfc_6886() -> None:
    assert PmpAddressRequest().encode() == b"\x00\x00"
    request = PmpMapRequest(PmpOpcode.MAP_TCP, 8080, 8080, 3600)
    assert request.encode() == b"\x00\x02\x00\x00\x1f\x90\x1f\x90\x00\x00\x0e\x10"
    assert request.protocol == 6
    assert pcpwire.decode_pmp_request(request.encode()) == request
    address = PmpAddressResponse(PmpResult.SUCCESS, 9, EXTERNAL)
    assert address.encode() == b"\x00\x80\x00\x00\x00\x00\x00\x09" + EXTERNAL.packed
    mapped = PmpMapResponse(PmpOpcode.MAP_UDP, PmpResult.SUCCESS, 9, 53, 20053, 7200)
    assert mapped.encode() == struct.pack("!BBHIHHI", 0, 129, 0, 9, 53, 20053, 7200)
    assert PmpErrorResponse(0, PmpResult.UNSUPPORTED_VERSION, 5).encode() == \
        b"\x00\x80\x00\x01\x00\x00\x00\x05"
    for response in (address, mapped):
        assert pcpwire.decode_pmp_response(response.encode()) == response


def test_natpmp_unsupported_opcode_returns_the_request_with_result_5() -> None:
    request = b"\x00\x07\x00\x00\xaa\xbb\xcc\xdd"
    assert pcpwire.pmp_unsupported_opcode(request, 3) == b"\x00\x87\x00\x05\xaa\xbb\xcc\xdd"
    short = pcpwire.pmp_unsupported_opcode(b"\x00\x07", 3)
    assert short == b"\x00\x87\x00\x05\x00\x00\x00\x03"


# --- server-side decisions the codec encodes ---------------------------------------------------
def test_header_checks_follow_section_8_2_order() -> None:
    def reason(data: bytes) -> tuple[str, Result | None]:
        with pytest.raises(PcpWireError) as info:
            pcpwire.decode_pcp_request(data)
        return info.value.reason, info.value.result

    valid = PcpRequest(Opcode.ANNOUNCE, 0, CLIENT).encode()
    assert reason(b"\x02") == ("short", None)
    assert reason(b"\x02\x81" + valid[2:]) == ("response", None)
    assert reason(b"\x03" + valid[1:]) == ("version", Result.UNSUPP_VERSION)
    assert reason(b"\x00\x00") == ("version", Result.UNSUPP_VERSION)
    assert reason(valid[:20]) == ("short", None)
    assert reason(valid + b"\x00") == ("length", Result.MALFORMED_REQUEST)
    assert reason(valid + bytes(1100)) == ("length", Result.MALFORMED_REQUEST)
    assert reason(b"\x02\x05" + valid[2:]) == ("opcode", Result.UNSUPP_OPCODE)
    assert reason(b"\x02\x01" + valid[2:]) == ("length", Result.MALFORMED_REQUEST)


@pytest.mark.parametrize("options, reason", [
    (bytes((1, 0, 0, 16)) + bytes(12), "option-length"),              # runs past the end
    (bytes((1, 0, 0, 4)) + bytes(4), "option-length"),                # THIRD_PARTY of 4
    (bytes((2, 0, 0, 0)) * 2, "option-repeated"),
    (bytes((3, 0, 0, 20)) + bytes((0, 90, 0, 0)) + MAPPED + bytes(4), "filter-prefix"),
    (bytes((3, 0, 0, 16)) + bytes(16), "option-length"),             # FILTER of 16
])
def test_malformed_options_are_malformed_option(options: bytes, reason: str) -> None:
    base = PcpRequest(Opcode.MAP, 60, CLIENT, MapData(NONCE, 6, 1, 0, V4(0))).encode()
    data = base + options
    data += bytes(-len(data) % 4)
    with pytest.raises(PcpWireError) as info:
        pcpwire.decode_pcp_request(data)
    assert info.value.result is Result.MALFORMED_OPTION
    assert info.value.reason == reason


def test_stray_bytes_after_the_options_are_malformed_option() -> None:
    with pytest.raises(PcpWireError) as info:
        pcpwire.decode_options(bytes((0x81, 0, 0, 0)) + bytes(2))
    assert (info.value.reason, info.value.result) == ("option-header", Result.MALFORMED_OPTION)


def test_error_response_copies_the_request() -> None:
    request = PcpRequest(Opcode.MAP, 60, CLIENT, MapData(NONCE, 6, 80, 81, EXTERNAL),
                         (PreferFailure(),)).encode()
    parsed = pcpwire.pcp_error(request, Result.CANNOT_PROVIDE_EXTERNAL, 30, 5, parsed=True)
    assert len(parsed) == len(request)
    assert parsed[:12] == struct.pack("!BBBBII", 2, 0x81, 0, 11, 30, 5)
    assert parsed[12:24] == bytes(12)
    assert parsed[24:] == request[24:]
    unparsed = pcpwire.pcp_error(request, Result.MALFORMED_REQUEST, 1800, 5, parsed=False)
    assert unparsed[12:24] == request[12:24]  # the client address's last 96 bits
    long = pcpwire.pcp_error(request + bytes(2000), Result.MALFORMED_REQUEST, 1, 1,
                             parsed=False)
    assert len(long) == 1100
    tiny = pcpwire.pcp_error(b"\x00\x01\x02", Result.UNSUPP_VERSION, 1800, 1, parsed=False)
    assert len(tiny) == 24 and tiny[:4] == bytes((2, 0x81, 0, 1))
    with pytest.raises(ValueError):
        pcpwire.pcp_error(request, Result.SUCCESS, 0, 0, parsed=True)


def test_natpmp_request_checks() -> None:
    def result(data: bytes) -> PmpResult | None:
        with pytest.raises(NatPmpWireError) as info:
            pcpwire.decode_pmp_request(data)
        return info.value.result

    assert result(b"\x00") is None
    assert result(b"\x02\x00") is PmpResult.UNSUPPORTED_VERSION
    assert result(b"\x00\x80") is None                     # a response: ignored
    assert result(b"\x00\x00\x00") is None                 # wrong length
    assert result(b"\x00\x03" + bytes(10)) is PmpResult.UNSUPPORTED_OPCODE
    assert result(b"\x00\x01" + bytes(9)) is None


def test_encoders_refuse_invalid_fields() -> None:
    with pytest.raises(ValueError):
        MapData(b"short", 6, 1, 1, EXTERNAL)
    with pytest.raises(ValueError):
        MapData(NONCE, 6, 70000, 1, EXTERNAL)
    with pytest.raises(ValueError):
        PcpRequest(Opcode.MAP, 1, CLIENT, None)
    with pytest.raises(ValueError):
        PcpRequest(Opcode.MAP, 1, CLIENT, MapData(NONCE, 6, 1, 1, EXTERNAL),
                   tuple(PreferFailure() for _ in range(300))).encode()
    with pytest.raises(ValueError):
        PmpMapRequest(PmpOpcode.PUBLIC_ADDRESS, 1, 1, 1)
    with pytest.raises(ValueError):
        UnknownOption(1, b"")


# --- round trips and fuzzing ---------------------------------------------------------------------
addresses = st.one_of(st.builds(V4, st.integers(0, 2**32 - 1)),
                      st.builds(V6, st.integers(0, 2**128 - 1)).filter(
                          lambda a: a.ipv4_mapped is None))
ports = st.integers(0, 0xFFFF)
nonces = st.binary(min_size=12, max_size=12)
map_data = st.builds(MapData, nonces, st.integers(0, 255), ports, ports, addresses)
peer_data = st.builds(PeerData, nonces, st.integers(0, 255), ports, ports, addresses, ports,
                      addresses)


@st.composite
def filters(draw: st.DrawFn) -> Filter:
    address = draw(addresses)
    if isinstance(address, V4):
        prefix = draw(st.one_of(st.just(0), st.integers(96, 128)))
    else:
        prefix = draw(st.integers(0, 128))
    return Filter(prefix, draw(ports), address)


options = st.lists(st.one_of(
    st.builds(ThirdParty, addresses), st.just(PreferFailure()), filters(),
    st.builds(UnknownOption, st.integers(4, 255), st.binary(max_size=24))), max_size=5).map(
    lambda items: tuple(_once(items)))


def _once(items: list[pcpwire.Option]) -> list[pcpwire.Option]:
    """THIRD_PARTY and PREFER_FAILURE at most once, as the decoder demands."""
    seen: set[type] = set()
    out = []
    for item in items:
        if isinstance(item, ThirdParty | PreferFailure):
            if type(item) in seen:
                continue
            seen.add(type(item))
        out.append(item)
    return out


@st.composite
def requests(draw: st.DrawFn) -> PcpRequest:
    opcode = draw(st.sampled_from(list(Opcode)))
    data = {Opcode.ANNOUNCE: st.none(), Opcode.MAP: map_data, Opcode.PEER: peer_data}[opcode]
    return PcpRequest(opcode, draw(st.integers(0, 2**32 - 1)), draw(addresses), draw(data),
                      draw(options))


@st.composite
def responses(draw: st.DrawFn) -> PcpResponse:
    opcode = draw(st.sampled_from(list(Opcode)))
    data = {Opcode.ANNOUNCE: st.none(), Opcode.MAP: map_data, Opcode.PEER: peer_data}[opcode]
    return PcpResponse(opcode, draw(st.sampled_from(list(Result))),
                       draw(st.integers(0, 2**32 - 1)), draw(st.integers(0, 2**32 - 1)),
                       draw(data), draw(options), reserved=draw(st.binary(min_size=12,
                                                                          max_size=12)))


@given(requests())
def test_pcp_requests_round_trip(request: PcpRequest) -> None:
    assert pcpwire.decode_pcp_request(request.encode()) == request


@given(responses())
def test_pcp_responses_round_trip(response: PcpResponse) -> None:
    assert pcpwire.decode_pcp_response(response.encode()) == response


pmp_requests = st.one_of(
    st.just(PmpAddressRequest()),
    st.builds(PmpMapRequest, st.sampled_from([PmpOpcode.MAP_UDP, PmpOpcode.MAP_TCP]), ports,
              ports, st.integers(0, 2**32 - 1)))
pmp_responses = st.one_of(
    st.builds(PmpAddressResponse, st.sampled_from(list(PmpResult)),
              st.integers(0, 2**32 - 1), st.builds(V4, st.integers(0, 2**32 - 1))),
    st.builds(PmpMapResponse, st.sampled_from([PmpOpcode.MAP_UDP, PmpOpcode.MAP_TCP]),
              st.sampled_from(list(PmpResult)), st.integers(0, 2**32 - 1), ports, ports,
              st.integers(0, 2**32 - 1)),
    st.builds(PmpErrorResponse, st.integers(0, 127), st.sampled_from(list(PmpResult)),
              st.integers(0, 2**32 - 1)))


@given(pmp_requests)
def test_natpmp_requests_round_trip(request: pcpwire.PmpRequest) -> None:
    assert pcpwire.decode_pmp_request(request.encode()) == request


@given(pmp_responses)
def test_natpmp_responses_round_trip(response: pcpwire.PmpResponse) -> None:
    assert pcpwire.decode_pmp_response(response.encode()) == response


def _decoders(data: bytes) -> None:
    for decode, error in ((pcpwire.decode_pcp_request, PcpWireError),
                          (pcpwire.decode_pcp_header, PcpWireError),
                          (pcpwire.decode_pcp_response, PcpWireError),
                          (pcpwire.decode_pmp_request, NatPmpWireError),
                          (pcpwire.decode_pmp_response, NatPmpWireError)):
        try:
            decode(data)
        except error:
            pass


@settings(max_examples=500)
@given(st.binary(max_size=1200))
def test_any_bytes_give_a_message_or_one_typed_error(data: bytes) -> None:
    _decoders(data)


@settings(max_examples=300)
@given(requests(), st.data())
def test_damaged_requests_give_a_message_or_one_typed_error(request: PcpRequest,
                                                             data: st.DataObject) -> None:
    encoded = bytearray(request.encode())
    cut = data.draw(st.integers(0, len(encoded)))
    flips = data.draw(st.lists(st.tuples(st.integers(0, len(encoded) - 1),
                                         st.integers(0, 255)), max_size=4))
    for where, value in flips:
        encoded[where] = value
    _decoders(bytes(encoded[:cut]))
    _decoders(bytes(encoded))
    _decoders(bytes(encoded) + data.draw(st.binary(max_size=40)))
