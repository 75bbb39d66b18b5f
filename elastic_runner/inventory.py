"""What the installed plugins provide, per plugin and per kind: the data behind
``python -m elastic_runner plugins``."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

from elastic_runner.hookspecs import HOOK_PREFIX
from elastic_runner.lifecycle import LIFECYCLE_HOOKS
from elastic_runner.plugins import LoadedPlugins
from elastic_runner.registry import ComponentKind

__all__ = ["PluginEntry", "format_json", "format_text", "inventory"]


@dataclass
class PluginEntry:
    """One registered plugin: where it comes from and what it provides."""

    name: str
    source: str
    #: ``{"rdzv": {"tcp": "description"}, ...}``, only kinds it provides.
    components: dict[str, dict[str, str]] = field(default_factory=dict)
    #: Lifecycle hooks it implements (without the ``elastic_runner_`` prefix), and any
    #: hook it wraps, as ``"run_end (wrapper)"``.
    hooks: list[str] = field(default_factory=list)
    #: Why it failed to load (then it provides nothing).
    error: str | None = None


def inventory(loaded: LoadedPlugins) -> list[PluginEntry]:
    """Every plugin of ``loaded``, built-ins first, then installed ones, then broken ones.

    Which plugin provides a component comes from the spec itself (its ``provider``, set
    when the hook is called through the plugin manager); the registry raises a
    :class:`~elastic_runner.registry.PluginError` for a plugin whose hook fails.
    """
    registry = loaded.registry
    entries: dict[str, PluginEntry] = {}
    for name, _ in loaded.pm.list_name_plugin():
        source = loaded.sources.get(name)
        entries[name] = PluginEntry(name, source.describe() if source else "registered directly")
    for kind, spec in registry:
        if spec.provider not in entries:  # a spec a hook wrapper made up
            entries[spec.provider] = PluginEntry(spec.provider, "unknown (made by a hook wrapper)")
        entries[spec.provider].components.setdefault(kind.group, {})[spec.name] = spec.description
    # lifecycle hooks by what they do; component hooks show as components, except wrappers
    for hook in (*LIFECYCLE_HOOKS, *(kind.hook for kind in ComponentKind)):
        for impl in getattr(loaded.pm.hook, hook).get_hookimpls():
            wrapper = impl.wrapper or impl.hookwrapper
            if impl.plugin_name in entries and (wrapper or hook in LIFECYCLE_HOOKS):
                shown = hook.removeprefix(HOOK_PREFIX) + (" (wrapper)" if wrapper else "")
                entries[impl.plugin_name].hooks.append(shown)
    out = list(entries.values())
    for broken in loaded.broken:
        where = f"{broken.distribution} {broken.version} (entry point {broken.value})"
        out.append(PluginEntry(broken.name, where, error=broken.error))
    return out


def format_text(entries: list[PluginEntry]) -> str:
    """The listing: one line per plugin, then one per component and the hooks."""
    lines = []
    for entry in entries:
        lines.append(f"{entry.name}: {entry.source}")
        if entry.error:
            lines.append(f"    FAILED TO LOAD: {entry.error}")
        for kind in ComponentKind:
            for name, description in entry.components.get(kind.group, {}).items():
                described = f"  {description}" if description else ""
                lines.append(f"    {kind.group}={name}{described}")
        if entry.hooks:
            lines.append(f"    hooks: {', '.join(entry.hooks)}")
    return "\n".join(lines)


def format_json(entries: list[PluginEntry]) -> str:
    """The listing as a JSON array of :class:`PluginEntry`."""
    return json.dumps([asdict(e) for e in entries], indent=2)
