"""The timer server interface, agent side: what the agent needs from a server that workers
arm timers with (the worker side is :mod:`elastic_runner.timer`; the built-in servers are
in :mod:`elastic_runner.timer.server`)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

__all__ = ["ExpiryListener", "TimerExpiry", "TimerServer"]


@dataclass(frozen=True)
class TimerExpiry:
    """A worker's timer ran out: ``pid`` (the process that armed it), ``scope``, the
    seconds it was armed for, and the signal the client asked for (<= 0: do not kill)."""

    pid: int
    scope: str
    after: float
    signal: int


ExpiryListener = Callable[[TimerExpiry], None]


class TimerServer(Protocol):
    """Started before the workers; ``worker_env`` is added to every worker's environment
    (for example TORCHELASTIC_TIMER_FILE); expiries go to the listener the agent sets with
    ``on_expired`` (called from the server's own thread)."""

    def start(self) -> None: ...

    def worker_env(self) -> Mapping[str, str]: ...

    def on_expired(self, listener: ExpiryListener) -> None: ...

    def stop(self) -> None: ...
