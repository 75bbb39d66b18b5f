"""How a node of the dynamic rendezvous leaves the job: the exit barrier, where a node
that finished waits for the other members of its round (the one that sees every member
through marks the job ``finished``), and the node hosting the store keeping it up until
every other node has left.

A node that finishes normally passes the exit barrier and leaves without closing anything
for the others. The keys are listed in :mod:`elastic_runner.rendezvous.dynamic`, whose
handler owns an :class:`Exiting` and shares its state with it (:class:`ExitingHost`).
"""

from __future__ import annotations

import contextlib
import logging
import threading
from typing import Protocol

from elastic_runner.rendezvous.forming import Rounds
from elastic_runner.rendezvous.host import ProtocolHost
from elastic_runner.rendezvous.records import OUTSIDE_BELL, RoundSummary, round_of
from elastic_runner.rendezvous.store import StoreError, StoreTimeoutError, count_keys
from elastic_runner.rendezvous.watching import MembershipWatcher

__all__ = ["Exiting", "ExitingHost"]

# The protocol's one logger, as before its parts had modules of their own: log
# configurations and filters name it.
log = logging.getLogger("elastic_runner.rendezvous.dynamic")


class ExitingHost(ProtocolHost, Protocol):
    """What exiting needs of the rendezvous handler: its own attributes, read at each use
    and never copied (the store moves at a failover, the settings may be replaced, and
    the round's state changes under ``_lock``)."""

    #: Held over the round's state below.
    _lock: threading.Lock
    _round: int | None
    _summary: RoundSummary | None
    #: Written here: the round whose exit barrier this node is in (its watcher is quiet).
    _exiting: int | None


class Exiting:
    """The exit barrier and the store host's last wait, for the handler ``host``;
    ``rounds`` reads a round's members, ``watcher`` tells how a member left."""

    def __init__(self, host: ExitingHost, rounds: Rounds, watcher: MembershipWatcher) -> None:
        self._h = host
        self._rounds = rounds
        self._watcher = watcher

    def exit_barrier(self) -> bool:
        """Wait (up to exit_barrier_timeout) until every member of the round finished.
        False when the round re-forms instead (another node failed or left: the whole job
        runs again, this node included); a timeout is logged, never an error."""
        h = self._h
        n, summary = h._round, h._summary
        if n is None or summary is None:
            return True
        p, store = h._p, h._store
        if summary.size <= 1:
            self.finished_job()
            return True
        with h._lock:
            h._exiting = n  # the watcher has nothing more to say about round n
        prefix = f"{p}r{n}/exit/"
        try:
            store.set(prefix + h.node_id, "1")
            deadline = h._clock() + h._s.exit_barrier_timeout
            seen = -1
            while not h._stop.is_set():
                # The version first: a change made after it wakes the wait below.
                found, version = store.scan(p + "round")
                failed, round_failed = store.multi_get([p + "failed", f"{p}r{n}/failed"])
                if round_of(found.get(p + "round"), n) != n or round_failed or failed:
                    return False
                # A count, so that each wake-up costs one small answer, not every exit
                # key: N nodes finishing would otherwise read N keys N times over.
                count = count_keys(store, prefix)
                if count >= summary.size:
                    self.finished_job()
                    return True
                if count == seen:
                    # Woken by something other than an exit (a member gone, say), or
                    # by the timeout: a member gone without finishing (stopped by a
                    # signal, or lost) will not arrive; waiting would only hold this
                    # node up.
                    found, version = store.scan(p)
                    finished = {k[len(prefix) :] for k in found if k.startswith(prefix)}
                    members = self._rounds.member_ids(n, summary)
                    gone = [
                        m for m in members if m not in finished and p + "alive/" + m not in found
                    ]
                    if len(finished) + len(gone) >= len(members):
                        for m in gone:
                            log.warning(
                                "exit barrier: %s; not waiting for it", self._watcher.gone(m, found)
                            )
                        self.finished_job()
                        return True
                seen = count
                left = deadline - h._clock()
                if left <= 0:
                    raise StoreTimeoutError(f"{left:g}")
                try:
                    store.wait_for_change(f"{p}r{n}/", version, min(left, h._s.heartbeat_timeout))
                except StoreTimeoutError:
                    seen = count  # look for members gone without a change
        except (StoreTimeoutError, StoreError) as exc:
            log.warning("exit barrier: not every node finished (%s); leaving anyway", exc)
        return True

    def finished_job(self) -> None:
        """Mark the job finished (standbys, and nodes waiting to join, end at once)."""
        h = self._h
        try:
            if h._store.compare_set(h._p + "finished", None, h.node_id)[0]:
                h._store.set(h._p + OUTSIDE_BELL, "finished")
        except StoreError as exc:
            log.warning("could not tell the standby nodes the job finished: %s", exc)

    def may_be_over(self, n: int, summary: RoundSummary) -> bool:
        """For a node outside round ``n``: whether :meth:`outcome` may find the job over
        (finished, or every member gone), by one small read: the finished mark, and the
        liveness and exit keys of the round's few monitors. While one of them is alive
        and has not finished, the job is not over, and reading all of its keys (O(N))
        would tell nothing more."""
        h = self._h
        p, sample = h._p, list(summary.monitors)
        if not sample:  # a summary from before monitors
            return True
        keys = [p + "finished"]
        keys += [p + "alive/" + m for m in sample]
        keys += [f"{p}r{n}/exit/{m}" for m in sample]
        values = h._store.multi_get(keys)
        if values[0] is not None:
            return True
        alive, exited = values[1 : 1 + len(sample)], values[1 + len(sample) :]
        return all(a is None or e is not None for a, e in zip(alive, exited, strict=True))

    def outcome(self, n: int, members: list[str], found: dict[str, str]) -> str | None:
        """For a node outside round ``n`` (``members``), from the job's keys ``found``:
        ``"finished"`` when the job is marked so, or when each member finished or is gone
        (what the exit barrier calls finished), one at least finished; ``"gone"`` when
        every member is gone without finishing (none will re-form the job); else None."""
        h = self._h
        p = h._p
        if p + "finished" in found:
            return "finished"
        exits = {k.rsplit("/", 1)[1] for k in found if k.startswith(f"{p}r{n}/exit/")}
        finished = [m for m in members if m in exits]
        gone = [m for m in members if m not in exits and p + "alive/" + m not in found]
        if len(finished) + len(gone) < len(members):
            return None
        return "finished" if finished else "gone"

    def others(self) -> tuple[list[str], int]:
        """The other nodes still in the job (alive, or sitting out an exclusion), and the
        store's version when they were read."""
        h = self._h
        alive, version = h._store.scan(h._p + "alive/")
        out, _ = h._store.scan(h._p + "out/")
        return [*alive, *out], version

    def linger(self) -> None:
        """This node hosts the store, which must outlive every other node of the job: wait
        until each has left (its liveness key deleted, or expired if it died; a node
        sitting out an exclusion counts as in the job)."""
        h = self._h
        said = False
        limit = h._s.close_timeout
        deadline = None if limit is None else h._clock() + limit
        while True:
            others, version = self.others()
            if not others:
                return
            if deadline is not None and h._clock() >= deadline:
                log.warning(
                    "closing the rendezvous store with %d node(s) still running "
                    "(rdzv.close_timeout=%g s)",
                    len(others),
                    limit,
                )
                return
            if not said:
                log.info(
                    "keeping the rendezvous store up until %d other node(s) leave", len(others)
                )
                said = True
            # Only liveness keys wake this wait: an ``out`` key's expiry is seen within
            # the timeout.
            with contextlib.suppress(StoreTimeoutError):
                h._store.wait_for_change(h._p + "alive/", version, 2 * h._s.heartbeat_timeout)
