"""Configuration schemas (dataclasses registered in Hydra's ConfigStore) and their
validation, which parses every value once and hands the parsed values on
(:class:`ValidConfig`).

The keys here are a user-facing contract, documented in the README's config reference.
Group options of pluggable kinds (``rdzv``, ``events``, ``metrics``, ``timer``) are
subclasses of the group's base schema, provided by plugins through the component hooks.
"""

from __future__ import annotations

import os
import re
import signal
from dataclasses import dataclass, field
from typing import Any

from omegaconf import MISSING

from elastic_runner.errors import ConfigError
from elastic_runner.registry import ComponentKind, PluginError, Registry
from elastic_runner.spec import RestartPolicy

__all__ = [
    "ConfigError",
    "ElasticRunConfig",
    "EventsConfig",
    "HealthConfig",
    "JobConfig",
    "LogsConfig",
    "MetricsConfig",
    "RendezvousConfig",
    "TimerConfig",
    "ValidConfig",
    "WatchdogConfig",
    "parse_memory",
    "parse_nnodes",
    "parse_nproc_per_node",
    "parse_signals",
    "register_configs",
    "validate",
]


@dataclass
class LimitsConfig:
    """Per-worker limits, enforced by the agent."""

    #: RSS of a worker's whole process tree, e.g. ``2GiB``, ``512MB`` or bytes; a worker
    #: over it is killed and reported as over its memory limit.
    memory: str | None = None


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
    limits: LimitsConfig = field(default_factory=LimitsConfig)


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
    #: Global ranks whose output reaches the console (null = all); files keep all ranks.
    console_ranks: list[int] | None = None
    #: Print a line that several ranks print alike once: ``[ranks 0-7]: epoch 1 done``.
    collapse: bool = False
    #: Seconds a line waits for the same line from other ranks before it is printed.
    collapse_window: float = 0.2
    #: A live table of the workers under their output: auto (when stderr is a terminal),
    #: true, false.
    live: str = "auto"


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


#: Signals that stop the run (torchrun handles the first four; Slurm preempts with USR1/2).
HANDLED_SIGNALS = ("SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT", "SIGUSR1", "SIGUSR2")


@dataclass
class SignalsConfig:
    """What the agent does with the signals it gets. Each of ``HANDLED_SIGNALS`` stops the
    run: workers get the same signal when it is in ``forward`` (else SIGTERM), up to
    ``stop_timeout`` seconds to exit, then SIGKILL; the agent exits 128+N."""

    forward: list[str] = field(default_factory=lambda: list(HANDLED_SIGNALS))
    #: Ignore SIGHUP (the run survives the terminal closing, as under nohup).
    ignore_sighup: bool = False


@dataclass
class BackoffConfig:
    """Delay before restart k (k = 1, 2, ...): ``min(max, initial * factor**(k-1))``."""

    initial: float = 0.0
    factor: float = 2.0
    max: float = 60.0


@dataclass
class RestartConfig:
    """When and how the worker group is restarted after a failure."""

    backoff: BackoffConfig = field(default_factory=BackoffConfig)
    #: A failure sooner than this many seconds after the workers started is a startup
    #: failure.
    min_uptime: float = 0.0
    #: Restart after startup failures too (false: a startup failure ends the run).
    on_startup_failure: bool = True


@dataclass
class ResourcesConfig:
    """Per-worker CPU and RSS (whole process tree), sampled with psutil."""

    #: Seconds between samples (0 = never sample; then no memory limit either).
    interval: float = 1.0


@dataclass
class WatchdogConfig:
    """Hang detection with no code change: a hung rank's stacks are dumped into the run
    directory, then the group is stopped and restarted per policy."""

    #: Seconds without a byte on a rank's stdout or stderr that mean hung (0 = off).
    no_output_timeout: float = 0.0
    #: Seconds without ``elastic_runner.heartbeat()`` that mean hung, for ranks that
    #: called it at least once (0 = off).
    heartbeat_timeout: float = 0.0
    #: How stacks are dumped: auto (py-spy if installed, else faulthandler), py-spy,
    #: faulthandler, none.
    stacks: str = "auto"


@dataclass
class HealthConfig:
    """An HTTP endpoint for liveness and readiness probes: ``/healthz``, ``/readyz``,
    ``/status``."""

    #: 0 = off.
    port: int = 0
    #: Loopback unless set (``0.0.0.0`` for a Kubernetes probe from the kubelet).
    host: str = "127.0.0.1"
    #: ``/healthz`` is 503 (restart-looping) after this many restarts within
    #: ``restart_window`` seconds.
    restart_loop: int = 3
    restart_window: float = 600.0


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
    signals: SignalsConfig = field(default_factory=SignalsConfig)
    restart: RestartConfig = field(default_factory=RestartConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    watchdog: WatchdogConfig = field(default_factory=WatchdogConfig)
    health: HealthConfig = field(default_factory=HealthConfig)
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
            raise PluginError(
                f"{kind.group} component {spec.name!r} of plugin "
                f"{registry.provider(kind, spec.name)!r}: config_class must subclass "
                f"{base.__name__}"
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


_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 10**3,
    "kb": 10**3,
    "m": 10**6,
    "mb": 10**6,
    "g": 10**9,
    "gb": 10**9,
    "t": 10**12,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


def parse_memory(key: str, value: object) -> int | None:
    """``"2GiB"`` -> 2147483648; ``None`` stays ``None``."""
    if value is None:
        return None
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(value))
    unit = m.group(2).lower() if m else ""
    if not m or unit not in _SIZE_UNITS or float(m.group(1)) <= 0:
        raise ConfigError(key, value, "expected a size such as 512MiB, 2GB or a byte count > 0")
    return int(float(m.group(1)) * _SIZE_UNITS[unit])


def parse_signals(key: str, names: list[str]) -> frozenset[int]:
    """Signal names (``SIGUSR1`` or ``USR1``) among ``HANDLED_SIGNALS`` -> numbers."""
    out = set()
    for name in names:
        full = str(name).upper()
        full = full if full.startswith("SIG") else f"SIG{full}"
        if full not in HANDLED_SIGNALS:
            raise ConfigError(key, name, f"allowed: {', '.join(HANDLED_SIGNALS)}")
        out.add(int(signal.Signals[full]))
    return frozenset(out)


@dataclass(frozen=True)
class ValidConfig:
    """A run configuration that passed :func:`validate`, with the values that needed
    parsing parsed (once: the assembly step uses these, never the raw strings)."""

    config: ElasticRunConfig
    min_nodes: int
    max_nodes: int
    nproc_per_node: int
    #: ``job.limits.memory`` in bytes.
    memory_limit: int | None
    #: ``signals.forward`` as signal numbers.
    forward_signals: frozenset[int]
    restart_policy: RestartPolicy
    #: ``logs.live``: ``auto``, ``true`` or ``false``.
    live: str


def validate(cfg: ElasticRunConfig) -> ValidConfig:
    """Checks that need no filesystem (ranges and combinations of keys); the first bad
    value raises :class:`ConfigError`."""
    min_nodes, max_nodes = parse_nnodes(cfg.nnodes)
    nproc = parse_nproc_per_node(cfg.job.nproc_per_node)
    memory_limit = parse_memory("job.limits.memory", cfg.job.limits.memory)
    forward = parse_signals("signals.forward", cfg.signals.forward)
    for key, value in (
        ("restart.backoff.initial", cfg.restart.backoff.initial),
        ("restart.backoff.max", cfg.restart.backoff.max),
        ("restart.min_uptime", cfg.restart.min_uptime),
        ("resources.interval", cfg.resources.interval),
        ("logs.collapse_window", cfg.logs.collapse_window),
        ("watchdog.no_output_timeout", cfg.watchdog.no_output_timeout),
        ("watchdog.heartbeat_timeout", cfg.watchdog.heartbeat_timeout),
        ("health.restart_window", cfg.health.restart_window),
    ):
        if value < 0:
            raise ConfigError(key, value, "expected seconds >= 0")
    if cfg.restart.backoff.factor < 1:
        raise ConfigError(
            "restart.backoff.factor", cfg.restart.backoff.factor, "expected a number >= 1"
        )
    if cfg.job.limits.memory is not None and cfg.resources.interval == 0:
        raise ConfigError(
            "resources.interval", 0, "job.limits.memory needs sampling: expected seconds > 0"
        )
    live = str(cfg.logs.live).lower()
    if live not in ("auto", "true", "false"):
        raise ConfigError("logs.live", cfg.logs.live, "allowed: auto, true, false")
    stack_modes = ("auto", "py-spy", "faulthandler", "none")
    if cfg.watchdog.stacks not in stack_modes:
        raise ConfigError(
            "watchdog.stacks", cfg.watchdog.stacks, f"allowed: {', '.join(stack_modes)}"
        )
    if not 0 <= cfg.health.port <= 65535:
        raise ConfigError("health.port", cfg.health.port, "expected 0 (off) to 65535")
    if cfg.health.restart_loop < 1:
        raise ConfigError(
            "health.restart_loop", cfg.health.restart_loop, "expected an integer >= 1"
        )
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
    restart = cfg.restart
    return ValidConfig(
        config=cfg,
        min_nodes=min_nodes,
        max_nodes=max_nodes,
        nproc_per_node=nproc,
        memory_limit=memory_limit,
        forward_signals=forward,
        restart_policy=RestartPolicy(
            backoff_initial=restart.backoff.initial,
            backoff_factor=restart.backoff.factor,
            backoff_max=restart.backoff.max,
            min_uptime=restart.min_uptime,
            on_startup_failure=restart.on_startup_failure,
        ),
        live=live,
    )
