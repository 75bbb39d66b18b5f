"""Agents forming jobs over a real etcd (v3 API), and etcd's faults."""

from __future__ import annotations

import os
import time
import urllib.request
from pathlib import Path

import pytest

from elastic_runner.rendezvous.etcd_store import EtcdStore
from elastic_runner.rendezvous.kit import parse_endpoints
from elastic_runner.testing.etcd import EtcdServer
from elastic_runner.testing.runner import wait_for
from tests.conftest import ElasticRunner, free_port, probe_records
from tests.e2e.test_multinode import Job

ETCD_FAST = [
    "rdzv.heartbeat_interval=0.5",
    "rdzv.heartbeat_timeout=3",
    "rdzv.join_timeout=30",
    "rdzv.last_call_timeout=0.5",
]


def _job(
    elastic_run: ElasticRunner, tmp_path: Path, etcd: EtcdServer, nnodes: str, *more: str
) -> Job:
    return Job(
        elastic_run,
        tmp_path,
        nnodes,
        rdzv=["rdzv=etcd", f"rdzv.endpoint={etcd.endpoint}", *ETCD_FAST, *more],
    )


def _job_keys(etcd: EtcdServer, run_id: str) -> dict[str, str]:
    store = EtcdStore(parse_endpoints(etcd.endpoint, 2379))
    try:
        return store.scan(f"rdzv/{run_id}/")[0]
    finally:
        store.close()


@pytest.mark.parametrize(
    ("agents", "api", "over"),
    [
        (2, "http", "its JSON gateway"),
        (3, "http", "its JSON gateway"),
        (2, "grpc", "gRPC (rdzv.api=grpc)"),
    ],
)
def test_agents_form_a_job_over_etcd_and_clean_up(
    elastic_run: ElasticRunner,
    tmp_path: Path,
    etcd_server: EtcdServer,
    agents: int,
    api: str,
    over: str,
) -> None:
    job = _job(elastic_run, tmp_path, etcd_server, str(agents), f"rdzv.api={api}")
    for _ in range(agents):
        job.start(nproc=2)
    results = job.finish()
    assert [code for code, _ in results] == [0] * agents, results
    assert all(f"etcd at {etcd_server.endpoint}, over {over}" in err for _, err in results)
    # grpcio said nothing as the agents forked their workers (it did, once per worker)
    assert not any("fork() handlers" in err for _, err in results), results
    assert job.rendezvous_counts() == [1] * agents
    envs = [rec["env"] for rec in probe_records(job.out).values()]
    assert sorted(int(e["RANK"]) for e in envs) == list(range(2 * agents))
    assert {e["WORLD_SIZE"] for e in envs} == {str(2 * agents)}
    assert not any("GRPC_ENABLE_FORK_SUPPORT" in e for e in envs)  # the agents' own setting
    assert _job_keys(etcd_server, job.run_id) == {}  # the last node out removed them


def test_scale_up_and_down_over_etcd(
    elastic_run: ElasticRunner, tmp_path: Path, etcd_server: EtcdServer
) -> None:
    job = _job(elastic_run, tmp_path, etcd_server, "1:2")
    job.start(nproc=1, probe=("--until-world", "2"))
    wait_for(lambda: list(job.out.glob("*_w1.json")))
    job.start(nproc=1, probe=("--until-world", "2"))  # scale up 1 -> 2
    results = job.finish()
    assert [code for code, _ in results] == [0, 0], results
    assert len(list(job.out.glob("*_w2.json"))) == 2

    job = _job(elastic_run, tmp_path / "down", etcd_server, "1:2")
    shrink = ("--until-world", "1", "--after-world", "2")
    agents = [job.start(nproc=1, probe=shrink) for _ in range(2)]
    wait_for(lambda: len(list(job.out.glob("*_w2.json"))) == 2)
    t0 = time.monotonic()
    agents[0].kill()  # scale down 2 -> 1: its lease expires
    _, err = agents[1].communicate(timeout=30)
    assert agents[1].returncode == 0, err
    assert time.monotonic() - t0 < 3 + 5  # heartbeat_timeout plus a few seconds
    agents[0].communicate(timeout=10)
    job.agents.clear()


def test_etcd_restart_does_not_restart_workers(
    elastic_run: ElasticRunner, tmp_path: Path, etcd_server: EtcdServer
) -> None:
    job = _job(elastic_run, tmp_path, etcd_server, "2")
    # The lease (heartbeat_timeout less one interval, from the last refresh) must outlast
    # the outage: etcd down for a second, then a second or two to start and answer.
    job.rdzv = [*job.rdzv, "rdzv.heartbeat_timeout=6"]
    for _ in range(2):
        job.start(nproc=1, probe=("--sleep", "4"))
    wait_for(lambda: len(probe_records(job.out)) == 2)
    etcd_server.kill()
    time.sleep(1)  # etcd down for a second, well inside the lease
    etcd_server.start()
    results = job.finish()
    assert [code for code, _ in results] == [0, 0], results
    assert job.rendezvous_counts() == [1, 1]  # the workers were never restarted


def test_etcd_gone_longer_than_the_lease_regroups_when_back(
    elastic_run: ElasticRunner, tmp_path: Path, etcd_server: EtcdServer
) -> None:
    job = _job(elastic_run, tmp_path, etcd_server, "2")
    for _ in range(2):  # workers outlive the detection (a watch wait plus the retry window)
        job.start(nproc=1, probe=("--sleep", "12"))
    wait_for(lambda: len(probe_records(job.out)) == 2)
    etcd_server.kill()
    # Longer than a watch wait (5 s) plus rdzv.heartbeat_timeout (3 s): the agents notice,
    # stop their workers and wait (up to rdzv.join_timeout) for etcd to come back.
    wait_for(
        lambda: "unreachable" in "".join((d / "elastic-run.log").read_text() for d in job.run_dirs),
        timeout=30,
    )
    time.sleep(4)
    etcd_server.start()
    results = job.finish(timeout=90)
    assert [code for code, _ in results] == [0, 0], results
    assert min(job.rendezvous_counts()) >= 2  # they re-formed once etcd was back


def test_unreachable_etcd_fails_clearly(elastic_run: ElasticRunner) -> None:
    endpoints = f"127.0.0.1:{free_port()},127.0.0.1:{free_port()}"
    t0 = time.monotonic()
    run = elastic_run(
        "+job=hello", "rdzv=etcd", f"rdzv.endpoint='{endpoints}'", "nnodes=2", "rdzv.join_timeout=2"
    )
    assert run.returncode == 1
    assert time.monotonic() - t0 < 15
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("elastic-run: rendezvous failed:")
    assert f"cannot reach etcd at any of {endpoints}" in last
    assert "Traceback" not in run.stderr


def test_an_unknown_api_is_one_line_and_exit_2(elastic_run: ElasticRunner) -> None:
    run = elastic_run(
        "+job=hello", "rdzv=etcd", "rdzv.endpoint=127.0.0.1:1", "rdzv.api=carrier-pigeon"
    )
    assert run.returncode == 2
    assert run.stderr.strip().splitlines()[-1] == (
        "elastic-run: error: rdzv.api=carrier-pigeon: allowed: http, grpc"
    )


def test_unquoted_endpoint_list_gets_a_quoting_hint(elastic_run: ElasticRunner) -> None:
    run = elastic_run("+job=hello", "rdzv=etcd", "rdzv.endpoint=a:1,b:2", "nnodes=2")
    assert run.returncode == 2
    assert run.stderr.strip() == (
        "elastic-run: error: rdzv.endpoint=a:1,b:2: unquoted commas mean a --multirun "
        "sweep; quote the value: 'rdzv.endpoint=\"a:1,b:2\"'"
    )


def test_proxy_variables_do_not_come_between_the_agents_and_etcd(
    elastic_run: ElasticRunner, tmp_path: Path, etcd_server: EtcdServer
) -> None:
    # Cluster nodes often have HTTP_PROXY set for the outside world and no NO_PROXY
    # entry for etcd: the agents reach etcd directly (through requests, they sent every
    # request to the proxy, here a port nobody serves, and never formed the job).
    dead = f"http://127.0.0.1:{free_port()}"
    env = {k: v for k, v in os.environ.items() if k.lower() != "no_proxy"}
    proxies = ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "ALL_PROXY", "grpc_proxy")  # gRPC's
    env |= {name: dead for name in proxies}
    job = _job(elastic_run, tmp_path, etcd_server, "2")
    for _ in range(2):
        job.start("rdzv.join_timeout=15", env=env)
    results = job.finish()
    assert [code for code, _ in results] == [0, 0], results
    assert sorted(rank for _, rank in probe_records(job.out)) == [0, 1]


def _keep_alives(etcd: EtcdServer) -> int:
    with urllib.request.urlopen(f"http://{etcd.endpoint}/metrics", timeout=10) as answer:
        text = answer.read().decode()
    return sum(
        int(float(line.rsplit(" ", 1)[1]))
        for line in text.splitlines()
        if line.startswith("grpc_server_started_total{") and 'grpc_method="LeaseKeepAlive"' in line
    )


def test_a_running_nodes_heartbeat_is_one_keep_alive(
    elastic_run: ElasticRunner, tmp_path: Path, etcd_server: EtcdServer
) -> None:
    # A running node's liveness key and its round announcement share a lease: each
    # heartbeat is one request to etcd, not one per key (at 1,024 nodes on 2 s
    # heartbeats that was 1,024 requests a second of etcd's CPU saved).
    job = _job(elastic_run, tmp_path, etcd_server, "2")
    for _ in range(2):
        job.start(nproc=1, probe=("--sleep", "5"))
    wait_for(lambda: len(probe_records(job.out)) == 2)
    before, t0 = _keep_alives(etcd_server), time.monotonic()
    time.sleep(2.5)
    beats = (time.monotonic() - t0) / 0.5  # rdzv.heartbeat_interval=0.5
    sent = _keep_alives(etcd_server) - before
    results = job.finish()
    assert [code for code, _ in results] == [0, 0], results
    assert 2 <= sent <= 2 * (beats + 1), (sent, beats)  # 4 per beat before (2 a node)
