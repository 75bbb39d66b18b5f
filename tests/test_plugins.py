"""The per-run PluginManager, component registry and entry-point loading."""

from __future__ import annotations

import importlib.metadata
import re
import sys
import types
import warnings
from collections.abc import Generator
from dataclasses import dataclass
from pathlib import Path

import pytest

from elastic_runner import ComponentSpec, hookimpl, hookspecs
from elastic_runner.config import RendezvousConfig
from elastic_runner.plugins import (
    BUILTIN_PLUGINS,
    ENTRY_POINT_GROUP,
    PluginLoadWarning,
    load_plugins,
    make_plugin_manager,
)
from elastic_runner.registry import ComponentKind, DuplicateComponentError, PluginError, Registry


@dataclass
class FakeRdzvConfig(RendezvousConfig):
    backend: str = "fake"


def _plugin(name: str) -> types.SimpleNamespace:
    @hookimpl
    def elastic_runner_rendezvous_backends() -> list[ComponentSpec]:
        return [ComponentSpec(name, lambda c, ctx: None, FakeRdzvConfig)]

    return types.SimpleNamespace(
        elastic_runner_rendezvous_backends=elastic_runner_rendezvous_backends
    )


def test_builtins_register_through_the_hooks() -> None:
    pm = make_plugin_manager(autoload=False)
    assert [n for n, _ in pm.list_name_plugin()] == list(BUILTIN_PLUGINS)
    reg = Registry(pm)
    assert reg.names(ComponentKind.RENDEZVOUS) == ["etcd", "local", "static", "tcp"]
    assert reg.names(ComponentKind.EVENTS) == ["console", "jsonl", "null"]
    assert reg.provider(ComponentKind.RENDEZVOUS, "local") == "elastic_runner.rendezvous.local"


def test_each_manager_is_fresh() -> None:
    pm1 = make_plugin_manager(autoload=False)
    pm1.register(_plugin("fake"), name="fake-plugin")
    assert "fake" in Registry(pm1).names(ComponentKind.RENDEZVOUS)
    assert "fake" not in Registry(make_plugin_manager(autoload=False)).names(
        ComponentKind.RENDEZVOUS
    )


def test_duplicate_names_are_rejected() -> None:
    pm = make_plugin_manager(autoload=False)
    pm.register(_plugin("local"), name="impostor")
    with pytest.raises(DuplicateComponentError, match=r"'local'.*impostor"):
        Registry(pm)


def test_unknown_name_lists_the_allowed() -> None:
    reg = Registry(make_plugin_manager(autoload=False))
    with pytest.raises(KeyError, match="allowed: etcd, local, static, tcp"):
        reg.get(ComponentKind.RENDEZVOUS, "nope")


def test_entry_points_load_and_broken_ones_warn(monkeypatch: pytest.MonkeyPatch) -> None:
    module = types.ModuleType("er_test_plugin_mod")
    module.elastic_runner_rendezvous_backends = _plugin(  # type: ignore[attr-defined]
        "fromep"
    ).elastic_runner_rendezvous_backends
    monkeypatch.setitem(__import__("sys").modules, "er_test_plugin_mod", module)
    eps = [
        importlib.metadata.EntryPoint("good", "er_test_plugin_mod", ENTRY_POINT_GROUP),
        importlib.metadata.EntryPoint("broken", "er_no_such_module_xyz", ENTRY_POINT_GROUP),
    ]
    monkeypatch.setattr(
        importlib.metadata, "entry_points", lambda group: eps if group == ENTRY_POINT_GROUP else []
    )
    with pytest.warns(PluginLoadWarning, match="plugin 'broken'.*failed to load"):
        pm = make_plugin_manager(autoload=True)
    assert "fromep" in Registry(pm).names(ComponentKind.RENDEZVOUS)
    monkeypatch.setenv("ELASTIC_RUNNER_DISABLE_PLUGIN_AUTOLOAD", "1")
    assert "fromep" not in Registry(make_plugin_manager()).names(ComponentKind.RENDEZVOUS)


def test_a_schema_of_the_wrong_base_names_the_plugin() -> None:
    from elastic_runner.config import register_configs
    from elastic_runner.registry import PluginError

    @dataclass
    class NotARendezvousConfig:
        backend: str = "odd"

    @hookimpl
    def elastic_runner_rendezvous_backends() -> list[ComponentSpec]:
        return [ComponentSpec("odd", lambda c, ctx: None, NotARendezvousConfig)]

    pm = make_plugin_manager(autoload=False)
    pm.register(
        types.SimpleNamespace(
            elastic_runner_rendezvous_backends=elastic_runner_rendezvous_backends
        ),
        name="odd-plugin",
    )
    with pytest.raises(PluginError, match=r"'odd' of plugin 'odd-plugin'.*RendezvousConfig"):
        register_configs(Registry(pm))


def test_the_inventory_lists_sources_components_and_hooks() -> None:
    from elastic_runner.inventory import format_text, inventory
    from elastic_runner.plugins import load_plugins

    @hookimpl
    def elastic_runner_run_end() -> None:
        pass

    loaded = load_plugins(autoload=False)
    loaded.pm.register(
        types.SimpleNamespace(elastic_runner_run_end=elastic_runner_run_end), name="ender"
    )
    entries = {e.name: e for e in inventory(loaded)}
    [events] = [e for e in entries.values() if "events" in e.components]
    assert events.source == f"built-in ({events.name})"
    assert events.components == {
        "events": {
            "console": "JSON lines on stderr",
            "jsonl": "events.jsonl in the run directory",
            "null": "discard",
        }
    }
    text = format_text(list(entries.values()))
    assert "    rdzv=etcd  dynamic (min:max nodes) on an etcd cluster, v3 API" in text
    assert (entries["ender"].source, entries["ender"].hooks) == ("registered directly", ["run_end"])


def test_specs_are_tagged_with_their_provider() -> None:
    reg = Registry(make_plugin_manager(autoload=False))
    for kind, spec in reg:
        assert spec.provider == reg.provider(kind, spec.name)
        assert spec.provider in BUILTIN_PLUGINS


def _entry_point_plugins(monkeypatch: pytest.MonkeyPatch, **modules: types.ModuleType) -> None:
    """Make ``modules`` the installed entry points (name -> module), from a distribution."""
    eps = []
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, module.__name__, module)
        ep = importlib.metadata.EntryPoint(name, module.__name__, ENTRY_POINT_GROUP)
        dist = types.SimpleNamespace(name=f"er-{name}", version="0.4.2")
        eps.append(ep._for(dist))  # type: ignore[attr-defined]
    monkeypatch.setattr(
        importlib.metadata, "entry_points", lambda group: eps if group == ENTRY_POINT_GROUP else []
    )


def _module(name: str, **functions: object) -> types.ModuleType:
    module = types.ModuleType(name)
    for attr, value in functions.items():
        setattr(module, attr, value)
    return module


def test_a_misspelled_hook_is_one_line_naming_plugin_hook_and_suggestion(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    @hookimpl
    def elastic_runner_workers_startd(context: object, group: object) -> None:
        pass

    _entry_point_plugins(
        monkeypatch,
        typo=_module("er_typo_mod", elastic_runner_workers_startd=elastic_runner_workers_startd),
    )
    with pytest.raises(PluginError) as caught:
        load_plugins(autoload=True)
    assert str(caught.value) == (
        "plugin 'typo' from er-typo 0.4.2 (entry point er_typo_mod): unknown hook "
        "'elastic_runner_workers_startd' (did you mean 'elastic_runner_workers_started'?)"
    )


def test_an_undecorated_misspelled_hook_is_caught_too(monkeypatch: pytest.MonkeyPatch) -> None:
    def elastic_runner_run_ends(result: object) -> None:  # no @hookimpl, and a typo
        pass

    def elastic_runner_helper() -> None:  # named like a hook: taken for one
        pass

    _entry_point_plugins(
        monkeypatch,
        typo=_module(
            "er_typo2_mod",
            elastic_runner_run_ends=elastic_runner_run_ends,
            elastic_runner_helper=elastic_runner_helper,
            elastic_runner_not_a_function="a string is not a hook",
        ),
    )
    with pytest.raises(PluginError) as caught:
        load_plugins(autoload=True)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("plugin 'typo' from er-typo 0.4.2 (entry point er_typo2_mod): ")
    assert message.endswith(
        "unknown hooks 'elastic_runner_helper' (see elastic_runner.hookspecs for the hooks), "
        "'elastic_runner_run_ends' (did you mean 'elastic_runner_run_end'?)"
    )


def test_an_undecorated_hook_with_the_right_name_is_called() -> None:
    calls: list[str] = []

    class Plain:
        def elastic_runner_run_end(self) -> None:  # no @hookimpl
            calls.append("run_end")

        def elastic_runner_event_sinks(self) -> list[ComponentSpec]:
            return []

    pm = make_plugin_manager(autoload=False)
    pm.register(Plain(), name="plain")
    pm.check_pending()
    pm.hook.elastic_runner_run_end(context=None, result=None)
    assert calls == ["run_end"]


def test_an_optional_unknown_hook_is_allowed(monkeypatch: pytest.MonkeyPatch) -> None:
    @hookimpl(optionalhook=True)
    def elastic_runner_from_the_future() -> None:
        pass

    _entry_point_plugins(
        monkeypatch,
        fwd=_module("er_fwd_mod", elastic_runner_from_the_future=elastic_runner_from_the_future),
    )
    assert "fwd" in load_plugins(autoload=True).sources


def test_an_argument_the_hookspec_lacks_is_a_plugin_error_not_a_warning(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    @hookimpl
    def elastic_runner_run_end(context: object, result: object, verbose: bool) -> None:
        pass

    _entry_point_plugins(
        monkeypatch, extra=_module("er_extra_mod", elastic_runner_run_end=elastic_runner_run_end)
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error", PluginLoadWarning)  # no "broken plugin" warning
        with pytest.raises(PluginError) as caught:
            load_plugins(autoload=True)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(
        "plugin 'extra' from er-extra 0.4.2 (entry point er_extra_mod): hook "
        "'elastic_runner_run_end': Argument(s) {'verbose'} are declared in the hookimpl"
    ), message
    assert "(hookimpl definition: elastic_runner_run_end(context: " in message


def _component_plugin(function: object) -> types.SimpleNamespace:
    return types.SimpleNamespace(elastic_runner_event_sinks=function)


@pytest.mark.parametrize(
    ("returned", "message"),
    [
        (
            RuntimeError("no\nbroker"),
            "hook elastic_runner_event_sinks raised RuntimeError: no broker",
        ),
        ("kafka", "hook elastic_runner_event_sinks returned 'kafka', not a list of ComponentSpec"),
        ([object], "returned [<class 'object'>], not a list of ComponentSpec"),
    ],
)
def test_a_failing_component_hook_is_one_plugin_error(returned: object, message: str) -> None:
    @hookimpl
    def elastic_runner_event_sinks() -> object:
        if isinstance(returned, Exception):
            raise returned
        return returned

    pm = make_plugin_manager(autoload=False)
    pm.register(_component_plugin(elastic_runner_event_sinks), name="kafka-plugin")
    with pytest.raises(PluginError) as caught:
        Registry(pm)
    assert str(caught.value).startswith("plugin 'kafka-plugin': ")
    assert message in str(caught.value)


def test_a_component_wrapper_sees_tagged_specs_and_its_own_are_credited_to_it() -> None:
    seen: list[list[tuple[str, str]]] = []

    @hookimpl(wrapper=True)
    def elastic_runner_event_sinks() -> Generator[None, list[list[ComponentSpec]], object]:
        per_plugin = yield
        seen.extend([(s.name, s.provider) for s in specs] for specs in per_plugin)
        extra = ComponentSpec("audit", lambda c, ctx: None, RendezvousConfig)
        return [*per_plugin, [extra]]

    pm = make_plugin_manager(autoload=False)
    pm.register(_component_plugin(elastic_runner_event_sinks), name="auditor")
    reg = Registry(pm)
    [builtin] = seen
    assert {name for name, _ in builtin} == {"console", "jsonl", "null"}
    assert {provider for _, provider in builtin} == {reg.provider(ComponentKind.EVENTS, "null")}
    assert reg.provider(ComponentKind.EVENTS, "audit") == "auditor"


def test_a_raising_component_wrapper_is_one_plugin_error() -> None:
    @hookimpl(wrapper=True)
    def elastic_runner_event_sinks() -> Generator[None, object, object]:
        yield
        raise KeyError("oops")

    pm = make_plugin_manager(autoload=False)
    pm.register(_component_plugin(elastic_runner_event_sinks), name="meddler")
    with pytest.raises(
        PluginError,
        match=r"^hook elastic_runner_event_sinks: a wrapper \(plugin "
        r"'meddler'\) raised KeyError: 'oops'$",
    ):
        Registry(pm)


def test_nothing_else_in_the_package_is_named_like_a_hook() -> None:
    """Any function named ``elastic_runner_*`` is taken for a hook implementation (a typo
    is then caught): so the package must define no other such name. Checked by name
    over every module, since which modules are built-in plugins changes."""
    hooks = {name for name in vars(hookspecs) if name.startswith(hookspecs.HOOK_PREFIX)}
    package = Path(hookspecs.__file__).parent
    pattern = re.compile(
        r"^\s*(?:def|class)\s+(elastic_runner_\w+)|^\s*(elastic_runner_\w+)\s*[:=]|"
        r"\bimport\b.*\b(elastic_runner_\w+)",
        re.M,
    )
    stray = {}
    for path in package.rglob("*.py"):
        if path.name == "hookspecs.py":
            continue
        for match in pattern.finditer(path.read_text(encoding="utf-8")):
            name = next(g for g in match.groups() if g)
            if name not in hooks:
                stray[f"{path.relative_to(package)}"] = name
    assert stray == {}
