"""A run that fails while it is being built leaves nothing behind: the next point of a
sequential sweep gets the same fixed ports (health endpoint, rendezvous store)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.conftest import ElasticRunner, assert_nothing_survives, free_port


@pytest.mark.parametrize(
    ("points", "error"),
    [
        # the backend's factory raises ConfigError (a second endpoint for rdzv=tcp)
        (
            ["rdzv.endpoint='127.0.0.1:1,127.0.0.1:2',127.0.0.1:{store}"],
            "rdzv=tcp takes one host:port",
        ),
        # it raises RendezvousError: cannot host the store on an address of no interface
        # here (bind fails at once; nothing is sent)
        (
            ["rdzv.endpoint=127.0.0.1:{store}", "rdzv.bind=192.0.2.1,null"],
            "cannot host the rendezvous store",
        ),
    ],
)
def test_a_point_that_fails_building_its_rendezvous_frees_its_ports(
    elastic_run: ElasticRunner, tmp_path: Path, points: list[str], error: str
) -> None:
    argv, _, _ = elastic_run.command()
    tmp = tmp_path / "tmp"  # the points' private timer directories go here
    tmp.mkdir()
    health, store = free_port(), free_port()
    sweep = tmp_path / "sweep"
    done = subprocess.run(
        [
            argv[0],
            "--multirun",
            "+job=hello",
            "job.nproc_per_node=1",
            "rdzv=tcp",
            "rdzv.id=assembly",
            "rdzv.is_host=true",
            *(override.format(store=store) for override in points),  # a bad point, a good one
            f"health.port={health}",
            "timer=file",
            "metrics=jsonl",
            f"hydra.sweep.dir={sweep}",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
        env={**os.environ, "TMPDIR": str(tmp)},
    )
    first, second = (json.loads((sweep / p / "result.json").read_text()) for p in "01")
    assert error in first["error"], done.stderr
    assert first["exit_code"] in (1, 2)
    # the second point bound the same health port and hosted the store on the same port
    assert second["exit_code"] == 0, done.stderr
    assert "cannot listen" not in done.stderr
    assert done.returncode == first["exit_code"]
    assert not list(tmp.glob("elastic-runner-timer-*"))  # each point's timer FIFO is gone
    assert_nothing_survives({"assembly"})
