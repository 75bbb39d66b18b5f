"""The lifecycle hooks, called by the agent (fake launcher and rendezvous) through a real
plugin manager: order, arguments, refusals, plugins that raise, and pluggy's own rules
(wrappers, tryfirst/trylast, firstresult) now that hooks are called through pluggy."""

from __future__ import annotations

import logging
from collections.abc import Generator, Sequence
from pathlib import Path
from typing import Any

import pytest

from elastic_runner.hookspecs import hookimpl
from elastic_runner.lifecycle import Lifecycle, Refusal
from elastic_runner.plugins import make_plugin_manager
from elastic_runner.spec import (
    Failure,
    FailureKind,
    RunContext,
    RunResult,
    WorkerGroup,
    WorkerState,
)
from tests.fakes import ExitAt, FakeLauncher, all_succeed
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
    rig = make_agent(
        tmp_path, [[ExitAt(1, 3)], all_succeed(2)], max_restarts=1, lifecycle=lifecycle
    )
    result = rig.run()
    lifecycle.run_end(result)
    pid = FakeLauncher.PID_BASE
    assert observer.calls == [
        ("before_rendezvous", 1, 0),
        ("workers_started", 1, [pid, pid + 1]),
        ("worker_failure", 1, 1, FailureKind.EXIT_CODE, True),
        ("before_rendezvous", 2, 0),
        ("workers_started", 2, [pid + 100, pid + 101]),
        ("run_end", WorkerState.SUCCEEDED),
    ]


def test_last_failure_says_it_will_not_restart(tmp_path: Path) -> None:
    observer = Observer()
    rig = make_agent(
        tmp_path, [[ExitAt(0, 1)]], max_restarts=0, lifecycle=lifecycle_of(tmp_path, observer)
    )
    assert rig.run().state == WorkerState.FAILED
    assert observer.calls[-1] == ("worker_failure", 1, 0, FailureKind.EXIT_CODE, False)


def test_refusal_keeps_the_node_out_and_fails_the_run(tmp_path: Path) -> None:
    observer = Observer(refuse=[2])
    rig = make_agent(
        tmp_path,
        [[ExitAt(1, 3)], all_succeed(2)],
        max_restarts=3,
        lifecycle=lifecycle_of(tmp_path, observer),
    )
    result = rig.run()
    assert result.state == WorkerState.FAILED and result.exit_code == 1
    assert "GPU 3 has ECC errors" in result.ended_because
    assert "test-plugin-0" in result.ended_because
    assert rig.rdzv.rounds == 1 and rig.rdzv.shutdowns == 1  # never joined round 2; left
    assert len(rig.launcher.launches) == 1
    refused = rig.events.named("elastic_runner.health_check.refused")
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
    with caplog.at_level(logging.WARNING):
        lifecycle.workers_started(_group(tmp_path))
    assert observer.calls == [("workers_started", 0, [None, None])]
    assert "plugin 'test-plugin-1': hook elastic_runner_workers_started raised" in caplog.text


def _group(tmp_path: Path) -> WorkerGroup:
    return WorkerGroup.for_spec(make_agent(tmp_path, [[]]).agent.spec)


class Named:
    """Appends its name to ``calls`` from each lifecycle hook it is asked to implement."""

    def __init__(self, name: str, calls: list[str], refuse: str | None = None) -> None:
        self.name, self.calls, self.refuse = name, calls, refuse

    @hookimpl
    def elastic_runner_before_rendezvous(self) -> str | None:
        self.calls.append(self.name)
        return self.refuse

    @hookimpl
    def elastic_runner_workers_started(self) -> None:
        self.calls.append(self.name)


class First(Named):
    @hookimpl(tryfirst=True)
    def elastic_runner_before_rendezvous(self) -> str | None:
        return super().elastic_runner_before_rendezvous()

    @hookimpl(tryfirst=True)
    def elastic_runner_workers_started(self) -> None:
        super().elastic_runner_workers_started()


class Last(Named):
    @hookimpl(trylast=True)
    def elastic_runner_workers_started(self) -> None:
        super().elastic_runner_workers_started()


def test_tryfirst_and_trylast_order_the_calls(tmp_path: Path) -> None:
    calls: list[str] = []
    # pluggy calls the last registered first, unless tryfirst/trylast say otherwise
    lifecycle = lifecycle_of(
        tmp_path, First("first", calls), Named("a", calls), Named("b", calls), Last("last", calls)
    )
    lifecycle.workers_started(_group(tmp_path))
    assert calls == ["first", "b", "a", "last"]


def test_the_first_refusal_ends_the_health_check(tmp_path: Path) -> None:
    calls: list[str] = []
    lifecycle = lifecycle_of(
        tmp_path,
        First("first", calls, refuse="disk full"),
        Named("other", calls, refuse="GPU lost"),
    )
    assert lifecycle.before_rendezvous(1, 0) == Refusal("test-plugin-0", "disk full")
    assert calls == ["first"]  # firstresult: the other health check is not called


class NewStyleWrapper:
    """A ``wrapper=True`` hook: sees what the implementations returned (guarded)."""

    def __init__(self) -> None:
        self.seen: list[object] = []

    @hookimpl(wrapper=True)
    def elastic_runner_before_rendezvous(self) -> Generator[None, object, object]:
        outcome = yield
        self.seen.append(outcome)
        return outcome

    @hookimpl(wrapper=True)
    def elastic_runner_workers_started(self) -> Generator[None, object, object]:
        self.seen.append("before")
        outcome = yield
        self.seen.append(outcome)
        return outcome


class OldStyleWrapper:
    def __init__(self) -> None:
        self.seen: list[object] = []

    @hookimpl(hookwrapper=True)
    def elastic_runner_run_end(self) -> Generator[None, Any, None]:
        outcome = yield
        self.seen.append(outcome.get_result())


def test_wrappers_run_around_the_implementations(tmp_path: Path) -> None:
    calls: list[str] = []
    new, old = NewStyleWrapper(), OldStyleWrapper()
    lifecycle = lifecycle_of(tmp_path, new, old, Raising(), Named("sick", calls, refuse="ECC"))
    lifecycle.workers_started(_group(tmp_path))
    # Raising's exception is caught by its guard: the wrapper sees no exception
    assert new.seen == ["before", []]
    refusal = lifecycle.before_rendezvous(1, 0)
    assert refusal == Refusal("test-plugin-3", "ECC")  # the last registered is called first
    assert new.seen[-1] == refusal  # a wrapper sees the Refusal, naming the plugin
    lifecycle.run_end(RunResult(WorkerState.SUCCEEDED, 1, 0))
    assert old.seen == [[]]


class Vetoing:
    """A wrapper that refuses on its own, whatever the health checks said."""

    @hookimpl(wrapper=True)
    def elastic_runner_before_rendezvous(self) -> Generator[None, object, object]:
        yield
        return "maintenance window"


class RaisingWrapper:
    @hookimpl(wrapper=True)
    def elastic_runner_before_rendezvous(self) -> Generator[None, object, object]:
        yield
        raise OSError("cannot read /sys")

    @hookimpl(wrapper=True)
    def elastic_runner_workers_started(self) -> Generator[None, object, object]:
        yield
        raise OSError("cannot pin")


def test_a_wrapper_can_refuse_and_is_named(tmp_path: Path) -> None:
    refusal = lifecycle_of(tmp_path, Vetoing()).before_rendezvous(1, 0)
    assert refusal == Refusal("test-plugin-0", "maintenance window")


def test_a_raising_wrapper_is_logged_or_refuses(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    observer = Observer()
    lifecycle = lifecycle_of(tmp_path, observer, RaisingWrapper())
    with caplog.at_level(logging.WARNING):
        lifecycle.workers_started(_group(tmp_path))
    assert observer.calls == [("workers_started", 0, [None, None])]
    assert (
        "plugin 'test-plugin-1': a wrapper of hook elastic_runner_workers_started raised "
        "OSError: cannot pin (the run goes on)"
    ) in caplog.text
    assert lifecycle.before_rendezvous(1, 0) == Refusal(
        "test-plugin-1", "raised OSError: cannot read /sys"
    )


def test_one_raising_implementation_does_not_stop_the_others(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    calls: list[str] = []
    lifecycle = lifecycle_of(tmp_path, Named("a", calls), Raising(), Named("b", calls))
    with caplog.at_level(logging.WARNING):
        lifecycle.workers_started(_group(tmp_path))  # b, Raising, a: in that order
    assert calls == ["b", "a"]
    [record] = [r for r in caplog.records if "raised" in r.getMessage()]
    assert record.getMessage() == (
        "plugin 'test-plugin-1': hook elastic_runner_workers_started raised RuntimeError: "
        "boom (the run goes on)"
    )


def test_metrics_of_a_run_with_a_failure(tmp_path: Path) -> None:
    metrics = Recorder()
    rig = make_agent(tmp_path, [[ExitAt(1, 3)], all_succeed(2)], max_restarts=1)
    rig.agent._metrics = metrics
    rig.run()
    values = {name: v for (name, _), v in metrics.values.items()}
    assert values["workers.failures"] == 1
    assert metrics.values["workers.failures", (("kind", "EXIT_CODE"),)] == 1
    assert values["rendezvous.duration_s"] == 2  # observations: two rounds
    assert values["workers.start_latency_s"] == 2
    assert values["recovery.duration_s"] == 1
    assert values["workers.restarts"] == 1
    assert metrics.current_state == "SUCCEEDED"
