"""One tunnel end for the tunnel-peers benchmark, run inside a lab namespace:

    python -m bench.tunnel_hook_runner SPEC.json

SPEC is a JSON object: "dev", "local" (ADDR:PORT), either "remote" (ADDR:PORT) or "peers" (a
list of `Peer.as_dict()` objects, each with an optional "key_file"), and optionally
"addresses", "routes", "queues", "headroom", "framing", "socket", and "hook".

- With "hook": "dstopt" the end runs `TunnelDaemon` with a length-changing hook, the shape of
  ILNP's nonce option: outbound every IPv6 packet gets an 8-byte destination-options header
  (one PadN option) after its fixed header, inbound that header is taken out again. The
  daemon runs without a control socket; SIGTERM ends it.
- Without a hook it runs the tunnel daemon on the runtime, as `ipshift tunnel run` does, with
  its control socket ("peers", "peer-set", "peers-replace", ...) and one method more,
  "bench-load-peers" {"path": FILE}: replace the table with the peers of a JSON file (the same
  `replace_peers` that "peers-replace" calls, for tables whose request would exceed the
  control channel's 64 KiB).

Either way it prints "tunnel DEV up: ..." once forwarding.
"""

from __future__ import annotations

import ipaddress
import json
import signal
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ipshift.daemon import DaemonOptions, Runtime, run_service
from ipshift.tunnel.auth import read_key_file
from ipshift.tunnel.config import ConfigError, Endpoint, TunnelConfig
from ipshift.tunnel.daemon import TunnelDaemon, TunnelService
from ipshift.tunnel.hooks import FORWARD, HookResult, Hooks, packet_length
from ipshift.tunnel.peers import Peer
from ipshift.ui import setup_logging

IPV6_HEADER_LEN = 40
NEXT_HEADER_AT = 6  # offset of the IPv6 next-header field
PAYLOAD_LENGTH_AT = 4  # offset of the IPv6 payload-length field
DESTINATION_OPTIONS = 60  # IPv6 next-header value of a destination-options header
# Header extension length 0 (8 bytes in all), then one PadN option padding the 6 bytes left.
PADN_OPTION = bytes((0, 1, 4, 0, 0, 0, 0))
OPTION_HEADER_LEN = 1 + len(PADN_OPTION)


def insert_destination_options(buf: bytearray, offset: int, partial: bool,
                               peer: Peer) -> HookResult:
    """Outbound: the IPv6 packet at buf[offset:] with an 8-byte destination-options header
    after its fixed header (the L4 header and its checksum stay as they are: the pseudo-header
    counts the L4 length, not the extension headers)."""
    if buf[offset] >> 4 != 6:
        return FORWARD
    end = offset + packet_length(buf, offset)
    fixed = offset + IPV6_HEADER_LEN
    packet = bytearray(buf[offset:fixed])
    packet.append(packet[NEXT_HEADER_AT])
    packet += PADN_OPTION
    packet += buf[fixed:end]
    packet[NEXT_HEADER_AT] = DESTINATION_OPTIONS
    payload = (packet[PAYLOAD_LENGTH_AT] << 8 | packet[PAYLOAD_LENGTH_AT + 1]) + OPTION_HEADER_LEN
    packet[PAYLOAD_LENGTH_AT:PAYLOAD_LENGTH_AT + 2] = payload.to_bytes(2, "big")
    return packet


def remove_destination_options(buf: bytearray, offset: int, partial: bool,
                               peer: Peer) -> HookResult:
    """Inbound: the packet without the header `insert_destination_options` put in (packets
    without it pass unchanged)."""
    fixed = offset + IPV6_HEADER_LEN
    if (buf[offset] >> 4 != 6 or buf[offset + NEXT_HEADER_AT] != DESTINATION_OPTIONS
            or buf[fixed + 1:fixed + OPTION_HEADER_LEN] != PADN_OPTION):
        return FORWARD
    end = offset + packet_length(buf, offset)
    packet = bytearray(buf[offset:fixed])
    packet += buf[fixed + OPTION_HEADER_LEN:end]
    packet[NEXT_HEADER_AT] = buf[fixed]
    payload = (packet[PAYLOAD_LENGTH_AT] << 8 | packet[PAYLOAD_LENGTH_AT + 1]) - OPTION_HEADER_LEN
    packet[PAYLOAD_LENGTH_AT:PAYLOAD_LENGTH_AT + 2] = payload.to_bytes(2, "big")
    return packet


DESTINATION_OPTIONS_HOOKS = Hooks(outbound=insert_destination_options,
                                  inbound=remove_destination_options, resizes=True)


def peer_from_spec(entry: Mapping[str, Any]) -> Peer:
    key_file = entry.get("key_file")
    return Peer.from_dict(entry, key=read_key_file(key_file) if key_file else None)


def config_from_spec(spec: Mapping[str, Any]) -> TunnelConfig:
    remote = spec.get("remote")
    return TunnelConfig(
        dev=spec["dev"],
        local=Endpoint.parse(spec["local"], "local"),
        remote=Endpoint.parse(remote, "remote") if remote else None,
        peers=tuple(peer_from_spec(entry) for entry in spec.get("peers", ())),
        addresses=tuple(ipaddress.ip_interface(a) for a in spec.get("addresses", ())),
        routes=tuple(ipaddress.ip_network(r) for r in spec.get("routes", ())),
        queues=int(spec.get("queues", 1)),
        headroom=int(spec.get("headroom", 0)),
        framing=spec.get("framing", "batch"),
    )


class BenchTunnelService(TunnelService):
    """The tunnel daemon of `ipshift tunnel run`, plus "bench-load-peers"."""

    async def start(self, rt: Runtime) -> None:
        await super().start(rt)
        rt.method("bench-load-peers", self._load_peers)

    def _load_peers(self, params: dict[str, Any]) -> dict[str, Any]:
        entries = json.loads(Path(str(params["path"])).read_text())
        peers = [peer_from_spec(entry) for entry in entries]
        started = time.perf_counter()
        generation = self._live().replace_peers(peers)
        return {"generation": generation, "peers": len(peers),
                "seconds": time.perf_counter() - started}


def _run_with_hooks(config: TunnelConfig) -> int:
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda signum, frame: stopping.set())
    signal.signal(signal.SIGINT, lambda signum, frame: stopping.set())
    with TunnelDaemon(config, DESTINATION_OPTIONS_HOOKS) as daemon:
        print(f"tunnel {config.dev} up: {config.local} <-> {config.remote}, MTU {daemon.mtu}, "
              "destination-options hook", flush=True)
        while not stopping.wait(1.0):
            if not daemon.alive():
                print("forwarding stopped unexpectedly", file=sys.stderr)
                return 1
        # What was forwarded and dropped, for whoever reads the output afterwards.
        print(json.dumps(daemon.counters().as_dict()), file=sys.stderr, flush=True)
    return 0


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m bench.tunnel_hook_runner SPEC.json", file=sys.stderr)
        return 2
    spec = json.loads(Path(argv[0]).read_text())
    setup_logging(1)
    try:
        config = config_from_spec(spec)
    except (ConfigError, KeyError, ValueError) as exc:
        print(f"bad tunnel spec {argv[0]}: {exc}", file=sys.stderr)
        return 2
    hook = spec.get("hook")
    if hook == "dstopt":
        return _run_with_hooks(config)
    if hook is not None:
        print(f"unknown hook {hook!r}: the runner knows 'dstopt'", file=sys.stderr)
        return 2
    socket = spec.get("socket")
    return run_service(BenchTunnelService(config),
                       DaemonOptions(socket=Path(socket) if socket else None))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
