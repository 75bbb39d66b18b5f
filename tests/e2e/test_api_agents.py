"""Multi-agent jobs through the Python API: each agent is a process that calls
:func:`elastic_runner.launch` with a function from ``tests/workers/api_functions.py``,
and the agents rendezvous over the built-in TCP store or etcd. The scenarios are those
of torch's ``local_elastic_agent_test.py`` that need several agents (rank assignment,
distributed sum, fault tolerance, elasticity, exit barrier), plus agents started with
``multiprocessing``.

Each agent process writes its ``RunResult`` (return values, exit code, attempts,
restart count, run id, and when ``launch`` returned) as JSON for the test to check.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import pytest

from elastic_runner.testing.etcd import EtcdServer
from elastic_runner.testing.runner import processes_of_runs, wait_for
from tests.conftest import TESTS, assert_nothing_survives, free_port
from tests.e2e.test_etcd import ETCD_FAST
from tests.e2e.test_multinode import FAST as TCP_FAST

ROOT = TESTS.parent

#: The agent: ``python -c AGENT SPEC_JSON``; exits with the run's exit code.
AGENT = """
import json, os, sys, time
spec = json.loads(sys.argv[1])
import elastic_runner
from tests.workers import api_functions
fn = getattr(api_functions, spec["fn"])
raised = None
try:
    result = elastic_runner.launch(
        fn, spec["args"], spec["overrides"], run_dir=spec["run_dir"],
        raise_on_failure=spec["raise"],
    )
except elastic_runner.ChildFailedError as exc:
    result, raised = exc.result, str(exc)
record = {
    "return_values": sorted([rank, value] for rank, value in result.return_values.items()),
    "exit_code": result.exit_code,
    "is_failed": result.is_failed(),
    "attempts": result.attempts,
    "restart_count": result.restart_count,
    "run_id": result.run_id,
    "raised": raised,
    "ended": time.time(),
}
tmp = spec["out"] + ".tmp"
with open(tmp, "w") as f:
    json.dump(record, f)
os.replace(tmp, spec["out"])
sys.exit(result.exit_code)
"""

#: The marker every agent (and so every worker) of a test carries in its environment.
MARK_ENV = "API_AGENTS_TEST_MARK"


@dataclass
class Outcome:
    """How one agent process ended: its exit code, its ``RunResult`` record (``None``
    when it wrote none: killed) and its output."""

    code: int
    record: dict[str, Any] | None
    log: str

    @property
    def values(self) -> dict[int, Any]:
        assert self.record is not None, self.log
        return {int(rank): value for rank, value in self.record["return_values"]}


@dataclass
class Job:
    """The agents of one job: same run id, same rendezvous endpoint."""

    tmp_path: Path
    backend: str = "tcp"
    nnodes: str = "2"
    etcd: EtcdServer | None = None
    extra: Sequence[str] = ()
    run_id: str = field(default_factory=lambda: f"api-{uuid.uuid4().hex[:10]}")
    mark: str = field(default_factory=lambda: uuid.uuid4().hex)
    port: int = field(default_factory=free_port)
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.marks = self.tmp_path / "marks"
        self.marks.mkdir(parents=True, exist_ok=True)
        self.hold = self.tmp_path / "hold"

    def rdzv(self, index: int) -> list[str]:
        if self.backend == "etcd":
            assert self.etcd is not None
            return ["rdzv=etcd", f"rdzv.endpoint={self.etcd.endpoint}", *ETCD_FAST]
        # the first agent hosts the store: the others may be killed without ending the job
        host = "true" if index == 0 else "false"
        return [
            "rdzv=tcp",
            f"rdzv.endpoint=127.0.0.1:{self.port}",
            f"rdzv.is_host={host}",
            "rdzv.bind=127.0.0.1",
            *TCP_FAST,
        ]

    def start(
        self,
        fn: str,
        args: Sequence[Any] = (),
        *,
        nproc: int = 1,
        role: str = "trainer",
        overrides: Sequence[str] = (),
        raise_on_failure: bool = False,
    ) -> int:
        """Start an agent; returns its index (``agent<index>`` is its run directory)."""
        index = len(self.procs)
        spec = {
            "fn": fn,
            "args": list(args),
            "overrides": [
                *self.rdzv(index),
                f"rdzv.id={self.run_id}",
                f"nnodes={self.nnodes}",
                f"job.nproc_per_node={nproc}",
                f"job.role={role}",
                *self.extra,
                *overrides,
            ],
            "run_dir": str(self.tmp_path / f"agent{index}"),
            "out": str(self.tmp_path / f"agent{index}.json"),
            "raise": raise_on_failure,
        }
        with open(self.tmp_path / f"agent{index}.log", "wb") as log:
            proc = subprocess.Popen(
                [sys.executable, "-c", AGENT, json.dumps(spec)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.tmp_path,
                env={**os.environ, "PYTHONPATH": str(ROOT), MARK_ENV: self.mark},
            )
        self.procs.append(proc)
        return index

    def wait(self, index: int, timeout: float = 60) -> Outcome:
        proc = self.procs[index]
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            pytest.fail(f"agent {index} still running after {timeout} s:\n{self.log(index)}")
        out = self.tmp_path / f"agent{index}.json"
        record = json.loads(out.read_text()) if out.exists() else None
        return Outcome(code, record, self.log(index))

    def wait_all(self, timeout: float = 60) -> list[Outcome]:
        deadline = time.monotonic() + timeout
        return [self.wait(i, max(1.0, deadline - time.monotonic())) for i in range(len(self.procs))]

    def log(self, index: int) -> str:
        return (self.tmp_path / f"agent{index}.log").read_text(errors="replace")[-3000:]

    def marked(self) -> list[dict[str, Any]]:
        """What the workers that started so far saw (``api_functions._mark``)."""
        found = []
        for path in self.marks.glob("*.json"):
            try:
                found.append(json.loads(path.read_text()))
            except (OSError, ValueError):
                continue
        return found

    def running(self, pids_of: int) -> list[dict[str, Any]]:
        """The marked workers of agent ``pids_of`` that are still alive."""
        try:
            agent = psutil.Process(self.procs[pids_of].pid)
            children = {p.pid for p in agent.children(recursive=True)}
        except psutil.NoSuchProcess:
            return []
        return [m for m in self.marked() if m["pid"] in children]

    def stop(self, *, check: bool) -> None:
        """SIGKILL the agents still running; with ``check``, fail if a process of the job
        (agent or worker) outlives them."""
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        if check:
            assert_nothing_survives({self.run_id}, within=15)
            assert_nothing_survives({self.mark}, within=15, key=MARK_ENV)
        else:  # the test failed already: only make sure nothing is left behind
            for p in processes_of_runs({self.mark}, MARK_ENV) + processes_of_runs({self.run_id}):
                with suppress(psutil.NoSuchProcess):
                    p.kill()


class _Jobs:
    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.jobs: list[Job] = []

    def __call__(self, **kwargs: Any) -> Job:
        job = Job(self.tmp_path / f"job{len(self.jobs)}", **kwargs)
        self.jobs.append(job)
        return job

    def close(self, exc: BaseException | None) -> None:
        for job in self.jobs:
            job.stop(check=exc is None)


@contextmanager
def jobs(tmp_path: Path) -> Iterator[_Jobs]:
    made = _Jobs(tmp_path)
    try:
        yield made
    except BaseException as exc:
        made.close(exc)
        raise
    made.close(None)


def _etcd(request: pytest.FixtureRequest, backend: str) -> EtcdServer | None:
    if backend != "etcd":
        return None
    server = request.getfixturevalue("etcd_server")
    assert isinstance(server, EtcdServer)
    return server


def _ok(outcomes: Sequence[Outcome]) -> None:
    for i, o in enumerate(outcomes):
        assert o.code == 0 and o.record is not None, f"agent {i} exited {o.code}:\n{o.log}"
        assert o.record["exit_code"] == 0 and not o.record["is_failed"], o.record


# -- rank assignment ----------------------------------------------------------------------

HETEROGENEOUS = [
    ("master", 8),
    ("trainer", 1),
    ("trainer", 2),
    ("trainer", 3),
    ("trainer", 4),
    ("ps", 5),
    ("ps", 2),
]
HOMOGENEOUS = [("master", 1), *[("trainer", 4)] * 4, *[("ps", 3)] * 2]


@pytest.mark.parametrize("backend", ["tcp", "etcd"])
@pytest.mark.parametrize(
    ("layout", "role_sizes"),
    [
        (HETEROGENEOUS, {"master": 8, "trainer": 10, "ps": 7}),
        (HOMOGENEOUS, {"master": 1, "trainer": 16, "ps": 6}),
    ],
    ids=["heterogeneous", "homogeneous"],
)
def test_rank_assignment_over_seven_agents(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    backend: str,
    layout: list[tuple[str, int]],
    role_sizes: dict[str, int],
) -> None:
    world = sum(n for _, n in layout)
    with jobs(tmp_path) as make:
        job = make(backend=backend, nnodes=str(len(layout)), etcd=_etcd(request, backend))
        for role, nproc in layout:
            job.start("ranks", nproc=nproc, role=role)
        outcomes = job.wait_all(timeout=120)
        _ok(outcomes)

    by_group: dict[int, tuple[str, int]] = {}
    every: list[dict[str, Any]] = []
    for (role, nproc), outcome in zip(layout, outcomes, strict=True):
        values = outcome.values
        assert len(values) == nproc  # this node's ranks only
        views = [values[r] for r in sorted(values)]
        assert [v["RANK"] for v in views] == sorted(values)  # keyed by global rank
        (group_rank,) = {v["GROUP_RANK"] for v in views}
        by_group[group_rank] = (role, nproc)
        for v in views:
            assert v["ROLE_NAME"] == role
            assert (v["WORLD_SIZE"], v["GROUP_WORLD_SIZE"]) == (world, len(layout))
            assert (v["LOCAL_WORLD_SIZE"], v["ROLE_WORLD_SIZE"]) == (nproc, role_sizes[role])
            assert v["TORCHELASTIC_RESTART_COUNT"] == 0
        # contiguous global and role ranks, in local rank order
        assert [v["LOCAL_RANK"] for v in views] == list(range(nproc))
        assert len({v["RANK"] - v["LOCAL_RANK"] for v in views}) == 1
        assert len({v["ROLE_RANK"] - v["LOCAL_RANK"] for v in views}) == 1
        assert outcome.record is not None and outcome.record["run_id"] == job.run_id
        every += views
    assert sorted(by_group) == list(range(len(layout)))
    assert sorted(v["RANK"] for v in every) == list(range(world))  # each exactly once
    for role, size in role_sizes.items():
        assert sorted(v["ROLE_RANK"] for v in every if v["ROLE_NAME"] == role) == list(range(size))
    # torch's order: nodes by group rank, global ranks in that order, role ranks likewise
    for v in every:
        earlier = [by_group[g] for g in range(v["GROUP_RANK"])]
        assert v["RANK"] - v["LOCAL_RANK"] == sum(n for _, n in earlier)
        mine = v["ROLE_NAME"]
        assert v["ROLE_RANK"] - v["LOCAL_RANK"] == sum(n for r, n in earlier if r == mine)


# -- distributed sum ----------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["tcp", "etcd"])
@pytest.mark.parametrize("nprocs", [[4, 4], [1, 2, 3]], ids=["homogeneous", "heterogeneous"])
def test_distributed_sum(
    request: pytest.FixtureRequest, tmp_path: Path, backend: str, nprocs: list[int]
) -> None:
    world = sum(nprocs)
    with jobs(tmp_path) as make:
        job = make(backend=backend, nnodes=str(len(nprocs)), etcd=_etcd(request, backend))
        for nproc in nprocs:
            job.start("rank", nproc=nproc)
        outcomes = job.wait_all()
        _ok(outcomes)

    union: dict[int, int] = {}
    node_sizes = []
    for outcome in outcomes:
        values = outcome.values
        assert all(rank == value for rank, value in values.items())
        assert not set(values) & set(union)  # no rank comes back to two nodes
        ranks = sorted(values)
        assert ranks == list(range(ranks[0], ranks[0] + len(ranks)))  # one node's ranks
        node_sizes.append(len(ranks))
        union.update(values)
        assert outcome.record is not None and outcome.record["attempts"] == 1
    assert sorted(node_sizes) == sorted(nprocs)
    assert sorted(union) == list(range(world))
    assert sum(union.values()) == world * (world - 1) // 2


# -- fault tolerance and elasticity -------------------------------------------------------


@pytest.mark.parametrize("backend", ["tcp", "etcd"])
def test_killed_agent_is_replaced_and_the_job_succeeds(
    request: pytest.FixtureRequest, tmp_path: Path, backend: str
) -> None:
    with jobs(tmp_path) as make:
        job = make(
            backend=backend, nnodes="2", etcd=_etcd(request, backend), extra=["max_restarts=2"]
        )
        job.hold.touch()  # the first round's workers run until stopped
        args = [str(job.marks), str(job.hold)]
        for _ in range(2):
            job.start("held", args, nproc=2)
        wait_for(lambda: len(job.running(0)) == 2 and len(job.running(1)) == 2, timeout=60)
        first_round = {m["pid"] for m in job.marked()}
        job.procs[1].kill()
        job.hold.unlink()  # the next round's workers return at once
        replacement = job.start("held", args, nproc=2)
        survivor, replaced = job.wait(0), job.wait(replacement)
        killed = job.wait(1)

    assert killed.code == -signal.SIGKILL and killed.record is None
    _ok([survivor, replaced])
    union: dict[int, dict[str, Any]] = {}
    for outcome in (survivor, replaced):
        values = outcome.values
        assert len(values) == 2
        assert all(v["WORLD_SIZE"] == 4 and v["pid"] not in first_round for v in values.values())
        assert len({v["GROUP_RANK"] for v in values.values()}) == 1
        union.update(values)
    assert sorted(union) == [0, 1, 2, 3]
    # the survivor ran again with the replacement; a lost node spends no restart
    assert survivor.record is not None and survivor.record["attempts"] >= 2
    assert survivor.record["restart_count"] == 0


@pytest.mark.parametrize("backend", ["tcp", "etcd"])
def test_elastic_job_shrinks_to_the_surviving_agent(
    request: pytest.FixtureRequest, tmp_path: Path, backend: str
) -> None:
    with jobs(tmp_path) as make:
        # With etcd, a rendezvous wait shorter than etcd takes to answer a watch fails
        # the round as "cannot reach etcd" (EtcdStore.wait_for_change raises
        # StoreUnavailableError, not StoreTimeoutError, when its read timeout fires before
        # the watch stream starts): the last call's waits are kept long enough for a
        # loaded machine's etcd.
        last_call = ["rdzv.last_call_timeout=2"] if backend == "etcd" else []
        job = make(backend=backend, nnodes="1:2", etcd=_etcd(request, backend), extra=last_call)
        job.hold.touch()
        args = [str(job.marks), str(job.hold)]
        for _ in range(2):
            job.start("held", args, nproc=2)
        wait_for(
            lambda: (
                {m["WORLD_SIZE"] for m in job.running(0) + job.running(1)} == {4}
                and len(job.running(0)) == len(job.running(1)) == 2
            ),
            timeout=60,
        )
        job.hold.unlink()  # a round without the killed agent finishes at once
        job.procs[1].kill()
        survivor, killed = job.wait(0), job.wait(1)

    assert killed.code == -signal.SIGKILL and killed.record is None
    _ok([survivor])
    values = survivor.values
    assert sorted(values) == [0, 1]  # re-formed alone: group rank 0, its own ranks
    assert {(v["WORLD_SIZE"], v["GROUP_WORLD_SIZE"]) for v in values.values()} == {(2, 1)}
    assert survivor.record is not None and survivor.record["attempts"] >= 2
    assert survivor.record["restart_count"] == 0


# -- exit barrier -------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["tcp", "etcd"])
@pytest.mark.parametrize(
    ("drift", "barrier", "waits"),
    [(2.0, 4.0, True), (4.0, 0.0, False)],
    ids=["drift2-barrier4", "drift4-barrier0"],
)
def test_workers_drift_apart_and_the_barrier_never_fails_the_job(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    backend: str,
    drift: float,
    barrier: float,
    waits: bool,
) -> None:
    # rank 0 returns at once, rank 1 `drift` seconds after it (whichever agent has it)
    with jobs(tmp_path) as make:
        job = make(
            backend=backend,
            nnodes="2",
            etcd=_etcd(request, backend),
            extra=[f"rdzv.exit_barrier_timeout={barrier}"],
        )
        for _ in range(2):
            job.start("drift", [str(job.marks), drift], nproc=1)
        outcomes = job.wait_all()
        _ok(outcomes)

    by_rank = {rank: o for o in outcomes for rank in o.values}
    assert sorted(by_rank) == [0, 1]  # each agent returns its own worker's rank
    assert all(o.values == {rank: rank} for rank, o in by_rank.items())
    fast = by_rank[0].record
    assert fast is not None
    slow_done = json.loads((job.marks / "done.1").read_text())
    fast_dir = job.tmp_path / f"agent{outcomes.index(by_rank[0])}"
    fast_log = (fast_dir / "elastic-run.log").read_text()
    if waits:  # the fast node waited at the barrier until the slow one finished
        assert fast["ended"] > slow_done, (fast["ended"], slow_done)
        assert "exit barrier: not every node finished" not in fast_log
    else:
        # exit_barrier_timeout=0 means no wait: the fast node leaves the barrier at once
        # with a warning, and the job does not fail because of it
        assert "exit barrier: not every node finished" in fast_log
        if backend == "etcd":  # with tcp, the agent hosting the store stays for the other
            assert fast["ended"] < slow_done, (fast["ended"], slow_done)


@pytest.mark.parametrize("backend", ["tcp", "etcd"])
def test_no_exit_barrier_on_failure(
    request: pytest.FixtureRequest, tmp_path: Path, backend: str
) -> None:
    with jobs(tmp_path) as make:
        job = make(
            backend=backend,
            etcd=_etcd(request, backend),
            extra=["max_restarts=0", "rdzv.exit_barrier_timeout=300"],
        )
        for _ in range(2):  # rank 1 fails at once, rank 0 (on the other node) sleeps 20 s
            job.start("odd_fails", [str(job.marks), 20.0], nproc=1, raise_on_failure=True)
        outcomes = job.wait_all()

    for i, o in enumerate(outcomes):
        assert o.code == 1 and o.record is not None, f"agent {i}: {o.code}\n{o.log}"
        assert o.record["is_failed"] and o.record["exit_code"] == 1
        assert o.record["return_values"] == []
    # ChildFailedError's message: the root cause on rank 1's node, why it stopped on the other
    raised = sorted((o.record or {})["raised"] for o in outcomes)
    assert raised[0] == "rank 1: exit code 1: ValueError: rank 1 fails on purpose", raised
    assert raised[1].startswith("rendezvous failed: the job failed on another node"), raised
    ends = [(o.record or {})["ended"] for o in outcomes]
    assert max(ends) - min(ends) < 5, ends  # neither waited at a barrier for the other
    # far less than rank 0's 20 s sleep after rank 1 failed (rank 0 may have been stopped
    # before it even started to sleep)
    (failed,) = [m for m in job.marked() if m["RANK"] == 1]
    assert max(ends) - failed["t"] < 12, (ends, failed["t"])


# -- agents from multiprocessing ---------------------------------------------------------


def test_agents_from_multiprocessing_spawn(tmp_path: Path) -> None:
    from tests.workers.api_functions import spawned_agent

    ctx = multiprocessing.get_context("spawn")
    results: multiprocessing.Queue[tuple[str, dict[int, Any], int, str]] = ctx.Queue()
    run_id = f"api-mp-{uuid.uuid4().hex[:8]}"
    port = free_port()
    children = []
    try:
        for i, nproc in enumerate([2, 3]):
            overrides = [
                "rdzv=tcp",
                f"rdzv.endpoint=127.0.0.1:{port}",
                f"rdzv.is_host={'true' if i == 0 else 'false'}",
                f"rdzv.id={run_id}",
                "nnodes=2",
                f"job.nproc_per_node={nproc}",
                *TCP_FAST,
            ]
            child = ctx.Process(
                target=spawned_agent, args=(overrides, str(tmp_path / f"agent{i}"), results)
            )
            child.start()
            children.append(child)
        got = [results.get(timeout=60) for _ in children]
        for child in children:
            child.join(timeout=30)
        assert [child.exitcode for child in children] == [0, 0]
    finally:
        for child in children:
            if child.is_alive():
                child.kill()
                child.join()
    assert_nothing_survives({run_id}, within=15)

    by_dir = {run_dir: (values, code, rid) for run_dir, values, code, rid in got}
    assert sorted(by_dir) == [str(tmp_path / "agent0"), str(tmp_path / "agent1")]
    union: dict[int, Any] = {}
    for i, nproc in enumerate([2, 3]):
        values, code, rid = by_dir[str(tmp_path / f"agent{i}")]
        assert (code, rid) == (0, run_id)
        assert len(values) == nproc  # its own node's ranks only
        assert {v["LOCAL_WORLD_SIZE"] for v in values.values()} == {nproc}
        assert all(rank == v["RANK"] and v["WORLD_SIZE"] == 5 for rank, v in values.items())
        assert not set(values) & set(union)
        union.update(values)
    assert sorted(union) == list(range(5))
