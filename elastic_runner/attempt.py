"""One attempt of the worker group, as the agent learns how it goes: every worker's exit,
what each one's end means (:class:`~elastic_runner.spec.WorkerStatus`), the failures
diagnosed, and why the agent killed a worker on purpose (a limit, a hang, a timer).

A worker the agent stopped (another rank failed, the membership changed, a stop signal)
is a bystander, unless it had failed itself before the stop was sent: it had written an
error file, or its stderr held a whole traceback of the same error as a rank that had
failed by then (the same exception line: type, module and message, ``ValueError:
boom``). "Before the stop" is decided by what the files held when the agent began to stop
the workers (:meth:`Attempt.stopping`), never by clocks: whatever a worker wrote later,
the stop may have caused (a SIGTERM handler raising ``KeyboardInterrupt``)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass

from elastic_runner.failures import diagnose, exception_line, oom_kill_count, stderr_traceback
from elastic_runner.spec import Failure, FailureKind, WorkerExit, WorkerState, WorkerStatus
from elastic_runner.workers.logs import WorkerLogPaths

__all__ = ["Attempt"]


@dataclass(frozen=True)
class _Stop:
    """What the workers had recorded when the agent began to stop them."""

    #: local rank -> identity of its error file then (inode, size, mtime): a file written
    #: or rewritten after the stop differs.
    error_files: dict[int, tuple[int, int, int]]
    #: local rank -> size of its stderr log then.
    stderr_sizes: dict[int, int]
    #: The exception lines of the workers that had failed by then.
    errors: frozenset[str]


def _identity(path: os.PathLike[str]) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


class Attempt:
    """The state of one attempt of ``nproc`` workers whose logs ``paths_of`` locates."""

    def __init__(self, nproc: int, paths_of: Callable[[int], WorkerLogPaths]) -> None:
        self._nproc = nproc
        self._paths_of = paths_of
        #: When the workers started (the agent's clock) and in wall-clock seconds (0: not
        #: yet).
        self.started = 0.0
        self.started_wall = 0.0
        self.exits: dict[int, WorkerExit] = {}
        self._failures: list[Failure] = []
        self._kill_reasons: dict[int, tuple[FailureKind, str]] = {}
        self._oom_kills_at_start: int | None = None
        self._stop: _Stop | None = None

    def starting(self) -> None:
        """The workers are about to start: from now on, a rise in the kernel's OOM-kill
        count points at the OOM killer when a worker dies of SIGKILL."""
        self._oom_kills_at_start = oom_kill_count()

    def started_at(self, now: float) -> None:
        """Every worker started at ``now`` (the agent's clock)."""
        self.started, self.started_wall = now, time.time()

    def stopping(self) -> None:
        """The agent is about to stop the workers still running: what they have recorded
        by now predates the stop. Only the first call of an attempt counts."""
        if self._stop is not None:
            return
        error_files, stderr_sizes = {}, {}
        for local_rank in range(self._nproc):
            paths = self._paths_of(local_rank)
            if (identity := _identity(paths.error_file)) is not None:
                error_files[local_rank] = identity
            stderr = _identity(paths.stderr)
            stderr_sizes[local_rank] = stderr[1] if stderr else 0
        errors = frozenset(filter(None, map(exception_line, self._failures)))
        self._stop = _Stop(error_files, stderr_sizes, errors)

    @property
    def recorded_errors(self) -> frozenset[int]:
        """Local ranks that had written their error file when the stop began."""
        return frozenset(self._stop.error_files) if self._stop else frozenset()

    @property
    def failures(self) -> list[Failure]:
        """The workers that failed on their own, root cause (earliest) first."""
        return sorted(self._failures, key=lambda f: f.timestamp)

    @property
    def state(self) -> WorkerState:
        """FAILED as soon as one worker failed, SUCCEEDED once every worker exited 0,
        else HEALTHY."""
        if self._failures:
            return WorkerState.FAILED
        if len(self.exits) == self._nproc:
            return WorkerState.SUCCEEDED
        return WorkerState.HEALTHY

    def killing(self, local_rank: int, kind: FailureKind, detail: str) -> bool:
        """The agent is about to kill a worker for ``kind``: remember why, for the report.
        False when it already is (the first reason stands)."""
        if local_rank in self._kill_reasons:
            return False
        self._kill_reasons[local_rank] = (kind, detail)
        return True

    def record(self, exit_: WorkerExit) -> tuple[WorkerStatus, Failure | None]:
        """What ``exit_`` means, and its diagnosis when the worker failed."""
        self.exits[exit_.local_rank] = exit_
        paths = self._paths_of(exit_.local_rank)
        if exit_.stopped_by_agent:
            return self._record_stopped(exit_, paths)
        if exit_.succeeded:
            return WorkerStatus.SUCCEEDED, None
        return WorkerStatus.FAILED, self._failed(
            diagnose(
                exit_,
                error_file=paths.error_file,
                stderr=paths.stderr,
                kill_reason=self._kill_reasons.get(exit_.local_rank),
                oom_kills_before=self._oom_kills_at_start,
            )
        )

    def _record_stopped(
        self, exit_: WorkerExit, paths: WorkerLogPaths
    ) -> tuple[WorkerStatus, Failure | None]:
        """A worker the agent stopped: failed if it had failed before the stop (it may
        even be the root cause, still busy dying when another rank exited)."""
        if self._stop is None:
            # Exits the agent marked stopped without stopping the group first (a fenced
            # node's, killed by its guardian): the stop is as late as the agent knows.
            self.stopping()
        assert self._stop is not None
        stop, local_rank = self._stop, exit_.local_rank
        known = stop.error_files.get(local_rank)
        wrote_error_file = known is not None and known == _identity(paths.error_file)
        stderr_end = stop.stderr_sizes.get(local_rank, 0)
        # a clean exit after a logged (caught) error is no failure
        may_share = bool(stop.errors) and not exit_.succeeded
        found = stderr_traceback(paths.stderr, end=stderr_end) if may_share else None
        raised_same = found is not None and found.exception in stop.errors
        # the agent killed it on purpose (a limit, a hang) before it stopped the group
        killed = local_rank in self._kill_reasons
        if not (wrote_error_file or raised_same or killed):
            return WorkerStatus.TERMINATED, None
        return WorkerStatus.FAILED, self._failed(
            diagnose(
                exit_,
                error_file=paths.error_file if wrote_error_file else None,
                stderr=paths.stderr,
                kill_reason=self._kill_reasons.get(local_rank),
                stopped_after=stderr_end,
            )
        )

    def _failed(self, failure: Failure) -> Failure:
        self._failures.append(failure)
        return failure
