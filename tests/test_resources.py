"""ResourceMonitor on real process trees."""

from __future__ import annotations

import subprocess
import sys
import time

from elastic_runner.workers.resources import ResourceMonitor, format_bytes


def test_tree_rss_and_cpu_are_measured() -> None:
    hog = "x = b'1' * (64 << 20); import time\nwhile True: pass"
    procs = [
        subprocess.Popen(["sh", "-c", "sleep 30 & sleep 30 & wait"]),
        subprocess.Popen([sys.executable, "-c", hog]),
    ]
    try:
        clock = [0.0]
        monitor = ResourceMonitor(1.0, clock=lambda: clock[0])
        assert not monitor.due()
        deadline = time.monotonic() + 10
        usage = monitor.sample({0: procs[0].pid, 1: procs[1].pid})
        while usage[0].processes < 3 and time.monotonic() < deadline:
            usage = monitor.sample({0: procs[0].pid, 1: procs[1].pid})
        assert usage[0].processes == 3  # the shell and both of its sleeps
        while usage[1].rss < 64 << 20 and time.monotonic() < deadline:
            usage = monitor.sample({0: procs[0].pid, 1: procs[1].pid})
        assert usage[1].rss >= 64 << 20
        clock[0] = 1.0  # one "second" later: the busy loop used about a core
        time.sleep(0.3)
        assert monitor.due()
        usage = monitor.sample({1: procs[1].pid})
        assert usage[1].cpu_percent > 5
    finally:
        for p in procs:
            p.kill()
            p.wait()


def test_format_bytes() -> None:
    assert format_bytes(512) == "512 B"
    assert format_bytes(3 * 2**30) == "3.0 GiB"
    assert format_bytes(1536) == "1.5 KiB"
