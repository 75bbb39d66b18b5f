"""The agent's signal handling: handlers set and restored, a signal the kernel hands to
another thread still wakes the agent's ``select`` (the wake-up fd), and a stop signal
after the run's loop is held until its result is written."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator

import pytest

from elastic_runner.signals import LateStops, handle_signals
from elastic_runner.workers.supervisor import ProcessSupervisor


def _signal_from_another_thread(sig: int, after: float = 0.2) -> threading.Thread:
    """A thread that, ``after`` seconds, sends ``sig`` to itself: the signal is that
    thread's, not the main thread's (as when the kernel picks another thread)."""

    def run() -> None:
        time.sleep(after)
        signal.pthread_kill(threading.get_ident(), sig)

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def test_a_signal_to_another_thread_wakes_the_main_threads_wait() -> None:
    supervisor = ProcessSupervisor(marker="test-signals")
    got: list[int] = []
    before_handler = signal.getsignal(signal.SIGUSR2)
    before_fd = signal.set_wakeup_fd(-1)
    signal.set_wakeup_fd(before_fd)
    try:
        with handle_signals(got.append, {signal.SIGUSR2}, wakeup_fd=supervisor.wake_fd):
            sender = _signal_from_another_thread(signal.SIGUSR2)
            started = time.monotonic()
            supervisor.wait(10.0)  # no worker: only a wake-up ends it before 10 s
            took = time.monotonic() - started
            sender.join()
        assert got == [signal.SIGUSR2]
        assert took < 5.0, f"the wait slept through the signal for {took:.1f} s"
    finally:
        supervisor.close()
    assert signal.getsignal(signal.SIGUSR2) is before_handler
    assert signal.set_wakeup_fd(before_fd) == before_fd  # restored


@pytest.fixture
def caller_handler() -> Iterator[list[int]]:
    """A handler of the caller's for SIGUSR2 (what the signal did before the run),
    recording what reaches it; restored afterwards."""
    got: list[int] = []
    before = signal.signal(signal.SIGUSR2, lambda signum, _frame: got.append(signum))
    try:
        yield got
    finally:
        signal.signal(signal.SIGUSR2, before)


def _run_loop(late: LateStops) -> list[int]:
    """A run's loop that gets no signal, its stop signals then handed to ``late``."""
    during: list[int] = []
    with handle_signals(during.append, {signal.SIGUSR2}, then=late):
        pass
    return during


@pytest.mark.parametrize("deliver", [True, False])
def test_a_stop_after_the_loop_is_held_until_close(
    caller_handler: list[int], deliver: bool, capfd: pytest.CaptureFixture[str]
) -> None:
    with LateStops(deliver=deliver) as late:
        assert _run_loop(late) == []
        signal.raise_signal(signal.SIGUSR2)
        assert late.received == [signal.SIGUSR2]
        assert caller_handler == []  # held: the result is being written
    assert caller_handler == ([signal.SIGUSR2] if deliver else [])
    assert capfd.readouterr().err == (
        "elastic-run: SIGUSR2 after the run ended: writing its result first "
        "(send it again to stop at once)\n"
    )
    signal.raise_signal(signal.SIGUSR2)  # the caller's handler is back
    assert caller_handler == ([signal.SIGUSR2] * 2 if deliver else [signal.SIGUSR2])


def test_a_second_stop_after_the_loop_acts_at_once(caller_handler: list[int]) -> None:
    with LateStops(deliver=False) as late:
        _run_loop(late)
        signal.raise_signal(signal.SIGUSR2)
        signal.raise_signal(signal.SIGUSR2)
        assert caller_handler == [signal.SIGUSR2]  # not waiting for close
    assert caller_handler == [signal.SIGUSR2]


def test_before_the_loop_a_signal_does_what_it_did(caller_handler: list[int]) -> None:
    with LateStops(deliver=True) as late:  # the loop not reached (a config error)
        signal.raise_signal(signal.SIGUSR2)
        assert caller_handler == [signal.SIGUSR2] and late.received == []
    assert caller_handler == [signal.SIGUSR2]
