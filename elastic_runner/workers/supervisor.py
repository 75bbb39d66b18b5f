"""Starting, watching and stopping worker processes on this node.

One ``select`` waits on everything: a pidfd per worker (readable the moment the process
exits, so detection is immediate and nothing polls), each worker's stdout and stderr pipe
(teed line by line), and a wake pipe that signal handlers and other threads write to.

Each worker leads its own process group and gets PR_SET_PDEATHSIG=SIGKILL, so a dying
agent takes its workers along and a stop reaches shell grandchildren too. Where the run has
a cgroup (:mod:`elastic_runner.workers.cgroup`), each worker moves itself into a cgroup of
its attempt before ``exec``, and the attempt ends by killing that cgroup: no descendant
escapes by leaving its session or clearing its environment.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import selectors
import signal
import subprocess
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from elastic_runner.progress import HEARTBEAT_FD_ENV, read_steps
from elastic_runner.spec import WorkerActivity, WorkerExit
from elastic_runner.workers.cgroup import RunCgroup
from elastic_runner.workers.launcher import WorkerLaunch
from elastic_runner.workers.logs import Console, LineTee, WriteFaults
from elastic_runner.workers.tree import (
    MARKER_ENV,
    kill_processes,
    marked_descendants,
    reap_children,
    subreaper,
)

__all__ = ["ProcessSupervisor"]

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True)
_prctl = _libc.prctl
#: How long to wait after SIGKILL before giving up on a process (stuck in the kernel).
_KILL_WAIT = 5.0


@dataclass
class _Proc:
    launch: WorkerLaunch
    popen: subprocess.Popen[bytes]
    pidfd: int
    #: Open output pipes by fd: the pipe's file object and its tee.
    streams: dict[int, tuple[IO[bytes], LineTee]] = field(default_factory=dict)
    stopping: bool = False
    last_output: float = 0.0
    last_heartbeat: float | None = None
    heartbeat_fd: int | None = None
    #: An unfinished step message from the heartbeat pipe.
    beat_rest: bytes = b""

    @property
    def pid(self) -> int:
        return self.popen.pid


def _child_setup(parent_pid: int, cgroup_procs: int | None = None) -> Callable[[], None]:
    def setup() -> None:
        # Runs in the child between fork and exec: only async-signal-safe-ish work.
        os.setpgid(0, 0)
        _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if cgroup_procs is not None:  # into its cgroup before it can fork: all its
            with contextlib.suppress(OSError):  # descendants start there (the agent checks)
                os.write(cgroup_procs, b"0")
        if os.getppid() != parent_pid:  # the agent died before prctl took effect
            os._exit(1)

    return setup


def _wait_exited(popen: subprocess.Popen[bytes]) -> tuple[int, int]:
    """Reap an exited child: its Popen-style return code and its peak RSS in bytes (the
    kernel's ``ru_maxrss``, from ``wait4``; 0 if someone else reaped it)."""
    try:
        _, status, usage = os.wait4(popen.pid, 0)
    except ChildProcessError:
        return popen.wait(), 0
    popen.returncode = os.waitstatus_to_exitcode(status)
    return popen.returncode, usage.ru_maxrss * 1024  # KiB on Linux


class ProcessSupervisor:
    """Starts a group's processes, waits for them and stops them (honcho's manager, with an
    injectable clock).

    Teed output goes to ``console`` (``None`` = files only) from the workers whose global
    rank is in ``console_ranks`` and whose local rank is in ``console_local_ranks``
    (``None`` = all), and from their streams in ``console_streams`` (1 = stdout,
    2 = stderr); the log files always get everything. ``marker`` is put in every worker's
    environment (as ``ELASTIC_RUNNER_AGENT``); every stop ends by killing this process's
    descendants that carry it. With a ``cgroup`` (which it then owns and closes), each attempt's
    workers start in cgroups of their own and a stop first kills every process in them.
    Not thread-safe except :meth:`wake`.
    """

    def __init__(
        self,
        *,
        marker: str,
        console: Console | None = None,
        console_ranks: Collection[int] | None = None,
        console_local_ranks: Collection[int] | None = None,
        console_streams: Collection[int] = (1, 2),
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        cgroup: RunCgroup | None = None,
    ) -> None:
        self.marker = marker
        self.cgroup = cgroup
        #: Attempts started (each :meth:`start`), and whether the last one's cgroup is live.
        self._attempt = 0
        self._attempt_live = False
        self._uncontained_warned = False
        # Restored at close: under launch() this is the caller's process.
        self._process_state = contextlib.ExitStack()
        self._process_state.enter_context(subreaper())
        self._console = console
        self._console_ranks = None if console_ranks is None else frozenset(console_ranks)
        self._console_local_ranks = (
            None if console_local_ranks is None else frozenset(console_local_ranks)
        )
        self._console_streams = frozenset(console_streams)
        #: Failed writes of worker logs: one warning per error, then that file is dropped.
        self._log_faults = WriteFaults.worker_logs()
        self._clock = clock
        self._wall_clock = wall_clock
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._sel.register(self._wake_r, selectors.EVENT_READ, None)
        self._procs: dict[int, _Proc] = {}
        #: Process groups of this attempt's workers, swept when the attempt ends.
        self._pgids: set[int] = set()
        #: The furthest step reported in this attempt (heartbeat(step=...)).
        self._furthest_step: int | None = None
        #: Every worker's process group, for orphans that die unseen (see reap_children).
        self._groups_ever: set[int] = set()

    # -- public interface ---------------------------------------------------------------

    def start(self, launches: Sequence[WorkerLaunch]) -> dict[int, int]:
        """Start every worker; returns {local_rank: pid}. On a spawn error, workers
        already started are stopped and the error is raised."""
        started: dict[int, int] = {}
        self._attempt += 1
        self._furthest_step = None
        self._attempt_live = self.cgroup is not None
        if self._console:
            self._console.expect(sum(1 for la in launches if self._to_console(la)))
        try:
            for launch in launches:
                started[launch.local_rank] = self._spawn(launch)
        except BaseException:
            self.stop(signal.SIGKILL, 0)
            raise
        return started

    def furthest_step(self) -> int | None:
        """The furthest step any worker of this attempt reported (``heartbeat(step=)``),
        exited ones included; ``None`` when none did."""
        return self._furthest_step

    def activity(self) -> dict[int, WorkerActivity]:
        """Signs of life of each running worker (safe to call from another thread)."""
        return {
            p.launch.local_rank: WorkerActivity(p.last_output, p.last_heartbeat)
            for p in list(self._procs.values())
        }

    @property
    def running(self) -> list[int]:
        """Local ranks whose process has not been seen to exit."""
        return sorted(self._procs)

    def wait(self, timeout: float | None = None) -> list[WorkerExit]:
        """Block until at least one worker exits, :meth:`wake` is called, or ``timeout``
        passes; tees worker output meanwhile. Returns the exits seen (maybe none)."""
        deadline = None if timeout is None else self._clock() + timeout
        while True:
            remaining = None if deadline is None else max(0.0, deadline - self._clock())
            exits, woken = self._poll(remaining)
            if exits or woken or (deadline is not None and self._clock() >= deadline):
                return exits

    @property
    def wake_fd(self) -> int:
        """The write end of the wake-up pipe (non-blocking): a byte written to it makes a
        blocked :meth:`wait` return (``signal.set_wakeup_fd``)."""
        return self._wake_w

    def wake(self) -> None:
        """Make a blocked :meth:`wait` return (safe from signal handlers and threads)."""
        with contextlib.suppress(BlockingIOError):  # a wake-up is already pending
            os.write(self._wake_w, b"\0")

    def kill(self, local_rank: int, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to one worker's process group; its exit comes back from
        :meth:`wait` as a failure (not as stopped by the agent)."""
        proc = self._procs.get(local_rank)
        if proc is not None:
            self._signal_group(proc, sig)

    def stop(self, sig: int, timeout: float) -> list[WorkerExit]:
        """Send ``sig`` to every worker's process group, wait up to ``timeout`` s, then
        SIGKILL what is left; returns the exits of workers that were still running (marked
        ``stopped_by_agent``). Then every leftover process of the attempt is killed: what
        is left in the workers' groups, and any descendant carrying the marker (``setsid``
        daemons, double forks)."""
        exits: list[WorkerExit] = []
        for proc in self._procs.values():
            proc.stopping = True
        self._signal_groups(sig)
        exits += self._wait_all(timeout)
        if self._procs:
            self._signal_groups(signal.SIGKILL)
            exits += self._wait_all(_KILL_WAIT)
        for proc in list(self._procs.values()):
            log.error(
                "worker local_rank %d (pid %d) did not exit after SIGKILL (stuck in the "
                "kernel?); giving up on it",
                proc.launch.local_rank,
                proc.pid,
            )
            self._forget(proc)
        self._sweep_groups()
        if self.cgroup is not None and self._attempt_live:
            self._attempt_live = False
            stuck = self.cgroup.end_attempt(self._attempt, timeout=_KILL_WAIT)
            if stuck:
                log.error("could not kill processes in the attempt's cgroup: %s", stuck)
        # Second net: processes outside the cgroup (a worker that could not enter it).
        stuck = kill_processes(lambda: marked_descendants(self.marker), timeout=_KILL_WAIT)
        if stuck:
            log.error("could not kill leftover processes (stuck in the kernel?): %s", stuck)
        reap_children((), self._groups_ever, keep=(p.pid for p in self._procs.values()))
        if self._console:
            self._console.flush(everything=True)
        return exits

    def close(self) -> None:
        if self._procs or self._attempt_live:
            self.stop(signal.SIGKILL, 0)
        if self.cgroup is not None:
            stuck = self.cgroup.close(timeout=_KILL_WAIT)
            if stuck:
                log.error("could not kill processes in the run's cgroup: %s", stuck)
        reap_children((), self._groups_ever)
        self._sel.close()
        os.close(self._wake_r)
        os.close(self._wake_w)
        self._process_state.close()

    # -- internals ----------------------------------------------------------------------

    def _spawn(self, launch: WorkerLaunch) -> int:
        try:  # a disk fault costs the worker its log files, never its life
            launch.logs.dir.mkdir(parents=True, exist_ok=True)
            logs_ok = True
        except OSError as exc:
            self._log_faults.failed(launch.logs.dir, exc)
            logs_ok = False
        env = {**launch.env, MARKER_ENV: self.marker}
        beat_r = beat_w = None
        if launch.heartbeat:
            beat_r, beat_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
            env[HEARTBEAT_FD_ENV] = str(beat_w)
        leaf, procs_fd = self._worker_cgroup(launch.local_rank)
        try:
            popen = subprocess.Popen(
                list(launch.argv),
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                preexec_fn=_child_setup(os.getpid(), procs_fd),
                close_fds=True,
                pass_fds=() if beat_w is None else (beat_w,),
            )
        except BaseException:
            for fd in (beat_r, beat_w):
                if fd is not None:
                    os.close(fd)
            raise
        finally:
            if procs_fd is not None:
                os.close(procs_fd)
        if beat_w is not None:
            os.close(beat_w)
        if leaf is not None:
            self._check_contained(popen.pid, leaf)
        pidfd = os.pidfd_open(popen.pid)
        proc = _Proc(launch, popen, pidfd, last_output=self._clock(), heartbeat_fd=beat_r)
        if beat_r is not None:
            self._sel.register(beat_r, selectors.EVENT_READ, proc)
        prefix = launch.prefix.encode()
        console = self._console if self._to_console(launch) else None
        for number, stream, path in (
            (1, popen.stdout, launch.logs.stdout),
            (2, popen.stderr, launch.logs.stderr),
        ):
            assert stream is not None
            fd = stream.fileno()
            os.set_blocking(fd, False)
            tee = LineTee(
                path if logs_ok else None,
                console if number in self._console_streams else None,
                number,
                launch.global_rank,
                prefix,
                self._log_faults,
            )
            proc.streams[fd] = (stream, tee)
            self._sel.register(fd, selectors.EVENT_READ, proc)
        self._sel.register(pidfd, selectors.EVENT_READ, proc)
        self._procs[launch.local_rank] = proc
        self._pgids.add(popen.pid)
        self._groups_ever.add(popen.pid)
        return popen.pid

    def _worker_cgroup(self, local_rank: int) -> tuple[Path | None, int | None]:
        """The cgroup a worker starts in and its ``cgroup.procs``, opened for the child to
        write itself into (``None``s without a cgroup, or if it cannot be made)."""
        if self.cgroup is None:
            return None, None
        try:
            leaf = self.cgroup.worker(self._attempt, local_rank)
            return leaf, os.open(leaf / "cgroup.procs", os.O_WRONLY | os.O_CLOEXEC)
        except OSError as exc:
            self._warn_uncontained(f"cannot make its cgroup: {exc.strerror or exc}")
            return None, None

    def _check_contained(self, pid: int, leaf: Path) -> None:
        """The child moved itself into ``leaf`` (else move it now, late: what it forked
        already is outside, for the marker sweep)."""
        assert self.cgroup is not None
        where = "/" + str(leaf.relative_to(self.cgroup.path.parent))
        try:
            with open(f"/proc/{pid}/cgroup") as f:  # a zombie's too: its last cgroup
                if any(ln.startswith("0::") and ln.rstrip("\n").endswith(where) for ln in f):
                    return
            (leaf / "cgroup.procs").write_text(str(pid))
        except OSError as exc:
            self._warn_uncontained(f"cannot move it into {leaf}: {exc.strerror or exc}")

    def _oom_killed(self, local_rank: int) -> bool:
        cgroup = self.cgroup
        return bool(cgroup and cgroup.memory_max and cgroup.oom_kills(self._attempt, local_rank))

    def _warn_uncontained(self, why: str) -> None:
        if not self._uncontained_warned:
            self._uncontained_warned = True
            log.warning(
                "a worker runs outside the run's cgroup (%s); its leftovers are found by "
                "the ELASTIC_RUNNER_AGENT marker only",
                why,
            )

    def _to_console(self, launch: WorkerLaunch) -> bool:
        """Whether any of the worker's output reaches the console: what the collapsing
        console counts as its ranks (a line waits for each of them)."""
        return (
            bool(self._console_streams)
            and (self._console_ranks is None or launch.global_rank in self._console_ranks)
            and (
                self._console_local_ranks is None or launch.local_rank in self._console_local_ranks
            )
        )

    def _poll(self, timeout: float | None) -> tuple[list[WorkerExit], bool]:
        exits: list[WorkerExit] = []
        woken = False
        due = self._console.next_deadline() if self._console else None
        if due is not None:
            until = max(0.0, due - self._clock())
            timeout = until if timeout is None else min(timeout, until)
        for key, _ in self._sel.select(timeout):
            proc = key.data
            if proc is None:
                woken = True
                self._drain_wake()
            elif key.fd == proc.pidfd:
                exits.append(self._reap(proc))
            elif key.fd in proc.streams:
                self._read(proc, key.fd)
            elif key.fd == proc.heartbeat_fd:
                self._read_heartbeat(proc)
        if self._console:
            self._console.flush()
        return exits, woken

    def _read(self, proc: _Proc, fd: int) -> None:
        while True:
            try:
                data = os.read(fd, 65536)
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno != errno.EIO:
                    raise
                data = b""
            if not data:
                self._close_stream(proc, fd)
                return
            proc.last_output = self._clock()
            proc.streams[fd][1].feed(data)

    def _read_heartbeat(self, proc: _Proc) -> None:
        assert proc.heartbeat_fd is not None
        try:
            data = os.read(proc.heartbeat_fd, 4096)
        except BlockingIOError:
            return
        if data:
            proc.last_heartbeat = self._clock()
            step, proc.beat_rest = read_steps(proc.beat_rest + data)
            if step is not None and (self._furthest_step is None or step > self._furthest_step):
                self._furthest_step = step
        else:  # every writer closed it
            self._close_heartbeat(proc)

    def _close_heartbeat(self, proc: _Proc) -> None:
        if proc.heartbeat_fd is not None:
            self._sel.unregister(proc.heartbeat_fd)
            os.close(proc.heartbeat_fd)
            proc.heartbeat_fd = None

    def _close_stream(self, proc: _Proc, fd: int) -> None:
        self._sel.unregister(fd)
        pipe, tee = proc.streams.pop(fd)
        tee.close()
        pipe.close()

    def _reap(self, proc: _Proc) -> WorkerExit:
        timestamp = self._wall_clock()
        returncode, max_rss = _wait_exited(proc.popen)  # the pidfd is readable: it has exited
        if returncode < 0 and self._oom_killed(proc.launch.local_rank):
            log.warning(
                "worker local_rank %d was killed by the kernel at its memory.max "
                "(job.limits.memory)",
                proc.launch.local_rank,
            )
        # Output written before the exit comes before the exit in every report.
        for fd in list(proc.streams):
            self._read(proc, fd)
        launch = proc.launch
        self._forget(proc)
        return WorkerExit(
            local_rank=launch.local_rank,
            global_rank=launch.global_rank,
            pid=proc.pid,
            returncode=returncode,
            timestamp=timestamp,
            stopped_by_agent=proc.stopping,
            max_rss=max_rss,
        )

    def _forget(self, proc: _Proc) -> None:
        """Stop watching ``proc``; streams a grandchild still holds are closed here."""
        self._procs.pop(proc.launch.local_rank, None)
        if proc.pidfd in self._sel.get_map():
            self._sel.unregister(proc.pidfd)
            os.close(proc.pidfd)
        for fd in list(proc.streams):
            self._close_stream(proc, fd)
        self._close_heartbeat(proc)

    def _wait_all(self, timeout: float) -> list[WorkerExit]:
        exits: list[WorkerExit] = []
        deadline = self._clock() + timeout
        while self._procs:
            remaining = deadline - self._clock()
            if remaining <= 0:
                break
            got, _ = self._poll(remaining)
            exits += got
        return exits

    def _signal_groups(self, sig: int) -> None:
        for proc in self._procs.values():
            self._signal_group(proc, sig)

    @staticmethod
    def _signal_group(proc: _Proc, sig: int) -> None:
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        except PermissionError:  # the group leader changed its group; reach it alone
            proc.popen.send_signal(sig)

    def _sweep_groups(self) -> None:
        for pgid in self._pgids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, signal.SIGKILL)
        self._pgids.clear()

    def _drain_wake(self) -> None:
        try:
            while os.read(self._wake_r, 4096):
                pass
        except BlockingIOError:
            pass
