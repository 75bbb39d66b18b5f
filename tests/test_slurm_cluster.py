"""The Slurm test cluster itself (:mod:`elastic_runner.testing.slurm`): it starts, its
three fake nodes run one task each, and stopping it leaves no process behind."""

from __future__ import annotations

import psutil
import pytest

from elastic_runner.testing import slurm
from elastic_runner.testing.runner import wait_for
from elastic_runner.testing.slurm import SlurmCluster, cluster_of, parse_job, require_slurm

ONE_TASK_PER_NODE = ["-N3", "--ntasks-per-node=1"]


def test_a_step_sees_three_nodes(slurm_cluster: SlurmCluster) -> None:
    done = slurm_cluster.srun(
        *ONE_TASK_PER_NODE,
        "bash",
        "-c",
        'echo "$SLURM_NODEID $SLURMD_NODENAME $SLURM_NNODES $SLURM_CLUSTER_NAME"',
        timeout=30,
    )
    assert done.returncode == 0, done.stderr + slurm_cluster.logs()
    lines = sorted(done.stdout.split("\n")[:-1])
    assert lines == [f"{k} n{k + 1} 3 {slurm_cluster.name}" for k in range(3)]


def test_a_batch_job_is_followed_to_its_end(slurm_cluster: SlurmCluster) -> None:
    job_id = slurm_cluster.sbatch("echo out-$SLURM_JOB_ID\nexit 3\n", "-N1")
    job = slurm_cluster.wait_job(job_id, timeout=30)
    assert (job.state, job.exit_code, job.signal) == ("FAILED", 3, 0)
    assert slurm_cluster.output(job_id) == f"out-{job_id}\n"


def test_scontrol_lines_parse() -> None:
    job = parse_job(
        "JobId=12 JobName=a b UserId=root(0) JobState=CANCELLED Reason=None "
        "ExitCode=0:15 Command=/tmp/x.sh StdOut=/tmp/12.out\n"
    )
    assert (job.job_id, job.state, job.exit_code, job.signal) == ("12", "CANCELLED", 0, 15)
    assert job.fields["JobName"] == "a b" and job.fields["StdOut"] == "/tmp/12.out"
    assert job.finished


def test_stop_leaves_no_daemon_and_no_job_process() -> None:
    """A cluster of its own (not the session's): stopped with a job still running."""
    require_slurm()
    cluster = SlurmCluster(nodes=2)
    try:
        cluster.start()
        job_id = cluster.sbatch("srun -N2 --ntasks-per-node=1 sleep 300\n", "-N2")
        cluster.wait_job(job_id, timeout=30, states=frozenset({"RUNNING"}))
        wait_for(lambda: len(_named(cluster, "sleep")) == 2, timeout=30, what="2 sleeps")
        daemons = [proc.pid for proc in cluster.daemons.values()]
        assert len(daemons) == 4  # munged, slurmctld, 2 slurmd
    finally:
        problems = cluster.stop()
    assert problems == []
    assert not cluster.dir.exists()
    assert not [pid for pid in daemons if psutil.pid_exists(pid)]
    assert not [proc.pid for proc in psutil.process_iter() if cluster_of(proc) == cluster.name]


def _named(cluster: SlurmCluster, name: str) -> list[int]:
    """Pids of the cluster's processes called ``name``."""
    pids = {proc.pid for proc in cluster.processes()}
    return [
        p.pid for p in psutil.process_iter(["name"]) if p.pid in pids and p.info["name"] == name
    ]


def test_without_slurm_tests_skip_except_under_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(slurm, "slurm_unavailable_reason", lambda: "slurmctld not found")
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="slurmctld not found"):
        require_slurm()
    monkeypatch.setenv("CI", "1")
    with pytest.raises(pytest.fail.Exception, match="under CI: slurmctld not found"):
        require_slurm()
