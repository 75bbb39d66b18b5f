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

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

__all__ = ["STACK_MODES", "StackDump", "StackDumper"]

STACK_MODES = ("auto", "py-spy", "faulthandler", "none")
STACKS_DIR_ENV = "ELASTIC_RUNNER_STACKS_DIR"
STACKS_SIGNAL_ENV = "ELASTIC_RUNNER_STACKS_SIGNAL"
DUMP_SIGNAL = int(signal.SIGRTMIN) + 5
_SITE_DIR = Path(__file__).with_name("stackdump")
#: Bounds of the wait for faulthandler's files: there is no completion event (the
#: handler writes from a signal handler), so the agent waits until each file stops growing.
_SETTLE, _GIVE_UP = 0.05, 3.0


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
    """Dumps the stacks of a worker's process tree into a file of the run directory."""

    def __init__(self, mode: str = "auto") -> None:
        self.py_spy = _find_py_spy() if mode in ("auto", "py-spy") else None
        if mode == "auto":
            mode = "py-spy" if self.py_spy else "faulthandler"
        self.mode = mode

    def worker_env(self, stacks_dir: Path, env: dict[str, str]) -> dict[str, str]:
        """What to add to a worker's environment (faulthandler mode only)."""
        if self.mode != "faulthandler":
            return {}
        stacks_dir.mkdir(parents=True, exist_ok=True)
        path = os.pathsep.join(p for p in (str(_SITE_DIR), env.get("PYTHONPATH")) if p)
        return {
            "PYTHONPATH": path,
            STACKS_DIR_ENV: str(stacks_dir),
            STACKS_SIGNAL_ENV: str(DUMP_SIGNAL),
        }

    def dump(self, pid: int, stacks_dir: Path, out: Path) -> StackDump | None:
        """Stacks of ``pid`` and its descendants into ``out``; None if none could be had."""
        try:
            tree = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            return None
        if self.mode == "py-spy" and self.py_spy:
            text = self._py_spy(tree)
        elif self.mode == "faulthandler":
            text = self._faulthandler(tree, stacks_dir)
        else:
            return None
        if not text.strip():
            return None
        out.write_text(text)
        return StackDump(out, text, self.mode)

    def _py_spy(self, tree: list[psutil.Process]) -> str:
        assert self.py_spy
        parts = []
        for proc in tree:
            try:
                done = subprocess.run(
                    [self.py_spy, "dump", "--pid", str(proc.pid)],
                    capture_output=True,
                    text=True,
                    timeout=10,
                    stdin=subprocess.DEVNULL,
                )
            except subprocess.TimeoutExpired:
                continue
            if done.returncode == 0:
                parts.append(done.stdout)
        return "\n".join(parts)

    def _faulthandler(self, tree: list[psutil.Process], stacks_dir: Path) -> str:
        sizes: dict[Path, int] = {}
        for proc in tree:
            path = stacks_dir / f"{proc.pid}.txt"
            if not path.exists():  # not a Python process that armed the handler
                continue
            sizes[path] = path.stat().st_size
            try:
                os.kill(proc.pid, DUMP_SIGNAL)
            except ProcessLookupError:
                del sizes[path]
        deadline = time.monotonic() + _GIVE_UP
        pending = dict(sizes)
        while pending and time.monotonic() < deadline:
            time.sleep(_SETTLE)
            for path, before in list(pending.items()):
                size = path.stat().st_size
                if size > before and size == sizes[path]:
                    del pending[path]  # grew, then did not change for one settle period
                sizes[path] = size
        parts = []
        for path in sizes:
            text = path.read_text(errors="replace")
            if text.strip():
                parts.append(f"== pid {path.stem} ==\n{text}")
        return "\n".join(parts)


def _find_py_spy() -> str | None:
    beside = Path(sys.executable).with_name("py-spy")
    return str(beside) if beside.exists() else shutil.which("py-spy")
