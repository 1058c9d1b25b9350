"""The virtio_net_hdr that a TUN device opened with IFF_VNET_HDR puts before every packet.

Pure codec, no I/O. The layout is `struct virtio_net_hdr` (10 bytes, little-endian; the TUN
device is switched to little-endian with TUNSETVNETLE so this holds on every host):

    flags (u8) | gso_type (u8) | hdr_len (u16) | gso_size (u16) | csum_start (u16) |
    csum_offset (u16)

- flags NEEDS_CSUM: the L4 checksum is partial. Only the pseudo-header sum is in the checksum field
  (at csum_start + csum_offset); whoever transmits the packet must add the sum of the bytes from
  csum_start to the end. DATA_VALID: the checksum was already verified.
- gso_type != NONE: a super-packet of up to 64 KB that stands for several wire packets of gso_size
  payload bytes each (TCP segmentation offload, or UDP_L4 segmentation). hdr_len is only a hint
  (the kernel reports the linear head length), never the header length: derive that from
  csum_start and the L4 header.

`VnetHeader` is the checked, typed form for APIs and tests; the forwarder's hot path uses
`HEADER.unpack_from` / `HEADER.pack` directly to avoid building an object per packet.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from ipshift.packet.errors import BytesLike, PacketError

HEADER = struct.Struct("<BBHHHH")
HEADER_LEN = HEADER.size  # 10; the 12-byte variant with num_buffers is not used here

F_NEEDS_CSUM = 0x01
F_DATA_VALID = 0x02
F_RSC_INFO = 0x04  # only meaningful for virtio devices with RSC; a TUN never sets it
KNOWN_FLAGS = F_NEEDS_CSUM | F_DATA_VALID

GSO_NONE = 0
GSO_TCPV4 = 1
GSO_UDP = 3  # legacy UFO (IPv4 fragmentation offload); not accepted here
GSO_TCPV6 = 4
GSO_UDP_L4 = 5  # UDP segmentation offload (USO)
GSO_ECN = 0x80  # TCP super-packet whose first segment carries CWR
GSO_TYPE_MASK = 0x7F
KNOWN_GSO_TYPES = frozenset({GSO_NONE, GSO_TCPV4, GSO_TCPV6, GSO_UDP_L4})

# The header of a packet that needs nothing: complete checksum, no segmentation.
PLAIN = bytes(HEADER_LEN)


class VnetHeaderError(PacketError):
    """A virtio_net_hdr is malformed or describes something this code does not handle."""


@dataclass(frozen=True, slots=True)
class VnetHeader:
    flags: int = 0
    gso_type: int = GSO_NONE
    hdr_len: int = 0
    gso_size: int = 0
    csum_start: int = 0
    csum_offset: int = 0

    @property
    def needs_csum(self) -> bool:
        return bool(self.flags & F_NEEDS_CSUM)

    @property
    def data_valid(self) -> bool:
        return bool(self.flags & F_DATA_VALID)

    @property
    def gso(self) -> int:
        """The segmentation kind without the ECN bit."""
        return self.gso_type & GSO_TYPE_MASK

    @property
    def ecn(self) -> bool:
        return bool(self.gso_type & GSO_ECN)

    def encode(self) -> bytes:
        return HEADER.pack(
            self.flags, self.gso_type, self.hdr_len, self.gso_size, self.csum_start,
            self.csum_offset,
        )

    def check(self, packet_len: int | None = None) -> None:
        """Raise VnetHeaderError unless this header is consistent (with a packet of packet_len
        bytes, when given)."""
        if self.flags & ~KNOWN_FLAGS:
            raise VnetHeaderError("vnet-flags", f"unsupported vnet flags 0x{self.flags:02x}")
        if self.gso not in KNOWN_GSO_TYPES:
            raise VnetHeaderError(
                "vnet-gso-type", f"unsupported vnet gso_type 0x{self.gso_type:02x}"
            )
        if self.gso == GSO_NONE:
            if self.ecn:
                raise VnetHeaderError("vnet-gso-type", "ECN bit without segmentation")
        else:
            if self.gso_size == 0:
                raise VnetHeaderError("vnet-gso-size", "segmentation with gso_size 0")
            if not self.needs_csum:
                # Segments need their checksums recomputed; the kernel always hands TSO/USO
                # super-packets over with a partial checksum, so anything else is not from it.
                raise VnetHeaderError("vnet-csum", "segmentation without a partial checksum")
        if not self.needs_csum and (self.csum_start or self.csum_offset):
            raise VnetHeaderError("vnet-csum", "csum_start/csum_offset set without NEEDS_CSUM")
        if packet_len is not None:
            if self.needs_csum and self.csum_start + self.csum_offset + 2 > packet_len:
                raise VnetHeaderError(
                    "vnet-csum",
                    f"checksum field at {self.csum_start}+{self.csum_offset} is beyond "
                    f"the {packet_len}-byte packet"
                )
            if self.hdr_len > packet_len:
                raise VnetHeaderError(
                    "vnet-hdr-len",
                    f"hdr_len {self.hdr_len} exceeds the {packet_len}-byte packet"
                )


def decode(data: BytesLike, packet_len: int | None = None) -> VnetHeader:
    """Decode and check the header at the start of data. packet_len, when given, is the length
    of the packet that follows the header (to check that the checksum field lies inside it)."""
    if len(data) < HEADER_LEN:
        raise VnetHeaderError("truncated", f"vnet header needs {HEADER_LEN} bytes, got {len(data)}")
    header = VnetHeader(*HEADER.unpack_from(data, 0))
    header.check(packet_len)
    return header


def split(frame: BytesLike) -> tuple[VnetHeader, memoryview]:
    """Split what one TUN read returned into its checked header and the packet."""
    view = memoryview(frame)
    header = decode(view, len(view) - HEADER_LEN if len(view) >= HEADER_LEN else None)
    return header, view[HEADER_LEN:]
