"""The agent's signal handling: handlers set and restored, and a signal the kernel hands
to another thread still wakes the agent's ``select`` (the wake-up fd)."""

from __future__ import annotations

import signal
import threading
import time

from elastic_runner.signals import handle_signals
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
