"""Worker timer servers (watchdog timers that workers arm and the agent enforces).
Built-in: ``none``. The interface is what a timer server implements."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from elastic_runner.config import TimerConfig
from elastic_runner.hookspecs import hookimpl
from elastic_runner.registry import ComponentSpec

__all__ = ["NoTimerConfig", "NoTimerServer", "TimerServer"]


class TimerServer(Protocol):
    """Started before the workers; ``worker_env`` is added to every worker's
    environment (for example TORCHELASTIC_TIMER_FILE)."""

    def start(self) -> None: ...

    def worker_env(self) -> Mapping[str, str]: ...

    def stop(self) -> None: ...


@dataclass
class NoTimerConfig(TimerConfig):
    server: str = "none"


class NoTimerServer:
    """No timers: nothing is started and workers get no timer variables."""

    def start(self) -> None:
        """Nothing to start."""

    def worker_env(self) -> Mapping[str, str]:
        return {}

    def stop(self) -> None:
        """Nothing to stop."""


@hookimpl
def elastic_runner_timer_servers() -> Sequence[ComponentSpec]:
    return [ComponentSpec("none", lambda c, ctx: NoTimerServer(), NoTimerConfig, "no timers")]
