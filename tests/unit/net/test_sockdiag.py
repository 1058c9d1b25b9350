"""sock_diag message building and parsing (own implementation), incl. fuzzing."""

import socket
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ipshift.net.errors import ParseError
from ipshift.net.sockdiag import (
    INET_DIAG_MARK,
    MSG_LEN,
    NLM_F_ACK,
    NLM_F_DUMP,
    NLM_F_REQUEST,
    REQ_LEN,
    SOCK_DESTROY,
    SOCK_DIAG_BY_FAMILY,
    SocketInfo,
    _norm,
    _same,
    build_destroy_request,
    build_dump_request,
    pack_sockid,
    parse_messages,
    parse_socket_info,
)


def _diag_msg(family, state, src, sport, dst, dport, *, cookie=0x1_0000_0002, uid=1000,
              inode=4242, mark=None, seq=1):
    sockid = pack_sockid(family, src, sport, dst, dport, 3, cookie)
    body = struct.pack("=BBBB", family, state, 0, 0) + sockid
    body += struct.pack("=IIIII", 0, 5, 6, uid, inode)
    if mark is not None:
        body += struct.pack("=HHI", 8, INET_DIAG_MARK, mark)
    return struct.pack("=IHHII", 16 + len(body), SOCK_DIAG_BY_FAMILY, 2, seq, 0) + body


def _done(seq=1, error=0):
    return struct.pack("=IHHIIi", 20, 3, 2, seq, 0, error)


def _error(seq=1, error=-95):
    return struct.pack("=IHHIIi", 36, 2, 0, seq, 0, error) + bytes(16)


def test_dump_request_layout():
    req = build_dump_request(socket.AF_INET6, socket.IPPROTO_TCP, 1 << 10, seq=9)
    length, mtype, flags, seq, pid = struct.unpack_from("=IHHII", req)
    assert length == len(req) == 16 + REQ_LEN
    assert (mtype, flags, seq, pid) == (SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST | NLM_F_DUMP, 9, 0)
    fam, proto, ext, states = struct.unpack_from("=BBBxI", req, 16)
    assert (fam, proto, ext, states) == (socket.AF_INET6, socket.IPPROTO_TCP, 0, 1 << 10)


def test_destroy_request_carries_the_socket_identity():
    info = SocketInfo(socket.AF_INET, socket.IPPROTO_TCP, 1, "192.0.2.1", 80, "198.51.100.7",
                      40000, ifindex=2, cookie=(7 << 32) | 9)
    req = build_destroy_request(info, seq=4)
    _, mtype, flags, seq, _ = struct.unpack_from("=IHHII", req)
    assert (mtype, flags, seq) == (SOCK_DESTROY, NLM_F_REQUEST | NLM_F_ACK, 4)
    sport, dport = struct.unpack_from("!HH", req, 24)
    assert (sport, dport) == (80, 40000)
    assert req[28:32] == socket.inet_aton("192.0.2.1") and req[32:44] == bytes(12)
    assert req[44:48] == socket.inet_aton("198.51.100.7")
    assert struct.unpack_from("=III", req, 60) == (2, 9, 7)


@pytest.mark.parametrize(
    "family,src,dst",
    [(socket.AF_INET, "192.0.2.1", "198.51.100.2"), (socket.AF_INET6, "2001:db8::1", "::")],
)
def test_parse_round_trip(family, src, dst):
    data = _diag_msg(family, 10, src, 8080, dst, 0, mark=77) + _done()
    batch = parse_messages(data, socket.IPPROTO_TCP)
    assert batch.done and batch.error == 0
    (info,) = batch.sockets
    assert (info.family, info.src, info.sport, info.dst, info.dport) == (family, src, 8080, dst, 0)
    assert info.listening and info.state_name == "LISTEN"
    assert (info.uid, info.inode, info.rqueue, info.wqueue, info.mark) == (1000, 4242, 5, 6, 77)
    assert info.cookie == 0x1_0000_0002 and info.ifindex == 3


def test_udp_state_names():
    info = parse_socket_info(_diag_msg(socket.AF_INET, 7, "192.0.2.1", 53, "0.0.0.0", 0)[16:],
                             socket.IPPROTO_UDP)
    assert info.state_name == "UNCONN"


def test_error_and_foreign_sequence_numbers():
    batch = parse_messages(_error(seq=5), socket.IPPROTO_TCP, seq=5)
    assert batch.done and batch.error == 95
    # a leftover answer to another request is skipped
    stale = _diag_msg(socket.AF_INET, 1, "192.0.2.1", 1, "192.0.2.2", 2, seq=4)
    batch = parse_messages(stale + _done(seq=5), socket.IPPROTO_TCP, seq=5)
    assert batch.sockets == [] and batch.done


@pytest.mark.parametrize("data", [
    b"\x01", struct.pack("=IHHII", 8, 20, 0, 1, 0),
    struct.pack("=IHHII", 100, 20, 0, 1, 0),
    struct.pack("=IHHII", 20, 20, 0, 1, 0) + bytes(4),
    struct.pack("=IHHII", 16, 2, 0, 1, 0),
])
def test_malformed_raises_parse_error(data):
    with pytest.raises(ParseError):
        parse_messages(data, socket.IPPROTO_TCP)


def test_bad_attribute_and_family():
    msg = bytearray(_diag_msg(socket.AF_INET, 1, "192.0.2.1", 1, "192.0.2.2", 2, mark=1))
    struct.pack_into("=H", msg, 16 + MSG_LEN, 200)  # attribute longer than the message
    with pytest.raises(ParseError):
        parse_messages(bytes(msg), socket.IPPROTO_TCP)
    msg = bytearray(_diag_msg(socket.AF_INET, 1, "192.0.2.1", 1, "192.0.2.2", 2))
    msg[16] = 99
    with pytest.raises(ParseError):
        parse_messages(bytes(msg), socket.IPPROTO_TCP)


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=400))
def test_fuzz_random_bytes(data):
    try:
        parse_messages(data, socket.IPPROTO_TCP)
    except ParseError:
        pass


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_fuzz_mutated_valid_stream(data):
    blob = bytearray(
        _diag_msg(socket.AF_INET6, 1, "2001:db8::1", 443, "2001:db8::2", 5555, mark=3)
        + _diag_msg(socket.AF_INET, 10, "192.0.2.1", 22, "0.0.0.0", 0)
        + _done()
    )
    for _ in range(data.draw(st.integers(1, 6))):
        blob[data.draw(st.integers(0, len(blob) - 1))] = data.draw(st.integers(0, 255))
    try:
        batch = parse_messages(bytes(blob[: data.draw(st.integers(0, len(blob)))]), 6)
    except ParseError:
        return
    assert all(isinstance(s, SocketInfo) for s in batch.sockets)


@pytest.mark.parametrize(("want", "have", "same"), [
    ("::1:2", "::0.1.0.2", True),  # inet_ntop's spelling of the same address
    ("::ffff:192.0.2.1", "::ffff:192.0.2.1", True),
    ("192.0.2.1", "::ffff:192.0.2.1", True),  # an IPv4 peer of a dual-stack socket
    ("::ffff:192.0.2.1", "192.0.2.1", True),
    ("192.0.2.1", "192.0.2.2", False),
    ("2001:db8::1", "2001:db8:0:0:0:0:0:1", True),
])
def test_addresses_compare_as_addresses(want, have, same):
    assert _same(_norm(want), have) is same
