"""Diagnosing failures: error files (ours and torch's), tracebacks, classification."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from elastic_runner import failures
from elastic_runner.error_file import read_error_file, record
from elastic_runner.failures import diagnose, last_traceback
from elastic_runner.spec import Failure, FailureKind, WorkerExit

TORCH_FORMAT = {
    "message": {
        "message": "RuntimeError: boom",
        "extraInfo": {
            "py_callstack": "Traceback...\nRuntimeError: boom\n",
            "timestamp": "1700000000",
        },
    }
}


def test_record_writes_torch_format_and_reraises(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "error.json"
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(path))

    @record
    def main(x: int) -> int:
        raise ValueError(f"bad {x}")

    with pytest.raises(ValueError, match="bad 3"):
        main(3)
    data = json.loads(path.read_text())
    assert data["message"]["message"] == "ValueError: bad 3"
    extra = data["message"]["extraInfo"]
    assert "raise ValueError" in extra["py_callstack"]
    assert int(extra["timestamp"]) == int(float(extra["timestamp_precise"]))
    found = read_error_file(path)
    assert found is not None
    message, tb, ts = found
    assert message == "ValueError: bad 3" and ts == float(extra["timestamp_precise"])
    assert tb == extra["py_callstack"]


def test_record_leaves_system_exit_and_success_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "error.json"
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(path))
    assert record(lambda: 5)() == 5
    with pytest.raises(SystemExit):
        record(lambda: (_ for _ in ()).throw(SystemExit(2)))()
    assert not path.exists()


def test_torch_format_error_file_is_read(tmp_path: Path) -> None:
    (tmp_path / "e.json").write_text(json.dumps(TORCH_FORMAT))
    assert read_error_file(tmp_path / "e.json") == (
        "RuntimeError: boom",
        "Traceback...\nRuntimeError: boom\n",
        1700000000.0,
    )
    (tmp_path / "bad.json").write_text("{not json")
    assert read_error_file(tmp_path / "bad.json") is None
    assert read_error_file(tmp_path / "missing.json") is None


def test_last_traceback_is_extracted_from_stderr(tmp_path: Path) -> None:
    (tmp_path / "err").write_text(
        "Traceback (most recent call last):\n  old\nOldError\nlog line\n"
        'Traceback (most recent call last):\n  File "t.py", line 1, in <module>\n'
        "    f()\nZeroDivisionError: division by zero\nafter\n"
    )
    assert last_traceback(tmp_path / "err") == (
        'Traceback (most recent call last):\n  File "t.py", line 1, in <module>\n'
        "    f()\nZeroDivisionError: division by zero"
    )
    (tmp_path / "none").write_text("all good\n")
    assert last_traceback(tmp_path / "none") is None


def _diagnose(
    tmp_path: Path,
    code: int,
    max_rss: int = 0,
    kill_reason: tuple[FailureKind, str] | None = None,
    oom_kills_before: int | None = None,
) -> Failure:
    return diagnose(
        WorkerExit(0, 0, 1, code, 100.5, max_rss=max_rss),
        error_file=tmp_path / "e.json",
        stderr=tmp_path / "err",
        kill_reason=kill_reason,
        oom_kills_before=oom_kills_before,
    )


def test_classification(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert _diagnose(tmp_path, 3).kind == FailureKind.EXIT_CODE
    segv = _diagnose(tmp_path, -signal.SIGSEGV)
    assert segv.kind == FailureKind.SIGNAL and segv.describe() == "killed by SIGSEGV"
    monkeypatch.setattr(failures, "oom_kill_count", lambda: 7)
    self_kill = _diagnose(tmp_path, -signal.SIGKILL, oom_kills_before=7)
    assert self_kill.kind == FailureKind.SIGNAL and "suspect the OOM killer" in self_kill.detail
    oom = _diagnose(tmp_path, -signal.SIGKILL, oom_kills_before=6)
    assert oom.kind == FailureKind.OOM_KILL and "(probable OOM kill)" in oom.describe()
    assert _diagnose(tmp_path, 137, oom_kills_before=6).kind == FailureKind.OOM_KILL
    assert "peak RSS" not in oom.detail  # unknown: not said
    big = _diagnose(tmp_path, -signal.SIGKILL, max_rss=3 * 2**30, oom_kills_before=6)
    assert big.detail.endswith("(see dmesg); its peak RSS was 3.0 GiB")
    big = _diagnose(tmp_path, -signal.SIGKILL, max_rss=3 * 2**30, oom_kills_before=7)
    assert big.detail.endswith("suspect the OOM killer; its peak RSS was 3.0 GiB")
    limit = _diagnose(
        tmp_path, -signal.SIGKILL, kill_reason=(FailureKind.MEMORY_LIMIT, "RSS 3 GiB > 2 GiB")
    )
    assert limit.kind == FailureKind.MEMORY_LIMIT and "RSS 3 GiB" in limit.describe()


def test_precise_error_time_orders_failures(tmp_path: Path) -> None:
    data = json.loads(json.dumps(TORCH_FORMAT))
    data["message"]["extraInfo"]["timestamp_precise"] = "100.25"
    (tmp_path / "e.json").write_text(json.dumps(data))
    assert _diagnose(tmp_path, 1).timestamp == 100.25
    # torch's whole seconds never move a failure earlier than the agent saw it exit
    (tmp_path / "e.json").write_text(json.dumps(TORCH_FORMAT))
    assert _diagnose(tmp_path, 1).timestamp == 100.5


def test_oom_kill_count_reads_vmstat() -> None:
    count = failures.oom_kill_count()
    assert count is None or count >= 0
    assert os.path.exists("/proc/vmstat")


def test_worker_side_import_is_the_decorator_and_light() -> None:
    code = (
        "import sys\n"
        "from elastic_runner import record\n"
        "assert callable(record) and record.__name__ == 'record', record\n"
        "heavy = {'pluggy', 'hydra', 'omegaconf', 'psutil'} & set(sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
