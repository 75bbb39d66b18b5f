"""A metric handler that keeps the agent's metrics in its own prometheus_client registry
and serves them over HTTP from a thread of the agent."""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Enum, Gauge, Histogram
from prometheus_client.exposition import start_http_server

from elastic_runner.metrics import METRICS, MetricKind
from elastic_runner.spec import WorkerState

__all__ = ["DURATION_BUCKETS", "PrometheusMetrics", "prometheus_name"]

log = logging.getLogger(__name__)

#: Seconds: rendezvous and restarts take from milliseconds to many minutes.
DURATION_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)


def prometheus_name(name: str, namespace: str) -> str:
    """``rendezvous.duration_s`` -> ``elastic_runner_rendezvous_duration_seconds``."""
    base = re.sub(r"_s$", "_seconds", name.replace(".", "_"))
    return re.sub(r"[^a-zA-Z0-9_]", "_", f"{namespace}_{base}")


class PrometheusMetrics:
    """Declares a collector per metric of :data:`elastic_runner.metrics.METRICS` (by its
    kind: gauge, counter, histogram, enum) and a gauge for any other name on first use.
    ``port=0`` listens on a free port: see :attr:`port`."""

    def __init__(
        self, host: str = "127.0.0.1", port: int = 9400, namespace: str = "elastic_runner"
    ) -> None:
        self.registry = CollectorRegistry()
        self.namespace = namespace
        self._lock = threading.Lock()
        self._collectors: dict[str, Any] = {}
        self._label_names: dict[str, tuple[str, ...]] = {}
        self._rejected: set[str] = set()
        for name, info in METRICS.items():
            self._declare(name, info.kind, info.help, info.labels)
        self._server, self._thread = start_http_server(port, addr=host, registry=self.registry)
        self.host = host
        self.port = int(self._server.server_address[1])
        self._closed = False

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    def _declare(self, name: str, kind: MetricKind, help: str, labels: tuple[str, ...]) -> None:
        full = prometheus_name(name, self.namespace)
        collector: Any
        if kind is MetricKind.COUNTER:
            collector = Counter(full, help, labels, registry=self.registry)
        elif kind is MetricKind.DURATION:
            collector = Histogram(
                full, help, labels, registry=self.registry, buckets=DURATION_BUCKETS
            )
        elif kind is MetricKind.STATE:
            collector = Enum(
                full,
                help,
                [label for label in labels if label != "state"],
                registry=self.registry,
                states=[s.value for s in WorkerState],
            )
        else:
            collector = Gauge(full, help, labels, registry=self.registry)
        self._collectors[name] = collector
        self._label_names[name] = labels

    def put(self, name: str, value: float, labels: Mapping[str, str] | None = None) -> None:
        labels = dict(labels or {})
        with self._lock:
            if name not in self._collectors:
                if name in self._rejected:
                    return
                try:
                    self._declare(name, MetricKind.GAUGE, f"{name} (from a plugin)", tuple(labels))
                except ValueError as exc:  # a name clash or an invalid label name
                    self._rejected.add(name)
                    log.warning("metric %r cannot be exported to Prometheus: %s", name, exc)
                    return
            collector = self._collectors[name]
            info = METRICS.get(name)
            kind = info.kind if info else MetricKind.GAUGE
            if kind is MetricKind.STATE:
                state = labels.pop("state")
                (collector.labels(**labels) if labels else collector).state(state)
                return
            if set(labels) != set(self._label_names[name]):
                return
            target = collector.labels(**labels) if labels else collector
            if kind is MetricKind.COUNTER:
                target.inc(value)
            elif kind is MetricKind.DURATION:
                target.observe(value)
            else:
                target.set(value)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)
