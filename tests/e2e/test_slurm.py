"""``elastic-run`` under Slurm, end to end: real jobs through ``sbatch``/``srun`` on the
test cluster of :mod:`elastic_runner.testing.slurm` (three fake nodes ``n1..n3`` on this
machine, one per pytest process: the ``slurm_cluster`` fixture).

More Slurm end-to-end tests live here: append yours (Slurm mode, scheduler signals,
preemption and requeue, elastic jobs), using :func:`agents_step` for the ``srun`` line and
the ``slurm`` fixture, which cancels a failed test's jobs. Keep each test quick: await job
states (``wait_job``) and files (``wait_for``), never fixed sleeps.
"""

from __future__ import annotations

import json
import re
import shlex
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from elastic_runner.testing.runner import elastic_run_exe, processes_of_runs, wait_for
from elastic_runner.testing.slurm import SlurmCluster
from tests.conftest import assert_nothing_survives, free_port, probe_job, probe_records

NODES = 3


@pytest.fixture
def slurm(slurm_cluster: SlurmCluster) -> Iterator[SlurmCluster]:
    """The session's cluster; at teardown (also after a failure) every job is cancelled
    and none of their processes is left, so the next test starts on idle nodes."""
    yield slurm_cluster
    slurm_cluster.cancel_all()


def agents_step(run_dir: Path, *overrides: str, srun: str = "--ntasks-per-node=1") -> str:
    """A batch script's line starting one ``elastic-run`` per node of the job with
    ``overrides``, in which ``$VARIABLES`` are expanded on the node (``$SLURM_JOB_ID``).
    Each node's agent gets the run directory ``run_dir/node<SLURM_NODEID>`` and writes
    its exit code to ``run_dir/exit<SLURM_NODEID>`` (see :func:`exit_codes`; the wrapping
    shell traps SIGTERM and SIGUSR1, so it outlives an agent stopped by ``scancel`` or
    ``scancel --signal=USR1`` to report it)."""
    node = f"{run_dir}/node$SLURM_NODEID"
    agent = " ".join(
        _quote(arg) for arg in [elastic_run_exe(), *overrides, f"hydra.run.dir={node}"]
    )
    code = _quote(f"{run_dir}/exit$SLURM_NODEID")
    wrapped = f"trap : TERM USR1; {agent}; echo $? > {code}.tmp; mv {code}.tmp {code}"
    return f"srun {srun} bash -c {shlex.quote(wrapped)}\n"


def _quote(arg: str) -> str:
    """``arg`` double-quoted for bash: one word, with ``$VARIABLES`` still expanded."""
    return '"' + re.sub(r'([\\"`])', r"\\\1", arg) + '"'


def tcp_rdzv(port: int) -> list[str]:
    """Explicit rendezvous settings on the job's first node (this machine)."""
    return [
        "rdzv=tcp",
        f"rdzv.endpoint=127.0.0.1:{port}",
        "rdzv.id=slurm-$SLURM_JOB_ID",
        "nnodes=$SLURM_NNODES",
    ]


def exit_codes(run_dir: Path) -> dict[int, int]:
    return {int(p.name[4:]): int(p.read_text()) for p in run_dir.glob("exit[0-9]*")}


def test_a_three_node_job_runs_six_ranks(slurm: SlurmCluster, tmp_path: Path) -> None:
    overrides = ["+job=hello", "job.nproc_per_node=2", *tcp_rdzv(free_port())]
    job_id = slurm.sbatch(agents_step(tmp_path, *overrides), f"-N{NODES}")
    job = slurm.wait_job(job_id, timeout=45)
    output = slurm.output(job_id)
    assert (job.state, job.exit_code) == ("COMPLETED", 0), output
    assert exit_codes(tmp_path) == dict.fromkeys(range(NODES), 0), output
    hellos = sorted(
        line.split("hello from ")[1][:11] for line in output.splitlines() if "hello from" in line
    )
    assert hellos == [f"rank {r} of 6" for r in range(6)], output
    for node in range(NODES):
        assert (tmp_path / f"node{node}" / "result.json").exists()
    assert_nothing_survives({f"slurm-{job_id}"}, within=1)


def test_scancel_leaves_no_process_and_agents_exit_143(slurm: SlurmCluster, tmp_path: Path) -> None:
    out = tmp_path / "probe"
    out.mkdir()
    overrides = [*probe_job(out, "--sleep", "300", nproc=2), *tcp_rdzv(free_port())]
    job_id = slurm.sbatch(agents_step(tmp_path, *overrides), f"-N{NODES}")
    run_id = f"slurm-{job_id}"
    wait_for(
        lambda: len(probe_records(out)) == 2 * NODES or slurm.job(job_id).finished,
        timeout=45,
        what="six sleeping workers",
    )
    assert len(probe_records(out)) == 2 * NODES, slurm.output(job_id)
    assert len(processes_of_runs({run_id})) == 2 * NODES  # the workers
    agents = [p for p in slurm.job_processes(job_id) if _is_agent(p)]
    assert len(agents) == NODES

    t0 = time.monotonic()
    slurm.scancel(job_id)
    wait_for(lambda: not processes_of_runs({run_id}), timeout=5, what="the job's processes gone")
    gone = time.monotonic() - t0
    job = slurm.wait_job(job_id, timeout=15)
    assert job.state == "CANCELLED", job
    wait_for(lambda: len(exit_codes(tmp_path)) == NODES, timeout=5, what="agents' exit codes")
    assert exit_codes(tmp_path) == dict.fromkeys(range(NODES), 143), slurm.output(job_id)
    assert_nothing_survives({run_id}, within=0)
    assert not slurm.job_processes(job_id)
    assert gone < 5, f"the job's processes took {gone:.2f} s to go"


def _is_agent(proc: psutil.Process) -> bool:
    try:
        return any(arg.endswith("elastic-run") for arg in proc.cmdline()[:2])
    except psutil.Error:
        return False


# -- Slurm mode: no rendezvous settings on the command line ---------------------------------


def _slurm_mode_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if "Slurm step detected" in line]


def _store_port(output: str) -> int:
    ports = {int(p) for p in re.findall(r"store n1:(\d+) at 127\.0\.0\.1:\1 ", output)}
    assert len(ports) == 1, output
    return ports.pop()


def _check_six_ranks(out: Path, job_id: str, output: str) -> None:
    records = probe_records(out)
    assert sorted(rank for _, rank in records) == list(range(6)), output
    envs = [record["env"] for record in records.values()]
    assert len({(e["MASTER_ADDR"], e["MASTER_PORT"]) for e in envs}) == 1, output
    assert {e["WORLD_SIZE"] for e in envs} == {"6"}
    assert {e["TORCHELASTIC_RUN_ID"] for e in envs} == {f"slurm-{job_id}.0"}
    assert sorted(e["GROUP_RANK"] for e in envs) == ["0", "0", "1", "1", "2", "2"]


def test_slurm_mode_forms_the_job_across_the_steps_nodes(
    slurm: SlurmCluster, tmp_path: Path
) -> None:
    out = tmp_path / "probe"
    out.mkdir()
    job_id = slurm.sbatch(agents_step(tmp_path, *probe_job(out, nproc=2)), f"-N{NODES}")
    job = slurm.wait_job(job_id, timeout=60)
    output = slurm.output(job_id)
    assert (job.state, job.exit_code) == ("COMPLETED", 0), output
    assert exit_codes(tmp_path) == dict.fromkeys(range(NODES), 0), output
    _check_six_ranks(out, job_id, output)
    lines = _slurm_mode_lines(output)
    assert len(lines) == NODES, output
    for rank in range(NODES):
        assert any(f"node rank {rank}, id slurm-{job_id}.0, store n1:" in line for line in lines)
    assert all("rdzv=static, hosted by node rank 0" in line for line in lines), output
    assert f"(NodeAddr in {slurm.conf})" in lines[0]
    assert_nothing_survives({f"slurm-{job_id}.0"}, within=1)


def test_two_slurm_mode_jobs_at_once_on_the_same_nodes(slurm: SlurmCluster, tmp_path: Path) -> None:
    jobs = {}
    for name in ("a", "b"):
        base = tmp_path / name
        (base / "probe").mkdir(parents=True)
        step = agents_step(base, *probe_job(base / "probe", "--sleep", "2", nproc=2))
        jobs[name] = (slurm.sbatch(step, f"-N{NODES}"), base)
    # both jobs' workers are all up before either job ends: they run at once
    wait_for(
        lambda: (
            all(len(probe_records(base / "probe")) == 6 for _, base in jobs.values())
            or any(slurm.job(job_id).finished for job_id, _ in jobs.values())
        ),
        timeout=60,
        what="both jobs' workers",
    )
    assert not any(slurm.job(job_id).finished for job_id, _ in jobs.values())
    ports = []
    for job_id, base in jobs.values():
        job = slurm.wait_job(job_id, timeout=60)
        output = slurm.output(job_id)
        assert (job.state, job.exit_code) == ("COMPLETED", 0), output
        assert exit_codes(base) == dict.fromkeys(range(NODES), 0), output
        _check_six_ranks(base / "probe", job_id, output)
        ports.append(_store_port(output))
    assert ports[0] != ports[1]
    assert_nothing_survives({f"slurm-{job_id}.0" for job_id, _ in jobs.values()}, within=1)


def test_slurm_mode_with_several_tasks_per_node_is_one_line_and_exit_2(
    slurm: SlurmCluster, tmp_path: Path
) -> None:
    step = agents_step(tmp_path, "+job=hello", srun="--ntasks-per-node=2")
    job_id = slurm.sbatch(step, f"-N{NODES}", "--ntasks-per-node=2")
    job = slurm.wait_job(job_id, timeout=60)
    output = slurm.output(job_id)
    assert job.finished, output  # (its state: the wrapping shell's, which reports the code)
    assert exit_codes(tmp_path) == dict.fromkeys(range(NODES), 2), output
    errors = [line for line in output.splitlines() if "error" in line and "srun:" not in line]
    assert errors == [
        "elastic-run: error: Slurm mode: this step runs 2 tasks on a node "
        f"(SLURM_STEP_TASKS_PER_NODE=2(x{NODES})); elastic-run is one agent per node, which "
        "starts the workers itself: run it with srun --ntasks-per-node=1 "
        f"(srun -N{NODES} --ntasks-per-node=1 elastic-run ...)"
    ] * (2 * NODES), output
    assert "hello from" not in output
    assert not slurm.job_processes(job_id)


def test_slurm_mode_min_max_nodes_forms_with_every_node(
    slurm: SlurmCluster, tmp_path: Path
) -> None:
    out = tmp_path / "probe"
    out.mkdir()
    step = agents_step(tmp_path, *probe_job(out, nproc=2), "nnodes=2:3")
    job_id = slurm.sbatch(step, f"-N{NODES}")
    job = slurm.wait_job(job_id, timeout=60)
    output = slurm.output(job_id)
    assert (job.state, job.exit_code) == ("COMPLETED", 0), output
    assert exit_codes(tmp_path) == dict.fromkeys(range(NODES), 0), output
    _check_six_ranks(out, job_id, output)
    lines = _slurm_mode_lines(output)
    assert len(lines) == NODES, output
    assert all("rdzv=tcp (nnodes=2:3), is_host on node rank 0" in line for line in lines)
    assert sum("rdzv.is_host=True" in line for line in lines) == 1, output
    assert_nothing_survives({f"slurm-{job_id}.0"}, within=1)


# -- scheduler signals, preemption and requeue, the job-level verdict -----------------------


def _result(run_dir: Path) -> dict[str, object]:
    data: dict[str, object] = json.loads((run_dir / "result.json").read_text())
    return data


def test_scancel_every_node_reports_the_schedulers_signal(
    slurm: SlurmCluster, tmp_path: Path
) -> None:
    for attempt in range(2):  # the same outcome every time
        base = tmp_path / f"job{attempt}"
        out = base / "probe"
        out.mkdir(parents=True)
        job_id = slurm.sbatch(agents_step(base, *probe_job(out, "--sleep", "300", nproc=2)), "-N2")
        wait_for(
            lambda: len(probe_records(out)) == 4 or slurm.job(job_id).finished,  # noqa: B023
            timeout=45,
            what="four sleeping workers",
        )
        assert len(probe_records(out)) == 4, slurm.output(job_id)
        slurm.scancel(job_id)
        assert slurm.wait_job(job_id, timeout=15).state == "CANCELLED"
        wait_for(lambda: len(exit_codes(base)) == 2, timeout=5, what="agents' exit codes")  # noqa: B023
        output = slurm.output(job_id)
        assert exit_codes(base) == {0: 143, 1: 143}, output
        reason = "stopped by SIGTERM from outside (the scheduler signalled every process)"
        for node in range(2):
            result = _result(base / f"node{node}")
            assert (result["state"], result["exit_code"], result["error"]) == (
                "STOPPED by SIGTERM",
                143,
                reason,
            ), output
        assert output.count(f"elastic-run: {reason} after 1 attempt") == 2, output
        assert "root cause" not in output and "stopped by the agent" not in output, output
        assert_nothing_survives({f"slurm-{job_id}.0"}, within=0)


def test_preemption_checkpoints_requeues_and_resumes_with_the_restart_count(
    slurm: SlurmCluster, tmp_path: Path
) -> None:
    out = tmp_path / "probe"
    out.mkdir()
    # first run: rank 0 SIGKILLs itself once (a restart spent), then every rank sleeps
    # until SIGUSR1, writes its checkpoint (term_r<rank>) and exits 0; node 0 requeues.
    # The requeued run (SLURM_RESTART_COUNT=1, same run directories) just finishes.
    preempted = probe_job(
        out, "--ranks", "0", "--sigkill-on-restart", "0", "--sleep", "300", "--on-term", nproc=2
    )
    common = ["max_restarts=3", "rdzv.heartbeat_interval=0.2"]
    script = (
        'if [ "${SLURM_RESTART_COUNT:-0}" = 0 ]; then\n'
        + agents_step(tmp_path, *preempted, *common, "signals.requeue=true")
        + "else\n"
        + agents_step(tmp_path, *probe_job(out, nproc=2), *common)
        + "fi\n"
    )
    job_id = slurm.sbatch(script, "-N2", "--requeue", "--open-mode=append")
    wait_for(
        lambda: {(1, r) for r in range(4)} <= set(probe_records(out)) or slurm.job(job_id).finished,
        timeout=45,
        what="the second attempt's four workers",
    )
    assert {(1, r) for r in range(4)} <= set(probe_records(out)), slurm.output(job_id)
    slurm.scancel(job_id, "--signal=USR1")  # what sbatch --signal=USR1@N sends the step
    try:  # node 0's requeue SIGTERMs both nodes' agents as they write their results
        wait_for(
            lambda: all((tmp_path / f"node{n}" / "result.json").exists() for n in range(2)),
            timeout=30,
            what="both nodes' results",
        )
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{slurm.output(job_id)}") from None
    for node in range(2):
        result = _result(tmp_path / f"node{node}")
        assert (result["state"], result["exit_code"], result["restarts"]) == (
            "PREEMPTED by SIGUSR1",
            75,
            1,
        ), slurm.output(job_id)
    # Every rank saved its checkpoint on a stop signal. Each slurmd delivers the USR1 to
    # its own node's processes: when node 0's agent has left the job before node 1's
    # slurmd delivered it, node 1's agent may stop its workers first (SIGTERM, a node
    # left); the outcome above is the same either way.
    got = [p.read_text() for p in out.glob("term_r*")]
    assert len(got) == 4 and set(got) <= {"SIGUSR1", "SIGTERM"}, got
    assert "SIGUSR1" in got, got
    # requeued by node 0 (held until EligibleTime, 2 minutes on: released at once here)
    job = slurm.wait_job(job_id, timeout=30, states=frozenset({"PENDING"}))
    assert job.fields.get("Restarts") == "1", job
    for p in out.glob("a*_r*.json"):
        p.unlink()
    slurm.release_requeued(job_id)
    job = slurm.wait_job(job_id, timeout=60)
    output = slurm.output(job_id)
    assert (job.state, job.exit_code) == ("COMPLETED", 0), output
    assert exit_codes(tmp_path) == {0: 0, 1: 0}, output
    # the restart spent before the preemption still counts: TORCHELASTIC_RESTART_COUNT=1
    records = probe_records(out)
    assert sorted(records) == [(1, r) for r in range(4)], output
    assert {rec["env"]["SLURM_RESTART_COUNT"] for rec in records.values()} == {"1"}
    for node in range(2):
        result = _result(tmp_path / f"node{node}")
        assert (result["exit_code"], result["restarts"], result["attempts"]) == (0, 1, 3)
    assert output.count("resuming a preempted run") == 2, output
    assert_nothing_survives({f"slurm-{job_id}.0"}, within=1)


def test_an_elastic_job_that_loses_a_node_succeeds_by_its_verdict(
    slurm: SlurmCluster, tmp_path: Path
) -> None:
    out = tmp_path / "probe"
    out.mkdir()
    fast = ["rdzv.heartbeat_interval=0.2", "rdzv.heartbeat_timeout=1.5"]
    fast += ["rdzv.last_call_timeout=0.5"]
    step = agents_step(
        tmp_path,
        *probe_job(out, "--until-world", "2", "--after-world", "3", nproc=1),
        "nnodes=2:3",
        *fast,
        srun="--ntasks-per-node=1 --kill-on-bad-exit=0",
    )
    verdict = f"{sys.executable} -m elastic_runner verdict {tmp_path}"
    script = f"{step}{verdict}\n"
    job_id = slurm.sbatch(script, f"-N{NODES}")
    wait_for(
        lambda: len(list(out.glob("*_w3.json"))) == 3 or slurm.job(job_id).finished,
        timeout=45,
        what="three workers in a world of 3",
    )
    victims = [
        p
        for p in slurm.job_processes(job_id)
        if _is_agent(p) and p.environ().get("SLURM_NODEID") == "2"
    ]
    assert len(victims) == 1, slurm.output(job_id)
    victims[0].kill()  # node rank 2: not the one hosting the store
    job = slurm.wait_job(job_id, timeout=60)
    output = slurm.output(job_id)
    assert (job.state, job.exit_code) == ("COMPLETED", 0), output
    assert exit_codes(tmp_path) == {0: 0, 1: 0, 2: 137}, output
    assert len(list(out.glob("*_w2.json"))) == 2, output
    assert "job succeeded on 2 node(s); lost or stopped on the way: node2: no result.json" in output
    assert_nothing_survives({f"slurm-{job_id}.0"}, within=1)
