"""Network-namespace topologies for tests, demos and benchmarks (never used by a daemon)."""

from ipshift.lab.topology import (
    Interrupted,
    Lab,
    LabError,
    LabProcess,
    Link,
    LinkEnd,
    Node,
    clean,
)

__all__ = ["Interrupted", "Lab", "LabError", "LabProcess", "Link", "LinkEnd", "Node", "clean"]
