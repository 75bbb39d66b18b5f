"""``elastic-run rdzv=redis`` end to end: two agents form one job on a real Redis."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

from elastic_runner_redis import RedisStore
from elastic_runner_redis.testing import RedisServer

from elastic_runner.testing.runner import ElasticRunner

WORKER = Path(__file__).parent / "workers" / "env_dump.py"


def test_two_agents_form_one_job(
    elastic_run: ElasticRunner, redis_server: RedisServer, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    run_id = f"redis-{uuid.uuid4().hex[:8]}"
    overrides = [
        "rdzv=redis",
        f"rdzv.endpoint={redis_server.endpoint}",
        "nnodes=2",
        "job.nproc_per_node=2",
        f"job.entrypoint={WORKER}",
        f'job.args=["{out}"]',
        "rdzv.heartbeat_interval=0.5",
        "rdzv.heartbeat_timeout=3",
    ]
    agents = [elastic_run.popen(*overrides, run_id=run_id)[0] for _ in range(2)]
    for agent in agents:
        _, err = agent.communicate(timeout=60)
        assert agent.returncode == 0, err
    records = [json.loads((out / f"{rank}.json").read_text()) for rank in range(4)]
    assert {r["WORLD_SIZE"] for r in records} == {"4"}
    assert sorted(r["GROUP_RANK"] for r in records) == ["0", "0", "1", "1"]
    assert {r["TORCHELASTIC_RUN_ID"] for r in records} == {run_id}
    assert len({(r["MASTER_ADDR"], r["MASTER_PORT"]) for r in records}) == 1
    # the last node to leave removed the job's keys
    store = RedisStore("127.0.0.1", redis_server.port)
    assert store.scan("")[0] == {}


def test_unreachable_redis_is_one_line_and_exit_1(elastic_run: ElasticRunner) -> None:
    run = elastic_run(
        "+job=hello",
        "rdzv=redis",
        "rdzv.endpoint=127.0.0.1:1",
        "rdzv.join_timeout=2",
        "rdzv.request_timeout=1",
        timeout=60,
    )
    assert run.returncode == 1, run.stderr
    assert "127.0.0.1:1" in run.stderr.strip().splitlines()[-1]
    assert "Traceback" not in run.stderr
