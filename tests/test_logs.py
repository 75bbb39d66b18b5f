"""Disk faults degrade, they do not kill: the worker log tee, the console, the JSON lines
files, elastic-run.log, result.json and stack dumps on a full (or read-only) tmpfs.

Mounting needs root (CAP_SYS_ADMIN); elsewhere these tests skip. Every mount is undone in
the fixture's teardown, whether the test passed or not."""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from elastic_runner.hydra_errors import check_run_dir, describe_run_dir_error
from elastic_runner.sweep import RESULT_FILE, PointResult
from elastic_runner.workers.logs import (
    Console,
    JsonlFile,
    LineTee,
    WriteFaults,
    describe_os_error,
    guard_log_files,
)
from elastic_runner.workers.stacks import STDERR, StackDumper

PAGE = 4096


@contextlib.contextmanager
def tmpfs(where: Path, size: str = "64k", read_only: bool = False) -> Iterator[Path]:
    """A tmpfs of ``size`` mounted at ``where`` (made if need be) for the ``with`` block;
    skips the test where mounting is impossible (not root, no CAP_SYS_ADMIN)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    where.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(where)],
        capture_output=True,
        text=True,
    )
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        if read_only:
            subprocess.run(["mount", "-o", "remount,ro", str(where)], check=True)
        yield where
    finally:
        if subprocess.run(["umount", str(where)], capture_output=True).returncode:
            subprocess.run(["umount", "-l", str(where)], check=True)  # busy: detach it


def fill(directory: Path) -> None:
    """Use up every free page of the file system of ``directory``."""
    fd = os.open(directory / "filler", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        while True:
            os.write(fd, b"\0" * PAGE)
    except OSError as exc:
        assert exc.errno == errno.ENOSPC, exc
    finally:
        os.close(fd)


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[Path]:
    """A small tmpfs, not yet full (``fill`` it when the test is ready)."""
    with tmpfs(tmp_path / "disk") as where:
        yield where


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


class _Lines(Console):
    """A console that keeps what it is given."""

    def __init__(self) -> None:
        super().__init__({})
        self.lines: list[bytes] = []

    def write(self, stream: int, rank: int, prefix: bytes, lines: list[bytes]) -> None:
        self.lines += lines


def test_a_full_disk_drops_the_log_file_after_one_warning_and_the_console_goes_on(
    disk: Path, caplog: pytest.LogCaptureFixture
) -> None:
    fill(disk)
    console = _Lines()
    tee = LineTee(disk / "stdout.log", console, 1, 0, b"")
    for i in range(100):
        tee.feed(f"line {i}\n".encode() * 100)
    tee.feed(b"last, no newline")
    tee.close()
    assert not tee.writing
    assert len(console.lines) == 100 * 100 + 1 and console.lines[-1] == b"last, no newline\n"
    [warning] = _warnings(caplog)
    assert f"cannot write {disk / 'stdout.log'}: No space left on device (ENOSPC)" in warning
    assert "the workers run on" in warning


def test_the_disk_filling_up_mid_run_keeps_what_was_written(
    disk: Path, caplog: pytest.LogCaptureFixture
) -> None:
    tee = LineTee(disk / "stdout.log", None, 1, 0, b"")
    tee.feed(b"before\n")
    fill(disk)
    tee.feed(b"x" * (2 * PAGE))  # beyond the page it has
    tee.feed(b"after\n")
    tee.close()
    assert (disk / "stdout.log").read_bytes().startswith(b"before\n")
    assert b"after" not in (disk / "stdout.log").read_bytes()
    assert len(_warnings(caplog)) == 1


def test_every_log_of_a_run_failing_alike_is_one_warning(
    disk: Path, caplog: pytest.LogCaptureFixture
) -> None:
    fill(disk)
    faults = WriteFaults.worker_logs()
    tees = [LineTee(disk / f"{r}.log", None, 1, r, b"", faults) for r in range(8)]
    for tee in tees:
        tee.feed(b"x\n")
        tee.close()
    [warning] = _warnings(caplog)
    assert str(disk / "0.log") in warning
    # another error is news: it gets its own warning
    faults.failed(disk / "5.log", OSError(errno.EIO, os.strerror(errno.EIO)))
    assert len(_warnings(caplog)) == 2 and "(EIO)" in _warnings(caplog)[1]


def test_a_log_that_cannot_be_opened_or_has_no_directory_still_tees(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    console = _Lines()
    missing = LineTee(tmp_path / "no" / "such" / "stdout.log", console, 1, 0, b"")
    nofile = LineTee(None, console, 2, 0, b"")
    for tee in (missing, nofile):
        tee.feed(b"a\nb\n")
        tee.close()
    assert console.lines == [b"a\n", b"b\n"] * 2
    [warning] = _warnings(caplog)
    assert "No such file or directory (ENOENT)" in warning


def test_a_console_on_a_full_disk_is_dropped_after_one_warning(
    disk: Path, caplog: pytest.LogCaptureFixture
) -> None:
    fill(disk)
    fd = os.open(disk / "console.out", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        console = Console({1: fd, 2: fd})
        for _ in range(3):
            console.write(1, 0, b"[0]: ", [b"x" * PAGE + b"\n"])
    finally:
        os.close(fd)
    [warning] = _warnings(caplog)
    assert "console's stdout" in warning and "(ENOSPC)" in warning


def test_a_jsonl_file_keeps_whole_lines_only_and_drops_the_rest(
    disk: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = disk / "events.jsonl"
    jsonl = JsonlFile(path, "events are dropped")
    jsonl.append(json.dumps({"n": -1}))
    fill(disk)
    n = 0
    while jsonl.writing:  # lines fill the page it has, then one is torn: cut off
        jsonl.append(json.dumps({"n": n, "pad": "x" * 300}))
        n += 1
    jsonl.append(json.dumps({"n": "dropped"}))
    jsonl.close()
    jsonl.close()
    lines = path.read_text().splitlines(keepends=True)
    assert all(line.endswith("\n") for line in lines)
    assert [json.loads(line)["n"] for line in lines] == list(range(-1, n - 1))
    [warning] = _warnings(caplog)
    assert f"cannot write {path}: No space left on device (ENOSPC); events are dropped" in warning


def test_elastic_run_log_on_a_full_disk_is_one_warning_not_a_traceback_per_record(
    disk: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    logger = logging.getLogger("test_logs.guarded")
    logger.propagate = False
    file_handler = logging.FileHandler(disk / "elastic-run.log")
    console = logging.StreamHandler()
    console.setFormatter(logging.Formatter("[elastic-run] %(message)s"))
    logger.addHandler(file_handler)
    logger.addHandler(console)
    # the warning goes through the logger elastic_runner.workers.logs: route it here
    module_log = logging.getLogger("elastic_runner.workers.logs")
    module_log.addHandler(console)
    try:
        guard_log_files(logger)
        guard_log_files(logger)  # twice is once
        logger.warning("fits")
        fill(disk)
        for i in range(50):
            logger.warning("message %d %s", i, "x" * 200)
    finally:
        module_log.removeHandler(console)
        for handler in (file_handler, console):
            logger.removeHandler(handler)
            handler.close()
    err = capfd.readouterr().err
    assert "Logging error" not in err and "Traceback" not in err
    warnings = [line for line in err.splitlines() if "cannot write" in line]
    assert len(warnings) == 1, err
    assert "elastic-run.log: No space left on device (ENOSPC)" in warnings[0]
    assert "message 49" in err  # stderr still has every message
    assert (disk / "elastic-run.log").read_text().startswith("fits\n")


def test_a_guarded_log_file_still_reports_a_bad_record_as_logging_does(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    logger = logging.getLogger("test_logs.badformat")
    logger.propagate = False
    handler = logging.FileHandler(tmp_path / "x.log")
    logger.addHandler(handler)
    try:
        guard_log_files(logger)
        logger.warning("%d", "not a number")
        logger.warning("later")
    finally:
        logger.removeHandler(handler)
        handler.close()
    assert "Logging error" in capfd.readouterr().err
    assert "later" in (tmp_path / "x.log").read_text()  # not dropped for it


def test_result_json_on_a_full_disk_is_one_line_and_no_torn_file(
    disk: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    fill(disk)
    result = PointResult([], 0, "SUCCEEDED", 1.0, str(disk), error="x" * 10000)
    assert result.write() is False
    err = capfd.readouterr().err
    assert err == (
        f"elastic-run: warning: cannot write {disk / RESULT_FILE}: "
        "No space left on device (ENOSPC)\n"
    )
    assert sorted(p.name for p in disk.iterdir()) == ["filler"]


def test_result_json_is_written_whole(tmp_path: Path) -> None:
    result = PointResult(["a=1"], 1, "FAILED", 1.0, str(tmp_path), error="boom")
    assert result.write() is True
    assert PointResult(**json.loads((tmp_path / RESULT_FILE).read_text())) == result
    assert sorted(p.name for p in tmp_path.iterdir()) == [RESULT_FILE]


def test_a_stack_dump_that_cannot_be_saved_goes_to_stderr(
    disk: Path, capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    fill(disk)
    dumper = StackDumper("faulthandler")
    text = 'Thread 0x1 (most recent call first):\n  File "t.py", line 3 in f\n'
    assert dumper._save(disk / "stacks.txt", text) == STDERR
    assert dumper._save(disk / "stacks2.txt", text) == STDERR
    assert not (disk / "stacks.txt").exists()
    assert capfd.readouterr().err.count('File "t.py", line 3 in f') == 2
    assert len(_warnings(caplog)) == 1


def test_no_directory_for_faulthandler_files_means_no_faulthandler(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "file").write_text("")
    assert StackDumper("faulthandler").worker_env(tmp_path / "file" / "fh", {}) == {}
    assert "Not a directory (ENOTDIR)" in _warnings(caplog)[0]


# -- the run directory at start (hydra_errors) ----------------------------------------


def test_describe_os_error() -> None:
    exc = OSError(errno.EROFS, os.strerror(errno.EROFS), "/x")
    assert describe_os_error(exc) == "Read-only file system (EROFS)"
    assert describe_os_error(OSError("odd")) == "odd"


def test_a_run_directory_that_cannot_be_written_is_one_line(tmp_path: Path) -> None:
    in_the_way = tmp_path / "run"
    in_the_way.write_text("")
    try:
        in_the_way.mkdir(parents=True, exist_ok=True)
    except FileExistsError as exc:
        made = exc
    assert describe_run_dir_error(made, [str(in_the_way)]) == (
        f"cannot write the run directory {in_the_way}: {in_the_way} exists and is not a directory"
    )
    assert check_run_dir(str(in_the_way)) == describe_run_dir_error(made, [str(in_the_way)])
    assert check_run_dir(str(in_the_way / "sub")) == (
        f"cannot write the run directory {in_the_way / 'sub'}: Not a directory (ENOTDIR): a "
        "parent of it is a file"
    )
    assert check_run_dir(str(tmp_path / "new" / "dir")) is None
    assert (tmp_path / "new" / "dir").is_dir()
    assert list((tmp_path / "new" / "dir").iterdir()) == []  # the probe left nothing


def test_an_error_about_a_file_in_the_run_directory_names_the_directory() -> None:
    cause = OSError(errno.EROFS, os.strerror(errno.EROFS), "/runs/a/elastic-run.log")
    try:
        raise ValueError("Unable to configure handler 'file'") from cause
    except ValueError as exc:
        wrapped = exc
    assert describe_run_dir_error(wrapped, ["/runs/a", "/sweeps"]) == (
        "cannot write the run directory /runs/a: Read-only file system (EROFS)"
    )
    # a write with no file name (a full disk), straight out of Hydra's job setup
    full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    assert describe_run_dir_error(full, ["/runs/a"]) == (
        "cannot write the run directory /runs/a: No space left on device (ENOSPC)"
    )


def test_other_errors_are_not_run_directory_errors() -> None:
    elsewhere = OSError(errno.EACCES, os.strerror(errno.EACCES), "/etc/elsewhere.yaml")
    assert describe_run_dir_error(elsewhere, ["/runs/a"]) is None
    assert describe_run_dir_error(ValueError("no OSError"), ["/runs/a"]) is None
    try:
        raise ValueError("wrapped") from OSError(errno.ENOSPC, "No space left on device")
    except ValueError as exc:
        assert describe_run_dir_error(exc, ["/runs/a"]) is None  # unnamed, not straight


def test_a_read_only_run_directory_is_found_by_the_check(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "ro", read_only=True) as ro:
        assert check_run_dir(str(ro)) == (
            f"cannot write the run directory {ro}: Read-only file system (EROFS)"
        )
        assert check_run_dir(str(ro / "run")) == (
            f"cannot write the run directory {ro / 'run'}: Read-only file system (EROFS)"
        )
