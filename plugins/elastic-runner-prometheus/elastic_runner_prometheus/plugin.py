"""The plugin module registered through the ``elastic_runner`` entry point."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

from elastic_runner import hookimpl
from elastic_runner.errors import ConfigError
from elastic_runner.registry import ComponentSpec
from elastic_runner.spec import RunContext
from elastic_runner_prometheus.config import PrometheusMetricsConfig

if TYPE_CHECKING:
    from elastic_runner_prometheus.handler import PrometheusMetrics

log = logging.getLogger("elastic_runner.prometheus")


def make_handler(config: PrometheusMetricsConfig, context: RunContext) -> PrometheusMetrics:
    if not 0 <= config.port <= 65535:
        raise ConfigError("metrics.port", config.port, "expected 0 (any free port) to 65535")
    from elastic_runner_prometheus.handler import PrometheusMetrics

    try:
        handler = PrometheusMetrics(config.host, config.port, config.namespace)
    except OSError as exc:
        raise ConfigError(
            "metrics.port",
            config.port,
            f"cannot listen on {config.host}:{config.port} ({exc.strerror or exc}); choose "
            "another port, or 0 for any free one",
        ) from None
    (context.run_dir / "prometheus.url").write_text(handler.url + "\n")
    log.info("metrics for Prometheus at %s", handler.url)
    return handler


@hookimpl
def elastic_runner_metric_handlers() -> Sequence[ComponentSpec]:
    return [
        ComponentSpec(
            "prometheus",
            make_handler,
            PrometheusMetricsConfig,
            "a /metrics endpoint for Prometheus (metrics.port, metrics.host)",
        )
    ]
