"""peers: the per-packet cost of the tunnel's peer table, authentication and raw encapsulations,
each beside a baseline measured in the same run.

- Selection by inner destination (`PeerTable.select`) and the inbound source check with 1, 64
  and 10,000 peers (a mix of prefix, exact-address and port-range peers, IPv4 and IPv6),
  beside `parse_packet` of the same packets: what the hot path already pays per packet.
- Sealing and opening a 1,400-byte datagram (AES-256-GCM, in GRO/GSO batches of 44), beside
  copying the same bytes datagram by datagram, and beside ChaCha20-Poly1305 in the same loop.
- Memory per peer with 10,000 peers (tracemalloc), the time to derive a table with one peer
  changed and to apply that delta in a worker, and the snapshot size.
- The IP-in-IP and GRE codecs beside `wire.decode` of the UDP framing.

Figures are the best of several repeats, divided by the calls per repeat. Run it directly:
`.venv/bin/python -m bench.bench_peers [--quick]`; it writes bench/results/peers.json.
"""

from __future__ import annotations

import ipaddress
import sys
import time
import timeit
import tracemalloc
from collections.abc import Callable

from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import IPv6

from bench.harness import Context, Row, benchmark, format_table, write_results
from ipshift.packet import parse_packet
from ipshift.tunnel import encap, wire
from ipshift.tunnel.auth import OVERHEAD, DatagramAuth, Role
from ipshift.tunnel.config import Endpoint
from ipshift.tunnel.peers import (
    Peer,
    PeerTable,
    PortRange,
    decode_message,
    encode_delta,
    encode_table,
)

DATAGRAM = 1400  # bytes of one tunnel datagram before sealing
BATCH = 44  # datagrams of one 64 KB super-packet in batch framing
SELECT_TARGET = 2.0  # selection may cost at most this many parses


def _per_call_us(func: Callable[[], object], repeats: int, budget: float) -> float:
    """Best-of-`repeats` seconds per call, in microseconds; each repeat runs ~`budget` s."""
    timer = timeit.Timer(func)
    calls = 1
    while (elapsed := timer.timeit(calls)) < budget / 4:
        calls *= 4 if elapsed < budget / 40 else 2
    calls = max(1, int(calls * budget / max(elapsed, 1e-9)))
    return min(timer.repeat(repeat=repeats, number=calls)) / calls * 1e6


# --- tables -----------------------------------------------------------------------------------
def _endpoint(index: int) -> Endpoint:
    return Endpoint(ipaddress.ip_address(f"192.0.2.{index % 250 + 1}"), 10000 + index // 250)


def _peers(count: int) -> list[Peer]:
    """A mixed table: a third of the peers own an IPv6 /64, a third an address (IPv4 from the
    documentation ranges while they last, then IPv6), a third a range of 4,096 TCP and UDP
    ports at an IPv4 address shared by 16 peers. One peer: a /64 and an IPv4 /24."""
    if count == 1:
        return [Peer("p0", _endpoint(0), prefixes=(ipaddress.ip_network("2001:db8:1::/64"),
                                                   ipaddress.ip_network("198.51.100.0/24")))]
    peers = []
    for index in range(count):
        kind = index % 3
        third = index // 3
        if kind == 0:
            prefix = ipaddress.ip_network(f"2001:db8:{1 + third // 0x10000:x}:{third % 0x10000:x}"
                                          "::/64")
            peers.append(Peer(f"p{index}", _endpoint(index), prefixes=(prefix,)))
        elif kind == 1:
            address = (ipaddress.ip_address(f"198.51.100.{third}") if third < 256 else
                       ipaddress.ip_address(f"2001:db8:ffff::{third:x}"))
            peers.append(Peer(f"p{index}", _endpoint(index), addresses=(address,)))
        else:
            shared = ipaddress.ip_address(int(ipaddress.ip_address("203.0.113.0")) + third // 16
                                          if third // 16 < 256 else
                                          f"2001:db8:fffe::{third // 16:x}")
            first = (third % 16) * 4096
            peers.append(Peer(f"p{index}", _endpoint(index), port_ranges=(
                PortRange(shared, 6, first, first + 4095),
                PortRange(shared, 17, first, first + 4095))))
    return peers


def _packets(peers: list[Peer], count: int = 300) -> list[bytes]:
    """Packets toward the peers' entries, spread over the whole table, plus a few misses."""
    packets: list[bytes] = []
    step = max(1, len(peers) // count)
    for peer in peers[::step][:count]:
        if peer.prefixes:
            prefix = peer.prefixes[-1]
            host = str(prefix.network_address + 9)
            header = IP(dst=host) if prefix.version == 4 else IPv6(dst=host)
            packets.append(bytes(header / UDP(sport=5000, dport=53) / (b"q" * 40)))
        elif peer.addresses:
            host = str(peer.addresses[0])
            header = IP(dst=host) if peer.addresses[0].version == 4 else IPv6(dst=host)
            packets.append(bytes(header / TCP(sport=443, dport=40000, flags="A")))
        else:
            entry = peer.port_ranges[0]
            header = IP(dst=str(entry.address)) if entry.address.version == 4 else IPv6(
                dst=str(entry.address))
            packets.append(bytes(header / TCP(sport=443, dport=entry.first + 7, flags="A")))
    packets.append(bytes(IP(dst="192.0.2.250") / ICMP()))  # no peer
    return packets


def _replies(packets: list[bytes]) -> list[bytes]:
    """The same flows coming back (source and destination, ports swapped): inbound checks."""
    replies = []
    for data in packets:
        packet = IP(data) if data[0] >> 4 == 4 else IPv6(data)
        packet.src, packet.dst = packet.dst, "192.0.2.99" if data[0] >> 4 == 4 else "2001:db8::99"
        upper = packet.payload
        if hasattr(upper, "sport"):
            upper.sport, upper.dport = upper.dport, upper.sport
            del upper.chksum
        if data[0] >> 4 == 4:
            del packet.chksum
        replies.append(bytes(packet))
    return replies


def _selection_rows(count: int, measure: Callable[[Callable[[], object]], float]) -> list[Row]:
    peers = _peers(count)
    table = PeerTable(peers)
    packets = _packets(peers)
    replies = _replies(packets)
    owners = [table.select(p) for p in packets]
    assert all(o is not None for o in owners[:-1]) and owners[-1] is None
    senders = [o for o in owners if o is not None]
    assert all(table.allowed(s, r) for s, r in zip(senders, replies, strict=False))
    n = len(packets)
    select = table.select

    def select_all() -> None:
        for packet in packets:
            select(packet)

    def parse_all() -> None:
        for packet in packets:
            parse_packet(packet)

    pairs = list(zip(senders, replies, strict=False))
    verdict = table.inbound_verdict

    def check_all() -> None:
        for sender, reply in pairs:
            verdict(sender, reply)

    parse = measure(parse_all) / n
    chosen = measure(select_all) / n
    checked = measure(check_all) / len(pairs)
    ratio = chosen / parse
    rows = [
        Row(metric=f"select by inner destination, {count:,} peers", unit="us/packet",
            ipshift=chosen, baselines={"parse_packet": parse},
            target=f"<= {SELECT_TARGET:.0f}x parse", target_met=ratio <= SELECT_TARGET,
            notes=f"{ratio:.2f}x a parse; mixed prefix/exact/port-range table, IPv4+IPv6"),
        Row(metric=f"inbound source check, {count:,} peers", unit="us/packet", ipshift=checked,
            baselines={"parse_packet": parse},
            notes=f"{checked / parse:.2f}x a parse; reverse-path: the table routes the source "
                  "back to the sender"),
    ]
    if count == 1:
        only = table.only

        def fast_path() -> None:
            for _packet in packets:
                if table.only is not only:
                    raise AssertionError

        rows.append(Row(metric="one peer: table.only (no lookup)", unit="us/packet",
                        ipshift=measure(fast_path) / n, baselines={"parse_packet": parse},
                        notes="today's single-peer path: one attribute read per packet"))
    return rows


# --- authentication ---------------------------------------------------------------------------
def _auth_rows(measure: Callable[[Callable[[], object]], float]) -> list[Row]:
    key = bytes(range(32))
    header = bytes([0x20, 0, 0, 1])
    plain = b"".join(bytes([0x20, index, 0, 1]) + bytes([index]) * (DATAGRAM - 4)
                     for index in range(BATCH))
    sealed = bytearray(len(plain) + BATCH * OVERHEAD)
    opened = bytearray(len(sealed))
    sender = DatagramAuth(key, Role.INITIATOR, first_counter=time.time_ns())
    nbytes, segment = sender.seal_batch(plain, len(plain), DATAGRAM, sealed)

    def seal() -> None:
        sender.seal_batch(plain, len(plain), DATAGRAM, sealed)

    # Opening the same batch again would be refused as replays: a fresh window each time,
    # sharing the derived key (as a long-running receiver does).
    warm = DatagramAuth(key, Role.RESPONDER, first_counter=0)
    assert warm.open_batch(sealed, nbytes, segment, opened) == (len(plain), DATAGRAM)
    assert bytes(opened[:len(plain)]) == plain

    def open_() -> None:
        warm.window.__init__()  # type: ignore[misc]
        warm.open_batch(sealed, nbytes, segment, opened)

    view, source = memoryview(opened), memoryview(sealed)

    def copy() -> None:
        # The same per-datagram loop with a plain copy: what any pass over the bytes costs.
        at = 0
        for start in range(0, nbytes, segment):
            view[at:at + DATAGRAM] = source[start:start + DATAGRAM]
            at += DATAGRAM

    def aead_loop(cipher: AESGCM | ChaCha20Poly1305) -> Callable[[], None]:
        nonce, source_plain = bytes(12), memoryview(plain)

        def run() -> None:
            for start in range(0, len(plain), DATAGRAM):
                cipher.encrypt(nonce, source_plain[start + 4:start + DATAGRAM], header)

        return run

    sealed_us = measure(seal) / BATCH
    opened_us = measure(open_) / BATCH
    copied_us = measure(copy) / BATCH
    aes_us = measure(aead_loop(AESGCM(key))) / BATCH
    chacha_us = measure(aead_loop(ChaCha20Poly1305(key))) / BATCH
    one = sender.seal(header, plain[4:DATAGRAM])
    single = DatagramAuth(key, Role.RESPONDER, first_counter=0)
    single.open(one)

    def open_one() -> None:
        single.window.__init__()  # type: ignore[misc]
        single.open(one)

    return [
        Row(metric="seal a 1,400-byte datagram (batch of 44)", unit="us/datagram",
            ipshift=sealed_us, baselines={"copy": copied_us, "aes-gcm alone": aes_us,
                                          "chacha20-poly1305 alone": chacha_us},
            notes=f"AES-256-GCM; {OVERHEAD} bytes added per datagram"),
        Row(metric="open a 1,400-byte datagram (GRO batch of 44)", unit="us/datagram",
            ipshift=opened_us, baselines={"copy": copied_us, "aes-gcm alone": aes_us,
                                          "chacha20-poly1305 alone": chacha_us},
            notes="replay window, key cache, laid out as an unauthenticated batch"),
        Row(metric="seal / open one datagram alone", unit="us/datagram",
            ipshift=measure(lambda: sender.seal(header, plain[4:DATAGRAM])),
            baselines={"open": measure(open_one), "copy": copied_us}),
    ]


# --- memory and updates -----------------------------------------------------------------------
def _memory_rows(count: int, measure: Callable[[Callable[[], object]], float]) -> list[Row]:
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    peers = _peers(count)
    with_peers = tracemalloc.take_snapshot()
    table = PeerTable(peers)
    with_table = tracemalloc.take_snapshot()
    tracemalloc.stop()

    def size(newer: tracemalloc.Snapshot, older: tracemalloc.Snapshot) -> int:
        return sum(stat.size_diff for stat in newer.compare_to(older, "filename"))

    peer_bytes = size(with_peers, before) / count
    table_bytes = size(with_table, with_peers) / count
    snapshot = encode_table(table)
    changed = peers[count // 2]
    moved = Peer(changed.name, Endpoint(changed.endpoint.host, changed.endpoint.port + 5000),
                 changed.encapsulation, changed.prefixes, changed.addresses,
                 changed.port_ranges)
    newer = table.replace(moved)
    delta = encode_delta(newer.delta_since(table))
    worker = decode_message(snapshot)
    assert isinstance(worker, PeerTable)

    def apply_delta() -> None:
        message = decode_message(delta)
        assert not isinstance(message, PeerTable)
        worker.apply(message)

    build_ms = measure(lambda: PeerTable(peers)) / 1000
    return [
        Row(metric=f"memory per peer, {count:,} peers", unit="bytes/peer",
            ipshift=peer_bytes + table_bytes,
            baselines={"Peer objects": peer_bytes, "table indexes": table_bytes},
            notes=f"tracemalloc; snapshot {len(snapshot) / count:.0f} bytes/peer on the wire"),
        Row(metric=f"update one peer of {count:,} (new generation)", unit="ms",
            ipshift=measure(lambda: table.replace(moved)) / 1000,
            baselines={"build the whole table": build_ms},
            notes="copy-on-write: the index dicts copied once, the changed entries redone"),
        Row(metric=f"worker: decode and apply that delta ({len(delta)} bytes)", unit="ms",
            ipshift=measure(apply_delta) / 1000,
            baselines={"decode a full snapshot": measure(lambda: decode_message(snapshot)) / 1000},
        ),
    ]


# --- raw encapsulations -------------------------------------------------------------------------
def _encap_rows(measure: Callable[[Callable[[], object]], float]) -> list[Row]:
    inner = bytes(IP(src="198.51.100.1", dst="198.51.100.2") / TCP() / (b"z" * 1348))
    udp_datagram = wire.PLAIN_HEADER + inner
    src, dst = bytes([192, 0, 2, 1]), bytes([192, 0, 2, 2])
    ipip_packet = encap.ipip_header(src, dst, inner) + inner
    gre_packet = encap.gre_outer_header(src, dst, inner, key=7) + inner
    gre_checked = encap.gre_outer_header(src, dst, inner, key=7, checksum=True) + inner
    decode = measure(lambda: wire.decode(udp_datagram))
    return [
        Row(metric="parse IP-in-IP (outer IPv4 header included)", unit="us/packet",
            ipshift=measure(lambda: encap.parse_ipip(ipip_packet)),
            baselines={"wire.decode (UDP framing)": decode}),
        Row(metric="parse GRE with key", unit="us/packet",
            ipshift=measure(lambda: encap.parse_gre(gre_packet)),
            baselines={"wire.decode (UDP framing)": decode,
                       "GRE with key and checksum": measure(lambda: encap.parse_gre(gre_checked))},
            notes="the GRE checksum sums the whole packet"),
        Row(metric="build a GRE header with key", unit="us/packet",
            ipshift=measure(lambda: encap.gre_header(inner, key=7)),
            baselines={"with checksum": measure(lambda: encap.gre_header(inner, key=7,
                                                                         checksum=True))}),
    ]


@benchmark("peers", "peer table selection, datagram authentication, raw encapsulation codecs")
def run(ctx: Context) -> list[Row]:
    repeats, budget = (2, 0.02) if ctx.quick else (5, 0.2)

    def measure(func: Callable[[], object]) -> float:
        return _per_call_us(func, repeats, budget)

    rows: list[Row] = []
    for count in (1, 64, 10_000):
        rows += _selection_rows(count, measure)
    rows += _auth_rows(measure)
    rows += _memory_rows(1000 if ctx.quick else 10_000, measure)
    rows += _encap_rows(measure)
    return rows


def main(argv: list[str]) -> int:
    quick = "--quick" in argv
    start = time.monotonic()
    rows = run(Context(quick=quick))
    print(format_table("peers", rows))
    if not quick:
        print(f"   results: {write_results('peers', rows, time.monotonic() - start)}")
    return 1 if any(row.target_met is False for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
