"""Secret key files, shared by every component that keeps a key on disk (the tunnel's peer keys,
sacip's identity). It imports nothing of ipshift, so any layer may use it.

    write_key_file("/etc/ipshift/gw1.key", os.urandom(32), "tunnel peer gw1")  # 0600, new only
    key = read_key_file("/etc/ipshift/gw1.key")              # 32 bytes, or KeyFileError
    identity = read_key_file("/var/lib/ipshift/sacip.key", length=32)

A key file is text: lines starting with "#" and blank lines are ignored, and exactly one line
holds the key in base64 (a 32-byte key is 44 characters, as `wg genkey` prints them). It must be
a regular file, owned by the user reading it (or root), with no permissions for group or others;
a symbolic link is refused, so the file checked is the file read.
"""

from __future__ import annotations

import base64
import binascii
import os
import stat

DEFAULT_LENGTH = 32
MIN_KEY_LEN = 16  # shorter is no secret key: refuse it rather than write it
MAX_KEY_FILE = 4096


class KeyFileError(ValueError):
    """A key file is unusable; the message is one line saying what to do."""


def check_key_file_status(status: os.stat_result, euid: int, path: str = "key file") -> None:
    """Refuse a key file that others could read or change (a pure check of its stat)."""
    if not stat.S_ISREG(status.st_mode):
        raise KeyFileError(f"{path} is not a regular file; give the path of the key file itself")
    if status.st_uid not in (euid, 0):
        raise KeyFileError(f"{path} is owned by uid {status.st_uid}; it must belong to uid "
                           f"{euid} or root (chown it)")
    if status.st_mode & 0o077:
        raise KeyFileError(f"{path} has mode {stat.S_IMODE(status.st_mode):04o}, open to group "
                           f"or others; run: chmod 600 {path}")


def parse_key_file(text: str, path: str = "key file", length: int = DEFAULT_LENGTH) -> bytes:
    """The `length`-byte key in a key file's text."""
    lines = [line.strip() for line in text.splitlines()]
    keys = [line for line in lines if line and not line.startswith("#")]
    if len(keys) != 1:
        raise KeyFileError(f"{path} must hold exactly one key line (base64 of {length} bytes), "
                           f"not {len(keys)}; lines starting with # are comments")
    try:
        key = base64.b64decode(keys[0], validate=True)
    except (binascii.Error, ValueError) as exc:
        raise KeyFileError(f"{path}: the key line is not base64") from exc
    if len(key) != length:
        raise KeyFileError(f"{path}: the key has {len(key)} bytes, not {length}")
    return key


def format_key_file(key: bytes, comment: str = "") -> str:
    """The text of a key file holding `key`, each line of `comment` as a # line above it."""
    if len(key) < MIN_KEY_LEN:
        raise ValueError(f"a key has at least {MIN_KEY_LEN} bytes, not {len(key)}")
    head = "".join(f"# {line}\n" for line in comment.splitlines())
    return head + base64.b64encode(key).decode() + "\n"


def write_key_file(path: str, key: bytes, comment: str = "") -> None:
    """Create key file `path` holding `key`, mode 0600 from the start; an existing file is
    never overwritten (FileExistsError): something may still use that key."""
    text = format_key_file(key, comment)  # refused before anything is created
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o600)
    with os.fdopen(fd, "w") as file:
        file.write(text)


def read_key_file(path: str, length: int = DEFAULT_LENGTH) -> bytes:
    """The `length`-byte key in key file `path`, after checking the file's type, owner and
    mode (KeyFileError, one line, when any of it is wrong)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as exc:
        raise KeyFileError(f"cannot open key file {path}: {exc.strerror}") from exc
    except ValueError as exc:  # a NUL in the path
        raise KeyFileError(f"{path!r} is not a usable path for a key file") from exc
    try:
        check_key_file_status(os.fstat(fd), os.geteuid(), path)
        data = os.read(fd, MAX_KEY_FILE + 1)
    finally:
        os.close(fd)
    if len(data) > MAX_KEY_FILE:
        raise KeyFileError(f"{path} is larger than a key file ({MAX_KEY_FILE} bytes at most)")
    try:
        return parse_key_file(data.decode(), path, length)
    except UnicodeDecodeError as exc:
        raise KeyFileError(f"{path} is not text; it should hold a base64 key") from exc


__all__ = [
    "DEFAULT_LENGTH",
    "MAX_KEY_FILE",
    "MIN_KEY_LEN",
    "KeyFileError",
    "check_key_file_status",
    "format_key_file",
    "parse_key_file",
    "read_key_file",
    "write_key_file",
]
