"""Disk faults through ``elastic-run``: a run directory on a full disk costs files, never
the job; a run directory that cannot be made or written is one line and exit 2 before any
worker starts.

The faults are real: a 1 MiB tmpfs that a worker fills up, a tmpfs remounted read-only, a
file where the directory should be. Mounting needs root (CAP_SYS_ADMIN); elsewhere the
tests that mount skip. Every mount is undone in teardown, whether the test passed or not.
"""

from __future__ import annotations

import json
import re
import subprocess
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from elastic_runner.sweep import RESULT_FILE
from tests.conftest import ElasticRunner
from tests.test_logs import tmpfs

#: Rank 0 fills the file system of the run directory, then every rank prints a lot to
#: stdout and stderr and lives on a while (metrics are sampled meanwhile); each rank
#: leaves ``done_<rank>`` in the directory given (on another file system) as it exits 0.
_WORKER = textwrap.dedent(
    """\
    import errno, os, sys, time
    from pathlib import Path

    out = Path(sys.argv[1])
    rank = int(os.environ["RANK"])
    run_dir = Path(os.environ["TORCHELASTIC_ERROR_FILE"]).parents[2]
    if rank == 0:
        fd = os.open(run_dir / "filler", os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        try:
            while True:
                os.write(fd, b"\\0" * 4096)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc
        (out / "full").touch()
    deadline = time.monotonic() + 20
    while not (out / "full").exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    for i in range(2000):
        print(f"rank {rank} line {i} " + "x" * 100)
    for i in range(200):
        print(f"rank {rank} err {i}", file=sys.stderr)
    sys.stdout.flush()
    time.sleep(0.8)
    print(f"rank {rank} done", flush=True)
    (out / f"done_{rank}").touch()
    """
)
NPROC = 8


@pytest.fixture
def worker(tmp_path: Path) -> Path:
    path = tmp_path / "filler_worker.py"
    path.write_text(_WORKER)
    return path


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs, empty."""
    with tmpfs(tmp_path / "disk", size="1m") as where:
        yield where


def _runner_on(where: Path, elastic_run: ElasticRunner) -> ElasticRunner:
    """``elastic_run`` (its teardown checks that nothing survives), with its run
    directories under ``where``."""
    elastic_run.tmp_path = where
    return elastic_run


def test_a_full_disk_costs_files_not_the_job(
    disk: Path, worker: Path, tmp_path: Path, elastic_run: ElasticRunner
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    run = _runner_on(disk, elastic_run)(
        f"job.entrypoint={worker}",
        f"job.args=[{out}]",
        f"job.nproc_per_node={NPROC}",
        "metrics=jsonl",
        "resources.interval=0.05",
        timeout=60,
    )
    # the job ran to its end: every worker exited 0 by itself, none was killed
    assert run.returncode == 0, run.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["full", *(f"done_{r}" for r in range(NPROC))]
    )
    assert f"{NPROC} workers succeeded" in run.stderr
    assert "Traceback" not in run.stderr and "Logging error" not in run.stderr
    # the console tee went on for every line
    for r in range(NPROC):
        assert f"rank {r} line 1999 " in run.stdout and f"rank {r} done" in run.stdout
        assert f"rank {r} err 199" in run.stderr
    # one warning per kind of file, naming the file and the error
    warnings = [line for line in run.stderr.splitlines() if "cannot write" in line]
    by_kind: dict[str, list[str]] = {}
    for line in warnings:
        m = re.search(r"cannot write (\S+): No space left on device \(ENOSPC\)", line)
        assert m, line
        name = Path(m.group(1)).name
        kind = "worker log" if re.fullmatch(r"std(out|err)\.log", name) else name
        by_kind.setdefault(kind, []).append(line)
    assert {k: len(v) for k, v in by_kind.items()}.items() >= {
        "worker log": 1,
        "events.jsonl": 1,
        "metrics.jsonl": 1,
    }.items(), warnings
    assert all(len(v) == 1 for v in by_kind.values()), warnings
    assert set(by_kind) <= {"worker log", "events.jsonl", "metrics.jsonl", "elastic-run.log"} | {
        RESULT_FILE
    }
    # result.json was attempted: written whole, or one line on stderr
    result = run.run_dir / RESULT_FILE
    if result.exists():
        assert json.loads(result.read_text())["exit_code"] == 0
    else:
        assert by_kind[RESULT_FILE] == [
            f"elastic-run: warning: cannot write {result}: No space left on device (ENOSPC)"
        ]
    # what was written is whole: events.jsonl and metrics.jsonl hold whole lines only
    for name in ("events.jsonl", "metrics.jsonl"):
        for line in (run.run_dir / name).read_text().splitlines():
            json.loads(line)
    assert not list(run.run_dir.glob(".*.tmp"))


def test_a_read_only_run_directory_is_one_line_and_exit_2(
    tmp_path: Path, worker: Path, elastic_run: ElasticRunner
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "full").touch()  # the worker would not wait
    with tmpfs(tmp_path / "ro", read_only=True) as ro:
        for run_dir in (ro / "run", ro):  # to be made in it; itself (it exists)
            argv, _, _ = elastic_run.command(f"job.entrypoint={worker}", f"job.args=[{out}]")
            argv = [a for a in argv if not a.startswith("hydra.run.dir=")]
            run = _run([*argv, f"hydra.run.dir={run_dir}"], tmp_path)
            assert run.returncode == 2, run.stderr
            assert run.stderr == (
                f"elastic-run: error: cannot write the run directory {run_dir}: Read-only "
                "file system (EROFS)\n"
            )
    assert sorted(p.name for p in out.iterdir()) == ["full"]  # no worker started


@pytest.mark.parametrize("where", ["file", "below a file"])
def test_a_file_where_the_run_directory_should_be_is_one_line_and_exit_2(
    tmp_path: Path, worker: Path, elastic_run: ElasticRunner, where: str
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "full").touch()
    in_the_way = tmp_path / "in-the-way"
    in_the_way.write_text("a file")
    run_dir = in_the_way if where == "file" else in_the_way / "run"
    argv, _, _ = elastic_run.command(f"job.entrypoint={worker}", f"job.args=[{out}]")
    argv = [a for a in argv if not a.startswith("hydra.run.dir=")]
    run = _run([*argv, f"hydra.run.dir={run_dir}"], tmp_path)
    assert run.returncode == 2, run.stderr
    reason = (
        f"{in_the_way} exists and is not a directory"
        if where == "file"
        else "Not a directory (ENOTDIR): a parent of it is a file"
    )
    assert run.stderr == f"elastic-run: error: cannot write the run directory {run_dir}: {reason}\n"
    assert sorted(p.name for p in out.iterdir()) == ["full"]  # no worker started
    assert in_the_way.read_text() == "a file"


def _run(argv: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL, cwd=cwd
    )
