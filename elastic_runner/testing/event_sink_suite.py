"""The behaviour every event sink must have.

Use it from a sink's tests::

    from elastic_runner.testing.event_sink_suite import EventSinkSuite

    class TestMySink(EventSinkSuite):
        @pytest.fixture
        def make_sink(self, tmp_path):
            return lambda: MySink(tmp_path / "out")     # a new sink per call

        def delivered(self, sink):                      # optional: what reached the target
            return [json.loads(line) for line in (tmp_path / "out").read_text().splitlines()]

``delivered`` returns the events the sink wrote, as dicts of :class:`Event`'s fields, in
order; left out (``None``), the suite checks only that the sink takes every event quickly.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from elastic_runner.events import Event, EventSink

__all__ = ["EventSinkSuite", "sample_events"]

MakeSink = Callable[[], EventSink]


def sample_events(run_id: str = "suite-run") -> list[Event]:
    """One of each shape the agent emits: agent and worker sources, ``None`` fields,
    metadata with nested values, non-ASCII text and values JSON cannot encode as is."""
    node = "node-\u00e9"
    return [
        Event(
            "torchelastic.worker.status.RENDEZVOUS",
            "AGENT",
            run_id,
            node,
            metadata={"round": 1, "group_rank": 0, "duration_ms": 12.5},
        ),
        Event(
            "torchelastic.worker.status.START",
            "WORKER",
            run_id,
            node,
            rank=0,
            state="START",
            metadata={"pid": 4242, "local_rank": 0},
        ),
        Event(
            "torchelastic.worker.status.FAILED",
            "WORKER",
            run_id,
            node,
            rank=1,
            state="FAILED",
            metadata={
                "exit_code": None,
                "signal": "SIGKILL",
                "error": "ValueError: caf\u00e9 \u4e2d",
                "path": Path("/tmp/x"),
                "nested": {"a": [1, 2]},
            },
        ),
        Event("elastic_runner.restart", "AGENT", run_id, node, metadata={"reason": "failure"}),
        Event("torchelastic.worker.status.SUCCEEDED", "AGENT", run_id, node),
    ]


class EventSinkSuite:
    """Subclass; provide a ``make_sink`` fixture and, if you can, :meth:`delivered`."""

    #: Events a sink must take per second without holding up the agent's thread.
    MIN_RATE: float = 1000.0

    def delivered(self, sink: EventSink) -> list[dict[str, Any]] | None:
        """The events ``sink`` delivered so far, oldest first (``None``: not observable)."""
        return None

    def test_takes_every_event_shape(self, make_sink: MakeSink) -> None:
        sink = make_sink()
        events = sample_events()
        for event in events:
            sink.emit(event)
        got = self.delivered(sink)
        sink.close()
        if got is None:
            return
        assert [e["name"] for e in got] == [e.name for e in events]
        assert [e.get("rank") for e in got] == [e.rank for e in events]
        assert got[2]["metadata"]["error"] == "ValueError: caf\u00e9 \u4e2d"
        assert got[2]["metadata"]["signal"] == "SIGKILL"
        assert {e["run_id"] for e in got} == {"suite-run"}

    def test_emit_does_not_hold_up_the_agent(self, make_sink: MakeSink) -> None:
        sink = make_sink()
        n = int(self.MIN_RATE)
        event = sample_events()[1]
        t0 = time.perf_counter()
        for _ in range(n):
            sink.emit(event)
        elapsed = time.perf_counter() - t0
        sink.close()
        assert elapsed < 1.0, f"{n} events took {elapsed:.2f} s"

    def test_close_releases_and_may_be_called_twice(self, make_sink: MakeSink) -> None:
        sink = make_sink()
        sink.emit(sample_events()[0])
        sink.close()
        sink.close()

    def test_an_unused_sink_closes(self, make_sink: MakeSink) -> None:
        make_sink().close()
