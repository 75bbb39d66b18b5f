"""Metric handlers. Built-in: ``none`` (discards; torch's null handler), ``console`` and
``jsonl``. The handler interface is what plugins (for example elastic-runner-prometheus)
implement; :data:`METRICS` is the catalogue of what the agent puts."""

from __future__ import annotations

import enum
import json
import os
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import IO, Protocol

from elastic_runner.config import MetricsConfig
from elastic_runner.hookspecs import hookimpl
from elastic_runner.registry import ComponentSpec

__all__ = [
    "METRICS",
    "ConsoleMetrics",
    "JsonlMetrics",
    "MetricHandler",
    "MetricInfo",
    "MetricKind",
    "NoMetrics",
    "NoMetricsConfig",
]


class MetricKind(str, enum.Enum):
    """How a handler should aggregate the values put under one name."""

    #: The latest value is the value (RSS, the restart count).
    GAUGE = "gauge"
    #: Each value is an increment (one failure).
    COUNTER = "counter"
    #: Each value is one observation of a duration, in seconds.
    DURATION = "duration"
    #: Value 1 with a ``state`` label: the group is now in that state (and no other).
    STATE = "state"


@dataclass(frozen=True)
class MetricInfo:
    kind: MetricKind
    help: str
    labels: tuple[str, ...] = ()


#: Every metric the agent puts, by name. Handlers may rely on this catalogue (the
#: Prometheus plugin declares its collectors from it); unknown names are gauges.
METRICS: Mapping[str, MetricInfo] = {
    "rendezvous.duration_s": MetricInfo(
        MetricKind.DURATION, "Seconds from joining a rendezvous round to its completion"
    ),
    "workers.start_latency_s": MetricInfo(
        MetricKind.DURATION, "Seconds to start every worker of an attempt"
    ),
    "recovery.duration_s": MetricInfo(
        MetricKind.DURATION, "Seconds from a failure detected to the workers running again"
    ),
    "workers.restarts": MetricInfo(
        MetricKind.GAUGE, "Restarts spent on failures (TORCHELASTIC_RESTART_COUNT)"
    ),
    "workers.failures": MetricInfo(
        MetricKind.COUNTER, "Workers that failed on their own, by class", ("kind",)
    ),
    "group.state": MetricInfo(MetricKind.STATE, "State of this node's worker group", ("state",)),
    "worker.rss_bytes": MetricInfo(
        MetricKind.GAUGE, "Resident memory of a worker's process tree", ("rank",)
    ),
    "worker.cpu_percent": MetricInfo(
        MetricKind.GAUGE, "CPU use of a worker's process tree (100 = one core)", ("rank",)
    ),
}


class MetricHandler(Protocol):
    """Receives named values (``rendezvous.duration_s``, ``workers.restarts`` ...; see
    :data:`METRICS`) from the agent's thread."""

    def put(self, name: str, value: float, labels: Mapping[str, str] | None = None) -> None: ...

    def close(self) -> None: ...


@dataclass
class NoMetricsConfig(MetricsConfig):
    handler: str = "none"


@dataclass
class NullMetricsConfig(MetricsConfig):
    handler: str = "null"


@dataclass
class ConsoleMetricsConfig(MetricsConfig):
    handler: str = "console"


@dataclass
class JsonlMetricsConfig(MetricsConfig):
    handler: str = "jsonl"
    #: File in the run directory, one JSON object a line.
    file: str = "metrics.jsonl"


class NoMetrics:
    """Discards every value (torch's null handler): ``metrics=none``."""

    def put(self, name: str, value: float, labels: Mapping[str, str] | None = None) -> None:
        """Discard."""

    def close(self) -> None:
        """Nothing to release."""


def _label_text(labels: Mapping[str, str] | None) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f"{k}={v}" for k, v in sorted(labels.items())) + "}"


class ConsoleMetrics:
    """One line per value on stderr: ``[metric] workers.failures{kind=EXIT_CODE} 1``."""

    def __init__(self, stream: IO[str] | None = None) -> None:
        self._stream = stream

    def put(self, name: str, value: float, labels: Mapping[str, str] | None = None) -> None:
        stream = self._stream or sys.stderr
        stream.write(f"[metric] {name}{_label_text(labels)} {value:g}\n")

    def close(self) -> None:
        """Nothing to release (stderr stays open)."""


class JsonlMetrics:
    """Appends ``{"name", "value", "labels", "kind", "timestamp"}`` per value; flushed per
    line, so a crash loses nothing."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        self._file: IO[str] = open(self.path, "a", encoding="utf-8")  # noqa: SIM115

    def put(self, name: str, value: float, labels: Mapping[str, str] | None = None) -> None:
        info = METRICS.get(name)
        record = {
            "name": name,
            "value": value,
            "labels": dict(labels or {}),
            "kind": info.kind.value if info else MetricKind.GAUGE.value,
            "timestamp": time.time(),
        }
        self._file.write(json.dumps(record, separators=(",", ":")) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


@hookimpl
def elastic_runner_metric_handlers() -> Sequence[ComponentSpec]:
    return [
        ComponentSpec("none", lambda c, ctx: NoMetrics(), NoMetricsConfig, "discard"),
        ComponentSpec("null", lambda c, ctx: NoMetrics(), NullMetricsConfig, "discard"),
        ComponentSpec(
            "console", lambda c, ctx: ConsoleMetrics(), ConsoleMetricsConfig, "lines on stderr"
        ),
        ComponentSpec(
            "jsonl",
            lambda c, ctx: JsonlMetrics(ctx.run_dir / c.file),
            JsonlMetricsConfig,
            "metrics.jsonl in the run directory",
        ),
    ]
