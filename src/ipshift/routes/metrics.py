"""Prometheus metrics of the routes daemon, read from its state at scrape time.

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

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector, CollectorRegistry

if TYPE_CHECKING:
    from ipshift.routes.daemon import RoutesDaemon


class RoutesCollector(Collector):
    def __init__(self, daemon: RoutesDaemon):
        self.daemon = daemon

    def collect(self) -> Iterator[Any]:
        d = self.daemon
        # the scrape runs on the metrics thread: status and counters are taken on the event
        # loop, which adds keys to the stats dicts at any time
        doc, s = d.metrics_snapshot()
        up = GaugeMetricFamily("ipshift_routes_uplink_up", "uplink considered alive",
                               labels=["uplink"])
        rtt = GaugeMetricFamily("ipshift_routes_uplink_rtt_seconds", "mean echo RTT",
                                labels=["uplink"])
        loss = GaugeMetricFamily("ipshift_routes_uplink_loss_ratio", "probe loss over the window",
                                 labels=["uplink"])
        for row in doc.get("uplinks", []):
            name = str(row["uplink"])
            up.add_metric([name], 0.0 if row["state"] == "down" else 1.0)
            if row["rtt_ms"] is not None:
                rtt.add_metric([name], float(row["rtt_ms"]) / 1000.0)
            if row["loss_pct"] is not None:
                loss.add_metric([name], float(row["loss_pct"]) / 100.0)
        yield up
        yield rtt
        yield loss
        trans = CounterMetricFamily("ipshift_routes_uplink_transitions",
                                    "uplink state changes", labels=["uplink", "state"])
        for (name, state), n in sorted(s.transitions.items()):
            trans.add_metric([name, state], n)
        yield trans
        probes = CounterMetricFamily("ipshift_routes_probes_sent", "probes sent",
                                     labels=["uplink", "kind"])
        for (name, kind), n in sorted(s.probes_sent.items()):
            probes.add_metric([name, kind], n)
        yield probes
        ct = CounterMetricFamily("ipshift_routes_conntrack_deleted",
                                 "conntrack entries deleted on failover", labels=["uplink"])
        for name, n in sorted(s.conntrack_deleted.items()):
            ct.add_metric([name], n)
        yield ct
        ops = CounterMetricFamily("ipshift_routes_kernel_operations",
                                  "routes and rules changed", labels=["kind"])
        ops.add_metric(["route"], s.routes_applied)
        ops.add_metric(["rule"], s.rules_applied)
        yield ops
        errs = CounterMetricFamily("ipshift_routes_kernel_errors", "failed kernel operations")
        errs.add_metric([], s.kernel_errors)
        yield errs
        apply_max = GaugeMetricFamily("ipshift_routes_apply_seconds_max",
                                      "worst time from a verdict to the kernel change")
        apply_max.add_metric([], s.max_apply_ms / 1000.0)
        yield apply_max


def registry_for(daemon: RoutesDaemon) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(RoutesCollector(daemon))
    return registry


def start_metrics(daemon: RoutesDaemon, host: str, port: int) -> Any:
    from prometheus_client import start_http_server

    server, _thread = start_http_server(port, addr=host or "127.0.0.1",
                                        registry=registry_for(daemon))
    return server
