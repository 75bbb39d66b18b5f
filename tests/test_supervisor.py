"""ProcessSupervisor with real processes: immediate exit detection, tee, bounded stops."""

from __future__ import annotations

import logging
import os
import resource
import signal
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest

from elastic_runner.spec import WorkerExit
from elastic_runner.workers.cgroup import RunCgroup
from elastic_runner.workers.launcher import WorkerLaunch
from elastic_runner.workers.logs import CollapsingConsole, Console, WorkerLogPaths
from elastic_runner.workers.supervisor import ProcessSupervisor
from tests.test_logs import fill, tmpfs


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
    # Linux keeps a process's high-water mark across exec: a worker forked from this test
    # process starts at its size (about 100 MiB late in a session), whatever it runs
    forked_from = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    assert 0 < exits[1].max_rss < max(100 * 2**20, forked_from) + 20 * 2**20
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


# -- containment by cgroup --------------------------------------------------------------

#: A worker whose child clears its environment and leaves the session (no marker to find
#: it by, no process group to reach); it records the child's pid, then exits 0.
_ESCAPE = (
    "import os, subprocess, sys, time\n"
    "p = subprocess.Popen(['env', '-i', 'setsid', 'sleep', '300'])\n"
    "while open(f'/proc/{p.pid}/cmdline', 'rb').read().split(b'\\0')[0] != b'sleep':\n"
    "    time.sleep(0.005)\n"
    "print(p.pid, flush=True)\n"
)


@pytest.fixture
def contained(tmp_path: Path) -> Iterator[ProcessSupervisor]:
    from tests.test_cgroup import unavailable

    if (why := unavailable()) is not None:
        pytest.skip(f"cgroup containment is unavailable on this machine: {why}")
    cgroup = RunCgroup.create(f"elastic-run-test.{os.getpid()}.{uuid.uuid4().hex[:8]}")
    sup = ProcessSupervisor(marker=f"test-{uuid.uuid4().hex}", cgroup=cgroup)
    yield sup
    sup.close()
    assert not cgroup.path.exists()


def test_a_descendant_that_escaped_is_killed_at_the_end_of_the_attempt(
    contained: ProcessSupervisor, tmp_path: Path
) -> None:
    assert contained.cgroup is not None
    for attempt in (1, 2):
        logs = tmp_path / str(attempt)
        pids = contained.start([_launch(logs, 0, _ESCAPE), _launch(logs, 1, _ESCAPE)])
        exits: list[WorkerExit] = []
        while len(exits) < 2:
            exits += contained.wait(timeout=10)
        assert [e.returncode for e in exits] == [0, 0]
        escaped = [int((logs / str(rank) / "stdout.log").read_text()) for rank in (0, 1)]
        for rank, pid in enumerate(escaped):
            leaf = contained.cgroup.path / f"attempt-{attempt}" / f"rank-{rank}"
            assert str(pid) in (leaf / "cgroup.procs").read_text().split()
        assert pids[0] not in escaped
        contained.stop(signal.SIGTERM, 1)
        assert all(_gone(pid) for pid in escaped)
        assert not (contained.cgroup.path / f"attempt-{attempt}").exists()


def test_a_worker_whose_cgroup_cannot_be_made_runs_outside_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "not-a-cgroup").mkdir()
    not_a_cgroup = RunCgroup(tmp_path / "not-a-cgroup")  # a plain directory
    sup = ProcessSupervisor(marker=f"test-{uuid.uuid4().hex}", cgroup=not_a_cgroup)
    code = "import subprocess; p = subprocess.Popen(['sleep', '30']); print(p.pid, flush=True)"
    with caplog.at_level(logging.WARNING):
        sup.start([_launch(tmp_path, 0, code), _launch(tmp_path, 1, code)])
        exits: list[WorkerExit] = []
        while len(exits) < 2:
            exits += sup.wait(timeout=10)
        assert [e.returncode for e in exits] == [0, 0]
        sup.stop(signal.SIGTERM, 1)  # the marker sweep still works
        leftovers = [int((tmp_path / str(rank) / "stdout.log").read_text()) for rank in (0, 1)]
        assert all(_gone(pid) for pid in leftovers)
        sup.close()
    warnings = [r.getMessage() for r in caplog.records if "outside the run's cgroup" in r.message]
    assert len(warnings) == 1, warnings  # once, not per worker


# -- disk faults --------------------------------------------------------------------------

_TALKER = (
    "import sys\n"
    "for i in range(300):\n"
    "    print(f'line {i}', flush=i % 7 == 0)\n"
    "print('to stderr', file=sys.stderr)\n"
)


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def test_a_full_disk_costs_the_logs_not_the_workers(
    supervisor: _Supervisor, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with tmpfs(tmp_path / "disk") as disk:
        fill(disk)
        supervisor.start([_launch(disk, r, _TALKER, f"[a{r}]: ") for r in (0, 1)])
        exits: list[WorkerExit] = []
        deadline = time.monotonic() + 10
        while len(exits) < 2 and time.monotonic() < deadline:
            exits += supervisor.wait(timeout=10)
        supervisor.stop(signal.SIGTERM, 1)
        assert sorted((e.local_rank, e.returncode, e.stopped_by_agent) for e in exits) == [
            (0, 0, False),
            (1, 0, False),
        ]
        lines = supervisor.console_read().decode().splitlines()
        for r in (0, 1):  # the console got everything
            assert [x for x in lines if x.startswith(f"[a{r}]: line")] == [
                f"[a{r}]: line {i}" for i in range(300)
            ]
            assert f"[a{r}]: to stderr" in lines
            assert (disk / str(r) / "stdout.log").read_bytes() == b""
    [warning] = _warnings(caplog)
    assert "stdout.log: No space left on device (ENOSPC)" in warning


def test_a_log_directory_that_cannot_be_made_costs_the_logs_not_the_worker(
    supervisor: _Supervisor, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "file").write_text("")
    supervisor.start([_launch(tmp_path / "file", 0, _TALKER, "[a0]: ")])
    exits: list[WorkerExit] = []
    while not exits:
        exits += supervisor.wait(timeout=10)
    assert [(e.returncode, e.stopped_by_agent) for e in exits] == [(0, False)]
    assert "[a0]: line 299" in supervisor.console_read().decode().splitlines()
    [warning] = _warnings(caplog)
    assert f"cannot write {tmp_path / 'file' / '0'}: Not a directory (ENOTDIR)" in warning


# -- what reaches the console --------------------------------------------------------------

_BOTH_STREAMS = (
    "import os, sys\n"
    "print('common', flush=True)\n"
    "print(f'out of {os.environ[\"R\"]}', flush=True)\n"
    "print(f'err of {os.environ[\"R\"]}', file=sys.stderr, flush=True)\n"
)


def _ranked(tmp_path: Path, local_rank: int, global_rank: int) -> WorkerLaunch:
    """A worker whose global rank differs from its local rank (a second node's)."""
    return WorkerLaunch(
        local_rank=local_rank,
        global_rank=global_rank,
        argv=[sys.executable, "-c", _BOTH_STREAMS],
        env={**os.environ, "R": f"g{global_rank}"},
        logs=WorkerLogPaths(tmp_path / str(local_rank)),
        prefix=f"[{local_rank}]: ",
    )


def _run_to_the_end(sup: ProcessSupervisor, n: int) -> None:
    exits: list[WorkerExit] = []
    while len(exits) < n:
        exits += sup.wait(timeout=10)
    assert [e.returncode for e in exits] == [0] * n


@pytest.mark.parametrize(
    ("ranks", "local_ranks", "streams", "out", "err"),
    [
        # local ranks 0-2 are global ranks 10-12; a line needs both filters to allow it
        (None, [1], (1, 2), ["[1]: common", "[1]: out of g11"], ["[1]: err of g11"]),
        ([10, 11], [1, 2], (1, 2), ["[1]: common", "[1]: out of g11"], ["[1]: err of g11"]),
        ([12], [0, 1], (1, 2), [], []),
        (None, None, (2,), [], ["[0]: err of g10", "[1]: err of g11", "[2]: err of g12"]),
        (
            None,
            [0, 2],
            (1,),
            ["[0]: common", "[0]: out of g10", "[2]: common", "[2]: out of g12"],
            [],
        ),
        (None, None, (), [], []),
    ],
)
def test_console_gets_the_local_ranks_ranks_and_streams_allowed_files_get_all(
    tmp_path: Path,
    ranks: list[int] | None,
    local_ranks: list[int] | None,
    streams: tuple[int, ...],
    out: list[str],
    err: list[str],
) -> None:
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    for fd in (out_r, err_r):
        os.set_blocking(fd, False)
    sup = ProcessSupervisor(
        marker=f"test-{uuid.uuid4().hex}",
        console=Console({1: out_w, 2: err_w}),
        console_ranks=ranks,
        console_local_ranks=local_ranks,
        console_streams=streams,
    )
    try:
        sup.start([_ranked(tmp_path, r, 10 + r) for r in range(3)])
        _run_to_the_end(sup, 3)
        sup.stop(signal.SIGTERM, 1)
    finally:
        sup.close()
    stdout = _read_all(out_r).decode().splitlines()
    stderr = _read_all(err_r).decode().splitlines()
    for fd in (out_r, out_w, err_r, err_w):
        os.close(fd)
    assert sorted(stdout) == sorted(out)
    assert sorted(stderr) == sorted(err)
    for r in range(3):  # the files keep every rank and both streams
        logs = tmp_path / str(r)
        assert (logs / "stdout.log").read_text() == f"common\nout of g{10 + r}\n"
        assert (logs / "stderr.log").read_text() == f"err of g{10 + r}\n"


def test_collapse_waits_only_for_the_ranks_that_reach_the_console(tmp_path: Path) -> None:
    """A common line is complete once every console rank printed it: with local rank 2
    filtered out it is printed for ranks 10-11 at once, not after the window."""
    out_r, out_w = os.pipe()
    os.set_blocking(out_r, False)
    sup = ProcessSupervisor(
        marker=f"test-{uuid.uuid4().hex}",
        console=CollapsingConsole({1: out_w, 2: out_w}, window=60),
        console_local_ranks=[0, 1],
        console_streams=[1],
    )
    try:
        sup.start([_ranked(tmp_path, r, 10 + r) for r in range(3)])
        _run_to_the_end(sup, 3)
        before_stop = _read_all(out_r).decode().splitlines()  # nothing flushed it yet
        sup.stop(signal.SIGTERM, 1)
        lines = before_stop + _read_all(out_r).decode().splitlines()
    finally:
        sup.close()
        os.close(out_r)
        os.close(out_w)
    assert "[ranks 10-11]: common" in before_stop
    assert sorted(lines) == ["[0]: out of g10", "[1]: out of g11", "[ranks 10-11]: common"]
