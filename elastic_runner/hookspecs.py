"""Every hook of elastic_runner, documented in one place (pytest's ``hookspec.py`` is the
model).

Plugins implement hooks with ``@elastic_runner.hookimpl`` (a function named
``elastic_runner_*`` is taken as an implementation even without the decorator, as pytest
does for ``pytest_*``). The built-in backends, sinks and handlers are plugin modules
registered through exactly these hooks; third-party packages are found through the
``elastic_runner`` entry-point group. A plugin that implements a hook not listed here
(a misspelled name) or takes an argument its hook does not have is an error at start-up:
one line naming the plugin, the hook and the closest hook name, exit code 2.

Every hook is called through pluggy (``pm.hook.<name>(...)``): ``tryfirst``/``trylast``
order the implementations and wrappers (``@hookimpl(wrapper=True)`` or the old-style
``hookwrapper=True``) run around them. Each non-wrapper implementation is guarded, so
one plugin cannot stop the others or take the run down, and what a wrapper sees is the
guarded results (see each family below). Wrappers are not guarded.

Two families:

* The four *component* hooks are spec-returning: each implementation returns a list of
  :class:`~elastic_runner.registry.ComponentSpec` (name, factory, config schema). Calling
  them has no side effect; a factory runs only for the component a run selects, and every
  spec's schema is registered with Hydra so ``rdzv=<name>`` composes and validates. A
  wrapper sees one list per implementation, each spec tagged with its ``provider`` (the
  plugin's name). An implementation that raises, or returns anything but specs, is an
  error at start-up naming the plugin and the hook.
* The four *lifecycle* hooks are called by the agent at fixed points of a run, on the
  agent's thread: before each rendezvous (a health check that can keep the node out),
  after the workers start, after a failed attempt's workers are stopped and before the
  restart, and at the end of the run. An exception raised by a lifecycle hook is logged
  with the plugin's name and does not stop the run nor the other implementations, except
  in the health check, where it counts as a refusal. The health check is a
  ``firstresult`` hook: the first refusal ends the call, and a wrapper sees it as a
  :class:`~elastic_runner.lifecycle.Refusal` naming the plugin (or ``None``).

``docs/plugins.md`` shows each hook with a short example.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from elastic_runner.registry import ComponentSpec
    from elastic_runner.spec import Failure, RunContext, RunResult, WorkerGroup

__all__ = ["HOOK_PREFIX", "PROJECT_NAME", "hookimpl", "hookspec"]

PROJECT_NAME = "elastic_runner"
#: Every hook's name starts with it (and nothing else of a plugin's should).
HOOK_PREFIX = f"{PROJECT_NAME}_"
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

    ``factory(config, context)`` returns a :class:`~elastic_runner.timer.server.TimerServer`.
    """


# -- lifecycle ------------------------------------------------------------------------------


@hookspec(firstresult=True)
def elastic_runner_before_rendezvous(
    context: RunContext, attempt: int, restart_count: int
) -> str | None:
    """Called before this node joins each rendezvous round (the first, and again before
    every restart or re-formation); ``attempt`` is the group's next attempt number (1 for
    the first) and ``restart_count`` the restarts spent before this round (a restart after
    a failure is counted when the round forms, so the call after the first failure still
    sees 0; :func:`elastic_runner_worker_failure` came just before it).

    A node health check: return ``None`` to join, or a short reason to keep this node out.
    A refused node does not join: the agent leaves the job (the other nodes re-form
    without it, as after a scale-down, if ``nnodes`` still allows) and exits with code 1,
    naming the plugin and the reason. Raising counts as a refusal.

    A ``firstresult`` hook: the first refusal (in pluggy's order, ``tryfirst`` first)
    ends the call and the remaining health checks are not called. Through pluggy the
    hook returns a :class:`~elastic_runner.lifecycle.Refusal` (plugin, reason) or
    ``None``: that is what a wrapper's ``yield`` gives back.

    Example::

        @hookimpl
        def elastic_runner_before_rendezvous(context, attempt, restart_count):
            free = shutil.disk_usage(context.run_dir).free
            return None if free > 10 * 2**30 else f"only {free >> 30} GiB free on disk"
    """


@hookspec
def elastic_runner_workers_started(context: RunContext, group: WorkerGroup) -> None:
    """Called after every worker of an attempt has been started: ``group.workers`` carries
    each worker's ranks and pid, ``group.attempt`` and ``group.restart_count`` say which
    attempt this is.

    Example::

        @hookimpl
        def elastic_runner_workers_started(context, group):
            pids = [w.pid for w in group.workers]
            log.info("attempt %d: pids %s", group.attempt, pids)
    """


@hookspec
def elastic_runner_worker_failure(
    context: RunContext,
    group: WorkerGroup,
    failures: Sequence[Failure],
    will_restart: bool,
) -> None:
    """Called once per failed attempt, after its workers were stopped and before the
    restart (or before the run ends, when ``will_restart`` is false): the place for node
    diagnostics between a failure and the next rendezvous (torch RFC #148048).

    ``failures`` holds the workers that failed on their own, root cause first (the one
    with the earliest precise timestamp): its ``kind``, ``message``, ``traceback`` and
    ``exit`` (rank, pid, exit code or signal). The restart waits for every
    implementation to return.

    Example::

        @hookimpl
        def elastic_runner_worker_failure(context, group, failures, will_restart):
            root = failures[0]
            (context.run_dir / "dmesg.txt").write_text(subprocess.run(
                ["dmesg", "-T"], capture_output=True, text=True).stdout)
            alert(f"rank {root.exit.global_rank}: {root.describe()}")
    """


@hookspec
def elastic_runner_run_end(context: RunContext, result: RunResult) -> None:
    """Called once when the run is over, whatever the outcome (success, failure, a stop
    signal, a failed rendezvous or a refused health check), after every worker is gone:
    ``result.state``, ``result.exit_code``, ``result.root_cause``, ``result.attempts``.

    Example::

        @hookimpl
        def elastic_runner_run_end(context, result):
            notify(f"{context.run_id}: {result.state.value} after {result.attempts} attempts")
    """
