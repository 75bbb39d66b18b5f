"""Plugins installed for real (pip, entry points) and used through ``elastic-run``:
discovery, a broken plugin, a plugin's schema on the command line, the listing, every
lifecycle hook observed from a test plugin (tests/plugins/sample), and a plugin with a
misspelled hook name (tests/plugins/misspelled), refused at start-up."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from elastic_runner.testing.etcd import EtcdServer
from tests.conftest import TESTS, ElasticRunner, probe_job, probe_records

PLUGINS = TESTS / "plugins"
FAILER = TESTS / "workers" / "failer.py"


def pip_install(target: Path, *packages: str) -> Path:
    """``packages`` (directories of tests/plugins) installed by pip into ``target``."""
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "--disable-pip-version-check",
            "--target",
            str(target),
            *(str(PLUGINS / package) for package in packages),
        ],
        check=True,
        stdin=subprocess.DEVNULL,
    )
    return target


def env_with(site: Path) -> dict[str, str]:
    """This environment, with autoloading on and the plugins installed in ``site``."""
    env = dict(os.environ)
    env.pop("ELASTIC_RUNNER_DISABLE_PLUGIN_AUTOLOAD", None)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), env.get("PYTHONPATH")]))
    return env


@pytest.fixture(scope="session")
def plugin_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tests/plugins/{sample,broken} installed by pip into a directory of their own."""
    return pip_install(tmp_path_factory.mktemp("site"), "sample", "broken")


@pytest.fixture(scope="session")
def misspelled_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tests/plugins/misspelled alone (with the others, their own warning would be a
    second line on stderr)."""
    return pip_install(tmp_path_factory.mktemp("site_misspelled"), "misspelled")


@pytest.fixture
def env_with_plugins(plugin_path: Path, tmp_path: Path) -> dict[str, str]:
    env = env_with(plugin_path)
    env["ER_SAMPLE_LOG"] = str(tmp_path / "hooks.jsonl")
    return env


@pytest.fixture
def env_with_misspelled(misspelled_path: Path, tmp_path: Path) -> dict[str, str]:
    env = env_with(misspelled_path)
    env["ER_MISSPELLED_LOG"] = str(tmp_path / "misspelled.log")
    return env


def run(elastic_run: ElasticRunner, env: dict[str, str], *overrides: str) -> tuple[int, str]:
    proc, _, _ = elastic_run.popen(*overrides, env=env)
    _, err = proc.communicate(timeout=60)
    return proc.returncode, err


def hook_log(env: dict[str, str]) -> list[dict[str, Any]]:
    path = Path(env["ER_SAMPLE_LOG"])
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_listing_names_each_plugin_its_source_and_what_it_provides(
    env_with_plugins: dict[str, str],
) -> None:
    listing = subprocess.run(
        [sys.executable, "-m", "elastic_runner", "plugins", "--json"],
        capture_output=True,
        text=True,
        env=env_with_plugins,
        check=True,
    )
    entries = {e["name"]: e for e in json.loads(listing.stdout)}
    sample = entries["sample"]
    assert sample["source"] == "er-sample-plugin 1.2.3 (entry point er_sample_plugin)"
    assert sample["components"] == {"events": {"sample": "event names, one a line"}}
    assert sample["hooks"] == ["before_rendezvous", "workers_started", "worker_failure", "run_end"]
    assert entries["broken"]["error"] == (
        "ImportError: No module named 'missing_dependency_of_the_broken_plugin'"
    )
    tcp = entries["elastic_runner.rendezvous.tcp"]
    assert tcp["components"]["rdzv"].keys() == {"tcp", "static"}
    text = subprocess.run(
        [sys.executable, "-m", "elastic_runner", "plugins"],
        capture_output=True,
        text=True,
        env=env_with_plugins,
        check=True,
    ).stdout
    assert "sample: er-sample-plugin 1.2.3 (entry point er_sample_plugin)\n    events=" in text
    assert "broken: er-broken-plugin 0.0.1 (entry point er_broken_plugin)\n    FAILED" in text


def test_a_broken_plugin_is_one_warning_and_the_run_goes_on(
    elastic_run: ElasticRunner, env_with_plugins: dict[str, str]
) -> None:
    code, err = run(elastic_run, env_with_plugins, "+job=hello")
    assert code == 0, err
    warnings = [line for line in err.splitlines() if line.startswith("elastic-run: warning")]
    assert warnings == [
        "elastic-run: warning: plugin 'broken' (er_broken_plugin, from er-broken-plugin): "
        "ImportError: No module named 'missing_dependency_of_the_broken_plugin'; skipped "
        "(selecting what it provides is an error)"
    ]


def test_selecting_a_missing_option_names_the_broken_plugin(
    elastic_run: ElasticRunner, env_with_plugins: dict[str, str]
) -> None:
    code, err = run(elastic_run, env_with_plugins, "+job=hello", "events=kafka")
    assert code == 2
    last = err.strip().splitlines()[-1]
    assert last.startswith(
        "elastic-run: error: events=kafka: no such option in group 'events'; allowed: "
        "console, jsonl, null, sample; installed plugins that failed to load: plugin 'broken'"
    ), err
    assert "Traceback" not in err


def test_autoload_can_be_switched_off(
    elastic_run: ElasticRunner, env_with_plugins: dict[str, str]
) -> None:
    env = {**env_with_plugins, "ELASTIC_RUNNER_DISABLE_PLUGIN_AUTOLOAD": "1"}
    code, err = run(elastic_run, env, "+job=hello", "events=sample")
    assert code == 2
    assert "events=sample: no such option" in err and "broken" not in err


def test_a_plugin_schema_composes_and_validates(
    elastic_run: ElasticRunner, env_with_plugins: dict[str, str], tmp_path: Path
) -> None:
    proc, run_dir, _ = elastic_run.popen(
        "+job=hello", "events=sample", "events.file=names.txt", env=env_with_plugins
    )
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    names = (run_dir / "names.txt").read_text().splitlines()
    assert names[:2] == ["elastic_runner.rendezvous.join", "torchelastic.worker.status.RENDEZVOUS"]
    assert names.count("torchelastic.worker.status.START") == 4  # +job=hello: 4 workers
    assert names[-2:] == ["torchelastic.worker.status.SUCCEEDED", "elastic_runner.shutdown"]
    code, err = run(elastic_run, env_with_plugins, "+job=hello", "events=sample", "events.fiel=x")
    assert code == 2
    assert err.strip().splitlines()[-1] == (
        "elastic-run: error: events.fiel=x: no such key; allowed keys at events: file, sink"
    )


def test_lifecycle_hooks_see_the_failure_and_the_restart(
    elastic_run: ElasticRunner, env_with_plugins: dict[str, str], tmp_path: Path
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    code, err = run(
        elastic_run,
        env_with_plugins,
        f"job.entrypoint={FAILER}",
        f'job.args=["{out}","1=record"]',
        "job.nproc_per_node=2",
        "max_restarts=1",
    )
    assert code == 1, err
    log = hook_log(env_with_plugins)
    assert [(r["hook"], r.get("attempt")) for r in log] == [
        ("before_rendezvous", 1),
        ("workers_started", 1),
        ("worker_failure", 1),
        ("before_rendezvous", 2),
        ("workers_started", 2),
        ("worker_failure", 2),
        ("run_end", None),
    ]
    first_failure = log[2]
    assert first_failure["rank"] == 1 and first_failure["kind"] == "EXIT_CODE"
    assert first_failure["message"] == "ValueError: rank 1 bad input"
    assert first_failure["will_restart"] is True and log[5]["will_restart"] is False
    assert log[3]["restart_count"] == 0  # the restart is counted when the round forms
    assert all(isinstance(p, int) for p in log[1]["pids"]) and log[1]["ranks"] == [0, 1]
    assert (log[6]["state"], log[6]["exit_code"], log[6]["attempts"]) == ("FAILED", 1, 2)
    assert log[6]["root_cause"] == "ValueError: rank 1 bad input"


def test_a_failing_health_check_keeps_the_node_out(
    elastic_run: ElasticRunner,
    env_with_plugins: dict[str, str],
    etcd_server: EtcdServer,
    tmp_path: Path,
) -> None:
    out = tmp_path / "probe"
    out.mkdir()
    run_id = f"health-{os.getpid()}-{tmp_path.name}"
    common = [
        *probe_job(out),
        "rdzv=etcd",
        f"rdzv.endpoint={etcd_server.endpoint}",
        "nnodes=1:2",
        "rdzv.last_call_timeout=1",
        "rdzv.heartbeat_interval=0.5",
        "rdzv.heartbeat_timeout=3",
    ]
    sick_env = {**env_with_plugins, "ER_SAMPLE_REFUSE": "GPU 3 reports ECC errors"}
    sick, _, _ = elastic_run.popen(*common, run_id=run_id, env=sick_env)
    _, sick_err = sick.communicate(timeout=60)
    healthy, _, _ = elastic_run.popen(*common, run_id=run_id, env=env_with_plugins)
    _, healthy_err = healthy.communicate(timeout=60)
    assert sick.returncode == 1, sick_err
    assert "health check of plugin 'sample' refused to join: GPU 3 reports ECC errors" in sick_err
    assert healthy.returncode == 0, healthy_err
    records = probe_records(out)
    assert list(records) == [(0, 0)]  # only the healthy node's worker ever ran
    assert records[0, 0]["env"]["WORLD_SIZE"] == "1"
    ends = [r for r in hook_log(env_with_plugins) if r["hook"] == "run_end"]
    assert sorted(r["state"] for r in ends) == ["FAILED", "SUCCEEDED"]


MISSPELLED = (
    "plugin 'misspelled' from er-misspelled-plugin 0.3.0 (entry point er_misspelled_plugin): "
    "unknown hook 'elastic_runner_workers_startd' "
    "(did you mean 'elastic_runner_workers_started'?)"
)


def test_a_misspelled_hook_is_one_line_and_exit_2_before_any_worker(
    elastic_run: ElasticRunner, env_with_misspelled: dict[str, str]
) -> None:
    proc, run_dir, _ = elastic_run.popen("+job=hello", env=env_with_misspelled)
    out, err = proc.communicate(timeout=60)
    assert err.splitlines() == [f"elastic-run: error: {MISSPELLED}"], err
    assert proc.returncode == 2
    assert "hello from rank" not in out
    assert not list(run_dir.glob("attempt_*")), "no worker may start"
    assert not Path(env_with_misspelled["ER_MISSPELLED_LOG"]).exists()


def test_the_listing_refuses_a_misspelled_hook_in_one_line(
    env_with_misspelled: dict[str, str],
) -> None:
    for argv in (["plugins"], ["plugins", "--json"]):
        listing = subprocess.run(
            [sys.executable, "-m", "elastic_runner", *argv],
            capture_output=True,
            text=True,
            env=env_with_misspelled,
        )
        assert listing.returncode == 2, listing.stderr
        assert listing.stderr.splitlines() == [f"python -m elastic_runner: error: {MISSPELLED}"]
        assert listing.stdout == ""
