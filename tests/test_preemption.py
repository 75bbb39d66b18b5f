"""Resuming after a preemption, and the requeue (elastic_runner.preemption)."""

from __future__ import annotations

import json
import logging
import os
import stat
from pathlib import Path

import pytest

from elastic_runner.preemption import requeue, resumed


def _previous(run_dir: Path, code: int = 75, run_id: str = "job-1", **more: object) -> None:
    data = {"exit_code": code, "run_id": run_id, "attempts": 3, "restarts": 2, **more}
    (run_dir / "result.json").write_text(json.dumps(data))


def test_a_preempted_run_of_the_same_job_is_resumed(tmp_path: Path) -> None:
    _previous(tmp_path)
    assert resumed(tmp_path, "job-1", {}) == (3, 2)


def test_a_requeued_slurm_job_is_resumed_whatever_its_run_id(tmp_path: Path) -> None:
    _previous(tmp_path, run_id="random")
    assert resumed(tmp_path, "other", {"SLURM_RESTART_COUNT": "1"}) == (3, 2)
    assert resumed(tmp_path, "other", {"SLURM_RESTART_COUNT": "0"}) == (0, 0)
    assert resumed(tmp_path, "other", {"SLURM_RESTART_COUNT": "x"}) == (0, 0)


@pytest.mark.parametrize("code", [0, 1, 143])
def test_only_a_preempted_run_is_resumed(tmp_path: Path, code: int) -> None:
    _previous(tmp_path, code=code)
    assert resumed(tmp_path, "job-1", {}) == (0, 0)


@pytest.mark.parametrize("text", ["", "{", "[]", '{"exit_code": 75}', "null"])
def test_no_or_a_bad_result_is_a_fresh_run(tmp_path: Path, text: str) -> None:
    assert resumed(tmp_path, "job-1", {}) == (0, 0)
    (tmp_path / "result.json").write_text(text)
    assert resumed(tmp_path, "job-1", {}) == (0, 0)


def _fake_scontrol(tmp_path: Path, code: int = 0) -> tuple[dict[str, str], Path]:
    calls = tmp_path / "calls"
    exe = tmp_path / "bin" / "scontrol"
    exe.parent.mkdir()
    exe.write_text(f'#!/bin/sh\necho "$@" >> {calls}\necho "no such job" >&2\nexit {code}\n')
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR)
    return {"PATH": f"{exe.parent}:{os.environ['PATH']}"}, calls


def test_node_0_requeues_the_job_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path, calls = _fake_scontrol(tmp_path)
    monkeypatch.setenv("PATH", path["PATH"])
    assert requeue({"SLURM_JOB_ID": "42", "SLURM_NODEID": "0"}, group_rank=1)
    assert not requeue({"SLURM_JOB_ID": "42", "SLURM_NODEID": "1"}, group_rank=0)
    assert not requeue({"SLURM_JOB_ID": "42"}, group_rank=2)
    assert calls.read_text() == "requeue 42\n"


def test_a_failed_requeue_is_one_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    path, _ = _fake_scontrol(tmp_path, code=1)
    monkeypatch.setenv("PATH", path["PATH"])
    with caplog.at_level(logging.WARNING):
        assert not requeue({"SLURM_JOB_ID": "42", "SLURM_NODEID": "0"}, group_rank=0)
        assert not requeue({}, group_rank=0)
    assert [r.getMessage() for r in caplog.records] == [
        "signals.requeue: scontrol requeue 42 exited 1: no such job",
        "signals.requeue: not under Slurm (no SLURM_JOB_ID): nothing to requeue",
    ]
