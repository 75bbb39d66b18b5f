"""Dumping a worker's Python stacks from the agent, with no change to the worker's code.

Two ways, chosen by ``watchdog.stacks``:

- ``py-spy`` (``auto`` picks it when installed): ``py-spy dump`` reads every Python process
  of the worker's tree from outside; needs ptrace permission.
- ``faulthandler``: the agent puts :mod:`elastic_runner.workers.stackdump` on the workers'
  ``PYTHONPATH``; its ``sitecustomize`` arms faulthandler on a real-time signal. The agent
  sends that signal to each Python process of the tree that armed it (never to other
  programs, for which the signal would be fatal) and collects the files.

:func:`StackDump.function` names where the main thread was (``train_step at
train.py:42``), for the report.
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
        """``func at file:line`` of the worker's main thread, innermost frame."""
        return _main_frame(self.text)


def _main_frame(text: str) -> str | None:
    # py-spy: Thread 123 (idle): "MainThread"\n    func (file:line)
    m = re.search(r'"MainThread"\n\s+(\S.*?) \((.+):(\d+)\)', text)
    if m:
        return f"{m.group(1)} at {m.group(2)}:{m.group(3)}"
    # faulthandler: blocks of '  File "f", line N in func', innermost first; the main
    # thread's outermost frame is the script's <module>.
    for block in re.split(r"\n(?=(?:Current thread|Thread) 0x)", text):
        frames = re.findall(r'File "(.+)", line (\d+) in (.+)', block)
        if frames and frames[-1][2].strip() == "<module>":
            path, line, func = frames[0]
            return f"{func.strip()} at {path}:{line}"
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
