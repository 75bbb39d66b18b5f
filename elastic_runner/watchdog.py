"""Hang detection with no change to the worker's code: a rank that wrote nothing on stdout
or stderr for ``watchdog.no_output_timeout`` seconds, or that called
:func:`elastic_runner.heartbeat` once and then stopped for ``watchdog.heartbeat_timeout``
seconds, is hung. The agent asks :meth:`HangDetector.next_deadline` how long it may
sleep and :meth:`HangDetector.orders` what to kill; it never polls in between. Expired
worker timers (:mod:`elastic_runner.timer`) come through the same door."""

from __future__ import annotations

import logging
import signal
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import psutil

from elastic_runner.events import names
from elastic_runner.progress import HEARTBEAT_INTERVAL_ENV
from elastic_runner.spec import FailureKind, WorkerActivity
from elastic_runner.timer.api import TimerExpiry
from elastic_runner.workers.logs import WorkerLogPaths
from elastic_runner.workers.stacks import StackDump, StackDumper

__all__ = ["HangDetector", "KillOrder", "Watchdog"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Watchdog:
    """Both timeouts in seconds; 0 turns a check off."""

    no_output_timeout: float = 0.0
    heartbeat_timeout: float = 0.0

    @property
    def enabled(self) -> bool:
        return self.no_output_timeout > 0 or self.heartbeat_timeout > 0

    @property
    def heartbeat_interval(self) -> float:
        """How often a worker's :func:`heartbeat` actually writes (a quarter of the
        timeout, at most once a second)."""
        return min(1.0, self.heartbeat_timeout / 4)

    def _deadlines(self, activity: WorkerActivity) -> list[tuple[float, str]]:
        out = []
        if self.no_output_timeout > 0:
            out.append(
                (
                    activity.last_output + self.no_output_timeout,
                    f"no output for {self.no_output_timeout:g} s (watchdog.no_output_timeout)",
                )
            )
        if self.heartbeat_timeout > 0 and activity.last_heartbeat is not None:
            out.append(
                (
                    activity.last_heartbeat + self.heartbeat_timeout,
                    f"no heartbeat for {self.heartbeat_timeout:g} s (watchdog.heartbeat_timeout)",
                )
            )
        return out

    def next_deadline(self, activity: Mapping[int, WorkerActivity]) -> float | None:
        """The earliest time (the activity's clock) at which some rank becomes hung."""
        times = [t for a in activity.values() for t, _ in self._deadlines(a)]
        return min(times, default=None)

    def overdue(self, activity: Mapping[int, WorkerActivity], now: float) -> dict[int, str]:
        """{local rank: why it is hung} for every rank past a deadline at ``now``."""
        hung = {}
        for local_rank, a in activity.items():
            reasons = [why for t, why in self._deadlines(a) if t <= now]
            if reasons:
                hung[local_rank] = "; ".join(reasons)
        return hung


@dataclass(frozen=True)
class KillOrder:
    """What the agent must do about a hung or expired worker: kill its tree with
    ``signal`` (0: only report) and report ``detail`` as a failure of ``kind``."""

    local_rank: int
    signal: int
    kind: FailureKind
    detail: str
    event: str
    metadata: dict[str, Any]


class HangDetector:
    """Turns the watchdog's deadlines and the timer server's expiries into kill orders,
    with the stacks of the workers concerned dumped first. The agent owns the loop; this
    only decides (and dumps)."""

    def __init__(self, watchdog: Watchdog, stacks: StackDumper | None) -> None:
        self.watchdog = watchdog
        self.stacks = stacks
        self._expiries: deque[TimerExpiry] = deque()
        self._fired = False

    @property
    def wants_heartbeat(self) -> bool:
        return self.watchdog.heartbeat_timeout > 0

    def expired(self, expiry: TimerExpiry) -> None:
        """From the timer server's thread; the agent is woken separately."""
        self._expiries.append(expiry)

    def new_attempt(self) -> None:
        self._fired = False

    def worker_env(self, logs: WorkerLogPaths, env: Mapping[str, str]) -> dict[str, str]:
        out: dict[str, str] = {}
        if self.wants_heartbeat:
            out[HEARTBEAT_INTERVAL_ENV] = f"{self.watchdog.heartbeat_interval:g}"
        if self.stacks is not None:
            out.update(self.stacks.worker_env(logs.dir / "faulthandler", dict(env)))
        return out

    def next_deadline(self, activity: Mapping[int, WorkerActivity]) -> float | None:
        return None if self._fired else self.watchdog.next_deadline(activity)

    def orders(
        self,
        activity: Mapping[int, WorkerActivity],
        now: float,
        pids: Mapping[int, int],
        logs: Callable[[int], WorkerLogPaths],
    ) -> list[KillOrder]:
        """Kill orders for expired timers and (once per attempt) hung ranks. ``pids`` maps
        each running worker's local rank to its pid; ``logs`` gives its log paths."""
        orders = []
        while self._expiries:
            expiry = self._expiries.popleft()
            local_rank = _worker_of(expiry.pid, pids)
            if local_rank is None:
                log.warning("timer of pid %d expired but it is no worker of ours", expiry.pid)
                continue
            dump = self._dump(pids[local_rank], logs(local_rank))
            detail = f"timer for scope {expiry.scope} expired after {expiry.after:g} s"
            orders.append(
                KillOrder(
                    local_rank,
                    max(expiry.signal, 0),
                    FailureKind.TIMER,
                    detail + _where(dump),
                    names.TIMER_EXPIRED,
                    {
                        "scope": expiry.scope,
                        "after": expiry.after,
                        "pid": expiry.pid,
                        "stacks": str(dump.path) if dump else None,
                    },
                )
            )
        hung = {} if self._fired else self.watchdog.overdue(activity, now)
        if hung:
            self._fired = True
            # every rank's stacks: a hang is often one rank waiting for another
            dumps = self._dump_all({r: (pid, logs(r)) for r, pid in pids.items()})
            for local_rank, why in sorted(hung.items()):
                dump = dumps.get(local_rank)
                orders.append(
                    KillOrder(
                        local_rank,
                        signal.SIGKILL,
                        FailureKind.WATCHDOG,
                        f"hung: {why}" + _where(dump),
                        names.WATCHDOG_FIRED,
                        {
                            "reason": why,
                            "function": dump.function() if dump else None,
                            "stacks": str(dump.path) if dump else None,
                        },
                    )
                )
        return orders

    def _dump_all(
        self, targets: Mapping[int, tuple[int, WorkerLogPaths]]
    ) -> dict[int, StackDump | None]:
        if self.stacks is None:
            return {}
        try:
            return self.stacks.dump_all(
                {
                    rank: (pid, logs.dir / "faulthandler", logs.dir / "stacks.txt")
                    for rank, (pid, logs) in targets.items()
                }
            )
        except OSError as exc:
            log.warning("could not dump the workers' stacks: %s", exc)
            return {}

    def _dump(self, pid: int, logs: WorkerLogPaths) -> StackDump | None:
        if self.stacks is None:
            return None
        try:
            return self.stacks.dump(pid, logs.dir / "faulthandler", logs.dir / "stacks.txt")
        except OSError as exc:
            log.warning("could not dump the stacks of pid %d: %s", pid, exc)
            return None


def _where(dump: StackDump | None) -> str:
    if dump is None:
        return "; no stack dump (watchdog.stacks=none, or not a Python process)"
    function = dump.function()
    return (f"; stuck in {function}" if function else "") + f"; stacks: {dump.path}"


def _worker_of(pid: int, workers: Mapping[int, int]) -> int | None:
    """The local rank whose worker is ``pid`` or one of its ancestors."""
    by_pid = {p: r for r, p in workers.items()}
    try:
        proc: psutil.Process | None = psutil.Process(pid)
        while proc is not None:
            if proc.pid in by_pid:
                return by_pid[proc.pid]
            proc = proc.parent()
    except psutil.NoSuchProcess:
        pass
    return by_pid.get(pid)
