"""The local control channel every ipshift daemon exposes: a unix socket speaking JSON lines."""

from ipshift.ctl.client import CtlClient, request
from ipshift.ctl.protocol import (
    DEFAULT_DIR,
    CtlError,
    decode_message,
    encode_message,
    socket_path,
)
from ipshift.ctl.server import CtlServer

__all__ = [
    "DEFAULT_DIR",
    "CtlClient",
    "CtlError",
    "CtlServer",
    "decode_message",
    "encode_message",
    "request",
    "socket_path",
]
