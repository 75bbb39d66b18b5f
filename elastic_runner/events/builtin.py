"""The built-in event sinks, a plugin registered through the same hook as third-party
ones: ``jsonl`` (the default), ``console`` and ``null``."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass

from elastic_runner.config import EventsConfig
from elastic_runner.errors import ConfigError
from elastic_runner.events.api import Event
from elastic_runner.hookspecs import hookimpl
from elastic_runner.registry import ComponentSpec
from elastic_runner.spec import RunContext
from elastic_runner.workers.logs import JsonlFile, describe_os_error

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
    """Appends each event as a JSON line, written whole at once so a crash loses nothing.

    A disk fault does not stop the run: the first failed write (a full disk, an I/O error)
    is one warning, then events are dropped (the file keeps only whole lines)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        self._file = JsonlFile(self.path, "events are dropped from now on (the run goes on)")

    def emit(self, event: Event) -> None:
        self._file.append(event.to_json())

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
    path = context.run_dir / config.file
    try:
        return JsonlEventSink(path)
    except OSError as exc:  # at start, before any worker: the user can fix it
        raise ConfigError(
            "events.file", config.file, f"cannot open {path}: {describe_os_error(exc)}"
        ) from None


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
