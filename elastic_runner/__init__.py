"""elastic_runner: an elastic launcher for distributed jobs.

``elastic-run`` starts a job's workers on every node with torchrun's worker contract,
supervises them and restarts them on failure. Extension points are pluggy hooks
(:mod:`elastic_runner.hookspecs`); implement them with :data:`hookimpl`. Workers may use
:func:`record` to report their errors, :func:`heartbeat` to report progress and
:func:`elastic_runner.timer.expires` to arm a watchdog timer.

Names are imported lazily so that a worker importing ``record`` pays for nothing else.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from elastic_runner.error_file import record
    from elastic_runner.hookspecs import hookimpl
    from elastic_runner.progress import heartbeat
    from elastic_runner.registry import ComponentSpec

__all__ = ["ComponentSpec", "__version__", "heartbeat", "hookimpl", "record"]

__version__ = "0.1.0"

_LAZY = {
    "hookimpl": "elastic_runner.hookspecs",
    "record": "elastic_runner.error_file",
    "heartbeat": "elastic_runner.progress",
    "ComponentSpec": "elastic_runner.registry",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'elastic_runner' has no attribute {name!r}")
