"""What :func:`elastic_runner.launch` must leave as it found in the calling process:
signal handlers, threads, file descriptors, children, logging handlers, the subreaper
flag, the environment, ``sys.path`` and the working directory. ::

    from elastic_runner.testing.caller import CallerState

    before = CallerState.now()
    elastic_runner.launch(fn, overrides=["job.nproc_per_node=2"], run_dir=tmp_path)
    CallerState.now().assert_same_as(before)
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass

import psutil

__all__ = ["CallerState"]

_PR_GET_CHILD_SUBREAPER = 37


@dataclass(frozen=True)
class CallerState:
    """A snapshot of the process-wide state a launch could change."""

    handlers: dict[int, object]
    threads: frozenset[int]
    fds: dict[int, str]
    children: frozenset[int]
    log_handlers: tuple[int, ...]
    log_level: int
    subreaper: int
    environ: dict[str, str]
    sys_path: tuple[str, ...]
    cwd: str

    @classmethod
    def now(cls) -> CallerState:
        handlers: dict[int, object] = {}
        for sig in signal.valid_signals():
            try:
                handlers[int(sig)] = signal.getsignal(sig)
            except (OSError, ValueError):
                continue
        logger = logging.getLogger("elastic_runner")
        return cls(
            handlers=handlers,
            threads=frozenset(t.ident or 0 for t in threading.enumerate()),
            fds=_fds(),
            children=frozenset(p.pid for p in psutil.Process().children(recursive=True)),
            log_handlers=tuple(id(h) for h in logger.handlers),
            log_level=logger.level,
            subreaper=_subreaper(),
            environ=dict(os.environ),
            sys_path=tuple(sys.path),
            cwd=os.getcwd(),
        )

    def assert_same_as(self, before: CallerState, *, within: float = 5.0) -> None:
        """Fail, naming what differs, unless the process is back to ``before``: threads
        and children get ``within`` seconds to end (a launch joins or reaps them before
        it returns, so this is a bound, not a grace period)."""
        deadline = time.monotonic() + within
        now = self
        while now.differences(before) and time.monotonic() < deadline:
            time.sleep(0.05)
            now = CallerState.now()
        problems = now.differences(before)
        assert not problems, "launch left its mark on the caller: " + "; ".join(problems)

    def differences(self, before: CallerState) -> list[str]:
        problems = []
        changed = {
            signal.Signals(s).name: (before.handlers.get(s), h)
            for s, h in self.handlers.items()
            if before.handlers.get(s) is not h and before.handlers.get(s) != h
        }
        if changed:
            problems.append(f"signal handlers changed: {changed}")
        if extra := self.threads - before.threads:
            names = [t.name for t in threading.enumerate() if t.ident in extra]
            problems.append(f"threads left: {names}")
        if opened := {fd: path for fd, path in self.fds.items() if before.fds.get(fd) != path}:
            problems.append(f"file descriptors left open: {opened}")
        if kids := self.children - before.children:
            problems.append(f"child processes left: {_describe(kids)}")
        if self.log_handlers != before.log_handlers or self.log_level != before.log_level:
            problems.append("the elastic_runner logger's handlers or level changed")
        if self.subreaper != before.subreaper:
            problems.append(f"child subreaper flag {before.subreaper} -> {self.subreaper}")
        if self.environ != before.environ:
            keys = set(self.environ) ^ set(before.environ) | {
                k for k in self.environ if before.environ.get(k) != self.environ[k]
            }
            problems.append(f"environment changed: {sorted(keys)}")
        if self.sys_path != before.sys_path:
            problems.append("sys.path changed")
        if self.cwd != before.cwd:
            problems.append(f"working directory {before.cwd} -> {self.cwd}")
        return problems


def _fds() -> dict[int, str]:
    fds = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            fds[int(name)] = os.readlink(f"/proc/self/fd/{name}")
        except OSError:  # the listing's own descriptor, closed by now
            continue
    return fds


def _subreaper() -> int:
    try:
        value = ctypes.c_int(0)
        ctypes.CDLL(None).prctl(_PR_GET_CHILD_SUBREAPER, ctypes.byref(value), 0, 0, 0)
        return value.value
    except (OSError, AttributeError):
        return -1


def _describe(pids: frozenset[int]) -> list[str]:
    out = []
    for pid in sorted(pids):
        try:
            out.append(f"{pid} {' '.join(psutil.Process(pid).cmdline())[:80]}")
        except psutil.Error:
            out.append(str(pid))
    return out
