"""The lifecycle hooks as the agent calls them: one typed method per hook, each calling
every implementation in turn so that one broken plugin is named in the log and cannot
take the run down (except the health check, where an exception is a refusal)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import pluggy

from elastic_runner.spec import Failure, RunContext, RunResult, WorkerGroup

__all__ = ["Lifecycle", "NoLifecycle", "Refusal"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Refusal:
    """A plugin's health check kept this node out of the rendezvous."""

    plugin: str
    reason: str

    def describe(self) -> str:
        return f"health check of plugin {self.plugin!r} refused to join: {self.reason}"


class Lifecycle:
    """Calls the lifecycle hooks of a plugin manager's registered plugins."""

    def __init__(self, pm: pluggy.PluginManager, context: RunContext) -> None:
        self._hook = pm.hook
        self._context = context

    def before_rendezvous(self, attempt: int, restart_count: int) -> Refusal | None:
        """The first refusal from a health check, or ``None`` to join."""
        for plugin, outcome in self._each(
            "elastic_runner_before_rendezvous", attempt=attempt, restart_count=restart_count
        ):
            if isinstance(outcome, BaseException):
                return Refusal(plugin, f"raised {type(outcome).__name__}: {outcome}")
            if outcome is not None:
                return Refusal(plugin, str(outcome))
        return None

    def workers_started(self, group: WorkerGroup) -> None:
        self._call_all("elastic_runner_workers_started", group=group)

    def worker_failure(
        self, group: WorkerGroup, failures: Sequence[Failure], will_restart: bool
    ) -> None:
        self._call_all(
            "elastic_runner_worker_failure",
            group=group,
            failures=list(failures),
            will_restart=will_restart,
        )

    def run_end(self, result: RunResult) -> None:
        self._call_all("elastic_runner_run_end", result=result)

    def _call_all(self, name: str, **kwargs: Any) -> None:
        for plugin, outcome in self._each(name, **kwargs):
            if isinstance(outcome, BaseException):
                log.warning(
                    "plugin %r: hook %s raised %s: %s (the run goes on)",
                    plugin,
                    name,
                    type(outcome).__name__,
                    outcome,
                )

    def _each(self, name: str, **kwargs: Any) -> list[tuple[str, Any]]:
        """(plugin name, result or the exception it raised) for every implementation,
        in pluggy's call order. Implementations are called one by one (not through
        pluggy's hook caller) so that one raising does not skip the others."""
        caller: pluggy.HookCaller = getattr(self._hook, name)
        out: list[tuple[str, Any]] = []
        given = {"context": self._context, **kwargs}
        for impl in reversed(caller.get_hookimpls()):
            if impl.hookwrapper or impl.wrapper:
                continue
            function: Callable[..., Any] = impl.function
            args = {k: v for k, v in given.items() if k in impl.argnames}
            try:
                out.append((impl.plugin_name, function(**args)))
            except Exception as exc:
                out.append((impl.plugin_name, exc))
        return out


class NoLifecycle(Lifecycle):
    """No lifecycle plugins (unit tests of the agent)."""

    def __init__(self) -> None:
        pass

    def _each(self, name: str, **kwargs: Any) -> list[tuple[str, Any]]:
        return []
