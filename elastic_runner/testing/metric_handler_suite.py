"""The behaviour every metric handler must have.

Use it from a handler's tests::

    from elastic_runner.testing.metric_handler_suite import MetricHandlerSuite

    class TestMyHandler(MetricHandlerSuite):
        @pytest.fixture
        def make_handler(self):
            return lambda: MyHandler()                  # a new handler per call

        def observed(self, handler, name, labels):      # optional: read a value back
            ...

``observed`` returns what the handler holds for ``name`` with ``labels``, by the metric's
kind in :data:`~elastic_runner.metrics.METRICS`: a gauge's latest value, a counter's
total, a duration's number of observations, and for a state 1.0 when it is the current
state and 0.0 otherwise. Left out (``None``), the suite checks only that the handler
takes every metric quickly.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

from elastic_runner.metrics import METRICS, MetricHandler, MetricKind

__all__ = ["MetricHandlerSuite"]

MakeHandler = Callable[[], MetricHandler]


class MetricHandlerSuite:
    """Subclass; provide a ``make_handler`` fixture and, if you can, :meth:`observed`."""

    MIN_RATE: float = 1000.0

    def observed(
        self, handler: MetricHandler, name: str, labels: Mapping[str, str]
    ) -> float | None:
        return None

    def _labels(self, name: str, **values: str) -> dict[str, str]:
        return {label: values.get(label, "0") for label in METRICS[name].labels}

    def test_takes_every_metric_of_the_catalogue(self, make_handler: MakeHandler) -> None:
        handler = make_handler()
        for name, info in METRICS.items():
            handler.put(name, 1.5, self._labels(name, state="HEALTHY", kind="EXIT_CODE"))
            if info.kind is MetricKind.COUNTER:
                handler.put(name, 1, self._labels(name, kind="SIGNAL"))
        handler.close()

    def test_gauges_keep_the_latest_value(self, make_handler: MakeHandler) -> None:
        handler = make_handler()
        labels = self._labels("worker.rss_bytes", rank="3")
        for value in (100.0, 5e9, 250.0):
            handler.put("worker.rss_bytes", value, labels)
        handler.put("workers.restarts", 2)
        got = self.observed(handler, "worker.rss_bytes", labels)
        restarts = self.observed(handler, "workers.restarts", {})
        handler.close()
        if got is not None:
            assert got == 250.0
            assert restarts == 2.0

    def test_counters_add_up_per_label(self, make_handler: MakeHandler) -> None:
        handler = make_handler()
        for kind in ("EXIT_CODE", "EXIT_CODE", "SIGNAL", "OOM_KILL", "EXIT_CODE"):
            handler.put("workers.failures", 1, {"kind": kind})
        exit_code = self.observed(handler, "workers.failures", {"kind": "EXIT_CODE"})
        oom = self.observed(handler, "workers.failures", {"kind": "OOM_KILL"})
        handler.close()
        if exit_code is not None:
            assert (exit_code, oom) == (3.0, 1.0)

    def test_durations_count_observations(self, make_handler: MakeHandler) -> None:
        handler = make_handler()
        for seconds in (0.01, 0.2, 3.0):
            handler.put("rendezvous.duration_s", seconds)
        got = self.observed(handler, "rendezvous.duration_s", {})
        handler.close()
        if got is not None:
            assert got == 3.0

    def test_state_is_one_state_at_a_time(self, make_handler: MakeHandler) -> None:
        handler = make_handler()
        for state in ("INIT", "HEALTHY", "STOPPED", "HEALTHY"):
            handler.put("group.state", 1, {"state": state})
        healthy = self.observed(handler, "group.state", {"state": "HEALTHY"})
        stopped = self.observed(handler, "group.state", {"state": "STOPPED"})
        handler.close()
        if healthy is not None:
            assert (healthy, stopped) == (1.0, 0.0)

    def test_unknown_names_are_accepted(self, make_handler: MakeHandler) -> None:
        handler = make_handler()
        handler.put("myplugin.custom-thing/s", 7.0, {"any label": "x"})
        handler.close()

    def test_put_does_not_hold_up_the_agent(self, make_handler: MakeHandler) -> None:
        handler = make_handler()
        n = int(self.MIN_RATE)
        labels = self._labels("worker.cpu_percent", rank="0")
        t0 = time.perf_counter()
        for i in range(n):
            handler.put("worker.cpu_percent", float(i), labels)
        elapsed = time.perf_counter() - t0
        handler.close()
        assert elapsed < 1.0, f"{n} values took {elapsed:.2f} s"

    def test_close_may_be_called_twice(self, make_handler: MakeHandler) -> None:
        handler = make_handler()
        handler.close()
        handler.close()
