"""ProcessSupervisor with real processes: immediate exit detection, tee, bounded stops."""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest

from elastic_runner.spec import WorkerExit
from elastic_runner.workers.launcher import WorkerLaunch
from elastic_runner.workers.logs import Console, WorkerLogPaths
from elastic_runner.workers.supervisor import ProcessSupervisor


def _launch(tmp_path: Path, rank: int, code: str, prefix: str = "") -> WorkerLaunch:
    return WorkerLaunch(
        local_rank=rank,
        global_rank=rank,
        argv=[sys.executable, "-c", code],
        env=dict(os.environ),
        logs=WorkerLogPaths(tmp_path / str(rank)),
        prefix=prefix,
    )


class _Supervisor(ProcessSupervisor):
    """A supervisor whose console is a pipe the test reads back with ``console_read()``."""

    console_read: Callable[[], bytes]


@pytest.fixture
def supervisor(tmp_path: Path) -> Iterator[_Supervisor]:
    out_r, out_w = os.pipe()
    os.set_blocking(out_r, False)
    sup = _Supervisor(marker=f"test-{os.getpid()}", console=Console({1: out_w, 2: out_w}))
    sup.console_read = lambda: _read_all(out_r)
    yield sup
    sup.close()
    os.close(out_r)
    os.close(out_w)


def _gone(pid: int, within: float = 3.0) -> bool:
    """True once ``pid`` has exited (or is a zombie awaiting its reaper)."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.01)
    return False


def _read_all(fd: int) -> bytes:
    chunks: list[bytes] = []
    while True:
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            return b"".join(chunks)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def test_exit_is_seen_at_once_without_polling(
    supervisor: ProcessSupervisor, tmp_path: Path
) -> None:
    latencies = []
    for attempt in range(3):
        pids = supervisor.start(
            [_launch(tmp_path / str(attempt), 0, "import time; time.sleep(30)")]
        )
        t0 = time.time()
        os.kill(pids[0], signal.SIGKILL)
        exits = supervisor.wait()  # no timeout: only the exit itself can end this wait
        latencies.append(exits[0].timestamp - t0)
        assert exits[0].returncode == -signal.SIGKILL and not exits[0].stopped_by_agent
    # generous bound (the benchmark measures the median: about 1 ms)
    assert sorted(latencies)[1] < 0.1, latencies


def test_exit_carries_the_workers_own_peak_rss(
    supervisor: ProcessSupervisor, tmp_path: Path
) -> None:
    # 200 MiB touched for an instant: no sampler would see it, the kernel's mark does
    supervisor.start(
        [
            _launch(tmp_path / "big", 0, "b = bytearray(200 * 2**20)"),
            _launch(tmp_path / "small", 1, "pass"),
        ]
    )
    exits: dict[int, WorkerExit] = {}
    while len(exits) < 2:
        exits.update((e.local_rank, e) for e in supervisor.wait(timeout=30))
    assert 200 * 2**20 < exits[0].max_rss < 400 * 2**20
    assert 0 < exits[1].max_rss < 100 * 2**20
    assert exits[0].returncode == exits[1].returncode == 0


def test_wait_times_out_and_wake_interrupts(supervisor: ProcessSupervisor, tmp_path: Path) -> None:
    supervisor.start([_launch(tmp_path, 0, "import time; time.sleep(30)")])
    t0 = time.monotonic()
    assert supervisor.wait(timeout=0.1) == []
    assert 0.09 < time.monotonic() - t0 < 1
    supervisor.wake()
    t0 = time.monotonic()
    assert supervisor.wait(timeout=5) == []
    assert time.monotonic() - t0 < 0.5
    exits = supervisor.stop(signal.SIGTERM, 5)
    assert [e.stopped_by_agent for e in exits] == [True]


def test_output_is_teed_in_whole_prefixed_lines(supervisor: _Supervisor, tmp_path: Path) -> None:
    code = (
        "import sys, time\n"
        "for i in range(200):\n"
        "    sys.stdout.write('part-'); sys.stdout.flush(); sys.stdout.write(f'{i}\\n')\n"
        "sys.stdout.flush(); sys.stderr.write('no newline at end'); sys.stderr.flush()\n"
    )
    supervisor.start([_launch(tmp_path, 0, code, "[a0]: "), _launch(tmp_path, 1, code, "[a1]: ")])
    exits: list[WorkerExit] = []
    while len(exits) < 2:
        exits += supervisor.wait(timeout=10)
    supervisor.stop(signal.SIGTERM, 1)
    console = supervisor.console_read().decode()
    lines = console.splitlines()
    for rank in (0, 1):
        mine = [line for line in lines if line.startswith(f"[a{rank}]: part-")]
        assert mine == [f"[a{rank}]: part-{i}" for i in range(200)]
        assert f"[a{rank}]: no newline at end" in lines
        stdout = (tmp_path / str(rank) / "stdout.log").read_text()
        assert stdout == "".join(f"part-{i}\n" for i in range(200))
        assert (tmp_path / str(rank) / "stderr.log").read_text() == "no newline at end"


def test_stop_escalates_to_sigkill_after_timeout(
    supervisor: ProcessSupervisor, tmp_path: Path
) -> None:
    code = (
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        "print('ready', flush=True); time.sleep(30)"
    )
    supervisor.start([_launch(tmp_path, 0, code)])
    while b"ready" not in (tmp_path / "0" / "stdout.log").read_bytes():
        supervisor.wait(timeout=0.05)
    t0 = time.monotonic()
    exits = supervisor.stop(signal.SIGTERM, 0.5)
    assert 0.45 < time.monotonic() - t0 < 3
    assert exits[0].returncode == -signal.SIGKILL and exits[0].stopped_by_agent


def test_stop_reaches_grandchildren_in_the_worker_process_group(
    supervisor: ProcessSupervisor, tmp_path: Path
) -> None:
    code = (
        "import subprocess, sys, time; "
        "p = subprocess.Popen(['sleep', '30']); print(p.pid, flush=True); time.sleep(30)"
    )
    supervisor.start([_launch(tmp_path, 0, code)])
    log = tmp_path / "0" / "stdout.log"
    while not log.read_text().strip():
        supervisor.wait(timeout=0.05)
    grandchild = int(log.read_text())
    supervisor.stop(signal.SIGTERM, 2)
    assert _gone(grandchild)


def test_a_group_leftover_after_success_is_swept(
    supervisor: ProcessSupervisor, tmp_path: Path
) -> None:
    code = "import subprocess; p = subprocess.Popen(['sleep', '30']); print(p.pid, flush=True)"
    supervisor.start([_launch(tmp_path, 0, code)])
    exits = supervisor.wait(timeout=10)
    assert exits[0].returncode == 0
    leftover = int((tmp_path / "0" / "stdout.log").read_text())
    assert psutil.pid_exists(leftover)
    supervisor.stop(signal.SIGTERM, 1)
    assert _gone(leftover)


def test_spawn_error_stops_what_was_started(supervisor: ProcessSupervisor, tmp_path: Path) -> None:
    good = _launch(tmp_path, 0, "import time; time.sleep(30)")
    bad = WorkerLaunch(
        1, 1, ["/nonexistent/binary"], dict(os.environ), WorkerLogPaths(tmp_path / "1")
    )
    with pytest.raises(FileNotFoundError):
        supervisor.start([good, bad])
    assert supervisor.running == []
