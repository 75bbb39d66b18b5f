"""The event interface: what a run emits (:class:`Event`), what receives it
(:class:`EventSink`), and how the agent stamps its events (:class:`EventEmitter`).

Sinks are components selected with ``events=<name>``; the built-in ones are in
:mod:`elastic_runner.events.builtin`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from elastic_runner.events import names
from elastic_runner.spec import Failure, WorkerExit, WorkerGroup, WorkerStatus

__all__ = ["Event", "EventEmitter", "EventSink", "FanOutSink"]


@dataclass(frozen=True)
class Event:
    """One thing that happened. ``source`` is ``AGENT`` or ``WORKER``; ``timestamp`` is
    wall-clock seconds (``time.time()``). ``name`` is one of
    :data:`elastic_runner.events.names.EVENTS`."""

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


class EventEmitter:
    """Stamps the agent's events with the run id, the node, the group's state and its
    counters (``attempt``, ``restart_count``), and gives them to a sink."""

    def __init__(self, sink: EventSink, run_id: str, node: str, group: WorkerGroup) -> None:
        self.sink = sink
        self._run_id, self._node, self._group = run_id, node, group

    def agent(self, name: str, **metadata: object) -> None:
        """An event of the agent itself (``state`` is the group's state)."""
        self._emit(name, "AGENT", None, self._group.state.value, metadata)

    def worker(self, status: WorkerStatus, rank: int, **metadata: object) -> None:
        """A worker started or ended (torch's ``torchelastic.worker.status.<STATE>``)."""
        self._emit(names.status(status.value), "WORKER", rank, status.value, metadata)

    def worker_exit(self, status: WorkerStatus, exit_: WorkerExit, failure: Failure | None) -> None:
        """A worker ended: how (exit code or signal, when the agent saw it, its peak RSS)
        and, when it failed, the diagnosis (its class and message)."""
        self.worker(
            status,
            exit_.global_rank,
            pid=exit_.pid,
            local_rank=exit_.local_rank,
            exit_code=exit_.returncode,
            signal=exit_.signal_name,
            detected_at=exit_.timestamp,
            max_rss=exit_.max_rss or None,
            failure=failure.kind.name if failure else None,
            error=failure.message if failure else None,
        )

    def _emit(
        self, name: str, source: str, rank: int | None, state: str, metadata: dict[str, object]
    ) -> None:
        metadata.setdefault("attempt", self._group.attempt)
        metadata.setdefault("restart_count", self._group.restart_count)
        self.sink.emit(
            Event(
                name=name,
                source=source,
                run_id=self._run_id,
                node=self._node,
                rank=rank,
                state=state,
                metadata=dict(metadata),
            )
        )
