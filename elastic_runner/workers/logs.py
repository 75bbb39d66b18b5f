"""Worker output: the per-attempt log layout and the line tee.

Layout (torch's, plus an attempt number that never repeats within a run, so neither a
restart nor a membership change overwrites earlier logs)::

    <run dir>/attempt_<n>/<local_rank>/{stdout.log,stderr.log,error.json}
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

__all__ = ["LineTee", "WorkerLogPaths", "attempt_dir"]


def attempt_dir(run_dir: Path, attempt: int) -> Path:
    return run_dir / f"attempt_{attempt}"


@dataclass(frozen=True)
class WorkerLogPaths:
    """Where one worker's output and error file go in one attempt."""

    dir: Path

    @classmethod
    def of(cls, run_dir: Path, attempt: int, local_rank: int) -> WorkerLogPaths:
        return cls(attempt_dir(run_dir, attempt) / str(local_rank))

    @property
    def stdout(self) -> Path:
        return self.dir / "stdout.log"

    @property
    def stderr(self) -> Path:
        return self.dir / "stderr.log"

    @property
    def error_file(self) -> Path:
        return self.dir / "error.json"


class LineTee:
    """Copies one worker stream to its log file as bytes arrive and, when ``console_fd``
    is given, to the console whole lines at a time with ``prefix`` (no torn lines)."""

    def __init__(self, path: Path, console_fd: int | None, prefix: bytes) -> None:
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
        self._console_fd = console_fd
        self._prefix = prefix
        self._partial = b""

    def feed(self, data: bytes) -> None:
        _write_all(self._fd, data)
        if self._console_fd is None:
            return
        data = self._partial + data
        cut = data.rfind(b"\n") + 1
        self._partial = data[cut:]
        if cut:
            lines = data[:cut].splitlines(keepends=True)
            _write_all(self._console_fd, b"".join(self._prefix + line for line in lines))

    def close(self) -> None:
        if self._console_fd is not None and self._partial:
            _write_all(self._console_fd, self._prefix + self._partial + b"\n")
            self._partial = b""
        os.close(self._fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            n = os.write(fd, view)
        except BlockingIOError:
            continue
        except BrokenPipeError:
            return
        view = view[n:]
