"""The agent's state machine with a fake launcher and a fake rendezvous (no processes)."""

from __future__ import annotations

import signal
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

from elastic_runner.agent import ElasticAgent
from elastic_runner.events import Event
from elastic_runner.metrics import NoMetrics
from elastic_runner.rendezvous.api import NodeInfo, RendezvousInfo
from elastic_runner.spec import RunContext, WorkerExit, WorkerSpec, WorkerState
from elastic_runner.workers.launcher import WorkerLaunch


class FakeLauncher:
    """Each attempt's exits are scripted: ``script[attempt]`` is a list of batches; each
    ``wait()`` returns the next batch (list of (local_rank, returncode))."""

    def __init__(self, script: list[list[list[tuple[int, int]]]]) -> None:
        self.script = script
        self.attempt = -1
        self.batches: list[list[tuple[int, int]]] = []
        self.running: dict[int, WorkerLaunch] = {}
        self.launches: list[list[WorkerLaunch]] = []
        self.stops: list[int] = []
        self.on_wait: Callable[[], None] | None = None
        self.clock = 0.0

    def start(self, launches: Sequence[WorkerLaunch]) -> dict[int, int]:
        self.attempt += 1
        self.batches = list(self.script[self.attempt])
        self.launches.append(list(launches))
        self.running = {la.local_rank: la for la in launches}
        return {la.local_rank: 1000 + la.local_rank for la in launches}

    def _exit(self, rank: int, code: int, stopped: bool) -> WorkerExit:
        la = self.running.pop(rank)
        self.clock += 1
        return WorkerExit(rank, la.global_rank, 1000 + rank, code, self.clock, stopped)

    def wait(self, timeout: float | None = None) -> list[WorkerExit]:
        if self.on_wait:
            hook, self.on_wait = self.on_wait, None
            hook()
            return []
        batch = self.batches.pop(0)
        return [self._exit(rank, code, False) for rank, code in batch]

    def kill(self, local_rank: int, sig: int = signal.SIGKILL) -> None:
        self.batches.insert(0, [(local_rank, -sig)])

    def stop(self, sig: int, timeout: float) -> list[WorkerExit]:
        self.stops.append(sig)
        return [self._exit(rank, -sig, True) for rank in list(self.running)]

    def wake(self) -> None:
        pass


class FakeRendezvous:
    backend = "fake"

    def __init__(self) -> None:
        self.rounds = 0
        self.restarts = 0
        self.barriers = 0
        self.failed_with = ""
        self.callback: Callable[[], None] | None = None
        self.shut = False

    def next_round(self, node: NodeInfo, failed: bool = False) -> RendezvousInfo:
        self.rounds += 1
        self.restarts += failed
        return RendezvousInfo(
            self.rounds - 1, 0, (node,), "127.0.0.1", 29500 + self.rounds, self.restarts
        )

    def exit_barrier(self) -> bool:
        self.barriers += 1
        return True

    def fail_job(self, reason: str) -> None:
        self.failed_with = reason

    def num_nodes_waiting(self) -> int:
        return 0

    def on_membership_change(self, callback: Callable[[], None]) -> None:
        self.callback = callback

    def shutdown(self) -> None:
        self.shut = True


class Events:
    def __init__(self) -> None:
        self.events: list[Event] = []

    def emit(self, event: Event) -> None:
        self.events.append(event)

    def close(self) -> None:
        pass

    def names(self) -> list[str]:
        return [e.name.rsplit(".", 1)[-1] if e.source == "WORKER" else e.name for e in self.events]


def make_agent(
    tmp_path: Path,
    script: list[list[list[tuple[int, int]]]],
    nproc: int = 2,
    max_restarts: int = 0,
    **options: object,
) -> tuple[ElasticAgent, FakeLauncher, FakeRendezvous, Events]:
    spec = WorkerSpec("default", nproc, ("worker",), max_restarts=max_restarts, stop_timeout=1)
    launcher, rdzv, events = FakeLauncher(script), FakeRendezvous(), Events()
    agent = ElasticAgent(
        spec,
        rdzv,
        launcher,
        context=RunContext("rid", tmp_path, "node0"),
        events=events,
        metrics=NoMetrics(),
        base_env={},
        **options,  # type: ignore[arg-type]
    )
    return agent, launcher, rdzv, events


def test_happy_path_succeeds_without_spending_restarts(tmp_path: Path) -> None:
    agent, _, rdzv, events = make_agent(tmp_path, [[[(0, 0)], [(1, 0)]]], max_restarts=3)
    result = agent.run()
    assert result.state == WorkerState.SUCCEEDED
    assert result.exit_code == 0
    assert (result.attempts, result.restart_count) == (1, 0)
    assert rdzv.rounds == 1 and rdzv.shut and rdzv.barriers == 1
    assert events.names().count("START") == 2
    assert events.names()[-2:] == [
        "torchelastic.worker.status.SUCCEEDED",
        "elastic_runner.shutdown",
    ]


def test_event_sequence_of_a_run_with_one_restart(tmp_path: Path) -> None:
    agent, _, _, events = make_agent(tmp_path, [[[(1, 3)]], [[(0, 0), (1, 0)]]], max_restarts=1)
    agent.run()
    assert events.names() == [
        "elastic_runner.rendezvous.join",
        "torchelastic.worker.status.RENDEZVOUS",
        "elastic_runner.ranks.assigned",
        "START",
        "START",
        "FAILED",  # rank 1, exit code 3
        "TERMINATED",  # rank 0, stopped by the agent
        "elastic_runner.restart",
        "elastic_runner.rendezvous.join",
        "torchelastic.worker.status.RENDEZVOUS",
        "elastic_runner.ranks.assigned",
        "START",
        "START",
        "SUCCEEDED",
        "SUCCEEDED",
        "torchelastic.worker.status.SUCCEEDED",
        "elastic_runner.shutdown",
    ]
    failed = next(e for e in events.events if e.state == "FAILED")
    assert (failed.rank, failed.metadata["failure"], failed.metadata["exit_code"]) == (
        1,
        "EXIT_CODE",
        3,
    )
    assigned = [e for e in events.events if e.name == "elastic_runner.ranks.assigned"]
    assert assigned[1].metadata["ranks"] == [0, 1] and assigned[1].metadata["restart_count"] == 1
    assert {e.run_id for e in events.events} == {"rid"} and {e.node for e in events.events} == {
        "node0"
    }


def test_failure_stops_the_group_and_restarts_it(tmp_path: Path) -> None:
    agent, launcher, _, events = make_agent(
        tmp_path, [[[(1, 3)]], [[(0, 0), (1, 0)]]], max_restarts=1
    )
    result = agent.run()
    assert result.state == WorkerState.SUCCEEDED
    assert (result.attempts, result.restart_count) == (2, 1)
    assert launcher.stops[0] == signal.SIGTERM  # rank 0 stopped after rank 1 failed
    env = launcher.launches[1][0].env
    assert env["TORCHELASTIC_RESTART_COUNT"] == "1"
    assert env["TORCHELASTIC_ERROR_FILE"].endswith("attempt_2/0/error.json")
    assert "TERMINATED" in events.names() and "FAILED" in events.names()


def test_exhausted_restarts_fail_after_max_plus_one_attempts(tmp_path: Path) -> None:
    agent, _, _, _ = make_agent(tmp_path, [[[(0, 1)]]] * 4, max_restarts=3)
    result = agent.run()
    assert result.state == WorkerState.FAILED and result.exit_code == 1
    assert result.attempts == 4 and result.restart_count == 3
    assert agent._rdzv.failed_with == "restarts used up (max_restarts=3)"  # type: ignore[attr-defined]
    assert agent._rdzv.barriers == 0  # type: ignore[attr-defined]  (none on failure)
    assert [f.exit.global_rank for f in result.failures] == [0]
    assert [e.stopped_by_agent for e in result.exits] == [False, True]


def test_membership_change_regroups_without_spending_a_restart(tmp_path: Path) -> None:
    agent, launcher, rdzv, events = make_agent(tmp_path, [[], [[(0, 0), (1, 0)]]], max_restarts=0)
    launcher.on_wait = lambda: rdzv.callback and rdzv.callback()  # type: ignore[func-returns-value]
    result = agent.run()
    assert result.state == WorkerState.SUCCEEDED
    assert (result.attempts, result.restart_count, rdzv.rounds) == (2, 0, 2)
    assert launcher.launches[1][0].env["TORCHELASTIC_RESTART_COUNT"] == "0"
    restart = [e for e in events.events if e.name == "elastic_runner.restart"]
    assert restart[0].metadata["reason"] == "membership_change"


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
    agent, launcher, _, _ = make_agent(
        tmp_path, [[]], max_restarts=5, forward_signals=frozenset(forward)
    )
    launcher.on_wait = lambda: agent.request_stop(signum)
    result = agent.run()
    assert launcher.stops[0] == sent
    assert result.exit_code == 128 + signum
    assert result.failures == []


def test_ranks_and_master_come_from_the_round(tmp_path: Path) -> None:
    agent, launcher, _, _ = make_agent(tmp_path, [[[(0, 0), (1, 0), (2, 0)]]], nproc=3)
    agent.run()
    envs = [la.env for la in launcher.launches[0]]
    assert [e["RANK"] for e in envs] == ["0", "1", "2"]
    assert {e["MASTER_PORT"] for e in envs} == {"29501"}
    assert [la.prefix for la in launcher.launches[0]] == [f"[default{i}]: " for i in range(3)]
