"""The pods of the manifests in ``examples/kubernetes/`` as their controllers make them:
each pod's command line and exactly the environment its container gets (the manifest's
own variables plus what the controller adds), by the controllers' own rules:

- Kubeflow training-operator v1.9, ``PyTorchJob`` (``pkg/controller.v1/pytorch/envvar.go``,
  ``master.go``, ``elastic.go``): ``PYTHONUNBUFFERED=0`` on every pod; with a ``Master``
  replica, ``MASTER_ADDR``/``MASTER_PORT``, ``WORLD_SIZE`` (replicas x nproc), ``RANK``,
  ``PET_NPROC_PER_NODE``, ``PET_NODE_RANK``; with ``elasticPolicy``, ``PET_RDZV_ENDPOINT``
  (``rdzvHost`` or ``<job>-worker-0``, ``rdzvPort`` or the container port named
  ``pytorchjob-port``), ``PET_RDZV_BACKEND`` (``c10d`` by default), ``PET_NNODES``
  (``min:max``, or the worker replicas), ``PET_MAX_RESTARTS``, ``PET_NPROC_PER_NODE``
  (``elasticPolicy.nProcPerNode``), ``PET_RDZV_ID``, ``PET_RDZV_CONF``, ``PET_STANDALONE``;
  without it, ``PET_NNODES`` = the replicas.
- Kubeflow Trainer v2, ``TrainJob`` (``pkg/runtime/framework/plugins/torch/torch.go``):
  ``PET_NNODES``, ``PET_NPROC_PER_NODE``, ``PET_NODE_RANK`` (the completion index),
  ``PET_MASTER_ADDR=<trainjob>-node-0-0.<trainjob>``, ``PET_MASTER_PORT=29500`` on the
  ``node`` container, whose image, command, args and env the TrainJob's ``trainer``
  overrides (env merged); it runs on a JobSet, so the Job controller's
  ``JOB_COMPLETION_INDEX`` too.
- JobSet: no training variables; the Job controller sets ``JOB_COMPLETION_INDEX`` on each
  pod of an Indexed Job (JobSet's default completion mode).

``$(VAR)`` in a command is expanded from the container's environment as the kubelet does
(``$$`` is a ``$``; an unknown ``$(VAR)`` stays as written).
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "kubernetes"

#: Each manifest and the (apiVersion, kind) of its documents, in order.
MANIFESTS: Mapping[str, tuple[tuple[str, str], ...]] = {
    "pytorchjob-elastic-c10d.yaml": (("kubeflow.org/v1", "PyTorchJob"),),
    "pytorchjob-elastic-etcd.yaml": (
        ("kubeflow.org/v1", "PyTorchJob"),
        ("apps/v1", "Deployment"),
        ("v1", "Service"),
    ),
    "trainjob.yaml": (
        ("trainer.kubeflow.org/v1alpha1", "TrainingRuntime"),
        ("trainer.kubeflow.org/v1alpha1", "TrainJob"),
    ),
    "jobset.yaml": (("jobset.x-k8s.io/v1alpha2", "JobSet"),),
}

#: Kubeflow training-operator v1.9 (pkg/apis/kubeflow.org/v1/pytorch_types.go).
PYTORCHJOB_CONTAINER = "pytorch"
PYTORCHJOB_PORT_NAME = "pytorchjob-port"
PYTORCHJOB_DEFAULT_PORT = 23456
#: Kubeflow Trainer (pkg/constants/constants.go): the trainer container and its port.
TRAINER_NODE = "node"
TRAINER_PORT = 29500

_VAR = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


@dataclass(frozen=True)
class Pod:
    """One pod of a manifest's training job."""

    #: The controller's name for it: ``train-c10d-worker-1``, ``train-js-workers-0-1``.
    name: str
    #: The container's command and args, ``$(VAR)`` expanded.
    argv: tuple[str, ...]
    #: Exactly the environment of the container (the manifest's and the controllers').
    env: Mapping[str, str]
    #: The container as the manifest writes it (probes, ports).
    container: Mapping[str, Any]
    termination_grace_period: int


def load(manifest: str) -> list[dict[str, Any]]:
    with (EXAMPLES / manifest).open() as f:
        return [doc for doc in yaml.safe_load_all(f) if doc is not None]


def expand(value: str, env: Mapping[str, str]) -> str:
    """``$(VAR)`` as the kubelet expands it in a container's command and args."""

    def one(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        return env.get(m.group(1), m.group(0))

    return _VAR.sub(one, value)


def pods(manifest: str | list[dict[str, Any]]) -> list[Pod]:
    """The training pods of a manifest (not etcd's), or of its documents, in the order of
    their index (Master before Worker)."""
    docs = load(manifest) if isinstance(manifest, str) else manifest
    kinds = {doc["kind"]: doc for doc in docs}
    if "PyTorchJob" in kinds:
        return _pytorchjob(kinds["PyTorchJob"])
    if "TrainJob" in kinds:
        runtime = kinds["TrainingRuntime"]
        return _trainjob(kinds["TrainJob"], runtime)
    if "JobSet" in kinds:
        return _jobset(kinds["JobSet"])
    raise AssertionError(f"{manifest}: no training job in it")


def _container_env(container: Mapping[str, Any]) -> dict[str, str]:
    env = {}
    for var in container.get("env", []):
        assert "value" in var, f"{var['name']}: only plain values are modelled"
        env[var["name"]] = str(var["value"])
    return env


def _pod(
    name: str, container: Mapping[str, Any], env: dict[str, str], pod_spec: Mapping[str, Any]
) -> Pod:
    argv = [*container.get("command", []), *container.get("args", [])]
    return Pod(
        name=name,
        argv=tuple(expand(str(a), env) for a in argv),
        env=env,
        container=container,
        termination_grace_period=int(pod_spec.get("terminationGracePeriodSeconds", 30)),
    )


def _pytorchjob(job: Mapping[str, Any]) -> list[Pod]:
    name = job["metadata"]["name"]
    spec = job["spec"]
    replica_specs = spec["pytorchReplicaSpecs"]
    elastic = spec.get("elasticPolicy")
    total = sum(int(r.get("replicas", 1)) for r in replica_specs.values())
    nproc = str(spec.get("nprocPerNode", "auto"))
    found = []
    for rtype in ("Master", "Worker"):
        if rtype not in replica_specs:
            continue
        pod_spec = replica_specs[rtype]["template"]["spec"]
        for index in range(int(replica_specs[rtype].get("replicas", 1))):
            (container,) = (c for c in pod_spec["containers"] if c["name"] == PYTORCHJOB_CONTAINER)
            env = _container_env(container)
            env["PYTHONUNBUFFERED"] = "0"
            if "Master" in replica_specs:
                rank = index + 1 if rtype == "Worker" else index
                env["MASTER_PORT"] = str(_port(replica_specs["Master"]))
                env["MASTER_ADDR"] = f"{name}-master-0"
                env["PET_MASTER_PORT"] = env["MASTER_PORT"]
                env["PET_MASTER_ADDR"] = env["MASTER_ADDR"]
                env["WORLD_SIZE"] = str(total * (int(nproc) if nproc.isdigit() else 1))
                env["RANK"] = str(rank)
                env["PET_NPROC_PER_NODE"] = nproc
                env["PET_NODE_RANK"] = str(rank)
            if elastic is None:
                env["PET_NNODES"] = str(total)
            else:
                env.update(_elastic_env(name, elastic, replica_specs))
            found.append(_pod(f"{name}-{rtype.lower()}-{index}", container, env, pod_spec))
    return found


def _port(replica_spec: Mapping[str, Any]) -> int:
    for container in replica_spec["template"]["spec"]["containers"]:
        if container["name"] == PYTORCHJOB_CONTAINER:
            for port in container.get("ports", []):
                if port.get("name") == PYTORCHJOB_PORT_NAME:
                    return int(port["containerPort"])
    # the operator's defaulting adds this port when the container lacks it
    return PYTORCHJOB_DEFAULT_PORT


def _elastic_env(
    name: str, policy: Mapping[str, Any], replica_specs: Mapping[str, Any]
) -> dict[str, str]:
    host = policy.get("rdzvHost", f"{name}-worker-0")
    port = policy.get("rdzvPort", _port(replica_specs["Worker"]))
    env = {
        "PET_RDZV_ENDPOINT": f"{host}:{port}",
        "PET_RDZV_BACKEND": str(policy.get("rdzvBackend", "c10d")),
    }
    if "minReplicas" not in policy and "maxReplicas" not in policy:
        env["PET_NNODES"] = str(replica_specs["Worker"].get("replicas", 1))
    else:
        env["PET_NNODES"] = f"{policy['minReplicas']}:{policy['maxReplicas']}"
    if "maxRestarts" in policy:
        env["PET_MAX_RESTARTS"] = str(policy["maxRestarts"])
    if "nProcPerNode" in policy:
        env["PET_NPROC_PER_NODE"] = str(policy["nProcPerNode"])
    if "rdzvId" in policy:
        env["PET_RDZV_ID"] = str(policy["rdzvId"])
    if policy.get("rdzvConf"):
        env["PET_RDZV_CONF"] = ",".join(f"{c['key']}={c['value']}" for c in policy["rdzvConf"])
    if policy.get("standalone"):
        env["PET_STANDALONE"] = ""
    return env


def _trainjob(job: Mapping[str, Any], runtime: Mapping[str, Any]) -> list[Pod]:
    name = job["metadata"]["name"]
    ref = job["spec"]["runtimeRef"]
    assert (ref["name"], ref.get("kind")) == (runtime["metadata"]["name"], runtime["kind"]), ref
    trainer = job["spec"].get("trainer", {})
    policy = runtime["spec"].get("mlPolicy", {})
    (rjob,) = (
        r
        for r in runtime["spec"]["template"]["spec"]["replicatedJobs"]
        if r["name"] == TRAINER_NODE
    )
    pod_spec = rjob["template"]["spec"]["template"]["spec"]
    (base,) = (c for c in pod_spec["containers"] if c["name"] == TRAINER_NODE)
    container = dict(base)
    for key in ("image", "command", "args"):
        if key in trainer:
            container[key] = trainer[key]
    overridden = {v["name"] for v in trainer.get("env", [])}
    container["env"] = [
        *(v for v in base.get("env", []) if v["name"] not in overridden),
        *trainer.get("env", []),
    ]
    nnodes = int(trainer.get("numNodes", policy.get("numNodes", 1)))
    nproc = trainer.get("numProcPerNode", policy.get("torch", {}).get("numProcPerNode", "auto"))
    found = []
    for index in range(nnodes):
        env = _container_env(container)
        reserved = {k for k in env if k.startswith("PET_")}
        assert not reserved, f"the Trainer's webhook rejects user-set {sorted(reserved)}"
        env.update(
            {
                "PET_NNODES": str(nnodes),
                "PET_NPROC_PER_NODE": str(nproc),
                "PET_NODE_RANK": str(index),
                "PET_MASTER_ADDR": f"{name}-{TRAINER_NODE}-0-0.{name}",
                "PET_MASTER_PORT": str(TRAINER_PORT),
                "JOB_COMPLETION_INDEX": str(index),
            }
        )
        found.append(_pod(f"{name}-{TRAINER_NODE}-0-{index}", container, env, pod_spec))
    return found


def _jobset(jobset: Mapping[str, Any]) -> list[Pod]:
    name = jobset["metadata"]["name"]
    found = []
    for rjob in jobset["spec"]["replicatedJobs"]:
        job_spec = rjob["template"]["spec"]
        assert job_spec.get("completionMode", "Indexed") == "Indexed"
        pod_spec = job_spec["template"]["spec"]
        (container,) = pod_spec["containers"]
        for job_index in range(int(rjob.get("replicas", 1))):
            for index in range(int(job_spec.get("parallelism", 1))):
                env = _container_env(container)
                env["JOB_COMPLETION_INDEX"] = str(index)
                pod_name = f"{name}-{rjob['name']}-{job_index}-{index}"
                found.append(_pod(pod_name, container, env, pod_spec))
    return found


def with_master(docs: list[dict[str, Any]], nproc_per_node: str) -> list[dict[str, Any]]:
    """A PyTorchJob's documents with one of its workers made the ``Master`` replica (the
    operator then sets ``MASTER_*``, ``WORLD_SIZE``, ``RANK`` on every pod) and
    ``spec.nprocPerNode`` set."""
    docs = copy.deepcopy(docs)
    (job,) = (d for d in docs if d["kind"] == "PyTorchJob")
    specs = job["spec"]["pytorchReplicaSpecs"]
    master = copy.deepcopy(specs["Worker"])
    master["replicas"] = 1
    specs["Worker"]["replicas"] -= 1
    job["spec"]["pytorchReplicaSpecs"] = {"Master": master, **specs}
    job["spec"]["nprocPerNode"] = nproc_per_node
    return docs
