"""The assembly step, in this process and without Hydra: each way a build can fail leaves
no thread, file descriptor, socket, FIFO or process behind; a run that succeeds neither."""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from elastic_runner.config import ElasticRunConfig, HealthConfig, JobConfig, LogsConfig, validate
from elastic_runner.errors import ConfigError
from elastic_runner.events.builtin import JsonlEventsConfig
from elastic_runner.metrics.builtin import JsonlMetricsConfig
from elastic_runner.plugins import LoadedPlugins, load_plugins
from elastic_runner.rendezvous.local import LocalRendezvousConfig
from elastic_runner.rendezvous.tcp import TcpRendezvousConfig
from elastic_runner.run import run
from elastic_runner.spec import RunResult, WorkerState
from elastic_runner.testing.runner import free_port
from elastic_runner.timer.server import FileTimerConfig


def _config(tmp_path: Path, rdzv: Any, **changes: Any) -> ElasticRunConfig:
    """Every component that holds something: a FIFO and its thread, two open files, a
    listening socket."""
    settings: dict[str, Any] = {
        "job": JobConfig(entrypoint="true", nproc_per_node=2),
        "rdzv": rdzv,
        "logs": LogsConfig(tee=False, live="false"),
        "events": JsonlEventsConfig(),
        "metrics": JsonlMetricsConfig(),
        "timer": FileTimerConfig(path=str(tmp_path / "timer.fifo")),
        "health": HealthConfig(port=free_port()),
    }
    return ElasticRunConfig(**{**settings, **changes})


def _run(config: ElasticRunConfig, plugins: LoadedPlugins, run_dir: Path) -> RunResult:
    run_dir.mkdir(exist_ok=True)
    return run(validate(config), plugins, run_dir=run_dir, base_env=dict(os.environ))


def _open_fds() -> set[str]:
    return {
        f"{fd} -> {os.readlink(f'/proc/self/fd/{fd}')}"
        for fd in os.listdir("/proc/self/fd")
        if os.path.exists(f"/proc/self/fd/{fd}")
    }


@pytest.fixture
def plugins() -> LoadedPlugins:
    loaded = load_plugins(autoload=False)
    _ = loaded.registry  # built once, before the snapshot
    return loaded


@pytest.fixture
def nothing_leaks(tmp_path: Path) -> Iterator[None]:
    """Threads, open file descriptors and child processes are the same after the test
    (a session's daemons, such as the Slurm test cluster's, may be children already)."""
    threads, fds = set(threading.enumerate()), _open_fds()
    children = {p.pid for p in psutil.Process().children(recursive=True)}
    yield
    assert set(threading.enumerate()) == threads
    assert _open_fds() == fds
    assert {p.pid for p in psutil.Process().children(recursive=True)} == children
    assert not (tmp_path / "timer.fifo").exists()


def _port_is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@pytest.mark.usefixtures("nothing_leaks")
def test_a_rendezvous_config_error_closes_what_was_built(
    tmp_path: Path, plugins: LoadedPlugins
) -> None:
    rdzv = TcpRendezvousConfig(endpoint="127.0.0.1:1,127.0.0.1:2", id="x")
    config = _config(tmp_path, rdzv)
    with pytest.raises(ConfigError, match="rdzv=tcp takes one host:port"):
        _run(config, plugins, tmp_path / "run")
    assert _port_is_free(config.health.port)


@pytest.mark.usefixtures("nothing_leaks")
def test_a_rendezvous_that_cannot_start_is_a_failed_run_with_nothing_left(
    tmp_path: Path, plugins: LoadedPlugins
) -> None:
    # no interface has this address (TEST-NET-1): binding fails at once, nothing is sent
    rdzv = TcpRendezvousConfig(
        endpoint=f"127.0.0.1:{free_port()}", id="x", is_host=True, bind="192.0.2.1"
    )
    config = _config(tmp_path, rdzv)
    result = _run(config, plugins, tmp_path / "run")
    assert result.state == WorkerState.FAILED and result.exit_code == 1
    assert "cannot host the rendezvous store" in result.ended_because
    assert result.run_id == "x" and result.run_dir == tmp_path / "run"
    assert _port_is_free(config.health.port)


@pytest.mark.usefixtures("nothing_leaks")
def test_a_busy_health_port_closes_the_timer_sink_and_handler(
    tmp_path: Path, plugins: LoadedPlugins
) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        config = _config(tmp_path, LocalRendezvousConfig(), health=HealthConfig(port=port))
        with pytest.raises(ConfigError, match=rf"health\.port={port}: cannot listen"):
            _run(config, plugins, tmp_path / "run")


@pytest.mark.usefixtures("nothing_leaks")
def test_a_bad_timer_path_is_a_config_error(tmp_path: Path, plugins: LoadedPlugins) -> None:
    config = _config(
        tmp_path, LocalRendezvousConfig(), timer=FileTimerConfig(path="/nonexistent/dir/fifo")
    )
    with pytest.raises(ConfigError, match=r"timer\.path=/nonexistent/dir/fifo"):
        _run(config, plugins, tmp_path / "run")


@pytest.mark.usefixtures("nothing_leaks")
def test_a_run_that_succeeds_closes_everything_too(tmp_path: Path, plugins: LoadedPlugins) -> None:
    config = _config(tmp_path, LocalRendezvousConfig())
    result = _run(config, plugins, tmp_path / "run")
    assert result.state == WorkerState.SUCCEEDED and result.attempts == 1
    assert (tmp_path / "run" / "config.yaml").read_text().count(result.run_id) == 1
    assert (tmp_path / "run" / "events.jsonl").stat().st_size > 0
    assert _port_is_free(config.health.port)


def test_workers_do_not_inherit_the_rendezvous_token() -> None:
    from elastic_runner.run import _without_secrets

    env = {"PATH": "/bin", "ELASTIC_RUNNER_RDZV_TOKEN": "s3cr3t", "MY_TOKEN": "s3cr3t"}
    assert _without_secrets(env, LocalRendezvousConfig()) == {"PATH": "/bin", "MY_TOKEN": "s3cr3t"}
    rdzv = TcpRendezvousConfig(endpoint="127.0.0.1:1", id="x", token_env="MY_TOKEN")
    assert _without_secrets(env, rdzv) == {"PATH": "/bin"}
