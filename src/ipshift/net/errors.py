"""The one error family of ipshift.net: every adapter raises a subclass of `NetError`."""

from __future__ import annotations


class NetError(OSError):
    """A kernel call made by an ipshift.net adapter failed.

    `str(exc)` is one line saying what failed and why; `errno` is set when the kernel gave one
    (e.g. `errno.EEXIST` for a route that exists already), else 0.
    """

    def __init__(self, message: str, errno_: int = 0) -> None:
        super().__init__(errno_, message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class ParseError(NetError):
    """Bytes or text from the kernel (or from a tool such as `ip -json`) could not be parsed."""

    def __init__(self, message: str) -> None:
        super().__init__(message, 0)
