"""Containing a run's workers in a cgroup (v2), so that none of their descendants escapes.

A process can leave its process group and session (``setsid``) and clear or overwrite its
environment (``env -i``), which hides it from the marker sweep of
:mod:`elastic_runner.workers.tree`; it does not leave its cgroup by forking, changing
session or exec'ing: only a write to another cgroup's ``cgroup.procs`` moves it (which a
process running as root may do on purpose; that one is not contained). So each worker
starts in a cgroup of the run, and an attempt ends by killing every process in its cgroup:
``cgroup.kill`` (Linux 5.14), else ``cgroup.freeze`` and SIGKILL to each pid until none is
left.

Layout, under the cgroup the agent itself is in (``C``)::

    C/elastic-run.<agent pid>.<id>/     the run (no process of its own)
        attempt-<n>/                    one attempt's workers
            rank-<local_rank>/          one worker and all its descendants

The agent's own cgroup is only read and added to: nothing is moved out of it, and no
controller is enabled in it. A child cgroup without controllers needs no "no internal
processes" dance, so containment works wherever the agent may create a directory in its
own cgroup (root on a host or VM, a container with a writable cgroup namespace, a user to
whom systemd delegated the cgroup). ``memory.max`` needs the memory controller, which only
a cgroup that already hands it to its children provides: when ``C`` does,
``job.limits.memory`` is also set as each worker's ``memory.max``.

Nothing here imports psutil or the rest of the package: the guardian imports it after the
agent died, to kill and remove the run's cgroup (:func:`kill` and :func:`remove`).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "DISABLE_ENV",
    "CgroupUnavailable",
    "RunCgroup",
    "contain",
    "kill",
    "locate",
    "own_cgroup",
    "procs",
    "remove",
]

log = logging.getLogger(__name__)

#: ``ELASTIC_RUNNER_CGROUP=0`` in the agent's environment: no cgroup, the marker sweep only.
DISABLE_ENV = "ELASTIC_RUNNER_CGROUP"


class CgroupUnavailable(Exception):
    """Cgroup containment cannot be used here; the message says why."""


# -- where the agent's cgroup is --------------------------------------------------------


def _unescape(field: str) -> str:
    r"""A mountinfo path field: spaces, tabs, newlines and backslashes come as ``\NNN``."""
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and field[i + 1 : i + 4].isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def locate(proc_cgroup: str, mountinfo: str) -> Path:
    """The directory of this process's cgroup v2 in a mounted cgroup2 file system, from
    the text of ``/proc/self/cgroup`` and ``/proc/self/mountinfo``. Raises
    :class:`CgroupUnavailable` saying why there is none (or it is read-only)."""
    own = next((ln[3:] for ln in proc_cgroup.splitlines() if ln.startswith("0::")), None)
    if own is None:
        raise CgroupUnavailable("no cgroup v2 hierarchy (no '0::' line in /proc/self/cgroup)")
    if not own.startswith("/") or ".." in own.split("/"):  # "/../..": outside our namespace
        raise CgroupUnavailable(f"this process's cgroup {own!r} is outside its namespace")
    mounts: list[tuple[str, str, bool]] = []
    for line in mountinfo.splitlines():
        fields, _, after = line.partition(" - ")
        parts, tail = fields.split(), after.split()
        if len(parts) >= 6 and tail and tail[0] == "cgroup2":
            read_only = "ro" in parts[5].split(",")
            mounts.append((_unescape(parts[3]), _unescape(parts[4]), read_only))
    if not mounts:
        raise CgroupUnavailable("cgroup2 is not mounted (no cgroup2 in /proc/self/mountinfo)")
    read_only_at = None
    for root, mountpoint, read_only in mounts:
        base = root.rstrip("/")
        if own != root and not own.startswith(base + "/"):
            continue
        if read_only:
            read_only_at = mountpoint
            continue
        return Path(mountpoint, own[len(base) :].lstrip("/"))
    if read_only_at is not None:
        raise CgroupUnavailable(f"cgroup2 is mounted read-only at {read_only_at}")
    roots = ", ".join(f"{root} at {mountpoint}" for root, mountpoint, _ in mounts)
    raise CgroupUnavailable(f"this process's cgroup {own} is under no cgroup2 mount ({roots})")


def own_cgroup() -> Path:
    """The directory of this process's cgroup (v2); :class:`CgroupUnavailable` if none."""
    try:
        with open("/proc/self/cgroup") as f:
            cgroup = f.read()
        with open("/proc/self/mountinfo") as f:
            mountinfo = f.read()
    except OSError as exc:
        raise CgroupUnavailable(f"cannot read /proc/self: {exc.strerror or exc}") from None
    return locate(cgroup, mountinfo)


# -- killing and removing (also the guardian's) -----------------------------------------


def _cgroups(path: Path) -> Iterator[Path]:
    """``path`` and every cgroup below it, children first."""
    for dirpath, _, _ in os.walk(path, topdown=False):
        yield Path(dirpath)


def procs(path: Path) -> list[int]:
    """The pids in cgroup ``path`` and below (none if it does not exist)."""
    pids: list[int] = []
    for cgroup in _cgroups(path):
        with contextlib.suppress(OSError):  # removed meanwhile
            pids += (int(p) for p in (cgroup / "cgroup.procs").read_text().split())
    return pids


def _populated(path: Path) -> bool:
    """Some process is in cgroup ``path`` or below (``False`` once it is removed)."""
    try:
        events = (path / "cgroup.events").read_text()
    except OSError:  # removed, or no cgroup.events (gVisor): ask cgroup.procs
        return bool(procs(path))
    return "populated 1" in events


def _write(path: Path, value: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)


def kill(
    path: Path, timeout: float = 5.0, *, use_kill_file: bool = True
) -> tuple[list[int], list[int]]:
    """SIGKILL every process in cgroup ``path`` and below, and wait until none is left.
    ``cgroup.kill`` where the kernel has it (one write, no race with ``fork``); else the
    cgroup is frozen (``cgroup.freeze``, where it exists: no fork while we kill) and each
    pid is SIGKILLed until ``cgroup.procs`` is empty. Returns the pids there were, and those
    still there after ``timeout`` s (stuck in the kernel)."""
    found = procs(path)
    if not found and not _populated(path):
        return [], []
    deadline = time.monotonic() + timeout
    kill_file, freeze = path / "cgroup.kill", path / "cgroup.freeze"
    killed_at_once = False
    if use_kill_file:
        try:
            _write(kill_file, "1")
            killed_at_once = True
        except OSError:
            pass  # an older kernel (or gVisor): one pid at a time
    frozen = False
    if not killed_at_once:
        with contextlib.suppress(OSError):
            _write(freeze, "1")
            frozen = True
    pause = 0.0005
    try:
        while _populated(path):
            if not killed_at_once:
                for pid in procs(path):
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.kill(pid, signal.SIGKILL)
            if time.monotonic() >= deadline:
                return found, procs(path)
            time.sleep(pause)
            pause = min(pause * 2, 0.02)
    finally:
        if frozen:  # a stuck process must not stay frozen too; new ones may come in
            with contextlib.suppress(OSError):
                _write(freeze, "0")
    return found, []


def remove(path: Path, timeout: float = 1.0) -> bool:
    """Remove cgroup ``path`` and every cgroup below it, once they are empty (their
    processes may take a moment to leave after a kill); True once it is gone."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            for cgroup in _cgroups(path):
                with contextlib.suppress(FileNotFoundError):
                    cgroup.rmdir()
            return True
        except OSError as exc:
            if exc.errno != errno.EBUSY or time.monotonic() >= deadline:
                return not path.exists()
            time.sleep(0.005)


# -- the run's cgroup -------------------------------------------------------------------


@dataclass
class RunCgroup:
    """One run's cgroup: an attempt's cgroup per :meth:`worker` leaf, killed and removed
    by :meth:`end_attempt`; everything killed and removed by :meth:`close`."""

    path: Path
    #: Each worker's ``memory.max`` (the memory controller reaches the workers' cgroups).
    memory_max: int | None = None
    #: The kernel kills a whole cgroup in one write (``cgroup.kill``).
    kill_file: bool = True

    @classmethod
    def create(
        cls, name: str, *, memory_limit: int | None = None, parent: Path | None = None
    ) -> RunCgroup:
        """Make the run's cgroup ``name`` under ``parent`` (default: the agent's own
        cgroup) and prove it works: a short-lived process is moved into it and killed.
        Raises :class:`CgroupUnavailable` (with nothing left behind) if it does not."""
        parent = own_cgroup() if parent is None else parent
        path = parent / name
        try:
            path.mkdir()
        except OSError as exc:
            why = exc.strerror or str(exc)
            if exc.errno in (errno.EACCES, errno.EPERM):
                why += f" (uid {os.getuid()}: the cgroup is not delegated to this user)"
            raise CgroupUnavailable(f"cannot create a cgroup in {parent}: {why}") from None
        try:
            cgroup = cls(path)
            cgroup._probe()
            if memory_limit:
                cgroup._enable_memory(memory_limit)
        except BaseException:
            kill(path)
            remove(path)
            raise
        return cgroup

    def worker(self, attempt: int, local_rank: int) -> Path:
        """A new cgroup for one worker of ``attempt``; with ``memory.max`` set if the run
        has it. Its ``cgroup.procs`` is where the worker moves itself before ``exec``."""
        attempt_dir = self.path / f"attempt-{attempt}"
        if not attempt_dir.exists():
            attempt_dir.mkdir()
            if self.memory_max is not None:
                _write(attempt_dir / "cgroup.subtree_control", "+memory")
        leaf = attempt_dir / f"rank-{local_rank}"
        leaf.mkdir()
        if self.memory_max is not None:
            _write(leaf / "memory.max", str(self.memory_max))
            with contextlib.suppress(OSError):  # the whole tree goes, as a sampled kill does
                _write(leaf / "memory.oom.group", "1")
        return leaf

    def end_attempt(self, attempt: int, timeout: float = 5.0) -> list[int]:
        """Kill every process of ``attempt`` (whatever session, group or environment it
        gave itself) and remove its cgroups; the pids stuck in the kernel after
        ``timeout`` s."""
        attempt_dir = self.path / f"attempt-{attempt}"
        _, stuck = kill(attempt_dir, timeout, use_kill_file=self.kill_file)
        remove(attempt_dir)
        return stuck

    def oom_kills(self, attempt: int, local_rank: int) -> int:
        """How many processes of one worker the kernel killed at its ``memory.max``."""
        events = self.path / f"attempt-{attempt}" / f"rank-{local_rank}" / "memory.events"
        with contextlib.suppress(OSError, ValueError):
            for line in events.read_text().splitlines():
                if line.startswith("oom_kill "):
                    return int(line.split()[1])
        return 0

    def close(self, timeout: float = 5.0) -> list[int]:
        """Kill whatever is left in the run's cgroup and remove it; the stuck pids."""
        _, stuck = kill(self.path, timeout, use_kill_file=self.kill_file)
        remove(self.path)
        return stuck

    def _probe(self) -> None:
        """Move a short-lived process into a cgroup of the run and kill it by cgroup."""
        probe = self.path / "probe"
        probe.mkdir()
        sleep = shutil.which("sleep")
        argv = (
            [sleep, "30"] if sleep else [sys.executable, "-S", "-c", "import time; time.sleep(30)"]
        )
        child = subprocess.Popen(argv, stdin=subprocess.DEVNULL, close_fds=True)
        try:
            try:
                _write(probe / "cgroup.procs", str(child.pid))
            except OSError as exc:
                raise CgroupUnavailable(
                    f"cannot move a process into a cgroup ({probe}: {exc.strerror or exc})"
                ) from None
            self.kill_file = (probe / "cgroup.kill").exists()
            kill(probe, timeout=2.0, use_kill_file=self.kill_file)
            try:
                child.wait(timeout=2.0)  # it left the cgroup: it is (about to be) a zombie
            except subprocess.TimeoutExpired:
                raise CgroupUnavailable(
                    f"a process in {probe} did not die when its cgroup was killed"
                ) from None
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()
            remove(probe)

    def _enable_memory(self, limit: int) -> None:
        """Hand the memory controller to the workers' cgroups, if the agent's cgroup hands
        it to the run's: then each worker's ``memory.max`` is ``limit``."""
        try:
            controllers = (self.path / "cgroup.controllers").read_text().split()
        except OSError:
            return
        if "memory" not in controllers:
            return
        try:
            _write(self.path / "cgroup.subtree_control", "+memory")
        except OSError as exc:
            log.debug("memory controller for %s: %s", self.path, exc)
            return
        self.memory_max = limit


def contain(name: str, memory_limit: int | None = None) -> RunCgroup | None:
    """The run's cgroup, or ``None`` where cgroups cannot be used; either way one line in
    the agent's log says so (an info line for ``None``: the marker sweep still runs)."""
    if os.environ.get(DISABLE_ENV, "").strip().lower() in ("0", "off", "false", "no"):
        log.info("%s=%s: no cgroup containment; %s", DISABLE_ENV, os.environ[DISABLE_ENV], _WITHOUT)
        return None
    try:
        cgroup = RunCgroup.create(name, memory_limit=memory_limit)
    except CgroupUnavailable as exc:
        log.info("cgroup containment unavailable (%s); %s", exc, _WITHOUT)
        return None
    how = "cgroup.kill" if cgroup.kill_file else "cgroup.freeze and SIGKILL to each process"
    log.debug("workers are contained in cgroup %s (killed with %s)", cgroup.path, how)
    if memory_limit and cgroup.memory_max is None:
        log.info(
            "job.limits.memory is enforced by sampling only: the memory controller is not "
            "available to %s (no memory.max)",
            cgroup.path,
        )
    return cgroup


_WITHOUT = (
    "leftover processes are found by the ELASTIC_RUNNER_AGENT marker only, so one that "
    "clears its environment and calls setsid can outlive the run"
)
