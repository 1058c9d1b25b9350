"""IP protocol numbers (next header values) the codecs know by name (IANA registry)."""

from __future__ import annotations

from typing import Final

IPPROTO_HOPOPTS: Final = 0
IPPROTO_ICMP: Final = 1
IPPROTO_IPIP: Final = 4
IPPROTO_TCP: Final = 6
IPPROTO_DCCP: Final = 33
IPPROTO_UDP: Final = 17
IPPROTO_IPV6: Final = 41
IPPROTO_ROUTING: Final = 43
IPPROTO_FRAGMENT: Final = 44
IPPROTO_GRE: Final = 47
IPPROTO_ESP: Final = 50
IPPROTO_AH: Final = 51
IPPROTO_ICMPV6: Final = 58
IPPROTO_NONE: Final = 59
IPPROTO_DSTOPTS: Final = 60
IPPROTO_SCTP: Final = 132
IPPROTO_MH: Final = 135
IPPROTO_UDPLITE: Final = 136
IPPROTO_HIP: Final = 139
IPPROTO_SHIM6: Final = 140

#: IPv6 extension headers with the generic layout (next header, length in 8-octet units - 1);
#: RFC 8200 section 4 and the IANA "IPv6 Extension Header Types" registry.
IPV6_GENERIC_EXTENSION_HEADERS: Final = frozenset(
    {IPPROTO_HOPOPTS, IPPROTO_ROUTING, IPPROTO_DSTOPTS, IPPROTO_MH, IPPROTO_HIP, IPPROTO_SHIM6}
)
#: Every extension header the chain walker steps over (ESP ends the chain: it is opaque).
IPV6_EXTENSION_HEADERS: Final = IPV6_GENERIC_EXTENSION_HEADERS | {IPPROTO_FRAGMENT, IPPROTO_AH}
