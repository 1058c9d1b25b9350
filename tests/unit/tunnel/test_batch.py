"""Batch framing (wire version 2): a super-packet cut into chunks and assembled again, checked
against scapy. Whole streams must come out byte for byte as they went in; incomplete ones must
give exactly the inner segments whose bytes all arrived, each a valid packet; garbage must be
counted, never raised."""

from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scapy.layers.inet import TCP, UDP

from ipshift.packet import vnet
from ipshift.tunnel import batch, gso
from tests.unit.tunnel.test_support import (
    assert_checksums_valid,
    complete_write,
    gso_type_for,
    segments_of,
    super_packet,
)

SLOW = settings(deadline=None, max_examples=100,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
Write = tuple[vnet.VnetHeader, bytes]


def read_into(encoder: batch.BatchEncoder, header: vnet.VnetHeader, packet: bytes) -> None:
    """What os.readv(tun_fd, encoder.read_iov) does with a packet from TUN."""
    data = header.encode() + bytes(packet)
    for room in encoder.read_iov:
        room[:min(len(room), len(data))] = data[:len(room)]
        data = data[len(room):]
        if not data:
            return
    raise AssertionError("packet larger than the read buffer")


def encode(encoder: batch.BatchEncoder, packet: bytes | bytearray, start: int, offset: int,
           mss: int, udp: bool = False) -> list[list[bytes]]:
    """The datagrams of each UDP send for one super-packet read from TUN."""
    header_len = start + (8 if udp else (packet[start + 12] >> 4) * 4)
    header = vnet.VnetHeader(vnet.F_NEEDS_CSUM, gso_type_for(packet[0] >> 4, udp), header_len,
                             mss, start, offset)
    read_into(encoder, header, bytes(packet))
    assert encoder.vnet_fields() == (header.flags, header.gso_type, header.hdr_len,
                                     header.gso_size, header.csum_start, header.csum_offset)
    out = []
    for datagrams, segment in encoder.encode(len(packet), *encoder.vnet_fields()):
        data = bytes(datagrams)
        step = segment or len(data)
        out.append([data[at:at + step] for at in range(0, len(data), step)])
    return out


def chunk_sends(packet: bytearray, start: int, offset: int, mss: int, *, udp: bool = False,
                chunk: int = 1468, per_send_bytes: int = 65507) -> list[list[bytes]]:
    return encode(batch.BatchEncoder(chunk, per_send_bytes), packet, start, offset, mss, udp)


class Receiver:
    """A BatchAssembler fed as the forwarder feeds it, with a fake clock. Two receive buffers:
    while the assembler holds one, the next batch goes into the other (switch=True, what the
    forwarder does) or the assembler is asked to copy what it holds (switch=False)."""

    def __init__(self, hook: gso.PacketHook | None = None, *, switch: bool = True) -> None:
        self.assembler = batch.BatchAssembler()
        self.buffers = [bytearray(0x10000), bytearray(0x10000)]
        self.current = 0
        self.switch = switch
        self.hook = hook
        self.now = 100.0
        self.writes: list[Write] = []

    def batch(self, datagrams: list[bytes]) -> int:
        if not datagrams:
            return 0
        if self.assembler.held() is self.buffers[self.current]:
            if self.switch:
                self.current ^= 1
            else:
                self.assembler.materialize()
        assert self.assembler.held() is not self.buffers[self.current]
        buffer = self.buffers[self.current]
        data = b"".join(datagrams)
        segment = len(datagrams[0]) if len(datagrams) > 1 else 0
        # stale bytes from an earlier batch must not matter
        buffer[:] = b"\xee" * len(buffer)
        buffer[:len(data)] = data
        writes: list[gso.IoVec] = []
        taken = self.assembler.receive(buffer, len(data), segment, self.now, writes, self.hook)
        self._take(writes)
        return taken

    def flush(self) -> None:
        writes: list[gso.IoVec] = []
        self.assembler.flush(writes, self.hook)
        self._take(writes)

    def _take(self, writes: list[gso.IoVec]) -> None:
        for iov in writes:  # copied now: the receive buffer is overwritten next time
            header, packet = vnet.split(b"".join(bytes(part) for part in iov))
            self.writes.append((header, bytes(packet)))


def test_packets_that_are_not_cut_come_out_contiguous() -> None:
    encoder = batch.BatchEncoder(1468, 65507)
    for size in (40, 1452, 1453, 1468, 3000, 30000):
        packet = bytes(i & 0xFF for i in range(size))
        read_into(encoder, vnet.VnetHeader(), packet)
        buf, at = encoder.packet(size)
        assert bytes(buf[at:at + size]) == packet
        encoder.restore()
        assert encoder.buffer[encoder.slot:encoder.slot + 2] == b"\x20\x01"


def test_encoder_layout() -> None:
    packet, start, offset = super_packet(4, 30 * 1416)
    (send,) = chunk_sends(packet, start, offset, 1416)
    stream = bytearray()
    for index, datagram in enumerate(send):
        first, chunk_index, number = struct.unpack(">BBH", datagram[:4])
        assert (first, chunk_index, number) == (0x20, index, 1)
        stream += datagram[4:]
    assert {len(d) for d in send[:-1]} == {1472}
    meta = batch.META.unpack_from(stream)
    assert meta == (1, vnet.GSO_TCPV4, 52, 1416, 20, 16, 1468, len(packet))
    assert stream[batch.META_LEN:] == packet


@pytest.mark.parametrize("version", [4, 6])
@pytest.mark.parametrize("udp", [False, True])
def test_one_send_arrives_as_the_same_super_packet(version: int, udp: bool) -> None:
    packet, start, offset = super_packet(version, 40 * 1400 + 11, udp=udp, flags="PA")
    (send,) = chunk_sends(packet, start, offset, 1400, udp=udp)
    rx = Receiver()
    assert rx.batch(send) == len(send)
    ((header, written),) = rx.writes
    assert written == packet
    header_len = start + (8 if udp else 32)
    assert header == vnet.VnetHeader(vnet.F_NEEDS_CSUM, gso_type_for(version, udp), header_len,
                                     1400, start, offset)
    assert rx.assembler.streams == 1 and rx.assembler.pending is None


@pytest.mark.parametrize("version", [4, 6])
def test_64k_super_packet_takes_two_sends_and_is_joined(version: int) -> None:
    packet, start, offset = super_packet(version, 46 * 1416 - (20 if version == 6 else 0))
    sends = chunk_sends(packet, start, offset, 1416)
    assert len(sends) == 2
    rx = Receiver()
    rx.batch(sends[0])
    assert rx.writes == [] and rx.assembler.pending is not None
    rx.batch(sends[1])
    assert [w[1] for w in rx.writes] == [packet]


@pytest.mark.parametrize("switch", [True, False])
def test_every_split_into_batches_is_joined(switch: bool) -> None:
    packet, start, offset = super_packet(4, 20 * 1000)
    (send,) = chunk_sends(packet, start, offset, 1000, chunk=1200)
    for size in (1, 2, 3, 7):
        rx = Receiver(switch=switch)
        for at in range(0, len(send), size):
            rx.batch(send[at:at + size])
        assert [w[1] for w in rx.writes] == [packet], size


def expected_segments(packet: bytearray, start: int, offset: int, mss: int) -> list[bytes]:
    """The inner packets the kernel would cut this super-packet into (checksums completed)."""
    out = []
    for datagram in segments_of(packet, start, offset, mss, gso_type_for(packet[0] >> 4)):
        header = vnet.VnetHeader(vnet.F_NEEDS_CSUM, 0, 0, 0, start, offset)
        out.append(complete_write(header, datagram[4:]))
    return out


@pytest.mark.parametrize("lost", [1, 5, 20])
def test_lost_chunk_costs_only_the_segments_it_carried(lost: int) -> None:
    mss, chunk = 1000, 1468
    packet, start, offset = super_packet(4, 30 * mss, flags="PA")
    (send,) = chunk_sends(packet, start, offset, mss, chunk=chunk)
    rx = Receiver()
    rx.batch(send[:lost])
    rx.batch(send[lost + 1:])
    assert rx.writes == [] and rx.assembler.pending is not None
    rx.now += 2 * batch.STALE_AFTER
    writes: list[gso.IoVec] = []
    rx.assembler.expire(rx.now, writes)
    rx._take(writes)
    assert rx.assembler.lost == 1
    want = expected_segments(packet, start, offset, mss)
    header_len = start + 32
    got = []
    for header, written in rx.writes:
        assert header.gso_type == vnet.GSO_NONE and header.needs_csum
        got.append(complete_write(header, written))
    # segment i's payload is stream bytes [16 + 52 + i*mss, +mss): lost with chunk `lost`
    first_lost = (lost * chunk - batch.META_LEN - header_len) // mss
    last_lost = ((lost + 1) * chunk - 1 - batch.META_LEN - header_len) // mss
    survivors = [s for i, s in enumerate(want) if not first_lost <= i <= last_lost]
    assert got == survivors
    assert rx.assembler.recovered == len(survivors)
    for segment in got:
        assert_checksums_valid(segment)


def test_without_chunk_0_nothing_is_delivered() -> None:
    packet, start, offset = super_packet(6, 20 * 1400)
    (send,) = chunk_sends(packet, start, offset, 1400)
    rx = Receiver()
    rx.batch(send[1:])
    rx.flush()
    assert rx.writes == [] and rx.assembler.lost == 1


def test_a_new_stream_closes_the_incomplete_one() -> None:
    first, start, offset = super_packet(4, 10 * 1400, seq=1)
    second, _, _ = super_packet(4, 10 * 1400, seq=1 + 10 * 1400)
    encoder = batch.BatchEncoder(1468, 65507)

    def send(packet: bytearray) -> list[bytes]:
        (datagrams,) = encode(encoder, packet, start, offset, 1400)
        return datagrams

    one, two = send(first), send(second)
    rx = Receiver()
    rx.batch(one[:-1])  # its last chunk never comes
    rx.batch(two)
    assert rx.assembler.lost == 1
    assert rx.writes[-1][1] == second
    recovered = [complete_write(h, p) for h, p in rx.writes[:-1]]
    assert recovered == expected_segments(first, start, offset, 1400)[:len(recovered)]
    assert len(recovered) == 9  # all but the one in the missing last chunk


def test_duplicate_chunks_are_ignored() -> None:
    packet, start, offset = super_packet(4, 10 * 1400)
    (send,) = chunk_sends(packet, start, offset, 1400)
    rx = Receiver()
    rx.batch(send[:4])
    rx.batch(send[2:6])
    rx.batch(send[6:])
    assert [w[1] for w in rx.writes] == [packet]


def test_hook_rewrites_the_assembled_super_packet() -> None:
    packet, start, offset = super_packet(4, 10 * 1400)
    (send,) = chunk_sends(packet, start, offset, 1400)
    seen: list[int] = []

    def hook(buf: bytearray, at: int, partial: bool) -> bool:
        assert partial
        seen.append(buf[at + 8])
        buf[at + 8] = 7  # TTL, as a stand-in for a rewrite
        return True

    rx = Receiver(hook)
    rx.batch(send)
    ((_header, written),) = rx.writes
    assert seen == [64] and written[8] == 7 and written[9:] == packet[9:]
    rx = Receiver(lambda buf, at, partial: False)
    rx.batch(send)
    assert rx.writes == []


def test_a_last_chunk_past_the_last_whole_slot_of_the_buffer() -> None:
    """A stream whose short last chunk lies beyond the buffer's last whole slot: one GRO batch
    of both sends of a 45-chunk stream, or a 64-chunk stream after its chunk 0."""
    packet, start, offset = super_packet(4, 64900)
    datagrams = [d for send in chunk_sends(packet, start, offset, 1448) for d in send]
    assert len(datagrams) == 45
    rx = Receiver()
    assert rx.batch(datagrams) == 45
    assert [w[1] for w in rx.writes] == [packet]
    packet, start, offset = super_packet(4, 65348)
    datagrams = [d for send in chunk_sends(packet, start, offset, 1000, chunk=1038)
                 for d in send]
    assert len(datagrams) == 64
    rx = Receiver()
    rx.batch(datagrams[:1])
    rx.batch(datagrams[1:])
    assert [w[1] for w in rx.writes] == [packet]


def test_a_hook_sees_each_stream_of_one_batch_in_its_own_buffer() -> None:
    encoder = batch.BatchEncoder(1468, 65507)
    size = 3 * 1468 - batch.META_LEN - 52  # exactly three full chunks
    packets = [super_packet(4, size, seq=seq, seed=seed) for seq, seed in ((1, 1), (9999, 2))]
    sends = [encode(encoder, packet, start, offset, 1000) for packet, start, offset in packets]
    rx = Receiver(hook=lambda buf, at, partial: True)
    rx.batch(sends[0][0] + sends[1][0])
    assert [w[1] for w in rx.writes] == [p for p, _, _ in packets]


def test_recovery_needs_the_headers() -> None:
    """A stream whose L4 header would lie in a lost chunk (a hostile csum_start) rebuilds
    nothing rather than segments with stale headers."""
    packet, start, offset = super_packet(6, 10 * 1400)
    (send,) = chunk_sends(packet, start, offset, 1400)
    rx = Receiver()
    rx.batch([send[0], *send[2:]])
    rx.flush()
    assert rx.assembler.recovered == len(rx.writes) > 0  # chunk 1 lost: the others' segments
    hostile = bytearray(send[0])
    struct.pack_into(">H", hostile, batch.CHUNK_LEN + 6, 1480)  # csum_start: in chunk 1
    rx = Receiver()
    # What an earlier stream left where the lost L4 header would go: a plausible TCP header.
    stale = vnet.HEADER_LEN + 1480
    rx.assembler._scratch[stale:stale + 20] = bytes(12) + b"\x50" + bytes(7)
    rx.batch([bytes(hostile), *send[2:]])
    rx.flush()
    assert rx.writes == [] and rx.assembler.recovered == 0


def test_packet_error_needs_a_whole_ipv4_header() -> None:
    packet = bytearray(3000)
    packet[0], packet[2:4], packet[9], packet[12] = 0x40, (3000).to_bytes(2, "big"), 6, 0x50
    assert batch.packet_error(packet, 3000, vnet.GSO_TCPV4, 1000, 0, 16) is not None
    packet[0], packet[32] = 0x45, 0x50
    assert batch.packet_error(packet, 3000, vnet.GSO_TCPV4, 1000, 20, 16) is None


@pytest.mark.parametrize("damage", ["version", "length", "gso", "flags", "hdr-len", "chunk-size"])
def test_malformed_streams_are_counted_and_dropped(damage: str) -> None:
    packet, start, offset = super_packet(4, 10 * 1400)
    (send,) = chunk_sends(packet, start, offset, 1400)
    first = bytearray(send[0])
    if damage == "version":
        first[0] = 0x2F  # reserved flags
    elif damage == "length":
        first[4 + 16 + 2] ^= 0x01  # inner IPv4 total length no longer the stream's
    elif damage == "gso":
        first[4 + 1] = 9
    elif damage == "flags":
        first[4] = 0
    elif damage == "hdr-len":
        first[4 + 2:4 + 4] = b"\xff\xff"  # headers longer than the packet
    else:
        first[4 + 12:4 + 14] = (1000).to_bytes(2, "big")
    rx = Receiver()
    rx.batch([bytes(first), *send[1:]])
    rx.flush()
    assert all(h.gso_type == vnet.GSO_NONE for h, _ in rx.writes)
    assert rx.assembler.malformed >= 1
    assert not any(w[1] == packet for w in rx.writes)


@settings(deadline=None, max_examples=400)
@given(data=st.binary(min_size=0, max_size=4000), segment=st.integers(0, 1500),
       header=st.binary(min_size=4, max_size=4))
def test_receive_fuzz(data: bytes, segment: int, header: bytes) -> None:
    rx = Receiver()
    chunked = b"\x20" + header[1:] + data
    if segment and segment < len(chunked):
        datagrams = [chunked[at:at + segment] for at in range(0, len(chunked), segment)]
    else:
        datagrams = [chunked]
    rx.batch(datagrams)
    rx.flush()
    for header_, packet in rx.writes:  # anything written was checked first
        assert header_.gso_type == vnet.GSO_NONE or len(packet) >= 40


@SLOW
@given(
    version=st.sampled_from([4, 6]),
    udp=st.booleans(),
    mss=st.integers(200, 1440),
    payload=st.integers(1, 60_000),
    chunk=st.integers(512, 1500),
    seq=st.integers(0, 2**32 - 1),
    lost=st.sets(st.integers(0, 130), max_size=4),
    per_batch=st.integers(1, 64),
    switch=st.booleans(),
)
def test_assembly_property(version: int, udp: bool, mss: int, payload: int, chunk: int,
                           seq: int, lost: set[int], per_batch: int, switch: bool) -> None:
    packet, start, offset = super_packet(version, payload, udp=udp, seq=seq)
    if -(-payload // mss) > 1000 or len(packet) + batch.META_LEN > 256 * chunk:
        return
    sends = chunk_sends(packet, start, offset, mss, udp=udp, chunk=chunk)
    if not sends:
        return  # one segment: sent as a version 1 packet
    datagrams = [d for send in sends for d in send]
    kept = [d for i, d in enumerate(datagrams) if i not in lost]
    rx = Receiver(switch=switch)
    for at in range(0, len(kept), per_batch):
        rx.batch(kept[at:at + per_batch])
    rx.flush()
    if len(kept) == len(datagrams):
        assert [w[1] for w in rx.writes] == [packet]
        return
    want = segments_of(packet, start, offset, mss, gso_type_for(version, udp))
    want_packets = [complete_write(vnet.VnetHeader(vnet.F_NEEDS_CSUM, 0, 0, 0, start, offset),
                                   d[4:]) for d in want]
    got = [complete_write(h, p) for h, p in rx.writes]
    if 0 in lost:
        assert got == []
    # every delivered segment is one the kernel would have cut, in order, checksums right
    it = iter(want_packets)
    for segment in got:
        assert segment in it
        parsed = assert_checksums_valid(segment)
        assert (UDP if udp else TCP) in parsed
