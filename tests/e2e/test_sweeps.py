"""``elastic-run --multirun``: every point a whole elastic job; in parallel with the joblib
launcher, with no port or rendezvous collisions; a summary; non-zero when a point fails."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from elastic_runner.testing.runner import elastic_run_exe, processes_of_runs
from tests.conftest import PROBE, TESTS

pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
FAILER = TESTS / "workers" / "failer.py"


def sweep(tmp_path: Path, *overrides: str) -> tuple[subprocess.CompletedProcess[str], Path]:
    sweep_dir = tmp_path / "sweep"
    done = subprocess.run(
        [elastic_run_exe(), "--multirun", *overrides, f"hydra.sweep.dir={sweep_dir}"],
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
        cwd=tmp_path,
    )
    return done, sweep_dir


def records(point: Path) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted(point.glob("a0_r*.json"))]


def test_a_parallel_sweep_runs_each_point_as_its_own_job(tmp_path: Path) -> None:
    done, sweep_dir = sweep(
        tmp_path,
        f"job.entrypoint={PROBE}",
        # each point records into its own directory; --sleep keeps the points overlapping
        "job.args=[--out,${hydra:runtime.output_dir},--sleep,2]",
        "job.nproc_per_node=1,2,3",
        "hydra/launcher=joblib",
        "hydra.launcher.n_jobs=3",
    )
    assert done.returncode == 0, done.stderr
    points = [sweep_dir / str(n) for n in range(3)]
    run_ids, ports = set(), set()
    for n, point in enumerate(points):
        envs = [r["env"] for r in records(point)]
        assert {e["WORLD_SIZE"] for e in envs} == {str(n + 1)}
        assert sorted(int(e["LOCAL_RANK"]) for e in envs) == list(range(n + 1))
        run_ids |= {e["TORCHELASTIC_RUN_ID"] for e in envs}
        ports |= {e["MASTER_PORT"] for e in envs}
        events = (point / "events.jsonl").read_text()
        assert events.count("torchelastic.worker.status.START") == n + 1
        result = json.loads((point / "result.json").read_text())
        assert (result["exit_code"], result["num"]) == (0, n)
        assert result["overrides"][-1] == f"job.nproc_per_node={n + 1}"
    assert len(run_ids) == 3 and len(ports) == 3  # no shared rendezvous, no shared port
    starts = [min(r["started"] for r in records(p)) for p in points]
    ends = [max(r["started"] for r in records(p)) + 2 for p in points]
    assert max(starts) < min(ends), "the points did not run at the same time"
    summary = done.stderr[done.stderr.index("elastic-run: sweep of 3 point(s)") :]
    assert summary.splitlines()[0] == (
        f"elastic-run: sweep of 3 point(s): 3 succeeded, 0 failed. Sweep directory: {sweep_dir}"
    )
    assert [line.split()[0] for line in summary.splitlines()[1:4]] == ["#0", "#1", "#2"]
    assert not processes_of_runs(run_ids)


@pytest.mark.parametrize("launcher", ["basic", "joblib"])
def test_a_failing_point_fails_the_sweep_and_the_summary_says_which(
    tmp_path: Path, launcher: str
) -> None:
    done, sweep_dir = sweep(
        tmp_path,
        f"job.entrypoint={FAILER}",
        f'job.args=["{tmp_path}","1=record"]',  # rank 1 raises: only the 2-worker point fails
        "job.nproc_per_node=1,2",
        f"hydra/launcher={launcher}",
    )
    assert done.returncode == 1, done.stderr
    summary = done.stderr[done.stderr.index("elastic-run: sweep of 2 point(s)") :].splitlines()
    assert summary[0].startswith("elastic-run: sweep of 2 point(s): 1 succeeded, 1 failed.")
    assert summary[1].split()[0] == "#0" and " ok " in summary[1]
    assert summary[2].split()[0] == "#1" and "FAILED (exit 1)" in summary[2]
    assert summary[3].strip() == "rank 1: exit code 1: ValueError: rank 1 bad input"
    saved = json.loads((sweep_dir / "summary.json").read_text())
    assert [p["exit_code"] for p in saved] == [0, 1]
    assert not processes_of_runs({p["run_id"] for p in saved})
