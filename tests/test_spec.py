"""WorkerSpec argv substitution, WorkerExit and RunResult semantics."""

from __future__ import annotations

import signal
from pathlib import Path

from elastic_runner.spec import (
    Failure,
    FailureKind,
    RestartPolicy,
    RunResult,
    WorkerExit,
    WorkerSpec,
    WorkerState,
)


def test_local_rank_placeholders_are_substituted() -> None:
    spec = WorkerSpec("r", 2, ("py", "--lr=%local_rank%", "${local_rank}", "plain"))
    assert spec.argv_for(1) == ["py", "--lr=1", "1", "plain"]


def test_worker_exit_describes_signals_by_name() -> None:
    assert WorkerExit(0, 0, 1, -signal.SIGKILL, 0.0).describe() == "killed by SIGKILL"
    assert WorkerExit(0, 0, 1, -signal.SIGSEGV, 0.0).signal_name == "SIGSEGV"
    assert WorkerExit(0, 0, 1, 3, 0.0).describe() == "exit code 3"


def test_run_result_exit_codes_and_failures() -> None:
    ok = RunResult(WorkerState.SUCCEEDED, 1, 0)
    assert ok.exit_code == 0 and not ok.is_failed()
    exits = [WorkerExit(0, 0, 1, 1, 2.0), WorkerExit(1, 1, 2, -15, 3.0, stopped_by_agent=True)]
    failure = Failure(exits[0], FailureKind.EXIT_CODE, 2.0)
    failed = RunResult(WorkerState.FAILED, 2, 1, exits, [failure])
    assert failed.exit_code == 1 and failed.root_cause is failure
    stopped = RunResult(WorkerState.FAILED, 1, 0, signal=signal.SIGTERM)
    assert stopped.exit_code == 143
    assert WorkerState.HEALTHY.is_running and not WorkerState.STOPPED.is_running


def test_restart_backoff_grows_and_is_capped() -> None:
    policy = RestartPolicy(backoff_initial=0.5, backoff_factor=2, backoff_max=3)
    assert [policy.delay(k) for k in (1, 2, 3, 4)] == [0.5, 1.0, 2.0, 3.0]
    assert RestartPolicy().delay(5) == 0.0


def test_backoff_delay_stays_at_its_max_however_many_restarts() -> None:
    from elastic_runner.spec import RestartPolicy

    policy = RestartPolicy(backoff_initial=1, backoff_factor=2, backoff_max=60)
    assert [policy.delay(k) for k in (1, 2, 3, 7, 8)] == [1, 2, 4, 60, 60]
    assert policy.delay(5000) == 60  # 2.0**4999 overflows a float
    assert RestartPolicy().delay(5000) == 0.0


def test_failure_has_torchs_process_failure_names(tmp_path: Path) -> None:
    exit_ = WorkerExit(local_rank=1, global_rank=5, pid=42, returncode=-9, timestamp=1.5)
    failure = Failure(exit_, FailureKind.SIGNAL, 1.5, error_file=tmp_path / "error.json")
    assert (failure.rank, failure.local_rank, failure.pid, failure.exitcode) == (5, 1, 42, -9)
    assert failure.signal_name() == "SIGKILL"
    assert failure.error_file == tmp_path / "error.json"
    ok = Failure(WorkerExit(0, 0, 1, 3, 0.0), FailureKind.EXIT_CODE, 0.0)
    assert ok.signal_name() == "<N/A>" and ok.exitcode == 3
