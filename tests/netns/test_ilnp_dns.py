"""ILNP records in a real DNS server: knotd (ipshift.lab.dns) on one node, a mobile node (mn)
and a correspondent (cn) publishing with signed dynamic updates and resolving each other.

    mn 2001:db8::10 --+
    cn 2001:db8::20 --+-- switch -- dns 2001:db8::53, 192.0.2.53 (knotd, zone ilnp.test.)
"""

from __future__ import annotations

import functools
import os
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dns.update
import pytest

from ipshift.ilnp.dns import (
    DnsLookupError,
    DnsUpdateError,
    IlnpRecords,
    LookupFailure,
    RecordError,
    TsigKey,
    generate_tsig_key,
    l64_of,
    publish,
    read_tsig_key,
    resolve,
    send_update,
)
from ipshift.lab import Lab, Node
from ipshift.lab.dns import KnotServer

from .conftest import need

ZONE = "ilnp.test."
DNS6, DNS4 = "2001:db8::53", "192.0.2.53"
TIMEOUT = 5.0  # every update and lookup is bounded by it

MN = IlnpRecords("mn.ilnp.test.", nids=((10, 0x0000_0000_0000_0010),),
                 l64s=((10, l64_of("2001:db8:1::/64")), (20, l64_of("2001:db8:2::/64"))))
CN = IlnpRecords("cn.ilnp.test.", nids=((10, 0x0000_0000_0000_0020), (20, 0x0000_0000_0000_0021)),
                 l64s=((10, l64_of("2001:db8:3::/64")),))


@dataclass
class Site:
    lab: Lab
    dns: Node
    mn: Node
    cn: Node
    server: KnotServer
    key: TsigKey

    def publish(self, node: Node, records: IlnpRecords, *, key: TsigKey | None = None,
                zone: str = ZONE, server: str = DNS6, transport: str = "tcp") -> None:
        node.call(functools.partial(publish, server, 53, zone, records, key or self.key,
                                    TIMEOUT, transport))  # type: ignore[arg-type]

    def resolve(self, node: Node, name: str, server: str = DNS6,
                timeout: float = TIMEOUT) -> IlnpRecords:
        result: IlnpRecords = node.call(functools.partial(resolve, server, 53, name, timeout))
        return result

    def kdig(self, node: Node, name: str, rdtype: str) -> list[str]:
        """What an independent client (kdig) reads in the zone."""
        out = node.run(["kdig", f"@{DNS6}", "+short", "+timeout=2", "+retry=1", name, rdtype],
                       timeout=20).stdout
        return sorted(line.lower() for line in out.splitlines() if line)


@pytest.fixture
def site(lab: Lab, tmp_path: Path) -> Iterator[Site]:
    need("knotd", "knotc", "kdig")
    switch = lab.switch("lan")
    dns_node, mn, cn = lab.host("dns"), lab.host("mn"), lab.host("cn")
    lab.link(switch, dns_node, None, f"{DNS4}/24", v6=(None, f"{DNS6}/64"))
    lab.link(switch, mn, None, "192.0.2.10/24", v6=(None, "2001:db8::10/64"))
    lab.link(switch, cn, None, "192.0.2.20/24", v6=(None, "2001:db8::20/64"))
    server = KnotServer(dns_node, tmp_path / "knot")
    server.start()
    try:
        yield Site(lab, dns_node, mn, cn, server, read_tsig_key(str(server.key_file)))
    finally:
        server.stop()


def _raises(fn: Callable[[], Any], error: type[Exception]) -> Any:
    with pytest.raises(error) as info:
        fn()
    return info.value


def test_knotd_keeps_everything_in_its_work_directory(site: Site, tmp_path: Path) -> None:
    server = site.server
    workdir = tmp_path / "knot"
    assert server.socket.is_socket() and server.socket.parent.parent == workdir
    assert (workdir / "run" / "knot.pid").is_file()
    site.publish(site.mn, MN)  # the journal is opened with the first update
    assert (workdir / "db" / "journal" / "data.mdb").is_file()
    assert server.proc is not None
    fd_dir = Path(f"/proc/{server.proc.pid}/fd")
    opened = {os.readlink(fd) for fd in fd_dir.iterdir()}
    files = {p for p in opened if p.startswith("/") and not p.startswith("/dev/")}
    # the rest is in workdir; unlinked are its captured stdout and stderr and the unique
    # temporary database knotd makes of a textual configuration (/tmp/knot-confdb.XXXXXX)
    assert files and all(p.startswith(f"{workdir}/") or p.endswith(" (deleted)")
                         for p in files), files
    assert stat.S_IMODE(server.key_file.stat().st_mode) == 0o600
    assert site.key.name == "ilnp-update." and site.key.algorithm == "hmac-sha256"
    assert "ilnp.test." in server.knotc("zone-status", ZONE)
    assert site.server.addresses == [DNS4, DNS6]
    # a second server of its own on another node: no shared socket, PID file or database
    other_node = site.lab.host("dns2")
    site.lab.link(site.lab.nodes["lan"], other_node, None, v6=(None, "2001:db8::54/64"))
    other = KnotServer(other_node, tmp_path / "knot2", "other.test.")
    other.start()
    assert other.socket != server.socket
    assert "other.test." in other.knotc("zone-status", "other.test.")
    assert "ilnp.test." in server.knotc("zone-status", ZONE)
    assert other.stop() == 0
    assert server.proc is not None and server.proc.running()


def test_published_records_resolve_from_the_other_node(site: Site) -> None:
    site.publish(site.mn, MN)  # TCP
    site.publish(site.cn, CN, transport="udp")
    assert site.resolve(site.cn, "mn.ilnp.test.") == MN
    assert site.resolve(site.mn, "cn.ilnp.test") == CN
    assert site.resolve(site.mn, "CN.ilnp.test.", server=DNS4) == CN  # IPv4 listener too
    # what any DNS client reads: RFC 6742 presentation
    assert site.kdig(site.cn, "mn.ilnp.test.", "NID") == ["10 0000:0000:0000:0010"]
    assert site.kdig(site.cn, "mn.ilnp.test.", "L64") == ["10 2001:0db8:0001:0000",
                                                          "20 2001:0db8:0002:0000"]
    # publishing the same records again changes nothing and is no error
    site.publish(site.mn, MN)
    assert site.resolve(site.cn, "mn.ilnp.test.") == MN


def test_a_move_replaces_the_l64_set(site: Site) -> None:
    site.publish(site.mn, MN)
    assert site.resolve(site.cn, "mn.ilnp.test.").l64s == MN.l64s
    moved = IlnpRecords(MN.hostname, MN.nids, l64s=((5, l64_of("2001:db8:7::/64")),), ttl=10)
    site.publish(site.mn, moved)
    found = site.resolve(site.cn, "mn.ilnp.test.")
    assert found == moved  # the old L64s are gone, not merged; the NID stayed
    assert found.preferred_l64s == (l64_of("2001:db8:7::/64"),)
    assert site.kdig(site.cn, "mn.ilnp.test.", "L64") == ["5 2001:0db8:0007:0000"]
    # multihomed again: two locators of equal preference
    both = IlnpRecords(MN.hostname, MN.nids, l64s=((5, l64_of("2001:db8:7::/64")),
                                                   (5, l64_of("2001:db8:8::/64"))))
    site.publish(site.mn, both)
    assert site.resolve(site.cn, "mn.ilnp.test.").preferred_l64s == (
        l64_of("2001:db8:7::/64"), l64_of("2001:db8:8::/64"))


def test_a_wrong_key_is_refused_naming_the_rcode(site: Site) -> None:
    site.publish(site.mn, MN)
    moved = IlnpRecords(MN.hostname, MN.nids, ((1, l64_of("2001:db8:66::/64")),))
    wrong_secret = TsigKey(site.key.name, site.key.algorithm, b"\x5a" * 32)
    for transport in ("tcp", "udp"):
        error = _raises(lambda t=transport: site.publish(site.mn, moved, key=wrong_secret,
                                                         transport=t), DnsUpdateError)
        assert (error.rcode, error.tsig_error) == ("NOTAUTH", "BADSIG")
        assert "NOTAUTH, TSIG error BADSIG" in str(error)
    unknown = generate_tsig_key("someone-else")
    error = _raises(lambda: site.publish(site.mn, moved, key=unknown), DnsUpdateError)
    assert (error.rcode, error.tsig_error) == ("NOTAUTH", "BADKEY")
    # nothing changed
    assert site.resolve(site.cn, "mn.ilnp.test.") == MN


def test_updates_outside_the_zone_are_refused(site: Site) -> None:
    site.publish(site.mn, MN)
    elsewhere = IlnpRecords("mn.other.test.", MN.nids, MN.l64s)
    # a zone this server does not serve: refused (unsigned) with NOTAUTH
    error = _raises(lambda: site.publish(site.mn, elsewhere, zone="other.test."),
                    DnsUpdateError)
    assert error.rcode == "NOTAUTH" and "unsigned answer" in str(error)
    # a name outside the zone the update is for: update_message refuses to build it...
    _raises(lambda: site.publish(site.mn, elsewhere), RecordError)
    # ... and the server refuses one built by hand with NOTZONE
    update = dns.update.UpdateMessage(ZONE)
    update.add("mn.other.test.", 30, "NID", "10 0000:0000:0000:0010")
    update.use_tsig(site.key.dns_key())
    error = _raises(lambda: site.mn.call(functools.partial(
        send_update, DNS6, 53, update, TIMEOUT)), DnsUpdateError)
    assert error.rcode == "NOTZONE"
    # the zone is as it was, and the other name never came to be
    assert site.resolve(site.cn, "mn.ilnp.test.") == MN
    lookup_error = _raises(lambda: site.resolve(site.cn, "mn.other.test."), DnsLookupError)
    assert lookup_error.reason is LookupFailure.FAILED and "REFUSED" in str(lookup_error)


def test_lookup_failures_are_told_apart(site: Site) -> None:
    nx = _raises(lambda: site.resolve(site.cn, "nobody.ilnp.test."), DnsLookupError)
    assert nx.reason is LookupFailure.NXDOMAIN
    nodata = _raises(lambda: site.resolve(site.cn, "ns.ilnp.test."), DnsLookupError)
    assert nodata.reason is LookupFailure.NODATA  # it has addresses, no NID
    silent = _raises(lambda: site.resolve(site.cn, "mn.ilnp.test.", server="2001:db8::99",
                                          timeout=1.0), DnsLookupError)
    assert silent.reason is LookupFailure.TIMEOUT
    # an update to a server that is not there is bounded too
    error = _raises(lambda: site.cn.call(functools.partial(
        publish, "2001:db8::99", 53, ZONE, CN, site.key, 1.0, "udp")), DnsUpdateError)
    assert error.rcode is None and "no answer within 1 s" in str(error)


def test_updates_survive_a_restart_of_knotd(site: Site) -> None:
    """The journal in the work directory keeps what was published (zonefile-sync -1)."""
    site.publish(site.mn, MN)
    assert site.server.stop() == 0
    assert not site.server.socket.exists()
    assert site.server.proc is None
    # start again on the same work directory: the same key, the published records kept
    site.server.start()
    assert read_tsig_key(str(site.server.key_file)) == site.key
    assert site.resolve(site.cn, "mn.ilnp.test.") == MN
    site.publish(site.cn, CN)
    assert site.resolve(site.mn, "cn.ilnp.test.") == CN
