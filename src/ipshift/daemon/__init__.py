"""The daemon runtime (docs/architecture.md, "The daemon runtime"): single instance, signals,
control socket with status/stop/metrics, Prometheus, systemd readiness, the owned-state record
and its reconcile, and the engine pump. Every ipshift daemon runs on it."""

from ipshift.daemon.instance import Instance, InstanceError, InstanceLock
from ipshift.daemon.metrics import Metric, counter, gauge
from ipshift.daemon.owned import (
    LO_ADDRESS,
    NFT_TABLE,
    QUEUE_RULE,
    ROUTE_PROTOCOL,
    SYSCTL,
    TUN_DEVICE,
    OwnedRecord,
)
from ipshift.daemon.pump import EnginePump
from ipshift.daemon.runtime import (
    DaemonOptions,
    Runtime,
    Service,
    StartError,
    close_watched,
    default_socket,
    run_service,
)

__all__ = [
    "LO_ADDRESS",
    "NFT_TABLE",
    "QUEUE_RULE",
    "ROUTE_PROTOCOL",
    "SYSCTL",
    "TUN_DEVICE",
    "DaemonOptions",
    "EnginePump",
    "Instance",
    "InstanceError",
    "InstanceLock",
    "Metric",
    "OwnedRecord",
    "Runtime",
    "Service",
    "StartError",
    "close_watched",
    "counter",
    "default_socket",
    "gauge",
    "run_service",
]
