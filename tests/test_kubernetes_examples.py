"""The manifests in ``examples/kubernetes/``: they parse, each document is the kind it
should be, and every training pod's command line is an elastic-run command line that
composes to a valid config with the environment its controller gives the pod
(``tests/k8s_env.py``): the torchrun form through ``prepare`` as ``elastic-run`` runs it,
the overrides before ``torchrun`` and in ``ELASTIC_RUN_OVERRIDES`` through Hydra's own
override parser, the config through Hydra's compose API and ``validate``. Then what the
config says is checked against the manifest: the backend and endpoint the controller's
variables choose, ``stop_timeout`` below ``terminationGracePeriodSeconds``, and the probes
on the health port the command sets, on every address.

The end-to-end counterpart, ``tests/e2e/test_kubernetes_env.py``, runs these pods as
agents on loopback.
"""

from __future__ import annotations

import shlex
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from elastic_runner.config import ElasticRunConfig, ValidConfig, register_configs, validate
from elastic_runner.plugins import load_plugins
from elastic_runner.registry import ComponentKind
from elastic_runner.rendezvous.kit import StoreRendezvousConfig, settings_from
from elastic_runner.resources import conf_dir
from elastic_runner.spec import RunContext
from elastic_runner.torchrun.front import OVERRIDES_ENV, prepare, split_torchrun_form
from tests.k8s_env import EXAMPLES, MANIFESTS, Pod, load, pods, with_master

PLUGINS = load_plugins()
BACKENDS = PLUGINS.registry.names(ComponentKind.RENDEZVOUS)


@dataclass(frozen=True)
class Parsed:
    """What ``elastic-run`` makes of one pod's command line and environment."""

    conf: ElasticRunConfig
    valid: ValidConfig
    #: elastic-run's own overrides (before ``torchrun`` and in ELASTIC_RUN_OVERRIDES).
    user_overrides: tuple[str, ...]


ParsePod = Callable[[Pod], Parsed]


@pytest.fixture(scope="module")
def parse() -> Iterator[ParsePod]:
    """``parse(pod)``: the pod's config as ``elastic-run`` composes it."""
    register_configs(PLUGINS.registry)

    def parse_pod(pod: Pod) -> Parsed:
        argv = list(pod.argv)
        if argv[0] == "torchrun":  # the image's wrapper: exec elastic-run torchrun "$@"
            argv = ["elastic-run", *argv]
        assert argv[0] == "elastic-run", pod.argv
        form = split_torchrun_form(argv[1:])
        assert form is not None, f"{pod.name}: not a torchrun line: {argv}"
        overrides, torchrun_argv = form
        user = [*overrides, *shlex.split(pod.env.get(OVERRIDES_ENV, ""))]
        # elastic-run's own settings are Hydra overrides: Hydra's grammar must read them
        parsed = OverridesParser.create().parse_overrides(user)
        assert [o.key_or_group for o in parsed] == [o.partition("=")[0] for o in user]
        hydra_argv, patch = prepare(overrides, torchrun_argv, dict(pod.env), backends=BACKENDS)
        cfg = compose("config", overrides=[o for o in hydra_argv if not o.startswith("hydra.")])
        patch.apply(cfg)
        conf = OmegaConf.to_object(cfg)
        assert isinstance(conf, ElasticRunConfig)
        valid = validate(conf)
        rdzv = conf.rdzv
        if isinstance(rdzv, StoreRendezvousConfig):  # what the backend's factory checks
            assert rdzv.id, f"{pod.name}: the nodes of a job must share a run id"
            settings_from(
                rdzv,
                RunContext(rdzv.id, Path("."), "node", valid.min_nodes, valid.max_nodes),
                node_rank=getattr(rdzv, "node_rank", None),
                close_timeout=getattr(rdzv, "close_timeout", None),
            )
        return Parsed(conf, valid, tuple(user))

    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        yield parse_pod


def test_every_manifest_is_here_and_nothing_else() -> None:
    assert sorted(p.name for p in EXAMPLES.glob("*.yaml")) == sorted(MANIFESTS)
    assert (EXAMPLES / "Dockerfile").is_file() and (EXAMPLES / "README.md").is_file()


@pytest.mark.parametrize("manifest", sorted(MANIFESTS))
def test_manifest_parses_with_the_expected_kinds(manifest: str) -> None:
    docs = load(manifest)
    assert tuple((d["apiVersion"], d["kind"]) for d in docs) == MANIFESTS[manifest]
    for doc in docs:
        assert doc["metadata"]["name"]


@pytest.mark.parametrize("manifest", sorted(MANIFESTS))
def test_training_containers_run_elastic_run(manifest: str) -> None:
    found = pods(manifest)
    assert len(found) >= 2
    for pod in found:
        assert pod.argv[:2] == ("elastic-run", "torchrun") or (
            pod.argv[0] == "elastic-run" and "torchrun" in pod.argv
        ), pod.argv
        # the image placeholder, with a comment on how to build it
        assert pod.container["image"] == "registry.example.com/elastic-run-train:0.1"
    assert "examples/kubernetes/Dockerfile" in (EXAMPLES / manifest).read_text()


# what each manifest's controller variables must make of the torchrun line:
# (backend, (min, max) nodes, endpoint, run id, max_restarts)
EXPECTED = {
    "pytorchjob-elastic-c10d.yaml": ("tcp", (1, 2), "train-c10d-worker-0:23456", "none", 3),
    "pytorchjob-elastic-etcd.yaml": ("etcd", (1, 3), "etcd:2379", "train-etcd", 3),
    "trainjob.yaml": ("static", (2, 2), "train-v2-node-0-0.train-v2:29501", "none", 0),
    "jobset.yaml": ("static", (2, 2), "train-js-workers-0-0.train-js:29501", "train-js", 0),
}


@pytest.mark.parametrize("manifest", sorted(MANIFESTS))
def test_commands_parse_as_elastic_run_command_lines(manifest: str, parse: ParsePod) -> None:
    backend, nodes, endpoint, run_id, max_restarts = EXPECTED[manifest]
    found = pods(manifest)
    for index, pod in enumerate(found):
        parsed = parse(pod)
        conf, rdzv = parsed.conf, parsed.conf.rdzv
        assert rdzv.backend == backend, pod.name
        assert (parsed.valid.min_nodes, parsed.valid.max_nodes) == nodes
        assert getattr(rdzv, "endpoint", None) == endpoint
        assert rdzv.id == run_id
        assert conf.max_restarts == max_restarts
        assert parsed.valid.nproc_per_node == 1
        assert conf.job.entrypoint == "/workspace/train.py"
        if backend == "etcd":  # rdzvConf, through PET_RDZV_CONF
            assert getattr(rdzv, "last_call_timeout", None) == 10
        if backend == "static":  # ranks by the pod's index; MASTER_* as under torchrun
            assert getattr(rdzv, "node_rank", None) == index
            host = endpoint.rpartition(":")[0]
            assert (rdzv.master_addr, rdzv.master_port) == (host, 29500)
    # every pod of a job agrees on the rendezvous
    assert len({parse(p).conf.rdzv.id for p in found}) == 1


@pytest.mark.parametrize("manifest", sorted(MANIFESTS))
def test_stop_timeout_is_below_the_grace_period(manifest: str, parse: ParsePod) -> None:
    for pod in pods(manifest):
        parsed = parse(pod)
        assert any(o.startswith("stop_timeout=") for o in parsed.user_overrides), pod.name
        assert 0 < parsed.conf.stop_timeout < pod.termination_grace_period, pod.name
        # the relation is stated where it is set
        assert "< terminationGracePeriodSeconds" in (EXAMPLES / manifest).read_text()


@pytest.mark.parametrize("manifest", sorted(MANIFESTS))
def test_probes_point_at_the_health_port(manifest: str, parse: ParsePod) -> None:
    for pod in pods(manifest):
        health = parse(pod).conf.health
        assert health.port > 0, f"{pod.name}: no health.port"
        assert health.host == "0.0.0.0", f"{pod.name}: the kubelet probes the pod's address"
        for probe in ("livenessProbe", "readinessProbe"):
            get = pod.container[probe]["httpGet"]
            assert get["port"] == health.port, (pod.name, probe)
            assert get["path"] in {"/healthz", "/readyz"}, (pod.name, probe)
        assert pod.container["livenessProbe"]["httpGet"]["path"] == "/healthz"
        declared: Mapping[str, int] = {
            p.get("name", ""): p["containerPort"] for p in pod.container.get("ports", [])
        }
        assert declared.get("health") == health.port


def test_pytorchjob_env_is_the_operators() -> None:
    """The PET_* variables the model of the operator gives an elastic worker pod."""
    pod = pods("pytorchjob-elastic-c10d.yaml")[1]
    assert pod.name == "train-c10d-worker-1"
    assert {k: v for k, v in pod.env.items() if k != OVERRIDES_ENV} == {
        "PYTHONUNBUFFERED": "0",
        "PET_RDZV_ENDPOINT": "train-c10d-worker-0:23456",
        "PET_RDZV_BACKEND": "c10d",
        "PET_NNODES": "1:2",
        "PET_MAX_RESTARTS": "3",
    }


def test_trainjob_and_jobset_env_is_their_controllers() -> None:
    trainjob = pods("trainjob.yaml")[1]
    assert {k: v for k, v in trainjob.env.items() if k != OVERRIDES_ENV} == {
        "PET_NNODES": "2",
        "PET_NPROC_PER_NODE": "1",
        "PET_NODE_RANK": "1",
        "PET_MASTER_ADDR": "train-v2-node-0-0.train-v2",
        "PET_MASTER_PORT": "29500",
        "JOB_COMPLETION_INDEX": "1",
    }
    jobset = pods("jobset.yaml")[1]
    assert jobset.env == {"PYTHONUNBUFFERED": "1", "JOB_COMPLETION_INDEX": "1"}
    assert "--node-rank=1" in jobset.argv  # $(JOB_COMPLETION_INDEX), as the kubelet expands it


def test_pytorchjob_with_a_master_replica(parse: ParsePod) -> None:
    """With a ``Master`` replica the operator also sets ``MASTER_*``, ``WORLD_SIZE`` and
    ``RANK`` on the pods: the command line still parses to the same rendezvous (those are
    noted, not passed on; each worker gets its own)."""
    master, worker = pods(with_master(load("pytorchjob-elastic-c10d.yaml"), "1"))
    assert (master.name, worker.name) == ("train-c10d-master-0", "train-c10d-worker-0")
    for rank, pod in enumerate((master, worker)):
        assert {k: pod.env[k] for k in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK")} == {
            "MASTER_ADDR": "train-c10d-master-0",
            "MASTER_PORT": "23456",
            "WORLD_SIZE": "2",
            "RANK": str(rank),
        }
        assert (pod.env["PET_NODE_RANK"], pod.env["PET_NPROC_PER_NODE"]) == (str(rank), "1")
        parsed = parse(pod)
        assert parsed.conf.rdzv.backend == "tcp"
        assert getattr(parsed.conf.rdzv, "endpoint", None) == "train-c10d-worker-0:23456"
