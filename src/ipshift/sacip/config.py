"""sacip's configuration: a TOML file, every key optional.

    port = 7366                         # UDP port of the daemons (both ends use the same)
    identity = "/var/lib/ipshift/sacip.key"   # this host's X25519 key, made on first start
    known_peers = "/var/lib/ipshift/sacip-known.json"   # trust on first use: what was seen
    trust = "tofu"                      # "tofu" or "pinned" (only the [[peer]] keys below)
    reset_unpreservable = false         # reset sessions a move cannot keep, instead of hanging
    scan_interval = 1.0                 # seconds between looks at the sessions (sock_diag)
    move_timeout = 120.0                # how long kept sessions wait for a new address
    exclude = ["192.0.2.0/28"]          # peers whose sessions are never remapped
    icmp_queue = 7366                   # NFQUEUE number for ICMP errors about moved sessions

    [[peer]]                            # a pinned peer (and, with trust = "tofu", one that
    name = "server1"                    # is trusted from the start)
    fingerprint = "SHA256:..."          # as `ipshift sacip status` shows it

    config = load_config("/etc/ipshift/sacip.toml")   # ConfigError: one line, file and key
"""

from __future__ import annotations

import ipaddress
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ipshift.sacip.wire import PORT

DEFAULT_STATE_DIR = Path("/var/lib/ipshift")


def state_dir() -> Path:
    """Where the identity and the known peers live: systemd's StateDirectory when it runs
    the daemon ($STATE_DIRECTORY), else /var/lib/ipshift."""
    return Path(os.environ.get("STATE_DIRECTORY", "").split(":")[0] or DEFAULT_STATE_DIR)
TRUST_MODES = ("tofu", "pinned")
_KEYS = ("port", "identity", "known_peers", "trust", "reset_unpreservable", "scan_interval",
         "move_timeout", "exclude", "icmp_queue", "peer")


class ConfigError(ValueError):
    """A configuration that cannot be used; str() is one line naming what and where."""


@dataclass(frozen=True)
class PinnedPeer:
    name: str
    fingerprint: str


@dataclass(frozen=True)
class SacipConfig:
    name: str = "default"  # the instance name (one daemon per namespace, normally)
    port: int = PORT
    identity: Path = field(default_factory=lambda: state_dir() / "sacip.key")
    known_peers: Path = field(default_factory=lambda: state_dir() / "sacip-known.json")
    trust: str = "tofu"
    reset_unpreservable: bool = False
    scan_interval: float = 1.0
    move_timeout: float = 120.0
    exclude: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    icmp_queue: int = PORT
    peers: tuple[PinnedPeer, ...] = field(default=())
    netns: str | None = None

    def __post_init__(self) -> None:
        if not 1 <= self.port <= 0xFFFF:
            raise ConfigError(f"port {self.port} is not a UDP port (1-65535)")
        if not 0 <= self.icmp_queue <= 0xFFFF:
            raise ConfigError(f"icmp_queue {self.icmp_queue} is not a queue number (0-65535)")
        if self.trust not in TRUST_MODES:
            raise ConfigError(f"trust {self.trust!r} is not one of {', '.join(TRUST_MODES)}")
        if self.trust == "pinned" and not self.peers:
            raise ConfigError('trust = "pinned" needs at least one [[peer]] with a fingerprint')
        if not 0.05 <= self.scan_interval <= 60:
            raise ConfigError(f"scan_interval {self.scan_interval} is not 0.05-60 seconds")
        if not 1 <= self.move_timeout <= 86400:
            raise ConfigError(f"move_timeout {self.move_timeout} is not 1-86400 seconds")
        seen: set[str] = set()
        for peer in self.peers:
            if not peer.fingerprint.startswith("SHA256:") or len(peer.fingerprint) != 50:
                raise ConfigError(f"peer {peer.name!r}: fingerprint {peer.fingerprint!r} is "
                                  "not SHA256: and 43 base64 characters (as `status` shows)")
            if peer.fingerprint in seen:
                raise ConfigError(f"peer {peer.name!r}: fingerprint listed twice")
            seen.add(peer.fingerprint)

    def excluded(self, address: str) -> bool:
        ip = ipaddress.ip_address(address)
        return any(ip.version == net.version and ip in net for net in self.exclude)


def load_config(path: str | Path, **overrides: Any) -> SacipConfig:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from exc
    try:
        return parse_config(text, str(path), **overrides)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from exc


def parse_config(text: str, source: str = "config", **overrides: Any) -> SacipConfig:
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"not valid TOML: {exc}") from exc
    return config_from_dict(doc, **overrides)


def config_from_dict(doc: Mapping[str, Any], **overrides: Any) -> SacipConfig:
    unknown = [key for key in doc if key not in _KEYS]
    if unknown:
        raise ConfigError(f"unknown key {unknown[0]!r}; the keys are {', '.join(_KEYS)}")
    values: dict[str, Any] = {}
    for key, kind in (("port", int), ("icmp_queue", int), ("scan_interval", (int, float)),
                      ("move_timeout", (int, float)), ("reset_unpreservable", bool),
                      ("trust", str), ("identity", str), ("known_peers", str)):
        if key not in doc:
            continue
        value = doc[key]
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise ConfigError(f"{key}: {value!r} is of the wrong kind")
        values[key] = Path(str(value)) if key in ("identity", "known_peers") else value
    if "exclude" in doc:
        if not isinstance(doc["exclude"], list):
            raise ConfigError("exclude: a list of prefixes, e.g. [\"192.0.2.0/28\"]")
        try:
            values["exclude"] = tuple(ipaddress.ip_network(str(p)) for p in doc["exclude"])
        except ValueError as exc:
            raise ConfigError(f"exclude: {exc}") from exc
    peers = doc.get("peer", [])
    if not isinstance(peers, list) or not all(isinstance(p, dict) for p in peers):
        raise ConfigError("write each pinned peer as a [[peer]] table")
    pinned = []
    for index, table in enumerate(peers, start=1):
        extra = [key for key in table if key not in ("name", "fingerprint")]
        if extra:
            raise ConfigError(f"peer #{index}: unknown key {extra[0]!r}; a peer has name, "
                              "fingerprint")
        name, fingerprint = table.get("name", f"peer{index}"), table.get("fingerprint")
        if not isinstance(name, str) or not isinstance(fingerprint, str):
            raise ConfigError(f"peer #{index}: name and fingerprint are text")
        pinned.append(PinnedPeer(name, fingerprint))
    values["peers"] = tuple(pinned)
    values.update(overrides)
    return SacipConfig(**values)
