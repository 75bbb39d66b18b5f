"""One attempt of the worker group, as the agent learns how it goes: every worker's exit,
what each one's end means (:class:`~elastic_runner.spec.WorkerStatus`), the failures
diagnosed, and why the agent killed a worker on purpose (a limit, a hang, a timer)."""

from __future__ import annotations

import time
from collections.abc import Callable

from elastic_runner.failures import diagnose, oom_kill_count
from elastic_runner.spec import Failure, FailureKind, WorkerExit, WorkerState, WorkerStatus
from elastic_runner.workers.logs import WorkerLogPaths

__all__ = ["Attempt"]


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

    def starting(self) -> None:
        """The workers are about to start: from now on, a rise in the kernel's OOM-kill
        count points at the OOM killer when a worker dies of SIGKILL."""
        self._oom_kills_at_start = oom_kill_count()

    def started_at(self, now: float) -> None:
        """Every worker started at ``now`` (the agent's clock)."""
        self.started, self.started_wall = now, time.time()

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
            # A rank that recorded its own error before we stopped it failed on its own
            # (it may even be the root cause, still busy dying when another rank exited).
            failed = paths.error_file.exists()
            status = WorkerStatus.FAILED if failed else WorkerStatus.TERMINATED
        else:
            status = WorkerStatus.SUCCEEDED if exit_.succeeded else WorkerStatus.FAILED
        if status != WorkerStatus.FAILED:
            return status, None
        failure = diagnose(
            exit_,
            error_file=paths.error_file,
            stderr=paths.stderr,
            kill_reason=self._kill_reasons.get(exit_.local_rank),
            oom_kills_before=self._oom_kills_at_start,
        )
        self._failures.append(failure)
        return status, failure
