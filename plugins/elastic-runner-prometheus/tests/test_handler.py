"""The Prometheus handler: the conformance suite, a real scrape, and loopback by default."""

from __future__ import annotations

import socket
import urllib.request
from collections.abc import Callable, Iterator, Mapping

import pytest
from elastic_runner_prometheus import PrometheusMetrics
from elastic_runner_prometheus.handler import prometheus_name
from elastic_runner_prometheus.scrape import scrape

from elastic_runner.addresses import address_towards
from elastic_runner.metrics import MetricHandler
from elastic_runner.testing.metric_handler_suite import MetricHandlerSuite


class TestPrometheusHandler(MetricHandlerSuite):
    @pytest.fixture
    def make_handler(self) -> Iterator[Callable[[], PrometheusMetrics]]:
        made: list[PrometheusMetrics] = []

        def make() -> PrometheusMetrics:
            made.append(PrometheusMetrics(port=0))
            return made[-1]

        yield make
        for handler in made:
            handler.close()

    def observed(
        self, handler: MetricHandler, name: str, labels: Mapping[str, str]
    ) -> float | None:
        """Read back over HTTP, as Prometheus would."""
        assert isinstance(handler, PrometheusMetrics)
        samples = scrape(handler.url)
        full = prometheus_name(name, handler.namespace)
        if name == "group.state":
            return samples[full, ((full, labels["state"]),)]
        for suffix in ("", "_total", "_count"):
            key = (full + suffix, tuple(sorted(labels.items())))
            if key in samples:
                return samples[key]
        return None


def test_names() -> None:
    assert prometheus_name("rendezvous.duration_s", "elastic_runner") == (
        "elastic_runner_rendezvous_duration_seconds"
    )
    assert prometheus_name("my-plugin.x/y", "ns") == "ns_my_plugin_x_y"


def test_only_loopback_by_default() -> None:
    handler = PrometheusMetrics(port=0)
    try:
        assert handler.url.startswith("http://127.0.0.1:")
        assert (
            "elastic_runner_workers_restarts"
            in urllib.request.urlopen(handler.url, timeout=5).read().decode()
        )
        outside = address_towards("192.0.2.1", 9)  # this host's non-loopback address
        if outside.startswith("127.") or not outside[0].isdigit():
            pytest.skip("this machine has no non-loopback address")
        with pytest.raises(OSError), socket.create_connection((outside, handler.port), 2):
            pass
    finally:
        handler.close()


def test_a_busy_port_is_a_clear_config_error(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from elastic_runner_prometheus.config import PrometheusMetricsConfig
    from elastic_runner_prometheus.plugin import make_handler

    from elastic_runner.errors import ConfigError
    from elastic_runner.spec import RunContext

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(ConfigError, match=rf"metrics.port={port}: cannot listen on"):
            make_handler(PrometheusMetricsConfig(port=port), RunContext("r", tmp_path, "n"))
    with pytest.raises(ConfigError, match=r"metrics\.port=70000: expected 0"):
        make_handler(PrometheusMetricsConfig(port=70000), RunContext("r", tmp_path, "n"))
