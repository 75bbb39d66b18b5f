"""Excluding a failing node through ``elastic-run``: real agents over the TCP store on
127.0.0.1. The node whose workers fail twice within the window leaves the job for its
cooldown, the others re-form without it and go on, and it comes back after the cooldown;
a node the job cannot spare restarts with the others."""

from __future__ import annotations

import json
import re
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

from elastic_runner.testing.runner import wait_for
from tests.conftest import TESTS, ElasticRunner, free_port

FLAKY = TESTS / "workers" / "flaky_node.py"
RDZV = [
    "rdzv=tcp",
    "rdzv.heartbeat_interval=0.2",
    "rdzv.heartbeat_timeout=1.5",
    "rdzv.join_timeout=30",
    "rdzv.last_call_timeout=0.5",
]
EXCLUSION = ["exclusion.failures=2", "exclusion.window=60", "exclusion.cooldown=2"]


class FlakyJob:
    """Agents of one job running ``tests/workers/flaky_node.py``; agent ``tag`` gets
    ``NODE_TAG=tag``; the node tagged ``c`` fails its first two attempts."""

    def __init__(self, elastic_run: ElasticRunner, tmp_path: Path, nnodes: str) -> None:
        self.elastic_run = elastic_run
        self.run_id = f"excl-{uuid.uuid4().hex[:8]}"
        self.port = free_port()
        self.nnodes = nnodes
        self.out = tmp_path / "out"
        self.out.mkdir()
        self.agents: dict[str, subprocess.Popen[str]] = {}
        self.run_dirs: dict[str, Path] = {}

    def start(self, tag: str, *worker_args: str, overrides: tuple[str, ...] = ()) -> None:
        args = ",".join(f'"{a}"' for a in ["--out", str(self.out), "--bad", "c", *worker_args])
        proc, run_dir, _ = self.elastic_run.popen(
            f"job.entrypoint={FLAKY}",
            f"job.args=[{args}]",
            f"+job.env.NODE_TAG={tag}",
            *RDZV,
            f"rdzv.endpoint=127.0.0.1:{self.port}",
            f"rdzv.is_host={str(tag == 'a').lower()}",
            f"nnodes={self.nnodes}",
            "max_restarts=3",
            *overrides,
            run_id=self.run_id,
        )
        self.agents[tag], self.run_dirs[tag] = proc, run_dir

    def records(self) -> list[dict[str, Any]]:
        """What every worker saw, in the order they started."""
        found = [json.loads(p.read_text()) for p in self.out.glob("*_*.json")]
        return sorted(found, key=lambda r: r["started"])

    def events(self, tag: str) -> list[dict[str, Any]]:
        path = self.run_dirs[tag] / "events.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()]

    def finish(self, timeout: float = 90) -> dict[str, tuple[int, str]]:
        results = {}
        for tag, proc in self.agents.items():
            _, err = proc.communicate(timeout=timeout)
            results[tag] = (proc.returncode, err)
        return results


def test_a_node_failing_twice_is_excluded_and_comes_back_after_its_cooldown(
    elastic_run: ElasticRunner, tmp_path: Path
) -> None:
    job = FlakyJob(elastic_run, tmp_path, "2:3")
    for tag in "abc":
        job.start(tag, "--until-world", "3", "--sleep", "0.5", overrides=tuple(EXCLUSION))
    try:
        # c fails twice (each time the root cause), then sits out: a and b run as two
        wait_for(lambda: any(r["world"] == 2 for r in job.records()), timeout=60)
        results = job.finish()
    finally:
        elastic_run.kill_agents()
    assert {tag: code for tag, (code, _) in results.items()} == {"a": 0, "b": 0, "c": 0}, results
    records = job.records()
    worlds = [r["world"] for r in records if r["tag"] == "a"]
    assert worlds[-2:] == [2, 3], worlds  # re-formed without c, then with it again
    assert [r["world"] for r in records if r["tag"] == "c"] == [3, 3, 3]  # 2 failures, 1 run
    assert records[-1]["restart"] == 2  # each failure one restart; the exclusion none more
    c_err = results["c"][1]
    assert "leaves the job: excluded for 2 s: the root cause of 2 failures within 60 s" in c_err
    assert "stepped out of the job (excluded for 2 s" in results["a"][1]
    assert re.search(r"\n  node \S+ excluded for 2 s: the root cause of 2 failures", c_err)
    excluded = [e for e in job.events("c") if e["name"] == "elastic_runner.node.excluded"]
    assert len(excluded) == 1
    assert excluded[0]["metadata"]["cooldown"] == 2 and excluded[0]["metadata"]["count"] == 1
    back = [e for e in job.events("c") if e["name"] == "elastic_runner.node.in"]
    assert back and back[0]["metadata"]["after"] == "exclusion"
    # it sat out its cooldown while a and b ran as two, then all three ran
    assert 2.0 <= back[0]["timestamp"] - excluded[0]["timestamp"] < 4
    two = min(r["started"] for r in records if r["world"] == 2)
    assert excluded[0]["timestamp"] < two < back[0]["timestamp"] < records[-1]["started"]
    assert records[-1]["world"] == 3
    result = json.loads((job.run_dirs["c"] / "result.json").read_text())
    assert (result["exit_code"], result["restarts"]) == (0, 2)
    line = re.search(r"node \S+ excluded for 2 s.*", c_err)
    assert line and result["excluded"] == [line[0]]


def test_a_standby_takes_the_place_of_an_excluded_node(
    elastic_run: ElasticRunner, tmp_path: Path
) -> None:
    """``nnodes=2:2`` and a spare: the excluded node's place goes to the spare at once;
    the job finishes during the (long) cooldown, which ends the excluded node's wait."""
    job = FlakyJob(elastic_run, tmp_path, "2:2")
    go = tmp_path / "go"
    long_cooldown = [*EXCLUSION, "exclusion.cooldown=120", "exclusion.cooldown_max=120"]
    for tag in "ac":
        job.start(tag, "--go", str(go), "--sleep", "1", overrides=tuple(long_cooldown))
    try:
        wait_for(lambda: {r["tag"] for r in job.records()} == {"a", "c"}, timeout=30)
        job.start("b", "--go", str(go), "--sleep", "1", overrides=tuple(long_cooldown))
        log = job.run_dirs["b"] / "elastic-run.log"
        wait_for(lambda: log.exists() and "standby" in log.read_text(), timeout=30)
        go.touch()
        started = time.monotonic()
        results = job.finish()
    finally:
        elastic_run.kill_agents()
    assert {tag: code for tag, (code, _) in results.items()} == {"a": 0, "b": 0, "c": 0}, results
    assert time.monotonic() - started < 30  # not the 120 s cooldown
    records = job.records()
    assert [r["world"] for r in records if r["tag"] == "b"] == [2]  # in c's place
    assert [r["tag"] for r in records].count("c") == 2  # its two failures, no more
    assert records[-1]["restart"] == 2
    assert "the job finished while this node sat out its exclusion" in results["c"][1]


def test_a_node_the_job_cannot_spare_restarts_with_the_others(
    elastic_run: ElasticRunner, tmp_path: Path
) -> None:
    started = time.monotonic()
    job = FlakyJob(elastic_run, tmp_path, "2:2")
    for tag in "ac":
        job.start(tag, "--sleep", "0.2", overrides=tuple(EXCLUSION))
    try:
        results = job.finish()
    finally:
        elastic_run.kill_agents()
    assert {tag: code for tag, (code, _) in results.items()} == {"a": 0, "c": 0}, results
    assert "the job cannot spare it (too few nodes would be left)" in results["c"][1]
    assert [r["world"] for r in job.records() if r["tag"] == "c"] == [2, 2, 2]
    assert time.monotonic() - started < 60
