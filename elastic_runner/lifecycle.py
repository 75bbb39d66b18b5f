"""The lifecycle hooks as the agent calls them: one typed method per hook, each calling
the hook through pluggy (``pm.hook.<name>(...)``), so wrappers (``wrapper=True`` and
old-style ``hookwrapper=True``) run and ``tryfirst``/``trylast`` order is pluggy's.

Isolation: the plugin manager of :mod:`elastic_runner.plugins` wraps every non-wrapper
implementation in :func:`guard_lifecycle_hook`, so one broken plugin is named in the log
and neither stops the other implementations nor takes the run down. The health check
(``elastic_runner_before_rendezvous``, a ``firstresult`` hook) is the exception: there a
reason or an exception is a :class:`Refusal` naming the plugin. Wrappers are not guarded;
what one raises is caught here, logged, and in the health check counts as a refusal.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import pluggy

from elastic_runner.spec import Failure, RunContext, RunResult, WorkerGroup

__all__ = [
    "HEALTH_CHECK_HOOK",
    "LIFECYCLE_HOOKS",
    "Lifecycle",
    "NoLifecycle",
    "Refusal",
    "guard_lifecycle_hook",
]

log = logging.getLogger(__name__)

#: The health check: a ``firstresult`` hook whose guarded implementations return a
#: :class:`Refusal` or ``None``.
HEALTH_CHECK_HOOK = "elastic_runner_before_rendezvous"

#: Every lifecycle hook, in the order a run calls them.
LIFECYCLE_HOOKS: tuple[str, ...] = (
    HEALTH_CHECK_HOOK,
    "elastic_runner_workers_started",
    "elastic_runner_worker_failure",
    "elastic_runner_run_end",
)


@dataclass(frozen=True)
class Refusal:
    """A plugin's health check kept this node out of the rendezvous."""

    plugin: str
    reason: str

    def describe(self) -> str:
        """The line the agent prints (and the run's ``ended_because``)."""
        return f"health check of plugin {self.plugin!r} refused to join: {self.reason}"


def _text(exc: BaseException) -> str:
    """An exception's message on one line (a log line, a refusal's reason)."""
    return " ".join(str(exc).split())


def _raised(exc: BaseException) -> str:
    return f"raised {type(exc).__name__}: {_text(exc)}"


def guard_lifecycle_hook(
    function: Callable[..., Any], plugin: str, hook: str
) -> Callable[..., Any]:
    """``function`` (one plugin's implementation of lifecycle hook ``hook``), made safe to
    call through pluggy, whose call loop stops at the first implementation that raises.

    The health check returns a :class:`Refusal` naming ``plugin`` for a reason or an
    exception, else ``None``. Any other hook returns what ``function`` returns, or, if it
    raises an ``Exception``, logs it with the plugin's and the hook's name and returns
    ``None`` (the run goes on; a ``KeyboardInterrupt`` or ``SystemExit`` is not caught).
    """
    if hook == HEALTH_CHECK_HOOK:

        def health_check(*args: Any, **kwargs: Any) -> Refusal | None:
            try:
                reason = function(*args, **kwargs)
            except Exception as exc:
                log.debug("plugin %r: hook %s raised", plugin, hook, exc_info=exc)
                return Refusal(plugin, _raised(exc))
            return None if reason is None else Refusal(plugin, str(reason))

        return health_check

    def guarded(*args: Any, **kwargs: Any) -> Any:
        try:
            return function(*args, **kwargs)
        except Exception as exc:
            log.warning(
                "plugin %r: hook %s raised %s: %s (the run goes on)",
                plugin,
                hook,
                type(exc).__name__,
                _text(exc),
            )
            log.debug("plugin %r: hook %s raised", plugin, hook, exc_info=exc)
            return None

    return guarded


def _wrappers(caller: pluggy.HookCaller) -> str:
    """The plugin(s) with a wrapper on ``caller``: implementations are guarded, so only a
    wrapper can make the call raise or hand back something else than a Refusal."""
    names = [i.plugin_name for i in caller.get_hookimpls() if i.wrapper or i.hookwrapper]
    return " or ".join(names) if names else "unknown"


class Lifecycle:
    """Calls the lifecycle hooks of a plugin manager's registered plugins.

    ``pm`` is the manager :func:`elastic_runner.plugins.make_plugin_manager` makes: its
    implementations are guarded (see the module docstring).
    """

    def __init__(self, pm: pluggy.PluginManager, context: RunContext) -> None:
        self._hook = pm.hook
        self._context = context

    def before_rendezvous(self, attempt: int, restart_count: int) -> Refusal | None:
        """The first refusal from a health check (in pluggy's call order), or ``None``
        to join."""
        caller = getattr(self._hook, HEALTH_CHECK_HOOK)
        try:
            outcome = self._call(HEALTH_CHECK_HOOK, attempt=attempt, restart_count=restart_count)
        except Exception as exc:  # a wrapper raised
            log.debug("a wrapper of hook %s raised", HEALTH_CHECK_HOOK, exc_info=exc)
            return Refusal(_wrappers(caller), _raised(exc))
        if outcome is None or isinstance(outcome, Refusal):
            return outcome
        # a wrapper replaced the result with a reason of its own
        return Refusal(_wrappers(caller), str(outcome))

    def workers_started(self, group: WorkerGroup) -> None:
        """After every worker of an attempt started."""
        self._call_all("elastic_runner_workers_started", group=group)

    def worker_failure(
        self, group: WorkerGroup, failures: Sequence[Failure], will_restart: bool
    ) -> None:
        """Once per failed attempt, after its workers were stopped."""
        self._call_all(
            "elastic_runner_worker_failure",
            group=group,
            failures=list(failures),
            will_restart=will_restart,
        )

    def run_end(self, result: RunResult) -> None:
        """Once, when the run is over."""
        self._call_all("elastic_runner_run_end", result=result)

    def _call_all(self, name: str, **kwargs: Any) -> None:
        try:
            self._call(name, **kwargs)
        except Exception as exc:  # a wrapper raised: implementations are guarded
            log.warning(
                "plugin %r: a wrapper of hook %s raised %s: %s (the run goes on)",
                _wrappers(getattr(self._hook, name)),
                name,
                type(exc).__name__,
                _text(exc),
            )
            log.debug("a wrapper of hook %s raised", name, exc_info=exc)

    def _call(self, name: str, **kwargs: Any) -> Any:
        caller: pluggy.HookCaller = getattr(self._hook, name)
        return caller(context=self._context, **kwargs)


class NoLifecycle(Lifecycle):
    """No lifecycle plugins (unit tests of the agent)."""

    def __init__(self) -> None:
        pass

    def before_rendezvous(self, attempt: int, restart_count: int) -> Refusal | None:
        return None

    def _call(self, name: str, **kwargs: Any) -> Any:
        return None
