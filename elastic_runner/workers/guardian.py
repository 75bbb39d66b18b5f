"""The guardian: a small process that outlives the agent and sweeps the run's processes
if the agent dies without doing it (SIGKILL, the OOM killer), and fences the workers of an
agent that stopped renewing its lease (frozen, or cut off from the rendezvous store).

The agent starts it with a pipe on its stdin. It writes ``lease <t>`` lines (``t`` in
``time.monotonic()``, one clock for every process of the machine; ``lease -``: no lease)
as its membership of the job is renewed, and ``done`` at a clean exit. End of file without
``done`` means the agent died: the guardian then kills every process in the run's cgroup
when it has one (see :mod:`elastic_runner.workers.cgroup`), then every process that carries
the agent's marker (see :mod:`elastic_runner.workers.tree`). A lease that runs out before the
agent renews it means the other nodes may be re-forming without this one: the guardian
SIGKILLs the marked processes at once, even when the agent itself cannot act (a
SIGSTOPped agent's workers would otherwise run beside the new world). It runs in its own
session, so terminal signals aimed at the agent's group do not reach it.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Sequence

__all__ = ["Guardian", "main"]

#: The run's cgroup (:mod:`elastic_runner.workers.cgroup`), in the guardian's environment.
_CGROUP_ENV = "ELASTIC_RUNNER_GUARDIAN_CGROUP"


#: What the guardian runs while it waits: no ``site``, no package, only the pipe (it
#: costs every agent a few milliseconds of CPU, not a full import of elastic_runner).
#: The sweep, which needs psutil, is imported only when the agent died.
_WAIT = """\
import os, select, sys, time
data, lease = b"", None
def run(name, *more):
    if sys.argv[3]:
        sys.path[:0], sys.argv[3] = sys.argv[3].split(os.pathsep), ""
    from elastic_runner.workers import guardian
    return getattr(guardian, name)([*sys.argv[1:3], *more])
while True:
    timeout = None if lease is None else max(0.0, lease - time.monotonic())
    if not select.select([0], [], [], timeout)[0]:
        run("fence", repr(time.time()))
        lease = None
        continue
    chunk = os.read(0, 4096)
    if not chunk:
        break
    data += chunk
    *lines, data = data.split(b"\\n")
    for line in lines:
        if line.startswith(b"lease "):
            lease = None if line[6:] == b"-" else float(line[6:])
if data == b"done":
    os._exit(0)
sys.exit(run("main", *sys.argv[4:]))
"""


class Guardian:
    """The agent's handle on its guardian process."""

    def __init__(
        self, marker: str, run_id: str, remove: Sequence[str] = (), *, cgroup: str | None = None
    ) -> None:
        """``remove``: paths the agent removes at a clean exit (the timer FIFO and its
        private directory) that the guardian removes after its sweep if the agent died.
        ``cgroup``: the run's cgroup, killed and removed first if the agent died."""
        env = {**os.environ, _CGROUP_ENV: cgroup} if cgroup else None
        self._proc = subprocess.Popen(
            [
                sys.executable,
                "-I",
                "-S",
                "-c",
                _WAIT,
                marker,
                run_id,
                os.pathsep.join(p for p in sys.path if p),
                *remove,
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            start_new_session=True,
            close_fds=True,
            env=env,
        )

    @property
    def pid(self) -> int:
        return self._proc.pid

    def lease(self, deadline: float | None) -> None:
        """The agent's membership holds until ``deadline`` (``time.monotonic()``; ``None``:
        no lease to enforce). Called from any thread: one short write, atomic on a pipe."""
        assert self._proc.stdin is not None
        line = "lease -\n" if deadline is None else f"lease {deadline!r}\n"
        with contextlib.suppress(OSError, ValueError):  # closed: the run is over
            os.write(self._proc.stdin.fileno(), line.encode())

    def close(self) -> None:
        """The agent is exiting cleanly (it swept already): let the guardian go. It exits
        at once on ``done`` (no interpreter teardown), so the wait is short."""
        assert self._proc.stdin is not None
        with contextlib.suppress(BrokenPipeError):
            self._proc.stdin.write(b"done")
            self._proc.stdin.close()
        try:
            self._proc.wait(timeout=2)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()


def main(argv: list[str]) -> int:
    """Sweep every process carrying ``marker`` (the agent of run ``argv[1]`` died), then
    remove the paths that follow (files, then the directories they emptied)."""
    marker, run_id, *remove = argv
    from elastic_runner.workers.tree import kill_processes, marked_processes

    killed: set[int] = _kill_cgroup()
    stuck = kill_processes(
        lambda: marked_processes(marker),
        timeout=10,
        on_kill=lambda procs: killed.update(p.pid for p in procs),
    )
    if killed:
        _say(f"agent of run {run_id} died; killed {len(killed)} process(es) it left behind")
    if stuck:
        _say(f"could not kill (stuck in the kernel?): pids {stuck}")
    for path in remove:
        with contextlib.suppress(OSError):
            if os.path.isdir(path) and not os.path.islink(path):
                os.rmdir(path)
            else:
                os.unlink(path)
    return 0


def fence(argv: list[str]) -> int:
    """The agent of run ``argv[1]`` let its lease run out (noticed at wall-clock time
    ``argv[2]``): SIGKILL every process carrying ``marker`` that existed then, in one pass.
    Younger ones belong to the attempt the agent started after joining again."""
    marker, run_id = argv[:2]
    noticed = float(argv[2]) if len(argv) > 2 else float("inf")
    import signal

    from elastic_runner.workers.tree import marked_processes

    killed = 0
    for proc in marked_processes(marker):
        with contextlib.suppress(Exception):
            if proc.create_time() > noticed:
                continue
            proc.send_signal(signal.SIGKILL)
            killed += 1
    if killed:
        _say(
            f"agent of run {run_id} did not renew its membership in time (frozen, or cut "
            f"off from the rendezvous store): killed {killed} worker process(es)"
        )
    return 0


def _kill_cgroup() -> set[int]:
    """Kill every process in the run's cgroup, if it has one (whatever environment or
    session they gave themselves), and remove it; the pids killed."""
    path = os.environ.get(_CGROUP_ENV)
    if not path:
        return set()
    from pathlib import Path

    from elastic_runner.workers.cgroup import kill, remove

    found, stuck = kill(Path(path), timeout=10)
    if stuck:
        _say(f"could not kill processes in {path} (stuck in the kernel?): pids {stuck}")
    remove(Path(path))
    return set(found)


def _say(message: str) -> None:
    with contextlib.suppress(BrokenPipeError, OSError):
        print(f"[elastic-run guardian] {message}", file=sys.stderr, flush=True)
