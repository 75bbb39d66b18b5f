"""The test kit's proof that nothing survived a run, on a real leftover process."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import uuid

import psutil
import pytest

from elastic_runner.testing.runner import assert_nothing_survives, wait_for
from elastic_runner.workers.stacks import find_py_spy

LEFTOVER = """\
import signal, time
signal.signal(signal.SIGINT, signal.SIG_IGN)
def stuck_here():
    print("ready", flush=True)
    time.sleep(60)
stuck_here()
"""


def test_a_survivor_is_described_and_killed() -> None:
    run_id = f"test-{uuid.uuid4().hex[:12]}"
    proc = subprocess.Popen(
        [sys.executable, "-c", LEFTOVER],
        env={**os.environ, "TORCHELASTIC_RUN_ID": run_id},
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
    with pytest.raises(AssertionError) as info:
        assert_nothing_survives({run_id}, within=0.2)
    message = str(info.value)
    first = message.splitlines()[1]
    assert first.startswith(f"pid {proc.pid} ({sys.executable} -c import signal, time ")
    assert "State S (sleeping)" in first
    sig_ign = re.search(r"SigIgn ([0-9a-f]+)", first)
    assert sig_ign is not None, first
    ignored = int(sig_ign.group(1), 16)
    assert ignored & (1 << (signal.SIGINT - 1))  # it ignores SIGINT, and the line says so
    if find_py_spy() is not None:
        assert "stuck_here" in message
    wait_for(lambda: proc.poll() is not None, timeout=10, what="the survivor was killed")
    proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL
    assert not psutil.pid_exists(proc.pid)


def test_nothing_left_passes() -> None:
    assert_nothing_survives({f"test-{uuid.uuid4().hex[:12]}"}, within=0.1)
