"""The local control channel every ipshift daemon exposes: a unix socket speaking JSON lines.

The server side lives in `ipshift.ctl.server` (imported by daemons only, it pulls in asyncio);
this package exports what clients need, so a short-lived client such as ip_resend_wakeup starts
fast.
"""

from ipshift.ctl.client import CtlClient, request
from ipshift.ctl.protocol import (
    DEFAULT_DIR,
    CtlError,
    decode_message,
    encode_message,
    socket_path,
)

__all__ = [
    "DEFAULT_DIR",
    "CtlClient",
    "CtlError",
    "decode_message",
    "encode_message",
    "request",
    "socket_path",
]
