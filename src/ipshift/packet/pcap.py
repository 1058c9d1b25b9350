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


def encode_pcap(
    packets: Iterable[BytesLike],
    linktype: int = LINKTYPE_RAW,
    timestamps: Sequence[float] | None = None,
) -> bytes:
    """A pcap file holding `packets`. Without `timestamps` they are 1 ms apart from time 0."""
    out = bytearray(_FILE_HEADER.pack(_MAGIC, 2, 4, 0, 0, _SNAPLEN, linktype))
    for index, packet in enumerate(packets):
        stamp = index / 1000 if timestamps is None else timestamps[index]
        seconds = int(stamp)
        micros = round((stamp - seconds) * 1_000_000)
        size = len(packet)
        out += _RECORD_HEADER.pack(seconds, micros, min(size, _SNAPLEN), size)
        out += packet[:_SNAPLEN]
    return bytes(out)
