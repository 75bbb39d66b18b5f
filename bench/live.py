"""What the live status display costs: the agent's CPU while 8 workers sleep, with
``logs.live=true`` under a pseudo-terminal against ``logs.live=false``, medians of --runs.

    .venv/bin/python bench/live.py --runs 3
"""

from __future__ import annotations

import argparse
import os
import pty
import select
import statistics
import sys
import tempfile
import time
from pathlib import Path

import psutil


def agent_cpu(exe: str, live: str, window: float) -> float:
    """Percent of one core the agent used over ``window`` s, its workers asleep."""
    run_dir = tempfile.mkdtemp(prefix="er-bench-live-")
    argv = [
        exe, "job.entrypoint=sleep", f"job.args=[{window + 4:g}]", "job.nproc_per_node=8",
        f"logs.live={live}", "resources.interval=1", f"hydra.run.dir={run_dir}",
    ]  # fmt: skip
    pid, fd = pty.fork()
    if pid == 0:
        os.environ["TERM"] = "xterm"
        os.execv(argv[0], argv)
    agent = psutil.Process(pid)

    def drain(until: float) -> None:
        while time.monotonic() < until:
            ready, _, _ = select.select([fd], [], [], max(0.0, until - time.monotonic()))
            if ready:
                try:
                    if not os.read(fd, 65536):
                        return
                except OSError:
                    return

    drain(time.monotonic() + 2)  # start-up is not idle
    t0 = sum(agent.cpu_times()[:2])
    w0 = time.monotonic()
    drain(w0 + window)
    used = sum(agent.cpu_times()[:2]) - t0
    wall = time.monotonic() - w0
    drain(time.monotonic() + 30)
    os.waitpid(pid, 0)
    os.close(fd)
    return 100 * used / wall


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--window", type=float, default=8.0)
    p.add_argument("--elastic-run", default=str(Path(sys.executable).with_name("elastic-run")))
    args = p.parse_args()
    results: dict[str, list[float]] = {"false": [], "true": []}
    for _ in range(args.runs):
        for live in results:  # interleaved, so drift hits both alike
            results[live].append(agent_cpu(args.elastic_run, live, args.window))
    for live, values in results.items():
        print(
            f"logs.live={live:<5}  agent CPU while 8 workers sleep: median "
            f"{statistics.median(values):.2f}% of a core "
            f"({', '.join(f'{v:.2f}' for v in values)})"
        )


if __name__ == "__main__":
    main()
