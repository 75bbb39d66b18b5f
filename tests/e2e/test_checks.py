"""Node health checks through ``elastic-run``: a node its checks keep out stays out while
the job runs on the others, says so on ``/healthz``, and joins once its checks pass; a
node out for longer than ``checks.retry_for`` leaves with one line."""

from __future__ import annotations

import time
import urllib.request
from pathlib import Path

from elastic_runner.testing.runner import http_status, wait_for
from tests.conftest import ElasticRunner, free_port, probe_records
from tests.e2e.test_multinode import Job


def test_a_failing_check_is_one_line_and_exit_1(elastic_run: ElasticRunner) -> None:
    started = time.monotonic()
    run = elastic_run("+job=hello", "+checks.disk={/: 1000000TiB}", timeout=60)
    assert run.returncode == 1, run.stderr
    assert "health check of plugin 'check:disk:/' refused to join: /: " in run.stderr
    assert "1000000.0 TiB needed" in run.stderr
    assert "Traceback" not in run.stderr and time.monotonic() - started < 30


def test_a_node_out_joins_the_job_once_its_check_passes(
    elastic_run: ElasticRunner, tmp_path: Path
) -> None:
    job = Job(elastic_run, tmp_path, "2:3")
    for _ in range(2):
        job.start(probe=("--until-world", "3"))
    flag, port = tmp_path / "disk-is-back", free_port()
    job.start(
        f"checks.command=test -f {flag}",
        "checks.retry_for=60",
        "checks.retry_interval=0.3",
        f"health.port={port}",
        probe=("--until-world", "3"),
    )
    try:
        # the job runs on the two others meanwhile
        wait_for(lambda: len(probe_records(job.out)) >= 2, timeout=60)
        assert {r["env"]["WORLD_SIZE"] for r in probe_records(job.out).values()} == {"2"}
        wait_for(lambda: http_status(port) is not None, timeout=30)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as answer:
            assert answer.status == 200  # alive, and waiting as told
            assert answer.read().decode().startswith("ok: out: health check 'check:command' failed")
        assert http_status(port, "/readyz") == 503
        flag.touch()
        results = job.finish(timeout=60)
    finally:
        elastic_run.kill_agents()
    assert [code for code, _ in results] == [0, 0, 0], results
    worlds = {r["env"]["WORLD_SIZE"] for (_, rank), r in probe_records(job.out).items()}
    assert "3" in worlds
    third = results[2][1]
    assert third.count("this node stays out") == 1  # once per reason, not per check
    assert "every health check passes: this node joins the job" in third


def test_a_node_out_too_long_leaves_the_job(elastic_run: ElasticRunner) -> None:
    started = time.monotonic()
    run = elastic_run(
        "+job=hello",
        "checks.command='echo no IB link >&2; false'",
        "checks.retry_for=1",
        "checks.retry_interval=0.2",
        timeout=60,
    )
    assert run.returncode == 1, run.stderr
    assert "'check:command' refused to join: 'echo no IB link >&2; false' exited 1: no IB link" in (
        run.stderr
    )
    assert 1 <= time.monotonic() - started < 30
