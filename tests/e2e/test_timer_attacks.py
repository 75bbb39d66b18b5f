"""The red-team pass on the timer FIFO, replayed through ``elastic-run``: malformed
requests, bad signals and other processes' pids are refused with one warning while a real
timer still fires and the run restarts and succeeds; a FIFO planted by another user (or a
dangling symlink) at ``timer.path`` is one line and exit 2; the default FIFO is private,
and the guardian removes it when the agent is SIGKILLed."""

from __future__ import annotations

import os
import re
import signal
import stat
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from elastic_runner.testing.runner import wait_for
from tests.conftest import TESTS, ElasticRunner

ATTACKER = TESTS / "workers" / "timer_attacker.py"
NOBODY = 65534


def attack_job(out: Path, mode: str, arg: str | None = None, nproc: int = 1) -> list[str]:
    args = ",".join(f'"{a}"' for a in [out, mode, *([arg] if arg else [])])
    return [
        f"job.entrypoint={ATTACKER}",
        f"job.args=[{args}]",
        f"job.nproc_per_node={nproc}",
        "max_restarts=1",
        "timer=file",
        "watchdog.stacks=none",
    ]


def finish(proc: subprocess.Popen[str], timeout: float = 30) -> str:
    """The agent's stderr once it exited (a hung agent fails the test, and is killed)."""
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
        pytest.fail(f"the agent hung:\n{err}")
    return err


def refusals(err: str) -> list[str]:
    return [line for line in err.splitlines() if "timer server: refused a request" in line]


def assert_the_real_timer_fired(err: str, returncode: int) -> None:
    assert returncode == 0, err  # the real timer fired, the restart succeeded
    assert "worker rank 0: timer for scope real expired after 0.5 s" in err, err
    assert "Traceback" not in err


def test_malformed_requests_leave_the_timers_working(
    elastic_run: ElasticRunner, tmp_path: Path
) -> None:
    proc, _, _ = elastic_run.popen(*attack_job(tmp_path, "garbage"))
    err = finish(proc)
    assert_the_real_timer_fired(err, proc.returncode)
    assert len(refusals(err)) == 1, err  # rate-limited: one warning...
    # ...and a count of the others (14 lines and an unterminated write; one more if the
    # line over PIPE_BUF reached the reader in two pieces)
    [count] = re.findall(r"timer server: (\d+) more bad timer requests refused", err)
    assert int(count) in (14, 15), err
    assert "scope attack expired" not in err


@pytest.mark.parametrize(
    ("sig", "why"),
    [
        ("99999", "no signal: crashed the agent"),
        (str(2**63), "out of range: crashed the agent"),
        (str(int(signal.SIGSTOP)), "SIGSTOP: stopped the worker, hung the agent"),
    ],
)
def test_a_timer_with_a_bad_signal_is_refused(
    elastic_run: ElasticRunner, tmp_path: Path, sig: str, why: str
) -> None:
    proc, _, _ = elastic_run.popen(*attack_job(tmp_path, "signal", sig))
    err = finish(proc)
    assert_the_real_timer_fired(err, proc.returncode)
    [refused] = refusals(err)
    assert f"(signal {sig} is not one that ends a process (0 or SIGABRT, " in refused
    assert f"scope signal {sig} expired" not in err


def test_timers_for_processes_outside_the_job_are_refused(
    elastic_run: ElasticRunner, tmp_path: Path
) -> None:
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        proc, _, _ = elastic_run.popen(*attack_job(tmp_path, "pids", str(bystander.pid), nproc=2))
        err = finish(proc)
        assert proc.returncode == 0, err
        agent = proc.pid
        # one warning line (the first), the others counted
        [first] = refusals(err)
        assert f"(pid {agent} is not a live process of this job's workers)" in first
        assert "timer server: 2 more bad timer requests refused" in err
        assert "no worker of ours" not in err  # refused when asked, not when due
        assert bystander.poll() is None
        # The sibling is one of this job's workers: honoured, as torch does (the FIFO
        # cannot tell who wrote; a worker could signal its sibling directly anyway).
        assert "worker rank 1: timer for scope sibling expired after 0.4 s" in err, err
    finally:
        bystander.kill()
        bystander.wait()


def _plant_nobodys_fifo(tmp_path: Path) -> tuple[Path, str]:
    path = tmp_path / "planted.fifo"
    os.mkfifo(path, 0o622)  # writable by all: the root agent's job could be crashed
    os.chmod(path, 0o622)
    os.chown(path, NOBODY, NOBODY)
    return path, (
        f"is owned by uid {NOBODY} (nobody), not by this user ({_user()}): its owner could "
        "read or forge timer requests; use a FIFO of your own, or leave timer.path unset"
    )


def _dangling_symlink(tmp_path: Path) -> tuple[Path, str]:
    path = tmp_path / "link.fifo"
    path.symlink_to(tmp_path / "nowhere")
    return path, "is a symbolic link; give the FIFO's own path, or leave timer.path unset"


def _group_writable(tmp_path: Path) -> tuple[Path, str]:
    path = tmp_path / "shared.fifo"
    os.mkfifo(path)
    os.chmod(path, 0o660)
    return path, (
        "is writable by other users (mode 0660); make it private (chmod go-w), or leave "
        "timer.path unset"
    )


@pytest.mark.parametrize(
    "plant",
    [
        pytest.param(
            _plant_nobodys_fifo,
            id="owned by nobody",
            marks=pytest.mark.skipif(os.geteuid() != 0, reason="chown needs root"),
        ),
        pytest.param(_dangling_symlink, id="dangling symlink"),
        pytest.param(_group_writable, id="group-writable"),
    ],
)
def test_a_fifo_that_is_not_ours_is_one_line_and_exit_2(
    elastic_run: ElasticRunner, tmp_path: Path, plant: object
) -> None:
    path, why = plant(tmp_path)  # type: ignore[operator]
    run = elastic_run("+job=hello", "job.nproc_per_node=1", "timer=file", f"timer.path={path}")
    assert run.returncode == 2, run.stderr
    assert run.stderr.strip().splitlines() == [f"elastic-run: error: timer.path={path}: {why}"]
    assert not (tmp_path / "nowhere").exists()
    assert os.path.lexists(path)  # not ours: left as it was


def _user() -> str:
    import pwd

    uid = os.geteuid()
    return f"uid {uid} ({pwd.getpwuid(uid).pw_name})"


def test_the_default_fifo_is_private_and_the_guardian_removes_it_when_the_agent_is_killed(
    elastic_run: ElasticRunner, tmp_path: Path
) -> None:
    proc, _, run_id = elastic_run.popen(*attack_job(tmp_path, "fifo"))
    fifo_file = tmp_path / "fifo.txt"
    wait_for(fifo_file.exists, timeout=30, what="the worker started")
    fifo = Path(fifo_file.read_text())
    directory = fifo.parent
    assert directory.name.startswith("elastic-runner-timer-") and run_id not in str(fifo)
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    st = fifo.lstat()
    assert stat.S_ISFIFO(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
    agent = psutil.Process(proc.pid)
    agent.send_signal(signal.SIGKILL)
    proc.communicate(timeout=10)
    wait_for(lambda: not directory.exists(), timeout=10, what="the guardian removed the FIFO")
    assert not fifo.exists()
