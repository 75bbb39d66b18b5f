"""``elastic_runner.launch`` with functions that use real torch (CPU, gloo): the scenarios of
torch's ``local_elastic_agent_test.py`` (tensors as return values, ``all_reduce`` across
one, two and three agents, a rank restarted after a SIGKILL, a custom log line prefix, a
function raising inside a gloo job, on one agent or on one of two).

Single-agent runs launch in the test process (which must be left as it was); each agent
of a multi-agent job is a process of its own (``api_torch_functions.AGENT_SCRIPT``).

Run by ``nox -s integration`` / ``.ci/run`` in a venv with torch==2.13.0; skipped where
torch is not installed.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from elastic_runner.testing.caller import CallerState
from tests.conftest import assert_nothing_survives, free_port
from tests.integration import api_torch_functions as functions

pytest.importorskip("torch")
pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]

#: gloo's transport on loopback: the machine's hostname may resolve to any interface.
GLOO_ENV = {"GLOO_SOCKET_IFNAME": "lo"}

#: The built-in TCP store's rendezvous, tuned for agents on one machine.
FAST_RDZV = [
    "rdzv=tcp",
    "rdzv.heartbeat_interval=0.2",
    "rdzv.heartbeat_timeout=1.5",
    "rdzv.join_timeout=60",
    "rdzv.last_call_timeout=0.5",
]

#: Seconds a multi-agent job may take (2 shared cores; torch imports in each worker).
JOB_TIMEOUT = 300


@pytest.fixture
def run_id() -> Iterator[str]:
    """The job's id; whatever the test's outcome, none of the job's processes survives."""
    name = f"api-torch-{uuid.uuid4().hex[:8]}"
    yield name
    assert_nothing_survives({name}, within=15)


def _single(run_id: str, *overrides: str) -> list[str]:
    return [f"rdzv.id={run_id}", *overrides]


def _describe(run_dir: Path) -> str:
    """The tail of every worker's log under ``run_dir``, for a failure message."""
    parts = []
    for log in sorted(run_dir.rglob("attempt_*/*/std*.log")):
        tail = log.read_text(errors="replace").splitlines()[-15:]
        parts.append(f"== {log.relative_to(run_dir)}\n" + "\n".join(tail))
    return "\n".join(parts)


# -- one agent, in the test process ------------------------------------------------------------


def test_tensors_come_back_by_rank(tmp_path: Path, run_id: str) -> None:
    import torch

    import elastic_runner

    before = CallerState.now()
    result = elastic_runner.launch(
        functions.full_tensor,
        overrides=_single(run_id, "job.nproc_per_node=2"),
        run_dir=tmp_path / "run",
    )
    assert not result.is_failed()
    assert result.run_id == run_id
    assert sorted(result.return_values) == [0, 1]
    for rank, value in result.return_values.items():
        assert isinstance(value, torch.Tensor)
        assert torch.equal(value, torch.full((100, 100), float(rank)))
    assert_nothing_survives({run_id}, within=10)
    CallerState.now().assert_same_as(before)


def test_gloo_all_reduce_on_one_agent(tmp_path: Path, run_id: str) -> None:
    import elastic_runner

    before = CallerState.now()
    result = elastic_runner.launch(
        functions.dist_sum,
        overrides=_single(run_id, "job.nproc_per_node=2"),
        run_dir=tmp_path / "run",
        env=GLOO_ENV,
    )
    assert result.return_values == {0: 1, 1: 1}, _describe(tmp_path / "run")
    assert result.restart_count == 0
    assert_nothing_survives({run_id}, within=10)
    CallerState.now().assert_same_as(before)


def test_rank_restarted_after_sigkill_returns_the_final_attempts_tensors(
    tmp_path: Path, run_id: str
) -> None:
    import torch

    import elastic_runner

    before = CallerState.now()
    result = elastic_runner.launch(
        functions.kill_rank_1_on_first_attempt,
        overrides=_single(run_id, "job.nproc_per_node=2", "max_restarts=3"),
        run_dir=tmp_path / "run",
    )
    assert not result.is_failed(), _describe(tmp_path / "run")
    assert result.restart_count == 1
    assert result.attempts == 2
    assert sorted(result.return_values) == [0, 1]
    for rank, value in result.return_values.items():
        assert value["restart"] == 1  # every rank's value is from the attempt that succeeded
        assert torch.equal(value["tensor"], torch.full((100, 100), float(rank)))
    assert_nothing_survives({run_id}, within=10)
    CallerState.now().assert_same_as(before)


def test_custom_log_line_prefix_on_a_gloo_job(
    tmp_path: Path, run_id: str, capfd: pytest.CaptureFixture[str]
) -> None:
    import elastic_runner

    marker = f"hello-{uuid.uuid4().hex[:6]}"
    before = CallerState.now()
    result = elastic_runner.launch(
        functions.print_and_sum,
        args=(marker,),
        overrides=_single(
            run_id,
            "job.nproc_per_node=2",
            "job.role=trainer",
            # torch's log_line_prefix_template "[${role_name}-${local_rank}:${rank}]:"
            "logs.prefix='[{role}-{local_rank}:{rank}]:'",
        ),
        run_dir=tmp_path / "run",
        env=GLOO_ENV,
    )
    assert result.return_values == {0: 1, 1: 1}, _describe(tmp_path / "run")
    console = capfd.readouterr()
    lines = (console.out + console.err).splitlines()
    for rank in (0, 1):
        expected = f"[trainer-{rank}:{rank}]:"
        assert any(
            line.startswith(expected) and f"{marker} from rank {rank}" in line for line in lines
        ), f"no line starting {expected!r} with the marker in:\n" + "\n".join(lines)
    assert_nothing_survives({run_id}, within=10)
    CallerState.now().assert_same_as(before)


def test_function_raising_in_a_gloo_job_names_the_rank_and_the_exception(
    tmp_path: Path, run_id: str
) -> None:
    import elastic_runner

    before = CallerState.now()
    with pytest.raises(elastic_runner.ChildFailedError) as caught:
        elastic_runner.launch(
            functions.raise_on_rank,
            args=(1,),
            kwargs={"message": "bad batch"},
            overrides=_single(run_id, "job.nproc_per_node=2"),
            run_dir=tmp_path / "run",
            env=GLOO_ENV,
        )
    error = caught.value
    text = str(error)
    assert text.startswith("rank 1: exit code 1"), text
    assert "ValueError: bad batch" in text
    rank, failure = error.get_first_failure()
    assert (rank, failure.local_rank, failure.exitcode) == (1, 1, 1)
    assert failure.message == "ValueError: bad batch"
    assert failure.traceback is not None and "raise ValueError(message)" in failure.traceback
    assert list(error.failures) == [1]  # rank 0 returned: it did not fail
    assert error.result.is_failed()
    assert error.result.return_values == {}  # filled only when the run succeeded, as in torch
    assert_nothing_survives({run_id}, within=10)
    CallerState.now().assert_same_as(before)


# -- several agents, each in its own process ---------------------------------------------------


@dataclass
class Agent:
    proc: subprocess.Popen[bytes]
    out: Path
    run_dir: Path
    #: The agent's stderr (a file: a pipe nobody reads yet could fill and block it).
    err: Path

    def result(self, deadline: float, exit_code: int) -> dict[str, Any]:
        self.proc.wait(timeout=max(deadline - time.monotonic(), 1))
        err = self.err.read_text(errors="replace")
        assert self.out.exists(), f"agent exited {self.proc.returncode} without a result:\n{err}"
        fields: dict[str, Any] = json.loads(self.out.read_text())
        assert self.proc.returncode == fields["exit_code"] == exit_code, (
            f"{fields}\n{err}\n{_describe(self.run_dir)}"
        )
        return fields


def _start_agents(
    tmp_path: Path, run_id: str, function: str, nprocs: list[int], args: tuple[Any, ...] = ()
) -> list[Agent]:
    """One agent per entry of ``nprocs`` (its workers), each launching ``function(*args)``."""
    port = free_port()
    agents = []
    for node, nproc in enumerate(nprocs):
        overrides = [
            *FAST_RDZV,
            f"rdzv.endpoint=127.0.0.1:{port}",
            f"rdzv.id={run_id}",
            f"nnodes={len(nprocs)}",
            f"job.nproc_per_node={nproc}",
        ]
        out, run_dir = tmp_path / f"node{node}.json", tmp_path / f"node{node}"
        err = tmp_path / f"node{node}.err"
        argv = [sys.executable, "-c", functions.AGENT_SCRIPT, str(ROOT), function, json.dumps(args)]
        argv += [str(out), str(run_dir), json.dumps(overrides)]
        with open(err, "wb") as stderr:
            proc = subprocess.Popen(
                argv, cwd=tmp_path, stdin=subprocess.DEVNULL, stdout=stderr, stderr=stderr
            )
        agents.append(Agent(proc, out, run_dir, err))
    return agents


def _finish(agents: list[Agent], exit_code: int = 0) -> list[dict[str, Any]]:
    """Each agent's result fields, once it exited with ``exit_code``."""
    deadline = time.monotonic() + JOB_TIMEOUT
    try:
        return [agent.result(deadline, exit_code) for agent in agents]
    finally:
        for agent in agents:
            if agent.proc.poll() is None:  # a failed test: stop the agent and its workers
                agent.proc.terminate()
                try:
                    agent.proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    agent.proc.kill()
                    agent.proc.wait()


@pytest.mark.timeout(JOB_TIMEOUT + 60)
@pytest.mark.parametrize(
    "nprocs",
    [pytest.param([4, 4], id="homogeneous-2x4"), pytest.param([1, 2, 3], id="heterogeneous-1-2-3")],
)
def test_gloo_all_reduce_across_agents(tmp_path: Path, run_id: str, nprocs: list[int]) -> None:
    world = sum(nprocs)
    results = _finish(_start_agents(tmp_path, run_id, "dist_sum", nprocs))
    assert {r["run_id"] for r in results} == {run_id}
    assert [r["state"] for r in results] == ["SUCCEEDED"] * len(nprocs)
    ranks: list[int] = []
    for result, nproc in zip(results, nprocs, strict=True):
        values = {int(rank): value for rank, value in result["return_values"].items()}
        assert len(values) == nproc  # only this node's ranks, contiguous
        assert sorted(values) == list(range(min(values), min(values) + nproc))
        assert set(values.values()) == {world * (world - 1) // 2}
        ranks += values
    assert sorted(ranks) == list(range(world))
    assert_nothing_survives({run_id}, within=15)


@pytest.mark.timeout(JOB_TIMEOUT + 60)
def test_function_raising_on_one_agent_fails_every_agent(tmp_path: Path, run_id: str) -> None:
    # max_restarts is per job: the node of the raising rank uses it up, the other learns
    # from the store that the job failed (even though its own rank had returned).
    agents = _start_agents(tmp_path, run_id, "raise_on_rank", [1, 1], args=(1, "bad batch"))
    results = _finish(agents, exit_code=1)
    assert [r["state"] for r in results] == ["FAILED", "FAILED"]
    assert all(r["return_values"] == {} for r in results)
    failed = [r for r in results if r["failed_ranks"]]
    other = [r for r in results if not r["failed_ranks"]]
    assert len(failed) == len(other) == 1, results
    assert failed[0]["failed_ranks"] == [1]
    assert failed[0]["error"] == "rank 1: exit code 1: ValueError: bad batch"
    assert "the job failed on another node" in other[0]["error"], other
    assert "restarts used up (max_restarts=0)" in other[0]["error"], other
    assert_nothing_survives({run_id}, within=15)
