"""The worker launcher interface: what the agent loop needs to start, watch and stop the
workers of one attempt (:class:`~elastic_runner.workers.supervisor.ProcessSupervisor`
in production, a fake in unit tests)."""

from __future__ import annotations

import signal
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from elastic_runner.spec import Worker, WorkerActivity, WorkerExit, WorkerSpec
from elastic_runner.workers.logs import WorkerLogPaths

__all__ = ["WorkerLaunch", "WorkerLauncher"]


@dataclass(frozen=True)
class WorkerLaunch:
    """Everything needed to start one worker."""

    local_rank: int
    global_rank: int
    argv: Sequence[str]
    env: dict[str, str]
    logs: WorkerLogPaths
    #: Console line prefix for this worker's output.
    prefix: str = ""
    #: Give the worker a heartbeat pipe (ELASTIC_RUNNER_HEARTBEAT_FD).
    heartbeat: bool = False

    @classmethod
    def of(
        cls,
        spec: WorkerSpec,
        worker: Worker,
        env: dict[str, str],
        logs: WorkerLogPaths,
        *,
        prefix: str,
        node: str,
        heartbeat: bool = False,
    ) -> WorkerLaunch:
        """The launch of ``worker`` (ranks assigned) of ``spec``; ``prefix`` is the
        ``logs.prefix`` template (``{role}``, ``{rank}``, ``{local_rank}``, ``{node}``)."""
        text = prefix.format(
            role=spec.role, rank=worker.global_rank, local_rank=worker.local_rank, node=node
        )
        return cls(
            worker.local_rank,
            worker.global_rank,
            spec.argv_for(worker.local_rank),
            env,
            logs,
            text + " " if text else "",
            heartbeat=heartbeat,
        )


class WorkerLauncher(Protocol):
    """Process spawning and supervision as the agent sees it. ``wait`` blocks until a
    worker exits, ``timeout`` passes or ``wake`` is called (from any thread); every other
    method is called from the agent's thread."""

    def start(self, launches: Sequence[WorkerLaunch]) -> dict[int, int]:
        """Start every worker; their pids by local rank."""
        ...

    def wait(self, timeout: float | None = None) -> list[WorkerExit]:
        """The workers that exited since the last call (maybe none)."""
        ...

    def kill(self, local_rank: int, sig: int = signal.SIGKILL) -> None:
        """Signal one worker's whole process tree; its exit comes through ``wait``."""
        ...

    def stop(self, sig: int, timeout: float) -> list[WorkerExit]:
        """Stop every running worker: ``sig``, up to ``timeout`` s, then SIGKILL. ``sig``
        0 sends nothing first (the workers got a signal already)."""
        ...

    def wake(self) -> None:
        """End a ``wait`` in progress (safe from signal handlers and other threads)."""
        ...

    def activity(self) -> dict[int, WorkerActivity]:
        """Signs of life of each running worker, by local rank."""
        ...

    def furthest_step(self) -> int | None:
        """The furthest training step any worker of the current attempt reported
        (:func:`elastic_runner.heartbeat` with ``step``); ``None`` when none did."""
        ...
