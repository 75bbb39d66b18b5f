"""``elastic_runner.heartbeat()`` (defined here): a worker tells the agent it is making progress.

A worker that calls it once has opted in: from then on, with ``watchdog.heartbeat_timeout``
set, going that long without a call means hung (the agent dumps every rank's stacks, stops
the group and restarts per policy). Call it as often as you like, from a training loop
for example: it writes one byte to a pipe the agent gave the worker at most every
``ELASTIC_RUNNER_HEARTBEAT_INTERVAL`` seconds and is otherwise a clock read. Outside
elastic-run it does nothing. Standard library only.

``heartbeat(step=N)`` also says how far training got: the agent keeps the furthest step
of each attempt, and stops a crash loop (restarts that never get past the furthest step
reached before, ``restart.no_progress``) with exit code 93, "no progress: do not
requeue". A step held back by the rate limit is sent when the process exits normally
(an exception, ``sys.exit``), so the step a worker failed at is the one reported.

The wire format on the pipe: ``h`` for a beat, ``s<step>\n`` for a beat with a step;
each write is one message (shorter than ``PIPE_BUF``, so never interleaved).
"""

from __future__ import annotations

import atexit
import os
import time

__all__ = ["HEARTBEAT_FD_ENV", "HEARTBEAT_INTERVAL_ENV", "heartbeat", "read_steps"]

HEARTBEAT_FD_ENV = "ELASTIC_RUNNER_HEARTBEAT_FD"
HEARTBEAT_INTERVAL_ENV = "ELASTIC_RUNNER_HEARTBEAT_INTERVAL"

_fd: int | None = None
_interval = 0.0
_last = float("-inf")
_pid = -1
#: A step the rate limit held back, sent at the next beat or at exit.
_pending: int | None = None


def heartbeat(step: int | None = None) -> None:
    """Report progress to the agent (cheap; rate-limited; a no-op outside elastic-run);
    ``step``: how far training got (an increasing integer, such as the global step)."""
    global _fd, _interval, _last, _pid, _pending
    now = time.monotonic()
    if step is not None:
        _pending = int(step)
    if now - _last < _interval and _pid == os.getpid():
        return
    if _pid != os.getpid():  # first call in this process (or after a fork)
        _pid = os.getpid()
        fd = os.environ.get(HEARTBEAT_FD_ENV)
        _fd = int(fd) if fd and fd.isdigit() else None
        _interval = float(os.environ.get(HEARTBEAT_INTERVAL_ENV) or 0)
        if _fd is not None:
            atexit.register(_flush)
    _last = now
    _send()


def _send() -> None:
    global _fd, _pending
    if _fd is None:
        return
    message = b"h" if _pending is None else b"s%d\n" % _pending
    try:
        os.write(_fd, message)
        _pending = None
    except BlockingIOError:
        pass  # the agent has a beat it has not read yet: as good as this one
    except OSError:
        _fd = None  # closed or not ours: stop trying


def _flush() -> None:
    """At exit: the last step, if the rate limit held it back."""
    if _pending is not None and _pid == os.getpid():
        _send()


#: The longest step message the agent waits for the end of (``s`` + 20 digits + ``\n``).
_MAX_MESSAGE = 32


def read_steps(data: bytes) -> tuple[int | None, bytes]:
    """The agent's side: the largest step in ``data`` (what was read from a worker's
    pipe, after the remainder of the last read) and the unfinished message to keep for
    the next read. Garbage (the worker's pipe is its own to misuse) is skipped."""
    furthest = None
    rest = data.replace(b"h", b"")
    lines = rest.split(b"\n")
    rest = lines.pop()
    for line in lines:
        digits = line.rpartition(b"s")[2]
        if digits.lstrip(b"-").isdigit():
            step = int(digits)
            furthest = step if furthest is None else max(furthest, step)
    if not rest.startswith(b"s") or len(rest) > _MAX_MESSAGE:
        rest = b""
    return furthest, rest
