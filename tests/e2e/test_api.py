"""The single-agent scenarios of torch's ``local_elastic_agent_test.py``, through
:func:`elastic_runner.launch`, on each rendezvous backend: the local one, the built-in
TCP store and etcd (single node: ``nnodes=1``). Every test also checks that the calling
process is left as it was and that no worker of the run survives it."""

from __future__ import annotations

import atexit
import gc
import json
import os
import signal
import sys
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from elastic_runner import ChildFailedError, launch
from elastic_runner.spec import RunResult, WorkerState
from elastic_runner.testing.caller import CallerState
from elastic_runner.testing.etcd import EtcdServer
from elastic_runner.workers.environment import CONTRACT_VARIABLES
from tests.conftest import assert_nothing_survives, by_value, free_port
from tests.e2e.test_etcd import ETCD_FAST
from tests.e2e.test_multinode import FAST as TCP_FAST

# What the workers run.


@by_value
def happy() -> None:
    """torch's ``_happy_function``."""


@by_value
def echo(value: Any) -> Any:
    return value


@by_value
def rank_and_world() -> tuple[int, int, str]:
    return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), os.environ["ROLE_NAME"]


@by_value
def sad() -> None:
    raise RuntimeError(f"sad rank {os.environ['RANK']}")


@by_value
def first_fails_last_exits(exit_takes: float) -> None:
    """Rank 1 raises first, but its exit is slow (an atexit handler: a process group or
    threads to tear down); rank 0 raises once rank 1 has recorded its error, and exits."""
    rank = int(os.environ["RANK"])
    if rank == 1:
        atexit.register(time.sleep, exit_takes)
        raise RuntimeError("rank 1 failed first")
    other = Path(os.environ["TORCHELASTIC_ERROR_FILE"]).parent.parent / "1" / "error.json"
    while not other.exists():  # a file of another process: nothing to await
        time.sleep(0.01)
    raise RuntimeError("rank 0 failed second")


@by_value
def bipolar() -> None:
    if int(os.environ["RANK"]) % 2:
        raise ValueError(f"odd rank {os.environ['RANK']}")


@by_value
def environment() -> dict[str, str]:
    return dict(os.environ)


@by_value
def die_once() -> tuple[int, str]:
    """Rank 1 is killed by SIGKILL on the first attempt; every rank returns from the
    second one."""
    rank = int(os.environ["RANK"])
    if rank == 1 and os.environ["TORCHELASTIC_RESTART_COUNT"] == "0":
        os.kill(os.getpid(), signal.SIGKILL)
    return rank, os.environ["TORCHELASTIC_RESTART_COUNT"]


# Each test runs on every backend.


@pytest.fixture(params=["local", "tcp", "etcd"])
def rdzv(request: pytest.FixtureRequest) -> list[str]:
    """The overrides of one single-node rendezvous on this backend."""
    job = f"api-{uuid.uuid4().hex[:8]}"
    if request.param == "local":
        return ["rdzv=local"]
    if request.param == "tcp":
        endpoint = f"127.0.0.1:{free_port()}"
        return ["rdzv=tcp", f"rdzv.endpoint={endpoint}", f"rdzv.id={job}", "nnodes=1", *TCP_FAST]
    etcd: EtcdServer = request.getfixturevalue("etcd_server")
    return ["rdzv=etcd", f"rdzv.endpoint={etcd.endpoint}", f"rdzv.id={job}", "nnodes=1", *ETCD_FAST]


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    return tmp_path / "run"


def checked_launch(
    entrypoint: Callable[..., Any] | str | os.PathLike[str] | None,
    args: Sequence[Any] = (),
    overrides: Sequence[str] = (),
    *,
    run_dir: Path,
    env: Mapping[str, str | None] | None = None,
    module: str | None = None,
    raise_on_failure: bool = True,
) -> RunResult:
    """:func:`launch`, then check that it left nothing behind: the caller's state is as
    before and no process of the run is alive (whether it returned or raised)."""
    before = CallerState.now()
    run_ids: set[str] = set()
    try:
        result = launch(
            entrypoint,
            args,
            overrides,
            module=module,
            run_dir=run_dir,
            env=env,
            raise_on_failure=raise_on_failure,
        )
        run_ids.add(result.run_id)
        return result
    except ChildFailedError as exc:
        run_ids.add(exc.result.run_id)
        raise
    finally:
        CallerState.now().assert_same_as(before)
        assert_nothing_survives(run_ids, within=10)


def test_function_without_return_value(rdzv: list[str], run_dir: Path) -> None:
    result = checked_launch(happy, (), ["job.nproc_per_node=2", *rdzv], run_dir=run_dir)
    assert not result.is_failed()
    assert result.state == WorkerState.SUCCEEDED
    assert result.return_values == {0: None, 1: None}
    assert (result.attempts, result.restart_count, result.exit_code) == (1, 0, 0)
    given = [o.removeprefix("rdzv.id=") for o in rdzv if o.startswith("rdzv.id=")]
    if given:  # the job's id is the rendezvous id (a fresh one for the local backend)
        assert result.run_id == given[0]
    assert result.run_dir == run_dir


def test_function_with_return_value(rdzv: list[str], run_dir: Path) -> None:
    result = checked_launch(echo, ("foo",), ["job.nproc_per_node=2", *rdzv], run_dir=run_dir)
    assert result.return_values == {0: "foo", 1: "foo"}


def test_return_values_by_global_rank(rdzv: list[str], run_dir: Path) -> None:
    overrides = ["job.nproc_per_node=3", "job.role=trainer", *rdzv]
    result = checked_launch(rank_and_world, (), overrides, run_dir=run_dir)
    assert result.return_values == {r: (r, 3, "trainer") for r in range(3)}


def test_function_that_raises(rdzv: list[str], run_dir: Path) -> None:
    with pytest.raises(ChildFailedError) as info:
        checked_launch(sad, (), ["job.nproc_per_node=2", *rdzv], run_dir=run_dir)
    error = info.value
    rank, failure = error.get_first_failure()
    assert rank == failure.rank
    assert failure.rank in {0, 1}
    assert failure.local_rank in {0, 1}
    if failure.exit.stopped_by_agent:
        # it raised first, but the other rank exited first and the agent stopped this one
        # while it was exiting: test_root_cause_stopped_while_it_exits shows it
        assert failure.exitcode == -signal.SIGTERM
    else:
        assert failure.exitcode == 1
        assert str(error).startswith(f"rank {rank}: exit code 1: RuntimeError: sad rank {rank}")
    assert failure.message is not None
    assert f"RuntimeError: sad rank {rank}" in failure.message
    assert str(error).endswith(f": RuntimeError: sad rank {rank}")
    assert failure.traceback is not None and "sad rank" in failure.traceback
    assert failure.pid > 0
    assert "\n" not in str(error)
    assert error.result.root_cause is failure
    assert error.result.is_failed() and error.result.exit_code == 1
    assert error.result.return_values == {}  # only for a run that succeeded, as in torch
    assert set(error.failures) <= {0, 1} and error.failures[rank] is failure
    # the failure's time is the worker's own, from its error file
    assert failure.error_file is not None
    with open(failure.error_file) as f:
        recorded = json.load(f)["message"]
    assert isinstance(failure.timestamp, float)
    assert failure.timestamp == float(recorded["extraInfo"]["timestamp_precise"])
    assert f"sad rank {rank}" in recorded["message"]
    for other in error.result.failures[1:]:  # root cause first: the earliest one
        assert other.timestamp >= failure.timestamp


def test_bipolar_function_uses_up_its_restarts(rdzv: list[str], run_dir: Path) -> None:
    overrides = ["job.nproc_per_node=2", "max_restarts=2", *rdzv]
    result = checked_launch(bipolar, (), overrides, run_dir=run_dir, raise_on_failure=False)
    assert result.is_failed()
    assert result.state == WorkerState.FAILED
    assert (result.attempts, result.restart_count, result.exit_code) == (3, 2, 1)
    assert result.root_cause is not None
    assert result.root_cause.rank == 1
    assert result.root_cause.message == "ValueError: odd rank 1"
    assert result.return_values == {}
    assert result.started_at > 0


def _worker_env(
    rdzv: list[str], run_dir: Path, *overrides: str, env: Mapping[str, str | None] | None = None
) -> list[dict[str, str]]:
    """Each worker's environment (2 workers), by rank."""
    result = checked_launch(
        environment, (), ["job.nproc_per_node=2", *rdzv, *overrides], run_dir=run_dir, env=env
    )
    assert sorted(result.return_values) == [0, 1]
    envs: list[dict[str, str]] = [result.return_values[0], result.return_values[1]]
    for rank, worker in enumerate(envs):
        assert worker["RANK"] == str(rank)
        assert worker["TORCHELASTIC_RUN_ID"] == result.run_id
    return envs


def test_worker_environment_contract(rdzv: list[str], run_dir: Path) -> None:
    envs = _worker_env(rdzv, run_dir, "job.role=trainer", "max_restarts=1")
    for rank, worker in enumerate(envs):
        missing = [key for key in CONTRACT_VARIABLES if key not in worker]
        assert not missing, f"rank {rank} lacks {missing}"
        assert worker["LOCAL_RANK"] == worker["ROLE_RANK"] == str(rank)
        assert worker["WORLD_SIZE"] == worker["LOCAL_WORLD_SIZE"] == "2"
        assert worker["ROLE_WORLD_SIZE"] == "2"
        assert (worker["GROUP_RANK"], worker["GROUP_WORLD_SIZE"]) == ("0", "1")
        assert worker["ROLE_NAME"] == "trainer"
        assert worker["TORCHELASTIC_RESTART_COUNT"] == "0"
        assert worker["TORCHELASTIC_MAX_RESTARTS"] == "1"
        assert worker["TORCHELASTIC_USE_AGENT_STORE"] in {"True", "False"}
        assert 0 < int(worker["MASTER_PORT"]) < 65536
        assert Path(worker["TORCHELASTIC_ERROR_FILE"]).is_relative_to(run_dir)
    # one job: the same master for every worker, each its own error file
    assert envs[0]["MASTER_ADDR"] == envs[1]["MASTER_ADDR"]
    assert envs[0]["MASTER_PORT"] == envs[1]["MASTER_PORT"]
    assert envs[0]["TORCHELASTIC_ERROR_FILE"] != envs[1]["TORCHELASTIC_ERROR_FILE"]


def test_nccl_async_error_handling_defaults_to_1(
    rdzv: list[str], run_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("TORCH_NCCL_ASYNC_ERROR_HANDLING", raising=False)
    envs = _worker_env(rdzv, run_dir)
    assert [e["TORCH_NCCL_ASYNC_ERROR_HANDLING"] for e in envs] == ["1", "1"]


def test_nccl_async_error_handling_given_passes_through(rdzv: list[str], run_dir: Path) -> None:
    envs = _worker_env(rdzv, run_dir, env={"TORCH_NCCL_ASYNC_ERROR_HANDLING": "0"})
    assert [e["TORCH_NCCL_ASYNC_ERROR_HANDLING"] for e in envs] == ["0", "0"]


def test_master_addr_and_port_override(rdzv: list[str], run_dir: Path) -> None:
    port = free_port()
    envs = _worker_env(rdzv, run_dir, "rdzv.master_addr=127.0.0.1", f"rdzv.master_port={port}")
    assert [(e["MASTER_ADDR"], e["MASTER_PORT"]) for e in envs] == [("127.0.0.1", str(port))] * 2


def test_timer_file_with_the_file_timer(
    rdzv: list[str], run_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("TORCHELASTIC_TIMER_FILE", raising=False)
    envs = _worker_env(rdzv, run_dir, "timer=file", "max_restarts=2")
    paths = {e.get("TORCHELASTIC_TIMER_FILE") for e in envs}
    assert len(paths) == 1 and None not in paths  # one timer server for the node
    assert "TORCHELASTIC_TIMER_FILE" not in os.environ


def test_no_timer_file_without_a_timer(
    rdzv: list[str], run_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("TORCHELASTIC_TIMER_FILE", raising=False)
    envs = _worker_env(rdzv, run_dir)
    assert [e for e in envs if "TORCHELASTIC_TIMER_FILE" in e] == []


def test_health_check_port_with_a_health_endpoint(
    rdzv: list[str], run_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("TORCHELASTIC_HEALTH_CHECK_PORT", raising=False)
    port = free_port()
    envs = _worker_env(rdzv, run_dir, f"health.port={port}")
    assert [e.get("TORCHELASTIC_HEALTH_CHECK_PORT") for e in envs] == [str(port)] * 2
    assert "TORCHELASTIC_HEALTH_CHECK_PORT" not in os.environ


def test_no_health_check_port_without_one(
    rdzv: list[str], run_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("TORCHELASTIC_HEALTH_CHECK_PORT", raising=False)
    envs = _worker_env(rdzv, run_dir)
    assert [e for e in envs if "TORCHELASTIC_HEALTH_CHECK_PORT" in e] == []


def test_rank_restarted_after_it_was_killed(rdzv: list[str], run_dir: Path) -> None:
    overrides = ["job.nproc_per_node=2", "max_restarts=3", *rdzv]
    result = checked_launch(die_once, (), overrides, run_dir=run_dir)
    assert result.state == WorkerState.SUCCEEDED
    assert (result.attempts, result.restart_count, result.exit_code) == (2, 1, 0)
    assert result.failures == []
    assert result.return_values == {0: (0, "1"), 1: (1, "1")}  # the final attempt's


SCRIPT = """\
import os, sys
expected = {expected!r}
if sys.argv[1:] != expected:
    sys.exit(f"{{sys.argv[1:]}} != {{expected}}")
open(os.path.join({out!r}, os.environ["RANK"]), "w").write(os.environ["WORLD_SIZE"])
"""


def test_script_entrypoint(rdzv: list[str], run_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    script = tmp_path / "train.py"
    script.write_text(SCRIPT.format(expected=["--lr", "0.5", "a b", "7"], out=str(out)))
    overrides = ["job.nproc_per_node=2", *rdzv]
    result = checked_launch(script, ["--lr", "0.5", "a b", 7], overrides, run_dir=run_dir)
    assert result.return_values == {0: None, 1: None}
    assert sorted(p.name for p in out.iterdir()) == ["0", "1"]
    assert {p.read_text() for p in out.iterdir()} == {"2"}


def test_script_entrypoint_that_fails(rdzv: list[str], run_dir: Path, tmp_path: Path) -> None:
    script = tmp_path / "train.py"
    script.write_text("import os, sys\nsys.exit(3 if os.environ['RANK'] == '1' else 0)\n")
    with pytest.raises(ChildFailedError) as info:
        checked_launch(script, (), ["job.nproc_per_node=2", *rdzv], run_dir=run_dir)
    rank, failure = info.value.get_first_failure()
    assert (rank, failure.local_rank, failure.exitcode) == (1, 1, 3)
    assert str(info.value).startswith("rank 1: exit code 3")


def test_module_entrypoint(rdzv: list[str], run_dir: Path, tmp_path: Path) -> None:
    package = tmp_path / "src" / "mytrainer"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    out = tmp_path / "out"
    out.mkdir()
    (package / "train.py").write_text(SCRIPT.format(expected=["x"], out=str(out)))
    result = checked_launch(
        None,
        ["x"],
        ["job.nproc_per_node=2", *rdzv],
        module="mytrainer.train",
        run_dir=run_dir,
        env={"PYTHONPATH": str(tmp_path / "src")},
    )
    assert result.return_values == {0: None, 1: None}
    assert sorted(p.name for p in out.iterdir()) == ["0", "1"]
    assert "mytrainer" not in sys.modules  # ran in the workers only


def test_etcd_watch_leaves_no_socket(etcd_server: EtcdServer, run_dir: Path) -> None:
    """The promise of :func:`launch`: no descriptor left, without help from the garbage
    collector (the watches of a rendezvous over etcd close their streams)."""
    overrides = [
        "rdzv=etcd",
        f"rdzv.endpoint={etcd_server.endpoint}",
        f"rdzv.id=api-{uuid.uuid4().hex[:8]}",
        "nnodes=1",
    ]
    gc.disable()
    try:
        before = CallerState.now()
        result = launch(
            happy, (), ["job.nproc_per_node=2", *overrides, *ETCD_FAST], run_dir=run_dir
        )
        after = CallerState.now()
    finally:
        gc.enable()
        gc.collect()  # closes them
    assert_nothing_survives({result.run_id})
    opened = {fd: what for fd, what in after.fds.items() if before.fds.get(fd) != what}
    assert opened == {}, "left open when launch returned"


def test_root_cause_still_exiting_keeps_its_exit_code(run_dir: Path) -> None:
    """The first rank to fail is the root cause (its error file's time is the earliest)
    even when another rank exits first; the agent lets it finish exiting before it stops
    the group, so its exit code is its own (1), as torch's test of a raising function
    expects, not the agent's SIGTERM."""
    with pytest.raises(ChildFailedError) as info:
        checked_launch(first_fails_last_exits, (0.3,), ["job.nproc_per_node=2"], run_dir=run_dir)
    rank, failure = info.value.get_first_failure()
    assert failure.message == "RuntimeError: rank 1 failed first"
    assert (rank, failure.exitcode) == (1, 1)
    assert not failure.exit.stopped_by_agent


def test_root_cause_that_will_not_exit_is_stopped(run_dir: Path) -> None:
    """A root cause that takes longer than the grace to exit is stopped with the others,
    and still reported as the root cause, with what the stop did to it."""
    started = time.monotonic()
    with pytest.raises(ChildFailedError) as info:
        checked_launch(
            first_fails_last_exits,
            (60,),
            ["job.nproc_per_node=2", "stop_timeout=5"],
            run_dir=run_dir,
        )
    assert time.monotonic() - started < 30
    rank, failure = info.value.get_first_failure()
    assert failure.message == "RuntimeError: rank 1 failed first"
    assert (rank, failure.exitcode) == (1, -signal.SIGTERM)
    assert "stopped by the agent after it had failed" in str(info.value)
