"""Building the run's plugin manager: built-in plugin modules from a list, then the
installed entry points of group ``elastic_runner``, then ``check_pending`` (a hook name no
hookspec has is an error). A fresh manager per run and per test; there is no import-time
global.

Hooks are called through pluggy (``pm.hook.<name>(...)``, so wrappers and
``tryfirst``/``trylast`` work). pluggy's call loop stops at the first implementation that
raises and does not say which plugin returned what, so :class:`ElasticPluginManager`
wraps each non-wrapper implementation as it is registered: component hooks tag their
specs with the plugin's name (:func:`~elastic_runner.registry.guard_component_hook`),
lifecycle hooks log what they raise and let the others run
(:func:`~elastic_runner.lifecycle.guard_lifecycle_hook`).
"""

from __future__ import annotations

import difflib
import functools
import importlib
import importlib.metadata
import inspect
import logging
import os
import re
import types
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pluggy

from elastic_runner import hookspecs
from elastic_runner.lifecycle import LIFECYCLE_HOOKS, guard_lifecycle_hook
from elastic_runner.registry import ComponentKind, PluginError, Registry, guard_component_hook

__all__ = [
    "BUILTIN_PLUGINS",
    "DISABLE_AUTOLOAD_ENV",
    "ENTRY_POINT_GROUP",
    "BrokenPlugin",
    "ElasticPluginManager",
    "LoadedPlugins",
    "PluginLoadWarning",
    "PluginSource",
    "load_plugins",
    "make_plugin_manager",
]

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "elastic_runner"
#: Set to a non-empty value to skip entry-point plugins (tests, debugging).
DISABLE_AUTOLOAD_ENV = "ELASTIC_RUNNER_DISABLE_PLUGIN_AUTOLOAD"

#: Modules registered as plugins on every run, in this order.
BUILTIN_PLUGINS: tuple[str, ...] = (
    "elastic_runner.rendezvous.local",
    "elastic_runner.rendezvous.tcp",
    "elastic_runner.rendezvous.etcd",
    "elastic_runner.events.builtin",
    "elastic_runner.metrics.builtin",
    "elastic_runner.timer.server",
)


class PluginLoadWarning(UserWarning):
    """An installed plugin could not be loaded; the run goes on without it."""


@dataclass(frozen=True)
class PluginSource:
    """Where a registered plugin comes from."""

    name: str
    #: ``built-in`` or ``entry point``.
    origin: str
    #: The module or object the plugin is (``elastic_runner.events``, ``pkg.plugin``).
    value: str
    #: The installed distribution and its version (entry-point plugins only).
    distribution: str | None = None
    version: str | None = None

    def describe(self) -> str:
        """``dist 1.2.3 (entry point pkg.plugin)`` or ``built-in (module)``."""
        if self.distribution:
            return f"{self.distribution} {self.version} (entry point {self.value})"
        return f"built-in ({self.value})"


@dataclass(frozen=True)
class BrokenPlugin:
    """An installed entry point that failed to load."""

    name: str
    value: str
    distribution: str | None
    version: str | None
    error: str

    def describe(self) -> str:
        """One line naming the plugin, where it comes from and why it failed."""
        return f"plugin {self.name!r} ({self.value}, from {self.distribution}): {self.error}"


_Guard = Callable[[Callable[..., Any], str, str], Callable[..., Any]]

#: How each hook's implementations are wrapped, by hook name.
_GUARDS: dict[str, _Guard] = {
    **{kind.hook: guard_component_hook for kind in ComponentKind},
    **{hook: guard_lifecycle_hook for hook in LIFECYCLE_HOOKS},
}


class ElasticPluginManager(pluggy.PluginManager):
    """A ``pluggy.PluginManager`` with elastic_runner's hookspecs that

    * guards every non-wrapper implementation of a known hook as it is registered, so
      that hooks called through pluggy keep one plugin from stopping the others and
      keep track of which plugin returned what (see the module docstring);
    * takes an undecorated function named ``elastic_runner_*`` as an implementation (as
      pytest does for ``pytest_*``), so :meth:`check_pending` catches a misspelled hook
      whether or not it carries ``@hookimpl``.
    """

    def __init__(self) -> None:
        super().__init__(hookspecs.PROJECT_NAME)
        self.add_hookspecs(hookspecs)

    def register(self, plugin: object, name: str | None = None) -> str | None:
        """Register ``plugin`` (see ``pluggy.PluginManager.register``), then guard its
        implementations (not its wrappers: generators that pluggy drives around the
        others, called as they are)."""
        plugin_name = super().register(plugin, name)
        if plugin_name is None:  # blocked (or None)
            return None
        for caller in self.get_hookcallers(plugin) or ():
            guard = _GUARDS.get(caller.name)
            if guard is None:  # a hook without a spec: check_pending reports it
                continue
            for impl in caller.get_hookimpls():
                if impl.plugin is not plugin or impl.wrapper or impl.hookwrapper:
                    continue
                # pluggy calls impl.function(*args) with the arguments named in
                # impl.argnames (and impl.kwargnames), computed from the original
                # function at registration, so a (*args, **kwargs) guard gets exactly
                # what the implementation takes. ``function`` is a writable slot of
                # HookImpl, typed Final only because pluggy itself never reassigns it.
                setattr(impl, "function", guard(impl.function, plugin_name, caller.name))  # noqa: B010
        return plugin_name

    def parse_hookimpl_opts(self, plugin: object, name: str) -> pluggy.HookimplOpts | None:
        """pluggy's options for a ``@hookimpl`` function; default options for an
        undecorated function or method named ``elastic_runner_*``."""
        opts = super().parse_hookimpl_opts(plugin, name)
        if opts is not None or not name.startswith(hookspecs.HOOK_PREFIX):
            return opts
        if not _is_plain_function(plugin, name):
            return None
        return {
            "wrapper": False,
            "hookwrapper": False,
            "optionalhook": False,
            "tryfirst": False,
            "trylast": False,
            "specname": None,
        }


def _is_plain_function(plugin: object, name: str) -> bool:
    """Whether ``plugin.name`` is a function, method, staticmethod or classmethod, found
    without running any code (no property is evaluated): the attributes pluggy can bind
    as an implementation (it asserts so for an attribute a subclass claims)."""
    if not (inspect.isclass(plugin) or inspect.ismodule(plugin)):
        try:
            own = object.__getattribute__(plugin, "__dict__")
        except AttributeError:
            own = {}
        if isinstance(own, dict) and name in own:  # handed out as is, never bound
            return isinstance(own[name], types.FunctionType | types.MethodType)
    found = inspect.getattr_static(plugin, name, None)
    return isinstance(found, staticmethod | classmethod | types.FunctionType | types.MethodType)


@dataclass
class LoadedPlugins:
    """A run's plugin manager and what went into it."""

    pm: pluggy.PluginManager
    sources: dict[str, PluginSource] = field(default_factory=dict)
    broken: list[BrokenPlugin] = field(default_factory=list)

    @functools.cached_property
    def registry(self) -> Registry:
        """The components the plugins provide, by kind and name."""
        return Registry(self.pm)


def make_plugin_manager(*, autoload: bool | None = None) -> ElasticPluginManager:
    """A new manager with the hookspecs, the built-in plugins and (unless ``autoload`` is
    false or ``ELASTIC_RUNNER_DISABLE_PLUGIN_AUTOLOAD`` is set) installed plugins."""
    pm = load_plugins(autoload=autoload).pm
    assert isinstance(pm, ElasticPluginManager)
    return pm


def load_plugins(*, autoload: bool | None = None) -> LoadedPlugins:
    """Like :func:`make_plugin_manager`, keeping where each plugin came from and which
    installed plugins failed to load (each also gives a :class:`PluginLoadWarning`).

    Raises :class:`~elastic_runner.registry.PluginError`, with a one-line message naming
    the plugin, for a plugin that implements a hook no hookspec has (a misspelled name)
    or that pluggy rejects (an argument its hookspec does not have, a wrapper that is
    not a generator).
    """
    pm = ElasticPluginManager()
    loaded = LoadedPlugins(pm)
    for name in BUILTIN_PLUGINS:
        _register(loaded, importlib.import_module(name), PluginSource(name, "built-in", name))
    if autoload is None:
        autoload = not os.environ.get(DISABLE_AUTOLOAD_ENV)
    if autoload:
        _load_entry_points(loaded)
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        raise PluginError(_unknown_hooks(loaded, exc.plugin)) from exc
    return loaded


def _register(loaded: LoadedPlugins, plugin: object, source: PluginSource) -> None:
    try:
        loaded.pm.register(plugin, name=source.name)
    except pluggy.PluginValidationError as exc:
        raise PluginError(_invalid(source, exc)) from exc
    loaded.sources[source.name] = source


def _load_entry_points(loaded: LoadedPlugins) -> None:
    pm = loaded.pm
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        if pm.get_plugin(ep.name) is not None or pm.is_blocked(ep.name):
            continue
        dist = getattr(ep.dist, "name", None)
        version = getattr(ep.dist, "version", None)
        try:
            plugin = ep.load()
            # a plugin pluggy rejects is a PluginError (raised), not a broken plugin
            _register(loaded, plugin, PluginSource(ep.name, "entry point", ep.value, dist, version))
        except PluginError:
            raise
        except Exception as exc:
            broken = BrokenPlugin(ep.name, ep.value, dist, version, f"{type(exc).__name__}: {exc}")
            loaded.broken.append(broken)
            warnings.warn(
                f"plugin {ep.name!r} ({ep.value}, from {dist}) failed to load and is "
                f"skipped: {broken.error}",
                PluginLoadWarning,
                stacklevel=2,
            )


def _invalid(source: PluginSource, exc: pluggy.PluginValidationError) -> str:
    """pluggy's multi-line validation message as one line, naming the plugin once."""
    lines = [" ".join(line.split()) for line in str(exc).splitlines()]
    if lines:  # "Plugin 'x' for hook 'h'": the plugin is named in front already
        lines[0] = re.sub(rf"^Plugin {re.escape(repr(source.name))}\s*", "", lines[0])
        lines[0] = re.sub(r"^for hook ", "hook ", lines[0])
    definitions = [line for line in lines if line.startswith("hookimpl definition:")]
    detail = ": ".join(line for line in lines if line and line not in definitions)
    for definition in definitions:
        detail += f" ({definition})"
    return f"plugin {source.name!r} from {source.describe()}: {detail or 'invalid'}"


def _unknown_hooks(loaded: LoadedPlugins, plugin: object) -> str:
    """One line naming ``plugin``, where it comes from and each hook it implements that
    no hookspec has, with the closest hook name."""
    pm = loaded.pm
    name = pm.get_name(plugin) or repr(plugin)
    source = loaded.sources.get(name)
    where = f" from {source.describe()}" if source else ""
    known = [
        hook
        for hook, caller in vars(pm.hook).items()
        if isinstance(caller, pluggy.HookCaller) and caller.has_spec()
    ]
    unknown = sorted(
        caller.name
        for caller in pm.get_hookcallers(plugin) or ()
        if not caller.has_spec()
        and any(i.plugin is plugin and not i.optionalhook for i in caller.get_hookimpls())
    )
    parts = []
    for hook in unknown:
        # compared without the prefix every hook shares, which would make any
        # elastic_runner_* name look close to some hook
        prefix = hookspecs.HOOK_PREFIX
        close = [
            prefix + match
            for match in difflib.get_close_matches(
                hook.removeprefix(prefix), [k.removeprefix(prefix) for k in known], n=1
            )
        ]
        parts.append(
            f"{hook!r} (did you mean {close[0]!r}?)"
            if close
            else f"{hook!r} (see elastic_runner.hookspecs for the hooks)"
        )
    noun = "hook" if len(parts) == 1 else "hooks"
    return f"plugin {name!r}{where}: unknown {noun} {', '.join(parts)}"
