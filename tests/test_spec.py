"""WorkerSpec argv substitution, WorkerExit and RunResult semantics."""

from __future__ import annotations

import signal

from elastic_runner.spec import RunResult, WorkerExit, WorkerSpec, WorkerState


def test_local_rank_placeholders_are_substituted() -> None:
    spec = WorkerSpec("r", 2, ("py", "--lr=%local_rank%", "${local_rank}", "plain"))
    assert spec.argv_for(1) == ["py", "--lr=1", "1", "plain"]


def test_worker_exit_describes_signals_by_name() -> None:
    assert WorkerExit(0, 0, 1, -signal.SIGKILL, 0.0).describe() == "killed by SIGKILL"
    assert WorkerExit(0, 0, 1, -signal.SIGSEGV, 0.0).signal_name == "SIGSEGV"
    assert WorkerExit(0, 0, 1, 3, 0.0).describe() == "exit code 3"


def test_run_result_exit_codes_and_failures() -> None:
    ok = RunResult(WorkerState.SUCCEEDED, 1, 0)
    assert ok.exit_code == 0 and not ok.is_failed
    exits = [WorkerExit(0, 0, 1, 1, 2.0), WorkerExit(1, 1, 2, -15, 3.0, stopped_by_agent=True)]
    failed = RunResult(WorkerState.FAILED, 2, 1, exits)
    assert failed.exit_code == 1 and list(failed.failures) == [0]
    stopped = RunResult(WorkerState.FAILED, 1, 0, signal=signal.SIGTERM)
    assert stopped.exit_code == 143
    assert WorkerState.HEALTHY.is_running and not WorkerState.STOPPED.is_running
