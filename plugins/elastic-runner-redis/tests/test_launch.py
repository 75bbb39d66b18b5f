"""``elastic_runner.launch`` with the plugin's backend: a function's return values come
back over a rendezvous on a real Redis, and the calling process keeps nothing."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

from elastic_runner_redis.testing import RedisServer

import elastic_runner
from elastic_runner.testing.caller import CallerState


def _rank() -> tuple[int, str]:
    return int(os.environ["RANK"]), os.environ["TORCHELASTIC_RUN_ID"]


def test_launch_a_function_over_redis(redis_server: RedisServer, tmp_path: Path) -> None:
    run_id = f"redis-{uuid.uuid4().hex[:8]}"
    before = CallerState.now()
    result = elastic_runner.launch(
        _rank,
        overrides=[
            "rdzv=redis",
            f"rdzv.endpoint={redis_server.endpoint}",
            f"rdzv.id={run_id}",
            "nnodes=1",
            "job.nproc_per_node=2",
        ],
        run_dir=tmp_path / "run",
    )
    CallerState.now().assert_same_as(before)
    assert result.return_values == {0: (0, run_id), 1: (1, run_id)}
