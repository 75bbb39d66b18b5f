"""The final summary a person reads when the run ends: root cause first."""

from __future__ import annotations

import datetime as dt
import signal
from collections.abc import Callable
from pathlib import Path

from elastic_runner.spec import RunResult, WorkerExit, WorkerSpec

__all__ = ["format_report", "stderr_tail"]

TAIL_LINES = 10


def stderr_tail(path: Path, lines: int = TAIL_LINES) -> list[str]:
    """The last ``lines`` lines of a log file (reads at most 64 KiB from its end)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            size = f.tell()
            f.seek(max(0, size - 65536))
            data = f.read()
    except OSError:
        return []
    return data.decode(errors="replace").splitlines()[-lines:]


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _when(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts).strftime("%H:%M:%S.%f")[:-3]


def format_report(
    result: RunResult,
    spec: WorkerSpec,
    run_dir: Path,
    stderr_of: Callable[[WorkerExit], Path],
) -> str:
    """One block of text; ``stderr_of`` maps an exit to its stderr log of the last attempt."""
    attempts = _count(result.attempts, "attempt")
    if result.signal is not None and not result.failures:
        return (
            f"elastic-run: stopped by {signal.Signals(result.signal).name} after {attempts}; "
            f"workers stopped. Run directory: {run_dir}"
        )
    if not result.is_failed:
        return (
            f"elastic-run: {_count(spec.local_world_size, 'worker')} succeeded ({attempts}, "
            f"{_count(result.restart_count, 'restart')}). Run directory: {run_dir}"
        )
    failures = sorted(result.failures.values(), key=lambda e: e.timestamp)
    stopped = sorted(e.global_rank for e in result.exits if e.stopped_by_agent)
    out = [
        f"elastic-run: job failed: {len(failures)} of {spec.local_world_size} workers failed "
        f"in the last of {attempts} (max_restarts={spec.max_restarts}).",
    ]
    for i, e in enumerate(failures):
        label = "root cause" if i == 0 else "also failed"
        out.append(
            f"  {label}: rank {e.global_rank} (local_rank {e.local_rank}, pid {e.pid}): "
            f"{e.describe()} at {_when(e.timestamp)}"
        )
        if i == 0:
            path = stderr_of(e)
            tail = stderr_tail(path)
            out.append(f"    stderr: {path}")
            out.extend(f"    | {line}" for line in tail)
    if stopped:
        out.append(f"  stopped by the agent: ranks {', '.join(map(str, stopped))}")
    out.append(f"  run directory: {run_dir}")
    return "\n".join(out)
