"""``elastic_runner.launch`` with ``rdzv=static``: two callers, node ranks 0 and 1, one
job; each gets its own node's return values."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

from tests.conftest import assert_nothing_survives, free_port

AGENT = textwrap.dedent(
    """
    import json, os, sys, elastic_runner

    def ranks():
        return {k: os.environ[k] for k in ("RANK", "GROUP_RANK", "WORLD_SIZE", "MASTER_PORT")}

    run_dir, node_rank, port, run_id = sys.argv[1:]
    result = elastic_runner.launch(
        ranks,
        overrides=[
            "rdzv=static", f"rdzv.endpoint=127.0.0.1:{port}", f"rdzv.node_rank={node_rank}",
            f"rdzv.id={run_id}", "nnodes=2", "job.nproc_per_node=2", "logs.tee=false",
        ],
        run_dir=run_dir,
    )
    print(json.dumps(result.return_values))
    """
)


def test_two_static_nodes(tmp_path: Path) -> None:
    port, run_id = free_port(), f"static-{uuid.uuid4().hex[:8]}"
    agents = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                AGENT,
                str(tmp_path / f"node{rank}"),
                str(rank),
                str(port),
                run_id,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in (1, 0)
    ]
    try:
        outputs = [agent.communicate(timeout=60) for agent in agents]
    finally:
        for agent in agents:
            agent.kill()
            agent.wait()
    for agent, (_, err) in zip(agents, outputs, strict=True):
        assert agent.returncode == 0, err
    node1, node0 = (json.loads(out.strip().splitlines()[-1]) for out, _ in outputs)
    assert sorted(node0) == ["0", "1"] and sorted(node1) == ["2", "3"]
    every = {**node0, **node1}
    assert {v["WORLD_SIZE"] for v in every.values()} == {"4"}
    assert all(v["RANK"] == k for k, v in every.items())
    assert {v["GROUP_RANK"] for v in node1.values()} == {"1"}
    assert len({v["MASTER_PORT"] for v in every.values()}) == 1
    assert_nothing_survives({run_id}, within=5)
