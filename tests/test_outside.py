"""Signals from outside (elastic_runner.outside), with the agent's loop on fakes: the
agent and its workers get the same signal in either order; every order ends the same."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from elastic_runner.agent import ElasticAgent
from elastic_runner.events import names
from elastic_runner.metrics import NoMetrics
from elastic_runner.outside import WINDOW, SignalWitness, answers, killed_by, stop_reason
from elastic_runner.rendezvous.api import RendezvousHandler
from elastic_runner.spec import (
    EXIT_PREEMPTED,
    RunContext,
    RunResult,
    WorkerExit,
    WorkerSpec,
    WorkerState,
)
from tests.fakes import ExitAt, FakeClock, FakeLauncher, FakeRendezvous, RecordingSink

HANDLED = frozenset(
    {signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2}
)


def _exit(rc: int, stopped: bool = False) -> WorkerExit:
    return WorkerExit(0, 0, 1, rc, 0.0, stopped)


def test_what_answers_a_signal() -> None:
    assert killed_by(_exit(-15)) == 15 and killed_by(_exit(143)) == 15
    assert killed_by(_exit(1)) is None and killed_by(_exit(0)) is None
    assert answers(_exit(-15), 15) and answers(_exit(143), 15) and answers(_exit(0), 15)
    assert not answers(_exit(-9), 15) and not answers(_exit(1), 15)
    assert not answers(_exit(-10), 15)


def test_what_is_held() -> None:
    witness = SignalWitness(HANDLED | {signal.SIGKILL})
    assert witness.worth_holding([_exit(-15)], others_left=2)
    assert witness.worth_holding([_exit(138)], others_left=2)  # a shell's 128+SIGUSR1
    assert not witness.worth_holding([_exit(-9)], others_left=2)  # SIGKILL: never held
    assert not witness.worth_holding([_exit(1)], others_left=1)
    assert not witness.worth_holding([_exit(0)], others_left=2)  # another still runs
    assert witness.worth_holding([_exit(0), _exit(0)], others_left=2)  # the attempt ends
    assert not SignalWitness(()).worth_holding([_exit(-15)], others_left=1)  # off
    witness.received(1.0)
    assert not witness.worth_holding([_exit(-15)], others_left=1)  # the signal is here


def test_from_outside_is_within_the_window_either_side() -> None:
    witness = SignalWitness(HANDLED)
    witness.seen(_exit(-15), 1.0)
    witness.received(1.0 + WINDOW / 2)
    assert witness.from_outside(signal.SIGTERM)
    assert not witness.from_outside(signal.SIGUSR1)
    late = SignalWitness(HANDLED)
    late.received(1.0)
    late.seen(_exit(-15), 1.0 + WINDOW)  # the agent's own forward, after the window
    assert not late.from_outside(signal.SIGTERM)


def test_stop_reasons() -> None:
    assert stop_reason("SIGTERM", outside=False, preempted=False) == "stopped by SIGTERM"
    assert stop_reason("SIGTERM", outside=True, preempted=False) == (
        "stopped by SIGTERM from outside (the scheduler signalled every process)"
    )
    assert stop_reason("SIGUSR1", outside=False, preempted=True) == "preempted by SIGUSR1"


def _agent(
    tmp_path: Path,
    script: list[list[ExitAt]],
    *,
    preempt: frozenset[int] = frozenset(),
    resumed: tuple[int, int] = (0, 0),
    max_restarts: int = 3,
) -> tuple[ElasticAgent, FakeLauncher, RecordingSink, FakeClock]:
    clock = FakeClock()
    launcher = FakeLauncher(clock, script)
    rdzv: RendezvousHandler = FakeRendezvous()
    events = RecordingSink()
    spec = WorkerSpec("default", 2, ("worker",), max_restarts=max_restarts, stop_timeout=30)
    agent = ElasticAgent(
        spec,
        rdzv,
        launcher,
        context=RunContext("rid", tmp_path, "node0"),
        events=events,
        metrics=NoMetrics(),
        base_env={},
        forward_signals=HANDLED,
        stop_signals=HANDLED,
        preempt_signals=preempt,
        resumed=resumed,
        clock=clock,
    )
    return agent, launcher, events, clock


def _outcome(result: RunResult) -> tuple[WorkerState, int, int | None, bool, str, int]:
    return (
        result.state,
        result.exit_code,
        result.signal,
        result.from_outside,
        result.ended_because,
        len(result.failures),
    )


# (what the workers do on the signal, when the agent gets it relative to the first end)
ORDERS = [
    # the workers die of it: the agent's signal after (1, 10, 40 ms), at once, or before
    ("die", 0.001),
    ("die", 0.010),
    ("die", 0.040),
    ("die", 0.0),
    ("die", -0.010),
    # they catch it and exit 0 (a checkpoint)
    ("exit 0", 0.001),
    ("exit 0", 0.040),
    ("exit 0", -0.010),
]


@pytest.mark.parametrize(("behaviour", "agent_after"), ORDERS)
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_one_outcome_whichever_comes_first(
    tmp_path: Path, behaviour: str, agent_after: float, sig: int
) -> None:
    code = -sig if behaviour == "die" else 0
    ends = 5.0
    # rank 1 ends a little later than rank 0; the agent's signal comes before or after
    script = [[ExitAt(0, code, ends), ExitAt(1, code, ends + 0.002)]]
    agent, launcher, events, _ = _agent(tmp_path, script)
    launcher.at(ends + agent_after, lambda: agent.request_stop(sig))
    result = agent.run()
    name = signal.Signals(sig).name
    assert _outcome(result) == (
        WorkerState.FAILED,
        128 + sig,
        sig,
        True,
        f"stopped by {name} from outside (the scheduler signalled every process)",
        0,
    )
    assert not [e for e in events.events if e.source == "WORKER" and e.state == "FAILED"]
    assert events.named(names.SIGNAL)[0].metadata["origin"] == "outside"
    assert events.named(names.SIGNAL)[0].metadata["sent"] is None
    assert launcher.stops[0] == 0  # they got it already: not sent again
    assert events.events[-2].metadata["reason"] == result.ended_because  # the final status


def test_a_signal_to_the_agent_alone_is_passed_on_after_the_window(tmp_path: Path) -> None:
    agent, launcher, events, clock = _agent(tmp_path, [[]])
    launcher.at(5.0, lambda: agent.request_stop(signal.SIGTERM))
    result = agent.run()
    assert result.ended_because == "stopped by SIGTERM" and not result.from_outside
    assert result.exit_code == 143 and result.failures == []
    assert launcher.stops[0] == signal.SIGTERM
    assert clock.now == pytest.approx(5.0 + WINDOW)  # the wait cost no more than the window
    assert events.named(names.SIGNAL)[0].metadata["origin"] == "agent"


def test_a_rank_killed_alone_is_still_a_failure_after_the_window(tmp_path: Path) -> None:
    agent, _, _, _ = _agent(tmp_path, [[ExitAt(0, -signal.SIGTERM, 5.0)]], max_restarts=0)
    result = agent.run()
    assert result.state == WorkerState.FAILED and result.exit_code == 1
    assert result.failures[0].exit.returncode == -signal.SIGTERM
    assert result.signal is None
    assert result.failures[0].exit.timestamp == 5.0  # seen then; judged after the window


def test_sigkill_is_never_held(tmp_path: Path) -> None:
    agent, launcher, _, _ = _agent(tmp_path, [[ExitAt(0, -signal.SIGKILL, 5.0)]], max_restarts=0)
    result = agent.run()
    assert result.exit_code == 1
    assert len(launcher.waits) == 1  # the failure was acted on at once: no held wait


def test_a_success_waits_the_window_only(tmp_path: Path) -> None:
    agent, _, _, clock = _agent(tmp_path, [[ExitAt(0, 0, 5.0), ExitAt(1, 0, 5.0)]])
    result = agent.run()
    assert result.state == WorkerState.SUCCEEDED and result.exit_code == 0
    assert clock.now == pytest.approx(5.0 + WINDOW)


def test_preemption_exits_with_its_own_code(tmp_path: Path) -> None:
    agent, launcher, events, _ = _agent(
        tmp_path,
        [[ExitAt(0, 0, 5.0), ExitAt(1, 0, 5.0)]],
        preempt=frozenset({signal.SIGUSR1}),
    )
    launcher.at(5.01, lambda: agent.request_stop(signal.SIGUSR1))
    result = agent.run()
    assert result.preempted and result.exit_code == EXIT_PREEMPTED == 75
    assert result.ended_because.startswith("preempted by SIGUSR1 from outside")
    assert events.named(names.SIGNAL)[0].metadata["preempted"] is True


def test_a_resumed_run_goes_on_counting(tmp_path: Path) -> None:
    agent, launcher, _, _ = _agent(
        tmp_path,
        [[ExitAt(1, 3, 1.0)], [ExitAt(0, 0, 1.0), ExitAt(1, 0, 1.0)]],
        resumed=(4, 2),
        max_restarts=3,
    )
    result = agent.run()
    assert result.state == WorkerState.SUCCEEDED
    assert result.restart_count == 3 and result.attempts == 6
    envs = [launch[0].env["TORCHELASTIC_RESTART_COUNT"] for launch in launcher.launches]
    assert envs == ["2", "3"]


def test_a_resumed_run_has_its_budget_spent(tmp_path: Path) -> None:
    agent, _, _, _ = _agent(tmp_path, [[ExitAt(1, 3, 1.0)]], resumed=(3, 3), max_restarts=3)
    result = agent.run()
    assert result.exit_code == 1 and result.restart_count == 3
