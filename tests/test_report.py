"""The final report: root cause first, its error and traceback, victims apart."""

from __future__ import annotations

import json
from pathlib import Path

from elastic_runner.failures import diagnose
from elastic_runner.report import format_report, stderr_tail, write_nested_error_file
from elastic_runner.spec import (
    Failure,
    FailureKind,
    RunResult,
    WorkerExit,
    WorkerSpec,
    WorkerState,
)
from tests.test_failures import TORCH_STDERR


def _result(tmp_path: Path) -> RunResult:
    e0 = WorkerExit(0, 0, 10, 1, timestamp=5.0)
    e3 = WorkerExit(3, 3, 13, -9, timestamp=2.0)
    e1 = WorkerExit(1, 1, 11, -15, timestamp=6.0, stopped_by_agent=True)
    failures = [
        Failure(
            e3, FailureKind.MEMORY_LIMIT, 2.0, detail="RSS 3.0 GiB > job.limits.memory 2.0 GiB"
        ),
        Failure(
            e0,
            FailureKind.EXIT_CODE,
            5.0,
            message="ValueError: bad",
            traceback="Tb\n  x\nValueError: bad",
            traceback_source="error file",
        ),
    ]
    return RunResult(
        WorkerState.FAILED,
        3,
        2,
        [e0, e1, e3],
        failures,
        peak_rss={0: 2**20, 3: 3 * 2**30},
        ended_because="restarts used up (max_restarts=2)",
    )


def test_root_cause_first_then_others_then_victims(tmp_path: Path) -> None:
    (tmp_path / "3.err").write_text("\n".join(f"line {i}" for i in range(30)))
    text = format_report(
        _result(tmp_path),
        WorkerSpec("r", 4, ("x",), max_restarts=2),
        tmp_path,
        lambda e: tmp_path / f"{e.local_rank}.err",
    )
    lines = text.splitlines()
    assert lines[0] == (
        "elastic-run: job failed: 2 of 4 workers failed in the last of 3 attempts: "
        "restarts used up (max_restarts=2)."
    )
    assert lines[1] == (
        "  root cause: rank 3 (local_rank 3, pid 13): killed by SIGKILL (over its "
        "memory limit); RSS 3.0 GiB > job.limits.memory 2.0 GiB at " + lines[1].rsplit(" at ", 1)[1]
    )
    assert "    | line 29" in lines and "    | line 19" not in lines
    also = lines.index(
        "  also failed: rank 0 (local_rank 0, pid 10): exit code 1 at "
        + lines[lines.index("    error: ValueError: bad") - 1].rsplit(" at ", 1)[1]
    )
    assert also > 1
    assert "  stopped by the agent: ranks 1" in lines
    table = lines[lines.index("  rank  result             ran  peak RSS  restarts") :]
    assert table[1:4] == [
        "     0  exit code 1          -   1.0 MiB         2",
        "     1  stopped (SIGTERM)    -         -         2",
        "     3  killed by SIGKILL    -   3.0 GiB         2",
    ]


def test_rank_table_gives_how_long_each_rank_ran() -> None:
    from elastic_runner.report import rank_table

    started = 1000.0
    result = RunResult(
        WorkerState.SUCCEEDED,
        1,
        0,
        [WorkerExit(0, 0, 10, 0, timestamp=started + 12.34), WorkerExit(1, 1, 11, 0, started + 2)],
        peak_rss={0: 5 * 2**20},
        started_at=started,
    )
    assert rank_table(result).splitlines() == [
        "  rank  result     ran  peak RSS  restarts",
        "     0  ok      12.3 s   5.0 MiB         0",
        "     1  ok       2.0 s         -         0",
    ]


def test_traceback_from_stderr_is_not_repeated_as_tail(tmp_path: Path) -> None:
    exit_ = WorkerExit(0, 0, 10, 1, timestamp=1.0)
    (tmp_path / "err").write_text("noise\nTraceback (most recent call last):\n  f\nKeyError: 'x'\n")
    failure = Failure(
        exit_,
        FailureKind.EXIT_CODE,
        1.0,
        traceback="Traceback (most recent call last):\n  f\nKeyError: 'x'",
        traceback_source="stderr",
    )
    text = format_report(
        RunResult(WorkerState.FAILED, 1, 0, [exit_], [failure], ended_because="x"),
        WorkerSpec("r", 1, ("x",)),
        tmp_path,
        lambda e: tmp_path / "err",
    )
    assert "    traceback (from its stderr):" in text
    assert text.count("KeyError: 'x'") == 1 and "noise" not in text


def test_nested_error_file_passes_the_root_cause_up(tmp_path: Path) -> None:
    path = tmp_path / "outer.json"
    write_nested_error_file(_result(tmp_path), str(path))
    data = json.loads(path.read_text())
    assert data["errorCode"] == -9
    assert data["message"]["message"].startswith("rank 3: killed by SIGKILL")


def test_stderr_tail_of_missing_file_is_empty(tmp_path: Path) -> None:
    assert stderr_tail(tmp_path / "none") == []


#: What torch's C++ side may print at exit, after the traceback (c10's log prefix).
EXIT_WARNING = (
    "[rank1]:[W1203 10:11:12.345678000 4242 ProcessGroup.cpp:1250] Warning: "
    "destroy_process_group() was not called before program exit"
)


def _stderr_report(tmp_path: Path, stderr: str) -> list[str]:
    (tmp_path / "err").write_text(stderr)
    exit_ = WorkerExit(1, 1, 11, 1, timestamp=1.0)
    failure = diagnose(exit_, error_file=tmp_path / "none.json", stderr=tmp_path / "err")
    text = format_report(
        RunResult(WorkerState.FAILED, 1, 0, [exit_], [failure], ended_because="x"),
        WorkerSpec("r", 2, ("x",)),
        tmp_path,
        lambda e: tmp_path / "err",
    )
    lines = text.splitlines()
    return lines[lines.index("    error: ValueError: boom") :]


def test_a_torch_prefixed_traceback_is_reported_whole_with_what_followed(
    tmp_path: Path,
) -> None:
    assert _stderr_report(tmp_path, TORCH_STDERR + EXIT_WARNING + "\n")[:9] == [
        "    error: ValueError: boom",
        "    traceback (from its stderr):",
        "    | Traceback (most recent call last):",
        '    |   File "/tmp/tq/x.py", line 6, in <module>',
        '    |     raise ValueError("boom")',
        "    | ValueError: boom",
        f"    stderr: {tmp_path / 'err'}",
        "    last lines of stderr:",
        f"    | {EXIT_WARNING}",  # as written; what came before the traceback is no tail
    ]


def test_a_traceback_that_ends_stderr_is_not_repeated_as_its_tail(tmp_path: Path) -> None:
    lines = _stderr_report(tmp_path, TORCH_STDERR + "\n\n")
    assert lines[5] == "    | ValueError: boom"
    assert lines[6] == f"    stderr: {tmp_path / 'err'}"
    assert lines[7].startswith("  rank  result")  # the table: no tail


def test_a_later_traceback_than_the_one_quoted_leaves_the_tail_as_it_is(
    tmp_path: Path,
) -> None:
    """A rank that failed before the agent stopped it, then printed another traceback
    because of the stop: its error is the first; the tail shows the end of the log."""
    before = TORCH_STDERR
    later = "Traceback (most recent call last):\n  f\nKeyboardInterrupt\n"
    (tmp_path / "err").write_text(before + later)
    exit_ = WorkerExit(1, 1, 11, -15, timestamp=1.0, stopped_by_agent=True)
    failure = diagnose(exit_, error_file=None, stderr=tmp_path / "err", stopped_after=len(before))
    text = format_report(
        RunResult(WorkerState.FAILED, 1, 0, [exit_], [failure], ended_because="x"),
        WorkerSpec("r", 2, ("x",)),
        tmp_path,
        lambda e: tmp_path / "err",
    )
    lines = text.splitlines()
    assert "    | ValueError: boom" in lines
    table = next(i for i, line in enumerate(lines) if line.startswith("  rank  result"))
    tail = lines[lines.index("    last lines of stderr:") + 1 : table]
    assert tail == [f"    | {line}" for line in (before + later).splitlines()[-10:]]


def test_a_stop_from_outside_and_a_preemption_say_so_first(tmp_path: Path) -> None:
    spec = WorkerSpec("default", 2, ("w",))
    exits = [
        WorkerExit(0, 0, 10, 0, timestamp=1.0, stopped_by_agent=True),
        WorkerExit(1, 1, 11, -15, timestamp=1.0, stopped_by_agent=True),
    ]
    outside = "stopped by SIGTERM from outside (the scheduler signalled every process)"
    result = RunResult(
        WorkerState.FAILED, 1, 0, exits, signal=15, ended_because=outside, from_outside=True
    )
    lines = format_report(result, spec, tmp_path, lambda e: tmp_path / "x").splitlines()
    assert (
        lines[0]
        == f"elastic-run: {outside} after 1 attempt; workers stopped. Run directory: {tmp_path}"
    )
    assert [line.split()[1:3] for line in lines[2:]] == [
        ["stopped", "(exit"],
        ["stopped", "(SIGTERM)"],
    ]
    assert result.exit_code == 143
    result.signal, result.preempted, result.ended_because = 10, True, "preempted by SIGUSR1"
    lines = format_report(result, spec, tmp_path, lambda e: tmp_path / "x").splitlines()
    assert lines[0].startswith("elastic-run: preempted by SIGUSR1 after 1 attempt; workers ")
    assert "stopped (exit 75)." in lines[0] and result.exit_code == 75
