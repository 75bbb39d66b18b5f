"""elastic-runner-prometheus: ``metrics=prometheus`` serves the agent's metrics at
``http://127.0.0.1:<metrics.port>/metrics`` for Prometheus to scrape."""

from elastic_runner_prometheus.config import PrometheusMetricsConfig
from elastic_runner_prometheus.handler import PrometheusMetrics

__all__ = ["PrometheusMetrics", "PrometheusMetricsConfig"]
