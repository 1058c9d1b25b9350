"""The user-space tunnel data path: TUN (vnet headers, TSO) <-> UDP (GSO/GRO), one inner packet
per datagram. Shared infrastructure of the components that carry packets themselves (the RSIP
gateway's tunnels, the ILNP overlay). See docs/tunnel.md.

    config = TunnelConfig(dev="tun0", local=Endpoint.parse("192.0.2.1:4789"),
                          remote=Endpoint.parse("192.0.2.2:4789"))
    with TunnelDaemon(config) as tunnel:      # device, addresses, sockets, forwarding
        ...
        tunnel.counters()

Lower-level pieces for embedding: `QueuePump` (one TUN queue and one socket, with per-packet
`Hooks`), `Forwarder` (runs pumps on one thread), `gso.Encapsulator` / `gso.Decapsulator`
(segmentation and coalescing), `wire` (the datagram header).
"""

from ipshift.tunnel.config import AddressMapping, ConfigError, Endpoint, TunnelConfig
from ipshift.tunnel.daemon import TunnelDaemon, TunnelError
from ipshift.tunnel.forwarder import Counters, Forwarder, Hooks, QueuePump
from ipshift.tunnel.rewrite import AddressRewriter

__all__ = [
    "AddressMapping",
    "AddressRewriter",
    "ConfigError",
    "Counters",
    "Endpoint",
    "Forwarder",
    "Hooks",
    "QueuePump",
    "TunnelConfig",
    "TunnelDaemon",
    "TunnelError",
]
