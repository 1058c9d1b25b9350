"""`ipshift demo ilnp`: the seed's experiment with ILNPv6 nodes: a mobile node moves between two
networks every half second while a ping and a TCP stream run to a correspondent behind a
router; nothing is lost, and each move's Locator Update is acknowledged in milliseconds."""

from __future__ import annotations

import argparse
import re
import tempfile
import time
from pathlib import Path

from ipshift.lab import Lab
from ipshift.lab.ilnp_site import app_address, build_site
from ipshift.ui import say

MOVES = 10


def run_demo(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory() as tmp, Lab("demo-ilnp") as lab:
        say("building the seed's topology: mn on L1 (2001:db8:1::/64) and L2, cn on L3, "
            "router r on all three; `ipshift ilnp node` on each")
        site = build_site(lab, Path(tmp))
        site.start_all()
        say(f"programs use application addresses: mn {app_address('mn')}, "
            f"cn {app_address('cn')} (the TUN device ilnp0)")
        ping = site.mn.spawn(["ping", "-n", "-q", "-c", str(MOVES * 60), "-i", "0.01",
                              app_address("cn")], name="ping")
        say(f"mn moves L1 -> L2 -> L1 ... {MOVES} times (attach, deprecate, detach) while "
            "pinging cn 100 times a second")
        for move in range(MOVES):
            time.sleep(0.3)
            now_on = site.move(soft=0.2)
            row: dict[str, str] = next(iter(site.status(site.cn)["correspondents"]), {})
            say(f"  move {move + 1}: mn on L{now_on}; cn sends to "
                f"{row.get('using', '?')} via {row.get('via') or 'direct'}")
        ping.wait(60)
        found = re.search(r"(\d+) packets transmitted, (\d+) received", ping.stdout())
        sent, got = (int(found[1]), int(found[2])) if found else (0, 0)
        doc = site.status(site.mn)
        counters, latency = doc["counters"], doc.get("lu_latency_ms") or {}
        say(f"ping: {got} of {sent} answered across {MOVES} moves")
        say(f"Locator Updates: {counters['lu_sent']} sent, {counters['lu_acked']} acked, "
            f"{counters['lu_superseded']} replaced by a newer one before their ack, "
            f"{counters['lu_failed']} failed; LU to ack median {latency.get('median')} ms")
        say("`ipshift ilnp status` on mn:")
        out = site.ctl(site.mn, "status")
        for line in out.splitlines():
            say("   " + line)
        return 0 if sent and got == sent and counters["lu_failed"] == 0 else 1
