"""pytest fixtures for plugin packages' tests (and elastic_runner's own). Import the ones
you use into your ``conftest.py``::

    from elastic_runner.testing.fixtures import elastic_run, etcd_server  # noqa: F401
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pluggy
import pytest

from elastic_runner.plugins import make_plugin_manager
from elastic_runner.testing.etcd import etcd_server
from elastic_runner.testing.netns import Cluster, NetnsUnavailable
from elastic_runner.testing.runner import ElasticRunner, assert_nothing_survives
from elastic_runner.testing.slurm import slurm_cluster

__all__ = ["elastic_run", "etcd_server", "netns_cluster", "plugin_manager", "slurm_cluster"]


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


@pytest.fixture
def netns_cluster() -> Iterator[Callable[..., Cluster]]:
    """Makes clusters of hosts as network namespaces: ``cluster = netns_cluster(3)`` (the
    arguments of :class:`~elastic_runner.testing.netns.Cluster`) returns a started cluster.
    The test is skipped, with the reason, where namespaces cannot be made (not root, no
    ``ip``, no capability). At teardown, also after a failure, every cluster is closed:
    its processes killed and its namespaces, links and ``/etc/netns`` files removed."""
    clusters: list[Cluster] = []

    def make(n: int | None = None, **kwargs: Any) -> Cluster:
        cluster = Cluster(n, **kwargs)
        clusters.append(cluster)
        try:
            return cluster.start()
        except NetnsUnavailable as exc:
            pytest.skip(f"network namespaces unavailable: {exc}")

    yield make
    errors: list[Exception] = []
    for cluster in reversed(clusters):
        try:
            cluster.close()
        except Exception as exc:  # close the others all the same
            errors.append(exc)
    if errors:
        raise errors[0]
