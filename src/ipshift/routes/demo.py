"""`ipshift demo routes`: the seed's NAT router with two ISPs, a gateway that dies, flows that move.

1. builds lan -- r -- isp1/isp2 -- net in namespaces, masquerading on both uplinks;
2. runs `ipshift routes run` on r with the seed's own commands (documentation addresses);
3. sends 8 UDP flows from the LAN host; they spread over both ISPs;
4. silences ISP1's gateway (it still answers ARP, forwards nothing): ipshift notices, moves the
   routes, deletes only ISP1's conntrack entries; the flows continue through ISP2;
5. ISP1 comes back: its routes return, the flows stay where they are (failback "stay");
6. stops the daemon: every route and rule it installed is gone.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections import Counter
from pathlib import Path

from ipshift.lab import Lab
from ipshift.lab.isps import IspSite, UdpFlows, seed_config
from ipshift.ui import say


def _spread(site: IspSite, flows: UdpFlows, seconds: float) -> str:
    t = time.monotonic()
    time.sleep(seconds)
    counts = Counter(site.isp_of_source(r.src) for r in flows.since(t))
    return ", ".join(f"ISP{i.index + 1}: {counts.get(i, 0)}" for i in site.isps)


def _table(site: IspSite, table: int) -> str:
    text = site.r.ip("route", "show", "table", str(table)).strip()
    return " | ".join(line.strip() for line in text.splitlines())


def run_demo(args: argparse.Namespace) -> int:
    step = max(1.0, min(float(getattr(args, "seconds", 5.0)), 5.0))
    with Lab("demo-routes") as lab, tempfile.TemporaryDirectory() as d:
        site = IspSite(lab, 2, run_dir=Path(d))
        isp1, isp2 = site.isps
        cfg = site.write_config(seed_config(site.isps))
        say(f"NAT router with ISP1 ({isp1.net}) and ISP2 ({isp2.net}); the seed's commands:")
        for line in cfg.read_text().replace("\\\n", " ").splitlines():
            if line.startswith("ip "):
                say("    " + " ".join(line.split()))
        site.start_daemon(profile="fast")
        say("ipshift routes run: every uplink judged; table 100 (multipath) is "
            + _table(site, 100))
        flows = UdpFlows(site.lan, site.net, n_flows=8).start()
        try:
            say(f"8 UDP flows from the LAN, datagrams per ISP: {_spread(site, flows, step / 2)}")
            say("ISP1's gateway goes silent (still answers ARP, forwards nothing)")
            t0 = time.monotonic()
            site.silence(isp1)
            st = site.wait_status(lambda s: site.uplink_state(s, "wan0") == "down", timeout=15)
            row = next(u for u in st["uplinks"] if u["uplink"] == "wan0")
            say(f"verdict after {time.monotonic() - t0:.2f} s: wan0 down ({row['reason']})")
            say("table 100 now: " + _table(site, 100))
            say("table 200 now: " + _table(site, 200))
            say(f"conntrack entries deleted (ISP1's only): "
                f"{site.status()['daemon']['conntrack_deleted']}")
            say(f"datagrams per ISP since: {_spread(site, flows, step / 2)}")
            say("ISP1 comes back")
            site.silence(isp1, False)
            site.wait_status(lambda s: site.uplink_state(s, "wan0") == "up", timeout=30)
            say("wan0 up again; table 100: " + _table(site, 100))
            say(f"the flows stay on ISP2 (failback 'stay'): {_spread(site, flows, step / 2)}")
        finally:
            flows.stop()
        st = site.status()
        for u in st["uplinks"]:
            say(f"status: {u['uplink']} {u['state']} rtt {u['rtt_ms']} ms "
                f"loss {u['loss_pct']}% transitions {u['transitions']}")
        site.stop_daemon()
        left = site.r.ip("route", "show", "table", "all", "proto", "73").strip()
        say("daemon stopped; routes it owned left behind: " + (left if left else "none"))
        return 0 if not left else 1
