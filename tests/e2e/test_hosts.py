"""Multi-node jobs on real networks: each node a host in a network namespace of its own
(its own address, /etc/hosts and hostname), the agents started there with ``ip netns
exec``, faults made with the kit in :mod:`elastic_runner.testing.netns`."""

from __future__ import annotations

import json
import signal
import subprocess
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import pytest

from elastic_runner.testing.netns import Cluster, Host
from elastic_runner.testing.runner import wait_for
from tests.conftest import ElasticRunner, assert_nothing_survives, probe_job

HEARTBEAT = 1.5
FAST = [
    "rdzv.heartbeat_interval=0.2",
    f"rdzv.heartbeat_timeout={HEARTBEAT}",
    "rdzv.join_timeout=30",
    "rdzv.last_call_timeout=0.5",
]
PORT = 29400  # each host has a port space of its own
MakeCluster = Callable[..., Cluster]


class HostJob:
    """One elastic job with an agent on each host of a cluster."""

    def __init__(
        self,
        elastic_run: ElasticRunner,
        cluster: Cluster,
        tmp_path: Path,
        nnodes: str,
        rdzv: list[str] | None = None,
    ) -> None:
        self.elastic_run, self.cluster = elastic_run, cluster
        self.run_id = f"hosts-{uuid.uuid4().hex[:8]}"
        self.nnodes = nnodes
        self.rdzv = rdzv or ["rdzv=tcp", f"rdzv.endpoint=host0:{PORT}", *FAST]
        self.out = tmp_path / "probe"
        self.out.mkdir(parents=True, exist_ok=True)
        self.agents: dict[str, subprocess.Popen[str]] = {}
        self.run_dirs: dict[str, Path] = {}

    def start(self, host: Host, *overrides: str, probe: tuple[str, ...] = ()) -> None:
        argv, run_dir, _ = self.elastic_run.command(
            *probe_job(self.out, *probe),
            *self.rdzv,
            f"nnodes={self.nnodes}",
            *overrides,
            run_id=self.run_id,
        )
        self.agents[host.name] = host.popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        self.run_dirs[host.name] = run_dir

    def events(self, host: str) -> list[dict[str, Any]]:
        path = self.run_dirs[host] / "events.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def starts(self, host: str, attempt: int) -> list[dict[str, Any]]:
        return [
            e
            for e in self.events(host)
            if e["name"] == "torchelastic.worker.status.START"
            and e["metadata"]["attempt"] == attempt
        ]

    def world_sizes(self, host: str) -> list[int]:
        return [
            int(e["metadata"]["group_world_size"])
            for e in self.events(host)
            if e["name"] == "torchelastic.worker.status.RENDEZVOUS"
        ]

    def finish(self, timeout: float = 60) -> dict[str, tuple[int, str]]:
        out = {}
        for name, proc in self.agents.items():
            _, err = proc.communicate(timeout=timeout)
            out[name] = (proc.returncode, err)
        return out

    def stop(self) -> None:
        for proc in self.agents.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.agents.values():
            proc.communicate(timeout=60)


def _records(out: Path) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted(out.glob("a*_r*.json"))]


def test_a_job_forms_across_hosts_whose_head_names_itself_loopback(
    elastic_run: ElasticRunner, netns_cluster: MakeCluster, tmp_path: Path
) -> None:
    """host0's own /etc/hosts maps its name to 127.0.1.1 (Debian): the store still
    listens where the others reach it, and MASTER_ADDR is host0's address on the network."""
    cluster = netns_cluster(3)
    cluster.set_hosts_entry("host0", "host0", "127.0.1.1")
    job = HostJob(elastic_run, cluster, tmp_path, "3")
    for host in cluster:
        job.start(host)
    results = job.finish()
    assert all(code == 0 for code, _ in results.values()), results
    records = _records(job.out)
    assert len(records) == 3
    assert {r["env"]["MASTER_ADDR"] for r in records} == {cluster["host0"].address}
    assert sorted(int(r["env"]["RANK"]) for r in records) == [0, 1, 2]
    # gloo would bind host0's name (127.0.1.1) there: the agent names the interface
    by_node = {int(r["env"]["GROUP_RANK"]): r["env"] for r in records}
    assert by_node[0].get("GLOO_SOCKET_IFNAME") == cluster["host0"].interface
    assert "GLOO_SOCKET_IFNAME" not in by_node[1] and "GLOO_SOCKET_IFNAME" not in by_node[2]
    assert_nothing_survives({job.run_id})


def test_static_hosts_on_node_rank_0_while_its_name_does_not_resolve_yet(
    elastic_run: ElasticRunner, netns_cluster: MakeCluster, tmp_path: Path
) -> None:
    """Kubernetes: pods start before the head's DNS name exists. Node rank 0 hosts
    without looking its name up; the others retry until it resolves, 3 s later."""
    cluster = netns_cluster(3)
    for name in ("host0", "host1", "host2"):
        cluster.set_hosts_entry(name, "host0", None)
    job = HostJob(
        elastic_run,
        cluster,
        tmp_path,
        "3",
        rdzv=["rdzv=static", f"rdzv.endpoint=host0:{PORT}", *FAST],
    )
    for rank, host in enumerate(cluster):
        job.start(host, f"rdzv.node_rank={rank}")
    time.sleep(3)  # the scenario: the name appears 3 s after the agents started
    for name in ("host1", "host2"):
        cluster.set_hosts_entry(name, "host0", cluster["host0"].address)
    results = job.finish()
    assert all(code == 0 for code, _ in results.values()), results
    assert {r["env"]["MASTER_ADDR"] for r in _records(job.out)} == {cluster["host0"].address}
    assert_nothing_survives({job.run_id})


def test_a_cut_off_host_is_fenced_before_the_others_reform_and_rejoins(
    elastic_run: ElasticRunner, netns_cluster: MakeCluster, tmp_path: Path
) -> None:
    cluster = netns_cluster(3)
    job = HostJob(elastic_run, cluster, tmp_path, "2:3")
    for host in cluster:
        job.start(host, probe=("--sleep", "120", "--on-term"))
    try:
        wait_for(lambda: all(job.starts(h.name, 1) for h in cluster), what="3 hosts running")
        assert all(job.world_sizes(h.name) == [3] for h in cluster)
        worker = psutil.Process(int(job.starts("host2", 1)[0]["metadata"]["pid"]))
        t_cut = time.time()
        cluster.cut("host2")
        try:
            wait_for(lambda: not worker.is_running() or worker.status() == "zombie", timeout=20)
            fenced_at = time.time()
            wait_for(lambda: all(job.starts(h, 2) for h in ("host0", "host1")), timeout=20)
            new_world = min(float(job.starts(h, 2)[0]["timestamp"]) for h in ("host0", "host1"))
            assert [job.world_sizes(h)[-1] for h in ("host0", "host1")] == [2, 2]
            time.sleep(max(0.0, 3 * HEARTBEAT - (time.time() - t_cut)))  # cut for 3x
        finally:
            cluster.restore("host2")
        print(
            f"\ncut host: fenced {fenced_at - t_cut:.2f} s after the cut; the others' "
            f"new world {new_world - t_cut:.2f} s after it (overlap "
            f"{max(0.0, fenced_at - new_world):.2f} s)"
        )
        assert fenced_at <= new_world + 0.25, "the cut-off host's workers outlived it"
        # back on the network: it joins again as a new node, and the job re-forms to 3
        wait_for(lambda: all(job.world_sizes(h.name)[-1] == 3 for h in cluster), timeout=40)
        assert any(e["name"] == "elastic_runner.fenced" for e in job.events("host2"))
        for name in ("host0", "host1"):
            log = (job.run_dirs[name] / "elastic-run.log").read_text()
            assert "was lost: its liveness key expired" in log
    finally:
        job.stop()
    assert_nothing_survives({job.run_id})


def test_the_others_move_the_store_when_its_host_is_cut_off(
    elastic_run: ElasticRunner, netns_cluster: MakeCluster, tmp_path: Path
) -> None:
    """The store's host cut off: the two others (a majority of three) move the store to
    one of them and finish as two; the cut-off host stops its workers and never forms a
    world of its own (one of three is no majority): it fails after its join timeout."""
    cluster = netns_cluster(3)
    join = 5.0
    job = HostJob(
        elastic_run,
        cluster,
        tmp_path,
        "1:3",  # the cut-off host alone would be enough for nnodes: only the majority stops it
        rdzv=[
            "rdzv=tcp",
            f"rdzv.endpoint=host0:{PORT}",
            *FAST[:2],
            f"rdzv.join_timeout={join}",
            "rdzv.last_call_timeout=0.5",
        ],
    )
    for host in cluster:
        # a world of two counts once the three ran together: under load two hosts may
        # first form a round without the third (nnodes 1:3, last call 0.5 s)
        probe = ("--until-world", "2", "--after-world", "3", "--sleep", "1", "--on-term")
        job.start(host, probe=probe)

    def running_in_three(name: str) -> bool:
        sizes = job.world_sizes(name)
        started = [e for e in job.events(name) if e["name"] == "torchelastic.worker.status.START"]
        return sizes[-1:] == [3] and len(started) >= len(sizes)

    try:
        wait_for(
            lambda: all(running_in_three(h.name) for h in cluster),
            what="3 hosts running one world of 3",
        )
        before = job.world_sizes("host0")
        t_cut = time.time()
        cluster.cut("host0")
        ended = {}
        for name in ("host1", "host2", "host0"):
            _, err = job.agents[name].communicate(timeout=60)
            ended[name] = (job.agents[name].returncode, err, time.time() - t_cut)
    finally:
        cluster.restore("host0")
        job.stop()
    assert [ended[h][0] for h in ("host1", "host2")] == [0, 0], ended
    again = [r for r in _records(job.out) if r["env"]["WORLD_SIZE"] == "2" and r["started"] > t_cut]
    assert len(again) == 2
    moved = min(r["started"] for r in again) - t_cut
    code, err, took = ended["host0"]
    assert code == 1 and "rendezvous timed out" in err, err
    assert "waits for a majority of the last round's 3 nodes" in err
    # never a world of its own after the cut
    assert job.world_sizes("host0") == before, (before, job.world_sizes("host0"))
    stopped = [
        float(e["timestamp"]) - t_cut
        for e in job.events("host0")
        if e["name"] == "torchelastic.worker.status.TERMINATED" and float(e["timestamp"]) > t_cut
    ]
    assert stopped and stopped[0] <= moved + 0.25, (stopped, moved)
    logs = ended["host1"][1] + ended["host2"][1]
    assert logs.count("this node hosts the rendezvous store now") == 1
    print(
        f"\nstore host cut: the others' workers ran again as two {moved:.2f} s after the "
        f"cut; the cut-off host stopped its workers at {stopped[0]:.2f} s and failed at "
        f"{took:.1f} s"
    )
    assert_nothing_survives({job.run_id})


@pytest.fixture(autouse=True)
def _namespaces_needed(netns_cluster: MakeCluster) -> None:
    """Every test here needs hosts (the fixture skips with the reason otherwise)."""


def _has(job: HostJob, host: str, name: str) -> bool:
    return any(e["name"] == name for e in job.events(host))


def test_sigterm_ends_waits_for_other_hosts_at_once(
    elastic_run: ElasticRunner, netns_cluster: MakeCluster, tmp_path: Path
) -> None:
    """On namespaced hosts: SIGTERM ends an agent waiting in a rendezvous and one waiting
    in its exit barrier within 2 s (exit 143); the barrier peers of a node stopped by
    SIGTERM leave at once."""
    cluster = netns_cluster(3)
    barrier = "rdzv.exit_barrier_timeout=600"
    # 1. alone in a rendezvous for three (join_timeout 600 s)
    job = HostJob(
        elastic_run,
        cluster,
        tmp_path / "alone",
        "3",
        rdzv=["rdzv=tcp", f"rdzv.endpoint=host0:{PORT}", *FAST[:2], "rdzv.join_timeout=600"],
    )
    job.start(cluster["host0"])
    wait_for(lambda: _has(job, "host0", "elastic_runner.rendezvous.join"))
    t0 = time.monotonic()
    job.agents["host0"].send_signal(signal.SIGTERM)
    job.agents["host0"].communicate(timeout=30)
    assert job.agents["host0"].returncode == 143
    assert time.monotonic() - t0 < 2.0
    # 2. host0 and host1 finish and wait in their barrier; host2 is stopped by SIGTERM
    job = HostJob(elastic_run, cluster, tmp_path / "barrier", "3")
    job.start(cluster["host0"], barrier)
    job.start(cluster["host1"], barrier)
    job.start(cluster["host2"], barrier, probe=("--sleep", "60", "--on-term"))
    wait_for(lambda: all(_has(job, h, "elastic_runner.exit_barrier") for h in ("host0", "host1")))
    t0 = time.monotonic()
    job.agents["host2"].send_signal(signal.SIGTERM)
    results = job.finish(timeout=30)
    took = time.monotonic() - t0
    assert results["host2"][0] == 143
    assert results["host0"][0] == results["host1"][0] == 0, results
    assert took < 2.0, f"the barrier peers left {took:.2f} s after the SIGTERM"
    # 3. SIGTERM to an agent waiting in its barrier
    job = HostJob(elastic_run, cluster, tmp_path / "waiting", "2:3")
    job.start(cluster["host0"], barrier)
    job.start(cluster["host1"], barrier, probe=("--sleep", "60", "--on-term"))
    wait_for(lambda: _has(job, "host0", "elastic_runner.exit_barrier"))
    t0 = time.monotonic()
    job.agents["host0"].send_signal(signal.SIGTERM)
    job.agents["host0"].communicate(timeout=30)
    assert job.agents["host0"].returncode == 143
    assert time.monotonic() - t0 < 2.0
    job.stop()
    assert_nothing_survives({job.run_id})
