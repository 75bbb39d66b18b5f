"""Several ``elastic-run`` agents on localhost forming one job over the built-in TCP store."""

from __future__ import annotations

import json
import os
import resource
import signal
import socket
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from elastic_runner.rendezvous.tcp_server import TCPStoreServer
from elastic_runner.testing.runner import wait_for
from tests.conftest import (
    ElasticRunner,
    assert_nothing_survives,
    free_port,
    probe_job,
    probe_records,
)

FAST = [
    "rdzv.heartbeat_interval=0.2",
    "rdzv.heartbeat_timeout=1.5",
    "rdzv.join_timeout=30",
    "rdzv.last_call_timeout=0.5",
]


class Job:
    """Agents of one job: same run id, same endpoint."""

    def __init__(
        self,
        elastic_run: ElasticRunner,
        tmp_path: Path,
        nnodes: str,
        rdzv: list[str] | None = None,
    ) -> None:
        self.elastic_run = elastic_run
        self.run_id = f"job-{uuid.uuid4().hex[:8]}"
        self.port = free_port()
        self.nnodes = nnodes
        self.rdzv = rdzv or ["rdzv=tcp", f"rdzv.endpoint=127.0.0.1:{self.port}", *FAST]
        self.out = tmp_path / "probe"
        self.out.mkdir(parents=True, exist_ok=True)
        self.agents: list[subprocess.Popen[str]] = []
        self.run_dirs: list[Path] = []

    def start(
        self,
        *overrides: str,
        nproc: int = 1,
        probe: tuple[str, ...] = (),
        env: dict[str, str] | None = None,
    ) -> subprocess.Popen[str]:
        proc, run_dir, _ = self.elastic_run.popen(
            *probe_job(self.out, *probe, nproc=nproc),
            *self.rdzv,
            f"nnodes={self.nnodes}",
            *overrides,
            run_id=self.run_id,
            env=env,
        )
        self.agents.append(proc)
        self.run_dirs.append(run_dir)
        return proc

    def rendezvous_counts(self) -> list[int]:
        """How many rounds each agent joined (1 when nothing re-formed)."""
        return [
            (d / "events.jsonl").read_text().count("torchelastic.worker.status.RENDEZVOUS")
            for d in self.run_dirs
        ]

    def finish(self, timeout: float = 60) -> list[tuple[int, str]]:
        results = []
        for proc in self.agents:
            _, err = proc.communicate(timeout=timeout)
            results.append((proc.returncode, err))
        return results


@pytest.mark.parametrize("agents", [2, 4])
def test_homogeneous_agents_form_one_job(
    elastic_run: ElasticRunner, tmp_path: Path, agents: int
) -> None:
    job = Job(elastic_run, tmp_path, str(agents))
    for _ in range(agents):
        job.start(nproc=2)
    results = job.finish()
    assert [code for code, _ in results] == [0] * agents, results
    assert job.rendezvous_counts() == [1] * agents  # no spurious regroup
    records = probe_records(job.out)
    world = 2 * agents
    assert sorted(rank for _, rank in records) == list(range(world))
    envs = [rec["env"] for rec in records.values()]
    assert {e["WORLD_SIZE"] for e in envs} == {str(world)}
    assert {e["GROUP_WORLD_SIZE"] for e in envs} == {str(agents)}
    assert {(e["MASTER_ADDR"], e["MASTER_PORT"]) for e in envs}.__len__() == 1
    for e in envs:  # contiguous global ranks per node
        assert int(e["RANK"]) == 2 * int(e["GROUP_RANK"]) + int(e["LOCAL_RANK"])
        assert e["TORCHELASTIC_RUN_ID"] == job.run_id


def test_heterogeneous_nodes_and_roles(elastic_run: ElasticRunner, tmp_path: Path) -> None:
    job = Job(elastic_run, tmp_path, "3")
    job.start("job.role=master", nproc=1)
    job.start("job.role=trainer", nproc=2)
    job.start("job.role=trainer", nproc=3)
    results = job.finish()
    assert [code for code, _ in results] == [0, 0, 0], results
    envs = [rec["env"] for rec in probe_records(job.out).values()]
    assert sorted(int(e["RANK"]) for e in envs) == list(range(6))
    trainers = [e for e in envs if e["ROLE_NAME"] == "trainer"]
    assert sorted(int(e["ROLE_RANK"]) for e in trainers) == list(range(5))
    assert {e["ROLE_WORLD_SIZE"] for e in trainers} == {"5"}
    master = [e for e in envs if e["ROLE_NAME"] == "master"]
    assert [(e["ROLE_RANK"], e["ROLE_WORLD_SIZE"]) for e in master] == [("0", "1")]


def test_static_backend_uses_the_given_node_ranks(
    elastic_run: ElasticRunner, tmp_path: Path
) -> None:
    job = Job(elastic_run, tmp_path, "2")
    job.start("rdzv=static", "rdzv.node_rank=1", nproc=1)
    time.sleep(0.3)  # node 1 joins first; its group rank must still be 1
    job.start("rdzv=static", "rdzv.node_rank=0", nproc=1)
    results = job.finish()
    assert [code for code, _ in results] == [0, 0], results
    records = probe_records(job.out)
    assert {r["env"]["GROUP_RANK"] for r in records.values()} == {"0", "1"}
    by_pid = {rec["env"]["GROUP_RANK"]: rec for rec in records.values()}
    assert by_pid["1"]["argv"] and by_pid["0"]["env"]["RANK"] == "0"


def test_scale_up_regroups_without_spending_a_restart(
    elastic_run: ElasticRunner, tmp_path: Path
) -> None:
    job = Job(elastic_run, tmp_path, "1:2")
    job.start(nproc=1, probe=("--until-world", "2"))
    wait_for(lambda: list(job.out.glob("a0_r0_g0_w1.json")))  # running alone
    job.start(nproc=1, probe=("--until-world", "2"))
    results = job.finish()
    assert [code for code, _ in results] == [0, 0], results
    grown = sorted(p.name for p in job.out.glob("*_w2.json"))
    assert grown == ["a0_r0_g0_w2.json", "a0_r1_g1_w2.json"]  # restart count still 0
    events = [
        json.loads(line) for line in (job.run_dirs[0] / "events.jsonl").read_text().splitlines()
    ]
    reasons = [e["metadata"]["reason"] for e in events if e["name"] == "elastic_runner.restart"]
    assert reasons == ["membership_change"]


def test_scale_down_survivors_reform_and_finish(elastic_run: ElasticRunner, tmp_path: Path) -> None:
    job = Job(elastic_run, tmp_path, "2:3")
    # the victim must not be the agent hosting the store (that case fails by design)
    shrink = ("--until-world", "2", "--after-world", "3")
    agents = [job.start("rdzv.is_host=true", nproc=1, probe=shrink)]
    wait_for(lambda: _listening(job.port))
    agents += [job.start("rdzv.is_host=false", nproc=1, probe=shrink) for _ in range(2)]
    wait_for(lambda: len(list(job.out.glob("*_w3.json"))) == 3)
    victim = agents[1]
    t0 = time.monotonic()
    victim.kill()
    survivors = [a for a in agents if a is not victim]
    errs = [proc.communicate(timeout=30)[1] for proc in survivors]
    elapsed = time.monotonic() - t0
    assert [p.returncode for p in survivors] == [0, 0], errs
    assert len(list(job.out.glob("*_w2.json"))) == 2
    assert elapsed < 1.5 + 5  # heartbeat_timeout plus a few seconds
    victim.communicate(timeout=10)
    job.agents.clear()


def test_restart_budget_is_per_job(elastic_run: ElasticRunner, tmp_path: Path) -> None:
    job = Job(elastic_run, tmp_path, "2")
    # rank 0 (on whichever node is group rank 0) SIGKILLs itself on the first attempt
    for _ in range(2):
        job.start("max_restarts=1", nproc=1, probe=("--ranks", "0", "--sigkill-on-restart", "0"))
    results = job.finish()
    assert [code for code, _ in results] == [0, 0], results
    records = probe_records(job.out)
    assert {
        rec["env"]["TORCHELASTIC_RESTART_COUNT"] for (r, _), rec in records.items() if r == 1
    } == {"1"}
    assert (1, 0) in records and (1, 1) in records


def test_exhausted_job_stops_every_node(elastic_run: ElasticRunner, tmp_path: Path) -> None:
    job = Job(elastic_run, tmp_path, "2")
    job.start("max_restarts=1", nproc=1, probe=("--ranks", "0", "--exit-code", "3"))
    job.start("max_restarts=1", nproc=1, probe=("--ranks", "0", "--exit-code", "3"))
    results = job.finish()
    assert sorted(code for code, _ in results) == [1, 1], results
    assert any(
        "the job failed on another node" in err or "restarts used up" in err for _, err in results
    )


def test_missing_node_times_out_with_counts(elastic_run: ElasticRunner, tmp_path: Path) -> None:
    job = Job(elastic_run, tmp_path, "2")
    job.start("rdzv.join_timeout=1", nproc=1)
    [(code, err)] = job.finish()
    assert code == 1
    line = err.strip().splitlines()[-1]
    assert line.startswith("elastic-run: rendezvous failed: rendezvous timed out after 1 s")
    assert f"1 of 2 nodes arrived at tcp store 127.0.0.1:{job.port}" in line


def test_an_endpoint_held_by_a_program_that_never_answers_is_said_and_ends(
    elastic_run: ElasticRunner, tmp_path: Path
) -> None:
    # Another job's torch TCPStore on the port, say (29400 is the default of both
    # tools): it accepts connections and never answers ours. The agent used to sit in
    # silence until SIGKILLed; now it says why when a hello has had no answer for its
    # request timeout (here 2 s, the heartbeat timeout being short), tries again until
    # rdzv.join_timeout and ends with one line.
    job = Job(elastic_run, tmp_path, "2")
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", job.port))
        silent.listen()
        started = time.monotonic()
        job.start("rdzv.join_timeout=14", nproc=1)
        [(code, err)] = job.finish(timeout=60)
        took = time.monotonic() - started
    assert code == 1, err
    assert 13 < took < 25, took
    lines = err.strip().splitlines()
    said = [line for line in lines if "hello" in line]
    assert len(said) == 2, err  # the warning, then the error line
    assert said[0].startswith(
        f"[elastic-run] 127.0.0.1:{job.port} accepted a connection but did not answer "
        "the rendezvous store's hello within 2 s: another program holds that port "
        "(torch's TCPStore, for one)"
    ), err
    assert said[0].endswith("; trying again until rdzv.join_timeout=14 s"), err
    assert said[1] == lines[-1]
    assert lines[-1].startswith("elastic-run: rendezvous failed:")
    assert "did not answer the rendezvous store's hello" in lines[-1]
    assert "another program holds that port" in lines[-1]
    assert "Traceback" not in err
    assert not list(job.out.iterdir())  # no worker started


def test_an_agent_with_over_a_thousand_files_open_keeps_its_store_connections(
    elastic_run: ElasticRunner, tmp_path: Path
) -> None:
    # Its sockets get descriptors from 1024 on (a store-hosting agent of a large job has
    # that many): the store client's check for a connection the server closed used
    # select(), which refuses them, and took the refusal for a closed connection, so
    # most requests opened a new connection and said hello again (14 hellos, not 4).
    wanted = 1200
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < wanted + 200:
        pytest.skip(f"the open-file limit ({hard}) is below {wanted + 200}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, wanted + 200), hard))
    padding: list[int] = []
    server = TCPStoreServer("127.0.0.1", free_port())  # here, to count its requests
    try:
        while not padding or padding[-1] < wanted:
            padding.append(os.open(os.devnull, os.O_RDONLY))
        out = tmp_path / "probe"
        out.mkdir()
        proc, _, _ = elastic_run.popen(
            *probe_job(out, "--sleep", "1.5"),
            "rdzv=tcp",
            f"rdzv.endpoint=127.0.0.1:{server.port}",
            "rdzv.is_host=false",
            "nnodes=1",
            *FAST,
            pass_fds=padding,  # inherited: the agent's own descriptors start above them
        )
        _, err = proc.communicate(timeout=60)
    finally:
        for fd in padding:
            os.close(fd)
        server.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert proc.returncode == 0, err
    requests = server.requests
    print(dict(requests))
    assert requests.total() - requests["hello"] >= 15, requests  # a round and heartbeats
    # one connection per thread (main, heartbeat, watcher), and one more for leaving
    assert requests["hello"] <= 6, requests


def test_wrong_token_is_rejected(elastic_run: ElasticRunner, tmp_path: Path) -> None:
    job = Job(elastic_run, tmp_path, "2")
    host = job.start("rdzv.token=right", "rdzv.is_host=true", "rdzv.join_timeout=5", nproc=1)
    wait_for(lambda: _listening(job.port))
    intruder = job.start("rdzv.token=wrong", "rdzv.is_host=false", nproc=1)
    _, err = intruder.communicate(timeout=30)
    assert intruder.returncode == 1
    assert "wrong or missing rdzv.token" in err
    host.send_signal(signal.SIGTERM)
    host.communicate(timeout=30)
    job.agents.clear()


def test_store_host_death_fails_the_others_clearly(
    elastic_run: ElasticRunner, tmp_path: Path
) -> None:
    job = Job(elastic_run, tmp_path, "2")
    host = job.start("rdzv.is_host=true", nproc=1, probe=("--sleep", "60"))
    wait_for(lambda: _listening(job.port))
    other = job.start("rdzv.is_host=false", nproc=1, probe=("--sleep", "60"))
    wait_for(lambda: len(probe_records(job.out)) == 2)
    host.kill()
    t0 = time.monotonic()
    _, err = other.communicate(timeout=30)
    assert other.returncode == 1
    # within rdzv.heartbeat_timeout (1.5 s here) and a moment (measured: 1.64 s)
    assert time.monotonic() - t0 < 1.5 + 2.0
    assert f"127.0.0.1:{job.port}" in err.strip().splitlines()[-1]
    host.communicate(timeout=10)
    job.agents.clear()


def test_bad_multinode_input(elastic_run: ElasticRunner) -> None:
    cases = [
        (["rdzv=tcp", "nnodes=2"], "rdzv.endpoint"),
        (["rdzv=tcp", "rdzv.endpoint=h:99999", "nnodes=2"], "rdzv.endpoint=h:99999: expected"),
        (
            ["rdzv=static", "rdzv.endpoint=127.0.0.1:1", "nnodes=1:2", "rdzv.node_rank=0"],
            "nnodes=1:2: rdzv=static needs a fixed node count",
        ),
        (
            ["rdzv=static", "rdzv.endpoint=127.0.0.1:1", "nnodes=2", "rdzv.node_rank=2"],
            "rdzv.node_rank=2: expected 0..1",
        ),
    ]
    for overrides, message in cases:
        run = elastic_run("+job=hello", *overrides)
        assert run.returncode == 2, (overrides, run.stderr)
        assert len(run.stderr.strip().splitlines()) == 1, run.stderr
        assert message in run.stderr


def _listening(port: int) -> bool:
    import socket

    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _agent_end(run_dir: Path) -> float:
    events = [json.loads(x) for x in (run_dir / "events.jsonl").read_text().splitlines()]
    return float(
        next(
            e["timestamp"]
            for e in events
            if e["source"] == "AGENT" and e["name"].endswith(".SUCCEEDED")
        )
    )


@pytest.mark.parametrize(("barrier", "waits"), [(30, True), (0.2, False)])
def test_exit_barrier_holds_finished_nodes_and_never_fails(
    elastic_run: ElasticRunner, tmp_path: Path, barrier: float, waits: bool
) -> None:
    # global rank 0 exits at once, rank 1 after 1.5 s (on whichever node has it)
    job = Job(elastic_run, tmp_path, "2")
    for _ in range(2):
        job.start(
            f"rdzv.exit_barrier_timeout={barrier}",
            nproc=1,
            probe=("--ranks", "0", "--sleep", "1.5", "--sleep-others"),
        )
    results = job.finish()
    assert [code for code, _ in results] == [0, 0], results  # a barrier timeout never fails
    spread = abs(_agent_end(job.run_dirs[0]) - _agent_end(job.run_dirs[1]))
    # with the barrier, the fast node left with the slow one; without, long before
    assert (spread < 0.5) if waits else (spread > 0.8), spread


# -- a store every node can reach, a MASTER_ADDR they can reach, hosting without DNS -----


def _last_line(err: str) -> str:
    return err.strip().splitlines()[-1]


def test_master_addr_is_loopback_when_every_node_is_on_this_machine(
    elastic_run: ElasticRunner, tmp_path: Path
) -> None:
    job = Job(elastic_run, tmp_path, "2")
    job.start(nproc=1)
    job.start(nproc=1)
    results = job.finish()
    assert [code for code, _ in results] == [0, 0], results
    envs = [rec["env"] for rec in probe_records(job.out).values()]
    assert len(envs) == 2
    assert {e["MASTER_ADDR"] for e in envs} == {"127.0.0.1"}


def test_the_store_is_reached_on_another_address_than_the_endpoint_names(
    elastic_run: ElasticRunner, tmp_path: Path
) -> None:
    # the host's endpoint names 127.0.0.1; another node reaches this machine as 127.0.0.2
    job = Job(elastic_run, tmp_path, "2", rdzv=["rdzv=tcp", *FAST])
    job.start(f"rdzv.endpoint=127.0.0.1:{job.port}", "rdzv.is_host=true", nproc=1)
    job.start(f"rdzv.endpoint=127.0.0.2:{job.port}", "rdzv.is_host=false", nproc=1)
    results = job.finish()
    assert [code for code, _ in results] == [0, 0], results
    envs = [rec["env"] for rec in probe_records(job.out).values()]
    assert sorted(e["GROUP_RANK"] for e in envs) == ["0", "1"]
    assert {e["MASTER_ADDR"] for e in envs} == {"127.0.0.1"}


def test_rdzv_bind_keeps_the_store_to_one_address(
    elastic_run: ElasticRunner, tmp_path: Path
) -> None:
    job = Job(elastic_run, tmp_path, "2", rdzv=["rdzv=tcp", *FAST])
    host = job.start(
        f"rdzv.endpoint=127.0.0.1:{job.port}",
        "rdzv.is_host=true",
        "rdzv.bind=127.0.0.1",
        "rdzv.join_timeout=10",
        nproc=1,
    )
    wait_for(lambda: _listening(job.port))
    other = job.start(
        f"rdzv.endpoint=127.0.0.2:{job.port}",
        "rdzv.is_host=false",
        "rdzv.join_timeout=1",
        nproc=1,
    )
    _, err = other.communicate(timeout=30)
    assert other.returncode == 1, err
    assert f"cannot reach the rendezvous store at 127.0.0.2:{job.port}" in _last_line(err)
    host.send_signal(signal.SIGTERM)
    host.communicate(timeout=30)
    job.agents.clear()


def test_rdzv_bind_to_an_address_of_no_interface_is_one_line(
    elastic_run: ElasticRunner, tmp_path: Path
) -> None:
    job = Job(elastic_run, tmp_path, "1")
    # TEST-NET-3: no interface has it; binding fails at once and nothing is sent
    job.start("rdzv.is_host=true", "rdzv.bind=203.0.113.7", nproc=1)
    [(code, err)] = job.finish()
    assert code == 1, err
    assert _last_line(err) == (
        f"elastic-run: rendezvous failed: cannot host the rendezvous store on "
        f"203.0.113.7:{job.port}: rdzv.bind=203.0.113.7 is not an address of this machine"
    )
    assert not probe_records(job.out)


def test_static_hosts_on_node_rank_0_whatever_the_endpoint_resolves_to(
    elastic_run: ElasticRunner, tmp_path: Path
) -> None:
    job = Job(elastic_run, tmp_path, "2", rdzv=["rdzv=static", *FAST])
    # Node rank 1 never hosts, though its endpoint is an address of this machine: alone,
    # it finds no store (had it hosted, it would time out waiting for node 0 instead).
    alone = job.start(
        f"rdzv.endpoint=127.0.0.1:{job.port}", "rdzv.node_rank=1", "rdzv.join_timeout=1"
    )
    _, err = alone.communicate(timeout=30)
    assert alone.returncode == 1, err
    assert f"cannot reach the rendezvous store at 127.0.0.1:{job.port}" in _last_line(err)
    job.agents.clear()
    # Node rank 0 hosts, though its endpoint is no address of this machine (as when the
    # head's name resolves elsewhere, or not yet): it listens on every interface and
    # reaches its own store over loopback, so nothing is sent to 203.0.113.7 (TEST-NET-3).
    job.start(f"rdzv.endpoint=127.0.0.1:{job.port}", "rdzv.node_rank=1")
    job.start(f"rdzv.endpoint=203.0.113.7:{job.port}", "rdzv.node_rank=0")
    results = job.finish()
    assert [code for code, _ in results] == [0, 0], results
    envs = {rec["env"]["GROUP_RANK"]: rec["env"] for rec in probe_records(job.out).values()}
    assert sorted(envs) == ["0", "1"]
    assert {e["MASTER_ADDR"] for e in envs.values()} == {"127.0.0.1"}


def _run_without_id(
    elastic_run: ElasticRunner, *overrides: str
) -> tuple[subprocess.CompletedProcess[str], Path, str]:
    """``elastic-run`` with no ``rdzv.id`` (the runner always passes one). The agent gets
    a marker ``TORCHELASTIC_RUN_ID`` of its own (returned), so that it is found if it
    survives; its workers get the run's fresh id, whatever the agent inherited."""
    argv, run_dir, marker = elastic_run.command(*overrides)
    done = subprocess.run(
        [arg for arg in argv if not arg.startswith("rdzv.id=")],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
        cwd=elastic_run.tmp_path,
        env={**os.environ, "TORCHELASTIC_RUN_ID": marker},
    )
    return done, run_dir, marker


def test_static_with_one_node_needs_no_id(elastic_run: ElasticRunner, probe_out: Path) -> None:
    port = free_port()
    done, run_dir, marker = _run_without_id(
        elastic_run,
        *probe_job(probe_out, nproc=2),
        "rdzv=static",
        "nnodes=1",
        f"rdzv.endpoint=127.0.0.1:{port}",
        "rdzv.node_rank=0",
        *FAST,
    )
    run_id = json.loads((run_dir / "result.json").read_text())["run_id"]
    elastic_run.run_ids.add(run_id)
    assert done.returncode == 0, done.stderr
    assert run_id != marker and len(run_id) == 32  # fresh per run, as with rdzv=local
    envs = [rec["env"] for rec in probe_records(probe_out).values()]
    assert [e["TORCHELASTIC_RUN_ID"] for e in envs] == [run_id, run_id]
    assert not _listening(port)  # the store it hosted is closed
    assert_nothing_survives({marker, run_id})


def test_static_with_more_nodes_still_needs_an_id(
    elastic_run: ElasticRunner, probe_out: Path
) -> None:
    port = free_port()
    done, run_dir, marker = _run_without_id(
        elastic_run,
        *probe_job(probe_out),
        "rdzv=static",
        "nnodes=2",
        f"rdzv.endpoint=127.0.0.1:{port}",
        "rdzv.node_rank=0",
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == [
        "elastic-run: error: rdzv.id=(unset): rdzv=static needs a job id shared by all "
        "nodes, e.g. rdzv.id=myjob"
    ]
    assert not list(run_dir.glob("attempt_*")) and not probe_records(probe_out)
    assert not _listening(port)  # refused before hosting the store
    assert_nothing_survives({marker})
