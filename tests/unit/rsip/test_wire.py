"""The RSIP codec: every message type against bytes built by hand from RFC 3103 sections 8-9
and RFC 3104 section 6.2 (the exchanges of RFC 3103 Appendix C, with documentation
addresses), the ambiguities decided in the module docstring, each grammar violation answered
with its error code, TCP framing at any split, and hypothesis: generated messages round-trip,
random and mutated bytes only ever raise RsipWireError."""

from __future__ import annotations

import ipaddress
import itertools
import struct
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from ipshift.packet.errors import PacketError
from ipshift.rsip import wire
from ipshift.rsip.wire import (
    Address,
    AddressType,
    BindId,
    ClientId,
    Error,
    ErrorCode,
    FlowPolicy,
    FlowPolicyKind,
    Indicator,
    LeaseTime,
    Message,
    MessageCounter,
    MessageType,
    Method,
    Param,
    Ports,
    QueryAnswer,
    QueryIndicator,
    QueryTuple,
    RsipMethod,
    RsipWireError,
    Spi,
    StreamReader,
    Tunnel,
    TunnelType,
    VendorSpecific,
)

V4 = ipaddress.IPv4Address
V6 = ipaddress.IPv6Address
PUBLIC = V4("203.0.113.156")
OTHER_PUBLIC = V4("203.0.113.17")
REMOTE = V4("198.51.100.6")
GATEWAY = V4("192.0.2.1")


# --- bytes by hand -------------------------------------------------------------------------------
def u8(value: int) -> bytes:
    return struct.pack("!B", value)


def u16(value: int) -> bytes:
    return struct.pack("!H", value)


def u32(value: int) -> bytes:
    return struct.pack("!I", value)


def tlv(kind: int, value: bytes) -> bytes:
    """A parameter (section 8): type, 2-byte length of the value only, value."""
    return u8(kind) + u16(len(value)) + value


def frame(kind: int, *params: bytes, version: int = 1) -> bytes:
    """A message (section 9): version, type, overall length including the header."""
    body = b"".join(params)
    return u8(version) + u8(kind) + u16(4 + len(body)) + body


def client(value: int) -> bytes:
    return tlv(4, u32(value))


def bind(value: int) -> bytes:
    return tlv(5, u32(value))


def lease(seconds: int) -> bytes:
    return tlv(3, u32(seconds))


def counter(value: int) -> bytes:
    return tlv(11, u32(value))


def ipv4(address: V4, kind: int = 1) -> bytes:
    return tlv(1, u8(kind) + address.packed)


DONT_CARE = tlv(1, b"\x01")           # addrtype IPv4, no address
ANY_PORT = tlv(2, b"\x01")            # number 1, no port field
NOT_NEEDED = tlv(2, b"")              # RFC 3104 "don't need"
IP_IP = tlv(6, b"\x01")


CASES: list[tuple[str, Message, bytes]] = [
    ("ERROR_RESPONSE (16.3)",
     wire.error_response(ErrorCode.REMOTE_ADDR_UNALLOWED, client_id=3),
     frame(1, tlv(8, u16(314)), client(3))),
    ("REGISTER_REQUEST, bare (TCP)", wire.register_request(), b"\x01\x02\x00\x04"),
    ("REGISTER_REQUEST over UDP", wire.register_request(counter=1), frame(2, counter(1))),
    ("REGISTER_RESPONSE (16.2)",
     wire.register_response(5, 600, FlowPolicyKind.MICRO, FlowPolicyKind.MICRO,
                            methods=(RsipMethod.RSAP_IP, RsipMethod.RSA_IP),
                            tunnels=(TunnelType.IP_IP, TunnelType.GRE)),
     frame(3, client(5), lease(600), tlv(9, b"\x02\x02"), tlv(7, b"\x02"), tlv(7, b"\x01"),
           IP_IP, tlv(6, b"\x02"))),
    ("DE-REGISTER_REQUEST", wire.deregister_request(5), frame(4, client(5))),
    ("DE-REGISTER_RESPONSE, asynchronous", wire.deregister_response(5, counter=0),
     frame(5, client(5), counter(0))),
    ("ASSIGN_REQUEST_RSA-IP (16.3)",
     wire.assign_request_rsa_ip(3, Address.dont_care(), Address.fqdn("www.example.com"),
                                Ports.any(1), lease=3600, tunnel=TunnelType.IP_IP),
     frame(6, client(3), DONT_CARE, tlv(1, b"\x04www.example.com"), ANY_PORT, lease(3600),
           IP_IP)),
    ("ASSIGN_RESPONSE_RSA-IP (16.3)",
     wire.assign_response_rsa_ip(3, 1, Address.ipv4(OTHER_PUBLIC),
                                 Address.fqdn("www.example.com"), Ports.any(1), 3600,
                                 TunnelType.IP_IP),
     frame(7, client(3), bind(1), ipv4(OTHER_PUBLIC), tlv(1, b"\x04www.example.com"),
           ANY_PORT, lease(3600), IP_IP)),
    ("ASSIGN_REQUEST_RSAP-IP (16.1)",
     wire.assign_request_rsap_ip(1, Address.dont_care(), Ports.any(4), Address.dont_care(),
                                 Ports.any(1), lease=3600),
     frame(8, client(1), DONT_CARE, tlv(2, b"\x04"), DONT_CARE, ANY_PORT, lease(3600))),
    ("ASSIGN_RESPONSE_RSAP-IP (16.1), block 4-1234",
     wire.assign_response_rsap_ip(1, 1, Address.ipv4(PUBLIC), Ports.block(1234, 4),
                                  Address.dont_care(), Ports.any(1), 1800, TunnelType.IP_IP),
     frame(9, client(1), bind(1), ipv4(PUBLIC), tlv(2, b"\x04" + u16(1234)), DONT_CARE,
           ANY_PORT, lease(1800), IP_IP)),
    ("EXTEND_REQUEST (16.1)", wire.extend_request(1, 2, lease=1800),
     frame(10, client(1), bind(2), lease(1800))),
    ("EXTEND_RESPONSE (16.1)", wire.extend_response(1, 2, 1800),
     frame(11, client(1), bind(2), lease(1800))),
    ("FREE_REQUEST (16.1)", wire.free_request(1, 1), frame(12, client(1), bind(1))),
    ("FREE_RESPONSE (16.1)", wire.free_response(1, 1), frame(13, client(1), bind(1))),
    ("QUERY_REQUEST (16.1), a network tuple",
     wire.query_request(1, [QueryTuple.network(QueryIndicator.NETWORK,
                                               ipaddress.IPv4Network("198.51.100.0/24"))]),
     frame(14, client(1), tlv(10, u16(2)), ipv4(V4("198.51.100.0")),
           ipv4(V4("255.255.255.0"), kind=2))),
    ("QUERY_RESPONSE, local network and remote address",
     wire.query_response(1, [QueryTuple.network(QueryAnswer.LOCAL_NETWORK,
                                                ipaddress.IPv4Network("192.0.2.0/24")),
                             QueryTuple.address(QueryAnswer.REMOTE_ADDRESS, REMOTE)],
                         counter=9),
     frame(15, client(1), counter(9), tlv(10, u16(2)), ipv4(V4("192.0.2.0")),
           ipv4(V4("255.255.255.0"), kind=2), tlv(10, u16(3)), ipv4(REMOTE))),
    ("LISTEN_REQUEST (16.2)",
     wire.listen_request(5, Address.ipv4(PUBLIC), Ports.single(2050), Address.ipv4(REMOTE),
                         Ports.single(20), tunnels=(TunnelType.IP_IP, TunnelType.GRE)),
     frame(16, client(5), ipv4(PUBLIC), tlv(2, b"\x01" + u16(2050)), ipv4(REMOTE),
           tlv(2, b"\x01" + u16(20)), IP_IP, tlv(6, b"\x02"))),
    ("LISTEN_RESPONSE (16.2), tunnel type before lease time",
     wire.listen_response(5, 2, Address.ipv4(PUBLIC), Ports.single(2050), Address.ipv4(REMOTE),
                          Ports.single(20), TunnelType.IP_IP, 600),
     frame(17, client(5), bind(2), ipv4(PUBLIC), tlv(2, b"\x01" + u16(2050)), ipv4(REMOTE),
           tlv(2, b"\x01" + u16(20)), IP_IP, lease(600))),
    ("ASSIGN_REQUEST_RSIPSEC, ports not needed, any SPI",
     wire.assign_request_rsipsec(1, Address.dont_care(), Ports.not_needed(),
                                 Address.ipv4(REMOTE), Ports.not_needed(), Spi.any(1),
                                 counter=4),
     frame(22, client(1), DONT_CARE, NOT_NEEDED, ipv4(REMOTE), NOT_NEEDED, tlv(22, u16(1)),
           counter(4))),
    ("ASSIGN_RESPONSE_RSIPSEC, one SPI, tunnel endpoint",
     wire.assign_response_rsipsec(1, 3, Address.ipv4(PUBLIC), Ports.not_needed(),
                                  Address.ipv4(REMOTE), Ports.not_needed(), Spi.single(0x1000),
                                  600, TunnelType.IP_IP, endpoint=Address.ipv4(GATEWAY),
                                  counter=4),
     frame(23, client(1), bind(3), ipv4(PUBLIC), NOT_NEEDED, ipv4(REMOTE), NOT_NEEDED,
           tlv(22, u16(1) + u32(0x1000)), lease(600), IP_IP, ipv4(GATEWAY), counter(4))),
]


@pytest.mark.parametrize(("name", "message", "data"), CASES, ids=[c[0] for c in CASES])
def test_each_message_type_against_bytes_built_by_hand(name: str, message: Message,
                                                        data: bytes) -> None:
    assert wire.encode(message) == data
    assert wire.decode(data) == message
    assert wire.message_length(data[:4]) == len(data)


def test_every_message_type_is_covered() -> None:
    assert {m.type for _, m, _ in CASES} == set(MessageType)


def test_every_parameter_kind_round_trips() -> None:
    params: list[Param] = [
        Address.ipv6("2001:db8::1"), Address.netmask("255.255.0.0"), Address.fqdn("a.example"),
        Ports.listed([80, 443, 8080]), Spi.block(0x100, 16), Spi.listed([7, 9]),
        Error(ErrorCode.IPSEC_SPI_INUSE), Indicator(0x1234), Method(RsipMethod.RSIPSEC),
        VendorSpecific(9, 2, b"opaque"), wire.udp_tunnel_param(4556),
    ]
    for param in params:
        data = wire.encode(Message(MessageType.REGISTER_REQUEST, (param,)), check=False)
        decoded = wire._decode_params(data)
        assert decoded == (param,)
    assert wire.encode(Message(MessageType.REGISTER_REQUEST, (Address.ipv6("2001:db8::1"),)),
                       check=False)[4:] == tlv(1, b"\x03" + V6("2001:db8::1").packed)
    assert wire.encode(Message(MessageType.REGISTER_REQUEST, (Ports.listed([80, 443]),)),
                       check=False)[4:] == tlv(2, b"\x02" + u16(80) + u16(443))
    assert wire.encode(Message(MessageType.REGISTER_REQUEST, (Spi.block(0x100, 16),)),
                       check=False)[4:] == tlv(22, u16(16) + u32(0x100))
    assert wire.encode(Message(MessageType.REGISTER_REQUEST, (VendorSpecific(9, 2, b"x"),)),
                       check=False)[4:] == tlv(12, u16(9) + u16(2) + b"x")


def test_known_numbers_read_back_as_enum_members_and_unknown_ones_are_kept() -> None:
    message = wire.decode(frame(1, tlv(8, u16(999)), client(1)))
    assert message.require(Error).code == 999
    message = wire.decode(frame(1, tlv(8, u16(402))))
    assert message.require(Error).code is ErrorCode.IPSEC_SPI_UNAVAILABLE
    tunnels = wire.decode(frame(3, client(1), lease(5), tlv(9, b"\x01\x03"), tlv(6, b"\x09"),
                                IP_IP)).all(Tunnel)
    assert [t.kind for t in tunnels] == [9, TunnelType.IP_IP]
    assert tunnels[1].kind is TunnelType.IP_IP


# --- the decided ambiguities ---------------------------------------------------------------------
@pytest.mark.parametrize("value", [b"\x00", b"\x01", b"\x02", b"\x03", b"\x04",
                                   b"\x01\0\0\0\0", b"\x03" + bytes(16)],
                         ids=["type0", "ipv4", "netmask", "ipv6", "fqdn", "ipv4-zeros",
                              "ipv6-zeros"])
def test_dont_care_addresses_are_read_in_every_form(value: bytes) -> None:
    (address,) = wire._decode_params(frame(2, tlv(1, value)))
    assert address == Address.dont_care() and address.is_dont_care


def test_dont_care_address_is_written_with_length_1_and_a_zero_netmask_stays_one() -> None:
    data = wire.encode(Message(MessageType.REGISTER_REQUEST, (Address.dont_care(),)),
                       check=False)
    assert data[4:] == tlv(1, b"\x01")
    (mask,) = wire._decode_params(frame(2, ipv4(V4(0), kind=2)))
    assert mask == Address.netmask("0.0.0.0") and not mask.is_dont_care
    assert Address.ipv4("0.0.0.0").is_dont_care and Address.ipv6("::").is_dont_care


def test_dont_care_ports_forms() -> None:
    read = [wire._decode_params(frame(2, tlv(2, value)))[0] for value in
            (b"\x04", b"\x00", b"\x04" + u16(0), b"\x02" + u16(0) + u16(0), b"")]
    assert read == [Ports.any(4), Ports.any(1), Ports.any(4), Ports.any(2),
                    Ports.not_needed()]
    assert all(p.is_dont_care for p in read[:4]) and read[4].is_not_needed
    with pytest.raises(RsipWireError) as caught:
        Ports.any(4).expand()
    assert caught.value.error is ErrorCode.BAD_PARAM


def test_a_block_n_p_is_p_to_p_plus_n_minus_1() -> None:
    block = Ports.block(1234, 4)
    assert block.expand() == (1234, 1235, 1236, 1237)
    assert (block.first, block.last) == (1234, 1237)
    assert Ports.single(80).expand() == (80,) and Ports.single(80).last == 80
    assert Ports.listed([5, 6, 7]).last == 7
    assert Ports.block(65532, 4).last == 65535
    with pytest.raises(RsipWireError):
        Ports.block(65533, 4)
    with pytest.raises(RsipWireError):
        _ = Ports.listed([80, 443]).first  # not one contiguous block
    assert Spi.block(0xFFFFFFFE, 2).expand() == (0xFFFFFFFE, 0xFFFFFFFF)
    assert Spi.listed([3, 1]).expand() == (3, 1)


def test_indicator_is_written_with_2_bytes_and_read_with_1_or_2() -> None:
    data = frame(14, client(1), tlv(10, b"\x01"), ipv4(REMOTE))
    message = wire.decode(data)
    assert message.all(Indicator) == (Indicator(1),)
    assert wire.encode(message) == frame(14, client(1), tlv(10, u16(1)), ipv4(REMOTE))
    assert wire.query_tuples(message) == (QueryTuple(1, (Address.ipv4(REMOTE),)),)


def test_rsipsec_method_and_error_numbers_of_rfc_3104() -> None:
    assert RsipMethod.RSIPSEC == 3
    assert [ErrorCode.IPSEC_UNALLOWED, ErrorCode.IPSEC_SPI_UNAVAILABLE,
            ErrorCode.IPSEC_SPI_INUSE] == [401, 402, 403]
    assert MessageType.ASSIGN_REQUEST_RSIPSEC == 22 and wire.ParamType.SPI == 22


# --- ipshift's vendor-specific parameter ---------------------------------------------------------
def test_udp_tunnel_parameter_layout_and_lookup() -> None:
    param = wire.udp_tunnel_param(4556)
    assert param == VendorSpecific(32473, 1, u16(4556))
    message = wire.register_request(counter=1, extra=[param])
    assert wire.encode(message) == frame(2, counter(1), tlv(12, u16(32473) + u16(1) + u16(4556)))
    assert wire.udp_tunnel_port(wire.decode(wire.encode(message))) == 4556
    assert wire.udp_tunnel_port(wire.register_request()) is None


@pytest.mark.parametrize("value", [b"", b"\x11", b"\x00\x00", b"\x11\xcc\x00"])
def test_a_malformed_udp_tunnel_parameter_is_bad_param(value: bytes) -> None:
    data = frame(2, counter(7), tlv(12, u16(32473) + u16(1) + value))
    with pytest.raises(RsipWireError) as caught:
        wire.decode(data)
    assert caught.value.error is ErrorCode.BAD_PARAM and caught.value.counter == 7
    for port in (0, 65536, -1):
        with pytest.raises(RsipWireError):
            wire.udp_tunnel_param(port)


def test_vendor_parameters_of_other_vendors_are_kept_anywhere() -> None:
    other = VendorSpecific(4242, 7, b"\xff" * 3)
    data = frame(13, tlv(12, u16(4242) + u16(7) + b"\xff" * 3), client(1), bind(2),
                 tlv(12, u16(32473) + u16(99) + b"future"))
    message = wire.decode(data)
    assert message.all(VendorSpecific) == (other, VendorSpecific(32473, 99, b"future"))
    assert (message.client_id, message.bind_id) == (1, 2)
    assert wire.encode(message) == data
    assert wire.udp_tunnel_port(message) is None


# --- malformed input: which error, and what is still read ----------------------------------------
MALFORMED: list[tuple[str, bytes, ErrorCode, int | None, int | None, int | None]] = [
    # (what, data, error, message_type, counter, client_id)
    ("empty", b"", ErrorCode.BAD_MESSAGE, None, None, None),
    ("one byte", b"\x01", ErrorCode.BAD_MESSAGE, None, None, None),
    ("three bytes", b"\x01\x02\x00", ErrorCode.BAD_MESSAGE, 2, None, None),
    ("version 2", frame(8, counter(5), client(3), version=2),
     ErrorCode.UNSUPPORTED_RSIP_VERSION, 8, 5, 3),
    ("version 0", b"\x00\x02\x00\x04", ErrorCode.UNSUPPORTED_RSIP_VERSION, 2, None, None),
    ("type 0", frame(0, counter(5)), ErrorCode.ILLEGAL_MESSAGE, 0, 5, None),
    ("type 18", frame(18, client(4), counter(5)), ErrorCode.ILLEGAL_MESSAGE, 18, 5, 4),
    ("type 255", frame(255), ErrorCode.ILLEGAL_MESSAGE, 255, None, None),
    ("overall length 3", b"\x01\x02\x00\x03", ErrorCode.BAD_MESSAGE, 2, None, None),
    ("overall length beyond the datagram", b"\x01\x02\x00\x0c" + counter(1),
     ErrorCode.BAD_MESSAGE, 2, 1, None),
    ("trailing bytes", frame(2, counter(1)) + b"\x00", ErrorCode.BAD_MESSAGE, 2, 1, None),
    ("parameter header cut short", frame(4, client(1), b"\x0b\x00"),
     ErrorCode.BAD_MESSAGE, 4, None, 1),
    ("parameter overruns the message", frame(4, counter(6), client(1), b"\x04\x00\x09\x00"),
     ErrorCode.BAD_MESSAGE, 4, 6, 1),
    ("unknown parameter type 13", frame(4, counter(6), client(1), tlv(13, b"")),
     ErrorCode.ILLEGAL_PARAM, 4, 6, 1),
    ("unknown parameter type 0", frame(2, tlv(0, b"\x00")), ErrorCode.ILLEGAL_PARAM, 2, None,
     None),
    ("lease time of 3 bytes", frame(10, client(1), bind(2), tlv(3, b"\0\0\1"), counter(8)),
     ErrorCode.BAD_PARAM, 10, 8, 1),
    ("client ID of 5 bytes", frame(4, tlv(4, bytes(5)), counter(8)), ErrorCode.BAD_PARAM,
     4, 8, None),
    ("bind ID of 2 bytes", frame(12, client(1), tlv(5, b"\0\1")), ErrorCode.BAD_PARAM, 12,
     None, 1),
    ("message counter of 8 bytes", frame(2, tlv(11, bytes(8))), ErrorCode.BAD_PARAM, 2, None,
     None),
    ("tunnel type of 2 bytes", frame(6, client(1), tlv(6, b"\1\1")), ErrorCode.BAD_PARAM, 6,
     None, 1),
    ("RSIP method of 0 bytes", frame(3, tlv(7, b"")), ErrorCode.BAD_PARAM, 3, None, None),
    ("error of 1 byte", frame(1, tlv(8, b"\1")), ErrorCode.BAD_PARAM, 1, None, None),
    ("flow policy of 3 bytes", frame(3, tlv(9, b"\1\1\1")), ErrorCode.BAD_PARAM, 3, None,
     None),
    ("flow policy local 3", frame(3, client(2), lease(9), tlv(9, b"\3\3")),
     ErrorCode.BAD_PARAM, 3, None, 2),
    ("flow policy remote 0", frame(3, tlv(9, b"\1\0")), ErrorCode.BAD_PARAM, 3, None, None),
    ("indicator of 3 bytes", frame(14, client(1), tlv(10, b"\0\0\1")), ErrorCode.BAD_PARAM,
     14, None, 1),
    ("vendor parameter of 3 bytes", frame(2, tlv(12, b"\0\1\0")), ErrorCode.BAD_PARAM, 2, None,
     None),
    ("address without its type byte", frame(6, client(1), tlv(1, b"")), ErrorCode.BAD_PARAM,
     6, None, 1),
    ("address type 5", frame(6, client(1), tlv(1, b"\x05\1\2\3\4")), ErrorCode.BAD_PARAM, 6,
     None, 1),
    ("reserved address type with an address", frame(6, tlv(1, b"\x00\1\2\3\4")),
     ErrorCode.BAD_PARAM, 6, None, None),
    ("IPv4 address of 3 bytes", frame(6, tlv(1, b"\x01\1\2\3")), ErrorCode.BAD_PARAM, 6, None,
     None),
    ("IPv4 netmask of 16 bytes", frame(6, tlv(1, b"\x02" + bytes(16))), ErrorCode.BAD_PARAM,
     6, None, None),
    ("IPv6 address of 4 bytes", frame(6, tlv(1, b"\x03\1\2\3\4")), ErrorCode.BAD_PARAM, 6,
     None, None),
    ("FQDN not ASCII", frame(6, tlv(1, b"\x04caf\xc3\xa9")), ErrorCode.BAD_PARAM, 6, None,
     None),
    ("port field of 1 byte", frame(8, tlv(2, b"\x01\x50")), ErrorCode.BAD_PARAM, 8, None,
     None),
    ("2 port fields for a number of 3", frame(8, tlv(2, b"\x03" + u16(1) + u16(2))),
     ErrorCode.BAD_PARAM, 8, None, None),
    ("port fields with a number of 0", frame(8, tlv(2, b"\x00" + u16(80))),
     ErrorCode.BAD_PARAM, 8, None, None),
    ("a block running past 65535", frame(8, tlv(2, b"\x04" + u16(65533))),
     ErrorCode.BAD_PARAM, 8, None, None),
    ("SPI of 1 byte", frame(22, tlv(22, b"\x01")), ErrorCode.BAD_PARAM, 22, None, None),
    ("SPI number 0", frame(22, tlv(22, u16(0))), ErrorCode.BAD_PARAM, 22, None, None),
    ("SPI field of 3 bytes", frame(22, tlv(22, u16(1) + b"\1\2\3")), ErrorCode.BAD_PARAM, 22,
     None, None),
    ("2 SPI fields for a number of 3", frame(22, tlv(22, u16(3) + u32(1) + u32(2))),
     ErrorCode.BAD_PARAM, 22, None, None),
]


@pytest.mark.parametrize(("what", "data", "error", "message_type", "counter_value",
                          "client_id"), MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_input_raises_one_typed_error_with_what_can_be_read(
        what: str, data: bytes, error: ErrorCode, message_type: int | None,
        counter_value: int | None, client_id: int | None) -> None:
    with pytest.raises(RsipWireError) as caught:
        wire.decode(data)
    exc = caught.value
    assert isinstance(exc, PacketError) and isinstance(exc, ValueError)
    assert exc.error is error, str(exc)
    assert (exc.message_type, exc.counter, exc.client_id) == (message_type, counter_value,
                                                              client_id)
    assert exc.reason == error.name.lower().replace("_", "-")
    assert "\n" not in str(exc)
    answer = wire.error_response(exc.error, client_id=exc.client_id, counter=exc.counter)
    assert wire.decode(wire.encode(answer)) == answer  # the gateway can always answer


# --- the grammar of section 9 --------------------------------------------------------------------
RSAP = (client(1), DONT_CARE, tlv(2, b"\x04"), DONT_CARE, ANY_PORT)

GRAMMAR: list[tuple[str, bytes, ErrorCode]] = [
    ("ERROR_RESPONSE without its error", frame(1, client(1)), ErrorCode.MISSING_PARAM),
    ("REGISTER_RESPONSE without a flow policy", frame(3, client(1), lease(60)),
     ErrorCode.MISSING_PARAM),
    ("DE-REGISTER_REQUEST without a client ID", frame(4, counter(1)), ErrorCode.MISSING_PARAM),
    ("ASSIGN_REQUEST_RSAP-IP with one address", frame(8, client(1), DONT_CARE, ANY_PORT,
                                                      ANY_PORT), ErrorCode.MISSING_PARAM),
    ("EXTEND_REQUEST without a bind ID", frame(10, client(1), lease(5)),
     ErrorCode.MISSING_PARAM),
    ("ASSIGN_REQUEST_RSIPSEC without an SPI", frame(22, *RSAP), ErrorCode.MISSING_PARAM),
    ("ASSIGN_RESPONSE_RSAP-IP without a tunnel type",
     frame(9, client(1), bind(1), ipv4(PUBLIC), ANY_PORT, DONT_CARE, ANY_PORT, lease(5)),
     ErrorCode.MISSING_PARAM),
    ("two client IDs", frame(4, client(1), client(2)), ErrorCode.DUPLICATE_PARAM),
    ("two message counters", frame(2, counter(1), counter(2)), ErrorCode.DUPLICATE_PARAM),
    ("two lease times in a request", frame(8, *RSAP, lease(1), lease(2)),
     ErrorCode.DUPLICATE_PARAM),
    ("two tunnel types in an assign request", frame(8, *RSAP, IP_IP, IP_IP),
     ErrorCode.DUPLICATE_PARAM),
    ("three addresses in an assign request", frame(8, *RSAP, DONT_CARE),
     ErrorCode.DUPLICATE_PARAM),
    ("two tunnel endpoints", frame(7, client(1), bind(1), ipv4(PUBLIC), DONT_CARE, ANY_PORT,
                                   lease(5), IP_IP, ipv4(GATEWAY), ipv4(GATEWAY)),
     ErrorCode.DUPLICATE_PARAM),
    ("a lease time in REGISTER_REQUEST", frame(2, lease(5)), ErrorCode.EXTRA_PARAM),
    ("a bind ID in DE-REGISTER_REQUEST", frame(4, client(1), bind(1)), ErrorCode.EXTRA_PARAM),
    ("an SPI in ASSIGN_REQUEST_RSAP-IP", frame(8, *RSAP, tlv(22, u16(1))),
     ErrorCode.EXTRA_PARAM),
    ("ports in EXTEND_REQUEST", frame(10, client(1), bind(1), ANY_PORT),
     ErrorCode.EXTRA_PARAM),
    ("a method in a request", frame(8, *RSAP, tlv(7, b"\x01")), ErrorCode.EXTRA_PARAM),
    ("required parameters out of order", frame(12, bind(1), client(1)),
     ErrorCode.BAD_MESSAGE),
    ("ports before the local address", frame(8, client(1), tlv(2, b"\x04"), DONT_CARE,
                                             DONT_CARE, ANY_PORT), ErrorCode.BAD_MESSAGE),
    ("REGISTER_RESPONSE lease after flow policy",
     frame(3, client(1), tlv(9, b"\1\3"), lease(5)), ErrorCode.BAD_MESSAGE),
    ("ports not needed outside RSIPSEC", frame(8, client(1), DONT_CARE, NOT_NEEDED, DONT_CARE,
                                              ANY_PORT), ErrorCode.BAD_PARAM),
    ("an FQDN as the local address", frame(8, client(1), tlv(1, b"\x04host.example"),
                                          ANY_PORT, DONT_CARE, ANY_PORT), ErrorCode.BAD_PARAM),
    ("a query address without an indicator", frame(14, client(1), ipv4(REMOTE)),
     ErrorCode.EXTRA_PARAM),
    ("a query network tuple without its netmask",
     frame(14, client(1), tlv(10, u16(2)), ipv4(REMOTE)), ErrorCode.MISSING_PARAM),
    ("a query indicator with nothing after it", frame(15, client(1), tlv(10, u16(1))),
     ErrorCode.MISSING_PARAM),
    ("query request indicator 3", frame(14, client(1), tlv(10, u16(3)), ipv4(REMOTE)),
     ErrorCode.BAD_PARAM),
    ("a network tuple whose netmask is an address",
     frame(14, client(1), tlv(10, u16(2)), ipv4(REMOTE), ipv4(REMOTE)), ErrorCode.BAD_PARAM),
    ("a network tuple of an FQDN", frame(15, client(1), tlv(10, u16(4)),
                                         tlv(1, b"\x04net.example"),
                                         ipv4(V4("255.0.0.0"), 2)), ErrorCode.BAD_PARAM),
    ("a lease time in a query", frame(14, client(1), lease(5)), ErrorCode.EXTRA_PARAM),
]


@pytest.mark.parametrize(("what", "data", "error"), GRAMMAR, ids=[g[0] for g in GRAMMAR])
def test_each_grammar_violation_is_answered_with_its_error(what: str, data: bytes,
                                                            error: ErrorCode) -> None:
    with pytest.raises(RsipWireError) as caught:
        wire.decode(data)
    assert caught.value.error is error, str(caught.value)
    assert caught.value.message_type == data[1]
    # the same message built in memory fails validate() and encode() the same way
    message = Message(MessageType(data[1]), wire._decode_params(data))
    for check in (wire.validate, wire.encode):
        with pytest.raises(RsipWireError) as again:
            check(message)
        assert again.value.error is error
    assert wire.encode(message, check=False) == data


def test_optional_parameters_may_sit_anywhere_and_vendor_ones_are_ignored_by_the_grammar() -> None:
    data = frame(9, counter(3), client(1), tlv(12, u16(1) + u16(1)), bind(2), ipv4(PUBLIC),
                 tlv(2, b"\x04" + u16(1234)), DONT_CARE, ANY_PORT, lease(60), IP_IP,
                 ipv4(GATEWAY))
    message = wire.decode(data)
    assert message.counter == 3 and message.all(Address)[2] == Address.ipv4(GATEWAY)
    listen = frame(16, *RSAP, IP_IP, tlv(6, b"\x02"), tlv(6, b"\x03"), lease(9))
    assert len(wire.decode(listen).all(Tunnel)) == 3  # "[Tunnel Type]..."
    register = frame(3, client(1), lease(9), tlv(9, b"\1\3"), *[tlv(7, b"\x02")] * 3)
    assert len(wire.decode(register).all(Method)) == 3


def test_version_is_checked_by_validate() -> None:
    with pytest.raises(RsipWireError) as caught:
        wire.encode(Message(MessageType.REGISTER_REQUEST, (), version=2))
    assert caught.value.error is ErrorCode.UNSUPPORTED_RSIP_VERSION
    assert wire.encode(Message(MessageType.REGISTER_REQUEST, (), version=2),
                       check=False) == b"\x02\x02\x00\x04"


# --- the message API -----------------------------------------------------------------------------
def test_first_all_require_and_the_id_properties() -> None:
    message = wire.decode(CASES[9][2])  # ASSIGN_RESPONSE_RSAP-IP
    assert message.first(ClientId) == ClientId(1) and message.first(Spi) is None
    assert message.all(Address) == (Address.ipv4(PUBLIC), Address.dont_care())
    assert message.require(LeaseTime).seconds == 1800
    assert (message.client_id, message.bind_id, message.counter) == (1, 1, None)
    with pytest.raises(RsipWireError) as caught:
        message.with_counter(12).require(FlowPolicy)
    assert caught.value.error is ErrorCode.MISSING_PARAM
    assert (caught.value.message_type, caught.value.counter, caught.value.client_id) == (9, 12, 1)


def test_with_counter_replaces_in_place_or_appends() -> None:
    message = wire.free_response(1, 2)
    assert message.with_counter(7).params[-1] == MessageCounter(7)
    moved = wire.free_response(1, 2, counter=3, extra=[VendorSpecific(9, 9)]).with_counter(4)
    assert moved.params == (ClientId(1), BindId(2), MessageCounter(4), VendorSpecific(9, 9))


def test_error_response_carries_what_it_is_given_in_rfc_order() -> None:
    answer = wire.error_response(ErrorCode.BAD_BIND_ID, client_id=4, counter=2, bind_id=9)
    assert answer.params == (Error(ErrorCode.BAD_BIND_ID), MessageCounter(2), ClientId(4),
                             BindId(9))
    assert wire.encode(answer) == frame(1, tlv(8, u16(306)), counter(2), client(4), bind(9))


def test_values_are_checked_when_built() -> None:
    for make in (lambda: ClientId(-1), lambda: LeaseTime(1 << 32), lambda: Tunnel(256),
                 lambda: Error(70000), lambda: FlowPolicy(3, 1), lambda: FlowPolicy(1, 0),
                 lambda: Ports(256, ()), lambda: Ports(2, (1, 2, 3)), lambda: Ports(0, (5,)),
                 lambda: Ports.single(70000), lambda: Ports.any(0), lambda: Spi(0, ()),
                 lambda: Spi.single(1 << 32), lambda: Address(AddressType.IPV4, V6("::1")),
                 lambda: Address(AddressType.FQDN, ""), lambda: Address(None, PUBLIC),
                 lambda: Address(7, PUBLIC),  # type: ignore[arg-type]
                 lambda: Address.fqdn("café.example"), lambda: Indicator(1 << 16),
                 lambda: VendorSpecific(1 << 16, 0),
                 lambda: Message(99, ())):  # type: ignore[arg-type]
        with pytest.raises(RsipWireError):
            make()


def test_encode_refuses_what_does_not_fit() -> None:
    huge = VendorSpecific(9, 1, bytes(40000))
    with pytest.raises(RsipWireError) as caught:
        wire.encode(wire.register_request(extra=[huge, huge]))
    assert caught.value.error is ErrorCode.BAD_MESSAGE
    with pytest.raises(RsipWireError):
        wire.encode(Message(MessageType.REGISTER_REQUEST, ("not a parameter",)),  # type: ignore[arg-type]
                    check=False)


def test_address_of() -> None:
    assert Address.of(PUBLIC) == Address(AddressType.IPV4, PUBLIC)
    assert Address.of("2001:db8::5") == Address(AddressType.IPV6, V6("2001:db8::5"))
    assert Address.of("gw.example") == Address(AddressType.FQDN, "gw.example")
    assert Address(1, PUBLIC).kind is AddressType.IPV4  # type: ignore[arg-type]


# --- TCP framing ---------------------------------------------------------------------------------
def test_message_length_reads_the_header() -> None:
    assert wire.message_length(b"\x01\x02\x00\x10") == 16
    for header, error in ((b"\x01\x02\x00", ErrorCode.BAD_MESSAGE),
                          (b"\x02\x02\x00\x10", ErrorCode.UNSUPPORTED_RSIP_VERSION),
                          (b"\x01\x02\x00\x02", ErrorCode.BAD_MESSAGE)):
        with pytest.raises(RsipWireError) as caught:
            wire.message_length(header)
        assert caught.value.error is error


def test_stream_reader_frames_and_keeps_going_after_a_bad_message() -> None:
    reader = StreamReader()
    good = [data for _, _, data in CASES]
    bad = frame(4, counter(5), client(1), tlv(13, b""))
    items = reader.feed(good[0] + bad + good[1][:3])
    assert items[0] == CASES[0][1]
    assert isinstance(items[1], RsipWireError) and items[1].error is ErrorCode.ILLEGAL_PARAM
    assert items[1].counter == 5 and len(items) == 2 and reader.pending == 3
    assert reader.feed(good[1][3:]) == [CASES[1][1]] and reader.pending == 0
    assert not reader.broken


@pytest.mark.parametrize(("header", "error"), [
    (b"\x01\x02\x00\x03", ErrorCode.BAD_MESSAGE),
    (b"\x02\x02\x00\x04", ErrorCode.UNSUPPORTED_RSIP_VERSION),
    (b"\x01\x02\x01\x01", ErrorCode.BAD_MESSAGE),  # beyond the reader's bound of 256
])
def test_stream_reader_breaks_on_a_header_it_cannot_frame(header: bytes,
                                                          error: ErrorCode) -> None:
    reader = StreamReader(max_message=256)
    items = reader.feed(CASES[2][2] + header + CASES[2][2])
    assert items[0] == CASES[2][1]
    assert isinstance(items[1], RsipWireError) and items[1].error is error
    assert items[1].message_type == 2
    assert len(items) == 2 and reader.broken and reader.pending == 0
    assert reader.feed(CASES[2][2]) == []
    with pytest.raises(ValueError):
        StreamReader(max_message=3)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(range(len(CASES))), min_size=1, max_size=12),
       st.lists(st.integers(0, 2000), max_size=20))
def test_stream_reader_gives_the_same_messages_at_any_split(picks: list[int],
                                                            cuts: list[int]) -> None:
    stream = b"".join(CASES[i][2] for i in picks)
    bounds = sorted({min(c, len(stream)) for c in cuts} | {0, len(stream)})
    reader = StreamReader()
    out: list[Message | RsipWireError] = []
    for start, end in itertools.pairwise(bounds):
        out += reader.feed(stream[start:end])
        assert reader.pending < wire.MAX_MESSAGE
    assert out == [CASES[i][1] for i in picks]
    assert reader.pending == 0 and not reader.broken


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=80), max_size=10), st.integers(4, 200))
def test_stream_reader_takes_any_bytes(chunks: list[bytes], bound: int) -> None:
    reader = StreamReader(max_message=bound)
    for chunk in chunks:
        for item in reader.feed(chunk):
            assert isinstance(item, Message | RsipWireError)
        assert reader.pending < max(bound, wire.HEADER_SIZE)


# --- hypothesis: generated messages --------------------------------------------------------------
u32s = st.integers(0, 0xFFFFFFFF)
ports_numbers = st.integers(1, 65535)

ip4s = st.integers(1, 0xFFFFFFFF).map(V4)
ip6s = st.integers(1, (1 << 128) - 1).map(V6)
fqdns = st.from_regex(r"[a-z0-9][a-z0-9.-]{0,40}", fullmatch=True)
addresses = st.one_of(
    st.just(Address.dont_care()), ip4s.map(Address.ipv4), ip6s.map(Address.ipv6),
    st.integers(0, 0xFFFFFFFF).map(lambda v: Address.netmask(V4(v))), fqdns.map(Address.fqdn))
local_addresses = addresses.filter(lambda a: a.kind is not AddressType.FQDN)


@st.composite
def port_blocks(draw: st.DrawFn) -> Ports:
    count = draw(st.integers(2, 255))
    first = draw(st.integers(1, 65536 - count))
    return Ports.block(first, count)


ports = st.one_of(st.integers(1, 255).map(Ports.any), ports_numbers.map(Ports.single),
                  port_blocks(),
                  st.lists(ports_numbers, min_size=2, max_size=30).map(Ports.listed))


@st.composite
def spi_blocks(draw: st.DrawFn) -> Spi:
    count = draw(st.integers(2, 65535))
    first = draw(st.integers(0, (1 << 32) - count))
    return Spi.block(first, count)


spis = st.one_of(st.integers(1, 65535).map(Spi.any), u32s.map(Spi.single), spi_blocks(),
                 st.lists(u32s, min_size=2, max_size=10).map(Spi.listed))
vendor_params = st.one_of(
    st.builds(VendorSpecific, st.integers(0, 65535), st.integers(0, 65535),
              st.binary(max_size=12)).filter(lambda v: (v.vendor, v.subtype) != (32473, 1)),
    ports_numbers.map(wire.udp_tunnel_param))
leases = u32s.map(LeaseTime)
tunnels = st.integers(0, 255).map(Tunnel)
methods = st.integers(0, 255).map(Method)
policies = st.builds(FlowPolicy, st.sampled_from([1, 2]), st.sampled_from([1, 2, 3]))
errors = st.integers(0, 65535).map(Error)


def _required(draw: st.DrawFn, kind: MessageType) -> list[Param]:
    """The required parameters of `kind`, drawn in the order of section 9."""
    rsipsec = kind in (MessageType.ASSIGN_REQUEST_RSIPSEC, MessageType.ASSIGN_RESPONSE_RSIPSEC)
    port_values = st.one_of(ports, st.just(Ports.not_needed())) if rsipsec else ports
    request = kind in (MessageType.ASSIGN_REQUEST_RSA_IP, MessageType.ASSIGN_REQUEST_RSAP_IP,
                       MessageType.LISTEN_REQUEST, MessageType.ASSIGN_REQUEST_RSIPSEC)
    out: list[Param] = []
    first_address = True
    for cls in wire._GRAMMAR[kind].required:
        if cls is Address:
            out.append(draw(local_addresses if request and first_address else addresses))
            first_address = False
        elif cls is Ports:
            out.append(draw(port_values))
        else:
            out.append(draw(_STRATEGIES[cls]))
    return out


_STRATEGIES: dict[type, st.SearchStrategy[Any]] = {
    ClientId: u32s.map(ClientId), BindId: u32s.map(BindId), LeaseTime: leases,
    Tunnel: tunnels, Method: methods, Error: errors, FlowPolicy: policies, Spi: spis,
    MessageCounter: u32s.map(MessageCounter), Address: addresses,
}


@st.composite
def query_items(draw: st.DrawFn, kind: MessageType) -> list[Param]:
    allowed = list(wire._GRAMMAR[kind].query)
    out: list[Param] = []
    for indicator in draw(st.lists(st.sampled_from(allowed), max_size=5)):
        out.append(Indicator(indicator))
        if indicator in wire._NETWORK_INDICATORS:
            out += [draw(st.one_of(ip4s.map(Address.ipv4), ip6s.map(Address.ipv6))),
                    draw(st.integers(0, 0xFFFFFFFF).map(lambda v: Address.netmask(V4(v))))]
        else:
            out.append(draw(addresses))
    return out


@st.composite
def messages(draw: st.DrawFn) -> Message:
    kind = draw(st.sampled_from(list(MessageType)))
    grammar = wire._GRAMMAR[kind]
    params = _required(draw, kind)
    if grammar.query:
        params += draw(query_items(kind))
    else:
        optional: list[Param] = []
        for cls, most in grammar.optional.items():
            if cls is MessageCounter:
                continue
            limit = 3 if most is None else most
            optional += draw(st.lists(_STRATEGIES[cls], max_size=limit))
        params += draw(st.permutations(optional)) if optional else []
    # a counter and vendor parameters may go anywhere
    movable: list[Param] = draw(st.lists(vendor_params, max_size=2))
    if draw(st.booleans()):
        movable.append(draw(u32s.map(MessageCounter)))
    for param in movable:
        params.insert(draw(st.integers(0, len(params))), param)
    return Message(kind, tuple(params))


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(messages())
def test_generated_messages_round_trip(message: Message) -> None:
    data = wire.encode(message)
    assert wire.decode(data) == message
    assert wire.message_length(data) == len(data)
    assert StreamReader().feed(data + data) == [message, message]


@settings(max_examples=1500, deadline=None)
@given(st.binary(max_size=300))
def test_random_bytes_only_ever_raise_rsip_wire_error(data: bytes) -> None:
    _decode_or_error(data)


@settings(max_examples=1500, deadline=None)
@given(st.sampled_from([*range(0, 18), 22, 23, 99]),
       st.lists(st.tuples(st.sampled_from([*range(0, 14), 22, 23, 200]),
                          st.binary(max_size=20)), max_size=10))
def test_well_framed_random_parameters_only_ever_raise_rsip_wire_error(
        kind: int, params: list[tuple[int, bytes]]) -> None:
    _decode_or_error(frame(kind, *(tlv(t, v) for t, v in params)))


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(messages(), st.data())
def test_mutated_valid_messages_only_ever_raise_rsip_wire_error(message: Message,
                                                                data: st.DataObject) -> None:
    raw = bytearray(wire.encode(message))
    for _ in range(data.draw(st.integers(1, 4))):
        how = data.draw(st.sampled_from(["flip", "cut", "insert", "delete", "length"]))
        at = data.draw(st.integers(0, max(len(raw) - 1, 0)))
        if how == "flip" and raw:
            raw[at] ^= data.draw(st.integers(1, 255))
        elif how == "cut":
            del raw[at:]
        elif how == "insert":
            raw[at:at] = data.draw(st.binary(min_size=1, max_size=6))
        elif how == "delete" and raw:
            del raw[at]
        elif how == "length" and len(raw) >= 4:
            raw[2:4] = u16(len(raw))  # keep the frame whole so the parameters are reached
    _decode_or_error(bytes(raw))


def _decode_or_error(data: bytes) -> None:
    try:
        message = wire.decode(data)
    except RsipWireError as exc:
        assert isinstance(exc.error, ErrorCode)
        answer = wire.error_response(exc.error, client_id=exc.client_id, counter=exc.counter)
        wire.encode(answer)
        return
    # anything accepted is a valid message that encodes to a message decoding to itself
    assert wire.decode(wire.encode(message)) == message


@settings(max_examples=300, deadline=None)
@given(st.lists(messages(), min_size=1, max_size=6), st.data())
def test_generated_streams_frame_at_any_split(batch: list[Message],
                                              data: st.DataObject) -> None:
    stream = b"".join(wire.encode(m) for m in batch)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=8)))
    assume(len(stream) < 60000)
    reader = StreamReader()
    out: list[Message | RsipWireError] = []
    for start, end in zip([0, *cuts], [*cuts, len(stream)], strict=True):
        out += reader.feed(stream[start:end])
    assert out == batch
