"""The final summary a person reads when the run ends: the root cause first, with its
error and traceback, then the other failures, then the ranks the agent stopped."""

from __future__ import annotations

import datetime as dt
import signal
from collections.abc import Callable
from pathlib import Path

from elastic_runner.error_file import write_error
from elastic_runner.failures import stderr_traceback
from elastic_runner.spec import Failure, RunResult, WorkerExit, WorkerSpec
from elastic_runner.workers.resources import format_bytes

__all__ = ["format_report", "rank_table", "stderr_tail", "write_nested_error_file"]

TAIL_LINES = 10
TRACEBACK_LINES = 30


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


def _quoted(lines: list[str]) -> list[str]:
    return [f"    | {line}" for line in lines]


def _root_cause_details(failure: Failure, stderr: Path) -> list[str]:
    out = []
    if failure.message:
        out.append(f"    error: {failure.message}")
    tail = stderr_tail(stderr)
    if failure.traceback:
        tb = failure.traceback.rstrip().splitlines()
        out.append(f"    traceback (from its {failure.traceback_source}):")
        out += _quoted(tb[-TRACEBACK_LINES:])
        if failure.traceback_source == "stderr":
            tail = _after_traceback(failure.traceback, stderr, tail)
    out.append(f"    stderr: {stderr}")
    if tail:
        out.append("    last lines of stderr:")
        out += _quoted(tail)
    return out


def _after_traceback(traceback: str, stderr: Path, tail: list[str]) -> list[str]:
    """The tail of a stderr whose traceback is quoted already: only the lines after it
    (a warning at exit), none when it ends the log. The lines before it are no tail of
    it. ``tail`` when the quoted one is not the log's last traceback (a later one, which
    the agent's stop caused, is shown as it is)."""
    found = stderr_traceback(stderr)
    if found is None or found.text != traceback:
        return tail
    after = found.after[-TAIL_LINES:]
    return after if any(line.strip() for line in after) else []


def format_report(
    result: RunResult,
    spec: WorkerSpec,
    run_dir: Path,
    stderr_of: Callable[[WorkerExit], Path],
) -> str:
    """One block of text; ``stderr_of`` maps an exit to its stderr log of the last attempt."""
    attempts = _count(result.attempts, "attempt")
    peaks = "\n".join(
        filter(
            None,
            [
                *(f"  injected: {line}" for line in result.injected),
                *(f"  {line}" for line in result.excluded),
                rank_table(result),
            ],
        )
    )
    if result.signal is not None and not result.failures:
        why = result.ended_because or f"stopped by {signal.Signals(result.signal).name}"
        code = f" (exit {result.exit_code})" if result.preempted else ""
        text = (
            f"elastic-run: {why} after {attempts}; workers stopped{code}. Run directory: {run_dir}"
        )
        return "\n".join(filter(None, [text, peaks]))
    if not result.is_failed() and result.ended_because:  # a standby never needed
        text = f"elastic-run: {result.ended_because}. Run directory: {run_dir}"
        return "\n".join(filter(None, [text, peaks]))
    if not result.is_failed():
        text = (
            f"elastic-run: {_count(spec.local_world_size, 'worker')} succeeded ({attempts}, "
            f"{_count(result.restart_count, 'restart')}). Run directory: {run_dir}"
        )
        return "\n".join(filter(None, [text, peaks]))
    failed = {f.exit.global_rank for f in result.failures}
    stopped = sorted(
        e.global_rank for e in result.exits if e.stopped_by_agent and e.global_rank not in failed
    )
    out = [
        f"elastic-run: job failed: {len(result.failures)} of {spec.local_world_size} workers "
        f"failed in the last of {attempts}: {result.ended_because}.",
    ]
    for i, failure in enumerate(result.failures):
        e = failure.exit
        label = "root cause" if i == 0 else "also failed"
        out.append(
            f"  {label}: rank {e.global_rank} (local_rank {e.local_rank}, pid {e.pid}): "
            f"{failure.describe()} at {_when(failure.timestamp)}"
        )
        if i == 0:
            out += _root_cause_details(failure, stderr_of(e))
        elif failure.message:
            out.append(f"    error: {failure.message}")
    if stopped:
        out.append(f"  stopped by the agent: ranks {', '.join(map(str, stopped))}")
    if peaks:
        out.append(peaks)
    out.append(f"  run directory: {run_dir}")
    return "\n".join(out)


def rank_table(result: RunResult) -> str:
    """One line per rank of the last attempt: how it ended, how long it ran, its peak RSS
    and the group's restarts."""
    if not result.exits:
        return ""
    rows = [("rank", "result", "ran", "peak RSS", "restarts")]
    for e in sorted(result.exits, key=lambda e: e.global_rank):
        if e.stopped_by_agent and not any(
            f.exit.global_rank == e.global_rank for f in result.failures
        ):
            outcome = f"stopped ({e.signal_name or f'exit {e.returncode}'})"
        else:
            outcome = "ok" if e.succeeded else e.describe()
        ran = f"{e.timestamp - result.started_at:.1f} s" if result.started_at else "-"
        rss = result.peak_rss.get(e.global_rank)
        rows.append(
            (
                str(e.global_rank),
                outcome,
                ran,
                format_bytes(rss) if rss else "-",
                str(result.restart_count),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    return "\n".join(
        "  "
        + "  ".join(
            cell.rjust(w) if i in (0, 2, 3, 4) else cell.ljust(w)
            for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        ).rstrip()
        for row in rows
    )


def write_nested_error_file(result: RunResult, path: str) -> None:
    """When elastic-run itself runs under an agent (its own TORCHELASTIC_ERROR_FILE is
    set), pass the root cause up in torch's format, with ``errorCode`` = its exit code."""
    root = result.root_cause
    if root is None:
        return
    write_error(
        path,
        root.message or root.summary(),
        root.traceback or "",
        root.timestamp,
        error_code=root.exit.returncode,
    )
