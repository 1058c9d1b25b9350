"""The operator's peers: a TOML file of `[[peer]]` tables, and the control requests that hand
peers to a running tunnel.

    [[peer]]
    name = "branch1"
    endpoint = "192.0.2.2:4789"            # ADDR:PORT or [v6]:PORT; ipip/gre: the address
    encapsulation = "udp"                  # udp (default), ipip, gre
    prefixes = ["198.51.100.0/26"]         # inner destinations routed to it
    addresses = ["203.0.113.9"]            # whole inner addresses it owns
    port_ranges = ["203.0.113.7/tcp/1024-2047"]
    extra_sources = ["192.0.2.128/25"]     # inner sources it may use besides the above
    gre_key = 7                            # gre peers only
    key_file = "branch1.key"               # relative to the peers file's directory

A table's keys are those of `Peer.as_dict` (less `authenticated`), plus `key_file`: the file
is that description written by hand, and `Peer.from_dict` builds the peer from it. What is
checked here first is what lets an error name the file, the peer and the key in one line.

    peers = load_peers("/etc/ipshift/peers.toml")          # keys read, for TunnelConfig
    entries = load_peer_entries(path)                       # keys left to the daemon
    call(socket, "peers-replace", **replace_request(entries))
    call(socket, "peer-set", **peer_request(peer, "/etc/ipshift/branch1.key"))
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import tomllib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ipshift.tunnel.auth import read_key_file
from ipshift.tunnel.config import ConfigError, Endpoint
from ipshift.tunnel.peers import Encapsulation, Peer, PeerTable, PortRange

MAX_PEERS_FILE = 64 << 20  # bytes; far more than 10,000 peers take, and /dev/zero ends

# Keys of a [[peer]] table (those of Peer.as_dict, less `authenticated`, plus `key_file`) and
# what each holds: text, a list of texts, or (gre_key) a whole number.
PEER_KEYS = ("name", "endpoint", "encapsulation", "prefixes", "addresses", "port_ranges",
             "extra_sources", "gre_key", "key_file")
TEXT_KEYS = ("name", "endpoint", "encapsulation", "key_file")
LIST_KEYS = ("prefixes", "addresses", "port_ranges", "extra_sources")
REQUIRED_KEYS = ("name", "endpoint")

# How a key is named in an error: in a file by itself, on the command line by its option.
KeyNamer = Callable[[str], str]
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def file_key(key: str) -> str:
    """A key as an error shows it: a bare TOML key as written, anything else quoted (it may
    hold a newline or be empty, and an error is one line)."""
    return key if _BARE_KEY.fullmatch(key) else repr(key)


@dataclass(frozen=True)
class PeerEntry:
    """A peer as the operator wrote it: the peer (without its key) and its key file, if any,
    as an absolute path (a daemon reads it from another working directory)."""

    peer: Peer
    key_file: Path | None = None


class _KeyProblem(Exception):
    """What is wrong with the value of one key (becomes a ConfigError that names it)."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(problem)
        self.key = key
        self.problem = problem


# --- reading ----------------------------------------------------------------------------------
def load_peers(path: str | Path) -> tuple[Peer, ...]:
    """The peers of a peers file, their keys read from their key files."""
    path = Path(path)
    return with_keys(load_peer_entries(path), str(path))


def parse_peers(text: str, source: str = "peers file", *,
                directory: Path | None = None) -> tuple[Peer, ...]:
    """The peers of a peers file's text (`source` names it in errors; relative key files are
    found in `directory`, by default the working directory)."""
    return with_keys(parse_peer_entries(text, source, directory=directory), source)


def load_peer_entries(path: str | Path) -> tuple[PeerEntry, ...]:
    """The peers of a peers file with their key files unread."""
    path = Path(path)
    return parse_peer_entries(_read_text(path), str(path), directory=path.parent)


def parse_peer_entries(text: str, source: str = "peers file", *,
                       directory: Path | None = None) -> tuple[PeerEntry, ...]:
    """Every [[peer]] of the text, checked alone and together (two owners of one address,
    prefix, port or endpoint are refused as the tunnel would refuse them)."""
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML: {exc}") from exc
    except RecursionError as exc:
        raise ConfigError(f"{source}: not valid TOML: arrays or tables nest too deeply") from exc
    unknown = [key for key in document if key != "peer"]
    if unknown:
        raise ConfigError(f"{source}: unknown key {unknown[0]!r} at the top; the file lists "
                          "peers as [[peer]] tables")
    tables = document.get("peer", [])
    if not isinstance(tables, list):
        raise ConfigError(f"{source}: write each peer as a [[peer]] table (double brackets)")
    entries: list[PeerEntry] = []
    first_index: dict[str, int] = {}
    for index, table in enumerate(tables, 1):
        if not isinstance(table, dict):
            raise ConfigError(f"{source}: peer #{index}: a peer is a [[peer]] table, not "
                              f"{_kind(table)}")
        name = table.get("name")
        label = f"peer #{index}"
        if isinstance(name, str):
            label = f"peer {name!r}"
            if name in first_index:
                raise ConfigError(f"{source}: peer #{index}: name: {name!r} is already the "
                                  f"name of peer #{first_index[name]}; names must differ")
            first_index[name] = index
        entries.append(peer_entry(table, label, source=source, directory=directory))
    try:
        PeerTable(entry.peer for entry in entries)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from exc
    return tuple(entries)


def peer_entry(fields: Mapping[str, Any], label: str, *, source: str | None = None,
               directory: Path | None = None, key_name: KeyNamer = file_key) -> PeerEntry:
    """One peer from a [[peer]] table (or from command-line options in that shape). Errors
    read "{source}: {label}: {key_name(key)}: what is wrong"; relative key files are found in
    `directory`, by default the working directory."""
    prefix = f"{source}: " if source else ""
    try:
        description = _checked(fields)
    except _KeyProblem as exc:
        raise ConfigError(f"{prefix}{label}: {key_name(exc.key)}: {exc.problem}") from exc
    key_file = description.pop("key_file", None)
    try:
        peer = Peer.from_dict(description)
    except ConfigError as exc:  # what concerns several keys: Peer's message names the peer
        raise ConfigError(f"{prefix}{exc}") from exc
    path = None
    if key_file is not None:
        path = Path(os.path.abspath((directory or Path.cwd()) / key_file))
    return PeerEntry(peer, path)


def with_keys(entries: Iterable[PeerEntry], source: str = "peers file") -> tuple[Peer, ...]:
    """The entries' peers with their keys read (auth.read_key_file: its checks included)."""
    peers = []
    for entry in entries:
        peer = entry.peer
        if entry.key_file is not None:
            try:
                key = read_key_file(str(entry.key_file))
            except ConfigError as exc:
                raise ConfigError(f"{source}: peer {peer.name!r}: key_file: {exc}") from exc
            except ValueError as exc:  # a path the system cannot take
                raise ConfigError(f"{source}: peer {peer.name!r}: key_file: "
                                  f"{str(entry.key_file)!r} is not a usable path") from exc
            peer = dataclasses.replace(peer, key=key)
        peers.append(peer)
    return tuple(peers)


def _read_text(path: Path) -> str:
    try:
        with path.open("rb") as file:
            data = file.read(MAX_PEERS_FILE + 1)
    except OSError as exc:
        raise ConfigError(f"cannot read peers file {path}: {exc.strerror or exc}") from exc
    except ValueError as exc:
        raise ConfigError(f"peers file {str(path)!r} is not a usable path") from exc
    if len(data) > MAX_PEERS_FILE:
        raise ConfigError(f"{path} is larger than a peers file ({MAX_PEERS_FILE >> 20} MiB at "
                          "most)")
    try:
        return data.decode()
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text at byte {exc.start}; a peers file is "
                          "TOML") from exc


def _checked(fields: Mapping[str, Any]) -> dict[str, Any]:
    """The table with every key known, of the right type and each entry readable; raises
    _KeyProblem naming the first key that is not."""
    for key in fields:
        if key not in PEER_KEYS:
            raise _KeyProblem(str(key), f"unknown key; a peer has {', '.join(PEER_KEYS)}")
    for key in REQUIRED_KEYS:
        if key not in fields:
            raise _KeyProblem(key, "missing; every peer needs a name and an endpoint")
    out: dict[str, Any] = {}
    for key, value in fields.items():
        if key in TEXT_KEYS:
            if not isinstance(value, str):
                raise _KeyProblem(key, f"must be a string, not {_kind(value)}")
            if key == "key_file" and (not value or "\0" in value):
                raise _KeyProblem(key, "must be the path of a key file")
        elif key in LIST_KEYS:
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise _KeyProblem(key, f"must be a list of strings, not {_kind(value)}")
            _check_entries(key, value)
        elif isinstance(value, bool) or not isinstance(value, int):
            raise _KeyProblem(key, f"must be a whole number, not {_kind(value)}")
        out[key] = value
    encapsulation = out.get("encapsulation", str(Encapsulation.UDP))
    if encapsulation not in set(Encapsulation):
        raise _KeyProblem("encapsulation", f"{encapsulation!r} is not one of "
                                           f"{', '.join(Encapsulation)}")
    _check_endpoint(out["endpoint"], Encapsulation(encapsulation))
    return out


def _check_endpoint(text: str, encapsulation: Encapsulation) -> None:
    if encapsulation is Encapsulation.UDP:
        try:
            Endpoint.parse(text, "endpoint")
        except ConfigError as exc:
            raise _KeyProblem("endpoint", str(exc).removeprefix("endpoint ")) from exc
        return
    try:
        ipaddress.ip_address(text.strip("[]"))
    except ValueError as exc:
        article = "an" if encapsulation is Encapsulation.IPIP else "a"
        raise _KeyProblem("endpoint", f"{text!r}: {article} {encapsulation} peer's endpoint is "
                                      "its address alone, without a port (e.g. 192.0.2.5)") from exc


def _check_entries(key: str, values: list[str]) -> None:
    seen: set[str] = set()
    for text in values:
        if key in ("prefixes", "extra_sources"):
            canonical = str(_prefix(key, text))
        elif key == "addresses":
            try:
                canonical = str(ipaddress.ip_address(text))
            except ValueError as exc:
                raise _KeyProblem(key, f"{text!r} is not an IP address") from exc
        else:
            try:
                canonical = str(PortRange.parse(text))
            except ConfigError as exc:
                raise _KeyProblem(key, str(exc)) from exc
        if canonical in seen:
            raise _KeyProblem(key, f"{text} is listed twice")
        seen.add(canonical)


def _prefix(key: str, text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    try:
        return ipaddress.ip_network(text)
    except ValueError as exc:
        try:
            loose = ipaddress.ip_network(text, strict=False)
        except ValueError:
            raise _KeyProblem(key, f"{text!r} is not a prefix such as 198.51.100.0/24") from exc
        raise _KeyProblem(key, f"{text!r} has host bits set; write {loose}") from exc


def _kind(value: object) -> str:
    """A TOML value's kind, as a person writing the file would call it."""
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, str):
        return f"the string {value[:40]!r}"
    if isinstance(value, int | float):
        return f"the number {value}"
    if isinstance(value, list):
        return "a list" if all(isinstance(v, str) for v in value) else "a list of non-strings"
    if isinstance(value, dict):
        return "a table"
    return f"a {type(value).__name__}"  # dates and times


# --- control requests -------------------------------------------------------------------------
def peer_description(peer: Peer) -> dict[str, Any]:
    """What a control request says of a peer: `Peer.as_dict` without what goes without
    saying (empty lists, no GRE key, the default encapsulation) and without `authenticated`
    (the key travels as a key file), so that a large table fits in one request."""
    description = peer.as_dict()
    del description["authenticated"]
    if description["encapsulation"] == Encapsulation.UDP:
        del description["encapsulation"]
    return {key: value for key, value in description.items() if value not in ([], None)}


def peer_request(peer: Peer, key_file: str | Path | None) -> dict[str, Any]:
    """The parameters of "peer-set": add `peer` or replace the one of its name."""
    return {"peer": peer_description(peer),
            "key_file": os.path.abspath(key_file) if key_file is not None else None}


def replace_request(entries: Iterable[PeerEntry]) -> dict[str, Any]:
    """The parameters of "peers-replace": the tunnel's peers become exactly these."""
    entries = tuple(entries)
    return {"peers": [peer_description(entry.peer) for entry in entries],
            "key_files": {entry.peer.name: str(entry.key_file) for entry in entries
                          if entry.key_file is not None}}
