"""``elastic_runner.heartbeat()`` (defined here): a worker tells the agent it is making progress.

A worker that calls it once has opted in: from then on, with ``watchdog.heartbeat_timeout``
set, going that long without a call means hung (the agent dumps every rank's stacks, stops
the group and restarts per policy). Call it as often as you like, from a training loop
for example: it writes one byte to a pipe the agent gave the worker at most every
``ELASTIC_RUNNER_HEARTBEAT_INTERVAL`` seconds and is otherwise a clock read. Outside
elastic-run it does nothing. Standard library only.
"""

from __future__ import annotations

import os
import time

__all__ = ["HEARTBEAT_FD_ENV", "HEARTBEAT_INTERVAL_ENV", "heartbeat"]

HEARTBEAT_FD_ENV = "ELASTIC_RUNNER_HEARTBEAT_FD"
HEARTBEAT_INTERVAL_ENV = "ELASTIC_RUNNER_HEARTBEAT_INTERVAL"

_fd: int | None = None
_interval = 0.0
_last = float("-inf")
_pid = -1


def heartbeat() -> None:
    """Report progress to the agent (cheap; rate-limited; a no-op outside elastic-run)."""
    global _fd, _interval, _last, _pid
    now = time.monotonic()
    if now - _last < _interval and _pid == os.getpid():
        return
    if _pid != os.getpid():  # first call in this process (or after a fork)
        _pid = os.getpid()
        fd = os.environ.get(HEARTBEAT_FD_ENV)
        _fd = int(fd) if fd and fd.isdigit() else None
        _interval = float(os.environ.get(HEARTBEAT_INTERVAL_ENV) or 0)
    _last = now
    if _fd is None:
        return
    try:
        os.write(_fd, b"h")
    except BlockingIOError:
        pass  # the agent has a beat it has not read yet: as good as this one
    except OSError:
        _fd = None  # closed or not ours: stop trying
