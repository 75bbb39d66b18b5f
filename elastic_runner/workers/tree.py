"""Finding and killing every process a run started, whatever it did to escape.

Every worker's environment carries ``ELASTIC_RUNNER_AGENT=<marker>``, unique per agent, so
its descendants carry it too: children, shell grandchildren, ``setsid`` daemons and
double-forked processes alike. The agent is a child subreaper (PR_SET_CHILD_SUBREAPER), so
orphans re-parent to it instead of to init and stay among its descendants. When the agent
itself is killed, the guardian (:mod:`elastic_runner.workers.guardian`) sweeps by marker.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator

import psutil

__all__ = [
    "MARKER_ENV",
    "kill_processes",
    "marked_descendants",
    "marked_processes",
    "reap_children",
    "subreaper",
]

MARKER_ENV = "ELASTIC_RUNNER_AGENT"
_PR_SET_CHILD_SUBREAPER = 36
_PR_GET_CHILD_SUBREAPER = 37


class _Subreaper:
    """The process's child-subreaper flag, shared by the runs of one process (several
    ``launch`` calls in threads): set by the first, restored by the last."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._users = 0
        self._restore = False

    @contextlib.contextmanager
    def __call__(self) -> Iterator[bool]:
        with self._lock:
            if self._users == 0:
                self._restore = _set_subreaper()
            self._users += 1
            became = self._restore or _is_subreaper()
        try:
            yield became
        finally:
            with self._lock:
                self._users -= 1
                if self._users == 0 and self._restore:
                    _prctl(_PR_SET_CHILD_SUBREAPER, 0)
                    self._restore = False


def _prctl(option: int, value: object) -> int:
    try:
        return int(ctypes.CDLL(None, use_errno=True).prctl(option, value, 0, 0, 0))
    except (OSError, AttributeError):
        return -1


def _is_subreaper() -> bool:
    flag = ctypes.c_int(0)
    return _prctl(_PR_GET_CHILD_SUBREAPER, ctypes.byref(flag)) == 0 and bool(flag.value)


def _set_subreaper() -> bool:
    """Set the flag; True when this call turned it on (it was off and is now on)."""
    return not _is_subreaper() and _prctl(_PR_SET_CHILD_SUBREAPER, 1) == 0


#: Make orphaned descendants re-parent to this process while the block runs (yields
#: False where unsupported), then restore what the process was: under
#: :func:`elastic_runner.launch` it is the caller's process, which keeps no trace. A
#: process-wide flag, so one process-wide counter (the only module state here).
subreaper = _Subreaper()


def _has_marker(proc: psutil.Process, marker: str) -> bool:
    try:
        return proc.environ().get(MARKER_ENV) == marker
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return False


def marked_descendants(marker: str) -> list[psutil.Process]:
    """This process's live descendants that carry ``marker`` (cheap: no global scan)."""
    return [
        p
        for p in psutil.Process().children(recursive=True)
        if _is_alive(p) and _has_marker(p, marker)
    ]


def marked_processes(marker: str) -> list[psutil.Process]:
    """Every live process on the machine that carries ``marker`` (the guardian's scan)."""
    me = os.getpid()
    return [
        p for p in psutil.process_iter() if p.pid != me and _is_alive(p) and _has_marker(p, marker)
    ]


def _is_alive(proc: psutil.Process) -> bool:
    try:
        return proc.status() != psutil.STATUS_ZOMBIE
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


def kill_processes(
    find: Callable[[], list[psutil.Process]],
    timeout: float = 5.0,
    on_kill: Callable[[Iterable[psutil.Process]], None] | None = None,
) -> list[int]:
    """SIGKILL what ``find`` returns until it returns nothing (a process may fork while
    we kill); returns pids still alive after ``timeout`` (stuck in the kernel)."""
    deadline = time.monotonic() + timeout
    left = find()
    while left:
        if on_kill:
            on_kill(left)
        for proc in left:
            with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
                proc.send_signal(signal.SIGKILL)
        killed = [p.pid for p in left]
        reap_children(killed)
        if time.monotonic() >= deadline:
            return killed
        psutil.wait_procs(left, timeout=min(0.2, max(0.0, deadline - time.monotonic())))
        reap_children(killed)
        left = find()
    return []


def reap_children(
    pids: Iterable[int] = (), groups: Iterable[int] = (), keep: Iterable[int] = ()
) -> None:
    """Reap exited children of this process that are ours: one of ``pids`` (processes
    killed by marker), or an orphan this subreaper inherited, found by its process group,
    one of ``groups`` (the workers' groups: it died before any sweep saw it). Never
    another child: under :func:`elastic_runner.launch` this is the caller's process, and
    its own children's exit statuses are its own. ``keep``: workers, whose exit status the
    supervisor reads itself."""
    pids, groups, keep = set(pids), set(groups), set(keep)
    for child in psutil.Process().children():
        if child.pid in keep:
            continue
        try:
            ours = child.pid in pids or (
                bool(groups)
                and child.status() == psutil.STATUS_ZOMBIE
                and os.getpgid(child.pid) in groups
            )
        except (psutil.NoSuchProcess, psutil.AccessDenied, OSError):
            continue
        if ours:
            with contextlib.suppress(ChildProcessError, OSError):
                os.waitpid(child.pid, os.WNOHANG)
