"""Diagnosing a failed worker: its error file, the traceback in its stderr, and what
killed it (an exit code, a signal, probably the OOM killer, a limit the agent enforced).
"""

from __future__ import annotations

import re
import signal
from pathlib import Path

from elastic_runner.error_file import read_error_file
from elastic_runner.spec import Failure, FailureKind, WorkerExit
from elastic_runner.workers.resources import format_bytes

__all__ = ["diagnose", "last_traceback", "oom_kill_count"]

_TRACEBACK_START = "Traceback (most recent call last):"


def last_traceback(stderr: Path, limit: int = 262144) -> str | None:
    """The last Python traceback in a stderr log (read from its last ``limit`` bytes)."""
    try:
        with open(stderr, "rb") as f:
            f.seek(0, 2)
            f.seek(max(0, f.tell() - limit))
            text = f.read().decode(errors="replace")
    except OSError:
        return None
    start = text.rfind(_TRACEBACK_START)
    if start < 0:
        return None
    lines = text[start:].splitlines()
    out = [lines[0]]
    for line in lines[1:]:
        out.append(line)
        # the exception line: the first unindented line after the frames
        if line and not line[0].isspace():
            break
    return "\n".join(out)


def oom_kill_count() -> int | None:
    """The kernel's count of OOM kills so far (``/proc/vmstat``), if it keeps one."""
    try:
        m = re.search(r"^oom_kill (\d+)$", Path("/proc/vmstat").read_text(), re.M)
    except OSError:
        return None
    return int(m.group(1)) if m else None


def diagnose(
    exit_: WorkerExit,
    *,
    error_file: Path,
    stderr: Path,
    kill_reason: tuple[FailureKind, str] | None = None,
    oom_kills_before: int | None = None,
) -> Failure:
    """A failed worker's :class:`Failure`. ``kill_reason`` is set when the agent killed it
    on purpose (a memory limit, a timer); ``oom_kills_before`` is :func:`oom_kill_count`
    when its attempt started."""
    message = traceback = source = None
    timestamp = exit_.timestamp
    recorded = read_error_file(error_file)
    if recorded:
        message, traceback, when = recorded
        source = "error file" if traceback else None
        # torch writes whole seconds; only a finer time may move the failure earlier
        if when is not None and when < timestamp and when != int(when):
            timestamp = when
    if traceback is None and (traceback := last_traceback(stderr)):
        source = "stderr"

    killed = exit_.returncode == -signal.SIGKILL or exit_.returncode == 128 + signal.SIGKILL
    detail = ""
    if kill_reason:
        kind, detail = kill_reason
    elif killed and _oom_killed_since(oom_kills_before):
        kind = FailureKind.OOM_KILL
        detail = "the kernel's OOM-kill count rose during this attempt (see dmesg)"
        detail += _peak(exit_)
    elif exit_.returncode < 0:
        kind = FailureKind.SIGNAL
        if killed:
            detail = "not sent by elastic-run; if nobody else did, suspect the OOM killer"
            detail += _peak(exit_)
    else:
        kind = FailureKind.EXIT_CODE
    return Failure(exit_, kind, timestamp, message, traceback, source, detail)


def _peak(exit_: WorkerExit) -> str:
    return f"; its peak RSS was {format_bytes(exit_.max_rss)}" if exit_.max_rss else ""


def _oom_killed_since(before: int | None) -> bool:
    now = oom_kill_count()
    return before is not None and now is not None and now > before
