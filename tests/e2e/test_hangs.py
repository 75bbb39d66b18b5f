"""Hangs and health end to end through ``elastic-run``: a silent hang and a stopped
heartbeat are detected with the stuck function named, an expired timer stops only its
worker's tree while the agent lives on, and /healthz follows a failure and a restart."""

from __future__ import annotations

import json
import shutil
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest

from elastic_runner.testing.runner import http_status, wait_for
from tests.conftest import TESTS, ElasticRunner, free_port

HANG = TESTS / "workers" / "hang.py"
FAILER = TESTS / "workers" / "failer.py"
HAS_PY_SPY = bool(Path(sys.executable).with_name("py-spy").exists() or shutil.which("py-spy"))


def hang_job(out: Path, mode: str, ranks: str | None = None, nproc: int = 2) -> list[str]:
    args = [str(out), mode, *([ranks] if ranks else [])]
    joined = ",".join(f'"{a}"' for a in args)
    return [
        f"job.entrypoint={HANG}",
        f"job.args=[{joined}]",
        f"job.nproc_per_node={nproc}",
        "max_restarts=1",
    ]


@pytest.mark.parametrize(
    "stacks",
    [
        "faulthandler",
        pytest.param("py-spy", marks=pytest.mark.skipif(not HAS_PY_SPY, reason="no py-spy")),
    ],
)
def test_a_silent_hang_is_detected_and_the_dump_names_the_function(
    elastic_run: ElasticRunner, tmp_path: Path, stacks: str
) -> None:
    run = elastic_run(
        *hang_job(tmp_path, "silent"),
        "watchdog.no_output_timeout=1.5",
        f"watchdog.stacks={stacks}",
    )
    assert run.returncode == 0, run.stderr  # detected, stopped, restarted, succeeded
    assert 1.5 < run.seconds < 30
    for rank in (0, 1):  # every rank's stacks are dumped, hung or not yet
        dump = run.run_dir / "attempt_1" / str(rank) / "stacks.txt"
        assert "wait_for_peer" in dump.read_text()
    hung = [line for line in run.stderr.splitlines() if ": hung: " in line and "failed" not in line]
    assert hung, run.stderr  # the first rank past the deadline (or both at once)
    for line in hung:
        assert "hung: no output for 1.5 s (watchdog.no_output_timeout); " in line
        assert "stuck in wait_for_peer at " in line and "stacks: " in line
    fired = [e for e in run.events() if e["name"] == "elastic_runner.watchdog.fired"]
    assert len(fired) == len(hung)
    assert {e["metadata"]["function"].split(" at ")[0] for e in fired} == {"wait_for_peer"}


def test_a_stopped_heartbeat_is_detected_for_that_rank_only(
    elastic_run: ElasticRunner, tmp_path: Path
) -> None:
    run = elastic_run(
        *hang_job(tmp_path, "heartbeat", ranks="1"),
        "watchdog.heartbeat_timeout=1",
        "watchdog.stacks=faulthandler",
    )
    assert run.returncode == 0, run.stderr
    assert "worker rank 1: hung: no heartbeat for 1 s (watchdog.heartbeat_timeout)" in run.stderr
    assert "stuck in wait_for_peer at" in run.stderr
    assert "worker rank 0: hung" not in run.stderr  # rank 0 never opted in
    failed = [
        e
        for e in run.events()
        if e["name"] == "torchelastic.worker.status.FAILED" and e["metadata"]["attempt"] == 1
    ]
    assert [(e["rank"], e["metadata"]["failure"]) for e in failed] == [(1, "WATCHDOG")]


def test_an_expired_timer_stops_only_that_workers_tree(
    elastic_run: ElasticRunner, tmp_path: Path
) -> None:
    proc, run_dir, _ = elastic_run.popen(*hang_job(tmp_path, "timer", ranks="1"), "timer=file")
    pids_file = tmp_path / "pids_r1.txt"
    wait_for(pids_file.exists, what="rank 1 armed its timer")
    worker, child = map(int, pids_file.read_text().split())
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "worker rank 1: timer for scope train_step expired after 1 s; stuck in train_step" in err
    assert "killed by SIGKILL (timer expired)" in err
    assert not psutil.pid_exists(worker) and not psutil.pid_exists(child)
    expired = [
        json.loads(line)
        for line in (run_dir / "events.jsonl").read_text().splitlines()
        if "timer.expired" in line
    ]
    assert [(e["metadata"]["rank"], e["metadata"]["scope"]) for e in expired] == [(1, "train_step")]
    assert (run_dir / "attempt_1" / "1" / "stacks.txt").exists()


def test_healthz_follows_a_failure_and_a_restart(
    elastic_run: ElasticRunner, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    port = free_port()
    # rank 1 fails at once on attempt 1; the 1.5 s backoff holds the node in "failing"
    proc, _, _ = elastic_run.popen(
        f"job.entrypoint={HANG}",
        f'job.args=["{out}","exit-first","1"]',
        "job.nproc_per_node=2",
        "max_restarts=1",
        "restart.backoff.initial=1.5",
        f"health.port={port}",
    )
    seen: list[int] = []
    deadline = time.monotonic() + 30
    while proc.poll() is None and time.monotonic() < deadline:
        code = http_status(port)
        if code is not None and (not seen or seen[-1] != code):
            seen.append(code)
        if seen[-3:] == [200, 503, 200]:
            ready = urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2).status
            status = json.loads(
                urllib.request.urlopen(f"http://127.0.0.1:{port}/status", timeout=2).read()
            )
            break
        time.sleep(0.02)
    (out / "release").touch()
    _, err = proc.communicate(timeout=30)
    assert seen[-3:] == [200, 503, 200], (seen, err)
    assert ready == 200  # the restarted workers run: ready again
    assert status["restart_count"] == 1 and status["state"] == "HEALTHY"
    assert status["world_size"] == 2 and status["group_rank"] == 0
    assert [w["rank"] for w in status["workers"]] == [0, 1]
    assert all(isinstance(w["pid"], int) for w in status["workers"])
    assert proc.returncode == 0, err


def test_a_busy_health_port_is_one_line_and_exit_2(elastic_run: ElasticRunner) -> None:
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        run = elastic_run("+job=hello", f"health.port={port}")
    assert run.returncode == 2
    assert run.stderr.strip().splitlines() == [
        f"elastic-run: error: health.port={port}: cannot listen on 127.0.0.1:{port} "
        "(Address already in use)"
    ]


def test_the_workers_own_sitecustomize_still_runs(
    elastic_run: ElasticRunner, tmp_path: Path
) -> None:
    """The faulthandler stack dump arrives through a sitecustomize on PYTHONPATH; one the
    worker's environment already had must run as before."""
    site = tmp_path / "site"
    site.mkdir()
    marker = tmp_path / "user_sitecustomize_ran"
    (site / "sitecustomize.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    run = elastic_run(
        "+job=hello",
        "job.nproc_per_node=1",
        f"+job.env.PYTHONPATH={site}",
        "watchdog.no_output_timeout=30",
        "watchdog.stacks=faulthandler",
    )
    assert run.returncode == 0, run.stderr
    assert marker.exists()
    assert list((run.run_dir / "attempt_1" / "0" / "faulthandler").glob("*.txt"))  # ours too


@pytest.mark.parametrize(
    "stacks",
    [
        "faulthandler",
        pytest.param("py-spy", marks=pytest.mark.skipif(not HAS_PY_SPY, reason="no py-spy")),
    ],
)
def test_a_hung_module_run_with_m_is_stuck_in_its_own_function(
    elastic_run: ElasticRunner, tmp_path: Path, stacks: str
) -> None:
    """``job.module``: runpy's frames are outermost in the dump; the function named is
    the module's own (py-spy names no thread here: the module never imports threading)."""
    run = elastic_run(
        "job.module=stuck_module",
        f"+job.env.PYTHONPATH={TESTS / 'workers'}",
        "+job.env.PYTHONDONTWRITEBYTECODE=1",  # no __pycache__ in the source tree
        "job.nproc_per_node=1",
        "max_restarts=1",
        "watchdog.no_output_timeout=1",
        f"watchdog.stacks={stacks}",
    )
    assert run.returncode == 0, run.stderr  # detected, stopped, restarted, succeeded
    dump = (run.run_dir / "attempt_1/0/stacks.txt").read_text()
    assert "_run_module_as_main" in dump  # runpy's frames are there, and not named
    module = TESTS / "workers" / "stuck_module.py"
    line = next(
        n
        for n, text in enumerate(module.read_text().splitlines(), 1)
        if text.strip() == "time.sleep(1)"
    )
    where = f"{module}:{line}" if stacks == "faulthandler" else f"stuck_module.py:{line}"
    hung = [ln for ln in run.stderr.splitlines() if "worker rank 0: hung: " in ln]
    assert len(hung) == 1, run.stderr
    assert f"; stuck in wait_for_collective at {where}; stacks: " in hung[0]
    fired = [e for e in run.events() if e["name"] == "elastic_runner.watchdog.fired"]
    assert [e["metadata"]["function"] for e in fired] == [f"wait_for_collective at {where}"]
