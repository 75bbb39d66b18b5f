"""Typed events of a run and the built-in event sinks (``jsonl``, ``console``, ``null``).

The agent emits an :class:`Event` at every step; sinks are components selected with
``events=<name>``. Names follow torch where torch has one
(``torchelastic.worker.status.<STATE>``).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import IO, Any, Protocol

from elastic_runner.config import EventsConfig
from elastic_runner.hookspecs import hookimpl
from elastic_runner.registry import ComponentSpec
from elastic_runner.spec import RunContext

__all__ = [
    "ConsoleEventsConfig",
    "Event",
    "EventSink",
    "FanOutSink",
    "JsonlEventSink",
    "JsonlEventsConfig",
    "NullEventsConfig",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Event:
    """One thing that happened. ``source`` is ``AGENT`` or ``WORKER``; ``timestamp`` is
    wall-clock seconds (``time.time()``)."""

    name: str
    source: str
    run_id: str
    node: str
    timestamp: float = field(default_factory=time.time)
    rank: int | None = None
    state: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), default=str, separators=(",", ":"))


class EventSink(Protocol):
    """Receives every event of the run, in order, from the agent's thread."""

    def emit(self, event: Event) -> None: ...

    def close(self) -> None: ...


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


class FanOutSink:
    """Gives each event to several sinks in turn (the selected sink, the live status)."""

    def __init__(self, sinks: Sequence[EventSink]) -> None:
        self.sinks = list(sinks)

    def emit(self, event: Event) -> None:
        for sink in self.sinks:
            sink.emit(event)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()


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
