"""ip_resend against real programs: dnsmasq in the ISP, glibc's resolver and dig at home, the
dial-on-demand emulator in between, and the contrib ip-up script calling ip_resend_wakeup."""

import os
import signal
import subprocess
import sys
import time

import pytest

from ipshift.lab.scenarios import DialupSite
from tests.netns.conftest import need

NAME, A, AAAA = DialupSite.NAME, DialupSite.A, DialupSite.AAAA
DNS4, DNS6 = DialupSite.DNS4, DialupSite.DNS6


def Dial(lab, tmp_path, **kwargs):
    need("dnsmasq", "dig", "getent", "socat")
    return DialupSite(lab, tmp_path / "run", **kwargs)


def _dig(node, server, qtype="A", timeout=6):
    return node.run(["dig", "+tries=1", f"+timeout={timeout}", "+short", f"@{server}", NAME,
                     qtype], check=False, timeout=timeout + 10)


def _printed(proc, text, count, timeout=10.0):
    """Whether `proc` has printed `text` `count` times within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while proc.stdout().count(text) < count:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _kernel_state(node, table="ipshift_resend_ppp0"):
    tables = node.run(["nft", "list", "tables"]).stdout
    lo = node.ip("-o", "addr", "show", "dev", "lo")
    return table in tables, "192.0.2.99" in lo


def test_glibc_lookup_during_dial_is_answered_by_the_first_query(lab, tmp_path):
    d = Dial(lab, tmp_path)
    resend = d.start_resend()
    res = d.home.run(["getent", "hosts", NAME], timeout=30)
    assert NAME in res.stdout
    assert d.wait_dial_events("up", 1)
    # the query that triggered dialing was resent from the new address and answered
    assert resend.wait_for_output("cycle done", timeout=15), resend.stderr()
    assert d.queries_from("203.0.113.100"), d.dns.stderr()
    assert "resent 1 packet" in resend.stderr() or "resent 2 packet" in resend.stderr()
    assert resend.wait(timeout=15) == 0  # one-shot: exits after its cycle, as the seed did
    assert _kernel_state(d.home) == (False, False)  # table and lo address removed


def test_single_try_dig_fails_without_resend_and_succeeds_with_it(lab, tmp_path):
    d = Dial(lab, tmp_path, idle=1.0)
    res = _dig(d.home, DNS4, timeout=4)
    assert A not in res.stdout  # the reply went to the placeholder address and was lost
    assert d.wait_dial_events("down", 1)  # idle hang-up, ready for the next dial
    resend = d.start_resend()
    res = _dig(d.home, DNS4, timeout=4)
    assert res.stdout.strip() == A, resend.stderr()
    resend.stop()


def test_ipv6_lookup_during_dial(lab, tmp_path):
    d = Dial(lab, tmp_path, v6=True)
    resend = d.start_resend()
    res = _dig(d.home, DNS6, "AAAA", timeout=5)
    assert res.stdout.strip() == AAAA, resend.stderr()
    assert d.queries_from("2001:db8:100::10")
    resend.stop()


def test_masquerading_router_answers_the_lan_host(lab, tmp_path):
    d = Dial(lab, tmp_path, lan=True)
    resend = d.start_resend()
    res = _dig(d.lan, DNS4, timeout=5)
    assert res.stdout.strip() == A, resend.stderr()
    assert "masqueraded from 192.0.2.10" in resend.stderr()
    resend.stop()


def test_tcp_connect_during_dial_keeps_working(lab, tmp_path):
    d = Dial(lab, tmp_path)
    resend = d.start_resend()
    client = (
        "import socket, sys\n"
        f"s = socket.create_connection(('{DNS4}', 7), timeout=8)\n"
        "for i in range(3):\n"
        "    s.sendall(b'hello %d\\n' % i)\n"
        "    data = s.recv(100)\n"
        "    assert data == b'hello %d\\n' % i, data\n"
        "print('echoed', flush=True)\n"
    )
    res = d.home.run([sys.executable, "-c", client], check=False, timeout=20)
    assert "echoed" in res.stdout, res.stderr + resend.stderr()
    resend.stop()


@pytest.mark.parametrize("stateful", [False, True], ids=["plain-host", "stateful-firewall"])
def test_tcp_dial_outlives_the_liveness_checks_on_a_host_without_conntrack(lab, tmp_path,
                                                                          stateful):
    """A plain host (no NAT, no stateful rule: the kernel tracks nothing) and one with a
    stateful firewall both keep a connection made during the dial for as long as its socket
    lives, well past the 2 s liveness check."""
    d = Dial(lab, tmp_path)
    rules = d.home.run(["nft", "list", "ruleset"]).stdout
    assert "ct " not in rules and "masquerade" not in rules, rules
    if stateful:
        d.home.nft("table inet fw {\n chain input {\n"
                   "  type filter hook input priority filter; policy drop;\n"
                   "  iif lo accept\n  ct state established,related accept\n"
                   "  meta l4proto { icmp, ipv6-icmp } accept\n }\n}\n")
    resend = d.start_resend()
    client = (
        "import socket, time\n"
        f"s = socket.create_connection(('{DNS4}', 7), timeout=8)\n"
        "for i in range(14):\n"
        "    s.sendall(b'hello %d\\n' % i)\n"
        "    data = s.recv(100)\n"
        "    assert data == b'hello %d\\n' % i, data\n"
        "    time.sleep(0.5)\n"
        "print('echoed', flush=True)\n"
    )
    res = d.home.run([sys.executable, "-c", client], check=False, timeout=30)
    assert "echoed" in res.stdout, res.stderr + resend.stderr()
    assert "all flows finished" not in resend.stderr()
    resend.stop()


def test_started_while_the_link_is_up_it_waits_for_the_next_dial(lab, tmp_path):
    """Ordinary traffic on a link that is already up is not a dial: the one-shot instance
    sees its replies, waits for the link to go down, and accelerates the next dial."""
    d = Dial(lab, tmp_path)
    d.home.run(["ping", "-c", "1", "-W", "1", DNS4], check=False, timeout=10)
    assert d.wait_dial_events("up", 1)
    resend = d.start_resend()  # one-shot, as the seed's boot line
    assert _dig(d.home, DNS4, timeout=3).stdout.strip() == A  # the link is up: answered
    assert d.wait_resend_state("linkup"), resend.stderr()
    assert "ordinary traffic, not a dial" in resend.stderr()
    d.hang_up()
    assert d.wait_resend_state("armed"), resend.stderr()
    res = _dig(d.home, DNS4, timeout=4)  # a dial: only a resend answers a single try
    assert res.stdout.strip() == A, resend.stderr()
    assert resend.wait(20) == 0  # one cycle, as one-shot does
    assert _kernel_state(d.home) == (False, False)


def test_the_seeds_own_lines_across_a_tcp_dial_then_a_lookup_dial(lab, tmp_path):
    """ip-up: `ip_resend_wakeup -m $4 -o $1`; ip-down: `exec ip_resend -o $1`, as the seed
    writes them, across a TCP dial whose connection still lives when the link goes down, then
    a lookup dial: the lookup is accelerated and every wakeup exits 0. Which instance serves
    the second dial depends on who sees the link go down first: the first one (a later
    `ip_resend -o` hands the dial to it) or the one ip-down started (the first one ended its
    cycle when the address went)."""
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    up, down = hooks / "ip-up", hooks / "ip-down"
    up.write_text("#!/bin/sh\nip_resend_wakeup -m $4 -o $1\necho wakeup-exit=$?\n")
    down.write_text("#!/bin/sh\nexec ip_resend -o $1\n")
    up.chmod(0o755)
    down.chmod(0o755)
    d = Dial(lab, tmp_path, ip_up=up, ip_down=down)
    first = d.start_resend()  # the boot line: ip_resend -o ppp0 &
    client = _tcp_client(d)
    assert _printed(d.dialup, "wakeup-exit=0", 1), d.dialup.stdout()
    # A later one-shot start while this dial's connection lives: the running one takes the
    # next dial over (what ip-down's line does whenever it runs before the old instance has
    # seen the link go down), and the new one exits at once.
    later = d.home.run(["ip_resend", "-o", "ppp0"], env=d.env, timeout=20)
    assert "the running instance on ppp0 takes over" in later.stdout, later.stderr
    d.hang_up()  # ip-down runs `exec ip_resend -o ppp0`
    assert d.wait_resend_state("armed"), d.dialup.stderr() + first.stderr()
    res = _dig(d.home, DNS4, timeout=4)  # one try: only a resend answers it
    assert res.stdout.strip() == A, d.dialup.stderr() + first.stderr()
    assert _printed(d.dialup, "wakeup-exit=0", 2), d.dialup.stdout()
    client.stop()
    # both one-shot instances end with their cycles; the second one at its wakeup limit
    assert first.wait(20) == 0, first.stderr()
    d.home.run([sys.executable, "-m", "ipshift", "resend", "stop", "-o", "ppp0"], env=d.env,
               check=False, timeout=20)
    deadline = time.monotonic() + 15
    while d.status() is not None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert d.status() is None
    assert _kernel_state(d.home) == (False, False)


def _tcp_client(d):
    """A TCP connection made during a dial, echoed once, then kept open for 30 s."""
    client = d.home.spawn([sys.executable, "-c", (
        "import socket, time\n"
        f"s = socket.create_connection(('{DNS4}', 7), timeout=8)\n"
        "s.sendall(b'hello\\n')\n"
        "assert s.recv(100) == b'hello\\n'\n"
        "print('echoed', flush=True)\n"
        "time.sleep(30)\n")], name="tcp-client")
    assert client.wait_for_output("echoed", 15), client.stderr()
    return client


@pytest.mark.parametrize("rexmit", [False, True], ids=["pppd-queue", "pppd-rexmit"])
def test_no_query_reaches_the_server_twice_in_either_pppd_mode(lab, tmp_path, rexmit):
    """pppd < 2.4.5 releases the queued query with its stale source; pppd >= 2.4.5 sends it
    again itself with the new source (demand_rexmit) before ip-up runs the wakeup. Either way
    the server sees the query once from the new address, and dig gets its answer."""
    d = Dial(lab, tmp_path, rexmit=rexmit)
    resend = d.start_resend()
    res = _dig(d.home, DNS4, timeout=5)
    assert res.stdout.strip() == A, resend.stderr() + d.dialup.stdout()
    up = [line for line in d.dialup.stdout().splitlines() if line.startswith("dialup: up ")]
    new = up[0].split("local=")[1].split()[0]
    assert ("rexmit=1" in up[0]) == rexmit
    assert len(d.queries_from(new)) == 1, d.dns.stderr() + resend.stderr()
    status = d.status() or {}
    assert status.get("counters", {}).get("sent_by_link", 0) == (1 if rexmit else 0)
    resend.stop()


def test_persistent_daemon_accelerates_every_dial_and_cleans_up(lab, tmp_path):
    d = Dial(lab, tmp_path, idle=1.0)
    resend = d.start_resend("--persistent")
    for cycle in range(2):
        res = _dig(d.home, DNS4, timeout=4)
        assert res.stdout.strip() == A, (cycle, resend.stderr())
        assert d.wait_dial_events("down", cycle + 1)  # idle hang-up before the next dial
        assert d.wait_resend_state("armed")
    status = d.status()
    assert status["counters"]["cycles"] >= 2 and status["counters"]["resent"] >= 2
    assert resend.running()
    assert resend.stop() == 0
    assert _kernel_state(d.home) == (False, False)


def test_out_of_sync_states(lab, tmp_path):
    d = Dial(lab, tmp_path)
    resend = d.start_resend("--persistent")
    # a one-shot start beside it has nothing to do (the running one arms for every dial)
    second = d.home.run([sys.executable, "-m", "ipshift", "resend", "run", "-o", "ppp0"],
                        env=d.env, check=False, timeout=20)
    assert second.returncode == 0
    assert "the running instance on ppp0 runs persistently" in second.stdout
    # a second persistent instance on the same socket is refused clearly
    second = d.home.run([sys.executable, "-m", "ipshift", "resend", "run", "-o", "ppp0",
                         "--persistent"], env=d.env, check=False, timeout=20)
    assert second.returncode != 0
    assert "already running" in second.stderr
    # so is one on the same interface with another control socket, which leaves the first's
    # nftables table alone
    other = d.run_dir / "resend" / "other"
    second = d.home.run([sys.executable, "-m", "ipshift", "resend", "run", "-o", "ppp0", "-c",
                         str(other), "--persistent"], env=d.env, check=False, timeout=20)
    assert second.returncode == 2
    assert "another resend 'ppp0' is already running" in second.stderr
    tables = d.home.run(["nft", "list", "tables"]).stdout
    assert "ipshift_resend_ppp0" in tables and not other.exists()
    # a garbage message is refused and the daemon keeps waiting
    bad = d.home.run([sys.executable, "-m", "ipshift.resend.wakeup", "-m", "hello", "-o",
                      "ppp0"], env=d.env, check=False)
    assert bad.returncode == 2 and "not an address" in bad.stderr
    # a wakeup with nothing captured is answered, nothing breaks; it accelerated nothing,
    # so it exits 1 and says so
    ok = d.home.run([sys.executable, "-m", "ipshift.resend.wakeup", "-m", "203.0.113.150",
                     "-o", "ppp0"], env=d.env, check=False)
    assert "nothing captured" in ok.stdout and ok.returncode == 1
    assert "nothing was accelerated" in ok.stderr
    # that address is not on ppp0, so the daemon sees the "link" gone and captures again
    assert d.status()["state"] == "armed"
    d.home.run([sys.executable, "-m", "ipshift.resend.wakeup", "-m", "stop", "-o", "ppp0"],
               env=d.env)
    assert d.status()["state"] == "armed"
    # kill -9 while holding a mapping (its rules, and the placeholder address kept on lo for
    # the lookup's socket), then restart: the killed instance's table and lo address go
    res = _dig(d.home, DNS4, timeout=4)
    assert res.stdout.strip() == A
    assert d.status()["lo_addresses"] == ["192.0.2.99/32"]
    resend.signal(signal.SIGKILL)
    resend.wait(10)
    sock = d.run_dir / "resend" / "ppp0"
    assert sock.exists()  # stale socket left by the kill
    assert _kernel_state(d.home) == (True, True)  # left behind by the kill
    listing = d.home.run(["nft", "list", "table", "inet", "ipshift_resend_ppp0"]).stdout
    assert DNS4 in listing  # the mapping's elements
    # the restart uses another control socket: what it finds is the instance's, not the
    # socket's
    again = d.start_resend("--persistent", "-c", str(d.run_dir / "resend" / "elsewhere"))
    assert "removed nftables table inet ipshift_resend_ppp0 left by a previous" in \
        again.stderr()
    assert "removed address 192.0.2.99/32 from lo, left by a previous" in again.stderr()
    assert _kernel_state(d.home) == (True, False)  # a fresh table of the new instance
    listing = d.home.run(["nft", "list", "table", "inet", "ipshift_resend_ppp0"]).stdout
    assert DNS4 not in listing  # no mapping survived into the new table
    assert again.stop() == 0
    assert _kernel_state(d.home) == (False, False)


def test_world_writable_socket_directory_is_refused(lab, tmp_path):
    home = lab.host("home")
    open_dir = tmp_path / "open"
    open_dir.mkdir()
    os.chmod(open_dir, 0o777)
    res = home.run([sys.executable, "-m", "ipshift", "resend", "run", "-o", "lo", "-c",
                    str(open_dir / "lo")], check=False, timeout=20)
    assert res.returncode != 0
    assert "writable by other users" in res.stderr


def test_wakeup_without_daemon_says_so(tmp_path):
    res = subprocess.run([sys.executable, "-m", "ipshift.resend.wakeup", "-m", "192.0.2.1",
                          "-c", str(tmp_path / "none")], capture_output=True, text=True)
    assert res.returncode == 2
    assert "Unable to reach ip_resend" in res.stderr


DIALD_PROXY = (
    "import os, sys\n"
    "from ipshift.net.tun import open_tun\n"
    "dev = open_tun('sl0', vnet_hdr=False, offloads=0)\n"
    "print('proxy ready', flush=True)\n"
    "while True:\n"
    "    os.read(dev.fd, 65535)  # diald's proxy: swallows what is routed to it while down\n"
)


def test_diald_proxy_interface_with_snoop_option(lab, tmp_path):
    """The seed's diald case: packets are snooped on the proxy interface (-s sl0) and resent
    on the real link (-o ppp0) once diald has brought it up and moved the routes."""
    need("dnsmasq", "dig")
    home, isp = lab.host("home"), lab.host("isp")
    lab.link(home, isp, None, "203.0.113.1/24", name_a="ppp0", name_b="to-home")
    isp.ip("addr", "add", f"{DNS4}/32", "dev", "lo")
    dns = isp.spawn(["dnsmasq", "--no-daemon", "--no-resolv", "--no-hosts", "--bind-interfaces",
                     f"--listen-address={DNS4}", f"--host-record={NAME},{A}", "--log-queries",
                     "--pid-file=", "--user=root"])
    proxy = home.spawn([sys.executable, "-c", DIALD_PROXY], name="diald-proxy")
    assert proxy.wait_for_output("proxy ready", timeout=10), proxy.stderr()
    home.ip("addr", "add", "192.0.2.99", "peer", "192.0.2.98", "dev", "sl0")
    home.ip("link", "set", "sl0", "up")
    home.ip("route", "add", "default", "dev", "sl0")
    run_dir = tmp_path / "run"
    run_dir.mkdir(mode=0o700)
    env = {"IPSHIFT_RUN_DIR": str(run_dir)}
    resend = home.spawn([sys.executable, "-m", "ipshift", "resend", "run", "-o", "ppp0", "-s",
                         "sl0", "-d", "1"], env=env, name="ip_resend")
    assert resend.wait_for_output("armed", timeout=15), resend.stderr()
    query = home.spawn(["dig", "+tries=1", "+timeout=8", "+short", f"@{DNS4}", NAME, "A"],
                       name="dig")
    assert resend.wait_for_output("captured first packet", timeout=10), resend.stderr()
    # diald brings the link up with a new address and moves the default route to it
    home.ip("addr", "add", "203.0.113.100/24", "dev", "ppp0")
    home.ip("route", "replace", "default", "via", "203.0.113.1", "dev", "ppp0")
    woke = home.run([sys.executable, "-m", "ipshift.resend.wakeup", "-m", "203.0.113.100",
                     "-o", "ppp0"], env=env)
    assert "resent 1 packet" in woke.stdout
    assert query.wait(timeout=15) == 0
    assert query.stdout().strip() == A, resend.stderr() + dns.stderr()
    assert resend.wait(timeout=15) == 0  # one-shot: the cycle is over
