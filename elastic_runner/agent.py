"""The agent loop: a state machine over one :class:`~elastic_runner.spec.WorkerGroup`.

::

    rendezvous -> assign ranks -> start workers
    wait for the first of: a worker exits | membership changes | a stop signal
    decide: succeed | restart (spends a restart) | regroup (free) | fail | stop

Everything around the loop comes in through small interfaces: the rendezvous handler,
the worker launcher (process spawning), the event sink and metric handler, and a clock.
"""

from __future__ import annotations

import logging
import signal
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Protocol

from elastic_runner.events import Event, EventSink
from elastic_runner.metrics import MetricHandler
from elastic_runner.rendezvous.api import NodeInfo, RendezvousHandler
from elastic_runner.rendezvous.ranks import assign_ranks
from elastic_runner.spec import (
    RunContext,
    RunResult,
    WorkerExit,
    WorkerGroup,
    WorkerSpec,
    WorkerState,
)
from elastic_runner.workers.environment import worker_environment
from elastic_runner.workers.logs import WorkerLogPaths
from elastic_runner.workers.supervisor import WorkerLaunch

__all__ = ["ElasticAgent", "WorkerLauncher"]

log = logging.getLogger(__name__)


class WorkerLauncher(Protocol):
    """Process spawning as the agent sees it (:class:`ProcessSupervisor` in production,
    a fake in unit tests)."""

    def start(self, launches: Sequence[WorkerLaunch]) -> dict[int, int]: ...

    def wait(self, timeout: float | None = None) -> list[WorkerExit]: ...

    def stop(self, sig: int, timeout: float) -> list[WorkerExit]: ...

    def wake(self) -> None: ...


class ElasticAgent:
    """Runs one worker spec on this node until it succeeds, fails for good, or is stopped.

    ``request_stop`` (from a signal handler) and membership callbacks only set a flag and
    wake the launcher; all decisions are taken in the thread running :meth:`run`.
    """

    def __init__(
        self,
        spec: WorkerSpec,
        rendezvous: RendezvousHandler,
        launcher: WorkerLauncher,
        *,
        context: RunContext,
        events: EventSink,
        metrics: MetricHandler,
        base_env: Mapping[str, str],
        log_prefix: str = "[{role}{local_rank}]:",
        forward_signals: frozenset[int] = frozenset(),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.spec = spec
        self.group = WorkerGroup.for_spec(spec)
        self._rdzv = rendezvous
        self._launcher = launcher
        self._context = context
        self._events = events
        self._metrics = metrics
        self._base_env = dict(base_env)
        self._log_prefix = log_prefix
        self._forward_signals = forward_signals
        self._clock = clock
        self._remaining_restarts = spec.max_restarts
        self._exits: dict[int, WorkerExit] = {}
        self._stop_signal: int | None = None
        self._membership_changed = False

    # -- called from other contexts -----------------------------------------------------

    def request_stop(self, signum: int) -> None:
        """Stop the run because the agent got ``signum``: workers get the same signal
        when it is one of ``forward_signals``, else SIGTERM."""
        if self._stop_signal is None:
            self._stop_signal = signum
        self._launcher.wake()

    def _on_membership_change(self) -> None:
        self._membership_changed = True
        self._launcher.wake()

    # -- the loop -----------------------------------------------------------------------

    def run(self) -> RunResult:
        self._rdzv.on_membership_change(self._on_membership_change)
        try:
            self._start_attempt()
            while True:
                for exit_ in self._launcher.wait():
                    self._record_exit(exit_)
                if self._stop_signal is not None:
                    return self._stop_by_signal(self._stop_signal)
                state = self._group_state()
                if state == WorkerState.SUCCEEDED:
                    return self._finish(WorkerState.SUCCEEDED)
                if state == WorkerState.FAILED:
                    self._stop_workers(signal.SIGTERM)
                    if self._remaining_restarts <= 0:
                        return self._finish(WorkerState.FAILED)
                    self._remaining_restarts -= 1
                    self.group.restart_count += 1
                    self._emit_agent("elastic_runner.restart", reason="failure")
                    self._start_attempt()
                elif self._membership_changed:
                    self._stop_workers(signal.SIGTERM)
                    self._emit_agent("elastic_runner.restart", reason="membership_change")
                    self._start_attempt()
        finally:
            if self._launcher_has_running():
                self._stop_workers(signal.SIGKILL)
            self._rdzv.shutdown()

    # -- steps --------------------------------------------------------------------------

    def _start_attempt(self) -> None:
        """Rendezvous, assign ranks, start every worker; the group becomes HEALTHY."""
        self._membership_changed = False
        self._exits.clear()
        group, spec = self.group, self.spec
        t0 = self._clock()
        info = self._rdzv.next_round(NodeInfo(spec.role, spec.local_world_size))
        rdzv_s = self._clock() - t0
        ranks = assign_ranks(info.nodes, info.group_rank)
        group.group_rank, group.group_world_size = info.group_rank, info.group_world_size
        group.master_addr, group.master_port = info.master_addr, info.master_port
        group.attempt += 1
        self._metrics.put("rendezvous.duration_s", rdzv_s)
        self._emit_agent(
            "torchelastic.worker.status.RENDEZVOUS",
            round=info.round,
            group_rank=info.group_rank,
            group_world_size=info.group_world_size,
            duration_ms=round(rdzv_s * 1000, 3),
        )
        launches = []
        for w in group.workers:
            w.global_rank = ranks.base_global_rank + w.local_rank
            w.role_rank = ranks.base_role_rank + w.local_rank
            w.world_size, w.role_world_size = ranks.world_size, ranks.role_world_size
            paths = WorkerLogPaths.of(self._context.run_dir, group.attempt, w.local_rank)
            env = worker_environment(
                group,
                w,
                run_id=self._context.run_id,
                base_env=self._base_env,
                error_file=str(paths.error_file),
            )
            prefix = self._log_prefix.format(
                role=spec.role,
                rank=w.global_rank,
                local_rank=w.local_rank,
                node=self._context.node,
            )
            launches.append(
                WorkerLaunch(
                    w.local_rank,
                    w.global_rank,
                    spec.argv_for(w.local_rank),
                    env,
                    paths,
                    prefix + " " if prefix else "",
                )
            )
        pids = self._launcher.start(launches)
        group.state = WorkerState.HEALTHY
        for w in group.workers:
            w.pid = pids[w.local_rank]
            self._emit_worker("START", w.global_rank, pid=w.pid, local_rank=w.local_rank)
        log.info(
            "attempt %d: started %d worker(s) (ranks %d-%d of %d, restart %d/%d)",
            group.attempt,
            len(pids),
            group.workers[0].global_rank,
            group.workers[-1].global_rank,
            group.workers[0].world_size,
            group.restart_count,
            spec.max_restarts,
        )

    def _record_exit(self, exit_: WorkerExit) -> None:
        self._exits[exit_.local_rank] = exit_
        self.group.workers[exit_.local_rank].pid = None
        if exit_.stopped_by_agent:
            state = "TERMINATED"
        else:
            state = "SUCCEEDED" if exit_.succeeded else "FAILED"
        self._emit_worker(
            state,
            exit_.global_rank,
            pid=exit_.pid,
            local_rank=exit_.local_rank,
            exit_code=exit_.returncode,
            signal=exit_.signal_name,
            detected_at=exit_.timestamp,
        )
        if state == "FAILED":
            log.warning(
                "worker rank %d (pid %d) failed: %s",
                exit_.global_rank,
                exit_.pid,
                exit_.describe(),
            )

    def _group_state(self) -> WorkerState:
        if any(not e.succeeded and not e.stopped_by_agent for e in self._exits.values()):
            return WorkerState.FAILED
        if len(self._exits) == self.spec.local_world_size:
            return WorkerState.SUCCEEDED
        return WorkerState.HEALTHY

    def _stop_workers(self, sig: int) -> None:
        for exit_ in self._launcher.stop(sig, self.spec.stop_timeout):
            self._record_exit(exit_)
        self.group.state = WorkerState.STOPPED

    def _launcher_has_running(self) -> bool:
        return any(w.pid is not None for w in self.group.workers)

    def _stop_by_signal(self, signum: int) -> RunResult:
        name = signal.Signals(signum).name
        sent = signum if signum in self._forward_signals else signal.SIGTERM
        log.warning(
            "got %s: sending %s to the workers (grace %g s, then SIGKILL)",
            name, signal.Signals(sent).name, self.spec.stop_timeout,
        )
        self._emit_agent("elastic_runner.signal", signal=name, sent=signal.Signals(sent).name)
        self._stop_workers(sent)
        result = self._finish(WorkerState.FAILED)
        result.signal = signum
        return result

    def _finish(self, state: WorkerState) -> RunResult:
        # Sweep what the attempt's process groups left behind, whatever the outcome.
        self._stop_workers(signal.SIGTERM)
        self.group.state = state
        self._metrics.put("workers.restarts", self.group.restart_count)
        self._emit_agent(f"torchelastic.worker.status.{state.value}")
        return RunResult(
            state=state,
            attempts=self.group.attempt,
            restart_count=self.group.restart_count,
            exits=sorted(self._exits.values(), key=lambda e: e.local_rank),
        )

    # -- events -------------------------------------------------------------------------

    def _emit_agent(self, name: str, **metadata: object) -> None:
        self._emit(name, "AGENT", None, None, metadata)

    def _emit_worker(self, state: str, rank: int, **metadata: object) -> None:
        self._emit(f"torchelastic.worker.status.{state}", "WORKER", rank, state, metadata)

    def _emit(
        self,
        name: str,
        source: str,
        rank: int | None,
        state: str | None,
        metadata: dict[str, object],
    ) -> None:
        metadata.setdefault("attempt", self.group.attempt)
        metadata.setdefault("restart_count", self.group.restart_count)
        self._events.emit(
            Event(
                name=name,
                source=source,
                run_id=self._context.run_id,
                node=self._context.node,
                rank=rank,
                state=state,
                metadata=dict(metadata),
            )
        )
