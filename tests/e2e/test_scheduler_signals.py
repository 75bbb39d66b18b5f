"""A scheduler's signal through ``elastic-run``: the agent and every worker get the same
signal (as Slurm's proctrack sends it to every process of the step), agent first or
workers first; every run ends the same way, with nothing blamed on a rank."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

from elastic_runner.outside import WINDOW
from elastic_runner.testing.runner import ElasticRunner
from tests.conftest import probe_job, probe_records


def _signal_every_process(agent_pid: int, sig: int, agent_first: bool) -> None:
    """``sig`` to the agent and to each of its descendants, one after the other."""
    workers = [p.pid for p in psutil.Process(agent_pid).children(recursive=True)]
    order = [agent_pid, *workers] if agent_first else [*workers, agent_pid]
    for pid in order:
        with contextlib.suppress(ProcessLookupError):  # gone already
            os.kill(pid, sig)


def _start(elastic_run: ElasticRunner, probe_out: Path, *args: str) -> tuple[Any, Path]:
    proc, run_dir, _ = elastic_run.popen(
        *probe_job(probe_out, "--sleep", "60", *args, nproc=2), "resources.interval=0"
    )
    deadline = time.monotonic() + 20
    while len(probe_records(probe_out)) < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert len(probe_records(probe_out)) == 2
    time.sleep(0.1)  # the workers are in their sleep
    return proc, run_dir


def _signal_event(run_dir: Path) -> dict[str, Any]:
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    signals = [e for e in events if e["name"] == "elastic_runner.signal"]
    assert len(signals) == 1
    return dict(signals[0]["metadata"])


CASES = [
    # (signal, the workers catch it and exit 0, exit code)
    (signal.SIGTERM, False, 143),
    (signal.SIGTERM, True, 143),
    (signal.SIGINT, False, 130),
    (signal.SIGUSR1, True, 75),  # preemption (signals.preempt's default)
    (signal.SIGUSR1, False, 75),
]


@pytest.mark.parametrize("agent_first", [True, False], ids=["agent first", "workers first"])
@pytest.mark.parametrize(("sig", "catch", "code"), CASES)
def test_a_signal_to_every_process_is_reported_as_from_outside(
    elastic_run: ElasticRunner,
    tmp_path: Path,
    sig: int,
    catch: bool,
    code: int,
    agent_first: bool,
) -> None:
    name = signal.Signals(sig).name
    verb = "preempted" if code == 75 else "stopped"
    gaps: list[float | None] = []
    origins: list[str] = []
    # the same outcome every time, three times; up to three more when none of them could
    # tell it came from outside (see below)
    while len(origins) < 3 or ("outside" not in origins and len(origins) < 6):
        out = tmp_path / f"probe{len(origins)}"
        out.mkdir()
        proc, run_dir = _start(elastic_run, out, *(["--on-term"] if catch else []))
        _signal_every_process(proc.pid, sig, agent_first)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == code, err
        assert "root cause" not in err and "stopped by the agent" not in err
        result = json.loads((run_dir / "result.json").read_text())
        assert result["state"] == f"{verb.upper()} by {name}"
        assert result["exit_code"] == code
        meta = _signal_event(run_dir)
        assert meta["preempted"] == (code == 75)
        if meta["origin"] == "outside":
            reason = f"{verb} by {name} from outside (the scheduler signalled every process)"
            assert meta["gap_ms"] is not None and meta["gap_ms"] <= WINDOW * 1e3
        else:
            # As documented: when no worker ends within the window after the agent got
            # the signal first, it cannot tell; it passes the signal on, and only the
            # report's words differ. Seen on a loaded CI machine (2 cores, the suite on
            # two processes): workers that catch SIGUSR1 and exit 0 took longer.
            assert agent_first, err
            assert meta["gap_ms"] is None or meta["gap_ms"] > WINDOW * 1e3, meta
            reason = f"{verb} by {name}"
        assert f"elastic-run: {reason} after 1 attempt" in err, err
        assert result["error"] == reason
        gaps.append(meta["gap_ms"])
        origins.append(meta["origin"])
    assert "outside" in origins, origins
    print(f"{name} catch={catch} agent_first={agent_first}: gaps (ms) {gaps}, {origins}")


def test_a_signal_to_the_agent_alone_is_not_from_outside(
    elastic_run: ElasticRunner, probe_out: Path
) -> None:
    proc, run_dir = _start(elastic_run, probe_out)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 143, err
    assert "elastic-run: stopped by SIGTERM after 1 attempt" in err
    assert _signal_event(run_dir)["origin"] == "agent"
