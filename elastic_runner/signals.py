"""The agent's signal handling: which signals stop the run, which are ignored, and what a
stop signal does once the run's loop has ended but its result is not written yet."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from types import FrameType, TracebackType
from typing import Any

__all__ = ["LateStops", "handle_signals"]

#: What :func:`signal.signal` accepts and returns.
_Handler = Any


@contextmanager
def handle_signals(
    on_signal: Callable[[int], None],
    signals: Iterable[int],
    ignore: Iterable[int] = (),
    wakeup_fd: int | None = None,
    then: LateStops | None = None,
) -> Iterator[None]:
    """Call ``on_signal(signum)`` for each of ``signals`` and ignore ``ignore`` while the
    block runs; restores the previous handlers afterwards. Enter from the main thread.

    ``wakeup_fd`` (the agent's wake-up pipe, non-blocking) also gets a byte for every
    signal: Python runs handlers in the main thread only, and a signal the kernel hands
    to another thread (the rendezvous call's, a heartbeat's) does not interrupt the main
    thread's ``select``; without it, an agent waiting with no timeout (in its exit
    barrier) could sleep through SIGTERM.

    With ``then``, ``signals`` go to it after the block instead of back to their previous
    handlers (it restores those when it closes)."""
    stops = tuple(signals)
    previous: dict[int, _Handler] = {}
    previous_fd: int | None = None
    try:
        if wakeup_fd is not None:
            previous_fd = signal.set_wakeup_fd(wakeup_fd, warn_on_full_buffer=False)
        for sig in stops:
            previous[sig] = signal.signal(sig, lambda signum, _frame: on_signal(signum))
        for sig in ignore:
            previous[sig] = signal.signal(sig, signal.SIG_IGN)
        yield
    finally:
        if then is not None:  # straight from the run's handler to its: never the default
            then.take_over({sig: previous.pop(sig) for sig in stops if sig in previous})
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if previous_fd is not None:
            signal.set_wakeup_fd(previous_fd)


class LateStops:
    """Holds a stop signal that comes after a run's loop has ended, until the run's
    result is written.

    The report, Slurm's requeue, the ``run_end`` hooks and ``result.json`` come after the
    loop's handlers are gone. ``scontrol requeue`` (node 0 of a preempted run runs it)
    makes Slurm SIGTERM every process of the job at that moment: with the default
    action, a node died without writing its result. So the first such signal is one line
    on stderr and waits; when this closes (the result written), it is delivered as it
    would have been when ``deliver`` (a sweep stops; a caller of ``launch()`` gets it), or
    dropped (a single run exits with its own code: it ended before the signal). A second
    signal acts at once. Enter from the main thread, around the run and the writing of its
    result; :func:`handle_signals` hands the signals over (``then``)."""

    def __init__(self, *, deliver: bool) -> None:
        #: The signals held, the first first.
        self.received: list[int] = []
        self._deliver = deliver
        self._previous: dict[int, _Handler] = {}

    def take_over(self, previous: Mapping[int, _Handler]) -> None:
        """Handle these signals from now on; ``previous`` is what they did before the
        run, restored when this closes."""
        for sig, handler in previous.items():
            self._previous.setdefault(sig, handler)
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        if self.received:  # a second one: what it did before the run, now
            self._restore()
            signal.raise_signal(signum)
            return
        self.received.append(signum)
        name = signal.Signals(signum).name
        # os.write, not print or logging: a handler may run while the main thread is
        # inside either of them
        os.write(
            2,
            f"elastic-run: {name} after the run ended: writing its result first "
            f"(send it again to stop at once)\n".encode(),
        )

    def _restore(self) -> None:
        previous, self._previous = self._previous, {}
        for sig, handler in previous.items():
            signal.signal(sig, handler)

    def close(self) -> None:
        """Give the signals back their previous handlers; deliver a held one (``deliver``)."""
        self._restore()
        if self.received and self._deliver:
            signal.raise_signal(self.received[0])

    def __enter__(self) -> LateStops:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
