"""The final report: root cause first, victims apart, stderr tail."""

from __future__ import annotations

from pathlib import Path

from elastic_runner.report import format_report, stderr_tail
from elastic_runner.spec import RunResult, WorkerExit, WorkerSpec, WorkerState


def test_root_cause_is_the_earliest_failure(tmp_path: Path) -> None:
    (tmp_path / "3.err").write_text("\n".join(f"line {i}" for i in range(30)))
    exits = [
        WorkerExit(0, 0, 10, 1, timestamp=5.0),
        WorkerExit(3, 3, 13, -9, timestamp=2.0),
        WorkerExit(1, 1, 11, -15, timestamp=6.0, stopped_by_agent=True),
    ]
    spec = WorkerSpec("r", 4, ("x",), max_restarts=2)
    text = format_report(
        RunResult(WorkerState.FAILED, 3, 2, exits),
        spec,
        tmp_path,
        lambda e: tmp_path / f"{e.local_rank}.err",
    )
    lines = text.splitlines()
    assert "2 of 4 workers failed in the last of 3 attempts (max_restarts=2)" in lines[0]
    assert lines[1].startswith("  root cause: rank 3 (local_rank 3, pid 13): killed by SIGKILL")
    assert "line 29" in text and "line 19" not in text
    assert any(line.startswith("  also failed: rank 0") and "exit code 1" in line for line in lines)
    assert "  stopped by the agent: ranks 1" in lines


def test_stderr_tail_of_missing_file_is_empty(tmp_path: Path) -> None:
    assert stderr_tail(tmp_path / "none") == []
