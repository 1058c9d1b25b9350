"""PCP (RFC 6887, version 2) and NAT-PMP (RFC 6886, version 0) messages: pure codecs.

Both protocols share UDP port 5351 on the gateway and are told apart by the first byte (the
version): 0 is NAT-PMP, 2 is PCP (RFC 6887 Appendix A).

PCP (network byte order; addresses are 16 bytes, IPv4 as an IPv4-mapped IPv6 address):

    request   version(1) R=0|opcode(1) reserved(2) requested lifetime(4) client address(16)
              opcode data, options
    response  version(1) R=1|opcode(1) reserved(1) result(1) lifetime(4) epoch(4)
              reserved(12), opcode data, options
    MAP       nonce(12) protocol(1) reserved(3) internal port(2) external port(2)
              external address(16)                                           36 bytes
    PEER      MAP's fields, remote port(2) reserved(2) remote address(16)    56 bytes
    ANNOUNCE  nothing
    option    code(1) reserved(1) length(2) data, padded to a multiple of 4
              THIRD_PARTY (1): internal address(16); PREFER_FAILURE (2): empty;
              FILTER (3): reserved(1) prefix length(1) remote port(2) remote address(16)

NAT-PMP:

    public address   request  0 0                  response  0 128 result(2) epoch(4) address(4)
    map (1 UDP, 2 TCP) request  0 op reserved(2) internal port(2) suggested port(2) lifetime(4)
                       response 0 128+op result(2) epoch(4) internal port(2) external port(2)
                                lifetime(4)
    unsupported version         0 0 result=1(2) epoch(4)

    request = decode_pcp_request(data)            # PcpRequest, or PcpWireError
    reply = PcpResponse(...).encode()             # or pcp_error(data, result, ...)
    pmp = decode_pmp_request(data)                # PmpAddressRequest | PmpMapRequest, or
                                                  #   NatPmpWireError

Every parser raises one typed error for malformed input: `PcpWireError` (with the `result` a
server answers it with, or None when RFC 6887 section 8.2 says to drop it silently) and
`NatPmpWireError` (likewise). Lengths are checked exactly; encoders check their fields, so an
invalid message cannot be built.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass
from enum import IntEnum
from typing import TypeAlias

from ipshift.packet.errors import BytesLike, PacketError

SERVER_PORT = 5351       # requests go here (both protocols)
CLIENT_PORT = 5350       # unsolicited announcements go to this port of 224.0.0.1
ANNOUNCE_GROUP = "224.0.0.1"
PCP_VERSION = 2
NATPMP_VERSION = 0
MAX_SIZE = 1100          # the largest PCP message (RFC 6887 section 7)
HEADER_SIZE = 24
NONCE_SIZE = 12
MAP_SIZE = 36
PEER_SIZE = 56
RESPONSE_BIT = 0x80
SHORT_ERROR_LIFETIME = 30     # RFC 6887 section 7.4: "short lifetime" errors
LONG_ERROR_LIFETIME = 1800    # "long lifetime" errors

IPAddress: TypeAlias = ipaddress.IPv4Address | ipaddress.IPv6Address

_REQUEST = struct.Struct("!BBHI16s")
_RESPONSE = struct.Struct("!BBBBII12s")
_MAP = struct.Struct("!12sB3xHH16s")
_PEER_TAIL = struct.Struct("!H2x16s")
_OPTION = struct.Struct("!BBH")
_FILTER = struct.Struct("!xBH16s")
_PMP_MAP_REQUEST = struct.Struct("!BBHHHI")
_PMP_ADDRESS_RESPONSE = struct.Struct("!BBHI4s")
_PMP_MAP_RESPONSE = struct.Struct("!BBHIHHI")
_PMP_ERROR = struct.Struct("!BBHI")
_MAPPED_PREFIX = bytes(10) + b"\xff\xff"


class Opcode(IntEnum):
    ANNOUNCE = 0
    MAP = 1
    PEER = 2


class Result(IntEnum):
    """PCP result codes (RFC 6887 section 7.4)."""

    SUCCESS = 0
    UNSUPP_VERSION = 1
    NOT_AUTHORIZED = 2
    MALFORMED_REQUEST = 3
    UNSUPP_OPCODE = 4
    UNSUPP_OPTION = 5
    MALFORMED_OPTION = 6
    NETWORK_FAILURE = 7
    NO_RESOURCES = 8
    UNSUPP_PROTOCOL = 9
    USER_EX_QUOTA = 10
    CANNOT_PROVIDE_EXTERNAL = 11
    ADDRESS_MISMATCH = 12
    EXCESSIVE_REMOTE_PEERS = 13


SHORT_LIFETIME_RESULTS = frozenset({Result.NETWORK_FAILURE, Result.NO_RESOURCES,
                                    Result.USER_EX_QUOTA, Result.CANNOT_PROVIDE_EXTERNAL})


def error_lifetime(result: Result) -> int:
    """The Lifetime of an error response the RFC recommends for `result` (section 7.4)."""
    return SHORT_ERROR_LIFETIME if result in SHORT_LIFETIME_RESULTS else LONG_ERROR_LIFETIME


class OptionCode(IntEnum):
    THIRD_PARTY = 1
    PREFER_FAILURE = 2
    FILTER = 3


class PmpOpcode(IntEnum):
    PUBLIC_ADDRESS = 0
    MAP_UDP = 1
    MAP_TCP = 2


class PmpResult(IntEnum):
    """NAT-PMP result codes (RFC 6886 section 3.5)."""

    SUCCESS = 0
    UNSUPPORTED_VERSION = 1
    NOT_AUTHORIZED = 2
    NETWORK_FAILURE = 3
    OUT_OF_RESOURCES = 4
    UNSUPPORTED_OPCODE = 5


PMP_PROTOCOLS = {PmpOpcode.MAP_UDP: 17, PmpOpcode.MAP_TCP: 6}


class PcpWireError(PacketError):
    """Bytes that are not a valid PCP message. `result` is what a server answers with
    (MALFORMED_REQUEST, MALFORMED_OPTION, UNSUPP_VERSION, UNSUPP_OPCODE), or None when the
    request is to be dropped without an answer (too short, a response, not PCP at all)."""

    def __init__(self, reason: str, message: str, result: Result | None) -> None:
        super().__init__(reason, message)
        self.detail = message
        self.result = result


class NatPmpWireError(PacketError):
    """Bytes that are not a valid NAT-PMP message. `result` is what a server answers with
    (UNSUPPORTED_VERSION, UNSUPPORTED_OPCODE), or None when the request is to be ignored."""

    def __init__(self, reason: str, message: str, result: PmpResult | None) -> None:
        super().__init__(reason, message)
        self.result = result


# --- addresses ----------------------------------------------------------------------------------
def pack_address(address: IPAddress) -> bytes:
    """16 bytes: IPv6 as is, IPv4 as an IPv4-mapped IPv6 address (RFC 6887 section 5)."""
    if isinstance(address, ipaddress.IPv4Address):
        return _MAPPED_PREFIX + address.packed
    if isinstance(address, ipaddress.IPv6Address):
        return address.packed
    raise ValueError(f"{address!r} is not an IP address")


def unpack_address(data: bytes) -> IPAddress:
    """The inverse of `pack_address`: an IPv4-mapped address becomes IPv4."""
    if data[:12] == _MAPPED_PREFIX:
        return ipaddress.IPv4Address(data[12:16])
    return ipaddress.IPv6Address(data)


def is_unspecified(address: IPAddress) -> bool:
    """The all-zeros address of either family (`::ffff:0.0.0.0` or `::`): "no preference"."""
    return int(address) == 0


# --- options ------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class ThirdParty:
    """THIRD_PARTY: the mapping is for `address`, not for the sender."""

    address: IPAddress

    code = OptionCode.THIRD_PARTY

    def data(self) -> bytes:
        return pack_address(self.address)


@dataclass(frozen=True, slots=True)
class PreferFailure:
    """PREFER_FAILURE: the suggested external address and port, or nothing."""

    code = OptionCode.PREFER_FAILURE

    def data(self) -> bytes:
        return b""


@dataclass(frozen=True, slots=True)
class Filter:
    """FILTER: let in only packets from `remote_address`/prefix (and `remote_port`, 0: any).

    `prefix_length` is as on the wire: 96..128 for an IPv4 remote (96 + its IPv4 prefix),
    0..128 for IPv6; 0 means "remove every filter"."""

    prefix_length: int
    remote_port: int
    remote_address: IPAddress

    code = OptionCode.FILTER

    def __post_init__(self) -> None:
        _port(self.remote_port, "FILTER remote port")
        if not filter_prefix_valid(self.prefix_length, self.remote_address):
            raise ValueError(f"FILTER prefix length {self.prefix_length} is not valid for "
                             f"{self.remote_address}")

    def data(self) -> bytes:
        return _FILTER.pack(self.prefix_length, self.remote_port,
                            pack_address(self.remote_address))

    @property
    def clears(self) -> bool:
        return self.prefix_length == 0

    def network(self) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
        """The remote prefix as a network (host bits cleared); an IPv4 one for IPv4."""
        if isinstance(self.remote_address, ipaddress.IPv4Address):
            return ipaddress.IPv4Network((self.remote_address, max(self.prefix_length - 96, 0)),
                                         strict=False)
        return ipaddress.IPv6Network((self.remote_address, self.prefix_length), strict=False)


def filter_prefix_valid(prefix_length: int, address: IPAddress) -> bool:
    if prefix_length == 0:
        return True
    if isinstance(address, ipaddress.IPv4Address):
        return 96 <= prefix_length <= 128
    return 0 <= prefix_length <= 128


@dataclass(frozen=True, slots=True)
class UnknownOption:
    """An option this codec does not know: kept so the server can decide (a mandatory one,
    code < 128, is answered UNSUPP_OPTION; an optional one is ignored)."""

    code: int
    payload: bytes

    def __post_init__(self) -> None:
        if not 0 <= self.code <= 0xFF or self.code in tuple(OptionCode):
            raise ValueError(f"option code {self.code} is not an unknown option's")
        if len(self.payload) > MAX_SIZE:
            raise ValueError("option longer than a PCP message")

    @property
    def mandatory(self) -> bool:
        return self.code < 128

    def data(self) -> bytes:
        return self.payload


Option: TypeAlias = ThirdParty | PreferFailure | Filter | UnknownOption


def encode_options(options: tuple[Option, ...]) -> bytes:
    out = bytearray()
    for option in options:
        data = option.data()
        out += _OPTION.pack(int(option.code), 0, len(data)) + data
        out += bytes(-len(data) % 4)
    return bytes(out)


def decode_options(data: BytesLike) -> tuple[Option, ...]:
    """Options of a PCP message: MALFORMED_OPTION for a bad layout, a known option of the wrong
    length or content, or THIRD_PARTY / PREFER_FAILURE more than once."""
    view = memoryview(data)
    options: list[Option] = []
    seen: set[int] = set()
    offset = 0
    while offset < len(view):
        if len(view) - offset < _OPTION.size:
            _option_error("option-header", f"{len(view) - offset} bytes left, an option "
                                           "header is 4")
        code, _reserved, length = _OPTION.unpack_from(view, offset)
        start = offset + _OPTION.size
        padded = length + (-length % 4)
        if start + padded > len(view):
            _option_error("option-length", f"option {code} of {length} bytes runs past the "
                                           "message")
        body = bytes(view[start:start + length])
        offset = start + padded
        if code in (OptionCode.THIRD_PARTY, OptionCode.PREFER_FAILURE) and code in seen:
            _option_error("option-repeated", f"option {OptionCode(code).name} appears twice")
        seen.add(code)
        options.append(_decode_option(code, body))
    return tuple(options)


def _decode_option(code: int, body: bytes) -> Option:
    if code == OptionCode.THIRD_PARTY:
        if len(body) != 16:
            _option_error("option-length", f"THIRD_PARTY of {len(body)} bytes, not 16")
        return ThirdParty(unpack_address(body))
    if code == OptionCode.PREFER_FAILURE:
        if body:
            _option_error("option-length", f"PREFER_FAILURE of {len(body)} bytes, not 0")
        return PreferFailure()
    if code == OptionCode.FILTER:
        if len(body) != 20:
            _option_error("option-length", f"FILTER of {len(body)} bytes, not 20")
        prefix, port, raw = _FILTER.unpack(body)
        address = unpack_address(raw)
        if not filter_prefix_valid(prefix, address):
            _option_error("filter-prefix", f"FILTER prefix length {prefix} is not valid for "
                                           f"{address}")
        return Filter(prefix, port, address)
    return UnknownOption(code, body)


def _option_error(reason: str, message: str) -> None:
    raise PcpWireError(reason, message, Result.MALFORMED_OPTION)


# --- opcode data --------------------------------------------------------------------------------
def _port(value: int, what: str) -> None:
    if not isinstance(value, int) or not 0 <= value <= 0xFFFF:
        raise ValueError(f"{what} {value!r} is not 0-65535")


@dataclass(frozen=True, slots=True)
class MapData:
    """MAP request or response data. In a request `external_*` is the suggestion (zeros: no
    preference); in a success response, what was assigned."""

    nonce: bytes
    protocol: int
    internal_port: int
    external_port: int
    external_address: IPAddress

    def __post_init__(self) -> None:
        if not isinstance(self.nonce, bytes) or len(self.nonce) != NONCE_SIZE:
            raise ValueError(f"a mapping nonce is {NONCE_SIZE} bytes")
        if not 0 <= self.protocol <= 0xFF:
            raise ValueError(f"protocol {self.protocol} is not 0-255")
        _port(self.internal_port, "internal port")
        _port(self.external_port, "external port")

    def encode(self) -> bytes:
        return _MAP.pack(self.nonce, self.protocol, self.internal_port, self.external_port,
                         pack_address(self.external_address))


@dataclass(frozen=True, slots=True)
class PeerData:
    """PEER request or response data: MAP's fields plus the remote peer."""

    nonce: bytes
    protocol: int
    internal_port: int
    external_port: int
    external_address: IPAddress
    remote_port: int
    remote_address: IPAddress

    def __post_init__(self) -> None:
        MapData(self.nonce, self.protocol, self.internal_port, self.external_port,
                self.external_address)
        _port(self.remote_port, "remote peer port")

    def encode(self) -> bytes:
        return _MAP.pack(self.nonce, self.protocol, self.internal_port, self.external_port,
                         pack_address(self.external_address)) + \
            _PEER_TAIL.pack(self.remote_port, pack_address(self.remote_address))


OpcodeData: TypeAlias = MapData | PeerData | None


def _decode_map(view: memoryview) -> MapData:
    nonce, protocol, internal, external, address = _MAP.unpack_from(view)
    return MapData(nonce, protocol, internal, external, unpack_address(address))


def _decode_peer(view: memoryview) -> PeerData:
    base = _decode_map(view)
    remote_port, remote = _PEER_TAIL.unpack_from(view, MAP_SIZE)
    return PeerData(base.nonce, base.protocol, base.internal_port, base.external_port,
                    base.external_address, remote_port, unpack_address(remote))


_DATA_SIZE = {Opcode.ANNOUNCE: 0, Opcode.MAP: MAP_SIZE, Opcode.PEER: PEER_SIZE}


def _check_data(opcode: int, data: OpcodeData) -> None:
    wanted = {Opcode.ANNOUNCE: type(None), Opcode.MAP: MapData, Opcode.PEER: PeerData}
    if opcode not in wanted or not isinstance(data, wanted[Opcode(opcode)]):
        raise ValueError(f"opcode {opcode} does not carry {type(data).__name__}")


# --- PCP messages -------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class PcpRequest:
    opcode: Opcode
    lifetime: int
    client_address: IPAddress
    data: OpcodeData = None
    options: tuple[Option, ...] = ()

    def __post_init__(self) -> None:
        _check_data(self.opcode, self.data)
        if not 0 <= self.lifetime <= 0xFFFFFFFF:
            raise ValueError(f"lifetime {self.lifetime} is not a 32-bit number")

    def encode(self) -> bytes:
        head = _REQUEST.pack(PCP_VERSION, int(self.opcode), 0, self.lifetime,
                             pack_address(self.client_address))
        body = b"" if self.data is None else self.data.encode()
        message = head + body + encode_options(self.options)
        if len(message) > MAX_SIZE:
            raise ValueError(f"a PCP message of {len(message)} bytes is longer than {MAX_SIZE}")
        return message

    def option(self, kind: type[Option]) -> Option | None:
        """The first option of this type, or None."""
        return next((o for o in self.options if isinstance(o, kind)), None)


@dataclass(frozen=True, slots=True)
class PcpResponse:
    opcode: int
    result: Result
    lifetime: int
    epoch: int
    data: OpcodeData = None
    options: tuple[Option, ...] = ()
    version: int = PCP_VERSION
    reserved: bytes = bytes(12)  # zero, or the client address's last 12 bytes (section 7.2)

    def __post_init__(self) -> None:
        if self.opcode in _DATA_SIZE:
            _check_data(self.opcode, self.data)
        elif self.data is not None or not 0 <= self.opcode < 128:
            raise ValueError(f"opcode {self.opcode} carries no data here")
        for value, what in ((self.lifetime, "lifetime"), (self.epoch, "epoch")):
            if not 0 <= value <= 0xFFFFFFFF:
                raise ValueError(f"{what} {value} is not a 32-bit number")
        if not 0 <= self.version <= 0xFF or len(self.reserved) != 12:
            raise ValueError("bad version or reserved field")

    def encode(self) -> bytes:
        head = _RESPONSE.pack(self.version, RESPONSE_BIT | self.opcode, 0, int(self.result),
                              self.lifetime, self.epoch, self.reserved)
        body = b"" if self.data is None else self.data.encode()
        message = head + body + encode_options(self.options)
        if len(message) > MAX_SIZE:
            raise ValueError(f"a PCP message of {len(message)} bytes is longer than {MAX_SIZE}")
        return message


@dataclass(frozen=True, slots=True)
class PcpHeader:
    """What every PCP request starts with; checked before the opcode data is."""

    version: int
    opcode: int
    lifetime: int
    client_address: IPAddress


def decode_pcp_header(data: BytesLike) -> PcpHeader:
    """The common request header, checked in the order of RFC 6887 section 8.2: shorter than
    2 bytes or a response: dropped (result None); another version: UNSUPP_VERSION; shorter
    than 24 bytes: dropped; longer than 1100 or not a multiple of 4: MALFORMED_REQUEST."""
    size = len(data)
    if size < 2:
        raise PcpWireError("short", f"{size} bytes", None)
    version, second = data[0], data[1]
    if second & RESPONSE_BIT:
        raise PcpWireError("response", "the R bit is set", None)
    if version != PCP_VERSION:
        raise PcpWireError("version", f"version {version}", Result.UNSUPP_VERSION)
    if size < HEADER_SIZE:
        raise PcpWireError("short", f"{size} bytes, a PCP header is {HEADER_SIZE}", None)
    if size > MAX_SIZE or size % 4:
        raise PcpWireError("length", f"{size} bytes: more than {MAX_SIZE} or not a multiple "
                                     "of 4", Result.MALFORMED_REQUEST)
    _, opcode, _, lifetime, client = _REQUEST.unpack_from(data)
    return PcpHeader(version, opcode, lifetime, unpack_address(client))


def decode_pcp_request(data: BytesLike) -> PcpRequest:
    """A whole request: the header (`decode_pcp_header`), then UNSUPP_OPCODE for an opcode
    other than ANNOUNCE, MAP and PEER, MALFORMED_REQUEST when it is too short for its opcode,
    and the options (`decode_options`)."""
    header = decode_pcp_header(data)
    if header.opcode not in _DATA_SIZE:
        raise PcpWireError("opcode", f"opcode {header.opcode}", Result.UNSUPP_OPCODE)
    opcode = Opcode(header.opcode)
    view = memoryview(data)[HEADER_SIZE:]
    size = _DATA_SIZE[opcode]
    if len(view) < size:
        raise PcpWireError("length", f"{opcode.name} needs {size} bytes of data, "
                                     f"{len(view)} given", Result.MALFORMED_REQUEST)
    body: OpcodeData = None
    if opcode is Opcode.MAP:
        body = _decode_map(view)
    elif opcode is Opcode.PEER:
        body = _decode_peer(view)
    options = decode_options(view[size:])
    return PcpRequest(opcode, header.lifetime, header.client_address, body, options)


def decode_pcp_response(data: BytesLike) -> PcpResponse:
    """A PCP response (a client's view, and the tests' oracle). Raises PcpWireError (result
    None: a client answers nothing)."""
    size = len(data)
    if size < HEADER_SIZE or size > MAX_SIZE or size % 4:
        raise PcpWireError("length", f"a PCP response of {size} bytes", None)
    version, second, _, result, lifetime, epoch, reserved = _RESPONSE.unpack_from(data)
    if not second & RESPONSE_BIT:
        raise PcpWireError("request", "the R bit is clear", None)
    if result not in tuple(Result):
        raise PcpWireError("result", f"result code {result}", None)
    opcode = second & ~RESPONSE_BIT
    view = memoryview(data)[HEADER_SIZE:]
    body: OpcodeData = None
    rest = view
    if version == PCP_VERSION and opcode in _DATA_SIZE:
        need = _DATA_SIZE[Opcode(opcode)]
        if len(view) < need:
            raise PcpWireError("length", f"{Opcode(opcode).name} response of {len(view)} data "
                                         "bytes", None)
        if opcode == Opcode.MAP:
            body = _decode_map(view)
        elif opcode == Opcode.PEER:
            body = _decode_peer(view)
        rest = view[need:]
        try:
            options = decode_options(rest)
        except PcpWireError as exc:
            raise PcpWireError(exc.reason, exc.detail, None) from exc
    elif len(view):
        raise PcpWireError("length", f"{len(view)} bytes after an opaque response header", None)
    else:
        options = ()
    return PcpResponse(opcode, Result(result), lifetime, epoch, body, options, version,
                       bytes(reserved))


def pcp_error(request: BytesLike, result: Result, lifetime: int, epoch: int, *,
              parsed: bool, version: int = PCP_VERSION) -> bytes:
    """An error response as RFC 6887 section 8.2 builds it: the request (at most 1100 bytes,
    zero-padded to a multiple of 4 and to a whole header) with the R bit, the result, the
    Lifetime and the Epoch set, and the reserved 96 bits zero when the request was parsed
    (else they keep the last 96 bits of its client address)."""
    if result is Result.SUCCESS:
        raise ValueError("an error response needs an error result")
    copy = bytearray(bytes(request[:MAX_SIZE]))
    copy += bytes(-len(copy) % 4)
    if len(copy) < HEADER_SIZE:
        copy += bytes(HEADER_SIZE - len(copy))
    opcode = copy[1] & ~RESPONSE_BIT
    reserved = bytes(12) if parsed else bytes(copy[12:24])
    copy[:HEADER_SIZE] = _RESPONSE.pack(version, RESPONSE_BIT | opcode, 0, int(result),
                                        lifetime & 0xFFFFFFFF, epoch & 0xFFFFFFFF, reserved)
    return bytes(copy)


def announce(epoch: int) -> bytes:
    """An unsolicited ANNOUNCE response (RFC 6887 section 14.1.3)."""
    return PcpResponse(Opcode.ANNOUNCE, Result.SUCCESS, 0, epoch).encode()


# --- NAT-PMP ------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class PmpAddressRequest:
    def encode(self) -> bytes:
        return bytes((NATPMP_VERSION, PmpOpcode.PUBLIC_ADDRESS))


@dataclass(frozen=True, slots=True)
class PmpMapRequest:
    opcode: PmpOpcode  # MAP_UDP or MAP_TCP
    internal_port: int
    external_port: int  # suggested (0: no preference)
    lifetime: int

    def __post_init__(self) -> None:
        if self.opcode not in PMP_PROTOCOLS:
            raise ValueError(f"NAT-PMP opcode {self.opcode} is not a mapping request")
        _port(self.internal_port, "internal port")
        _port(self.external_port, "external port")
        if not 0 <= self.lifetime <= 0xFFFFFFFF:
            raise ValueError(f"lifetime {self.lifetime} is not a 32-bit number")

    @property
    def protocol(self) -> int:
        return PMP_PROTOCOLS[self.opcode]

    def encode(self) -> bytes:
        return _PMP_MAP_REQUEST.pack(NATPMP_VERSION, int(self.opcode), 0, self.internal_port,
                                     self.external_port, self.lifetime)


@dataclass(frozen=True, slots=True)
class PmpAddressResponse:
    result: PmpResult
    epoch: int
    address: ipaddress.IPv4Address

    def encode(self) -> bytes:
        return _PMP_ADDRESS_RESPONSE.pack(NATPMP_VERSION, RESPONSE_BIT, int(self.result),
                                          self.epoch & 0xFFFFFFFF, self.address.packed)


@dataclass(frozen=True, slots=True)
class PmpMapResponse:
    opcode: PmpOpcode
    result: PmpResult
    epoch: int
    internal_port: int
    external_port: int
    lifetime: int

    def __post_init__(self) -> None:
        PmpMapRequest(self.opcode, self.internal_port, self.external_port, self.lifetime)

    def encode(self) -> bytes:
        return _PMP_MAP_RESPONSE.pack(NATPMP_VERSION, RESPONSE_BIT | int(self.opcode),
                                      int(self.result), self.epoch & 0xFFFFFFFF,
                                      self.internal_port, self.external_port, self.lifetime)


@dataclass(frozen=True, slots=True)
class PmpErrorResponse:
    """The 8-byte answer to a request of another version (RFC 6886 section 3.5):
    version 0, opcode 128 + the request's (0 for another version), a result, the epoch."""

    opcode: int
    result: PmpResult
    epoch: int

    def __post_init__(self) -> None:
        if not 0 <= self.opcode < 128:
            raise ValueError(f"NAT-PMP opcode {self.opcode} is not a request's")

    def encode(self) -> bytes:
        return _PMP_ERROR.pack(NATPMP_VERSION, RESPONSE_BIT | self.opcode, int(self.result),
                               self.epoch & 0xFFFFFFFF)


PmpRequest: TypeAlias = PmpAddressRequest | PmpMapRequest
PmpResponse: TypeAlias = PmpAddressResponse | PmpMapResponse | PmpErrorResponse


def decode_pmp_request(data: BytesLike) -> PmpRequest:
    """A NAT-PMP request. Another version: UNSUPPORTED_VERSION; opcode 128 or more (a
    response) or a wrong length: ignored (result None); an unknown request opcode:
    UNSUPPORTED_OPCODE."""
    size = len(data)
    if size < 2:
        raise NatPmpWireError("short", f"{size} bytes", None)
    version, opcode = data[0], data[1]
    if version != NATPMP_VERSION:
        raise NatPmpWireError("version", f"version {version}", PmpResult.UNSUPPORTED_VERSION)
    if opcode & RESPONSE_BIT:
        raise NatPmpWireError("response", f"opcode {opcode} is a response", None)
    if opcode == PmpOpcode.PUBLIC_ADDRESS:
        if size != 2:
            raise NatPmpWireError("length", f"a public address request of {size} bytes, "
                                            "not 2", None)
        return PmpAddressRequest()
    if opcode not in PMP_PROTOCOLS:
        raise NatPmpWireError("opcode", f"opcode {opcode}", PmpResult.UNSUPPORTED_OPCODE)
    if size != _PMP_MAP_REQUEST.size:
        raise NatPmpWireError("length", f"a mapping request of {size} bytes, not "
                                        f"{_PMP_MAP_REQUEST.size}", None)
    _, _, _, internal, external, lifetime = _PMP_MAP_REQUEST.unpack(bytes(data))
    return PmpMapRequest(PmpOpcode(opcode), internal, external, lifetime)


def decode_pmp_response(data: BytesLike) -> PmpResponse:
    """A NAT-PMP response (a client's view, and the tests' oracle)."""
    size = len(data)
    if size < 8:
        raise NatPmpWireError("short", f"{size} bytes", None)
    version, opcode, result, epoch = _PMP_ERROR.unpack_from(data)
    if version != NATPMP_VERSION or not opcode & RESPONSE_BIT:
        raise NatPmpWireError("version", f"version {version}, opcode {opcode}", None)
    if result not in tuple(PmpResult):
        raise NatPmpWireError("result", f"result code {result}", None)
    request = opcode & ~RESPONSE_BIT
    if size == _PMP_ERROR.size:
        return PmpErrorResponse(request, PmpResult(result), epoch)
    if request == PmpOpcode.PUBLIC_ADDRESS and size == _PMP_ADDRESS_RESPONSE.size:
        address = ipaddress.IPv4Address(bytes(data[8:12]))
        return PmpAddressResponse(PmpResult(result), epoch, address)
    if request in PMP_PROTOCOLS and size == _PMP_MAP_RESPONSE.size:
        _, _, _, _, internal, external, lifetime = _PMP_MAP_RESPONSE.unpack(bytes(data))
        return PmpMapResponse(PmpOpcode(request), PmpResult(result), epoch, internal, external,
                              lifetime)
    raise NatPmpWireError("length", f"a response to opcode {request} of {size} bytes", None)


def pmp_unsupported_opcode(request: BytesLike, epoch: int) -> bytes:
    """RFC 6886 section 3.5: the whole request back with the opcode's top bit set and result
    5; the 8-byte header form (with the epoch) when the request is shorter."""
    copy = bytearray(bytes(request[:MAX_SIZE]))
    if len(copy) < _PMP_ERROR.size:
        copy += bytes(_PMP_ERROR.size - len(copy))
        copy[4:8] = (epoch & 0xFFFFFFFF).to_bytes(4, "big")
    copy[1] |= RESPONSE_BIT
    copy[2:4] = int(PmpResult.UNSUPPORTED_OPCODE).to_bytes(2, "big")
    return bytes(copy)
