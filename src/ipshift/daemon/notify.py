"""systemd readiness notification (sd_notify(3)) without libsystemd: one datagram to the unix
socket named by $NOTIFY_SOCKET ("@name" is an abstract socket). Outside systemd it does
nothing."""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger("ipshift.daemon")


def sd_notify(*fields: str) -> bool:
    """Send "READY=1", "STOPPING=1", "STATUS=..." lines; True if a manager was told."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    elif not address.startswith("/"):
        log.warning("NOTIFY_SOCKET %r is neither a path nor an abstract name; not notifying",
                    address)
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall("\n".join(fields).encode())
    except OSError as exc:
        log.warning("cannot notify the service manager on %s: %s", address.lstrip("\0"),
                    exc.strerror or exc)
        return False
    return True
