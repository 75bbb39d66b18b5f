"""The torchrun front end end to end: the command lines launchers really run (torchtitan,
TorchX, Slurm recipes, SkyPilot, Kubeflow's PET_* variables), unchanged, with
``elastic-run`` in front, on loopback.

Every agent runs in a directory of its own (a "node"), holding the scripts the line
names, and makes its run directory where Hydra puts it by default (``outputs/...``), so
the lines are exactly the launchers'. The workers write their environment and argv to one
JSON file per rank in the test's ``out`` directory.

Nothing may survive a test: the processes of every run id the workers saw
(``assert_nothing_survives``), and every process carrying the test's own marker variable,
which the agents get and pass on to their workers (that also covers the agents, and the
static lines' run id ``none``, which is torchrun's default and not unique).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shlex
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from elastic_runner import __version__
from elastic_runner.testing.runner import elastic_run_exe, http_status, wait_for
from tests.conftest import assert_nothing_survives, free_port

#: Set on every agent of a test (and so inherited by its workers).
MARK_ENV = "ER_TORCHRUN_TEST_MARK"

#: What a launcher or an outer run may have left in the test's environment.
_LAUNCHER_VARS = frozenset(
    {
        "MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "GROUP_RANK",
        "ROLE_RANK", "ROLE_NAME", "LOCAL_WORLD_SIZE", "GROUP_WORLD_SIZE", "ROLE_WORLD_SIZE",
        "OMP_NUM_THREADS", "ELASTIC_RUN_OVERRIDES", "ELASTIC_RUNNER_RDZV_TOKEN",
    }
)  # fmt: skip

#: The worker: ``OUT`` and ``KIND`` are written above it. Kinds: ``record`` (write and
#: exit), ``hang`` (write, then sleep silently), ``world-2`` (sleep unless the world has 2
#: ranks: an elastic job's first round may have one), ``master-port`` (rank 0 listens on
#: MASTER_PORT, every other rank connects to MASTER_ADDR:MASTER_PORT, as torch's
#: ``env://`` does).
_WORKER = """
import json, os, socket, sys, time

env = dict(os.environ)
rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
print(f"stdout of local rank {env['LOCAL_RANK']}", flush=True)
print(f"stderr of local rank {env['LOCAL_RANK']}", file=sys.stderr, flush=True)
record = {"env": env, "argv": sys.argv, "cwd": os.getcwd()}

if KIND == "master-port":
    addr, port = env["MASTER_ADDR"], int(env["MASTER_PORT"])
    if rank == 0:
        with socket.socket() as server:
            server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            server.bind(("", port))
            server.listen(world)
            server.settimeout(30)
            reached = []
            while len(reached) < world - 1:
                conn, _ = server.accept()
                with conn:
                    conn.settimeout(5)
                    reached.append(int(conn.recv(16).decode()))
        record["reached"] = sorted(reached)
    else:
        deadline = time.monotonic() + 30
        while True:
            try:
                with socket.create_connection((addr, port), timeout=2) as conn:
                    conn.sendall(str(rank).encode())
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

name = f"r{rank}_w{world}_a{env['TORCHELASTIC_RESTART_COUNT']}.json"
path = os.path.join(OUT, name)
with open(path + ".tmp", "w") as f:
    json.dump(record, f)
os.replace(path + ".tmp", path)

if KIND == "hang" or (KIND == "world-2" and world != 2):
    time.sleep(600)
"""


@dataclass
class Finished:
    """An agent that exited."""

    returncode: int
    stdout: str
    stderr: str
    #: The run directory Hydra made in the agent's directory (None: none was made).
    run_dir: Path | None

    def result(self) -> dict[str, Any]:
        assert self.run_dir is not None, self.stderr
        return json.loads((self.run_dir / "result.json").read_text())  # type: ignore[no-any-return]

    def console(self, stream: str = "stdout") -> list[str]:
        """The workers' lines on the agent's stdout or stderr (``[prefix]: line``)."""
        text = self.stdout if stream == "stdout" else self.stderr
        return [line for line in text.splitlines() if re.match(r"^\[[^\]]*\]: ", line)]


@dataclass
class Agent:
    proc: subprocess.Popen[str]
    node: Path

    def finish(self, timeout: float = 60) -> Finished:
        try:
            out, err = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, err = self.proc.communicate()
            raise AssertionError(f"elastic-run did not exit in {timeout:g} s:\n{err}") from None
        dirs = sorted(self.node.glob("outputs/*/*"))
        assert len(dirs) <= 1, dirs
        return Finished(self.proc.returncode, out, err, dirs[0] if dirs else None)


class Launcher:
    """Runs command lines as a launcher would on the "nodes" of one test."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.out = tmp_path / "out"
        self.out.mkdir()
        self.mark = uuid.uuid4().hex
        self.agents: list[Agent] = []

    def node(self, name: str = "node0", scripts: Mapping[str, str] | None = None) -> Path:
        """A node's directory with the worker as each script named (``{"main.py":
        "record"}``; ``pkg/train.py`` makes the package)."""
        node = self.tmp_path / name
        node.mkdir(exist_ok=True)
        for script, kind in (scripts or {}).items():
            path = node / script
            path.parent.mkdir(parents=True, exist_ok=True)
            if path.parent != node:
                (path.parent / "__init__.py").touch()
            path.write_text(f"OUT = {str(self.out)!r}\nKIND = {kind!r}\n{_WORKER}")
        return node

    def env(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        env = {
            k: v
            for k, v in os.environ.items()
            if k not in _LAUNCHER_VARS and not k.startswith(("PET_", "TORCHELASTIC_"))
        }
        return {**env, MARK_ENV: self.mark, **(extra or {})}

    def start(
        self,
        *argv: str,
        node: Path,
        env: Mapping[str, str] | None = None,
        exe: tuple[str, ...] | None = None,
    ) -> Agent:
        proc = subprocess.Popen(
            [*(exe or (elastic_run_exe(),)), *argv],
            cwd=node,
            env=self.env(env),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        agent = Agent(proc, node)
        self.agents.append(agent)
        return agent

    def run(self, *argv: str, node: Path, env: Mapping[str, str] | None = None) -> Finished:
        return self.start(*argv, node=node, env=env).finish()

    def records(self) -> dict[int, dict[str, Any]]:
        """{rank: record} of the workers (the latest restart, the largest world wins)."""
        found: dict[int, dict[str, Any]] = {}
        for path in sorted(self.out.glob("r*.json"), key=_order):
            found[int(path.name[1:].split("_")[0])] = json.loads(path.read_text())
        return found

    def run_ids(self) -> set[str]:
        ids = {
            json.loads(p.read_text())["env"]["TORCHELASTIC_RUN_ID"]
            for p in self.out.glob("r*.json")
        }
        for agent in self.agents:
            for result in agent.node.glob("outputs/*/*/result.json"):
                with contextlib.suppress(ValueError, KeyError):
                    ids.add(json.loads(result.read_text())["run_id"])
        return {i for i in ids if i}

    def close(self) -> None:
        """Fail if an agent still runs or any process of the test survives (all killed)."""
        running = [a.proc.pid for a in self.agents if a.proc.poll() is None]
        for agent in self.agents:
            if agent.proc.poll() is None:
                agent.proc.kill()
                agent.proc.communicate()
        try:
            assert_nothing_survives({self.mark}, key=MARK_ENV)
            assert_nothing_survives(self.run_ids() - {"none"})  # "none": by the marker
        finally:
            assert not running, f"elastic-run agents still running at the end: {running}"


def _order(path: Path) -> tuple[int, int]:
    _, world, restart = path.stem.split("_")
    return int(world[1:]), int(restart[1:])


@pytest.fixture
def launcher(tmp_path: Path) -> Iterator[Launcher]:
    launch = Launcher(tmp_path)
    try:
        yield launch
    finally:
        launch.close()


def _static_master_port() -> int:
    """``--master_port`` P for the static lines: P and P + 1 (where the agents' store
    listens) free, below the kernel's range of ephemeral ports, as launchers' fixed ports
    are (29500, 8008). Not ``free_port()``: it returns an odd port (bind(0) takes odd ones),
    so P + 1 would be even, the parity connect() picks its source ports from, and an
    outgoing connection anywhere on the machine can take it before node rank 0 binds it,
    which (a bug) turns node rank 0 into a client: no agent hosts, the job hangs."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    for _ in range(100):
        port = random.randrange(10_000, min(low, 65_535) - 1)
        if all(_bindable(p) for p in (port, port + 1)):
            return port
    raise AssertionError("no two consecutive free ports")


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("", port))
        except OSError:
            return False
    return True


def _ok(*finished: Finished) -> None:
    for f in finished:
        assert f.returncode == 0, f.stderr


# 1. torchtitan run_train.sh, one node


def test_torchtitan_single_node_line(launcher: Launcher) -> None:
    node = launcher.node(scripts={"pkg/train.py": "record"})
    run = launcher.run(
        *shlex.split(
            "torchrun --nproc_per_node=2 --rdzv_backend c10d --rdzv_endpoint=localhost:0 "
            "--local-ranks-filter 0 --role rank --tee 3 -m pkg.train --job.config_file x.toml"
        ),
        node=node,
    )
    _ok(run)
    records = launcher.records()
    assert sorted(records) == [0, 1]
    for rank, rec in records.items():
        env = rec["env"]
        assert env["ROLE_NAME"] == "rank"
        assert (env["LOCAL_RANK"], env["WORLD_SIZE"], env["ROLE_RANK"]) == (
            str(rank),
            "2",
            str(rank),
        )
        assert rec["argv"] == [str(node / "pkg" / "train.py"), "--job.config_file", "x.toml"]
        assert rec["cwd"] == str(node)
    # --local-ranks-filter 0 with --tee 3: local rank 0's lines on the console, both
    # streams; every rank's lines in its files
    assert run.console("stdout") == ["[rank0]: stdout of local rank 0"]
    assert run.console("stderr") == ["[rank0]: stderr of local rank 0"]
    assert run.run_dir is not None
    for rank in (0, 1):
        logs = run.run_dir / "attempt_1" / str(rank)
        assert (logs / "stdout.log").read_text() == f"stdout of local rank {rank}\n"
        assert (logs / "stderr.log").read_text() == f"stderr of local rank {rank}\n"


# 2. TorchX dist.ddp


def test_torchx_dist_ddp_line(launcher: Launcher) -> None:
    node = launcher.node(scripts={"script.py": "record"})
    run = launcher.run(
        *shlex.split(
            f"torchrun --rdzv_backend c10d --rdzv_endpoint localhost:{free_port()} "
            "--rdzv_id app-123 --nnodes 1 --nproc_per_node 2 --tee 3 --role '' "
            "--signals-to-handle SIGTERM,SIGUSR1 script.py --a 1"
        ),
        node=node,
    )
    _ok(run)
    records = launcher.records()
    assert sorted(records) == [0, 1]
    for rec in records.values():
        assert rec["env"]["ROLE_NAME"] == ""
        assert rec["env"]["TORCHELASTIC_RUN_ID"] == "app-123"
        assert rec["env"]["WORLD_SIZE"] == "2"
        assert rec["env"]["TORCHELASTIC_SIGNALS_TO_HANDLE"] == "SIGTERM,SIGUSR1"  # as torch's
        assert rec["argv"][1:] == ["--a", "1"]
        assert Path(rec["argv"][0]).resolve() == node / "script.py"
    assert sorted(run.console("stdout")) == [
        "[0]: stdout of local rank 0",
        "[1]: stdout of local rank 1",
    ]
    assert run.result()["run_id"] == "app-123"


# 3. torchtitan multinode_trainer.slurm: two agents, one c10d store


def test_slurm_recipe_line_two_agents(launcher: Launcher) -> None:
    line = shlex.split(
        "torchrun --nnodes 2 --nproc_per_node 2 --rdzv_id 101 --rdzv_backend c10d "
        f"--rdzv_endpoint 127.0.0.1:{free_port()} -m pkg.train"
    )
    nodes = [launcher.node(f"node{i}", {"pkg/train.py": "record"}) for i in (0, 1)]
    agents = [launcher.start(*line, node=node) for node in nodes]
    finished = [agent.finish() for agent in agents]
    _ok(*finished)
    records = launcher.records()
    assert sorted(records) == [0, 1, 2, 3]
    envs = [rec["env"] for rec in records.values()]
    assert {e["WORLD_SIZE"] for e in envs} == {"4"}
    assert {e["GROUP_WORLD_SIZE"] for e in envs} == {"2"}
    assert {e["TORCHELASTIC_RUN_ID"] for e in envs} == {"101"}
    assert len({(e["MASTER_ADDR"], e["MASTER_PORT"]) for e in envs}) == 1
    for e in envs:
        assert int(e["RANK"]) == 2 * int(e["GROUP_RANK"]) + int(e["LOCAL_RANK"])
    # each agent ran one group of two ranks, in its own directory
    by_node: dict[str, list[int]] = {}
    for rank, rec in sorted(records.items()):
        by_node.setdefault(rec["cwd"], []).append(rank)
    assert sorted(by_node) == sorted(str(n) for n in nodes)
    assert sorted(by_node.values()) == [[0, 1], [2, 3]]


# 4. SkyPilot: static, ranks by node rank, MASTER_PORT as given


def test_skypilot_static_line_two_agents(launcher: Launcher) -> None:
    port = _static_master_port()
    agents = []
    for node_rank in (1, 0):  # node 1 first: the rank follows --node_rank, not the order
        node = launcher.node(f"node{node_rank}", {"main.py": "master-port"})
        line = (
            f"torchrun --nnodes=2 --nproc_per_node=1 --node_rank={node_rank} "
            f"--master_addr=127.0.0.1 --master_port={port} main.py"
        )
        agents.append(launcher.start(*shlex.split(line), node=node))
    _ok(*(agent.finish() for agent in agents))
    records = launcher.records()
    assert sorted(records) == [0, 1]
    for rank, rec in records.items():
        env = rec["env"]
        assert rec["cwd"] == str(launcher.tmp_path / f"node{rank}")  # rank = node rank
        assert (env["GROUP_RANK"], env["WORLD_SIZE"]) == (str(rank), "2")
        assert (env["MASTER_ADDR"], env["MASTER_PORT"]) == ("127.0.0.1", str(port))
    assert records[0]["reached"] == [1]  # rank 0 listened on MASTER_PORT, rank 1 got there


# 5. Kubeflow: only PET_* (and the pod's own variables), a bare command line


def test_kubeflow_trainer_v2_static_env(launcher: Launcher) -> None:
    port = _static_master_port()
    agents = []
    for node_rank in (1, 0):
        env = {
            "PET_NNODES": "2",
            "PET_NPROC_PER_NODE": "1",
            "PET_NODE_RANK": str(node_rank),
            "PET_MASTER_ADDR": "localhost",
            "PET_MASTER_PORT": str(port),
        }
        node = launcher.node(f"node{node_rank}", {"train.py": "master-port"})
        agents.append(launcher.start("torchrun", "train.py", node=node, env=env))
    _ok(*(agent.finish() for agent in agents))
    records = launcher.records()
    assert sorted(records) == [0, 1]
    for rank, rec in records.items():
        assert rec["cwd"] == str(launcher.tmp_path / f"node{rank}")
        assert (rec["env"]["MASTER_ADDR"], rec["env"]["MASTER_PORT"]) == ("localhost", str(port))
        assert rec["env"]["WORLD_SIZE"] == "2"
    assert records[0]["reached"] == [1]


def test_kubeflow_training_operator_v1_elastic_env(launcher: Launcher) -> None:
    endpoint = f"127.0.0.1:{free_port()}"
    agents = []
    for pod_rank in (0, 1):  # master-0, worker-0 of a two-replica PyTorchJob
        env = {
            "PET_RDZV_ENDPOINT": endpoint,
            "PET_RDZV_BACKEND": "c10d",
            "PET_NNODES": "1:2",
            "PET_NPROC_PER_NODE": "1",
            "PET_RDZV_ID": "job1",
            "PET_MAX_RESTARTS": "3",
            # what the operator sets on the pod itself, for the pod, not for workers
            "PYTHONUNBUFFERED": "1",
            "MASTER_ADDR": "pytorchjob-master-0",
            "MASTER_PORT": "23456",
            "PET_MASTER_ADDR": "pytorchjob-master-0",
            "PET_MASTER_PORT": "23456",
            "WORLD_SIZE": "2",
            "RANK": str(pod_rank),
            "PET_NODE_RANK": str(pod_rank),
        }
        node = launcher.node(f"node{pod_rank}", {"train.py": "world-2"})
        agents.append(launcher.start("torchrun", "train.py", node=node, env=env))
    finished = [agent.finish() for agent in agents]
    _ok(*finished)
    records = launcher.records()
    assert sorted(records) == [0, 1]
    envs = [rec["env"] for rec in records.values()]
    for rank, rec in records.items():
        env = rec["env"]
        assert (env["RANK"], env["GROUP_RANK"], env["WORLD_SIZE"]) == (str(rank), str(rank), "2")
        assert env["TORCHELASTIC_RUN_ID"] == "job1"
        assert env["TORCHELASTIC_MAX_RESTARTS"] == "3"
    assert len({(e["MASTER_ADDR"], e["MASTER_PORT"]) for e in envs}) == 1
    assert envs[0]["MASTER_ADDR"] != "pytorchjob-master-0" and envs[0]["MASTER_PORT"] != "23456"
    for f in finished:  # said once, on one line
        assert "WORLD_SIZE/RANK of the agent's environment: not passed on" in f.stderr


def test_kubeflow_standalone_empty_string(launcher: Launcher) -> None:
    """``PET_STANDALONE=""`` (torch itself stops with ``invalid literal for int()``)."""
    node = launcher.node(scripts={"train.py": "record"})
    env = {"PET_STANDALONE": "", "PET_NPROC_PER_NODE": "2"}
    run = launcher.run("torchrun", "train.py", node=node, env=env)
    _ok(run)
    records = launcher.records()
    assert sorted(records) == [0, 1]
    assert {rec["env"]["WORLD_SIZE"] for rec in records.values()} == {"2"}
    assert run.result()["overrides"][0] == "rdzv=local"


# 6. python -m elastic_runner.torchrun


def test_python_m_elastic_runner_torchrun(launcher: Launcher) -> None:
    node = launcher.node(scripts={"x.py": "record"})
    agent = launcher.start(
        "--standalone",
        "--nproc-per-node",
        "2",
        "x.py",
        node=node,
        exe=(sys.executable, "-m", "elastic_runner.torchrun"),
    )
    run = agent.finish()
    _ok(run)
    records = launcher.records()
    assert sorted(records) == [0, 1]
    for rank, rec in records.items():
        assert (rec["env"]["RANK"], rec["env"]["WORLD_SIZE"]) == (str(rank), "2")
        assert Path(rec["argv"][0]).resolve() == node / "x.py"
    assert sorted(run.console()) == [
        "[default0]: stdout of local rank 0",
        "[default1]: stdout of local rank 1",
    ]


# 7. elastic-run's own settings with the torchrun form


def _assert_hung(run: Finished) -> None:
    assert run.returncode == 1, run.stderr
    result = run.result()
    assert result["state"] == "FAILED"
    assert "hung: no output for 2 s (watchdog.no_output_timeout)" in result["error"]
    assert "worker rank 0: hung: no output for 2 s" in run.stderr


def test_an_override_before_torchrun_reaches_the_run(launcher: Launcher) -> None:
    node = launcher.node(scripts={"x.py": "hang"})
    run = launcher.run(
        "watchdog.no_output_timeout=2", "torchrun", "--standalone", "x.py", node=node
    )
    _assert_hung(run)
    assert run.result()["overrides"] == ["rdzv=local", "watchdog.no_output_timeout=2"]


def test_overrides_from_the_environment_reach_the_run(launcher: Launcher) -> None:
    node = launcher.node(scripts={"x.py": "hang"})
    port = free_port()
    env = {"ELASTIC_RUN_OVERRIDES": f"health.port={port} watchdog.no_output_timeout=2"}
    agent = launcher.start("torchrun", "--standalone", "x.py", node=node, env=env)
    wait_for(lambda: list(launcher.out.glob("r0_*.json")), what="the worker started")
    assert http_status(port) == 200  # while the worker runs (silently)
    run = agent.finish()
    _assert_hung(run)
    overrides = run.result()["overrides"]
    assert overrides == ["rdzv=local", f"health.port={port}", "watchdog.no_output_timeout=2"]


@pytest.mark.parametrize("where", ["command line", "ELASTIC_RUN_OVERRIDES"])
def test_an_override_clashing_with_the_torchrun_options_is_one_line(
    launcher: Launcher, where: str
) -> None:
    node = launcher.node(scripts={"x.py": "record"})
    line = ["torchrun", "--standalone", "x.py"]
    if where == "command line":
        run = launcher.run("rdzv=tcp", *line, node=node)
    else:
        run = launcher.run(*line, node=node, env={"ELASTIC_RUN_OVERRIDES": "rdzv=tcp"})
    assert run.returncode == 2
    assert run.stderr.splitlines() == [
        "elastic-run torchrun: error: rdzv= is chosen by the torchrun options "
        "(--rdzv-backend, --standalone, --nnodes); change it there"
    ]
    assert run.run_dir is None and not launcher.records()


# 8. bad input: one line, exit 2, no worker


@pytest.mark.parametrize(
    ("argv", "env", "expected"),
    [
        (
            "torchrun --bogus x.py",
            {},
            "elastic-run torchrun: error: unrecognized arguments: --bogus",
        ),
        (
            "torchrun --nnodes 2:1 x.py",
            {},
            "elastic-run torchrun: error: --nnodes='2:1': expected 0 < MIN <= MAX",
        ),
        (
            "torchrun x.py",
            {"PET_MAX_RESTARTS": "x"},
            "elastic-run torchrun: error: PET_MAX_RESTARTS='x': invalid int value "
            "(for --max-restarts/--max_restarts)",
        ),
        (
            "torchrun --nproc-per-node 2",
            {},
            "elastic-run torchrun: error: the training script is missing: elastic-run "
            "torchrun [options] train.py [args] (or -m package.module [args])",
        ),
        (
            "torchrun --no-python -m x.py",
            {},
            "elastic-run torchrun: error: don't use both the '--no-python' flag and the "
            "'--module' flag at the same time",
        ),
    ],
    ids=["unknown-option", "nnodes-min-above-max", "pet-max-restarts", "no-script", "no-python-m"],
)
def test_bad_torchrun_input_is_one_line_and_exit_2(
    launcher: Launcher, argv: str, env: dict[str, str], expected: str
) -> None:
    node = launcher.node(scripts={"x.py": "record"})
    run = launcher.run(*shlex.split(argv), node=node, env=env)
    assert run.returncode == 2
    assert run.stderr.splitlines() == [expected]
    assert run.stdout == ""
    assert run.run_dir is None and not launcher.records()


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (
            "train.py",
            "elastic-run: error: 'train.py' is not a config override (key=value); to run a "
            "script: elastic-run torchrun train.py (or elastic-run job.entrypoint=train.py "
            "with job.args=[...])",
        ),
        (
            "--nproc-per-node=2 train.py",
            "elastic-run: error: --nproc-per-node is a torchrun option; to run a torchrun "
            "command line, put 'torchrun' before it: elastic-run torchrun "
            "--nproc-per-node=2 train.py",
        ),
    ],
    ids=["script", "torchrun-option"],
)
def test_a_torchrun_line_without_torchrun_shows_the_working_command(
    launcher: Launcher, argv: str, expected: str
) -> None:
    node = launcher.node(scripts={"train.py": "record"})
    run = launcher.run(*shlex.split(argv), node=node)
    assert run.returncode == 2
    assert run.stderr.splitlines() == [expected]
    assert run.run_dir is None and not launcher.records()
    # the command the hint shows works
    working = re.search(r"(elastic-run torchrun [^(]*?)(?: \(or |$)", expected)
    assert working, expected
    command = shlex.split(working.group(1))
    assert command[0] == "elastic-run"
    _ok(launcher.run(*command[1:], node=node))
    assert launcher.records()


def test_version_and_help(launcher: Launcher) -> None:
    node = launcher.node()
    version = launcher.run("--version", node=node)
    assert (version.returncode, version.stdout, version.stderr) == (
        0,
        f"elastic-run {__version__}\n",
        "",
    )
    torchrun_help = launcher.run("torchrun", "--help", node=node)
    assert torchrun_help.returncode == 0, torchrun_help.stderr
    assert torchrun_help.stdout.startswith("usage: elastic-run torchrun")
    assert "--nproc-per-node" in torchrun_help.stdout and "PET_" in torchrun_help.stdout
    main_help = launcher.run("--help", node=node)
    assert main_help.returncode == 0, main_help.stderr
    assert "elastic-run [KEY=VALUE ...] torchrun ARGS" in main_help.stdout
    assert not (node / "outputs").exists()
