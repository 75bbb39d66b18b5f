"""pytest fixtures for plugin packages' tests (and elastic_runner's own). Import the ones
you use into your ``conftest.py``::

    from elastic_runner.testing.fixtures import elastic_run, etcd_server  # noqa: F401
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pluggy
import pytest

from elastic_runner.plugins import make_plugin_manager
from elastic_runner.testing.etcd import etcd_server
from elastic_runner.testing.runner import ElasticRunner, assert_nothing_survives

__all__ = ["elastic_run", "etcd_server", "plugin_manager"]


@pytest.fixture
def elastic_run(tmp_path: Path) -> Iterator[ElasticRunner]:
    """Runs ``elastic-run`` for real (``elastic_run("+job=hello", "nnodes=1")``) and, at
    teardown, fails the test if any process of those runs survived, or if an agent started
    with ``popen`` was still running (it is killed either way)."""
    runner = ElasticRunner(tmp_path)
    yield runner
    try:
        assert_nothing_survives(runner.run_ids)
    finally:
        left = runner.kill_agents()
    assert not left, f"elastic-run agents still running at the end of the test: {left}"


@pytest.fixture
def plugin_manager() -> pluggy.PluginManager:
    """A fresh plugin manager with the built-in plugins only (register yours on it)."""
    return make_plugin_manager(autoload=False)
