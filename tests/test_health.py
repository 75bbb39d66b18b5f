"""RunStatus following a run's events, its health logic, and the HTTP endpoint serving it
(loopback unless told)."""

from __future__ import annotations

import json
import socket
import urllib.error
import urllib.request
from typing import Any

import pytest

from elastic_runner.addresses import address_towards
from elastic_runner.events import Event
from elastic_runner.health import HealthServer, RunStatus
from elastic_runner.spec import WorkerActivity
from elastic_runner.workers.resources import Usage


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def agent(name: str, state: str, **metadata: Any) -> Event:
    return Event(name, "AGENT", "run7", "node-a", state=state, metadata=metadata)


def worker(state: str, rank: int, **metadata: Any) -> Event:
    name = f"torchelastic.worker.status.{state}"
    return Event(name, "WORKER", "run7", "node-a", rank=rank, state=state, metadata=metadata)


def attempt(status: RunStatus, restart_count: int = 0) -> None:
    """The events of an attempt's start: rendezvous, ranks, two workers."""
    status.emit(agent("elastic_runner.rendezvous.join", "INIT", restart_count=restart_count))
    status.emit(
        agent(
            "torchelastic.worker.status.RENDEZVOUS",
            "INIT",
            round=2,
            group_rank=1,
            group_world_size=4,
            restart_count=restart_count,
        )
    )
    status.emit(agent("elastic_runner.ranks.assigned", "INIT", world_size=8))
    for local in (0, 1):
        status.emit(worker("START", 4 + local, pid=100 + local, local_rank=local))


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_healthy_failing_restarted_then_looping() -> None:
    clock = Clock()
    status = RunStatus("run7", "node-a", restart_loop=2, restart_window=60, clock=clock)
    assert status.health() == (True, "starting")
    status.emit(agent("elastic_runner.rendezvous.join", "INIT"))
    assert status.health() == (True, "rendezvous") and not status.ready()[0]
    attempt(status)
    assert status.health() == (True, "running") and status.ready()[0]
    status.emit(worker("FAILED", 5, local_rank=1, exit_code=3, error="ValueError: bad"))
    assert status.health() == (False, "worker rank 5 failed (exit code 3): ValueError: bad")
    status.emit(agent("elastic_runner.restart", "STOPPED", reason="failure"))
    assert not status.health()[0]  # still failing until the next attempt runs
    attempt(status, restart_count=1)
    assert status.health() == (True, "running")
    clock.now += 10
    status.emit(agent("elastic_runner.restart", "STOPPED", reason="failure"))
    attempt(status, restart_count=2)
    healthy, why = status.health()
    assert not healthy and why.startswith("restart-looping: 2 restarts in the last 60 s")
    clock.now += 61
    assert status.health()[0]  # the window moved on


def test_hang_and_final_failure_are_unhealthy() -> None:
    status = RunStatus("run7", "node-a")
    attempt(status)
    status.emit(agent("elastic_runner.watchdog.fired", "HEALTHY", rank=4, detail="hung: x"))
    assert status.health() == (False, "rank 4: hung: x")
    status.emit(agent("torchelastic.worker.status.FAILED", "FAILED", reason="restarts used up"))
    assert status.health() == (False, "rank 4: hung: x")
    done = RunStatus("r", "n")
    attempt(done)
    done.emit(agent("torchelastic.worker.status.SUCCEEDED", "SUCCEEDED"))
    assert done.health() == (True, "finished") and not done.ready()[0]


def test_status_json_has_live_worker_figures() -> None:
    clock = Clock()
    status = RunStatus("run7", "node-a", clock=clock)
    attempt(status, restart_count=1)
    status.watch(
        lambda: {0: WorkerActivity(last_output=clock.now - 2.5)},
        lambda: {0: Usage(cpu_percent=97.25, rss=123456, processes=2)},
    )
    snap = status.snapshot()
    assert (snap["run_id"], snap["round"], snap["group_rank"], snap["world_size"]) == (
        "run7",
        2,
        1,
        8,
    )
    assert snap["workers"][0] == {
        "local_rank": 0,
        "rank": 4,
        "pid": 100,
        "state": "HEALTHY",
        "restarts": 1,
        "cpu_percent": 97.2,
        "rss_bytes": 123456,
        "seconds_since_output": 2.5,
    }
    assert snap["workers"][1]["cpu_percent"] is None  # not sampled yet


def test_endpoint_serves_healthz_readyz_and_status() -> None:
    status = RunStatus("run7", "node-a")
    server = HealthServer(status)
    try:
        assert server.url.startswith("http://127.0.0.1:")
        assert get(server.url + "/healthz") == (200, "ok: starting\n")
        assert get(server.url + "/readyz")[0] == 503
        attempt(status)
        assert get(server.url + "/readyz")[0] == 200
        status.emit(agent("elastic_runner.watchdog.fired", "HEALTHY", rank=4, detail="hung"))
        assert get(server.url + "/healthz") == (503, "unhealthy: rank 4: hung\n")
        code, body = get(server.url + "/status")
        assert code == 200 and json.loads(body)["reason"] == "rank 4: hung"
        assert get(server.url + "/nope")[0] == 404
    finally:
        server.close()


def test_endpoint_is_loopback_only_by_default() -> None:
    server = HealthServer(RunStatus("r", "n"))
    try:
        outside = address_towards("192.0.2.1", 9)
        if outside.startswith("127.") or not outside[0].isdigit():
            pytest.skip("this machine has no non-loopback address")
        with pytest.raises(OSError), socket.create_connection((outside, server.port), 2):
            pass
    finally:
        server.close()
