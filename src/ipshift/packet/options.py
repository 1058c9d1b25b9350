"""Option lists of IPv4 (RFC 791 3.1), TCP (RFC 9293 3.1) and IPv6 hop-by-hop/destination
options headers (RFC 8200 4.2).

IPv4 and TCP share one layout: kind 0 ends the list, kind 1 is a one-byte no-op, every other
option is kind, length (counting the kind and length octets), data. IPv6 options are type,
length (of the data only), data, with Pad1 (type 0) as the only one-byte option.
"""

from __future__ import annotations

from typing import NamedTuple

from ipshift.packet.errors import BytesLike, PacketError

END_OF_OPTIONS = 0
NO_OPERATION = 1
IPV6_PAD1 = 0
IPV6_PADN = 1
IPV6_HOME_ADDRESS = 0xC9  # RFC 6275 6.3: stands in for the source in the pseudo-header


class Option(NamedTuple):
    """One option: its kind (type) and its data (without the kind and length octets)."""

    kind: int
    data: bytes = b""


def decode_ipv4_options(raw: BytesLike) -> list[Option]:
    """Options of an IPv4 header (the bytes after the first 20). Stops at End of Option List,
    which is kept in the list; the zero padding after it is not."""
    return _decode_whole_length_options(raw, "IPv4")


def decode_tcp_options(raw: BytesLike) -> list[Option]:
    """Options of a TCP header (the bytes after the first 20); same layout as IPv4."""
    return _decode_whole_length_options(raw, "TCP")


def encode_ipv4_options(options: list[Option] | tuple[Option, ...]) -> bytes:
    """Encode IPv4 options, zero-padded to a multiple of 4 bytes (at most 40)."""
    return _encode_whole_length_options(options, "IPv4")


def encode_tcp_options(options: list[Option] | tuple[Option, ...]) -> bytes:
    """Encode TCP options, zero-padded to a multiple of 4 bytes (at most 40)."""
    return _encode_whole_length_options(options, "TCP")


def _decode_whole_length_options(raw: BytesLike, where: str) -> list[Option]:
    options: list[Option] = []
    size = len(raw)
    pos = 0
    while pos < size:
        kind = raw[pos]
        if kind == END_OF_OPTIONS:
            options.append(Option(END_OF_OPTIONS))
            break
        if kind == NO_OPERATION:
            options.append(Option(NO_OPERATION))
            pos += 1
            continue
        if pos + 1 >= size:
            raise PacketError("bad-option", f"{where} option {kind} has no length octet")
        length = raw[pos + 1]
        if length < 2 or pos + length > size:
            raise PacketError("bad-option", f"{where} option {kind} has length {length}")
        options.append(Option(kind, bytes(raw[pos + 2 : pos + length])))
        pos += length
    return options


def _encode_whole_length_options(options: list[Option] | tuple[Option, ...], where: str) -> bytes:
    out = bytearray()
    for kind, data in options:
        if kind in (END_OF_OPTIONS, NO_OPERATION):
            if data:
                raise ValueError(f"{where} option {kind} is a single octet and has no data")
            out.append(kind)
        else:
            if len(data) > 253 or not 0 <= kind <= 255:
                raise ValueError(f"{where} option {kind} does not fit its length octet")
            out += bytes((kind, len(data) + 2))
            out += data
    out += bytes(-len(out) % 4)
    if len(out) > 40:
        raise ValueError(f"{where} options take {len(out)} bytes; at most 40 fit in the header")
    return bytes(out)


def ipv6_option_spans(data: BytesLike, start: int, stop: int) -> list[tuple[int, int, int]]:
    """(type, start, end) of each option in ``data[start:stop]`` (the options area of a
    hop-by-hop or destination options header), Pad1 and PadN included."""
    spans: list[tuple[int, int, int]] = []
    pos = start
    while pos < stop:
        kind = data[pos]
        if kind == IPV6_PAD1:
            spans.append((kind, pos, pos + 1))
            pos += 1
            continue
        if pos + 1 >= stop:
            raise PacketError("bad-option", f"IPv6 option {kind} has no length octet")
        end = pos + 2 + data[pos + 1]
        if end > stop:
            raise PacketError("bad-option", f"IPv6 option {kind} runs past its header")
        spans.append((kind, pos, end))
        pos = end
    return spans


def decode_ipv6_options(raw: BytesLike) -> list[Option]:
    """Options of a hop-by-hop or destination options header (the bytes after the first two).

    Pad1 and PadN are kept so that encoding gives the same bytes back.
    """
    return [Option(IPV6_PAD1) if kind == IPV6_PAD1 else Option(kind, bytes(raw[start + 2:end]))
            for kind, start, end in ipv6_option_spans(raw, 0, len(raw))]


def encode_ipv6_options(options: list[Option] | tuple[Option, ...]) -> bytes:
    """Encode IPv6 options and pad them (Pad1/PadN) so that the header, with its two leading
    octets, is a multiple of 8 bytes. Returns the bytes after those two octets."""
    out = bytearray()
    for kind, data in options:
        if kind == IPV6_PAD1:
            if data:
                raise ValueError("IPv6 Pad1 option has no data")
            out.append(IPV6_PAD1)
        else:
            if len(data) > 255 or not 0 <= kind <= 255:
                raise ValueError(f"IPv6 option {kind} does not fit its length octet")
            out += bytes((kind, len(data)))
            out += data
    out += ipv6_padding(-(len(out) + 2) % 8)
    return bytes(out)


def ipv6_padding(size: int) -> bytes:
    """`size` bytes of IPv6 option padding: one Pad1 or one PadN option."""
    if size == 0:
        return b""
    if size == 1:
        return bytes((IPV6_PAD1,))
    return bytes((IPV6_PADN, size - 2)) + bytes(size - 2)


def find_ipv6_option(buf: BytesLike, start: int, end: int, kind: int) -> int:
    """Offset in `buf` of the data of the first IPv6 option of type `kind` among the options in
    ``buf[start:end]``, or -1.

    Used on the hot path (home address option): walks without building Option objects.
    """
    pos = start
    while pos < end:
        current = buf[pos]
        if current == IPV6_PAD1:
            pos += 1
            continue
        if pos + 1 >= end:
            raise PacketError("bad-option", f"IPv6 option {current} has no length octet")
        option_end = pos + 2 + buf[pos + 1]
        if option_end > end:
            raise PacketError("bad-option", f"IPv6 option {current} runs past its header")
        if current == kind:
            return pos + 2
        pos = option_end
    return -1
