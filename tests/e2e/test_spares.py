"""Hot spares: ``elastic-run`` agents beyond ``nnodes=MIN:MAX`` stand by, take the place of
a lost node at once, and end with the job (real agents over the TCP store on 127.0.0.1).

The agent hosting the store is never the one killed (that fails the job by design)."""

from __future__ import annotations

import json
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from elastic_runner.testing.runner import wait_for
from tests.conftest import ElasticRunner, assert_nothing_survives, free_port, probe_job

HEARTBEAT_TIMEOUT = 1.5
#: A long last call: a replacement that waited for it would show.
RDZV = [
    "rdzv=tcp",
    "rdzv.heartbeat_interval=0.2",
    f"rdzv.heartbeat_timeout={HEARTBEAT_TIMEOUT}",
    "rdzv.join_timeout=30",
    "rdzv.last_call_timeout=5",
]
STANDBY = "standby: the job runs on 2 of 2 nodes; this node takes the place of one that is lost"
UNNEEDED = "the job finished without needing this standby node"


class Spares:
    """Agents of one ``nnodes=2:2`` job; each started agent has its own run directory."""

    def __init__(self, elastic_run: ElasticRunner, tmp_path: Path, sleep: float) -> None:
        self.elastic_run = elastic_run
        self.run_id = f"spares-{uuid.uuid4().hex[:8]}"
        self.port = free_port()
        self.out = tmp_path / "probe"
        self.out.mkdir(parents=True)
        self.sleep = sleep
        #: more arguments for the probe workers
        self.probe: tuple[str, ...] = ()
        self.agents: list[subprocess.Popen[str]] = []
        self.run_dirs: list[Path] = []

    def start(self, host: bool = False, *overrides: str) -> int:
        """Start an agent (the store's host, or not); returns its index."""
        proc, run_dir, _ = self.elastic_run.popen(
            *probe_job(self.out, "--sleep", str(self.sleep), *self.probe),
            *RDZV,
            f"rdzv.endpoint=127.0.0.1:{self.port}",
            f"rdzv.is_host={str(host).lower()}",
            "nnodes=2:2",
            *overrides,
            run_id=self.run_id,
        )
        self.agents.append(proc)
        self.run_dirs.append(run_dir)
        return len(self.agents) - 1

    def records(self, agent: int) -> list[dict[str, Any]]:
        """The probe records (the last per rank) of the workers agent ``agent`` ran."""
        found = []
        for path in self.out.glob("a*_r*.json"):
            record = json.loads(path.read_text())
            if record["env"]["TORCHELASTIC_ERROR_FILE"].startswith(f"{self.run_dirs[agent]}/"):
                found.append(record)
        return found

    def log(self, agent: int) -> str:
        path = self.run_dirs[agent] / "elastic-run.log"
        return path.read_text() if path.exists() else ""

    def result(self, agent: int) -> dict[str, Any]:
        return dict(json.loads((self.run_dirs[agent] / "result.json").read_text()))

    def rounds(self, agent: int) -> int:
        """How many rounds the agent joined."""
        events = (self.run_dirs[agent] / "events.jsonl").read_text()
        return events.count("torchelastic.worker.status.RENDEZVOUS")

    def standing_by(self, agent: int) -> bool:
        return STANDBY in self.log(agent)

    def end(self, agent: int, timeout: float = 60) -> tuple[int, str]:
        _, err = self.agents[agent].communicate(timeout=timeout)
        return self.agents[agent].returncode, err

    def kill(self, agent: int) -> float:
        self.agents[agent].kill()
        t0 = time.time()
        self.agents[agent].communicate(timeout=10)
        return t0

    def close(self) -> None:
        for proc in self.agents:
            if proc.poll() is None:
                proc.kill()
                proc.communicate(timeout=10)


@pytest.fixture
def spares(elastic_run: ElasticRunner, tmp_path: Path) -> Iterator[Any]:
    made: list[Spares] = []

    def make(sleep: float) -> Spares:
        made.append(Spares(elastic_run, tmp_path / str(len(made)), sleep))
        return made[-1]

    try:
        yield make
    finally:
        for job in made:
            job.close()
        assert_nothing_survives({job.run_id for job in made})


def _running(job: Spares, *agents: int) -> None:
    """Wait until the job runs on ``agents`` (one worker each)."""
    wait_for(lambda: all(job.records(a) for a in agents), timeout=30)


def test_a_spare_replaces_a_lost_node_at_once(spares: Any) -> None:
    job = spares(sleep=6)
    host, lost = job.start(host=True), job.start()
    _running(job, host, lost)
    spare = job.start()
    wait_for(lambda: job.standing_by(spare), timeout=30)
    assert not job.records(spare)
    killed_at = job.kill(lost)
    wait_for(lambda: job.records(spare), timeout=30)
    [record] = job.records(spare)
    # the spare's worker ran within the heartbeat timeout and a moment (measured: ~1.6 s),
    # not after the 5 s last call
    assert record["started"] - killed_at < HEARTBEAT_TIMEOUT + 2.0
    env = record["env"]
    assert (env["WORLD_SIZE"], env["GROUP_WORLD_SIZE"]) == ("2", "2")
    assert env["TORCHELASTIC_RESTART_COUNT"] == "0"
    for agent in (host, spare):
        code, err = job.end(agent)
        assert code == 0, err
        assert job.result(agent)["restarts"] == 0
    [again] = job.records(host)
    assert (again["env"]["WORLD_SIZE"], again["env"]["TORCHELASTIC_RESTART_COUNT"]) == ("2", "0")
    assert again["started"] > killed_at  # the survivor's workers ran again, in the new world


def test_a_spare_ends_with_the_job(spares: Any) -> None:
    job = spares(sleep=5)
    host, other = job.start(host=True), job.start()
    _running(job, host, other)
    spare = job.start()
    wait_for(lambda: job.standing_by(spare), timeout=30)
    codes = [job.end(a) for a in (host, other)]
    assert [code for code, _ in codes] == [0, 0], codes
    t0 = time.monotonic()
    code, err = job.end(spare, timeout=30)
    assert time.monotonic() - t0 < 5  # at once, not after rdzv.join_timeout (30 s)
    assert code == 0, err
    assert UNNEEDED in err.strip().splitlines()[-1]
    assert not job.records(spare)
    assert job.result(spare)["exit_code"] == 0


def test_two_spares_for_one_place(spares: Any) -> None:
    job = spares(sleep=6)
    host, lost = job.start(host=True), job.start()
    _running(job, host, lost)
    first, second = job.start(), job.start()
    wait_for(lambda: job.standing_by(first) and job.standing_by(second), timeout=30)
    job.kill(lost)
    wait_for(lambda: job.records(first) or job.records(second), timeout=30)
    time.sleep(1.0)  # room for a wrong second taker to show
    took = [a for a in (first, second) if job.records(a)]
    assert len(took) == 1, took
    [left] = [a for a in (first, second) if a not in took]
    assert job.agents[left].poll() is None  # still standing by
    for agent in (host, *took, left):
        code, err = job.end(agent)
        assert code == 0, (agent, err)
    assert not job.records(left)
    assert UNNEEDED in err
    assert job.rounds(host) == 2  # one re-formation, for the lost node


def test_a_spare_killed_while_waiting_changes_nothing(spares: Any) -> None:
    job = spares(sleep=4)
    host, other = job.start(host=True), job.start()
    _running(job, host, other)
    spare = job.start()
    wait_for(lambda: job.standing_by(spare), timeout=30)
    job.kill(spare)
    for agent in (host, other):
        code, err = job.end(agent)
        assert code == 0, err
        assert job.result(agent)["restarts"] == 0
        assert job.rounds(agent) == 1  # no regroup
    assert not job.records(spare)


def test_the_lost_node_started_again_stands_by(spares: Any) -> None:
    job = spares(sleep=6)
    host, lost = job.start(host=True), job.start()
    _running(job, host, lost)
    spare = job.start()
    wait_for(lambda: job.standing_by(spare), timeout=30)
    job.kill(lost)
    wait_for(lambda: job.records(spare), timeout=30)
    back = job.start()  # the same node, started again: the job is full
    wait_for(lambda: job.standing_by(back), timeout=30)
    for agent in (host, spare, back):
        code, err = job.end(agent)
        assert code == 0, (agent, err)
    assert not job.records(back)
    assert UNNEEDED in err


def test_a_spare_ends_when_the_job_fails_for_good(spares: Any) -> None:
    job = spares(sleep=5)
    job.probe = ("--ranks", "0", "--exit-code", "3")  # rank 0 fails after 5 s, no restart
    host, other = job.start(True, "max_restarts=0"), job.start(False, "max_restarts=0")
    _running(job, host, other)
    spare = job.start(False, "max_restarts=0")
    wait_for(lambda: job.standing_by(spare), timeout=30)
    codes = [job.end(a)[0] for a in (host, other)]
    assert codes == [1, 1]
    t0 = time.monotonic()
    code, err = job.end(spare, timeout=30)
    assert time.monotonic() - t0 < 5
    assert code == 1, err
    assert "rendezvous failed: the job failed on another node" in err.strip().splitlines()[-1]
    assert not job.records(spare)
