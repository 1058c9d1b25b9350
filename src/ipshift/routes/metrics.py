"""Prometheus metrics of the routes daemon, read from its state at scrape time (the runtime
takes them on the event loop and serves them with `--metrics`; `ipshift ctl NAME metrics`
shows the same values):

    ipshift_routes_uplink_up{uplink}                      1 up, 0 down (unknown counts as up)
    ipshift_routes_uplink_rtt_seconds{uplink}             mean echo RTT over the window
    ipshift_routes_uplink_loss_ratio{uplink}              probe loss over the window
    ipshift_routes_uplink_transitions_total{uplink,state}
    ipshift_routes_probes_sent_total{uplink,kind}         icmp, arp, nd
    ipshift_routes_conntrack_deleted_total{uplink}
    ipshift_routes_kernel_operations_total{kind}          route, rule
    ipshift_routes_kernel_errors_total
    ipshift_routes_apply_seconds_max                      verdict to kernel, worst so far
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ipshift.daemon import Metric, counter, gauge

if TYPE_CHECKING:
    from ipshift.routes.daemon import Stats


def routes_metrics(doc: dict[str, Any], s: Stats) -> list[Metric]:
    """The metrics of a status document and the daemon's counters."""
    out: list[Metric] = []
    for row in doc.get("uplinks", []):
        name = str(row["uplink"])
        out.append(gauge("ipshift_routes_uplink_up", 0.0 if row["state"] == "down" else 1.0,
                         "uplink considered alive", uplink=name))
        if row["rtt_ms"] is not None:
            out.append(gauge("ipshift_routes_uplink_rtt_seconds",
                             float(row["rtt_ms"]) / 1000.0, "mean echo RTT", uplink=name))
        if row["loss_pct"] is not None:
            out.append(gauge("ipshift_routes_uplink_loss_ratio",
                             float(row["loss_pct"]) / 100.0, "probe loss over the window",
                             uplink=name))
    for (name, state), n in sorted(s.transitions.items()):
        out.append(counter("ipshift_routes_uplink_transitions", n, "uplink state changes",
                           uplink=name, state=state))
    for (name, kind), n in sorted(s.probes_sent.items()):
        out.append(counter("ipshift_routes_probes_sent", n, "probes sent", uplink=name,
                           kind=kind))
    for name, n in sorted(s.conntrack_deleted.items()):
        out.append(counter("ipshift_routes_conntrack_deleted", n,
                           "conntrack entries deleted on failover", uplink=name))
    out.append(counter("ipshift_routes_kernel_operations", s.routes_applied,
                       "routes and rules changed", kind="route"))
    out.append(counter("ipshift_routes_kernel_operations", s.rules_applied,
                       "routes and rules changed", kind="rule"))
    out.append(counter("ipshift_routes_kernel_errors", s.kernel_errors,
                       "failed kernel operations"))
    out.append(gauge("ipshift_routes_apply_seconds_max", s.max_apply_ms / 1000.0,
                     "worst time from a verdict to the kernel change"))
    return out
