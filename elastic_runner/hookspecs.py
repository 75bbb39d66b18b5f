"""Every hook of elastic_runner, documented in one place (pytest's ``hookspec.py`` is the
model).

Plugins implement hooks with ``@elastic_runner.hookimpl``. The built-in backends, sinks and
handlers are plugin modules registered through exactly these hooks; third-party packages
are found through the ``elastic_runner`` entry-point group.

The four *component* hooks are spec-returning: each implementation returns a list of
:class:`~elastic_runner.registry.ComponentSpec` (name, factory, config schema). Calling
them has no side effect; a factory runs only for the component a run selects, and every
spec's schema is registered with Hydra so ``rdzv=<name>`` composes and validates.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from elastic_runner.registry import ComponentSpec

__all__ = ["PROJECT_NAME", "hookimpl", "hookspec"]

PROJECT_NAME = "elastic_runner"
hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


@hookspec
def elastic_runner_rendezvous_backends() -> Sequence[ComponentSpec]:
    """Rendezvous backends this plugin provides, selected with ``rdzv=<name>``.

    Each factory is called as ``factory(config, context)`` with the composed ``rdzv``
    config (an instance of the spec's ``config_class``) and the run's
    :class:`~elastic_runner.spec.RunContext`, and returns a
    :class:`~elastic_runner.rendezvous.RendezvousHandler`.

    Example::

        @hookimpl
        def elastic_runner_rendezvous_backends():
            return [ComponentSpec("redis", RedisRendezvous.from_config, RedisConfig)]
    """


@hookspec
def elastic_runner_event_sinks() -> Sequence[ComponentSpec]:
    """Event sinks this plugin provides, selected with ``events=<name>``.

    ``factory(config, context)`` returns an :class:`~elastic_runner.events.EventSink`
    whose ``emit(event)`` receives every :class:`~elastic_runner.events.Event` of the run.
    """


@hookspec
def elastic_runner_metric_handlers() -> Sequence[ComponentSpec]:
    """Metric handlers this plugin provides, selected with ``metrics=<name>``.

    ``factory(config, context)`` returns a :class:`~elastic_runner.metrics.MetricHandler`.
    """


@hookspec
def elastic_runner_timer_servers() -> Sequence[ComponentSpec]:
    """Worker timer servers this plugin provides, selected with ``timer=<name>``.

    ``factory(config, context)`` returns a :class:`~elastic_runner.timer.TimerServer`.
    """
