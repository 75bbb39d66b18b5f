"""Worker output: the per-attempt log layout, the line tee and the console.

Layout (torch's, plus an attempt number that never repeats within a run, so neither a
restart nor a membership change overwrites earlier logs)::

    <run dir>/attempt_<n>/<local_rank>/{stdout.log,stderr.log,error.json}
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["CollapsingConsole", "Console", "LineTee", "WorkerLogPaths", "attempt_dir"]


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


class Console:
    """Where teed lines go: each line with its worker's prefix, written whole to the fd of
    its stream (1 = stdout, 2 = stderr), or handed to ``sink(stream, data)`` (the live
    status display prints them above its table)."""

    def __init__(
        self, fds: dict[int, int], sink: Callable[[int, bytes], None] | None = None
    ) -> None:
        self._fds = fds
        self._sink = sink

    def _emit(self, stream: int, data: bytes) -> None:
        if self._sink is not None:
            self._sink(stream, data)
        else:
            _write_all(self._fds[stream], data)

    def write(self, stream: int, rank: int, prefix: bytes, lines: list[bytes]) -> None:
        self._emit(stream, b"".join(prefix + line for line in lines))

    def expect(self, ranks: int) -> None:
        """How many ranks write to the console in this attempt."""

    def next_deadline(self) -> float | None:
        """When :meth:`flush` has something to print (monotonic seconds), if ever."""
        return None

    def flush(self, everything: bool = False) -> None:
        """Print what is due (or everything)."""


@dataclass
class _Pending:
    since: float
    prefix: bytes
    ranks: list[int] = field(default_factory=list)


class CollapsingConsole(Console):
    """Prints a line that several ranks print alike once, as ``[ranks 0-3,6]: line``.

    A line waits until every console rank printed it or ``window`` seconds passed; lines
    keep the order in which they first appeared. Files are never collapsed.
    """

    def __init__(
        self,
        fds: dict[int, int],
        window: float,
        clock: Callable[[], float] = time.monotonic,
        sink: Callable[[int, bytes], None] | None = None,
    ) -> None:
        super().__init__(fds, sink)
        self._window = window
        self._clock = clock
        self._expected = 0
        self._pending: dict[tuple[int, bytes], _Pending] = {}

    def expect(self, ranks: int) -> None:
        self.flush(everything=True)
        self._expected = ranks

    def write(self, stream: int, rank: int, prefix: bytes, lines: list[bytes]) -> None:
        for line in lines:
            entry = self._pending.setdefault((stream, line), _Pending(self._clock(), prefix))
            if rank in entry.ranks:  # the same rank again: a new occurrence
                self.flush(everything=True)
                entry = self._pending.setdefault((stream, line), _Pending(self._clock(), prefix))
            entry.ranks.append(rank)
        self.flush()

    def next_deadline(self) -> float | None:
        if not self._pending:
            return None
        return min(p.since for p in self._pending.values()) + self._window

    def flush(self, everything: bool = False) -> None:
        now = self._clock()
        # Print in order of first appearance, stopping at the first line still waiting.
        for key, entry in sorted(self._pending.items(), key=lambda kv: kv[1].since):
            complete = len(entry.ranks) >= self._expected
            if not (everything or complete or now >= entry.since + self._window):
                break
            del self._pending[key]
            stream, line = key
            prefix = entry.prefix if len(entry.ranks) == 1 else _ranks_prefix(entry.ranks)
            self._emit(stream, prefix + line)


def _ranks_prefix(ranks: list[int]) -> bytes:
    """[3, 0, 1, 2, 6] -> b"[ranks 0-3,6]: " """
    ordered = sorted(set(ranks))
    spans: list[tuple[int, int]] = []
    for r in ordered:
        if spans and r == spans[-1][1] + 1:
            spans[-1] = (spans[-1][0], r)
        else:
            spans.append((r, r))
    text = ",".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)
    return f"[ranks {text}]: ".encode()


class LineTee:
    """Copies one worker stream to its log file as bytes arrive and, when ``console`` is
    given, to the console whole lines at a time (no torn lines)."""

    def __init__(
        self, path: Path, console: Console | None, stream: int, rank: int, prefix: bytes
    ) -> None:
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
        self._console = console
        self._stream, self._rank, self._prefix = stream, rank, prefix
        self._partial = b""

    def feed(self, data: bytes) -> None:
        _write_all(self._fd, data)
        if self._console is None:
            return
        data = self._partial + data
        cut = data.rfind(b"\n") + 1
        self._partial = data[cut:]
        if cut:
            lines = data[:cut].splitlines(keepends=True)
            self._console.write(self._stream, self._rank, self._prefix, lines)

    def close(self) -> None:
        if self._console is not None and self._partial:
            self._console.write(self._stream, self._rank, self._prefix, [self._partial + b"\n"])
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
