"""Dumping a worker's Python stacks from the agent, with no change to the worker's code.

Two ways, chosen by ``watchdog.stacks``:

- ``py-spy`` (``auto`` picks it when installed): ``py-spy dump`` reads every Python process
  of the worker's tree from outside; needs ptrace permission.
- ``faulthandler``: the agent puts :mod:`elastic_runner.workers.stackdump` on the workers'
  ``PYTHONPATH``; its ``sitecustomize`` arms faulthandler on a real-time signal. The agent
  sends that signal to each Python process of the tree that armed it (never to other
  programs, for which the signal would be fatal) and collects the files.

:func:`StackDump.function` names where the main thread was (``train_step at
train.py:42``, the innermost frame of the user's code), for the report.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import psutil

from elastic_runner.workers.logs import WriteFaults

__all__ = ["STACK_MODES", "StackDump", "StackDumper", "find_py_spy"]

K = TypeVar("K")

STACK_MODES = ("auto", "py-spy", "faulthandler", "none")
STACKS_DIR_ENV = "ELASTIC_RUNNER_STACKS_DIR"
STACKS_SIGNAL_ENV = "ELASTIC_RUNNER_STACKS_SIGNAL"
DUMP_SIGNAL = int(signal.SIGRTMIN) + 5
_SITE_DIR = Path(__file__).with_name("stackdump")
#: Where a dump that could not be saved went (:attr:`StackDump.path`).
STDERR = Path("<stderr>")
#: Bounds of the wait for faulthandler's files: there is no completion event (the
#: handler writes from a signal handler), so the agent waits until each file stops growing.
_SETTLE, _GIVE_UP = 0.02, 3.0


@dataclass(frozen=True)
class StackDump:
    path: Path
    text: str
    tool: str

    def function(self) -> str | None:
        """``func at file:line`` of the worker's main thread: its innermost frame of
        user code (not ``python -m``'s runpy)."""
        return _main_frame(self.text)


#: A process's header: py-spy's ``Process 42: python train.py``, the agent's own
#: ``== pid 42 ==`` before each faulthandler file.
_PROCESS = re.compile(r"^(?:Process (\d+):|== pid (\d+) ==)")
#: A thread's header: py-spy's ``Thread 42 (idle): "MainThread"`` (no name when the
#: worker never imported threading), faulthandler's ``Current thread 0x7f.. (most recent
#: call first):``.
_THREAD = re.compile(r'^(?:Current thread|Thread) (\w+) \(([^)]*)\)(?::? "(.*)"|:)?\s*$')
#: A frame: faulthandler's ``  File "train.py", line 28 in step``, py-spy's
#: ``    step (train.py:28)``. Both list the innermost frame first.
_FRAME = re.compile(
    r'^\s+File "(?P<fpath>.+)", line (?P<fline>\d+) in (?P<ffunc>.+)$'
    r"|^\s+(?P<func>\S.*?) \((?P<path>.+):(?P<line>\d+)\)$"
)
#: Python's own machinery under the user's code: runpy for ``python -m`` (frozen since
#: 3.11, ``runpy.py`` before) and the import system (frozen since 3.11).
_MACHINERY = re.compile(r"<frozen [\w.]+>|(?:.*/)?runpy\.py")


@dataclass
class _Thread:
    pid: int | None
    tid: str
    name: str | None
    #: (function, file, line) of the frames that are not Python's machinery, innermost
    #: first.
    frames: list[tuple[str, str, str]]

    @property
    def is_main(self) -> bool:
        """Any sign of the main thread: its name (py-spy, once threading is imported), its
        id being the process's (py-spy gives the OS thread id), or its outermost frame of
        user code being the script's (or ``-m`` module's) ``<module>`` (the only sign in
        faulthandler's dumps)."""
        return (
            self.name == "MainThread"
            or (self.pid is not None and self.tid == str(self.pid))
            or (bool(self.frames) and self.frames[-1][0] == "<module>")
        )


def _threads(text: str) -> list[_Thread]:
    threads: list[_Thread] = []
    pid: int | None = None
    for line in text.splitlines():
        if m := _PROCESS.match(line):
            pid = int(m.group(1) or m.group(2))
        elif m := _THREAD.match(line):
            threads.append(_Thread(pid, m.group(1), m.group(3), []))
        elif threads and (m := _FRAME.match(line)):
            path = m.group("fpath") or m.group("path")
            if not _MACHINERY.fullmatch(path):
                func = m.group("ffunc") or m.group("func")
                threads[-1].frames.append((func.strip(), path, m.group("fline") or m.group("line")))
    return threads


def _main_frame(text: str) -> str | None:
    """``func at file:line``: the innermost frame of user code of the main thread of the
    first process that shows one (the worker comes before its children); runpy's and the
    import system's frames are never named."""
    for thread in _threads(text):
        if thread.frames and thread.is_main:
            func, path, line = thread.frames[0]
            return f"{func} at {path}:{line}"
    return None


class StackDumper:
    """Dumps the stacks of a worker's process tree into a file of the run directory.

    A disk fault costs the file, not the stacks: a dump that cannot be saved is printed on
    the agent's stderr instead (its :attr:`StackDump.path` is :data:`STDERR`), after one
    warning per error; a directory for faulthandler's files that cannot be made means no
    faulthandler dump for that worker (one warning per error)."""

    def __init__(self, mode: str = "auto") -> None:
        self.py_spy = find_py_spy() if mode in ("auto", "py-spy") else None
        if mode == "auto":
            mode = "py-spy" if self.py_spy else "faulthandler"
        self.mode = mode
        self._faults = WriteFaults("stack dumps go to stderr instead")
        self._dir_faults = WriteFaults("no faulthandler stack dumps for the workers there")

    def worker_env(self, stacks_dir: Path, env: dict[str, str]) -> dict[str, str]:
        """What to add to a worker's environment (faulthandler mode only)."""
        if self.mode != "faulthandler":
            return {}
        try:
            stacks_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            self._dir_faults.failed(stacks_dir, exc)
            return {}
        path = os.pathsep.join(p for p in (str(_SITE_DIR), env.get("PYTHONPATH")) if p)
        return {
            "PYTHONPATH": path,
            STACKS_DIR_ENV: str(stacks_dir),
            STACKS_SIGNAL_ENV: str(DUMP_SIGNAL),
        }

    def dump(self, pid: int, stacks_dir: Path, out: Path) -> StackDump | None:
        """Stacks of ``pid`` and its descendants into ``out``; None if none could be had."""
        return self.dump_all({0: (pid, stacks_dir, out)})[0]

    def dump_all(self, targets: Mapping[K, tuple[int, Path, Path]]) -> dict[K, StackDump | None]:
        """:meth:`dump` for several workers at once (``key: (pid, stacks dir, out)``): all
        of them are asked together, so a node's dump takes as long as its slowest rank."""
        trees: dict[K, list[psutil.Process]] = {}
        for key, (pid, _, _) in targets.items():
            try:
                trees[key] = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
            except psutil.NoSuchProcess:
                continue
        if self.mode == "py-spy" and self.py_spy:
            texts = self._py_spy(trees)
        elif self.mode == "faulthandler":
            texts = self._faulthandler({k: (t, targets[k][1]) for k, t in trees.items()})
        else:
            texts = {}
        out: dict[K, StackDump | None] = {}
        for key, (_, _, path) in targets.items():
            text = texts.get(key, "")
            if text.strip():
                out[key] = StackDump(self._save(path, text), text, self.mode)
            else:
                out[key] = None
        return out

    def _save(self, path: Path, text: str) -> Path:
        """Where the dump is: ``path``, or :data:`STDERR` when it cannot be written there."""
        try:
            path.write_text(text)
        except OSError as exc:
            self._faults.failed(path, exc)
            with contextlib.suppress(OSError):
                path.unlink()  # no torn dump
            sys.stderr.write(f"[elastic-run] stacks for {path}:\n{text.rstrip()}\n")
            sys.stderr.flush()
            return STDERR
        return path

    def _py_spy(self, trees: Mapping[K, list[psutil.Process]]) -> dict[K, str]:
        assert self.py_spy
        running = [
            (key, subprocess.Popen(
                [self.py_spy, "dump", "--pid", str(proc.pid)],
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
                text=True,
            ))
            for key, tree in trees.items()
            for proc in tree
        ]  # fmt: skip
        parts: dict[K, list[str]] = {}
        for key, proc in running:
            try:
                stdout, _ = proc.communicate(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.communicate()
                continue
            if proc.returncode == 0:
                parts.setdefault(key, []).append(stdout)
        return {key: "\n".join(texts) for key, texts in parts.items()}

    def _faulthandler(self, trees: Mapping[K, tuple[list[psutil.Process], Path]]) -> dict[K, str]:
        offsets: dict[Path, int] = {}  # each file's size before this dump
        owner: dict[Path, K] = {}
        for key, (tree, stacks_dir) in trees.items():
            for proc in tree:
                path = stacks_dir / f"{proc.pid}.txt"
                if not path.exists():  # not a Python process that armed the handler
                    continue
                try:
                    offsets[path] = path.stat().st_size
                except OSError:
                    continue
                try:
                    os.kill(proc.pid, DUMP_SIGNAL)
                except ProcessLookupError:
                    del offsets[path]
                    continue
                owner[path] = key
        sizes = dict(offsets)
        pending = set(offsets)
        deadline = time.monotonic() + _GIVE_UP
        while pending and time.monotonic() < deadline:
            time.sleep(_SETTLE)
            for path in list(pending):
                try:
                    size = path.stat().st_size
                except OSError:
                    pending.discard(path)
                    continue
                if size > offsets[path] and size == sizes[path]:
                    pending.discard(path)  # grew, then did not change for one settle period
                sizes[path] = size
        parts: dict[K, list[str]] = {}
        for path, start in offsets.items():
            try:
                with open(path, "rb") as f:
                    f.seek(start)
                    text = f.read().decode(errors="replace")
            except OSError:  # gone, or an I/O error: no dump from this process
                continue
            if text.strip():
                parts.setdefault(owner[path], []).append(f"== pid {path.stem} ==\n{text}")
        return {key: "\n".join(texts) for key, texts in parts.items()}


def find_py_spy() -> str | None:
    """The ``py-spy`` beside this interpreter, else on PATH, else ``None``."""
    beside = Path(sys.executable).with_name("py-spy")
    return str(beside) if beside.exists() else shutil.which("py-spy")
