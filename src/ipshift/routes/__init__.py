"""Alternative routes and dead gateway detection for multi-uplink hosts and routers (seed 004).

    config.py   configuration (TOML and the seed's iproute2 syntax), `check`
    iproute.py  the iproute2 command-line parser
    detect.py   dead gateway detection engine (sans-I/O)
    plan.py     decision engine: desired routes/rules, conntrack deletion, hooks (sans-I/O)
    engine.py   both engines wired together (sans-I/O)
    kernel.py   netlink/nftables/conntrack adapter
    daemon.py   the asyncio daemon (`ipshift routes run`)
    cli.py      `ipshift routes run|check|status|stop`
"""
