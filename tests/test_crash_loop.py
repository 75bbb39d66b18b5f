"""The crash-loop judge alone (its use by the agent: tests/test_agent.py; through
``elastic-run``: tests/e2e/test_crash_loop.py)."""

from __future__ import annotations

from elastic_runner.crash_loop import CrashLoopJudge, is_verdict


def test_off_never_judges() -> None:
    judge = CrashLoopJudge(limit=0, min_uptime=5)
    assert all(judge.failed(3, 0.1) is None for _ in range(10))
    assert not judge.wants_steps


def test_steps_the_first_failure_sets_the_mark() -> None:
    judge = CrashLoopJudge(limit=2)
    assert judge.failed(10, 1) is None and judge.furthest == 10
    assert judge.failed(9, 1) is None and judge.in_a_row == 1
    verdict = judge.failed(10, 1)
    assert verdict is not None and "passing step 10" in verdict and is_verdict(verdict)


def test_an_attempt_without_steps_after_steps_is_no_verdict() -> None:
    judge = CrashLoopJudge(limit=1, min_uptime=100)
    assert judge.failed(4, 1) is None
    assert judge.failed(None, 1) is None  # a start-up crash before its first step


def test_without_steps_by_uptime() -> None:
    judge = CrashLoopJudge(limit=2, min_uptime=10)
    assert judge.failed(None, 1) is None  # the first attempt is no restart
    assert judge.failed(None, 50) is None and judge.in_a_row == 0  # ran long enough
    assert judge.failed(None, 1) is None
    verdict = judge.failed(None, 1)
    assert verdict is not None and "within 10 s" in verdict


def test_is_verdict_as_another_node_hears_it() -> None:
    heard = (
        "the job failed on another node (n1: no progress: 3 restarts in a row failed "
        "without passing step 3 (restart.no_progress=3); do not requeue)"
    )
    assert is_verdict(heard)
    assert not is_verdict("the job failed on another node (n1: restarts used up)")
