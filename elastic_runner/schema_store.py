"""Schemas stored in Hydra's ConfigStore as they are, turned into structured configs
when a composition first loads them.

``ConfigStore.store`` converts each dataclass with ``OmegaConf.structured`` at once: for
the 27 schemas of elastic-run and its plugins that was 20 to 30 ms of every agent's
start (4 to 5 % of its CPU), while one run loads only the few its defaults list and
overrides select (the primary schema, one of each group). A :class:`LazySchemaNode`
holds the dataclass and converts it on its first load; Hydra reads a stored node only
through ``ConfigStore.load``, which copies the entry and deep-copies its ``node``, so
the conversion happens once and each composition still gets its own copy.
"""

from __future__ import annotations

from typing import Any

from hydra.core.config_store import ConfigNode, ConfigStore
from omegaconf import DictConfig, OmegaConf

__all__ = ["LazySchemaNode", "store_schema"]


class LazySchemaNode(ConfigNode):
    """A ConfigStore entry whose ``node`` is ``OmegaConf.structured(schema)``, made at
    the first read."""

    def __init__(self, name: str, schema: type, group: str | None, provider: str | None) -> None:
        # (no dataclass __init__: it would assign node, a property here)
        self.name, self.group, self.package, self.provider = name, group, None, provider
        self.schema = schema
        self._node: DictConfig | None = None

    @property
    def node(self) -> DictConfig:
        """The structured config of the schema (made once)."""
        if self._node is None:
            made = OmegaConf.structured(self.schema)
            assert isinstance(made, DictConfig)
            self._node = made
        return self._node

    @node.setter
    def node(self, value: DictConfig) -> None:
        # ConfigStore.load sets the deep copy it hands out on a shallow copy of the entry
        self._node = value

    def __copy__(self) -> LazySchemaNode:
        # ConfigStore.load copies the entry before it reads the node: convert here, on
        # the stored entry, or every load would convert again (on its copy)
        self.node  # noqa: B018
        copied = LazySchemaNode.__new__(LazySchemaNode)
        copied.__dict__.update(self.__dict__)
        return copied

    def __repr__(self) -> str:
        return f"LazySchemaNode(name={self.name!r}, group={self.group!r}, schema={self.schema})"


def store_schema(
    store: ConfigStore,
    name: str,
    schema: Any,
    group: str | None = None,
    provider: str | None = None,
) -> None:
    """``store.store(name=name, node=schema, group=group, provider=provider)``, with the
    conversion to a structured config left to the first load."""
    cur = store.repo
    for part in group.split("/") if group is not None else ():
        cur = cur.setdefault(part, {})
    entry = name if name.endswith(".yaml") else f"{name}.yaml"
    cur[entry] = LazySchemaNode(entry, schema, group, provider)
