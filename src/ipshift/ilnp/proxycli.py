"""`ipshift ilnp proxy|proxy-create|seed-node`: the seed's application interface.

    ipshift ilnp seed-node CONFIG [PROXY_PORT]     # a seed overlay node (and its proxy)
    ipshift ilnp proxy PROXY_PORT [--node NAME]     # the proxy beside the node daemon (TUN)
    ipshift ilnp proxy-create LOCAL_PORT REMOTE_HOSTNAME REMOTE_PORT
"""

from __future__ import annotations

import argparse
import contextlib
import socket
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ipshift.ui import UserError

CREATE_TIMEOUT = 5.0  # seconds proxy-create waits for the proxy's answer
_PORT_HELP = "a UDP port, 1-65535"


def _port(text: str) -> int:
    if not text.isascii() or not text.isdigit() or not 1 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not {_PORT_HELP}")
    return int(text)


def _proxy_port(text: str) -> int:
    if text == "0":
        return 0
    return _port(text)


def _add_daemon_options(p: argparse.ArgumentParser, what: str, control: str) -> None:
    from ipshift.daemon.cli import add_run_options

    p.add_argument("--unix", metavar="PATH",
                   help="the mapping socket (default /run/ipshift/ilnp-proxy-PROXY_PORT.sock; "
                        "its directory must be private, 0700)")
    p.add_argument("--socket", metavar="PATH",
                   help=f"control socket of the {what} (default /run/ipshift/{control})")
    p.add_argument("--strict-source", dest="strict_source", action="store_true",
                   help="deliver a datagram for local port P only when it comes from P's "
                        "mapped remote host (the seed delivers whatever the sender)")
    p.add_argument("-v", "--verbose", action="count", default=0,
                   help="log more (routine events are logged already; -v adds DEBUG)")
    add_run_options(p)


def add_proxy_commands(sub: Any) -> None:
    """Add `seed-node`, `proxy` and `proxy-create` to the `ipshift ilnp` subparsers."""
    _add_seed_node(sub)
    _add_tun_proxy(sub)
    _add_create(sub)


def _add_seed_node(sub: Any) -> None:
    seed = sub.add_parser(
        "seed-node", help="run a node of the seed's overlay (UDP multicast groups), with the "
                          "UDP proxy into it when PROXY_PORT is given",
        description="A node of the seed's ILNP overlay, configured by the seed's INI keys "
                    "(hostname, nid, locators, mcast_interface, ...); with PROXY_PORT, local "
                    "programs reach the overlay through 127.0.0.1:PROXY_PORT.")
    seed.add_argument("config", metavar="CONFIG", help="the node's INI file (the seed's keys)")
    seed.add_argument("proxy_port", metavar="PROXY_PORT", type=_proxy_port, nargs="?",
                      help="the proxy's UDP port on 127.0.0.1 (0: any free one); without it "
                           "the node runs alone, e.g. as a router")
    _add_daemon_options(seed, "node", "ilnp-seed-HOSTNAME.sock")
    seed.set_defaults(handler=_seed_node)


def _add_tun_proxy(sub: Any) -> None:
    tun = sub.add_parser(
        "proxy", help="run the UDP proxy beside the ILNP node daemon (its TUN carries the "
                      "datagrams)",
        description="Local programs reach correspondents through 127.0.0.1:PROXY_PORT; each "
                    "datagram goes with a 4-byte port header to the remote's application "
                    "address, UDP port OVERLAY_PORT, where its proxy delivers it.")
    tun.add_argument("proxy_port", metavar="PROXY_PORT", type=_proxy_port,
                     help="the proxy's UDP port on 127.0.0.1 (0: any free one)")
    target = tun.add_mutually_exclusive_group()
    target.add_argument("--node", default="ilnp0", metavar="NAME",
                        help="the node daemon that resolves names (default ilnp0)")
    target.add_argument("--node-socket", dest="node_socket", metavar="PATH",
                        help="the node daemon's control socket, instead of --node")
    tun.add_argument("--overlay-port", dest="overlay_port", type=_port, default=7701,
                     metavar="PORT", help="UDP port of the proxies on every node (default 7701)")
    _add_daemon_options(tun, "proxy", "ilnp-proxy-PROXY_PORT.ctl.sock")
    tun.set_defaults(handler=_tun_proxy)


def _add_create(sub: Any) -> None:
    create = sub.add_parser(
        "proxy-create", help="map a local UDP port to a remote host and port through a "
                             "running proxy; prints the proxy's port",
        description="Datagrams from 127.0.0.1:LOCAL_PORT to the proxy's port go to "
                    "REMOTE_HOSTNAME, port REMOTE_PORT; datagrams for LOCAL_PORT come back "
                    "from the proxy's port. A new mapping of LOCAL_PORT replaces the old one.")
    create.add_argument("local_port", metavar="LOCAL_PORT", type=_port,
                        help="the local program's UDP port")
    create.add_argument("remote_host", metavar="REMOTE_HOSTNAME", help="the correspondent")
    create.add_argument("remote_port", metavar="REMOTE_PORT", type=_port,
                        help="the port on the correspondent")
    which = create.add_mutually_exclusive_group()
    which.add_argument("--proxy-port", dest="proxy_port", type=_port, metavar="PORT",
                       help="the proxy running on this port (default: the only one running)")
    which.add_argument("--unix", metavar="PATH", help="the proxy's mapping socket")
    create.add_argument("--timeout", type=float, default=CREATE_TIMEOUT, metavar="SECONDS",
                        help=f"how long to wait for the proxy (default {CREATE_TIMEOUT:g})")
    create.set_defaults(handler=_create)


# --- handlers ----------------------------------------------------------------------------------
def _seed_node(args: argparse.Namespace) -> int:
    from ipshift.daemon.cli import options_from_args, start_logging
    from ipshift.daemon.runtime import run_service
    from ipshift.ilnp.proxyd import (
        SeedConfigError,
        SeedNodeService,
        load_seed_config,
        seed_control_socket,
    )

    try:
        config = load_seed_config(Path(args.config))
        service = SeedNodeService(config, args.proxy_port, _path(args.unix),
                                  strict_source=args.strict_source)
    except (SeedConfigError, ValueError) as exc:
        raise UserError(str(exc)) from exc
    sock = _path(args.socket) or seed_control_socket(config.hostname)
    options = options_from_args(args, socket=sock)
    start_logging(args, args.verbose, "ipshift-ilnp-seed")
    return run_service(service, options)


def _tun_proxy(args: argparse.Namespace) -> int:
    from ipshift.daemon.cli import options_from_args, start_logging
    from ipshift.daemon.runtime import default_socket, run_service
    from ipshift.ilnp.proxyd import TunProxyService, node_resolver, proxy_control_socket

    node_socket = _path(args.node_socket) or default_socket("ilnp", args.node)
    service = TunProxyService(args.proxy_port, node_resolver(node_socket),
                              overlay_port=args.overlay_port, unix_path=_path(args.unix),
                              strict_source=args.strict_source, node=str(node_socket))
    sock = _path(args.socket) or proxy_control_socket(args.proxy_port)
    options = options_from_args(args, socket=sock)
    start_logging(args, args.verbose, "ipshift-ilnp-proxy")
    return run_service(service, options)


def _path(value: str | None) -> Path | None:
    return Path(value) if value else None


def _create(args: argparse.Namespace) -> int:
    from ipshift.ilnp.proxy import MappingRequest, ProxyError, check_hostname

    try:
        request = MappingRequest(args.local_port, check_hostname(args.remote_host),
                                 args.remote_port)
    except ProxyError as exc:
        raise UserError(exc.message) from exc
    if not 0 < args.timeout <= 300:
        raise UserError(f"--timeout {args.timeout:g}: give 0-300 seconds")
    path = _path(args.unix) or _find_proxy(args.proxy_port)
    answer = send_mapping(path, request.encode(), args.timeout)
    if answer.startswith("error:") or not answer.isdigit():
        print(answer if answer.startswith("error:") else f"error: the proxy answered "
              f"{answer[:60]!r}", file=sys.stderr)
        return 1
    print(answer)
    return 0


def _find_proxy(port: int | None) -> Path:
    from ipshift.ctl import protocol
    from ipshift.ilnp.proxyd import mapping_socket

    if port is not None:
        return mapping_socket(port)
    run_dir = protocol.DEFAULT_DIR
    found = sorted(p for p in run_dir.glob("ilnp-proxy-*.sock")
                   if p.name[len("ilnp-proxy-"):-len(".sock")].isdigit())
    if len(found) == 1:
        return found[0]
    if not found:
        raise UserError(f"no proxy runs here (no {run_dir}/ilnp-proxy-PORT.sock): start "
                        "`ipshift ilnp proxy PORT` or `ipshift ilnp seed-node CONFIG PORT`, "
                        "or give --unix PATH")
    ports = ", ".join(p.name[len("ilnp-proxy-"):-len(".sock")] for p in found)
    raise UserError(f"several proxies run (ports {ports}): say which with --proxy-port")


def send_mapping(path: Path, data: bytes, timeout: float) -> str:
    """Send one mapping datagram to the proxy's socket at `path` and return its answer."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
    try:
        sock.bind("")  # an abstract address of the kernel's choice: nothing to clean up
        sock.settimeout(timeout)
        try:
            sock.sendto(data, str(path))
        except FileNotFoundError:
            raise UserError(f"no proxy listens on {path} (is it running?)") from None
        except PermissionError:
            raise UserError(f"permission denied on {path}: mappings are for the proxy's "
                            "owner (run as root)") from None
        except ConnectionRefusedError:
            raise UserError(f"no proxy listens on {path} (a stale socket: is it "
                            "running?)") from None
        except OSError as exc:
            raise UserError(f"cannot reach the proxy on {path}: {exc.strerror or exc}") \
                from None
        try:
            answer = sock.recv(1024)
        except TimeoutError:
            raise UserError(f"the proxy on {path} did not answer within {timeout:g} s") \
                from None
        return answer.decode("ascii", errors="replace").strip()
    finally:
        with contextlib.suppress(OSError):
            sock.close()


# --- a stand-alone entry until `ipshift ilnp` carries these commands --------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ipshift ilnp",
                                     description="the ILNP overlay's UDP proxy")
    sub = parser.add_subparsers(dest="ilnp_command", metavar="ACTION", required=True)
    add_proxy_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from ipshift.daemon.cli import entry_point

    return entry_point(build_parser, argv)


if __name__ == "__main__":
    sys.exit(main())
