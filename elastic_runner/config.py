"""Configuration schemas (dataclasses registered in Hydra's ConfigStore) and their
validation.

The keys here are a user-facing contract, documented in the README's config reference.
Group options of pluggable kinds (``rdzv``, ``events``, ``metrics``, ``timer``) are
subclasses of the group's base schema, provided by plugins through the component hooks.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from omegaconf import MISSING

from elastic_runner.registry import ComponentKind, Registry

__all__ = [
    "ConfigError",
    "ElasticRunConfig",
    "EventsConfig",
    "JobConfig",
    "LogsConfig",
    "MetricsConfig",
    "RendezvousConfig",
    "TimerConfig",
    "parse_nnodes",
    "parse_nproc_per_node",
    "register_configs",
]


class ConfigError(ValueError):
    """Bad configuration: one line naming the key, the value and what is allowed."""

    def __init__(self, key: str, value: object, allowed: str) -> None:
        self.key, self.value, self.allowed = key, value, allowed
        super().__init__(f"{key}={_show(value)}: {allowed}")


def _show(value: object) -> str:
    if value is None:
        return "(unset)"
    return str(value)


@dataclass
class JobConfig:
    """What each worker runs (``+job=<preset>`` fills it from ``conf/job/``)."""

    #: A ``.py`` file (run as ``<agent's python> -u path``) or an executable on PATH.
    entrypoint: str | None = None
    #: A Python module run as ``<agent's python> -u -m module`` (instead of entrypoint).
    module: str | None = None
    #: Arguments; ``%local_rank%`` is replaced by each worker's local rank.
    args: list[str] = field(default_factory=list)
    role: str = "default"
    #: An int >= 1, ``cpu`` (the machine's CPU count) or ``auto`` (same, without GPUs).
    nproc_per_node: Any = 1
    #: Extra environment variables for the workers.
    env: dict[str, str] = field(default_factory=dict)


@dataclass
class RendezvousConfig:
    """Base of every rendezvous backend's schema."""

    backend: str = MISSING
    #: The job's id (TORCHELASTIC_RUN_ID), shared by all nodes; fresh per run when unset.
    id: str | None = None


@dataclass
class LogsConfig:
    """Worker output: per attempt and rank files in the run directory, teed to console."""

    #: Prefix of each console line; may use {role}, {rank}, {local_rank}, {node}.
    prefix: str = "[{role}{local_rank}]:"
    #: Copy worker output to the console (files always get everything).
    tee: bool = True


@dataclass
class EventsConfig:
    """Base of every event sink's schema."""

    sink: str = MISSING


@dataclass
class MetricsConfig:
    """Base of every metric handler's schema."""

    handler: str = MISSING


@dataclass
class TimerConfig:
    """Base of every timer server's schema."""

    server: str = MISSING


@dataclass
class ElasticRunConfig:
    """The whole run."""

    job: JobConfig = field(default_factory=JobConfig)
    #: ``N`` or ``MIN:MAX`` nodes.
    nnodes: str = "1"
    #: Restarts of the worker group after failures, for the whole job.
    max_restarts: int = 0
    #: Seconds between SIGTERM and SIGKILL when workers are stopped.
    stop_timeout: float = 30.0
    rdzv: RendezvousConfig = MISSING
    logs: LogsConfig = MISSING
    events: EventsConfig = MISSING
    metrics: MetricsConfig = MISSING
    timer: TimerConfig = MISSING


_GROUP_BASES: dict[ComponentKind, type[Any]] = {
    ComponentKind.RENDEZVOUS: RendezvousConfig,
    ComponentKind.EVENTS: EventsConfig,
    ComponentKind.METRICS: MetricsConfig,
    ComponentKind.TIMER: TimerConfig,
}

SCHEMA_NAME = "elastic_runner_schema"


def register_configs(registry: Registry) -> None:
    """Register the primary schema and every component's schema in Hydra's ConfigStore
    (a process-wide singleton owned by Hydra; storing the same node again is harmless)."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(name=SCHEMA_NAME, node=ElasticRunConfig, provider="elastic_runner")
    cs.store(group="logs", name="default", node=LogsConfig, provider="elastic_runner")
    for kind, spec in registry:
        base = _GROUP_BASES[kind]
        if not (isinstance(spec.config_class, type) and issubclass(spec.config_class, base)):
            raise TypeError(
                f"{kind.group} component {spec.name!r}: config_class must subclass {base.__name__}"
            )
        cs.store(
            group=kind.group,
            name=spec.name,
            node=spec.config_class,
            provider=registry.provider(kind, spec.name),
        )


def parse_nnodes(value: object) -> tuple[int, int]:
    """``"2"`` -> (2, 2); ``"1:4"`` -> (1, 4)."""
    text = str(value).strip()
    parts = text.split(":")
    allowed = "expected N or MIN:MAX with 1 <= MIN <= MAX"
    if len(parts) not in (1, 2) or not all(p.strip().isdigit() for p in parts):
        raise ConfigError("nnodes", value, allowed)
    lo, hi = int(parts[0]), int(parts[-1])
    if not 1 <= lo <= hi:
        raise ConfigError("nnodes", value, allowed)
    return lo, hi


def parse_nproc_per_node(value: object) -> int:
    """An int >= 1, or ``cpu``/``auto`` for this machine's usable CPU count."""
    allowed = "expected an integer >= 1, 'cpu' or 'auto'"
    if isinstance(value, bool):
        raise ConfigError("job.nproc_per_node", value, allowed)
    if isinstance(value, str) and value.strip().lower() in ("cpu", "auto"):
        return len(os.sched_getaffinity(0)) or os.cpu_count() or 1
    try:
        n = int(str(value).strip())
    except ValueError:
        raise ConfigError("job.nproc_per_node", value, allowed) from None
    if n < 1:
        raise ConfigError("job.nproc_per_node", value, allowed)
    return n


def validate(cfg: ElasticRunConfig) -> None:
    """Checks that need no filesystem: ranges and combinations of keys."""
    parse_nnodes(cfg.nnodes)
    parse_nproc_per_node(cfg.job.nproc_per_node)
    if cfg.max_restarts < 0:
        raise ConfigError("max_restarts", cfg.max_restarts, "expected an integer >= 0")
    if cfg.stop_timeout < 0:
        raise ConfigError("stop_timeout", cfg.stop_timeout, "expected seconds >= 0")
    if not cfg.job.role or not cfg.job.role.strip():
        raise ConfigError("job.role", cfg.job.role, "expected a non-empty name")
    if cfg.job.entrypoint and cfg.job.module:
        raise ConfigError(
            "job.module", cfg.job.module, "set job.entrypoint or job.module, not both"
        )
    if not cfg.job.entrypoint and not cfg.job.module:
        raise ConfigError(
            "job.entrypoint",
            None,
            "required: a .py file or an executable on PATH (or job.module=<module>), "
            "e.g. job.entrypoint=train.py, or a preset: +job=hello",
        )
