"""Prompt stops: a stop signal ends an agent that waits for other nodes (in a rendezvous,
in the exit barrier) within a second or two, with exit 128+N, the usual report and
``result.json``; and the peers of a node stopped by a signal stop waiting for it."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest

from elastic_runner.testing.runner import wait_for
from tests.conftest import ElasticRunner, assert_nothing_survives
from tests.e2e.test_multinode import Job

#: A stop must end the agent this fast (the issue's bound; measured: well under 1 s).
PROMPT = 2.0


def _events(run_dir: Path) -> list[dict[str, object]]:
    path = run_dir / "events.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _has_event(run_dir: Path, name: str) -> bool:
    return any(e["name"] == name for e in _events(run_dir))


def _stop_and_time(proc: subprocess.Popen[str], sig: int = signal.SIGTERM) -> float:
    t0 = time.monotonic()
    proc.send_signal(sig)
    proc.communicate(timeout=30)
    return time.monotonic() - t0


@pytest.mark.parametrize("backend", ["tcp", "etcd"])
def test_sigterm_ends_a_rendezvous_wait_at_once(
    elastic_run: ElasticRunner, tmp_path: Path, backend: str, request: pytest.FixtureRequest
) -> None:
    rdzv = None
    if backend == "etcd":
        etcd = request.getfixturevalue("etcd_server")
        rdzv = ["rdzv=etcd", f"rdzv.endpoint={etcd.endpoint}", "rdzv.join_timeout=600"]
    job = Job(elastic_run, tmp_path, "2", rdzv=rdzv)
    if rdzv is None:
        job.rdzv = [*job.rdzv, "rdzv.join_timeout=600"]
    agent = job.start()  # alone: it waits for a second node for 600 s
    run_dir = job.run_dirs[0]
    wait_for(lambda: _has_event(run_dir, "elastic_runner.rendezvous.join"), what="joining")
    took = _stop_and_time(agent)
    assert agent.returncode == 128 + signal.SIGTERM
    assert took < PROMPT, f"took {took:.2f} s"
    result = json.loads((run_dir / "result.json").read_text())
    assert result["state"] == "STOPPED by SIGTERM" and result["exit_code"] == 143
    assert _events(run_dir)[-1]["name"] == "elastic_runner.shutdown"
    assert_nothing_survives({job.run_id})


def test_sigterm_ends_an_exit_barrier_wait_at_once(
    elastic_run: ElasticRunner, tmp_path: Path
) -> None:
    job = Job(elastic_run, tmp_path, "2")
    # long exit_barrier_timeout: without a prompt stop the agent would sit there
    quick = job.start("rdzv.exit_barrier_timeout=600", probe=("--sleep", "0"))
    slow = job.start("rdzv.exit_barrier_timeout=600", probe=("--sleep", "60", "--on-term"))
    quick_dir = job.run_dirs[0]
    wait_for(lambda: _has_event(quick_dir, "elastic_runner.exit_barrier"), what="the barrier")
    took = _stop_and_time(quick)
    assert quick.returncode == 128 + signal.SIGTERM
    assert took < PROMPT, f"took {took:.2f} s"
    # the other node re-forms without it, or fails; either way it is stopped here
    slow.send_signal(signal.SIGTERM)
    slow.communicate(timeout=60)
    assert_nothing_survives({job.run_id})


def test_peers_of_a_node_stopped_by_sigterm_leave_their_barrier_at_once(
    elastic_run: ElasticRunner, tmp_path: Path
) -> None:
    job = Job(elastic_run, tmp_path, "2")
    waiting = job.start("rdzv.exit_barrier_timeout=600", probe=("--sleep", "0"))
    stopped = job.start("rdzv.exit_barrier_timeout=600", probe=("--sleep", "60", "--on-term"))
    wait_for(lambda: _has_event(job.run_dirs[0], "elastic_runner.exit_barrier"), what="the barrier")
    t0 = time.monotonic()
    stopped.send_signal(signal.SIGTERM)
    _, err = waiting.communicate(timeout=30)
    left_after = time.monotonic() - t0
    stopped.communicate(timeout=30)
    assert stopped.returncode == 128 + signal.SIGTERM
    assert waiting.returncode == 0, err  # its own workers succeeded
    assert left_after < PROMPT, f"left its barrier {left_after:.2f} s after the SIGTERM"
    assert "left the job (stopped by SIGTERM); not waiting for it" in err
    assert_nothing_survives({job.run_id})
