"""elastic-runner-prometheus: ``metrics=prometheus`` serves the agent's metrics at
``http://127.0.0.1:<metrics.port>/metrics`` for Prometheus to scrape.

prometheus_client is imported only when a run selects ``metrics=prometheus``: the plugin
module is loaded by every run, and must cost next to nothing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from elastic_runner_prometheus.config import PrometheusMetricsConfig

if TYPE_CHECKING:
    from elastic_runner_prometheus.handler import PrometheusMetrics

__all__ = ["PrometheusMetrics", "PrometheusMetricsConfig"]


def __getattr__(name: str) -> Any:
    if name == "PrometheusMetrics":
        from elastic_runner_prometheus.handler import PrometheusMetrics

        return PrometheusMetrics
    raise AttributeError(name)
