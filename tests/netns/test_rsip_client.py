"""The RSIP client (`ipshift rsip client`) against the real gateway daemon, on real kernels.

The site is `ipshift.lab.rsip_site.RsipSite`: private hosts a, b, c (192.0.2.10-12) behind
gw (192.0.2.1 inside, 203.0.113.1 public), the Internet host inet (203.0.113.100), which can
reach nothing private. The gateway leases PORT_RANGE 8192-32767 and LISTEN_RANGE 1-1023.

Shown on a (TCP control, UDP tunnel): the client registers and leases a block; rsip0 holds
the public address; an HTTP request to inet leaves from the public address and a port of the
block; ping works (its identifier kept in the block); `-l 80` makes a's web server reachable
from inet; a server started later on port 9000 is asked for and reachable, one on 8080
(outside both gateway ranges) is refused and its listening socket closed, and a freed port
goes back; `status` has the krsip shape; a restarted gateway (leases kept) is ridden out on
the same registration and block; SIGTERM frees, de-registers and removes everything;
after a kill -9 the next start removes what was left, registers again and ends clean.
On b: RSIP over UDP (its first request lost, so retransmitted) with an IP-in-IP tunnel,
`-m 1400`, and the server found as the default gateway. On c: the seed's error lines
(connection refused, MTU problem) and nothing left behind. Every wait is bounded; no timing is
asserted.
"""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path
from typing import Any

import pytest

from ipshift.lab import Lab
from ipshift.lab.rsip_site import (
    GATEWAY_INT,
    HOSTS,
    INTERNET,
    PORT_RANGE_KEY,
    PUBLIC,
    RSIP,
    TABLE,
    WAIT,
    WHO,
    Client,
    RsipSite,
    get,
    wait_for,
)
from ipshift.net import sysctl

pytestmark = pytest.mark.netns

# A server that listens and reports what happens to its socket.
LISTENER = r"""
import socket, sys
s = socket.socket()
s.bind(("0.0.0.0", int(sys.argv[1])))
s.listen()
print("listening", flush=True)
try:
    s.accept()
except OSError as exc:
    print("accept failed:", exc, flush=True)
"""


def gateway_binds(site: RsipSite, host: str) -> list[dict[str, Any]]:
    return site.gateway_binds(host)


def test_rsip_client_leases_tunnels_listens_and_cleans_up(lab: Lab, tmp_path: Path) -> None:
    site = RsipSite(lab, tmp_path / "site")
    site.start_gateway()
    a, inet = site.host("a"), site.inet
    original = " ".join(sysctl.read(PORT_RANGE_KEY, a.ns).split())
    who = inet.spawn([sys.executable, "-c", WHO, INTERNET, "8000"], name="who-inet")
    who.wait_ready("serving", 20, "inet's web server")
    web = a.spawn([sys.executable, "-c", WHO, "0.0.0.0", "80"], name="web-a")
    web.wait_ready("serving", 20, "a's web server")

    client = Client(a, tmp_path, "-l", "80")
    proc = client.start()
    status = client.status()
    info = status["client"]
    assert info["state"] == "assigned" and info["transport"] == "tcp"
    assert info["tunnel_kind"] == "udp" and info["local"] == HOSTS["a"]
    block = next(b for b in status["binds"] if b["kind"] == "ports")
    first, last = block["first"], block["last"]
    assert block["address"] == PUBLIC and last - first + 1 == 255
    assert [b["first"] for b in status["binds"] if b["kind"] == "listen"] == [80]

    # the kernel state: the address, the routes, the port range, the table
    assert f"{PUBLIC}/32" in a.ip("-o", "addr", "show", "rsip0")
    routes = client.routes()
    assert f"0.0.0.0/1 dev rsip0 proto 75 scope link src {PUBLIC}" in routes
    assert f"128.0.0.0/1 dev rsip0 proto 75 scope link src {PUBLIC}" in routes
    assert client.port_range() == f"{first} {last}"
    assert TABLE in client.tables()

    # out to the Internet from the public address and a port of the block
    seen = get(a, f"http://{INTERNET}:8000/")
    address, _, port = seen.partition(":")
    assert address == PUBLIC and first <= int(port) <= last, seen
    # the private network stays direct
    assert a.run(["ping", "-c", "1", "-W", "2", HOSTS["b"]]).returncode == 0
    # ping through the tunnel: the gateway only lets identifiers of the block through
    assert a.run(["ping", "-c", "2", "-W", "3", INTERNET]).returncode == 0
    echo = a.run(["conntrack", "-L", "-p", "icmp", "-d", INTERNET]).stdout
    # the reply direction (the last id= of an entry) is what crossed the tunnel
    replies = [[int(p[3:]) for p in line.split() if p.startswith("id=")][-1]
               for line in echo.splitlines() if "id=" in line]
    assert replies and all(first <= ident <= last for ident in replies), echo
    # -l 80: inet reaches a's web server at the public address
    seen = get(inet, f"http://{PUBLIC}:80/")
    assert seen.startswith(f"{INTERNET}:"), seen

    # an application starts listening on 9000 (PORT_RANGE, outside a's block): asked, held
    late = a.spawn([sys.executable, "-c", WHO, "0.0.0.0", "9000"], name="web-a-9000")
    late.wait_ready("serving", 20, "a's second web server")
    wait_for("LISTEN 9000", lambda: client.listen_state(9000) == "held", process=proc)
    assert get(inet, f"http://{PUBLIC}:9000/").startswith(f"{INTERNET}:")
    assert any(row["first"] == 9000 for row in gateway_binds(site, HOSTS["a"]))

    # ... and on 8080, which the gateway refuses (in neither range): the socket is closed
    refused = a.spawn([sys.executable, "-c", LISTENER, "8080"], name="listener-8080")
    refused.wait_ready("listening", 20, "a's listener on 8080")
    assert refused.wait_for_output("accept failed", WAIT), proc.stderr()[-3000:]
    assert client.listen_state(8080) == "refused"
    assert "closed 1 socket(s) listening on port 8080" in proc.stderr()
    assert ":8080 " not in a.run(["ss", "-Htln"]).stdout

    # the server on 9000 goes away: after the linger the port is freed
    late.stop()
    wait_for("9000 freed", lambda: client.listen_state(9000) is None, process=proc)
    wait_for("9000 freed at the gateway", lambda: not any(
        row["first"] == 9000 for row in gateway_binds(site, HOSTS["a"])))

    # status, as people read it and as JSON
    shown = a.run([*RSIP, "client", "status", "--socket", str(client.socket)]).stdout
    lines = shown.splitlines()
    assert lines[0].split()[:3] == ["STATE", "CLIENT", "ID"]
    assert lines[1].split()[0] == "assigned" and lines[1].split()[-1] == "rsip0"
    assert lines[2].startswith("LEASED ADDRESS")
    assert any(line.split()[:2] == [PUBLIC, f"{first}-{last}"] for line in lines)
    assert any(line.split()[:2] == [PUBLIC, "80"] for line in lines)
    as_json = json.loads(a.run([*RSIP, "client", "status", "--json", "--socket",
                                str(client.socket)]).stdout)
    assert as_json["client"]["client_id"] == info["client_id"]

    # the gateway restarts (it keeps its leases): the client connects again and carries on
    # with the same registration and block
    site.stop_gateway()
    site.start_gateway()
    wait_for("the client back", lambda: client.status()["counters"]["recoveries"] >= 1
             and client.status()["client"]["state"] == "assigned", process=proc)
    assert client.status()["client"]["client_id"] == info["client_id"]
    assert client.port_range() == f"{first} {last}"
    seen = get(a, f"http://{INTERNET}:8000/")
    assert seen.startswith(f"{PUBLIC}:"), seen

    # SIGTERM: FREE every bind, DE-REGISTER, and nothing left
    assert client.stop() == 0
    client.assert_clean(original)
    assert gateway_binds(site, HOSTS["a"]) == []

    # kill -9, then start again: the leftovers go, a new registration, one of everything
    client = Client(a, tmp_path)
    proc = client.start()
    old_id = client.status()["client"]["client_id"]
    proc.signal(signal.SIGKILL)
    proc.wait(10)
    assert TABLE in client.tables() and client.port_range() != original  # what it left
    proc = client.start()
    status = client.status()
    assert status["client"]["client_id"] != old_id
    assert len(gateway_binds(site, HOSTS["a"])) == 1
    assert client.tables().count(TABLE) == 1
    block = status["binds"][0]
    assert client.port_range() == f"{block['first']} {block['last']}"
    seen = get(a, f"http://{INTERNET}:8000/")
    assert seen.startswith(f"{PUBLIC}:"), seen
    assert "left changed by a previous instance" in proc.stderr()
    assert client.stop() == 0
    client.assert_clean(original)
    assert gateway_binds(site, HOSTS["a"]) == []


def test_rsip_client_over_udp_with_ipip_and_the_error_lines(lab: Lab,
                                                            tmp_path: Path) -> None:
    site = RsipSite(lab, tmp_path / "site")
    b, c, inet = site.host("b"), site.host("c"), site.inet
    original = " ".join(sysctl.read(PORT_RANGE_KEY, c.ns).split())

    # no gateway yet: the seed's first line, exit status 2, nothing left
    refused = Client(c, tmp_path)
    result = c.run(refused.command(), check=False, timeout=60)
    assert result.returncode == 2
    assert "Unable to connect to RSIP server: Connection refused" in result.stderr
    refused.assert_clean(original)

    site.start_gateway()
    who = inet.spawn([sys.executable, "-c", WHO, INTERNET, "8000"], name="who-inet")
    who.wait_ready("serving", 20, "inet's web server")

    # an MTU the path cannot carry in the UDP tunnel: the seed's line, and no registration
    too_big = Client(c, tmp_path, "-m", "1480")
    result = c.run(too_big.command(), check=False, timeout=60)
    assert result.returncode == 2, result.stderr
    assert "Can't send rsip packet. MTU problem." in result.stderr
    assert "-m 1468" in result.stderr
    too_big.assert_clean(original)
    assert gateway_binds(site, HOSTS["c"]) == []

    # RSIP over UDP, the tunnel in IP-in-IP; the gateway loses the first request (one nft
    # quota's worth), so the client must send it again
    site.gw.nft("table ip lose_first {\n chain input {\n"
                "  type filter hook input priority filter - 10; policy accept;\n"
                "  udp dport 4555 quota until 40 bytes drop\n }\n}\n")
    original_b = " ".join(sysctl.read(PORT_RANGE_KEY, b.ns).split())
    client = Client(b, tmp_path, "--transport", "udp", "--tunnel", "ipip", "-m", "1400",
                    server=False)
    client.start()
    info = client.status()["client"]
    assert (info["transport"], info["tunnel_kind"], info["mtu"]) == ("udp", "ipip", 1400)
    assert info["server"] == GATEWAY_INT  # b's default gateway, taken for the server
    assert client.status()["counters"]["retransmissions"] >= 1
    assert "mtu 1400" in b.ip("link", "show", "rsip0")
    seen = get(b, f"http://{INTERNET}:8000/")
    assert seen.startswith(f"{PUBLIC}:"), seen
    assert b.run(["ping", "-c", "1", "-W", "3", INTERNET]).returncode == 0
    counters = client.status()["tunnel_counters"]
    assert counters["tun_reads"] > 0 and counters["tun_writes"] > 0
    assert client.stop() == 0
    client.assert_clean(original_b)
    assert gateway_binds(site, HOSTS["b"]) == []
