"""The lifecycle hooks, called by the agent (fake launcher and rendezvous) through a real
plugin manager: order, arguments, refusals and plugins that raise."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from elastic_runner.hookspecs import hookimpl
from elastic_runner.lifecycle import Lifecycle
from elastic_runner.plugins import make_plugin_manager
from elastic_runner.spec import (
    Failure,
    FailureKind,
    RunContext,
    RunResult,
    WorkerGroup,
    WorkerState,
)
from tests.test_agent import make_agent
from tests.test_metrics import Recorder


class Observer:
    """Records every lifecycle call; refuses the attempts in ``refuse``."""

    def __init__(self, refuse: Sequence[int] = ()) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.refuse = set(refuse)

    @hookimpl
    def elastic_runner_before_rendezvous(
        self, context: RunContext, attempt: int, restart_count: int
    ) -> str | None:
        self.calls.append(("before_rendezvous", attempt, restart_count))
        return "GPU 3 has ECC errors" if attempt in self.refuse else None

    @hookimpl
    def elastic_runner_workers_started(self, group: WorkerGroup) -> None:
        self.calls.append(("workers_started", group.attempt, [w.pid for w in group.workers]))

    @hookimpl
    def elastic_runner_worker_failure(
        self, group: WorkerGroup, failures: Sequence[Failure], will_restart: bool
    ) -> None:
        root = failures[0]
        self.calls.append(
            ("worker_failure", group.attempt, root.exit.global_rank, root.kind, will_restart)
        )

    @hookimpl
    def elastic_runner_run_end(self, context: RunContext, result: RunResult) -> None:
        self.calls.append(("run_end", result.state))


def lifecycle_of(tmp_path: Path, *plugins: object) -> Lifecycle:
    pm = make_plugin_manager(autoload=False)
    for i, plugin in enumerate(plugins):
        pm.register(plugin, name=f"test-plugin-{i}")
    return Lifecycle(pm, RunContext("rid", tmp_path, "node0"))


def test_hooks_see_a_failure_and_the_restart(tmp_path: Path) -> None:
    observer = Observer()
    lifecycle = lifecycle_of(tmp_path, observer)
    agent, _, _, _ = make_agent(
        tmp_path, [[[(1, 3)]], [[(0, 0), (1, 0)]]], max_restarts=1, lifecycle=lifecycle
    )
    result = agent.run()
    lifecycle.run_end(result)
    assert observer.calls == [
        ("before_rendezvous", 1, 0),
        ("workers_started", 1, [1000, 1001]),
        ("worker_failure", 1, 1, FailureKind.EXIT_CODE, True),
        ("before_rendezvous", 2, 0),
        ("workers_started", 2, [1000, 1001]),
        ("run_end", WorkerState.SUCCEEDED),
    ]


def test_last_failure_says_it_will_not_restart(tmp_path: Path) -> None:
    observer = Observer()
    agent, _, _, _ = make_agent(
        tmp_path, [[[(0, 1)]]], max_restarts=0, lifecycle=lifecycle_of(tmp_path, observer)
    )
    assert agent.run().state == WorkerState.FAILED
    assert observer.calls[-1] == ("worker_failure", 1, 0, FailureKind.EXIT_CODE, False)


def test_refusal_keeps_the_node_out_and_fails_the_run(tmp_path: Path) -> None:
    observer = Observer(refuse=[2])
    agent, launcher, rdzv, events = make_agent(
        tmp_path,
        [[[(1, 3)]], [[(0, 0), (1, 0)]]],
        max_restarts=3,
        lifecycle=lifecycle_of(tmp_path, observer),
    )
    result = agent.run()
    assert result.state == WorkerState.FAILED and result.exit_code == 1
    assert "GPU 3 has ECC errors" in result.ended_because
    assert "test-plugin-0" in result.ended_because
    assert rdzv.rounds == 1 and rdzv.shut  # never joined round 2; left the job
    assert len(launcher.launches) == 1
    refused = [e for e in events.events if e.name == "elastic_runner.health_check.refused"]
    assert refused[0].metadata["reason"] == "GPU 3 has ECC errors"


class Raising:
    @hookimpl
    def elastic_runner_before_rendezvous(self) -> str | None:
        raise RuntimeError("nvidia-smi not found")

    @hookimpl
    def elastic_runner_workers_started(self) -> None:
        raise RuntimeError("boom")


def test_a_raising_health_check_refuses(tmp_path: Path) -> None:
    lifecycle = lifecycle_of(tmp_path, Raising())
    refusal = lifecycle.before_rendezvous(1, 0)
    assert refusal is not None
    assert refusal.plugin == "test-plugin-0"
    assert refusal.reason == "raised RuntimeError: nvidia-smi not found"


def test_a_raising_hook_is_logged_and_the_others_still_run(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    observer = Observer()
    lifecycle = lifecycle_of(tmp_path, observer, Raising())
    group = WorkerGroup.for_spec(make_agent(tmp_path, [[]])[0].spec)
    with caplog.at_level(logging.WARNING):
        lifecycle.workers_started(group)
    assert observer.calls == [("workers_started", 0, [None, None])]
    assert "plugin 'test-plugin-1': hook elastic_runner_workers_started raised" in caplog.text


def test_metrics_of_a_run_with_a_failure(tmp_path: Path) -> None:
    metrics = Recorder()
    agent, _, _, _ = make_agent(tmp_path, [[[(1, 3)]], [[(0, 0), (1, 0)]]], max_restarts=1)
    agent._metrics = metrics
    agent.run()
    values = {name: v for (name, _), v in metrics.values.items()}
    assert values["workers.failures"] == 1
    assert metrics.values["workers.failures", (("kind", "EXIT_CODE"),)] == 1
    assert values["rendezvous.duration_s"] == 2  # observations: two rounds
    assert values["workers.start_latency_s"] == 2
    assert values["recovery.duration_s"] == 1
    assert values["workers.restarts"] == 1
    assert metrics.current_state == "SUCCEEDED"
