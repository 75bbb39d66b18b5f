"""Watchdog timers, worker side: ``with elastic_runner.timer.expires(after=60): step()``.

If the block is still running ``after`` seconds later, the agent (run with
``timer=file``) dumps the worker's Python stacks, stops its whole process tree, reports
"timer for scope X expired after N s" and restarts the group per the restart policy.
Nothing here needs torch, and torch's own ``FileTimerClient``/``expires`` talk to the same
server: the protocol is torch's (one JSON line per request on the FIFO named by
``TORCHELASTIC_TIMER_FILE``).

Outside elastic-run (no ``TORCHELASTIC_TIMER_FILE``) ``expires`` does nothing, so one
script runs both ways. This module imports only the standard library.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import signal
import time
from collections.abc import Iterator

__all__ = ["TIMER_FILE_ENV", "TimerRequest", "expires"]

TIMER_FILE_ENV = "TORCHELASTIC_TIMER_FILE"


class TimerRequest:
    """One request of torch's FileTimer protocol. A negative ``expiration_time`` (wall
    clock, ``time.time()``) releases the scope's timer. ``after`` (the armed duration) is
    our addition, for the report; torch's server ignores it, and requests from torch's
    client lack it."""

    __slots__ = ("after", "expiration_time", "pid", "scope_id", "signal")

    def __init__(
        self,
        pid: int,
        scope_id: str,
        expiration_time: float,
        signal: int,
        after: float | None = None,
    ) -> None:
        self.pid = pid
        self.scope_id = scope_id
        self.expiration_time = expiration_time
        self.signal = signal
        self.after = after

    def to_json(self) -> str:
        request: dict[str, object] = {
            "version": 1,
            "pid": self.pid,
            "scope_id": self.scope_id,
            "expiration_time": self.expiration_time,
            "signal": self.signal,
        }
        if self.after is not None:
            request["after"] = self.after
        return json.dumps(request)


def _send(path: str, request: TimerRequest) -> None:
    # Non-blocking open: with no server reading, fail at once instead of hanging.
    try:
        fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
    except OSError as exc:
        raise BrokenPipeError(f"no timer server reads {path} ({exc.strerror})") from None
    try:
        line = (request.to_json() + "\n").encode()
        if len(line) > 4096:  # PIPE_BUF: larger writes may interleave with other clients
            raise ValueError(f"timer request too long ({len(line)} bytes); shorten the scope")
        os.write(fd, line)
    finally:
        os.close(fd)


@contextlib.contextmanager
def expires(after: float, scope: str | None = None, sig: int = signal.SIGKILL) -> Iterator[None]:
    """Arm a timer for the block: past ``after`` seconds the agent stops this worker's
    process tree (with ``sig``) and restarts per policy. ``scope`` names the timer in the
    report (default: the caller's ``file#function``)."""
    path = os.environ.get(TIMER_FILE_ENV)
    if not path:
        yield
        return
    if scope is None:
        caller = inspect.stack()[2]
        scope = f"{caller.filename}#{caller.function}"
    pid = os.getpid()
    _send(path, TimerRequest(pid, scope, time.time() + after, sig, after=after))
    try:
        yield
    finally:
        _send(path, TimerRequest(pid, scope, -1, 0))
