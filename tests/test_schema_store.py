"""Schemas stored in Hydra's ConfigStore, converted at their first load."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, OmegaConf

from elastic_runner.schema_store import LazySchemaNode, store_schema


@dataclass
class _Inner:
    depth: int = 3


@dataclass
class _Schema:
    name: str = "x"
    sizes: list[int] = field(default_factory=lambda: [1, 2])
    inner: _Inner = field(default_factory=_Inner)


def test_storing_converts_nothing_and_a_load_converts_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    made: list[type] = []
    structured = OmegaConf.structured
    expected = structured(_Schema)

    def counting(obj: type) -> DictConfig:
        made.append(obj)
        made_node = structured(obj)
        assert isinstance(made_node, DictConfig)
        return made_node

    monkeypatch.setattr(OmegaConf, "structured", counting)
    cs = ConfigStore.instance()
    store_schema(cs, "lazy_a", _Schema, group="er_test_group/sub", provider="tests")
    entry = cs.repo["er_test_group"]["sub"]["lazy_a.yaml"]
    assert isinstance(entry, LazySchemaNode) and made == []  # nothing converted yet
    assert cs.get_type("er_test_group/sub") is not None
    assert cs.list("er_test_group/sub") == ["lazy_a.yaml"]
    first = cs.load("er_test_group/sub/lazy_a.yaml")
    second = cs.load("er_test_group/sub/lazy_a.yaml")
    assert made == [_Schema]  # once, whatever the loads
    assert first.node == second.node == expected
    assert first.node is not second.node  # each load its own copy, as Hydra's own
    first.node.inner.depth = 7
    assert cs.load("er_test_group/sub/lazy_a.yaml").node.inner.depth == 3
    assert (first.name, first.group, first.package, first.provider) == (
        "lazy_a.yaml",
        "er_test_group/sub",
        None,
        "tests",
    )
    del cs.repo["er_test_group"]


def test_a_composition_reads_a_lazily_stored_schema(tmp_path: Path) -> None:
    cs = ConfigStore.instance()
    store_schema(cs, "er_test_primary", _Schema, provider="tests")
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(version_base="1.3", config_dir=str(tmp_path)):
            cfg = compose("er_test_primary", overrides=["inner.depth=5", "name=y"])
        assert OmegaConf.to_container(cfg) == {"name": "y", "sizes": [1, 2], "inner": {"depth": 5}}
        # typed as the schema says: a wrong type is refused at composition
        with (
            initialize_config_dir(version_base="1.3", config_dir=str(tmp_path)),
            pytest.raises(Exception, match=r"inner\.depth"),
        ):
            compose("er_test_primary", overrides=["inner.depth=deep"])
    finally:
        GlobalHydra.instance().clear()
        del cs.repo["er_test_primary.yaml"]
