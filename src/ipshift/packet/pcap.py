"""A minimal pcap writer (classic libpcap format, microsecond timestamps), for handing packets
to tshark/Wireshark in tests and debugging. Returns bytes; writing them is the caller's business.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence

from ipshift.packet.errors import BytesLike

LINKTYPE_RAW = 101  # packets start with the IPv4 or IPv6 header
_FILE_HEADER = struct.Struct("<IHHiIII")
_RECORD_HEADER = struct.Struct("<IIII")
_MAGIC = 0xA1B2C3D4
_SNAPLEN = 262144
_MAX_SECONDS = 1 << 32  # the record header holds unsigned 32-bit seconds


def encode_pcap(
    packets: Iterable[BytesLike],
    linktype: int = LINKTYPE_RAW,
    timestamps: Sequence[float] | None = None,
) -> bytes:
    """A pcap file holding `packets`. Without `timestamps` they are 1 ms apart from time 0."""
    out = bytearray(_FILE_HEADER.pack(_MAGIC, 2, 4, 0, 0, _SNAPLEN, linktype))
    for index, packet in enumerate(packets):
        stamp = index / 1000 if timestamps is None else timestamps[index]
        seconds, micros = _split_timestamp(stamp)
        size = len(packet)
        out += _RECORD_HEADER.pack(seconds, micros, min(size, _SNAPLEN), size)
        out += packet[:_SNAPLEN]
    return bytes(out)


def _split_timestamp(stamp: float) -> tuple[int, int]:
    """(seconds, microseconds) of a timestamp; rounding up to a whole second carries over."""
    if not 0 <= stamp < _MAX_SECONDS:  # also refuses NaN
        raise ValueError(f"pcap timestamp {stamp!r} is outside 0 .. 2**32 seconds")
    seconds = int(stamp)
    micros = round((stamp - seconds) * 1_000_000)
    if micros >= 1_000_000:
        seconds += 1
        micros -= 1_000_000
        if seconds >= _MAX_SECONDS:
            raise ValueError(f"pcap timestamp {stamp!r} is outside 0 .. 2**32 seconds")
    return seconds, micros
