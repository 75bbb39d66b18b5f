"""GPU counting without torch (elastic_runner.accelerators) on fake device trees, and
``job.nproc_per_node=auto|gpu|cpu`` through validation and through ``elastic-run``."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from elastic_runner.accelerators import (
    DEVICE_ROOT_ENV,
    GpuCount,
    cuda_visible_count,
    detect_gpus,
)
from elastic_runner.config import ConfigError, parse_nproc_per_node
from tests.conftest import ElasticRunner

CPUS = len(os.sched_getaffinity(0))
SMI_OUTPUT = (
    "GPU 0: NVIDIA A100-SXM4-40GB (UUID: GPU-11111111-aaaa)\n"
    "  MIG 1g.5gb     Device  0: (UUID: MIG-22222222-bbbb)\n"
    "GPU 1: NVIDIA A100-SXM4-40GB (UUID: GPU-33333333-cccc)\n"
)


# -- fake device trees ---------------------------------------------------------------------


def nvidia_proc(root: Path, n: int, uuids: Sequence[str] | None = None) -> Path:
    """``proc/driver/nvidia/gpus/<bus id>/information``, one directory per GPU, as the
    NVIDIA kernel module publishes them."""
    gpus = root / "proc/driver/nvidia/gpus"
    gpus.mkdir(parents=True)
    for i in range(n):
        gpu = gpus / f"0000:{i + 1:02x}:00.0"
        gpu.mkdir()
        uuid = uuids[i] if uuids else "??"
        gpu.joinpath("information").write_text(
            f"Model: \t\t NVIDIA A100-SXM4-40GB\nIRQ:   \t\t 42\nGPU UUID: \t {uuid}\n"
            f"Bus Location: \t 0000:{i + 1:02x}:00.0\nDevice Minor: \t {i}\n"
        )
    return gpus


def touch(root: Path, *names: str) -> None:
    """Device nodes as plain files: detection looks at names only."""
    for name in names:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()


def kfd(root: Path, simd_counts: Sequence[int]) -> None:
    """A KFD topology: one node per CPU (``simd_count 0``) or GPU."""
    for i, simd in enumerate(simd_counts):
        node = root / f"sys/class/kfd/kfd/topology/nodes/{i}"
        node.mkdir(parents=True)
        node.joinpath("properties").write_text(
            f"cpu_cores_count {0 if simd else 16}\nsimd_count {simd}\nmem_banks_count 1\n"
        )


class Runner:
    """A fake ``subprocess.run``: records every command; answers, or raises ``error``."""

    def __init__(
        self, stdout: str = "", returncode: int = 0, error: BaseException | None = None
    ) -> None:
        self.stdout, self.returncode, self.error = stdout, returncode, error
        self.calls: list[tuple[list[str], dict[str, Any]]] = []

    def __call__(self, args: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        self.calls.append((args, kwargs))
        if self.error is not None:
            raise self.error
        return subprocess.CompletedProcess(args, self.returncode, self.stdout, "")


def fake_smi(tmp_path: Path, body: str) -> dict[str, str]:
    """An environment whose PATH finds only a ``nvidia-smi`` script running ``body``."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "nvidia-smi"
    script.write_text(f"#!/bin/sh\n{body}\n")
    script.chmod(0o755)
    return {"PATH": str(bin_dir)}


# -- where GPUs are found ------------------------------------------------------------------


def test_proc_lists_one_directory_per_gpu_and_no_command_runs(tmp_path: Path) -> None:
    gpus = nvidia_proc(tmp_path, 8)
    touch(tmp_path, "dev/nvidia0", "dev/nvidiactl")  # /proc wins over /dev
    runner = Runner(error=AssertionError("no command when /proc answers"))
    found = detect_gpus(tmp_path, {}, runner)
    assert (found.visible, found.found, found.vendor, found.source) == (8, 8, "NVIDIA", str(gpus))
    assert found.describe() == f"8 NVIDIA GPUs ({gpus})"
    assert runner.calls == []


def test_dev_nodes_count_when_proc_is_absent(tmp_path: Path) -> None:
    touch(tmp_path, *(f"dev/nvidia{i}" for i in range(4)))
    touch(tmp_path, "dev/nvidiactl", "dev/nvidia-uvm", "dev/nvidia-caps/x", "dev/nvidia0x")
    runner = Runner(error=AssertionError("no command when /dev answers"))
    found = detect_gpus(tmp_path, {}, runner)
    assert (found.visible, found.source) == (4, f"{tmp_path}/dev/nvidia<N>")
    assert runner.calls == []


def test_a_loaded_module_listing_no_gpu_is_an_answer(tmp_path: Path) -> None:
    (tmp_path / "proc/driver/nvidia/gpus").mkdir(parents=True)
    runner = Runner(error=AssertionError("nvidia-smi asks the same driver"))
    assert detect_gpus(tmp_path, {}, runner).visible == 0
    assert runner.calls == []


def test_nvidia_smi_when_the_tree_has_nothing(tmp_path: Path) -> None:
    runner = Runner(SMI_OUTPUT)
    found = detect_gpus(tmp_path, {"PATH": "/nowhere", "CUDA_VISIBLE_DEVICES": "1"}, runner)
    assert (found.visible, found.found, found.source) == (1, 2, "nvidia-smi -L")  # no MIG line
    [(args, kwargs)] = runner.calls
    assert args == ["nvidia-smi", "-L"]
    assert kwargs["timeout"] == 5.0 and kwargs["env"]["PATH"] == "/nowhere"
    # its UUIDs identify the GPUs named by UUID
    env = {"CUDA_VISIBLE_DEVICES": "GPU-3333,GPU-1111"}
    assert detect_gpus(tmp_path, env, Runner(SMI_OUTPUT)).visible == 2
    env = {"CUDA_VISIBLE_DEVICES": "GPU-4444"}
    assert detect_gpus(tmp_path, env, Runner(SMI_OUTPUT)).visible == 0


@pytest.mark.parametrize(
    ("runner", "note"),
    [
        (Runner(error=FileNotFoundError(2, "No such file", "nvidia-smi")), "(not installed)"),
        (Runner(error=subprocess.TimeoutExpired(["nvidia-smi", "-L"], 5)), "(no answer in 5 s)"),
        (Runner(error=PermissionError(13, "Permission denied")), "([Errno 13] Permission denied)"),
        (Runner("No devices were found\n", returncode=6), "(exit 6)"),
        (Runner("garbage\n"), ""),  # ran, listed no GPU
    ],
)
def test_nvidia_smi_failing_is_no_information(tmp_path: Path, runner: Runner, note: str) -> None:
    found = detect_gpus(tmp_path, {}, runner)
    assert found == GpuCount(0, 0, "", "", (), found.looked_in)
    assert found.looked_in[2] == f"nvidia-smi -L {note}".strip()
    assert found.describe().startswith(f"no GPU found (looked in {tmp_path}/proc/driver/nvidia")


def test_a_real_nvidia_smi_that_hangs_is_given_up_on(tmp_path: Path) -> None:
    env = fake_smi(tmp_path, f"exec {shutil.which('sleep')} 30")  # PATH has only the fake
    started = time.monotonic()
    found = detect_gpus(tmp_path / "root", env, subprocess.run, timeout=0.3)
    assert time.monotonic() - started < 5
    assert found.visible == 0 and "nvidia-smi -L (no answer in 0.3 s)" in found.looked_in


def test_a_real_nvidia_smi_is_read(tmp_path: Path) -> None:
    env = fake_smi(tmp_path, f"printf '{SMI_OUTPUT}'")
    assert detect_gpus(tmp_path / "root", env, subprocess.run).visible == 2
    assert detect_gpus(tmp_path / "root", {"PATH": str(tmp_path / "none")}).found == 0


def test_amd_gpu_nodes_of_the_kfd_topology(tmp_path: Path) -> None:
    kfd(tmp_path, [0, 304, 304, 0])  # two CPU nodes, two GPUs
    found = detect_gpus(tmp_path, {}, None)
    assert (found.visible, found.vendor) == (2, "AMD")
    assert found.source == f"{tmp_path}/sys/class/kfd/kfd/topology/nodes"


def test_amd_render_nodes_count_only_with_dev_kfd(tmp_path: Path) -> None:
    touch(tmp_path, "dev/dri/renderD128", "dev/dri/renderD129", "dev/dri/card0")
    found = detect_gpus(tmp_path, {}, None)
    assert found.visible == 0  # an Intel or virtio GPU has render nodes too
    assert f"{tmp_path}/dev/dri/renderD<N> with {tmp_path}/dev/kfd" in found.looked_in
    touch(tmp_path, "dev/kfd")
    assert detect_gpus(tmp_path, {}, None).visible == 2


def test_nvidia_wins_on_a_machine_with_both(tmp_path: Path) -> None:
    nvidia_proc(tmp_path, 1)
    kfd(tmp_path, [0, 304, 304])
    found = detect_gpus(tmp_path, {}, None)
    assert (found.visible, found.vendor) == (1, "NVIDIA")
    assert found.describe().startswith("1 NVIDIA GPU (")


def test_nothing_found_says_where_it_looked(tmp_path: Path) -> None:
    found = detect_gpus(tmp_path, {}, Runner(error=FileNotFoundError()))
    assert found.describe() == (
        f"no GPU found (looked in {tmp_path}/proc/driver/nvidia/gpus, "
        f"{tmp_path}/dev/nvidia<N>, nvidia-smi -L (not installed), "
        f"{tmp_path}/sys/class/kfd/kfd/topology/nodes, "
        f"{tmp_path}/dev/dri/renderD<N> with {tmp_path}/dev/kfd)"
    )


def test_the_root_variable_points_at_a_fake_tree_and_runs_nothing(tmp_path: Path) -> None:
    nvidia_proc(tmp_path, 3)
    runner = Runner(error=AssertionError("no command under a fake root"))
    assert detect_gpus(environ={DEVICE_ROOT_ENV: str(tmp_path)}, run=runner).visible == 3
    assert detect_gpus(environ={DEVICE_ROOT_ENV: str(tmp_path / "empty")}, run=runner).found == 0
    assert runner.calls == []


# -- visibility variables ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("env", "visible"),
    [
        ({}, 8),
        ({"CUDA_VISIBLE_DEVICES": "0,1"}, 2),
        ({"CUDA_VISIBLE_DEVICES": ""}, 0),
        ({"CUDA_VISIBLE_DEVICES": "-1"}, 0),
        ({"CUDA_VISIBLE_DEVICES": "NoDevFiles"}, 0),  # Slurm, no GPU allocated
        ({"CUDA_VISIBLE_DEVICES": "GPU-abc,1"}, 1),  # the list ends at the first non-UUID
        ({"CUDA_VISIBLE_DEVICES": "GPU-abc,GPU-def"}, 2),  # UUIDs unknown: counted
        ({"CUDA_VISIBLE_DEVICES": "MIG-a,MIG-b,MIG-c"}, 3),
        ({"CUDA_VISIBLE_DEVICES": "0,1,9,2"}, 2),  # up to the first out of range
        ({"CUDA_VISIBLE_DEVICES": "3,x,4"}, 1),  # up to the first that is no number
        ({"CUDA_VISIBLE_DEVICES": "2gpu, 3"}, 2),  # read like strtoul
        ({"CUDA_VISIBLE_DEVICES": "1,1"}, 0),  # a repeated ordinal allows none
        ({"CUDA_VISIBLE_DEVICES": "0,9,0"}, 0),  # even after one out of range
        ({"NVIDIA_VISIBLE_DEVICES": "all"}, 8),
        ({"NVIDIA_VISIBLE_DEVICES": "none"}, 0),
        ({"NVIDIA_VISIBLE_DEVICES": "void"}, 0),
        ({"NVIDIA_VISIBLE_DEVICES": ""}, 0),
        ({"NVIDIA_VISIBLE_DEVICES": "0,1,2"}, 3),
        ({"NVIDIA_VISIBLE_DEVICES": "GPU-a,GPU-b,GPU-a"}, 2),
        ({"NVIDIA_VISIBLE_DEVICES": "0,1,2", "CUDA_VISIBLE_DEVICES": "2"}, 1),
        ({"NVIDIA_VISIBLE_DEVICES": "0,1", "CUDA_VISIBLE_DEVICES": "2"}, 0),  # numbered from 0
        ({"NVIDIA_VISIBLE_DEVICES": "all", "CUDA_VISIBLE_DEVICES": "-1"}, 0),
        ({"HIP_VISIBLE_DEVICES": "0", "ROCR_VISIBLE_DEVICES": "0"}, 8),  # AMD's, not CUDA's
    ],
)
def test_nvidia_visibility_variables(tmp_path: Path, env: dict[str, str], visible: int) -> None:
    nvidia_proc(tmp_path, 8)
    assert detect_gpus(tmp_path, env, None).visible == visible


def test_uuids_from_proc_identify_gpus(tmp_path: Path) -> None:
    nvidia_proc(tmp_path, 3, ["GPU-abc123", "GPU-abd456", "GPU-def789"])
    for value, visible in [
        ("GPU-abc,1", 1),
        ("GPU-abc123,GPU-def", 2),
        ("GPU-zzz", 0),  # no such GPU
        ("GPU-ab", 0),  # a prefix of two: ambiguous, the list ends
        ("GPU-abc,GPU-zzz,GPU-def", 1),
        ("GPU-abc,GPU-abc1", 0),  # the same GPU twice
    ]:
        assert detect_gpus(tmp_path, {"CUDA_VISIBLE_DEVICES": value}, None).visible == visible


def test_narrowed_counts_say_why(tmp_path: Path) -> None:
    gpus = nvidia_proc(tmp_path, 8)
    found = detect_gpus(tmp_path, {"CUDA_VISIBLE_DEVICES": "0,1"}, None)
    assert found.describe() == f"2 NVIDIA GPUs (8 found in {gpus}; CUDA_VISIBLE_DEVICES='0,1')"
    found = detect_gpus(tmp_path, {"NVIDIA_VISIBLE_DEVICES": "void"}, None)
    assert (
        found.describe()
        == f"no NVIDIA GPU visible (8 found in {gpus}; NVIDIA_VISIBLE_DEVICES='void')"
    )


@pytest.mark.parametrize(
    ("env", "visible"),
    [
        ({}, 4),
        ({"HIP_VISIBLE_DEVICES": "0,2"}, 2),
        ({"CUDA_VISIBLE_DEVICES": "3"}, 1),  # HIP reads it too
        ({"CUDA_VISIBLE_DEVICES": "-1"}, 0),
        ({"HIP_VISIBLE_DEVICES": "0,1", "CUDA_VISIBLE_DEVICES": "-1"}, 2),  # HIP's first
        ({"ROCR_VISIBLE_DEVICES": "0,1"}, 2),
        ({"ROCR_VISIBLE_DEVICES": "2,3", "HIP_VISIBLE_DEVICES": "1"}, 1),  # among ROCR's
        ({"ROCR_VISIBLE_DEVICES": "2", "CUDA_VISIBLE_DEVICES": "0,1"}, 1),
        ({"ROCR_VISIBLE_DEVICES": ""}, 0),
        ({"NVIDIA_VISIBLE_DEVICES": "none"}, 4),  # NVIDIA's, not AMD's
    ],
)
def test_amd_visibility_variables(tmp_path: Path, env: dict[str, str], visible: int) -> None:
    kfd(tmp_path, [0, 110, 110, 110, 110])
    assert detect_gpus(tmp_path, env, None).visible == visible


@settings(max_examples=400, deadline=None)
@given(
    value=st.one_of(
        st.text(),
        st.text(alphabet="0123456789,+- GPUMIabc\t"),
        st.lists(st.integers(-3, 20).map(str), max_size=8).map(",".join),
    ),
    found=st.integers(0, 16),
    uuids=st.one_of(st.none(), st.lists(st.text(alphabet="GPU-abc01", max_size=8), max_size=8)),
)
def test_any_cuda_visible_devices_gives_0_to_found(
    value: str, found: int, uuids: list[str] | None
) -> None:
    assert 0 <= cuda_visible_count(value, found, uuids) <= found
    assert cuda_visible_count(None, found, uuids) == found


def test_cuda_visible_count_reads_huge_and_odd_numbers() -> None:
    assert cuda_visible_count("9" * 5000, 4) == 0  # int() would refuse 5000 digits
    assert cuda_visible_count("0" * 5000 + "1,0", 4) == 2
    assert cuda_visible_count("-0,+1", 4) == 2
    assert cuda_visible_count("٣", 4) == 0  # a non-ASCII digit is no number to CUDA


# -- job.nproc_per_node --------------------------------------------------------------------


def test_nproc_words(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="elastic_runner.config")
    monkeypatch.setenv(DEVICE_ROOT_ENV, str(tmp_path))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.delenv("NVIDIA_VISIBLE_DEVICES", raising=False)
    assert parse_nproc_per_node("auto") == parse_nproc_per_node(" CPU ") == CPUS
    assert "job.nproc_per_node=auto: no GPU found (looked in" in caplog.text
    assert f"so {CPUS} CPU" in caplog.text
    with pytest.raises(ConfigError) as err:
        parse_nproc_per_node("gpu")
    assert str(err.value).startswith("job.nproc_per_node=gpu: no GPU found (looked in ")
    assert str(err.value).endswith("; use 'cpu' or an integer")
    gpus = nvidia_proc(tmp_path, 3)
    caplog.clear()
    assert parse_nproc_per_node("auto") == parse_nproc_per_node("GPU") == 3
    assert f"job.nproc_per_node=auto: 3 NVIDIA GPUs ({gpus})" in caplog.messages
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "-1")
    assert parse_nproc_per_node("auto") == CPUS
    with pytest.raises(ConfigError, match=r"=gpu: no NVIDIA GPU visible \(3 found in "):
        parse_nproc_per_node("gpu")
    assert parse_nproc_per_node(5) == 5  # an integer never looks


@pytest.mark.parametrize("bad", [0, -1, "abc", "gpus", True, 1.5, ""])
def test_nproc_bad_values_name_the_words(bad: object) -> None:
    with pytest.raises(ConfigError) as err:
        parse_nproc_per_node(bad)
    assert str(err.value).endswith(": expected an integer >= 1, 'auto', 'gpu' or 'cpu'")


# -- through elastic-run -------------------------------------------------------------------


def test_cli_gpu_without_a_gpu_is_one_line_and_exit_2(
    elastic_run: ElasticRunner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(DEVICE_ROOT_ENV, str(tmp_path / "no-gpu"))
    run = elastic_run("+job=hello", "job.nproc_per_node=gpu")
    assert run.returncode == 2, run.stderr
    assert run.stderr.splitlines() == [
        f"elastic-run: error: job.nproc_per_node=gpu: no GPU found (looked in {tmp_path}/no-gpu"
        f"/proc/driver/nvidia/gpus, {tmp_path}/no-gpu/dev/nvidia<N>, "
        f"{tmp_path}/no-gpu/sys/class/kfd/kfd/topology/nodes, {tmp_path}/no-gpu/dev/dri/"
        f"renderD<N> with {tmp_path}/no-gpu/dev/kfd); use 'cpu' or an integer"
    ]
    assert not list(run.run_dir.glob("attempt_*")), "no worker may start"


@pytest.mark.parametrize("gpus", [0, 3])
def test_cli_auto_starts_one_worker_per_gpu_else_per_cpu(
    elastic_run: ElasticRunner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, gpus: int
) -> None:
    root = tmp_path / "root"
    root.mkdir()
    if gpus:
        nvidia_proc(root, gpus)
    monkeypatch.setenv(DEVICE_ROOT_ENV, str(root))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.delenv("NVIDIA_VISIBLE_DEVICES", raising=False)
    run = elastic_run("+job=hello", "job.nproc_per_node=auto")
    assert run.returncode == 0, run.stderr
    n = gpus or CPUS
    ranks = sorted(int(p.name) for p in (run.run_dir / "attempt_1").iterdir())
    assert ranks == list(range(n))
    hellos = [line for line in run.stdout.splitlines() if "hello from rank" in line]
    assert len(hellos) == n and all(f" of {n} " in line for line in hellos)
    why = f"{gpus} NVIDIA GPUs ({root}/proc" if gpus else "no GPU found (looked in"
    assert f"[elastic-run] job.nproc_per_node=auto: {why}" in run.stderr
