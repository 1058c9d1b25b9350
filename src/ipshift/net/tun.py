"""TUN devices with virtio-net headers, offloads and multiple queues.

The device is created with the TUNSETIFF ioctl on /dev/net/tun (not through pyroute2, which
silently ignores flags unless they are spelled its own way). It is not persistent: it disappears
when the last queue's file descriptor is closed, so a killed process leaves nothing behind.

With IFF_VNET_HDR every read and write carries a 10-byte virtio_net_hdr
(`ipshift.packet.vnet`), and TUNSETOFFLOAD lets the kernel hand over TCP super-packets of up to
64 KB with a partial checksum (TSO4/TSO6, plus USO when the kernel offers it) instead of one
MTU-sized packet per read: that is what makes a user-space data path affordable in Python.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
from dataclasses import dataclass, field
from types import TracebackType

from ipshift.net import netns
from ipshift.packet import vnet

TUN_PATH = "/dev/net/tun"
IFNAMSIZ = 16

# ioctl numbers (linux/if_tun.h): _IOW('T', nr, int) / _IOR('T', nr, unsigned int).
TUNSETIFF = 0x400454CA
TUNSETPERSIST = 0x400454CB
TUNGETFEATURES = 0x800454CF
TUNSETOFFLOAD = 0x400454D0
TUNGETIFF = 0x800454D2
TUNSETVNETHDRSZ = 0x400454D8
TUNSETVNETLE = 0x400454DC

IFF_TUN = 0x0001
IFF_MULTI_QUEUE = 0x0100
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000

TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02
TUN_F_TSO6 = 0x04
TUN_F_TSO_ECN = 0x08
TUN_F_USO4 = 0x20  # Linux >= 6.2
TUN_F_USO6 = 0x40

DEFAULT_OFFLOADS = TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN
USO_OFFLOADS = TUN_F_USO4 | TUN_F_USO6


class TunError(OSError):
    """A TUN device could not be created, attached or configured."""


@dataclass
class TunDevice:
    """An open TUN device: its name, namespace and one file descriptor per queue.

    Reads return `vnet.HEADER_LEN` header bytes then one IP packet (or super-packet); writes take
    the same. The fds are blocking unless `set_blocking(False)` was called.
    """

    name: str
    fds: list[int]
    netns: str | None = None
    vnet_hdr: bool = True
    offloads: int = 0  # TUN_F_* flags the kernel accepted
    closed: bool = field(default=False, init=False)

    @property
    def fd(self) -> int:
        return self.fds[0]

    @property
    def queues(self) -> int:
        return len(self.fds)

    @property
    def uso(self) -> bool:
        return bool(self.offloads & USO_OFFLOADS)

    def set_blocking(self, blocking: bool) -> None:
        for fd in self.fds:
            os.set_blocking(fd, blocking)

    def close(self) -> None:
        """Close every queue; the (non-persistent) device goes away with the last one."""
        if self.closed:
            return
        self.closed = True
        for fd in self.fds:
            try:
                os.close(fd)
            except OSError:
                pass

    def __enter__(self) -> TunDevice:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def kernel_features() -> int:
    """The IFF_* flags this kernel's TUN driver supports (TUNGETFEATURES)."""
    fd = os.open(TUN_PATH, os.O_RDWR | os.O_CLOEXEC)
    try:
        buf = fcntl.ioctl(fd, TUNGETFEATURES, b"\0" * 4)
    finally:
        os.close(fd)
    return int(struct.unpack("I", buf)[0])


def _ifreq(name: str, flags: int) -> bytes:
    return struct.pack(f"{IFNAMSIZ}sH22x", name.encode(), flags)


def _attach(name: str, flags: int) -> tuple[int, str]:
    """Open /dev/net/tun and bind it to device `name` (creating it if needed)."""
    try:
        fd = os.open(TUN_PATH, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError as exc:
        raise TunError(errno.ENODEV, f"{TUN_PATH} is missing: load the tun module") from exc
    try:
        res = fcntl.ioctl(fd, TUNSETIFF, _ifreq(name, flags))
    except OSError as exc:
        os.close(fd)
        hint = {
            errno.EBUSY: "a device of that name exists with other flags, or all its queues are "
                         "in use; pick another --dev or delete it",
            errno.EINVAL: "a non-TUN device of that name exists; pick another --dev",
            errno.EPERM: "creating TUN devices needs CAP_NET_ADMIN (run as root)",
        }.get(exc.errno or 0, exc.strerror or "")
        raise TunError(exc.errno or 0, f"cannot open TUN device {name}: {hint}") from exc
    actual = res[:IFNAMSIZ].split(b"\0", 1)[0].decode()
    return fd, actual


def _ioctl_int(fd: int, request: int, value: int) -> None:
    """An ioctl that reads an int through a pointer (TUNSETVNETHDRSZ, TUNSETVNETLE)."""
    fcntl.ioctl(fd, request, struct.pack("i", value))


def _ioctl_value(fd: int, request: int, value: int) -> None:
    """An ioctl that takes its argument by value (TUNSETOFFLOAD, TUNSETPERSIST)."""
    fcntl.ioctl(fd, request, value)


def _set_offloads(fd: int, wanted: int) -> int:
    """Ask for `wanted` offloads; drop USO if this kernel does not know it. Returns what stuck."""
    try:
        _ioctl_value(fd, TUNSETOFFLOAD, wanted)
        return wanted
    except OSError as exc:
        if exc.errno != errno.EINVAL or not wanted & USO_OFFLOADS:
            raise TunError(exc.errno or 0, f"TUNSETOFFLOAD 0x{wanted:x}: {exc.strerror}") from exc
    reduced = wanted & ~USO_OFFLOADS
    _ioctl_value(fd, TUNSETOFFLOAD, reduced)
    return reduced


def _open_here(name: str, queues: int, vnet_hdr: bool, offloads: int) -> TunDevice:
    flags = IFF_TUN | IFF_NO_PI
    if vnet_hdr:
        flags |= IFF_VNET_HDR
    if queues > 1:
        flags |= IFF_MULTI_QUEUE
    fds: list[int] = []
    try:
        fd, actual = _attach(name, flags)
        fds.append(fd)
        for _ in range(queues - 1):
            fds.append(_attach(actual, flags)[0])
        # Our device, our lifetime: a previously persistent device of this name would otherwise
        # outlive us.
        _ioctl_value(fd, TUNSETPERSIST, 0)
        accepted = 0
        if vnet_hdr:
            _ioctl_int(fd, TUNSETVNETHDRSZ, vnet.HEADER_LEN)
            # vnet fields are in host order unless told otherwise; the codec is little-endian.
            for qfd in fds:
                _ioctl_int(qfd, TUNSETVNETLE, 1)
            if offloads:
                accepted = _set_offloads(fd, offloads)
        return TunDevice(actual, fds, vnet_hdr=vnet_hdr, offloads=accepted)
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise


def open_tun(
    name: str,
    *,
    queues: int = 1,
    vnet_hdr: bool = True,
    offloads: int = DEFAULT_OFFLOADS | USO_OFFLOADS,
    netns_name: str | None = None,
) -> TunDevice:
    """Create (or attach to) TUN device `name` with `queues` queues, in namespace netns_name.

    With vnet_hdr, checksum and segmentation offloads are requested (USO only where the kernel
    offers it; `TunDevice.offloads` says what was accepted). The device starts down and without
    addresses; it is removed when the returned device is closed.
    """
    if not 1 <= queues <= 256:
        raise ValueError(f"queues must be 1..256, got {queues}")
    if not name or len(name.encode()) >= IFNAMSIZ or "/" in name or " " in name:
        raise ValueError(f"invalid interface name {name!r} (1-15 characters, no '/' or space)")
    if offloads and not vnet_hdr:
        raise ValueError("offloads need vnet headers")
    device = netns.call_in(netns_name, _open_here, name, queues, vnet_hdr, offloads)
    device.netns = netns_name
    return device

