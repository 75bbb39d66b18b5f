"""Building the run's ``PluginManager``: built-in plugin modules from a list, then the
installed entry points of group ``elastic_runner``. A fresh manager per run and per test;
there is no import-time global."""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import logging
import os
import warnings
from dataclasses import dataclass, field

import pluggy

from elastic_runner import hookspecs
from elastic_runner.registry import Registry

__all__ = [
    "BUILTIN_PLUGINS",
    "DISABLE_AUTOLOAD_ENV",
    "ENTRY_POINT_GROUP",
    "BrokenPlugin",
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
        return f"plugin {self.name!r} ({self.value}, from {self.distribution}): {self.error}"


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


def make_plugin_manager(*, autoload: bool | None = None) -> pluggy.PluginManager:
    """A new manager with the hookspecs, the built-in plugins and (unless ``autoload`` is
    false or ``ELASTIC_RUNNER_DISABLE_PLUGIN_AUTOLOAD`` is set) installed plugins."""
    return load_plugins(autoload=autoload).pm


def load_plugins(*, autoload: bool | None = None) -> LoadedPlugins:
    """Like :func:`make_plugin_manager`, keeping where each plugin came from and which
    installed plugins failed to load (each also gives a :class:`PluginLoadWarning`)."""
    pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
    pm.add_hookspecs(hookspecs)
    loaded = LoadedPlugins(pm)
    for name in BUILTIN_PLUGINS:
        pm.register(importlib.import_module(name), name=name)
        loaded.sources[name] = PluginSource(name, "built-in", name)
    if autoload is None:
        autoload = not os.environ.get(DISABLE_AUTOLOAD_ENV)
    if autoload:
        _load_entry_points(loaded)
    return loaded


def _load_entry_points(loaded: LoadedPlugins) -> None:
    pm = loaded.pm
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        if pm.get_plugin(ep.name) is not None or pm.is_blocked(ep.name):
            continue
        dist = getattr(ep.dist, "name", None)
        version = getattr(ep.dist, "version", None)
        try:
            plugin = ep.load()
            pm.register(plugin, name=ep.name)
        except Exception as exc:
            broken = BrokenPlugin(ep.name, ep.value, dist, version, f"{type(exc).__name__}: {exc}")
            loaded.broken.append(broken)
            warnings.warn(
                f"plugin {ep.name!r} ({ep.value}, from {dist}) failed to load and is "
                f"skipped: {broken.error}",
                PluginLoadWarning,
                stacklevel=2,
            )
            continue
        loaded.sources[ep.name] = PluginSource(ep.name, "entry point", ep.value, dist, version)
