"""Deadlines of the watchdog, and where a stack dump says a worker was stuck."""

from __future__ import annotations

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
