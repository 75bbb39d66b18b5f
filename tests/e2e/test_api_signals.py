"""Stopping a job started by ``elastic_runner.launch``: Ctrl-C ends in KeyboardInterrupt
in the caller, SIGTERM in ChildFailedError, each after every worker is gone."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.conftest import assert_nothing_survives

CALLER = textwrap.dedent(
    """
    import sys, time, elastic_runner

    def slow():
        print("started", flush=True)
        time.sleep(60)

    try:
        elastic_runner.launch(
            slow, overrides=["job.nproc_per_node=2", "stop_timeout=5"], run_dir=sys.argv[1]
        )
    except elastic_runner.ChildFailedError as exc:
        print(f"ChildFailedError: {exc} ({exc.result.exit_code})", flush=True)
        raise
    """
)


@pytest.mark.parametrize(
    ("sig", "returncode", "last_line"),
    [
        (signal.SIGINT, -signal.SIGINT, "KeyboardInterrupt"),
        (
            signal.SIGTERM,
            1,
            "elastic_runner.api.ChildFailedError: stopped by SIGTERM",
        ),
    ],
)
def test_a_stop_signal_to_the_caller(
    tmp_path: Path, sig: signal.Signals, returncode: int, last_line: str
) -> None:
    run_dir = tmp_path / "run"
    caller = subprocess.Popen(
        [sys.executable, "-c", CALLER, str(run_dir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert caller.stdout is not None
        assert "started" in caller.stdout.readline()  # a worker runs
        sent = time.monotonic()
        caller.send_signal(sig)
        out, err = caller.communicate(timeout=30)
        took = time.monotonic() - sent
    finally:
        caller.kill()
        caller.wait()
    assert caller.returncode == returncode, err
    assert err.strip().splitlines()[-1] == last_line
    if sig == signal.SIGTERM:  # the exception carries the result
        assert "ChildFailedError: stopped by SIGTERM (143)" in out
    assert took < 10  # the workers end on the forwarded stop, not at their sleep's end
    result = json.loads((run_dir / "result.json").read_text())
    assert result["exit_code"] == 128 + sig
    assert_nothing_survives({result["run_id"]}, within=5)
