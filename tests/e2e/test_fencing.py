"""Fencing: a node whose membership lapsed (its agent frozen, or cut off from the store)
has its workers killed before the others' new world starts, so the workers of two worlds
never run side by side; it joins again as a new node when it can."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import psutil

from elastic_runner.testing.runner import wait_for
from tests.conftest import ElasticRunner, assert_nothing_survives
from tests.e2e.test_multinode import Job

#: Slack for "no later than the new world's start": the guardian's SIGKILL and the
#: observation of the death (polled every 20 ms here) take a few milliseconds.
SLACK = 0.25


def _events(run_dir: Path) -> list[dict[str, object]]:
    path = run_dir / "events.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _starts(run_dir: Path, attempt: int) -> list[dict[str, object]]:
    return [
        e
        for e in _events(run_dir)
        if e["name"] == "torchelastic.worker.status.START" and e["metadata"]["attempt"] == attempt  # type: ignore[index]
    ]


def _world_sizes(run_dir: Path) -> list[int]:
    return [
        int(e["metadata"]["group_world_size"])  # type: ignore[index]
        for e in _events(run_dir)
        if e["name"] == "torchelastic.worker.status.RENDEZVOUS"
    ]


def _listener(port: int) -> int | None:
    """The pid of the process listening on ``port`` (the agent hosting the store)."""
    for conn in psutil.net_connections("tcp"):
        if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port:
            return conn.pid
    return None


def test_a_frozen_agent_is_fenced_before_the_others_reform_and_rejoins(
    elastic_run: ElasticRunner, tmp_path: Path
) -> None:
    job = Job(elastic_run, tmp_path, "2:3")
    agents = [job.start(probe=("--sleep", "120", "--on-term")) for _ in range(3)]
    wait_for(lambda: all(_starts(d, 1) for d in job.run_dirs), what="3 agents running")
    assert all(_world_sizes(d) == [3] for d in job.run_dirs)
    # freeze an agent that does not host the store (the first to bind it does)
    host = _listener(job.port)
    index = next(i for i, a in enumerate(agents) if a.pid != host)
    frozen, frozen_dir = agents[index], job.run_dirs[index]
    others = [d for i, d in enumerate(job.run_dirs) if i != index]
    worker = psutil.Process(int(_starts(frozen_dir, 1)[0]["metadata"]["pid"]))  # type: ignore[index]
    t_freeze = time.time()
    frozen.send_signal(signal.SIGSTOP)
    try:
        # its guardian SIGKILLs the worker when the frozen agent's lease runs out
        wait_for(lambda: not worker.is_running() or worker.status() == "zombie", timeout=20)
        worker_gone = time.time()
        # the other two re-form without it
        wait_for(lambda: all(_starts(d, 2) for d in others), timeout=20)
        new_world = min(float(_starts(d, 2)[0]["timestamp"]) for d in others)  # type: ignore[arg-type]
        assert [_world_sizes(d)[-1] for d in others] == [2, 2]
    finally:
        frozen.send_signal(signal.SIGCONT)
    # the two worlds never overlapped (beyond the observation slack)
    assert worker_gone <= new_world + SLACK, (
        f"worker of the frozen node died {worker_gone - new_world:.3f} s after the new "
        f"world started (frozen at {t_freeze:.3f})"
    )
    # thawed, it notices the lapse, and joins again: the job re-forms to three nodes
    wait_for(lambda: any(e["name"] == "elastic_runner.fenced" for e in _events(frozen_dir)))
    wait_for(lambda: all(_world_sizes(d)[-1] == 3 for d in job.run_dirs), timeout=30)
    for agent in agents:
        agent.send_signal(signal.SIGTERM)
    for agent in agents:
        agent.communicate(timeout=60)
        assert agent.returncode == 128 + signal.SIGTERM
    assert_nothing_survives({job.run_id})
