"""Hot spares and exclusion: time from the loss of an active node (its agent SIGKILLed,
or the node excluded for failing) to the job's workers running again.

A benchmark, not a test. Real ``elastic-run`` agents on 127.0.0.1 over the TCP store
(``rdzv=tcp``, ``rdzv.heartbeat_interval=0.2 rdzv.heartbeat_timeout=1.5
rdzv.last_call_timeout=3`` by default), one worker per agent (tests/workers/probe.py,
sleeping 600 s, which records its start time). The same job, running on 2 nodes, loses
one (a SIGKILL of its agent; never the agent hosting the store) at wall-clock time t0:

- ``spare``: ``nnodes=2:2`` and 3 agents: the third stands by; it takes the lost node's
  place in the next round, which completes at once (2 of 2 nodes): the job keeps its size.
- ``no spare``: ``nnodes=1:2`` and 2 agents: the lost node is not replaced; the survivor
  re-forms the job smaller, on 1 node, after the last call (a node might still come).

With ``--cause exclusion`` the node is not killed: its worker fails (exit 1) at t0 and,
with ``exclusion.failures=1 exclusion.cooldown=600``, the node steps out of the job; the
workers are tests/workers/flaky_node.py (node 1 fails once the test touches its go file,
the others sleep 600 s). A failure spends one restart (``restarts`` then shows 1).

"running again": from t0 until the last of the job's workers after the fault started (the
latest of the workers' own start times, ``time.time()`` of the same machine). Medians over
``--runs`` runs, with min and max; "world" is WORLD_SIZE after the fault; "restarts" the
TORCHELASTIC_RESTART_COUNT the new workers saw (a lost node spends no restart).

Reproduce from the repository root (5 runs of each take ~2 min)::

    .venv/bin/python bench/spares.py
    .venv/bin/python bench/spares.py --runs 3 --last-call 0.5
    .venv/bin/python bench/spares.py --json          # raw per-run figures
    .venv/bin/python bench/spares.py --cause exclusion --runs 3

Progress goes to stderr. Every agent is stopped after each run (SIGTERM, then SIGKILL)
and any process left naming the run's temp dir is killed and reported (exit status 1).
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from _procs import sweep

from elastic_runner.testing.runner import free_port

ROOT = Path(__file__).resolve().parent.parent
PROBE = ROOT / "tests" / "workers" / "probe.py"
FLAKY = ROOT / "tests" / "workers" / "flaky_node.py"


@dataclass(frozen=True)
class Scenario:
    name: str
    nnodes: str
    agents: int
    #: agents whose workers must run again after the fault (0 hosts the store, 1 is lost)
    running: tuple[int, ...]


SCENARIOS = [
    Scenario("spare", "2:2", 3, (0, 2)),
    Scenario("no spare", "1:2", 2, (0,)),
]


@dataclass
class Result:
    scenario: str
    run: int
    again: float | None = None
    world: set[str] = field(default_factory=set)
    restarts: set[str] = field(default_factory=set)
    left_behind: int = 0
    error: str = ""


def _exe() -> str:
    exe = Path(sys.executable).with_name("elastic-run")
    found = str(exe) if exe.exists() else shutil.which("elastic-run")
    if not found:
        raise SystemExit("elastic-run is not installed beside this python")
    return found


def _records(out: Path, run_dir: Path, after: float) -> list[dict[str, Any]]:
    """Records of the workers ``run_dir``'s agent started after ``after``: the probe's
    (its environment) or flaky_node's (tagged with the agent's directory name), as
    ``{"started", "world", "restart"}``."""
    found = []
    for path in [*out.glob("a*_r*.json"), *out.glob(f"{run_dir.name}_*.json")]:
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            continue  # being replaced
        if "env" in record:  # the probe's
            if not record["env"]["TORCHELASTIC_ERROR_FILE"].startswith(f"{run_dir}/"):
                continue
            env = record["env"]
            record = {
                "started": record["started"],
                "world": env["WORLD_SIZE"],
                "restart": env["TORCHELASTIC_RESTART_COUNT"],
            }
        if record["started"] > after:
            found.append(record)
    return found


def _wait(predicate: Callable[[], object], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def run_one(scenario: Scenario, run: int, args: argparse.Namespace, tmp: Path) -> Result:
    result = Result(scenario.name, run)
    base = tmp / f"{scenario.name.replace(' ', '_')}_{run}"
    out = base / "probe"
    out.mkdir(parents=True)
    port, run_id = free_port(), f"spares-{uuid.uuid4().hex[:8]}"
    agents: list[subprocess.Popen[bytes]] = []
    run_dirs: list[Path] = []

    go = base / "go"
    excluding = args.cause == "exclusion"

    def start(i: int) -> None:
        run_dir = base / f"agent{i}"
        worker = (
            [
                f"job.entrypoint={FLAKY}",
                f'job.args=["--out","{out}","--bad","agent1","--fails","1","--go","{go}",'
                '"--sleep","600"]',
                f"+job.env.NODE_TAG=agent{i}",
                "exclusion.failures=1",
                "exclusion.cooldown=600",
                "max_restarts=1",
            ]
            if excluding
            else [f"job.entrypoint={PROBE}", f'job.args=["--out","{out}","--sleep","600"]']
        )
        argv = [
            _exe(),
            *worker,
            "job.nproc_per_node=1",
            "rdzv=tcp",
            f"rdzv.endpoint=127.0.0.1:{port}",
            f"rdzv.is_host={'true' if i == 0 else 'false'}",
            f"rdzv.id={run_id}",
            f"rdzv.heartbeat_interval={args.heartbeat_interval}",
            f"rdzv.heartbeat_timeout={args.heartbeat_timeout}",
            f"rdzv.last_call_timeout={args.last_call}",
            "rdzv.join_timeout=60",
            f"nnodes={scenario.nnodes}",
            f"hydra.run.dir={run_dir}",
        ]
        agents.append(
            subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                cwd=base,
            )
        )
        run_dirs.append(run_dir)

    try:
        start(0)
        start(1)
        if not _wait(lambda: all(_records(out, d, 0) for d in run_dirs), 60):
            result.error = "the job did not start"
            return result
        if scenario.agents > 2:
            start(2)
            log = run_dirs[2] / "elastic-run.log"
            if not _wait(lambda: log.exists() and "standby:" in log.read_text(), 60):
                result.error = "the spare did not stand by"
                return result
        time.sleep(0.5)
        t0 = time.time()
        if excluding:
            go.touch()  # its worker fails within 20 ms (it polls for the file)
        else:
            agents[1].kill()

        def again() -> list[dict[str, Any]] | None:
            found = [_records(out, run_dirs[i], t0) for i in scenario.running]
            return [r[0] for r in found] if all(found) else None

        if not _wait(again, 60):
            result.error = "the job did not run again"
            return result
        records = again() or []
        result.again = max(r["started"] for r in records) - t0
        result.world = {str(r["world"]) for r in records}
        result.restarts = {str(r["restart"]) for r in records}
        return result
    finally:
        for proc in agents:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in agents:
            try:
                proc.wait(timeout=40)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        time.sleep(0.2)
        result.left_behind = sweep(str(base))


def _cell(values: list[float]) -> str:
    if not values:
        return "-"
    return f"{statistics.median(values):6.2f} [{min(values):.2f}-{max(values):.2f}]"


def table(results: list[Result], args: argparse.Namespace) -> str:
    rows = [
        (
            "scenario",
            "nnodes",
            "agents",
            "world",
            "restarts",
            "running again, s: median [min-max]",
            "failed",
        )
    ]
    for s in SCENARIOS:
        mine = [r for r in results if r.scenario == s.name]
        ok = [r for r in mine if r.again is not None]
        world = ",".join(sorted(set().union(*(r.world for r in ok)))) or "-"
        restarts = ",".join(sorted(set().union(*(r.restarts for r in ok)))) or "-"
        values = [r.again for r in ok if r.again is not None]
        rows.append(
            (
                s.name,
                s.nnodes,
                str(s.agents),
                world,
                restarts,
                _cell(values),
                f"{len(mine) - len(ok)}/{len(mine)}",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
    lines.append(
        f"(rdzv.heartbeat_interval={args.heartbeat_interval} "
        f"rdzv.heartbeat_timeout={args.heartbeat_timeout} "
        f"rdzv.last_call_timeout={args.last_call}; node lost by "
        f"{'exclusion' if args.cause == 'exclusion' else 'SIGKILL of its agent'}; "
        f"{args.runs} run(s) each)"
    )
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--heartbeat-interval", type=float, default=0.2)
    p.add_argument("--heartbeat-timeout", type=float, default=1.5)
    p.add_argument("--last-call", type=float, default=3.0)
    p.add_argument(
        "--cause",
        choices=("kill", "exclusion"),
        default="kill",
        help="how the node is lost: its agent SIGKILLed, or excluded for failing",
    )
    p.add_argument("--json", action="store_true", help="print the raw per-run figures")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    results: list[Result] = []
    left = 0
    with tempfile.TemporaryDirectory(prefix="bench-spares-") as tmp:
        for run in range(args.runs):
            for scenario in SCENARIOS:
                r = run_one(scenario, run, args, Path(tmp))
                results.append(r)
                left += r.left_behind
                shown = "-" if r.again is None else f"{r.again:.2f} s"
                print(
                    f"run {run + 1}/{args.runs} {scenario.name}: running again after {shown}"
                    f"{'; ' + r.error if r.error else ''}"
                    f"{f'; {r.left_behind} process(es) left behind' if r.left_behind else ''}",
                    file=sys.stderr,
                    flush=True,
                )
    if args.json:
        print(
            json.dumps(
                [
                    {**r.__dict__, "world": sorted(r.world), "restarts": sorted(r.restarts)}
                    for r in results
                ],
                indent=1,
            )
        )
    else:
        print(table(results, args))
    return 1 if left or any(r.error for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
