"""The rsip gateway's PCP / NAT-PMP responder with real clients, a real kernel and tshark.

The site is `ipshift.lab.rsip_site.RsipSite` (private hosts a, b, c behind gw, 192.0.2.0/24;
gw's public 203.0.113.1; the Internet host inet 203.0.113.100). The responder runs alone on
the daemon runtime in gw (`python -m ipshift.rsip.responder`, with a lease table of its own)
until the gateway daemon wires it in. Host a runs a server on TCP and UDP 8080-8089.

Shown: Debian's natpmpc learns the public address and maps a port, and inet reaches a's
server through it at once (b too, by hairpin); a PCP MAP made with ipshift's codec is answered
as tshark's decoder reads the captured exchange; wrong versions get UNSUPP_VERSION; FILTER
lets in only the allowed peers; PEER reports the port the kernel gave an existing flow;
expiry removes the forward (and the flows through it); the start announces itself to
224.0.0.1:5350; a kill -9 and restart leave one empty table; a stop leaves none.
No timing assertions; every wait is bounded.
"""

from __future__ import annotations

import ipaddress
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ipshift.lab import Lab, LabProcess, Node
from ipshift.lab.rsip_site import GATEWAY_INT, HOSTS, INTERNET, PUBLIC, RsipSite
from ipshift.net import udp
from ipshift.net.conntrack import Conntrack
from ipshift.rsip import pcpwire
from ipshift.rsip.pcpwire import (
    Filter,
    MapData,
    Opcode,
    PcpRequest,
    PeerData,
    PmpAddressResponse,
    PmpResult,
    Result,
)
from tests.netns.conftest import need

V4 = ipaddress.IPv4Address
TABLE = "ipshift_pcp_default"
SERVER_PORTS = range(8080, 8090)
GREETING = b"hello from a\n"

SERVER = r"""
import selectors, socket, sys
sel = selectors.DefaultSelector()
for port in range(int(sys.argv[1]), int(sys.argv[2])):
    t = socket.socket(); t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    t.bind(("0.0.0.0", port)); t.listen(64); t.setblocking(False)
    sel.register(t, selectors.EVENT_READ, "tcp")
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.bind(("0.0.0.0", port))
    sel.register(u, selectors.EVENT_READ, "udp")
print("serving", flush=True)
while True:
    for key, _ in sel.select():
        if key.data == "tcp":
            conn, _ = key.fileobj.accept()
            conn.sendall(b"hello from a\n"); conn.close()
        else:
            data, peer = key.fileobj.recvfrom(2048)
            key.fileobj.sendto(b"echo " + data, peer)
"""


class PcpSite:
    """The rsip site with the responder running in gw, and a's server."""

    def __init__(self, lab: Lab, workdir: Path) -> None:
        self.lab = lab
        self.workdir = workdir
        self.site = RsipSite(lab, workdir / "site")
        self.gw, self.inet = self.site.gw, self.site.inet
        self.a, self.b = self.site.host("a"), self.site.host("b")
        self.socket = workdir / "pcp.sock"
        self.run_dir = workdir / "run"
        self.server = self.a.spawn([sys.executable, "-c", SERVER, str(SERVER_PORTS.start),
                                    str(SERVER_PORTS.stop)], name="server")
        self.server.wait_ready("serving", 20, "a's test server")
        self.responder: LabProcess | None = None
        # what the responder announces when it starts, heard on a
        self.listener = udp.open_multicast(pcpwire.CLIENT_PORT, [pcpwire.ANNOUNCE_GROUP],
                                           "to-lan", self.a.ns)
        self.listener.settimeout(5)
        self.start_responder()

    def start_responder(self) -> LabProcess:
        proc = self.gw.spawn([sys.executable, "-m", "ipshift.rsip.responder",
                              "--int-if", self.site.int_if, "--internal", f"{GATEWAY_INT}/24",
                              "--external", PUBLIC, "--socket", str(self.socket),
                              "--run-dir", str(self.run_dir), "--no-syslog",
                              "--min-lifetime", "2", "-v"], name="pcp")
        RsipSite.wait_ready(proc, self.socket, 20)
        self.responder = proc
        return proc

    def announcements(self, count: int) -> list[tuple[bytes, tuple[str, int]]]:
        heard = []
        for _ in range(count):
            received = udp.recv_with_destination(self.listener)
            heard.append((received.data, (str(received.source[0]), int(received.source[1]))))
        return heard

    def close(self) -> None:
        self.listener.close()

    # --- clients ---------------------------------------------------------------------------
    def natpmpc(self, node: Node, *args: str) -> str:
        result = node.run(["natpmpc", "-g", GATEWAY_INT, *args], timeout=30)
        return result.stdout

    def ask(self, node: Node, data: bytes, *, local_port: int = 0) -> bytes:
        """One request from `node` to the responder; the reply (retried twice)."""
        def exchange() -> bytes:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
                sock.bind(("0.0.0.0", local_port))
                sock.connect((GATEWAY_INT, pcpwire.SERVER_PORT))
                sock.settimeout(1.0)
                for _ in range(3):
                    sock.send(data)
                    try:
                        return sock.recv(2048)
                    except TimeoutError:
                        continue
            raise AssertionError("the responder did not answer")

        return node.call(exchange)

    def greeting(self, node: Node, port: int, *, timeout: float = 2.0) -> bytes:
        """What a TCP connect from `node` to the public address and `port` reads."""
        def connect() -> bytes:
            with socket.create_connection((PUBLIC, port), timeout=timeout) as conn:
                return conn.recv(100)

        return node.call(connect)

    def unreachable(self, node: Node, port: int) -> bool:
        try:
            self.greeting(node, port, timeout=1.0)
        except OSError:
            return True
        return False

    def elements(self, name: str) -> list[Any]:
        doc = json.loads(self.gw.run(["nft", "-j", "list", "set" if name in (
            "targets", "filtered", "allowed") else "map", "ip", TABLE, name]).stdout)
        for item in doc["nftables"]:
            body = item.get("map") or item.get("set")
            if body:
                return list(body.get("elem", []))
        return []

    def forwarded_ports(self) -> set[int]:
        """The external ports in the forwards map (keys: address . protocol . port)."""
        return {int(key["concat"][2]) for key, _value in self.elements("forwards")}

    def status(self) -> dict[str, Any]:
        from ipshift.ctl.client import request

        result: dict[str, Any] = request(self.socket, "status")
        return result

    def tables(self) -> list[str]:
        doc = json.loads(self.gw.run(["nft", "-j", "list", "tables"]).stdout)
        return [i["table"]["name"] for i in doc["nftables"] if "table" in i]


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PcpSite]:
    if os.geteuid() != 0:
        pytest.skip("needs root: builds network namespaces")
    need("natpmpc", "tshark", "tcpdump")
    with Lab("pcp") as lab:
        built = PcpSite(lab, tmp_path_factory.mktemp("pcp"))
        try:
            yield built
        finally:
            built.close()


def client_address(host: str) -> V4:
    return V4(HOSTS[host])


def map_request(port: int, suggested: int = 0, *, lifetime: int = 600, protocol: int = 6,
                host: str = "a", nonce: bytes = b"nonce-of-a-1",
                options: tuple[pcpwire.Option, ...] = ()) -> bytes:
    return PcpRequest(Opcode.MAP, lifetime, client_address(host),
                      MapData(nonce, protocol, port, suggested, V4(0)), options).encode()


# --- the start ----------------------------------------------------------------------------------
def test_the_start_is_announced_to_all_hosts(site: PcpSite) -> None:
    heard = site.announcements(2)
    assert {source for _, source in heard} == {(GATEWAY_INT, pcpwire.SERVER_PORT)}
    by_version = {data[0]: data for data, _ in heard}
    announce = pcpwire.decode_pcp_response(by_version[pcpwire.PCP_VERSION])
    assert (announce.opcode, announce.result, announce.epoch) == (Opcode.ANNOUNCE,
                                                                  Result.SUCCESS, 0)
    address = pcpwire.decode_pmp_response(by_version[pcpwire.NATPMP_VERSION])
    assert address == PmpAddressResponse(PmpResult.SUCCESS, 0, V4(PUBLIC))


# --- NAT-PMP with Debian's natpmpc --------------------------------------------------------------
def test_natpmpc_learns_the_public_address(site: PcpSite) -> None:
    out = site.natpmpc(site.a)
    assert f"Public IP address : {PUBLIC}" in out


def test_natpmpc_maps_a_port_reachable_at_once_from_outside(site: PcpSite) -> None:
    assert site.unreachable(site.inet, 8080)
    out = site.natpmpc(site.a, "-a", "8080", "8080", "tcp", "3600")
    assert "Mapped public port 8080 protocol TCP to local port 8080" in out
    # no wait and no retry: the forward is in the kernel before the answer is sent
    assert site.greeting(site.inet, 8080) == GREETING
    assert 8080 in site.forwarded_ports()
    assert site.greeting(site.b, 8080) == GREETING  # hairpin: b through the public address
    status = site.status()["pcp"]
    assert status["mappings"] == 1 and status["kernel"]["forwards"] == 1
    assert status["counters"]["natpmp.MAP_TCP.SUCCESS"] == 1


def test_natpmpc_udp_mapping_and_delete(site: PcpSite) -> None:
    out = site.natpmpc(site.a, "-a", "8081", "8081", "udp", "600")
    assert "Mapped public port 8081 protocol UDP to local port 8081" in out

    def echo() -> bytes:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.settimeout(2)
            sock.sendto(b"ping", (PUBLIC, 8081))
            return sock.recv(100)

    assert site.inet.call(echo) == b"echo ping"
    out = site.natpmpc(site.a, "-a", "8081", "8081", "udp", "0")
    assert "liftime 0" in out
    assert 8081 not in site.forwarded_ports()


# --- PCP, cross-checked with tshark -------------------------------------------------------------
def test_pcp_map_is_answered_as_tshark_decodes_it(site: PcpSite, tmp_path: Path) -> None:
    capture = tmp_path / "pcp.pcap"
    dump = site.gw.spawn(["tcpdump", "-i", site.site.int_if, "-nn", "-U", "-w", str(capture),
                          "udp", "port", str(pcpwire.SERVER_PORT), "and", "not", "host",
                          pcpwire.ANNOUNCE_GROUP], name="tcpdump")
    dump.wait_ready("listening on", 20, "tcpdump")
    nonce = bytes(range(1, 13))
    reply = site.ask(site.a, map_request(8082, 8082, lifetime=300, protocol=17, nonce=nonce),
                     local_port=40001)
    response = pcpwire.decode_pcp_response(reply)
    assert response.result is Result.SUCCESS and response.lifetime == 300
    assert isinstance(response.data, MapData)
    assert (response.data.external_address, response.data.external_port) == (V4(PUBLIC), 8082)
    deadline = time.monotonic() + 10
    fields = ["portcontrol.version", "portcontrol.r", "portcontrol.opcode",
              "portcontrol.result_code", "portcontrol.lifetime_req", "portcontrol.lifetime_rsp",
              "portcontrol.map.nonce", "portcontrol.map.protocol",
              "portcontrol.map.internal_port", "portcontrol.map.req_sug_external_port",
              "portcontrol.map.rsp_assigned_external_port", "portcontrol.map.rsp_assigned_ext_ip",
              "portcontrol.client_ip"]
    rows: list[list[str]] = []
    while time.monotonic() < deadline:
        out = subprocess.run(["tshark", "-r", str(capture), "-Y", "portcontrol", "-T", "fields",
                              "-E", "separator=|", *(x for f in fields for x in ("-e", f))],
                             capture_output=True, text=True, timeout=60).stdout
        rows = [line.split("|") for line in out.splitlines() if line]
        if len(rows) >= 2:
            break
        time.sleep(0.1)
    dump.stop()
    assert len(rows) == 2, rows
    request, answer = (dict(zip(fields, row, strict=True)) for row in rows)
    assert request["portcontrol.version"] == "2" and request["portcontrol.r"] == "0"
    assert request["portcontrol.client_ip"] == f"::ffff:{HOSTS['a']}"
    assert request["portcontrol.lifetime_req"] == "300"
    assert request["portcontrol.map.req_sug_external_port"] == "8082"
    assert answer["portcontrol.version"] == "2" and answer["portcontrol.r"] == "1"
    assert answer["portcontrol.opcode"] == "1" and answer["portcontrol.result_code"] == "0"
    assert answer["portcontrol.lifetime_rsp"] == "300"
    assert answer["portcontrol.map.nonce"] == nonce.hex()
    assert answer["portcontrol.map.protocol"] == "17"
    assert answer["portcontrol.map.internal_port"] == "8082"
    assert answer["portcontrol.map.rsp_assigned_external_port"] == "8082"
    assert answer["portcontrol.map.rsp_assigned_ext_ip"] == f"::ffff:{PUBLIC}"
    text = subprocess.run(["tshark", "-r", str(capture), "-O", "portcontrol"],
                          capture_output=True, text=True, timeout=60).stdout
    assert "Malformed" not in text and "Result Code: Success" in text


@pytest.mark.parametrize("version", [1, 3])
def test_a_wrong_version_gets_unsupp_version(site: PcpSite, version: int) -> None:
    request = bytearray(map_request(8083))
    request[0] = version
    response = pcpwire.decode_pcp_response(site.ask(site.a, bytes(request)))
    assert (response.version, response.result) == (2, Result.UNSUPP_VERSION)


def test_address_mismatch_and_third_party_refused(site: PcpSite) -> None:
    forged = pcpwire.decode_pcp_response(site.ask(site.a, map_request(8084, host="b")))
    assert forged.result is Result.ADDRESS_MISMATCH
    third = map_request(8084, options=(pcpwire.ThirdParty(client_address("b")),))
    assert pcpwire.decode_pcp_response(site.ask(site.a, third)).result is Result.UNSUPP_OPTION


def test_filter_lets_in_only_the_allowed_peers(site: PcpSite) -> None:
    only_elsewhere = Filter(96 + 24, 0, V4("198.51.100.0"))
    reply = site.ask(site.a, map_request(8085, 8085, options=(only_elsewhere,)))
    assert pcpwire.decode_pcp_response(reply).result is Result.SUCCESS
    assert site.unreachable(site.inet, 8085)           # dropped before the DNAT
    assert site.greeting(site.b, 8085) == GREETING     # the inside is not filtered
    inet_only = (Filter(0, 0, V4(0)), Filter(128, 0, V4(INTERNET)))
    reply = site.ask(site.a, map_request(8085, 8085, options=inet_only))
    assert pcpwire.decode_pcp_response(reply).result is Result.SUCCESS
    assert site.greeting(site.inet, 8085) == GREETING
    assert len(site.elements("allowed")) == 1


def test_peer_reports_the_port_of_an_existing_flow(site: PcpSite) -> None:
    listener = site.inet.call(lambda: socket.create_server((INTERNET, 9000)))
    client = site.a.call(lambda: socket.create_connection((INTERNET, 9000), timeout=5))
    try:
        accepted, seen_from = listener.accept()
        local_port = client.getsockname()[1]
        request = PcpRequest(Opcode.PEER, 600, client_address("a"), PeerData(
            b"peer-nonce-1", 6, local_port, 0, V4(0), 9000, V4(INTERNET))).encode()
        response = pcpwire.decode_pcp_response(site.ask(site.a, request))
        assert response.result is Result.SUCCESS
        assert isinstance(response.data, PeerData)
        assert (str(response.data.external_address), response.data.external_port) == (
            seen_from[0], seen_from[1])
        assert len(site.elements("peers")) == 1
        accepted.close()
    finally:
        client.close()
        listener.close()


def test_expiry_removes_the_forward_and_its_flows(site: PcpSite) -> None:
    def flows() -> list[Any]:
        with Conntrack() as ct:
            return ct.entries(proto=6, orig_dst=PUBLIC, orig_dport=8086)

    ended = site.status()["pcp"]["kernel"]["flows_ended"]
    out = site.natpmpc(site.a, "-a", "8086", "8086", "tcp", "3")
    assert "liftime 3" in out
    assert site.greeting(site.inet, 8086) == GREETING
    assert site.gw.call(flows)  # the connection's entry (in TIME_WAIT now)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and 8086 in site.forwarded_ports():
        time.sleep(0.2)
    assert 8086 not in site.forwarded_ports()
    while time.monotonic() < deadline and site.gw.call(flows):  # swept off the request path
        time.sleep(0.05)
    assert site.gw.call(flows) == []
    assert site.unreachable(site.inet, 8086)
    status = site.status()["pcp"]
    assert status["counters"]["map.expired"] >= 1
    assert status["kernel"]["flows_ended"] > ended


# --- restart and stop ---------------------------------------------------------------------------
def test_kill_and_restart_leaves_one_empty_table(site: PcpSite) -> None:
    assert site.responder is not None
    site.responder.signal(signal.SIGKILL)
    site.responder.wait(10)
    assert site.tables().count(TABLE) == 1  # left behind by the killed process
    site.start_responder()
    assert site.tables().count(TABLE) == 1
    assert site.elements("forwards") == [] and site.elements("targets") == []
    heard = site.announcements(2)  # the new epoch is announced: clients map again
    assert {pcpwire.decode_pcp_response(d).epoch for d, _ in heard if d[0] == 2} == {0}
    out = site.natpmpc(site.a, "-a", "8087", "8087", "tcp", "600")
    assert "Mapped public port 8087" in out
    assert site.greeting(site.inet, 8087) == GREETING


def test_stop_removes_the_table(site: PcpSite) -> None:
    assert site.responder is not None
    assert site.responder.stop(15) == 0
    site.responder = None
    assert TABLE not in site.tables()
    assert site.unreachable(site.inet, 8087)
    assert not list(site.run_dir.glob("*.json"))  # the owned-state record is gone too
