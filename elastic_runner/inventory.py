"""What the installed plugins provide, per plugin and per kind: the data behind
``python -m elastic_runner plugins``."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

from elastic_runner.plugins import LoadedPlugins
from elastic_runner.registry import ComponentKind

__all__ = ["PluginEntry", "format_json", "format_text", "inventory"]

LIFECYCLE_HOOKS = (
    "elastic_runner_before_rendezvous",
    "elastic_runner_workers_started",
    "elastic_runner_worker_failure",
    "elastic_runner_run_end",
)


@dataclass
class PluginEntry:
    """One registered plugin: where it comes from and what it provides."""

    name: str
    source: str
    #: ``{"rdzv": {"tcp": "description"}, ...}``, only kinds it provides.
    components: dict[str, dict[str, str]] = field(default_factory=dict)
    #: Lifecycle hooks it implements (without the ``elastic_runner_`` prefix).
    hooks: list[str] = field(default_factory=list)
    #: Why it failed to load (then it provides nothing).
    error: str | None = None


def inventory(loaded: LoadedPlugins) -> list[PluginEntry]:
    """Every plugin of ``loaded``, built-ins first, then installed ones, then broken ones."""
    registry = loaded.registry
    entries = {}
    for name, _ in loaded.pm.list_name_plugin():
        source = loaded.sources.get(name)
        entries[name] = PluginEntry(name, source.describe() if source else "registered directly")
    for kind, spec in registry:
        provider = registry.provider(kind, spec.name)
        entries[provider].components.setdefault(kind.group, {})[spec.name] = spec.description
    for hook in LIFECYCLE_HOOKS:
        for impl in getattr(loaded.pm.hook, hook).get_hookimpls():
            if impl.plugin_name in entries:
                entries[impl.plugin_name].hooks.append(hook.removeprefix("elastic_runner_"))
    out = list(entries.values())
    for broken in loaded.broken:
        where = f"{broken.distribution} {broken.version} (entry point {broken.value})"
        out.append(PluginEntry(broken.name, where, error=broken.error))
    return out


def format_text(entries: list[PluginEntry]) -> str:
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
    return json.dumps([asdict(e) for e in entries], indent=2)
