"""elastic_runner: an elastic launcher for distributed jobs.

``elastic-run`` starts a job's workers on every node with torchrun's worker contract,
supervises them and restarts them on failure. Extension points are pluggy hooks
(:mod:`elastic_runner.hookspecs`); implement them with :data:`hookimpl`. Workers may use
:func:`record` to report their errors, :func:`heartbeat` to report progress and
:func:`elastic_runner.timer.expires` to arm a watchdog timer.

:func:`launch` runs a job from Python (functions with return values, or scripts) and
returns a :class:`RunResult`.

Names are imported lazily so that a worker importing ``record`` pays for nothing else.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from elastic_runner.api import ChildFailedError, LaunchError, launch
    from elastic_runner.error_file import record
    from elastic_runner.hookspecs import hookimpl
    from elastic_runner.progress import heartbeat
    from elastic_runner.registry import ComponentSpec
    from elastic_runner.spec import Failure, RunResult, WorkerSpec, WorkerState

__all__ = [
    "ChildFailedError",
    "ComponentSpec",
    "Failure",
    "LaunchError",
    "RunResult",
    "WorkerSpec",
    "WorkerState",
    "__version__",
    "heartbeat",
    "hookimpl",
    "launch",
    "record",
]

__version__ = "0.1.0"

_LAZY = {
    "hookimpl": "elastic_runner.hookspecs",
    "record": "elastic_runner.error_file",
    "heartbeat": "elastic_runner.progress",
    "ComponentSpec": "elastic_runner.registry",
    "launch": "elastic_runner.api",
    "ChildFailedError": "elastic_runner.api",
    "LaunchError": "elastic_runner.api",
    "Failure": "elastic_runner.spec",
    "RunResult": "elastic_runner.spec",
    "WorkerSpec": "elastic_runner.spec",
    "WorkerState": "elastic_runner.spec",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'elastic_runner' has no attribute {name!r}")
