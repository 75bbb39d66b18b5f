"""Reports of unchanged torch scripts that fail (CPU, gloo): torch's ``[rankN]: ``
prefixes do not hide the error, and ranks that raised it before the agent stopped the
group count as failed.

Run by ``nox -s integration`` / ``.ci/run`` in a venv with torch==2.13.0; skipped where
torch is not installed.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import ElasticRunner
from tests.integration.test_torch_examples import _explain

pytest.importorskip("torch")
pytestmark = pytest.mark.integration

BOOM = Path(__file__).resolve().parents[1] / "workers" / "torch_boom.py"


def test_three_of_four_ranks_raising_after_init_process_group(
    elastic_run: ElasticRunner, tmp_path: Path
) -> None:
    out = tmp_path / "marks"
    out.mkdir()
    run = elastic_run(
        f"job.entrypoint={BOOM}",
        f"job.args=[{out}]",
        "job.nproc_per_node=4",
        "stop_timeout=10",
        timeout=120,
    )
    assert run.returncode == 1, _explain(run)
    report = run.stderr[run.stderr.index("elastic-run: job failed") :].splitlines()
    assert report[0].startswith("elastic-run: job failed: 3 of 4 workers failed"), _explain(run)
    assert "    error: ValueError: boom" in report
    assert "    traceback (from its stderr):" in report
    line = BOOM.read_text().splitlines().index('    raise ValueError("boom")') + 1
    at = report.index("    traceback (from its stderr):")
    assert report[at + 1 : at + 5] == [
        "    | Traceback (most recent call last):",
        f'    |   File "{BOOM}", line {line}, in <module>',
        '    |     raise ValueError("boom")',
        "    | ValueError: boom",
    ]
    assert "  stopped by the agent: ranks 3" in report
    # the events agree: three failures of that error, one bystander
    exits = {
        e["rank"]: (e["state"], e["metadata"]["error"])
        for e in run.events()
        if e["source"] == "WORKER" and e["state"] in ("FAILED", "TERMINATED")
    }
    assert exits == {
        0: ("FAILED", "ValueError: boom"),
        1: ("FAILED", "ValueError: boom"),
        2: ("FAILED", "ValueError: boom"),
        3: ("TERMINATED", None),
    }, _explain(run)


def test_an_endpoint_where_torchs_tcpstore_listens_is_named_not_waited_on_in_silence(
    elastic_run: ElasticRunner, tmp_path: Path
) -> None:
    # A torchrun job on this machine holds the port (29400 is the default of both):
    # torch's TCPStore accepts our connection and waits for a request of its own
    # protocol. The agent says so after 10 s without an answer and ends at join_timeout.
    import subprocess
    import sys

    from elastic_runner.testing.runner import free_port

    port = free_port()
    store = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time, torch.distributed as d; "
            f"s = d.TCPStore('127.0.0.1', {port}, is_master=True, wait_for_workers=False); "
            "print('up', flush=True); time.sleep(120)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert store.stdout is not None and store.stdout.readline().strip() == "up"
        run = elastic_run(
            f"job.entrypoint={BOOM}",
            f"job.args=[{tmp_path}]",
            "nnodes=2",
            "rdzv=tcp",
            f"rdzv.endpoint=127.0.0.1:{port}",
            "rdzv.join_timeout=12",
            timeout=60,
        )
    finally:
        store.kill()
        store.wait()
    assert run.returncode == 1, run.stderr
    said = [line for line in run.stderr.splitlines() if "hello" in line]
    assert said and said[0].startswith(
        f"[elastic-run] the rendezvous store at 127.0.0.1:{port} accepted a connection "
        "but has not answered its hello in 10 s"
    ), run.stderr
    assert run.stderr.strip().splitlines()[-1].startswith("elastic-run: rendezvous failed:")
    assert run.seconds < 30, run.seconds
