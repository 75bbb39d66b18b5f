"""The worker side of a function entrypoint (``python -m elastic_runner.workers.call``):
real worker processes, their error files and return values."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from elastic_runner.workers.call import (
    UnsendableError,
    read_return,
    return_path,
    write_payload,
)


def _run(payload: Path, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "TORCHELASTIC_ERROR_FILE": str(tmp_path / "error.json"), "RANK": "3"}
    return subprocess.run(
        [sys.executable, "-m", "elastic_runner.workers.call", str(payload)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def _rank_and(x: int, *, y: int) -> tuple[str, int]:
    return os.environ["RANK"], x + y


def test_a_function_runs_and_its_value_comes_back(tmp_path: Path) -> None:
    write_payload(tmp_path / "call.pkl", _rank_and, (1,), {"y": 2})
    assert (tmp_path / "call.pkl").stat().st_mode & 0o777 == 0o600
    done = _run(tmp_path / "call.pkl", tmp_path)
    assert done.returncode == 0, done.stderr
    assert read_return(return_path(tmp_path / "error.json")) == ("3", 3)
    assert not (tmp_path / "error.json").exists()


def test_a_closure_and_a_lambda_travel_by_value(tmp_path: Path) -> None:
    secret = [41]
    write_payload(tmp_path / "call.pkl", lambda: secret[0] + 1, (), {})
    assert _run(tmp_path / "call.pkl", tmp_path).returncode == 0
    assert read_return(return_path(tmp_path / "error.json")) == 42


def _fails() -> None:
    raise ValueError("bad batch")


def test_an_exception_is_recorded_from_the_functions_own_frame(tmp_path: Path) -> None:
    write_payload(tmp_path / "call.pkl", _fails, (), {})
    done = _run(tmp_path / "call.pkl", tmp_path)
    assert done.returncode == 1
    error = json.loads((tmp_path / "error.json").read_text())["message"]
    assert error["message"] == "ValueError: bad batch"
    trace = error["extraInfo"]["py_callstack"]
    assert "in _fails" in trace and "workers/call.py" not in trace
    assert "ValueError: bad batch" in done.stderr and "workers/call.py" not in done.stderr
    assert not return_path(tmp_path / "error.json").exists()


def test_sys_exit_keeps_its_code(tmp_path: Path) -> None:
    write_payload(tmp_path / "call.pkl", sys.exit, (7,), {})
    assert _run(tmp_path / "call.pkl", tmp_path).returncode == 7


def _generator() -> Any:
    return (i for i in range(3))


def test_a_return_value_that_cannot_be_sent_is_the_workers_error(tmp_path: Path) -> None:
    write_payload(tmp_path / "call.pkl", _generator, (), {})
    done = _run(tmp_path / "call.pkl", tmp_path)
    assert done.returncode == 1
    message = json.loads((tmp_path / "error.json").read_text())["message"]["message"]
    assert "return value of rank 3 (generator) cannot be sent back" in message


def test_a_function_that_cannot_be_pickled_is_named(tmp_path: Path) -> None:
    lock = threading.Lock()
    with pytest.raises(UnsendableError, match=r"cannot send .*<lambda>.*: TypeError"):
        write_payload(tmp_path / "call.pkl", lambda: lock, (), {})
    assert not (tmp_path / "call.pkl").exists()


def test_a_function_the_worker_cannot_import_is_a_recorded_error(tmp_path: Path) -> None:
    module = tmp_path / "gone_module.py"
    module.write_text("def f():\n    return 1\n")
    sys.path.insert(0, str(tmp_path))
    try:
        import gone_module  # type: ignore[import-not-found]

        write_payload(tmp_path / "call.pkl", gone_module.f, (), {})
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("gone_module", None)
    module.unlink()
    done = _run(tmp_path / "call.pkl", tmp_path)
    assert done.returncode == 1
    message = json.loads((tmp_path / "error.json").read_text())["message"]["message"]
    assert "cannot load the function in the worker: ModuleNotFoundError" in message
