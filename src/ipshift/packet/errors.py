"""The one error every packet parser raises, and the buffer types the codecs accept."""

from __future__ import annotations

from typing import TypeAlias

#: Anything the codecs read from. memoryviews must be byte-formatted (the default).
BytesLike: TypeAlias = bytes | bytearray | memoryview
#: What the in-place rewriters write to.
WritableBuffer: TypeAlias = bytearray | memoryview


class PacketError(ValueError):
    """Malformed or unsupported packet.

    `reason` is a short machine-readable tag a daemon can count by ("truncated", "bad-version",
    "bad-ihl", "length-mismatch", ...); the message adds the detail for a log line.
    """

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
