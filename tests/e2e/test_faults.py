"""Fault injection through ``elastic-run``: each ``fault=`` option injects what it says,
says so (a warning when the run starts, an event, a line of the report), and the job's
restart path takes it from there."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

from tests.conftest import TESTS, ElasticRunner, assert_nothing_survives, free_port

STEPS = TESTS / "workers" / "steps.py"
JOB = [f"job.entrypoint={STEPS}", "job.nproc_per_node=2", "max_restarts=2", "stop_timeout=5"]


def _events(run_dir: Path, name: str) -> list[dict[str, object]]:
    lines = (run_dir / "events.jsonl").read_text().splitlines()
    return [e for e in map(json.loads, lines) if e["name"] == name]


def _result(run_dir: Path) -> dict[str, object]:
    result: dict[str, object] = json.loads((run_dir / "result.json").read_text())
    return result


def test_kill_rank_after_seconds(elastic_run: ElasticRunner) -> None:
    run = elastic_run(*JOB, "fault=kill_rank", "fault.rank=1", "fault.after=0.3", timeout=60)
    assert run.returncode == 0, run.stderr
    assert "FAULT INJECTION is on: fault=kill_rank: SIGKILL to rank 1 after 0.3 s" in run.stderr
    assert (
        "worker rank 1 (pid " in run.stderr
        and "failed: killed by SIGKILL (injected fault)" in run.stderr
    )
    assert "  injected: fault=kill_rank: SIGKILL to rank 1 0.3 s after start, attempt 1" in (
        run.stderr
    )
    assert _result(run.run_dir)["restarts"] == 1  # the restart path ran once
    [event] = _events(run.run_dir, "elastic_runner.fault.injected")
    assert "rank 1" in str(event["metadata"])
    assert_nothing_survives({str(_result(run.run_dir)["run_id"])})


def test_kill_rank_at_a_step_on_every_attempt_uses_up_the_restarts(
    elastic_run: ElasticRunner,
) -> None:
    run = elastic_run(
        *JOB,
        "fault=kill_rank",
        "fault.rank=0",
        "fault.at_step=5",
        "fault.attempt=0",
        "fault.signal=SIGTERM",
        "restart.no_progress=0",
        timeout=60,
    )
    assert run.returncode == 1, run.stderr
    assert run.stderr.count("injecting fault=kill_rank: SIGTERM to rank 0 at step") == 3
    assert "killed by SIGTERM (injected fault)" in run.stderr
    assert _result(run.run_dir)["attempts"] == 3


def test_hang_rank_is_found_by_the_watchdog(elastic_run: ElasticRunner) -> None:
    run = elastic_run(
        *JOB,
        "fault=hang_rank",
        "fault.rank=1",
        "fault.after=0.3",
        "watchdog.heartbeat_timeout=1",
        timeout=60,
    )
    assert run.returncode == 0, run.stderr
    assert "injecting fault=hang_rank: SIGSTOP to rank 1" in run.stderr
    assert "killed by SIGKILL (watchdog)" in run.stderr
    assert "  injected: fault=hang_rank: SIGSTOP to rank 1" in run.stderr


def test_fail_check_keeps_the_node_out_then_it_joins(elastic_run: ElasticRunner) -> None:
    run = elastic_run(
        *JOB,
        "fault=fail_check",
        "fault.checks=2",
        "checks.retry_for=30",
        "checks.retry_interval=0.2",
        timeout=60,
    )
    assert run.returncode == 0, run.stderr
    assert "refused to join: injected fault (fault=fail_check, 1 of 2)" in run.stderr
    assert "every health check passes: this node joins the job" in run.stderr


def test_kill_agent_loses_a_node_and_the_job_goes_on(elastic_run: ElasticRunner) -> None:
    run_id, port = f"fault-{uuid.uuid4().hex[:8]}", free_port()
    overrides = [
        f"job.entrypoint={STEPS}",
        "job.args=[40]",
        "job.nproc_per_node=1",
        "rdzv=tcp",
        f"rdzv.endpoint=127.0.0.1:{port}",
        "nnodes=1:2",
        "rdzv.heartbeat_interval=0.2",
        "rdzv.heartbeat_timeout=1.5",
        "rdzv.last_call_timeout=0.5",
    ]
    # the agent that hosts the store is not the one that dies (it would take the job along)
    agents = [
        elastic_run.popen(*overrides, "rdzv.is_host=true", run_id=run_id),
        elastic_run.popen(
            *overrides, "rdzv.is_host=false", "fault=kill_agent", "fault.after=0.5", run_id=run_id
        ),
    ]
    try:
        ends = [(proc, proc.communicate(timeout=60)) for proc, _, _ in agents]
    finally:
        elastic_run.kill_agents()
    codes = sorted(proc.returncode for proc, _ in ends)
    assert codes == [-9, 0], "\n\n".join(err for _, (_, err) in ends)
    killed = next(err for proc, (_, err) in ends if proc.returncode == -9)
    assert "injecting fault=kill_agent: SIGKILL to this agent" in killed
    assert_nothing_survives({run_id}, within=10)  # the guardian swept its workers
