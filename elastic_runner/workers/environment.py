"""The worker environment: exactly the variables (and string forms) torchrun gives.

A script written for ``torchrun`` reads these and must run unchanged; see the table in
the README. Everything not set here is inherited from the agent.
"""

from __future__ import annotations

from collections.abc import Mapping

from elastic_runner.spec import Worker, WorkerGroup

__all__ = ["CONTRACT_VARIABLES", "worker_environment"]

#: Every variable of the contract: what torch's agent gives every worker (and what its
#: own test of the worker environment checks), always set by :func:`worker_environment`.
CONTRACT_VARIABLES = (
    "RANK",
    "LOCAL_RANK",
    "GROUP_RANK",
    "ROLE_RANK",
    "ROLE_NAME",
    "LOCAL_WORLD_SIZE",
    "WORLD_SIZE",
    "GROUP_WORLD_SIZE",
    "ROLE_WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
    "TORCHELASTIC_RESTART_COUNT",
    "TORCHELASTIC_MAX_RESTARTS",
    "TORCHELASTIC_RUN_ID",
    "TORCHELASTIC_USE_AGENT_STORE",
    "TORCH_NCCL_ASYNC_ERROR_HANDLING",
    "TORCHELASTIC_ERROR_FILE",
)


def worker_environment(
    group: WorkerGroup,
    worker: Worker,
    *,
    run_id: str,
    base_env: Mapping[str, str],
    error_file: str,
) -> dict[str, str]:
    """The full environment of ``worker``: ``base_env`` (the agent's environment), then the
    job's extra ``spec.env``, then the contract variables, which always win."""
    spec = group.spec
    env = dict(base_env)
    env.update(spec.env)
    if spec.local_world_size > 1 and "OMP_NUM_THREADS" not in env:
        # torchrun's default; without it optimizers can run many times slower.
        env["OMP_NUM_THREADS"] = "1"
    env.update(
        {
            "RANK": str(worker.global_rank),
            "LOCAL_RANK": str(worker.local_rank),
            "GROUP_RANK": str(group.group_rank),
            "ROLE_RANK": str(worker.role_rank),
            "ROLE_NAME": spec.role,
            "LOCAL_WORLD_SIZE": str(spec.local_world_size),
            "WORLD_SIZE": str(worker.world_size),
            "GROUP_WORLD_SIZE": str(group.group_world_size),
            "ROLE_WORLD_SIZE": str(worker.role_world_size),
            "MASTER_ADDR": str(group.master_addr),
            "MASTER_PORT": str(group.master_port),
            "TORCHELASTIC_RESTART_COUNT": str(group.restart_count),
            "TORCHELASTIC_MAX_RESTARTS": str(spec.max_restarts),
            "TORCHELASTIC_RUN_ID": run_id,
            # Worker rank 0 hosts torch's TCPStore at MASTER_ADDR:MASTER_PORT.
            "TORCHELASTIC_USE_AGENT_STORE": "False",
            "TORCH_NCCL_ASYNC_ERROR_HANDLING": base_env.get("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1"),
            "TORCHELASTIC_ERROR_FILE": error_file,
        }
    )
    return env
