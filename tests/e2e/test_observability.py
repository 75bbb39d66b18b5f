"""Events, sinks and metrics of real runs through ``elastic-run``."""

from __future__ import annotations

import json
import re
from pathlib import Path

from tests.conftest import TESTS, ElasticRunner
from tests.test_metrics import aggregate

HANG = TESTS / "workers" / "hang.py"


def fail_once(out: Path) -> list[str]:
    """Rank 1 exits 3 on the first attempt; the second attempt succeeds at once."""
    (out / "release").touch()
    return [
        f"job.entrypoint={HANG}",
        f'job.args=["{out}","exit-first","1"]',
        "job.nproc_per_node=2",
        "max_restarts=1",
    ]


def test_event_sequence_of_a_run_with_one_restart(
    elastic_run: ElasticRunner, tmp_path: Path
) -> None:
    run = elastic_run(*fail_once(tmp_path))
    assert run.returncode == 0, run.stderr
    events = run.events()
    names = [e["name"].removeprefix("torchelastic.worker.status.") for e in events]
    attempt = [
        "elastic_runner.rendezvous.join",
        "RENDEZVOUS",
        "elastic_runner.ranks.assigned",
        "START",
        "START",
    ]
    assert names == [
        *attempt,
        "FAILED",
        "TERMINATED",
        "elastic_runner.restart",
        *attempt,
        "SUCCEEDED",
        "SUCCEEDED",
        "SUCCEEDED",
        "elastic_runner.shutdown",
    ]
    failed = events[5]
    assert (failed["source"], failed["rank"], failed["state"]) == ("WORKER", 1, "FAILED")
    assert failed["metadata"]["failure"] == "EXIT_CODE" and failed["metadata"]["exit_code"] == 3
    assert events[7]["metadata"]["reason"] == "failure"
    assert events[-2]["source"] == "AGENT" and events[-2]["metadata"]["restart_count"] == 1
    assert {e["run_id"] for e in events} == {run.run_id}
    stamps = [e["timestamp"] for e in events]
    assert stamps == sorted(stamps)


def test_console_and_null_sinks(elastic_run: ElasticRunner) -> None:
    run = elastic_run("+job=hello", "events=console")
    assert run.returncode == 0, run.stderr
    printed = [
        json.loads(line.removeprefix("[event] "))
        for line in run.stderr.splitlines()
        if line.startswith("[event] ")
    ]
    assert [e["name"] for e in printed][-2:] == [
        "torchelastic.worker.status.SUCCEEDED",
        "elastic_runner.shutdown",
    ]
    assert not (run.run_dir / "events.jsonl").exists()
    run = elastic_run("+job=hello", "events=null", "metrics=null")  # unquoted null works
    assert run.returncode == 0 and "[event]" not in run.stderr
    assert not (run.run_dir / "events.jsonl").exists()


def test_metric_values_of_a_run_with_a_failure(elastic_run: ElasticRunner, tmp_path: Path) -> None:
    run = elastic_run(*fail_once(tmp_path), "metrics=jsonl")
    assert run.returncode == 0, run.stderr
    records = [
        json.loads(line) for line in (run.run_dir / "metrics.jsonl").read_text().splitlines()
    ]
    assert aggregate(records, "workers.failures", {"kind": "EXIT_CODE"}) == 1
    assert aggregate(records, "workers.restarts", {}) == 1
    assert aggregate(records, "rendezvous.duration_s", {}) == 2  # two rounds observed
    assert aggregate(records, "workers.start_latency_s", {}) == 2
    recovery = [r["value"] for r in records if r["name"] == "recovery.duration_s"]
    assert len(recovery) == 1 and 0 < recovery[0] < 10
    assert aggregate(records, "group.state", {"state": "SUCCEEDED"}) == 1


def test_console_metrics(elastic_run: ElasticRunner, tmp_path: Path) -> None:
    run = elastic_run(*fail_once(tmp_path), "metrics=console")
    assert run.returncode == 0, run.stderr
    assert "[metric] workers.failures{kind=EXIT_CODE} 1" in run.stderr.splitlines()


def test_peak_rss_of_a_short_lived_spike(elastic_run: ElasticRunner, tmp_path: Path) -> None:
    """150 MiB for an instant, gone before any sample: the summary still shows the peak."""
    script = tmp_path / "spike.py"
    script.write_text("b = bytearray(150 * 2**20)\n")
    run = elastic_run(f"job.entrypoint={script}", "job.nproc_per_node=2")
    assert run.returncode == 0, run.stderr
    rows = re.findall(r"^\s+(\d+)\s+ok\s+[\d.]+ s\s+([\d.]+) MiB\s+0$", run.stderr, re.MULTILINE)
    assert sorted(rank for rank, _ in rows) == ["0", "1"], run.stderr
    assert all(150 < float(mib) < 300 for _, mib in rows), rows
    exits = [
        e
        for e in run.events()
        if e["name"] == "torchelastic.worker.status.SUCCEEDED" and e["source"] == "WORKER"
    ]
    assert len(exits) == 2
    assert all(150 * 2**20 < e["metadata"]["max_rss"] < 300 * 2**20 for e in exits), exits
