"""Workers see under ``elastic-run torchrun`` the environment they see under torch's own
``torchrun``, for the same command line: the same variables with the same values, apart
from those that name a port, an id or a path (and the few differences listed, each with
its reason).

Run by ``nox -s integration`` / ``.ci/run`` in a venv with torch==2.13.0; skipped where
torch is not installed.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from elastic_runner.testing.runner import elastic_run_exe
from tests.conftest import assert_nothing_survives

pytest.importorskip("torch")
pytestmark = pytest.mark.integration

LINE = ["--standalone", "--nproc-per-node", "2", "env_dump.py"]

ENV_DUMP = """\
import json, os, sys
record = {"env": dict(os.environ), "argv": sys.argv, "orig_argv": sys.orig_argv,
          "executable": sys.executable, "cwd": os.getcwd()}
path = os.path.join(os.environ["DUMPS"], os.path.basename(os.getcwd()), os.environ["RANK"])
with open(path + ".tmp", "w") as f:
    json.dump(record, f)
os.replace(path + ".tmp", path + ".json")
"""

#: Different on every run (a port, an id, a path): present under both, values differ.
VARYING = frozenset({"MASTER_PORT", "TORCHELASTIC_RUN_ID", "TORCHELASTIC_ERROR_FILE"})

#: Known differences (torchrun's value, elastic-run's value; None: not set), and why.
KNOWN = {
    # elastic-run's agent shares no torch TCPStore with the workers (its store speaks
    # its own protocol): worker rank 0 must create the store at MASTER_PORT, as torch
    # does with "False"; "True" would make every rank wait for a store nobody serves.
    "TORCHELASTIC_USE_AGENT_STORE": ("True", "False"),
    # elastic-run marks the processes of the worker tree (containment, "nothing survives")
    "ELASTIC_RUNNER_AGENT": (None, "<id>"),
    # the pipe elastic_runner.heartbeat() writes to (steps for the crash-loop verdict)
    "ELASTIC_RUNNER_HEARTBEAT_FD": (None, "<fd>"),
}

#: What a launcher or an outer run may have left in the test's environment.
_LAUNCHER_VARS = frozenset(
    {
        "MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "GROUP_RANK",
        "ROLE_RANK", "ROLE_NAME", "LOCAL_WORLD_SIZE", "GROUP_WORLD_SIZE", "ROLE_WORLD_SIZE",
        "OMP_NUM_THREADS", "ELASTIC_RUN_OVERRIDES", "TORCH_NCCL_ASYNC_ERROR_HANDLING",
    }
)  # fmt: skip


def _loopback(host: str) -> bool:
    return all(
        info[4][0] in ("127.0.0.1", "::1")
        for info in socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    )


def _dumps(where: Path) -> dict[int, dict[str, Any]]:
    return {int(p.stem): json.loads(p.read_text()) for p in where.glob("*.json")}


def test_workers_get_the_environment_torchrun_gives(tmp_path: Path) -> None:
    torchrun = Path(sys.executable).with_name("torchrun")
    assert torchrun.exists(), f"torch's torchrun is not beside {sys.executable}"
    dumps = tmp_path / "dumps"
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in _LAUNCHER_VARS and not k.startswith(("PET_", "TORCHELASTIC_"))
    }
    env.update(DUMPS=str(dumps), TMPDIR=str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    launchers = {"torchrun": [str(torchrun)], "elastic-run": [elastic_run_exe(), "torchrun"]}
    procs = {}
    for name, command in launchers.items():  # both at once: torch takes seconds to import
        node = tmp_path / name
        node.mkdir()
        (dumps / name).mkdir(parents=True)
        (node / "env_dump.py").write_text(ENV_DUMP)
        procs[name] = subprocess.Popen(
            [*command, *LINE],
            cwd=node,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
    try:
        for name, proc in procs.items():
            _, err = proc.communicate(timeout=120)
            assert proc.returncode == 0, f"{name}:\n{err}"
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    theirs, ours = _dumps(dumps / "torchrun"), _dumps(dumps / "elastic-run")
    run_ids = {rec["env"]["TORCHELASTIC_RUN_ID"] for rec in [*theirs.values(), *ours.values()]}
    assert_nothing_survives(run_ids)
    assert sorted(theirs) == sorted(ours) == [0, 1]

    differences = []
    for rank in (0, 1):
        t_env, o_env = theirs[rank]["env"], ours[rank]["env"]
        for key in sorted(set(t_env) | set(o_env)):
            t, o = t_env.get(key), o_env.get(key)
            if key in VARYING:
                assert t is not None and o is not None, (key, t, o)
            elif key == "MASTER_ADDR":  # "localhost" under torchrun, 127.0.0.1 here
                assert t is not None and o is not None and _loopback(t) and _loopback(o)
            elif key in KNOWN:
                placeholder = KNOWN[key][1]
                shown = placeholder if placeholder in ("<id>", "<fd>") and o else o
                assert (t, shown) == KNOWN[key], key
            elif t != o:
                differences.append(f"rank {rank}: {key}: torchrun {t!r}, elastic-run {o!r}")
    assert not differences, "\n".join(differences)

    for rank in (0, 1):  # the same interpreter, the same way; the script by another path
        t, o = theirs[rank], ours[rank]
        assert t["executable"] == o["executable"]  # the launcher's own interpreter
        assert Path(t["executable"]).resolve() == Path(sys.executable).resolve()
        assert t["orig_argv"][:2] == o["orig_argv"][:2] == [t["executable"], "-u"]
        assert t["argv"][1:] == o["argv"][1:] == []
        assert Path(t["cwd"], t["argv"][0]).resolve() == tmp_path / "torchrun" / "env_dump.py"
        assert Path(o["cwd"], o["argv"][0]).resolve() == tmp_path / "elastic-run" / "env_dump.py"
