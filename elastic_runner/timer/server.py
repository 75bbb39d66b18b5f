"""The built-in worker timer servers, agent side (a plugin registered through the same hook
as third-party ones): ``none`` and ``file``. The interface is :mod:`elastic_runner.timer.api`.

``timer=file`` serves torch's FileTimerServer protocol: a FIFO at
``TORCHELASTIC_TIMER_FILE`` on which workers write one JSON line per request
(``{"version": 1, "pid", "scope_id", "expiration_time", "signal"}``; a negative
expiration releases). torch's ``FileTimerClient`` and ``expires()`` work unchanged, and so
does :func:`elastic_runner.timer.expires`.

Unlike torch's server, this one never kills anything itself (torch's also signals its own
process): it reports each expiry to the agent, which dumps the worker's stacks, stops that
worker's process tree and restarts per policy. It waits in ``select`` on the FIFO until a
request arrives or the next timer is due: no polling.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import select
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import psutil

from elastic_runner.config import TimerConfig
from elastic_runner.errors import ConfigError
from elastic_runner.hookspecs import hookimpl
from elastic_runner.registry import ComponentSpec
from elastic_runner.spec import RunContext
from elastic_runner.timer import TIMER_FILE_ENV
from elastic_runner.timer.api import ExpiryListener, TimerExpiry

__all__ = ["FileTimerConfig", "FileTimerServer", "NoTimerConfig", "NoTimerServer"]

log = logging.getLogger(__name__)


@dataclass
class NoTimerConfig(TimerConfig):
    server: str = "none"


@dataclass
class FileTimerConfig(TimerConfig):
    server: str = "file"
    #: Path of the FIFO (default: $TORCHELASTIC_TIMER_FILE of the agent if set, else a
    #: new one in the temporary directory; not in the run directory, which may be on a
    #: network file system without FIFOs).
    path: str | None = None


class NoTimerServer:
    """No timers: nothing is started and workers get no timer variables."""

    def start(self) -> None:
        """Nothing to start."""

    def worker_env(self) -> Mapping[str, str]:
        return {}

    def on_expired(self, listener: ExpiryListener) -> None:
        """Nothing ever expires."""

    def stop(self) -> None:
        """Nothing to stop."""


@dataclass
class _Timer:
    expiration: float  # wall clock, as the client sent it
    after: float  # seconds armed for
    signal: int


class FileTimerServer:
    """torch's FIFO protocol, read by a thread that sleeps until a request or a deadline."""

    def __init__(self, path: str, clock: Callable[[], float] = time.time) -> None:
        self.path = path
        self._clock = clock
        self._timers: dict[tuple[int, str], _Timer] = {}
        self._listener: ExpiryListener | None = None
        self._stop_r, self._stop_w = os.pipe2(os.O_CLOEXEC)
        self._thread: threading.Thread | None = None
        self._fd: int | None = None
        self._keepalive: int | None = None
        self._created = False
        self.requests = 0

    def worker_env(self) -> Mapping[str, str]:
        return {TIMER_FILE_ENV: self.path}

    def on_expired(self, listener: ExpiryListener) -> None:
        self._listener = listener

    def start(self) -> None:
        if not os.path.exists(self.path):
            os.mkfifo(self.path, 0o600)
            self._created = True
        # Our own writer keeps the FIFO open: no EOF when the last client closes, and a
        # client's non-blocking open always finds a reader.
        self._fd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        self._keepalive = os.open(self.path, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        self._thread = threading.Thread(target=self._serve, name="timer-server", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            os.write(self._stop_w, b"\0")
            self._thread.join(5)
            self._thread = None
        for fd in (self._fd, self._keepalive, self._stop_r, self._stop_w):
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._fd = self._keepalive = None
        if self._created:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
            self._created = False

    # -- the thread ---------------------------------------------------------------------

    def _serve(self) -> None:
        assert self._fd is not None
        pending = b""
        while True:
            due = min((t.expiration for t in self._timers.values()), default=None)
            timeout = None if due is None else max(0.0, due - self._clock())
            ready, _, _ = select.select([self._fd, self._stop_r], [], [], timeout)
            if self._stop_r in ready:
                return
            if self._fd in ready:
                pending = self._read(pending)
            self._expire()

    def _read(self, pending: bytes) -> bytes:
        assert self._fd is not None
        while True:
            try:
                chunk = os.read(self._fd, 65536)
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno == errno.EINTR:
                    continue
                raise
            if not chunk:
                break
            pending += chunk
        *lines, pending = pending.split(b"\n")
        for line in lines:
            if line.strip():
                self._handle(line)
        return pending

    def _handle(self, line: bytes) -> None:
        self.requests += 1
        try:
            request = json.loads(line)
            pid, scope = int(request["pid"]), str(request["scope_id"])
            expiration, sig = float(request["expiration_time"]), int(request["signal"])
            after = float(request["after"]) if "after" in request else None
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("timer server: ignoring a malformed request %r (%s)", line[:200], exc)
            return
        if expiration < 0:
            self._timers.pop((pid, scope), None)
        else:
            # torch's client does not say how long it armed for: estimate from arrival
            armed = after if after is not None else round(expiration - self._clock(), 1)
            self._timers[pid, scope] = _Timer(expiration, armed, sig)

    def _expire(self) -> None:
        now = self._clock()
        for key, timer in list(self._timers.items()):
            if timer.expiration > now:
                continue
            del self._timers[key]
            pid, scope = key
            if not psutil.pid_exists(pid):  # it exited without releasing: nothing to stop
                continue
            expiry = TimerExpiry(pid, scope, timer.after, timer.signal)
            log.debug("timer for scope %s of pid %d expired after %.1f s", scope, pid, expiry.after)
            # Every other timer of that process goes with it (its tree is about to stop).
            for other in [k for k in self._timers if k[0] == pid]:
                del self._timers[other]
            if self._listener is not None:
                self._listener(expiry)


def _file_server(config: FileTimerConfig, context: RunContext) -> FileTimerServer:
    path = config.path or os.environ.get(TIMER_FILE_ENV)
    if not path:
        path = os.path.join(
            tempfile.gettempdir(), f"elastic-runner-timer-{context.run_id}-{os.getpid()}"
        )
    if os.path.exists(path) and not _is_fifo(path):
        raise ConfigError("timer.path", path, "exists and is not a FIFO; choose another path")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise ConfigError("timer.path", path, f"directory {parent} does not exist")
    return FileTimerServer(path)


def _is_fifo(path: str) -> bool:
    import stat

    return stat.S_ISFIFO(os.stat(path).st_mode)


@hookimpl
def elastic_runner_timer_servers() -> Sequence[ComponentSpec]:
    return [
        ComponentSpec("none", lambda c, ctx: NoTimerServer(), NoTimerConfig, "no timers"),
        ComponentSpec(
            "file",
            _file_server,
            FileTimerConfig,
            "torch's FileTimerServer FIFO protocol at TORCHELASTIC_TIMER_FILE",
        ),
    ]
