"""Prometheus metrics for every daemon (`--metrics ADDRESS:PORT`).

A daemon describes its counters and gauges as `Metric` values; the runtime adds its own
(uptime, control-channel counters) and serves them with prometheus-client. A scrape runs on the
HTTP server's thread, so the values are taken on the event loop (`snapshot` is a callable the
runtime makes thread-safe): the loop may be adding keys to the dicts they come from.
The same values are the answer of the control method `metrics`.
"""

from __future__ import annotations

import errno
import ipaddress
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Metric:
    name: str  # full name, e.g. ipshift_routes_probes_sent_total ("_total" for counters)
    value: float
    help: str = ""
    kind: str = "gauge"  # or "counter"
    labels: tuple[tuple[str, str], ...] = field(default_factory=tuple)

    def as_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"name": self.name, "value": self.value, "kind": self.kind}
        if self.labels:
            doc["labels"] = dict(self.labels)
        return doc


def counter(name: str, value: float, help: str = "", **labels: str) -> Metric:
    return Metric(name if name.endswith("_total") else name + "_total", float(value), help,
                  "counter", tuple(sorted(labels.items())))


def gauge(name: str, value: float, help: str = "", **labels: str) -> Metric:
    return Metric(name, float(value), help, "gauge", tuple(sorted(labels.items())))


def address_problem(value: str) -> str | None:
    """Why a metrics address (`ADDRESS:PORT`, `[V6]:PORT`) is unusable, or None."""
    host, _, port = value.rpartition(":")
    ok = port.isascii() and port.isdigit() and 0 < int(port) < 65536
    bare = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not bare or not ok:
        return f"metrics {value!r} must be ADDRESS:PORT, e.g. 127.0.0.1:9465"
    try:
        ipaddress.ip_address(bare)
    except ValueError:
        if bare != "localhost":
            return f"metrics address {bare!r} is not an IP address"
    return None


class MetricsError(Exception):
    """The metrics server cannot listen; str() is one line."""


def serve(address: str, snapshot: Callable[[], Iterable[Metric]]) -> Any:
    """Start the HTTP exporter on a thread; returns the server (call .shutdown())."""
    from prometheus_client import start_http_server

    problem = address_problem(address)
    if problem:
        raise MetricsError(problem)
    host, _, port = address.rpartition(":")
    try:
        server, _thread = start_http_server(int(port), addr=host.strip("[]"),
                                            registry=registry(snapshot))
    except OSError as exc:
        reason = "address in use" if exc.errno == errno.EADDRINUSE else (exc.strerror or
                                                                        str(exc))
        raise MetricsError(f"metrics: cannot listen on {address}: {reason}") from exc
    return server


def registry(snapshot: Callable[[], Iterable[Metric]]) -> Any:
    """A prometheus-client registry that collects `snapshot()` at each scrape."""
    from prometheus_client.registry import CollectorRegistry

    reg = CollectorRegistry(auto_describe=False)
    reg.register(_Collector(snapshot))
    return reg


class _Collector:
    def __init__(self, snapshot: Callable[[], Iterable[Metric]]) -> None:
        self.snapshot = snapshot

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        families: dict[str, Any] = {}
        for m in self.snapshot():
            base = m.name[:-len("_total")] if m.kind == "counter" else m.name
            family = families.get(base)
            if family is None:
                cls = CounterMetricFamily if m.kind == "counter" else GaugeMetricFamily
                family = cls(base, m.help or base, labels=[k for k, _ in m.labels])
                families[base] = family
            family.add_metric([v for _, v in m.labels], m.value)
        yield from families.values()

    def describe(self) -> list[Any]:
        return []
