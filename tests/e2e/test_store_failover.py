"""The built-in TCP store outlives the agent hosting it: killing that agent in a job of
three, the two others move the store to one of them, re-form and finish (real agents on
127.0.0.1); a job of two still fails clearly (a lone survivor cannot tell a dead host
from a cut link)."""

from __future__ import annotations

import time
from pathlib import Path

from elastic_runner.testing.runner import wait_for
from tests.conftest import ElasticRunner, probe_records
from tests.e2e.test_multinode import Job, _listening


def test_killing_the_store_host_the_others_move_the_store_and_finish(
    elastic_run: ElasticRunner, tmp_path: Path
) -> None:
    job = Job(elastic_run, tmp_path, "2:3")
    probe = ("--until-world", "2", "--after-world", "3", "--sleep", "1")
    host = job.start("rdzv.is_host=true", probe=probe)
    wait_for(lambda: _listening(job.port))
    others = [job.start("rdzv.is_host=false", probe=probe) for _ in range(2)]
    wait_for(lambda: len(probe_records(job.out)) == 3, timeout=60)
    host.kill()
    killed_at = time.time()
    host.communicate(timeout=10)
    results = [(p.communicate(timeout=60)[1], p.returncode) for p in others]
    job.agents.clear()
    assert [code for _, code in results] == [0, 0], results
    again = [r for r in probe_records(job.out).values() if r["env"]["WORLD_SIZE"] == "2"]
    assert len(again) == 2
    assert {r["env"]["TORCHELASTIC_RESTART_COUNT"] for r in again} == {"0"}  # no restart spent
    took = max(r["started"] for r in again) - killed_at
    # detection (rdzv.heartbeat_timeout=1.5 s), the move, the round's last call (0.5 s)
    assert took < 1.5 + 0.5 + 4.0, took
    logs = "".join(err for err, _ in results)
    assert logs.count("this node hosts the rendezvous store now") == 1
    assert f"the rendezvous store at 127.0.0.1:{job.port} is gone" in logs
    print(f"workers running again {took:.2f} s after the host's SIGKILL")
