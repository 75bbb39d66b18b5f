"""The crash-loop verdict through ``elastic-run``: restarts that never get past the
furthest step the workers reported end the job with exit code 93 ("no progress: do not
requeue") instead of spending every restart; on every node of the job."""

from __future__ import annotations

import json
import uuid

from tests.conftest import TESTS, ElasticRunner, assert_nothing_survives, free_port

STEPPER = TESTS / "workers" / "stepper.py"


def _job(fail_at: int, growth: int) -> list[str]:
    return [
        f"job.entrypoint={STEPPER}",
        f"job.args=[{fail_at},{growth}]",
        "job.nproc_per_node=2",
        "stop_timeout=5",
    ]


def test_a_script_that_always_fails_at_step_3_stops_after_3_restarts(
    elastic_run: ElasticRunner,
) -> None:
    run = elastic_run(*_job(3, 0), "max_restarts=10", timeout=120)
    assert run.returncode == 93, run.stderr
    result = json.loads((run.run_dir / "result.json").read_text())
    assert (result["exit_code"], result["attempts"], result["restarts"]) == (93, 4, 3)
    assert result["error"].startswith("no progress: 3 restarts in a row failed without passing")
    assert result["error"].endswith(
        "last root cause: rank 1: exit code 1: RuntimeError: loss is NaN at step 3"
    )
    assert (
        "no progress: 3 restarts in a row failed without passing step 3 "
        "(restart.no_progress=3); do not requeue" in run.stderr
    )
    assert "RuntimeError: loss is NaN at step 3" in run.stderr
    assert_nothing_survives({result["run_id"]})


def test_restarts_that_get_further_spend_every_restart(elastic_run: ElasticRunner) -> None:
    run = elastic_run(*_job(3, 1), "max_restarts=4", timeout=120)
    assert run.returncode == 1, run.stderr
    result = json.loads((run.run_dir / "result.json").read_text())
    assert (result["attempts"], result["restarts"]) == (5, 4)
    assert "restarts used up (max_restarts=4)" in run.stderr


def test_the_count_is_a_key_and_0_turns_it_off(elastic_run: ElasticRunner) -> None:
    run = elastic_run(*_job(2, 0), "max_restarts=3", "restart.no_progress=1", timeout=120)
    assert run.returncode == 93, run.stderr
    assert json.loads((run.run_dir / "result.json").read_text())["attempts"] == 2
    run = elastic_run(*_job(2, 0), "max_restarts=3", "restart.no_progress=0", timeout=120)
    assert run.returncode == 1, run.stderr
    assert json.loads((run.run_dir / "result.json").read_text())["attempts"] == 4


def test_every_node_of_the_job_exits_93(elastic_run: ElasticRunner) -> None:
    run_id, port = f"loop-{uuid.uuid4().hex[:8]}", free_port()
    rdzv = [
        "rdzv=tcp",
        f"rdzv.endpoint=127.0.0.1:{port}",
        "nnodes=2",
        "rdzv.heartbeat_interval=0.2",
        "rdzv.heartbeat_timeout=1.5",
        "rdzv.last_call_timeout=0.5",
        "job.nproc_per_node=1",  # rank 1, the failing one, is on one node only
    ]
    job = [f"job.entrypoint={STEPPER}", "job.args=[3,0]", "max_restarts=10", "stop_timeout=5"]
    agents = [elastic_run.popen(*job, *rdzv, run_id=run_id)[0] for _ in range(2)]
    try:
        outcomes = [agent.communicate(timeout=120) for agent in agents]
    finally:
        for agent in agents:
            agent.kill()
            agent.wait()
    for agent, (_, err) in zip(agents, outcomes, strict=True):
        assert agent.returncode == 93, err
    assert any("no progress: 3 restarts in a row" in err for _, err in outcomes)
    assert_nothing_survives({run_id})
