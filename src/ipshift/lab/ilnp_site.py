"""The ILNP lab: the seed's topology (mobile node, correspondent, router, three locators) with
`ipshift ilnp node` on each node. Used by tests/netns/test_ilnp_node.py, bench/bench_ilnp.py
and `ipshift demo ilnp`.

    sw1 (L1 2001:db8:1::/64) -- mn (l1), r (l1)
    sw2 (L2 2001:db8:2::/64) -- mn (l2), r (l2)
    sw3 (L3 2001:db8:3::/64) -- cn (l3), r (l3)          (direct=True: cn on sw1 and sw2 too)

Every node's locators are its I-LVs `L:<NID>` on these links: mn starts with L1 only; a move
adds the I-LV on the other link (soft handoff: both for a while) and deletes the old one,
exactly as a network attach and detach would (`move`). r routes between the three. Programs
reach each other at `APP:<NID>` (`app_address`) through the nodes' TUN devices.

    with Lab("ilnp") as lab:
        site = build_site(lab, workdir)
        site.start_all()                      # nodes up, discovery done
        site.move(site.mn, soft=0.2)          # L1 -> L2 (make before break)
        site.status(site.mn)["correspondents"]
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ipshift.ctl.client import request
from ipshift.ctl.protocol import CtlError
from ipshift.lab.topology import Lab, LabError, LabProcess, Node

ILNP = [sys.executable, "-m", "ipshift", "ilnp"]
NIDS = {"mn": 0x11, "cn": 0x22, "r": 0x33}
APP = "2001:db8:d246"  # the application locator (checksum-neutral, docs/ilnp.md)
WAIT = 15.0


def l64_prefix(index: int) -> str:
    return f"2001:db8:{index}::/64"


def ilv(index: int, nid: int) -> str:
    return f"2001:db8:{index}::{nid:x}"


def app_address(name: str) -> str:
    return f"{APP}::{NIDS[name]:x}"


@dataclass
class IlnpSite:
    lab: Lab
    mn: Node
    cn: Node
    r: Node
    workdir: Path
    direct: bool = False
    daemons: dict[str, LabProcess] = field(default_factory=dict)
    at: int = 1  # the link mn's locator is on (1 or 2)

    @property
    def nodes(self) -> dict[str, Node]:
        return {"mn": self.mn, "cn": self.cn, "r": self.r}

    def socket(self, node: Node) -> str:
        return str(self.workdir / f"{node.name}.sock")

    def config_path(self, node: Node) -> Path:
        return self.workdir / f"{node.name}.toml"

    def write_config(self, node: Node, extra: str = "", **keys: Any) -> Path:
        interfaces = [link.a.ifname if link.a.node is node else link.b.ifname
                      for link in node.links]
        lines = [f'name = "{node.name}"', f'nid = "0000:0000:0000:{NIDS[node.name]:04x}"',
                 f"interfaces = {json.dumps(interfaces)}",
                 f"router = {'true' if node is self.r else 'false'}"]
        lines += [f"{key} = {json.dumps(value)}" for key, value in keys.items()]
        text = "\n".join(lines) + "\n" + extra
        if "[discovery]" not in extra:
            text += "\n[discovery]\ninterval = 1.0\n"
        path = self.config_path(node)
        path.write_text(text)
        return path

    def start(self, node: Node, *extra: str) -> LabProcess:
        path = self.config_path(node)
        if not path.exists():
            self.write_config(node)
        proc = node.spawn([*ILNP, "node", str(path), "--socket", self.socket(node), *extra],
                          name=f"ilnp-{node.name}")
        self.daemons[node.name] = proc
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise LabError(f"ilnp node on {node.name} exited: {proc.stderr()[-2000:]}")
            if Path(self.socket(node)).exists():
                try:
                    self.status(node)
                    return proc
                except LabError:
                    pass
            time.sleep(0.05)
        raise LabError(f"ilnp node on {node.name} did not answer within {WAIT:g} s")

    def start_all(self) -> None:
        for node in (self.r, self.cn, self.mn):
            self.start(node)
        self.wait_discovered()

    def stop(self, node: Node) -> int:
        proc = self.daemons.pop(node.name)
        return proc.stop(10)

    def ctl(self, node: Node, *args: str, timeout: float = 10) -> str:
        return node.run([*ILNP, *args, "--socket", self.socket(node)], timeout=timeout).stdout

    def status(self, node: Node) -> dict[str, Any]:
        """The node's status document (over its control socket, a file of the workdir)."""
        doc: dict[str, Any] = self.call(node, "status")
        return doc

    def call(self, node: Node, method: str, **params: Any) -> Any:
        try:
            return request(Path(self.socket(node)), method, **params)
        except CtlError as exc:
            raise LabError(f"ilnp node on {node.name}: {exc}") from exc

    def wait_discovered(self, timeout: float = WAIT) -> None:
        """Until mn and cn know each other by discovery (through r)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            names = [{n["name"] for n in self.status(node)["neighbours"]}
                     for node in (self.mn, self.cn)]
            if "cn" in names[0] and "mn" in names[1]:
                return
            time.sleep(0.1)
        raise LabError("mn and cn did not discover each other")

    def move(self, node: Node | None = None, *, soft: float = 0.2) -> int:
        """Move mn to its other link: add the I-LV there and deprecate the old one, wait
        `soft` seconds, delete the old one (soft <= 0: hard handoff, the old one deleted
        first). Returns the new link."""
        node = node or self.mn
        old, new = self.at, 2 if self.at == 1 else 1
        nid = NIDS[node.name]
        if soft <= 0:
            node.ip("addr", "del", f"{ilv(old, nid)}/64", "dev", f"l{old}")
            node.ip("addr", "add", f"{ilv(new, nid)}/64", "dev", f"l{new}", "nodad")
        else:
            # attach, then deprecate the old address (as a router leaving does by RA): the
            # node tells its correspondents to move off it before it goes
            node.ip("addr", "add", f"{ilv(new, nid)}/64", "dev", f"l{new}", "nodad")
            node.ip("addr", "change", f"{ilv(old, nid)}/64", "dev", f"l{old}",
                    "preferred_lft", "0")
            time.sleep(soft)
            node.ip("addr", "del", f"{ilv(old, nid)}/64", "dev", f"l{old}")
        self.at = new
        return new

    def lu_counters(self, node: Node) -> dict[str, int]:
        counters: dict[str, Any] = self.status(node)["counters"]
        return {k: v for k, v in counters.items() if isinstance(v, int)}


def build_site(lab: Lab, workdir: Path, *, direct: bool = False) -> IlnpSite:
    """The seed's topology; `direct`: cn on L1 and L2 as well (no router on the way)."""
    workdir.mkdir(parents=True, exist_ok=True)
    sw = {i: lab.switch(f"sw{i}") for i in (1, 2, 3)}
    mn, cn, r = lab.host("mn"), lab.host("cn"), lab.host("r")
    lab.link(mn, sw[1], None, None, v6=(f"{ilv(1, NIDS['mn'])}/64", None), name_a="l1")
    lab.link(mn, sw[2], None, None, name_a="l2")
    for i in (1, 2, 3):
        lab.link(r, sw[i], None, None, v6=(f"{ilv(i, NIDS['r'])}/64", None), name_a=f"l{i}")
    if direct:
        for i in (1, 2):
            lab.link(cn, sw[i], None, None, v6=(f"{ilv(i, NIDS['cn'])}/64", None),
                     name_a=f"l{i}")
    else:
        lab.link(cn, sw[3], None, None, v6=(f"{ilv(3, NIDS['cn'])}/64", None), name_a="l3")
    return IlnpSite(lab, mn, cn, r, workdir, direct)
