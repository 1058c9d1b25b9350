"""Thin I/O adapters: the one place that talks to the kernel (TUN, sockets, netlink, nftables)."""
