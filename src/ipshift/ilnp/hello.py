"""Discovery on an underlay link: the node's hello (its name, NID, locators, whether it routes).

Every node sends a hello to the link's all-nodes group (ff02::1) on the discovery port of each
underlay interface, at start, after each move and every `interval` seconds; a solicitation asks
the others to answer at once. What a hello says lives 3 x interval. Routers pass the hellos
they hear on to their other links with `ttl` one less (as the seed's routers flood discovery),
so nodes a router joins learn of each other. This replaces the seed's
per-locator multicast discovery for ILNPv6 nodes (the seed's own format is `seedwire`).

Wire: the ASCII magic `ILNP-HELLO/1 ` and a JSON object, at most `MAX_SIZE` bytes:

    {"name": "mn.ilnp.test.", "nid": "0000:0000:0000:0011", "solicit": false,
     "router": false, "locators": [["2001:db8:1::/64", 10], ...], "interval": 5.0,
     "ttl": 3}

A node on an IPv4 network (`ipv4_locators`) adds `"ipv4": [["2001:db8:44::/64", "192.0.2.5"]]`:
the IPv4 address its datagrams for that locator go to.

`decode` answers anything else with HelloError (reason `magic`, `size`, `json`, `field`).
"""

from __future__ import annotations

import ipaddress
import json
from dataclasses import dataclass

from ipshift.packet.errors import PacketError

MAGIC = b"ILNP-HELLO/1 "
MAX_SIZE = 1200
MAX_LOCATORS = 16
GROUP = "ff02::1"


class HelloError(PacketError):
    """A datagram on the discovery port is not a hello; the reason is counted."""


@dataclass(frozen=True)
class Hello:
    name: str
    nid: int
    locators: tuple[tuple[int, int], ...]  # (l64, preference)
    router: bool = False
    solicit: bool = False
    interval: float = 5.0
    ttl: int = 3  # links it may still cross: routers pass it on with one less
    ipv4: tuple[tuple[int, str], ...] = ()  # (l64, the IPv4 address it is reached at there)

    def encode(self) -> bytes:
        body = {
            "name": self.name, "nid": _id64(self.nid), "solicit": self.solicit,
            "router": self.router, "interval": self.interval, "ttl": self.ttl,
            "locators": [[str(_prefix(l64)), pref] for l64, pref in self.locators],
        }
        if self.ipv4:
            body["ipv4"] = [[str(_prefix(l64)), address] for l64, address in self.ipv4]
        data = MAGIC + json.dumps(body, separators=(",", ":")).encode()
        if len(data) > MAX_SIZE:
            raise ValueError(f"a hello of {len(data)} bytes is over {MAX_SIZE}")
        return data


def _id64(value: int) -> str:
    return ":".join(f"{(value >> s) & 0xFFFF:04x}" for s in (48, 32, 16, 0))


def _prefix(l64: int) -> ipaddress.IPv6Network:
    return ipaddress.IPv6Network((l64 << 64, 64))


def _field(ok: bool, what: str) -> None:
    if not ok:
        raise HelloError("field", what)


def decode(data: bytes) -> Hello:
    if len(data) > MAX_SIZE:
        raise HelloError("size", f"{len(data)} bytes, over {MAX_SIZE}")
    if not data.startswith(MAGIC):
        raise HelloError("magic", "not an ILNP hello")
    try:
        body = json.loads(data[len(MAGIC):])
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise HelloError("json", f"not JSON: {type(exc).__name__}") from None
    _field(isinstance(body, dict), "the hello is not an object")
    name, nid_text = body.get("name"), body.get("nid")
    _field(isinstance(name, str) and 0 < len(name) <= 253, "name: 1-253 characters")
    _field(isinstance(nid_text, str), "nid: a string")
    groups = nid_text.split(":")
    _field(len(groups) == 4 and all(len(g) == 4 and _hex(g) for g in groups),
           "nid: four groups of four hex digits")
    nid = int("".join(groups), 16)
    _field(nid != 0, "nid: not zero")
    flags = [body.get(key, False) for key in ("router", "solicit")]
    _field(all(isinstance(flag, bool) for flag in flags), "router, solicit: true or false")
    interval = body.get("interval", 5.0)
    _field(isinstance(interval, int | float) and not isinstance(interval, bool)
           and 0.1 <= interval <= 3600, "interval: 0.1-3600 seconds")
    ttl = body.get("ttl", 1)
    _field(isinstance(ttl, int) and not isinstance(ttl, bool) and 0 <= ttl <= 16,
           "ttl: 0-16")
    entries = body.get("locators")
    _field(isinstance(entries, list) and len(entries) <= MAX_LOCATORS,
           f"locators: a list of at most {MAX_LOCATORS}")
    locators = []
    for entry in entries:
        _field(isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], str)
               and isinstance(entry[1], int) and not isinstance(entry[1], bool)
               and 0 <= entry[1] <= 0xFFFF, "locator: [\"PREFIX/64\", PREFERENCE]")
        try:
            prefix = ipaddress.IPv6Network(entry[0])
        except ValueError:
            raise HelloError("field", f"locator {entry[0]!r} is not an IPv6 prefix") from None
        _field(prefix.prefixlen == 64, "locator: a /64")
        locators.append((int(prefix.network_address) >> 64, entry[1]))
    underlay = body.get("ipv4", [])
    _field(isinstance(underlay, list) and len(underlay) <= MAX_LOCATORS,
           f"ipv4: a list of at most {MAX_LOCATORS}")
    ipv4 = []
    for entry in underlay:
        _field(isinstance(entry, list) and len(entry) == 2 and all(
            isinstance(x, str) for x in entry), "ipv4: [\"PREFIX/64\", \"IPV4 ADDRESS\"]")
        try:
            prefix = ipaddress.IPv6Network(entry[0])
            address = ipaddress.IPv4Address(entry[1])
        except ValueError:
            raise HelloError("field", f"ipv4 entry {entry!r} is not [/64, IPv4 address]") from None
        _field(prefix.prefixlen == 64 and not (address.is_unspecified or address.is_multicast),
               "ipv4: a /64 and a unicast IPv4 address")
        ipv4.append((int(prefix.network_address) >> 64, str(address)))
    return Hello(name, nid, tuple(locators), flags[0], flags[1], float(interval), ttl,
                 tuple(ipv4))


def _hex(text: str) -> bool:
    return all(c in "0123456789abcdefABCDEF" for c in text)
