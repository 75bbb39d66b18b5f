"""The live status display: a table under a pseudo-terminal, a progress line while waiting
in a rendezvous, and nothing of it when stderr is not a terminal."""

from __future__ import annotations

import os
import pty
import re
import select
from pathlib import Path

import pytest

from elastic_runner.testing.runner import elastic_run_exe
from tests.conftest import ElasticRunner, free_port, probe_job

ANSI = re.compile(rb"\x1b\[[0-9;?]*[A-Za-z]")


def run_in_pty(argv: list[str], timeout: float = 60) -> tuple[int, str]:
    """Runs ``argv`` with a pseudo-terminal as stdin, stdout and stderr; returns its exit
    code and everything it printed, escape sequences removed."""
    pid, fd = pty.fork()
    if pid == 0:  # the child
        os.environ.update(TERM="xterm", COLUMNS="120", LINES="40")
        os.execv(argv[0], argv)
    out = b""
    while True:
        ready, _, _ = select.select([fd], [], [], timeout)
        if not ready:
            os.kill(pid, 9)
            break
        try:
            data = os.read(fd, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        out += data
    _, status = os.waitpid(pid, 0)
    os.close(fd)
    text = ANSI.sub(b"", out).decode(errors="replace").replace("\r\n", "\n")
    return os.waitstatus_to_exitcode(status), text


def test_live_table_on_a_terminal(elastic_run: ElasticRunner, tmp_path: Path) -> None:
    argv, _, _ = elastic_run.command(
        *probe_job(tmp_path, "--sleep", "1.5", nproc=2), "resources.interval=0.2"
    )
    code, out = run_in_pty(argv)
    assert code == 0, out
    header = re.search(r"rank\s+state\s+pid\s+restarts\s+CPU %\s+RSS\s+quiet s", out)
    assert header, out
    rows = re.findall(r"^\s*([01])\s+HEALTHY\s+(\d+)\s+0\s+\d+\s+[\d.]+ MiB\s+\d+", out, re.M)
    assert {rank for rank, _ in rows} == {"0", "1"}, out
    assert "[default0]: probe rank 0 restart 0" in out  # output scrolls above the table
    # the summary per rank, after the live table is gone
    summary = out[out.index("elastic-run: 2 workers succeeded") :]
    assert re.search(r"rank\s+result\s+ran\s+peak RSS\s+restarts", summary)
    assert re.search(r"^\s+1\s+ok\s+1\.\d s\s+[\d.]+ MiB\s+0$", summary, re.M), summary


def test_progress_line_while_waiting_in_rendezvous(
    elastic_run: ElasticRunner, tmp_path: Path
) -> None:
    argv, _, _ = elastic_run.command(
        *probe_job(tmp_path),
        "rdzv=tcp",
        f"rdzv.endpoint=127.0.0.1:{free_port()}",
        "nnodes=2",
        "rdzv.join_timeout=2",
    )
    code, out = run_in_pty(argv)
    assert code == 1, out  # nobody else came
    assert re.search(r"rendezvous: waiting for 1 more node\(s\) \(1 of 2\), \d s left", out), out


def test_no_live_display_when_not_a_terminal(elastic_run: ElasticRunner, tmp_path: Path) -> None:
    run = elastic_run(*probe_job(tmp_path, "--sleep", "0.6", nproc=2), "resources.interval=0.2")
    assert run.returncode == 0, run.stderr
    assert "\x1b[" not in run.stderr + run.stdout
    assert "quiet s" not in run.stderr
    assert "[elastic-run] attempt 1: started 2 worker(s)" in run.stderr  # plain log lines


def test_parallel_sweep_points_share_the_terminal_without_live_tables(
    elastic_run: ElasticRunner, tmp_path: Path
) -> None:
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    argv = [
        elastic_run_exe(),
        "--multirun",
        *probe_job(tmp_path, "--sleep", "1"),
        "job.nproc_per_node=1,2",
        "hydra/launcher=joblib",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
    ]
    code, out = run_in_pty(argv)
    assert code == 0, out
    assert "quiet s" not in out  # no live table: two at once would garble the terminal
    assert "elastic-run: sweep of 2 point(s): 2 succeeded, 0 failed." in out
