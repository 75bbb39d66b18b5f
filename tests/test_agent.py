"""The agent's state machine with typed fakes (tests/fakes.py): no process, no sleep.

Every policy of the loop is driven through ``ElasticAgent.run()``; the fake launcher moves
the fake clock in ``wait(timeout)``, so the tests read what the loop decided from the
RunResult, the events, the launcher's calls and the clock.
"""

from __future__ import annotations

import itertools
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from elastic_runner.agent import ElasticAgent
from elastic_runner.crash_loop import CrashLoopJudge
from elastic_runner.events import names
from elastic_runner.exclusion import ExclusionJudge
from elastic_runner.lifecycle import Lifecycle, Refusal
from elastic_runner.metrics import NoMetrics
from elastic_runner.rendezvous.api import (
    NodeInfo,
    RendezvousError,
    RendezvousHandler,
    RendezvousInfo,
)
from elastic_runner.spec import (
    EXIT_NO_PROGRESS,
    FailureKind,
    RestartPolicy,
    RunContext,
    RunResult,
    WorkerSpec,
    WorkerState,
    WorkerStatus,
)
from elastic_runner.timer.api import TimerExpiry
from elastic_runner.watchdog import HangDetector, Watchdog
from elastic_runner.workers.resources import ResourceMonitor, Usage
from tests.fakes import (
    ExitAt,
    FakeClock,
    FakeLauncher,
    FakeMonitor,
    FakeRendezvous,
    FakeTimerServer,
    Kill,
    RecordingLifecycle,
    RecordingSink,
    all_succeed,
)

GiB = 1 << 30


@dataclass
class Rig:
    """An agent wired to fakes, and the fakes, to drive and inspect it."""

    agent: ElasticAgent
    launcher: FakeLauncher
    rdzv: FakeRendezvous
    events: RecordingSink
    clock: FakeClock

    def run(self) -> RunResult:
        return self.agent.run()


def make_agent(
    tmp_path: Path,
    script: list[list[ExitAt]],
    *,
    nproc: int = 2,
    max_restarts: int = 0,
    policy: RestartPolicy | None = None,
    forward_signals: frozenset[int] = frozenset(),
    stop_signals: frozenset[int] = frozenset(),
    lifecycle: Lifecycle | None = None,
    monitor: ResourceMonitor | None = None,
    memory_limit: int | None = None,
    hangs: HangDetector | None = None,
    timers: FakeTimerServer | None = None,
    rdzv: FakeRendezvous | None = None,
    lease_listener: Callable[[float | None], None] | None = None,
    kill_delay: float = 0.0,
    stop_seconds: float = 0.0,
    chatty: frozenset[int] = frozenset(),
    steps: list[int | None] | None = None,
    crash_loop: CrashLoopJudge | None = None,
    checks_retry: tuple[float, float] = (0.0, 10.0),
    exclusion: ExclusionJudge | None = None,
) -> Rig:
    spec = WorkerSpec("default", nproc, ("worker",), max_restarts=max_restarts, stop_timeout=30)
    clock = FakeClock()
    launcher = FakeLauncher(
        clock,
        script,
        kill_delay=kill_delay,
        stop_seconds=stop_seconds,
        chatty=chatty,
        steps=steps or (),
    )
    rdzv = rdzv or FakeRendezvous()
    handler: RendezvousHandler = rdzv  # (mypy: the fake is a whole handler)
    events = RecordingSink()
    agent = ElasticAgent(
        spec,
        handler,
        launcher,
        context=RunContext("rid", tmp_path, "node0"),
        events=events,
        metrics=NoMetrics(),
        base_env={},
        forward_signals=forward_signals,
        stop_signals=stop_signals,
        restart_policy=policy,
        crash_loop=crash_loop,
        checks_retry=checks_retry,
        exclusion=exclusion,
        monitor=monitor,
        memory_limit=memory_limit,
        lifecycle=lifecycle,
        hangs=hangs,
        timers=timers,
        lease_listener=lease_listener,
        clock=clock,
    )
    return Rig(agent, launcher, rdzv, events, clock)


def fail(rank: int = 1, code: int = 3, at: float = 1.0) -> list[ExitAt]:
    """An attempt in which worker ``rank`` exits ``code`` at ``at`` (the others run on)."""
    return [ExitAt(rank, code, at)]


# -- the basic cycle --------------------------------------------------------------------


def test_happy_path_succeeds_without_spending_restarts(tmp_path: Path) -> None:
    rig = make_agent(tmp_path, [[ExitAt(0, 0, 1), ExitAt(1, 0, 2)]], max_restarts=3)
    result = rig.run()
    assert result.state == WorkerState.SUCCEEDED
    assert result.exit_code == 0
    assert (result.attempts, result.restart_count) == (1, 0)
    assert rig.rdzv.rounds == 1 and rig.rdzv.shutdowns == 1 and rig.rdzv.barriers == 1
    assert rig.events.names().count(WorkerStatus.START) == 2
    assert rig.events.names()[-2:] == [names.status(WorkerState.SUCCEEDED), names.SHUTDOWN]
    assert rig.launcher.waits == [None, None]  # one wait per exit, no polling


def test_event_sequence_of_a_run_with_one_restart(tmp_path: Path) -> None:
    rig = make_agent(tmp_path, [fail(1, 3), all_succeed(2)], max_restarts=1)
    rig.run()
    assert rig.events.names() == [
        names.RENDEZVOUS_JOIN,
        names.RENDEZVOUS_COMPLETE,
        names.RANKS_ASSIGNED,
        "START",
        "START",
        "FAILED",  # rank 1, exit code 3
        "TERMINATED",  # rank 0, stopped by the agent
        names.RESTART,
        names.RENDEZVOUS_JOIN,
        names.RENDEZVOUS_COMPLETE,
        names.RANKS_ASSIGNED,
        "START",
        "START",
        "SUCCEEDED",
        "SUCCEEDED",
        names.status(WorkerState.SUCCEEDED),
        names.SHUTDOWN,
    ]
    failed = next(e for e in rig.events.events if e.state == "FAILED")
    assert (failed.rank, failed.metadata["failure"], failed.metadata["exit_code"]) == (
        1,
        "EXIT_CODE",
        3,
    )
    assigned = rig.events.named(names.RANKS_ASSIGNED)
    assert assigned[1].metadata["ranks"] == [0, 1] and assigned[1].metadata["restart_count"] == 1
    assert {e.run_id for e in rig.events.events} == {"rid"}
    assert {e.node for e in rig.events.events} == {"node0"}


def test_failure_stops_the_group_and_restarts_it(tmp_path: Path) -> None:
    rig = make_agent(tmp_path, [fail(1, 3), all_succeed(2)], max_restarts=1)
    result = rig.run()
    assert result.state == WorkerState.SUCCEEDED
    assert (result.attempts, result.restart_count) == (2, 1)
    assert rig.rdzv.joins == [False, True]  # the second round spends a restart
    assert rig.launcher.stops[0] == signal.SIGTERM  # rank 0 stopped after rank 1 failed
    env = rig.launcher.launches[1][0].env
    assert env["TORCHELASTIC_RESTART_COUNT"] == "1"
    assert env["TORCHELASTIC_ERROR_FILE"].endswith("attempt_2/0/error.json")
    assert "TERMINATED" in rig.events.names() and "FAILED" in rig.events.names()


def test_exhausted_restarts_fail_after_max_plus_one_attempts(tmp_path: Path) -> None:
    rig = make_agent(tmp_path, [fail(0, 1)] * 4, max_restarts=3)
    result = rig.run()
    assert result.state == WorkerState.FAILED and result.exit_code == 1
    assert result.attempts == 4 and result.restart_count == 3
    assert result.ended_because == "restarts used up (max_restarts=3)"
    assert rig.rdzv.failed_with == result.ended_because
    assert rig.rdzv.barriers == 0  # none on failure
    assert [f.exit.global_rank for f in result.failures] == [0]
    assert [e.stopped_by_agent for e in result.exits] == [False, True]


def test_restarts_that_never_pass_a_step_end_the_job_as_no_progress(tmp_path: Path) -> None:
    rig = make_agent(
        tmp_path,
        [fail(0, 1)] * 10,
        max_restarts=9,
        steps=[3, 3, 2, 3],
        crash_loop=CrashLoopJudge(limit=3),
    )
    result = rig.run()
    assert result.state == WorkerState.FAILED and result.no_progress
    assert result.exit_code == EXIT_NO_PROGRESS == 93
    assert (result.attempts, result.restart_count) == (4, 3)
    assert result.ended_because.startswith("no progress: 3 restarts in a row")
    assert "step 3" in result.ended_because
    assert rig.rdzv.failed_with == result.ended_because  # the other nodes learn why


def test_progress_resets_the_count(tmp_path: Path) -> None:
    rig = make_agent(
        tmp_path,
        [fail(0, 1)] * 7,
        max_restarts=6,
        steps=[3, 3, 3, 5, 5, 5, 5],
        crash_loop=CrashLoopJudge(limit=3),
    )
    result = rig.run()
    assert result.no_progress and result.attempts == 7 and "step 5" in result.ended_because


def test_without_steps_no_verdict_unless_asked(tmp_path: Path) -> None:
    rig = make_agent(tmp_path, [fail(0, 1)] * 5, max_restarts=4, crash_loop=CrashLoopJudge(3))
    result = rig.run()
    assert not result.no_progress and result.exit_code == 1 and result.attempts == 5
    rig = make_agent(
        tmp_path,
        [fail(0, 1, at=0.5)] * 6,
        max_restarts=5,
        crash_loop=CrashLoopJudge(3, min_uptime=2.0),
    )
    result = rig.run()
    assert result.no_progress and result.attempts == 4
    assert "within 2 s of starting" in result.ended_because


def test_membership_change_regroups_without_spending_a_restart(tmp_path: Path) -> None:
    rig = make_agent(tmp_path, [[], all_succeed(2)], max_restarts=0)
    rig.launcher.at(5.0, rig.rdzv.change_membership)
    result = rig.run()
    assert result.state == WorkerState.SUCCEEDED
    assert (result.attempts, result.restart_count, rig.rdzv.joins) == (2, 0, [False, False])
    assert rig.launcher.launches[1][0].env["TORCHELASTIC_RESTART_COUNT"] == "0"
    assert rig.launcher.starts == [0.0, 5.0]
    assert rig.events.named(names.MEMBERSHIP_CHANGED)[0].metadata["during"] == "run"
    assert rig.events.named(names.RESTART)[0].metadata["reason"] == "membership_change"


@pytest.mark.parametrize(
    ("signum", "forward", "sent"),
    [
        (signal.SIGTERM, {signal.SIGTERM}, signal.SIGTERM),
        (signal.SIGUSR1, {signal.SIGUSR1}, signal.SIGUSR1),
        (signal.SIGUSR1, {signal.SIGTERM}, signal.SIGTERM),
    ],
)
def test_stop_signal_forwards_it_and_exits_128_plus_n(
    tmp_path: Path, signum: int, forward: set[int], sent: int
) -> None:
    rig = make_agent(tmp_path, [[]], max_restarts=5, forward_signals=frozenset(forward))
    rig.launcher.at(5.0, lambda: rig.agent.request_stop(signum))
    result = rig.run()
    assert rig.launcher.stops[0] == sent
    assert result.exit_code == 128 + signum
    assert result.failures == []
    assert [e.returncode for e in result.exits] == [-sent, -sent]


def test_a_signal_every_process_got_is_from_outside_though_the_store_answers_late(
    tmp_path: Path,
) -> None:
    # Slurm's scancel: the agent and its workers get SIGTERM together; the store's host got
    # it too and is gone, so telling the others this node left waits out its 1 s.
    class LateStore(FakeRendezvous):
        def leave(self, reason: str) -> None:
            rig.clock.advance(1.0)
            super().leave(reason)

    term = signal.SIGTERM
    rig = make_agent(
        tmp_path,
        [[ExitAt(0, -term, 5.01), ExitAt(1, -term, 5.02)]],
        forward_signals=frozenset({term}),
        stop_signals=frozenset({term}),
        rdzv=LateStore(),
    )
    rig.launcher.at(5.0, lambda: rig.agent.request_stop(term))
    result = rig.run()
    assert result.from_outside
    assert (
        result.ended_because
        == "stopped by SIGTERM from outside (the scheduler signalled every process)"
    )
    assert rig.launcher.stops[0] == 0  # not sent again: it could cut a checkpoint short
    assert rig.rdzv.left_with == "stopped by SIGTERM"


def test_ranks_and_master_come_from_the_round(tmp_path: Path) -> None:
    rig = make_agent(tmp_path, [all_succeed(3)], nproc=3)
    rig.run()
    envs = [la.env for la in rig.launcher.launches[0]]
    assert [e["RANK"] for e in envs] == ["0", "1", "2"]
    assert {e["MASTER_PORT"] for e in envs} == {"29501"}
    assert [la.prefix for la in rig.launcher.launches[0]] == [f"[default{i}]: " for i in range(3)]


# -- backoff ----------------------------------------------------------------------------

BACKOFF = RestartPolicy(backoff_initial=2, backoff_factor=3, backoff_max=10)


def test_backoff_grows_by_its_factor_up_to_its_max(tmp_path: Path) -> None:
    rig = make_agent(tmp_path, [fail(at=1)] * 3 + [all_succeed(2)], max_restarts=3, policy=BACKOFF)
    result = rig.run()
    assert result.state == WorkerState.SUCCEEDED
    assert (result.attempts, result.restart_count) == (4, 3)
    starts = rig.launcher.starts
    # each failing attempt fails 1 s after its start; then the wait before restart n
    assert [nxt - (start + 1) for start, nxt in itertools.pairwise(starts)] == [2, 6, 10]
    assert starts == [0, 3, 10, 21]
    # one timed wait per backoff: the loop sleeps, it does not poll
    assert [t for t in rig.launcher.waits if t is not None] == [2, 6, 10]


def test_stop_signal_during_backoff_ends_the_run_without_another_attempt(
    tmp_path: Path,
) -> None:
    rig = make_agent(tmp_path, [fail(at=1), all_succeed(2)], max_restarts=3, policy=BACKOFF)
    rig.launcher.at(2.0, lambda: rig.agent.request_stop(signal.SIGINT))  # backoff: 1 s -> 3 s
    result = rig.run()
    assert result.state == WorkerState.FAILED
    assert result.signal == signal.SIGINT and result.exit_code == 128 + signal.SIGINT
    assert result.ended_because == "stopped by SIGINT"
    assert rig.clock.now == 2.0  # woken at once, not at the end of the backoff
    assert len(rig.launcher.starts) == 1 and rig.rdzv.rounds == 1
    assert (
        names.RENDEZVOUS_JOIN not in rig.events.names()[rig.events.names().index(names.RESTART) :]
    )
    assert rig.events.named(names.SIGNAL)[0].metadata == {
        "signal": "SIGINT",
        "sent": "SIGTERM",
        "origin": "agent",
        "preempted": False,
        "gap_ms": None,
        "attempt": 1,
        "restart_count": 0,
    }


# -- min_uptime / on_startup_failure ----------------------------------------------------


def test_a_startup_failure_ends_the_run_without_spending_a_restart(tmp_path: Path) -> None:
    lifecycle = RecordingLifecycle()
    policy = RestartPolicy(min_uptime=10, on_startup_failure=False)
    rig = make_agent(
        tmp_path, [fail(at=3), all_succeed(2)], max_restarts=3, policy=policy, lifecycle=lifecycle
    )
    result = rig.run()
    assert result.state == WorkerState.FAILED
    assert "startup failure" in result.ended_because
    assert result.ended_because.startswith("startup failure after 3.0 s")
    assert (result.attempts, result.restart_count) == (1, 0)
    assert rig.rdzv.joins == [False] and len(rig.launcher.starts) == 1
    assert rig.rdzv.failed_with == result.ended_because
    assert [will_restart for _, will_restart in lifecycle.failures] == [False]
    assert names.RESTART not in rig.events.names()


@pytest.mark.parametrize(
    ("fails_at", "on_startup_failure"),
    [
        (10.0, False),  # exactly min_uptime: not sooner, so no startup failure
        (12.0, False),
        (3.0, True),
    ],
)
def test_a_failure_restarts_after_min_uptime_or_when_startup_failures_restart(
    tmp_path: Path, fails_at: float, on_startup_failure: bool
) -> None:
    lifecycle = RecordingLifecycle()
    policy = RestartPolicy(min_uptime=10, on_startup_failure=on_startup_failure)
    rig = make_agent(
        tmp_path,
        [fail(at=fails_at), all_succeed(2)],
        max_restarts=3,
        policy=policy,
        lifecycle=lifecycle,
    )
    result = rig.run()
    assert result.state == WorkerState.SUCCEEDED
    assert (result.attempts, result.restart_count) == (2, 1)
    assert rig.rdzv.joins == [False, True]
    assert [will_restart for _, will_restart in lifecycle.failures] == [True]


def test_uptime_is_measured_at_the_failure_not_after_stopping_the_others(
    tmp_path: Path,
) -> None:
    policy = RestartPolicy(min_uptime=10, on_startup_failure=False)
    # rank 1 fails 3 s in; rank 0 then takes 30 s (its whole stop_timeout) to stop
    rig = make_agent(
        tmp_path, [fail(at=3), all_succeed(2)], max_restarts=3, policy=policy, stop_seconds=30
    )
    result = rig.run()
    assert result.state == WorkerState.FAILED
    assert result.ended_because.startswith("startup failure after 3.0 s")


# -- health check -----------------------------------------------------------------------


def test_a_node_out_checks_again_and_joins_once_its_checks_pass(tmp_path: Path) -> None:
    out = Refusal("check:disk:/data", "/data: 1.0 GiB free, 50.0 GiB needed")
    lifecycle = RecordingLifecycle(refusals=[out, out, None])
    rig = make_agent(tmp_path, [all_succeed(2)], lifecycle=lifecycle, checks_retry=(60, 5))
    result = rig.run()
    assert result.state == WorkerState.SUCCEEDED
    assert lifecycle.health_checks == [(1, 0)] * 3
    assert rig.clock.now >= 10  # two pauses of checks.retry_interval
    outs = [e for e in rig.events.events if e.name == names.NODE_OUT]
    assert len(outs) == 1 and outs[0].metadata["reason"] == out.reason  # once per reason
    assert rig.rdzv.joins == [False]  # joined once, after the checks passed


def test_a_node_out_for_longer_than_retry_for_leaves_the_job(tmp_path: Path) -> None:
    out = Refusal("check:gpus", "8 GPUs needed; 7 NVIDIA GPUs")
    lifecycle = RecordingLifecycle(refusals=[out] * 100)
    rig = make_agent(tmp_path, [], lifecycle=lifecycle, checks_retry=(12, 5))
    result = rig.run()
    assert result.state == WorkerState.FAILED and result.ended_because == out.describe()
    assert 12 <= rig.clock.now < 20 and rig.rdzv.joins == []


def test_a_refusing_health_check_ends_the_run_before_the_next_round(tmp_path: Path) -> None:
    refusal = Refusal("gpu-check", "GPU 1 fell off the bus")
    lifecycle = RecordingLifecycle(refuse_at={2: refusal})
    rig = make_agent(tmp_path, [fail(1, 3), all_succeed(2)], max_restarts=3, lifecycle=lifecycle)
    result = rig.run()
    assert result.state == WorkerState.FAILED and result.exit_code == 1
    assert result.ended_because == refusal.describe()
    assert "'gpu-check'" in result.ended_because
    assert lifecycle.health_checks == [(1, 0), (2, 0)]
    assert rig.rdzv.joins == [False]  # no further round joined
    assert len(rig.launcher.starts) == 1
    assert rig.rdzv.shutdowns == 1
    # the report still has the attempt whose failure led here
    assert result.attempts == 1 and result.started_at > 0
    assert [f.exit.global_rank for f in result.failures] == [1]
    assert sorted(e.local_rank for e in result.exits) == [0, 1]
    refused = rig.events.named(names.HEALTH_CHECK_REFUSED)
    assert len(refused) == 1
    assert (refused[0].metadata["plugin"], refused[0].metadata["reason"]) == (
        "gpu-check",
        "GPU 1 fell off the bus",
    )
    assert rig.events.names()[-4:] == [
        names.RESTART,
        names.HEALTH_CHECK_REFUSED,
        names.status(WorkerState.FAILED),
        names.SHUTDOWN,
    ]


# -- memory limit -----------------------------------------------------------------------


def test_the_memory_limit_kills_the_rank_once_and_the_run_restarts(tmp_path: Path) -> None:
    monitor = FakeMonitor({1: Usage(cpu_percent=50.0, rss=3 * GiB, processes=2)}, interval=1)
    rig = make_agent(
        tmp_path,
        [all_succeed(2, at=100)] * 2,
        max_restarts=1,
        monitor=monitor,
        memory_limit=2 * GiB,
        kill_delay=1.5,  # rank 1 takes a while to die: the next sample still sees it
    )
    result = rig.run()
    # attempt 1: sampled at 1 s (kill), 2 s (still over: no second kill), exit at 2.5 s;
    # attempt 2 starts at 2.5 s: the same again
    assert rig.launcher.kills == [Kill(1, signal.SIGKILL, 1.0), Kill(1, signal.SIGKILL, 3.5)]
    assert [1 in roots for roots in monitor.samples[:2]] == [True, True]
    assert rig.launcher.starts == [0.0, 2.5]
    assert result.state == WorkerState.FAILED
    assert (result.attempts, result.restart_count) == (2, 1)
    assert result.ended_because == "restarts used up (max_restarts=1)"
    [failure] = result.failures
    assert failure.exit.local_rank == 1 and failure.exit.returncode == -signal.SIGKILL
    assert failure.kind == FailureKind.MEMORY_LIMIT
    assert failure.detail == "RSS 3.0 GiB > job.limits.memory 2.0 GiB"
    assert result.peak_rss[1] == 3 * GiB
    failed = [e for e in rig.events.events if e.state == "FAILED" and e.source == "WORKER"]
    assert [(e.rank, e.metadata["failure"]) for e in failed] == [(1, "MEMORY_LIMIT")] * 2


# -- hangs ------------------------------------------------------------------------------


def test_the_watchdog_kills_a_silent_rank_once_at_its_deadline(tmp_path: Path) -> None:
    hangs = HangDetector(Watchdog(no_output_timeout=30), stacks=None)
    rig = make_agent(
        tmp_path,
        [all_succeed(2, at=1000)],
        hangs=hangs,
        chatty=frozenset({1}),  # rank 1 keeps writing; rank 0 is silent from its start
        kill_delay=0.5,
    )
    result = rig.run()
    assert rig.launcher.kills == [Kill(0, signal.SIGKILL, 30.0)]
    # slept until the deadline in one wait, then (the watchdog has fired) until the exit
    assert rig.launcher.waits == [30.0, None]
    assert rig.clock.now == 30.5
    fired = rig.events.named(names.WATCHDOG_FIRED)
    assert [(e.metadata["rank"], e.metadata["reason"]) for e in fired] == [
        (0, "no output for 30 s (watchdog.no_output_timeout)")
    ]
    assert result.state == WorkerState.FAILED
    [failure] = result.failures
    assert failure.exit.local_rank == 0 and failure.kind == FailureKind.WATCHDOG
    assert failure.detail.startswith("hung: no output for 30 s")
    assert [e.stopped_by_agent for e in result.exits] == [False, True]


def test_an_expired_timer_kills_its_rank_once_with_its_signal(tmp_path: Path) -> None:
    timers = FakeTimerServer()
    hangs = HangDetector(Watchdog(), stacks=None)  # no watchdog: timers only
    rig = make_agent(tmp_path, [all_succeed(2, at=1000)], hangs=hangs, timers=timers)

    def expire() -> None:  # two timers of rank 0 expire together
        pid = rig.launcher.pid_of(0)
        timers.expire(TimerExpiry(pid, "step", 5.0, signal.SIGTERM))
        timers.expire(TimerExpiry(pid, "epoch", 60.0, signal.SIGTERM))

    rig.launcher.at(5.0, expire)
    result = rig.run()
    assert rig.launcher.kills == [Kill(0, signal.SIGTERM, 5.0)]
    assert rig.launcher.waits == [None, None]  # no deadline without a watchdog
    expired = rig.events.named(names.TIMER_EXPIRED)
    assert [(e.metadata["rank"], e.metadata["scope"]) for e in expired] == [
        (0, "step"),
        (0, "epoch"),
    ]
    [failure] = result.failures
    assert failure.exit.returncode == -signal.SIGTERM
    assert failure.kind == FailureKind.TIMER
    assert failure.detail.startswith("timer for scope step expired after 5 s")  # first wins


def test_a_timer_that_asks_for_no_signal_is_only_reported(tmp_path: Path) -> None:
    timers = FakeTimerServer()
    hangs = HangDetector(Watchdog(), stacks=None)
    rig = make_agent(tmp_path, [all_succeed(2, at=10)], hangs=hangs, timers=timers)
    rig.launcher.at(5.0, lambda: timers.expire(TimerExpiry(rig.launcher.pid_of(1), "step", 5.0, 0)))
    result = rig.run()
    assert result.state == WorkerState.SUCCEEDED
    assert rig.launcher.kills == []
    assert [e.metadata["rank"] for e in rig.events.named(names.TIMER_EXPIRED)] == [1]


# -- exit barrier -----------------------------------------------------------------------


def test_a_job_that_reforms_at_the_exit_barrier_runs_again_without_spending_a_restart(
    tmp_path: Path,
) -> None:
    rdzv = FakeRendezvous(barrier_results=[False])  # then True
    rig = make_agent(tmp_path, [all_succeed(2), all_succeed(2)], max_restarts=0, rdzv=rdzv)
    result = rig.run()
    assert result.state == WorkerState.SUCCEEDED
    assert (result.attempts, result.restart_count) == (2, 0)
    assert rdzv.barriers == 2 and rdzv.joins == [False, False]
    assert [la.env["TORCHELASTIC_RESTART_COUNT"] for la in rig.launcher.launches[1]] == ["0"] * 2
    [changed] = rig.events.named(names.MEMBERSHIP_CHANGED)
    assert changed.metadata["during"] == "exit barrier"
    [restart] = rig.events.named(names.RESTART)
    assert restart.metadata["reason"] == "membership_change"
    assert restart.metadata["restart_count"] == 0
    first_success = rig.events.names().index("SUCCEEDED")
    assert rig.events.names()[first_success : first_success + 4] == [
        "SUCCEEDED",
        "SUCCEEDED",
        names.MEMBERSHIP_CHANGED,
        names.RESTART,
    ]


# -- prompt stops and fencing ---------------------------------------------------------


class BlockingRendezvous(FakeRendezvous):
    """Round ``block_round`` (0-based) or, with ``block_barrier``, the exit barrier waits
    for other nodes that never come: only ``leave`` ends the wait. ``on_block`` runs once
    the call is waiting (from the call's thread, as a signal would arrive)."""

    def __init__(self, *, block_round: int | None = None, block_barrier: bool = False) -> None:
        super().__init__()
        self.block_round, self.block_barrier = block_round, block_barrier
        self.on_block: Callable[[], None] = lambda: None
        self.released = threading.Event()

    def _block(self) -> None:
        self.on_block()
        assert self.released.wait(10), "the agent never left the job"

    def next_round(self, node: NodeInfo, failed: bool = False) -> RendezvousInfo:
        if self.rounds == self.block_round:
            self._block()
            raise RendezvousError("this node is leaving the job")
        return super().next_round(node, failed)

    def exit_barrier(self) -> bool:
        if self.block_barrier:
            self._block()
        return super().exit_barrier()

    def leave(self, reason: str) -> None:
        super().leave(reason)
        self.released.set()


@pytest.mark.parametrize("block", ["first round", "round after a failure", "exit barrier"])
def test_a_stop_signal_ends_a_rendezvous_wait_at_once(tmp_path: Path, block: str) -> None:
    rdzv = BlockingRendezvous(
        block_round={"first round": 0, "round after a failure": 1}.get(block),
        block_barrier=block == "exit barrier",
    )
    script = [all_succeed(2)] if block != "round after a failure" else [fail(1, 3)]
    rig = make_agent(tmp_path, script, max_restarts=3, rdzv=rdzv)
    rdzv.on_block = lambda: rig.agent.request_stop(signal.SIGTERM)
    result = rig.run()
    assert result.exit_code == 128 + signal.SIGTERM
    assert result.ended_because == "stopped by SIGTERM"
    assert rdzv.left_with == "stopped by SIGTERM"  # the others stop waiting for it
    assert rdzv.shutdowns == 1
    assert rig.events.named(names.SIGNAL)[0].metadata["signal"] == "SIGTERM"
    assert rig.events.names()[-1] == names.SHUTDOWN
    if block == "exit barrier":  # the workers had succeeded: a stop, not a success
        assert [e.returncode for e in result.exits] == [0, 0]


def test_a_lapsed_lease_kills_the_workers_and_joins_again(tmp_path: Path) -> None:
    class LapsingRendezvous(FakeRendezvous):
        def next_round(self, node: NodeInfo, failed: bool = False) -> RendezvousInfo:
            # the first round's lease lapses at 5 s; the next round's holds
            self.set_lease(5.0 if not self.joins else 1000.0)
            return super().next_round(node, failed)

    rdzv = LapsingRendezvous()
    told: list[float | None] = []
    rig = make_agent(
        tmp_path, [all_succeed(2, at=100), all_succeed(2)], rdzv=rdzv, lease_listener=told.append
    )
    result = rig.run()
    assert told == [5.0, 1000.0]  # the guardian hears every lease too
    assert result.state == WorkerState.SUCCEEDED
    assert (result.attempts, result.restart_count) == (2, 0)  # no restart spent
    assert rdzv.joins == [False, False]
    # it slept until the lease's end, then killed every worker of the first attempt
    assert rig.launcher.waits[0] == 5.0
    assert rig.launcher.stops[0] == signal.SIGKILL and rig.launcher.starts == [0.0, 5.0]
    assert rig.events.named(names.FENCED)
    restart = rig.events.named(names.RESTART)
    assert [e.metadata["reason"] for e in restart] == ["fenced"]


def test_workers_the_guardian_fenced_are_not_failures(tmp_path: Path) -> None:
    """The agent was frozen past its lease: the guardian SIGKILLed the workers; when the
    agent wakes, their exits are the fence's, not failures (no restart is spent)."""

    class LapsingRendezvous(FakeRendezvous):
        def next_round(self, node: NodeInfo, failed: bool = False) -> RendezvousInfo:
            self.set_lease(5.0 if not self.joins else 1000.0)
            return super().next_round(node, failed)

    killed_by_guardian = [ExitAt(0, -signal.SIGKILL, 5.0), ExitAt(1, -signal.SIGKILL, 5.0)]
    rig = make_agent(tmp_path, [killed_by_guardian, all_succeed(2)], rdzv=LapsingRendezvous())
    result = rig.run()
    assert result.state == WorkerState.SUCCEEDED
    assert (result.attempts, result.restart_count) == (2, 0)
    first = [e for e in rig.events.events if e.source == "WORKER" and e.metadata["attempt"] == 1]
    assert {e.state for e in first} == {"START", "TERMINATED"}  # no FAILED
    assert rig.events.named(names.FENCED)


# -- exclusion: a node that keeps causing failures steps out for a cooldown -------------


def test_without_exclusion_no_failure_is_reported(tmp_path: Path) -> None:
    rig = make_agent(tmp_path, [fail(), fail(), all_succeed(2)], max_restarts=2)
    assert rig.run().state == WorkerState.SUCCEEDED
    assert rig.rdzv.failure_reports == [] and rig.rdzv.stepped_out == []


def test_the_root_cause_of_two_failures_steps_out_then_joins_again(tmp_path: Path) -> None:
    judge = ExclusionJudge(failures=2, window=60, cooldown=30)
    rig = make_agent(tmp_path, [fail(), fail(), all_succeed(2)], max_restarts=3, exclusion=judge)
    result = rig.run()
    assert result.state == WorkerState.SUCCEEDED
    rdzv = rig.rdzv
    assert len(rdzv.failure_reports) == 2  # one per failed attempt, not per rank
    assert rdzv.stepped_out == [
        "excluded for 30 s: the root cause of 2 failures within 60 s (exclusion.failures=2)"
    ]
    assert rdzv.sat_out == [2.0 + 30.0]  # the fake clock when it stepped out, plus 30 s
    # the second failure's restart was counted by step_out; the join after it is no failure
    assert rdzv.joins == [False, True, False] and result.restart_count == 2
    [excluded] = rig.events.named(names.NODE_EXCLUDED)
    assert excluded.metadata["cooldown"] == 30 and excluded.metadata["count"] == 1
    assert rig.events.named(names.NODE_IN)[0].metadata["after"] == "exclusion"
    assert result.excluded == [f"node node0 {rdzv.stepped_out[0]}"]
    assert (judge.excluded, list(judge.strikes)) == (1, [])


def test_a_node_that_is_not_the_root_cause_is_never_excluded(tmp_path: Path) -> None:
    rdzv = FakeRendezvous()
    rdzv.is_root_cause = False
    judge = ExclusionJudge(failures=1)
    rig = make_agent(tmp_path, [fail(), all_succeed(2)], max_restarts=1, rdzv=rdzv, exclusion=judge)
    assert rig.run().state == WorkerState.SUCCEEDED
    assert rdzv.failure_reports and rdzv.stepped_out == []


def test_a_node_the_job_cannot_spare_restarts_with_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    rdzv = FakeRendezvous()
    rdzv.can_spare = False
    judge = ExclusionJudge(failures=1)
    rig = make_agent(tmp_path, [fail(), all_succeed(2)], max_restarts=1, rdzv=rdzv, exclusion=judge)
    result = rig.run()
    assert result.state == WorkerState.SUCCEEDED and result.excluded == []
    assert rdzv.joins == [False, True] and rdzv.sat_out == []
    assert "the job cannot spare it" in caplog.text
    assert judge.excluded == 0  # not committed: the next failure judges again


def test_used_up_restarts_fail_the_job_rather_than_exclude(tmp_path: Path) -> None:
    rig = make_agent(tmp_path, [fail()], max_restarts=0, exclusion=ExclusionJudge(failures=1))
    assert rig.run().state == WorkerState.FAILED
    assert rig.rdzv.stepped_out == []
