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


class Guardian:
    """The agent's handle on its guardian process."""

    def __init__(self, marker: str, run_id: str) -> None:
        self._proc = subprocess.Popen(
            [sys.executable, "-I", "-m", "elastic_runner.workers.guardian", marker, run_id],
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
    marker, run_id = argv
    received = b""
    while chunk := os.read(0, 64):
        received += chunk
    if received == b"done":
        os._exit(0)
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


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
