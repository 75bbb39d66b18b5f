"""torch's gloo across hosts in network namespaces: a job whose head maps its own name
to 127.0.1.1 (Debian's /etc/hosts) still forms, and an all_reduce over the three hosts
gives the right sum."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from elastic_runner.testing.netns import Cluster
from tests.conftest import ElasticRunner, assert_nothing_survives
from tests.e2e.test_hosts import FAST, PORT, HostJob

pytest.importorskip("torch")
pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def test_gloo_all_reduce_across_three_namespaced_hosts(
    elastic_run: ElasticRunner, netns_cluster: Callable[..., Cluster], tmp_path: Path
) -> None:
    cluster = netns_cluster(3)
    cluster.set_hosts_entry("host0", "host0", "127.0.1.1")
    out = tmp_path / "ar"
    out.mkdir()
    job = HostJob(
        elastic_run, cluster, tmp_path, "3", rdzv=["rdzv=tcp", f"rdzv.endpoint=host0:{PORT}", *FAST]
    )
    for host in cluster:
        # gloo binds the address its host name resolves to: 127.0.1.1 on host0, where
        # nobody else could reach it; elastic-run gives host0's workers GLOO_SOCKET_IFNAME
        argv, run_dir, _ = elastic_run.command(
            f"job.entrypoint={ROOT / 'examples/allreduce/allreduce.py'}",
            f"job.args=[--out,{out}]",
            "job.nproc_per_node=2",
            *job.rdzv,
            "nnodes=3",
            run_id=job.run_id,
        )
        job.agents[host.name] = host.popen(argv, stdout=-1, stderr=-1, text=True)
        job.run_dirs[host.name] = run_dir
    results = job.finish(timeout=180)
    assert all(code == 0 for code, _ in results.values()), results
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(6)]
    assert [r["sum"] for r in ranks] == [15] * 6
    assert [r["world_size"] for r in ranks] == [6] * 6
    assert_nothing_survives({job.run_id})
