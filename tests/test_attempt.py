"""One attempt's bookkeeping: which ranks the agent stopped had failed before the stop
(an error file, or the same error as a failed rank in their stderr, written before the
stop was sent) and which are bystanders."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from elastic_runner.attempt import Attempt
from elastic_runner.error_file import write_error
from elastic_runner.spec import FailureKind, WorkerExit, WorkerState, WorkerStatus
from elastic_runner.workers.logs import WorkerLogPaths
from tests.test_failures import TORCH_STDERR

SIGTERM = -signal.SIGTERM


def _boom(rank: int) -> str:
    """Rank ``rank``'s stderr in the real torch run of tests/test_failures.py."""
    return TORCH_STDERR.replace("[rank1]", f"[rank{rank}]")


def _interrupt(rank: int) -> str:
    return (
        f"[rank{rank}]: Traceback (most recent call last):\n"
        f'[rank{rank}]:   File "/job/train.py", line 9, in <module>\n'
        f"[rank{rank}]:     time.sleep(60)\n"
        f"[rank{rank}]: KeyboardInterrupt\n"
    )


class Workers:
    """The log files of an attempt of ``nproc`` workers under ``tmp_path``."""

    def __init__(self, tmp_path: Path, nproc: int = 4) -> None:
        self.attempt = Attempt(nproc, lambda r: WorkerLogPaths(tmp_path / str(r)))
        for rank in range(nproc):
            (tmp_path / str(rank)).mkdir()
        self.tmp_path = tmp_path

    def paths(self, rank: int) -> WorkerLogPaths:
        return WorkerLogPaths(self.tmp_path / str(rank))

    def write(self, rank: int, text: str) -> None:
        with open(self.paths(rank).stderr, "a") as f:
            f.write(text)

    def exit(self, rank: int, code: int, stopped: bool = False) -> tuple[WorkerStatus, str | None]:
        status, failure = self.attempt.record(
            WorkerExit(rank, rank, 100 + rank, code, 1000.0 + rank, stopped_by_agent=stopped)
        )
        return status, failure.message if failure else None


def test_ranks_that_raised_the_same_error_before_the_stop_failed(tmp_path: Path) -> None:
    w = Workers(tmp_path)
    for rank in (0, 1, 2):
        w.write(rank, _boom(rank))
    w.write(3, "epoch 1\n")
    assert w.exit(0, 1) == (WorkerStatus.FAILED, "ValueError: boom")
    assert w.attempt.state == WorkerState.FAILED
    w.attempt.stopping()
    assert w.exit(1, SIGTERM, stopped=True) == (WorkerStatus.FAILED, "ValueError: boom")
    assert w.exit(2, 1, stopped=True) == (WorkerStatus.FAILED, "ValueError: boom")
    assert w.exit(3, SIGTERM, stopped=True) == (WorkerStatus.TERMINATED, None)
    failures = w.attempt.failures
    assert [f.exit.global_rank for f in failures] == [0, 1, 2]  # root cause first
    assert [f.describe() for f in failures] == [
        "exit code 1",
        "killed by SIGTERM; stopped by the agent after it had failed",
        "exit code 1; stopped by the agent after it had failed",
    ]


def test_a_traceback_written_after_the_stop_is_no_failure(tmp_path: Path) -> None:
    """The root cause is a KeyboardInterrupt; the others turn the agent's SIGTERM into
    KeyboardInterrupts of their own: the same exception line, but after the stop."""
    w = Workers(tmp_path)
    w.write(0, _interrupt(0))
    assert w.exit(0, -signal.SIGINT)[0] == WorkerStatus.FAILED
    w.attempt.stopping()
    for rank in (1, 2, 3):
        w.write(rank, "step 5\n" + _interrupt(rank))
        assert w.exit(rank, -signal.SIGINT, stopped=True) == (WorkerStatus.TERMINATED, None)
    assert len(w.attempt.failures) == 1


def test_a_traceback_still_cut_short_at_the_stop_is_no_failure(tmp_path: Path) -> None:
    w = Workers(tmp_path, 2)
    w.write(0, _boom(0))
    w.exit(0, 1)
    boom = _boom(1)
    cut = boom.index("[rank1]: ValueError")
    w.write(1, boom[:cut])
    w.attempt.stopping()
    w.write(1, boom[cut:])  # its exception line came after the stop
    assert w.exit(1, SIGTERM, stopped=True) == (WorkerStatus.TERMINATED, None)


@pytest.mark.parametrize(
    "stderr",
    [
        TORCH_STDERR.replace("boom", "other"),  # message
        TORCH_STDERR.replace("ValueError", "TypeError"),  # type
        "",
    ],
)
def test_another_error_before_the_stop_is_no_failure(tmp_path: Path, stderr: str) -> None:
    w = Workers(tmp_path, 2)
    w.write(0, _boom(0))
    w.exit(0, 1)
    w.write(1, stderr)
    w.attempt.stopping()
    assert w.exit(1, SIGTERM, stopped=True) == (WorkerStatus.TERMINATED, None)


def test_a_clean_exit_after_logging_the_same_error_is_no_failure(tmp_path: Path) -> None:
    w = Workers(tmp_path, 2)
    w.write(0, _boom(0))
    w.exit(0, 1)
    w.write(1, _boom(1))  # logged, caught, then finished
    w.attempt.stopping()
    assert w.exit(1, 0, stopped=True) == (WorkerStatus.TERMINATED, None)


def test_the_same_error_as_a_root_cause_with_an_error_file(tmp_path: Path) -> None:
    """torch's @record message names no module; the traceback, like stderr, does."""
    w = Workers(tmp_path, 2)
    tb = 'Traceback (most recent call last):\n  File "t.py", line 3\ndata.BadBatch: 3\n'
    write_error(w.paths(0).error_file, "BadBatch: 3", tb, 999.5)
    w.exit(0, 1)
    w.write(1, "[rank1]: " + tb.replace("\n", "\n[rank1]: ").removesuffix("[rank1]: "))
    w.attempt.stopping()
    assert w.exit(1, SIGTERM, stopped=True) == (WorkerStatus.FAILED, "data.BadBatch: 3")


def test_an_error_file_counts_only_when_written_before_the_stop(tmp_path: Path) -> None:
    w = Workers(tmp_path, 4)
    w.write(0, _boom(0))
    w.exit(0, 1)
    write_error(w.paths(1).error_file, "RuntimeError: first", "", 999.0)  # another error
    write_error(w.paths(3).error_file, "RuntimeError: old", "", 999.0)
    w.attempt.stopping()
    # after the stop: rank 2's @record catches the stop's KeyboardInterrupt, rank 3's
    # file is rewritten with it
    write_error(w.paths(2).error_file, "KeyboardInterrupt: ", "", 1001.0)
    write_error(w.paths(3).error_file, "KeyboardInterrupt: ", "", 1001.0)
    assert w.exit(1, SIGTERM, stopped=True) == (WorkerStatus.FAILED, "RuntimeError: first")
    assert w.exit(2, -signal.SIGINT, stopped=True) == (WorkerStatus.TERMINATED, None)
    assert w.exit(3, -signal.SIGINT, stopped=True) == (WorkerStatus.TERMINATED, None)


def test_a_stop_with_no_failure_stops_everyone(tmp_path: Path) -> None:
    """A stop signal or a membership change: no failed rank's error to share."""
    w = Workers(tmp_path, 2)
    w.write(0, _boom(0))
    w.attempt.stopping()
    assert w.exit(0, SIGTERM, stopped=True) == (WorkerStatus.TERMINATED, None)
    assert w.attempt.failures == []


def test_exits_marked_stopped_without_a_stop_judge_what_was_there(tmp_path: Path) -> None:
    """A fenced node's workers (killed by its guardian): the stop is when the agent
    learns of it."""
    w = Workers(tmp_path, 2)
    write_error(w.paths(0).error_file, "ValueError: x", "", 999.0)
    assert w.exit(0, -signal.SIGKILL, stopped=True) == (WorkerStatus.FAILED, "ValueError: x")
    assert w.exit(1, -signal.SIGKILL, stopped=True) == (WorkerStatus.TERMINATED, None)


def test_a_rank_killed_on_purpose_before_the_stop_failed(tmp_path: Path) -> None:
    w = Workers(tmp_path, 2)
    w.write(0, _boom(0))
    w.exit(0, 1)
    assert w.attempt.killing(1, FailureKind.MEMORY_LIMIT, "RSS 3 GiB > 2 GiB")
    w.attempt.stopping()
    status, _ = w.exit(1, -signal.SIGKILL, stopped=True)
    assert status == WorkerStatus.FAILED
    assert w.attempt.failures[1].describe() == (
        "killed by SIGKILL (over its memory limit); RSS 3 GiB > 2 GiB"
    )


def test_only_the_first_stop_counts(tmp_path: Path) -> None:
    w = Workers(tmp_path, 2)
    w.write(0, _boom(0))
    w.exit(0, 1)
    w.attempt.stopping()
    w.write(1, _boom(1))
    w.attempt.stopping()  # the sweep at the end of the run, say
    assert w.exit(1, SIGTERM, stopped=True) == (WorkerStatus.TERMINATED, None)
    assert [f.exit.global_rank for f in w.attempt.failures] == [0]
