"""The pods of ``examples/kubernetes/`` run as agents on loopback, each with exactly the
command line and environment its controller gives it (``tests/k8s_env.py``: the
manifest's own variables, the ``PET_*`` ones, ``MASTER_*``, ``WORLD_SIZE``/``RANK`` where
the controller sets them, ``PYTHONUNBUFFERED``, ``JOB_COMPLETION_INDEX``). Of the test's
own environment they keep only what any container has too (``PATH``, ``HOME``, ...):
``Launcher.env`` of ``tests/e2e/test_torchrun.py`` drops every launcher's variable, and
this file's ``Launcher`` the pod-level ones the test runner may have set.

Only what cannot exist on one machine is relocated, value for value:

- the pods' DNS names (``train-c10d-worker-0``, ``train-v2-node-0-0.train-v2``,
  ``train-js-workers-0-0.train-js``) become ``localhost``, which, like those names in
  their cluster, resolves to the address of the node that hosts the store;
- the etcd Service ``etcd:2379`` becomes the test's etcd server (``etcd_server``);
- the fixed ports (the store's 23456, the master's 29500) become free ones, and each
  agent's health endpoint gets its own port on 127.0.0.1 instead of 8080 on 0.0.0.0 (two
  agents share this machine's addresses; the tests stay on loopback);
- ``/workspace/train.py`` becomes the node directory's ``train.py``.

Each job must end with workers of ranks 0..N-1 in one world, every agent exiting 0, and no
process of the test left (the marker and run ids of ``test_torchrun.py``'s ``Launcher``).
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from elastic_runner.testing.etcd import EtcdServer
from elastic_runner.testing.runner import http_status, wait_for
from tests.conftest import free_port
from tests.e2e import test_torchrun as torchrun_e2e
from tests.k8s_env import Pod, load, pods, with_master

#: Variables a pod gets only from its manifest or controller: the test's own are dropped.
_POD_VARS = frozenset({"PYTHONUNBUFFERED", "JOB_COMPLETION_INDEX", "HOSTNAME"})


class Launcher(torchrun_e2e.Launcher):
    """``test_torchrun``'s launcher, with the variables of ``_POD_VARS`` that the pod does
    not get (the test runner's ``PYTHONUNBUFFERED``) dropped too."""

    def env(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        env = super().env(extra)
        for name in _POD_VARS - set(extra or {}):
            env.pop(name, None)
        return env


@pytest.fixture
def launcher(tmp_path: Path) -> Iterator[Launcher]:
    launch = Launcher(tmp_path)
    try:
        yield launch
    finally:
        launch.close()


def _relocated(value: str, moves: Mapping[str, str]) -> str:
    for old, new in moves.items():
        value = value.replace(old, new)
    return value


def _healthy(port: int) -> bool:
    return http_status(port, "/healthz") == 200


def _run_job(
    launcher: Launcher,
    manifest: str | list[dict[str, Any]],
    moves: Mapping[str, str],
    kind: str,
    *,
    probe_rendezvous: bool = False,
) -> list[torchrun_e2e.Finished]:
    """Start every pod of the manifest as an agent in a node directory of its own (the
    last pod first: rank follows the controller's variables, not the order), wait for all,
    check that every agent exited 0 and the health port it was given reached the run;
    the agents' results, the last pod's first.

    ``probe_rendezvous``: while the agents wait in the rendezvous, each answers the
    manifests' probe path ``/healthz`` with 200 and ``/readyz`` with 503 (why the
    manifests' readiness probes use ``/healthz``)."""
    found: list[Pod] = pods(manifest)
    assert len(found) == 2
    agents, health_ports = [], []
    for node_index, pod in reversed(list(enumerate(found))):
        health = free_port()
        pod_moves = {
            **moves,
            "health.port=8080": f"health.port={health}",
            "health.host=0.0.0.0": "health.host=127.0.0.1",
            "/workspace/": "",
        }
        argv = [_relocated(a, pod_moves) for a in pod.argv]
        env = {k: _relocated(v, pod_moves) for k, v in pod.env.items()}
        assert argv[0] == "elastic-run"
        node = launcher.node(f"node{node_index}", {"train.py": kind})
        agents.append(launcher.start(*argv[1:], node=node, env=env))
        health_ports.append(health)
    if probe_rendezvous:
        for health in health_ports:
            wait_for(functools.partial(_healthy, health), what="/healthz answers 200")
            assert http_status(health, "/readyz") == 503
        assert not list(launcher.out.glob("r*.json")), "the workers started already"
    finished = []
    for agent, health in zip(agents, health_ports, strict=True):
        run = agent.finish()
        assert run.returncode == 0, run.stderr
        assert f"health.port={health}" in run.result()["overrides"]
        assert "health.host=127.0.0.1" in run.result()["overrides"]
        finished.append(run)
    return finished


def _check_world(launcher: Launcher, pythonunbuffered: str | None) -> list[dict[str, str]]:
    records = launcher.records()
    assert sorted(records) == [0, 1]
    envs = [rec["env"] for _, rec in sorted(records.items())]
    for rank, env in enumerate(envs):
        assert (env["RANK"], env["GROUP_RANK"], env["LOCAL_RANK"]) == (str(rank), str(rank), "0")
        assert (env["WORLD_SIZE"], env["GROUP_WORLD_SIZE"]) == ("2", "2")
        assert env.get("PYTHONUNBUFFERED") == pythonunbuffered
    assert len({e["TORCHELASTIC_RUN_ID"] for e in envs}) == 1
    assert len({(e["MASTER_ADDR"], e["MASTER_PORT"]) for e in envs}) == 1
    return envs


def test_pytorchjob_elastic_c10d(launcher: Launcher) -> None:
    """training-operator's elastic worker pods: only PET_* (the endpoint on worker-0's
    name and the operator's port), PET_NNODES=1:2; no MASTER_*/WORLD_SIZE/RANK."""
    moves = {"train-c10d-worker-0:23456": f"localhost:{free_port()}"}
    _run_job(launcher, "pytorchjob-elastic-c10d.yaml", moves, "world-2")
    envs = _check_world(launcher, "0")
    for env in envs:
        assert env["TORCHELASTIC_RUN_ID"] == "none"  # torchrun's default, no rdzvId
        assert env["TORCHELASTIC_MAX_RESTARTS"] == "3"


def test_pytorchjob_elastic_c10d_with_a_master_replica(launcher: Launcher) -> None:
    """The c10d job with one Master and one Worker: the operator adds MASTER_ADDR/PORT
    (``train-c10d-master-0:23456``), WORLD_SIZE, RANK, PET_NODE_RANK, PET_NPROC_PER_NODE on
    the pods; the workers get their own, from the rendezvous."""
    docs = with_master(load("pytorchjob-elastic-c10d.yaml"), "1")
    moves = {"train-c10d-worker-0:23456": f"localhost:{free_port()}"}
    finished = _run_job(launcher, docs, moves, "world-2")
    envs = _check_world(launcher, "0")
    for run in finished:  # said once, on one line
        assert "WORLD_SIZE/RANK of the agent's environment: not passed on" in run.stderr
    assert {(e["MASTER_ADDR"], e["MASTER_PORT"]) for e in envs} != {
        ("train-c10d-master-0", "23456")
    }


def test_pytorchjob_elastic_etcd(launcher: Launcher, etcd_server: EtcdServer) -> None:
    """The same with rdzvBackend etcd: PET_RDZV_ENDPOINT is rdzvHost:rdzvPort, the run id
    rdzvId, PET_NNODES=1:3: with two pods of at most three, the round waits the
    manifest's last_call_timeout (10 s, PET_RDZV_CONF) for a third."""
    moves = {"etcd:2379": etcd_server.endpoint}
    _run_job(launcher, "pytorchjob-elastic-etcd.yaml", moves, "world-2", probe_rendezvous=True)
    envs = _check_world(launcher, "0")
    for env in envs:
        assert env["TORCHELASTIC_RUN_ID"] == "train-etcd"
        assert env["TORCHELASTIC_MAX_RESTARTS"] == "3"


def test_trainjob_static_pet_variables(launcher: Launcher) -> None:
    """Trainer v2's PET_NNODES/PET_NODE_RANK/PET_MASTER_ADDR/PET_MASTER_PORT: node rank i
    is pod i, rank 0 listens on MASTER_PORT and rank 1 reaches it (torch's env://)."""
    port = torchrun_e2e._static_master_port()
    moves = {"train-v2-node-0-0.train-v2": "localhost", "29500": str(port)}
    _run_job(launcher, "trainjob.yaml", moves, "master-port")
    envs = _check_world(launcher, None)
    records = launcher.records()
    for rank, env in enumerate(envs):
        assert records[rank]["cwd"] == str(launcher.tmp_path / f"node{rank}")
        assert (env["MASTER_ADDR"], env["MASTER_PORT"]) == ("localhost", str(port))
        assert env["JOB_COMPLETION_INDEX"] == str(rank)
    assert records[0]["reached"] == [1]


def test_jobset_static_flags(launcher: Launcher) -> None:
    """JobSet: torchrun's static flags, the node rank from $(JOB_COMPLETION_INDEX), the
    master on node 0's stable DNS name; elastic-run's settings before ``torchrun``."""
    port = torchrun_e2e._static_master_port()
    moves = {
        "--master-addr=train-js-workers-0-0.train-js": "--master-addr=localhost",
        "--master-port=29500": f"--master-port={port}",
    }
    _run_job(launcher, "jobset.yaml", moves, "master-port")
    envs = _check_world(launcher, "1")
    records = launcher.records()
    for rank, env in enumerate(envs):
        assert records[rank]["cwd"] == str(launcher.tmp_path / f"node{rank}")
        assert (env["MASTER_ADDR"], env["MASTER_PORT"]) == ("localhost", str(port))
        assert env["TORCHELASTIC_RUN_ID"] == "train-js"
    assert records[0]["reached"] == [1]
