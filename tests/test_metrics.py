"""The built-in metric handler against the metric handler conformance suite, and the suite
itself against a reference handler that it must accept and a broken one it must not."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest

from elastic_runner.errors import ConfigError
from elastic_runner.metrics import METRICS, MetricHandler, MetricKind, NoMetrics
from elastic_runner.metrics.builtin import (
    ConsoleMetrics,
    JsonlMetrics,
    JsonlMetricsConfig,
    _jsonl,
)
from elastic_runner.spec import RunContext
from elastic_runner.testing.metric_handler_suite import MetricHandlerSuite
from tests.test_logs import fill, tmpfs


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

    def observed(
        self, handler: MetricHandler, name: str, labels: Mapping[str, str]
    ) -> float | None:
        assert isinstance(handler, Recorder)
        if name == "group.state":
            return 1.0 if handler.current_state == labels["state"] else 0.0
        return handler.values.get((name, tuple(sorted(labels.items()))), 0.0)


def test_the_suite_catches_counters_that_do_not_add_up() -> None:
    suite = TestReference()
    with pytest.raises(AssertionError):
        suite.test_counters_add_up_per_label(lambda: Recorder(counters_add=False))


def aggregate(records: list[dict[str, Any]], name: str, labels: Mapping[str, str]) -> float:
    """What a reader of metrics.jsonl makes of the lines, by the catalogue's kinds."""
    mine = [r for r in records if r["name"] == name]
    if name == "group.state":
        return 1.0 if mine and mine[-1]["labels"] == dict(labels) else 0.0
    mine = [r for r in mine if r["labels"] == dict(labels)]
    kind = METRICS[name].kind
    if kind is MetricKind.COUNTER:
        return float(sum(r["value"] for r in mine))
    if kind is MetricKind.DURATION:
        return float(len(mine))
    return float(mine[-1]["value"]) if mine else 0.0


class TestJsonlMetrics(MetricHandlerSuite):
    @pytest.fixture
    def make_handler(self, tmp_path: Path) -> Callable[[], MetricHandler]:
        self.path = tmp_path / "metrics.jsonl"
        self.path.unlink(missing_ok=True)
        return lambda: JsonlMetrics(self.path)

    def observed(self, handler: Any, name: str, labels: Mapping[str, str]) -> float | None:
        records = [json.loads(line) for line in self.path.read_text().splitlines()]
        return aggregate(records, name, labels)


class TestConsoleMetrics(MetricHandlerSuite):
    @pytest.fixture
    def make_handler(self) -> Callable[[], MetricHandler]:
        self.stream = io.StringIO()
        return lambda: ConsoleMetrics(self.stream)

    def test_lines(self) -> None:
        stream = io.StringIO()
        ConsoleMetrics(stream).put("workers.failures", 1, {"kind": "EXIT_CODE"})
        assert stream.getvalue() == "[metric] workers.failures{kind=EXIT_CODE} 1\n"


# -- disk faults --------------------------------------------------------------------------


def test_metrics_on_a_full_disk_are_one_warning_then_dropped(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with tmpfs(tmp_path / "disk") as disk:
        handler = JsonlMetrics(disk / "metrics.jsonl")
        handler.put("workers.running", 0)
        fill(disk)
        for n in range(1, 200):  # well past the page the file has
            handler.put("workers.running", n, {"pad": "x" * 100})
        handler.close()
        lines = (disk / "metrics.jsonl").read_text().splitlines(keepends=True)
    assert 1 <= len(lines) < 200 and all(line.endswith("\n") for line in lines)
    assert [json.loads(line)["value"] for line in lines] == list(range(len(lines)))
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1
    assert (
        "metrics.jsonl: No space left on device (ENOSPC); metric values are dropped"
        in (warnings[0])
    )


def test_a_metrics_file_that_cannot_be_opened_is_a_config_error(tmp_path: Path) -> None:
    context = RunContext("rid", tmp_path, "node0")
    with pytest.raises(ConfigError, match=r"^metrics.file=no/m.jsonl: cannot open .*ENOENT"):
        _jsonl(JsonlMetricsConfig(file="no/m.jsonl"), context)
