"""Job ids and secrets, end to end: one job's id can never reach another job's keys in a
shared store, and no secret of the configuration appears in any file a run writes (its
run directory, a sweep's directory) nor in what it prints."""

from __future__ import annotations

import json
import stat
import subprocess
import uuid
from pathlib import Path

import pytest

from elastic_runner.rendezvous.etcd_store import EtcdStore
from elastic_runner.rendezvous.kit import parse_endpoints
from elastic_runner.testing.etcd import EtcdServer
from elastic_runner.testing.runner import elastic_run_exe, processes_of_runs, wait_for
from tests.conftest import ElasticRunner, free_port, probe_records
from tests.e2e.test_etcd import ETCD_FAST
from tests.e2e.test_multinode import Job

#: Files that hold the job's configuration: readable by their owner only.
PRIVATE = ["config.yaml", ".hydra/config.yaml", ".hydra/hydra.yaml", ".hydra/overrides.yaml"]


def _keys(etcd: EtcdServer, run_id: str) -> dict[str, str]:
    store = EtcdStore(parse_endpoints(etcd.endpoint, 2379))
    try:
        return store.scan(f"rdzv/{run_id}/")[0]
    finally:
        store.close()


def _files_holding(directory: Path, *secrets: str) -> dict[str, list[str]]:
    """Every file under ``directory`` that holds one of ``secrets``, with the secrets."""
    found = {}
    for path in directory.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            if hits := [s for s in secrets if s.encode() in data]:
                found[str(path.relative_to(directory))] = hits
    return found


def test_a_job_finishing_leaves_a_neighbours_keys_alone(
    elastic_run: ElasticRunner, tmp_path: Path, etcd_server: EtcdServer
) -> None:
    """``rdzv.id=team`` ends (its last node deletes ``rdzv/team/``) while ``team.exp1``
    runs on the same etcd: the neighbour's keys stay and its workers run on."""
    team = f"team{uuid.uuid4().hex[:6]}"
    rdzv = ["rdzv=etcd", f"rdzv.endpoint={etcd_server.endpoint}", *ETCD_FAST]
    neighbour = Job(elastic_run, tmp_path / "exp1", "1", rdzv=rdzv)
    neighbour.run_id = f"{team}.exp1"
    neighbour.start(nproc=2, probe=("--sleep", "6"))
    wait_for(lambda: len(probe_records(neighbour.out)) == 2, what="the neighbour's workers")
    before = set(_keys(etcd_server, neighbour.run_id))
    assert f"rdzv/{neighbour.run_id}/round" in before, before
    assert any("/alive/" in k for k in before), before

    job = Job(elastic_run, tmp_path / "team", "1", rdzv=rdzv)
    job.run_id = team
    job.start(nproc=1)
    assert [code for code, _ in job.finish()] == [0]
    assert _keys(etcd_server, team) == {}  # its own keys went

    assert set(_keys(etcd_server, neighbour.run_id)) == before  # the neighbour's did not
    results = neighbour.finish()
    assert [code for code, _ in results] == [0], results
    assert neighbour.rendezvous_counts() == [1]  # never re-formed
    assert sorted(probe_records(neighbour.out)) == [(0, 0), (0, 1)]  # never restarted
    assert _keys(etcd_server, neighbour.run_id) == {}


@pytest.mark.parametrize("run_id", ["team/exp1", "../team", "a b"])
def test_a_run_id_that_could_reach_other_keys_is_one_line(
    elastic_run: ElasticRunner, run_id: str
) -> None:
    proc, run_dir, _ = elastic_run.popen("+job=hello", run_id=run_id)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 2, err
    assert err.splitlines() == [
        f"elastic-run: error: rdzv.id={run_id}: expected 1 to 128 letters, digits, '.', '_' "
        "or '-', starting with a letter or digit (no '/'), e.g. rdzv.id=team.exp1"
    ]
    assert not list(run_dir.glob("attempt_*"))


SECRETS = ("s3cr3t-store", "s3cr3t-hf", "s3cr3t-arg")


@pytest.mark.parametrize("backend", ["tcp", "etcd"])
def test_secrets_appear_in_no_file_and_config_files_are_private(
    elastic_run: ElasticRunner, request: pytest.FixtureRequest, backend: str
) -> None:
    if backend == "tcp":
        rdzv = ["rdzv=tcp", f"rdzv.endpoint=127.0.0.1:{free_port()}", f"rdzv.token={SECRETS[0]}"]
    else:  # a password without a user is not sent: no etcd auth to set up
        etcd: EtcdServer = request.getfixturevalue("etcd_server")
        rdzv = ["rdzv=etcd", f"rdzv.endpoint={etcd.endpoint}", f"rdzv.password={SECRETS[0]}"]
    run = elastic_run(
        "+job=hello",
        "job.nproc_per_node=2",
        *rdzv,
        f"+job.env.HF_TOKEN={SECRETS[1]}",
        f'job.args=["--api-token={SECRETS[2]}"]',
    )
    assert run.returncode == 0, run.stderr
    assert _files_holding(run.run_dir, *SECRETS) == {}
    assert not [s for s in SECRETS if s in run.stdout + run.stderr]
    for name in PRIVATE:
        assert stat.S_IMODE((run.run_dir / name).stat().st_mode) == 0o600, name
    config = (run.run_dir / "config.yaml").read_text()
    secret_key = "token" if backend == "tcp" else "password"
    assert f"{secret_key}: '***'" in config and "HF_TOKEN: '***'" in config
    assert "--api-token=***" in config
    result = json.loads((run.run_dir / "result.json").read_text())
    assert f"rdzv.{secret_key}=***" in result["overrides"]
    assert "+job.env.HF_TOKEN=***" in result["overrides"]


def test_a_config_error_holding_a_secret_shows_none(elastic_run: ElasticRunner) -> None:
    run = elastic_run("+job=hello", "rdzv=tcp", f"rdzv.token=[{SECRETS[0]}]")
    assert run.returncode == 2, run.stderr
    assert run.stderr.splitlines() == [
        "elastic-run: error: rdzv.token=***: Cannot convert 'list' to string"
    ]
    assert _files_holding(run.run_dir, SECRETS[0]) == {}


def test_secrets_of_a_parallel_sweep_appear_in_no_file(tmp_path: Path) -> None:
    """Sweep points run by the joblib launcher in processes of its own: each rewrites its
    ``.hydra/`` (and the sweep's ``multirun.yaml``) there; Hydra's launch lines and the
    summary hide the swept secret too."""
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    sweep_dir = tmp_path / "sweep"
    done = subprocess.run(
        [
            elastic_run_exe(),
            "--multirun",
            "+job=hello",
            "job.nproc_per_node=1",
            f"+job.env.HF_TOKEN={SECRETS[1]}-a,{SECRETS[1]}-b",
            f'job.args=["--api-token={SECRETS[2]}"]',
            "hydra/launcher=joblib",
            "hydra.launcher.n_jobs=2",
            f"hydra.sweep.dir={sweep_dir}",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert "+job.env.HF_TOKEN=***" in done.stdout  # Hydra's "#0 : ..." lines
    assert _files_holding(sweep_dir, *SECRETS) == {}
    assert not [s for s in SECRETS if s in done.stdout + done.stderr]
    assert stat.S_IMODE((sweep_dir / "multirun.yaml").stat().st_mode) == 0o600
    for point in ("0", "1"):
        for name in PRIVATE:
            assert stat.S_IMODE((sweep_dir / point / name).stat().st_mode) == 0o600
    assert not processes_of_runs(
        {json.loads((sweep_dir / p / "result.json").read_text())["run_id"] for p in "01"}
    )
