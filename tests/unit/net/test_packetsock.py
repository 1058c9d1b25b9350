"""The classic BPF filter of the packet socket, run on a tiny interpreter of its own."""

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ipshift.net.packetsock import (
    BPF_ABS,
    BPF_JEQ,
    BPF_JMP,
    BPF_K,
    BPF_LD,
    BPF_RET,
    BPF_W,
    ETH_P_ARP,
    ETH_P_IP,
    ETH_P_IPV6,
    PACKET_BROADCAST,
    PACKET_HOST,
    PACKET_MULTICAST,
    PACKET_OUTGOING,
    SKF_AD_OFF,
    SKF_AD_PKTTYPE,
    SKF_AD_PROTOCOL,
    Snooped,
    bpf_program,
    pack_program,
)


def run_bpf(prog, protocol, pkttype):
    """Execute the subset of classic BPF that bpf_program emits."""
    pc, acc = 0, 0
    for _ in range(len(prog) + 1):
        code, jt, jf, k = prog[pc]
        if code == BPF_LD | BPF_W | BPF_ABS:
            offset = k - (1 << 32) if k & 0x80000000 else k
            acc = {SKF_AD_OFF + SKF_AD_PROTOCOL: protocol,
                   SKF_AD_OFF + SKF_AD_PKTTYPE: pkttype}[offset]
            pc += 1
        elif code == BPF_JMP | BPF_JEQ | BPF_K:
            pc += 1 + (jt if acc == k else jf)
        elif code == BPF_RET | BPF_K:
            return k
        else:
            raise AssertionError(f"unexpected opcode {code:#x}")
        assert 0 <= pc < len(prog), "jump out of the program"
    raise AssertionError("program did not terminate")


PROTOS = [ETH_P_IP, ETH_P_IPV6, ETH_P_ARP, 0x88CC]
TYPES = [PACKET_HOST, PACKET_BROADCAST, PACKET_MULTICAST, PACKET_OUTGOING]


@pytest.mark.parametrize("direction", ["both", "in", "out"])
@pytest.mark.parametrize("wanted", [(ETH_P_IP, ETH_P_IPV6), (ETH_P_IPV6,), None])
def test_filter_semantics(direction, wanted):
    prog = bpf_program(wanted, direction, snaplen=1500)
    for proto in PROTOS:
        for ptype in TYPES:
            accept = (wanted is None or proto in wanted) and (
                direction == "both"
                or (direction == "out") == (ptype == PACKET_OUTGOING)
            )
            assert run_bpf(prog, proto, ptype) == (1500 if accept else 0), (proto, ptype)


@given(st.lists(st.integers(0, 0xFFFF), min_size=1, max_size=20, unique=True),
       st.sampled_from(["both", "in", "out"]), st.integers(0, 0xFFFF), st.sampled_from(TYPES))
def test_filter_semantics_any_protocol_list(wanted, direction, proto, ptype):
    prog = bpf_program(wanted, direction)
    accept = proto in wanted and (
        direction == "both" or (direction == "out") == (ptype == PACKET_OUTGOING))
    assert (run_bpf(prog, proto, ptype) != 0) == accept


def test_pack_program_is_struct_sock_filter():
    prog = bpf_program((ETH_P_IP,), "out")
    packed = pack_program(prog)
    assert len(packed) == 8 * len(prog)
    assert struct.unpack_from("=HBBI", packed, 0) == prog[0]


def test_bad_direction():
    with pytest.raises(ValueError, match="direction"):
        bpf_program((ETH_P_IP,), "sideways")


def test_an_empty_protocol_list_is_not_every_protocol():
    with pytest.raises(ValueError, match="no protocols"):
        bpf_program(())


def test_snooped_is_a_plain_tuple():
    pkt = Snooped(PACKET_OUTGOING, ETH_P_IP, b"\x45")
    pkttype, proto, data = pkt
    assert pkt.outgoing and pkttype == PACKET_OUTGOING
    assert proto == ETH_P_IP and data == b"\x45"
