"""Stopping a job started by ``elastic_runner.launch``: Ctrl-C ends in KeyboardInterrupt
in the caller, SIGTERM in ChildFailedError, each after every worker is gone; a SIGTERM
after the run reaches the caller's handler once ``result.json`` is written."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
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


PREEMPTED_CALLER = textwrap.dedent(
    """
    import signal, sys, time, elastic_runner
    from pathlib import Path

    run_dir = Path(sys.argv[1])

    def on_term(signum, frame):
        written = (run_dir / "result.json").exists()
        print(f"the caller got SIGTERM; result.json written: {written}", flush=True)

    signal.signal(signal.SIGTERM, on_term)

    def slow():
        print("started", flush=True)
        time.sleep(60)

    result = elastic_runner.launch(
        slow,
        overrides=["signals.requeue=true"],
        run_dir=run_dir,
        env={"SLURM_JOB_ID": "4242", "SLURM_NODEID": "0"},
        raise_on_failure=False,
    )
    print(f"launch returned {result.exit_code}", flush=True)
    """
)


def test_the_requeues_sigterm_reaches_the_caller_once_the_result_is_written(
    tmp_path: Path,
) -> None:
    # scontrol requeue makes Slurm SIGTERM every process of the job: here, the caller
    calls = tmp_path / "scontrol.calls"
    scontrol = tmp_path / "bin" / "scontrol"
    scontrol.parent.mkdir()
    scontrol.write_text(f'#!/bin/sh\necho "$@" >> {calls}\nkill -TERM $PPID\nsleep 0.2\n')
    scontrol.chmod(0o755)
    run_dir = tmp_path / "run"
    caller = subprocess.Popen(
        [sys.executable, "-c", PREEMPTED_CALLER, str(run_dir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PATH": f"{scontrol.parent}:{os.environ['PATH']}"},
    )
    try:
        assert caller.stdout is not None
        assert "started" in caller.stdout.readline()
        agent = psutil.Process(caller.pid)
        for proc in [*agent.children(recursive=True), agent]:  # as Slurm: every process
            proc.send_signal(signal.SIGUSR1)
        out, err = caller.communicate(timeout=30)
    finally:
        caller.kill()
        caller.wait()
    assert caller.returncode == 0, err
    assert calls.read_text() == "requeue 4242\n"
    assert out.splitlines() == [
        "the caller got SIGTERM; result.json written: True",
        "launch returned 75",
    ], err
    assert "SIGTERM after the run ended: writing its result first" in err
    result = json.loads((run_dir / "result.json").read_text())
    assert (result["state"], result["exit_code"]) == ("PREEMPTED by SIGUSR1", 75)
    assert_nothing_survives({result["run_id"]}, within=5)
