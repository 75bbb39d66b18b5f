"""The agent's signal handling: which signals stop the run, which are ignored."""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

__all__ = ["handle_signals"]


@contextmanager
def handle_signals(
    on_signal: Callable[[int], None], signals: Iterable[int], ignore: Iterable[int] = ()
) -> Iterator[None]:
    """Call ``on_signal(signum)`` for each of ``signals`` and ignore ``ignore`` while the
    block runs; restores the previous handlers afterwards. Enter from the main thread."""
    previous = {}
    try:
        for sig in signals:
            previous[sig] = signal.signal(sig, lambda signum, _frame: on_signal(signum))
        for sig in ignore:
            previous[sig] = signal.signal(sig, signal.SIG_IGN)
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
