"""The metric interface: :class:`MetricHandler` is what handlers (built-in or a plugin such
as elastic-runner-prometheus) implement; :data:`METRICS` is the catalogue of what the agent
puts. The built-in handlers are in :mod:`elastic_runner.metrics.builtin`."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

__all__ = ["METRICS", "MetricHandler", "MetricInfo", "MetricKind", "NoMetrics"]


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


class NoMetrics:
    """Discards every value (torch's null handler): ``metrics=none``."""

    def put(self, name: str, value: float, labels: Mapping[str, str] | None = None) -> None:
        """Discard."""

    def close(self) -> None:
        """Nothing to release."""
