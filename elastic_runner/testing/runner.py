"""Running ``elastic-run`` for real from tests, and proving afterwards that no process of
those runs survived. Used by elastic_runner's own tests and by plugin packages' tests
(through the fixtures in :mod:`elastic_runner.testing.fixtures`)."""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

__all__ = [
    "ElasticRunner",
    "Run",
    "assert_nothing_survives",
    "describe_process",
    "elastic_run_exe",
    "free_port",
    "http_status",
    "processes_of_runs",
    "wait_for",
]


def elastic_run_exe() -> str:
    """The ``elastic-run`` installed beside the interpreter running the tests."""
    exe = Path(sys.executable).with_name("elastic-run")
    found = str(exe) if exe.exists() else shutil.which("elastic-run")
    assert found, "elastic-run is not installed (pip install -e '.[dev]')"
    return found


def processes_of_runs(run_ids: set[str], key: str = "TORCHELASTIC_RUN_ID") -> list[psutil.Process]:
    """Live processes whose environment variable ``key`` (by default the run id every
    worker gets) is one of ``run_ids``."""
    found = []
    for proc in psutil.process_iter(["pid"]):
        try:
            if proc.pid == os.getpid() or proc.status() == psutil.STATUS_ZOMBIE:
                continue
            if proc.environ().get(key) in run_ids:
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


@dataclass
class Run:
    """A finished ``elastic-run``."""

    returncode: int
    stdout: str
    stderr: str
    run_dir: Path
    run_id: str
    seconds: float

    def events(self) -> list[dict[str, Any]]:
        path = self.run_dir / "events.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()]


class ElasticRunner:
    """Starts ``elastic-run`` in a subprocess with a fresh run id and run directory, and
    remembers every run id so the test's teardown can prove nothing survived."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.run_ids: set[str] = set()
        self._count = 0
        self._agents: list[subprocess.Popen[str]] = []

    def command(self, *overrides: str, run_id: str | None = None) -> tuple[list[str], Path, str]:
        self._count += 1
        run_dir = self.tmp_path / f"run{self._count}"
        run_id = run_id or f"test-{uuid.uuid4().hex[:12]}"
        self.run_ids.add(run_id)
        argv = [elastic_run_exe(), *overrides, f"hydra.run.dir={run_dir}", f"rdzv.id={run_id}"]
        return argv, run_dir, run_id

    def popen(
        self, *overrides: str, run_id: str | None = None, **kwargs: object
    ) -> tuple[subprocess.Popen[str], Path, str]:
        argv, run_dir, run_id = self.command(*overrides, run_id=run_id)
        proc = subprocess.Popen(
            argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            stdin=subprocess.DEVNULL,
            **kwargs,  # type: ignore[call-overload]
        )
        self._agents.append(proc)
        return proc, run_dir, run_id

    def kill_agents(self) -> list[int]:
        """SIGKILL the agents started with :meth:`popen` that are still running (a test
        that failed before waiting for one); returns their pids."""
        killed = []
        for proc in self._agents:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
                killed.append(proc.pid)
        return killed

    def __call__(self, *overrides: str, timeout: float = 60, cwd: Path | None = None) -> Run:
        argv, run_dir, run_id = self.command(*overrides)
        t0 = time.monotonic()
        done = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
            cwd=cwd or self.tmp_path,
        )
        return Run(
            done.returncode, done.stdout, done.stderr, run_dir, run_id, time.monotonic() - t0
        )


def assert_nothing_survives(
    run_ids: set[str], within: float = 5.0, key: str = "TORCHELASTIC_RUN_ID"
) -> None:
    """Fail if a process of ``run_ids`` (matched on the environment variable ``key``, see
    :func:`processes_of_runs`) is still alive ``within`` s from now (then kill it). The
    message describes each survivor: its command, state and signal masks say why it did
    not exit (stopped, traced, blocking or ignoring the stop signal)."""
    deadline = time.monotonic() + within
    while (left := processes_of_runs(run_ids, key)) and time.monotonic() < deadline:
        time.sleep(0.05)
    described = [describe_process(proc) + _python_stack(proc) for proc in left]
    for proc in left:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    assert not left, "processes survived the test:\n" + "\n".join(described)


def _python_stack(proc: psutil.Process) -> str:
    """Where a surviving Python process is, from ``py-spy dump`` when installed."""
    from elastic_runner.workers.stacks import find_py_spy

    py_spy = find_py_spy()
    if py_spy is None:
        return ""
    try:
        done = subprocess.run(
            [py_spy, "dump", "--pid", str(proc.pid)],
            capture_output=True,
            text=True,
            timeout=10,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired:
        return "\n  (py-spy dump timed out)"
    return "\n" + textwrap.indent((done.stdout or done.stderr).strip(), "  ")


def describe_process(proc: psutil.Process) -> str:
    """One line on ``proc`` for a failure message: pid, command, state, tracer and the
    signal fields of ``/proc/<pid>/status``."""
    try:
        command = " ".join(" ".join(proc.cmdline()).split())[:200]
        fields = dict(
            line.split(":\t", 1)
            for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines()
            if ":\t" in line
        )
    except (psutil.Error, OSError) as exc:
        return f"pid {proc.pid}: {exc!r}"
    keys = ("State", "TracerPid", "SigPnd", "ShdPnd", "SigBlk", "SigIgn", "SigCgt")
    return f"pid {proc.pid} ({command}): " + ", ".join(
        f"{key} {fields.get(key, '?').strip()}" for key in keys
    )


def free_port() -> int:
    """A port free now on every interface, below the kernel's ephemeral range: a port
    the kernel hands out by itself (an outgoing connection's, or a listener's on port 0
    such as an agent's reserved store-failover port) cannot take it between this call
    and the test binding it, as one picked by binding port 0 could (seen as a store's
    host finding its endpoint's port in use, once in a CI run)."""
    low = _ephemeral_low()
    for _ in range(200):
        port = random.randrange(10000, low)
        with socket.socket() as s:
            try:
                s.bind(("", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:  # (no free port there: take any)
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ephemeral_low() -> int:
    """The first port of the kernel's ephemeral range (32768 when it cannot be read)."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range", encoding="ascii") as f:
            low = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768
    return low if low > 11000 else 32768


def http_status(port: int, path: str = "/healthz") -> int | None:
    """The status a probe gets from the health endpoint on this machine's ``port``
    (``None``: nothing listens yet)."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as r:
            return int(r.status)
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return None


def wait_for(predicate: Callable[[], object], timeout: float = 30.0, what: str = "") -> None:
    """Poll ``predicate`` every 20 ms until it is true; fail the test after ``timeout`` s.
    For conditions outside this process (a file a worker writes, a port that opens)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out after {timeout:g} s: {what or predicate}"
        time.sleep(0.02)
