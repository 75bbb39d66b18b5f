"""The agent's signal handling: which signals stop the run and are passed to workers."""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

__all__ = ["DEFAULT_STOP_SIGNALS", "handle_signals"]

#: torchrun's default TORCHELASTIC_SIGNALS_TO_HANDLE.
DEFAULT_STOP_SIGNALS: tuple[signal.Signals, ...] = (
    signal.SIGTERM,
    signal.SIGINT,
    signal.SIGHUP,
    signal.SIGQUIT,
)


@contextmanager
def handle_signals(
    on_signal: Callable[[int], None], signals: Iterable[int] = DEFAULT_STOP_SIGNALS
) -> Iterator[None]:
    """Call ``on_signal(signum)`` for each of ``signals`` while the block runs; restores
    the previous handlers afterwards. Must be entered from the main thread."""
    previous = {}
    try:
        for sig in signals:
            previous[sig] = signal.signal(sig, lambda signum, _frame: on_signal(signum))
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
