"""Typed fakes of what the agent loop talks to: the clock, the worker launcher, the
rendezvous, the event sink, the lifecycle hooks, the resource monitor and the timer server.

They run no process and never sleep: the :class:`FakeLauncher` advances the
:class:`FakeClock` in ``wait(timeout)`` to the next scripted thing (an exit, an action, the
timeout), so time-based policies (backoff, min_uptime, the watchdog, resource samples) run
instantly and deterministically. mypy proves each fake implements its whole interface (see
the checks at the end of this module).
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from elastic_runner.events import Event, EventSink
from elastic_runner.lifecycle import NoLifecycle, Refusal
from elastic_runner.rendezvous.api import NodeInfo, RendezvousHandler, RendezvousInfo
from elastic_runner.spec import Failure, WorkerActivity, WorkerExit, WorkerGroup
from elastic_runner.timer.api import ExpiryListener, TimerExpiry, TimerServer
from elastic_runner.workers.launcher import WorkerLaunch, WorkerLauncher
from elastic_runner.workers.resources import ResourceMonitor, Usage

__all__ = [
    "ExitAt",
    "FakeClock",
    "FakeLauncher",
    "FakeMonitor",
    "FakeRendezvous",
    "FakeTimerServer",
    "Kill",
    "RecordingLifecycle",
    "RecordingSink",
    "all_succeed",
]


class FakeClock:
    """The agent's clock (``clock=``): seconds that pass only when a fake says so."""

    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        assert seconds >= 0, "time runs forward"
        self.now += seconds


@dataclass(frozen=True)
class ExitAt:
    """A scripted exit: worker ``local_rank`` ends with ``returncode`` ``at`` seconds after
    its attempt's workers started."""

    local_rank: int
    returncode: int
    at: float = 1.0


def all_succeed(nproc: int, at: float = 1.0) -> list[ExitAt]:
    """Every worker of an attempt exits 0 at ``at``."""
    return [ExitAt(rank, 0, at) for rank in range(nproc)]


@dataclass(frozen=True)
class Kill:
    """A ``kill(local_rank, sig)`` the agent issued, and when (fake clock)."""

    local_rank: int
    signal: int
    at: float


class FakeLauncher:
    """A :class:`~elastic_runner.workers.launcher.WorkerLauncher` whose workers follow a
    script: ``script[i]`` lists the exits of the i-th attempt (an attempt beyond the script
    is an error: the agent restarted more often than the test expects).

    ``wait(timeout)`` advances ``clock`` to the next scripted exit or action (:meth:`at`),
    or to the timeout, whichever comes first, and returns as soon as a worker exited or
    :meth:`wake` was called (also before the wait: a pending wake-up, as with the real
    supervisor's self-pipe). A wait with nothing ever to come raises instead of blocking,
    and more than ``max_waits`` waits is taken for a busy loop.

    ``kill`` makes the worker exit with ``-sig`` ``kill_delay`` seconds later; ``stop``
    takes ``stop_seconds`` of the clock when a worker is running (workers using their
    grace period), then every running worker exits with ``-sig`` (stopped by the agent).
    Ranks in ``chatty`` write output all the time; the others only when they start.
    ``steps[i]`` is the furthest step the workers of the i-th attempt report.
    """

    PID_BASE = 10_000

    def __init__(
        self,
        clock: FakeClock,
        script: Sequence[Sequence[ExitAt]],
        *,
        kill_delay: float = 0.0,
        stop_seconds: float = 0.0,
        chatty: frozenset[int] = frozenset(),
        max_waits: int = 200,
        steps: Sequence[int | None] = (),
    ) -> None:
        self.clock = clock
        #: The furthest step the workers of attempt i report (none beyond the list).
        self.steps = list(steps)
        self.script = [list(exits) for exits in script]
        self.kill_delay = kill_delay
        self.stop_seconds = stop_seconds
        self.chatty = chatty
        self.max_waits = max_waits
        # what the agent did
        self.launches: list[list[WorkerLaunch]] = []
        self.starts: list[float] = []
        self.waits: list[float | None] = []
        self.kills: list[Kill] = []
        self.stops: list[int] = []
        self.wakes = 0
        # the workers of the current attempt
        self.running: dict[int, WorkerLaunch] = {}
        self._pids: dict[int, int] = {}
        self._pending: dict[int, tuple[float, int]] = {}  # rank -> (when, returncode)
        self._started_output: dict[int, float] = {}
        self._actions: list[tuple[float, Callable[[], object]]] = []
        self._woken = threading.Event()
        #: Waits with no worker running and nothing scripted to come (the agent waiting
        #: for a rendezvous call in its own thread): only a wake() ends them, really.
        self.idle_waits = 0

    # -- test side --------------------------------------------------------------------

    def at(self, when: float, action: Callable[[], object]) -> None:
        """Run ``action`` (a signal, a membership change, a timer expiry ...) when a wait
        reaches ``when`` on the clock."""
        self._actions.append((when, action))
        self._actions.sort(key=lambda a: a[0])

    def pid_of(self, local_rank: int) -> int:
        return self._pids[local_rank]

    # -- WorkerLauncher -----------------------------------------------------------------

    def start(self, launches: Sequence[WorkerLaunch]) -> dict[int, int]:
        attempt = len(self.launches)
        assert attempt < len(self.script), f"attempt {attempt + 1} is not scripted"
        now = self.clock.now
        self.launches.append(list(launches))
        self.starts.append(now)
        self.running = {la.local_rank: la for la in launches}
        self._pids = {
            la.local_rank: self.PID_BASE + 100 * attempt + la.local_rank for la in launches
        }
        self._started_output = {la.local_rank: now for la in launches}
        self._pending = {}
        for exit_ in self.script[attempt]:
            assert exit_.local_rank in self.running, f"no worker {exit_.local_rank}"
            self._schedule(exit_.local_rank, now + exit_.at, exit_.returncode)
        return dict(self._pids)

    def wait(self, timeout: float | None = None) -> list[WorkerExit]:
        if timeout is None and not self.running:  # in a rendezvous call: time stands still
            self.idle_waits += 1
            assert self._woken.wait(10), "the agent waits for ever: nothing will wake it"
            self._woken.clear()
            return []
        self.waits.append(timeout)
        assert len(self.waits) <= self.max_waits, f"{len(self.waits)} waits: a busy loop?"
        deadline = None if timeout is None else self.clock.now + timeout
        while True:
            self._run_due_actions()
            exits = self._due_exits()
            if exits or self._woken.is_set():
                self._woken.clear()
                return exits
            if deadline is not None and self.clock.now >= deadline:
                return []
            upcoming = [when for when, _ in self._pending.values()]
            upcoming += [when for when, _ in self._actions]
            if deadline is not None:
                upcoming.append(deadline)
            assert upcoming, "the agent waits for ever: no exit, action or timeout to come"
            self.clock.now = max(self.clock.now, min(upcoming))

    def kill(self, local_rank: int, sig: int = signal.SIGKILL) -> None:
        self.kills.append(Kill(local_rank, sig, self.clock.now))
        if local_rank in self.running:
            self._schedule(local_rank, self.clock.now + self.kill_delay, -sig)

    def stop(self, sig: int, timeout: float) -> list[WorkerExit]:
        self.stops.append(sig)
        if self.running:
            self.clock.advance(min(self.stop_seconds, timeout))
        exits = [self._exit(rank, -sig, stopped=True) for rank in sorted(self.running)]
        self._pending.clear()
        return exits

    def wake(self) -> None:
        self.wakes += 1
        self._woken.set()

    def furthest_step(self) -> int | None:
        attempt = len(self.launches) - 1
        return self.steps[attempt] if 0 <= attempt < len(self.steps) else None

    def activity(self) -> dict[int, WorkerActivity]:
        now = self.clock.now
        return {
            rank: WorkerActivity(now if rank in self.chatty else self._started_output[rank])
            for rank in self.running
        }

    # -- inside -------------------------------------------------------------------------

    def _schedule(self, rank: int, when: float, returncode: int) -> None:
        current = self._pending.get(rank)
        if current is None or when < current[0]:
            self._pending[rank] = (when, returncode)

    def _run_due_actions(self) -> None:
        while self._actions and self._actions[0][0] <= self.clock.now:
            _, action = self._actions.pop(0)
            action()

    def _due_exits(self) -> list[WorkerExit]:
        due = sorted(
            (when, rank) for rank, (when, _) in self._pending.items() if when <= self.clock.now
        )
        return [self._exit(rank, self._pending.pop(rank)[1], stopped=False) for _, rank in due]

    def _exit(self, rank: int, returncode: int, stopped: bool) -> WorkerExit:
        launch = self.running.pop(rank)
        return WorkerExit(
            rank, launch.global_rank, self._pids[rank], returncode, self.clock.now, stopped
        )


class FakeRendezvous:
    """A one-node :class:`~elastic_runner.rendezvous.api.RendezvousHandler`: every round
    completes at once; a round joined with ``failed=True`` spends one restart.
    ``barrier_results`` are what the successive exit barriers return (then True)."""

    def __init__(self, barrier_results: Sequence[bool] = ()) -> None:
        self.joins: list[bool] = []  # the ``failed`` flag of each round joined
        self.lease_callback: Callable[[float | None], None] | None = None
        self.left_with: str | None = None
        self.restarts = 0
        self.barrier_results = list(barrier_results)
        self.barriers = 0
        self.failed_with: str | None = None
        self.callback: Callable[[], None] | None = None
        self.shutdowns = 0
        #: Exclusion: what report_failure got, what root_cause and step_out answer, and
        #: the reasons and cooldown ends the agent stepped out with.
        self.failure_reports: list[float] = []
        self.is_root_cause = True
        self.can_spare = True
        self.stepped_out: list[str] = []
        self.sat_out: list[float] = []

    @property
    def rounds(self) -> int:
        return len(self.joins)

    def change_membership(self) -> None:
        """What a backend does when a node joins or leaves while the workers run."""
        assert self.callback is not None, "the agent did not subscribe"
        self.callback()

    @property
    def backend(self) -> str:
        return "fake"

    def next_round(self, node: NodeInfo, failed: bool = False) -> RendezvousInfo:
        self.joins.append(failed)
        self.restarts += failed
        return RendezvousInfo(
            self.rounds - 1, 0, (node,), "127.0.0.1", 29500 + self.rounds, self.restarts
        )

    def exit_barrier(self) -> bool:
        self.barriers += 1
        return self.barrier_results.pop(0) if self.barrier_results else True

    def fail_job(self, reason: str) -> None:
        self.failed_with = reason

    def num_nodes_waiting(self) -> int:
        return 0

    def on_membership_change(self, callback: Callable[[], None]) -> None:
        self.callback = callback

    def leave(self, reason: str) -> None:
        self.left_with = reason

    def report_failure(self, at: float) -> None:
        self.failure_reports.append(at)

    def root_cause(self) -> bool:
        return self.is_root_cause

    def step_out(self, reason: str, failed: bool) -> bool:
        if self.can_spare:
            self.stepped_out.append(reason)
            self.restarts += failed
        return self.can_spare

    def sit_out(self, until: float) -> None:
        self.sat_out.append(until)

    def on_lease(self, callback: Callable[[float | None], None]) -> None:
        self.lease_callback = callback

    def set_lease(self, deadline: float | None) -> None:
        """What a backend does when this node's lease changes."""
        assert self.lease_callback is not None, "the agent did not subscribe"
        self.lease_callback(deadline)

    def shutdown(self) -> None:
        self.shutdowns += 1


class RecordingSink:
    """An :class:`~elastic_runner.events.EventSink` that keeps every event."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self.closed = False

    def emit(self, event: Event) -> None:
        self.events.append(event)

    def close(self) -> None:
        self.closed = True

    def names(self) -> list[str]:
        """Each event's name; a worker's as its state alone (``START``, ``FAILED`` ...)."""
        return [(e.state or "") if e.source == "WORKER" else e.name for e in self.events]

    def named(self, name: str) -> list[Event]:
        return [e for e in self.events if e.name == name]


class RecordingLifecycle(NoLifecycle):
    """Lifecycle hooks as plugins would see them; the health check answers
    ``refusals`` first, then refuses at the attempts in ``refuse_at``."""

    def __init__(
        self,
        refuse_at: Mapping[int, Refusal] | None = None,
        refusals: Sequence[Refusal | None] = (),
    ) -> None:
        super().__init__()
        self.refuse_at = dict(refuse_at or {})
        #: Answers of the first checks, whatever the attempt (then ``refuse_at``).
        self.refusals = list(refusals)
        self.health_checks: list[tuple[int, int]] = []  # (attempt, restart_count)
        self.started: list[int] = []  # group.attempt of each start
        self.failures: list[tuple[list[Failure], bool]] = []  # (failures, will_restart)

    def before_rendezvous(self, attempt: int, restart_count: int) -> Refusal | None:
        self.health_checks.append((attempt, restart_count))
        if self.refusals:
            return self.refusals.pop(0)
        return self.refuse_at.get(attempt)

    def workers_started(self, group: WorkerGroup) -> None:
        self.started.append(group.attempt)

    def worker_failure(
        self, group: WorkerGroup, failures: Sequence[Failure], will_restart: bool
    ) -> None:
        self.failures.append((list(failures), will_restart))


class FakeMonitor(ResourceMonitor):
    """A resource monitor due at every call of the loop, whose samples say each worker
    uses ``usage[local_rank]`` (a small default otherwise); it asks the loop to sleep
    ``interval`` seconds between samples."""

    def __init__(self, usage: Mapping[int, Usage], interval: float = 1.0) -> None:
        super().__init__(interval)
        self.usage = dict(usage)
        self.samples: list[dict[int, int]] = []  # the roots of each sample

    def due(self) -> bool:
        return True

    def seconds_until_due(self) -> float:
        return self.interval

    def sample(self, roots: Mapping[int, int]) -> dict[int, Usage]:
        self.samples.append(dict(roots))
        return {rank: self.usage.get(rank, Usage(0.0, 1 << 20, 1)) for rank in roots}


class FakeTimerServer:
    """A :class:`~elastic_runner.timer.api.TimerServer` whose timers expire when the test
    says so (:meth:`expire`, as the server's thread would call the listener)."""

    def __init__(self) -> None:
        self.listener: ExpiryListener | None = None

    def start(self) -> None:
        pass

    def worker_env(self) -> Mapping[str, str]:
        return {}

    def on_expired(self, listener: ExpiryListener) -> None:
        self.listener = listener

    def stop(self) -> None:
        pass

    def expire(self, expiry: TimerExpiry) -> None:
        assert self.listener is not None, "the agent did not subscribe"
        self.listener(expiry)


if TYPE_CHECKING:
    # mypy checks that each fake implements the whole protocol it stands in for (a missing
    # or mistyped method is an error here, wherever the fake is used).
    _launcher: type[WorkerLauncher] = FakeLauncher
    _rendezvous: type[RendezvousHandler] = FakeRendezvous
    _sink: type[EventSink] = RecordingSink
    _timers: type[TimerServer] = FakeTimerServer
    _clock: Callable[[], float] = FakeClock()
