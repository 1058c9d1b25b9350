"""`ipshift demo tunnel`: TCP through the user-space tunnel, live, across forwarded hops."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from ipshift.demo import say
from ipshift.lab import Lab, LabError, LabProcess, Node

TUNNEL = [sys.executable, "-m", "ipshift", "tunnel"]


def _start(node: Node, sockets: Path, *args: str) -> LabProcess:
    proc = node.spawn([*TUNNEL, "run", *args, "--socket", str(sockets / f"{node.name}.sock")],
                      name=f"tunnel-{node.name}")
    if not proc.wait_for_output(" up: ", timeout=20):
        raise LabError(f"the tunnel on {node.name} did not start: {proc.stderr().strip()}")
    return proc


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
        h1, g1, r, g2, h2 = (lab.host("h1"), lab.router("g1"), lab.router("r"),
                             lab.router("g2"), lab.host("h2"))
        l1 = lab.link(h1, g1, "198.51.100.1/26", "198.51.100.62/26")
        u1 = lab.link(g1, r, "192.0.2.1/25", "192.0.2.126/25")
        u2 = lab.link(r, g2, "192.0.2.254/25", "192.0.2.129/25")
        l2 = lab.link(g2, h2, "198.51.100.126/26", "198.51.100.65/26")
        g1.ip("route", "add", "192.0.2.128/25", "via", "192.0.2.126")
        g2.ip("route", "add", "192.0.2.0/25", "via", "192.0.2.254")
        h1.ip("route", "add", "default", "via", "198.51.100.62")
        h2.ip("route", "add", "default", "via", "198.51.100.126")
        for node, ifname in ((g1, l1.b.ifname), (g2, l2.a.ifname), (r, u1.b.ifname),
                             (r, u2.a.ifname)):
            node.run(["ethtool", "-K", ifname, "tx", "off"])
        # GRO on the underlay ends, so the datagrams arrive as UDP_GRO batches
        g1.run(["ethtool", "-K", u1.a.ifname, "gro", "on"])
        g2.run(["ethtool", "-K", u2.b.ifname, "gro", "on"])
        sockets = Path(tmp)
        t1 = _start(g1, sockets, "--dev", "tun-g1", "--local", "192.0.2.1:4789", "--remote",
                    "192.0.2.129:4789", "--address", "203.0.113.1/30",
                    "--route", "198.51.100.64/26")
        t2 = _start(g2, sockets, "--dev", "tun-g2", "--local", "192.0.2.129:4789", "--remote",
                    "192.0.2.1:4789", "--address", "203.0.113.2/30",
                    "--route", "198.51.100.0/26")
        say("tunnels up (TSO super-packets from TUN, UDP_SEGMENT out, UDP_GRO in)")
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
        status = g1.run([*TUNNEL, "status", "--dev", "tun-g1", "--socket",
                         str(sockets / "g1.sock"), "--json"], check=False)
        if status.returncode == 0:
            c = json.loads(status.stdout).get("counters", {})
            say(f"g1 counters: {c.get('tun_reads', 0)} TUN reads "
                f"({c.get('super_packets_out', 0)} super-packets) -> "
                f"{c.get('datagrams_out', 0)} datagrams in {c.get('sends', 0)} sends; "
                f"malformed {c.get('malformed', 0)}")
        for proc in (t1, t2):
            proc.stop()
    say("tearing down the lab")
    return 0 if ok else 1
