"""The gateway's configuration file, rsipd.conf: the seed server's keys, one per line.

    # /etc/ipshift/rsipd.conf          KEY=VALUE or KEY VALUE; '#' starts a comment
    INT_IF=eth1                        # clients are accepted only on this side
    EXT_IF=eth0                        # the public side
    POOL=203.0.113.1                   # public addresses to lease (list, a-b range or CIDR);
                                       #   default: EXT_IF's primary IPv4 address
    PORT_RANGE=8192-32767              # ports leased in blocks (RSAP-IP); keep it apart
                                       #   from the gateway's own ip_local_port_range
    LISTEN_RANGE=1-1023                # well-known ports a host may LISTEN on
    MAX_CLIENTS=0                      # 0: five per public address
    MTU=1480                           # the gateway end of the tunnels
    LOG_LEVEL=6                        # syslog level 0-7 (or a name: info, debug, ...)
    PORT=4555                          # the RSIP control port (TCP and UDP)
    TUNNEL_PORT=4556                   # UDP port of ipshift's tunnel framing
    TUNNELS=udp ipip gre               # tunnels offered (the first a client accepts wins)
    BLOCK=255                          # ports per RSAP-IP bind when a host does not say
    LEASE_TIME=600                     # seconds of a bind and a registration
    RSA_IP=yes                         # lease whole pool addresses other than EXT_IF's own
    PCP=yes                            # answer PCP and NAT-PMP on INT_IF (UDP 5351)
    PCP_THIRD_PARTY=no                 # PCP THIRD_PARTY option (mappings for other hosts)
    STATE_DIR=/var/lib/ipshift         # where the lease file lives
    STAT_FILE=/run/ipshift/rsipd.stat  # written on SIGUSR1 (and `rsipdctl dump`)

    config = load_config(Path("/etc/ipshift/rsipd.conf"), name="default")
"""

from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_CONFIG = Path("/etc/ipshift/rsipd.conf")
DEFAULT_STATE_DIR = Path("/var/lib/ipshift")
TUNNEL_NAMES = ("udp", "ipip", "gre")
LOG_LEVELS = {"emerg": 0, "alert": 1, "crit": 2, "err": 3, "error": 3, "warning": 4,
              "warn": 4, "notice": 5, "info": 6, "debug": 7}
_LINE = re.compile(r"\s*([A-Z_][A-Z0-9_]*)\s*(?:=|\s)\s*(.*?)\s*\Z")
_KEYS = ("INT_IF", "EXT_IF", "POOL", "PORT_RANGE", "LISTEN_RANGE", "MAX_CLIENTS", "MTU",
         "LOG_LEVEL", "PORT", "TUNNEL_PORT", "TUNNELS", "BLOCK", "LEASE_TIME", "RSA_IP", "PCP",
         "PCP_THIRD_PARTY", "STATE_DIR", "STAT_FILE")


class ConfigError(ValueError):
    """A configuration that cannot be used; str() is one line naming what and where."""


def state_dir() -> Path:
    return Path(os.environ.get("STATE_DIRECTORY", "").split(":")[0] or DEFAULT_STATE_DIR)


@dataclass(frozen=True)
class GatewayConfig:
    int_if: str
    ext_if: str
    name: str = "default"
    pool: tuple[ipaddress.IPv4Address, ...] = ()   # empty: EXT_IF's primary address
    port_range: tuple[int, int] = (8192, 32767)
    listen_range: tuple[int, int] = (1, 1023)
    max_clients: int = 0
    mtu: int = 1480
    log_level: int = 6
    port: int = 4555
    tunnel_port: int = 4556
    tunnels: tuple[str, ...] = TUNNEL_NAMES
    block: int = 255
    lease_time: float = 600.0
    rsa_ip: bool = True
    pcp: bool = True
    pcp_third_party: bool = False
    state_dir: Path = field(default_factory=state_dir)
    stat_file: Path | None = None
    netns: str | None = None

    def __post_init__(self) -> None:
        for low, high, key in (*self.port_range, "PORT_RANGE"), (*self.listen_range,
                                                                    "LISTEN_RANGE"):
            if not 1 <= low <= high <= 0xFFFF:
                raise ConfigError(f"{key} {low}-{high} is not a range within 1-65535")
        for value, key in ((self.port, "PORT"), (self.tunnel_port, "TUNNEL_PORT")):
            if not 1 <= value <= 0xFFFF:
                raise ConfigError(f"{key} {value} is not a port (1-65535)")
        if not 576 <= self.mtu <= 65535:
            raise ConfigError(f"MTU {self.mtu} is not 576-65535")
        if not 1 <= self.block <= 4096:
            raise ConfigError(f"BLOCK {self.block} is not 1-4096 ports")
        if not 10 <= self.lease_time <= 86400:
            raise ConfigError(f"LEASE_TIME {self.lease_time} is not 10-86400 seconds")
        if not 0 <= self.max_clients <= 1_000_000:
            raise ConfigError(f"MAX_CLIENTS {self.max_clients} is not 0-1000000")
        unknown = [t for t in self.tunnels if t not in TUNNEL_NAMES]
        if unknown or not self.tunnels:
            raise ConfigError(f"TUNNELS {' '.join(self.tunnels)!r}: give one or more of "
                              f"{', '.join(TUNNEL_NAMES)} (L2TP is not supported)")
        if self.int_if == self.ext_if:
            raise ConfigError("INT_IF and EXT_IF are the same interface; clients must come "
                              "from the internal side")

    @property
    def lease_file(self) -> Path:
        return self.state_dir / f"rsip-{self.name}.db"

    @property
    def status_file(self) -> Path:
        from ipshift.ctl.protocol import DEFAULT_DIR

        return self.stat_file or DEFAULT_DIR / f"rsipd-{self.name}.stat"


def _range(text: str, key: str) -> tuple[int, int]:
    low, sep, high = text.partition("-")
    try:
        first = int(low)
        last = int(high) if sep else first
    except ValueError as exc:
        raise ConfigError(f"{key} {text!r} is not FIRST-LAST") from exc
    return first, last


def parse_pool(text: str) -> tuple[ipaddress.IPv4Address, ...]:
    """"203.0.113.1 203.0.113.5-203.0.113.9, 198.51.100.0/30" (a network gives its hosts)."""
    addresses: list[ipaddress.IPv4Address] = []
    for item in re.split(r"[\s,]+", text.strip()):
        if not item:
            continue
        try:
            if "/" in item:
                net = ipaddress.IPv4Network(item, strict=False)
                addresses += list(net.hosts()) if net.prefixlen < 31 else list(net)
            elif "-" in item:
                low, high = (ipaddress.IPv4Address(p) for p in item.split("-", 1))
                if int(high) - int(low) > 65535 or high < low:
                    raise ValueError("a range of at most 65536 addresses, low-high")
                addresses += [ipaddress.IPv4Address(a) for a in range(int(low), int(high) + 1)]
            else:
                addresses.append(ipaddress.IPv4Address(item))
        except ValueError as exc:
            raise ConfigError(f"POOL entry {item!r} is not an IPv4 address, a-b range or "
                              f"network ({exc})") from exc
    if len(set(addresses)) != len(addresses):
        raise ConfigError("POOL names an address twice")
    return tuple(addresses)


def _yes(text: str, key: str) -> bool:
    value = text.lower()
    if value in ("yes", "on", "true", "1"):
        return True
    if value in ("no", "off", "false", "0"):
        return False
    raise ConfigError(f"{key} {text!r} is not yes or no")


def _int(text: str, key: str) -> int:
    try:
        return int(text)
    except ValueError as exc:
        raise ConfigError(f"{key} {text!r} is not a number") from exc


def parse_config(text: str, *, where: str = "rsipd.conf", **overrides: Any) -> GatewayConfig:
    values: dict[str, Any] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0]
        if not line.strip():
            continue
        match = _LINE.match(line)
        if match is None or match.group(1) not in _KEYS:
            raise ConfigError(f"{where} line {number}: {raw.strip()!r} is not KEY=VALUE with "
                              f"a known key ({', '.join(_KEYS)})")
        key, value = match.group(1), match.group(2).strip().strip('"')
        try:
            values.update(_convert(key, value))
        except ConfigError as exc:
            raise ConfigError(f"{where} line {number}: {exc}") from exc
    values.update({k: v for k, v in overrides.items() if v is not None})
    for key in ("int_if", "ext_if"):
        if key not in values:
            raise ConfigError(f"{where}: {key.upper()} is missing (the gateway's "
                              f"{'internal' if key == 'int_if' else 'external'} interface)")
    try:
        return GatewayConfig(**values)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from exc


def _convert(key: str, value: str) -> dict[str, Any]:
    if key in ("INT_IF", "EXT_IF"):
        if not value or len(value) > 15 or "/" in value:
            raise ConfigError(f"{key} {value!r} is not an interface name")
        return {key.lower(): value}
    if key == "POOL":
        return {"pool": parse_pool(value)}
    if key in ("PORT_RANGE", "LISTEN_RANGE"):
        return {key.lower(): _range(value, key)}
    if key in ("MAX_CLIENTS", "MTU", "PORT", "TUNNEL_PORT", "BLOCK"):
        return {key.lower(): _int(value, key)}
    if key == "LEASE_TIME":
        return {"lease_time": float(_int(value, key))}
    if key == "LOG_LEVEL":
        level = LOG_LEVELS.get(value.lower())
        if level is None:
            level = _int(value, key)
            if not 0 <= level <= 7:
                raise ConfigError(f"LOG_LEVEL {value} is not 0-7 or a syslog level name")
        return {"log_level": level}
    if key == "TUNNELS":
        return {"tunnels": tuple(re.split(r"[\s,]+", value.lower()))}
    if key in ("RSA_IP", "PCP", "PCP_THIRD_PARTY"):
        return {key.lower(): _yes(value, key)}
    if key == "STATE_DIR":
        return {"state_dir": Path(value)}
    return {"stat_file": Path(value)}  # STAT_FILE


def load_config(path: Path, **overrides: Any) -> GatewayConfig:
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}; give the file with --config "
                          "or the interfaces with --int-if/--ext-if") from exc
    return parse_config(text, where=str(path), **overrides)


def python_log_level(level: int) -> int:
    """syslog 0-7 -> logging levels."""
    import logging

    return {0: logging.CRITICAL, 1: logging.CRITICAL, 2: logging.CRITICAL, 3: logging.ERROR,
            4: logging.WARNING, 5: logging.INFO, 6: logging.INFO, 7: logging.DEBUG}[level]
