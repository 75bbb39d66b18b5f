"""What supervising costs, and how fast a stop is, for ``elastic-run`` and ``torchrun``.

A benchmark, not a test. It prints:

* agent CPU (percent of one core) and RSS while 8 workers sleep for ``--duration`` s
  (default 30): CPU time of the launcher process measured from 2 s after all workers
  started to the end of the window (from /proc/<pid>/task/*/schedstat, ns resolution);
  RSS at the end. For elastic-run the guardian's RSS is
  shown too. Targets: CPU under 0.5% of one core, RSS under 60 MB.
* time from SIGTERM to the launcher until every process of the run is gone, for workers
  that exit promptly on SIGTERM (median of ``--runs``, default 5). "Gone" = the launcher
  exited and no process carrying the run's marker remains (checked, not assumed).
  Target: under 200 ms.

torchrun (``<torch-python> -m torch.distributed.run --standalone``) is measured the same
way when torch imports in ``--torch-python`` (default ``/tmp/torchvenv/bin/python`` if
present). Reproduce from the repository root::

    .venv/bin/python bench/supervision.py              # about 75 s with torch
    .venv/bin/python bench/supervision.py --duration 10 --runs 3
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import psutil

BENCH = Path(__file__).resolve().parent
WORKER = BENCH / "_worker.py"
DEFAULT_TORCH_PYTHON = Path("/tmp/torchvenv/bin/python")
NPROC = 8


def elastic_argv(exe: str) -> Callable[[Path, Path], list[str]]:
    def argv(out: Path, run_dir: Path) -> list[str]:
        return [
            exe,
            f"job.entrypoint={WORKER}",
            f"job.args=[{out},sleep]",
            f"job.nproc_per_node={NPROC}",
            "stop_timeout=10",
            f"hydra.run.dir={run_dir}",
        ]

    return argv


def torchrun_argv(python: str) -> Callable[[Path, Path], list[str]]:
    def argv(out: Path, run_dir: Path) -> list[str]:
        return [
            python,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={NPROC}",
            str(WORKER),
            str(out),
            "sleep",
        ]

    return argv


def _marked(marker: str) -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter():
        try:
            if p.environ().get("BENCH_MARKER") == marker and p.status() != psutil.STATUS_ZOMBIE:
                found.append(p)
        except psutil.Error:
            continue
    return found


def start(
    argv: Callable[[Path, Path], list[str]], tmp: Path
) -> tuple[subprocess.Popen[bytes], str]:
    out = tmp / "out"
    out.mkdir()
    marker = uuid.uuid4().hex
    env = {**os.environ, "BENCH_MARKER": marker}
    proc = subprocess.Popen(
        argv(out, tmp / "run"),
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 60
    while len(list(out.glob("a0_r*.start"))) < NPROC:
        if time.monotonic() > deadline or proc.poll() is not None:
            raise RuntimeError("workers did not start")
        time.sleep(0.01)
    return proc, marker


def _cleanup(proc: subprocess.Popen[bytes], marker: str) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    for p in _marked(marker):
        p.kill()


def cpu_seconds(pid: int) -> float:
    """CPU time of a process's threads in ns resolution (schedstat), where psutil's clock
    ticks (10 ms) are too coarse for an idle agent."""
    total = 0.0
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[0]) / 1e9
        return total
    except OSError:
        return float(sum(psutil.Process(pid).cpu_times()[:2]))


def idle_cost(argv: Callable[[Path, Path], list[str]], duration: float) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as d:
        proc, marker = start(argv, Path(d))
        try:
            agent = psutil.Process(proc.pid)
            time.sleep(2)
            t0, cpu0 = time.monotonic(), cpu_seconds(proc.pid)
            time.sleep(duration)
            cpu = cpu_seconds(proc.pid) - cpu0
            elapsed = time.monotonic() - t0
            result = {"cpu_pct": 100 * cpu / elapsed, "rss_mb": agent.memory_info().rss / 2**20}
            guardians = [c for c in agent.children() if "guardian" in " ".join(c.cmdline())]
            if guardians:
                result["guardian_rss_mb"] = guardians[0].memory_info().rss / 2**20
            return result
        finally:
            _cleanup(proc, marker)


def stop_time(argv: Callable[[Path, Path], list[str]]) -> float:
    with tempfile.TemporaryDirectory() as d:
        proc, marker = start(argv, Path(d))
        try:
            time.sleep(0.5)
            t0 = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)
            elapsed = time.monotonic() - t0
            left = _marked(marker)
            if left:
                raise RuntimeError(f"{len(left)} processes survived: {[p.pid for p in left]}")
            return elapsed
        finally:
            _cleanup(proc, marker)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=30.0)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--elastic-run", default=str(Path(sys.executable).parent / "elastic-run"))
    parser.add_argument("--torch-python", default=None)
    args = parser.parse_args()
    tools = {"elastic-run": elastic_argv(args.elastic_run)}
    torch_python = args.torch_python or (
        str(DEFAULT_TORCH_PYTHON) if DEFAULT_TORCH_PYTHON.exists() else None
    )
    if (
        torch_python
        and shutil.which(torch_python)
        and subprocess.run([torch_python, "-c", "import torch"], capture_output=True).returncode
        == 0
    ):
        tools["torchrun"] = torchrun_argv(torch_python)
    print(
        f"supervision benchmark: {NPROC} sleeping workers, {args.duration:g} s idle window, "
        f"{args.runs} stop runs, {os.cpu_count()} CPUs"
    )
    ok = True
    for name, argv in tools.items():
        cost = idle_cost(argv, args.duration)
        stops = [stop_time(argv) for _ in range(args.runs)]
        med = statistics.median(stops) * 1000
        extra = (
            f", guardian RSS {cost['guardian_rss_mb']:.1f} MB" if "guardian_rss_mb" in cost else ""
        )
        print(
            f"{name:12} idle CPU {cost['cpu_pct']:.3f}% of one core, RSS "
            f"{cost['rss_mb']:.1f} MB{extra}; SIGTERM -> all gone: median {med:.0f} ms "
            f"(min {min(stops) * 1000:.0f}, max {max(stops) * 1000:.0f})"
        )
        if name == "elastic-run":
            checks = [
                ("idle CPU < 0.5%", cost["cpu_pct"] < 0.5),
                ("RSS < 60 MB", cost["rss_mb"] < 60),
                ("stop < 200 ms", med < 200),
            ]
            for label, passed in checks:
                print(f"  {'PASS' if passed else 'FAIL'}  {label}")
                ok &= passed
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
