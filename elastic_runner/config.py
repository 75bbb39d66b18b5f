"""Configuration schemas (dataclasses registered in Hydra's ConfigStore) and their
validation, which parses every value once and hands the parsed values on
(:class:`ValidConfig`).

The keys here are a user-facing contract, documented in the README's config reference.
Group options of pluggable kinds (``rdzv``, ``events``, ``metrics``, ``timer``) are
subclasses of the group's base schema, provided by plugins through the component hooks.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import re
import resource
import signal
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import MISSING

from elastic_runner.accelerators import detect_gpus
from elastic_runner.checks import (
    ChecksConfig,
    CommandCheck,
    DiskCheck,
    GpuCheck,
    MemoryCheck,
    NodeCheck,
)
from elastic_runner.errors import ConfigError
from elastic_runner.exclusion import ExclusionConfig
from elastic_runner.faults import (
    FAULTS,
    FailCheckFault,
    FaultConfig,
    KillAgentFault,
    KillRankFault,
    signal_name,
)
from elastic_runner.registry import ComponentKind, PluginError, Registry
from elastic_runner.spec import RestartPolicy
from elastic_runner.workers.command import NO_PYTHON_WITH_MODULE

__all__ = [
    "CONSOLE_STREAMS",
    "MAX_SECONDS",
    "REDACTED",
    "SCHEDULERS",
    "ConfigError",
    "ElasticRunConfig",
    "EventsConfig",
    "HealthConfig",
    "JobConfig",
    "LogsConfig",
    "MetricsConfig",
    "RedactingFilter",
    "RendezvousConfig",
    "TimerConfig",
    "ValidConfig",
    "WatchdogConfig",
    "check_nproc_per_node",
    "describe_config_error",
    "is_secret_name",
    "may_hold_secrets",
    "one_line",
    "parse_console_streams",
    "parse_env",
    "parse_log_prefix",
    "parse_master_addr",
    "parse_master_port",
    "parse_memory",
    "parse_nnodes",
    "parse_nproc_per_node",
    "parse_run_id",
    "parse_seconds",
    "parse_signals",
    "redact",
    "redact_text",
    "register_configs",
    "validate",
    "write_private",
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

    #: A ``.py`` file (run as ``<agent's python> -u path``) or an executable on PATH;
    #: ``python`` says otherwise.
    entrypoint: str | None = None
    #: A Python module run as ``<agent's python> -u -m module`` (instead of entrypoint).
    module: str | None = None
    #: How the entrypoint runs: null = by its name (``.py`` with python, anything else
    #: as an executable); true = always ``<python> -u path`` (torchrun's default);
    #: false = always as a program (torchrun's ``--no-python``; not with ``module``).
    python: bool | None = None
    #: Arguments; ``%local_rank%`` is replaced by each worker's local rank.
    args: list[str] = field(default_factory=list)
    #: ``ROLE_NAME``: at most 128 printable characters, empty allowed (TorchX passes
    #: ``--role ''`` to torchrun).
    role: str = "default"
    #: An int >= 1, or as torchrun: ``cpu`` (the CPUs this process may use), ``gpu`` (the
    #: GPUs visible to it: NVIDIA's in /proc/driver/nvidia/gpus, /dev/nvidia<N> or
    #: ``nvidia-smi -L``, AMD's in the KFD topology or /dev/dri with /dev/kfd, narrowed by
    #: ``CUDA_VISIBLE_DEVICES`` and its kin; none is an error) or ``auto`` (the GPUs when
    #: there are any, else the CPUs). See :mod:`elastic_runner.accelerators`.
    nproc_per_node: Any = 1
    #: Extra environment variables for the workers: names ``[A-Za-z_][A-Za-z0-9_]*``,
    #: string values without NUL.
    env: dict[str, str] = field(default_factory=dict)
    limits: LimitsConfig = field(default_factory=LimitsConfig)


@dataclass
class RendezvousConfig:
    """Base of every rendezvous backend's schema."""

    backend: str = MISSING
    #: The job's id (TORCHELASTIC_RUN_ID), shared by all nodes; fresh per run when unset.
    #: 1 to 128 letters, digits, ``.``, ``_`` or ``-``, starting with a letter or digit:
    #: no ``/``, so no job's keys in a shared store are ever under another job's.
    id: str | None = None
    #: MASTER_ADDR of every worker of the job, as given (torch's ``master_addr``); wins
    #: over a backend's ``local_addr``. Group rank 0 publishes its value: all nodes agree.
    master_addr: str | None = None
    #: MASTER_PORT of every worker of the job, as given (torch's ``master_port``), even
    #: when it is in use (a warning then); null: group rank 0 picks a free port per round.
    master_port: int | None = None


#: ``logs.console_streams`` names, with the file descriptor each is written to.
CONSOLE_STREAMS = {"stdout": 1, "stderr": 2}


@dataclass
class LogsConfig:
    """Worker output: per attempt and rank files in the run directory, teed to console."""

    #: Prefix of each console line; may use {role}, {rank}, {local_rank}, {node} (with a
    #: format spec, e.g. {rank:>3}); at most 200 characters once formatted.
    prefix: str = "[{role}{local_rank}]:"
    #: Copy worker output to the console (files always get everything).
    tee: bool = True
    #: Global ranks whose output reaches the console (null = all); files keep all ranks.
    console_ranks: list[int] | None = None
    #: Local ranks whose output reaches the console (null = all; torchrun's
    #: ``--local-ranks-filter``); a line needs both this and ``console_ranks`` to allow it.
    console_local_ranks: list[int] | None = None
    #: Streams that reach the console: ``stdout``, ``stderr`` (empty: none, as with
    #: ``tee: false``); files get both whatever this says.
    console_streams: list[str] = field(default_factory=lambda: list(CONSOLE_STREAMS))
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


#: ``scheduler`` values.
SCHEDULERS = ("auto", "slurm", "none")


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
    #: Signals that mean preemption (Slurm's ``sbatch --signal=USR1@N``): they stop the
    #: run as any other, but the agent exits 75 (``EXIT_PREEMPTED``), not 128+N.
    preempt: list[str] = field(default_factory=lambda: ["SIGUSR1"])
    #: Under Slurm, a preempted run's node 0 runs ``scontrol requeue $SLURM_JOB_ID``.
    requeue: bool = False


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
    #: Stop the job (exit 93, "no progress: do not requeue") after this many failed
    #: restarts in a row that never got past the furthest step the workers reported
    #: (``elastic_runner.heartbeat(step=N)``); 0 = never.
    no_progress: int = 3
    #: For workers that report no steps: a failed restart that ran less than this many
    #: seconds counts as no progress (0 = off: without steps, no verdict).
    no_progress_uptime: float = 0.0


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
    #: The scheduler whose job step places the agents: ``auto`` (Slurm mode when
    #: ``SLURM_JOB_ID`` and ``SLURM_STEP_ID`` are set, i.e. under ``srun``), ``slurm``
    #: (the same, and not being in a Slurm step is an error), ``none`` (no detection).
    #: Read from the command line before Hydra composes (it chooses ``rdzv``); see
    #: :mod:`elastic_runner.schedulers`.
    scheduler: str = "auto"
    #: Restarts of the worker group after failures, for the whole job.
    max_restarts: int = 0
    #: Seconds between SIGTERM and SIGKILL when workers are stopped.
    stop_timeout: float = 30.0
    signals: SignalsConfig = field(default_factory=SignalsConfig)
    restart: RestartConfig = field(default_factory=RestartConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    watchdog: WatchdogConfig = field(default_factory=WatchdogConfig)
    health: HealthConfig = field(default_factory=HealthConfig)
    checks: ChecksConfig = field(default_factory=ChecksConfig)
    #: Excluding a node that keeps causing failures, for a cooldown (off by default).
    exclusion: ExclusionConfig = field(default_factory=ExclusionConfig)
    rdzv: RendezvousConfig = MISSING
    logs: LogsConfig = MISSING
    events: EventsConfig = MISSING
    metrics: MetricsConfig = MISSING
    timer: TimerConfig = MISSING
    #: Fault injection, for testing a restart path (``fault=none``: off).
    fault: FaultConfig = field(default_factory=FaultConfig)


_GROUP_BASES: dict[ComponentKind, type[Any]] = {
    ComponentKind.RENDEZVOUS: RendezvousConfig,
    ComponentKind.EVENTS: EventsConfig,
    ComponentKind.METRICS: MetricsConfig,
    ComponentKind.TIMER: TimerConfig,
}

SCHEMA_NAME = "elastic_runner_schema"


def register_configs(registry: Registry) -> None:
    """Register the primary schema and every component's schema in Hydra's ConfigStore
    (a process-wide singleton owned by Hydra; storing the same node again is harmless),
    each made a structured config when a composition first loads it
    (:mod:`elastic_runner.schema_store`)."""
    from hydra.core.config_store import ConfigStore

    from elastic_runner.schema_store import store_schema

    cs = ConfigStore.instance()
    store_schema(cs, SCHEMA_NAME, ElasticRunConfig, provider="elastic_runner")
    store_schema(cs, "default", LogsConfig, group="logs", provider="elastic_runner")
    for name, schema in FAULTS.items():
        store_schema(cs, name, schema, group="fault", provider="elastic_runner")
    for kind, spec in registry:
        base = _GROUP_BASES[kind]
        if not (isinstance(spec.config_class, type) and issubclass(spec.config_class, base)):
            raise PluginError(
                f"{kind.group} component {spec.name!r} of plugin "
                f"{registry.provider(kind, spec.name)!r}: config_class must subclass "
                f"{base.__name__}"
            )
        store_schema(
            cs,
            spec.name,
            spec.config_class,
            group=kind.group,
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


#: Logs what a word in ``job.nproc_per_node`` came to, once per run (validate runs once).
_nproc_log = logging.getLogger(__name__)


def parse_nproc_per_node(value: object) -> int:
    """An int >= 1, or a word as torchrun takes it: ``cpu`` (the CPUs this process may
    use), ``gpu`` (the GPUs visible to it, :func:`~elastic_runner.accelerators.detect_gpus`;
    none is a :class:`ConfigError` saying where they were looked for) or ``auto`` (the
    GPUs when there are any, else the CPUs). A word's count, and why, is logged."""
    allowed = "expected an integer >= 1, 'auto', 'gpu' or 'cpu'"
    if isinstance(value, bool):
        raise ConfigError("job.nproc_per_node", value, allowed)
    word = value.strip().lower() if isinstance(value, str) else ""
    if word in ("cpu", "gpu", "auto"):
        n, why = _count_for(word, value)
        _nproc_log.info("job.nproc_per_node=%s: %s", word, why)
        return n
    try:
        n = int(str(value).strip())
    except ValueError:
        raise ConfigError("job.nproc_per_node", value, allowed) from None
    if n < 1:
        raise ConfigError("job.nproc_per_node", value, allowed)
    return n


def _count_for(word: str, value: object) -> tuple[int, str]:
    """The count a ``job.nproc_per_node`` word stands for, and why (for the log)."""
    cpus = len(os.sched_getaffinity(0)) or os.cpu_count() or 1
    cpu_count = f"{cpus} CPU{'' if cpus == 1 else 's'} (the CPUs this process may use)"
    if word == "cpu":
        return cpus, cpu_count
    gpus = detect_gpus()  # only for a word: an integer never looks at the devices
    if gpus.visible:
        return gpus.visible, gpus.describe()
    if word == "gpu":
        raise ConfigError(
            "job.nproc_per_node", value, f"{gpus.describe()}; use 'cpu' or an integer"
        )
    return cpus, f"{gpus.describe()}, so {cpu_count}"


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


#: Most seconds a duration key takes (about 11.6 days): a longer wait overflows the
#: kernel's and the event loop's timers (epoll takes at most 2**31 - 1 ms).
MAX_SECONDS = 1_000_000.0

#: Duration keys of any schema (a plugin's too) are recognised by their name's ending.
_SECONDS_NAME = re.compile(r"(^|_)(timeout|interval|window|uptime)$")


def parse_seconds(
    key: str, value: object, *, positive: bool = False, maximum: float = MAX_SECONDS
) -> float:
    """A duration in seconds: a finite number >= 0 (> 0 when ``positive``), at most
    ``maximum``. NaN and the infinities are refused (NaN passes every ``< 0`` test)."""
    allowed = (
        f"expected seconds {'>' if positive else '>='} 0 (a finite number up to {maximum:.0f})"
    )
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(key, value, allowed)
    seconds = float(value)
    if not math.isfinite(seconds) or seconds < 0 or seconds > maximum:
        raise ConfigError(key, value, allowed)
    if positive and seconds == 0:
        raise ConfigError(key, value, allowed)
    return seconds


#: ``rdzv.id``: the job's keys are ``rdzv/<id>/...`` in a store several jobs may share; an
#: id with ``/`` could put one job's keys under another's (``team`` and ``team/exp1``).
_RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def parse_master_port(value: object) -> int | None:
    """``rdzv.master_port``: ``None`` when unset, else a port 1..65535 (0 would be a
    different port in every worker, and torch's store on worker rank 0 needs one)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise ConfigError("rdzv.master_port", value, "expected a port from 1 to 65535, or null")
    return value


def parse_master_addr(value: object) -> str | None:
    """``rdzv.master_addr``: ``None`` (or empty) when unset, else a host name or address
    as the workers will be given it: no whitespace or control character."""
    if value is None or value == "":
        return None
    if not isinstance(value, str) or not value.isprintable() or any(c.isspace() for c in value):
        raise ConfigError(
            "rdzv.master_addr",
            value,
            "expected a host name or IP address (no spaces), e.g. rdzv.master_addr=node0",
        )
    return value


def parse_run_id(value: object) -> str | None:
    """``rdzv.id``: ``None`` (or empty) when unset, else 1..128 of ``[A-Za-z0-9._-]``,
    starting with a letter or digit."""
    if value is None or value == "":
        return None
    if not isinstance(value, str) or not _RUN_ID.fullmatch(value):
        raise ConfigError(
            "rdzv.id",
            value,
            "expected 1 to 128 letters, digits, '.', '_' or '-', starting with a letter or "
            "digit (no '/'), e.g. rdzv.id=team.exp1",
        )
    return value


#: Fields ``logs.prefix`` may use, with sample values of the types the agent passes.
_PREFIX_SAMPLE = {"role": "default", "rank": 0, "local_rank": 0, "node": "node"}
#: Most characters of ``logs.prefix`` once formatted (beyond the values' own length).
MAX_PREFIX = 200


def parse_log_prefix(value: str) -> str:
    """``logs.prefix``: a ``str.format`` template of ``{role}``, ``{rank}``,
    ``{local_rank}`` and ``{node}`` only (a format spec allowed, no attribute or index,
    no nested field), at most ``MAX_PREFIX`` characters once formatted."""
    key = "logs.prefix"
    fields = ", ".join(f"{{{name}}}" for name in _PREFIX_SAMPLE)
    braces = "write {{ and }} for a literal brace"
    try:
        parsed = list(string.Formatter().parse(value))
    except ValueError as exc:
        raise ConfigError(key, value, f"not a valid template ({exc}); {braces}") from None
    for _, name, spec, _ in parsed:
        if name is None:
            continue
        if name not in _PREFIX_SAMPLE:
            raise ConfigError(key, value, f"unknown field {{{name}}}; allowed: {fields} ({braces})")
        if "{" in (spec or ""):
            raise ConfigError(key, value, f"nested fields are not allowed ({braces})")
        # checked before formatting: "{rank:>20000000}" would build a 20 MB string
        if any(int(n) > MAX_PREFIX for n in re.findall(r"\d+", spec or "")):
            raise ConfigError(key, value, f"a width over {MAX_PREFIX} characters")
    try:
        sample = value.format(**_PREFIX_SAMPLE)
    except (ValueError, TypeError, KeyError, IndexError) as exc:
        raise ConfigError(key, value, f"cannot be formatted ({exc}); fields: {fields}") from None
    if len(sample) > MAX_PREFIX:
        raise ConfigError(key, value, f"longer than {MAX_PREFIX} characters once formatted")
    return value


_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
#: Longest ``NAME=value`` the kernel passes to a new process (MAX_ARG_STRLEN, with its NUL).
_MAX_ENV_ENTRY = 128 * 1024 - 1


def parse_env(env: object) -> dict[str, str]:
    """``job.env``: names ``[A-Za-z_][A-Za-z0-9_]*``, values strings without NUL that the
    kernel can pass (``NAME=value`` under 128 KiB); a list, a mapping or null is refused
    (a mapping given whole, ``+job.env={X:[1]}``, reaches here unconverted)."""
    if not isinstance(env, dict):
        raise ConfigError("job.env", env, "expected a mapping of variable names to strings")
    out = {}
    for name, value in env.items():
        key = f"job.env.{name}"
        if not isinstance(name, str) or not _ENV_NAME.fullmatch(name):
            raise ConfigError(
                "job.env",
                repr(name),
                "expected variable names of letters, digits and '_', not starting with a digit",
            )
        secret = is_secret_name(name)
        if not isinstance(value, str):  # OmegaConf makes scalars strings, not these
            shown = REDACTED if secret else value
            raise ConfigError(key, shown, "expected a string (not a list, mapping or null)")
        if "\0" in value:
            raise ConfigError(key, REDACTED if secret else repr(value), "contains a NUL character")
        if len(os.fsencode(f"{name}={value}")) > _MAX_ENV_ENTRY:
            raise ConfigError(
                key,
                REDACTED if secret else f"({len(value)} characters)",
                "too long: NAME=value must be under 128 KiB",
            )
        out[name] = value
    return out


#: Workers per usable CPU above which ``job.nproc_per_node`` is refused as a mistake.
MAX_WORKERS_PER_CPU = 32


def check_nproc_per_node(n: int) -> None:
    """Refuse more workers than this user may run (``RLIMIT_NPROC``, ``ulimit -u``) or
    more than ``MAX_WORKERS_PER_CPU`` per CPU this process may use: each is one line,
    before any worker starts (instead of a fork failing half-way)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NPROC)
    if soft != resource.RLIM_INFINITY and n + 1 > soft:  # the agent counts too
        raise ConfigError(
            "job.nproc_per_node",
            n,
            f"more workers than this user may run (process limit, ulimit -u: {soft})",
        )
    cpus = len(os.sched_getaffinity(0)) or os.cpu_count() or 1
    if n > MAX_WORKERS_PER_CPU * cpus:
        raise ConfigError(
            "job.nproc_per_node",
            n,
            f"more than {MAX_WORKERS_PER_CPU} workers per CPU ({cpus} CPU(s) here: at most "
            f"{MAX_WORKERS_PER_CPU * cpus})",
        )


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
    #: ``logs.console_streams`` as file descriptors (1 = stdout, 2 = stderr).
    console_streams: frozenset[int] = frozenset(CONSOLE_STREAMS.values())
    #: ``signals.preempt`` as signal numbers.
    preempt_signals: frozenset[int] = frozenset()
    #: The node health checks ``checks`` asks for (plugins registered for the run).
    checks: tuple[NodeCheck, ...] = ()
    #: The fault to inject (``None``: none).
    fault: FaultConfig | None = None


def validate(cfg: ElasticRunConfig) -> ValidConfig:
    """Checks that need no filesystem (ranges and combinations of keys); the first bad
    value raises :class:`ConfigError`. Beyond the keys named here, every float of every
    schema (a plugin's too) must be finite, a duration key's (``*timeout``,
    ``*interval``, ``*window``, ``*uptime``) within ``0..MAX_SECONDS``, and no string
    may hold a NUL character."""
    min_nodes, max_nodes = parse_nnodes(cfg.nnodes)
    if cfg.scheduler not in SCHEDULERS:
        raise ConfigError("scheduler", cfg.scheduler, f"allowed: {', '.join(SCHEDULERS)}")
    nproc = parse_nproc_per_node(cfg.job.nproc_per_node)
    check_nproc_per_node(nproc)
    memory_limit = parse_memory("job.limits.memory", cfg.job.limits.memory)
    forward = parse_signals("signals.forward", cfg.signals.forward)
    preempt = parse_signals("signals.preempt", cfg.signals.preempt)
    parse_run_id(cfg.rdzv.id)
    parse_master_addr(cfg.rdzv.master_addr)
    parse_master_port(cfg.rdzv.master_port)
    for key, value in (
        ("stop_timeout", cfg.stop_timeout),
        ("restart.backoff.initial", cfg.restart.backoff.initial),
        ("restart.backoff.max", cfg.restart.backoff.max),
        ("restart.min_uptime", cfg.restart.min_uptime),
        ("restart.no_progress_uptime", cfg.restart.no_progress_uptime),
        ("resources.interval", cfg.resources.interval),
        ("logs.collapse_window", cfg.logs.collapse_window),
        ("watchdog.no_output_timeout", cfg.watchdog.no_output_timeout),
        ("watchdog.heartbeat_timeout", cfg.watchdog.heartbeat_timeout),
        ("health.restart_window", cfg.health.restart_window),
    ):
        parse_seconds(key, value)
    _check_exclusion(cfg.exclusion)
    if not (isinstance(cfg.restart.no_progress, int) and 0 <= cfg.restart.no_progress <= 10**6):
        raise ConfigError(
            "restart.no_progress", cfg.restart.no_progress, "expected restarts >= 0 (0 = off)"
        )
    factor = cfg.restart.backoff.factor
    if not (isinstance(factor, int | float) and math.isfinite(factor) and 1 <= factor <= 100):
        raise ConfigError("restart.backoff.factor", factor, "expected a number from 1 to 100")
    if cfg.job.limits.memory is not None and cfg.resources.interval == 0:
        raise ConfigError(
            "resources.interval", 0, "job.limits.memory needs sampling: expected seconds > 0"
        )
    live = str(cfg.logs.live).lower()
    if live not in ("auto", "true", "false"):
        raise ConfigError("logs.live", cfg.logs.live, "allowed: auto, true, false")
    parse_log_prefix(cfg.logs.prefix)
    if cfg.logs.console_ranks is not None and any(r < 0 for r in cfg.logs.console_ranks):
        raise ConfigError("logs.console_ranks", cfg.logs.console_ranks, "expected ranks >= 0")
    local_ranks = cfg.logs.console_local_ranks
    if local_ranks is not None and any(r < 0 for r in local_ranks):
        raise ConfigError("logs.console_local_ranks", local_ranks, "expected local ranks >= 0")
    console_streams = parse_console_streams(cfg.logs.console_streams)
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
    role = cfg.job.role
    # Empty is torchrun's too (TorchX passes --role ''): ROLE_NAME='', prefix "[0]:".
    if not isinstance(role, str) or len(role) > 128 or not role.isprintable():
        raise ConfigError(
            "job.role", role, "expected at most 128 printable characters (may be empty)"
        )
    parse_env(cfg.job.env)
    if cfg.job.entrypoint and cfg.job.module:
        raise ConfigError(
            "job.module", cfg.job.module, "set job.entrypoint or job.module, not both"
        )
    if cfg.job.python not in (None, True, False):  # OmegaConf's bool allows only these
        raise ConfigError("job.python", cfg.job.python, "allowed: null, true, false")
    if cfg.job.module and cfg.job.python is False:
        raise ConfigError("job.python", "false", NO_PYTHON_WITH_MODULE)
    if not cfg.job.entrypoint and not cfg.job.module:
        raise ConfigError(
            "job.entrypoint",
            None,
            "required: a .py file or an executable on PATH (or job.module=<module>), "
            "e.g. job.entrypoint=train.py, or a preset: +job=hello",
        )
    _check_values(cfg, "")
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
        console_streams=console_streams,
        preempt_signals=preempt,
        checks=_checks(cfg.checks),
        fault=_fault(cfg.fault),
    )


def parse_console_streams(value: object) -> frozenset[int]:
    """``logs.console_streams``: a list of ``stdout`` and ``stderr`` (either, both or
    none) -> their file descriptors."""
    allowed = "expected a list of stdout and stderr (empty: none reaches the console)"
    if not isinstance(value, list | tuple):
        raise ConfigError("logs.console_streams", value, allowed)
    bad = [name for name in value if name not in CONSOLE_STREAMS]
    if bad:
        raise ConfigError("logs.console_streams", bad[0], allowed)
    return frozenset(CONSOLE_STREAMS[name] for name in value)


def quote_null_options(overrides: list[str]) -> list[str]:
    """``events=null`` selects the option named ``null``: Hydra's grammar reads an unquoted
    ``null`` as None, which it rejects for a config group with a traceback. Every front
    door that takes Hydra overrides passes them through this."""
    groups = "|".join(kind.group for kind in ComponentKind)
    return [re.sub(rf"^(\+{{0,2}}(?:{groups}))=null$", r"\1='null'", arg) for arg in overrides]


def _fault(fault: FaultConfig) -> FaultConfig | None:
    """The fault to inject, checked; ``None`` for ``fault=none``."""
    if fault.kind not in FAULTS:
        raise ConfigError("fault.kind", fault.kind, f"allowed: {', '.join(FAULTS)}")
    if fault.kind == "none":
        return None
    attempt = getattr(fault, "attempt", 1)
    if not isinstance(attempt, int) or attempt < 0:
        raise ConfigError("fault.attempt", attempt, "expected 1, 2, ... or 0 (every attempt)")
    if isinstance(fault, KillRankFault):
        if not isinstance(fault.rank, int) or fault.rank < 0:
            raise ConfigError("fault.rank", fault.rank, "expected a global rank >= 0")
        name = signal_name(fault.signal)
        if name not in signal.Signals.__members__ or name in ("SIGCHLD", "SIGCONT"):
            raise ConfigError("fault.signal", fault.signal, "expected a signal name, e.g. SIGKILL")
        if (fault.after is None) == (fault.at_step is None):
            raise ConfigError(
                "fault.after", fault.after, "give one of fault.after (seconds) or fault.at_step"
            )
        if fault.after is not None:
            parse_seconds("fault.after", fault.after)
    if isinstance(fault, KillAgentFault):
        parse_seconds("fault.after", fault.after)
        if fault.node is not None and (not isinstance(fault.node, int) or fault.node < 0):
            raise ConfigError("fault.node", fault.node, "expected a group rank >= 0")
    checks = getattr(fault, "checks", 1)
    if isinstance(fault, FailCheckFault) and (not isinstance(checks, int) or checks < 1):
        raise ConfigError("fault.checks", fault.checks, "expected a count >= 1")
    return fault


def _check_exclusion(config: ExclusionConfig) -> None:
    """``exclusion.*``: a count, and times in order."""
    if not (isinstance(config.failures, int) and 0 <= config.failures <= 10**6):
        raise ConfigError(
            "exclusion.failures", config.failures, "expected failures >= 0 (0 = never exclude)"
        )
    for key in ("window", "cooldown", "cooldown_max"):
        parse_seconds(f"exclusion.{key}", getattr(config, key))
    if config.cooldown_max < config.cooldown:
        raise ConfigError(
            "exclusion.cooldown_max",
            config.cooldown_max,
            f"expected seconds >= exclusion.cooldown ({config.cooldown:g})",
        )


def _checks(config: ChecksConfig) -> tuple[NodeCheck, ...]:
    """The check plugins ``checks.*`` asks for; a bad size, count or time names its key."""
    checks: list[NodeCheck] = []
    for path, free in (config.disk or {}).items():
        size = parse_memory(f"checks.disk.{path}", free)
        if size is None:
            raise ConfigError(f"checks.disk.{path}", free, "expected a size such as 50GiB")
        checks.append(DiskCheck(os.path.expanduser(str(path)), size))
    if isinstance(config.gpus, bool) or not isinstance(config.gpus, int) or config.gpus < 0:
        raise ConfigError("checks.gpus", config.gpus, "expected a count >= 0 (0: no check)")
    if config.gpus:
        checks.append(GpuCheck(config.gpus))
    if (memory := parse_memory("checks.memory", config.memory)) is not None:
        checks.append(MemoryCheck(memory))
    for key in ("command_timeout", "retry_for", "retry_interval"):
        parse_seconds(f"checks.{key}", getattr(config, key))
    if config.command is not None:
        if not config.command.strip():
            raise ConfigError("checks.command", "''", "expected a shell command (null: none)")
        if config.command_timeout <= 0:
            raise ConfigError(
                "checks.command_timeout", config.command_timeout, "expected seconds > 0"
            )
        checks.append(CommandCheck(config.command, config.command_timeout))
    if config.retry_for and config.retry_interval <= 0:
        raise ConfigError("checks.retry_interval", config.retry_interval, "expected seconds > 0")
    return tuple(checks)


def _check_values(node: object, path: str) -> None:
    """Every float finite (a duration key's within ``0..MAX_SECONDS``) and no string with
    a NUL, in every schema, plugins' included: the rules no single key's check covers."""
    if dataclasses.is_dataclass(node) and not isinstance(node, type):
        for f in dataclasses.fields(node):
            _check_value(getattr(node, f.name), f"{path}{f.name}", f.name)
    elif isinstance(node, dict):
        for k, v in node.items():
            _check_value(v, f"{path}{k}", str(k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            _check_value(v, f"{path[:-1]}[{i}]", "")


def _check_value(value: object, key: str, name: str) -> None:
    if isinstance(value, float):
        if _SECONDS_NAME.search(name):
            parse_seconds(key, value)
        elif not math.isfinite(value):
            raise ConfigError(key, value, "expected a finite number")
    elif isinstance(value, str):
        if "\0" in value:
            shown = REDACTED if is_secret_name(name) else repr(value)
            raise ConfigError(key, shown, "contains a NUL character")
    elif isinstance(value, dict | list) or dataclasses.is_dataclass(value):
        _check_values(value, f"{key}.")


# -- secrets -------------------------------------------------------------------------------

#: What a secret value is replaced by in every file the run writes.
REDACTED = "***"
_SECRET_LAST_WORDS = frozenset(
    {"token", "password", "passwd", "passphrase", "secret", "secrets", "credentials"}
)
_SECRET_PARTS = ("secret", "api_key", "apikey", "access_key", "private_key")


def is_secret_name(name: str) -> bool:
    """Whether a config field or environment variable named ``name`` holds a secret:
    its last word is ``token``, ``password``, ``passwd``, ``passphrase``, ``secret`` or
    ``credentials`` (``rdzv.token``, ``rdzv.password``, ``HF_TOKEN``), or it contains
    ``secret``, ``api_key``, ``access_key`` or ``private_key`` (``AWS_SECRET_ACCESS_KEY``,
    ``WANDB_API_KEY``). A path to a secret (``rdzv.key``, a TLS key file; ``token_file``)
    is not one: the file keeps its own permissions."""
    low = re.sub(r"[^a-z0-9]+", "_", name.lower())  # api-key, api.key: api_key
    words = [w for w in low.split("_") if w]
    return bool(words) and (
        words[-1] in _SECRET_LAST_WORDS or any(part in low for part in _SECRET_PARTS)
    )


#: A value: quoted, a list or mapping, else up to a space, a separator or ": " (so that
#: ``rdzv.token=x: message`` keeps its message; ``host:port`` stays whole); a comma not
#: followed by another ``key=`` goes on (a sweep: ``rdzv.token=a,b``).
_VALUE = (
    r"""("[^"]*"|'[^']*'|\[[^\]]*\]|\{[^}]*\}|"""
    r"""(?:[^\s,;&'"\]}:]|:(?!\s|$)|,(?![+~]{0,2}[A-Za-z_][\w.@/-]*[=:]))+)"""
)
#: ``key=value`` (an override, an argument ``--api-token=x``) and ``key: value``.
_ASSIGNMENT = re.compile(r"(?<![\w.-])(-{0,2}[A-Za-z_][\w.-]*)(\s*[=:]\s*)" + _VALUE)
#: Credentials in a URL: ``scheme://user:password@host``.
_URL_PASSWORD = re.compile(r"(\b[a-zA-Z][\w+.-]*://[^\s:/@]*:)[^\s/@]+@")


def redact_text(text: str) -> str:
    """``text`` with the value of every ``key=value`` or ``key: value`` whose key's last
    part is a secret name (:func:`is_secret_name`) replaced by ``***``, and the password
    of every ``scheme://user:password@host``: for overrides, arguments, log lines."""
    if not isinstance(text, str) or ("=" not in text and ":" not in text):
        return text

    def hide(m: re.Match[str]) -> str:
        key, sep, value = m.groups()
        if is_secret_name(key.rpartition(".")[2]):
            return f"{key}{sep}{REDACTED}"
        if len(value) > 1 and value[0] in "[{'\"":  # job.args=["--api-token=x"]
            return f"{key}{sep}{value[0]}{redact_text(value[1:])}"
        return m.group(0)

    return _URL_PASSWORD.sub(rf"\1{REDACTED}@", _ASSIGNMENT.sub(hide, text))


#: Anything :func:`redact` or :func:`redact_text` may hide contains one of these: text
#: without any needs no parsing.
_SECRET_HINT = re.compile(
    r"token|passw|passphrase|secret|credentials|api[^a-z0-9]?key|(access|private)[^a-z0-9]key|"
    r"://[^\s/@]*:",
    re.IGNORECASE,
)


def may_hold_secrets(text: str) -> bool:
    """False when ``text`` surely holds nothing :func:`redact` would hide (a quick test
    before parsing a file)."""
    return _SECRET_HINT.search(text) is not None


def redact(data: Any) -> Any:
    """A copy of a YAML/JSON-like tree with every secret hidden: the value of a mapping
    key that names a secret (its last dotted part, :func:`is_secret_name`) unless unset
    (``None`` or empty), and the secrets in strings (:func:`redact_text`)."""
    if isinstance(data, dict):
        return {
            k: (
                REDACTED
                if is_secret_name(str(k).rpartition(".")[2]) and v not in (None, "")
                else redact(v)
            )
            for k, v in data.items()
        }
    if isinstance(data, list | tuple):
        return [redact(v) for v in data]
    if isinstance(data, str):
        return redact_text(data)
    return data


def describe_config_error(exc: ConfigError) -> str:
    """The one line of a :class:`ConfigError`, its value hidden when the key names a
    secret, a control character in it escaped (``rdzv.id=a\\nb``)."""
    if is_secret_name(str(exc.key).rpartition(".")[2]) and exc.value not in (None, ""):
        return one_line(redact_text(f"{exc.key}={REDACTED}: {exc.allowed}"))
    return one_line(redact_text(str(exc)))


def one_line(text: str) -> str:
    """``text`` with every non-printable character (a newline, a NUL, an escape
    sequence) written as its Python escape: one line, and nothing for a terminal to
    interpret."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` readable by its owner only (0600, also when it existed),
    through a temporary file renamed over it: whole or absent, never torn."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with open(fd, "w", encoding="utf-8") as f:
            os.fchmod(f.fileno(), 0o600)
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


class RedactingFilter(logging.Filter):
    """A logging filter that hides secrets in each record's message (:func:`redact_text`):
    on the handlers of Hydra's log and elastic-run's, which echo overrides."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a malformed record is logging's to report, not ours
            return True
        hidden = redact_text(message)
        if hidden != message:
            record.msg, record.args = hidden, None
        return True
