"""The keys torchrun's flags map onto, end to end through ``elastic-run``: ``job.python``
(torchrun's default of running any script with python, and ``--no-python``), an empty
``job.role`` (TorchX's ``--role ''``), ``logs.console_local_ranks``
(``--local-ranks-filter``) and ``logs.console_streams`` (``--redirects``)."""

from __future__ import annotations

import sys
import uuid
from pathlib import Path

import yaml

from tests.conftest import (
    ElasticRunner,
    assert_nothing_survives,
    free_port,
    probe_job,
    probe_records,
)


def test_python_true_runs_a_script_without_the_py_suffix_with_python(
    elastic_run: ElasticRunner, tmp_path: Path
) -> None:
    (tmp_path / "train").write_text(  # no suffix, not executable: torchrun runs it anyway
        "import os, sys\n"
        "print(f'python {sys.executable} ran {sys.argv} as rank {os.environ[\"RANK\"]}')\n"
    )
    run = elastic_run(
        "job.entrypoint=train",
        "job.python=true",
        "job.args=[--x,%local_rank%]",
        "job.nproc_per_node=2",
    )
    assert run.returncode == 0, run.stderr
    for rank in (0, 1):
        expected = f"python {sys.executable} ran {[str(tmp_path / 'train'), '--x', str(rank)]}"
        assert f"[default{rank}]: {expected} as rank {rank}" in run.stdout.splitlines()
    assert_nothing_survives({run.run_id})


def test_python_false_runs_a_py_file_as_a_program_by_its_shebang(
    elastic_run: ElasticRunner, tmp_path: Path
) -> None:
    """A ``.py`` file that python could not run (it is a shell script): with
    ``job.python=false`` the kernel runs it by its ``#!`` line."""
    tool = tmp_path / "tool.py"
    tool.write_text('#!/bin/sh\necho "sh ran $0 with $# args: $* (rank $RANK)"\n')
    tool.chmod(0o755)
    run = elastic_run(
        "job.entrypoint=./tool.py", "job.python=false", "job.args=[a,b]", "job.nproc_per_node=2"
    )
    assert run.returncode == 0, run.stderr
    for rank in (0, 1):
        assert f"[default{rank}]: sh ran {tool} with 2 args: a b (rank {rank})" in run.stdout
    assert_nothing_survives({run.run_id})
    # the same file by its name alone is looked up on PATH (as execvp does), not here
    run = elastic_run("job.entrypoint=tool.py", "job.python=false")
    assert run.returncode == 2
    assert run.stderr.splitlines() == [
        "elastic-run: error: job.entrypoint=tool.py: no executable of that name on PATH "
        f"(job.python=false runs it as a program; ./tool.py for the file in {tmp_path})"
    ]
    assert not list(run.run_dir.glob("attempt_*"))
    assert_nothing_survives({run.run_id})


def test_a_module_with_python_false_is_one_line_and_exit_2(elastic_run: ElasticRunner) -> None:
    run = elastic_run("job.module=elastic_runner.demo.hello", "job.python=false")
    assert run.returncode == 2, run.stderr
    assert run.stderr.splitlines() == [
        "elastic-run: error: job.python=false: not with job.module (a module always runs with "
        "python; false runs job.entrypoint as a program, like torchrun's --no-python)"
    ]
    assert not list(run.run_dir.glob("attempt_*")), "no worker may start"
    assert_nothing_survives({run.run_id})


def test_an_empty_role_is_role_name_empty_and_prefix_without_it(
    elastic_run: ElasticRunner, probe_out: Path
) -> None:
    run = elastic_run(*probe_job(probe_out, nproc=2), "job.role=''")
    assert run.returncode == 0, run.stderr
    for (_, rank), rec in probe_records(probe_out).items():
        assert rec["env"]["ROLE_NAME"] == ""
        assert rec["env"]["ROLE_RANK"] == str(rank) and rec["env"]["ROLE_WORLD_SIZE"] == "2"
        assert f"[{rank}]: probe rank {rank} restart 0" in run.stdout.splitlines()
    config = yaml.safe_load((run.run_dir / "config.yaml").read_text())
    assert config["job"]["role"] == ""
    assert_nothing_survives({run.run_id})


def test_an_empty_role_goes_through_a_store_rendezvous_beside_a_named_one(
    elastic_run: ElasticRunner, probe_out: Path
) -> None:
    """Two agents on loopback, roles '' and 'trainer': role ranks are counted per role."""
    port = free_port()
    rdzv = [
        "rdzv=tcp",
        f"rdzv.endpoint=127.0.0.1:{port}",
        "rdzv.bind=127.0.0.1",
        "nnodes=2",
        "rdzv.join_timeout=30",
        "rdzv.heartbeat_interval=0.2",
        "rdzv.heartbeat_timeout=1.5",
    ]
    run_id = f"role-empty-{uuid.uuid4().hex[:8]}"
    agents = [
        elastic_run.popen(*probe_job(probe_out, nproc=2), *rdzv, "job.role=''", run_id=run_id),
        elastic_run.popen(*probe_job(probe_out, nproc=1), *rdzv, "job.role=trainer", run_id=run_id),
    ]
    for proc, _, _ in agents:
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
    envs = [rec["env"] for rec in probe_records(probe_out).values()]
    unnamed = sorted((e["ROLE_RANK"], e["ROLE_WORLD_SIZE"]) for e in envs if e["ROLE_NAME"] == "")
    assert unnamed == [("0", "2"), ("1", "2")]
    trainers = [(e["ROLE_RANK"], e["ROLE_WORLD_SIZE"]) for e in envs if e["ROLE_NAME"] == "trainer"]
    assert trainers == [("0", "1")]
    assert_nothing_survives({run_id})


def test_console_local_ranks_show_one_local_rank_and_files_keep_all(
    elastic_run: ElasticRunner, probe_out: Path
) -> None:
    run = elastic_run(
        *probe_job(probe_out, "--stderr", "warned", "--ranks", "0,1,2", nproc=3),
        "logs.console_local_ranks=[1]",
    )
    assert run.returncode == 0, run.stderr
    assert [line for line in run.stdout.splitlines() if "]: " in line] == [
        "[default1]: probe rank 1 restart 0"
    ]
    assert [line for line in run.stderr.splitlines() if "]: warned" in line] == [
        "[default1]: warned"
    ]
    for rank in range(3):
        logs = run.run_dir / "attempt_1" / str(rank)
        assert (logs / "stdout.log").read_text() == f"probe rank {rank} restart 0\n"
        assert (logs / "stderr.log").read_text() == "warned\n"
    assert_nothing_survives({run.run_id})


def test_console_streams_stderr_keeps_stdout_in_the_files_only(
    elastic_run: ElasticRunner, probe_out: Path
) -> None:
    run = elastic_run(
        *probe_job(probe_out, "--stderr", "to stderr", "--ranks", "0,1", nproc=2),
        "logs.console_streams=[stderr]",
    )
    assert run.returncode == 0, run.stderr
    assert "probe rank" not in run.stdout + run.stderr
    assert not [line for line in run.stdout.splitlines() if "]: " in line]
    for rank in (0, 1):
        assert f"[default{rank}]: to stderr" in run.stderr.splitlines()
        logs = run.run_dir / "attempt_1" / str(rank)
        assert (logs / "stdout.log").read_text() == f"probe rank {rank} restart 0\n"
        assert (logs / "stderr.log").read_text() == "to stderr\n"
    assert_nothing_survives({run.run_id})
    # an empty list: nothing reaches the console, as with logs.tee=false
    run = elastic_run(
        *probe_job(probe_out, "--stderr", "to stderr", "--ranks", "0", nproc=1),
        "logs.console_streams=[]",
    )
    assert run.returncode == 0, run.stderr
    assert "]: " not in run.stdout and "]: to stderr" not in run.stderr
    assert (run.run_dir / "attempt_1/0/stderr.log").read_text() == "to stderr\n"
    assert_nothing_survives({run.run_id})
