"""Component specs and the per-run registry that looks them up by name."""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pluggy

__all__ = ["ComponentKind", "ComponentSpec", "DuplicateComponentError", "PluginError", "Registry"]


class ComponentKind(enum.Enum):
    """The kinds of pluggable component: each is a Hydra config group and a hook."""

    RENDEZVOUS = ("rdzv", "elastic_runner_rendezvous_backends", "backend")
    EVENTS = ("events", "elastic_runner_event_sinks", "sink")
    METRICS = ("metrics", "elastic_runner_metric_handlers", "handler")
    TIMER = ("timer", "elastic_runner_timer_servers", "server")

    def __init__(self, group: str, hook: str, name_key: str) -> None:
        #: The Hydra config group (``rdzv=<name>``).
        self.group = group
        #: The spec-returning hook in :mod:`elastic_runner.hookspecs`.
        self.hook = hook
        #: The config key holding the selected component's name (``rdzv.backend``).
        self.name_key = name_key


@dataclass(frozen=True)
class ComponentSpec:
    """A named component a plugin provides.

    ``config_class`` is a dataclass (a subclass of the group's base schema in
    :mod:`elastic_runner.config`) registered in Hydra's ConfigStore as option ``name`` of
    the kind's group; its ``name_key`` field must default to ``name``.
    """

    name: str
    factory: Callable[..., Any]
    config_class: type[Any]
    description: str = ""


class PluginError(Exception):
    """A plugin provides something elastic-run cannot use; the message names it."""


class DuplicateComponentError(PluginError):
    """Two plugins provide a component of the same kind under the same name."""


@dataclass(frozen=True)
class _Provided:
    spec: ComponentSpec
    plugin: str


class Registry:
    """Every component the registered plugins provide, per kind, by name."""

    def __init__(self, pm: pluggy.PluginManager) -> None:
        self._by_kind: dict[ComponentKind, dict[str, _Provided]] = {}
        for kind in ComponentKind:
            found: dict[str, _Provided] = {}
            hook = getattr(pm.hook, kind.hook)
            for impl in hook.get_hookimpls():
                for spec in impl.function() or ():
                    if spec.name in found:
                        raise DuplicateComponentError(
                            f"{kind.group} component {spec.name!r} is provided by both "
                            f"{found[spec.name].plugin!r} and {impl.plugin_name!r}"
                        )
                    found[spec.name] = _Provided(spec, impl.plugin_name)
            self._by_kind[kind] = dict(sorted(found.items()))

    def names(self, kind: ComponentKind) -> list[str]:
        return list(self._by_kind[kind])

    def get(self, kind: ComponentKind, name: str) -> ComponentSpec:
        try:
            return self._by_kind[kind][name].spec
        except KeyError:
            allowed = ", ".join(self.names(kind)) or "(none installed)"
            raise KeyError(
                f"{kind.group}={name}: unknown {kind.group}; allowed: {allowed}"
            ) from None

    def provider(self, kind: ComponentKind, name: str) -> str:
        return self._by_kind[kind][name].plugin

    def __iter__(self) -> Iterator[tuple[ComponentKind, ComponentSpec]]:
        for kind, provided in self._by_kind.items():
            for p in provided.values():
                yield kind, p.spec
