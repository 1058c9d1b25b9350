"""The seed's application interface, a UDP proxy into the overlay: sans-I/O.

Programs that know nothing of the overlay reach it through one UDP socket on loopback (the
proxy's port). A mapping, registered out of band on a unix datagram socket with the ASCII
datagram "<local_udp_port> <remote_hostname> <remote_port>", says where the datagrams of one
local program go:

    core = ProxyCore()
    request = core.mapping_request(b"10001 cn 10001")     # ProxyError (counted) if malformed
    core.add(request, now)                                 # Added(mapping, replaced)
    core.app_datagram(("127.0.0.1", 10001), b"hi")         # Send("cn", 10001, 10001, b"hi")
    core.overlay_datagram(7, 10001, b"ho", sender="cn")    # DeliverLocal(10001, b"ho")
    core.overlay_frame(b"\\x00\\x07\\x27\\x11ho", sender)       # the same, from a tun frame

A datagram from 127.0.0.1:P to the proxy goes over the overlay to the mapping's remote host,
transport source port P, destination port its remote port. An overlay datagram for port P is
delivered from the proxy's socket to 127.0.0.1:P if a mapping for P exists (the seed: "a
mapping does have to exist for its port"), whoever sent it, unless `strict_source` asks that
it come from the mapping's remote host; otherwise it is dropped and counted.

The tun backend carries each datagram in its own UDP datagram between the nodes' application
addresses, behind a 4-byte header: source port, destination port (big-endian), then the
payload (`encode_frame`, `decode_frame`).

Also here, for the seed backend: `MoveSchedule` (the locator sets a node cycles through every
`move_time`) and `SeedEngine` (a `SeedNode` with its schedule, in the shape `EnginePump`
drives). Nothing here reads a clock or touches a socket.
"""

from __future__ import annotations

import re
import struct
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from ipshift.ilnp.compat import Action, SeedNode
from ipshift.ilnp.seedwire import U64_MAX, format_locator

MAX_HOSTNAME = 253
#: the longest well-formed mapping datagram: two 5-digit ports, a 253-byte name, separators
MAX_MAPPING = 5 + 1 + MAX_HOSTNAME + 1 + 5 + 2
MAX_MAPPINGS = 1024
LOOPBACK = "127.0.0.1"
FRAME_HEADER = struct.Struct("!HH")
FRAME_HEADER_LEN = FRAME_HEADER.size

_PORT = re.compile(r"[0-9]{1,5}")
_LABEL = r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)"
_HOSTNAME = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")


class ProxyError(ValueError):
    """A mapping request or frame the proxy refuses: `reason` is the short tag it is counted
    under, str() one line for the person who sent it."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


# --- the mapping datagram ----------------------------------------------------------------------
@dataclass(frozen=True)
class MappingRequest:
    local_port: int
    remote_host: str
    remote_port: int

    def encode(self) -> bytes:
        return f"{self.local_port} {self.remote_host} {self.remote_port}".encode("ascii")


def parse_port(text: str, what: str) -> int:
    if not _PORT.fullmatch(text) or not 1 <= int(text) <= 0xFFFF:
        raise ProxyError(f"bad_{what.replace(' ', '_')}",
                         f"{what} {text[:20]!r}: a port is a number 1-65535")
    return int(text)


def check_hostname(name: str) -> str:
    """`name` if it is a DNS-ish host name: dot-separated labels of letters, digits, '-' and
    '_' (1-63 each, not starting or ending with '-'), at most 253 characters."""
    if len(name) > MAX_HOSTNAME or not _HOSTNAME.fullmatch(name):
        raise ProxyError("bad_hostname",
                         f"host name {name[:40]!r}: letters, digits, '-', '_' in dot-separated "
                         f"labels of 1-63 characters, at most {MAX_HOSTNAME} in all")
    return name


def parse_mapping(data: bytes) -> MappingRequest:
    """The ASCII datagram "<local_udp_port> <remote_hostname> <remote_port>" (fields separated
    by blanks, a trailing newline allowed); ProxyError for anything else."""
    if not data.strip():
        raise ProxyError("empty", "an empty mapping request: send "
                                  "'<local_udp_port> <remote_hostname> <remote_port>'")
    if len(data) > MAX_MAPPING:
        raise ProxyError("too_long", f"a mapping request of {len(data)} bytes; at most "
                                     f"{MAX_MAPPING}")
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        raise ProxyError("not_ascii", "a mapping request is ASCII text") from None
    fields = text.split()
    if len(fields) != 3:
        raise ProxyError("fields", f"a mapping request has 3 fields, not {len(fields)}: "
                                   "'<local_udp_port> <remote_hostname> <remote_port>'")
    local, host, remote = fields
    return MappingRequest(parse_port(local, "local port"), check_hostname(host),
                          parse_port(remote, "remote port"))


# --- the tun backend's frame -------------------------------------------------------------------
def encode_frame(src_port: int, dst_port: int, payload: bytes) -> bytes:
    for port in (src_port, dst_port):
        if not 1 <= port <= 0xFFFF:
            raise ProxyError("bad_port", f"port {port}: 1-65535")
    return FRAME_HEADER.pack(src_port, dst_port) + payload


def decode_frame(data: bytes) -> tuple[int, int, bytes]:
    """(source port, destination port, payload); ProxyError for a short frame or port 0."""
    if len(data) < FRAME_HEADER_LEN:
        raise ProxyError("short_frame", f"a frame of {len(data)} bytes: the header alone is "
                                        f"{FRAME_HEADER_LEN}")
    src, dst = FRAME_HEADER.unpack_from(data)
    if src == 0 or dst == 0:
        raise ProxyError("zero_port", "a frame with port 0")
    return src, dst, bytes(data[FRAME_HEADER_LEN:])


# --- decisions ---------------------------------------------------------------------------------
@dataclass
class Mapping:
    local_port: int
    remote_host: str
    remote_port: int
    created: float
    #: where the tun backend sends (the remote's application address); None for the seed's
    address: str | None = None
    sent: int = 0
    delivered: int = 0

    def describe(self) -> str:
        where = f" [{self.address}]" if self.address else ""
        return f"{self.remote_host}{where}:{self.remote_port}"

    def row(self, now: float) -> dict[str, object]:
        return {"local_port": self.local_port, "remote_host": self.remote_host,
                "remote_port": self.remote_port, "address": self.address,
                "sent": self.sent, "delivered": self.delivered,
                "age_s": round(max(0.0, now - self.created), 1)}


@dataclass(frozen=True)
class Added:
    mapping: Mapping
    replaced: Mapping | None


@dataclass(frozen=True)
class Send:
    """Carry `payload` over the overlay to `remote_host` (at `address`, tun backend)."""

    remote_host: str
    address: str | None
    src_port: int
    dst_port: int
    payload: bytes

    def frame(self) -> bytes:
        return encode_frame(self.src_port, self.dst_port, self.payload)


@dataclass(frozen=True)
class DeliverLocal:
    """Send `payload` from the proxy's socket to 127.0.0.1:`port`."""

    port: int
    payload: bytes


class ProxyCore:
    """The mapping table (one mapping per local port) and what each datagram becomes."""

    def __init__(self, *, max_mappings: int = MAX_MAPPINGS, strict_source: bool = False,
                 local_address: str = LOOPBACK) -> None:
        self.max_mappings = max_mappings
        self.strict_source = strict_source
        self.local_address = local_address
        self.mappings: dict[int, Mapping] = {}
        self.counters: Counter[str] = Counter()
        self.drops: Counter[str] = Counter()
        self.mapping_errors: Counter[str] = Counter()

    # --- mappings -------------------------------------------------------------------------
    def mapping_request(self, data: bytes) -> MappingRequest:
        self.counters["mapping_requests"] += 1
        try:
            return parse_mapping(data)
        except ProxyError as exc:
            self.mapping_errors[exc.reason] += 1
            raise

    def refuse(self, reason: str) -> None:
        """A request the adapter could not complete (e.g. the name did not resolve)."""
        self.mapping_errors[reason] += 1

    def add(self, request: MappingRequest, now: float, address: str | None = None) -> Added:
        """Map `request.local_port`; a mapping there already is replaced (and returned)."""
        replaced = self.mappings.get(request.local_port)
        if replaced is None and len(self.mappings) >= self.max_mappings:
            self.mapping_errors["table_full"] += 1
            raise ProxyError("table_full", f"the proxy holds {self.max_mappings} mappings "
                                           "already")
        mapping = Mapping(request.local_port, request.remote_host, request.remote_port, now,
                          address)
        self.mappings[request.local_port] = mapping
        self.counters["mappings_replaced" if replaced else "mappings_added"] += 1
        return Added(mapping, replaced)

    def remove(self, local_port: int) -> Mapping | None:
        return self.mappings.pop(local_port, None)

    # --- datagrams ------------------------------------------------------------------------
    def app_datagram(self, source: tuple[str, int], payload: bytes) -> Send | None:
        """A datagram a local program sent to the proxy's port."""
        self.counters["app_received"] += 1
        host, port = source[0], source[1]
        if host != self.local_address:
            self.drops["not_local_source"] += 1
            return None
        mapping = self.mappings.get(port)
        if mapping is None:
            self.drops["app_no_mapping"] += 1
            return None
        return Send(mapping.remote_host, mapping.address, port, mapping.remote_port,
                    bytes(payload))

    def sent(self, send: Send) -> None:
        self.counters["sent"] += 1
        mapping = self.mappings.get(send.src_port)
        if mapping is not None:
            mapping.sent += 1

    def send_failed(self, reason: str) -> None:
        self.drops[reason] += 1

    def overlay_datagram(self, src_port: int, dst_port: int, payload: bytes,
                         sender: str = "") -> DeliverLocal | None:
        """A datagram the overlay brought for transport port `dst_port` from `sender` (a
        host name for the seed backend, an address for the tun backend)."""
        self.counters["overlay_received"] += 1
        mapping = self.mappings.get(dst_port)
        if mapping is None:
            self.drops["overlay_no_mapping"] += 1
            return None
        if self.strict_source and sender not in (mapping.remote_host, mapping.address):
            self.drops["wrong_sender"] += 1
            return None
        mapping.delivered += 1
        self.counters["delivered"] += 1
        return DeliverLocal(dst_port, bytes(payload))

    def overlay_frame(self, data: bytes, sender: str = "") -> DeliverLocal | None:
        """A tun backend frame (4-byte header, payload)."""
        try:
            src, dst, payload = decode_frame(data)
        except ProxyError as exc:
            self.counters["overlay_received"] += 1
            self.drops[exc.reason] += 1
            return None
        return self.overlay_datagram(src, dst, payload, sender)

    def deliver_failed(self) -> None:
        self.drops["deliver_failed"] += 1

    # --- status ---------------------------------------------------------------------------
    def rows(self, now: float) -> list[dict[str, object]]:
        return [self.mappings[port].row(now) for port in sorted(self.mappings)]

    def status(self, now: float) -> dict[str, object]:
        return {"mappings": self.rows(now), "counters": dict(self.counters),
                "drops": dict(self.drops), "mapping_errors": dict(self.mapping_errors),
                "strict_source": self.strict_source}


# --- the seed backend's node and its schedule --------------------------------------------------
class MoveSchedule:
    """The locator sets a node moves to, cycled, one every `interval` seconds from start."""

    def __init__(self, sets: Sequence[Sequence[int]], interval: float) -> None:
        if not sets:
            raise ValueError("a move schedule needs at least one locator set")
        if not interval > 0:
            raise ValueError(f"move time {interval}: must be positive")
        for group in sets:
            if not group:
                raise ValueError("a locator set in the move schedule is empty")
            for locator in group:
                if not 0 <= locator <= U64_MAX:
                    raise ValueError(f"locator {locator:#x} is not a 64-bit value")
        self.sets = [tuple(dict.fromkeys(s)) for s in sets]
        self.interval = interval
        self.next_at: float | None = None
        self.moves = 0

    def start(self, now: float) -> None:
        self.next_at = now + self.interval

    def due(self, now: float) -> tuple[int, ...] | None:
        """The set to move to now, or None; at most one move per call (a late call skips the
        moves it missed rather than replaying them)."""
        if self.next_at is None or now < self.next_at:
            return None
        new = self.sets[self.moves % len(self.sets)]
        self.moves += 1
        self.next_at += self.interval
        if self.next_at <= now:
            self.next_at = now + self.interval
        return new

    def status(self) -> dict[str, object]:
        return {"interval_s": self.interval, "moves": self.moves,
                "sets": [[format_locator(x) for x in s] for s in self.sets]}


class SeedEngine:
    """A `SeedNode` and its move schedule as one engine for `EnginePump`
    (`handle_timer`, `next_timer`, `actions`)."""

    def __init__(self, node: SeedNode, schedule: MoveSchedule | None = None) -> None:
        self.node = node
        self.schedule = schedule

    def start(self, now: float) -> None:
        self.node.start(now)
        if self.schedule is not None:
            self.schedule.start(now)

    def handle_timer(self, now: float) -> None:
        if self.schedule is not None:
            new = self.schedule.due(now)
            if new is not None:
                self.node.set_locators(new, now)
        self.node.timer(now)

    def next_timer(self) -> float | None:
        times = [self.node.next_deadline()]
        if self.schedule is not None:
            times.append(self.schedule.next_at)
        return min((t for t in times if t is not None), default=None)

    def actions(self) -> list[Action]:
        return self.node.actions()
