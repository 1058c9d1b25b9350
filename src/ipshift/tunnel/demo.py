"""`ipshift demo tunnel`: TCP through the user-space tunnel, live, across forwarded hops."""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from ipshift.lab import Lab, LabProcess
from ipshift.lab.scenarios import TunnelSite
from ipshift.ui import say


def _stream(proc: LabProcess, seconds: float) -> None:
    """Print the client's per-second lines as they come."""
    shown = 0
    deadline = time.monotonic() + seconds + 20
    while time.monotonic() < deadline:
        lines = proc.stdout().splitlines()
        for line in lines[shown:]:
            if "bits/sec" in line:
                say("   " + " ".join(line.split()[2:]))
        shown = len(lines)
        if not proc.running():
            break
        time.sleep(0.2)


def run_demo(args: argparse.Namespace) -> int:
    seconds = max(1.0, float(getattr(args, "seconds", 5.0)))
    with tempfile.TemporaryDirectory() as tmp, Lab("demo-tunnel") as lab:
        say("building: h1 -- g1 ==(UDP tunnel over router r)== g2 -- h2, software "
            "checksums (tx off) on every forwarded hop")
        site = TunnelSite(lab, Path(tmp))
        h1, g1, h2 = site.h1, site.g1, site.h2
        t1, t2 = site.start_tunnel(site.g1, v6=False), site.start_tunnel(site.g2, v6=False)
        say("tunnels up: TSO super-packets from TUN cross whole, in MTU-sized chunks "
            "(batch framing; UDP_SEGMENT out, UDP_GRO in)")
        ping = h1.run(["ping", "-q", "-c", "20", "-i", "0.01", "198.51.100.65"], check=False,
                      timeout=30)
        say("ping h1 -> h2 through the tunnel: "
            + (ping.stdout.strip().splitlines()[-1] if ping.returncode == 0 else "FAILED"))
        server = h2.spawn(["iperf3", "-s", "-1"], name="iperf3-server")
        h2.wait_listening(5201)
        say(f"iperf3 TCP h1 -> h2 for {seconds:g} s:")
        client = h1.spawn(["iperf3", "-c", "198.51.100.65", "-t", f"{seconds:g}", "-i", "1",
                           "--forceflush"], name="iperf3")
        _stream(client, seconds)
        ok = client.wait(timeout=30) == 0 and ping.returncode == 0
        server.stop()
        c = site.counters(g1, t1)
        say(f"g1 counters: {c.get('tun_reads', 0)} TUN reads "
            f"({c.get('super_packets_out', 0)} super-packets) -> "
            f"{c.get('datagrams_out', 0)} datagrams in {c.get('sends', 0)} sends; "
            f"malformed {c.get('malformed', 0)}")
        c = site.counters(site.g2, t2)
        say(f"g2 counters: {c.get('udp_receives', 0)} GRO receives -> "
            f"{c.get('super_packets_in', 0)} super-packets written whole to TUN; "
            f"incomplete {c.get('streams_incomplete', 0)}")
        for proc in (t1, t2):
            proc.stop()
    say("tearing down the lab")
    return 0 if ok else 1
