"""Nothing is left behind, even by a process that hides from the marker sweep: a worker's
child that clears its environment (``env -i``) or overwrites ``ELASTIC_RUNNER_AGENT``, and
leaves its session (``setsid``), directly or as a double-forked orphan. Where this machine
allows cgroups, it is killed at the end of each attempt (a run that succeeds, a failure and
its restart) and by the guardian when the agent is SIGKILLed; where it does not, these tests
skip with the reason, and the agent says once that it runs without."""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from elastic_runner.workers.cgroup import DISABLE_ENV, own_cgroup
from tests.conftest import TESTS, ElasticRunner
from tests.test_cgroup import unavailable

ESCAPER = TESTS / "workers" / "escaper.py"
HOWS = ["env-i", "overwrite", "orphan"]

pytestmark = pytest.mark.skipif(
    shutil.which("setsid") is None or shutil.which("env") is None,
    reason="the escaping worker needs env and setsid (util-linux)",
)


def needs_cgroups() -> pytest.MarkDecorator:
    why = unavailable()
    return pytest.mark.skipif(
        why is not None, reason=f"cgroup containment is unavailable on this machine: {why}"
    )


def _job(out: Path, how: str, then: str) -> list[str]:
    return [f"job.entrypoint={ESCAPER}", f"job.args=[{out},{how},{then}]"]


def _alive(record: dict[str, Any]) -> bool:
    """The escaped process of ``record`` is still running (not a zombie, not a new process
    that reused its pid)."""
    try:
        with open(f"/proc/{record['pid']}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return False
    return fields[0] != "Z" and int(fields[19]) == record["start"]


def _gone_soon(record: dict[str, Any], within: float = 5.0) -> bool:
    deadline = time.monotonic() + within
    while _alive(record) and time.monotonic() < deadline:
        time.sleep(0.02)
    return not _alive(record)


def _record(path: Path, timeout: float = 20) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.02)
    record: dict[str, Any] = json.loads(path.read_text())
    return record


def _cgroups_of(agent_pid: int) -> list[Path]:
    """The agent's run cgroups still there."""
    return list(own_cgroup().glob(f"elastic-run.{agent_pid}.*"))


def _contained(record: dict[str, Any], agent_pid: int) -> None:
    """The escaped process was in a worker's cgroup of the agent's run."""
    assert f"/elastic-run.{agent_pid}." in record["cgroup"], record
    assert "/attempt-" in record["cgroup"] and "/rank-0" in record["cgroup"], record


@needs_cgroups()
@pytest.mark.parametrize("how", HOWS)
def test_a_run_that_succeeds_leaves_nothing(
    elastic_run: ElasticRunner, tmp_path: Path, how: str
) -> None:
    proc, _, _ = elastic_run.popen(*_job(tmp_path, how, "exit0"))
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    record = _record(tmp_path / "a0_r0.json")
    _contained(record, proc.pid)
    assert _gone_soon(record, within=0)  # killed before the agent exited
    assert _cgroups_of(proc.pid) == []
    assert "cgroup containment" not in err


@needs_cgroups()
@pytest.mark.parametrize("how", HOWS)
def test_a_failure_and_restart_leave_nothing_of_the_previous_attempt(
    elastic_run: ElasticRunner, tmp_path: Path, how: str
) -> None:
    proc, _, _ = elastic_run.popen(*_job(tmp_path, how, "fail-first"), "max_restarts=1")
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    first, second = _record(tmp_path / "a0_r0.json"), _record(tmp_path / "a1_r0.json")
    _contained(first, proc.pid)
    _contained(second, proc.pid)
    assert "/attempt-1/" in first["cgroup"] and "/attempt-2/" in second["cgroup"]
    assert second["previous_alive"] is False  # killed before the restart
    assert not _alive(first) and not _alive(second)
    assert _cgroups_of(proc.pid) == []


@needs_cgroups()
@pytest.mark.parametrize("how", HOWS)
def test_the_guardian_kills_it_when_the_agent_is_sigkilled(
    elastic_run: ElasticRunner, tmp_path: Path, how: str
) -> None:
    proc, _, run_id = elastic_run.popen(*_job(tmp_path, how, "sleep"))
    record = _record(tmp_path / "a0_r0.json")
    _contained(record, proc.pid)
    proc.kill()
    _, err = proc.communicate(timeout=20)
    assert _gone_soon(record)
    assert f"[elastic-run guardian] agent of run {run_id} died; killed" in err
    deadline = time.monotonic() + 5
    while _cgroups_of(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert _cgroups_of(proc.pid) == []  # the guardian removed it


def test_without_cgroups_the_agent_says_so_once(elastic_run: ElasticRunner, tmp_path: Path) -> None:
    """Turned off (or unavailable): one info line, and the marker sweep alone, which an
    ``env -i setsid`` child does outlive (killed here by the test)."""
    env = {**os.environ, DISABLE_ENV: "0"}
    proc, run_dir, _ = elastic_run.popen(*_job(tmp_path, "env-i", "exit0"), env=env)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    record = _record(tmp_path / "a0_r0.json")
    try:
        assert "/elastic-run." not in record["cgroup"]
        assert err.count("no cgroup containment") == 1, err
        assert err.count("cgroup containment") == 1, err
        log = (run_dir / "elastic-run.log").read_text().splitlines()
        said = [line for line in log if f"{DISABLE_ENV}=0: no cgroup containment" in line]
        assert len(said) == 1 and "INFO" in said[0], log
    finally:
        if _alive(record):
            os.kill(record["pid"], signal.SIGKILL)


def test_the_agent_says_once_whether_it_contains(
    elastic_run: ElasticRunner, tmp_path: Path
) -> None:
    """Whatever this machine allows: one info line when cgroups cannot be used (with the
    reason), none when they are."""
    env = {k: v for k, v in os.environ.items() if k != DISABLE_ENV}
    proc, _, _ = elastic_run.popen(*_job(tmp_path, "env-i", "exit0"), env=env)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    record = _record(tmp_path / "a0_r0.json")
    why = unavailable()
    try:
        if why is None:
            assert "cgroup" not in err, err
            assert not _alive(record)
        else:
            assert err.count("cgroup containment unavailable (") == 1, err
    finally:
        if _alive(record):
            os.kill(record["pid"], signal.SIGKILL)
