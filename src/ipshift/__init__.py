"""ipshift: user-space tools for hosts and routers whose IP addresses do not stay put."""

__version__ = "0.1.0"
