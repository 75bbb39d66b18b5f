"""Per-worker CPU and RSS of each worker's whole process tree, sampled with psutil.

A tree is found through the kernel's per-thread ``children`` lists, so a sample reads only
the workers' own processes; where those lists are missing it falls back to one scan of
the process table. ``psutil.Process`` objects are kept between samples.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import psutil

__all__ = ["ResourceMonitor", "Usage", "format_bytes"]


@dataclass(frozen=True)
class Usage:
    """One worker's tree at one sample: CPU in percent of one core since the previous
    sample (0 on the first), resident memory in bytes, and how many processes."""

    cpu_percent: float
    rss: int
    processes: int


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


class ResourceMonitor:
    """Samples worker trees every ``interval`` seconds (the agent asks when it is due)."""

    def __init__(self, interval: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval = interval
        self._clock = clock
        self._next = clock() + interval
        self._cpu: dict[int, tuple[float, float]] = {}  # pid -> (cpu seconds, when)
        self._procs: dict[int, psutil.Process] = {}

    def seconds_until_due(self) -> float:
        return max(0.0, self._next - self._clock())

    def due(self) -> bool:
        return self._clock() >= self._next

    def sample(self, roots: Mapping[int, int]) -> dict[int, Usage]:
        """Usage of each root's tree: {key: Usage} for ``roots`` = {key: root pid}."""
        self._next = self._clock() + self.interval
        children = _children_lists()
        now = self._clock()
        seen: dict[int, tuple[float, float]] = {}
        procs: dict[int, psutil.Process] = {}
        out = {}
        for key, root in roots.items():
            rss = 0
            cpu = 0.0
            members = self._tree(root, children)
            for pid in members:
                with contextlib.suppress(psutil.Error):
                    p = self._procs.get(pid) or psutil.Process(pid)
                    procs[pid] = p
                    with p.oneshot():
                        total = sum(p.cpu_times()[:2])
                        rss += p.memory_info().rss
                    prev_total, prev_when = self._cpu.get(pid, (total, now))
                    if now > prev_when:
                        cpu += max(0.0, total - prev_total) / (now - prev_when) * 100
                    seen[pid] = (total, now)
            out[key] = Usage(cpu, rss, len(members))
        self._cpu, self._procs = seen, procs
        return out

    @staticmethod
    def _tree(root: int, children: Callable[[int], list[int]]) -> list[int]:
        members, todo = [], [root]
        while todo:
            pid = todo.pop()
            members.append(pid)
            todo.extend(children(pid))
        return members


def _children_lists() -> Callable[[int], list[int]]:
    """``children(pid)``: from /proc/<pid>/task/*/children when the kernel has them, else
    from one scan of the whole process table."""
    if os.path.exists(f"/proc/self/task/{os.getpid()}/children"):
        return _kernel_children
    table: dict[int, list[int]] = {}
    for proc in psutil.process_iter(["ppid"]):
        table.setdefault(proc.info["ppid"], []).append(proc.pid)
    return lambda pid: table.get(pid, [])


def _kernel_children(pid: int) -> list[int]:
    found: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return found
    for tid in tasks:
        with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{tid}/children") as f:
            found.extend(int(c) for c in f.read().split())
    return found
