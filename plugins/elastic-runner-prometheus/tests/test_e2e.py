"""``elastic-run metrics=prometheus`` end to end: scrape a running job after a failure."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

from elastic_runner_prometheus.scrape import scrape

from elastic_runner.testing.runner import ElasticRunner, free_port, wait_for

HOLD = Path(__file__).parent / "workers" / "hold.py"


def test_scrape_a_job_after_a_failure_and_restart(
    elastic_run: ElasticRunner, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    port = free_port()
    proc, run_dir, _ = elastic_run.popen(
        "metrics=prometheus",
        f"metrics.port={port}",
        f"job.entrypoint={HOLD}",
        f'job.args=["{out}","--fail-first"]',
        "job.nproc_per_node=2",
        "max_restarts=1",
        "resources.interval=0.2",
    )
    url = f"http://127.0.0.1:{port}/metrics"
    try:
        wait_for(lambda: (out / "running_1_0").exists() and (out / "running_1_1").exists())
        wait_for(lambda: ("elastic_runner_worker_rss_bytes", (("rank", "1"),)) in scrape(url))
        samples = scrape(url)
        state = "elastic_runner_group_state"
        assert samples[state, ((state, "HEALTHY"),)] == 1.0
        assert samples[state, ((state, "FAILED"),)] == 0.0
        assert samples["elastic_runner_workers_failures_total", (("kind", "EXIT_CODE"),)] == 1.0
        assert samples["elastic_runner_workers_restarts", ()] == 1.0
        assert samples["elastic_runner_rendezvous_duration_seconds_count", ()] == 2.0
        assert samples["elastic_runner_recovery_duration_seconds_count", ()] == 1.0
        assert samples["elastic_runner_worker_rss_bytes", (("rank", "0"),)] > 1e6
        assert (run_dir / "prometheus.url").read_text().strip() == url
    finally:
        (out / "release").touch()
        proc.communicate(timeout=30)
    assert proc.returncode == 0
    with socket.socket() as s:  # the endpoint went away with the agent
        assert s.connect_ex(("127.0.0.1", port)) != 0


def test_unknown_key_is_the_usual_clear_error(elastic_run: ElasticRunner) -> None:
    run = elastic_run("+job=hello", "metrics=prometheus", "metrics.prot=9400")
    assert run.returncode == 2
    assert (
        run.stderr.strip()
        .splitlines()[-1]
        .startswith(
            "elastic-run: error: metrics.prot=9400: no such key; allowed keys at metrics: "
            "handler, host, namespace, port"
        )
    ), run.stderr
    assert "Traceback" not in run.stderr


def test_listed_by_python_m_elastic_runner_plugins() -> None:
    import subprocess

    listing = subprocess.run(
        [sys.executable, "-m", "elastic_runner", "plugins"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "prometheus: elastic-runner-prometheus 0.1.0" in listing
    assert "metrics=prometheus" in listing


def test_a_sweep_point_that_fails_building_its_rendezvous_frees_the_metrics_port(
    elastic_run: ElasticRunner, tmp_path: Path
) -> None:
    """The first point's rendezvous cannot be built (two endpoints for rdzv=tcp); the
    second point serves /metrics and the health endpoint on the same fixed ports."""
    argv, _, _ = elastic_run.command()
    metrics, health, store = free_port(), free_port(), free_port()
    sweep = tmp_path / "sweep"
    done = subprocess.run(
        [
            argv[0],
            "--multirun",
            "+job=hello",
            "job.nproc_per_node=1",
            "rdzv=tcp",
            "rdzv.id=prometheus-sweep",
            f"rdzv.endpoint='127.0.0.1:1,127.0.0.1:2',127.0.0.1:{store}",
            "metrics=prometheus",
            f"metrics.port={metrics}",
            f"health.port={health}",
            f"hydra.sweep.dir={sweep}",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )
    first, second = (json.loads((sweep / p / "result.json").read_text()) for p in "01")
    assert "rdzv=tcp takes one host:port" in first["error"], done.stderr
    assert second["exit_code"] == 0, done.stderr
    assert "cannot listen" not in done.stderr and "in use" not in done.stderr
