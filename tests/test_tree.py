"""Process-tree helpers: the subreaper flag is restored, and only our own children are
reaped (under ``launch`` the process is the caller's, with children of its own)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time

import psutil

from elastic_runner.workers.tree import reap_children


def _python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def _zombie(pid: int, within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
        assert time.monotonic() < deadline, f"{pid} did not exit"
        time.sleep(0.01)


def test_subreaper_flag_is_restored() -> None:
    done = _python(
        """
        import ctypes
        from elastic_runner.workers.tree import subreaper
        libc = ctypes.CDLL(None)
        def flag():
            v = ctypes.c_int(-1)
            libc.prctl(37, ctypes.byref(v), 0, 0, 0)
            return v.value
        with subreaper() as became:
            print(became, flag())
        print(flag())
        with subreaper():  # two runs of one process (launch from two threads)
            with subreaper():
                pass
            print(flag())  # the first to end leaves it on for the other
        libc.prctl(36, 1, 0, 0, 0)  # a caller that is a subreaper itself stays one
        with subreaper():
            pass
        print(flag())
        """
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["True", "1", "0", "1", "1"]


def test_a_child_that_is_not_ours_keeps_its_exit_status() -> None:
    child = subprocess.Popen(["sh", "-c", "exit 3"])
    try:
        _zombie(child.pid)
        reap_children((), groups={child.pid + 1_000_000})  # not its group
        reap_children()
    finally:
        assert child.wait(timeout=10) == 3  # not stolen by a waitpid of ours


def test_an_orphan_in_a_workers_group_is_reaped() -> None:
    done = _python(
        """
        import subprocess, time, psutil
        from elastic_runner.workers.tree import reap_children, subreaper
        with subreaper():
            worker = subprocess.Popen(
                ["sh", "-c", "sleep 0.3 & echo $!"], stdout=subprocess.PIPE, text=True,
                process_group=0,
            )
            orphan = int(worker.stdout.readline())
            worker.wait()
            deadline = time.monotonic() + 10
            while psutil.Process(orphan).status() != psutil.STATUS_ZOMBIE:
                assert time.monotonic() < deadline
                time.sleep(0.01)
            assert psutil.Process(orphan).ppid() == psutil.Process().pid
            reap_children((), groups={worker.pid + 1})
            print(psutil.pid_exists(orphan))
            reap_children((), groups={worker.pid})
            print(psutil.pid_exists(orphan))
        """
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["True", "False"]
