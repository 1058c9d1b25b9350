"""`ipshift demo rsip`: two private hosts lease ports of one public address; a server behind it.

The site is ipshift.lab.rsip_site: a, b and c behind gw (one public address, 203.0.113.1),
an Internet web server on inet that answers with the address and port it saw. a and b run
the RSIP client; c speaks no RSIP and goes through gw's ordinary masquerade beside it.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from ipshift.lab import Lab, LabProcess
from ipshift.lab.rsip_site import (
    HOSTS,
    INTERNET,
    PUBLIC,
    RSIP,
    Client,
    RsipSite,
    get,
    start_who,
)
from ipshift.ui import say


def _block(client: Client) -> tuple[int, int]:
    bind = next(b for b in client.status()["binds"] if b["kind"] == "ports")
    return int(bind["first"]), int(bind["last"])


def _fetch(site: RsipSite, name: str) -> str:
    return get(site.host(name), f"http://{INTERNET}:8000/")


def run_demo(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory() as tmp, Lab("demo-rsip") as lab:
        say(f"building: a, b, c ({', '.join(HOSTS.values())}) -- gw ({PUBLIC}, the only public "
            f"address) -- inet ({INTERNET}, a web server that shows who called)")
        site = RsipSite(lab, Path(tmp) / "site")
        site.start_gateway(LOG_LEVEL="info")
        start_who(site.inet, INTERNET, 8000)
        servers: list[LabProcess] = [start_who(site.host("a"), "0.0.0.0", 80)]
        say("rsipd runs on gw; a starts `rsipclient -s 192.0.2.1 -l 80` (its web server on "
            "port 80 is to be public), b starts `rsipclient -s 192.0.2.1`")
        a = Client(site.host("a"), Path(tmp), "-l", "80")
        b = Client(site.host("b"), Path(tmp))
        ok = True
        try:
            a.start()
            b.start()
            for name, client in (("a", a), ("b", b)):
                first, last = _block(client)
                say(f"   {name} leased {PUBLIC} ports {first}-{last} (rsip0 holds the address, "
                    f"its local port range is narrowed to the block)")
            say("1) a, b and c fetch from inet's web server; inet sees:")
            for name, client_ in (("a", a), ("b", b), ("c", None)):
                seen = _fetch(site, name)
                address, _, port = seen.partition(":")
                how = "through its RSIP tunnel" if client_ else "through gw's masquerade NAT"
                inside = ""
                if client_ is not None and port.isdigit():
                    first, last = _block(client_)
                    good = address == PUBLIC and first <= int(port) <= last
                    inside = ", inside its block" if good else ", NOT inside its block"
                    ok = ok and good
                ok = ok and address == PUBLIC
                say(f"   {name}: {seen or 'nothing'}  ({how}{inside})")
            say(f"2) inet opens http://{PUBLIC}:80/ (a's LISTEN 80):")
            seen = get(site.inet, f"http://{PUBLIC}:80/")
            say(f"   a's web server answered, and saw {seen or 'nothing'}")
            ok = ok and seen.startswith(f"{INTERNET}:")
            out = site.host("a").run(["ping", "-c", "2", "-W", "3", INTERNET], check=False)
            say(f"3) a pings inet through the tunnel: "
                f"{'answered' if out.returncode == 0 else 'NOT answered'}")
            ok = ok and out.returncode == 0
            say("4) the gateway's table (rsipdctl dump; also written on SIGUSR1):")
            table = site.gw.run([*RSIP, "dump", "--socket",
                                 str(site.socket)]).stdout
            for line in table.splitlines():
                say(f"   {line}")
            say("5) the clients stop: each frees its binds and de-registers")
            for client in (a, b):
                ok = client.stop() == 0 and ok
            left = site.gateway_status().get("binds", [])
            say(f"   binds left at the gateway: {len(left)}")
            ok = ok and not left
        finally:
            for client in (a, b):
                if client.proc is not None:
                    client.stop()
            for server in servers:
                server.stop()
            site.stop_gateway()
    say("tearing down the lab (rsipd removed its tunnel, rule and nft table on SIGTERM)")
    return 0 if ok else 1
