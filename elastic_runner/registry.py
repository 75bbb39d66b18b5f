"""Component specs and the per-run registry that looks them up by name.

The component hooks are called through pluggy (``pm.hook.<name>()``), so wrappers and
``tryfirst``/``trylast`` apply. Provenance travels with the specs: the plugin manager of
:mod:`elastic_runner.plugins` wraps every (non-wrapper) implementation in
:func:`guard_component_hook`, which tags each returned :class:`ComponentSpec` with the
name of the plugin that returned it and turns a raising or malformed implementation into
a one-line :class:`PluginError` naming the plugin and the hook.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import pluggy

__all__ = [
    "ComponentKind",
    "ComponentSpec",
    "DuplicateComponentError",
    "PluginError",
    "Registry",
    "guard_component_hook",
    "one_line",
]


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
    #: The plugin that returned this spec. Plugins leave it empty: the plugin manager
    #: fills it in when the hook is called (so a hook wrapper sees where each spec
    #: comes from).
    provider: str = ""


class PluginError(Exception):
    """A plugin provides something elastic-run cannot use; the message names it."""


class DuplicateComponentError(PluginError):
    """Two plugins provide a component of the same kind under the same name."""


def one_line(exc: BaseException) -> str:
    """``Type: message`` on one line (a plugin's exception text may span several)."""
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _short_repr(value: object, limit: int = 80) -> str:
    text = " ".join(repr(value).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def guard_component_hook(
    function: Callable[..., Any], plugin: str, hook: str
) -> Callable[..., list[ComponentSpec] | None]:
    """``function`` (one plugin's implementation of a component hook), made to return its
    specs tagged with ``plugin`` as their provider, and to raise a one-line
    :class:`PluginError` naming the plugin and the hook if it raises or returns anything
    but an iterable of :class:`ComponentSpec` (``None`` stays "nothing")."""

    def guarded(*args: Any, **kwargs: Any) -> list[ComponentSpec] | None:
        try:
            returned = function(*args, **kwargs)
        except Exception as exc:
            raise PluginError(f"plugin {plugin!r}: hook {hook} raised {one_line(exc)}") from exc
        if returned is None:
            return None
        specs = _as_specs(returned)
        if specs is None:
            raise PluginError(
                f"plugin {plugin!r}: hook {hook} returned {_short_repr(returned)}, "
                "not a list of ComponentSpec"
            )
        return [s if s.provider else dataclasses.replace(s, provider=plugin) for s in specs]

    return guarded


def _as_specs(value: object) -> list[ComponentSpec] | None:
    """``value`` as a list of specs, or ``None`` if it is not an iterable of them. Any
    iterable is taken (a generator worked before hooks went through pluggy); a string or
    a mapping is not."""
    if isinstance(value, str | bytes | dict) or not isinstance(value, Iterable):
        return None
    specs = list(value)
    return specs if all(isinstance(s, ComponentSpec) for s in specs) else None


def _wrappers(caller: pluggy.HookCaller) -> str:
    """The plugin(s) with a wrapper on ``caller``, for a message: only a wrapper can make
    the hook raise anything but a :class:`PluginError`, return a malformed result or a
    spec without a provider (the implementations themselves are guarded)."""
    names = [i.plugin_name for i in caller.get_hookimpls() if i.wrapper or i.hookwrapper]
    return " or ".join(names) if names else "unknown"


class Registry:
    """Every component the registered plugins provide, per kind, by name.

    Built by calling each component hook once through pluggy. The plugin manager must
    be the one :func:`elastic_runner.plugins.make_plugin_manager` makes (it tags specs
    with their provider); a spec without a provider (one a hook wrapper made up) is
    credited to the wrapper's plugin.
    """

    def __init__(self, pm: pluggy.PluginManager) -> None:
        self._by_kind: dict[ComponentKind, dict[str, ComponentSpec]] = {}
        for kind in ComponentKind:
            found: dict[str, ComponentSpec] = {}
            for spec in self._call(pm, kind):
                if spec.name in found:
                    raise DuplicateComponentError(
                        f"{kind.group} component {spec.name!r} is provided by both "
                        f"{found[spec.name].provider!r} and {spec.provider!r}"
                    )
                found[spec.name] = spec
            self._by_kind[kind] = dict(sorted(found.items()))

    @staticmethod
    def _call(pm: pluggy.PluginManager, kind: ComponentKind) -> list[ComponentSpec]:
        """Every spec of ``kind``, in registration order of the plugins (pluggy calls the
        last registered first), each with its provider."""
        caller: pluggy.HookCaller = getattr(pm.hook, kind.hook)
        try:
            returned = caller()
        except PluginError:
            raise  # a guarded implementation: already one line naming the plugin
        except Exception as exc:
            # implementations are guarded, so this came from a wrapper (which is not)
            raise PluginError(
                f"hook {kind.hook}: a wrapper (plugin {_wrappers(caller)!r}) raised {one_line(exc)}"
            ) from exc
        lists = returned if isinstance(returned, list) else None
        per_plugin = [_as_specs(specs) for specs in lists] if lists is not None else [None]
        if any(specs is None for specs in per_plugin):
            raise PluginError(
                f"hook {kind.hook}: a wrapper (plugin {_wrappers(caller)!r}) returned "
                f"{_short_repr(returned)}, not a list of lists of ComponentSpec"
            )
        out: list[ComponentSpec] = []
        for specs in reversed(per_plugin):
            for spec in specs or ():
                if not spec.provider:
                    spec = dataclasses.replace(spec, provider=_wrappers(caller))
                out.append(spec)
        return out

    def names(self, kind: ComponentKind) -> list[str]:
        """The names of every component of ``kind``, sorted."""
        return list(self._by_kind[kind])

    def get(self, kind: ComponentKind, name: str) -> ComponentSpec:
        """The spec of component ``name``; a ``KeyError`` that lists the allowed names."""
        try:
            return self._by_kind[kind][name]
        except KeyError:
            allowed = ", ".join(self.names(kind)) or "(none installed)"
            raise KeyError(
                f"{kind.group}={name}: unknown {kind.group}; allowed: {allowed}"
            ) from None

    def provider(self, kind: ComponentKind, name: str) -> str:
        """The name of the plugin that provides component ``name`` of ``kind``."""
        return self._by_kind[kind][name].provider

    def __iter__(self) -> Iterator[tuple[ComponentKind, ComponentSpec]]:
        for kind, specs in self._by_kind.items():
            for spec in specs.values():
                yield kind, spec
