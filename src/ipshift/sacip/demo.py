"""`ipshift demo sacip`: an ssh session kept across two address moves of its client."""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

from ipshift.lab import Lab, LabProcess
from ipshift.lab.sacip_site import (
    WIRED,
    SacipSite,
    Sshd,
    Stream,
    build_site,
    move_make_before_break,
    move_to_wifi,
    start_sshd,
)
from ipshift.ui import say

TICKS = 100  # the remote command prints one line every 50 ms: 5 s in all


def _sshd(site: SacipSite, keys: Path) -> Sshd | None:
    """A real sshd on the peer (key login only), or None if OpenSSH is not installed."""
    if not (shutil.which("sshd") or os.path.exists("/usr/sbin/sshd")) or not shutil.which("ssh"):
        return None
    return start_sshd(site, keys)


def _show(site: SacipSite) -> None:
    doc = site.status(site.mover)
    for session in doc["sessions"]:
        say(f"   {session['flow']}  now  {session.get('now', '(unchanged)')}")


def run_demo(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory() as tmp, Lab("demo-sacip") as lab:
        say("building: mover ==wired/wifi== router -- peer; sacip on mover and peer")
        site = build_site(lab, Path(tmp))
        site.start(site.mover)
        site.start(site.peer)
        sshd = _sshd(site, Path(tmp) / "ssh")
        ssh: LabProcess | None = None
        stream: Stream | None = None
        if sshd is not None:
            say(f"an ssh session from the mover ({WIRED[4][0][0]}) to the peer runs a command "
                "that prints a line every 50 ms")
            ssh = site.mover.spawn(sshd.client_argv(
                f"for i in $(seq 1 {TICKS}); do echo tick $i; sleep 0.05; done"), name="ssh")
            ssh.wait_for_output("tick 3", 15)
        else:
            say("(OpenSSH is not installed: a TCP echo session stands in for ssh)")
            stream = Stream(site, 4)
        site.wait_ready(site.mover, 1)
        try:
            say("1) the seed's procedure: ip addr add 192.0.2.70/26; ip addr del 192.0.2.10/26;"
                " the router forgets the old subnet")
            move_make_before_break(site, 4, 0, same_subnet=False, promote=False)
            doc = site.wait_moved(site.mover, 1)
            say(f"   sessions moved {doc['move_ms'][0]:.1f} ms after the new address was usable")
            _show(site)
            time.sleep(1.0)
            say("2) wired to Wi-Fi: 198.51.100.10 on the second interface, then the wired "
                "address deleted")
            move_to_wifi(site, 4, step=1)
            doc = site.wait_moved(site.mover, 2)
            say(f"   sessions moved {doc['move_ms'][0]:.1f} ms after the new address was usable")
            _show(site)
            if ssh is not None:
                status = ssh.wait(timeout=30)
                lines = ssh.stdout().splitlines()
                ok = status == 0 and lines == [f"tick {i}" for i in range(1, TICKS + 1)]
                say(f"the ssh session ended normally with all {len(lines)} of {TICKS} lines: "
                    f"{'yes' if ok else 'no'} (exit status {status})")
            else:
                assert stream is not None
                ok = stream.echoed_since(50)
                stream.stop()
                say(f"the session went on after both moves: {'yes' if ok else 'no'}")
        finally:
            if ssh is not None:
                ssh.stop()
            if sshd is not None:
                sshd.stop()
    say("tearing down the lab (the daemons removed their remaps and kept addresses)")
    return 0 if ok else 1
