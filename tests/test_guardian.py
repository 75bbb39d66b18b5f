"""The guardian process, for real: it fences marked processes when the agent's lease runs
out (and spares those started after), does nothing while leases are renewed, and sweeps
them when the agent dies."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator

import psutil
import pytest

from elastic_runner.testing.runner import wait_for
from elastic_runner.workers.guardian import Guardian
from elastic_runner.workers.tree import MARKER_ENV


@pytest.fixture
def marker() -> str:
    return uuid.uuid4().hex


@pytest.fixture
def guardian(marker: str) -> Iterator[Guardian]:
    g = Guardian(marker, "test-run")
    yield g
    g.close()


@pytest.fixture
def spawn(marker: str) -> Iterator[list[subprocess.Popen[bytes]]]:
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    for p in procs:
        p.kill()
        p.wait()


def _worker(marker: str, procs: list[subprocess.Popen[bytes]]) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(60)"],
        env={**os.environ, MARKER_ENV: marker},
    )
    procs.append(proc)
    return proc


def test_a_lease_that_runs_out_kills_the_marked_processes_at_its_end(
    guardian: Guardian, marker: str, spawn: list[subprocess.Popen[bytes]]
) -> None:
    worker = _worker(marker, spawn)
    deadline = time.monotonic() + 0.5
    guardian.lease(deadline)
    worker.wait(timeout=10)
    assert worker.returncode == -9
    assert time.monotonic() >= deadline  # not before its end


def test_renewed_leases_and_no_lease_kill_nothing(
    guardian: Guardian, marker: str, spawn: list[subprocess.Popen[bytes]]
) -> None:
    worker = _worker(marker, spawn)
    for _ in range(6):  # renewed before each end
        guardian.lease(time.monotonic() + 0.3)
        time.sleep(0.1)
    guardian.lease(None)
    time.sleep(0.5)
    assert worker.poll() is None


def test_processes_started_after_the_lease_ran_out_are_spared(
    guardian: Guardian, marker: str, spawn: list[subprocess.Popen[bytes]]
) -> None:
    old = _worker(marker, spawn)
    guardian.lease(time.monotonic() + 0.2)
    old.wait(timeout=10)
    new = _worker(marker, spawn)  # the attempt after joining again
    guardian.lease(time.monotonic() + 30)
    time.sleep(0.3)
    assert new.poll() is None


def test_a_dead_agent_gets_its_processes_swept(
    marker: str, spawn: list[subprocess.Popen[bytes]]
) -> None:
    worker = _worker(marker, spawn)
    g = Guardian(marker, "test-run")
    g._proc.stdin.close()  # type: ignore[union-attr]  # the agent's end, as at its death
    worker.wait(timeout=20)
    wait_for(lambda: not psutil.pid_exists(g.pid) or g._proc.poll() is not None)
    assert worker.returncode in (-9, -15)
