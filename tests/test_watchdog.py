"""Deadlines of the watchdog, and where a stack dump says a worker was stuck."""

from __future__ import annotations

import pytest

from elastic_runner.spec import WorkerActivity
from elastic_runner.watchdog import Watchdog
from elastic_runner.workers.stacks import _main_frame


def test_no_output_deadline_and_overdue_ranks() -> None:
    dog = Watchdog(no_output_timeout=10)
    activity = {0: WorkerActivity(100.0), 1: WorkerActivity(104.0)}
    assert dog.next_deadline(activity) == 110.0
    assert dog.overdue(activity, 109.9) == {}
    assert dog.overdue(activity, 111.0) == {0: "no output for 10 s (watchdog.no_output_timeout)"}


def test_heartbeat_counts_only_for_ranks_that_opted_in() -> None:
    dog = Watchdog(heartbeat_timeout=5)
    activity = {0: WorkerActivity(0.0, last_heartbeat=50.0), 1: WorkerActivity(0.0)}
    assert dog.next_deadline(activity) == 55.0
    assert list(dog.overdue(activity, 1000.0)) == [0]
    assert dog.heartbeat_interval == 1.0 and Watchdog(heartbeat_timeout=2).heartbeat_interval == 0.5


def test_off_means_no_deadline() -> None:
    assert not Watchdog().enabled
    assert Watchdog().next_deadline({0: WorkerActivity(0.0, 0.0)}) is None


FAULTHANDLER = """== pid 42 ==
Thread 0x00007f0000000001 (most recent call first):
  File "/usr/lib/python3.11/threading.py", line 320 in wait
  File "/usr/lib/python3.11/threading.py", line 1002 in _bootstrap

Current thread 0x00007f0000000000 (most recent call first):
  File "/job/train.py", line 28 in all_reduce_grads
  File "/job/train.py", line 40 in step
  File "/job/train.py", line 55 in <module>
"""

PY_SPY = """Process 42: python train.py
Python v3.11.7 (/usr/bin/python3.11)

Thread 43 (idle): "pin_memory"
    wait (threading.py:320)
Thread 42 (idle): "MainThread"
    all_reduce_grads (train.py:28)
    <module> (train.py:55)
"""


def test_the_main_thread_innermost_frame_is_named() -> None:
    assert _main_frame(FAULTHANDLER) == "all_reduce_grads at /job/train.py:28"
    assert _main_frame(PY_SPY) == "all_reduce_grads at train.py:28"
    assert _main_frame("nothing useful") is None


# Real dumps of ``python -m`` workers hung in ``wait_for_peer`` (Python 3.11.7; py-spy
# 0.4): runpy's frames are outermost.
FAULTHANDLER_M = """== pid 26867 ==
Current thread 0x00007f0849e76b80 (most recent call first):
  File "/tmp/tq/mod/hangpkg/stuck.py", line 8 in wait_for_peer
  File "/tmp/tq/mod/hangpkg/stuck.py", line 13 in <module>
  File "<frozen runpy>", line 88 in _run_code
  File "<frozen runpy>", line 198 in _run_module_as_main
"""

# With a second thread; the signal landed on the main thread ("Current thread").
FAULTHANDLER_M_THREADS = """Thread 0x00007fd89181d6c0 (most recent call first):
  File "/root/.pyenv/versions/3.11.7/lib/python3.11/threading.py", line 327 in wait
  File "/root/.pyenv/versions/3.11.7/lib/python3.11/threading.py", line 629 in wait
  File "/tmp/tq/mod/thr2.py", line 4 in prefetch
  File "/root/.pyenv/versions/3.11.7/lib/python3.11/threading.py", line 982 in run
  File "/root/.pyenv/versions/3.11.7/lib/python3.11/threading.py", line 1045 in _bootstrap_inner
  File "/root/.pyenv/versions/3.11.7/lib/python3.11/threading.py", line 1002 in _bootstrap

Current thread 0x00007fd8922b1b80 (most recent call first):
  File "/tmp/tq/mod/thr2.py", line 7 in wait_for_peer
  File "/tmp/tq/mod/thr2.py", line 8 in <module>
  File "<frozen runpy>", line 88 in _run_code
  File "<frozen runpy>", line 198 in _run_module_as_main
"""

# threading never imported: py-spy names no thread; the main thread's id is the pid.
PY_SPY_M = """Process 26867: /work/main/.venv/bin/python -m hangpkg.stuck
Python v3.11.7 (/root/.pyenv/versions/3.11.7/bin/python3.11)

Thread 26867 (idle)
    wait_for_peer (hangpkg/stuck.py:8)
    <module> (hangpkg/stuck.py:13)
    _run_code (<frozen runpy>:88)
    _run_module_as_main (<frozen runpy>:198)
"""

PY_SPY_M_THREADS = """Process 3922: /work/main/.venv/bin/python -m thr2
Python v3.11.7 (/root/.pyenv/versions/3.11.7/bin/python3.11)

Thread 3924 (idle): "Thread-1 (prefetch)"
    Condition.wait (threading.py:327)
    Event.wait (threading.py:629)
    prefetch (thr2.py:4)
    Thread.run (threading.py:982)
    Thread._bootstrap_inner (threading.py:1045)
    Thread._bootstrap (threading.py:1002)
Thread 3922 (idle): "MainThread"
    wait_for_peer (thr2.py:7)
    <module> (thr2.py:8)
    _run_code (<frozen runpy>:88)
    _run_module_as_main (<frozen runpy>:198)
"""


@pytest.mark.parametrize(
    ("dump", "where"),
    [
        (FAULTHANDLER_M, "wait_for_peer at /tmp/tq/mod/hangpkg/stuck.py:8"),
        (FAULTHANDLER_M_THREADS, "wait_for_peer at /tmp/tq/mod/thr2.py:7"),
        # the signal landing on the other thread changes nothing
        (
            FAULTHANDLER_M_THREADS.replace("Current thread", "Thread").replace(
                "Thread 0x00007fd89181d6c0", "Current thread 0x00007fd89181d6c0"
            ),
            "wait_for_peer at /tmp/tq/mod/thr2.py:7",
        ),
        (PY_SPY_M, "wait_for_peer at hangpkg/stuck.py:8"),
        (PY_SPY_M_THREADS, "wait_for_peer at thr2.py:7"),
        # before 3.11, runpy was not frozen
        (
            PY_SPY_M.replace("<frozen runpy>", "/usr/lib/python3.10/runpy.py"),
            "wait_for_peer at hangpkg/stuck.py:8",
        ),
    ],
)
def test_a_module_run_with_m_is_stuck_in_its_own_function(dump: str, where: str) -> None:
    assert _main_frame(dump) == where


def test_a_hang_in_the_module_body_or_an_import_names_the_users_line() -> None:
    top = PY_SPY_M.replace("    wait_for_peer (hangpkg/stuck.py:8)\n", "")
    assert _main_frame(top) == "<module> at hangpkg/stuck.py:13"
    # waiting for another thread's import of a module: the import system's frames
    # (frozen) are innermost
    importing = """Current thread 0x00007f0849e76b80 (most recent call first):
  File "<frozen importlib._bootstrap>", line 169 in __enter__
  File "<frozen importlib._bootstrap>", line 1173 in _find_and_load
  File "/job/train.py", line 3 in <module>
  File "<frozen runpy>", line 88 in _run_code
  File "<frozen runpy>", line 198 in _run_module_as_main
"""
    assert _main_frame(importing) == "<module> at /job/train.py:3"
    # a process of the tree that is not Python's main thread at all: the next one
    only_runpy = PY_SPY_M.split("Thread 26867")[0] + (
        "Thread 26867 (idle)\n    _run_code (<frozen runpy>:88)\n"
    )
    assert _main_frame(only_runpy + "\n" + PY_SPY) == "all_reduce_grads at train.py:28"
