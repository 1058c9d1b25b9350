"""`ipshift demo resend`: a DNS lookup that triggers a demand dial, without and with ip_resend."""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from ipshift.lab import Lab
from ipshift.lab.scenarios import DialupSite
from ipshift.ui import say


def run_demo(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory() as tmp, Lab("demo-resend") as lab:
        say("building: home --ppp0 (dial on demand, 1 s to connect)-- isp (dnsmasq)")
        site = DialupSite(lab, Path(tmp) / "run", delay=1.0)
        say(f"home's ppp0 has the placeholder address {site.PLACEHOLDER}; the ISP assigns a "
            "new one on every dial")
        say(f"1) without ip_resend: getent hosts {site.NAME}")
        seconds, answer = site.timed(site.home, ["getent", "hosts", site.NAME])
        say(f"   answer after {seconds:.2f} s: {answer or 'none'}  (the first query left with "
            "the placeholder source; its reply was lost and glibc retried after 5 s)")
        site.hang_up()
        say("   link hung up; starting ip_resend -o ppp0 (pppd's ip-up calls ip_resend_wakeup)")
        daemon = site.start_resend("--persistent")
        try:
            say(f"2) with ip_resend: getent hosts {site.NAME}")
            fast, answer = site.timed(site.home, ["getent", "hosts", site.NAME])
            say(f"   answer after {fast:.2f} s: {answer or 'none'}  (resent with the new "
                "address as soon as the link was up; the reply was mapped back)")
            status = site.status() or {}
            counters = status.get("counters", {})
            say(f"   ip_resend: captured {counters.get('captured', 0)}, resent "
                f"{counters.get('resent', 0)}, replies {counters.get('replies', 0)}")
            if fast > 0:
                say(f"   first answer {seconds / fast:.1f}x sooner")
        finally:
            daemon.stop()
        ok = bool(answer) and fast < seconds
    say("tearing down the lab")
    return 0 if ok else 1
