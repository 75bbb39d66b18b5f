"""Diagnosing a failed worker: its error file, the traceback in its stderr, and what
killed it (an exit code, a signal, probably the OOM killer, a limit the agent enforced).
"""

from __future__ import annotations

import re
import signal
from dataclasses import dataclass
from pathlib import Path

from elastic_runner.error_file import read_error_file
from elastic_runner.spec import Failure, FailureKind, WorkerExit
from elastic_runner.workers.resources import format_bytes

__all__ = [
    "StderrTraceback",
    "diagnose",
    "exception_line",
    "find_traceback",
    "last_traceback",
    "oom_kill_count",
    "stderr_traceback",
    "strip_rank_prefix",
]

_TRACEBACK_START = "Traceback (most recent call last):"
#: What torch 2.x writes before every line of an uncaught exception once
#: ``init_process_group`` ran: its excepthook prints ``[rank<global rank>]: `` + line (empty
#: lines stay empty). A second ``init_process_group`` wraps the hook again, nesting the
#: prefix. Nothing else is matched: ``[rank0]:[W...]`` (c10's log prefix, no space) and
#: other bracketed text are the worker's own output.
_RANK_PREFIX = re.compile(r"(?:\[rank[0-9]+\]: )+")
#: How much of a stderr log is searched for its last traceback (from its end).
_SEARCH_LIMIT = 262144


def strip_rank_prefix(line: str) -> str:
    """``line`` without torch's leading ``[rankN]: `` (all of them, when nested)."""
    m = _RANK_PREFIX.match(line)
    return line[m.end() :] if m else line


@dataclass(frozen=True)
class StderrTraceback:
    """The last Python traceback in some output."""

    #: From ``Traceback (most recent call last):`` through its exception line, torch's
    #: rank prefixes removed.
    text: str
    #: The exception line (``ValueError: boom``; its first line if the message has more);
    #: ``None`` when the output ends before it (cut short).
    exception: str | None
    #: The lines after the exception line, as written.
    after: list[str]


def find_traceback(text: str) -> StderrTraceback | None:
    """The last traceback in ``text``, which may be prefixed the way torch does."""
    lines = text.splitlines()
    clean = [strip_rank_prefix(line) for line in lines]
    start = next((i for i in range(len(clean) - 1, -1, -1) if _TRACEBACK_START in clean[i]), None)
    if start is None:
        return None
    # mid-line when the worker left a line unfinished (a progress bar) before it crashed
    out = [clean[start][clean[start].index(_TRACEBACK_START) :]]
    for i in range(start + 1, len(lines)):
        out.append(clean[i])
        # the exception line: the first unindented line after the frames
        if clean[i] and not clean[i][0].isspace():
            return StderrTraceback("\n".join(out), clean[i].rstrip(), lines[i + 1 :])
    return StderrTraceback("\n".join(out), None, [])


def exception_line(failure: Failure) -> str | None:
    """``ValueError: boom``: the exception line of a failure's traceback, else its error
    message. The traceback's line is preferred because it is what stderr shows (with the
    module of a non-builtin exception, which torch's error-file message leaves out)."""
    found = find_traceback(failure.traceback) if failure.traceback else None
    if found is not None and found.exception is not None:
        return found.exception
    return failure.message


def stderr_traceback(
    stderr: Path, end: int | None = None, limit: int = _SEARCH_LIMIT
) -> StderrTraceback | None:
    """The last traceback in a stderr log, searched in the ``limit`` bytes before ``end``
    (default: the end of the file)."""
    try:
        with open(stderr, "rb") as f:
            if end is None:
                end = f.seek(0, 2)
            start = max(0, end - limit)
            f.seek(start)
            text = f.read(end - start).decode(errors="replace")
    except OSError:
        return None
    return find_traceback(text)


def last_traceback(stderr: Path, limit: int = _SEARCH_LIMIT) -> str | None:
    """The last Python traceback in a stderr log (read from its last ``limit`` bytes)."""
    found = stderr_traceback(stderr, limit=limit)
    return found.text if found else None


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
    error_file: Path | None,
    stderr: Path,
    kill_reason: tuple[FailureKind, str] | None = None,
    oom_kills_before: int | None = None,
    stopped_after: int | None = None,
) -> Failure:
    """A failed worker's :class:`Failure`. ``kill_reason`` is set when the agent killed it
    on purpose (a limit, a timer); ``oom_kills_before`` is :func:`oom_kill_count` when its
    attempt started. ``stopped_after``: the agent stopped it after it had failed, and only
    the first ``stopped_after`` bytes of its stderr predate the stop (``error_file`` is
    then ``None`` unless the file predates it too): what came later, the stop may have
    caused, so it is not its error."""
    message = traceback = source = None
    timestamp = exit_.timestamp
    recorded = read_error_file(error_file) if error_file is not None else None
    if recorded:
        message, traceback, when = recorded
        source = "error file" if traceback else None
        # torch writes whole seconds; only a finer time may move the failure earlier
        if when is not None and when < timestamp and when != int(when):
            timestamp = when
    if traceback is None and (found := stderr_traceback(stderr, end=stopped_after)):
        traceback, source = found.text, "stderr"
        message = message or found.exception

    killed = exit_.returncode == -signal.SIGKILL or exit_.returncode == 128 + signal.SIGKILL
    detail = ""
    if kill_reason:
        kind, detail = kill_reason
    elif stopped_after is not None:
        # the agent's own stop ended it: no OOM guess about the agent's SIGKILL
        kind = FailureKind.SIGNAL if exit_.returncode < 0 else FailureKind.EXIT_CODE
        detail = "stopped by the agent after it had failed"
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
    recorded_at = error_file if recorded else None
    return Failure(
        exit_, kind, timestamp, message, traceback, source, detail, error_file=recorded_at
    )


def _peak(exit_: WorkerExit) -> str:
    return f"; its peak RSS was {format_bytes(exit_.max_rss)}" if exit_.max_rss else ""


def _oom_killed_since(before: int | None) -> bool:
    now = oom_kill_count()
    return before is not None and now is not None and now > before
