"""Slurm mode without a cluster: detection from a step's environment (copied from a real
``srun -N3 --ntasks-per-node=1 env`` on the test cluster), hostlists, ``slurm.conf``, the
store's port, the plan for each command line, the one-line errors, and the GPUs Slurm
gives a step. The real cluster's tests are in ``tests/e2e/test_slurm.py``."""

from __future__ import annotations

import logging
import re
import subprocess
from collections.abc import Sequence
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf

from elastic_runner.accelerators import DEVICE_ROOT_ENV, detect_gpus
from elastic_runner.config import ConfigError
from elastic_runner.schedulers.slurm import (
    PORT_BASE,
    PORT_SLOTS,
    FileReader,
    SlurmError,
    SlurmStep,
    command_line,
    detect,
    expand_hostlist,
    node_address,
    parse_tasks_per_node,
    plan,
    slurm_conf_addresses,
    store_port,
)
from tests.conftest import ElasticRunner
from tests.test_accelerators import nvidia_proc

CONF_PATH = "/tmp/slurm-er129c49a9-huuuiq5y/slurm.conf"
#: The test cluster's node line (tests/e2e's cluster writes the same).
CONF = (
    "ClusterName=er129c49a9\n"
    "SlurmctldHost=localhost(127.0.0.1)\n"
    "# NodeName=n[1-3] NodeAddr=10.9.9.9  (a comment)\n"
    "NodeName=n[1-3] NodeHostname=localhost NodeAddr=127.0.0.1 Port=47703,35937,42361 "
    "CPUs=2 RealMemory=1000 State=UNKNOWN\n"
    "PartitionName=debug Nodes=n[1-3] Default=YES MaxTime=INFINITE State=UP\n"
)

#: Task 0's SLURM_* variables of `srun -N3 --ntasks-per-node=1 env` on the test cluster.
STEP_ENV = {
    "SLURMD_NODENAME": "n1",
    "SLURM_CLUSTER_NAME": "er129c49a9",
    "SLURM_CONF": CONF_PATH,
    "SLURM_CPUS_ON_NODE": "1",
    "SLURM_GTIDS": "0",
    "SLURM_JOBID": "15724344",
    "SLURM_JOB_CPUS_PER_NODE": "1(x3)",
    "SLURM_JOB_GID": "0",
    "SLURM_JOB_ID": "15724344",
    "SLURM_JOB_NAME": "env",
    "SLURM_JOB_NODELIST": "n[1-3]",
    "SLURM_JOB_NUM_NODES": "3",
    "SLURM_JOB_PARTITION": "debug",
    "SLURM_JOB_UID": "0",
    "SLURM_JOB_USER": "root",
    "SLURM_LAUNCH_NODE_IPADDR": "127.0.0.1",
    "SLURM_LOCALID": "0",
    "SLURM_NNODES": "3",
    "SLURM_NODEID": "0",
    "SLURM_NODELIST": "n[1-3]",
    "SLURM_NPROCS": "3",
    "SLURM_NTASKS": "3",
    "SLURM_NTASKS_PER_NODE": "1",
    "SLURM_PRIO_PROCESS": "0",
    "SLURM_PROCID": "0",
    "SLURM_SRUN_COMM_HOST": "127.0.0.1",
    "SLURM_SRUN_COMM_PORT": "44869",
    "SLURM_STEPID": "0",
    "SLURM_STEP_ID": "0",
    "SLURM_STEP_LAUNCHER_PORT": "44869",
    "SLURM_STEP_NODELIST": "n[1-3]",
    "SLURM_STEP_NUM_NODES": "3",
    "SLURM_STEP_NUM_TASKS": "3",
    "SLURM_STEP_TASKS_PER_NODE": "1(x3)",
    "SLURM_SUBMIT_DIR": "/tmp/slurm-er129c49a9-huuuiq5y",
    "SLURM_SUBMIT_HOST": "vm",
    "SLURM_TASKS_PER_NODE": "1(x3)",
    "SLURM_TASK_PID": "4953",
    "SLURM_TOPOLOGY_ADDR": "n1",
    "SLURM_TOPOLOGY_ADDR_PATTERN": "node",
    "SLURM_UMASK": "0022",
}


def node_env(node: int, **changes: str) -> dict[str, str]:
    """Task ``node``'s environment in that step (what differs per node), with ``changes``."""
    env = dict(STEP_ENV)
    env.update(
        SLURMD_NODENAME=f"n{node + 1}",
        SLURM_NODEID=str(node),
        SLURM_PROCID=str(node),
        SLURM_GTIDS=str(node),
        SLURM_TOPOLOGY_ADDR=f"n{node + 1}",
    )
    env.update(changes)
    return env


def files(contents: dict[str, str]) -> FileReader:
    """A file reader serving ``contents`` by path (``OSError`` for any other path)."""

    def read(path: str) -> str:
        if path in contents:
            return contents[path]
        raise FileNotFoundError(2, "No such file or directory", path)

    return read


def conf_reader(path: str) -> str:
    if path == CONF_PATH:
        return CONF
    raise FileNotFoundError(2, "No such file or directory", path)


def no_command(argv: Sequence[str], timeout: float) -> str:
    raise AssertionError(f"no command should run: {argv}")


def unresolved(name: str) -> bool:
    return False


def step_of(env: dict[str, str]) -> SlurmStep:
    step = detect(env, read_file=conf_reader, run=no_command, resolves=unresolved)
    assert step is not None
    return step


# -- detection ------------------------------------------------------------------------------


@pytest.mark.parametrize("node", [0, 1, 2])
def test_a_real_step_is_detected_with_its_first_node_as_the_store(node: int) -> None:
    step = step_of(node_env(node))
    assert step == SlurmStep(
        job_id=15724344,
        step_id=0,
        nnodes=3,
        node_rank=node,
        head="n1",
        head_address="127.0.0.1",
        address_source=f"NodeAddr in {CONF_PATH}",
        port=store_port(15724344, 0),
    )
    assert step.rdzv_id == "slurm-15724344.0"
    assert step.endpoint == f"127.0.0.1:{step.port}"


def test_a_name_that_resolves_is_used_as_it_is() -> None:
    step = detect(
        node_env(1), read_file=conf_reader, run=no_command, resolves=lambda name: name == "n1"
    )
    assert step is not None and (step.head_address, step.address_source) == (
        "n1",
        "its name resolves",
    )


def test_the_steps_own_variables_win_over_the_jobs() -> None:
    # a 2-node step in a 3-node job: srun -N2 inside sbatch -N3
    env = node_env(
        1,
        SLURM_STEP_NUM_NODES="2",
        SLURM_STEP_NODELIST="n[2-3]",
        SLURM_STEP_TASKS_PER_NODE="1(x2)",
        SLURM_STEP_NUM_TASKS="2",
        SLURM_STEP_ID="4",
    )
    step = step_of(env)
    assert (step.nnodes, step.head, step.step_id, step.rdzv_id) == (2, "n2", 4, "slurm-15724344.4")


@pytest.mark.parametrize("missing", ["SLURM_JOB_ID", "SLURM_STEP_ID"])
def test_outside_a_step_nothing_is_detected(missing: str) -> None:
    env = node_env(0)
    del env[missing]  # the batch script has no SLURM_STEP_ID
    assert detect(env, read_file=conf_reader, run=no_command, resolves=unresolved) is None
    with pytest.raises(SlurmError, match=r"^scheduler=slurm: not in a Slurm job step"):
        detect(env, required=True, read_file=conf_reader, run=no_command, resolves=unresolved)


def test_the_batch_scripts_own_step_id_is_no_srun_step() -> None:
    env = node_env(0, SLURM_STEP_ID="4294967291")
    assert detect(env, read_file=conf_reader, run=no_command, resolves=unresolved) is None
    with pytest.raises(SlurmError, match="is not an srun step"):
        detect(env, required=True, read_file=conf_reader, run=no_command, resolves=unresolved)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (
            {"SLURM_STEP_TASKS_PER_NODE": "2(x3)", "SLURM_STEP_NUM_TASKS": "6"},
            "Slurm mode: this step runs 2 tasks on a node (SLURM_STEP_TASKS_PER_NODE=2(x3)); "
            "elastic-run is one agent per node, which starts the workers itself: run it with "
            "srun --ntasks-per-node=1 (srun -N3 --ntasks-per-node=1 elastic-run ...)",
        ),
        (
            {"SLURM_STEP_TASKS_PER_NODE": "1,2,1"},
            "this step runs 2 tasks on a node (SLURM_STEP_TASKS_PER_NODE=1,2,1)",
        ),
        (
            {"SLURM_STEP_TASKS_PER_NODE": "", "SLURM_STEP_NUM_TASKS": "4"},
            "this step runs 4 tasks on 3 nodes (SLURM_STEP_NUM_TASKS); elastic-run is one",
        ),
        ({"SLURM_NODEID": "x"}, "Slurm mode: SLURM_NODEID='x': expected an integer"),
        ({"SLURM_NODEID": "3"}, "SLURM_NODEID=3 is not a node of the step"),
        ({"SLURM_STEP_NODELIST": "n[1-3", "SLURM_JOB_NODELIST": ""}, "unbalanced brackets"),
    ],
)
def test_steps_that_cannot_be_used_are_one_line(changes: dict[str, str], message: str) -> None:
    with pytest.raises(SlurmError) as caught:
        step_of(node_env(0, **changes))
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


def test_missing_variables_are_named() -> None:
    env = node_env(0)
    for name in ("SLURM_STEP_NUM_NODES", "SLURM_NNODES"):
        del env[name]
    with pytest.raises(SlurmError, match="SLURM_STEP_NUM_NODES or SLURM_NNODES not set"):
        step_of(env)
    env = node_env(0)
    for name in ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST"):
        del env[name]
    with pytest.raises(SlurmError, match="SLURM_STEP_NODELIST or SLURM_JOB_NODELIST not set"):
        step_of(env)


# -- the head's address ---------------------------------------------------------------------


def test_slurm_conf_node_lines() -> None:
    text = (
        "nodename=DEFAULT CPUs=4\n"
        "NodeName=gpu[01-03] NodeAddr=10.0.0.[1-3] CPUs=8  # one address each\n"
        "NodeName=big NodeHostname=big-host\n"
        "NodeName=a[1-2],b1 NodeAddr=192.168.0.7\n"
        "NodeName=odd[1-3] NodeAddr=10.1.0.[1-2]\n"  # counts differ: skipped
        "NodeName=bad[1-x] NodeAddr=1.2.3.4\n"
        "NodeName=plain\n"
        "  NODENAME=upper NODEADDR=fd00::1\n"
    )
    assert slurm_conf_addresses(text) == {
        "gpu01": "10.0.0.1",
        "gpu02": "10.0.0.2",
        "gpu03": "10.0.0.3",
        "big": "big-host",
        "a1": "192.168.0.7",
        "a2": "192.168.0.7",
        "b1": "192.168.0.7",
        "upper": "fd00::1",
    }
    assert slurm_conf_addresses(CONF) == {f"n{k}": "127.0.0.1" for k in (1, 2, 3)}


def test_an_ipv6_node_address_is_bracketed_in_the_endpoint() -> None:
    step = detect(
        node_env(0),
        read_file=files({CONF_PATH: "NodeName=n[1-3] NodeAddr=fd00::1\n"}),
        run=no_command,
        resolves=unresolved,
    )
    assert step is not None and step.endpoint == f"[fd00::1]:{step.port}"


def test_the_default_slurm_conf_then_scontrol_are_tried() -> None:
    calls: list[tuple[list[str], float]] = []

    def scontrol(argv: Sequence[str], timeout: float) -> str:
        calls.append((list(argv), timeout))
        return "NodeName=n1 Arch=x86_64 CoresPerSocket=1\n   NodeAddr=10.2.3.4 NodeHostName=h1\n"

    env = {k: v for k, v in node_env(0).items() if k != "SLURM_CONF"}
    assert node_address("n1", env, read_file=conf_reader, run=scontrol, resolves=unresolved) == (
        "10.2.3.4",
        "scontrol show node",
    )
    assert calls == [(["scontrol", "show", "node", "n1"], 5.0)]


@pytest.mark.parametrize(
    ("error", "said"),
    [
        (FileNotFoundError(2, "No such file", "scontrol"), "scontrol: not installed"),
        (subprocess.TimeoutExpired(["scontrol"], 5.0), "scontrol show node: no answer in 5 s"),
        (subprocess.CalledProcessError(1, ["scontrol"]), "scontrol show node: exit 1"),
    ],
)
def test_no_address_anywhere_is_one_line_naming_what_was_tried(
    error: BaseException, said: str
) -> None:
    def scontrol(argv: Sequence[str], timeout: float) -> str:
        raise error

    env = node_env(0, SLURM_CONF="/nowhere/slurm.conf")
    with pytest.raises(SlurmError) as caught:
        node_address("n1", env, read_file=conf_reader, run=scontrol, resolves=unresolved)
    assert str(caught.value) == (
        "Slurm mode: cannot find the address of the step's first node 'n1', which hosts the "
        "rendezvous store ('n1' does not resolve; /nowhere/slurm.conf: No such file or "
        f"directory; {said}); set rdzv.endpoint=<host>:<port> (or scheduler=none)"
    )


def test_a_conf_without_the_node_says_so() -> None:
    def scontrol(argv: Sequence[str], timeout: float) -> str:
        return "Node zz not found\n"

    env = node_env(0)
    with pytest.raises(SlurmError, match=re.escape(f"{CONF_PATH} has no NodeName line")):
        node_address("zz", env, read_file=conf_reader, run=scontrol, resolves=unresolved)


# -- hostlists ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "hosts"),
    [
        ("n1", ["n1"]),
        ("n[1-3]", ["n1", "n2", "n3"]),
        ("n[1-3],m7", ["n1", "n2", "n3", "m7"]),
        ("gpu[08-11]", ["gpu08", "gpu09", "gpu10", "gpu11"]),
        ("a[1,3-4]b", ["a1b", "a3b", "a4b"]),
        ("r[1-2]n[1-2]", ["r1n1", "r1n2", "r2n1", "r2n2"]),
        ("node-a.cluster,node-b.cluster", ["node-a.cluster", "node-b.cluster"]),
        ("10.0.0.[1-2]", ["10.0.0.1", "10.0.0.2"]),
        ("x[007]", ["x007"]),
        ("", []),
    ],
)
def test_hostlist_examples(text: str, hosts: list[str]) -> None:
    assert expand_hostlist(text) == hosts


@pytest.mark.parametrize("text", ["n[1-3", "n1-3]", "n[[1]]", "n[3-1]", "n[a-b]", "n[1-]", "n[]"])
def test_bad_hostlists(text: str) -> None:
    with pytest.raises(ValueError, match="hostlist"):
        expand_hostlist(text)


def test_a_huge_hostlist_fails_fast() -> None:
    with pytest.raises(ValueError, match="more than"):
        expand_hostlist("n[1-999999999]")
    with pytest.raises(ValueError, match="more than"):
        expand_hostlist("a[1-1000]b[1-1000]c[1-2]")


_PREFIX = st.text(alphabet="abcxyz-.", min_size=1, max_size=4)
_RANGES = st.lists(
    st.tuples(st.integers(0, 120), st.integers(0, 5), st.integers(1, 4)), min_size=1, max_size=3
)


@st.composite
def hostlists(draw: st.DrawFn) -> tuple[str, list[str]]:
    """A hostlist expression and the hosts it stands for, built side by side."""
    parts, hosts = [], []
    for _ in range(draw(st.integers(1, 3))):
        prefix, suffix = draw(_PREFIX), draw(st.sampled_from(["", "s", "-ib"]))
        if draw(st.booleans()):
            parts.append(prefix + suffix)
            hosts.append(prefix + suffix)
            continue
        items, names = [], []
        for low, span, width in draw(_RANGES):
            high = low + span
            lo = f"{low:0{width}d}"
            items.append(lo if span == 0 else f"{lo}-{high}")
            names += [f"{prefix}{i:0{width}d}{suffix}" for i in range(low, high + 1)]
        parts.append(f"{prefix}[{','.join(items)}]{suffix}")
        hosts += names
    return ",".join(parts), hosts


@settings(max_examples=300, deadline=None)
@given(hostlists())
def test_hostlist_property(case: tuple[str, list[str]]) -> None:
    text, hosts = case
    assert expand_hostlist(text) == hosts


@settings(max_examples=300, deadline=None)
@given(st.lists(st.from_regex(r"[a-c]{1,2}[0-9]{1,3}(-ib)?", fullmatch=True), min_size=1))
def test_hostlist_agrees_with_python_hostlist(names: list[str]) -> None:
    """python-hostlist (the reference Python implementation, GPL: a dev dependency only)
    compresses; ours must expand back to its expansion."""
    hostlist = pytest.importorskip("hostlist")
    text = hostlist.collect_hostlist(names)
    assert expand_hostlist(text) == hostlist.expand_hostlist(text, allow_duplicates=True)
    assert sorted(set(expand_hostlist(text))) == sorted(set(names))


def test_tasks_per_node() -> None:
    assert parse_tasks_per_node("1(x3)") == [1, 1, 1]
    assert parse_tasks_per_node("2(x2),1") == [2, 2, 1]
    with pytest.raises(ValueError, match="tasks per node"):
        parse_tasks_per_node("2(3)")


# -- the port -------------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 2**32 - 2000))
def test_ports_never_clash_for_nearby_jobs_and_their_steps(first: int) -> None:
    ports = {store_port(job, step) for job in range(first, first + 1024) for step in range(8)}
    assert len(ports) == 1024 * 8
    assert all(PORT_BASE <= p < PORT_BASE + PORT_SLOTS for p in ports)


def test_ports_of_consecutive_jobs() -> None:
    assert store_port(15724344, 0) != store_port(15724345, 0)
    assert store_port(15724344, 0) != store_port(15724344, 1)
    assert PORT_BASE + PORT_SLOTS <= 29400  # below torch's defaults and the ephemeral ports


# -- the plan for a command line ------------------------------------------------------------


def plan_of(node: int, *argv: str) -> tuple[list[str], dict[str, object], str]:
    overrides, patch = plan(step_of(node_env(node)), argv)
    assert patch is not None
    (note,) = patch.notes
    return overrides, dict(patch.values), note


def test_a_fixed_job_is_static_hosted_by_node_rank_0() -> None:
    port = store_port(15724344, 0)
    overrides, values, note = plan_of(1, "+job=hello", "job.nproc_per_node=2")
    assert overrides == ["rdzv=static"]
    assert values == {
        "nnodes": "3",
        "rdzv.node_rank": 1,
        "rdzv.id": "slurm-15724344.0",
        "rdzv.endpoint": f"127.0.0.1:{port}",
    }
    assert note == (
        "Slurm step detected (job 15724344, step 0): 3 nodes, node rank 1, id "
        f"slurm-15724344.0, store n1:{port} at 127.0.0.1:{port} (NodeAddr in {CONF_PATH}); "
        "rdzv=static, hosted by node rank 0; sets nnodes=3, rdzv.node_rank=1, "
        f"rdzv.id=slurm-15724344.0, rdzv.endpoint=127.0.0.1:{port}"
    )


@pytest.mark.parametrize("node", [0, 2])
def test_min_max_nodes_is_tcp_hosted_by_node_rank_0(node: int) -> None:
    overrides, values, _ = plan_of(node, "+job=hello", "nnodes=2:3")
    assert overrides == ["rdzv=tcp"]
    assert values == {
        "rdzv.is_host": node == 0,
        "rdzv.id": "slurm-15724344.0",
        "rdzv.endpoint": f"127.0.0.1:{store_port(15724344, 0)}",
    }


def test_rdzv_keys_on_the_command_line_keep_their_values() -> None:
    overrides, values, _ = plan_of(
        0, "+job=hello", "rdzv.endpoint=head:1234", "rdzv.id=mine", "rdzv.join_timeout=60"
    )
    assert overrides == ["rdzv=static"]
    assert values == {"nnodes": "3", "rdzv.node_rank": 0}
    _, values, _ = plan_of(0, "nnodes=3", "++rdzv.node_rank=0")
    assert values == {"rdzv.id": "slurm-15724344.0", "rdzv.endpoint": values["rdzv.endpoint"]}


@pytest.mark.parametrize(
    ("argv", "values"),
    [
        (["rdzv=local"], {}),
        (["rdzv=tcp", "rdzv.endpoint=h:1"], {"nnodes": "3", "rdzv.id": "slurm-15724344.0"}),
        (["rdzv=etcd", "nnodes=1:3", "rdzv.id=x"], {}),
        (
            ["rdzv=static", "rdzv.endpoint=h:1"],
            {"nnodes": "3", "rdzv.id": "slurm-15724344.0", "rdzv.node_rank": 2},
        ),
    ],
)
def test_the_users_backend_is_only_filled_in(argv: list[str], values: dict[str, object]) -> None:
    overrides, got, note = plan_of(2, *argv)
    assert overrides == []
    assert got == values
    assert f"{argv[0]} (from the command line)" in note


def test_a_fixed_nnodes_other_than_the_steps_is_an_error() -> None:
    with pytest.raises(SlurmError, match=r"^nnodes=2: this Slurm step has 3 nodes; leave"):
        plan_of(0, "nnodes=2")
    assert plan_of(0, "nnodes=3")[1]["rdzv.node_rank"] == 0
    assert plan_of(0, "nnodes=${oc.env:SLURM_NNODES}")[0] == ["rdzv=static"]  # Hydra's to read
    assert plan_of(0, "nnodes=3:3")[0] == ["rdzv=static"]


def test_a_one_node_step_stays_local() -> None:
    env = node_env(
        0,
        SLURM_STEP_NUM_NODES="1",
        SLURM_STEP_NODELIST="n2",
        SLURM_STEP_TASKS_PER_NODE="1",
        SLURM_STEP_NUM_TASKS="1",
    )
    overrides, patch = plan(step_of(env), ["+job=hello"])
    assert overrides == [] and patch is not None and dict(patch.values) == {}
    assert "rdzv=local (one node); sets nothing" in patch.notes[0]


def test_command_line_places_the_choice_among_the_overrides() -> None:
    def go(*argv: str, env: dict[str, str] | None = None) -> list[str]:
        out, _ = command_line(
            argv,
            node_env(0) if env is None else env,
            read_file=conf_reader,
            run=no_command,
            resolves=unresolved,
        )
        return out

    assert go("+job=hello") == ["rdzv=static", "+job=hello"]
    assert go("-m", "+job=hello", "max_restarts=1,2") == [
        "-m",
        "rdzv=static",
        "+job=hello",
        "max_restarts=1,2",
    ]
    assert go("--cfg", "job") == ["--cfg", "job", "rdzv=static"]
    assert go("+job=hello", "scheduler=none") == ["+job=hello", "scheduler=none"]
    assert go("--help") == ["--help"]
    assert go("+job=hello", env={}) == ["+job=hello"]
    batch = {k: v for k, v in node_env(0).items() if k != "SLURM_STEP_ID"}
    argv, patch = command_line(["+job=hello"], batch, read_file=conf_reader, run=no_command)
    assert argv == ["+job=hello"] and patch is not None and dict(patch.values) == {}
    assert patch.notes == (
        "in Slurm job 15724344 of 3 nodes but not in an srun step (no SLURM_STEP_ID): this "
        "agent runs alone; start one per node with srun --ntasks-per-node=1 elastic-run ...",
    )
    assert command_line(["+job=hello", "scheduler=none"], batch)[1] is None
    with pytest.raises(SlurmError, match=r"^scheduler=slurm: not in a Slurm job step"):
        go("+job=hello", "scheduler=slurm", env={})
    with pytest.raises(SlurmError, match=r"^scheduler=pbs: allowed: auto, slurm, none$"):
        go("scheduler=pbs")


def test_the_patch_applies_and_names_slurm_in_errors(caplog: pytest.LogCaptureFixture) -> None:
    _, patch = plan(step_of(node_env(1)), ["+job=hello"])
    assert patch is not None
    cfg = OmegaConf.create(
        {"nnodes": "1", "rdzv": {"id": None, "endpoint": "", "node_rank": 0, "backend": "x"}}
    )
    with caplog.at_level(logging.INFO, logger="elastic_runner.config_patch"):
        patch.apply(cfg)
    assert cfg.nnodes == "3" and cfg.rdzv.node_rank == 1 and cfg.rdzv.id == "slurm-15724344.0"
    assert "slurm: Slurm step detected (job 15724344, step 0)" in caplog.text
    error = ConfigError("rdzv.node_rank", 1, "x")
    assert patch.describe(error, "m") == "Slurm mode (SLURM_NODEID) (m)"


# -- GPUs -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("env", "visible", "why"),
    [
        ({"SLURM_JOB_ID": "1", "SLURM_GPUS_ON_NODE": "2"}, 2, "SLURM_GPUS_ON_NODE='2'"),
        (
            {"SLURM_JOB_ID": "1", "SLURM_GPUS_ON_NODE": "4", "CUDA_VISIBLE_DEVICES": "0,1,2,3"},
            4,
            "CUDA_VISIBLE_DEVICES='0,1,2,3'; SLURM_GPUS_ON_NODE='4'",
        ),
        ({"SLURM_JOB_ID": "1", "SLURM_STEP_GPUS": "5,7,2"}, 3, "SLURM_STEP_GPUS='5,7,2'"),
        ({"SLURM_JOB_ID": "1", "SLURM_JOB_GPUS": "1"}, 1, "SLURM_JOB_GPUS='1'"),
        ({"SLURM_JOB_ID": "1", "SLURM_GPUS_ON_NODE": "16"}, 8, None),
        ({"SLURM_GPUS_ON_NODE": "2"}, 8, None),  # not in a Slurm job: not Slurm's
        ({"SLURM_JOB_ID": "1"}, 8, None),  # Slurm says nothing about GPUs
    ],
)
def test_the_gpus_slurm_gave_the_step_cap_the_count(
    tmp_path: Path, env: dict[str, str], visible: int, why: str | None
) -> None:
    gpus = nvidia_proc(tmp_path, 8)
    found = detect_gpus(tmp_path, env, None)
    assert found.visible == visible
    if why is not None:
        gpu_s = "GPU" if visible == 1 else "GPUs"
        assert found.describe() == f"{visible} NVIDIA {gpu_s} (8 found in {gpus}; {why})"


# -- the command line -----------------------------------------------------------------------


def test_cli_several_tasks_per_node_is_one_line_and_exit_2(
    elastic_run: ElasticRunner, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in node_env(0, SLURM_STEP_TASKS_PER_NODE="2(x3)").items():
        monkeypatch.setenv(name, value)
    run = elastic_run("+job=hello")
    assert run.returncode == 2, run.stderr
    assert run.stderr.splitlines() == [
        "elastic-run: error: Slurm mode: this step runs 2 tasks on a node "
        "(SLURM_STEP_TASKS_PER_NODE=2(x3)); elastic-run is one agent per node, which starts "
        "the workers itself: run it with srun --ntasks-per-node=1 (srun -N3 "
        "--ntasks-per-node=1 elastic-run ...)"
    ]


def test_cli_scheduler_slurm_outside_slurm_and_a_bad_value(
    elastic_run: ElasticRunner, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in STEP_ENV:
        monkeypatch.delenv(name, raising=False)
    run = elastic_run("+job=hello", "scheduler=slurm")
    assert run.returncode == 2
    assert run.stderr.splitlines() == [
        "elastic-run: error: scheduler=slurm: not in a Slurm job step (SLURM_JOB_ID and "
        "SLURM_STEP_ID unset): run elastic-run under srun, e.g. srun --ntasks-per-node=1 "
        "elastic-run ..."
    ]
    run = elastic_run("+job=hello", "scheduler=pbs")
    assert run.returncode == 2
    assert run.stderr.splitlines() == [
        "elastic-run: error: scheduler=pbs: allowed: auto, slurm, none"
    ]


def test_cli_a_one_node_step_runs_locally_and_says_so(
    elastic_run: ElasticRunner, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    env = node_env(
        0,
        SLURM_STEP_NUM_NODES="1",
        SLURM_STEP_NODELIST="n1",
        SLURM_STEP_TASKS_PER_NODE="1",
        SLURM_STEP_NUM_TASKS="1",
        SLURM_CONF=str(tmp_path / "slurm.conf"),
    )
    (tmp_path / "slurm.conf").write_text(CONF)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv(DEVICE_ROOT_ENV, str(tmp_path / "no-gpu"))
    run = elastic_run("+job=hello")
    assert run.returncode == 0, run.stderr
    assert (
        "[elastic-run] slurm: Slurm step detected (job 15724344, step 0): 1 node, node rank 0"
        in run.stderr
    )
    assert "rdzv=local (one node); sets nothing" in run.stderr
