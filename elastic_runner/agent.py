"""The agent loop: a state machine over one :class:`~elastic_runner.spec.WorkerGroup`.

::

    rendezvous -> assign ranks -> start workers
    wait for the first of: a worker exits | membership changes | a stop signal
                           | a resource sample is due
    decide: succeed | restart (spends a restart, after backoff) | regroup (free)
            | step out (excluded: spends a restart, sits out a cooldown) | fail | stop

Everything around the loop comes in through small interfaces: the rendezvous handler,
the worker launcher (process spawning), the resource monitor, the event sink and metric
handler, the lifecycle hooks, the hang detector and timer server, and a clock. It imports
no backend, no built-in plugin and neither Hydra nor OmegaConf (an import contract checks
this); :mod:`elastic_runner.run` assembles it.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

from elastic_runner.attempt import Attempt
from elastic_runner.blocking_calls import BlockingCalls, Stopped
from elastic_runner.crash_loop import CrashLoopJudge
from elastic_runner.events import EventEmitter, EventSink, names
from elastic_runner.exclusion import ExclusionJudge
from elastic_runner.faults import FaultInjector
from elastic_runner.lifecycle import Lifecycle, NoLifecycle
from elastic_runner.metrics import MetricHandler
from elastic_runner.outside import SignalWitness, answers, stop_reason
from elastic_runner.rendezvous.api import (
    NodeInfo,
    RendezvousGracefulExitError,
    RendezvousHandler,
)
from elastic_runner.rendezvous.ranks import join_round
from elastic_runner.spec import (
    FailureKind,
    RestartPolicy,
    RunContext,
    RunResult,
    Worker,
    WorkerExit,
    WorkerGroup,
    WorkerSpec,
    WorkerState,
    WorkerStatus,
)
from elastic_runner.staying_out import Refused, StayingOut
from elastic_runner.workers.environment import worker_environment
from elastic_runner.workers.interfaces import collective_interface_env
from elastic_runner.workers.launcher import WorkerLaunch, WorkerLauncher
from elastic_runner.workers.logs import WorkerLogPaths
from elastic_runner.workers.resources import ResourceMonitor, Usage, format_bytes

if TYPE_CHECKING:
    from elastic_runner.timer.api import TimerExpiry, TimerServer
    from elastic_runner.watchdog import HangDetector

__all__ = ["FAILING_GRACE", "ElasticAgent", "WorkerLauncher"]

#: Seconds a worker that wrote its error file gets to exit by itself before the group's
#: stop (a Python worker unwinding an exception takes milliseconds; with torch loaded,
#: its shutdown takes up to about half a second here).
FAILING_GRACE = 1.0

log = logging.getLogger(__name__)


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
        restart_policy: RestartPolicy | None = None,
        crash_loop: CrashLoopJudge | None = None,
        checks_retry: tuple[float, float] = (0.0, 10.0),
        exclusion: ExclusionJudge | None = None,
        faults: FaultInjector | None = None,
        monitor: ResourceMonitor | None = None,
        memory_limit: int | None = None,
        lifecycle: Lifecycle | None = None,
        hangs: HangDetector | None = None,
        timers: TimerServer | None = None,
        lease_listener: Callable[[float | None], None] | None = None,
        stop_signals: frozenset[int] = frozenset(),
        preempt_signals: frozenset[int] = frozenset(),
        resumed: tuple[int, int] = (0, 0),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.spec = spec
        self.group = WorkerGroup.for_spec(spec)
        self._rdzv = rendezvous
        self._launcher = launcher
        self._context = context
        self._events = EventEmitter(events, context.run_id, context.node, self.group)
        self._metrics = metrics
        self._base_env = dict(base_env)
        self._log_prefix = log_prefix
        self._forward_signals = forward_signals
        self._policy = restart_policy or RestartPolicy()
        self._crash_loop = crash_loop or CrashLoopJudge(limit=0)
        #: A node its health checks keep out checks again every [1] s for [0] s.
        self._faults = faults
        self._injected: list[str] = []
        self._no_progress = False
        self._monitor = monitor
        self._memory_limit = memory_limit
        self._lifecycle = lifecycle or NoLifecycle()
        self._hangs = hangs
        self._timers = timers
        #: Also told every lease (the guardian, which fences even if this agent freezes).
        self._lease_listener = lease_listener
        #: Until when this node's membership surely holds (see RendezvousHandler.on_lease).
        self._lease: float | None = None
        self._clock = clock
        self._calls = BlockingCalls(launcher, lambda: self._stop_signal is not None)
        self._out = StayingOut(
            self.group,
            rendezvous,
            self._calls,
            self._events,
            self._lifecycle,
            node=context.node,
            wait=launcher.wait,
            stopped=lambda: self._stop_signal is not None,
            clock=clock,
            checks_retry=checks_retry,
            exclusion=exclusion or ExclusionJudge(),
        )
        #: Set per round: GLOO_SOCKET_IFNAME where gloo's own choice would be loopback.
        self._network_env: dict[str, str] = {}
        self._stop_signal: int | None = None
        #: The signals the agent handles (a worker's death by one is held for the agent's
        #: own; see elastic_runner.outside), and those that mean preemption.
        self._witness = SignalWitness(stop_signals)
        self._preempt = preempt_signals
        #: (attempts, restarts) of the run this one resumes after a preemption.
        self.group.attempt, self._restarts_before = resumed
        self._membership_changed = False
        self._attempt = Attempt(spec.local_world_size, self._paths)
        #: When the last failed attempt's first failure was seen (for recovery time).
        self._failed_at: float | None = None
        #: Latest resource sample per local rank (for status displays).
        self.usage: dict[int, Usage] = {}
        self._peak_rss: dict[int, int] = {}

    # -- called from other contexts -----------------------------------------------------

    def request_stop(self, signum: int) -> None:
        """Stop the run because the agent got ``signum``: workers get the same signal
        when it is one of ``forward_signals``, else SIGTERM."""
        if self._stop_signal is None:
            self._stop_signal = signum
            self._witness.received(self._clock())
        self._launcher.wake()

    def _on_membership_change(self) -> None:
        self._membership_changed = True
        self._launcher.wake()

    def _on_lease(self, deadline: float | None) -> None:
        self._lease = deadline
        if self._lease_listener is not None:
            self._lease_listener(deadline)

    def _on_timer_expired(self, expiry: TimerExpiry) -> None:
        if self._hangs is not None:
            self._hangs.expired(expiry)
        self._launcher.wake()

    # -- the loop -----------------------------------------------------------------------

    def run(self) -> RunResult:
        self._rdzv.on_membership_change(self._on_membership_change)
        self._rdzv.on_lease(self._on_lease)
        if self._timers is not None:
            self._timers.on_expired(self._on_timer_expired)
        try:
            return self._loop()
        except Refused as refused:
            log.error("%s: leaving the job", refused.refusal.describe())
            self._events.agent(
                names.HEALTH_CHECK_REFUSED,
                plugin=refused.refusal.plugin,
                reason=refused.refusal.reason,
            )
            return self._finish(WorkerState.FAILED, refused.refusal.describe())
        except Stopped:
            assert self._stop_signal is not None
            return self._stop_by_signal(self._stop_signal)
        except RendezvousGracefulExitError as exc:  # a standby the job never needed
            log.info("%s", exc)
            return self._finish(WorkerState.SUCCEEDED, str(exc))
        finally:
            if self._has_running_workers():
                self._stop_workers(signal.SIGKILL)
            self._rdzv.shutdown()
            self._calls.close()
            self._events.agent(names.SHUTDOWN)

    def _loop(self) -> RunResult:
        self._start_attempt()
        while True:
            exits = self._launcher.wait(self._wait_timeout())
            if self._lease_lapsed(exits):
                self._fence(exits)
                continue
            # a scheduler signals every process: wait a moment for the agent's own signal
            exits += self._witness.hold(
                exits,
                sum(w.pid is not None for w in self.group.workers),
                self._launcher.wait,
                self._clock,
                stopped=lambda: self._stop_signal is not None,
            )
            for exit_ in exits:
                self._record_exit(exit_)
            if self._stop_signal is not None:
                return self._stop_by_signal(self._stop_signal)
            if self._monitor and self._monitor.due():
                self._sample_resources()
            if self._hangs is not None and self._has_running_workers():
                self._act_on_hangs()
            if self._faults is not None and self._has_running_workers():
                self._inject(self._faults)
            state = self._attempt.state
            if state == WorkerState.SUCCEEDED:
                if self.group.group_world_size > 1:  # others to wait for
                    self._events.agent(names.EXIT_BARRIER)
                if self._calls.run(self._rdzv.exit_barrier):
                    return self._finish(WorkerState.SUCCEEDED)
                # the job re-forms (another node failed or left): run again with it
                self._regroup(during="exit barrier")
            if state == WorkerState.FAILED:
                self._attempt.stopping()
                self._await_failing_workers()
                self._stop_workers(signal.SIGTERM)
                # Uptime until the failure, not until the others were stopped (that
                # can take stop_timeout and would hide a startup failure).
                failed_at = self._failed_at if self._failed_at is not None else self._clock()
                uptime = failed_at - self._attempt.started
                reason = self._crash_loop.failed(self._launcher.furthest_step(), uptime)
                self._no_progress = reason is not None
                reason = reason or self._policy.why_not_restart(
                    uptime, self.group.restart_count, self.spec.max_restarts
                )
                self._lifecycle.worker_failure(
                    self.group,
                    self._attempt.failures,
                    will_restart=reason is None,
                )
                if reason:
                    self._rdzv.fail_job(reason)
                    return self._finish(WorkerState.FAILED, reason)
                if (exclusion := self._out.judge()) is not None:
                    # The failed attempt is over: if the job finishes meanwhile, this
                    # node's report is of its exclusion, not of a failure the job got past.
                    self._attempt = Attempt(self.spec.local_world_size, self._paths)
                    self._out.sit_out(exclusion)
                    self._start_attempt()
                    continue
                self._events.agent(names.RESTART, reason="failure")
                if not self._backoff(self._policy.delay(self.group.restart_count + 1)):
                    return self._stop_by_signal(self._stop_signal or signal.SIGTERM)
                self._start_attempt(failed=True)
            elif self._membership_changed:
                self._regroup(during="run")

    # -- steps --------------------------------------------------------------------------

    def _lease_lapsed(self, exits: list[WorkerExit]) -> bool:
        """This node's membership may have lapsed (no heartbeat got through for the
        heartbeat timeout) while its workers ran: ``exits`` are of workers the guardian
        may already have killed for it."""
        lease = self._lease
        running = exits or self._has_running_workers()
        return lease is not None and bool(running) and self._clock() >= lease

    def _fence(self, exits: list[WorkerExit]) -> None:
        """Kill the workers of a node that may have been dropped from the job, before
        the others' new world starts (two worlds must not run at once), then join again
        as a new node once the store can be reached. No restart is spent: ``exits`` (the
        guardian's kills, when this agent could not act in time) are not failures."""
        log.error(
            "lost contact with the rendezvous store: this node's membership lapsed (no "
            "heartbeat got through); killing its workers so that two worlds never run at "
            "once, then joining again"
        )
        self._events.agent(names.FENCED)
        for exit_ in exits:
            self._record_exit(dataclasses.replace(exit_, stopped_by_agent=True))
        self._stop_workers(signal.SIGKILL)
        self._events.agent(names.RESTART, reason="fenced")
        self._start_attempt()

    def _regroup(self, during: str) -> None:
        """The job's membership changed: stop, re-form and start again, no restart spent."""
        self._events.agent(names.MEMBERSHIP_CHANGED, during=during)
        self._stop_workers(signal.SIGTERM)
        self._events.agent(names.RESTART, reason="membership_change")
        self._start_attempt()

    def _start_attempt(self, failed: bool = False) -> None:
        """Rendezvous, assign ranks, start every worker; the group becomes HEALTHY.
        ``failed``: the previous attempt failed (one restart of the job's budget)."""
        group, spec = self.group, self.spec
        # Before the last attempt is forgotten: a refusal ends the run with its report.
        if (refusal := self._out.check()) is not None:
            self._out.until_checks_pass(refusal)
        self._attempt = Attempt(spec.local_world_size, self._paths)
        self.usage.clear()
        group.state = WorkerState.INIT
        self._put_state()
        if self._hangs is not None:
            self._hangs.new_attempt()
        self._events.agent(names.RENDEZVOUS_JOIN, next_attempt=group.attempt + 1)
        t0 = self._clock()
        node = NodeInfo(spec.role, spec.local_world_size)
        info = self._calls.run(lambda: self._rdzv.next_round(node, failed))
        # Only now: a notification about the round we left is stale; what concerns the new
        # round, the backend reports from here on.
        self._membership_changed = False
        rdzv_s = self._clock() - t0
        join_round(group, info)
        group.restart_count += self._restarts_before
        self._network_env = collective_interface_env(
            info.master_addr, {**self._base_env, **spec.env}
        )
        self._metrics.put("workers.restarts", group.restart_count)
        self._metrics.put("rendezvous.duration_s", rdzv_s)
        self._events.agent(
            names.RENDEZVOUS_COMPLETE,
            round=info.round,
            group_rank=info.group_rank,
            group_world_size=info.group_world_size,
            duration_ms=round(rdzv_s * 1000, 3),
        )
        self._events.agent(
            names.RANKS_ASSIGNED,
            ranks=[w.global_rank for w in group.workers],
            role_ranks=[w.role_rank for w in group.workers],
            world_size=group.workers[0].world_size,
            master=f"{group.master_addr}:{group.master_port}",
        )
        self._attempt.starting()
        t_start = self._clock()
        pids = self._launcher.start([self._launch(w) for w in group.workers])
        self._attempt.started_at(self._clock())
        group.state = WorkerState.HEALTHY
        self._metrics.put("workers.start_latency_s", self._attempt.started - t_start)
        if self._failed_at is not None:
            self._metrics.put("recovery.duration_s", self._attempt.started - self._failed_at)
            self._failed_at = None
        self._put_state()
        for w in group.workers:
            w.pid = pids[w.local_rank]
            self._events.worker(
                WorkerStatus.START, w.global_rank, pid=w.pid, local_rank=w.local_rank
            )
        self._lifecycle.workers_started(group)
        if self._faults is not None:
            self._faults.attempt_started(
                self._clock(), group.attempt, group.group_rank, group.workers
            )
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

    def _launch(self, w: Worker) -> WorkerLaunch:
        """How to start worker ``w`` of the current attempt (its ranks are assigned)."""
        paths = self._paths(w.local_rank)
        env = worker_environment(
            self.group,
            w,
            run_id=self._context.run_id,
            base_env=self._base_env,
            error_file=str(paths.error_file),
        )
        hangs = self._hangs
        env.update(self._network_env)
        if hangs is not None:
            env.update(hangs.worker_env(paths, env))
        return WorkerLaunch.of(
            self.spec,
            w,
            env,
            paths,
            prefix=self._log_prefix,
            node=self._context.node,
            heartbeat=(hangs is not None and hangs.wants_heartbeat)
            or self._crash_loop.wants_steps
            or (self._faults is not None and self._faults.wants_steps),
        )

    def _paths(self, local_rank: int) -> WorkerLogPaths:
        return WorkerLogPaths.of(self._context.run_dir, self.group.attempt, local_rank)

    def _record_exit(self, exit_: WorkerExit) -> None:
        if exit_.max_rss:
            peak = self._peak_rss.get(exit_.global_rank, 0)
            self._peak_rss[exit_.global_rank] = max(peak, exit_.max_rss)
        self.group.workers[exit_.local_rank].pid = None
        self._witness.seen(exit_, self._clock())
        stop = self._stop_signal
        if stop is not None and not exit_.stopped_by_agent and answers(exit_, stop):
            exit_ = dataclasses.replace(exit_, stopped_by_agent=True)  # part of the stop
        status, failure = self._attempt.record(exit_)
        if failure is not None:
            self._metrics.put("workers.failures", 1, {"kind": failure.kind.name})
            if self._failed_at is None:
                self._failed_at = self._clock()
                self._out.report_failure()
            log.warning(
                "worker rank %d (pid %d) failed: %s",
                exit_.global_rank,
                exit_.pid,
                failure.describe(),
            )
        self._events.worker_exit(status, exit_, failure)

    def _wait_timeout(self) -> float | None:
        if not self._has_running_workers():
            return None
        timeouts = []
        if self._monitor:
            timeouts.append(self._monitor.seconds_until_due())
        deadlines = [self._lease]
        if self._hangs is not None:
            deadlines.append(self._hangs.next_deadline(self._launcher.activity()))
        if self._faults is not None:
            deadlines.append(self._faults.next_due())
        now = self._clock()
        timeouts += [max(0.0, d - now) for d in deadlines if d is not None]
        return min(timeouts, default=None)

    def _act_on_hangs(self) -> None:
        """Stop the trees of workers that hung or whose timer expired (stacks first)."""
        assert self._hangs is not None
        pids = {w.local_rank: w.pid for w in self.group.workers if w.pid is not None}
        activity = self._launcher.activity()
        for order in self._hangs.orders(activity, self._clock(), pids, self._paths):
            rank = self.group.workers[order.local_rank].global_rank
            log.error("worker rank %d: %s", rank, order.detail)
            self._events.agent(order.event, rank=rank, detail=order.detail, **order.metadata)
            if order.signal > 0 and self._attempt.killing(
                order.local_rank, order.kind, order.detail
            ):
                self._launcher.kill(order.local_rank, order.signal)

    def _inject(self, faults: FaultInjector) -> None:
        """Carry out the fault ``fault=...`` says is due (testing a restart path)."""
        injection = faults.due(self._clock(), self._launcher.furthest_step())
        if injection is None:
            return
        log.warning("injecting %s", injection.describe)
        self._injected.append(injection.describe)
        self._events.agent(names.FAULT_INJECTED, fault=injection.describe)
        if injection.local_rank < 0:  # the whole node lost: its guardian sweeps the workers
            logging.shutdown()
            os.kill(os.getpid(), signal.SIGKILL)
        deadly = injection.signal not in (signal.SIGSTOP, signal.SIGTSTP)
        if not deadly or self._attempt.killing(
            injection.local_rank, FailureKind.INJECTED, injection.describe
        ):
            self._launcher.kill(injection.local_rank, injection.signal)

    def _sample_resources(self) -> None:
        running = {w.local_rank: w.pid for w in self.group.workers if w.pid is not None}
        self.usage = self._monitor.sample(running) if self._monitor else {}
        for local_rank, usage in self.usage.items():
            rank = self.group.workers[local_rank].global_rank
            self._peak_rss[rank] = max(self._peak_rss.get(rank, 0), usage.rss)
            labels = {"rank": str(rank)}
            self._metrics.put("worker.rss_bytes", usage.rss, labels)
            self._metrics.put("worker.cpu_percent", usage.cpu_percent, labels)
            limit = self._memory_limit
            if not limit or usage.rss <= limit:
                continue
            why = f"RSS {format_bytes(usage.rss)} > job.limits.memory {format_bytes(limit)}"
            if self._attempt.killing(local_rank, FailureKind.MEMORY_LIMIT, why):
                log.warning("worker rank %d is over its memory limit (%s): killing it", rank, why)
                self._launcher.kill(local_rank)

    def _backoff(self, delay: float) -> bool:
        """Wait ``delay`` seconds before a restart; False if a stop signal came first."""
        if delay <= 0:
            return True
        log.info("restarting in %.1f s (restart.backoff)", delay)
        deadline = self._clock() + delay
        while self._stop_signal is None and (left := deadline - self._clock()) > 0:
            self._launcher.wait(left)
        return self._stop_signal is None

    def _stop_workers(self, sig: int) -> None:
        self._attempt.stopping()  # what the workers recorded until now predates the stop
        for exit_ in self._launcher.stop(sig, self.spec.stop_timeout):
            self._record_exit(exit_)
        if self.group.state != WorkerState.STOPPED:
            self.group.state = WorkerState.STOPPED
            self._put_state()

    def _await_failing_workers(self) -> None:
        """Workers that recorded their own error before the stop are on their way out:
        up to ``FAILING_GRACE`` s for them to exit with their own code, so that a root
        cause still unwinding (its traceback, atexit) when another rank exited is
        reported as exit code 1, not as killed by the stop. Costs nothing otherwise."""
        failing = self._attempt.recorded_errors
        deadline = self._clock() + min(FAILING_GRACE, self.spec.stop_timeout)
        while any(self.group.workers[r].pid is not None for r in failing):
            left = deadline - self._clock()
            if left <= 0:
                return
            for exit_ in self._launcher.wait(left):
                self._record_exit(exit_)

    def _put_state(self) -> None:
        self._metrics.put("group.state", 1, {"state": self.group.state.value})

    def _has_running_workers(self) -> bool:
        return any(w.pid is not None for w in self.group.workers)

    def _stop_by_signal(self, signum: int) -> RunResult:
        name = signal.Signals(signum).name
        sent = signum if signum in self._forward_signals else signal.SIGTERM
        # Before passing the signal on: did the workers get it from outside too? Asked
        # before leaving: a leave may wait a second for a store whose host got the signal
        # too and left, and the workers' ends seen after it would look the agent's own.
        self._witness.await_answer(
            self._launcher.wait, self._clock, self._has_running_workers, self._record_exit
        )
        self._rdzv.leave(f"stopped by {name}")  # the others stop waiting for this node now
        outside = self._witness.from_outside(signum)
        preempted = signum in self._preempt
        why = stop_reason(name, outside=outside, preempted=preempted)
        # From outside, the workers got it already: a second one could cut a checkpoint.
        again = not outside or sent != signum
        log.warning(
            "%s: %s (grace %g s, then SIGKILL)",
            why,
            f"sending {signal.Signals(sent).name} to the workers"
            if again
            else "the workers got it too: waiting for them",
            self.spec.stop_timeout,
        )
        self._events.agent(
            names.SIGNAL,
            signal=name,
            sent=signal.Signals(sent).name if again else None,
            origin="outside" if outside else "agent",
            preempted=preempted,
            gap_ms=None if (gap := self._witness.gap(signum)) is None else round(gap * 1e3, 3),
        )
        self._stop_workers(sent if again else 0)
        result = self._finish(WorkerState.FAILED, why)
        result.signal, result.from_outside, result.preempted = signum, outside, preempted
        return result

    def _finish(self, state: WorkerState, reason: str = "") -> RunResult:
        # Sweep what the attempt's processes left behind, whatever the outcome.
        self._stop_workers(signal.SIGTERM)
        self.group.state = state
        self._put_state()
        self._metrics.put("workers.restarts", self.group.restart_count)
        self._events.agent(names.status(state), reason=reason)
        return RunResult(
            state=state,
            attempts=self.group.attempt,
            restart_count=self.group.restart_count,
            exits=sorted(self._attempt.exits.values(), key=lambda e: e.local_rank),
            failures=self._attempt.failures,
            peak_rss=dict(self._peak_rss),
            ended_because=reason,
            started_at=self._attempt.started_wall,
            no_progress=self._no_progress,
            injected=list(self._injected),
            excluded=list(self._out.excluded),
        )
