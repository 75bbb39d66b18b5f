"""elastic_runner: an elastic launcher for distributed jobs.

``elastic-run`` starts a job's workers on every node with torchrun's worker contract,
supervises them and restarts them on failure. Extension points are pluggy hooks
(:mod:`elastic_runner.hookspecs`); implement them with :data:`hookimpl`.
"""

from elastic_runner.hookspecs import hookimpl
from elastic_runner.registry import ComponentSpec

__all__ = ["ComponentSpec", "__version__", "hookimpl"]

__version__ = "0.1.0"
