"""The vocabulary of a run: what to start (``WorkerSpec``), what runs (``Worker``,
``WorkerGroup``), how it is doing (``WorkerState``) and how it ended (``RunResult``).

The names and states follow torch.distributed.elastic so that people who know torchrun
read these the same way.
"""

from __future__ import annotations

import enum
import signal
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "EXIT_NO_PROGRESS",
    "EXIT_PREEMPTED",
    "LOCAL_RANK_PLACEHOLDERS",
    "Failure",
    "FailureKind",
    "RestartPolicy",
    "RunContext",
    "RunResult",
    "Worker",
    "WorkerActivity",
    "WorkerExit",
    "WorkerGroup",
    "WorkerSpec",
    "WorkerState",
    "WorkerStatus",
]

#: Strings in ``WorkerSpec.args`` replaced by each worker's local rank. ``%local_rank%`` is
#: the documented spelling (it survives Hydra's override grammar and OmegaConf
#: interpolation unquoted); torchrun's ``${local_rank}`` is accepted when it arrives
#: literally (escaped as ``\\${local_rank}`` in Hydra).
LOCAL_RANK_PLACEHOLDERS = ("%local_rank%", "${local_rank}")

#: The agent's exit code when a signal of ``signals.preempt`` stopped it: sysexits.h's
#: EX_TEMPFAIL ("temporary failure; the user is invited to retry"). Not 1 or 2 (failed,
#: bad configuration), not 128+N (a signal), not NVRx's 93 ("do not requeue"), and
#: rarely a program's own code.
EXIT_PREEMPTED = 75

#: The agent's exit code when restarts made no progress (:mod:`elastic_runner.crash_loop`):
#: "no progress: do not requeue", the code NVIDIA's ft_launcher uses for that verdict.
EXIT_NO_PROGRESS = 93


class WorkerState(str, enum.Enum):
    """State of a worker group; the group changes state as a unit (as in torch)."""

    UNKNOWN = "UNKNOWN"
    INIT = "INIT"
    HEALTHY = "HEALTHY"
    UNHEALTHY = "UNHEALTHY"
    STOPPED = "STOPPED"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"

    @property
    def is_running(self) -> bool:
        return self in (WorkerState.HEALTHY, WorkerState.UNHEALTHY)


class WorkerStatus(str, enum.Enum):
    """What happened to one worker process: it started, then ended in one of the other
    three states. The ``state`` of a worker's events and of its row in status displays."""

    START = "START"
    #: Exited 0.
    SUCCEEDED = "SUCCEEDED"
    #: Failed on its own: a non-zero exit, a signal nobody in elastic-run sent, a limit,
    #: a hang; or it recorded its own error before the agent stopped it.
    FAILED = "FAILED"
    #: Stopped by the agent (another rank failed, the membership changed, a stop signal).
    TERMINATED = "TERMINATED"


@dataclass(frozen=True)
class WorkerSpec:
    """What to run on this node: the same program ``local_world_size`` times.

    The names are torch's ``WorkerSpec``'s where the meaning is the same (``role``,
    ``local_world_size``, ``max_restarts``); torch's ``entrypoint`` and ``args`` are one
    ``command`` here (a function entrypoint of :func:`elastic_runner.launch` is the
    command that calls it); the rendezvous and the master address are the run's
    configuration (``rdzv.*``), not the spec's.
    """

    #: The workers' role (``ROLE_NAME``); ranks within a role are ``ROLE_RANK``.
    role: str
    #: Workers on this node (``LOCAL_WORLD_SIZE``).
    local_world_size: int
    #: The full argv template, interpreter included; placeholders from
    #: ``LOCAL_RANK_PLACEHOLDERS`` are substituted per worker by :meth:`argv_for`.
    command: tuple[str, ...]
    #: Variables added to the workers' environment (the contract's own always win).
    env: Mapping[str, str] = field(default_factory=dict)
    #: Restarts the group may spend on failures (``TORCHELASTIC_MAX_RESTARTS``).
    max_restarts: int = 0
    #: Seconds between the stop signal and SIGKILL.
    stop_timeout: float = 30.0

    def argv_for(self, local_rank: int) -> list[str]:
        argv = []
        for arg in self.command:
            for placeholder in LOCAL_RANK_PLACEHOLDERS:
                arg = arg.replace(placeholder, str(local_rank))
            argv.append(arg)
        return argv


@dataclass
class Worker:
    """One worker process slot. Ranks are -1 until rendezvous assigns them and may change
    from one round to the next; ``pid`` is set while a process runs in the slot."""

    local_rank: int
    global_rank: int = -1
    role_rank: int = -1
    world_size: int = -1
    role_world_size: int = -1
    pid: int | None = None


@dataclass(frozen=True)
class WorkerExit:
    """How one worker process ended. ``returncode`` is negative for a signal (Popen style);
    ``timestamp`` is wall-clock seconds when the agent saw the exit; ``max_rss`` is the
    worker process's own peak RSS in bytes, the kernel's high-water mark (0 if unknown; a
    child it waited for counts when that child's peak was larger)."""

    local_rank: int
    global_rank: int
    pid: int
    returncode: int
    timestamp: float
    stopped_by_agent: bool = False
    max_rss: int = 0

    @property
    def succeeded(self) -> bool:
        return self.returncode == 0

    @property
    def signal_name(self) -> str | None:
        if self.returncode >= 0:
            return None
        try:
            return signal.Signals(-self.returncode).name
        except ValueError:
            return f"signal {-self.returncode}"

    def describe(self) -> str:
        """``exit code 3`` or ``killed by SIGKILL``."""
        name = self.signal_name
        return f"killed by {name}" if name else f"exit code {self.returncode}"


@dataclass(frozen=True)
class WorkerActivity:
    """Signs of life of a running worker, in the supervisor's clock (monotonic seconds):
    its last byte on stdout or stderr (its start, before any), and its last heartbeat
    (``None`` until it calls :func:`elastic_runner.heartbeat`)."""

    last_output: float
    last_heartbeat: float | None = None


class FailureKind(str, enum.Enum):
    """Why a worker failed, as the report names it."""

    EXIT_CODE = "exit code"
    SIGNAL = "signal"
    OOM_KILL = "probable OOM kill"
    MEMORY_LIMIT = "over its memory limit"
    TIMER = "timer expired"
    WATCHDOG = "watchdog"
    INJECTED = "injected fault"


@dataclass(frozen=True)
class Failure:
    """A worker that failed on its own, diagnosed. ``timestamp`` is the most precise time
    known for the failure (the error file's, else when the agent saw the exit); the root
    cause of a failed attempt is the failure with the smallest one."""

    exit: WorkerExit
    kind: FailureKind
    timestamp: float
    #: ``ValueError: bad batch``: from the error file, else the exception line of the
    #: traceback in its stderr.
    message: str | None = None
    #: The Python traceback: from the error file, else the last one in the worker's stderr.
    traceback: str | None = None
    #: Where the traceback came from: ``error file`` or ``stderr``.
    traceback_source: str | None = None
    #: One more clause for the report (``RSS 2.1 GiB > limit 2 GiB``, an OOM hint ...).
    detail: str = ""
    #: The worker's error file, when it wrote one (``@record``, a failed callable).
    error_file: Path | None = None

    # torch's ProcessFailure names, for people who know them

    @property
    def rank(self) -> int:
        """The failed worker's global rank."""
        return self.exit.global_rank

    @property
    def local_rank(self) -> int:
        return self.exit.local_rank

    @property
    def pid(self) -> int:
        return self.exit.pid

    @property
    def exitcode(self) -> int:
        """Its exit code, negative for a signal (``-9``: SIGKILL), as in torch."""
        return self.exit.returncode

    def signal_name(self) -> str:
        """``SIGKILL`` when a signal ended it, else ``<N/A>`` (torch's spelling)."""
        return self.exit.signal_name or "<N/A>"

    def describe(self) -> str:
        text = self.exit.describe()
        if self.kind in (
            FailureKind.OOM_KILL,
            FailureKind.MEMORY_LIMIT,
            FailureKind.TIMER,
            FailureKind.WATCHDOG,
            FailureKind.INJECTED,
        ):
            text += f" ({self.kind.value})"
        return f"{text}; {self.detail}" if self.detail else text

    def summary(self) -> str:
        """The failure in one line: ``rank 1: exit code 3: ValueError: bad batch`` (the
        root cause as ``result.json``, a nested error file and the health endpoint give
        it)."""
        text = f"rank {self.exit.global_rank}: {self.describe()}"
        return f"{text}: {self.message}" if self.message else text


@dataclass(frozen=True)
class RestartPolicy:
    """When a failed group is restarted (``max_restarts`` lives in :class:`WorkerSpec`)."""

    backoff_initial: float = 0.0
    backoff_factor: float = 2.0
    backoff_max: float = 60.0
    #: A failure sooner than this after the workers started is a startup failure.
    min_uptime: float = 0.0
    on_startup_failure: bool = True

    def delay(self, restart: int) -> float:
        """Seconds to wait before restart number ``restart`` (1, 2, ...)."""
        if self.backoff_initial <= 0:
            return 0.0
        try:
            grown = self.backoff_initial * self.backoff_factor ** (restart - 1)
        except OverflowError:  # factor**k past a float (restart 1026 at factor 2)
            return self.backoff_max
        return min(self.backoff_max, grown)

    def why_not_restart(self, uptime: float, restart_count: int, max_restarts: int) -> str | None:
        """Why a group that failed ``uptime`` seconds after it started, having spent
        ``restart_count`` of ``max_restarts``, must not be restarted; ``None`` to restart."""
        if uptime < self.min_uptime and not self.on_startup_failure:
            return (
                f"startup failure after {uptime:.1f} s (< restart.min_uptime="
                f"{self.min_uptime:g} s) and restart.on_startup_failure=false"
            )
        if restart_count >= max_restarts:
            return f"restarts used up (max_restarts={max_restarts})"
        return None


@dataclass
class WorkerGroup:
    """The workers of one spec on this node, with the round's group-level facts."""

    spec: WorkerSpec
    workers: list[Worker]
    state: WorkerState = WorkerState.INIT
    group_rank: int = -1
    group_world_size: int = -1
    master_addr: str | None = None
    master_port: int | None = None
    #: Restarts spent on failures (TORCHELASTIC_RESTART_COUNT); membership changes are free.
    restart_count: int = 0
    #: Every start of the group, for whatever reason; names the per-attempt log directory.
    attempt: int = 0

    @classmethod
    def for_spec(cls, spec: WorkerSpec) -> WorkerGroup:
        return cls(spec=spec, workers=[Worker(local_rank=i) for i in range(spec.local_world_size)])


@dataclass
class RunResult:
    """How the run ended on this node (what :func:`elastic_runner.launch` returns).

    ``exits`` holds every exit of the final attempt; ``failures`` the workers of that
    attempt that failed on their own (not those the agent stopped), root cause first (a
    list, where torch has a dict by rank: :class:`~elastic_runner.ChildFailedError` has
    that); ``return_values`` maps each global rank of this node to what its function
    returned (``None`` for a script), filled only when the run succeeded, as in torch;
    ``signal`` is set when the agent itself was stopped by a signal; ``peak_rss`` maps
    global rank to the largest RSS sampled for its process tree, or to its process's own
    high-water mark when that is larger (a short spike, a short-lived worker)."""

    state: WorkerState
    attempts: int
    restart_count: int
    exits: list[WorkerExit] = field(default_factory=list)
    failures: list[Failure] = field(default_factory=list)
    signal: int | None = None
    peak_rss: dict[int, int] = field(default_factory=dict)
    #: Why the run ended when it did not succeed (restarts used up, a signal ...).
    ended_because: str = ""
    #: Wall-clock time the last attempt's workers started (0: none started).
    started_at: float = 0.0
    #: The job's id (``TORCHELASTIC_RUN_ID``) and this node's run directory.
    run_id: str = ""
    run_dir: Path | None = None
    #: The stop signal reached the workers from outside too (a scheduler signalled every
    #: process), and it is one of ``signals.preempt``.
    from_outside: bool = False
    preempted: bool = False
    #: Restarts made no progress (the crash-loop verdict, here or on another node).
    no_progress: bool = False
    #: The faults ``fault=...`` injected on this node, one line each.
    injected: list[str] = field(default_factory=list)
    #: Each time this node was excluded (``exclusion.*``): which node and why.
    excluded: list[str] = field(default_factory=list)
    #: Global rank -> what the worker's function returned (``None`` for a script).
    return_values: dict[int, Any] = field(default_factory=dict)

    @property
    def root_cause(self) -> Failure | None:
        return self.failures[0] if self.failures else None

    def is_failed(self) -> bool:
        """The job did not succeed: restarts used up, a failure that is not restarted, a
        failed rendezvous, or a stop signal (``signal`` says which)."""
        return self.state == WorkerState.FAILED

    @property
    def restarts(self) -> int:
        """Restarts spent on failures (``restart_count``)."""
        return self.restart_count

    @property
    def exit_code(self) -> int:
        """The agent's exit code: 0, 1 for a failed job, :data:`EXIT_NO_PROGRESS` when
        restarts made no progress, :data:`EXIT_PREEMPTED` when preempted, 128+N when
        stopped by signal N."""
        if self.preempted:
            return EXIT_PREEMPTED
        if self.no_progress and self.state == WorkerState.FAILED and self.signal is None:
            return EXIT_NO_PROGRESS
        if self.signal is not None:
            return 128 + self.signal
        return 0 if self.state == WorkerState.SUCCEEDED else 1


@dataclass(frozen=True)
class RunContext:
    """Facts about the run that plugins' factories receive along with their config."""

    run_id: str
    run_dir: Path
    #: This node's name in reports and log prefixes (the hostname).
    node: str
    min_nodes: int = 1
    max_nodes: int = 1
