"""`ipshift daemons`: what runs, and what a daemon killed before it could clean up left
behind; `--clean` removes it in the namespace it was left in."""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import pytest

from ipshift.lab import Lab
from tests.netns.test_tunnel_forward import TUNNEL

pytestmark = pytest.mark.netns
IPSHIFT = [sys.executable, "-m", "ipshift"]


def test_list_and_clean_after_a_kill(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir(mode=0o700)
    env = {"IPSHIFT_RUN_DIR": str(run_dir)}
    with Lab("daemons") as lab:
        a, b = lab.host("a"), lab.host("b")
        lab.link(a, b, "192.0.2.1/24", "192.0.2.2/24")
        proc = a.spawn([*TUNNEL, "run", "--dev", "tun-d", "--local", "192.0.2.1:4789",
                        "--remote", "192.0.2.2:4789"], env=env, name="tunnel")
        proc.wait_ready(" up: ", 20, "the tunnel")
        rows = json.loads(a.run([*IPSHIFT, "daemons", "--json"], env=env).stdout)
        assert [(r["component"], r["name"], r["running"], r["pid"]) for r in rows] == [
            ("tunnel", "tun-d", True, proc.pid)]
        assert rows[0]["netns"] == "-"  # the namespace the command runs in
        assert rows[0]["owned"] == ["tun_device tun-d"]
        # what a resend killed mid-cycle would have left: its table, an address on lo
        a.nft("table inet ipshift_resend_ppp7 { }")
        a.ip("addr", "add", "192.0.2.77/32", "dev", "lo")
        a.run(["iptables", "-t", "mangle", "-N", "IPSHIFT-ppp7"])  # and an NFQUEUE feed
        a.run(["iptables", "-t", "mangle", "-A", "PREROUTING", "-j", "IPSHIFT-ppp7"])
        ino = os.stat(f"/run/netns/{a.ns}").st_ino
        (run_dir / "instances" / f"resend.ppp7.{ino}.lock").write_text("")
        (run_dir / "instances" / f"resend.ppp7.{ino}.json").write_text(json.dumps(
            {"pid": 1, "owned": {"nft_table": ["inet ipshift_resend_ppp7"],
                                 "lo_address": ["192.0.2.77/32"],
                                 "queue_rule": ["4 mangle ppp7"]}}))
        proc.signal(signal.SIGKILL)
        proc.wait(10)
        table = a.run([*IPSHIFT, "daemons"], env=env).stdout
        assert "resend" in table and "tunnel" in table and "True" not in table
        res = a.run([*IPSHIFT, "daemons", "--clean"], env=env)
        assert "cleaned up after resend 'ppp7'" in res.stdout
        # the tunnel's device went with the process: nothing to clean, but nothing listed
        assert "ipshift_resend_ppp7" not in a.run(["nft", "list", "tables"]).stdout
        assert "192.0.2.77" not in a.ip("-o", "addr", "show", "dev", "lo")
        assert "IPSHIFT-ppp7" not in a.run(["iptables", "-t", "mangle", "-S"]).stdout
        rows = json.loads(a.run([*IPSHIFT, "daemons", "--json"], env=env).stdout)
        assert all(not r["owned"] for r in rows), rows
