"""Signals from outside: one signal the scheduler sent to every process, told from a rank
that failed and from a signal sent to the agent alone.

Slurm (``scancel``, ``scancel --signal``, ``sbatch --signal``, preemption) signals every
process of the step: the agent and its workers get the same signal S at about the same
time, in either order. So that every node reports the same outcome (stopped by S, exit
code 128+S, or the preemption code; no rank blamed), the agent

* holds the verdict on a worker that died of a signal it handles itself (SIGKILL never
  is held), or on the exits that would make the attempt succeed (a worker that caught
  S, saved a checkpoint and exited 0), for up to :data:`WINDOW` seconds: if the agent
  gets the same S by then, the exits answered it (:func:`answers`) and are no failure;
* when it gets S first, waits up to :data:`WINDOW` before passing S on: a worker that
  exits meanwhile got it from outside too, and then S is not sent again (a second one
  could cut a checkpoint short): the workers get ``stop_timeout`` to exit, then SIGKILL.

The stop is *from outside* when a worker of this node answered S within :data:`WINDOW`
of the agent getting it (:meth:`SignalWitness.from_outside`).
"""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterable

from elastic_runner.spec import WorkerExit

__all__ = ["WINDOW", "SignalWitness", "answers", "killed_by", "stop_reason"]

#: How far apart a worker's end and the agent's own receipt of the same signal may be and
#: still be one signal sent to every process. Measured through elastic-run on loopback
#: (tests/e2e/test_scheduler_signals.py, 2 cores, the signal sent to the agent and to each
#: worker one after the other, in both orders, gap_ms of the SIGNAL event): 0.1-12 ms for
#: workers that die of it (26 ms once), up to 24 ms for workers that catch it and exit 0 (the
#: interpreter's shutdown). 100 ms leaves room for a busy node; it delays only the verdict
#: on a worker killed by a handled signal (never SIGKILL), the end of a run that succeeds,
#: and passing on a signal sent to the agent alone.
WINDOW = 0.1


def killed_by(exit_: WorkerExit) -> int | None:
    """The signal that ended the worker: killed by it, or a shell's 128+N for it."""
    if exit_.returncode < 0:
        return -exit_.returncode
    if 128 < exit_.returncode < 128 + 65:
        return exit_.returncode - 128
    return None


def answers(exit_: WorkerExit, signum: int) -> bool:
    """``exit_`` is what a worker does on ``signum``: it died of it, or caught it and
    exited 0 (saved a checkpoint and left)."""
    return exit_.succeeded or killed_by(exit_) == signum


class SignalWitness:
    """What this node saw of a stop signal: when the agent got it, and when its workers
    ended, in the agent's clock, whatever the attempt (a regroup may stop the workers
    just before the agent's own signal comes: a node that got it left the job)."""

    def __init__(self, handled: Iterable[int], window: float = WINDOW) -> None:
        #: The signals the agent handles (SIGKILL is never one).
        self.handled = frozenset(handled) - {signal.SIGKILL}
        self.window = window
        self.received_at: float | None = None
        self._seen: list[tuple[WorkerExit, float]] = []

    def received(self, now: float) -> None:
        """The agent got its stop signal at ``now`` (the first one counts)."""
        if self.received_at is None:
            self.received_at = now

    def seen(self, exit_: WorkerExit, now: float) -> None:
        """The agent learnt of ``exit_`` at ``now``. Until a signal comes, only the ends
        of the last window are kept."""
        if self.received_at is None:
            self._seen = [(e, t) for e, t in self._seen if t >= now - self.window]
        self._seen.append((exit_, now))

    def worth_holding(self, exits: list[WorkerExit], others_left: int) -> bool:
        """Hold the verdict on ``exits`` for the window: one died of a handled signal, or
        they would end the attempt in success (``others_left`` workers still ran before
        them). Never when the agent's signal came already, or when off (no signal is
        handled)."""
        if self.received_at is not None or not self.handled or not exits:
            return False
        if any(killed_by(e) in self.handled for e in exits):
            return True
        return others_left == len(exits) and all(e.succeeded for e in exits)

    def hold(
        self,
        exits: list[WorkerExit],
        others_left: int,
        wait: Callable[[float], list[WorkerExit]],
        clock: Callable[[], float],
        *,
        stopped: Callable[[], bool],
    ) -> list[WorkerExit]:
        """When :meth:`worth_holding`: wait (``wait(seconds)``, the launcher's) up to the
        window for the agent's own signal (``stopped()``), so the verdict does not depend
        on which came first. Returns the exits that came meanwhile."""
        if not self.worth_holding(exits, others_left):
            return []
        more: list[WorkerExit] = []
        deadline = clock() + self.window
        while not stopped() and (left := deadline - clock()) > 0:
            more += wait(left)
        return more

    def await_answer(
        self,
        wait: Callable[[float], list[WorkerExit]],
        clock: Callable[[], float],
        running: Callable[[], bool],
        record: Callable[[WorkerExit], object],
    ) -> None:
        """The agent got its stop signal: before passing it on, wait up to the window
        after its receipt for a worker to end on its own (it got the signal from outside
        too), ``record``-ing the exits that came."""
        received = self.received_at
        if not self.handled or received is None:
            return
        while running():
            left = received + self.window - clock()
            if left <= 0:
                return
            exits = wait(left)
            for exit_ in exits:
                record(exit_)
            if exits:
                return

    def gap(self, signum: int) -> float | None:
        """Seconds between the agent getting ``signum`` and the nearest end of a worker
        that answered it (``None``: no such end, or no signal)."""
        at = self.received_at
        gaps = [abs(t - at) for e, t in self._seen if at is not None and answers(e, signum)]
        return min(gaps, default=None)

    def from_outside(self, signum: int) -> bool:
        """A worker ended by ``signum`` (or exited 0) within the window of the agent
        getting it: the signal went to every process, not to the agent alone. (The agent
        passes a signal on only once the window has passed, so the ends it caused are
        later; a worker it stopped for another reason at that moment, a regroup because a
        node that got the signal left, counts.)"""
        at = self.received_at
        if at is None or not self.handled:
            return False
        return any(
            answers(e, signum) and at - self.window <= t < at + self.window for e, t in self._seen
        )


def stop_reason(name: str, *, outside: bool, preempted: bool) -> str:
    """Why the run ended, in the report's and the events' words."""
    verb = "preempted" if preempted else "stopped"
    where = " from outside (the scheduler signalled every process)" if outside else ""
    return f"{verb} by {name}{where}"
