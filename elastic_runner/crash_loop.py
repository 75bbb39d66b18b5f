"""The crash-loop verdict: restarts that make no progress stop the job with exit code
:data:`~elastic_runner.spec.EXIT_NO_PROGRESS` (93, "no progress: do not requeue", the
code NVIDIA's ft_launcher gives the same verdict) instead of burning every restart and
then the allocation's requeues.

Progress is the furthest training step the workers report
(``elastic_runner.heartbeat(step=N)``). The first failed attempt sets the mark; each later
failed attempt that did not get past it counts one, one that did resets the count and
moves the mark. ``restart.no_progress`` such failures in a row (default 3; 0 turns the
verdict off) end the job. A job whose workers report no steps is judged by time instead,
only when ``restart.no_progress_uptime`` is set: a failed attempt that ran less than that
many seconds counts as no progress.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["NO_PROGRESS", "CrashLoopJudge", "is_verdict"]

#: How a verdict's reason starts; the other nodes of the job recognise it in the reason
#: the failing node gives the job (and exit 93 too).
NO_PROGRESS = "no progress"


def is_verdict(reason: str) -> bool:
    """``reason`` (why another node failed the job, as this node heard it) is a
    crash-loop verdict."""
    return f"{NO_PROGRESS}: " in reason and reason.rstrip(")").endswith("do not requeue")


@dataclass
class CrashLoopJudge:
    """Keeps the furthest step across attempts and says when restarting is pointless."""

    #: Failed attempts in a row without progress that end the job (0: never).
    limit: int = 3
    #: Without steps: a failed attempt that ran less than this is no progress (0: off).
    min_uptime: float = 0.0
    #: The furthest step any attempt reached (``None`` until one reported a step).
    furthest: int | None = None
    #: Failed attempts in a row that made no progress.
    in_a_row: int = 0
    _failures: int = 0

    @property
    def wants_steps(self) -> bool:
        return self.limit > 0

    def failed(self, step: int | None, uptime: float) -> str | None:
        """An attempt failed after ``uptime`` seconds, its workers having reached
        ``step`` (``None``: none reported one). Returns the verdict's reason when the job
        must stop, else ``None``."""
        self._failures += 1
        if self.limit <= 0:
            return None
        if step is not None:
            if self.furthest is None or step > self.furthest:
                self.furthest, self.in_a_row = step, 0
                return None
            self.in_a_row += 1
            if self.in_a_row >= self.limit:
                return (
                    f"{NO_PROGRESS}: {self.in_a_row} restarts in a row failed without "
                    f"passing step {self.furthest} (restart.no_progress={self.limit}); "
                    "do not requeue"
                )
            return None
        if self.furthest is not None or self.min_uptime <= 0:
            return None  # steps were reported before: an attempt without any is no verdict
        if self._failures == 1 or uptime >= self.min_uptime:
            self.in_a_row = 0
            return None
        self.in_a_row += 1
        if self.in_a_row >= self.limit:
            return (
                f"{NO_PROGRESS}: {self.in_a_row} restarts in a row failed within "
                f"{self.min_uptime:g} s of starting (restart.no_progress_uptime); "
                "do not requeue"
            )
        return None
