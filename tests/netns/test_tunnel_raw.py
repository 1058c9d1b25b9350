"""The raw link against scapy across a veth: IP-in-IP and GRE as real peers see them.

    link (RawLink: 192.0.2.1, 2001:db8:1::1) --veth-- far (scapy: 192.0.2.2/.3, 2001:db8:1::2/::3)

What RawLink sends is snooped on far's end of the veth (AF_PACKET) and dissected by scapy,
which recomputes every checksum; what scapy builds is sent from far through raw IP sockets and
must come out of RawLink.receive() (or be counted as malformed)."""

from __future__ import annotations

import ipaddress
import select
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import GRE
from scapy.packet import Packet as ScapyPacket
from scapy.packet import Raw

from ipshift.lab import Lab
from ipshift.net.packetsock import PacketSocket, Snooped
from ipshift.net.rawsock import RawSocket
from ipshift.packet import vnet
from ipshift.tunnel.config import Endpoint
from ipshift.tunnel.peers import Encapsulation, Peer, endpoint_key
from ipshift.tunnel.raw import RawArrival, RawLink
from tests.unit.tunnel.test_support import (
    assert_checksums_valid,
    gso_type_for,
    payload_bytes,
    super_packet,
)

pytestmark = pytest.mark.netns

LINK = {4: "192.0.2.1", 6: "2001:db8:1::1"}
FAR = {4: "192.0.2.2", 6: "2001:db8:1::2"}
FAR_OTHER = {4: "192.0.2.3", 6: "2001:db8:1::3"}
INNER = {4: ("198.51.100.1", "198.51.100.2"), 6: ("2001:db8:2::1", "2001:db8:2::2")}
OFFSET = vnet.HEADER_LEN
TOS = 0xB8  # DSCP EF: copied to the outer header
WAIT_SECONDS = 5.0
SETTLE_SECONDS = 0.3  # how long nothing more may arrive after the last expected packet


class Site:
    def __init__(self, lab: Lab) -> None:
        self.link = lab.host("link")
        self.far = lab.host("far")
        veth = lab.link(self.link, self.far, "192.0.2.1/24", ["192.0.2.2/24", "192.0.2.3/24"],
                        v6=("2001:db8:1::1/64", "2001:db8:1::2/64"))
        self.far.addr_add(veth.end(self.far).ifname, "2001:db8:1::3/64")
        self.far_ifname = veth.end(self.far).ifname
        # Neighbours resolved up front: no first packet waits in a neighbour queue.
        for version in (4, 6):
            for source in (FAR, FAR_OTHER):
                self.far.run(["ping", f"-{version}", "-c", "1", "-W", "2", "-I",
                              source[version], LINK[version]])

    def raw_link(self, **options: Any) -> RawLink:
        return RawLink([ipaddress.ip_address(LINK[4]), ipaddress.ip_address(LINK[6])],
                       netns_name=self.link.ns, **options)


@pytest.fixture(scope="module")
def site() -> Iterator[Site]:
    with Lab("tunnel-raw") as lab:
        yield Site(lab)


@pytest.fixture
def raw_link(site: Site) -> Iterator[RawLink]:
    with site.raw_link() as link:
        yield link


def peer(version: int, encapsulation: Encapsulation, key: int | None = None) -> Peer:
    return Peer(f"{encapsulation}{version}", Endpoint(ipaddress.ip_address(FAR[version]), 0),
                encapsulation, gre_key=key)


# --- waiting, bounded -------------------------------------------------------------------------
def snooped(sniffer: PacketSocket, wanted: Callable[[Snooped], bool], count: int
            ) -> list[Snooped]:
    """`count` packets that `wanted` keeps, then whatever else it keeps within the settle
    time (so that extra packets are seen); bounded by WAIT_SECONDS."""
    got: list[Snooped] = []
    deadline = time.monotonic() + WAIT_SECONDS
    settle_until: float | None = None
    while True:
        now = time.monotonic()
        limit = deadline if settle_until is None else min(deadline, settle_until)
        if now >= limit:
            return got
        select.select([sniffer.fileno()], [], [], limit - now)
        got += [p for p in sniffer.recv_batch() if wanted(p)]
        if len(got) >= count and settle_until is None:
            settle_until = time.monotonic() + SETTLE_SECONDS


def arrivals(link: RawLink, done: Callable[[list[tuple[RawArrival, bytes]]], bool]
             ) -> list[tuple[RawArrival, bytes]]:
    """What link.receive() returns from all its sockets (with each inner packet copied) until
    `done` says so, then within the settle time; bounded by WAIT_SECONDS."""
    got: list[tuple[RawArrival, bytes]] = []
    deadline = time.monotonic() + WAIT_SECONDS
    settle_until: float | None = None
    while True:
        now = time.monotonic()
        limit = deadline if settle_until is None else min(deadline, settle_until)
        if now >= limit:
            return got
        ready, _, _ = select.select(link.fds(), [], [], limit - now)
        for fd in ready:
            got += [(arrival, bytes(arrival.inner)) for arrival in link.receive(fd)]
        if settle_until is None and done(got):
            settle_until = time.monotonic() + SETTLE_SECONDS


# --- sending: RawLink -> scapy ----------------------------------------------------------------
def outer_of(data: bytes, version: int) -> ScapyPacket:
    return IP(data) if version == 4 else IPv6(data)


def check_outer(outer: ScapyPacket, data: bytes, underlay: int, protocol: int) -> bytes:
    """Check the outer header (and GRE header) RawLink's kernel built; return the inner
    packet's bytes."""
    if underlay == 4:
        assert (outer.src, outer.dst, outer.proto) == (LINK[4], FAR[4], protocol)
        assert outer.tos == TOS
        rebuilt = outer.copy()
        del rebuilt.chksum
        assert bytes(rebuilt)[:20] == data[:20]  # the outer header checksum, by scapy
        payload = bytes(outer.payload)
    else:
        assert (outer.src, outer.dst, outer.nh) == (LINK[6], FAR[6], protocol)
        assert outer.tc == TOS
        payload = bytes(outer.payload)
    return payload


def inner_of(payload: bytes, encapsulation: Encapsulation, inner_version: int,
             key: int | None) -> bytes:
    if encapsulation is Encapsulation.IPIP:
        return payload
    gre = GRE(payload)
    assert (gre.chksum_present, gre.routing_present, gre.seqnum_present, gre.version) == (
        0, 0, 0, 0)
    assert gre.proto == (0x0800 if inner_version == 4 else 0x86DD)
    assert gre.key_present == (key is not None)
    if key is not None:
        assert gre.key == key
    return bytes(gre.payload)


SEND_CASES = [
    pytest.param(Encapsulation.IPIP, None, id="ipip"),
    pytest.param(Encapsulation.GRE, None, id="gre"),
    pytest.param(Encapsulation.GRE, 0xC0FFEE, id="gre-key"),
]


@pytest.mark.parametrize("underlay", [4, 6])
@pytest.mark.parametrize("inner_version", [4, 6])
@pytest.mark.parametrize(("encapsulation", "key"), SEND_CASES)
@pytest.mark.parametrize("tso", [False, True], ids=["udp", "tcp-tso"])
def test_sent_packets_reach_scapy_complete_and_correct(
    site: Site, raw_link: RawLink, underlay: int, inner_version: int,
    encapsulation: Encapsulation, key: int | None, tso: bool,
) -> None:
    mss, payload = 1000, (4500 if tso else 300)
    packet, csum_start, csum_offset = super_packet(
        inner_version, payload, udp=not tso, tos=TOS, addresses=INNER[inner_version],
        seed=underlay)
    count = -(-payload // mss)
    original = outer_of(bytes(packet), inner_version)
    buf = bytearray(OFFSET) + packet
    protocol = 47 if encapsulation is Encapsulation.GRE else (4 if inner_version == 4 else 41)
    source = LINK[underlay]

    def ours(p: Snooped) -> bool:
        outer = outer_of(p.data, underlay)
        next_header = outer.proto if underlay == 4 else outer.nh
        return bool(outer.src == source and next_header == protocol)

    with PacketSocket(site.far_ifname, netns=site.far.ns, direction="in") as sniffer:
        sent = raw_link.send(
            peer(underlay, encapsulation, key), buf, OFFSET, len(buf), vnet.F_NEEDS_CSUM,
            gso_type_for(inner_version, udp=not tso) if tso else vnet.GSO_NONE, mss,
            csum_start, csum_offset)
        assert sent == count and raw_link.send_errors == 0
        seen = snooped(sniffer, ours, count)
    assert len(seen) == count
    data = payload_bytes(payload, underlay)
    joined = b""
    for index, snoop in enumerate(seen):
        outer = outer_of(snoop.data, underlay)
        inner = inner_of(check_outer(outer, snoop.data, underlay, protocol),
                         encapsulation, inner_version, key)
        parsed = assert_checksums_valid(inner)  # scapy recomputes the inner checksums
        assert (parsed.src, parsed.dst) == INNER[inner_version]
        if tso:
            assert parsed[TCP].seq == original[TCP].seq + index * mss
            piece = bytes(parsed[TCP].payload)
        else:
            piece = bytes(parsed[UDP].payload)
        assert piece == data[index * mss:(index + 1) * mss]
        joined += piece
    assert joined == data


# --- receiving: scapy -> RawLink --------------------------------------------------------------
def inner_packet(version: int, text: bytes) -> bytes:
    src, dst = INNER[version]
    ip = IP(src=dst, dst=src) if version == 4 else IPv6(src=dst, dst=src)
    return bytes(ip / UDP(sport=5353, dport=40000) / Raw(text))


def send_from_far(site: Site, packets: list[bytes]) -> None:
    """Send whole packets (outer header included, built by scapy) from far."""
    with RawSocket(socket.AF_INET, netns=site.far.ns) as raw4, \
            RawSocket(socket.AF_INET6, netns=site.far.ns) as raw6:
        for packet in packets:
            (raw4 if packet[0] >> 4 == 4 else raw6).send(packet)


def outer(underlay: int, source: dict[int, str] = FAR) -> ScapyPacket:
    """The outer header of a GRE packet (the protocol given: some are followed by raw bytes)."""
    if underlay == 4:
        return IP(src=source[4], dst=LINK[4], proto=47)
    return IPv6(src=source[6], dst=LINK[6], nh=47)


def ipip_outer(underlay: int, inner_version: int) -> ScapyPacket:
    protocol = 4 if inner_version == 4 else 41
    if underlay == 4:
        return IP(src=FAR[4], dst=LINK[4], proto=protocol)
    return IPv6(src=FAR[6], dst=LINK[6], nh=protocol)


def gre(inner_version: int, **fields: Any) -> ScapyPacket:
    return GRE(proto=0x0800 if inner_version == 4 else 0x86DD, **fields)


RECEIVE_CASES: list[tuple[str, Encapsulation, int, int, dict[str, Any]]] = [
    # (name, encapsulation, inner version, selector expected, GRE fields)
    ("ipip4", Encapsulation.IPIP, 4, 0, {}),
    ("ipip6", Encapsulation.IPIP, 6, 0, {}),
    ("gre4", Encapsulation.GRE, 4, 0, {}),
    ("gre6-key", Encapsulation.GRE, 6, 7, {"key_present": 1, "key": 7}),
    ("gre4-csum", Encapsulation.GRE, 4, 0, {"chksum_present": 1}),
    ("gre6-csum-key-seq", Encapsulation.GRE, 6, 0xFFFFFFFF,
     {"chksum_present": 1, "key_present": 1, "key": 0xFFFFFFFF, "seqnum_present": 1,
      "sequence_number": 42}),
]


def encapsulated(underlay: int, case: tuple[str, Encapsulation, int, int, dict[str, Any]],
                 inner: bytes) -> bytes:
    _name, encapsulation, inner_version, _selector, fields = case
    if encapsulation is Encapsulation.IPIP:
        return bytes(ipip_outer(underlay, inner_version) / Raw(inner))
    return bytes(outer(underlay) / gre(inner_version, **fields) / Raw(inner))


@pytest.mark.parametrize("underlay", [4, 6])
def test_scapy_packets_come_out_of_receive(site: Site, raw_link: RawLink, underlay: int
                                           ) -> None:
    expected = {}
    packets = []
    for case in RECEIVE_CASES:
        name, encapsulation, inner_version, selector, _fields = case
        inner = inner_packet(inner_version, f"{name} over IPv{underlay}".encode())
        expected[inner] = (encapsulation, selector)
        packets.append(encapsulated(underlay, case, inner))
    send_from_far(site, packets)
    got = arrivals(raw_link, lambda got: len(got) >= len(expected))
    assert sorted(inner for _arrival, inner in got) == sorted(expected)
    for arrival, inner in got:
        assert arrival.host == FAR[underlay]
        assert (arrival.encapsulation, arrival.selector) == expected[inner]
    assert not raw_link.malformed and raw_link.receive_errors == 0


def test_receive_names_senders_as_the_peer_table_does(site: Site, raw_link: RawLink) -> None:
    keyed = peer(6, Encapsulation.GRE, key=7)
    inner = inner_packet(4, b"to a keyed peer")
    send_from_far(site, [bytes(outer(6) / gre(4, key_present=1, key=7) / Raw(inner))])
    ((arrival, _inner),) = arrivals(raw_link, lambda got: len(got) >= 1)
    assert (arrival.host, arrival.selector) == endpoint_key(keyed)


MALFORMED: list[tuple[str, Callable[[int], bytes]]] = [
    ("bad-version", lambda u: bytes(outer(u) / gre(4, version=1) / Raw(inner_packet(4, b"v1")))),
    ("bad-flags", lambda u: bytes(outer(u) / gre(4, routing_present=1)
                                  / Raw(inner_packet(4, b"routing")))),
    ("bad-payload", lambda u: bytes(outer(u) / GRE(proto=0x6558) / Raw(bytes(60)))),
    ("truncated", lambda u: bytes(outer(u) / Raw(b"\x20\x00\x08\x00\x00"))),  # key cut short
    ("truncated", lambda u: bytes(outer(u) / Raw(b"\x00\x00"))),  # no whole GRE header
    ("bad-checksum", lambda u: bytes(outer(u) / gre(4, chksum_present=1, chksum=0x1234)
                                     / Raw(inner_packet(4, b"bad sum")))),
    ("bad-inner", lambda u: bytes(outer(u) / gre(6) / Raw(inner_packet(4, b"v4 as v6")))),
    ("bad-inner", lambda u: bytes(outer(u) / gre(4) / Raw(inner_packet(4, b"cut")[:-2]))),
]


@pytest.mark.parametrize("underlay", [4, 6])
def test_malformed_packets_are_counted_not_returned(site: Site, raw_link: RawLink,
                                                    underlay: int) -> None:
    bad = [build(underlay) for _reason, build in MALFORMED]
    ipip_bad = bytes(ipip_outer(underlay, 4) / Raw(inner_packet(6, b"v6 inside protocol 4")))
    # A good packet after the bad ones on each socket: once they are back, all were read.
    sentinels = [inner_packet(4, b"sentinel gre"), inner_packet(4, b"sentinel ipip")]
    send_from_far(site, [*bad, ipip_bad,
                         bytes(outer(underlay) / gre(4) / Raw(sentinels[0])),
                         bytes(ipip_outer(underlay, 4) / Raw(sentinels[1]))])
    got = arrivals(raw_link, lambda got: len(got) >= 2)
    assert sorted(inner for _arrival, inner in got) == sorted(sentinels)
    expected: dict[str, int] = {}
    for reason, _build in MALFORMED:
        expected[reason] = expected.get(reason, 0) + 1
    expected["bad-inner"] += 1  # the IPv6 packet announced as IPv4
    assert dict(raw_link.malformed) == expected


# --- several links in one namespace -----------------------------------------------------------
@pytest.mark.parametrize("underlay", [4, 6])
def test_shared_links_each_take_their_senders_once(site: Site, underlay: int) -> None:
    # The last 32 bits of .2 / ::2 are even, of .3 / ::3 odd: links 0 and 1 of 2.
    with site.raw_link(share=(0, 2)) as even, site.raw_link(share=(1, 2)) as odd:
        first = inner_packet(4, b"from the even sender")
        second = inner_packet(4, b"from the odd sender")
        send_from_far(site, [bytes(outer(underlay, FAR) / gre(4) / Raw(first)),
                             bytes(outer(underlay, FAR_OTHER) / gre(4) / Raw(second))])
        got_even = arrivals(even, lambda got: len(got) >= 1)
        got_odd = arrivals(odd, lambda got: len(got) >= 1)
    assert [(a.host, inner) for a, inner in got_even] == [(FAR[underlay], first)]
    assert [(a.host, inner) for a, inner in got_odd] == [(FAR_OTHER[underlay], second)]
