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

__all__ = [
    "LOCAL_RANK_PLACEHOLDERS",
    "RunContext",
    "RunResult",
    "Worker",
    "WorkerExit",
    "WorkerGroup",
    "WorkerSpec",
    "WorkerState",
]

#: Strings in ``WorkerSpec.args`` replaced by each worker's local rank. ``%local_rank%`` is
#: the documented spelling (it survives Hydra's override grammar and OmegaConf
#: interpolation unquoted); torchrun's ``${local_rank}`` is accepted when it arrives
#: literally (escaped as ``\\${local_rank}`` in Hydra).
LOCAL_RANK_PLACEHOLDERS = ("%local_rank%", "${local_rank}")


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


@dataclass(frozen=True)
class WorkerSpec:
    """What to run on this node: the same program ``local_world_size`` times.

    ``command`` is the full argv template (interpreter included); placeholders from
    ``LOCAL_RANK_PLACEHOLDERS`` are substituted per worker by ``argv_for``.
    """

    role: str
    local_world_size: int
    command: tuple[str, ...]
    env: Mapping[str, str] = field(default_factory=dict)
    max_restarts: int = 0
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
    ``timestamp`` is wall-clock seconds when the agent saw the exit."""

    local_rank: int
    global_rank: int
    pid: int
    returncode: int
    timestamp: float
    stopped_by_agent: bool = False

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
    """How the run ended. ``failures`` maps global rank to the exits that failed on their
    own in the final attempt (not those the agent stopped); ``exits`` holds every exit of
    the final attempt; ``signal`` is set when the agent itself was stopped by a signal."""

    state: WorkerState
    attempts: int
    restart_count: int
    exits: list[WorkerExit] = field(default_factory=list)
    signal: int | None = None

    @property
    def failures(self) -> dict[int, WorkerExit]:
        return {e.global_rank: e for e in self.exits if not e.succeeded and not e.stopped_by_agent}

    @property
    def is_failed(self) -> bool:
        return self.state == WorkerState.FAILED

    @property
    def exit_code(self) -> int:
        """The agent's exit code: 0, 1 for a failed job, 128+N when stopped by signal N."""
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
