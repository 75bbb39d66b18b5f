"""Readable failures, limits, restart policy and console options, through elastic-run."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import TESTS, ElasticRunner, Run

FAILER = TESTS / "workers" / "failer.py"


def _failer(tmp_path: Path, *modes: str, nproc: int = 2) -> list[str]:
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    return [
        f"job.entrypoint={FAILER}",
        "job.args=[" + ",".join(f'"{a}"' for a in (out, *modes)) + "]",
        f"job.nproc_per_node={nproc}",
    ]


def _report(run_stderr: str) -> list[str]:
    return run_stderr[run_stderr.index("elastic-run: job failed") :].splitlines()


def test_record_puts_the_error_and_traceback_in_the_report(
    elastic_run: ElasticRunner, tmp_path: Path
) -> None:
    run = elastic_run(*_failer(tmp_path, "0=record", "1=sleep"))
    assert run.returncode == 1
    report = _report(run.stderr)
    assert report[1].startswith("  root cause: rank 0 (local_rank 0, pid ")
    assert "    error: ValueError: rank 0 bad input" in report
    assert "    traceback (from its error file):" in report
    assert "    | ValueError: rank 0 bad input" in report
    assert "  stopped by the agent: ranks 1" in report
    data = json.loads((run.run_dir / "attempt_1/0/error.json").read_text())
    assert data["message"]["message"] == "ValueError: rank 0 bad input"
    failed = [e for e in run.events() if e["state"] == "FAILED"]
    assert failed[0]["metadata"]["error"] == "ValueError: rank 0 bad input"


def test_without_error_file_the_traceback_comes_from_stderr(
    elastic_run: ElasticRunner, tmp_path: Path
) -> None:
    run = elastic_run(*_failer(tmp_path, "1=traceback", "0=sleep"))
    assert run.returncode == 1
    report = _report(run.stderr)
    assert report[1].startswith("  root cause: rank 1")
    assert "    traceback (from its stderr):" in report
    assert "    | KeyError: 'missing key'" in report


def test_root_cause_is_the_earliest_error_not_the_first_exit(
    elastic_run: ElasticRunner, tmp_path: Path
) -> None:
    # rank 0 records its error first but hangs in cleanup; rank 1 fails 0.3 s later and
    # exits at once. The agent sees rank 1 exit first, yet rank 0 is the root cause.
    run = elastic_run(*_failer(tmp_path, "0=record-then-hang", "1=late-record"))
    assert run.returncode == 1
    report = _report(run.stderr)
    assert report[1].startswith("  root cause: rank 0")
    assert "    error: RuntimeError: rank 0 failed first" in report
    assert any(line.startswith("  also failed: rank 1") for line in report)
    assert not any(line.startswith("  stopped by the agent") for line in report)


@pytest.mark.parametrize(
    ("mode", "expected", "kind"),
    [
        ("segv", "killed by SIGSEGV", "SIGNAL"),
        ("selfkill", "killed by SIGKILL; not sent by elastic-run", "SIGNAL"),
        ("fail", "exit code 1", "EXIT_CODE"),
    ],
)
def test_failures_are_classified(
    elastic_run: ElasticRunner, tmp_path: Path, mode: str, expected: str, kind: str
) -> None:
    run = elastic_run(*_failer(tmp_path, f"0={mode}", nproc=1))
    assert run.returncode == 1
    assert expected in _report(run.stderr)[1]
    failed = [e for e in run.events() if e["state"] == "FAILED"]
    assert failed[0]["metadata"]["failure"] == kind


def test_a_sigkilled_worker_is_reported_with_its_peak_rss(
    elastic_run: ElasticRunner, tmp_path: Path
) -> None:
    run = elastic_run(*_failer(tmp_path, "0=big-selfkill", nproc=1))
    assert run.returncode == 1
    m = re.search(r"suspect the OOM killer; its peak RSS was ([\d.]+) MiB", _report(run.stderr)[1])
    assert m and 120 < float(m.group(1)) < 250, run.stderr


def test_memory_limit_kills_and_reports_the_worker(
    elastic_run: ElasticRunner, tmp_path: Path
) -> None:
    run = elastic_run(
        *_failer(tmp_path, "0=grow", "1=sleep"),
        "job.limits.memory=150MiB",
        "resources.interval=0.05",
        "stop_timeout=2",
    )
    assert run.returncode == 1, run.stderr
    report = _report(run.stderr)
    assert "killed by SIGKILL (over its memory limit); RSS" in report[1]
    assert "> job.limits.memory 150.0 MiB" in report[1]
    table = report[report.index(next(r for r in report if r.startswith("  rank  result"))) :]
    rows = {row.split()[0]: row for row in table[1:3]}
    assert "killed by SIGKILL" in rows["0"] and "MiB" in rows["0"]  # rank 0 grew
    assert "stopped (SIGTERM)" in rows["1"]  # rank 1 was stopped with the group
    failed = [e for e in run.events() if e["state"] == "FAILED"]
    assert failed[0]["metadata"]["failure"] == "MEMORY_LIMIT"
    assert run.seconds < 20


def test_restart_backoff_spaces_the_attempts(elastic_run: ElasticRunner, tmp_path: Path) -> None:
    run = elastic_run(
        *_failer(tmp_path, "0=fail", nproc=1),
        "max_restarts=2",
        "restart.backoff.initial=0.3",
        "restart.backoff.factor=2",
    )
    assert run.returncode == 1
    events = run.events()
    failed = [
        e["metadata"]["detected_at"]
        for e in events
        if e["source"] == "WORKER" and e["state"] == "FAILED"
    ]
    starts = [e["timestamp"] for e in events if e["state"] == "START"]
    assert len(starts) == 3
    assert starts[1] - failed[0] >= 0.3
    assert starts[2] - failed[1] >= 0.6
    assert starts[2] - failed[1] < 3


def test_startup_failures_are_not_retried_when_disabled(
    elastic_run: ElasticRunner, tmp_path: Path
) -> None:
    run = elastic_run(
        *_failer(tmp_path, "0=fail", nproc=1),
        "max_restarts=3",
        "restart.min_uptime=30",
        "restart.on_startup_failure=false",
    )
    assert run.returncode == 1
    assert "in the last of 1 attempt: startup failure after" in run.stderr
    assert "restart.on_startup_failure=false" in run.stderr
    # with the default (true), startup failures are retried
    run = elastic_run(
        *_failer(tmp_path, "0=fail", nproc=1), "max_restarts=1", "restart.min_uptime=30"
    )
    assert "in the last of 2 attempts: restarts used up" in run.stderr


def test_nested_agent_gets_the_root_cause_in_its_error_file(
    elastic_run: ElasticRunner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    outer = tmp_path / "outer_error.json"
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(outer))
    run = elastic_run(*_failer(tmp_path, "0=record", nproc=1))
    assert run.returncode == 1
    data = json.loads(outer.read_text())
    assert data["message"]["message"] == "ValueError: rank 0 bad input"
    assert data["errorCode"] == 1
    # the worker still got its own error file, not the agent's
    assert (run.run_dir / "attempt_1/0/error.json").exists()


def test_console_ranks_and_prefix_template(elastic_run: ElasticRunner) -> None:
    run = elastic_run(
        "+job=hello",
        "logs.console_ranks=[1,3]",
        "logs.prefix='<{node}|{rank}|{local_rank}|{role}>'",
    )
    assert run.returncode == 0, run.stderr
    lines = [line for line in run.stdout.splitlines() if "hello from" in line]
    assert [line.split("|")[1] for line in lines] == sorted(
        (line.split("|")[1] for line in lines), key=int
    ) or len(lines) == 2
    assert {line.split("|")[1] for line in lines} == {"1", "3"}
    assert all(line.startswith("<") and "|default> hello" in line for line in lines)
    for rank in range(4):  # files keep every rank
        assert (run.run_dir / f"attempt_1/{rank}/stdout.log").read_text().startswith("hello")


def test_collapse_prints_a_common_line_once(elastic_run: ElasticRunner) -> None:
    run = elastic_run(
        "job.entrypoint=sh",
        'job.args=[-c,"echo epoch 1 done; echo only $RANK"]',
        "job.nproc_per_node=4",
        "logs.collapse=true",
    )
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert lines.count("[ranks 0-3]: epoch 1 done") == 1
    assert sorted(line for line in lines if "only" in line) == [
        f"[default{r}]: only {r}" for r in range(4)
    ]


RANK_PREFIXED = TESTS / "workers" / "rank_prefixed.py"


def _rank_prefixed(tmp_path: Path, mode: str) -> list[str]:
    out = tmp_path / "marks"
    out.mkdir()
    return [
        f"job.entrypoint={RANK_PREFIXED}",
        f'job.args=["{out}","{mode}"]',
        "job.nproc_per_node=4",
        "stop_timeout=5",
    ]


def _worker_events(run: Run) -> dict[int, dict[str, Any]]:
    """{rank: its exit event} of the run's only attempt."""
    return {
        e["rank"]: e
        for e in run.events()
        if e["source"] == "WORKER" and e["state"] in ("FAILED", "TERMINATED", "SUCCEEDED")
    }


def test_ranks_that_raised_the_same_error_before_the_stop_failed(
    elastic_run: ElasticRunner, tmp_path: Path
) -> None:
    """torch's ``[rankN]: `` prefixes: 3 of 4 ranks raise ``ValueError: boom``, rank 0
    exits first, ranks 1 and 2 are stopped while stuck in their teardown, rank 3 is a
    bystander."""
    run = elastic_run(*_rank_prefixed(tmp_path, "boom"))
    assert run.returncode == 1, run.stderr
    report = _report(run.stderr)
    assert report[0] == (
        "elastic-run: job failed: 3 of 4 workers failed in the last of 1 attempt: "
        "restarts used up (max_restarts=0)."
    )
    assert report[1].startswith("  root cause: rank 0 (local_rank 0, pid ")
    assert report[1].split(": ", 2)[2].startswith("exit code 1 at ")
    stderr0 = run.run_dir / "attempt_1/0/stderr.log"
    raise_line = [
        n
        for n, line in enumerate(RANK_PREFIXED.read_text().splitlines(), 1)
        if 'raise ValueError("boom")' in line
    ][-1]  # rank 0's
    at = report.index("    traceback (from its stderr):")
    assert report[at - 1 : at + 7] == [
        "    error: ValueError: boom",
        "    traceback (from its stderr):",
        "    | Traceback (most recent call last):",
        f'    |   File "{RANK_PREFIXED}", line {raise_line}, in <module>',
        '    |     raise ValueError("boom")',
        "    | ValueError: boom",
        f"    stderr: {stderr0}",
        "    last lines of stderr:",
    ]
    # the tail: what rank 0 wrote after its traceback, as written (the traceback is above)
    assert report[at + 7].startswith("    | [rank0]:[W1203 10:11:12.345678000 ")
    assert report[at + 7].endswith(
        "Warning: destroy_process_group() was not called before program exit"
    )
    assert report[at + 8].startswith("  also failed: rank ")
    for rank in (1, 2):
        line = next(r for r in report if r.startswith(f"  also failed: rank {rank} "))
        assert "killed by SIGTERM; stopped by the agent after it had failed at " in line
        assert report[report.index(line) + 1] == "    error: ValueError: boom"
    assert "  stopped by the agent: ranks 3" in report
    table = report[report.index(next(r for r in report if r.startswith("  rank  result"))) :]
    assert [row.split()[1:3] for row in table[1:5]] == [
        ["exit", "code"],
        ["killed", "by"],
        ["killed", "by"],
        ["stopped", "(SIGTERM)"],
    ]
    # the events and result.json say the same
    events = _worker_events(run)
    assert {r: e["state"] for r, e in events.items()} == {
        0: "FAILED",
        1: "FAILED",
        2: "FAILED",
        3: "TERMINATED",
    }
    assert [events[r]["metadata"]["error"] for r in range(4)] == ["ValueError: boom"] * 3 + [None]
    result = json.loads((run.run_dir / "result.json").read_text())
    assert result["error"] == "rank 0: exit code 1: ValueError: boom"


def test_the_same_error_raised_because_of_the_stop_is_no_failure(
    elastic_run: ElasticRunner, tmp_path: Path
) -> None:
    """Rank 0 raises KeyboardInterrupt; the others turn the agent's SIGTERM into a
    KeyboardInterrupt of their own, printed after the stop: they stay stopped."""
    run = elastic_run(*_rank_prefixed(tmp_path, "interrupt"))
    assert run.returncode == 1, run.stderr
    report = _report(run.stderr)
    assert report[0].startswith("elastic-run: job failed: 1 of 4 workers failed")
    assert report[1].startswith("  root cause: rank 0 (local_rank 0, pid ")
    assert "    error: KeyboardInterrupt" in report
    assert "  stopped by the agent: ranks 1, 2, 3" in report
    for rank in (1, 2, 3):  # they did print the same error, after the stop
        stderr = (run.run_dir / f"attempt_1/{rank}/stderr.log").read_text()
        assert stderr.endswith(f"[rank{rank}]: KeyboardInterrupt\n"), stderr
    events = _worker_events(run)
    assert [events[r]["state"] for r in range(4)] == ["FAILED"] + ["TERMINATED"] * 3
