"""The one list of what ipshift is made of. The `ipshift` command, `ipshift demo` and
`ipshift bench` read it; adding a component means one entry here plus its own package
(docs/architecture.md, "Adding a component").

Modules are named, not imported: `ipshift --help` imports each cli module, but a component's
daemon, demo and benchmark modules are imported only when used.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Component:
    name: str
    summary: str
    cli: str  # module with register(subparsers)
    demo: str | None = None  # module with run_demo(args) -> int
    demo_summary: str = ""
    bench: str | None = None  # module under bench/ registering @benchmark functions


#: In the order `ipshift demo` runs their scenarios.
COMPONENTS: tuple[Component, ...] = (
    Component("tunnel", "the user-space TUN <-> UDP datapath", "ipshift.tunnel.cli",
              "ipshift.tunnel.demo", "the fast TUN <-> UDP tunnel across a forwarded hop",
              "bench.bench_tunnel"),
    Component("routes", "alternative routes and dead gateway detection", "ipshift.routes.cli",
              "ipshift.routes.demo", "a NAT router with two ISPs: a gateway dies, flows move",
              "bench.bench_routes"),
    Component("resend", "demand-dial first-packet accelerator (ip_resend)",
              "ipshift.resend.cli", "ipshift.resend.demo",
              "a lookup that dials a demand link, without and with ip_resend",
              "bench.bench_resend"),
    Component("sacip", "sessions that survive address changes at either end",
              "ipshift.sacip.cli", "ipshift.sacip.demo",
              "an ssh session kept across two moves of its client", "bench.bench_sacip"),
    Component("rsip", "Realm Specific IP gateway and client, with PCP and NAT-PMP",
              "ipshift.rsip.cli", "ipshift.rsip.demo",
              "two private hosts lease ports of one public address; a server behind it",
              "bench.bench_rsip"),
    Component("ilnp", "Identifier-Locator Network Protocol: mobility, multihoming, UDP proxy",
              "ipshift.ilnp.cli", "ipshift.ilnp.demo",
              "a mobile node moves ten times while pinging across a router: nothing lost",
              "bench.bench_ilnp"),
)

#: Commands that are not components, before and after the components in `ipshift --help`.
LEADING_COMMANDS: tuple[str, ...] = ("ipshift.demo",)
TRAILING_COMMANDS: tuple[str, ...] = ("ipshift.daemon.cli", "ipshift.lab.cli", "ipshift.ctl.cli",
                                       "ipshift.benchcli")

#: Benchmarks of the layers below the components.
LAYER_BENCHMARKS: tuple[str, ...] = ("bench.bench_packet", "bench.bench_remap",
                                      "bench.bench_peers", "bench.bench_tunnel_peers")


def command_modules() -> tuple[str, ...]:
    return LEADING_COMMANDS + tuple(c.cli for c in COMPONENTS) + TRAILING_COMMANDS


def demo_scenarios() -> dict[str, tuple[str, str]]:
    """name -> (module, summary) for every component with a demo."""
    return {c.name: (c.demo, c.demo_summary) for c in COMPONENTS if c.demo}


def bench_modules() -> tuple[str, ...]:
    return LAYER_BENCHMARKS + tuple(c.bench for c in COMPONENTS if c.bench)
