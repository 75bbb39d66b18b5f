"""The worker environment contract as a pure function."""

from __future__ import annotations

from elastic_runner.spec import WorkerGroup, WorkerSpec
from elastic_runner.workers.environment import worker_environment


def _group(nproc: int, env: dict[str, str] | None = None) -> WorkerGroup:
    group = WorkerGroup.for_spec(WorkerSpec("r", nproc, ("x",), env=env or {}, max_restarts=4))
    group.group_rank, group.group_world_size = 1, 2
    group.master_addr, group.master_port, group.restart_count = "h", 1234, 2
    for w in group.workers:
        w.global_rank, w.role_rank = 10 + w.local_rank, 5 + w.local_rank
        w.world_size, w.role_world_size = 20, 8
    return group


def test_contract_values_and_string_forms() -> None:
    g = _group(2)
    env = worker_environment(
        g, g.workers[1], run_id="rid", base_env={"KEEP": "1", "RANK": "x"}, error_file="/e.json"
    )
    assert env == {
        "KEEP": "1",
        "RANK": "11",
        "LOCAL_RANK": "1",
        "GROUP_RANK": "1",
        "ROLE_RANK": "6",
        "ROLE_NAME": "r",
        "LOCAL_WORLD_SIZE": "2",
        "WORLD_SIZE": "20",
        "GROUP_WORLD_SIZE": "2",
        "ROLE_WORLD_SIZE": "8",
        "MASTER_ADDR": "h",
        "MASTER_PORT": "1234",
        "TORCHELASTIC_RESTART_COUNT": "2",
        "TORCHELASTIC_MAX_RESTARTS": "4",
        "TORCHELASTIC_RUN_ID": "rid",
        "TORCHELASTIC_USE_AGENT_STORE": "False",
        "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1",
        "TORCHELASTIC_ERROR_FILE": "/e.json",
        "OMP_NUM_THREADS": "1",
    }


def test_omp_only_defaulted_for_several_workers_and_never_overridden() -> None:
    g1 = _group(1)
    assert "OMP_NUM_THREADS" not in worker_environment(
        g1, g1.workers[0], run_id="r", base_env={}, error_file=""
    )
    g2 = _group(2, env={"OMP_NUM_THREADS": "4"})
    assert (
        worker_environment(g2, g2.workers[0], run_id="r", base_env={}, error_file="")[
            "OMP_NUM_THREADS"
        ]
        == "4"
    )


def test_job_env_cannot_override_the_contract() -> None:
    g = _group(1, env={"WORLD_SIZE": "999", "EXTRA": "y"})
    env = worker_environment(g, g.workers[0], run_id="r", base_env={}, error_file="")
    assert env["WORLD_SIZE"] == "20" and env["EXTRA"] == "y"
