"""The built-in node checks, each on the real machine (disk, memory, a command) or a
fake device tree (GPUs), and their keys' validation."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from elastic_runner.checks import (
    ChecksConfig,
    CommandCheck,
    DiskCheck,
    GpuCheck,
    MemoryCheck,
    NodeCheck,
    plugin_name,
)
from elastic_runner.errors import ConfigError
from elastic_runner.spec import RunContext
from tests.conftest import validated


@pytest.fixture
def context(tmp_path: Path) -> RunContext:
    return RunContext("rid", tmp_path, "node0")


def test_disk(context: RunContext, tmp_path: Path) -> None:
    free = shutil.disk_usage(tmp_path).free
    assert DiskCheck(str(tmp_path), 1).elastic_runner_before_rendezvous(context) is None
    why = DiskCheck(str(tmp_path), free * 1000).elastic_runner_before_rendezvous(context)
    assert why is not None and why.startswith(f"{tmp_path}: ") and "needed" in why
    gone = DiskCheck(str(tmp_path / "nope"), 1).elastic_runner_before_rendezvous(context)
    assert gone == f"{tmp_path / 'nope'}: No such file or directory"


def test_memory(context: RunContext) -> None:
    assert MemoryCheck(1).elastic_runner_before_rendezvous(context) is None
    why = MemoryCheck(2**60).elastic_runner_before_rendezvous(context)
    assert why is not None and why.endswith("available, 1048576.0 TiB needed")


def test_gpus_from_a_fake_device_tree(
    context: RunContext, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "root"
    for i in range(2):
        (root / "proc/driver/nvidia/gpus" / f"0000:0{i}:00.0").mkdir(parents=True)
    monkeypatch.setenv("ELASTIC_RUNNER_DEVICE_ROOT", str(root))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert GpuCheck(2).elastic_runner_before_rendezvous(context) is None
    why = GpuCheck(8).elastic_runner_before_rendezvous(context)
    assert why is not None and why.startswith("8 GPUs needed; 2 NVIDIA GPUs")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    why = GpuCheck(2).elastic_runner_before_rendezvous(context)
    assert why is not None and "1 NVIDIA GPU" in why


def test_command(context: RunContext) -> None:
    assert CommandCheck("true", 5).elastic_runner_before_rendezvous(context) is None
    why = CommandCheck("echo link down >&2; exit 3", 5).elastic_runner_before_rendezvous(context)
    assert why == "'echo link down >&2; exit 3' exited 3: link down"
    why = CommandCheck("sleep 30", 0.2).elastic_runner_before_rendezvous(context)
    assert why == "'sleep 30' did not finish in 0.2 s"


def _valid(*overrides: str) -> tuple[NodeCheck, ...]:
    return validated(*overrides).checks


def test_config_builds_the_checks_asked_for() -> None:
    assert _valid() == ()
    checks = _valid(
        "+checks.disk={/: 1GiB}", "checks.gpus=2", "checks.memory=512MiB", "checks.command=true"
    )
    assert [plugin_name(c) for c in checks] == [
        "check:disk:/",
        "check:gpus",
        "check:memory",
        "check:command",
    ]
    assert checks[0] == DiskCheck("/", 2**30)


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["+checks.disk={/: lots}"], "checks.disk./"),
        (["checks.gpus=-1"], "checks.gpus"),
        (["checks.memory=0"], "checks.memory"),
        (["checks.command=' '"], "checks.command"),
        (["checks.command=true", "checks.command_timeout=0"], "checks.command_timeout"),
        (["checks.retry_for=60", "checks.retry_interval=0"], "checks.retry_interval"),
        (["checks.retry_for=-1"], "checks.retry_for"),
    ],
)
def test_bad_keys_are_named(overrides: list[str], key: str) -> None:
    with pytest.raises(ConfigError) as info:
        _valid(*overrides)
    assert info.value.key == key


def test_the_default_config_has_no_checks() -> None:
    assert ChecksConfig() == ChecksConfig(disk={}, gpus=0, memory=None, command=None)
