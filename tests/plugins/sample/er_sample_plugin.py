"""A test plugin installed by elastic_runner's tests: an event sink with its own schema
(``events=sample events.file=...``) and every lifecycle hook, each logging a JSON line to
``$ER_SAMPLE_LOG``. The health check refuses while ``$ER_SAMPLE_REFUSE`` is set (to its
value)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

from elastic_runner import hookimpl
from elastic_runner.config import EventsConfig
from elastic_runner.registry import ComponentSpec


def _log(**record: Any) -> None:
    path = os.environ.get("ER_SAMPLE_LOG")
    if path:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, default=str) + "\n")


@dataclass
class SampleEventsConfig(EventsConfig):
    sink: str = "sample"
    file: str = "sample-events.txt"


class SampleSink:
    def __init__(self, path: str) -> None:
        self.file = open(path, "a", encoding="utf-8")  # noqa: SIM115

    def emit(self, event: Any) -> None:
        self.file.write(event.name + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


@hookimpl
def elastic_runner_event_sinks() -> list[ComponentSpec]:
    return [
        ComponentSpec(
            "sample",
            lambda config, context: SampleSink(str(context.run_dir / config.file)),
            SampleEventsConfig,
            "event names, one a line",
        )
    ]


@hookimpl
def elastic_runner_before_rendezvous(context: Any, attempt: int, restart_count: int) -> str | None:
    refuse = os.environ.get("ER_SAMPLE_REFUSE")
    _log(
        hook="before_rendezvous",
        attempt=attempt,
        restart_count=restart_count,
        run_id=context.run_id,
        refused=bool(refuse),
    )
    return refuse or None


@hookimpl
def elastic_runner_workers_started(context: Any, group: Any) -> None:
    _log(
        hook="workers_started",
        attempt=group.attempt,
        pids=[w.pid for w in group.workers],
        ranks=[w.global_rank for w in group.workers],
    )


@hookimpl
def elastic_runner_worker_failure(
    context: Any, group: Any, failures: Any, will_restart: bool
) -> None:
    root = failures[0]
    _log(
        hook="worker_failure",
        attempt=group.attempt,
        rank=root.exit.global_rank,
        kind=root.kind.name,
        message=root.message,
        will_restart=will_restart,
        failed_ranks=[f.exit.global_rank for f in failures],
    )


@hookimpl
def elastic_runner_run_end(context: Any, result: Any) -> None:
    root = result.root_cause
    _log(
        hook="run_end",
        state=result.state.value,
        exit_code=result.exit_code,
        attempts=result.attempts,
        root_cause=root.message if root else None,
        ended_because=result.ended_because,
    )
