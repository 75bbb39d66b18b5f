"""The built-in event sinks against the event sink conformance suite."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from elastic_runner.events import EventSink
from elastic_runner.events.builtin import ConsoleEventSink, JsonlEventSink, NullEventSink
from elastic_runner.testing.event_sink_suite import EventSinkSuite


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
