"""`ipshift rsip server|status|stop|dump|client`, and the seed's own commands.

    ipshift rsip server [--config FILE] [--int-if IF --ext-if IF] [--pool ADDRS] ...   (= rsipd)
    ipshift rsip status [--json]     # the gateway's clients, binds and counters
    ipshift rsip dump                # write and print the status file (as SIGUSR1 does)
    ipshift rsip client -s SERVER [-l PORT]... [-m MTU] [-n PORTS]   (= rsipclient)
    rsipdctl start|stop|dump [--config FILE]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ipshift.daemon.cli import (
    add_control_commands,
    add_run_options,
    call,
    entry_point,
    options_from_args,
    start_logging,
    stop_instance,
)
from ipshift.daemon.runtime import default_socket
from ipshift.ui import UserError

START_TIMEOUT = 15.0  # seconds `rsipdctl start` waits for the gateway to answer


def _add_target(p: argparse.ArgumentParser) -> None:
    p.add_argument("--name", default="default",
                   help="the gateway instance name (default: default)")
    p.add_argument("--socket", metavar="PATH",
                   help="control socket (default: /run/ipshift/rsip-NAME.sock)")


def _socket_for(args: argparse.Namespace) -> Path:
    return Path(args.socket) if args.socket else default_socket("rsip", args.name)


def _config(args: argparse.Namespace) -> Any:
    from ipshift.rsip.config import DEFAULT_CONFIG, ConfigError, load_config, parse_pool

    overrides: dict[str, Any] = {"name": args.name}
    try:
        for key in ("int_if", "ext_if", "port", "tunnel_port", "mtu", "block",
                    "max_clients"):
            value = getattr(args, key, None)
            if value is not None:
                overrides[key] = value
        if getattr(args, "pool", None):
            overrides["pool"] = parse_pool(args.pool)
        if getattr(args, "port_range", None):
            low, _, high = args.port_range.partition("-")
            overrides["port_range"] = (int(low), int(high or low))
        if getattr(args, "listen_range", None):
            low, _, high = args.listen_range.partition("-")
            overrides["listen_range"] = (int(low), int(high or low))
        if getattr(args, "lease_time", None):
            overrides["lease_time"] = float(args.lease_time)
        if getattr(args, "state_dir", None):
            overrides["state_dir"] = Path(args.state_dir)
        if getattr(args, "tunnels", None):
            overrides["tunnels"] = tuple(args.tunnels.replace(",", " ").split())
        if getattr(args, "no_pcp", False):
            overrides["pcp"] = False
        path = Path(args.config) if getattr(args, "config", None) else None
        if path is None and DEFAULT_CONFIG.exists() and not (args.int_if and args.ext_if):
            path = DEFAULT_CONFIG
        if path is not None:
            return load_config(path, **overrides)
        from ipshift.rsip.config import GatewayConfig

        if not (args.int_if and args.ext_if):
            raise UserError(f"no configuration: give --config FILE (default {DEFAULT_CONFIG}) "
                            "or at least --int-if and --ext-if")
        return GatewayConfig(**overrides)
    except (ConfigError, ValueError) as exc:
        raise UserError(str(exc)) from exc


def _add_server_options(p: argparse.ArgumentParser) -> None:
    _add_target(p)
    p.add_argument("--config", metavar="FILE",
                   help="rsipd.conf with the seed's keys (default /etc/ipshift/rsipd.conf)")
    p.add_argument("--int-if", dest="int_if", metavar="IF",
                   help="internal interface: clients are accepted only there (INT_IF)")
    p.add_argument("--ext-if", dest="ext_if", metavar="IF",
                   help="external interface with the public address (EXT_IF)")
    p.add_argument("--pool", metavar="ADDRS", help="public addresses to lease (POOL)")
    p.add_argument("--port-range", dest="port_range", metavar="FIRST-LAST",
                   help="ports leased in blocks (PORT_RANGE, default 8192-32767)")
    p.add_argument("--listen-range", dest="listen_range", metavar="FIRST-LAST",
                   help="ports hosts may LISTEN on (LISTEN_RANGE, default 1-1023)")
    p.add_argument("--max-clients", dest="max_clients", type=int, metavar="N",
                   help="MAX_CLIENTS (0: five per public address)")
    p.add_argument("--mtu", type=int, help="MTU of the gateway's tunnel end (default 1480)")
    p.add_argument("--port", type=int, help="RSIP control port (default 4555)")
    p.add_argument("--tunnel-port", dest="tunnel_port", type=int,
                   help="UDP port of the tunnel framing (default 4556)")
    p.add_argument("--tunnels", metavar="LIST", help="tunnels offered: udp ipip gre")
    p.add_argument("--block", type=int, help="ports per RSAP-IP bind (default 255)")
    p.add_argument("--lease-time", dest="lease_time", type=int, metavar="SECONDS",
                   help="lease of binds and registrations (default 600)")
    p.add_argument("--state-dir", dest="state_dir", metavar="DIR",
                   help="where the lease file lives (default /var/lib/ipshift)")
    p.add_argument("--no-pcp", dest="no_pcp", action="store_true",
                   help="do not answer PCP and NAT-PMP")
    p.add_argument("-v", "--verbose", action="count", default=0)
    add_run_options(p)


def _server(args: argparse.Namespace) -> int:
    from ipshift.rsip.daemon import run_daemon

    config = _config(args)
    sock = _socket_for(args)
    options = options_from_args(args, socket=sock)
    if os.geteuid() != 0:
        raise UserError("You must be root to start the RSIP server (it creates a tunnel "
                        "device and nftables state)")
    start_logging(args, args.verbose, "rsipd")
    return run_daemon(config, socket_path=sock, metrics=options.metrics)


def _dump(args: argparse.Namespace) -> int:
    result = call(_socket_for(args), "dump")
    if result.get("table"):
        print(result["table"], end="")
    if result.get("written"):
        print(f"(written to {result['written']})", file=sys.stderr)
    else:
        raise UserError(f"the status file could not be written: {result.get('error')}")
    return 0


def _client(args: argparse.Namespace) -> int:
    from ipshift.rsip import clientcli

    result: int = clientcli.run(args)
    return result


def register(sub: Any) -> None:
    p = sub.add_parser("rsip", help="Realm Specific IP gateway and client, with PCP and "
                                    "NAT-PMP")
    actions = p.add_subparsers(dest="rsip_command", metavar="ACTION", required=True)
    server = actions.add_parser("server", help="run the RSIP gateway (rsipd)")
    _add_server_options(server)
    server.set_defaults(handler=_server)
    add_control_commands(actions, "RSIP gateway", _add_target, _socket_for)
    dump = actions.add_parser("dump", help="write the gateway's status file and print it")
    _add_target(dump)
    dump.set_defaults(handler=_dump)
    from ipshift.rsip import clientcli

    client = actions.add_parser("client", help="lease a public address and ports from an "
                                               "RSIP gateway (rsipclient)")
    clientcli.add_client_arguments(client)
    client.set_defaults(handler=_client)


# --- the seed's commands ----------------------------------------------------------------------
def rsipd_main(argv: Sequence[str] | None = None) -> int:
    def build() -> argparse.ArgumentParser:
        p = argparse.ArgumentParser(prog="rsipd", description="the RSIP gateway")
        _add_server_options(p)
        p.set_defaults(handler=_server)
        return p

    return entry_point(build, argv)


def _ctl_start(args: argparse.Namespace) -> int:
    sock = _socket_for(args)
    _config(args)  # a configuration error is reported here, not lost in the background
    if sock.exists():
        try:
            call(sock, "ping")
        except UserError:
            pass
        else:
            raise UserError(f"an RSIP server already runs on {sock} (rsipdctl stop first)")
    command = [sys.executable, "-m", "ipshift", "rsip", "server", "--name", args.name]
    for option in ("config", "socket", "int_if", "ext_if"):
        value = getattr(args, option, None)
        if value:
            command += [f"--{option.replace('_', '-')}", str(value)]
    process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            error = (process.stderr.read() if process.stderr else b"").decode(errors="replace")
            lines = [line for line in error.splitlines() if line.strip()]
            raise UserError(lines[-1] if lines else f"rsipd exited with {process.returncode}")
        try:
            call(sock, "ping")
        except UserError:
            time.sleep(0.1)
            continue
        if process.stderr is not None:
            process.stderr.close()  # from now on it logs to syslog
        print(f"rsipd started (pid {process.pid})")
        return 0
    raise UserError(f"rsipd (pid {process.pid}) did not answer within {START_TIMEOUT:g}s; "
                    "see syslog")


def rsipdctl_main(argv: Sequence[str] | None = None) -> int:
    def build() -> argparse.ArgumentParser:
        p = argparse.ArgumentParser(prog="rsipdctl", description="start, stop or dump the "
                                                                  "RSIP server")
        sub = p.add_subparsers(dest="action", metavar="start|stop|dump", required=True)
        start = sub.add_parser("start", help="start rsipd in the background")
        _add_target(start)
        start.add_argument("--config", metavar="FILE")
        start.add_argument("--int-if", dest="int_if")
        start.add_argument("--ext-if", dest="ext_if")
        start.set_defaults(handler=_ctl_start)
        stop = sub.add_parser("stop", help="stop rsipd (it removes its tunnels and rules)")
        _add_target(stop)
        stop.set_defaults(handler=lambda args: stop_instance(_socket_for(args), 15.0))
        dump = sub.add_parser("dump", help="write the status file and print it")
        _add_target(dump)
        dump.set_defaults(handler=_dump)
        return p

    return entry_point(build, argv)
