"""Metric handlers. Built-in: ``none`` (discards). The handler interface is what plugins
(for example elastic-runner-prometheus) implement."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from elastic_runner.config import MetricsConfig
from elastic_runner.hookspecs import hookimpl
from elastic_runner.registry import ComponentSpec

__all__ = ["MetricHandler", "NoMetrics", "NoMetricsConfig"]


class MetricHandler(Protocol):
    """Receives named values (``rendezvous.duration_s``, ``workers.restarts`` ...)."""

    def put(self, name: str, value: float, labels: Mapping[str, str] | None = None) -> None: ...

    def close(self) -> None: ...


@dataclass
class NoMetricsConfig(MetricsConfig):
    handler: str = "none"


class NoMetrics:
    """Discards every value."""

    def put(self, name: str, value: float, labels: Mapping[str, str] | None = None) -> None:
        """Discard."""

    def close(self) -> None:
        """Nothing to release."""


@hookimpl
def elastic_runner_metric_handlers() -> Sequence[ComponentSpec]:
    return [ComponentSpec("none", lambda c, ctx: NoMetrics(), NoMetricsConfig, "discard")]
