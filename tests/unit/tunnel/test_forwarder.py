"""QueuePump and Forwarder end to end without root: a SOCK_SEQPACKET socket pair stands in for
each TUN queue (one record per read/write, like a TUN fd) and two UDP sockets on loopback carry
the tunnel (loopback does UDP_SEGMENT and UDP_GRO like a veth)."""

from __future__ import annotations

import os
import select
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from scapy.layers.inet import IP, UDP

from ipshift.net import udp
from ipshift.packet import vnet
from ipshift.tunnel import Counters, Forwarder, QueuePump, batch, wire
from ipshift.tunnel.config import AddressMapping
from ipshift.tunnel.rewrite import AddressRewriter
from tests.unit.tunnel.test_batch import encode
from tests.unit.tunnel.test_support import (
    assert_checksums_valid,
    complete_write,
    gso_type_for,
    segments_of,
    super_packet,
)

SUPER = vnet.VnetHeader


@dataclass
class End:
    pump: QueuePump
    tun: socket.socket  # the "kernel" side of the fake TUN queue
    sock: socket.socket
    chunk: int | None  # batch framing's chunk size; None: per-packet framing

    def datagrams_for(self, packet: bytes | bytearray, mss: int) -> int:
        """How many datagrams this end sends for a TCP super-packet (32-byte TCP header)."""
        if self.chunk is None:
            headers = (20 if packet[0] >> 4 == 4 else 40) + 32
            return -(-(len(packet) - headers) // mss)
        return -(-(len(packet) + batch.META_LEN) // self.chunk)


def _ends(chunk: int | None) -> Iterator[tuple[End, End]]:
    sa = udp.open_udp(("127.0.0.1", 0))
    sb = udp.open_udp(("127.0.0.1", 0))
    sa.connect(sb.getsockname())
    sb.connect(sa.getsockname())
    made = []
    for sock in (sa, sb):
        kernel, queue = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        for s in (kernel, queue):
            s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        queue.setblocking(False)
        made.append((End(QueuePump(queue.fileno(), sock, chunk=chunk), kernel, sock, chunk),
                     queue))
    yield made[0][0], made[1][0]
    for end, queue in made:
        for s in (end.tun, queue, end.sock):
            s.close()


@pytest.fixture(params=[None, 1468], ids=["packet-framing", "batch-framing"])
def ends(request: pytest.FixtureRequest) -> Iterator[tuple[End, End]]:
    yield from _ends(request.param)


@pytest.fixture
def batch_ends() -> Iterator[tuple[End, End]]:
    yield from _ends(1468)


def from_kernel(end: End, header: vnet.VnetHeader, packet: bytes) -> None:
    end.tun.send(header.encode() + packet)


def to_kernel(end: End, timeout: float = 2.0) -> list[tuple[vnet.VnetHeader, bytes]]:
    out = []
    while select.select([end.tun], [], [], timeout if not out else 0.05)[0]:
        header, packet = vnet.split(end.tun.recv(0x20000))
        out.append((header, bytes(packet)))
    return out


def drain_udp(end: End) -> None:
    """Pump the UDP side until nothing more arrives (up to 2 s for the first datagram)."""
    timeout = 2.0
    while select.select([end.sock], [], [], timeout)[0]:
        timeout = 0.05
        try:
            end.pump.pump_udp()
        except BlockingIOError:
            return


@pytest.mark.parametrize("version", [4, 6])
def test_super_packet_crosses_as_datagrams_and_arrives_whole(
    ends: tuple[End, End], version: int
) -> None:
    a, b = ends
    packet, start, offset = super_packet(version, 30 * 1400, flags="PA")
    header = SUPER(vnet.F_NEEDS_CSUM, gso_type_for(version), start + 32, 1400, start, offset)
    from_kernel(a, header, bytes(packet))
    a.pump.pump_tun()
    drain_udp(b)
    assert to_kernel(b) == [(header, bytes(packet))]
    assert a.pump.counters.super_packets_out == 1
    assert a.pump.counters.datagrams_out == a.datagrams_for(packet, 1400)
    assert a.pump.counters.sends == 1
    assert b.pump.counters.datagrams_in == a.datagrams_for(packet, 1400)
    assert b.pump.counters.super_packets_in == 1


def test_64k_super_packet_takes_two_sends_and_is_joined(ends: tuple[End, End]) -> None:
    a, b = ends
    packet, start, offset = super_packet(4, 46 * 1416)
    header = SUPER(vnet.F_NEEDS_CSUM, vnet.GSO_TCPV4, 52, 1416, start, offset)
    from_kernel(a, header, bytes(packet))
    a.pump.pump_tun()
    assert a.pump.counters.sends == 2
    drain_udp(b)
    assert to_kernel(b) == [(header, bytes(packet))]


def test_plain_packets_both_ways(ends: tuple[End, End]) -> None:
    a, b = ends
    ping = bytes(IP(src="203.0.113.1", dst="203.0.113.2") / UDP(sport=7, dport=7) / b"hello")
    from_kernel(a, SUPER(), ping)
    a.pump.pump_tun()
    drain_udp(b)
    assert to_kernel(b) == [(SUPER(), ping)]
    from_kernel(b, SUPER(vnet.F_DATA_VALID), ping)
    b.pump.pump_tun()
    drain_udp(a)
    assert to_kernel(a) == [(SUPER(vnet.F_DATA_VALID), ping)]


def test_malformed_datagrams_are_counted_not_fatal(ends: tuple[End, End]) -> None:
    a, b = ends
    for junk in (b"", b"\x10", b"\xff" * 100, wire.PLAIN_HEADER + b"\x45" + bytes(30)):
        a.sock.send(junk)
    ping = bytes(IP(src="203.0.113.1", dst="203.0.113.2") / UDP() / b"after")
    from_kernel(a, SUPER(), ping)
    a.pump.pump_tun()
    drain_udp(b)
    assert to_kernel(b) == [(SUPER(), ping)]
    assert b.pump.counters.malformed == 4
    assert b.pump.counters.datagrams_in == 1


def test_unsegmentable_tun_packet_is_counted(ends: tuple[End, End]) -> None:
    a, _ = ends
    from_kernel(a, SUPER(0, vnet.GSO_TCPV4, 0, 1000, 0, 0), bytes(IP() / UDP() / bytes(3000)))
    a.pump.pump_tun()
    assert a.pump.counters.bad_tun_packets == 1 and a.pump.counters.sends == 0


def test_send_to_a_closed_peer_is_counted(ends: tuple[End, End]) -> None:
    a, b = ends
    b.sock.close()
    ping = bytes(IP(src="203.0.113.1", dst="203.0.113.2") / UDP() / b"x")
    for _ in range(3):
        from_kernel(a, SUPER(), ping)
        a.pump.pump_tun()
    # the ICMP port unreachable surfaces as ECONNREFUSED on a later send or receive
    try:
        a.pump.pump_udp()
    except BlockingIOError:
        pass
    assert a.pump.counters.send_errors >= 1


def test_nothing_to_read_raises_blocking_io(ends: tuple[End, End]) -> None:
    a, _ = ends
    with pytest.raises(BlockingIOError):
        a.pump.pump_tun()
    with pytest.raises(BlockingIOError):
        a.pump.pump_udp()


def test_rewrite_hooks_keep_partial_checksums_right(ends: tuple[End, End]) -> None:
    a, b = ends
    rules = AddressRewriter(src=[AddressMapping.parse("203.0.113.1=198.51.100.77")])
    a.pump.hooks = rules.hooks(a.pump.counters)
    # out: source 203.0.113.1 becomes 198.51.100.77 (a super-packet, partial checksum)
    packet, start, offset = super_packet(4, 10 * 1000, flags="PA")
    header = SUPER(vnet.F_NEEDS_CSUM, vnet.GSO_TCPV4, 52, 1000, start, offset)
    from_kernel(a, header, bytes(packet))
    a.pump.pump_tun()
    drain_udp(b)
    ((got_header, got),) = to_kernel(b)
    parsed = assert_checksums_valid(complete_write(got_header, got))
    assert (parsed[IP].src, parsed[IP].dst) == ("198.51.100.77", "203.0.113.2")
    # back: the reply to 198.51.100.77 is addressed to 203.0.113.1 again
    reply, start, offset = super_packet(
        4, 3 * 1000, addresses=("203.0.113.2", "198.51.100.77"), flags="PA")
    from_kernel(b, SUPER(vnet.F_NEEDS_CSUM, vnet.GSO_TCPV4, 52, 1000, start, offset),
                bytes(reply))
    b.pump.pump_tun()
    drain_udp(a)
    ((got_header, got),) = to_kernel(a)
    parsed = assert_checksums_valid(complete_write(got_header, got))
    assert (parsed[IP].src, parsed[IP].dst) == ("203.0.113.2", "203.0.113.1")
    # and a plain packet with a complete checksum gets the full-checksum rule
    plain = bytes(IP(src="203.0.113.2", dst="198.51.100.77") / UDP(sport=9, dport=9) / b"x")
    from_kernel(b, SUPER(), plain)
    b.pump.pump_tun()
    drain_udp(a)
    ((got_header, got),) = to_kernel(a)
    assert assert_checksums_valid(got)[IP].dst == "203.0.113.1"
    assert a.pump.counters.rewritten == 3 and b.pump.counters.rewritten == 0


def test_forwarder_thread_moves_packets_and_stops(ends: tuple[End, End]) -> None:
    a, b = ends
    forwarders = [Forwarder([a.pump]), Forwarder([b.pump])]
    for forwarder in forwarders:
        forwarder.start()
    try:
        packets = [bytes(IP(src="203.0.113.1", dst="203.0.113.2", id=i) / UDP() / bytes(i))
                   for i in range(50)]
        for packet in packets:
            from_kernel(a, SUPER(), packet)
        got = []
        while len(got) < len(packets):
            more = to_kernel(b)
            assert more, f"only {len(got)} of {len(packets)} packets arrived"
            got += [p for _, p in more]
        assert got == packets
    finally:
        for forwarder in forwarders:
            forwarder.stop()
            forwarder.close()
    assert not any(f.alive() for f in forwarders)
    total = Counters()
    total.add(forwarders[0].counters())
    assert total.tun_reads == 50 and total.datagrams_out == 50


def test_counters_serialise() -> None:
    counters = Counters(tun_reads=3, malformed=1)
    again = Counters.from_array(counters.as_array())
    assert again == counters and again.as_dict()["tun_reads"] == 3
    assert Counters.size() == len(counters.as_dict())


def test_blocking_io_from_os_read_is_the_empty_signal() -> None:
    r, w = os.pipe()
    os.set_blocking(r, False)
    with pytest.raises(BlockingIOError):
        os.readv(r, [bytearray(10)])
    os.close(r)
    os.close(w)


def test_udp_segment_send_arrives_as_one_gro_batch() -> None:
    receiver = udp.open_udp(("127.0.0.1", 0))
    sender = udp.open_udp(("127.0.0.1", 0), receiver.getsockname())
    try:
        data = [bytes([i]) * 100 for i in range(3)] + [b"z" * 50]
        assert udp.send_segments(sender, data, 100) == 350
        buffer = bytearray(udp.MAX_RECEIVE)
        size, segment, peer = udp.receive_segments(receiver, buffer)
        # loopback keeps the GSO batch whole: one receive, the segment size in a cmsg
        assert (size, segment, peer) == (350, 100, sender.getsockname())
        assert bytes(buffer[:size]) == b"".join(data)
        udp.send_segments(sender, [b"single"], 0)
        assert udp.receive_segments(receiver, buffer)[:2] == (6, 0)
        receiver.setblocking(False)
        with pytest.raises(BlockingIOError):
            udp.receive_segments(receiver, buffer)
    finally:
        sender.close()
        receiver.close()


@pytest.mark.parametrize(
    ("name", "queues", "kwargs"),
    [("", 1, {}), ("a-name-that-is-too-long", 1, {}), ("tun/0", 1, {}), ("tun0", 0, {}),
     ("tun0", 1, {"vnet_hdr": False})],
)
def test_open_tun_checks_its_arguments(name: str, queues: int, kwargs: dict[str, bool]) -> None:
    from ipshift.net import tun

    with pytest.raises(ValueError):
        tun.open_tun(name, queues=queues, **kwargs)


# --- batch framing's loss feedback ----------------------------------------------------------------
def test_loss_report_makes_the_sender_fall_back_for_a_while(
    batch_ends: tuple[End, End],
) -> None:
    a, b = batch_ends
    packet, start, offset = super_packet(4, 30 * 1400)
    header = SUPER(vnet.F_NEEDS_CSUM, vnet.GSO_TCPV4, 52, 1400, start, offset)

    def cross() -> int:
        """Send the super-packet a -> b; the datagrams it took."""
        before = a.pump.counters.datagrams_out
        from_kernel(a, header, bytes(packet))
        a.pump.pump_tun()
        drain_udp(b)
        assert to_kernel(b) == [(header, bytes(packet))]
        return a.pump.counters.datagrams_out - before

    for _ in range(3):
        assert cross() == a.datagrams_for(packet, 1400)  # chunks
    # A report about more streams than were sent is not believed (a forgery needs no key).
    b.sock.send(batch.REPORT.pack(batch.REPORT_BYTE, 0, 0, 90, 10))
    drain_udp(a)
    assert a.pump.counters.reports_refused == 1 and a.pump.counters.fallbacks == 0
    # b saw 2 of the 3 streams arrive incomplete
    b.sock.send(batch.REPORT.pack(batch.REPORT_BYTE, 0, 0, 1, 2))
    drain_udp(a)
    assert a.pump.counters.loss_reports_received == 1 and a.pump.counters.fallbacks == 1
    assert cross() == 30  # one packet per datagram
    a.pump.fallback.until = time.monotonic() - 1  # the fallback period is over
    assert cross() == a.datagrams_for(packet, 1400)
    # a report of little loss changes nothing; a malformed one is counted
    b.sock.send(batch.REPORT.pack(batch.REPORT_BYTE, 0, 0, 1000, 1))
    b.sock.send(batch.REPORT.pack(batch.REPORT_BYTE, 1, 0, 0, 50))
    drain_udp(a)
    assert a.pump.counters.fallbacks == 1 and a.pump.counters.malformed == 1
    assert cross() == a.datagrams_for(packet, 1400)


def test_incomplete_streams_are_reported_to_the_sender(batch_ends: tuple[End, End]) -> None:
    a, b = batch_ends
    first, start, offset = super_packet(4, 20 * 1400, seq=1)
    second, _, _ = super_packet(4, 20 * 1400, seq=1 + 20 * 1400)
    encoder = batch.BatchEncoder(1468, 65507)
    for packet, skip in ((first, 3), (second, None)):
        (datagrams,) = encode(encoder, packet, start, offset, 1400)
        for index, datagram in enumerate(datagrams):
            if index != skip:
                a.sock.send(datagram)
    drain_udp(b)
    counters = b.pump.counters
    assert counters.streams_incomplete == 1 and counters.segments_recovered > 0
    assert counters.loss_reports_sent == 1
    assert select.select([a.sock], [], [], 2)[0]
    report = a.sock.recv(100)
    assert batch.REPORT.unpack(report) == (batch.REPORT_BYTE, 0, 0, 0, 1)
    written = to_kernel(b)
    assert written[-1][1] == bytes(second)  # the complete one arrives whole after the rest


def test_loss_feedback_parts() -> None:
    reporter = batch.LossReporter()
    assert reporter.due(10, 0, 1.0) is None  # no loss, no report
    first = reporter.due(10, 2, 1.0)
    assert first is not None and batch.REPORT.unpack(first)[3:] == (10, 2)
    assert reporter.due(20, 3, 1.05) is None  # too soon
    later = reporter.due(20, 3, 1.2)
    assert later is not None and batch.REPORT.unpack(later)[3:] == (10, 1)
    fallback = batch.Fallback()
    assert not fallback.active(5.0)
    assert fallback.on_report(batch.REPORT.pack(batch.REPORT_BYTE, 0, 0, 95, 5), 5.0)
    assert fallback.active(5.0 + batch.FALLBACK_SECONDS - 0.1)
    assert not fallback.active(5.0 + batch.FALLBACK_SECONDS)
    assert not fallback.on_report(batch.REPORT.pack(batch.REPORT_BYTE, 0, 0, 97, 3), 20.0)
    with pytest.raises(batch.BatchError):
        fallback.on_report(b"\x21" + bytes(12), 20.0)


def test_a_bad_datagram_of_the_other_framing_in_a_batch_counts_once(
    batch_ends: tuple[End, End],
) -> None:
    """A GRO batch may mix both framings; a malformed datagram in it is counted exactly once,
    whichever framing the batch starts with."""
    a, b = batch_ends
    ip = bytearray(596)
    ip[0], ip[2:4], ip[9] = 0x45, (596).to_bytes(2, "big"), 17
    bad_chunk = b"\x20\x00\x00\x07" + bytes(596)  # chunk 0 with a meta of zeros
    udp.send_segments(a.sock, [b"\x10\x00\x00\x00" + bytes(ip) + bad_chunk], 600)
    drain_udp(b)
    assert b.pump.counters.malformed == 1
    bad_packet = b"\x13" + bytes(599)  # version 1 with reserved flags
    udp.send_segments(a.sock, [b"\x20\x03\x00\x07" + bytes(596) + bad_packet], 600)
    drain_udp(b)
    assert b.pump.counters.malformed == 2


def test_a_loss_report_does_not_hold_back_an_open_run(batch_ends: tuple[End, End]) -> None:
    """A report right after the first half of a per-packet run: the run goes to TUN without
    waiting for another datagram."""
    a, b = batch_ends
    packet, start, offset = super_packet(4, 20 * 1400, flags="A")
    datagrams = segments_of(packet, start, offset, 1400, vnet.GSO_TCPV4)
    udp.send_segments(a.sock, [b"".join(datagrams)], len(datagrams[0]))
    a.sock.send(batch.REPORT.pack(batch.REPORT_BYTE, 0, 0, 0, 0))
    time.sleep(0.05)
    # One call: the batch (its run stays open: no PSH, so the call receives on), the report.
    b.pump.pump_udp()
    assert len(to_kernel(b, 0.3)) == 1
    assert b.pump.counters.loss_reports_received == 1
