"""Building the run's ``PluginManager``: built-in plugin modules from a list, then the
installed entry points of group ``elastic_runner``. A fresh manager per run and per test;
there is no import-time global."""

from __future__ import annotations

import importlib
import importlib.metadata
import logging
import os
import warnings

import pluggy

from elastic_runner import hookspecs

__all__ = [
    "BUILTIN_PLUGINS",
    "DISABLE_AUTOLOAD_ENV",
    "ENTRY_POINT_GROUP",
    "PluginLoadWarning",
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
    "elastic_runner.events",
    "elastic_runner.metrics",
    "elastic_runner.timer",
)


class PluginLoadWarning(UserWarning):
    """An installed plugin could not be loaded; the run goes on without it."""


def make_plugin_manager(*, autoload: bool | None = None) -> pluggy.PluginManager:
    """A new manager with the hookspecs, the built-in plugins and (unless ``autoload`` is
    false or ``ELASTIC_RUNNER_DISABLE_PLUGIN_AUTOLOAD`` is set) installed plugins."""
    pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
    pm.add_hookspecs(hookspecs)
    for name in BUILTIN_PLUGINS:
        pm.register(importlib.import_module(name), name=name)
    if autoload is None:
        autoload = not os.environ.get(DISABLE_AUTOLOAD_ENV)
    if autoload:
        _load_entry_points(pm)
    return pm


def _load_entry_points(pm: pluggy.PluginManager) -> None:
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        if pm.get_plugin(ep.name) is not None or pm.is_blocked(ep.name):
            continue
        dist = getattr(ep.dist, "name", "?")
        try:
            plugin = ep.load()
            pm.register(plugin, name=ep.name)
        except Exception as exc:
            warnings.warn(
                f"plugin {ep.name!r} ({ep.value}, from {dist}) failed to load and is "
                f"skipped: {type(exc).__name__}: {exc}",
                PluginLoadWarning,
                stacklevel=2,
            )
