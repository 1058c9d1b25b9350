"""The routes daemon in the seed's NAT router with two and three ISPs (real kernel, real NAT).

No timing assertions (they are in bench/bench_routes.py); every wait is bounded.
"""

import json
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from ipshift.lab.isps import (
    SERVER,
    IspSite,
    UdpFlows,
    capture,
    pcap_sources,
    seed_config,
    toml_config,
)
from ipshift.net.conntrack import Conntrack

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def run_dir(tmp_path):
    return tmp_path


def nexthop_devs(site, table):
    routes = site.owned_routes(table)
    assert len(routes) == 1, routes
    r = routes[0]
    if "nexthops" in r:
        return sorted(h["dev"] for h in r["nexthops"])
    return [r["dev"]]


def udp_entries(site, reply_dst):
    def read():
        with Conntrack() as ct:
            return [e for e in ct.entries(reply_dst=reply_dst) if e.proto == 17]
    return site.r.call(read)


def routes_cli(site, *args):
    env = {"PYTHONPATH": str(ROOT / "src")}
    return site.r.run([sys.executable, "-m", "ipshift", "routes", *args, "--socket",
                       str(site.socket)], check=False, env=env, timeout=30)


def test_seed_example_silent_gateway_nat_and_hooks(lab, run_dir):
    """Two ISPs, the seed's configuration as written: a gateway that goes silent (IP dropped,
    ARP answered), recovery, flows pinned on failback, only the dead uplink's conntrack entries
    deleted, no wrong source on either uplink, hooks, status, metrics, clean stop."""
    site = IspSite(lab, 2, run_dir=run_dir)
    isp1, isp2 = site.isps
    hook_log = run_dir / "hook.log"
    hook = run_dir / "hook.sh"
    hook.write_text("#!/bin/sh\necho \"$IPSHIFT_UPLINK $IPSHIFT_STATE $IPSHIFT_PREVIOUS "
                    f"$IPSHIFT_SOURCE\" >> {hook_log}\n")
    hook.chmod(0o755)
    # a route ipshift does not own, in a table it manages
    site.r.ip("route", "add", "198.51.100.128/25", "via", isp1.gateway, "table", "100",
              "proto", "boot")
    cfg = site.write_config(seed_config(site.isps))
    toml = run_dir / "routes.toml"
    toml.write_text(f'include = ["{cfg}"]\n[daemon]\nprofile = "fast"\nhooks = ["{hook}"]\n'
                    'metrics = "127.0.0.1:19465"\n')
    caps = [capture(site.node_of(isp), "to-r", run_dir / f"isp{isp.index}.pcap")
            for isp in site.isps]
    site.start_daemon(toml)

    # the seed's routes and rules, owned by protocol 73
    assert nexthop_devs(site, 100) == ["wan0", "wan1"]
    assert nexthop_devs(site, 200) == ["wan0"]  # first alternative
    assert nexthop_devs(site, 20) == ["wan0"] and nexthop_devs(site, 30) == ["wan1"]
    prios = {r["priority"] for r in site.r.ip_json("rule", "show") if r.get("protocol") == "73"}
    assert {10, 20, 30, 100, 200} <= prios

    flows = UdpFlows(site.lan, site.net, n_flows=8).start()
    try:
        t0 = time.monotonic()
        recs = flows.wait(lambda r: {site.isp_of_source(x.src) for x in r} == {isp1, isp2},
                          since=t0, timeout=10, what="flows over both ISPs")
        port_isp = {x.port: site.isp_of_source(x.src) for x in recs}
        dead = isp1
        survivors = {p for p, i in port_isp.items() if i == isp2}
        before = {e.orig.sport: e.id for e in udp_entries(site, isp2.router_addr)}
        assert survivors and before

        t1 = time.monotonic()
        site.silence(dead)
        flows.wait(lambda r: len(r) > 20 and all(site.isp_of_source(x.src) == isp2
                                                for x in r[-16:]),
                   since=t1, timeout=15, what="every flow to move to ISP2")
        st = site.wait_status(lambda s: site.uplink_state(s, "wan0") == "down", timeout=10)
        assert "lost in a row" in next(u for u in st["uplinks"] if u["uplink"] == "wan0")["reason"]
        assert nexthop_devs(site, 100) == ["wan1"]
        assert nexthop_devs(site, 200) == ["wan1"]
        assert nexthop_devs(site, 20) == ["wan0"]  # no alternative there: kept
        # only the dead uplink's entries went; the flows already on ISP2 kept theirs
        assert udp_entries(site, dead.router_addr) == []
        after = {e.orig.sport: e.id for e in udp_entries(site, isp2.router_addr)}
        kept = [sport for sport, ident in before.items() if after.get(sport) == ident]
        assert kept, (before, after)

        site.silence(dead, False)
        site.wait_status(lambda s: site.uplink_state(s, "wan0") == "up", timeout=15)
        assert nexthop_devs(site, 100) == ["wan0", "wan1"]
        assert nexthop_devs(site, 200) == ["wan0"]
        t2 = time.monotonic()
        recs = flows.wait(lambda r: len(r) > 100, since=t2, timeout=10)
        # failback "stay": working flows stay where they are
        assert {site.isp_of_source(x.src) for x in recs} == {isp2}
    finally:
        flows.stop()

    # status over the control socket, human and JSON
    res = routes_cli(site, "status", "--json")
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    assert {u["uplink"] for u in doc["uplinks"]} == {"wan0", "wan1"}
    assert all(u["rtt_ms"] is not None and u["loss_pct"] is not None for u in doc["uplinks"])
    assert doc["daemon"]["max_apply_ms"] is not None
    text = routes_cli(site, "status").stdout
    assert "UPLINK" in text and "wan0" in text and "last_change".upper() in text

    def scrape():
        with urllib.request.urlopen("http://127.0.0.1:19465/metrics", timeout=5) as r:
            return r.read().decode()
    metrics = site.r.call(scrape)
    assert 'ipshift_routes_uplink_up{uplink="wan0"} 1.0' in metrics
    assert 'ipshift_routes_uplink_transitions_total{state="down",uplink="wan0"} 1.0' in metrics

    log = hook_log.read_text().splitlines()
    assert "wan0 down up 198.51.100.2" in log and "wan0 up down 198.51.100.2" in log

    # stop: everything owned goes, the foreign route stays
    res = routes_cli(site, "stop")
    assert res.returncode == 0, res.stderr
    assert site.daemon.wait(timeout=15) == 0
    assert site.r.ip("route", "show", "table", "all", "proto", "73").strip() == ""
    assert not [r for r in site.r.ip_json("rule", "show") if r.get("protocol") == "73"]
    assert "ipshift_routes" not in site.r.run(["nft", "list", "tables"]).stdout
    assert "198.51.100.128/25" in site.r.ip("route", "show", "table", "100")

    for proc in caps:
        proc.stop()
    for isp in site.isps:
        sources = pcap_sources(run_dir / f"isp{isp.index}.pcap")
        assert sources, f"nothing captured on ISP{isp.index + 1}"
        wrong = {s for s in sources if site.isp_of_source(s) != isp}
        assert not wrong, f"packets with foreign sources on ISP{isp.index + 1}: {wrong}"


def test_three_isps_carrier_loss_and_routes_restored_after_flap(lab, run_dir):
    site = IspSite(lab, 3, run_dir=run_dir)
    isp1, isp2, _isp3 = site.isps
    path = run_dir / "routes.toml"
    path.write_text(toml_config(site.isps, profile="fast"))
    site.start_daemon(path)
    assert nexthop_devs(site, 100) == ["wan0", "wan1", "wan2"]
    flows = UdpFlows(site.lan, site.net, n_flows=12).start()
    try:
        t0 = time.monotonic()
        flows.wait(lambda r: {site.isp_of_source(x.src) for x in r} == set(site.isps),
                   since=t0, timeout=10, what="flows over three ISPs")

        # carrier loss on ISP2's link
        site.carrier(isp2, False)
        site.wait_status(lambda s: site.uplink_state(s, "isp2") == "down", timeout=10)
        assert nexthop_devs(site, 100) == ["wan0", "wan2"]
        t1 = time.monotonic()
        flows.wait(lambda r: len(r) > 60 and all(site.isp_of_source(x.src) != isp2
                                                 for x in r[-24:]),
                   since=t1, timeout=10, what="flows to leave ISP2")
        site.carrier(isp2, True)
        site.wait_status(lambda s: site.uplink_state(s, "isp2") == "up", timeout=20)
        site.wait_status(lambda s: True, timeout=1)
        assert nexthop_devs(site, 100) == ["wan0", "wan1", "wan2"]

        # administrative flap on the router: the kernel deletes the routes through wan0
        site.flap_router_link(isp1)
        def restored(s):
            try:
                return (site.uplink_state(s, "isp1") == "up"
                        and nexthop_devs(site, 100) == ["wan0", "wan1", "wan2"])
            except AssertionError:
                return False
        site.wait_status(restored, timeout=20, what="routes back after the flap")
        assert nexthop_devs(site, 20) == ["wan0"]
        assert site.owned_routes(7300), "uplink table not restored"
        assert nexthop_devs(site, 200) == ["wan0"]
        t2 = time.monotonic()
        flows.wait(lambda r: len(r) > 50, since=t2, timeout=10, what="the flows to go on")
    finally:
        flows.stop()
    assert site.stop_daemon() == 0
    assert site.r.ip("route", "show", "table", "all", "proto", "73").strip() == ""


def test_ten_percent_loss_causes_no_failover(lab, run_dir):
    """10 % random loss each way on both uplinks (nft numgen), default profile: no verdict
    changes (the expected false-alarm rate is ~0.03 per day per target)."""
    site = IspSite(lab, 2, run_dir=run_dir)
    site.write_config(seed_config(site.isps))
    site.start_daemon(profile="default")
    for isp in site.isps:
        site.loss(isp, 10)
    flows = UdpFlows(site.lan, site.net, n_flows=2, server_addr=SERVER).start()
    try:
        time.sleep(12)  # observation window (not a timing assertion)
        recs = flows.since(0)
        assert recs and len(recs) < flows.sent  # loss is real ...
    finally:
        flows.stop()
    st = site.status()
    for u in st["uplinks"]:
        assert u["state"] == "up" and u["transitions"] == 1, u  # ... and nobody failed over
        assert u["loss_pct"] > 0
    assert nexthop_devs(site, 100) == ["wan0", "wan1"]


def test_restart_after_kill9_reconciles_without_duplicates(lab, run_dir):
    site = IspSite(lab, 2, run_dir=run_dir)
    site.write_config(seed_config(site.isps))
    site.start_daemon(profile="fast")
    before = site.r.ip("route", "show", "table", "all", "proto", "73")
    rules_before = site.r.ip("rule", "show")
    site.daemon.signal(9)
    site.daemon.wait(timeout=10)
    # killed: what it installed stays (traffic keeps flowing), nothing removed
    assert site.r.ip("route", "show", "table", "all", "proto", "73") == before
    site.socket.unlink(missing_ok=True)
    site.start_daemon(profile="fast")
    assert site.r.ip("route", "show", "table", "all", "proto", "73") == before
    assert site.r.ip("rule", "show") == rules_before
    st = site.status()
    assert st["daemon"]["kernel_errors"] == 0
    assert site.stop_daemon() == 0
    assert site.r.ip("route", "show", "table", "all", "proto", "73").strip() == ""


def test_second_instance_refuses_to_start(lab, run_dir):
    site = IspSite(lab, 1, run_dir=run_dir)
    site.write_config(seed_config(site.isps))
    site.start_daemon(profile="fast")
    routes_before = site.r.ip("route", "show", "table", "all", "proto", "73")
    other = run_dir / "other.sock"
    for sock in (site.socket, other):  # the same control socket, or another one
        res = site.r.run([sys.executable, "-m", "ipshift", "routes", "run", "-c",
                          str(site.config_path), "--socket", str(sock)], check=False,
                         env={"PYTHONPATH": str(ROOT / "src"),
                              "IPSHIFT_RUN_DIR": str(site.run_dir)}, timeout=30)
        assert res.returncode == 2
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and "another routes 'routes' is already running (pid" in lines[0]
    assert not other.exists()
    assert site.status()["uplinks"][0]["state"] == "up"
    assert site.r.ip("route", "show", "table", "all", "proto", "73") == routes_before


def test_capture_parser_reads_tcpdump_output(lab, run_dir):
    a, b = lab.host("a"), lab.host("b")
    lab.link(a, b, "192.0.2.1/24", "192.0.2.2/24")
    proc = capture(b, "to-a", run_dir / "c.pcap")
    a.run(["ping", "-c", "5", "-i", "0.1", "-W", "1", "192.0.2.2"])
    deadline = time.monotonic() + 5
    while not pcap_sources(run_dir / "c.pcap") and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.stop()
    assert set(pcap_sources(run_dir / "c.pcap")) == {"192.0.2.1"}
