"""Process helpers the benchmarks share (not a test; imported by the bench scripts)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess

__all__ = ["sweep", "torch_version"]


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


def torch_version(python: str) -> str | None:
    """torch's version as ``python`` imports it, or ``None`` when it does not."""
    try:
        proc = subprocess.run(
            [python, "-c", "import torch; print(torch.__version__)"],
            capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL,
        )  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return None
    return proc.stdout.strip() if proc.returncode == 0 else None
