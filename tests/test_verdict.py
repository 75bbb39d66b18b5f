"""The job-level verdict (elastic_runner.verdict, python -m elastic_runner verdict)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from elastic_runner.__main__ import main
from elastic_runner.verdict import verdict


def _node(job: Path, name: str, code: int | None, state: str = "", error: str = "") -> None:
    node = job / name
    (node / ".hydra").mkdir(parents=True)
    if code is not None:
        data = {"exit_code": code, "state": state or ("SUCCEEDED" if code == 0 else "FAILED")}
        (node / "result.json").write_text(json.dumps({**data, "error": error or None}))


def test_a_node_lost_on_the_way_does_not_fail_the_job(tmp_path: Path) -> None:
    _node(tmp_path, "n1", 0)
    _node(tmp_path, "n2", 0)
    _node(tmp_path, "n3", None)  # SIGKILLed: no result.json
    code, line = verdict(tmp_path)
    assert code == 0
    assert (
        line == "job succeeded on 2 node(s); lost or stopped on the way: n3: no result.json (lost)"
    )


def test_a_node_stopped_by_a_signal_does_not_fail_the_job(tmp_path: Path) -> None:
    _node(tmp_path, "n1", 0)
    _node(tmp_path, "n2", 143, "STOPPED by SIGTERM")
    assert verdict(tmp_path)[0] == 0


def test_a_failed_node_fails_the_job_with_its_code(tmp_path: Path) -> None:
    _node(tmp_path, "n1", 0)
    _node(tmp_path, "n2", 1, error="rank 3 (local_rank 1, pid 9): exit code 7")
    code, line = verdict(tmp_path)
    assert code == 1
    assert line == "job failed: n2: FAILED (exit 1): rank 3 (local_rank 1, pid 9): exit code 7"


@pytest.mark.parametrize(
    ("codes", "expected"),
    [([143, 143], 143), ([75, None], 75), ([143, 75], 75), ([130, None], 130)],
)
def test_every_node_stopped_gives_the_stop(
    tmp_path: Path, codes: list[int | None], expected: int
) -> None:
    for i, code in enumerate(codes):
        _node(tmp_path, f"n{i}", code, "PREEMPTED by SIGUSR1" if code == 75 else "STOPPED")
    code, line = verdict(tmp_path)
    assert code == expected and line.startswith("job stopped: ")


def test_no_result_at_all_is_a_failure(tmp_path: Path) -> None:
    _node(tmp_path, "n1", None)
    assert verdict(tmp_path) == (
        1,
        f"job verdict: no result.json under {tmp_path}: no node finished",
    )
    assert verdict(tmp_path / "n1")[0] == 1


def test_a_torn_result_is_a_failure(tmp_path: Path) -> None:
    _node(tmp_path, "n1", 0)
    (tmp_path / "n2").mkdir()
    (tmp_path / "n2" / "result.json").write_text("{")
    code, line = verdict(tmp_path)
    assert code == 1 and "n2: UNREADABLE" in line


def test_the_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _node(tmp_path, "n1", 0)
    assert main(["verdict", str(tmp_path)]) == 0
    assert capsys.readouterr().out == "job succeeded on 1 node(s)\n"
    assert main(["verdict", str(tmp_path / "nowhere")]) == 2
    assert "no directory" in capsys.readouterr().err
