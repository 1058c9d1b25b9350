"""`ipshift demo` interrupted in the middle of a scenario (Ctrl-C, SIGTERM) removes everything
it created and exits 128 + the signal number."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from ipshift.lab import clean
from ipshift.net import netns

pytestmark = pytest.mark.netns


def leftovers() -> dict[str, set[str]]:
    """What a demo could leave behind in the root namespace and on the file system."""
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True,
                           check=True).stdout
    tables = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True,
                            check=True).stdout
    etc = Path("/etc/netns")
    return {
        "namespaces": set(netns.list_names()),
        "links": {line.split(":")[1].strip().split("@")[0] for line in links.splitlines()},
        "nft tables": set(tables.splitlines()),
        "/etc/netns": {p.name for p in etc.iterdir()} if etc.is_dir() else set(),
    }


def read_until(proc: subprocess.Popen[str], marker: str, timeout: float) -> str:
    """The demo's output up to the line with `marker` ('' if it never came). Lines are read
    on a thread, so a quiet demo cannot hold the test beyond `timeout`."""
    assert proc.stdout is not None
    stream = proc.stdout
    seen: list[str] = []
    found = threading.Event()

    def reader() -> None:
        for line in iter(stream.readline, ""):
            seen.append(line)
            if marker in line:
                found.set()
                return

    threading.Thread(target=reader, daemon=True).start()
    return "".join(seen) if found.wait(timeout) else ""


@pytest.mark.parametrize(
    ("scenario", "marker", "sig"),
    [
        ("tunnel", "iperf3 TCP h1 -> h2", signal.SIGINT),  # while iperf3 runs
        ("routes", "gateway goes silent", signal.SIGTERM),  # while the daemon fails over
    ],
)
def test_an_interrupted_demo_leaves_nothing(scenario: str, marker: str, sig: int) -> None:
    before = leftovers()
    proc = subprocess.Popen(
        [sys.executable, "-m", "ipshift", "demo", scenario, "--seconds", "5"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True,
        # Ctrl-C reaches a foreground program with SIGINT at its default disposition.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        shown = read_until(proc, marker, timeout=60)
        assert shown, f"the demo never got to {marker!r}"
        time.sleep(0.5)
        proc.send_signal(sig)
        rest, _ = proc.communicate(timeout=60)
        assert proc.returncode == 128 + sig, shown + rest
        assert f"interrupted ({signal.Signals(sig).name})" in rest
        after = leftovers()
        assert after == before, {k: after[k] ^ before[k] for k in after if after[k] != before[k]}
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(10)
        for name in set(netns.list_names()) - before["namespaces"]:
            clean(only="-".join(name.split("-")[:2]) + "-")
