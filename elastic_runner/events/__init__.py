"""Events of a run: the interface (:mod:`~elastic_runner.events.api`), the catalogue of
names (:mod:`~elastic_runner.events.names`) and the built-in sinks
(:mod:`~elastic_runner.events.builtin`, a plugin like any other, not imported here)."""

from __future__ import annotations

from elastic_runner.events.api import Event, EventEmitter, EventSink, FanOutSink

__all__ = ["Event", "EventEmitter", "EventSink", "FanOutSink"]
