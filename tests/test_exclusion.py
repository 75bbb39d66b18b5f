"""The exclusion verdict: failures this node caused within the window, a cooldown that
doubles with each exclusion up to its cap, and the ``exclusion.*`` keys' checks."""

from __future__ import annotations

import pytest

from elastic_runner.errors import ConfigError
from elastic_runner.exclusion import ExclusionConfig, ExclusionJudge
from tests.conftest import validated


def test_off_by_default_and_never_judges() -> None:
    judge = ExclusionJudge.of(ExclusionConfig())
    assert not judge.enabled
    assert all(judge.failed(float(t), root_cause=True) is None for t in range(10))


def test_failures_within_the_window_exclude() -> None:
    judge = ExclusionJudge(failures=2, window=60, cooldown=10)
    assert judge.failed(0, root_cause=True) is None
    verdict = judge.failed(59, root_cause=True)
    assert verdict is not None
    assert (verdict.cooldown, verdict.count) == (10, 1)
    assert verdict.reason == (
        "excluded for 10 s: the root cause of 2 failures within 60 s (exclusion.failures=2)"
    )


def test_failures_older_than_the_window_do_not_count() -> None:
    judge = ExclusionJudge(failures=2, window=60)
    judge.failed(0, root_cause=True)
    assert judge.failed(61, root_cause=True) is None
    assert list(judge.strikes) == [61]


def test_failures_another_node_caused_do_not_count() -> None:
    judge = ExclusionJudge(failures=1)
    assert judge.failed(0, root_cause=False) is None
    assert not judge.strikes


def test_the_cooldown_doubles_with_each_exclusion_up_to_its_cap() -> None:
    judge = ExclusionJudge(failures=1, cooldown=10, cooldown_max=35)
    cooldowns = []
    for t in range(4):
        verdict = judge.failed(t, root_cause=True)
        assert verdict is not None
        judge.stepped_out()
        cooldowns.append(verdict.cooldown)
    assert cooldowns == [10, 20, 35, 35]
    assert judge.excluded == 4


def test_a_verdict_the_job_could_not_act_on_is_judged_again() -> None:
    judge = ExclusionJudge(failures=2, cooldown=10)
    judge.failed(0, root_cause=True)
    assert judge.failed(1, root_cause=True) is not None  # not stepped out: nothing changes
    verdict = judge.failed(2, root_cause=True)
    assert verdict is not None and verdict.count == 1 and verdict.cooldown == 10


@pytest.mark.parametrize(
    ("override", "key", "says"),
    [
        ("exclusion.failures=-1", "exclusion.failures", "expected failures >= 0"),
        ("exclusion.window=-5", "exclusion.window", "seconds"),
        ("exclusion.cooldown=nan", "exclusion.cooldown", ""),
        ("exclusion.cooldown_max=5", "exclusion.cooldown_max", "expected seconds >= "),
    ],
)
def test_bad_keys_are_one_line_naming_the_key(override: str, key: str, says: str) -> None:
    with pytest.raises(ConfigError) as info:
        validated(override)
    assert info.value.key == key and says in str(info.value)


def test_the_keys_reach_the_config() -> None:
    conf = validated("exclusion.failures=3", "exclusion.cooldown=5").config.exclusion
    assert (conf.failures, conf.window, conf.cooldown, conf.cooldown_max) == (3, 600, 5, 3600)
