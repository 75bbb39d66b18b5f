"""Preemption, resuming after a requeue, and the job-level verdict, through
``elastic-run`` on loopback (the same flows run on the Slurm test cluster in
tests/e2e/test_slurm.py)."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import psutil

from elastic_runner.testing.runner import ElasticRunner, elastic_run_exe, wait_for
from tests.conftest import probe_job, probe_records
from tests.e2e.test_multinode import Job, _listening


def _agent(
    elastic_run: ElasticRunner, run_dir: Path, run_id: str, *overrides: str, env: dict[str, str]
) -> subprocess.Popen[str]:
    elastic_run.run_ids.add(run_id)
    argv = [elastic_run_exe(), *overrides, f"hydra.run.dir={run_dir}", f"rdzv.id={run_id}"]
    return subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )


def _fake_scontrol(tmp_path: Path) -> tuple[dict[str, str], Path]:
    """``scontrol`` on PATH that logs its arguments to the returned file and, as Slurm does
    on ``scontrol requeue``, SIGTERMs the job's processes (here: the agent that ran it)
    before it returns."""
    calls = tmp_path / "scontrol.calls"
    exe = tmp_path / "bin" / "scontrol"
    exe.parent.mkdir()
    exe.write_text(f'#!/bin/sh\necho "$@" >> {calls}\nkill -TERM $PPID\nsleep 0.2\n')
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR)
    env = {**os.environ, "PATH": f"{exe.parent}:{os.environ['PATH']}"}
    return env, calls


def test_a_preempted_run_exits_75_requeues_and_resumes_with_its_restarts(
    elastic_run: ElasticRunner, tmp_path: Path
) -> None:
    env, calls = _fake_scontrol(tmp_path)
    env.update(SLURM_JOB_ID="4242", SLURM_NODEID="0")  # as on a Slurm job's first node
    out, run_dir, run_id = tmp_path / "probe", tmp_path / "job", "preempt-me"
    out.mkdir()
    # 1. rank 0 kills itself once (one restart spent), then both sleep until preempted
    first = _agent(
        elastic_run,
        run_dir,
        run_id,
        *probe_job(
            out, "--ranks", "0", "--sigkill-on-restart", "0", "--sleep", "60", "--on-term", nproc=2
        ),
        "max_restarts=3",
        "signals.requeue=true",
        env=env,
    )
    wait_for(lambda: (1, 0) in probe_records(out) and (1, 1) in probe_records(out))
    time.sleep(0.2)
    agent = psutil.Process(first.pid)
    for proc in [*agent.children(recursive=True), agent]:  # as Slurm: every process
        proc.send_signal(signal.SIGUSR1)
    _, err = first.communicate(timeout=30)
    # the requeue's SIGTERM came after the run: held until its result was written
    assert first.returncode == 75, err
    assert "elastic-run: preempted by SIGUSR1 from outside" in err
    assert "elastic-run: SIGTERM after the run ended: writing its result first" in err, err
    result = json.loads((run_dir / "result.json").read_text())
    assert (result["state"], result["exit_code"]) == ("PREEMPTED by SIGUSR1", 75)
    assert (result["attempts"], result["restarts"]) == (2, 1)
    assert [p.read_text() for p in sorted(out.glob("term_r*"))] == ["SIGUSR1"] * 2
    assert calls.read_text() == "requeue 4242\n"  # node 0 asked once

    # 2. the requeued job, same run directory: the restart count goes on from 1
    env["SLURM_RESTART_COUNT"] = "1"
    for p in out.glob("*"):
        p.unlink()
    second = _agent(
        elastic_run, run_dir, "another-id", *probe_job(out, nproc=2), "max_restarts=3", env=env
    )
    _, err = second.communicate(timeout=30)
    assert second.returncode == 0, err
    records = probe_records(out)
    assert sorted(records) == [(1, 0), (1, 1)]  # TORCHELASTIC_RESTART_COUNT=1
    result = json.loads((run_dir / "result.json").read_text())
    assert (result["exit_code"], result["attempts"], result["restarts"]) == (0, 3, 1)
    assert (run_dir / "attempt_3").is_dir() and (run_dir / "attempt_1").is_dir()
    assert calls.read_text() == "requeue 4242\n"


def test_the_verdict_of_an_elastic_job_that_lost_a_node_is_success(
    elastic_run: ElasticRunner, tmp_path: Path
) -> None:
    job = Job(elastic_run, tmp_path / "job", "2:3")
    shrink = ("--until-world", "2", "--after-world", "3")
    agents = [job.start("rdzv.is_host=true", probe=shrink)]
    wait_for(lambda: _listening(job.port))
    agents += [job.start("rdzv.is_host=false", probe=shrink) for _ in range(2)]
    wait_for(lambda: len(list(job.out.glob("*_w3.json"))) == 3)
    victim = agents[1]
    victim.kill()
    victim.communicate(timeout=10)
    survivors = [a for a in agents if a is not victim]
    assert [p.communicate(timeout=30) and p.returncode for p in survivors] == [0, 0]
    job.agents.clear()
    verdict = subprocess.run(
        [sys.executable, "-m", "elastic_runner", "verdict", str(elastic_run.tmp_path)],
        capture_output=True,
        text=True,
        check=False,
    )
    lost = job.run_dirs[1].relative_to(elastic_run.tmp_path)
    assert verdict.returncode == 0, verdict.stdout + verdict.stderr
    assert verdict.stdout == (
        f"job succeeded on 2 node(s); lost or stopped on the way: {lost}: no result.json (lost)\n"
    )
