"""ILNP names in the DNS (RFC 6742): publish a host's NID and L64 records by dynamic update
(RFC 2136) signed with TSIG (RFC 8945), and resolve them from one given server.

    key = read_tsig_key("/etc/ipshift/ilnp-update.key")
    mn = IlnpRecords("mn.ilnp.test.", nids=((10, 0x0000_0000_0000_0010),),
                     l64s=((10, l64_of("2001:db8:1::/64")),))
    publish("2001:db8::53", 53, "ilnp.test.", mn, key, timeout=5)   # or DnsUpdateError
    found = resolve("2001:db8::53", 53, "mn.ilnp.test.", timeout=5)  # or DnsLookupError

The messages are built and the answers interpreted by pure functions (`update_message`,
`update_answer`, `lookup(name).queries()` and `.parse(answers)`); `send_update`, `publish`
and `resolve` are the small I/O layer on top, each bounded by its timeout. Every failure is
one typed exception with a one-line message: RecordError (values), TsigKeyFileError (key
files), DnsUpdateError (`.rcode`, `.tsig_error`), DnsLookupError (`.reason`: NXDOMAIN, NODATA,
TIMEOUT, FAILED); all are IlnpDnsError.

Decisions:

- A NID and an L64 are 64-bit numbers (`int`). Their presentation is dnspython's, which is
  RFC 6742's: four groups of four hex digits separated by colons, `0014:4fff:ff20:ee64`
  (`format_id64`, `parse_id64`; the groups are always four digits, lower case). An L64 is the
  upper half of an IPv6 address: `l64_of("2001:db8:1::/64")` and `l64_prefix(l64)` convert.
- Preference: as in RFC 6742 (and MX records), a lower value is preferred; records of equal
  preference are equally good and a correspondent may use any of them. `nids` and `l64s` are
  RRsets: kept sorted by (preference, value), most preferred first, and a repeated pair counts
  once (the DNS keeps it once too). A host has at least one NID and one L64.
- One TTL for both RRsets, 30 s by default: locators change whenever a node moves, and a
  correspondent that cached a stale L64 for longer would send into a network the node left.
  A resolved record set carries the smallest TTL of what was read (CNAMEs included).
- Publishing replaces the host's whole NID and L64 RRsets in one atomic update (delete both
  RRsets, then add the new records); its other records (AAAA, L32, LP, ...) are untouched.
  Updates go over TCP by default (`transport="udp"` on request) and are always TSIG-signed;
  the answer's signature is checked too.
- Resolving asks only the given server (dnspython's resolver with no system configuration, no
  cache, no search list): one NID and one L64 query, both within the one timeout.

TSIG key file format: one line `ALGORITHM:NAME:SECRET`, the `-y` argument of kdig, knsupdate
and nsupdate, e.g. `hmac-sha256:ilnp-update:kW2E...=`; lines starting with `#` and blank lines
are ignored. `keymgr -t ilnp-update hmac-sha256` prints exactly that line behind `# ` as the
first line of its output (the rest is the same key as knot.conf YAML), so
`keymgr -t ilnp-update hmac-sha256 | sed -n 's/^# //p' > ilnp-update.key` makes one. ALGORITHM
is hmac-sha224, hmac-sha256, hmac-sha384 or hmac-sha512; SECRET is base64 of at least 16 bytes.
The file must be a regular file of its reader (or root) with no permissions for group or others
(the checks of `ipshift.keyfile`).
"""

from __future__ import annotations

import base64
import binascii
import enum
import errno
import ipaddress
import os
import secrets
import socket
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

import dns.exception
import dns.message
import dns.name
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.resolver
import dns.rrset
import dns.tsig
import dns.update

from ipshift.keyfile import MAX_KEY_FILE, MIN_KEY_LEN, KeyFileError, check_key_file_status

DNS_PORT = 53
DEFAULT_TTL = 30
DEFAULT_TIMEOUT = 5.0
MAX_TTL = 2**31 - 1  # RFC 2181 8
MAX_ID64 = 2**64 - 1
MAX_PREFERENCE = 2**16 - 1
ALGORITHMS = ("hmac-sha224", "hmac-sha256", "hmac-sha384", "hmac-sha512")
DEFAULT_ALGORITHM = "hmac-sha256"
SECRET_LEN = 32  # of a generated key: the output length of HMAC-SHA256 (RFC 8945 6)
TSIG_FUDGE = 300
UDP_RESEND = 1.0  # seconds before an unanswered update datagram is sent again

Transport = Literal["tcp", "udp"]

_NID = dns.rdatatype.RdataType.NID
_L64 = dns.rdatatype.RdataType.L64
_IN = dns.rdataclass.RdataClass.IN


# --- errors -----------------------------------------------------------------------------------
class IlnpDnsError(Exception):
    """Anything that went wrong publishing or resolving ILNP records; one line."""


class RecordError(IlnpDnsError, ValueError):
    """Record values that cannot be published: a bad name, preference, NID, L64 or TTL."""


class TsigKeyFileError(KeyFileError, IlnpDnsError):
    """A TSIG key file is unusable (missing, open to others, malformed)."""


class DnsUpdateError(IlnpDnsError):
    """An update was not applied. `rcode` is the answer's RCODE as text ("REFUSED", "NOTAUTH",
    "NOTZONE", ...) or None when no answer came; `tsig_error` the TSIG error the server
    reported ("BADSIG", "BADKEY", "BADTIME", ...), if any."""

    def __init__(self, message: str, rcode: str | None = None,
                 tsig_error: str | None = None) -> None:
        super().__init__(message)
        self.rcode = rcode
        self.tsig_error = tsig_error


class LookupFailure(enum.StrEnum):
    NXDOMAIN = "nxdomain"  # the name does not exist
    NODATA = "nodata"  # the name exists but has no NID or no L64 records
    TIMEOUT = "timeout"  # no answer within the timeout
    FAILED = "failed"  # the server answered with an error (REFUSED, SERVFAIL, ...) or is absent


class DnsLookupError(IlnpDnsError):
    """A name's records could not be resolved; `reason` says why (a LookupFailure), `name`
    is the name asked for."""

    def __init__(self, message: str, reason: LookupFailure, name: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.name = name


# --- values -----------------------------------------------------------------------------------
def format_id64(value: int) -> str:
    """A NID or L64 in presentation form: `0014:4fff:ff20:ee64`."""
    _check_id64(value, "value")
    text = f"{value:016x}"
    return ":".join(text[i:i + 4] for i in range(0, 16, 4))


def parse_id64(text: str) -> int:
    """A NID or L64 from its presentation form (four groups of four hex digits)."""
    groups = text.strip().split(":")
    if len(groups) != 4 or not all(
        len(g) == 4 and all(c in "0123456789abcdefABCDEF" for c in g) for g in groups
    ):
        raise RecordError(f"{text!r} is not a NID or L64: write four groups of four hex digits "
                          "separated by colons, like 0014:4fff:ff20:ee64")
    return int("".join(groups), 16)


def l64_of(prefix: str | ipaddress.IPv6Network) -> int:
    """The L64 of an IPv6 /64 prefix ("2001:db8:1::/64" -> 0x20010db800010000)."""
    try:
        network = ipaddress.IPv6Network(prefix)
    except ValueError as exc:
        raise RecordError(f"{prefix} is not an IPv6 prefix: {exc}") from exc
    if network.prefixlen != 64:
        raise RecordError(f"an L64 is a /64 prefix, not /{network.prefixlen} ({prefix})")
    return int(network.network_address) >> 64


def l64_prefix(l64: int) -> ipaddress.IPv6Network:
    """The IPv6 /64 prefix of an L64."""
    _check_id64(l64, "L64")
    return ipaddress.IPv6Network((l64 << 64, 64))


def _check_id64(value: object, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_ID64:
        raise RecordError(f"a {what} is a 64-bit unsigned number, not {value!r}")


def _name(text: str | dns.name.Name, what: str) -> dns.name.Name:
    """An absolute, lower-case DNS name (a relative one is taken as absolute)."""
    if isinstance(text, dns.name.Name):
        name = text if text.is_absolute() else text.concatenate(dns.name.root)
    else:
        try:
            name = dns.name.from_text(text)
        except (dns.exception.DNSException, ValueError) as exc:
            raise RecordError(f"{what} {text!r} is not a DNS name: {exc}") from exc
    return name.canonicalize()


def _pairs(items: Iterable[tuple[int, int]], what: str) -> tuple[tuple[int, int], ...]:
    try:
        pairs = [(preference, value) for preference, value in items]
    except (TypeError, ValueError) as exc:
        raise RecordError(f"{what} records are (preference, value) pairs") from exc
    for preference, value in pairs:
        if (isinstance(preference, bool) or not isinstance(preference, int)
                or not 0 <= preference <= MAX_PREFERENCE):
            raise RecordError(f"a {what} preference is 0..{MAX_PREFERENCE}, not {preference!r}")
        _check_id64(value, what)
    if not pairs:
        raise RecordError(f"a host has at least one {what} record")
    return tuple(sorted(set(pairs)))


@dataclass(frozen=True)
class IlnpRecords:
    """A host's ILNP records: its NIDs and L64s as (preference, value) pairs, lower preference
    preferred, sorted (most preferred first) and without repeats; one TTL for both.
    `hostname` is kept absolute and in lower case ("mn.ilnp.test.")."""

    hostname: str
    nids: tuple[tuple[int, int], ...]
    l64s: tuple[tuple[int, int], ...]
    ttl: int = DEFAULT_TTL

    def __post_init__(self) -> None:
        object.__setattr__(self, "hostname", _name(self.hostname, "host name").to_text())
        object.__setattr__(self, "nids", _pairs(self.nids, "NID"))
        object.__setattr__(self, "l64s", _pairs(self.l64s, "L64"))
        if (isinstance(self.ttl, bool) or not isinstance(self.ttl, int)
                or not 0 <= self.ttl <= MAX_TTL):
            raise RecordError(f"a TTL is 0..{MAX_TTL} seconds, not {self.ttl!r}")

    @property
    def preferred_nid(self) -> int:
        return self.nids[0][1]

    @property
    def preferred_l64s(self) -> tuple[int, ...]:
        """The L64s of the lowest preference (equally good: any may be used)."""
        best = self.l64s[0][0]
        return tuple(value for preference, value in self.l64s if preference == best)

    def __str__(self) -> str:
        nids = ", ".join(f"{p} {format_id64(v)}" for p, v in self.nids)
        l64s = ", ".join(f"{p} {format_id64(v)}" for p, v in self.l64s)
        return f"{self.hostname} ttl {self.ttl} NID {nids}; L64 {l64s}"


# --- TSIG keys --------------------------------------------------------------------------------
@dataclass(frozen=True)
class TsigKey:
    """A TSIG key: its name (absolute, lower case), algorithm and secret (never shown)."""

    name: str
    algorithm: str
    secret: bytes = field(repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "name", _name(self.name, "key name").to_text())
        algorithm = self.algorithm.lower().rstrip(".")
        if algorithm not in ALGORITHMS:
            raise RecordError(f"TSIG algorithm {self.algorithm!r} is not one of "
                              f"{', '.join(ALGORITHMS)}")
        object.__setattr__(self, "algorithm", algorithm)
        if len(self.secret) < MIN_KEY_LEN:
            raise RecordError(f"a TSIG secret has at least {MIN_KEY_LEN} bytes, "
                              f"not {len(self.secret)}")

    def dns_key(self) -> dns.tsig.Key:
        return dns.tsig.Key(self.name, self.secret, self.algorithm)


def generate_tsig_key(name: str, algorithm: str = DEFAULT_ALGORITHM) -> TsigKey:
    return TsigKey(name, algorithm, secrets.token_bytes(SECRET_LEN))


def format_tsig_key(key: TsigKey, comment: str = "") -> str:
    """The text of a key file holding `key` (each line of `comment` as a # line above it)."""
    head = "".join(f"# {line}\n" for line in comment.splitlines())
    name = key.name.rstrip(".") or "."
    return f"{head}{key.algorithm}:{name}:{base64.b64encode(key.secret).decode()}\n"


def parse_tsig_key(text: str, path: str = "key file") -> TsigKey:
    """The key in a key file's text (format: the module's docstring)."""
    lines = [line.strip() for line in text.splitlines()]
    keys = [line for line in lines if line and not line.startswith("#")]
    if keys and keys[0].rstrip() == "key:":
        raise TsigKeyFileError(f"{path} is knot.conf YAML; a key file holds one line "
                               "ALGORITHM:NAME:SECRET (keymgr -t prints it behind '# ')")
    if len(keys) != 1:
        raise TsigKeyFileError(f"{path} must hold exactly one line ALGORITHM:NAME:SECRET, "
                               f"not {len(keys)}; lines starting with # are comments")
    parts = keys[0].split(":")
    if len(parts) != 3 or not all(parts):
        raise TsigKeyFileError(f"{path}: the key line is not ALGORITHM:NAME:SECRET "
                               "(like hmac-sha256:ilnp-update:kW2E...=)")
    algorithm, name, secret_text = parts
    try:
        secret = base64.b64decode(secret_text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise TsigKeyFileError(f"{path}: the secret is not base64") from exc
    try:
        return TsigKey(name, algorithm, secret)
    except RecordError as exc:
        raise TsigKeyFileError(f"{path}: {exc}") from exc


def read_tsig_key(path: str) -> TsigKey:
    """The key in key file `path`, after checking the file's type, owner and mode."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as exc:
        raise TsigKeyFileError(f"cannot open TSIG key file {path}: {exc.strerror}") from exc
    except ValueError as exc:  # a NUL in the path
        raise TsigKeyFileError(f"{path!r} is not a usable path for a key file") from exc
    try:
        try:
            check_key_file_status(os.fstat(fd), os.geteuid(), path)
        except KeyFileError as exc:
            raise TsigKeyFileError(str(exc)) from exc
        data = os.read(fd, MAX_KEY_FILE + 1)
    finally:
        os.close(fd)
    if len(data) > MAX_KEY_FILE:
        raise TsigKeyFileError(f"{path} is larger than a key file ({MAX_KEY_FILE} bytes at most)")
    try:
        text = data.decode()
    except UnicodeDecodeError as exc:
        raise TsigKeyFileError(f"{path} is not text; it should hold ALGORITHM:NAME:SECRET") \
            from exc
    return parse_tsig_key(text, path)


def write_tsig_key(path: str, key: TsigKey, comment: str = "") -> None:
    """Create key file `path` holding `key`, mode 0600 from the start; an existing file is
    never overwritten (FileExistsError)."""
    text = format_tsig_key(key, comment)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o600)
    with os.fdopen(fd, "w") as file:
        file.write(text)


# --- messages (pure) --------------------------------------------------------------------------
def _rdata(rdtype: dns.rdatatype.RdataType, preference: int, value: int) -> dns.rdata.Rdata:
    return dns.rdata.from_text(_IN, rdtype, f"{preference} {format_id64(value)}")


def _rdata_pair(rdata: dns.rdata.Rdata) -> tuple[int, int]:
    """(preference, value) of a NID or L64 rdata: both are a 16-bit preference and 64 bits."""
    wire = rdata.to_digestable()
    return int.from_bytes(wire[:2], "big"), int.from_bytes(wire[2:10], "big")


def update_message(zone: str, records: IlnpRecords, key: TsigKey) -> dns.update.UpdateMessage:
    """An RFC 2136 update of `zone` that replaces the host's NID and L64 RRsets with
    `records` (delete both RRsets, add the new ones: one atomic update), TSIG-signed."""
    origin = _name(zone, "zone")
    host = dns.name.from_text(records.hostname)
    if not host.is_subdomain(origin):
        raise RecordError(f"{records.hostname} is not in zone {origin}; publish it in its own "
                          "zone")
    message = dns.update.UpdateMessage(origin)
    message.delete(host, _NID)
    message.delete(host, _L64)
    message.add(host, records.ttl, *(_rdata(_NID, p, v) for p, v in records.nids))
    message.add(host, records.ttl, *(_rdata(_L64, p, v) for p, v in records.l64s))
    message.use_tsig(key.dns_key(), fudge=TSIG_FUDGE)
    return message


_RCODE_HINTS = {
    "REFUSED": "the server refuses this update (its ACL does not allow this key or address)",
    "NOTAUTH": "the server is not authoritative for the zone, or does not accept the key",
    "NOTZONE": "a name in the update is outside the zone",
    "SERVFAIL": "the server failed to apply the update; see its log",
    "FORMERR": "the server could not parse the update",
    "NOTIMP": "the server does not implement dynamic updates",
    "YXDOMAIN": "a prerequisite failed", "YXRRSET": "a prerequisite failed",
    "NXDOMAIN": "a prerequisite failed", "NXRRSET": "a prerequisite failed",
}
_TSIG_HINTS = {
    "BADSIG": "the server's secret for this key differs: check the key file",
    "BADKEY": "the server does not know this key name or algorithm",
    "BADTIME": f"the clocks of client and server differ by more than {TSIG_FUDGE} s",
    "BADTRUNC": "the server refused the truncated signature",
}


def update_result(response: dns.message.Message, what: str = "update", note: str = "") -> None:
    """Nothing if `response` says the update was applied, else DnsUpdateError naming the
    RCODE (and what it usually means; `note` is added to that)."""
    rcode = response.rcode()
    if rcode == dns.rcode.NOERROR:
        return
    text = dns.rcode.to_text(rcode)
    hint = "; ".join(part for part in (note, _RCODE_HINTS.get(text, "")) if part)
    raise DnsUpdateError(f"{what} refused: {text}" + (f" ({hint})" if hint else ""), text)


_PEER_ERRORS: dict[type[dns.tsig.PeerError], str] = {
    dns.tsig.PeerBadKey: "BADKEY", dns.tsig.PeerBadSignature: "BADSIG",
    dns.tsig.PeerBadTime: "BADTIME", dns.tsig.PeerBadTruncation: "BADTRUNC",
}


def update_answer(update: dns.message.Message, wire: bytes,
                  what: str = "update") -> dns.message.Message:
    """The answer `wire` to the signed `update` (already turned to wire, so its MAC is
    known), checked: it answers this update, its TSIG verifies, and its RCODE is NOERROR.
    Anything else is a DnsUpdateError naming the RCODE and TSIG error. A server that is not
    authoritative for the zone answers without a signature: that refusal is reported with its
    RCODE too (an unsigned answer is never taken as success)."""
    if update.keyring is None or not update.mac:
        raise DnsUpdateError(f"{what}: the update is not TSIG-signed (or was never turned to "
                             "wire); an answer to it cannot be checked")
    try:
        response = dns.message.from_wire(wire, keyring=update.keyring,
                                         request_mac=update.mac)
    except dns.tsig.PeerError as exc:
        tsig_error = _PEER_ERRORS.get(type(exc), "unknown")
        hint = _TSIG_HINTS.get(tsig_error, str(exc))
        rcode = _rcode_text(wire) or "NOTAUTH"  # RFC 8945 5.2: TSIG errors come with NOTAUTH
        raise DnsUpdateError(f"{what} refused: {rcode}, TSIG error {tsig_error} ({hint})",
                             rcode, tsig_error) from exc
    except (dns.tsig.BadSignature, dns.tsig.BadKey, dns.tsig.BadAlgorithm,
            dns.tsig.BadTime) as exc:
        raise DnsUpdateError(f"{what}: the answer's TSIG signature does not verify "
                             f"({type(exc).__name__}); it did not come from a server with "
                             "this key") from exc
    except dns.exception.DNSException as exc:
        unsigned = _unsigned_answer(update, wire)
        if unsigned is not None:
            update_result(unsigned, what, "an unsigned answer")
        raise DnsUpdateError(f"{what}: unusable answer: {exc}") from exc
    if not update.is_response(response):
        raise DnsUpdateError(f"{what}: the answer does not belong to the update (ID "
                             f"{response.id}, not {update.id})")
    update_result(response, what)
    return response


def _rcode_text(wire: bytes) -> str | None:
    """The RCODE of a message as text, read without any TSIG check; None if unreadable."""
    try:
        return dns.rcode.to_text(dns.message.from_wire(wire, keyring=False).rcode())
    except (dns.exception.DNSException, ValueError):
        return None


def _unsigned_answer(update: dns.message.Message, wire: bytes) -> dns.message.Message | None:
    """The answer read without TSIG checks, if it is an unsigned answer to `update`."""
    try:
        response = dns.message.from_wire(wire, keyring=False)
    except dns.exception.DNSException:
        return None
    if response.had_tsig or not update.is_response(response):
        return None
    return response


@dataclass(frozen=True)
class Lookup:
    """The queries for a host's ILNP records and the interpretation of their answers."""

    name: dns.name.Name

    def queries(self) -> tuple[dns.message.QueryMessage, dns.message.QueryMessage]:
        """One NID and one L64 query (recursion not asked for: authoritative servers)."""
        return (dns.message.make_query(self.name, _NID, flags=0),
                dns.message.make_query(self.name, _L64, flags=0))

    def parse(self, responses: Iterable[dns.message.Message]) -> IlnpRecords:
        """The records in the answers to `queries()` (in any order), or DnsLookupError:
        NXDOMAIN, NODATA (the name has no NID or no L64), FAILED (an error RCODE)."""
        found: dict[dns.rdatatype.RdataType, tuple[dns.rrset.RRset, int]] = {}
        for response in responses:
            rdtype, rrset, ttl = self._answer(response)
            found[rdtype] = (rrset, ttl)
        missing = [dns.rdatatype.to_text(t) for t in (_NID, _L64) if t not in found]
        if missing:
            raise DnsLookupError(f"no answer to the {' and '.join(missing)} query of "
                                 f"{self.name}", LookupFailure.FAILED, self.name.to_text())
        nids, nid_ttl = found[_NID]
        l64s, l64_ttl = found[_L64]
        return IlnpRecords(self.name.to_text(), tuple(_rdata_pair(rd) for rd in nids),
                           tuple(_rdata_pair(rd) for rd in l64s), min(nid_ttl, l64_ttl))

    def _answer(
        self, response: dns.message.Message
    ) -> tuple[dns.rdatatype.RdataType, dns.rrset.RRset, int]:
        name = self.name.to_text()
        if len(response.question) != 1:
            raise DnsLookupError(f"an answer about {name} has {len(response.question)} "
                                 "questions, not 1", LookupFailure.FAILED, name)
        question = response.question[0]
        if question.name != self.name or question.rdtype not in (_NID, _L64):
            raise DnsLookupError(f"an answer about {question.name} "
                                 f"{dns.rdatatype.to_text(question.rdtype)} is no answer to "
                                 f"the NID or L64 query of {name}", LookupFailure.FAILED, name)
        kind = dns.rdatatype.to_text(question.rdtype)
        rcode = response.rcode()
        if rcode == dns.rcode.NXDOMAIN:
            raise DnsLookupError(f"{name} does not exist (NXDOMAIN)", LookupFailure.NXDOMAIN,
                                 name)
        if rcode != dns.rcode.NOERROR:
            raise DnsLookupError(f"the {kind} query of {name} failed: "
                                 f"{dns.rcode.to_text(rcode)}", LookupFailure.FAILED, name)
        if not isinstance(response, dns.message.QueryMessage):
            raise DnsLookupError(f"the answer to the {kind} query of {name} is no query answer",
                                 LookupFailure.FAILED, name)
        try:
            chain = response.resolve_chaining()
        except dns.exception.DNSException as exc:
            raise DnsLookupError(f"the answer to the {kind} query of {name} is malformed: "
                                 f"{exc}", LookupFailure.FAILED, name) from exc
        if chain.answer is None or not len(chain.answer):
            raise DnsLookupError(f"{name} has no {kind} records (it is no ILNP host, or not "
                                 "published yet)", LookupFailure.NODATA, name)
        return question.rdtype, chain.answer, chain.minimum_ttl


def lookup(hostname: str) -> Lookup:
    """The lookup of `hostname`'s ILNP records: `.queries()` to send, `.parse(answers)`."""
    return Lookup(_name(hostname, "host name"))


# --- I/O --------------------------------------------------------------------------------------
def _server_address(server: str, port: int) -> str | None:
    """The server's address in canonical form, None unless it is an IP address and a port."""
    try:
        address = ipaddress.ip_address(server)
    except ValueError:
        return None
    return str(address) if 0 < port < 65536 else None


def _bad_server(server: str, port: int) -> str:
    return f"a DNS server is an IP address and a port 1..65535, not {server} port {port}"


def send_update(server: str, port: int, message: dns.message.Message, timeout: float,
                transport: Transport = "tcp") -> dns.message.Message:
    """Send a signed update and check its answer (`update_answer`): the answer when the
    update was applied, DnsUpdateError for anything else (no answer within `timeout`
    seconds, an error RCODE, a TSIG error)."""
    where = _server_address(server, port)
    if where is None:
        raise DnsUpdateError(_bad_server(server, port))
    if transport not in ("tcp", "udp"):
        raise DnsUpdateError(f"transport is tcp or udp, not {transport!r}")
    at = f"{server} port {port}"
    zone = message.question[0].name if message.question else None
    what = f"update of {zone} at {at}" if zone is not None else f"update at {at}"
    try:
        wire = message.to_wire()
    except dns.exception.DNSException as exc:
        raise DnsUpdateError(f"{what}: cannot encode the update: {exc}") from exc
    exchange = _exchange_tcp if transport == "tcp" else _exchange_udp
    try:
        answer = exchange(wire, where, port, time.monotonic() + timeout)
    except TimeoutError as exc:
        raise DnsUpdateError(f"{what}: no answer within {timeout:g} s") from exc
    except OSError as exc:
        raise DnsUpdateError(f"{what}: {exc.strerror or exc}") from exc
    return update_answer(message, answer, what)


def _left(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError
    return left


def _exchange_tcp(wire: bytes, where: str, port: int, deadline: float) -> bytes:
    """One message over TCP (RFC 1035 4.2.2: each prefixed by its 16-bit length)."""
    with socket.create_connection((where, port), timeout=_left(deadline)) as sock:
        sock.settimeout(_left(deadline))
        sock.sendall(len(wire).to_bytes(2, "big") + wire)

        def read(count: int) -> bytes:
            data = b""
            while len(data) < count:
                sock.settimeout(_left(deadline))
                chunk = sock.recv(count - len(data))
                if not chunk:
                    raise ConnectionResetError(errno.ECONNRESET, "the server closed the "
                                               "connection without an answer")
                data += chunk
            return data

        return read(int.from_bytes(read(2), "big"))


def _exchange_udp(wire: bytes, where: str, port: int, deadline: float) -> bytes:
    """One datagram to the server, its answer back, sent again every UDP_RESEND seconds
    until the deadline (replacing RRsets is idempotent). Datagrams with another ID are
    skipped; the connected socket takes none from elsewhere and sees ICMP port unreachable."""
    family = socket.AF_INET6 if ":" in where else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.connect((where, port))
        while True:
            sock.send(wire)
            resend = min(time.monotonic() + UDP_RESEND, deadline)
            try:
                while True:
                    sock.settimeout(_left(resend))
                    answer = sock.recv(65535)
                    if answer[:2] == wire[:2]:
                        return answer
            except TimeoutError:
                _left(deadline)  # the deadline, or only time to send again


def publish(server: str, port: int, zone: str, records: IlnpRecords, key: TsigKey,
            timeout: float = DEFAULT_TIMEOUT, transport: Transport = "tcp") -> None:
    """Replace the host's NID and L64 records in `zone` on `server` (one signed update);
    DnsUpdateError if the server did not apply it."""
    send_update(server, port, update_message(zone, records, key), timeout, transport)


def resolve(server: str, port: int, name: str, timeout: float = DEFAULT_TIMEOUT) -> IlnpRecords:
    """The NID and L64 records of `name` as `server` (and only it) answers, within `timeout`
    seconds for both queries; DnsLookupError saying NXDOMAIN, NODATA, TIMEOUT or FAILED."""
    query = lookup(name)
    text = query.name.to_text()
    where = _server_address(server, port)
    if where is None:
        raise DnsLookupError(_bad_server(server, port), LookupFailure.FAILED, text)
    resolver = dns.resolver.Resolver(configure=False)
    resolver.nameservers = [where]
    resolver.port = port
    resolver.cache = None
    resolver.use_search_by_default = False
    resolver.flags = 0  # an authoritative server: no recursion wanted
    deadline = time.monotonic() + timeout
    responses = []
    for rdtype in (_NID, _L64):
        kind = dns.rdatatype.to_text(rdtype)
        left = deadline - time.monotonic()
        if left <= 0:
            raise DnsLookupError(f"{server} port {port} did not answer about {text} within "
                                 f"{timeout:g} s", LookupFailure.TIMEOUT, text)
        resolver.lifetime = left
        resolver.timeout = min(left, 2.0)  # per try: a lost datagram is asked again
        try:
            answer = resolver.resolve(query.name, rdtype, search=False,
                                      raise_on_no_answer=False)
        except dns.resolver.NXDOMAIN as exc:
            raise DnsLookupError(f"{text} does not exist (NXDOMAIN at {server})",
                                 LookupFailure.NXDOMAIN, text) from exc
        except dns.exception.Timeout as exc:
            raise DnsLookupError(f"{server} port {port} did not answer the {kind} query of "
                                 f"{text} within {timeout:g} s", LookupFailure.TIMEOUT,
                                 text) from exc
        except dns.resolver.NoNameservers as exc:
            raise DnsLookupError(f"{server} port {port} could not answer the {kind} query of "
                                 f"{text}: {_server_errors(exc)}", LookupFailure.FAILED,
                                 text) from exc
        except dns.exception.DNSException as exc:
            raise DnsLookupError(f"the {kind} query of {text} at {server} failed: {exc}",
                                 LookupFailure.FAILED, text) from exc
        responses.append(answer.response)
    return query.parse(responses)


def _server_errors(exc: dns.resolver.NoNameservers) -> str:
    errors = exc.kwargs.get("errors") or []
    texts = []
    for entry in errors:
        error = entry[3] if len(entry) > 3 else entry
        texts.append(str(error.strerror if isinstance(error, OSError) else error))
    return "; ".join(texts) or str(exc)


__all__ = [
    "ALGORITHMS",
    "DEFAULT_TIMEOUT",
    "DEFAULT_TTL",
    "DNS_PORT",
    "DnsLookupError",
    "DnsUpdateError",
    "IlnpDnsError",
    "IlnpRecords",
    "Lookup",
    "LookupFailure",
    "RecordError",
    "TsigKey",
    "TsigKeyFileError",
    "format_id64",
    "format_tsig_key",
    "generate_tsig_key",
    "l64_of",
    "l64_prefix",
    "lookup",
    "parse_id64",
    "parse_tsig_key",
    "publish",
    "read_tsig_key",
    "resolve",
    "send_update",
    "update_answer",
    "update_message",
    "update_result",
    "write_tsig_key",
]
