"""resend: time to the first answer over a demand-dial link, with and without ip_resend.

Every measurement starts a fresh dial (the emulator hangs up in between), so each one pays the
dial delay once. Without ip_resend the first packets' replies are lost and the answer waits
for the client's retry (glibc: 5 s; TCP: ip_dynaddr rewrites the SYN at its first
retransmission, 1 s, or never connects without it). With it, the answer should arrive about
one dial delay after the query: target <= dial delay + 100 ms.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
from pathlib import Path

from bench.harness import Context, Row, benchmark
from ipshift.lab import Lab
from ipshift.lab.scenarios import DialupSite

DIAL_DELAY = 1.0
TCP_CLIENT = (
    "import socket, sys\n"
    "s = socket.create_connection((sys.argv[1], 7), timeout=12)\n"
    "s.sendall(b'x'); assert s.recv(1) == b'x'; print('ok')\n"
)


def _measure(
    site: DialupSite, argv: list[str], runs: int, *, resend: bool
) -> tuple[list[float], int]:
    """Durations of `runs` fresh-dial executions of argv, and how many got no answer (their
    duration is then the time until the client gave up)."""
    out, failed = [], 0
    for _ in range(runs):
        if resend and not site.wait_resend_state("armed", timeout=10):
            raise RuntimeError("ip_resend did not re-arm after the hang-up")
        seconds, answer = site.timed(site.home, argv, timeout=40)
        failed += not answer
        out.append(seconds)
        site.hang_up()
    return out, failed


def _p50(values: list[float]) -> float:
    return statistics.median(values)


@benchmark("resend", "first answer over a demand-dial link, ip_resend vs none", needs_root=True)
def run(ctx: Context) -> list[Row]:
    runs = 1 if ctx.quick else 3
    target = DIAL_DELAY + 0.1
    cases = [
        ("one lookup (glibc getent hosts)", ["getent", "hosts", DialupSite.NAME], {}),
        ("parallel A+AAAA (glibc getent ahosts)", ["getent", "ahosts", DialupSite.NAME], {}),
        ("TCP connect, ip_dynaddr=0", [sys.executable, "-c", TCP_CLIENT, DialupSite.DNS4],
         {"net.ipv4.ip_dynaddr": 0}),
        ("TCP connect, ip_dynaddr=1", [sys.executable, "-c", TCP_CLIENT, DialupSite.DNS4],
         {"net.ipv4.ip_dynaddr": 1}),
    ]
    rows = []
    with tempfile.TemporaryDirectory() as tmp, Lab("bench-resend") as lab:
        site = DialupSite(lab, Path(tmp) / "run", delay=DIAL_DELAY)
        results: dict[str, tuple[list[float], int, list[float], int]] = {}
        for name, argv, sysctls in cases:
            for key, value in sysctls.items():
                site.home.sysctl(key, value)
            without, without_failed = _measure(site, argv, runs, resend=False)
            daemon = site.start_resend("--persistent")
            try:
                with_resend, with_failed = _measure(site, argv, runs, resend=True)
            finally:
                daemon.stop()
            results[name] = (with_resend, with_failed, without, without_failed)
        for name, (with_resend, with_failed, without, without_failed) in results.items():
            p50 = _p50(with_resend)
            gave_up = f", {without_failed}/{runs} never answered" if without_failed else ""
            rows.append(Row(
                metric=name, unit="s", ipshift=p50,
                baselines={"no ip_resend": _p50(without)},
                target=f"p50 <= {target:.2f} s (dial {DIAL_DELAY:g} s + 0.1)",
                target_met=p50 <= target and not with_failed,
                notes=f"runs={runs} with={[round(v, 3) for v in with_resend]} "
                      f"without={[round(v, 3) for v in without]}{gave_up}",
            ))
    return rows
