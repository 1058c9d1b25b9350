"""RSIP messages (RFC 3103, with the IPsec extension of RFC 3104) on TCP and UDP port 4555.
Pure codec.

A message is a 4-byte header and parameters, all in network byte order:

    message    version(1) = 1   type(1)   overall length(2, header included)   parameters
    parameter  type(1)   length(2, the value only)   value

    Address        1  addrtype(1) address: IPv4 4, IPv4 netmask 4, IPv6 16, FQDN (ASCII) rest
    Ports          2  number(1) port(2) x (0, 1 or number)
    Lease Time     3  seconds(4)        Client ID   4  id(4)        Bind ID   5  id(4)
    Tunnel Type    6  type(1)           RSIP Method 7  method(1)    Error     8  code(2)
    Flow Policy    9  local(1) remote(1)
    Indicator     10  value(2)          Message Counter 11  counter(4)
    Vendor Specific 12  vendor ID(2) subtype(2) value
    SPI           22  number(2) SPI(4) x (0, 1 or number)                          (RFC 3104)

    message = Message(MessageType.REGISTER_REQUEST, (MessageCounter(1),))
    data = encode(message)                 # checks the grammar; raises RsipWireError
    message = decode(data)                 # exactly one message; raises RsipWireError
    reader = StreamReader()                # TCP: reader.feed(chunk) -> [Message | RsipWireError]

Every malformed input raises `RsipWireError`, whose `error` is the RFC 3103 code a gateway
answers with and whose `message_type`, `counter` and `client_id` are read from the input when
they can be, so the answer can be addressed and (over UDP) matched to its request:

    not version 1                                  UNSUPPORTED_RSIP_VERSION
    unknown message type                           ILLEGAL_MESSAGE
    unknown parameter type                         ILLEGAL_PARAM
    header or parameter cut short, lengths that
    disagree, trailing bytes, overall length < 4   BAD_MESSAGE
    a value of the wrong length or out of range    BAD_PARAM
    RFC 3103 section 9 grammar (`validate`)        MISSING_PARAM, DUPLICATE_PARAM, EXTRA_PARAM,
                                                   BAD_MESSAGE (required ones out of order)

Readings of what the RFCs leave open, decided once:

- "Don't care" address: written as length 1 with addrtype IPv4 (the RFC omits only the value,
  and tshark shows this as "Any IPv4 Address"). Read: length 1 with any addrtype 0-4, and an
  IPv4 or IPv6 address of all zeros (RFC 3103 section 9.8.3), both become `Address.dont_care()`.
  An all-zeros netmask stays a netmask (/0).
- "Don't care" ports: written as number N, length 1, no port field (`Ports.any(N)`). Read:
  number 0 without a port field as don't care of one port, and port fields that are all zero
  as don't care of `number` ports (Appendix C writes both as "0" and "4-0").
- A block "N-P" (one port field, number N > 1) is the ports P .. P+N-1 and must end by 65535.
- Ports of length 0 are RFC 3104's "don't need" (`Ports.not_needed()`); `validate` allows them
  only in ASSIGN_REQUEST_RSIPSEC and ASSIGN_RESPONSE_RSIPSEC.
- "Don't care" SPI: number N, length 2 (`Spi.any(N)`). An SPI number of 0 is refused.
- Indicator: written with 2 bytes (section 8.10); read with 1 or 2 (section 9.14 says 1).
- Grammar: required parameters in the order of section 9; optional ones anywhere, also among
  the required ones; a response's tunnel endpoint is the Address beyond the required ones. A
  QUERY tuple is an Indicator followed by its address, or (network indicators) by a network
  address and an IPv4 netmask (`QueryTuple`, `query_tuples`).
  Vendor-specific parameters may appear in any message, any number of times, and those of
  other vendors are kept, never refused (section 8.12 says to ignore them).
- `encode` checks the grammar too (`check=False` skips it, to build broken input for tests).
- TCP framing by the overall length; a length below 4 or above the reader's bound, or a version
  other than 1, leaves no way to find the next message: the reader stops (`.broken`).

ipshift's own parameter (RFC 3103 knows IP-IP, GRE and L2TP tunnels only): a vendor-specific
parameter with vendor ID 32473 (the documentation enterprise number of RFC 5612) and subtype 1
asks for, and grants, ipshift's UDP tunnel framing; its value is the 2-byte UDP port (1-65535)
of the sender's tunnel endpoint. A host puts it in REGISTER_REQUEST and its assign requests; a
gateway that agrees answers with its own port. See `udp_tunnel_param` and `udp_tunnel_port`.
"""

from __future__ import annotations

import builtins
import ipaddress
import struct
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import IntEnum
from typing import ClassVar, NamedTuple, TypeAlias, TypeVar

from ipshift.packet.errors import BytesLike, PacketError

VERSION = 1
PORT = 4555
HEADER_SIZE = 4
PARAM_HEADER_SIZE = 3
MAX_MESSAGE = 0xFFFF          # the overall length field's limit
VENDOR_IPSHIFT = 32473        # RFC 5612's documentation enterprise number
SUBTYPE_UDP_TUNNEL = 1

IPAddress: TypeAlias = ipaddress.IPv4Address | ipaddress.IPv6Address

_HEADER = struct.Struct("!BBH")
_PARAM_HEADER = struct.Struct("!BH")
_U8 = struct.Struct("!B")
_U16 = struct.Struct("!H")
_U32 = struct.Struct("!I")
_TWO_U8 = struct.Struct("!BB")
_TWO_U16 = struct.Struct("!HH")


class MessageType(IntEnum):
    ERROR_RESPONSE = 1
    REGISTER_REQUEST = 2
    REGISTER_RESPONSE = 3
    DE_REGISTER_REQUEST = 4
    DE_REGISTER_RESPONSE = 5
    ASSIGN_REQUEST_RSA_IP = 6
    ASSIGN_RESPONSE_RSA_IP = 7
    ASSIGN_REQUEST_RSAP_IP = 8
    ASSIGN_RESPONSE_RSAP_IP = 9
    EXTEND_REQUEST = 10
    EXTEND_RESPONSE = 11
    FREE_REQUEST = 12
    FREE_RESPONSE = 13
    QUERY_REQUEST = 14
    QUERY_RESPONSE = 15
    LISTEN_REQUEST = 16
    LISTEN_RESPONSE = 17
    ASSIGN_REQUEST_RSIPSEC = 22
    ASSIGN_RESPONSE_RSIPSEC = 23


class ParamType(IntEnum):
    ADDRESS = 1
    PORTS = 2
    LEASE_TIME = 3
    CLIENT_ID = 4
    BIND_ID = 5
    TUNNEL_TYPE = 6
    RSIP_METHOD = 7
    ERROR = 8
    FLOW_POLICY = 9
    INDICATOR = 10
    MESSAGE_COUNTER = 11
    VENDOR_SPECIFIC = 12
    SPI = 22


class ErrorCode(IntEnum):
    """RFC 3103 Appendix A and RFC 3104 Appendix B."""

    UNKNOWN_ERROR = 101
    USE_TCP = 102
    FLOW_POLICY_VIOLATION = 103
    INTERNAL_SERVER_ERROR = 104
    MESSAGE_COUNTER_REQUIRED = 105
    UNSUPPORTED_RSIP_VERSION = 106
    MISSING_PARAM = 201
    DUPLICATE_PARAM = 202
    EXTRA_PARAM = 203
    ILLEGAL_PARAM = 204
    BAD_PARAM = 205
    ILLEGAL_MESSAGE = 206
    BAD_MESSAGE = 207
    UNSUPPORTED_MESSAGE = 208
    REGISTER_FIRST = 301
    ALREADY_REGISTERED = 302
    ALREADY_UNREGISTERED = 303
    REGISTRATION_DENIED = 304
    BAD_CLIENT_ID = 305
    BAD_BIND_ID = 306
    BAD_TUNNEL_TYPE = 307
    LOCAL_ADDR_UNAVAILABLE = 308
    LOCAL_ADDRPORT_UNAVAILABLE = 309
    LOCAL_ADDR_INUSE = 310
    LOCAL_ADDRPORT_INUSE = 311
    LOCAL_ADDR_UNALLOWED = 312
    LOCAL_ADDRPORT_UNALLOWED = 313
    REMOTE_ADDR_UNALLOWED = 314
    REMOTE_ADDRPORT_UNALLOWED = 315
    IPSEC_UNALLOWED = 401
    IPSEC_SPI_UNAVAILABLE = 402
    IPSEC_SPI_INUSE = 403


class TunnelType(IntEnum):
    IP_IP = 1
    GRE = 2
    L2TP = 3


class RsipMethod(IntEnum):
    RSA_IP = 1
    RSAP_IP = 2
    RSIPSEC = 3  # RFC 3104 section 6


class AddressType(IntEnum):
    IPV4 = 1
    IPV4_NETMASK = 2
    IPV6 = 3
    FQDN = 4


class FlowPolicyKind(IntEnum):
    """Local flow policy is MACRO or MICRO; remote may also be NO_POLICY."""

    MACRO = 1
    MICRO = 2
    NO_POLICY = 3


class QueryIndicator(IntEnum):
    """The Indicator values of a QUERY_REQUEST's tuples (section 9.14)."""

    ADDRESS = 1
    NETWORK = 2


class QueryAnswer(IntEnum):
    """The Indicator values of a QUERY_RESPONSE's tuples (section 9.15)."""

    LOCAL_ADDRESS = 1
    LOCAL_NETWORK = 2
    REMOTE_ADDRESS = 3
    REMOTE_NETWORK = 4


class RsipWireError(PacketError):
    """Input that is not a valid RSIP message. `error` is the ERROR_RESPONSE code a gateway
    answers with; `message_type`, `counter` and `client_id` are what could still be read from
    the input (None otherwise). `reason` is the code's name as a slug ("bad-param")."""

    def __init__(self, error: ErrorCode, detail: str = "", *, message_type: int | None = None,
                 counter: int | None = None, client_id: int | None = None) -> None:
        super().__init__(error.name.lower().replace("_", "-"), detail)
        self.error = error
        self.message_type = message_type
        self.counter = counter
        self.client_id = client_id


def _bad_param(detail: str) -> RsipWireError:
    return RsipWireError(ErrorCode.BAD_PARAM, detail)


def _check_uint(value: object, bits: int, what: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 1 << bits:
        raise _bad_param(f"{what} {value!r} is not a {bits}-bit unsigned number")


_E = TypeVar("_E", bound=IntEnum)


def _known(kind: type[_E], value: int) -> int:
    """`value` as a member of `kind` when it is one (for readable reprs), else the number."""
    try:
        return kind(value)
    except ValueError:
        return value


def _fixed(value: bytes, size: int, what: str) -> None:
    if len(value) != size:
        raise _bad_param(f"{what} takes {size} bytes, not {len(value)}")


_PACKED = {8: _U8, 16: _U16, 32: _U32}
_N = TypeVar("_N", bound="_Number")


class _Spec(NamedTuple):
    field: str                          # the dataclass field holding the number
    bits: int
    what: str                           # "lease time": in errors about its value
    a_what: str                         # "a lease time": in errors about its length
    known: type[IntEnum] | None = None  # its known values, for readable reprs


class _Number:
    """A parameter whose value is one unsigned number, described by its NUMBER spec:
    checking, encoding and decoding are here once."""

    __slots__ = ()
    NUMBER: ClassVar[_Spec]

    def __post_init__(self) -> None:
        spec = self.NUMBER
        value = getattr(self, spec.field)
        _check_uint(value, spec.bits, spec.what)
        if spec.known is not None:
            object.__setattr__(self, spec.field, _known(spec.known, value))

    def _encode_value(self) -> bytes:
        return _PACKED[self.NUMBER.bits].pack(getattr(self, self.NUMBER.field))

    @classmethod
    def _decode_value(cls: type[_N], value: bytes) -> _N:
        spec = cls.NUMBER
        _fixed(value, spec.bits // 8, spec.a_what)
        return cls(_PACKED[spec.bits].unpack(value)[0])  # type: ignore[call-arg]


# --- parameters ----------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Address:
    """An address (section 8.1). `kind` and `value` both None is "don't care"; IPV4 and
    IPV4_NETMASK carry an IPv4Address, IPV6 an IPv6Address, FQDN an ASCII name."""

    kind: AddressType | None
    value: IPAddress | str | None
    PARAM: ClassVar[ParamType] = ParamType.ADDRESS

    def __post_init__(self) -> None:
        if self.kind is None:
            if self.value is not None:
                raise _bad_param(f"address {self.value!r} has no address type")
            return
        try:
            kind = AddressType(self.kind)
        except ValueError:
            raise _bad_param(f"address type {self.kind!r} is not 1-4") from None
        object.__setattr__(self, "kind", kind)
        value = self.value
        if kind in (AddressType.IPV4, AddressType.IPV4_NETMASK):
            ok = isinstance(value, ipaddress.IPv4Address)
        elif kind is AddressType.IPV6:
            ok = isinstance(value, ipaddress.IPv6Address)
        else:
            ok = (isinstance(value, str) and 0 < len(value) < MAX_MESSAGE
                  and value.isascii())
        if not ok:
            raise _bad_param(f"{value!r} is not a value for an address of type {kind.name}")

    @classmethod
    def dont_care(cls) -> Address:
        return cls(None, None)

    @classmethod
    def ipv4(cls, ip: ipaddress.IPv4Address | str) -> Address:
        return cls(AddressType.IPV4, ipaddress.IPv4Address(ip))

    @classmethod
    def ipv6(cls, ip: ipaddress.IPv6Address | str) -> Address:
        return cls(AddressType.IPV6, ipaddress.IPv6Address(ip))

    @classmethod
    def netmask(cls, mask: ipaddress.IPv4Address | str) -> Address:
        return cls(AddressType.IPV4_NETMASK, ipaddress.IPv4Address(mask))

    @classmethod
    def fqdn(cls, name: str) -> Address:
        return cls(AddressType.FQDN, name)

    @classmethod
    def of(cls, address: IPAddress | str) -> Address:
        """An IPv4 or IPv6 address, or text that is one; other text is taken as an FQDN."""
        if isinstance(address, str):
            try:
                ip = ipaddress.ip_address(address)
            except ValueError:
                return cls.fqdn(address)
        else:
            ip = address
        if isinstance(ip, ipaddress.IPv4Address):
            return cls(AddressType.IPV4, ip)
        return cls(AddressType.IPV6, ip)

    @property
    def is_dont_care(self) -> bool:
        """No address, or an IPv4 or IPv6 address of all zeros (section 9.8.3)."""
        if self.kind is None:
            return True
        return (self.kind in (AddressType.IPV4, AddressType.IPV6)
                and isinstance(self.value, ipaddress.IPv4Address | ipaddress.IPv6Address)
                and int(self.value) == 0)

    def _encode_value(self) -> bytes:
        if self.kind is None:
            return _U8.pack(AddressType.IPV4)
        if isinstance(self.value, str):
            return _U8.pack(self.kind) + self.value.encode("ascii")
        assert self.value is not None
        return _U8.pack(self.kind) + self.value.packed

    @classmethod
    def _decode_value(cls, value: bytes) -> Address:
        if not value:
            raise _bad_param("an address parameter needs its address type byte")
        kind = value[0]
        if kind > AddressType.FQDN:
            raise _bad_param(f"address type {kind} is not 0-4")
        if len(value) == 1:
            return cls.dont_care()
        if kind == 0:
            raise _bad_param("address type 0 (reserved) carries an address")
        body = value[1:]
        if kind in (AddressType.IPV4, AddressType.IPV4_NETMASK):
            _fixed(body, 4, "an IPv4 address")
            v4 = ipaddress.IPv4Address(body)
            if kind == AddressType.IPV4 and int(v4) == 0:
                return cls.dont_care()
            return cls(AddressType(kind), v4)
        if kind == AddressType.IPV6:
            _fixed(body, 16, "an IPv6 address")
            v6 = ipaddress.IPv6Address(body)
            return cls.dont_care() if int(v6) == 0 else cls(AddressType.IPV6, v6)
        try:
            name = body.decode("ascii")
        except UnicodeDecodeError:
            raise _bad_param("an FQDN is not ASCII") from None
        return cls(AddressType.FQDN, name)


def _numbered(number: int, values: tuple[int, ...], what: str) -> tuple[int, ...]:
    """The values a Ports or SPI parameter names: one field and number > 1 is a block."""
    if not values:
        raise _bad_param(f"don't care {what}s have no numbers")
    if len(values) == 1 and number > 1:
        return tuple(range(values[0], values[0] + number))
    return values


def _check_numbered(number: int, values: tuple[int, ...], bits: int, what: str) -> None:
    for value in values:
        _check_uint(value, bits, what)
    if len(values) not in (0, 1, number):
        raise _bad_param(f"{len(values)} {what} fields for a number of {number} (1 or "
                         f"{number} fields, or none for don't care)")
    if len(values) == 1 and values[0] + number - 1 >= 1 << bits:
        raise _bad_param(f"a block of {number} {what}s from {values[0]} runs past "
                         f"{(1 << bits) - 1}")


def _contiguous(values: tuple[int, ...], what: str) -> tuple[int, int]:
    if values != tuple(range(values[0], values[0] + len(values))):
        raise _bad_param(f"the {what}s {values} are not one contiguous block")
    return values[0], values[-1]


@dataclass(frozen=True, slots=True)
class Ports:
    """Ports (section 8.2). `ports` empty: "don't care" (`number` of them wanted), or with
    number 0 RFC 3104's "don't need"; one port and number > 1: the block ports[0] ..
    ports[0]+number-1; else `number` ports listed."""

    number: int
    ports: tuple[int, ...] = ()
    PARAM: ClassVar[ParamType] = ParamType.PORTS

    def __post_init__(self) -> None:
        object.__setattr__(self, "ports", tuple(self.ports))
        _check_uint(self.number, 8, "port count")
        if self.number == 0 and self.ports:
            raise _bad_param("a ports parameter with port fields needs a number of at least 1")
        _check_numbered(self.number, self.ports, 16, "port")

    @classmethod
    def single(cls, port: int) -> Ports:
        return cls(1, (port,))

    @classmethod
    def block(cls, first: int, count: int) -> Ports:
        return cls(count, (first,))

    @classmethod
    def listed(cls, ports: Iterable[int]) -> Ports:
        values = tuple(ports)
        return cls(len(values), values)

    @classmethod
    def any(cls, count: int = 1) -> Ports:
        """"Don't care": `count` ports, wherever the gateway likes."""
        if count < 1:
            raise _bad_param(f"ask for at least one port, not {count}")
        return cls(count, ())

    @classmethod
    def not_needed(cls) -> Ports:
        """RFC 3104's "don't need" (length 0): no ports at all."""
        return cls(0, ())

    @property
    def is_dont_care(self) -> bool:
        return self.number > 0 and not any(self.ports)

    @property
    def is_not_needed(self) -> bool:
        return self.number == 0

    def expand(self) -> tuple[int, ...]:
        """Every port named, in order; RsipWireError(BAD_PARAM) for don't care."""
        if not any(self.ports):
            raise _bad_param("don't care ports have no numbers")
        return _numbered(self.number, self.ports, "port")

    @property
    def first(self) -> int:
        """The first port of a contiguous block (or of a single port)."""
        return _contiguous(self.expand(), "port")[0]

    @property
    def last(self) -> int:
        return _contiguous(self.expand(), "port")[1]

    def _encode_value(self) -> bytes:
        if self.number == 0:
            return b""
        return _U8.pack(self.number) + b"".join(_U16.pack(p) for p in self.ports)

    @classmethod
    def _decode_value(cls, value: bytes) -> Ports:
        if not value:
            return cls.not_needed()
        number, body = value[0], value[1:]
        if len(body) % 2:
            raise _bad_param(f"port fields take 2 bytes each, not {len(body)} in all")
        ports = tuple(p for (p,) in _U16.iter_unpack(body))
        if not ports:
            return cls(max(number, 1), ())
        if number == 0:
            raise _bad_param("a ports parameter with port fields needs a number of at least 1")
        if len(ports) not in (1, number):
            raise _bad_param(f"{len(ports)} port fields for a number of {number}")
        if not any(ports):
            return cls(number, ())
        return cls(number, ports)


@dataclass(frozen=True, slots=True)
class Spi:
    """SPIs (RFC 3104 section 6.2), laid out like Ports with a 2-byte number and 4-byte SPIs;
    `spis` empty is "don't care" (`number` of them wanted)."""

    number: int
    spis: tuple[int, ...] = ()
    PARAM: ClassVar[ParamType] = ParamType.SPI

    def __post_init__(self) -> None:
        object.__setattr__(self, "spis", tuple(self.spis))
        _check_uint(self.number, 16, "SPI count")
        if self.number == 0:
            raise _bad_param("an SPI parameter names at least one SPI")
        _check_numbered(self.number, self.spis, 32, "SPI")

    @classmethod
    def single(cls, spi: int) -> Spi:
        return cls(1, (spi,))

    @classmethod
    def block(cls, first: int, count: int) -> Spi:
        return cls(count, (first,))

    @classmethod
    def listed(cls, spis: Iterable[int]) -> Spi:
        values = tuple(spis)
        return cls(len(values), values)

    @classmethod
    def any(cls, count: int = 1) -> Spi:
        return cls(count, ())

    @property
    def is_dont_care(self) -> bool:
        return not self.spis

    def expand(self) -> tuple[int, ...]:
        return _numbered(self.number, self.spis, "SPI")

    def _encode_value(self) -> bytes:
        return _U16.pack(self.number) + b"".join(_U32.pack(s) for s in self.spis)

    @classmethod
    def _decode_value(cls, value: bytes) -> Spi:
        if len(value) < 2 or (len(value) - 2) % 4:
            raise _bad_param(f"an SPI parameter is 2 + 4n bytes long, not {len(value)}")
        (number,) = _U16.unpack_from(value)
        spis = tuple(s for (s,) in _U32.iter_unpack(value[2:]))
        if number == 0:
            raise _bad_param("an SPI parameter names at least one SPI")
        if len(spis) not in (0, 1, number):
            raise _bad_param(f"{len(spis)} SPI fields for a number of {number}")
        return cls(number, spis)


@dataclass(frozen=True, slots=True)
class LeaseTime(_Number):
    seconds: int
    PARAM: ClassVar[ParamType] = ParamType.LEASE_TIME
    NUMBER: ClassVar[_Spec] = _Spec("seconds", 32, "lease time", "a lease time")


@dataclass(frozen=True, slots=True)
class ClientId(_Number):
    value: int
    PARAM: ClassVar[ParamType] = ParamType.CLIENT_ID
    NUMBER: ClassVar[_Spec] = _Spec("value", 32, "client ID", "a client ID")


@dataclass(frozen=True, slots=True)
class BindId(_Number):
    value: int
    PARAM: ClassVar[ParamType] = ParamType.BIND_ID
    NUMBER: ClassVar[_Spec] = _Spec("value", 32, "bind ID", "a bind ID")


@dataclass(frozen=True, slots=True)
class Tunnel(_Number):
    """A tunnel type (section 8.6): a TunnelType when known; others are kept, for the gateway
    to answer BAD_TUNNEL_TYPE."""

    kind: int
    PARAM: ClassVar[ParamType] = ParamType.TUNNEL_TYPE
    NUMBER: ClassVar[_Spec] = _Spec("kind", 8, "tunnel type", "a tunnel type", TunnelType)


@dataclass(frozen=True, slots=True)
class Method(_Number):
    """An RSIP method (section 8.7): an RsipMethod when known."""

    kind: int
    PARAM: ClassVar[ParamType] = ParamType.RSIP_METHOD
    NUMBER: ClassVar[_Spec] = _Spec("kind", 8, "RSIP method", "an RSIP method", RsipMethod)


@dataclass(frozen=True, slots=True)
class Error(_Number):
    """An error (section 8.8): an ErrorCode when known."""

    code: int
    PARAM: ClassVar[ParamType] = ParamType.ERROR
    NUMBER: ClassVar[_Spec] = _Spec("code", 16, "error", "an error", ErrorCode)


@dataclass(frozen=True, slots=True)
class FlowPolicy:
    """Local (MACRO or MICRO) and remote (MACRO, MICRO or NO_POLICY) flow policy (8.9)."""

    local: int
    remote: int
    PARAM: ClassVar[ParamType] = ParamType.FLOW_POLICY

    def __post_init__(self) -> None:
        if self.local not in (FlowPolicyKind.MACRO, FlowPolicyKind.MICRO):
            raise _bad_param(f"local flow policy {self.local!r} is not 1 (macro) or 2 (micro)")
        if self.remote not in (FlowPolicyKind.MACRO, FlowPolicyKind.MICRO,
                               FlowPolicyKind.NO_POLICY):
            raise _bad_param(f"remote flow policy {self.remote!r} is not 1-3")
        object.__setattr__(self, "local", FlowPolicyKind(self.local))
        object.__setattr__(self, "remote", FlowPolicyKind(self.remote))

    def _encode_value(self) -> bytes:
        return _TWO_U8.pack(self.local, self.remote)

    @classmethod
    def _decode_value(cls, value: bytes) -> FlowPolicy:
        _fixed(value, 2, "a flow policy")
        return cls(value[0], value[1])


@dataclass(frozen=True, slots=True)
class Indicator:
    """A general-purpose value whose meaning the message defines (8.10; QueryIndicator and
    QueryAnswer for the QUERY messages). Written with 2 bytes, read with 1 or 2."""

    value: int
    PARAM: ClassVar[ParamType] = ParamType.INDICATOR

    def __post_init__(self) -> None:
        _check_uint(self.value, 16, "indicator")

    def _encode_value(self) -> bytes:
        return _U16.pack(self.value)

    @classmethod
    def _decode_value(cls, value: bytes) -> Indicator:
        if len(value) == 1:
            return cls(value[0])
        _fixed(value, 2, "an indicator")
        return cls(_U16.unpack(value)[0])


@dataclass(frozen=True, slots=True)
class MessageCounter(_Number):
    value: int
    PARAM: ClassVar[ParamType] = ParamType.MESSAGE_COUNTER
    NUMBER: ClassVar[_Spec] = _Spec("value", 32, "message counter", "a message counter")


@dataclass(frozen=True, slots=True)
class VendorSpecific:
    """A vendor's own parameter (8.12). Those of unknown vendors are kept as they are; ipshift's
    (VENDOR_IPSHIFT) are checked."""

    vendor: int
    subtype: int
    value: bytes = b""
    PARAM: ClassVar[ParamType] = ParamType.VENDOR_SPECIFIC

    def __post_init__(self) -> None:
        object.__setattr__(self, "value", bytes(self.value))
        _check_uint(self.vendor, 16, "vendor ID")
        _check_uint(self.subtype, 16, "vendor subtype")
        if len(self.value) > MAX_MESSAGE - HEADER_SIZE - PARAM_HEADER_SIZE - 4:
            raise _bad_param(f"a vendor-specific value of {len(self.value)} bytes")
        if (self.vendor, self.subtype) == (VENDOR_IPSHIFT, SUBTYPE_UDP_TUNNEL) and (
                len(self.value) != 2 or self.value == b"\0\0"):
            raise _bad_param("ipshift's UDP tunnel parameter carries a 2-byte port, 1-65535")

    def _encode_value(self) -> bytes:
        return _TWO_U16.pack(self.vendor, self.subtype) + self.value

    @classmethod
    def _decode_value(cls, value: bytes) -> VendorSpecific:
        if len(value) < 4:
            raise _bad_param(f"a vendor-specific parameter is at least 4 bytes, not {len(value)}")
        vendor, subtype = _TWO_U16.unpack_from(value)
        return cls(vendor, subtype, value[4:])


Param: TypeAlias = (Address | Ports | LeaseTime | ClientId | BindId | Tunnel | Method | Error
                    | FlowPolicy | Indicator | MessageCounter | VendorSpecific | Spi)

_PARAM_CLASSES: dict[int, type[Param]] = {
    cls.PARAM: cls for cls in (Address, Ports, LeaseTime, ClientId, BindId, Tunnel, Method,
                               Error, FlowPolicy, Indicator, MessageCounter, VendorSpecific,
                               Spi)
}
_PARAM_TYPES = tuple(_PARAM_CLASSES.values())

P = TypeVar("P")


def _param_name(cls: type) -> str:
    kind: ParamType | None = getattr(cls, "PARAM", None)
    return kind.name if kind is not None else cls.__name__


# --- messages ------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Message:
    """One RSIP message: its type and its parameters in wire order."""

    type: MessageType
    params: tuple[Param, ...] = ()
    version: int = VERSION

    def __post_init__(self) -> None:
        object.__setattr__(self, "params", tuple(self.params))
        try:
            object.__setattr__(self, "type", MessageType(self.type))
        except ValueError:
            raise RsipWireError(ErrorCode.ILLEGAL_MESSAGE,
                                f"message type {self.type!r} is not an RSIP message") from None

    def first(self, kind: builtins.type[P]) -> P | None:
        """The first parameter of class `kind` (e.g. `msg.first(ClientId)`), or None."""
        for param in self.params:
            if isinstance(param, kind):
                return param
        return None

    def all(self, kind: builtins.type[P]) -> tuple[P, ...]:
        return tuple(p for p in self.params if isinstance(p, kind))

    def require(self, kind: builtins.type[P]) -> P:
        """The first parameter of class `kind`; RsipWireError(MISSING_PARAM) without one."""
        found = self.first(kind)
        if found is None:
            raise RsipWireError(ErrorCode.MISSING_PARAM,
                                f"{self.type.name} has no {_param_name(kind)} parameter",
                                message_type=int(self.type), counter=self.counter,
                                client_id=self.client_id)
        return found

    @property
    def counter(self) -> int | None:
        found = self.first(MessageCounter)
        return found.value if found is not None else None

    @property
    def client_id(self) -> int | None:
        found = self.first(ClientId)
        return found.value if found is not None else None

    @property
    def bind_id(self) -> int | None:
        found = self.first(BindId)
        return found.value if found is not None else None

    def with_counter(self, counter: int) -> Message:
        """This message with its message counter set to `counter` (added at the end if it has
        none), as a UDP answer echoes its request's."""
        params: list[Param] = [p for p in self.params if not isinstance(p, MessageCounter)]
        at = next((i for i, p in enumerate(self.params) if isinstance(p, MessageCounter)),
                  len(params))
        params.insert(at, MessageCounter(counter))
        return Message(self.type, tuple(params), self.version)


def encode(message: Message, *, check: bool = True) -> bytes:
    """The message's bytes. Checks the section 9 grammar (`validate`) unless `check` is
    False; raises RsipWireError."""
    if check:
        validate(message)
    _check_uint(message.version, 8, "version")
    out = bytearray(HEADER_SIZE)
    for param in message.params:
        if not isinstance(param, _PARAM_TYPES):
            raise _bad_param(f"{param!r} is not an RSIP parameter")
        value = param._encode_value()
        out += _PARAM_HEADER.pack(param.PARAM, len(value))
        out += value
    if len(out) > MAX_MESSAGE:
        raise RsipWireError(ErrorCode.BAD_MESSAGE, f"a message of {len(out)} bytes does not "
                            f"fit the overall length field (at most {MAX_MESSAGE})",
                            message_type=int(message.type))
    _HEADER.pack_into(out, 0, message.version, message.type, len(out))
    return bytes(out)


def message_length(header: BytesLike) -> int:
    """The overall length announced by a message's first 4 bytes (TCP framing). Raises
    RsipWireError for a version other than 1 or a length below 4."""
    message_type = header[1] if len(header) >= 2 else None
    if len(header) < HEADER_SIZE:
        raise RsipWireError(ErrorCode.BAD_MESSAGE, f"a message header is {HEADER_SIZE} bytes, "
                            f"not {len(header)}", message_type=message_type)
    version, _type, length = _HEADER.unpack_from(header)
    if version != VERSION:
        raise RsipWireError(ErrorCode.UNSUPPORTED_RSIP_VERSION,
                            f"RSIP version {version}; only {VERSION} is spoken",
                            message_type=message_type)
    if length < HEADER_SIZE:
        raise RsipWireError(ErrorCode.BAD_MESSAGE,
                            f"overall length {length} is shorter than the header",
                            message_type=message_type)
    return int(length)


def decode(data: BytesLike) -> Message:
    """Exactly one whole message (a datagram, or a frame cut by StreamReader), checked against
    the section 9 grammar. Raises RsipWireError."""
    data = bytes(data)
    try:
        length = message_length(data[:HEADER_SIZE])
        if length != len(data):
            raise RsipWireError(ErrorCode.BAD_MESSAGE,
                                f"overall length {length} for {len(data)} bytes")
        try:
            kind = MessageType(data[1])
        except ValueError:
            raise RsipWireError(ErrorCode.ILLEGAL_MESSAGE,
                                f"message type {data[1]} is not an RSIP message") from None
        message = Message(kind, _decode_params(data))
        validate(message)
        return message
    except RsipWireError as exc:
        _add_context(exc, data)
        raise


def _decode_params(data: bytes) -> tuple[Param, ...]:
    params: list[Param] = []
    offset = HEADER_SIZE
    while offset < len(data):
        if len(data) - offset < PARAM_HEADER_SIZE:
            raise RsipWireError(ErrorCode.BAD_MESSAGE,
                                f"a parameter header cut short at byte {offset}")
        kind, length = _PARAM_HEADER.unpack_from(data, offset)
        start = offset + PARAM_HEADER_SIZE
        end = start + length
        if end > len(data):
            raise RsipWireError(ErrorCode.BAD_MESSAGE, f"parameter {kind} at byte {offset} "
                                f"claims {length} bytes; {len(data) - start} are left")
        cls = _PARAM_CLASSES.get(kind)
        if cls is None:
            raise RsipWireError(ErrorCode.ILLEGAL_PARAM, f"parameter type {kind} is unknown")
        params.append(cls._decode_value(data[start:end]))
        offset = end
    return tuple(params)


def _add_context(exc: RsipWireError, data: bytes) -> None:
    """Fill in what an error answer needs from whatever of `data` can still be read."""
    if exc.message_type is None and len(data) >= 2:
        exc.message_type = data[1]
    offset = HEADER_SIZE
    while offset + PARAM_HEADER_SIZE <= len(data) and (exc.counter is None
                                                       or exc.client_id is None):
        kind, length = _PARAM_HEADER.unpack_from(data, offset)
        start = offset + PARAM_HEADER_SIZE
        if start + length > len(data):
            break
        if length == 4:
            (value,) = _U32.unpack_from(data, start)
            if kind == ParamType.MESSAGE_COUNTER and exc.counter is None:
                exc.counter = value
            elif kind == ParamType.CLIENT_ID and exc.client_id is None:
                exc.client_id = value
        offset = start + length


# --- the grammar of section 9 --------------------------------------------------------------------
@dataclass(frozen=True)
class _Grammar:
    required: tuple[type[Param], ...]
    optional: dict[type[Param], int | None]  # how many at most; None: any number
    query: tuple[int, ...] = ()              # QUERY messages: the indicator values allowed


_ONE_COUNTER: dict[type[Param], int | None] = {MessageCounter: 1}
_REQUEST_EXTRAS: dict[type[Param], int | None] = {MessageCounter: 1, LeaseTime: 1, Tunnel: 1}
_RESPONSE_EXTRAS: dict[type[Param], int | None] = {Address: 1, MessageCounter: 1}
_ASSIGN_REQUEST = (ClientId, Address, Ports, Address, Ports)
_ASSIGN_RESPONSE = (ClientId, BindId, Address, Ports, Address, Ports)

_GRAMMAR: dict[MessageType, _Grammar] = {
    MessageType.ERROR_RESPONSE: _Grammar((Error,), {MessageCounter: 1, ClientId: 1, BindId: 1}),
    MessageType.REGISTER_REQUEST: _Grammar((), _ONE_COUNTER),
    MessageType.REGISTER_RESPONSE: _Grammar((ClientId, LeaseTime, FlowPolicy),
                                            {MessageCounter: 1, Method: None, Tunnel: None}),
    MessageType.DE_REGISTER_REQUEST: _Grammar((ClientId,), _ONE_COUNTER),
    MessageType.DE_REGISTER_RESPONSE: _Grammar((ClientId,), _ONE_COUNTER),
    MessageType.ASSIGN_REQUEST_RSA_IP: _Grammar((ClientId, Address, Address, Ports),
                                                _REQUEST_EXTRAS),
    MessageType.ASSIGN_RESPONSE_RSA_IP: _Grammar(
        (ClientId, BindId, Address, Address, Ports, LeaseTime, Tunnel), _RESPONSE_EXTRAS),
    MessageType.ASSIGN_REQUEST_RSAP_IP: _Grammar(_ASSIGN_REQUEST, _REQUEST_EXTRAS),
    MessageType.ASSIGN_RESPONSE_RSAP_IP: _Grammar((*_ASSIGN_RESPONSE, LeaseTime, Tunnel),
                                                  _RESPONSE_EXTRAS),
    MessageType.EXTEND_REQUEST: _Grammar((ClientId, BindId), {LeaseTime: 1, MessageCounter: 1}),
    MessageType.EXTEND_RESPONSE: _Grammar((ClientId, BindId, LeaseTime), _ONE_COUNTER),
    MessageType.FREE_REQUEST: _Grammar((ClientId, BindId), _ONE_COUNTER),
    MessageType.FREE_RESPONSE: _Grammar((ClientId, BindId), _ONE_COUNTER),
    MessageType.QUERY_REQUEST: _Grammar((ClientId,), {MessageCounter: 1, Indicator: None,
                                                      Address: None}, tuple(QueryIndicator)),
    MessageType.QUERY_RESPONSE: _Grammar((ClientId,), {MessageCounter: 1, Indicator: None,
                                                       Address: None}, tuple(QueryAnswer)),
    MessageType.LISTEN_REQUEST: _Grammar(_ASSIGN_REQUEST, {MessageCounter: 1, LeaseTime: 1,
                                                           Tunnel: None}),
    MessageType.LISTEN_RESPONSE: _Grammar((*_ASSIGN_RESPONSE, Tunnel, LeaseTime),
                                          _RESPONSE_EXTRAS),
    MessageType.ASSIGN_REQUEST_RSIPSEC: _Grammar((*_ASSIGN_REQUEST, Spi), _REQUEST_EXTRAS),
    MessageType.ASSIGN_RESPONSE_RSIPSEC: _Grammar((*_ASSIGN_RESPONSE, Spi, LeaseTime, Tunnel),
                                                  _RESPONSE_EXTRAS),
}

_RSIPSEC = frozenset({MessageType.ASSIGN_REQUEST_RSIPSEC, MessageType.ASSIGN_RESPONSE_RSIPSEC})
# Requests whose first address is the local one a host asks for: never an FQDN (section 8.1).
_LOCAL_REQUESTS = frozenset({MessageType.ASSIGN_REQUEST_RSA_IP,
                             MessageType.ASSIGN_REQUEST_RSAP_IP, MessageType.LISTEN_REQUEST,
                             MessageType.ASSIGN_REQUEST_RSIPSEC})
_NETWORK_INDICATORS = frozenset({QueryIndicator.NETWORK, QueryAnswer.REMOTE_NETWORK})


def validate(message: Message) -> None:
    """Check `message` against RFC 3103 section 9 (and RFC 3104 section 6.2): its version, the
    required parameters present and in order, no duplicates beyond what the message allows, no
    parameter it does not take, QUERY tuples whole. Raises RsipWireError."""
    context = {"message_type": int(message.type), "counter": message.counter,
               "client_id": message.client_id}

    def refuse(code: ErrorCode, detail: str) -> RsipWireError:
        return RsipWireError(code, f"{message.type.name}: {detail}", **context)

    if message.version != VERSION:
        raise refuse(ErrorCode.UNSUPPORTED_RSIP_VERSION, f"version {message.version}")
    for param in message.params:
        if not isinstance(param, _PARAM_TYPES):
            raise refuse(ErrorCode.BAD_PARAM, f"{param!r} is not an RSIP parameter")
    grammar = _GRAMMAR[message.type]
    params: list[Param] = [p for p in message.params if not isinstance(p, VendorSpecific)]
    counts: Counter[type[Param]] = Counter(type(p) for p in params)
    needed = Counter(grammar.required)
    for cls in grammar.required:
        if counts[cls] < needed[cls]:
            raise refuse(ErrorCode.MISSING_PARAM, f"the required {_param_name(cls)} is missing")
    for cls, count in counts.items():
        if cls not in needed and cls not in grammar.optional:
            raise refuse(ErrorCode.EXTRA_PARAM, f"{_param_name(cls)} does not belong here")
        most = grammar.optional.get(cls, 0)
        if most is not None and count > needed[cls] + most:
            raise refuse(ErrorCode.DUPLICATE_PARAM,
                         f"{count} {_param_name(cls)} parameters; at most {needed[cls] + most}")
    seen: Counter[type[Param]] = Counter()
    order = []
    for param in params:
        cls = type(param)
        if seen[cls] < needed[cls]:
            order.append(cls)
            seen[cls] += 1
    if tuple(order) != grammar.required:
        raise refuse(ErrorCode.BAD_MESSAGE, "the required parameters are out of order ("
                     + ", ".join(_param_name(c) for c in grammar.required) + ")")
    for ports in message.all(Ports):
        if ports.is_not_needed and message.type not in _RSIPSEC:
            raise refuse(ErrorCode.BAD_PARAM, "ports of length 0 (\"don't need\") belong to "
                         "the RSIPSEC messages only")
    if message.type in _LOCAL_REQUESTS:
        local = message.all(Address)[0]
        if local.kind is AddressType.FQDN:
            raise refuse(ErrorCode.BAD_PARAM, "the local address is an FQDN")
    if grammar.query:
        _validate_query_tuples(params, grammar.query, refuse)


def _validate_query_tuples(params: list[Param], allowed: tuple[int, ...],
                           refuse: Callable[[ErrorCode, str], RsipWireError]) -> None:
    items = [p for p in params if isinstance(p, Indicator | Address)]
    at = 0
    while at < len(items):
        indicator = items[at]
        if not isinstance(indicator, Indicator):
            raise refuse(ErrorCode.EXTRA_PARAM, "an address outside a tuple (no indicator)")
        if indicator.value not in allowed:
            raise refuse(ErrorCode.BAD_PARAM, f"indicator {indicator.value} is not one of "
                         f"{', '.join(map(str, allowed))}")
        size = 2 if indicator.value in _NETWORK_INDICATORS else 1
        addresses = items[at + 1:at + 1 + size]
        if len(addresses) < size or not all(isinstance(a, Address) for a in addresses):
            raise refuse(ErrorCode.MISSING_PARAM,
                         f"the tuple of indicator {indicator.value} needs {size} address(es)")
        if size == 2:
            network, mask = addresses
            assert isinstance(network, Address) and isinstance(mask, Address)
            if network.kind not in (AddressType.IPV4, AddressType.IPV6):
                raise refuse(ErrorCode.BAD_PARAM, "a network tuple's network is not an IP "
                             "address")
            if mask.kind is not AddressType.IPV4_NETMASK:
                raise refuse(ErrorCode.BAD_PARAM, "a network tuple's netmask is not of the "
                             "netmask type")
        at += 1 + size


# --- TCP framing ---------------------------------------------------------------------------------
class StreamReader:
    """Cuts a TCP byte stream into messages by their overall length.

    `feed` returns, in order, each whole message decoded, or the RsipWireError it raised (the
    stream goes on after those). A header that cannot be framed (version other than 1, length
    below 4 or above `max_message`) ends the stream: its error is returned last, `broken` is
    set, and later input is ignored. At most one incomplete message is held between feeds.
    """

    def __init__(self, max_message: int = MAX_MESSAGE) -> None:
        if not HEADER_SIZE <= max_message <= MAX_MESSAGE:
            raise ValueError(f"max_message {max_message} is outside {HEADER_SIZE}.."
                             f"{MAX_MESSAGE}")
        self.max_message = max_message
        self.broken = False
        self._buffer = bytearray()

    @property
    def pending(self) -> int:
        """Bytes held of a message not yet whole."""
        return len(self._buffer)

    def feed(self, data: BytesLike) -> list[Message | RsipWireError]:
        if self.broken:
            return []
        self._buffer += data
        out: list[Message | RsipWireError] = []
        start = 0
        while len(self._buffer) - start >= HEADER_SIZE:
            header = self._buffer[start:start + HEADER_SIZE]
            try:
                length = message_length(header)
                if length > self.max_message:
                    raise RsipWireError(ErrorCode.BAD_MESSAGE, f"a message of {length} bytes; "
                                        f"at most {self.max_message} are taken",
                                        message_type=header[1])
            except RsipWireError as exc:
                out.append(exc)
                self.broken = True
                self._buffer.clear()
                return out
            if len(self._buffer) - start < length:
                break
            frame = bytes(self._buffer[start:start + length])
            start += length
            try:
                out.append(decode(frame))
            except RsipWireError as exc:
                out.append(exc)
        del self._buffer[:start]
        return out


# --- error answers and ipshift's UDP tunnel parameter --------------------------------------------
def error_response(code: ErrorCode, *, client_id: int | None = None,
                   counter: int | None = None, bind_id: int | None = None) -> Message:
    """An ERROR_RESPONSE (section 9.1) with the client and bind IDs it concerns, and the
    request's message counter (0 for an asynchronous one)."""
    params: list[Param] = [Error(code)]
    if counter is not None:
        params.append(MessageCounter(counter))
    if client_id is not None:
        params.append(ClientId(client_id))
    if bind_id is not None:
        params.append(BindId(bind_id))
    return Message(MessageType.ERROR_RESPONSE, tuple(params))


def udp_tunnel_param(port: int) -> VendorSpecific:
    """ipshift's vendor-specific parameter asking for (or granting) its UDP tunnel framing, with
    the UDP port of the sender's tunnel endpoint."""
    _check_uint(port, 16, "UDP tunnel port")
    return VendorSpecific(VENDOR_IPSHIFT, SUBTYPE_UDP_TUNNEL, _U16.pack(port))


def udp_tunnel_port(message: Message) -> int | None:
    """The UDP tunnel port in `message`'s ipshift parameter, or None without one."""
    for param in message.all(VendorSpecific):
        if (param.vendor, param.subtype) == (VENDOR_IPSHIFT, SUBTYPE_UDP_TUNNEL):
            return int(_U16.unpack(param.value)[0])
    return None


# --- QUERY tuples --------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class QueryTuple:
    """One tuple of a QUERY message: an indicator and its address, or its network address and
    netmask (QueryIndicator.NETWORK, QueryAnswer.LOCAL_NETWORK and REMOTE_NETWORK)."""

    indicator: int
    addresses: tuple[Address, ...]

    @classmethod
    def network(cls, indicator: int, network: ipaddress.IPv4Network) -> QueryTuple:
        return cls(indicator, (Address.ipv4(network.network_address),
                               Address.netmask(network.netmask)))

    @classmethod
    def address(cls, indicator: int, address: IPAddress | str) -> QueryTuple:
        return cls(indicator, (Address.of(address),))

    def params(self) -> tuple[Param, ...]:
        return (Indicator(self.indicator), *self.addresses)


def query_tuples(message: Message) -> tuple[QueryTuple, ...]:
    """The tuples of a (valid) QUERY_REQUEST or QUERY_RESPONSE, in order."""
    items = [p for p in message.params if isinstance(p, Indicator | Address)]
    out: list[QueryTuple] = []
    at = 0
    while at < len(items):
        indicator = items[at]
        assert isinstance(indicator, Indicator)
        size = 2 if indicator.value in _NETWORK_INDICATORS else 1
        addresses = tuple(a for a in items[at + 1:at + 1 + size] if isinstance(a, Address))
        out.append(QueryTuple(indicator.value, addresses))
        at += 1 + size
    return tuple(out)


# --- builders ------------------------------------------------------------------------------------
def _with(params: list[Param], counter: int | None, extra: Iterable[Param]) -> tuple[Param, ...]:
    if counter is not None:
        params.append(MessageCounter(counter))
    params.extend(extra)
    return tuple(params)


def _maybe(params: list[Param], lease: int | None, tunnel: int | None) -> list[Param]:
    if lease is not None:
        params.append(LeaseTime(lease))
    if tunnel is not None:
        params.append(Tunnel(tunnel))
    return params


def register_request(*, counter: int | None = None, extra: Iterable[Param] = ()) -> Message:
    return Message(MessageType.REGISTER_REQUEST, _with([], counter, extra))


def register_response(client_id: int, lease: int, local_policy: int, remote_policy: int, *,
                      methods: Iterable[int] = (), tunnels: Iterable[int] = (),
                      counter: int | None = None, extra: Iterable[Param] = ()) -> Message:
    params: list[Param] = [ClientId(client_id), LeaseTime(lease),
                           FlowPolicy(local_policy, remote_policy)]
    params += [Method(m) for m in methods]
    params += [Tunnel(t) for t in tunnels]
    return Message(MessageType.REGISTER_RESPONSE, _with(params, counter, extra))


def deregister_request(client_id: int, *, counter: int | None = None,
                       extra: Iterable[Param] = ()) -> Message:
    return Message(MessageType.DE_REGISTER_REQUEST, _with([ClientId(client_id)], counter, extra))


def deregister_response(client_id: int, *, counter: int | None = None,
                        extra: Iterable[Param] = ()) -> Message:
    return Message(MessageType.DE_REGISTER_RESPONSE,
                   _with([ClientId(client_id)], counter, extra))


def assign_request_rsa_ip(client_id: int, local: Address, remote: Address, remote_ports: Ports,
                          *, lease: int | None = None, tunnel: int | None = None,
                          counter: int | None = None, extra: Iterable[Param] = ()) -> Message:
    params: list[Param] = [ClientId(client_id), local, remote, remote_ports]
    return Message(MessageType.ASSIGN_REQUEST_RSA_IP,
                   _with(_maybe(params, lease, tunnel), counter, extra))


def assign_response_rsa_ip(client_id: int, bind_id: int, local: Address, remote: Address,
                           remote_ports: Ports, lease: int, tunnel: int, *,
                           endpoint: Address | None = None, counter: int | None = None,
                           extra: Iterable[Param] = ()) -> Message:
    params: list[Param] = [ClientId(client_id), BindId(bind_id), local, remote, remote_ports,
                           LeaseTime(lease), Tunnel(tunnel)]
    if endpoint is not None:
        params.append(endpoint)
    return Message(MessageType.ASSIGN_RESPONSE_RSA_IP, _with(params, counter, extra))


def assign_request_rsap_ip(client_id: int, local: Address, local_ports: Ports, remote: Address,
                           remote_ports: Ports, *, lease: int | None = None,
                           tunnel: int | None = None, counter: int | None = None,
                           extra: Iterable[Param] = ()) -> Message:
    params: list[Param] = [ClientId(client_id), local, local_ports, remote, remote_ports]
    return Message(MessageType.ASSIGN_REQUEST_RSAP_IP,
                   _with(_maybe(params, lease, tunnel), counter, extra))


def assign_response_rsap_ip(client_id: int, bind_id: int, local: Address, local_ports: Ports,
                            remote: Address, remote_ports: Ports, lease: int, tunnel: int, *,
                            endpoint: Address | None = None, counter: int | None = None,
                            extra: Iterable[Param] = ()) -> Message:
    params: list[Param] = [ClientId(client_id), BindId(bind_id), local, local_ports, remote,
                           remote_ports, LeaseTime(lease), Tunnel(tunnel)]
    if endpoint is not None:
        params.append(endpoint)
    return Message(MessageType.ASSIGN_RESPONSE_RSAP_IP, _with(params, counter, extra))


def extend_request(client_id: int, bind_id: int, *, lease: int | None = None,
                   counter: int | None = None, extra: Iterable[Param] = ()) -> Message:
    params = _maybe([ClientId(client_id), BindId(bind_id)], lease, None)
    return Message(MessageType.EXTEND_REQUEST, _with(params, counter, extra))


def extend_response(client_id: int, bind_id: int, lease: int, *, counter: int | None = None,
                    extra: Iterable[Param] = ()) -> Message:
    params: list[Param] = [ClientId(client_id), BindId(bind_id), LeaseTime(lease)]
    return Message(MessageType.EXTEND_RESPONSE, _with(params, counter, extra))


def free_request(client_id: int, bind_id: int, *, counter: int | None = None,
                 extra: Iterable[Param] = ()) -> Message:
    return Message(MessageType.FREE_REQUEST,
                   _with([ClientId(client_id), BindId(bind_id)], counter, extra))


def free_response(client_id: int, bind_id: int, *, counter: int | None = None,
                  extra: Iterable[Param] = ()) -> Message:
    return Message(MessageType.FREE_RESPONSE,
                   _with([ClientId(client_id), BindId(bind_id)], counter, extra))


def query_request(client_id: int, tuples: Iterable[QueryTuple] = (), *,
                  counter: int | None = None, extra: Iterable[Param] = ()) -> Message:
    params: list[Param] = [ClientId(client_id)]
    if counter is not None:
        params.append(MessageCounter(counter))
    for item in tuples:
        params += item.params()
    return Message(MessageType.QUERY_REQUEST, _with(params, None, extra))


def query_response(client_id: int, tuples: Iterable[QueryTuple] = (), *,
                   counter: int | None = None, extra: Iterable[Param] = ()) -> Message:
    params: list[Param] = [ClientId(client_id)]
    if counter is not None:
        params.append(MessageCounter(counter))
    for item in tuples:
        params += item.params()
    return Message(MessageType.QUERY_RESPONSE, _with(params, None, extra))


def listen_request(client_id: int, local: Address, local_ports: Ports, remote: Address,
                   remote_ports: Ports, *, lease: int | None = None,
                   tunnels: Iterable[int] = (), counter: int | None = None,
                   extra: Iterable[Param] = ()) -> Message:
    params = _maybe([ClientId(client_id), local, local_ports, remote, remote_ports], lease, None)
    params += [Tunnel(t) for t in tunnels]
    return Message(MessageType.LISTEN_REQUEST, _with(params, counter, extra))


def listen_response(client_id: int, bind_id: int, local: Address, local_ports: Ports,
                    remote: Address, remote_ports: Ports, tunnel: int, lease: int, *,
                    endpoint: Address | None = None, counter: int | None = None,
                    extra: Iterable[Param] = ()) -> Message:
    params: list[Param] = [ClientId(client_id), BindId(bind_id), local, local_ports, remote,
                           remote_ports, Tunnel(tunnel), LeaseTime(lease)]
    if endpoint is not None:
        params.append(endpoint)
    return Message(MessageType.LISTEN_RESPONSE, _with(params, counter, extra))


def assign_request_rsipsec(client_id: int, local: Address, local_ports: Ports, remote: Address,
                           remote_ports: Ports, spi: Spi, *, lease: int | None = None,
                           tunnel: int | None = None, counter: int | None = None,
                           extra: Iterable[Param] = ()) -> Message:
    params: list[Param] = [ClientId(client_id), local, local_ports, remote, remote_ports, spi]
    return Message(MessageType.ASSIGN_REQUEST_RSIPSEC,
                   _with(_maybe(params, lease, tunnel), counter, extra))


def assign_response_rsipsec(client_id: int, bind_id: int, local: Address, local_ports: Ports,
                            remote: Address, remote_ports: Ports, spi: Spi, lease: int,
                            tunnel: int, *, endpoint: Address | None = None,
                            counter: int | None = None,
                            extra: Iterable[Param] = ()) -> Message:
    params: list[Param] = [ClientId(client_id), BindId(bind_id), local, local_ports, remote,
                           remote_ports, spi, LeaseTime(lease), Tunnel(tunnel)]
    if endpoint is not None:
        params.append(endpoint)
    return Message(MessageType.ASSIGN_RESPONSE_RSIPSEC, _with(params, counter, extra))
