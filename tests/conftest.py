"""Shared fixtures: running ``elastic-run`` for real and checking nothing survives a test."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest

from elastic_runner.config import ValidConfig
from elastic_runner.plugins import DISABLE_AUTOLOAD_ENV
from elastic_runner.testing.fixtures import elastic_run, etcd_server, netns_cluster, slurm_cluster
from elastic_runner.testing.runner import (
    ElasticRunner,
    Run,
    assert_nothing_survives,
    free_port,
    processes_of_runs,
)

# The fixtures are re-exported for pytest to find them here, the testing helpers for tests
# to import them from here (``from tests.conftest import ElasticRunner, free_port``).
__all__ = [
    "PROBE",
    "TESTS",
    "ElasticRunner",
    "Run",
    "assert_nothing_survives",
    "by_value",
    "elastic_run",
    "etcd_server",
    "free_port",
    "netns_cluster",
    "probe_job",
    "probe_out",
    "probe_records",
    "processes_of_runs",
    "slurm_cluster",
    "validated",
]

TESTS = Path(__file__).resolve().parent

# elastic_runner's own tests see the built-in plugins only, whatever else is installed in
# the environment (the plugin packages in plugins/ are, in CI); tests of installed
# plugins pass an environment of their own (tests/e2e/test_installed_plugins.py).
os.environ[DISABLE_AUTOLOAD_ENV] = "1"
PROBE = TESTS / "workers" / "probe.py"


F = TypeVar("F", bound=Callable[..., Any])


def by_value(fn: F) -> F:
    """Have cloudpickle send ``fn`` to ``launch()``'s workers by value (as a function of
    ``__main__``), so that they do not import the test module, pytest and the test
    helpers (about 0.5 s a start)."""
    fn.__qualname__ = f"{fn.__name__}.<sent by value>"
    return fn


def validated(*overrides: str) -> ValidConfig:
    """What ``validate`` makes of ``elastic-run job.entrypoint=true OVERRIDES``, composed
    by Hydra from the package's configs (built-in plugins only)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from elastic_runner.config import ElasticRunConfig, register_configs, validate
    from elastic_runner.plugins import make_plugin_manager
    from elastic_runner.registry import Registry
    from elastic_runner.resources import conf_dir

    register_configs(Registry(make_plugin_manager(autoload=False)))
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg = compose("config", overrides=["job.entrypoint=true", *overrides])
    conf = OmegaConf.to_object(cfg)
    assert isinstance(conf, ElasticRunConfig)
    return validate(conf)


@pytest.fixture
def probe_out(tmp_path: Path) -> Path:
    out = tmp_path / "probe"
    out.mkdir()
    return out


def probe_job(out: Path, *args: str, nproc: int = 1) -> list[str]:
    """Overrides that run the probe worker (tests/workers/probe.py)."""
    joined = ",".join(f'"{a}"' for a in ["--out", str(out), *args])
    return [f"job.entrypoint={PROBE}", f"job.args=[{joined}]", f"job.nproc_per_node={nproc}"]


def probe_records(out: Path) -> dict[tuple[int, int], dict[str, Any]]:
    """{(restart_count, rank): record} written by probe workers (the last one wins)."""
    records: dict[tuple[int, int], dict[str, Any]] = {}
    for path in sorted(out.glob("a*_r*.json"), key=lambda p: p.stat().st_mtime):
        restart, rank = path.stem[1:].split("_")[:2]
        records[int(restart), int(rank[1:])] = json.loads(path.read_text())
    return records
