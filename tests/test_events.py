"""The built-in event sinks against the event sink conformance suite."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from elastic_runner.errors import ConfigError
from elastic_runner.events import Event, EventSink
from elastic_runner.events.builtin import (
    ConsoleEventSink,
    JsonlEventsConfig,
    JsonlEventSink,
    NullEventSink,
    _jsonl,
)
from elastic_runner.spec import RunContext
from elastic_runner.testing.event_sink_suite import EventSinkSuite
from tests.test_logs import fill, tmpfs


class TestJsonlSink(EventSinkSuite):
    @pytest.fixture
    def make_sink(self, tmp_path: Path) -> Callable[[], EventSink]:
        self.path = tmp_path / "events.jsonl"
        self.path.unlink(missing_ok=True)
        return lambda: JsonlEventSink(self.path)

    def delivered(self, sink: EventSink) -> list[dict[str, Any]] | None:
        return [json.loads(line) for line in self.path.read_text().splitlines()]


class TestConsoleSink(EventSinkSuite):
    @pytest.fixture
    def make_sink(self, capfd: pytest.CaptureFixture[str]) -> Callable[[], EventSink]:
        self.capfd = capfd
        return ConsoleEventSink

    def delivered(self, sink: EventSink) -> list[dict[str, Any]] | None:
        err = self.capfd.readouterr().err
        return [json.loads(line.removeprefix("[event] ")) for line in err.splitlines()]


class TestNullSink(EventSinkSuite):
    @pytest.fixture
    def make_sink(self) -> Callable[[], EventSink]:
        return NullEventSink


class _Broken:
    """A sink that loses events: the suite must catch it."""

    def __init__(self, path: Path) -> None:
        self.inner = JsonlEventSink(path)
        self.n = 0

    def emit(self, event: Any) -> None:
        self.n += 1
        if self.n != 2:
            self.inner.emit(event)

    def close(self) -> None:
        self.inner.close()


def test_the_suite_catches_a_sink_that_drops_an_event(tmp_path: Path) -> None:
    suite = TestJsonlSink()
    suite.path = tmp_path / "e.jsonl"
    with pytest.raises(AssertionError):
        suite.test_takes_every_event_shape(lambda: _Broken(suite.path))


# -- disk faults --------------------------------------------------------------------------


def test_events_on_a_full_disk_are_one_warning_then_dropped(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    def event(n: int) -> Event:
        return Event(f"e{n}", "AGENT", "rid", "node0", metadata={"n": n, "pad": "x" * 500})

    with tmpfs(tmp_path / "disk") as disk:
        sink = JsonlEventSink(disk / "events.jsonl")
        sink.emit(event(0))
        fill(disk)
        for n in range(1, 30):  # well past the page the file has
            sink.emit(event(n))
        sink.close()
        sink.close()
        lines = (disk / "events.jsonl").read_text().splitlines(keepends=True)
    assert 1 <= len(lines) < 29 and all(line.endswith("\n") for line in lines)
    assert [json.loads(line)["metadata"]["n"] for line in lines] == list(range(len(lines)))
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1
    assert "events.jsonl: No space left on device (ENOSPC); events are dropped" in warnings[0]


def test_an_events_file_that_cannot_be_opened_is_a_config_error(tmp_path: Path) -> None:
    context = RunContext("rid", tmp_path, "node0")
    with pytest.raises(ConfigError, match=r"^events.file=no/such/e.jsonl: cannot open .*ENOENT"):
        _jsonl(JsonlEventsConfig(file="no/such/e.jsonl"), context)
