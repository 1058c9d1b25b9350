"""Hitless restart of the routes daemon: kill -9 and start again over the routes it left.

The seed's NAT router with two ISPs. A restarted daemon takes the owned routes and rules the
killed one left as they are until its own detector has judged the uplinks they depend on, so a
dead uplink's default route never comes back in between, and flows do not notice the restart.
No timing assertions: the kernel's tables are sampled every ~20 ms and datagrams are counted.
"""

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from ipshift.lab.isps import IspSite, UdpFlows, seed_config

HANDFUL = 5  # datagrams a restart may cost at most (it should cost none)
SAMPLE_INTERVAL = 0.02
MAX_SAMPLES = 3000  # 60 s of sampling at most, whatever happens


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    return tmp_path


class TableSampler:
    """Reads the router's IPv4 routes every SAMPLE_INTERVAL on a thread and keeps every route
    `bad` matches (with the sample's time)."""

    def __init__(self, site: IspSite, bad: Callable[[dict[str, Any]], bool]) -> None:
        self.site = site
        self.bad = bad
        self.samples = 0
        self.errors: list[str] = []
        self.seen: list[tuple[float, dict[str, Any]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "TableSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.is_set() and self.samples < MAX_SAMPLES:
            try:
                routes = self.site.r.ip_json("-4", "route", "show", "table", "all")
            except Exception as exc:  # reported by the test, never lost in the thread
                self.errors.append(str(exc))
                return
            self.samples += 1
            now = time.monotonic()
            self.seen += [(now, r) for r in routes if self.bad(r)]
            self._stop.wait(SAMPLE_INTERVAL)


def devices(route: dict[str, Any]) -> set[str]:
    if "nexthops" in route:
        return {h.get("dev", "") for h in route["nexthops"]}
    return {route.get("dev", "")}


def dead_default(dead_dev: str, tables: set[str]) -> Callable[[dict[str, Any]], bool]:
    """A default route through `dead_dev` in one of `tables` (`ip` names no table for main)."""
    def bad(route: dict[str, Any]) -> bool:
        return (route.get("dst") == "default" and route.get("table", "main") in tables
                and dead_dev in devices(route))
    return bad


def lost(flows: UdpFlows, since: float) -> tuple[int, int]:
    """(datagrams missing, datagrams received) between the first and the last received since
    `since`: sequence numbers are per flow object, one per datagram."""
    seqs = sorted({r.seq for r in flows.since(since)})
    assert seqs, "no datagram arrived"
    return seqs[-1] - seqs[0] + 1 - len(seqs), len(seqs)


def owned_state(site: IspSite) -> tuple[list[str], list[str]]:
    routes = site.r.ip("route", "show", "table", "all", "proto", "73").splitlines()
    rules = [line for line in site.r.ip("rule", "show").splitlines() if "proto 73" in line]
    return sorted(routes), sorted(rules)


def assert_nothing_doubled(site: IspSite) -> None:
    routes, rules = owned_state(site)
    assert len(routes) == len(set(routes)), routes
    assert len(rules) == len(set(rules)), rules
    keys = [(r.get("table", "main"), r["dst"], r.get("metric", 0))
            for r in site.r.ip_json("-4", "route", "show", "table", "all", "proto", "73")]
    assert len(keys) == len(set(keys)), keys


def assert_nothing_owned_left(site: IspSite) -> None:
    assert site.r.ip("route", "show", "table", "all", "proto", "73").strip() == ""
    assert site.r.ip("-6", "route", "show", "table", "all", "proto", "73").strip() == ""
    assert not [r for r in site.r.ip_json("rule", "show") if r.get("protocol") == "73"]
    assert "ipshift_routes" not in site.r.run(["nft", "list", "tables"]).stdout


def kill9(site: IspSite) -> None:
    assert site.daemon is not None
    site.daemon.signal(9)
    site.daemon.wait(timeout=10)
    site.socket.unlink(missing_ok=True)


def test_restart_while_an_uplink_is_dead_keeps_its_routes_out(lab, run_dir):
    """wan0's gateway is silent and judged down; the daemon is killed and started again: the
    dead default never reappears in table 200, main or the multipath table 100, and flows from
    the router itself (unconnected: a route lookup per datagram) and from the LAN lose at most a
    handful of datagrams."""
    site = IspSite(lab, 2, run_dir=run_dir)
    isp1, isp2 = site.isps
    site.write_config(seed_config(site.isps))
    site.start_daemon(profile="default")
    site.silence(isp1)
    site.wait_status(lambda s: site.uplink_state(s, "wan0") == "down", timeout=20,
                     what="wan0 to be judged down")
    assert devices(site.owned_routes(200)[0]) == {"wan1"}
    assert devices(site.owned_routes(100)[0]) == {"wan1"}
    before = owned_state(site)

    local = UdpFlows(site.r, site.net, n_flows=1).start()  # the router's own traffic
    lan = UdpFlows(site.lan, site.net, n_flows=1, port=9001).start()  # forwarded and NATed
    try:
        t0 = time.monotonic()
        for flows in (local, lan):
            flows.wait(lambda r: len(r) > 20 and all(site.isp_of_source(x.src) == isp2
                                                     for x in r[-10:]),
                       since=t0, timeout=10, what="the flow through ISP2")
        t1 = time.monotonic()
        with TableSampler(site, dead_default("wan0", {"200", "main", "100"})) as sampler:
            time.sleep(0.3)  # a few samples before the kill
            kill9(site)
            assert owned_state(site) == before  # killed: the kernel keeps what it had
            site.start_daemon(profile="default")  # returns once every uplink is judged
            site.wait_status(lambda s: s["daemon"]["startup_s"] is not None, timeout=5)
            time.sleep(0.5)  # and a few samples after the verdicts
        time.sleep(0.3)  # the last datagrams on their way
        missing_local, got_local = lost(local, t1)
        missing_lan, got_lan = lost(lan, t1)
        assert not sampler.errors, sampler.errors
        assert sampler.samples > 20
        assert sampler.seen == [], (f"wan0's default came back in {len(sampler.seen)} routes "
                                    f"sampled ({missing_local} of the router's datagrams "
                                    f"lost): {sampler.seen[:2]}")
        st = site.status()
        assert site.uplink_state(st, "wan0") == "down" and site.uplink_state(st, "wan1") == "up"
        assert got_local > 100 and got_lan > 100
        assert missing_local <= HANDFUL, f"{missing_local} of the router's datagrams lost"
        assert missing_lan <= HANDFUL, f"{missing_lan} of the LAN's datagrams lost"
        assert all(site.isp_of_source(x.src) == isp2 for x in local.since(t1))
    finally:
        local.stop()
        lan.stop()

    # everything there once, as before the kill; then SIGTERM leaves nothing owned
    assert owned_state(site) == before
    assert_nothing_doubled(site)
    assert site.status()["daemon"]["kernel_errors"] == 0
    assert site.stop_daemon() == 0
    assert_nothing_owned_left(site)


def test_restart_while_healthy_leaves_nothing_stale_or_doubled(lab, run_dir):
    site = IspSite(lab, 2, run_dir=run_dir)
    site.write_config(seed_config(site.isps))
    site.start_daemon(profile="fast")
    before = owned_state(site)
    # 4 configured routes + one per uplink's own table; 5 configured rules + one per uplink
    assert len(site.r.ip_json("route", "show", "table", "all", "proto", "73")) == 6
    assert len(before[1]) == 7
    local = UdpFlows(site.r, site.net, n_flows=1).start()
    try:
        t0 = time.monotonic()
        local.wait(lambda r: len(r) > 20, since=t0, timeout=10, what="the router's flow")
        t1 = time.monotonic()
        kill9(site)
        site.start_daemon(profile="fast")
        time.sleep(0.5)
        missing, got = lost(local, t1)
        assert got > 50 and missing <= HANDFUL, f"{missing} datagrams lost"
    finally:
        local.stop()
    assert owned_state(site) == before
    assert_nothing_doubled(site)
    st = site.status()
    assert st["daemon"]["kernel_errors"] == 0
    assert all(u["state"] == "up" for u in st["uplinks"])
    # a second kill -9 and restart over the same state: still the same, still once
    kill9(site)
    site.start_daemon(profile="fast")
    assert owned_state(site) == before
    assert_nothing_doubled(site)
    assert site.stop_daemon() == 0
    assert_nothing_owned_left(site)
