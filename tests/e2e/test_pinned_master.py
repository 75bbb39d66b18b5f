"""``rdzv.master_port`` and ``rdzv.master_addr`` through ``elastic-run``: every worker of
the job gets the pinned MASTER_PORT (and MASTER_ADDR) as given, worker rank 0 can listen
there, a clash with the rendezvous store's port is one line (exit 2), and a pinned port in
use is still given, with a warning."""

from __future__ import annotations

import json
import socket
import uuid
from pathlib import Path

from tests.conftest import (
    TESTS,
    ElasticRunner,
    assert_nothing_survives,
    free_port,
    probe_job,
    probe_records,
)
from tests.e2e.test_multinode import FAST

BINDER = TESTS / "workers" / "master_port.py"


def test_local_gives_every_worker_the_pinned_port(
    elastic_run: ElasticRunner, probe_out: Path
) -> None:
    port = free_port()
    run = elastic_run(*probe_job(probe_out, nproc=3), f"rdzv.master_port={port}")
    assert run.returncode == 0, run.stderr
    envs = [rec["env"] for rec in probe_records(probe_out).values()]
    assert len(envs) == 3
    assert {(e["MASTER_ADDR"], e["MASTER_PORT"]) for e in envs} == {("127.0.0.1", str(port))}
    assert "rdzv.master_port" not in run.stderr  # free: no warning
    assert_nothing_survives({run.run_id})


def test_a_pinned_port_in_use_is_still_given_with_one_warning(
    elastic_run: ElasticRunner, probe_out: Path
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        run = elastic_run(*probe_job(probe_out, nproc=2), f"rdzv.master_port={port}")
    assert run.returncode == 0, run.stderr  # the probe does not bind it
    envs = [rec["env"] for rec in probe_records(probe_out).values()]
    assert {e["MASTER_PORT"] for e in envs} == {str(port)}  # never silently another
    [warning] = [line for line in run.stderr.splitlines() if "rdzv.master_port=" in line]
    assert f"WARNING: rdzv.master_port={port} is in use on this machine" in warning
    assert_nothing_survives({run.run_id})


def test_two_agents_on_tcp_give_all_workers_the_pinned_pair_and_rank_0_can_bind_it(
    elastic_run: ElasticRunner, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    store, master = free_port(), free_port()
    run_id = f"job-{uuid.uuid4().hex[:8]}"
    agents = [
        elastic_run.popen(
            f"job.entrypoint={BINDER}",
            f'job.args=["--out","{out}"]',
            "job.nproc_per_node=2",
            "nnodes=2",
            "rdzv=tcp",
            f"rdzv.endpoint=127.0.0.1:{store}",
            *FAST,
            f"rdzv.master_port={master}",
            "rdzv.master_addr=localhost",
            run_id=run_id,
        )[0]
        for _ in range(2)
    ]
    results = [(proc.wait(60), proc.communicate()[1]) for proc in agents]
    assert [code for code, _ in results] == [0, 0], results
    records = {path.stem: json.loads(path.read_text()) for path in out.glob("r*.json")}
    assert sorted(records) == ["r0", "r1", "r2", "r3"]
    pairs = {(r["env"]["MASTER_ADDR"], r["env"]["MASTER_PORT"]) for r in records.values()}
    assert pairs == {("localhost", str(master))}
    assert records["r0"]["reached"] == [1, 2, 3]  # every other worker connected to it
    assert_nothing_survives({run_id})


def test_master_port_on_the_stores_port_is_one_line_and_exit_2(
    elastic_run: ElasticRunner,
) -> None:
    port = free_port()
    for backend in (["rdzv=tcp"], ["rdzv=static", "rdzv.node_rank=0"]):
        run = elastic_run(
            "+job=hello",
            *backend,
            f"rdzv.endpoint=127.0.0.1:{port}",
            f"rdzv.master_port={port}",
        )
        assert run.returncode == 2, (run.stdout, run.stderr)
        assert run.stderr.strip().splitlines() == [
            f"elastic-run: error: rdzv.master_port={port}: the rendezvous store listens on "
            f"that port (rdzv.endpoint=127.0.0.1:{port}); the workers' store (torch's "
            "TCPStore on worker rank 0, at MASTER_PORT) needs another port"
        ]
        assert not list(run.run_dir.glob("attempt_*")), "no worker may start"
        assert_nothing_survives({run.run_id})


def test_a_master_port_out_of_range_is_one_line_and_exit_2(elastic_run: ElasticRunner) -> None:
    for value, allowed in (("0", "expected a port from 1 to 65535"), ("70000", "expected a")):
        run = elastic_run("+job=hello", f"rdzv.master_port={value}")
        assert run.returncode == 2, run.stderr
        [line] = run.stderr.strip().splitlines()
        assert line.startswith(f"elastic-run: error: rdzv.master_port={value}: {allowed}")
        assert_nothing_survives({run.run_id})
