"""The agent's signal handling: which signals stop the run, which are ignored."""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

__all__ = ["handle_signals"]


@contextmanager
def handle_signals(
    on_signal: Callable[[int], None],
    signals: Iterable[int],
    ignore: Iterable[int] = (),
    wakeup_fd: int | None = None,
) -> Iterator[None]:
    """Call ``on_signal(signum)`` for each of ``signals`` and ignore ``ignore`` while the
    block runs; restores the previous handlers afterwards. Enter from the main thread.

    ``wakeup_fd`` (the agent's wake-up pipe, non-blocking) also gets a byte for every
    signal: Python runs handlers in the main thread only, and a signal the kernel hands
    to another thread (the rendezvous call's, a heartbeat's) does not interrupt the main
    thread's ``select``; without it, an agent waiting with no timeout (in its exit
    barrier) could sleep through SIGTERM."""
    previous = {}
    previous_fd: int | None = None
    try:
        if wakeup_fd is not None:
            previous_fd = signal.set_wakeup_fd(wakeup_fd, warn_on_full_buffer=False)
        for sig in signals:
            previous[sig] = signal.signal(sig, lambda signum, _frame: on_signal(signum))
        for sig in ignore:
            previous[sig] = signal.signal(sig, signal.SIG_IGN)
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if previous_fd is not None:
            signal.set_wakeup_fd(previous_fd)
