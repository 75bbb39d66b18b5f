"""Fault injection alone: when each fault is due and to whom, and its keys' checks (the
faults through ``elastic-run``: tests/e2e/test_faults.py)."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from elastic_runner.errors import ConfigError
from elastic_runner.faults import (
    FailCheck,
    FailCheckFault,
    FaultInjector,
    KillAgentFault,
    KillRankFault,
)
from elastic_runner.spec import RunContext, Worker
from tests.conftest import validated


def _workers(*ranks: int) -> list[Worker]:
    return [Worker(local_rank=i, global_rank=r) for i, r in enumerate(ranks)]


def test_kill_rank_after_seconds_on_its_node_and_attempt_only() -> None:
    injector = FaultInjector(KillRankFault(rank=3, after=10.0, attempt=1))
    injector.attempt_started(100.0, 1, 0, _workers(0, 1))
    assert injector.next_due() is None  # rank 3 is not on this node
    injector.attempt_started(100.0, 1, 1, _workers(2, 3))
    assert injector.next_due() == 110.0
    assert injector.due(109.0, None) is None
    injection = injector.due(110.0, None)
    assert injection is not None and (injection.local_rank, injection.signal) == (1, 9)
    assert injector.due(111.0, None) is None  # once
    injector.attempt_started(200.0, 2, 1, _workers(2, 3))
    assert injector.next_due() is None  # attempt 1 only


def test_kill_rank_at_a_step_every_attempt() -> None:
    injector = FaultInjector(KillRankFault(rank=0, at_step=50, attempt=0, signal="TERM"))
    for attempt in (1, 2):
        injector.attempt_started(0.0, attempt, 0, _workers(0, 1))
        assert injector.due(1.0, 49) is None
        assert injector.next_due() == pytest.approx(1.1)  # polls the steps
        injection = injector.due(2.0, 50)
        assert injection is not None and injection.signal == signal.SIGTERM
        assert "at step 50" in injection.describe


def test_kill_agent_only_on_its_node() -> None:
    injector = FaultInjector(KillAgentFault(node=1, after=2.0))
    injector.attempt_started(0.0, 1, 0, _workers(0))
    assert injector.next_due() is None
    mine = FaultInjector(KillAgentFault(after=2.0))  # no node: the agent given the config
    mine.attempt_started(0.0, 1, 0, _workers(0))
    assert mine.next_due() == 2.0
    injector.attempt_started(0.0, 1, 1, _workers(1))
    injection = injector.due(2.0, None)
    assert injection is not None and injection.local_rank == -1


def test_fail_check_fails_the_first_checks_only(tmp_path: Path) -> None:
    check = FailCheck(FailCheckFault(checks=2))
    context = RunContext("rid", tmp_path, "node0")
    answers = [check.elastic_runner_before_rendezvous(context) for _ in range(3)]
    assert answers[2] is None and all("injected fault" in str(a) for a in answers[:2])
    other = FailCheck(FailCheckFault(host="not-this-host"))
    assert other.elastic_runner_before_rendezvous(context) is None


def _fault(*overrides: str) -> object:
    return validated(*overrides).fault


def test_off_by_default() -> None:
    assert _fault() is None
    assert isinstance(_fault("fault=kill_rank", "fault.after=3"), KillRankFault)


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["fault=kill_rank"], "fault.after"),  # neither after nor at_step
        (["fault=kill_rank", "fault.after=1", "fault.at_step=3"], "fault.after"),
        (["fault=kill_rank", "fault.after=1", "fault.rank=-1"], "fault.rank"),
        (["fault=kill_rank", "fault.after=1", "fault.signal=SIGNOPE"], "fault.signal"),
        (["fault=hang_rank", "fault.after=-1"], "fault.after"),
        (["fault=kill_agent", "fault.attempt=-2"], "fault.attempt"),
        (["fault=fail_check", "fault.checks=0"], "fault.checks"),
    ],
)
def test_bad_keys_are_named(overrides: list[str], key: str) -> None:
    with pytest.raises(ConfigError) as info:
        _fault(*overrides)
    assert info.value.key == key
