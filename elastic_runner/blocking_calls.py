"""The agent's calls that may block for minutes (a rendezvous round, the exit barrier:
they wait for other nodes), run so that a stop signal is acted on at once.

Each call runs in one daemon thread (one for the whole run, not one per call: a store
client keeps a connection per thread) while the agent's thread waits in the launcher's
``select``, which a signal handler can wake. On a stop the call is abandoned (the
rendezvous's ``leave`` ends it) and :class:`Stopped` is raised in the agent's thread.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from typing import TypeVar

from elastic_runner.workers.launcher import WorkerLauncher

__all__ = ["BlockingCalls", "Stopped"]

T = TypeVar("T")
log = logging.getLogger(__name__)
_Done = Callable[[tuple[bool, object]], None]


class Stopped(Exception):
    """A stop was requested while a call was in progress."""


class BlockingCalls:
    """Runs blocking calls for an agent whose thread waits in ``launcher`` meanwhile;
    ``stopping()`` says a stop was requested (checked each time the launcher wakes)."""

    def __init__(self, launcher: WorkerLauncher, stopping: Callable[[], bool]) -> None:
        self._launcher = launcher
        self._stopping = stopping
        self._queue: queue.SimpleQueue[tuple[Callable[[], object], _Done] | None] = (
            queue.SimpleQueue()
        )
        self._thread: threading.Thread | None = None

    def run(self, call: Callable[[], T]) -> T:
        """``call()``'s result (or exception), or :class:`Stopped`. The call's thread
        wakes the launcher only while the agent waits there, so no wake-up is left over
        for the agent's loop."""
        outcome: list[tuple[bool, object]] = []
        lock = threading.Lock()
        waiting = False

        def done(result: tuple[bool, object]) -> None:
            with lock:
                outcome.append(result)
                if waiting:
                    self._launcher.wake()

        self._submit(call, done)
        while True:
            with lock:
                if outcome:
                    break
                waiting = True
            if self._stopping():
                raise Stopped
            self._launcher.wait(None)
            with lock:
                waiting = False
        ok, value = outcome[0]
        if not ok:
            assert isinstance(value, BaseException)
            raise value
        return value  # type: ignore[return-value]  # what call() returned: a T

    def start(self, call: Callable[[], object], what: str) -> None:
        """Run ``call`` in the calls' thread without waiting for it, while the workers
        run (waiting here would take their exits from the agent's loop); a later
        :meth:`run` waits for it (calls run in order). Its error is logged as ``could
        not <what>``."""

        def done(result: tuple[bool, object]) -> None:
            ok, value = result
            if not ok:
                log.warning("could not %s: %s", what, value)

        self._submit(call, done)

    def close(self, timeout: float = 1.0) -> None:
        """End the thread (an abandoned call ends once the rendezvous has shut down)."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout)

    def _submit(self, call: Callable[[], object], done: _Done) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._serve, name="rdzv-call", daemon=True)
            self._thread.start()
        self._queue.put((call, done))

    def _serve(self) -> None:
        while (item := self._queue.get()) is not None:
            call, done = item
            try:
                result: tuple[bool, object] = (True, call())
            except BaseException as exc:  # handed to the agent's thread
                result = (False, exc)
            done(result)
