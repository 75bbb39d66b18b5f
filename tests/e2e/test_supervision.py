"""Nothing is left behind: every way a worker can start processes, every way a run ends."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.conftest import TESTS, ElasticRunner, assert_nothing_survives

SPAWNER = TESTS / "workers" / "spawner.py"
HOWS = ["child", "shell", "setsid", "doublefork"]


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _wait_for(path: Path, timeout: float = 20) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.02)
    record: dict[str, Any] = json.loads(path.read_text())
    return record


def _gone_soon(pid: int, within: float = 5) -> bool:
    deadline = time.monotonic() + within
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    return not _alive(pid)


def _job(tmp_path: Path, how: str, then: str) -> list[str]:
    return [f"job.entrypoint={SPAWNER}", f"job.args=[{tmp_path},{how},{then}]"]


@pytest.mark.parametrize("how", HOWS)
def test_normal_end_leaves_nothing(elastic_run: ElasticRunner, tmp_path: Path, how: str) -> None:
    run = elastic_run(*_job(tmp_path, how, "exit0"))
    assert run.returncode == 0, run.stderr
    pid = json.loads((tmp_path / "a0_r0.json").read_text())["descendant"]
    assert _gone_soon(pid)


@pytest.mark.parametrize("how", HOWS)
def test_sigterm_to_agent_leaves_nothing(
    elastic_run: ElasticRunner, tmp_path: Path, how: str
) -> None:
    proc, _, _ = elastic_run.popen(*_job(tmp_path, how, "sleep"), "stop_timeout=5")
    pid = _wait_for(tmp_path / "a0_r0.json")["descendant"]
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=20)
    assert proc.returncode == 143
    assert _gone_soon(pid)


@pytest.mark.parametrize("how", HOWS)
def test_sigkill_to_agent_leaves_nothing(
    elastic_run: ElasticRunner, tmp_path: Path, how: str
) -> None:
    proc, _, run_id = elastic_run.popen(*_job(tmp_path, how, "sleep"))
    pid = _wait_for(tmp_path / "a0_r0.json")["descendant"]
    proc.kill()
    _, err = proc.communicate(timeout=20)
    assert _gone_soon(pid)
    assert_nothing_survives({run_id})
    # the guardian (which shares the agent's stderr) says what it cleaned up
    assert f"[elastic-run guardian] agent of run {run_id} died; killed" in err


@pytest.mark.parametrize("how", HOWS)
def test_restart_leaves_nothing_of_the_previous_attempt(
    elastic_run: ElasticRunner, tmp_path: Path, how: str
) -> None:
    run = elastic_run(*_job(tmp_path, how, "fail-first"), "max_restarts=1")
    assert run.returncode == 0, run.stderr
    second = json.loads((tmp_path / "a1_r0.json").read_text())
    assert second["previous_alive"] is False
    assert _gone_soon(second["descendant"])
