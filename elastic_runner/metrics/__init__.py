"""Metrics of a run: the interface and catalogue (:mod:`~elastic_runner.metrics.api`) and
the built-in handlers (:mod:`~elastic_runner.metrics.builtin`, a plugin like any other, not
imported here)."""

from __future__ import annotations

from elastic_runner.metrics.api import METRICS, MetricHandler, MetricInfo, MetricKind, NoMetrics

__all__ = ["METRICS", "MetricHandler", "MetricInfo", "MetricKind", "NoMetrics"]
