"""The ``metrics=prometheus`` schema, registered in Hydra's ConfigStore by elastic-run."""

from __future__ import annotations

from dataclasses import dataclass

from elastic_runner.config import MetricsConfig

__all__ = ["PrometheusMetricsConfig"]


@dataclass
class PrometheusMetricsConfig(MetricsConfig):
    handler: str = "prometheus"
    #: Port of the ``/metrics`` endpoint; 0 picks a free one (logged, and written to
    #: ``prometheus.url`` in the run directory). Each agent on a host needs its own.
    port: int = 9400
    #: Address to listen on. Loopback by default: set ``0.0.0.0`` (or an interface's
    #: address) for a Prometheus server on another machine.
    host: str = "127.0.0.1"
    #: Prefix of every metric name.
    namespace: str = "elastic_runner"
