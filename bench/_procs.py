"""Process helpers the benchmarks share (not a test; imported by the bench scripts)."""

from __future__ import annotations

import contextlib
import os
import signal

__all__ = ["sweep"]


def sweep(marker: str) -> int:
    """SIGKILL every process whose command line mentions ``marker`` (a run's temp dir);
    returns how many were found. Linux-only, like elastic-run itself."""
    found = 0
    me = os.getpid()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            with open(f"/proc/{entry.name}/cmdline", "rb") as f:
                cmdline = f.read()
        except OSError:
            continue
        if marker.encode() in cmdline:
            found += 1
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(int(entry.name), signal.SIGKILL)
    return found
