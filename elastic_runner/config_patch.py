"""Typed values given to the composed config after Hydra composed it, before validation.

A front end that turns something other than Hydra overrides into a configuration (a
torchrun command line, :mod:`elastic_runner.torchrun.front`; a Slurm job step,
:mod:`elastic_runner.schedulers.slurm`) chooses config groups as Hydra overrides and
gives every other value as a :class:`ConfigPatch`: assigned as it is, never through
Hydra's grammar or OmegaConf's interpolation.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig, OmegaConf

from elastic_runner.errors import ConfigError

__all__ = ["ConfigPatch", "literal"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ConfigPatch:
    """Values a front end gives the composed config."""

    values: Mapping[str, Any]
    notes: tuple[str, ...] = ()
    #: torchrun options (``dest``) given through ``PET_*``, to name those in errors.
    from_env: frozenset[str] = frozenset()
    #: Where the values come from: the start of the log line of the notes.
    origin: str = "torchrun options"
    #: Key -> where its value came from (an option, a variable), to name it in a one-line
    #: error; a key ending in ``.`` stands for every key under it.
    sources: Mapping[str, str] = field(default_factory=dict)

    def apply(self, cfg: DictConfig) -> None:
        """Assign every value to the composed config, as a literal (a ``${`` in a script
        argument stays as written); a key the selected schema lacks (a plugin backend
        without ``is_host``) is noted and skipped. Logs the notes, one line."""
        notes = list(self.notes)
        for dotted, value in self.values.items():
            parent, _, name = dotted.rpartition(".")
            node = OmegaConf.select(cfg, parent) if parent else cfg
            if not isinstance(node, DictConfig) or name not in node.keys():  # noqa: SIM118 (`in` is False for MISSING)
                notes.append(f"{dotted}: not a key of this backend; ignored")
                continue
            node[name] = literal(value)
        if notes:
            log.info("%s: %s", self.origin, "; ".join(notes))

    def describe(self, exc: ConfigError, message: str) -> str:
        """A config error about a value this patch set, worded with its source."""
        key = str(exc.key)
        if key not in self.values:
            return message
        source = self.sources.get(key)
        if source is None:
            source = next(
                (s for k, s in self.sources.items() if k.endswith(".") and key.startswith(k)),
                None,
            )
        if source is None:
            return message
        dest = source.lstrip("-").replace("-", "_")
        if dest in self.from_env:
            source = f"PET_{dest.upper()}"
        return f"{source} ({message})"


_INTERPOLATION = re.compile(r"(\\*)\$\{")


def literal(value: Any) -> Any:
    """``value`` written so that OmegaConf resolves it to itself: before every ``${``, its
    ``n`` backslashes become ``2n + 1`` (OmegaConf reads ``2k`` backslashes there as ``k``
    and an interpolation, ``2k + 1`` as ``k`` and a literal ``${``)."""
    if isinstance(value, str):
        return _INTERPOLATION.sub(lambda m: "\\" * (2 * len(m.group(1)) + 1) + "${", value)
    if isinstance(value, list):
        return [literal(item) for item in value]
    return value
