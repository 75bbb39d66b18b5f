"""The sbatch scripts of ``examples/slurm/``, run as they are on the Slurm test cluster
(three fake nodes ``n1..n3``, no GPUs, on this machine: the ``slurm_cluster`` fixture).

Each script is read from the repository and changed only where this machine needs it
(:data:`FOR_THE_TEST_MACHINE`, each change checked to apply exactly once): no
``--gpus-per-node`` line (the fake nodes have no GPUs, so ``job.nproc_per_node=auto``
counts CPUs: at most 2 per node here), shorter training (``--steps``/``--step-seconds``),
and for the elastic job at most 3 nodes and quick loss detection. Node counts and time
limits are given on the ``sbatch`` command line (which wins over ``#SBATCH`` lines), and
``elastic-run``/``python`` come from the tests' virtual environment through ``PATH`` in
the job's environment. A preemption is ``scancel --signal=USR1`` (what
``--signal=USR1@120`` sends) rather than a wait for the time limit; the requeued job is
released with ``scontrol update JobId=<id> EligibleTime=now`` as soon as the second of
the requeue is over.
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from elastic_runner.testing.runner import assert_nothing_survives, wait_for
from elastic_runner.testing.slurm import SlurmCluster

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "slurm"
CPUS = len(os.sched_getaffinity(0))
NPROC = min(CPUS, 2)
"""Workers per node: ``auto`` on the fake nodes is the CPUs (kept when there are at most 2,
else the test asks for 2 so that a big machine does not start dozens of workers)."""

FOR_THE_TEST_MACHINE: dict[str, dict[str, str]] = {
    "fixed.sbatch": {
        "--steps,200,--step-seconds,0.05": "--steps,20,--step-seconds,0.01",
    },
    "elastic.sbatch": {
        "--steps,200,--step-seconds,0.05": "--steps,150,--step-seconds,0.04",
        "nnodes=2:4 max_restarts": "nnodes=2:3 max_restarts",
        "rdzv.heartbeat_interval=5 rdzv.heartbeat_timeout=15 rdzv.last_call_timeout=30": (
            "rdzv.heartbeat_interval=0.2 rdzv.heartbeat_timeout=1.5 rdzv.last_call_timeout=0.5"
        ),
    },
    "preemptible.sbatch": {
        "--steps,20000,--step-seconds,0.5": "--steps,150,--step-seconds,0.03",
    },
}


def example_script(name: str) -> str:
    """``examples/slurm/<name>``, changed as :data:`FOR_THE_TEST_MACHINE` says."""
    script = (EXAMPLES / name).read_text()
    changes = {"#SBATCH --gpus-per-node=8\n": "", **FOR_THE_TEST_MACHINE[name]}
    if CPUS > 2:
        changes["job.nproc_per_node=auto \\\n"] = "job.nproc_per_node=2 \\\n"
    for old, new in changes.items():
        assert script.count(old) == 1, f"{name} no longer has {old!r} once"
        script = script.replace(old, new)
    return script


def job_env() -> dict[str, str]:
    """This process's environment, with the virtual environment's ``bin`` first on
    ``PATH`` (``elastic-run``, ``python``), as a user's activated environment would be."""
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    return {**os.environ, "PATH": path}


@pytest.fixture
def slurm(slurm_cluster: SlurmCluster) -> Iterator[SlurmCluster]:
    """The session's cluster; at teardown (also after a failure) every job is cancelled
    and none of their processes is left."""
    yield slurm_cluster
    slurm_cluster.cancel_all()


def job_dir(slurm: SlurmCluster, job_id: str) -> Path:
    """``outputs/slurm-<job id>`` in the job's working directory."""
    return slurm.jobs_dir / "outputs" / f"slurm-{job_id}"


def result(run_dir: Path) -> dict[str, object]:
    data: dict[str, object] = json.loads((run_dir / "result.json").read_text())
    return data


def starts(output: str) -> list[tuple[int, int, int, int]]:
    """(rank, world size, restart, start step) of every worker start in ``output``."""
    pattern = r"rank (\d+) of (\d+) \(node \d+, local_rank \d+, restart (\d+)\): "
    pattern += r"starting at step (\d+)"
    return [
        (int(rank), int(world), int(restart), int(step))
        for rank, world, restart, step in re.findall(pattern, output)
    ]


def assert_fresh_start(output: str, world: int) -> None:
    """Every rank of a fresh job started once, in a world of ``world``, restart 0; rank 0
    at step 0. The example has no collective to hold rank 0 back (torch's
    init_process_group would), so a rank started late under load may find one of rank
    0's checkpoints already (step 10, seen once in CI): one of those, never another."""
    begun = sorted(starts(output))
    assert [(r, w, a) for r, w, a, _ in begun] == [(r, world, 0) for r in range(world)], output
    assert begun[0][3] == 0 and all(step % 10 == 0 for *_, step in begun), output


def checkpoint_step(slurm: SlurmCluster, job_id: str) -> int:
    path = job_dir(slurm, job_id) / "checkpoints" / "checkpoint.json"
    try:
        return int(json.loads(path.read_text())["step"])
    except (FileNotFoundError, ValueError):
        return -1


def workers_of(slurm: SlurmCluster, job_id: str) -> list[psutil.Process]:
    found = []
    for proc in slurm.processes():
        try:
            env = proc.environ()
            if env.get("SLURM_JOB_ID") == job_id and "RANK" in env:
                found.append(proc)
        except psutil.Error:
            continue
    return found


def nothing_left(slurm: SlurmCluster, job_id: str) -> None:
    assert_nothing_survives({f"slurm-{job_id}.0"}, within=1)
    assert not slurm.job_processes(job_id)


def test_fixed_sbatch_runs_one_job_across_three_nodes(slurm: SlurmCluster) -> None:
    job_id = slurm.sbatch(example_script("fixed.sbatch"), "-N3", "--time=5", env=job_env())
    job = slurm.wait_job(job_id, timeout=60)
    output = slurm.output(job_id)
    assert (job.state, job.exit_code) == ("COMPLETED", 0), output
    world = 3 * NPROC
    assert_fresh_start(output, world)
    assert f"training done: 20 steps, world size {world}" in output
    assert output.count("Slurm step detected") == 3, output
    assert "has no token" not in output, output  # the script's ELASTIC_RUNNER_RDZV_TOKEN
    for node in ("n1", "n2", "n3"):
        assert (result(job_dir(slurm, job_id) / node)["exit_code"]) == 0, output
    assert checkpoint_step(slurm, job_id) == 20
    nothing_left(slurm, job_id)


def test_elastic_sbatch_loses_a_node_and_exits_with_the_verdict(slurm: SlurmCluster) -> None:
    job_id = slurm.sbatch(example_script("elastic.sbatch"), "-N3", "--time=5", env=job_env())
    world = 3 * NPROC
    wait_for(
        lambda: (
            (checkpoint_step(slurm, job_id) >= 10 and len(starts(slurm.output(job_id))) == world)
            or slurm.job(job_id).finished
        ),
        timeout=45,
        what="every worker, and the first checkpoint",
    )
    output = slurm.output(job_id)
    assert_fresh_start(output, world)
    agents = [
        p
        for p in slurm.job_processes(job_id)
        if p.environ().get("SLURM_NODEID") == "2"
        and any(arg.endswith("elastic-run") for arg in p.cmdline()[:2])
    ]
    assert len(agents) == 1, output
    agents[0].kill()  # node n3 is lost (not n1, which hosts the store)
    job = slurm.wait_job(job_id, timeout=60)
    output = slurm.output(job_id)
    assert (job.state, job.exit_code) == ("COMPLETED", 0), output
    assert "srun: error: n3: task 2: Killed" in output, output  # srun fails: the verdict wins
    # n1 and n2 re-form without n3 (a change of members, not a restart: none is spent)
    # and their workers resume from the checkpoint
    world = 2 * NPROC
    again = [s for s in starts(output) if s[1] == world]
    assert sorted(r for r, *_ in again) == list(range(world)), output
    assert {(restart, step >= 10) for _, _, restart, step in again} == {(0, True)}, output
    assert f"training done: 150 steps, world size {world}" in output
    assert "job succeeded on 2 node(s); lost or stopped on the way: n3: no result.json" in output
    for node in ("n1", "n2"):
        last = result(job_dir(slurm, job_id) / node)
        assert (last["exit_code"], last["attempts"], last["restarts"]) == (0, 2, 0), output
    assert not (job_dir(slurm, job_id) / "n3" / "result.json").exists()
    nothing_left(slurm, job_id)


def test_preemptible_sbatch_checkpoints_requeues_and_resumes(slurm: SlurmCluster) -> None:
    job_id = slurm.sbatch(example_script("preemptible.sbatch"), "-N2", "--time=5", env=job_env())
    world = 2 * NPROC
    wait_for(
        lambda: checkpoint_step(slurm, job_id) >= 10 or slurm.job(job_id).finished,
        timeout=45,
        what="the first checkpoint",
    )
    # a worker fails: the workers restart from the checkpoint (one restart spent) ...
    ranks1 = [p for p in workers_of(slurm, job_id) if p.environ().get("RANK") == "1"]
    assert len(ranks1) == 1, slurm.output(job_id)
    ranks1[0].kill()
    wait_for(
        lambda: (
            len([s for s in starts(slurm.output(job_id)) if s[2] == 1]) == world
            or slurm.job(job_id).finished
        ),
        timeout=30,
        what="the restarted workers",
    )
    # ... then the job is preempted: what --signal=USR1@120 sends the step
    slurm.scancel(job_id, "--signal=USR1")
    job = slurm.wait_job(job_id, timeout=30, states=frozenset({"PENDING"}))
    output = slurm.output(job_id)
    assert job.fields.get("Restarts") == "1", output  # requeued by the batch script
    saved = re.findall(r"checkpoint at step (\d+) \(SIGUSR1\)", output)
    assert len(saved) == 1, output
    assert "job stopped: node0: PREEMPTED by SIGUSR1 (exit 75)" in output, output
    for node in ("node0", "node1"):
        first = result(job_dir(slurm, job_id) / node)
        assert (first["exit_code"], first["restarts"]) == (75, 1), output
    slurm.release_requeued(job_id)  # at once, not 2 minutes on
    job = slurm.wait_job(job_id, timeout=60)
    output = slurm.output(job_id)
    assert (job.state, job.exit_code) == ("COMPLETED", 0), output
    before, requeued, after = output.partition(f"job {job_id}, run 1 (requeues)")
    assert requeued and "training done" not in before, output
    # every worker resumes from the checkpoint, and the restart spent before still counts
    assert sorted(starts(after)) == [(r, world, 1, int(saved[0])) for r in range(world)], output
    assert f"resumed from step {saved[0]}" in after
    assert f"training done: 150 steps, world size {world}" in after
    for node in ("node0", "node1"):
        last = result(job_dir(slurm, job_id) / node)
        assert (last["exit_code"], last["restarts"], last["attempts"]) == (0, 1, 3), output
    assert output.count("resuming a preempted run") == 2, output
    nothing_left(slurm, job_id)
