"""The built-in worker timer servers, agent side (a plugin registered through the same hook
as third-party ones): ``none`` and ``file``. The interface is :mod:`elastic_runner.timer.api`.

``timer=file`` serves torch's FileTimerServer protocol: a FIFO at
``TORCHELASTIC_TIMER_FILE`` on which workers write one JSON line per request
(``{"version": 1, "pid", "scope_id", "expiration_time", "signal"}``; a negative
expiration releases). torch's ``FileTimerClient`` and ``expires()`` work unchanged, and so
does :func:`elastic_runner.timer.expires`.

Unlike torch's server, this one never kills anything itself (torch's also signals its own
process): it reports each expiry to the agent, which dumps the worker's stacks, stops that
worker's process tree and restarts per policy. It waits in ``poll`` on the FIFO until a
request arrives or the next timer is due: no polling loop.

Workers are not trusted to write well-formed requests. Whatever a line holds, the thread
goes on serving: a bad request is refused (one warning at most every
:data:`WARN_INTERVAL` seconds, with a count of the others) and ignored. A request is
honoured only when

- it is one line of at most ``PIPE_BUF`` bytes holding a JSON object of torch's fields;
- its ``pid`` names a live process of this run's workers' trees (the FIFO cannot tell who
  wrote a line, so a worker may arm a timer for another process of the same job, which it
  could signal directly anyway, but never for the agent, the guardian, pid 1 or any
  process outside the job);
- its ``expiration_time`` is finite and at most :data:`MAX_ARMED` seconds away;
- its ``signal`` is 0 (report the expiry, stop nothing) or one whose default action ends
  a process (:data:`TERMINATING_SIGNALS`); never SIGSTOP, SIGCONT, a signal the process
  ignores by default, or a number that is no signal.

The FIFO itself is private by default: ``<tmp>/elastic-runner-timer-XXXXXXXX/timer.fifo``,
the directory made by ``mkdtemp`` (0700), the FIFO 0600, both removed at exit (and by the
guardian when the agent was killed). A configured path that exists must be a FIFO of this
user, writable by nobody else, and not a symbolic link.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import select
import signal
import stat
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
from elastic_runner.workers.tree import MARKER_ENV

__all__ = [
    "MAX_ARMED",
    "TERMINATING_SIGNALS",
    "FileTimerConfig",
    "FileTimerServer",
    "NoTimerConfig",
    "NoTimerServer",
    "descendant_of_agent",
    "worker_trees",
]

log = logging.getLogger(__name__)

#: Signals a timer may ask for: those whose default action ends the process (0, asking
#: for a report only, is allowed too). Stop, continue and ignore-by-default signals are
#: refused: SIGSTOP'd workers would hang the agent waiting for them to exit.
TERMINATING_SIGNALS = frozenset(
    {
        signal.SIGHUP,
        signal.SIGINT,
        signal.SIGQUIT,
        signal.SIGILL,
        signal.SIGTRAP,
        signal.SIGABRT,
        signal.SIGBUS,
        signal.SIGFPE,
        signal.SIGKILL,
        signal.SIGUSR1,
        signal.SIGSEGV,
        signal.SIGUSR2,
        signal.SIGPIPE,
        signal.SIGALRM,
        signal.SIGTERM,
        signal.SIGXCPU,
        signal.SIGXFSZ,
        signal.SIGVTALRM,
        signal.SIGPROF,
        signal.SIGSYS,
    }
)
#: The longest a timer may be armed for (a year): beyond, the request is refused.
MAX_ARMED = 366 * 24 * 3600.0
#: At most one warning about refused requests per this many seconds.
WARN_INTERVAL = 10.0
#: A request is one atomic write: longer lines may interleave with other workers'.
MAX_LINE = select.PIPE_BUF
MAX_SCOPE = 2048
_MAX_PID = 2**31 - 1
#: Armed timers at most per process and in all (requests beyond are refused).
MAX_TIMERS_PER_PID = 1024
MAX_TIMERS = 65536
#: Bytes read per wake-up before due timers are looked at again (a flood cannot starve
#: them).
_READ_BUDGET = 1 << 20
#: The longest single wait: deadlines far away are re-checked at least this often.
_MAX_WAIT = 3600.0
_DEFAULT_NAME = "timer.fifo"


@dataclass
class NoTimerConfig(TimerConfig):
    server: str = "none"


@dataclass
class FileTimerConfig(TimerConfig):
    server: str = "file"
    #: Path of the FIFO (default: $TORCHELASTIC_TIMER_FILE of the agent if set, else a
    #: new one in a private directory of the temporary directory; not in the run
    #: directory, which may be on a network file system without FIFOs). An existing one
    #: must be a FIFO of this user that no one else may write.
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


@dataclass(frozen=True)
class _Request:
    pid: int
    scope: str
    expiration: float  # < 0: release
    signal: int
    after: float | None


class _Refused(Exception):
    """A request that is not honoured; the message says why."""


PidCheck = Callable[[int], bool]


def descendant_of_agent(pid: int) -> bool:
    """``pid`` is a live (not zombie) descendant of this process. The agent is a child
    subreaper, so its workers' orphans stay its descendants."""
    me = os.getpid()
    try:
        proc = psutil.Process(pid)
        if pid == me or proc.status() == psutil.STATUS_ZOMBIE:
            return False
        for _ in range(4096):  # a bound, should a reused pid ever make a cycle
            parent = proc.parent()
            if parent is None:
                return False
            if parent.pid == me:
                return True
            proc = parent
    except psutil.Error:
        pass
    return False


def worker_trees(marker: str) -> PidCheck:
    """The check ``elastic-run`` gives its server: ``pid`` is a live descendant of this
    agent that carries the workers' marker (``ELASTIC_RUNNER_AGENT``, see
    :mod:`elastic_runner.workers.tree`): a worker or a process it started. Not the
    guardian, a stack dumper or any other helper of the agent."""

    def is_ours(pid: int) -> bool:
        if not descendant_of_agent(pid):
            return False
        try:
            return psutil.Process(pid).environ().get(MARKER_ENV) == marker
        except psutil.Error:
            return False

    return is_ours


class _Warnings:
    """One warning per ``interval`` seconds at most; the ones held back are counted and
    said with the next (or at :meth:`flush`)."""

    def __init__(self, what: str, interval: float = WARN_INTERVAL) -> None:
        self._what = what
        self._interval = interval
        self._next = -math.inf
        self.held = 0

    def __call__(self, message: str, *args: object, exc_info: bool = False) -> None:
        now = time.monotonic()
        if now < self._next:
            self.held += 1
            return
        if self.held:
            message += f" ({self.held} more {self._what} in the last {self._interval:g} s)"
            self.held = 0
        log.warning(message, *args, exc_info=exc_info)
        self._next = now + self._interval

    def flush(self) -> None:
        if self.held:
            log.warning("timer server: %d more %s", self.held, self._what)
            self.held = 0


class FileTimerServer:
    """torch's FIFO protocol, read by a thread that sleeps until a request or a deadline.

    ``is_ours(pid)`` says whether a request for ``pid`` may be honoured (default: any live
    descendant of this process; ``elastic-run`` sets :func:`worker_trees` with
    :meth:`accept_pids`). ``key`` names where the path came from in error messages.
    ``owned`` are paths this server made and removes at :meth:`stop` (a FIFO, then its
    directory); a FIFO that :meth:`start` has to create is added."""

    def __init__(
        self,
        path: str,
        clock: Callable[[], float] = time.time,
        *,
        is_ours: PidCheck | None = None,
        key: str = "timer.path",
        owned: Sequence[str] = (),
    ) -> None:
        self.path = path
        self._clock = clock
        self._is_ours: PidCheck = is_ours or descendant_of_agent
        self._key = key
        self._owned = list(owned)
        self._timers: dict[tuple[int, str], _Timer] = {}
        self._per_pid: dict[int, int] = {}
        self._listener: ExpiryListener | None = None
        self._stop_r: int | None
        self._stop_w: int | None
        self._stop_r, self._stop_w = os.pipe2(os.O_CLOEXEC)
        self._thread: threading.Thread | None = None
        self._fd: int | None = None
        self._keepalive: int | None = None
        self._pending = b""
        self._discarding = False  # in the rest of an overlong line, already refused
        self._refusals = _Warnings("bad timer requests refused")
        self._errors = _Warnings("unexpected errors in the timer server")
        self._failed_once = False
        #: Requests seen (good or bad) and refused.
        self.requests = 0
        self.refused = 0

    @property
    def owned_paths(self) -> tuple[str, ...]:
        """What this server made and removes at exit (what the guardian removes if the
        agent is killed): the FIFO, then its private directory."""
        return tuple(self._owned)

    def accept_pids(self, is_ours: PidCheck) -> None:
        """Honour requests only for pids ``is_ours`` accepts (called from the server's
        thread; must not raise)."""
        self._is_ours = is_ours

    def worker_env(self) -> Mapping[str, str]:
        return {TIMER_FILE_ENV: self.path}

    def on_expired(self, listener: ExpiryListener) -> None:
        self._listener = listener

    def start(self) -> None:
        if not os.path.lexists(self.path):
            os.mkfifo(self.path, 0o600)
            self._owned.insert(0, self.path)
        # O_NOFOLLOW, then the checks on what was opened: nothing can be swapped in
        # between the factory's checks and here.
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOFOLLOW)
        except OSError as exc:
            why = _not_ours(os.lstat(self.path)) if os.path.islink(self.path) else None
            raise ConfigError(
                self._key, self.path, why or f"cannot be opened ({exc.strerror})"
            ) from None
        try:
            problem = _not_ours(os.fstat(fd))
            if problem:
                raise ConfigError(self._key, self.path, problem)
            # Our own writer keeps the FIFO open: no EOF when the last client closes, and
            # a client's non-blocking open always finds a reader. Through /proc: the very
            # FIFO just checked, whatever the path now names.
            proc_path = f"/proc/self/fd/{fd}"
            target = proc_path if os.path.exists(proc_path) else self.path
            self._keepalive = os.open(target, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        self._thread = threading.Thread(target=self._serve, name="timer-server", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            assert self._stop_w is not None
            os.write(self._stop_w, b"\0")
            self._thread.join(5)
            self._thread = None
        for fd in (self._fd, self._keepalive, self._stop_r, self._stop_w):
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._fd = self._keepalive = self._stop_r = self._stop_w = None
        _remove(self._owned)
        self._owned = []
        self._refusals.flush()
        self._errors.flush()

    # -- the thread ---------------------------------------------------------------------

    def _serve(self) -> None:
        assert self._fd is not None and self._stop_r is not None
        poller = select.poll()
        poller.register(self._fd, select.POLLIN)
        poller.register(self._stop_r, select.POLLIN)
        while True:
            try:
                if not self._step(poller):
                    return
            except Exception:  # never die: a dead thread would fire no timer again
                self._unexpected("in the serve loop")
                if self._stopping(0.1):  # and do not spin if the error repeats at once
                    return

    def _stopping(self, timeout: float) -> bool:
        """Wait up to ``timeout`` s for :meth:`stop`; True if it came."""
        assert self._stop_r is not None
        stop = select.poll()
        stop.register(self._stop_r, select.POLLIN)
        try:
            return bool(stop.poll(timeout * 1000))
        except OSError:
            return True

    def _step(self, poller: select.poll) -> bool:
        """One wait, then the requests read and the timers due; False: stop."""
        due = min((t.expiration for t in self._timers.values()), default=None)
        timeout = None
        if due is not None:
            timeout = math.ceil(min(_MAX_WAIT, max(0.0, due - self._clock())) * 1000)
        for fd, events in poller.poll(timeout):
            if fd == self._stop_r or events & select.POLLNVAL:
                return False
            if fd == self._fd:
                self._read()
        self._expire()
        return True

    def _read(self) -> None:
        assert self._fd is not None
        budget = _READ_BUDGET
        while budget > 0:
            try:
                chunk = os.read(self._fd, 65536)
            except BlockingIOError:
                break
            except InterruptedError:
                continue
            if not chunk:
                break
            budget -= len(chunk)
            self._feed(chunk)
        else:
            return  # more to read: the next wait returns at once
        self._drained()

    def _drained(self) -> None:
        """The FIFO is empty. A request is one atomic write of a whole line, so a tail
        without its newline now came from a writer that broke the protocol: dropped, so
        that it cannot corrupt the next worker's request."""
        if self._pending and not self._discarding:
            self._refuse("an unterminated line (no newline at the end of a write)", b"")
        self._pending, self._discarding = b"", False

    def _feed(self, chunk: bytes) -> None:
        if self._discarding:  # in the rest of an overlong line, already refused
            end = chunk.find(b"\n")
            if end < 0:
                return
            chunk, self._discarding = chunk[end + 1 :], False
        *lines, self._pending = (self._pending + chunk).split(b"\n")
        for line in lines:
            self.handle(line)
        if len(self._pending) >= MAX_LINE:
            self._refuse(f"longer than {MAX_LINE} bytes", self._pending)
            self._pending, self._discarding = b"", True

    def handle(self, line: bytes) -> None:
        """One request line (without its newline): armed, released, or refused with a
        (rate-limited) warning. Never raises."""
        if not line.strip():
            return
        self.requests += 1
        try:
            request = _parse(line, self._clock())
            if request.expiration < 0:
                self._release(request.pid, request.scope)
            else:
                self._arm(request)
        except _Refused as refused:
            self._refuse(str(refused), line)
        except Exception:
            self._unexpected("handling a request")

    def _arm(self, request: _Request) -> None:
        key = (request.pid, request.scope)
        if key not in self._timers:
            if self._per_pid.get(request.pid, 0) >= MAX_TIMERS_PER_PID:
                raise _Refused(f"pid {request.pid} has {MAX_TIMERS_PER_PID} timers armed")
            if len(self._timers) >= MAX_TIMERS:
                self._forget_dead()
                if len(self._timers) >= MAX_TIMERS:
                    raise _Refused(f"{MAX_TIMERS} timers are armed")
        if not self._ours(request.pid):
            raise _Refused(f"pid {request.pid} is not a live process of this job's workers")
        # torch's client does not say how long it armed for: estimate from arrival
        armed = request.after
        if armed is None:
            armed = round(max(0.0, request.expiration - self._clock()), 1)
        if key not in self._timers:
            self._per_pid[request.pid] = self._per_pid.get(request.pid, 0) + 1
        self._timers[key] = _Timer(request.expiration, armed, request.signal)

    def _release(self, pid: int, scope: str) -> None:
        if self._timers.pop((pid, scope), None) is not None:
            self._count_down(pid)

    def _count_down(self, pid: int) -> None:
        left = self._per_pid.get(pid, 0) - 1
        if left > 0:
            self._per_pid[pid] = left
        else:
            self._per_pid.pop(pid, None)

    def _forget_dead(self) -> None:
        for pid in list(self._per_pid):
            if not psutil.pid_exists(pid):
                for key in [k for k in self._timers if k[0] == pid]:
                    del self._timers[key]
                del self._per_pid[pid]

    def _ours(self, pid: int) -> bool:
        try:
            return bool(self._is_ours(pid))
        except Exception:
            self._unexpected(f"checking pid {pid}")
            return False

    def _expire(self) -> None:
        now = self._clock()
        due = sorted(
            (timer.expiration, key)
            for key, timer in self._timers.items()
            if timer.expiration <= now
        )
        for _, key in due:
            timer = self._timers.pop(key, None)
            if timer is None:  # went with an earlier timer of its process
                continue
            pid, scope = key
            self._count_down(pid)
            # Exited without releasing (or the pid is someone else's now): nothing to stop.
            if not self._ours(pid):
                continue
            expiry = TimerExpiry(pid, scope, timer.after, timer.signal)
            log.debug("timer for scope %s of pid %d expired after %.1f s", scope, pid, timer.after)
            # Every other timer of that process goes with it (its tree is about to stop).
            for other in [k for k in self._timers if k[0] == pid]:
                del self._timers[other]
            self._per_pid.pop(pid, None)
            if self._listener is not None:
                try:
                    self._listener(expiry)
                except Exception:
                    self._unexpected("reporting an expiry")

    def _refuse(self, why: str, line: bytes) -> None:
        self.refused += 1
        shown = f": {line[:200]!r}" if line else ""
        self._refusals("timer server: refused a request (%s)%s", why, shown)

    def _unexpected(self, where: str) -> None:
        """Logged with its traceback the first time, then rate-limited; the server goes on."""
        first = not self._failed_once
        self._failed_once = True
        self._errors("timer server: unexpected error %s; serving on", where, exc_info=first)


def _parse(line: bytes, now: float) -> _Request:
    """A request line checked field by field; raises :class:`_Refused`."""
    if len(line) >= MAX_LINE:
        raise _Refused(f"longer than {MAX_LINE} bytes")
    try:
        request = json.loads(line)
    except RecursionError:
        raise _Refused("JSON nested too deeply") from None
    except ValueError as exc:  # also not UTF-8, and ints too long to convert
        raise _Refused(f"not JSON: {exc}") from None
    if not isinstance(request, dict):
        raise _Refused(f"not a JSON object but {type(request).__name__}")
    version = request.get("version", 1)
    if type(version) is not int or version != 1:
        raise _Refused(f"unknown version {_short(version)}")
    missing = [k for k in ("pid", "scope_id", "expiration_time") if k not in request]
    if missing:
        raise _Refused("no " + ", ".join(missing))
    pid = request["pid"]
    if type(pid) is not int or not 0 < pid <= _MAX_PID:
        raise _Refused(f"pid {_short(pid)} is not a process id (1 to 2^31-1)")
    scope = request["scope_id"]
    if not isinstance(scope, str) or len(scope) > MAX_SCOPE:
        raise _Refused(f"scope_id is not a string of at most {MAX_SCOPE} characters")
    if any(ord(c) < 32 or 127 <= ord(c) < 160 for c in scope):
        raise _Refused("scope_id holds control characters")
    expiration = _number(request["expiration_time"], "expiration_time")
    if expiration < 0:
        return _Request(pid, scope, -1.0, 0, None)
    if expiration - now > MAX_ARMED:
        raise _Refused(f"expiration_time {expiration:g} is more than a year away")
    if "signal" not in request:
        raise _Refused("no signal")
    sig = request["signal"]
    if type(sig) is not int or (sig != 0 and sig not in TERMINATING_SIGNALS):
        raise _Refused(f"signal {_short(sig)} is not one that ends a process ({_signals()})")
    after = None
    if "after" in request:
        after = _number(request["after"], "after")
        if not 0 <= after <= MAX_ARMED:
            raise _Refused(f"after {after:g} is not 0 to a year")
    return _Request(pid, scope, expiration, sig, after)


def _number(value: object, name: str) -> float:
    if type(value) not in (int, float):
        raise _Refused(f"{name} {_short(value)} is not a number")
    try:
        number = float(value)  # type: ignore[arg-type]  # an int or a float
    except OverflowError:
        number = math.inf
    if not math.isfinite(number):
        raise _Refused(f"{name} {_short(value)} is not finite")
    return number


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _signals() -> str:
    names = sorted(signal.Signals(s).name for s in TERMINATING_SIGNALS)
    return "0 or " + ", ".join(names[:4]) + ", ..."


def _not_ours(st: os.stat_result) -> str | None:
    """Why a FIFO found at the configured path may not be used (None: it may)."""
    if stat.S_ISLNK(st.st_mode):
        return "is a symbolic link; give the FIFO's own path, or leave timer.path unset"
    if not stat.S_ISFIFO(st.st_mode):
        return "exists and is not a FIFO; choose another path"
    me = os.geteuid()
    if st.st_uid != me:
        return (
            f"is owned by {_user(st.st_uid)}, not by this user ({_user(me)}): its owner could "
            "read or forge timer requests; use a FIFO of your own, or leave timer.path unset"
        )
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        mode = stat.S_IMODE(st.st_mode)
        return (
            f"is writable by other users (mode {mode:04o}); make it private "
            "(chmod go-w), or leave timer.path unset"
        )
    return None


def _user(uid: int) -> str:
    try:
        import pwd

        return f"uid {uid} ({pwd.getpwuid(uid).pw_name})"
    except (KeyError, ImportError):
        return f"uid {uid}"


def _remove(paths: Sequence[str]) -> None:
    """Remove a FIFO, then its (then empty) directory; what is already gone is fine."""
    for path in paths:
        with contextlib.suppress(OSError):
            if os.path.isdir(path) and not os.path.islink(path):
                os.rmdir(path)
            else:
                os.unlink(path)


def _file_server(config: FileTimerConfig, context: RunContext) -> FileTimerServer:
    key, path = "timer.path", config.path
    if not path and os.environ.get(TIMER_FILE_ENV):
        key, path = TIMER_FILE_ENV, os.environ[TIMER_FILE_ENV]
    if not path:  # a private directory: no other user can plant, read or replace it
        directory = tempfile.mkdtemp(prefix="elastic-runner-timer-")
        fifo = os.path.join(directory, _DEFAULT_NAME)
        try:
            os.mkfifo(fifo, 0o600)
        except OSError as exc:
            _remove([directory])
            raise ConfigError(
                "timer.path", None, f"cannot make a FIFO in {directory} ({exc.strerror})"
            ) from None
        return FileTimerServer(fifo, owned=(fifo, directory))
    full = os.path.abspath(path)
    try:
        problem = _not_ours(os.lstat(full))
    except FileNotFoundError:
        parent = os.path.dirname(full)
        if not os.path.isdir(parent):
            raise ConfigError(key, path, f"directory {parent} does not exist") from None
        try:
            os.mkfifo(full, 0o600)
        except FileExistsError:  # someone made it just now: check it as any other
            problem = _not_ours(os.lstat(full))
        except OSError as exc:
            raise ConfigError(key, path, f"cannot make a FIFO there ({exc.strerror})") from None
        else:
            return FileTimerServer(full, key=key, owned=(full,))
    except OSError as exc:
        raise ConfigError(key, path, f"cannot be read ({exc.strerror})") from None
    if problem:
        raise ConfigError(key, path, problem)
    return FileTimerServer(full, key=key)


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
