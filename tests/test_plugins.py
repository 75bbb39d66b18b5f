"""The per-run PluginManager, component registry and entry-point loading."""

from __future__ import annotations

import importlib.metadata
import types
from dataclasses import dataclass

import pytest

from elastic_runner import ComponentSpec, hookimpl
from elastic_runner.config import RendezvousConfig
from elastic_runner.plugins import (
    BUILTIN_PLUGINS,
    ENTRY_POINT_GROUP,
    PluginLoadWarning,
    make_plugin_manager,
)
from elastic_runner.registry import ComponentKind, DuplicateComponentError, Registry


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
    assert entries["elastic_runner.events"].source == "built-in (elastic_runner.events)"
    assert entries["elastic_runner.events"].components == {
        "events": {
            "console": "JSON lines on stderr",
            "jsonl": "events.jsonl in the run directory",
            "null": "discard",
        }
    }
    text = format_text(list(entries.values()))
    assert "    rdzv=etcd  dynamic (min:max nodes) on an etcd cluster, v3 API" in text
    assert (entries["ender"].source, entries["ender"].hooks) == ("registered directly", ["run_end"])
