"""rtnetlink numbers (linux/rtnetlink.h, if_addr.h, neighbour.h, if.h) used across the package."""

from __future__ import annotations

# routing tables
RT_TABLE_UNSPEC = 0
RT_TABLE_DEFAULT = 253
RT_TABLE_MAIN = 254
RT_TABLE_LOCAL = 255

# route protocols (rtnetlink.h)
RTPROT_UNSPEC = 0
RTPROT_REDIRECT = 1
RTPROT_KERNEL = 2
RTPROT_BOOT = 3
RTPROT_STATIC = 4
RTPROT_RA = 9
RTPROT_DHCP = 16

# scopes
RT_SCOPE_UNIVERSE = 0
RT_SCOPE_SITE = 200
RT_SCOPE_LINK = 253
RT_SCOPE_HOST = 254
RT_SCOPE_NOWHERE = 255

# next-hop flags (RTNH_F_*)
RTNH_F_DEAD = 1
RTNH_F_PERVASIVE = 2
RTNH_F_ONLINK = 4
RTNH_F_OFFLOAD = 8
RTNH_F_LINKDOWN = 16

ROUTE_TYPES = {
    0: "unspec", 1: "unicast", 2: "local", 3: "broadcast", 4: "anycast", 5: "multicast",
    6: "blackhole", 7: "unreachable", 8: "prohibit", 9: "throw", 10: "nat",
}
_ROUTE_TYPE_IDS = {v: k for k, v in ROUTE_TYPES.items()}

# rule actions (FR_ACT_*)
RULE_ACTIONS = {1: "lookup", 2: "goto", 3: "nop", 6: "blackhole", 7: "unreachable",
                8: "prohibit"}
_RULE_ACTION_IDS = {v: k for k, v in RULE_ACTIONS.items()}

# neighbour states and flags
NUD_INCOMPLETE = 0x01
NUD_REACHABLE = 0x02
NUD_STALE = 0x04
NUD_DELAY = 0x08
NUD_PROBE = 0x10
NUD_FAILED = 0x20
NUD_NOARP = 0x40
NUD_PERMANENT = 0x80
NUD_NONE = 0x00
NUD_NAMES = {
    NUD_INCOMPLETE: "INCOMPLETE", NUD_REACHABLE: "REACHABLE", NUD_STALE: "STALE",
    NUD_DELAY: "DELAY", NUD_PROBE: "PROBE", NUD_FAILED: "FAILED", NUD_NOARP: "NOARP",
    NUD_PERMANENT: "PERMANENT",
}
NTF_USE = 0x01
NTF_PROXY = 0x08
NTF_ROUTER = 0x80
NTF_EXT_MANAGED = 0x01  # in NDA_FLAGS_EXT

# link flags
IFF_UP = 0x1
IFF_LOWER_UP = 0x10000

# address flags (IFA_FLAGS; the first eight also in ifa_flags)
IFA_F_SECONDARY = 0x01  # IPv4: not the first address of its subnet on the device
IFA_F_TEMPORARY = 0x01  # IPv6: a privacy (RFC 8981) address; the same bit
IFA_F_NODAD = 0x02
IFA_F_OPTIMISTIC = 0x04
IFA_F_DADFAILED = 0x08
IFA_F_HOMEADDRESS = 0x10
IFA_F_DEPRECATED = 0x20
IFA_F_TENTATIVE = 0x40
IFA_F_PERMANENT = 0x80  # added with an infinite valid lifetime (not learnt, not expiring)
IFA_F_MANAGETEMPADDR = 0x100
IFA_F_NOPREFIXROUTE = 0x200
IFA_F_MCAUTOJOIN = 0x400
IFA_F_STABLE_PRIVACY = 0x800

RTA_NH_ID = 30
INFINITY_LIFE_TIME = 0xFFFFFFFF
