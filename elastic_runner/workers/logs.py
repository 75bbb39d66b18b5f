"""Worker output: the per-attempt log layout, the line tee and the console.

Layout (torch's, plus an attempt number that never repeats within a run, so neither a
restart nor a membership change overwrites earlier logs)::

    <run dir>/attempt_<n>/<local_rank>/{stdout.log,stderr.log,error.json}

Disk faults degrade, they do not kill: a log file whose write fails (a full disk, a quota,
an I/O error, a file system remounted read-only) is closed and its output dropped, after
one warning (:class:`WriteFaults`); the console tee and the workers go on. The run's JSON
lines files (events, metrics) do the same through :class:`JsonlFile`.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "CollapsingConsole",
    "Console",
    "JsonlFile",
    "LineTee",
    "WorkerLogPaths",
    "WriteFaults",
    "attempt_dir",
    "describe_os_error",
    "guard_log_files",
]

log = logging.getLogger(__name__)


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


def describe_os_error(exc: OSError) -> str:
    """``No space left on device (ENOSPC)``: the error's text and its symbolic name."""
    name = errno.errorcode.get(exc.errno or 0)
    text = exc.strerror or str(exc) or type(exc).__name__
    return f"{text} ({name})" if name else text


class WriteFaults:
    """Says once that writes of one kind of file fail: the first failure of each error
    (``ENOSPC``, ``EIO``, ``EROFS``...) is one warning naming the file, the error and
    ``consequence``; the same error on another file of the kind (the other ranks' logs on
    the same full disk) is dropped as silently as its output."""

    def __init__(self, consequence: str) -> None:
        self.consequence = consequence
        self._seen: set[int | None] = set()

    @classmethod
    def worker_logs(cls) -> WriteFaults:
        """For the worker logs of one run (:class:`LineTee`)."""
        return cls(_LOG_DROPPED)

    def failed(self, path: str | os.PathLike[str], exc: OSError) -> None:
        if exc.errno in self._seen:
            return
        self._seen.add(exc.errno)
        log.warning(
            "cannot write %s: %s; %s", os.fspath(path), describe_os_error(exc), self.consequence
        )


class JsonlFile:
    """An append-only file of JSON lines (events, metrics) that survives disk faults: each
    line is written whole with one ``write``; the first failure is one warning naming the
    file, the error and ``consequence``, a torn last line is cut off (the file keeps whole
    lines only), and every later line is dropped. Opening raises ``OSError``."""

    def __init__(self, path: str | os.PathLike[str], consequence: str) -> None:
        self.path = os.fspath(path)
        self._consequence = consequence
        self._fd: int | None = os.open(
            self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644
        )
        self._size = os.fstat(self._fd).st_size

    @property
    def writing(self) -> bool:
        """Whether lines still go to the file."""
        return self._fd is not None

    def append(self, line: str) -> None:
        if self._fd is None:
            return
        data = (line + "\n").encode()
        try:
            _write_all(self._fd, data)
        except OSError as exc:
            fd, self._fd = self._fd, None
            with contextlib.suppress(OSError):
                os.ftruncate(fd, self._size)  # no torn line (shrinking needs no space)
            with contextlib.suppress(OSError):
                os.close(fd)
            WriteFaults(self._consequence).failed(self.path, exc)
        else:
            self._size += len(data)

    def close(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            try:
                os.close(fd)
            except OSError as exc:
                WriteFaults(self._consequence).failed(self.path, exc)


def guard_log_files(logger: logging.Logger) -> None:
    """Make each file handler of ``logger`` (``elastic-run.log``) survive disk faults: its
    first failed write is one warning (through the other handlers), then the handler drops
    its records, instead of logging's "--- Logging error ---" traceback for every record."""
    for handler in logger.handlers:
        if isinstance(handler, logging.FileHandler) and not any(
            isinstance(f, _DropOnDiskFault) for f in handler.filters
        ):
            handler.addFilter(_DropOnDiskFault(handler))


class _DropOnDiskFault(logging.Filter):
    def __init__(self, handler: logging.FileHandler) -> None:
        super().__init__()
        self.broken = False
        self._handler = handler
        self._handle_error = handler.handleError
        handler.handleError = self._failed  # type: ignore[method-assign]

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.broken

    def _failed(self, record: logging.LogRecord) -> None:
        exc = sys.exc_info()[1]
        if not isinstance(exc, OSError):  # not the disk (a bad format string): as usual
            self._handle_error(record)
            return
        self.broken = True
        with contextlib.suppress(Exception):  # flushes what failed, and fails again
            self._handler.close()
        log.warning(
            "cannot write %s: %s; the agent's log messages go to stderr only from now on",
            self._handler.baseFilename,
            describe_os_error(exc),
        )


#: What a failed worker log means (:class:`LineTee`).
_LOG_DROPPED = (
    "worker output to this file, and to any other worker log that fails alike, is dropped "
    "from now on (teed output still reaches the console; the workers run on)"
)


class Console:
    """Where teed lines go: each line with its worker's prefix, written whole to the fd of
    its stream (1 = stdout, 2 = stderr), or handed to ``sink(stream, data)`` (the live
    status display prints them above its table).

    A console stream whose write fails (stdout redirected to a file on a full disk) is
    dropped after one warning, like a log file."""

    def __init__(
        self, fds: dict[int, int], sink: Callable[[int, bytes], None] | None = None
    ) -> None:
        self._fds = fds
        self._sink = sink
        self._broken: set[int] = set()

    def _emit(self, stream: int, data: bytes) -> None:
        if self._sink is not None:
            self._sink(stream, data)
        elif stream not in self._broken:
            try:
                _write_all(self._fds[stream], data)
            except OSError as exc:
                self._broken.add(stream)
                where = {1: "stdout", 2: "stderr"}.get(stream, f"fd {self._fds[stream]}")
                log.warning(
                    "cannot write worker output to the console's %s: %s; dropping it from "
                    "now on (the workers run on)",
                    where,
                    describe_os_error(exc),
                )

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
    given, to the console whole lines at a time (no torn lines).

    ``path`` ``None``: no file (its directory could not be made). A file that cannot be
    opened or written is reported to ``faults`` and dropped; the console goes on."""

    def __init__(
        self,
        path: Path | None,
        console: Console | None,
        stream: int,
        rank: int,
        prefix: bytes,
        faults: WriteFaults | None = None,
    ) -> None:
        self.path = path
        self._faults = faults if faults is not None else WriteFaults.worker_logs()
        self._fd: int | None = None
        if path is not None:
            try:
                self._fd = os.open(
                    path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644
                )
            except OSError as exc:
                self._faults.failed(path, exc)
        self._console = console
        self._stream, self._rank, self._prefix = stream, rank, prefix
        self._partial = b""

    @property
    def writing(self) -> bool:
        """Whether output still goes to the file."""
        return self._fd is not None

    def feed(self, data: bytes) -> None:
        if self._fd is not None:
            try:
                _write_all(self._fd, data)
            except OSError as exc:
                self._drop(exc)
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
        if self._fd is not None:
            fd, self._fd = self._fd, None
            try:
                os.close(fd)  # a network file system may report a lost write only here
            except OSError as exc:
                assert self.path is not None
                self._faults.failed(self.path, exc)

    def _drop(self, exc: OSError) -> None:
        assert self._fd is not None and self.path is not None
        fd, self._fd = self._fd, None
        with contextlib.suppress(OSError):
            os.close(fd)
        self._faults.failed(self.path, exc)


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
