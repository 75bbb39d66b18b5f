"""The guardian: a small process that outlives the agent and sweeps the run's processes
if the agent dies without doing it (SIGKILL, the OOM killer).

The agent starts it with a pipe on its stdin and never writes to it until a clean exit,
when it writes ``done``. End of file without ``done`` means the agent died: the guardian
then kills every process that carries the agent's marker (see
:mod:`elastic_runner.workers.tree`). It runs in its own session, so terminal signals aimed
at the agent's group do not reach it.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys

__all__ = ["Guardian", "main"]


#: What the guardian runs while it waits: no ``site``, no package, only the pipe (it
#: costs every agent a few milliseconds of CPU, not a full import of elastic_runner).
#: The sweep, which needs psutil, is imported only when the agent died.
_WAIT = """\
import os, sys
data = b""
while chunk := os.read(0, 64):
    data += chunk
if data == b"done":
    os._exit(0)
sys.path[:0] = sys.argv[3].split(os.pathsep)
from elastic_runner.workers.guardian import main
sys.exit(main(sys.argv[1:3]))
"""


class Guardian:
    """The agent's handle on its guardian process."""

    def __init__(self, marker: str, run_id: str) -> None:
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
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            start_new_session=True,
            close_fds=True,
        )

    @property
    def pid(self) -> int:
        return self._proc.pid

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
    """Sweep every process carrying ``marker`` (the agent of run ``argv[1]`` died)."""
    marker, run_id = argv
    from elastic_runner.workers.tree import kill_processes, marked_processes

    killed: set[int] = set()
    stuck = kill_processes(
        lambda: marked_processes(marker),
        timeout=10,
        on_kill=lambda procs: killed.update(p.pid for p in procs),
    )
    if killed:
        _say(f"agent of run {run_id} died; killed {len(killed)} process(es) it left behind")
    if stuck:
        _say(f"could not kill (stuck in the kernel?): pids {stuck}")
    return 0


def _say(message: str) -> None:
    with contextlib.suppress(BrokenPipeError, OSError):
        print(f"[elastic-run guardian] {message}", file=sys.stderr, flush=True)
