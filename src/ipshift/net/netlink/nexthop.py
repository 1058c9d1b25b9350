"""What pyroute2 0.9.7 lacks, through iproute2: nexthop objects (`ip -json nexthop`) and routes
that use one (`nhid`). `run_ip` runs the program; `nexthop_argv` and `parse_nexthops` are pure."""

from __future__ import annotations

import errno as _errno
import ipaddress
import json
import socket
import subprocess
from typing import Any

from ipshift.net.errors import ParseError
from ipshift.net.netlink.objects import NetlinkError, NexthopObject, _family_of, _ip

# --- running `ip` -----------------------------------------------------------------------------


def run_ip(netns: str | None, *args: str, what: str | None = None, timeout: float = 10.0) -> str:
    """Run `ip -n NETNS ARGS` and return its output; NetlinkError (one line, with the errno that
    iproute2's message names) on failure."""
    argv = ["ip", *(["-n", netns] if netns else []), *args]
    try:
        res = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError as exc:
        raise NetlinkError("the `ip` program (iproute2) is not installed") from exc
    except subprocess.TimeoutExpired as exc:
        raise NetlinkError(f"{' '.join(argv)}: timed out after {timeout}s") from exc
    if res.returncode != 0:
        reason = (res.stderr or res.stdout).strip().splitlines()
        text = reason[0] if reason else f"exit status {res.returncode}"
        raise NetlinkError(f"{what or ' '.join(args)}: {text}", _ip_errno(text))
    return res.stdout


_IP_ERRORS = {
    "File exists": _errno.EEXIST,
    "No such process": _errno.ESRCH,
    "No such file or directory": _errno.ENOENT,
    "No such device": _errno.ENODEV,
    "Invalid argument": _errno.EINVAL,
    "Network is unreachable": _errno.ENETUNREACH,
    "Operation not permitted": _errno.EPERM,
}


def _ip_errno(text: str) -> int:
    for phrase, code in _IP_ERRORS.items():
        if phrase in text:
            return code
    return 0


# --- nexthop objects: `ip -json nexthop` parsing ----------------------------------------------


def nexthop_argv(nh: NexthopObject) -> list[str]:
    """The `ip nexthop add` arguments after the verb."""
    if nh.id <= 0:
        raise ValueError(f"nexthop id must be positive, not {nh.id}")
    argv = ["id", str(nh.id)]
    if nh.group:
        parts = []
        for member, weight in nh.group:
            if not 1 <= weight <= 256:
                raise ValueError(f"nexthop group weight {weight} out of range 1..256")
            parts.append(f"{member},{weight}" if weight != 1 else str(member))
        argv += ["group", "/".join(parts)]
    elif nh.blackhole:
        argv.append("blackhole")
    else:
        if nh.gateway:
            argv += ["via", _ip(nh.gateway, "nexthop gateway")]
        if nh.dev:
            argv += ["dev", nh.dev]
        if nh.onlink:
            argv.append("onlink")
    if nh.fdb:
        argv.append("fdb")
    return argv


def parse_nexthops(text: str) -> list[NexthopObject]:
    """Parse `ip -json [-d] nexthop show` output; ParseError on anything unexpected."""
    if not text.strip():
        return []
    try:
        doc = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise ParseError(f"`ip -json nexthop` output is not JSON: {exc}") from exc
    if not isinstance(doc, list):
        raise ParseError("`ip -json nexthop` output is not a JSON list")
    return [_nexthop_from_json(item) for item in doc]


def _nexthop_from_json(item: Any) -> NexthopObject:
    if not isinstance(item, dict):
        raise ParseError(f"nexthop entry is not an object: {item!r:.60}")
    nh_id = item.get("id")
    if not isinstance(nh_id, int) or isinstance(nh_id, bool) or nh_id <= 0:
        raise ParseError(f"nexthop entry without a valid id: {item!r:.60}")
    group: list[tuple[int, int]] = []
    raw_group = item.get("group", [])
    if not isinstance(raw_group, list):
        raise ParseError(f"nexthop {nh_id}: group is not a list")
    for member in raw_group:
        if not isinstance(member, dict):
            raise ParseError(f"nexthop {nh_id}: group member is not an object")
        mid, weight = member.get("id"), member.get("weight", 1)
        if (
            not isinstance(mid, int) or isinstance(mid, bool)
            or not isinstance(weight, int) or isinstance(weight, bool)
        ):
            raise ParseError(f"nexthop {nh_id}: bad group member {member!r:.60}")
        group.append((mid, weight))
    gateway = _opt_str(item, "gateway", nh_id)
    if gateway is not None:
        try:
            gateway = str(ipaddress.ip_address(gateway))
        except ValueError as exc:
            raise ParseError(f"nexthop {nh_id}: bad gateway {gateway!r:.60}") from exc
    flags = item.get("flags", [])
    if not isinstance(flags, list) or not all(isinstance(f, str) for f in flags):
        raise ParseError(f"nexthop {nh_id}: flags is not a list of strings")
    family = {"inet": socket.AF_INET, "inet6": socket.AF_INET6}.get(
        str(item.get("family", "")), _family_of(gateway)
    )
    return NexthopObject(
        id=nh_id,
        gateway=gateway,
        dev=_opt_str(item, "dev", nh_id),
        group=tuple(group),
        # iproute2 prints presence flags as `"blackhole": null`
        blackhole="blackhole" in item and item["blackhole"] is not False,
        onlink="onlink" in flags,
        fdb="fdb" in item and item["fdb"] is not False,
        family=family,
        protocol=_opt_str(item, "protocol", nh_id),
        flags=tuple(flags),
    )


def _opt_str(item: dict[str, Any], key: str, nh_id: int) -> str | None:
    value = item.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise ParseError(f"nexthop {nh_id}: {key} is not a string")
    return value
