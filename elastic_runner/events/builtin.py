"""The built-in event sinks, a plugin registered through the same hook as third-party
ones: ``jsonl`` (the default), ``console`` and ``null``."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import IO

from elastic_runner.config import EventsConfig
from elastic_runner.events.api import Event
from elastic_runner.hookspecs import hookimpl
from elastic_runner.registry import ComponentSpec
from elastic_runner.spec import RunContext

__all__ = [
    "ConsoleEventSink",
    "ConsoleEventsConfig",
    "JsonlEventSink",
    "JsonlEventsConfig",
    "NullEventSink",
    "NullEventsConfig",
]


@dataclass
class JsonlEventsConfig(EventsConfig):
    sink: str = "jsonl"
    #: File in the run directory, one JSON object a line.
    file: str = "events.jsonl"


@dataclass
class ConsoleEventsConfig(EventsConfig):
    sink: str = "console"


@dataclass
class NullEventsConfig(EventsConfig):
    sink: str = "null"


class JsonlEventSink:
    """Appends each event as a JSON line; flushed per event so a crash loses nothing."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        self._file: IO[str] = open(self.path, "a", encoding="utf-8")  # noqa: SIM115

    def emit(self, event: Event) -> None:
        self._file.write(event.to_json() + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class ConsoleEventSink:
    """Writes each event as a JSON line to stderr."""

    def emit(self, event: Event) -> None:
        sys.stderr.write(f"[event] {event.to_json()}\n")

    def close(self) -> None:
        """Nothing to release."""


class NullEventSink:
    """Drops every event."""

    def emit(self, event: Event) -> None:
        """Discard."""

    def close(self) -> None:
        """Nothing to release."""


def _jsonl(config: JsonlEventsConfig, context: RunContext) -> JsonlEventSink:
    return JsonlEventSink(context.run_dir / config.file)


@hookimpl
def elastic_runner_event_sinks() -> Sequence[ComponentSpec]:
    return [
        ComponentSpec("jsonl", _jsonl, JsonlEventsConfig, "events.jsonl in the run directory"),
        ComponentSpec(
            "console",
            lambda c, ctx: ConsoleEventSink(),
            ConsoleEventsConfig,
            "JSON lines on stderr",
        ),
        ComponentSpec("null", lambda c, ctx: NullEventSink(), NullEventsConfig, "discard"),
    ]
