"""Latency of ``elastic_runner.launch`` from Python, side by side with torch's
``torch.distributed.launcher.api.elastic_launch``.

A benchmark, not a test: in one interpreter (as a notebook or a test suite calls it),
each tool launches a function on N=2 workers that returns its rank, ``--runs`` times
after one untimed warm-up, and the script prints the median (min, max) wall time of one
call, from the call to the return values in hand. Both run a single node: elastic-run
with its default ``local`` rendezvous, torch with ``c10d`` on a free loopback port (its
``--standalone`` equivalent). torch is measured when ``--torch-python`` imports torch
(default: this repository's ``.venv-torch``); the script then re-runs itself there for
torch's half. Reproduce from the repository root::

    .venv/bin/python bench/api.py --runs 7

Progress goes to stderr; the exit status is 1 if a call failed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from elastic_runner.testing.runner import free_port

ROOT = Path(__file__).resolve().parent.parent


def rank() -> int:
    return int(os.environ["RANK"])


def _elastic_runner(runs: int, nproc: int) -> list[float]:
    import elastic_runner

    times = []
    with tempfile.TemporaryDirectory(prefix="bench-api-") as tmp:
        for i in range(runs + 1):
            start = time.perf_counter()
            result = elastic_runner.launch(
                rank,
                overrides=[f"job.nproc_per_node={nproc}", "logs.tee=false"],
                run_dir=Path(tmp, str(i)),
            )
            took = time.perf_counter() - start
            assert result.return_values == {r: r for r in range(nproc)}, result
            if i:  # the first is the warm-up
                times.append(took)
    return times


def _torch(runs: int, nproc: int) -> list[float]:
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    times = []
    for i in range(runs + 1):
        config = LaunchConfig(
            min_nodes=1,
            max_nodes=1,
            nproc_per_node=nproc,
            run_id=f"bench{i}",
            rdzv_backend="c10d",
            rdzv_endpoint=f"127.0.0.1:{free_port()}",
            max_restarts=0,
        )
        start = time.perf_counter()
        values = elastic_launch(config, rank)()
        took = time.perf_counter() - start
        assert values == {r: r for r in range(nproc)}, values
        if i:
            times.append(took)
    return times


def _figures(times: list[float]) -> str:
    ms = [t * 1e3 for t in times]
    return f"{statistics.median(ms):7.0f} ms  (min {min(ms):.0f}, max {max(ms):.0f})"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--torch-python", default=str(ROOT / ".venv-torch" / "bin" / "python"))
    parser.add_argument("--only", choices=["elastic-run", "torch"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.only == "torch":
        print(json.dumps(_torch(args.runs, args.nproc)))
        return 0
    print(f"launch(fn) on {args.nproc} workers, {args.runs} runs:", file=sys.stderr)
    ours = _elastic_runner(args.runs, args.nproc)
    print(f"elastic_runner.launch  {_figures(ours)}")
    theirs = None
    if Path(args.torch_python).exists():
        # torch's agent leaves a torchelastic_* log directory per call in $TMPDIR
        scratch = tempfile.mkdtemp(prefix="bench-api-torch-")
        done = subprocess.run(
            [
                args.torch_python,
                __file__,
                "--only",
                "torch",
                "--runs",
                str(args.runs),
                "--nproc",
                str(args.nproc),
            ],
            capture_output=True,
            text=True,
            cwd=ROOT,
            env={**os.environ, "TMPDIR": scratch},
        )
        shutil.rmtree(scratch, ignore_errors=True)
        if done.returncode == 0:
            theirs = json.loads(done.stdout.strip().splitlines()[-1])
            print(f"torch elastic_launch   {_figures(theirs)}")
        else:
            print(f"torch: failed ({done.stderr.strip().splitlines()[-1:]})", file=sys.stderr)
            return 1
    if theirs:
        ratio = statistics.median(ours) / statistics.median(theirs)
        print(f"ratio                  {ratio:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
