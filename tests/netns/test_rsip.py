"""The RSIP gateway daemon (`ipshift rsip server`) on real kernels: what docs/rsip.md promises.

The site is `ipshift.lab.rsip_site.RsipSite`: private hosts a, b, c (192.0.2.10-12) behind gw
(192.0.2.1 inside, 203.0.113.1 public), the Internet host inet (203.0.113.100), which can
reach nothing private. The gateway leases PORT_RANGE 8192-32767 and LISTEN_RANGE 1-1023.
Some hosts run the real client (`ipshift rsip client`); others speak RSIP by hand with
`ipshift.rsip.wire`, over UDP and TCP, so that they can stop extending, lie or send garbage.
The client's own behaviour is tests/netns/test_rsip_client.py's; the responder run alone is
tests/netns/test_rsip_pcp.py's.

Shown, with hosts a and b running the client and PCP=yes:
- a and b fetch from inet at the same time: both succeed, each seen from the public address
  and a port of its own block, and the gateway's binds for the two are distinct blocks;
- a's LISTEN 80 makes a's web server reachable at 203.0.113.1:80; b's client asking for 80
  (a server there) is refused LOCAL_ADDRPORT_INUSE, and so is a LISTEN 80 sent by hand;
- ping out works from a; inet's echo requests to 203.0.113.1 (also with an identifier of a's
  block) are answered by gw itself and none reaches a;
- Debian's natpmpc on c maps TCP 8080 through the gateway daemon and inet reaches c there; a
  public port asked for inside a's block is not given (another port is, outside every RSIP
  bind), and an RSIP LISTEN for the port PCP gave is refused;
- SIGUSR1 writes the seed's status table to STAT_FILE and `ipshift rsip dump` prints it.

Shown, with hand-made requests (a registered over UDP with ipshift's UDP tunnel, b over TCP):
- garbage, truncated headers and parameters, a wrong version, an unknown message type, a
  request naming another host's client ID (ASSIGN, FREE), RSIPSEC and an L2TP tunnel, over
  UDP and TCP: each gets ERROR_RESPONSE with its RFC 3103 code (over UDP echoing the message
  counter; a UDP request without one gets MESSAGE_COUNTER_REQUIRED); a TCP stream that
  loses its framing is closed; the malformed counter counts exactly the malformed ones, and
  no lease changes;
- requests arriving on EXT_IF (from inet, to 203.0.113.1:4555 and, routed in, to
  192.0.2.1:4555; UDP and TCP) get nothing and are not even counted;
- on the data plane, tunnel datagrams from a whose inner source is not one of a's binds are
  dropped and counted for a's peer (foreign_source), while those from a's block go out;
- a flood of 20,000 random datagrams (and a TCP stream of random bytes) leaves the gateway
  running, answering, and its RSS within bounds; a real client on c works afterwards.

Shown, with LEASE_TIME=10:
- a hand-made bind that is never extended expires: the host is told (FREE_RESPONSE, then
  DE-REGISTER_RESPONSE, counter 0), the bind leaves the status and the nft lease set, its
  block is reported in quarantine (no config key shortens the 120 s, so the ports coming
  back is not waited for) and asking for those very ports is refused meanwhile; a real client
  that extends keeps its bind;
- SIGTERM removes the gateway's nft table, its ip rule and its TUN device and keeps the
  leases; a start brings the same client ID and bind back (EXTEND answered), and the table,
  rule and device exactly once;
- kill -9 leaves the table and rule behind (the TUN device goes with the process); the next
  start removes them and installs one of each, and the leases written before the kill are
  back and usable.

Shown, with PCP=yes: a NAT-PMP request whose suggested public port is taken gets another
port, and no port that nobody ever held goes into quarantine on the way (the lease engine's
other offers are taken back at once), so a host cannot lock PORT_RANGE up with requests for
taken ports.

Every wait is bounded; no timing is asserted.
"""

from __future__ import annotations

import ipaddress
import json
import random
import re
import signal
import socket
import sqlite3
import struct
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from ipshift.lab import Lab, Node
from ipshift.lab.rsip_site import (
    GATEWAY_INT,
    HOSTS,
    INTERNET,
    PUBLIC,
    RSIP,
    Client,
    RsipSite,
    get,
    start_who,
    wait_for,
)
from ipshift.packet.build import build_packet
from ipshift.packet.checksum import internet_checksum
from ipshift.packet.ipv4 import IPv4Header
from ipshift.packet.transport import UDPHeader
from ipshift.rsip import wire
from ipshift.rsip.gateway import tunnel_name
from ipshift.rsip.wire import (
    Address,
    ErrorCode,
    Message,
    MessageType,
    ParamType,
    Ports,
    Spi,
    TunnelType,
)
from ipshift.tunnel import wire as tunnel_wire
from tests.netns.conftest import need

pytestmark = pytest.mark.netns

GW_TABLE = "ipshift_rsip_default"  # the gateway's owned nft table (kernel.owned_table)
GW_DEVICE = "rsipd-default"        # its TUN device (daemon.tunnel_device)
DIVERT_RULE = "lookup 4555"        # its ip rule (kernel.TABLE), fwmark 0x1000000
TUNNEL_PORT = 4556                 # the gateway's (and our hand-made hosts') tunnel port
SINK_PORT = 9999                   # inet's UDP sink for the data-plane checks
ANSWER_WAIT = 2.0                  # seconds for one answer to one request (then sent again)
QUIET_WAIT = 1.5                   # seconds of silence taken as "no answer"

# A TCP server that greets with a fixed line (b's would-be server on 80).
HELLO = r"""
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1])))
s.listen()
print("listening", flush=True)
while True:
    try:
        conn, _ = s.accept()
    except OSError as exc:
        print("accept failed:", exc, flush=True)
        break
    conn.sendall(sys.argv[2].encode() + b"\n")
    conn.close()
"""


# --- RSIP by hand ---------------------------------------------------------------------------------
def _udp_socket(port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("0.0.0.0", port))
    return sock


def _tcp_connection(address: tuple[str, int]) -> socket.socket:
    return socket.create_connection(address, timeout=5)


class RawUdp:
    """RSIP over UDP from one host, message by message (`ipshift.rsip.wire`)."""

    def __init__(self, node: Node, port: int = 0) -> None:
        self.node = node
        self.sock = node.call(_udp_socket, port)
        self.counter = 0
        self.sent = 0                          # datagrams sent, retransmissions included
        self.unsolicited: list[Message] = []   # asynchronous messages (counter 0)

    def next_counter(self) -> int:
        self.counter += 1
        return self.counter

    def ask(self, data: bytes | Message, counter: int | None = None) -> Message:
        """Send `data` (resent twice if unanswered) and return the answer: the one echoing
        `counter`, or with no counter given the first that is not asynchronous."""
        raw = wire.encode(data) if isinstance(data, Message) else data
        if isinstance(data, Message) and counter is None:
            counter = data.counter
        for _ in range(3):
            self.sock.sendto(raw, (GATEWAY_INT, wire.PORT))
            self.sent += 1
            deadline = time.monotonic() + ANSWER_WAIT
            while (left := deadline - time.monotonic()) > 0:
                self.sock.settimeout(left)
                try:
                    reply = self.sock.recv(65535)
                except TimeoutError:
                    break
                message = wire.decode(reply)
                if message.counter == 0:
                    self.unsolicited.append(message)
                elif counter is None or message.counter == counter:
                    return message
        raise AssertionError(f"no answer from the gateway to {raw[:40].hex()}")

    def wait_unsolicited(self, kind: MessageType, timeout: float) -> Message:
        """The gateway's asynchronous message of `kind` (bounded wait)."""
        deadline = time.monotonic() + timeout
        while True:
            for message in self.unsolicited:
                if message.type is kind:
                    return message
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {kind.name} within {timeout:g} s: "
                                     f"{self.unsolicited}")
            self.sock.settimeout(left)
            try:
                reply = self.sock.recv(65535)
            except TimeoutError:
                continue
            self.unsolicited.append(wire.decode(reply))

    def silent(self, data: bytes, destination: tuple[str, int]) -> bool:
        """True if nothing comes back to `data` sent twice to `destination`."""
        for _ in range(2):
            self.sock.sendto(data, destination)
            self.sock.settimeout(QUIET_WAIT)
            try:
                self.sock.recv(65535)
            except TimeoutError:
                continue
            except OSError:  # an ICMP error (port unreachable): no RSIP answer either
                continue
            return False
        return True

    def close(self) -> None:
        self.sock.close()

    # requests
    def register(self, tunnel_port: int | None = None) -> int:
        extra = [wire.udp_tunnel_param(tunnel_port)] if tunnel_port else []
        answer = self.ask(wire.register_request(counter=self.next_counter(), extra=extra))
        assert answer.type is MessageType.REGISTER_RESPONSE, answer
        return answer.require(wire.ClientId).value

    def assign(self, client_id: int, ports: Ports | None = None,
               lease: int | None = None) -> Message:
        return self.ask(rsap(client_id, ports, lease=lease, counter=self.next_counter()))


class RawTcp:
    """RSIP over one TCP connection from one host."""

    def __init__(self, node: Node) -> None:
        self.sock = node.call(_tcp_connection, (GATEWAY_INT, wire.PORT))
        self.reader = wire.StreamReader()
        self.pending: list[Message | wire.RsipWireError] = []

    def ask(self, data: bytes | Message) -> Message:
        self.sock.sendall(wire.encode(data) if isinstance(data, Message) else data)
        while not self.pending:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise AssertionError("the gateway closed the connection instead of answering")
            self.pending += self.reader.feed(chunk)
        item = self.pending.pop(0)
        assert isinstance(item, Message), item
        return item

    def closed_by_gateway(self) -> bool:
        """True once the gateway has closed its end (EOF within a bounded wait)."""
        try:
            return self.sock.recv(65536) == b""
        except ConnectionResetError:
            return True
        except TimeoutError:
            return False

    def close(self) -> None:
        self.sock.close()


def rsap(client_id: int, ports: Ports | None = None, *, lease: int | None = None,
         tunnel: int | None = None, counter: int | None = None) -> Message:
    return wire.assign_request_rsap_ip(client_id, Address.dont_care(), ports or Ports.any(255),
                                       Address.dont_care(), Ports.any(1), lease=lease,
                                       tunnel=tunnel, counter=counter)


def listen(client_id: int, port: int, counter: int | None = None) -> Message:
    return wire.listen_request(client_id, Address.dont_care(), Ports.single(port),
                               Address.dont_care(), Ports.any(1), counter=counter)


def error_of(message: Message) -> ErrorCode:
    assert message.type is MessageType.ERROR_RESPONSE, message
    return ErrorCode(message.require(wire.Error).code)


def block_of(answer: Message) -> tuple[int, int, int]:
    """(bind ID, first, last) of an ASSIGN or LISTEN response."""
    assert answer.type in (MessageType.ASSIGN_RESPONSE_RSAP_IP,
                           MessageType.LISTEN_RESPONSE), answer
    ports = answer.all(Ports)[0]
    return answer.require(wire.BindId).value, ports.first, ports.last


def frame(kind: int, body: bytes = b"", *, version: int = 1, length: int | None = None) -> bytes:
    """An RSIP header (any version, type, length) and `body`, unchecked."""
    return struct.pack("!BBH", version, kind, 4 + len(body) if length is None else length) + body


def counter_param(counter: int | None) -> bytes:
    return b"" if counter is None else struct.pack("!BHI", ParamType.MESSAGE_COUNTER, 4, counter)


# Malformed input, by builder(counter) -> bytes (counter None over TCP), and the RFC 3103 code
# of the answer. The last two lose the TCP framing: the gateway answers and closes.
Case = tuple[str, Callable[[int | None], bytes], ErrorCode]
MALFORMED: list[Case] = [
    ("an unknown parameter type", lambda c: frame(MessageType.REGISTER_REQUEST,
                                                 b"\xf0\x00\x01\x42" + counter_param(c)),
     ErrorCode.ILLEGAL_PARAM),
    ("a parameter header cut short", lambda c: frame(MessageType.REGISTER_REQUEST,
                                                    counter_param(c) + b"\x0b\x00"),
     ErrorCode.BAD_MESSAGE),
    ("a parameter longer than the message", lambda c: frame(
        MessageType.REGISTER_REQUEST, counter_param(c) + b"\x04\x00\x08\x00\x00"),
     ErrorCode.BAD_MESSAGE),
    ("a bad parameter value", lambda c: frame(MessageType.REGISTER_REQUEST,
                                             counter_param(c) + b"\x0b\x00\x02\x00\x01"),
     ErrorCode.BAD_PARAM),
    ("an unknown message type", lambda c: frame(99, counter_param(c)),
     ErrorCode.ILLEGAL_MESSAGE),
    ("RSIP version 2", lambda c: frame(MessageType.REGISTER_REQUEST, counter_param(c),
                                       version=2),
     ErrorCode.UNSUPPORTED_RSIP_VERSION),
    ("garbage", lambda c: b"\x8f\x13\xee\x07 this is no RSIP message at all",
     ErrorCode.UNSUPPORTED_RSIP_VERSION),
]
FRAMING_LOST = 2
# Only over UDP, where a datagram is one message: a header cut short, a length beyond it.
MALFORMED_UDP: list[Case] = [
    ("a header cut short", lambda c: b"\x01\x02\x00", ErrorCode.BAD_MESSAGE),
    ("an overall length beyond the datagram", lambda c: frame(
        MessageType.REGISTER_REQUEST, counter_param(c), length=64), ErrorCode.BAD_MESSAGE),
]


# --- kernel and process state ---------------------------------------------------------------------
def gw_tables(site: RsipSite) -> list[str]:
    doc = json.loads(site.gw.run(["nft", "-j", "list", "tables"]).stdout)
    return [item["table"]["name"] for item in doc["nftables"] if "table" in item]


def divert_rules(site: RsipSite) -> list[str]:
    return [line for line in site.gw.ip("-4", "rule").splitlines() if DIVERT_RULE in line]


def local_rules(site: RsipSite) -> list[str]:
    return [line for line in site.gw.ip("-4", "rule").splitlines()
            if line.split()[-1] == "local"]


def has_device(site: RsipSite) -> bool:
    return site.gw.run(["ip", "link", "show", GW_DEVICE], check=False).returncode == 0


def leases_set(site: RsipSite) -> str:
    return site.gw.run(["nft", "list", "set", "ip", GW_TABLE, "leases"]).stdout


def lease_element(first: int, last: int) -> str:
    return f"{PUBLIC} . {first}-{last}" if first != last else f"{PUBLIC} . {first}"


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def ports_rows(site: RsipSite, host: str) -> list[dict[str, Any]]:
    return [row for row in site.gateway_binds(host) if row["kind"] == "ports"]


def span(row: dict[str, Any]) -> tuple[int, int]:
    return row["first"], row["first"] + row["count"] - 1


# --- data-plane helpers ---------------------------------------------------------------------------
def inner_udp(source: str, sport: int, payload: bytes) -> bytes:
    """A tunnel datagram (ipshift's UDP framing) carrying UDP from source:sport to inet's sink."""
    packet = build_packet(IPv4Header(ipaddress.IPv4Address(source).packed,
                                     ipaddress.IPv4Address(INTERNET).packed),
                          UDPHeader(sport, SINK_PORT), payload)
    return tunnel_wire.PLAIN_HEADER + packet


def receive_all(sock: socket.socket, until: bytes, timeout: float = 10.0
                ) -> list[tuple[bytes, tuple[str, int]]]:
    """What `sock` receives until a datagram `until` (bounded)."""
    got: list[tuple[bytes, tuple[str, int]]] = []
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            data, source = sock.recvfrom(2048)
        except TimeoutError:
            break
        got.append((data, (str(source[0]), int(source[1]))))
        if data == until:
            return got
    raise AssertionError(f"{until!r} did not arrive within {timeout:g} s: {got}")


def echo_from(ident: int, destination: str) -> str | None:
    """One ICMP echo request with identifier `ident` (raw socket); who replied, or None."""
    body = struct.pack("!BBHHH", 8, 0, 0, ident, 1) + b"rsip echo probe"
    body = body[:2] + struct.pack("!H", internet_checksum(body)) + body[4:]
    with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP) as sock:
        for _ in range(3):
            sock.sendto(body, (destination, 0))
            deadline = time.monotonic() + ANSWER_WAIT
            while (left := deadline - time.monotonic()) > 0:
                sock.settimeout(left)
                try:
                    packet, source = sock.recvfrom(2048)
                except TimeoutError:
                    break
                at = (packet[0] & 0x0F) * 4
                kind, _code, _sum, got_ident = struct.unpack_from("!BBHH", packet, at)
                if kind == 0 and got_ident == ident:
                    return str(source[0])
    return None


def echo_requests_seen(node: Node) -> int:
    out = node.run(["nft", "list", "chain", "ip", "probe", "seen"]).stdout
    match = re.search(r"counter packets (\d+)", out)
    assert match, out
    return int(match.group(1))


def mapped_port(out: str, private: int) -> int:
    """The public port natpmpc says it got for TCP `private`."""
    match = re.search(r"Mapped public port (\d+) protocol TCP to local port (\d+)", out)
    assert match and int(match.group(2)) == private, out
    return int(match.group(1))


# --- hosts sharing the address, LISTEN, ICMP, NAT-PMP, status file --------------------------------
def test_hosts_share_the_address_listen_ping_natpmp_and_status_file(
        lab: Lab, tmp_path: Path) -> None:
    need("natpmpc", "curl", "ping")
    site = RsipSite(lab, tmp_path / "site")
    gateway = site.start_gateway(PCP="yes")
    a, b, c, inet = site.host("a"), site.host("b"), site.host("c"), site.inet
    start_who(inet, INTERNET, 8000)
    start_who(a, "0.0.0.0", 80)

    client_a = Client(a, tmp_path, "-l", "80")
    client_b = Client(b, tmp_path)
    proc_a, proc_b = client_a.start(), client_b.start()
    blocks = {}
    for name, client in (("a", client_a), ("b", client_b)):
        bind = next(x for x in client.status()["binds"] if x["kind"] == "ports")
        blocks[name] = (bind["first"], bind["last"])

    # 1. both fetch from inet at once; each from the public address and a port of its block
    with ThreadPoolExecutor(2) as pool:
        seen = dict(zip("ab", pool.map(lambda n: get(n, f"http://{INTERNET}:8000/"), (a, b)),
                        strict=True))
    for name in "ab":
        address, _, port = seen[name].partition(":")
        first, last = blocks[name]
        assert address == PUBLIC and first <= int(port) <= last, (name, seen, blocks)
    # ... and the gateway holds the two blocks, apart
    rows = {name: ports_rows(site, HOSTS[name]) for name in "ab"}
    assert [span(r) for r in rows["a"]] == [blocks["a"]]
    assert [span(r) for r in rows["b"]] == [blocks["b"]]
    assert all(r["address"] == PUBLIC for r in rows["a"] + rows["b"])
    (a_first, a_last), (b_first, b_last) = blocks["a"], blocks["b"]
    assert a_last < b_first or b_last < a_first, blocks
    assert rows["a"][0]["client_id"] != rows["b"][0]["client_id"]

    # 2. a's LISTEN 80: inet reaches a's web server at the public address
    assert [r["first"] for r in site.gateway_binds(HOSTS["a"]) if r["kind"] == "listen"] == [80]
    assert get(inet, f"http://{PUBLIC}:80/").startswith(f"{INTERNET}:")
    # b's client asks for 80 too (a server starts there): refused, as conflicting
    hello_b = b.spawn([sys.executable, "-c", HELLO, "80", "b"], name="hello-b-80")
    hello_b.wait_ready("listening", 20, "b's server on 80")
    wait_for("b's LISTEN 80 refused", lambda: client_b.listen_state(80) == "refused",
             process=proc_b)
    reason = client_b.status()["listens"]["80"]["reason"]
    assert "LOCAL_ADDRPORT_INUSE" in reason, reason
    assert not any(r["first"] == 80 for r in site.gateway_binds(HOSTS["b"]))
    assert get(inet, f"http://{PUBLIC}:80/").startswith(f"{INTERNET}:")  # still a's server
    # ... and a LISTEN 80 sent by hand (c, over TCP)
    raw_c = RawTcp(c)
    answer = raw_c.ask(wire.register_request())
    assert answer.type is MessageType.REGISTER_RESPONSE, answer
    c_id = answer.require(wire.ClientId).value
    assert error_of(raw_c.ask(listen(c_id, 80))) is ErrorCode.LOCAL_ADDRPORT_INUSE

    # 5. ping out from a, through its tunnel
    assert a.run(["ping", "-c", "1", "-W", "3", INTERNET], check=False).returncode == 0
    # inet's echo requests to the public address are gw's to answer; none reaches a, not
    # even one with an identifier of a's block
    a.nft("table ip probe {\n chain seen {\n  type filter hook prerouting priority raw - 10;"
          "\n  icmp type echo-request counter\n }\n}\n")
    assert inet.run(["ping", "-c", "2", "-W", "3", PUBLIC], check=False).returncode == 0
    for ident in (a_first, a_last):
        assert inet.call(echo_from, ident, PUBLIC) == PUBLIC
    assert echo_requests_seen(a) == 0
    # a's private address is nowhere to be reached from inet
    assert inet.run(["ping", "-c", "1", "-W", "1", HOSTS["a"]], check=False).returncode != 0

    # 8. NAT-PMP (Debian's natpmpc) from c, which speaks no RSIP, through the gateway daemon
    start_who(c, "0.0.0.0", 8080)
    start_who(c, "0.0.0.0", 8081)
    out = c.run(["natpmpc", "-g", GATEWAY_INT, "-a", "8080", "8080", "tcp", "60"],
                timeout=30).stdout
    assert mapped_port(out, 8080) == 8080, out
    assert get(inet, f"http://{PUBLIC}:8080/").startswith(f"{INTERNET}:")
    # a public port inside a's block is not handed out; another one, outside every bind, is
    out = c.run(["natpmpc", "-g", GATEWAY_INT, "-a", str(a_first), "8081", "tcp", "60"],
                timeout=30).stdout  # -a PUBLIC PRIVATE
    given = mapped_port(out, 8081)
    held = [span(r) for host in HOSTS.values() for r in site.gateway_binds(host)]
    assert given != a_first and not any(lo <= given <= hi for lo, hi in held), (given, held)
    assert get(inet, f"http://{PUBLIC}:{given}/").startswith(f"{INTERNET}:")
    # ... and RSIP cannot take the port PCP gave
    assert error_of(raw_c.ask(listen(c_id, given))) is ErrorCode.LOCAL_ADDRPORT_INUSE
    assert site.gateway_binds(HOSTS["c"]) == []
    assert site.gateway_status()["pcp"]["mappings"] == 2
    # a and b are untouched by all this
    assert get(a, f"http://{INTERNET}:8000/").startswith(f"{PUBLIC}:")
    assert get(b, f"http://{INTERNET}:8000/").startswith(f"{PUBLIC}:")

    # the seed's status file: SIGUSR1, and `ipshift rsip dump`
    gateway.signal(signal.SIGUSR1)
    wait_for("the status file", site.stat_file.exists, process=gateway)
    a_id, b_id = rows["a"][0]["client_id"], rows["b"][0]["client_id"]
    for text in (site.stat_file.read_text(),
                 site.gw.run([*RSIP, "dump", "--socket", str(site.socket)]).stdout):
        lines = text.splitlines()
        assert lines[0].startswith("RSIP server status file."), text
        assert lines[1].split() == ["Client", "Leased", "Address", "STATE", "ID", "BID", "LT",
                                    "RLT", "TUNNEL", "PROTO", "PORTS"], text
        table = [line.split() for line in lines[2:]]
        assert len(table) == 3, text  # a's block and LISTEN 80, b's block
        assert all(len(row) == 10 and row[1] == PUBLIC and row[2] == "ASSIGNED"
                   and row[8] == "TCP" for row in table), text
        assert [HOSTS["a"], f"{a_id:05d}", f"rsip{a_id}x1", f"{a_first}...(255)"] in [
            [r[0], r[3], r[7], r[9]] for r in table], text
        assert [HOSTS["a"], f"{a_id:05d}", "80(1)"] in [[r[0], r[3], r[9]] for r in table]
        assert [HOSTS["b"], f"{b_id:05d}", f"{b_first}...(255)"] in [
            [r[0], r[3], r[9]] for r in table], text

    raw_c.close()
    assert client_b.stop() == 0 and client_a.stop() == 0
    assert site.gateway_binds(HOSTS["a"]) == [] and site.gateway_binds(HOSTS["b"]) == []
    assert proc_a.poll() == 0 and proc_b.poll() == 0


# --- hostile requests and packets -----------------------------------------------------------------
def test_hostile_requests_spoofed_tunnel_packets_and_a_flood(lab: Lab, tmp_path: Path) -> None:
    site = RsipSite(lab, tmp_path / "site")
    gateway = site.start_gateway()
    a, b, c, inet = site.host("a"), site.host("b"), site.host("c"), site.inet
    start_who(inet, INTERNET, 8000)
    sink = inet.call(_udp_socket, SINK_PORT)

    # a: registered over UDP, with ipshift's UDP tunnel from a's port 4556; b: over TCP
    raw_a = RawUdp(a)
    a_id = raw_a.register(TUNNEL_PORT)
    a_bind, a_first, a_last = block_of(raw_a.assign(a_id))
    tunnel_a = a.call(_udp_socket, TUNNEL_PORT)
    raw_b = RawTcp(b)
    answer = raw_b.ask(wire.register_request())
    assert answer.type is MessageType.REGISTER_RESPONSE, answer
    b_id = answer.require(wire.ClientId).value
    b_bind, b_first, _ = block_of(raw_b.ask(rsap(b_id)))
    binds_before = site.gateway_status()["binds"]
    malformed_before = site.gateway_status()["malformed"]

    # 6. malformed input over UDP: each answered with its code, echoing the counter
    sent_before = raw_a.sent
    for what, build, code in MALFORMED + MALFORMED_UDP:
        counter = raw_a.next_counter()
        data = build(counter)
        answer = raw_a.ask(data, counter if counter_param(counter) in data else None)
        assert error_of(answer) is code, what
        if counter_param(counter) in data:
            assert answer.counter == counter, what
    udp_malformed = raw_a.sent - sent_before
    # ... and over TCP: one connection for what keeps the framing, one each for what loses it
    keeping, losing = MALFORMED[:-FRAMING_LOST], MALFORMED[-FRAMING_LOST:]
    tcp = RawTcp(a)
    for what, build, code in keeping:
        assert error_of(tcp.ask(build(None))) is code, what
    # (the connection still works: a real request after the malformed ones)
    assert error_of(tcp.ask(rsap(b_id))) is ErrorCode.BAD_CLIENT_ID
    tcp.close()
    for what, build, code in losing:
        tcp = RawTcp(a)
        assert error_of(tcp.ask(build(None))) is code, what
        assert tcp.closed_by_gateway(), f"{what}: the stream lost its framing, yet stays open"
        tcp.close()
    status = site.gateway_status()
    assert status["malformed"] == malformed_before + udp_malformed + len(MALFORMED), status

    # requests the codec accepts but the gateway must refuse, over UDP and over TCP
    def refused(counter: int | None) -> list[tuple[str, Message, ErrorCode]]:
        dont_care = Address.dont_care()
        return [
            ("ASSIGN naming b's client ID", rsap(b_id, counter=counter),
             ErrorCode.BAD_CLIENT_ID),
            ("FREE of b's bind", wire.free_request(b_id, b_bind, counter=counter),
             ErrorCode.BAD_CLIENT_ID),
            ("EXTEND of b's bind", wire.extend_request(b_id, b_bind, counter=counter),
             ErrorCode.BAD_CLIENT_ID),
            ("RSIPSEC", wire.assign_request_rsipsec(a_id, dont_care, Ports.any(1), dont_care,
                                                    Ports.any(1), Spi.any(1),
                                                    counter=counter),
             ErrorCode.IPSEC_UNALLOWED),
            ("an L2TP tunnel", rsap(a_id, tunnel=TunnelType.L2TP, counter=counter),
             ErrorCode.BAD_TUNNEL_TYPE),
        ]

    tcp = RawTcp(a)
    for what, message, code in refused(None):
        assert error_of(tcp.ask(message)) is code, f"{what} over TCP"
    tcp.close()
    for what, message, code in refused(0):
        counter = raw_a.next_counter()
        answer = raw_a.ask(message.with_counter(counter))
        assert error_of(answer) is code, f"{what} over UDP"
        assert answer.counter == counter, what
    answer = raw_a.ask(wire.register_request())  # over UDP without a message counter
    assert error_of(answer) is ErrorCode.MESSAGE_COUNTER_REQUIRED
    # nothing was leased, freed or extended by any of it
    status = site.gateway_status()
    assert [(r["client"], r["bind_id"], r["first"], r["count"]) for r in status["binds"]] == [
        (r["client"], r["bind_id"], r["first"], r["count"]) for r in binds_before]
    assert status["malformed"] == malformed_before + udp_malformed + len(MALFORMED)
    assert status["errors"].get("BAD_CLIENT_ID", 0) >= 6

    # requests from the external side: nothing answers, nothing is counted
    counted = {k: status[k] for k in ("requests", "errors", "malformed")}
    from_inet = RawUdp(inet)
    register = wire.encode(wire.register_request(counter=1))
    assert from_inet.silent(register, (PUBLIC, wire.PORT))
    inet.route_add(f"{GATEWAY_INT}/32", "via", PUBLIC)  # even routed to the inside address
    assert from_inet.silent(register, (GATEWAY_INT, wire.PORT))
    for target in (PUBLIC, GATEWAY_INT):
        with pytest.raises(OSError):
            inet.call(socket.create_connection, (target, wire.PORT), 2).close()
    inet.ip("route", "del", f"{GATEWAY_INT}/32")
    from_inet.close()
    status = site.gateway_status()
    assert {k: status[k] for k in ("requests", "errors", "malformed")} == counted
    assert not any(r["client"] == INTERNET for r in status["binds"])

    # 7. the data plane: a sends from its block (forwarded) and from what is not its own
    def peer_counters() -> dict[str, int]:
        result: dict[str, int] = site.gateway_status()["tunnel"]["clients"][tunnel_name(a_id)]
        return result

    before = peer_counters()
    gw_tunnel = (GATEWAY_INT, TUNNEL_PORT)
    tunnel_a.sendto(inner_udp(PUBLIC, a_first, b"from a's block"), gw_tunnel)
    first_got = receive_all(sink, b"from a's block")
    assert first_got == [(b"from a's block", (PUBLIC, a_first))]
    spoofed = [(PUBLIC, 40000), (PUBLIC, b_first), (HOSTS["b"], 40000),
               ("198.51.100.7", a_first)]
    for source, port in spoofed:
        tunnel_a.sendto(inner_udp(source, port, f"spoofed {source}:{port}".encode()), gw_tunnel)
    tunnel_a.sendto(inner_udp(PUBLIC, a_last, b"from a's block again"), gw_tunnel)
    assert receive_all(sink, b"from a's block again") == [
        (b"from a's block again", (PUBLIC, a_last))]
    after = peer_counters()
    assert after["foreign_source"] - before["foreign_source"] == len(spoofed), (before, after)
    assert site.gateway_status()["tunnel"]["counters"]["foreign_source"] >= len(spoofed)

    # a flood of random datagrams, and a TCP stream of random bytes, from a
    rss_before = rss_kib(gateway.pid)
    malformed = site.gateway_status()["malformed"]

    def flood() -> int:
        rng = random.Random(3103)
        sent = 0
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            deadline = time.monotonic() + 10
            # 20,000 in bursts of 250 every 0.1 s: the gateway reads them, rather than the
            # socket buffer dropping most
            while sent < 20_000 and time.monotonic() < deadline:
                for _ in range(250):
                    try:
                        sock.sendto(rng.randbytes(rng.randint(1, 600)),
                                    (GATEWAY_INT, wire.PORT))
                        sent += 1
                    except OSError:
                        pass
                time.sleep(0.1)
        try:
            with socket.create_connection((GATEWAY_INT, wire.PORT), timeout=5) as conn:
                conn.sendall(b"\x01\x02\xff\xff" + rng.randbytes(256 * 1024))
        except OSError:
            pass  # closed by the gateway once the framing was lost: as it should
        return sent

    flooded = a.call(flood)
    assert flooded > 0
    assert gateway.running(), gateway.stderr()[-3000:]
    # still answering (after the backlog): a's own registration, extended
    counter = raw_a.next_counter()
    answer = raw_a.ask(wire.extend_request(a_id, a_bind, counter=counter))
    assert answer.type is MessageType.EXTEND_RESPONSE, answer
    status = site.gateway_status()
    assert status["malformed"] > malformed
    print(f"flood: {flooded} datagrams sent, {status['malformed'] - malformed} decoded as "
          "malformed")
    grown = rss_kib(gateway.pid) - rss_before
    assert grown < 32 * 1024, f"RSS grew by {grown} KiB"

    # and a normal client still gets served
    client_c = Client(c, tmp_path)
    client_c.start()
    block = client_c.status()["binds"][0]
    address, _, seen_port = get(c, f"http://{INTERNET}:8000/").partition(":")
    assert address == PUBLIC and block["first"] <= int(seen_port) <= block["last"]
    assert client_c.stop() == 0
    assert site.gateway_binds(HOSTS["c"]) == []
    for closing in (raw_a, tunnel_a, raw_b, sink):
        closing.close()
    assert gateway.running()


# --- expiry, restart and kill -9 ------------------------------------------------------------------
def persisted_binds(site: RsipSite, client_id: int) -> set[int]:
    db = sqlite3.connect(f"file:{site.state_dir / 'rsip-default.db'}?mode=ro", uri=True)
    try:
        return {row[0] for row in db.execute("SELECT bind_id FROM binds WHERE client_id=?",
                                             (client_id,))}
    except sqlite3.Error:
        return set()
    finally:
        db.close()


def test_leases_expire_and_survive_restart_and_kill(lab: Lab, tmp_path: Path) -> None:
    site = RsipSite(lab, tmp_path / "site")
    site.start_gateway(LEASE_TIME=10)
    a, b, c = site.host("a"), site.host("b"), site.host("c")

    # 3. a bind nobody extends: a registers over UDP, takes a block (the 10 s lease), and
    # never speaks again; c runs the real client, which extends
    client_c = Client(c, tmp_path)
    proc_c = client_c.start()
    c_bind = ports_rows(site, HOSTS["c"])[0]["bind_id"]
    raw_a = RawUdp(a)
    a_id = raw_a.register()
    answer = raw_a.assign(a_id)
    a_bind, first, last = block_of(answer)
    assert answer.require(wire.LeaseTime).seconds <= 10
    assert [r["bind_id"] for r in site.gateway_binds(HOSTS["a"])] == [a_bind]
    assert lease_element(first, last) in leases_set(site)
    quarantined = site.gateway_status()["usage"]["quarantined"]

    # the gateway tells a (counter 0): the bind, then the registration
    freed = raw_a.wait_unsolicited(MessageType.FREE_RESPONSE, 40)
    assert (freed.client_id, freed.bind_id, freed.counter) == (a_id, a_bind, 0)
    gone = raw_a.wait_unsolicited(MessageType.DE_REGISTER_RESPONSE, 40)
    assert (gone.client_id, gone.counter) == (a_id, 0)
    assert site.gateway_binds(HOSTS["a"]) == []
    assert lease_element(first, last) not in leases_set(site)
    assert site.gateway_status()["usage"]["quarantined"] > quarantined
    # the block rests in quarantine: those very ports are refused for now
    a_id = raw_a.register()
    answer = raw_a.assign(a_id, Ports.block(first, last - first + 1))
    assert error_of(answer) is ErrorCode.LOCAL_ADDRPORT_INUSE
    # the client that extends kept its bind all along
    assert [r["bind_id"] for r in ports_rows(site, HOSTS["c"])] == [c_bind]
    assert client_c.stop() == 0 and proc_c.poll() == 0
    deregistered = raw_a.ask(wire.deregister_request(a_id, counter=raw_a.next_counter()))
    assert deregistered.type is MessageType.DE_REGISTER_RESPONSE

    # 4. restart: b holds a bind (a long lease), the gateway stops and starts again
    raw_b = RawUdp(b)
    b_id = raw_b.register(TUNNEL_PORT)
    b_bind, b_first, b_last = block_of(raw_b.assign(b_id, lease=600))
    assert site.stop_gateway() == 0
    assert not any(t.startswith("ipshift_rsip_") for t in gw_tables(site)), gw_tables(site)
    assert divert_rules(site) == [] and not has_device(site)
    assert len(local_rules(site)) == 1  # the local table's rule is where it was
    site.start_gateway(LEASE_TIME=10)
    assert gw_tables(site).count(GW_TABLE) == 1 and len(divert_rules(site)) == 1
    assert has_device(site) and len(local_rules(site)) == 1
    rows = site.gateway_binds(HOSTS["b"])
    assert [(r["client_id"], r["bind_id"], span(r)) for r in rows] == [
        (b_id, b_bind, (b_first, b_last))]
    assert lease_element(b_first, b_last) in leases_set(site)
    answer = raw_b.ask(wire.extend_request(b_id, b_bind, lease=600,
                                           counter=raw_b.next_counter()))
    assert answer.type is MessageType.EXTEND_RESPONSE, answer
    assert (answer.client_id, answer.bind_id) == (b_id, b_bind)
    assert tunnel_name(b_id) in site.gateway_status()["tunnel"]["clients"]

    # 9. kill -9 once a second bind is in the lease file
    b_bind2, b_first2, b_last2 = block_of(raw_b.assign(b_id, Ports.any(16), lease=600))
    wait_for("the second bind in the lease file",
             lambda: b_bind2 in persisted_binds(site, b_id), process=site.gateway)
    killed = site.gateway
    assert killed is not None
    killed.signal(signal.SIGKILL)
    killed.wait(10)
    assert gw_tables(site).count(GW_TABLE) == 1 and len(divert_rules(site)) == 1  # left
    assert not has_device(site)  # gone with the process
    site.start_gateway(LEASE_TIME=10)
    assert gw_tables(site).count(GW_TABLE) == 1 and len(divert_rules(site)) == 1
    assert has_device(site) and len(local_rules(site)) == 1
    assert not any(line.startswith("1:") for line in site.gw.ip("-4", "rule").splitlines())
    rows = sorted(site.gateway_binds(HOSTS["b"]), key=lambda r: r["bind_id"])
    assert [(r["client_id"], r["bind_id"], span(r)) for r in rows] == [
        (b_id, b_bind, (b_first, b_last)), (b_id, b_bind2, (b_first2, b_last2))]
    for first_port, last_port in ((b_first, b_last), (b_first2, b_last2)):
        assert lease_element(first_port, last_port) in leases_set(site)
    answer = raw_b.ask(wire.extend_request(b_id, b_bind2, counter=raw_b.next_counter()))
    assert answer.type is MessageType.EXTEND_RESPONSE, answer
    raw_a.close()
    raw_b.close()

    assert site.stop_gateway() == 0
    assert not any(t.startswith("ipshift_rsip_") for t in gw_tables(site))
    assert divert_rules(site) == [] and not has_device(site)


# --- PCP and the lease engine's quarantine --------------------------------------------------------
def test_a_taken_pcp_suggestion_puts_no_port_in_quarantine(lab: Lab, tmp_path: Path) -> None:
    """A NAT-PMP request whose suggested public port is taken gets another port; no port
    that nobody ever held may go into quarantine on the way (or a host could lock PORT_RANGE
    up for 120 s a port at a time with requests for taken ports)."""
    need("natpmpc")
    site = RsipSite(lab, tmp_path / "site")
    site.start_gateway(PCP="yes")
    a, c = site.host("a"), site.host("c")
    raw_a = RawUdp(a)
    a_id = raw_a.register()
    _bind, first, last = block_of(raw_a.assign(a_id))
    assert site.gateway_status()["usage"]["quarantined"] == 0
    given = []
    for private in (9100, 9101, 9102):
        out = c.run(["natpmpc", "-g", GATEWAY_INT, "-a", str(first), str(private), "tcp", "60"],
                    timeout=30).stdout
        given.append(mapped_port(out, private))
    assert not any(first <= port <= last for port in given), given
    # nothing was ever freed or expired, so nothing rests in quarantine
    quarantined = site.gateway_status()["usage"]["quarantined"]
    # the ports PCP passed over were never anyone's: RSIP can have them
    skipped = sorted(set(range(last + 1, max(given))) - set(given))
    refused = {port: error_of(answer).name for port in skipped
               if (answer := raw_a.ask(listen(a_id, port, raw_a.next_counter()))).type
               is MessageType.ERROR_RESPONSE}
    assert (quarantined, refused) == (0, {}), (
        f"PCP gave {given} for a suggestion inside a's block {first}-{last}; "
        f"{quarantined} port(s) in quarantine, never-held ports refused to RSIP: {refused}")
    raw_a.close()


def test_a_new_external_address_moves_the_pcp_mappings(lab: Lab, tmp_path: Path) -> None:
    """EXT_IF's address goes and another of POOL comes (a DHCP or PPP renumbering): the
    gateway says so, drops the PCP mappings of the old address and answers on the new one;
    the binds on the old address are reported stranded."""
    need("natpmpc")
    site = RsipSite(lab, tmp_path / "site")
    gateway = site.start_gateway(PCP="yes", POOL="203.0.113.1,203.0.113.2")
    a, c = site.host("a"), site.host("c")
    raw_a = RawUdp(a)
    raw_a.assign(raw_a.register())
    out = c.run(["natpmpc", "-g", GATEWAY_INT], timeout=30).stdout
    assert "Public IP address : 203.0.113.1" in out, out
    # the primary goes (its secondaries with it), then .2 comes alone
    site.gw.ip("addr", "flush", "dev", site.ext_if)
    site.gw.ip("addr", "add", "203.0.113.2/24", "dev", site.ext_if)
    deadline = time.monotonic() + 10
    while "changed" not in gateway.stderr() and "lost its address" not in gateway.stderr() \
            and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "EXT_IF" in gateway.stderr(), gateway.stderr()[-2000:]
    assert "which EXT_IF no longer has" in gateway.stderr()  # a's bind on .1
    deadline = time.monotonic() + 10
    out = ""
    while time.monotonic() < deadline:
        out = c.run(["natpmpc", "-g", GATEWAY_INT], timeout=30, check=False).stdout
        if "Public IP address : 203.0.113.2" in out:
            break
        time.sleep(0.2)
    assert "Public IP address : 203.0.113.2" in out, out + gateway.stderr()[-2000:]
    raw_a.close()
