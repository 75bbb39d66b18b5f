"""The built wheel, installed into a fresh venv, runs from an unrelated directory."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
import zipfile
from pathlib import Path

import pytest

from tests.conftest import assert_nothing_survives

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


def test_installed_wheel_runs_hello_from_any_directory(tmp_path: Path) -> None:
    dist = tmp_path / "dist"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(dist), str(ROOT)],
        check=True,
        timeout=300,
    )
    (wheel,) = dist.glob("elastic_runner-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "elastic_runner/conf/config.yaml" in names
    assert "elastic_runner/conf/job/hello.yaml" in names
    assert "elastic_runner/examples/resnet/train.py" in names
    assert "elastic_runner/py.typed" in names

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    subprocess.run(
        [str(venv / "bin" / "pip"), "install", "-q", str(wheel)], check=True, timeout=600
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    run_id = f"wheel-{uuid.uuid4().hex[:8]}"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    try:
        done = subprocess.run(
            [str(venv / "bin" / "elastic-run"), "+job=hello", f"rdzv.id={run_id}"],
            cwd=elsewhere,
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
        )
        assert done.returncode == 0, done.stderr
        assert "hello from rank 3 of 4" in done.stdout
        # the preset's worker and the configs came from the venv, not this checkout
        (run_dir,) = (elsewhere / "outputs").glob("*/*")
        assert (run_dir / "attempt_1" / "0" / "stdout.log").read_text().startswith("hello")
        config = (run_dir / "config.yaml").read_text()
        assert run_id in config
        resnet = subprocess.run(
            [str(venv / "bin" / "elastic-run"), "+job=resnet", "--cfg", "job", "--resolve"],
            cwd=elsewhere,
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
        )
        assert resnet.returncode == 0, resnet.stderr
        assert str(venv) in resnet.stdout and "examples/resnet/train.py" in resnet.stdout
    finally:
        assert_nothing_survives({run_id})
