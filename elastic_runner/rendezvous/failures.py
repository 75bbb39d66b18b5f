"""A node's failures in the dynamic rendezvous: when its workers failed in a round (one
key per node, so that the earliest failure, the root cause, is known), the job failed for
good, and stepping out of the job after an exclusion (:mod:`elastic_runner.exclusion`)
and sitting it out.

A node excluded for failing steps out: its liveness key goes (the others re-form without
it, as for a lost node, logging the reason its ``out`` key gives) while its ``out`` key
lives, so that the host of the store waits for it; after its cooldown it joins as a
newcomer. The keys are listed in :mod:`elastic_runner.rendezvous.dynamic`, whose handler
owns a :class:`Failures` and shares its state with it (:class:`FailuresHost`).
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable
from typing import Protocol

from elastic_runner.rendezvous.api import RendezvousError, RendezvousGracefulExitError
from elastic_runner.rendezvous.host import ProtocolHost
from elastic_runner.rendezvous.records import OUTSIDE_BELL, RoundSummary, failure_time
from elastic_runner.rendezvous.store import StoreError, StoreTimeoutError
from elastic_runner.rendezvous.watching import watch_timeout

__all__ = ["Failures", "FailuresHost"]

# The protocol's one logger, as before its parts had modules of their own: log
# configurations and filters name it.
log = logging.getLogger("elastic_runner.rendezvous.dynamic")


class FailuresHost(ProtocolHost, Protocol):
    """What failures and exclusions need of the rendezvous handler: its own attributes,
    read at each use and never copied (the store moves at a failover, the settings may
    be replaced); stepping out writes the round, the lease and ``_out``."""

    #: Held over the round (``_round`` is written under it).
    _lock: threading.Lock
    _round: int | None
    _summary: RoundSummary | None
    #: Held while stepping out: a heartbeat must not bring the liveness key back.
    _beat_lock: threading.Lock
    #: Why this node sits out (``step_out``), until it joins again.
    _out: str | None
    _lease_until: float | None
    _lease_gen: int
    _lease_callback: Callable[[float | None], None] | None

    def _store_errors(self) -> contextlib.AbstractContextManager[None]:
        """A store error in the block, as a rendezvous error naming the store."""

    def _ring(self, n: int | None, value: str | None = None) -> None:
        """Wake the watchers of round ``n``'s members."""

    def _drop_join_key(self) -> None:
        """Stop announcing this node in its round (the round's watchers wake)."""

    def _protocol_error(self, what: str) -> None:
        """Log a key that holds what this protocol never writes there (once each)."""


class Failures:
    """Failure reports, the job's failure, and exclusions for the handler ``host``."""

    def __init__(self, host: FailuresHost) -> None:
        self._h = host

    def fail_job(self, reason: str) -> None:
        """Tell every node the job failed for good (this node used up the restarts)."""
        h = self._h
        try:
            if h._store.compare_set(h._p + "failed", None, f"{h.node_id}: {reason}")[0]:
                h._store.set(h._p + OUTSIDE_BELL, "failed")  # the nodes outside the round
            h._ring(h._round)
        except StoreError as exc:
            log.warning("could not tell the other nodes the job failed: %s", exc)

    def report_failure(self, at: float) -> None:
        """This node's workers failed in the current round, first at wall-clock time
        ``at`` (one key per node; ``root_cause`` compares them)."""
        h = self._h
        n = h._round
        if n is not None:
            with h._store_errors():
                h._store.set(f"{h._p}r{n}/failure/{h.node_id}", repr(at))

    def root_cause(self) -> bool:
        """This node reported the current round's earliest failure (ties: the lowest
        node id)."""
        h = self._h
        n = h._round
        if n is None:
            return False
        prefix = f"{h._p}r{n}/failure/"
        with h._store_errors():
            found, _ = h._store.scan(prefix)
        reports: dict[str, float] = {}
        for key, value in found.items():
            at = failure_time(value)
            if at is None:
                h._protocol_error(f"ignoring the malformed failure report {key}")
            else:
                reports[key[len(prefix) :]] = at
        first = min(reports.items(), key=lambda item: (item[1], item[0]), default=None)
        return first is not None and first[0] == h.node_id

    def step_out(self, reason: str, failed: bool) -> bool:
        """Leave the current round for a while (excluded: ``reason``), unless fewer than
        ``min_nodes`` would be left, standbys and waiting nodes counted (then False).
        ``failed`` counts the round's failure restart, as ``next_round`` would."""
        h = self._h
        n, summary = h._round, h._summary
        if n is None or summary is None:
            return False
        p, store, node = h._p, h._store, h.node_id
        with h._store_errors():
            waiting = len(store.scan(p + "waiting/")[0])
            if summary.size - 1 + waiting < h._s.min_nodes:
                return False
            with h._beat_lock:
                h._out = reason
                h._lease_gen += 1
                h._lease_until = None
            with h._lock:
                h._round = None
            if h._lease_callback is not None:
                h._lease_callback(None)  # no workers, nothing to fence
            if failed and store.compare_set(f"{p}r{n}/failed", None, node)[0]:
                store.add(p + "restarts", 1)
            # The reason first: the others look it up when they see the liveness key go.
            store.set(p + "out/" + node, reason, ttl=h._s.heartbeat_timeout)
            store.delete(p + "alive/" + node)
            h._drop_join_key()  # the round's watchers wake
        log.info("stepped out of round %d: %s", n, reason)
        return True

    def sit_out(self, until: float) -> None:
        """Wait outside the job until the clock reads ``until``; the job's end ends the
        wait (finished: :class:`RendezvousGracefulExitError`; failed, or this node
        leaving: :class:`RendezvousError`)."""
        h = self._h
        p, store = h._p, h._store
        # The prefix p + "f" holds exactly the keys "failed" and "finished".
        prefix = p + "f"
        with h._store_errors():
            while not h._stop.is_set():
                found, version = store.scan(prefix)
                if why := found.get(p + "failed"):
                    raise RendezvousError(f"the job failed on another node ({why})")
                if p + "finished" in found:
                    raise RendezvousGracefulExitError(
                        "the job finished while this node sat out its exclusion"
                    )
                left = until - h._clock()
                if left <= 0:
                    return
                with contextlib.suppress(StoreTimeoutError):
                    store.wait_for_change(prefix, version, min(left, watch_timeout(h._s)))
        raise RendezvousError("this node is leaving the job")
