"""The README's recipe for launchers that hard-code ``torchrun``: a wrapper of that name
ahead of torch's on ``PATH`` runs the line under elastic-run."""

from __future__ import annotations

import json
import os
import subprocess
import uuid
from pathlib import Path

from elastic_runner.testing.runner import assert_nothing_survives, elastic_run_exe

WORKER = """\
import json, os, sys
out = os.path.join(os.environ["ER_TEST_OUT"], f"rank{os.environ['RANK']}.json")
with open(out, "w") as f:
    json.dump({"argv": sys.argv[1:], "RANK": os.environ["RANK"],
               "WORLD_SIZE": os.environ["WORLD_SIZE"],
               "TORCHELASTIC_RUN_ID": os.environ["TORCHELASTIC_RUN_ID"]}, f)
"""


def test_a_torchrun_wrapper_on_path_runs_the_line_under_elastic_run(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    wrapper = bin_dir / "torchrun"
    # the README's wrapper, with this environment's elastic-run
    wrapper.write_text(f'#!/bin/sh\nexec {elastic_run_exe()} torchrun "$@"\n')
    wrapper.chmod(0o755)
    (tmp_path / "train.py").write_text(WORKER)
    out = tmp_path / "out"
    out.mkdir()
    run_id = f"wrap-{uuid.uuid4().hex[:8]}"
    run_dir = tmp_path / "run"
    env = {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "ER_TEST_OUT": str(out),
        "ELASTIC_RUN_OVERRIDES": f"hydra.run.dir={run_dir}",
    }
    try:
        done = subprocess.run(
            [
                "torchrun",
                "--nproc_per_node",
                "2",
                "--rdzv_backend",
                "c10d",
                "--rdzv_id",
                run_id,
                "train.py",
                "--lr",
                "0.1",
            ],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            stdin=subprocess.DEVNULL,
        )
        assert done.returncode == 0, done.stderr
        records = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
        assert [r["argv"] for r in records] == [["--lr", "0.1"]] * 2
        assert {r["TORCHELASTIC_RUN_ID"] for r in records} == {run_id}
        assert {r["WORLD_SIZE"] for r in records} == {"2"}
        # elastic-run's own run directory proves who ran it
        result = json.loads((run_dir / "result.json").read_text())
        assert result["exit_code"] == 0 and result["run_id"] == run_id
    finally:
        assert_nothing_survives({run_id})
