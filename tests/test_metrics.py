"""The built-in metric handler against the metric handler conformance suite, and the suite
itself against a reference handler that it must accept and a broken one it must not."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import pytest

from elastic_runner.metrics import METRICS, MetricHandler, MetricKind, NoMetrics
from elastic_runner.testing.metric_handler_suite import MetricHandlerSuite


class Recorder:
    """A reference handler that aggregates by the catalogue's kinds."""

    def __init__(self, counters_add: bool = True) -> None:
        self.values: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        self.current_state: str | None = None
        self.counters_add = counters_add

    def put(self, name: str, value: float, labels: Mapping[str, str] | None = None) -> None:
        key = (name, tuple(sorted((labels or {}).items())))
        info = METRICS.get(name)
        kind = info.kind if info else MetricKind.GAUGE
        if kind is MetricKind.STATE:
            self.current_state = (labels or {})["state"]
        elif kind is MetricKind.DURATION or (kind is MetricKind.COUNTER and self.counters_add):
            self.values[key] = self.values.get(key, 0.0) + (
                1 if kind is MetricKind.DURATION else value
            )
        else:
            self.values[key] = value

    def close(self) -> None:
        pass


class TestNoMetrics(MetricHandlerSuite):
    @pytest.fixture
    def make_handler(self) -> Callable[[], MetricHandler]:
        return NoMetrics


class TestReference(MetricHandlerSuite):
    @pytest.fixture
    def make_handler(self) -> Callable[[], MetricHandler]:
        return Recorder

    def observed(self, handler: Any, name: str, labels: Mapping[str, str]) -> float | None:
        if name == "group.state":
            return 1.0 if handler.current_state == labels["state"] else 0.0
        return handler.values.get((name, tuple(sorted(labels.items()))), 0.0)  # type: ignore[no-any-return]


def test_the_suite_catches_counters_that_do_not_add_up() -> None:
    suite = TestReference()
    with pytest.raises(AssertionError):
        suite.test_counters_add_up_per_label(lambda: Recorder(counters_add=False))
