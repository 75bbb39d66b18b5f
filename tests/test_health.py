"""RunStatus health logic, and the HTTP endpoint serving it (loopback unless told)."""

from __future__ import annotations

import json
import socket
import urllib.error
import urllib.request

import pytest

from elastic_runner.health import HealthServer, RunStatus
from elastic_runner.rendezvous.dynamic import address_towards
from elastic_runner.spec import WorkerActivity
from elastic_runner.workers.resources import Usage


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_failing_then_restarted_then_looping() -> None:
    clock = Clock()
    status = RunStatus("r", "n", restart_loop=2, restart_window=60, clock=clock)
    assert status.health() == (True, "starting")
    assert status.ready()[0] is False  # not running yet
    status.set(state="HEALTHY", phase="running")
    assert status.health()[0] and status.ready()[0]
    status.set_problem("worker rank 1 failed: exit code 3")
    assert status.health() == (False, "worker rank 1 failed: exit code 3")
    status.restarted()
    status.set_problem(None)
    assert status.health()[0]
    clock.now += 10
    status.restarted()
    healthy, why = status.health()
    assert not healthy and why.startswith("restart-looping: 2 restarts in the last 60 s")
    clock.now += 61
    assert status.health()[0]  # the window moved on


def test_status_json_has_live_worker_figures() -> None:
    clock = Clock()
    status = RunStatus("run7", "node-a", clock=clock)
    status.set(state="HEALTHY", round=2, group_rank=1, world_size=8, restart_count=1)
    status.set_workers({0: {"rank": 4, "pid": 111, "state": "HEALTHY"}})
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
    assert snap["workers"] == [
        {
            "local_rank": 0,
            "rank": 4,
            "pid": 111,
            "state": "HEALTHY",
            "restarts": 1,
            "cpu_percent": 97.2,
            "rss_bytes": 123456,
            "seconds_since_output": 2.5,
        }
    ]


def test_endpoint_serves_healthz_readyz_and_status() -> None:
    status = RunStatus("run7", "node-a")
    server = HealthServer(status)
    try:
        assert server.url.startswith("http://127.0.0.1:")
        assert get(server.url + "/healthz") == (200, "ok: starting\n")
        assert get(server.url + "/readyz")[0] == 503
        status.set(state="HEALTHY", phase="running")
        assert get(server.url + "/readyz")[0] == 200
        status.set_problem("hung: no output for 5 s")
        assert get(server.url + "/healthz") == (503, "unhealthy: hung: no output for 5 s\n")
        code, body = get(server.url + "/status")
        assert code == 200 and json.loads(body)["reason"] == "hung: no output for 5 s"
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
