"""Dynamic rendezvous on any :class:`~elastic_runner.rendezvous.store.Store`.

Every state change is a small per-node key or one compare-and-set; nothing rewrites a
shared blob, and a heartbeat only refreshes the node's own key (a TTL key, so a dead
node's key expires by itself). Waiting is notified by the store. Keys, under
``rdzv/<run id>/``::

    round                 the current round number
    r<n>/join/<node>      a node's announcement in round n (role, workers, addresses): a
                          TTL key its heartbeat refreshes while it joins or is a member
    r<n>/lead             the node that completes round n (TTL), woken by
                          r<n>/done-min once min_nodes announced themselves
    r<n>/full             the count of join keys the last node to find it full saw
    r<n>/seat/<a>/<node>  the node's group rank in attempt a to complete round n
    r<n>/record/<a>       attempt a's full record: every member's announcement, in order
    r<n>/done             the completed round's summary (one CAS): the attempt, the
                          number of nodes, their roles and workers in runs, a few
                          members to host the store or to monitor the others
    r<n>/joinbell         rung to wake the members' watchers (a reason after "why:")
    r<n>/master           MASTER_ADDR/PORT, written by group rank 0
    r<n>/failed           set once when round n ended in a failure (counts one restart)
    r<n>/exit/<node>      the exit barrier
    r<n>/failure/<node>   when the node's workers first failed in round n (wall clock)
    alive/<node>          liveness (TTL = heartbeat_timeout)
    waiting/<node>        a node that found the round complete and waits for the next
    out/<node>            a node sitting out after an exclusion (why; TTL, refreshed)
    restarts              failure restarts of the whole job (TORCHELASTIC_RESTART_COUNT)
    failed                the job failed for good (why), so nodes stop re-forming
    finished              the job finished: its nodes passed the exit barrier (who saw it)

A round completes at once when ``max_nodes`` have joined (and every live member of the
previous round, which keeps its place before newcomers), or ``last_call_timeout`` after
``min_nodes`` had. Only the round's leader (or the node that finds it full) reads every
announcement, when the count of them says the round may be complete; every other node
reads the small summary and its seat, so a round costs O(N) bytes in all, not O(N²). A
node that finds the round complete at ``max_nodes`` is a standby (hot spare): it waits,
with no ``join_timeout`` while the job's nodes live, for the round that re-forms when one
is lost, and ends when the job finished (or failed); when every member of the round is
gone without finishing, it starts the next round itself.

A running node regroups (a new round, no restart spent) when a node waits to join while
the round has fewer than ``max_nodes``, or when a member's liveness key expires (its
watcher waits on the round's join keys and bell only: nothing is read while nothing
changes); a node that finishes normally passes the exit barrier (the one that sees every
member through marks the job ``finished``) and leaves without closing anything for the
others.

A node excluded for failing (:mod:`elastic_runner.exclusion`) steps out: its liveness
key goes (the others re-form without it, as for a lost node, logging the reason its
``out`` key gives) while its ``out`` key lives, so that the host of the store waits for
it; after its cooldown it joins as a newcomer.

With ``failover`` (the agent-hosted TCP store), a node that finds the store gone moves it
to the first member of its last round that answers (:mod:`~elastic_runner.rendezvous.
failover`; each join record carries the port a node would serve at), carrying the round
number and the restart count over to the empty store. Then, and whenever the last round
had three members or more, a round completes only with a strict majority of the last
round's members that did not leave on purpose: a partition never leaves two live worlds.

This module is the protocol only, with no Hydra or OmegaConf behind it: turning a
backend's ``rdzv.*`` config into one is :mod:`elastic_runner.rendezvous.kit`'s job.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from elastic_runner.rendezvous.api import (
    NodeInfo,
    RendezvousError,
    RendezvousGracefulExitError,
    RendezvousInfo,
    RendezvousTimeoutError,
)
from elastic_runner.rendezvous.failover import Candidate, StoreFailover
from elastic_runner.rendezvous.network import find_free_port, pinned_port, reachable_address
from elastic_runner.rendezvous.records import (
    CorruptKey,
    RoundSummary,
    count_of,
    done_record,
    done_summary,
    failure_time,
    join_record,
    master_record,
    round_of,
    seat_of,
)
from elastic_runner.rendezvous.store import (
    Store,
    StoreError,
    StoreTimeoutError,
    StoreUnavailableError,
    count_keys,
    refresh_keys,
)

__all__ = ["DynamicRendezvous", "RendezvousSettings"]

log = logging.getLogger(__name__)

#: ``_progress``'s first field while the round is under way without this node, and
#: while it stands by (the round is complete at ``max_nodes``).
_OUTSIDE, _STANDBY = -1, -2

#: How many members of a round may host the store after a move (spread over the group
#: ranks): these read the round's full record (O(N) each) to count a majority; the
#: others follow the first of them that serves.
CANDIDATES = 5

#: What a bell rung with a reason starts with (a node id cannot).
_REASON = "why:"


@dataclass
class _Forming:
    """This node in round ``n`` while it forms: the nodes in it as last counted, whether
    it leads, and (the leader's) count at its last full look, its last call, when it
    looked and when it looks again."""

    n: int
    arrived: int = 0
    #: This node found the round full when it announced itself: it reads the join keys
    #: itself, once.
    full: bool = False
    leads: bool = False
    checked: int = 0
    last_call: float | None = None
    #: When the leader last read every join key, and when it reads them again.
    looked: float = float("-inf")
    look_at: float | None = None


def _spread(items: list[Any]) -> list[Any]:
    """Up to :data:`CANDIDATES` of ``items``, spread over them, in order."""
    picks = {i * len(items) // CANDIDATES for i in range(CANDIDATES)} & set(range(len(items)))
    return [items[i] for i in sorted(picks)]


def _candidates(record: list[list[Any]]) -> tuple[tuple[str, str, int], ...]:
    """Up to :data:`CANDIDATES` members that could host the store (an address and a
    failover port), spread over the round, in group-rank order."""
    able = [m for m in record if len(m) > 4 and m[3] and m[4]]
    return tuple((str(m[0]), str(m[3]), int(m[4])) for m in _spread(able))


@dataclass(frozen=True)
class RendezvousSettings:
    """Timing and membership knobs (the ``rdzv.*`` keys of store-based backends)."""

    run_id: str
    min_nodes: int
    max_nodes: int
    join_timeout: float = 600.0
    last_call_timeout: float = 30.0
    heartbeat_interval: float = 5.0
    heartbeat_timeout: float = 15.0
    exit_barrier_timeout: float = 300.0
    #: How long the node hosting the store keeps it up for nodes still running after it
    #: finished (``None``: as long as they are alive).
    close_timeout: float | None = None
    #: Fixed group rank (static rendezvous); ``None`` = by join order.
    node_rank: int | None = None
    #: MASTER_PORT group rank 0 publishes (``rdzv.master_port``); ``None``: a free one.
    master_port: int | None = None
    #: The store is served by one of the agents (``tcp``, ``static``), which removes the
    #: job's keys once every other node has left, then closes it.
    agent_hosted: bool = False
    #: A round after one of three nodes or more needs a strict majority of that round's
    #: nodes that did not leave on purpose (the agent-hosted store that can move: a
    #: partition must never leave two live worlds).
    majority: bool = False


class DynamicRendezvous:
    """A :class:`~elastic_runner.rendezvous.RendezvousHandler` over a store.

    ``local_addr`` is this node's MASTER_ADDR when it becomes group rank 0 (or a function
    that finds it once the store is reached); ``endpoint`` names the store in messages.
    """

    def __init__(
        self,
        store: Store,
        settings: RendezvousSettings,
        *,
        backend: str,
        endpoint: str,
        local_addr: str | Callable[[], str],
        on_close: Callable[[], None] | None = None,
        failover: StoreFailover | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.backend = backend
        self._store = store
        self._s = settings
        self._endpoint = endpoint
        self._addr = local_addr
        #: ``local_addr()``'s answer, asked once (after a move of the store, the client
        #: that would answer it is gone).
        self._found_addr: str | None = None
        self._on_close = on_close
        self._failover = failover
        #: The last round this node was in (its summary; its full record once read: only
        #: group rank 0 and the candidates to host the store need it), and the job's
        #: restart count then: what a move of the store carries over.
        self._summary: RoundSummary | None = None
        self._record: list[list[Any]] | None = None
        self._restarts_seen = 0
        #: The round this node is leaving (next_round was called): its watcher stays
        #: quiet until the next round completes.
        self._leaving: int | None = None
        #: The round whose exit barrier this node is in: its watcher stays quiet.
        self._exiting: int | None = None
        #: This node's join key in the round it joins or is in (a TTL key the heartbeat
        #: refreshes: the watchers of the round wake when it goes) and its value; the key
        #: that makes it the round's leader while the round forms.
        self._join_key: tuple[str, str] | None = None
        self._lead_key: str | None = None
        #: Rounds formed while this node waited for a majority (each logged once), and
        #: the size of the last round then.
        self._no_quorum: dict[int, int] = {}
        #: The last full record read (round, attempt) -> record.
        self._records: dict[tuple[int, str], list[list[Any]]] = {}
        #: The round whose keys the watcher may be blocked on at the store (``None``
        #: while it has nothing to watch): a node whose next round completes while
        #: its watcher is still there rings that round's bell to move it on.
        self._watching_round: int | None = None
        self._clock = clock
        self.node_id = f"{socket.gethostname()}_{os.getpid()}_{uuid.uuid4().hex[:6]}"
        self._p = f"rdzv/{settings.run_id}/"
        self._round: int | None = None
        #: (arrived or -1, min, max, deadline, last call) while in next_round
        self._progress: tuple[int, int, int, float, float | None] | None = None
        self._callback: Callable[[], None] | None = None
        #: Set when this node leaves (``leave``) or shuts down: waits and threads end.
        self._stop = threading.Event()
        self._closed = False
        #: Why this node left the job for good (``leave``), for the others' logs.
        self._left: str | None = None
        #: Until when this node's liveness key surely lives at the store (the send time
        #: of its last successful write plus the TTL); ``None`` once it lapsed.
        self._lease_until: float | None = None
        #: Bumped at each new announcement: a heartbeat that was sent before it must not
        #: lapse (or extend) the new lease.
        self._lease_gen = 0
        self._lease_callback: Callable[[float | None], None] | None = None
        self._heartbeat: threading.Thread | None = None
        self._watcher: threading.Thread | None = None
        self._waiting = False
        self._lock = threading.Lock()
        #: Why this node sits out (``step_out``), until it joins again.
        self._out: str | None = None
        #: Held while the heartbeat re-announces a key, and while stepping out or back:
        #: a heartbeat must not bring back the liveness key of a node that stepped out.
        self._beat_lock = threading.Lock()
        #: Malformed keys already logged (each once).
        self._protocol_errors: set[str] = set()

    # -- RendezvousHandler --------------------------------------------------------------

    def on_membership_change(self, callback: Callable[[], None]) -> None:
        self._callback = callback

    def num_nodes_waiting(self) -> int:
        found, _ = self._store.scan(self._p + "waiting/")
        return len(found)

    def next_round(self, node: NodeInfo, failed: bool = False) -> RendezvousInfo:
        try:
            return self._next_round(node, failed)
        except StoreError as exc:
            raise RendezvousError(f"rendezvous store at {self._endpoint}: {exc}") from None
        finally:
            self._progress = None

    def exit_barrier(self) -> bool:
        """Wait (up to exit_barrier_timeout) until every member of the round finished.
        False when the round re-forms instead (another node failed or left: the whole job
        runs again, this node included); a timeout is logged, never an error."""
        n, summary = self._round, self._summary
        if n is None or summary is None:
            return True
        p, store = self._p, self._store
        if summary.size <= 1:
            self._finished_job()
            return True
        with self._lock:
            self._exiting = n  # the watcher has nothing more to say about round n
        prefix = f"{p}r{n}/exit/"
        try:
            store.set(prefix + self.node_id, "1")
            deadline = self._clock() + self._s.exit_barrier_timeout
            seen = -1
            while not self._stop.is_set():
                # The version first: a change made after it wakes the wait below.
                found, version = store.scan(p + "round")
                failed, round_failed = store.multi_get([p + "failed", f"{p}r{n}/failed"])
                if round_of(found.get(p + "round"), n) != n or round_failed or failed:
                    return False
                # A count, so that each wake-up costs one small answer, not every exit
                # key: N nodes finishing would otherwise read N keys N times over.
                count = count_keys(store, prefix)
                if count >= summary.size:
                    self._finished_job()
                    return True
                if count == seen:
                    # Woken by something other than an exit (a member gone, say), or
                    # by the timeout: a member gone without finishing (stopped by a
                    # signal, or lost) will not arrive; waiting would only hold this
                    # node up.
                    found, version = store.scan(p)
                    finished = {k[len(prefix) :] for k in found if k.startswith(prefix)}
                    members = self._member_ids(n, summary)
                    gone = [
                        m for m in members if m not in finished and p + "alive/" + m not in found
                    ]
                    if len(finished) + len(gone) >= len(members):
                        for m in gone:
                            log.warning(
                                "exit barrier: %s; not waiting for it", self._gone(m, found)
                            )
                        self._finished_job()
                        return True
                seen = count
                left = deadline - self._clock()
                if left <= 0:
                    raise StoreTimeoutError(f"{left:g}")
                try:
                    store.wait_for_change(
                        f"{p}r{n}/", version, min(left, self._s.heartbeat_timeout)
                    )
                except StoreTimeoutError:
                    seen = count  # look for members gone without a change
        except (StoreTimeoutError, StoreError) as exc:
            log.warning("exit barrier: not every node finished (%s); leaving anyway", exc)
        return True

    def _finished_job(self) -> None:
        """Mark the job finished (standbys, and nodes waiting to join, end at once)."""
        try:
            self._store.compare_set(self._p + "finished", None, self.node_id)
        except StoreError as exc:
            log.warning("could not tell the standby nodes the job finished: %s", exc)

    def leave(self, reason: str) -> None:
        """This node stops for good (``reason``: ``stopped by SIGTERM``): the others
        stop waiting for it at once (they re-form without it, or leave their exit
        barrier), a wait in progress here ends, and a node hosting the store does not
        keep it up for the others at shutdown. Best effort, bounded: a store that cannot
        be reached within a second is not waited for."""
        if self._left is not None:
            return
        self._left = reason
        self._stop.set()
        if self._lease_callback is not None:
            self._lease_callback(None)  # leaving: nothing to fence
        p, node = self._p, self.node_id

        def tell() -> None:
            self._store.set(p + "left/" + node, reason, ttl=self._s.heartbeat_timeout * 4)
            self._store.delete(p + "alive/" + node)
            self._drop_join_key()  # the round's watchers wake
            self._store.delete(p + "waiting/" + node)
            self._store.delete(p + "out/" + node)

        self._bounded(tell, "tell the other nodes this one left")

    @property
    def _lease_span(self) -> float:
        """How long a refresh sent at ``t`` keeps this node surely a member: until a
        margin before its key can expire at the store (``t`` + TTL at the earliest). The
        margin (one heartbeat interval, less when the TTL leaves no room for it: the
        lease must outlast the next refresh) lets the workers die (the agent wakes; the
        guardian may have to import and scan /proc first) before the others can see this
        node lost and start a new world without it."""
        ttl, interval = self._s.heartbeat_timeout, self._s.heartbeat_interval
        return ttl - min(interval, (ttl - interval) / 2)

    def on_lease(self, callback: Callable[[float | None], None]) -> None:
        self._lease_callback = callback

    def _tell_lease(self) -> None:
        """Hand the lease of the current round to the agent: when this node's liveness
        key may expire at the store (its workers must not outlive it), ``0.0`` once a
        refresh found the key already gone."""
        callback = self._lease_callback
        if callback is None or self._round is None or self._left is not None:
            return
        callback(self._lease_until if self._lease_until is not None else 0.0)

    def fail_job(self, reason: str) -> None:
        """Tell every node the job failed for good (this node used up the restarts)."""
        try:
            self._store.compare_set(self._p + "failed", None, f"{self.node_id}: {reason}")
            self._ring(self._round)
        except StoreError as exc:
            log.warning("could not tell the other nodes the job failed: %s", exc)

    def report_failure(self, at: float) -> None:
        """This node's workers failed in the current round, first at wall-clock time
        ``at`` (one key per node; ``root_cause`` compares them)."""
        n = self._round
        if n is not None:
            with self._store_errors():
                self._store.set(f"{self._p}r{n}/failure/{self.node_id}", repr(at))

    def root_cause(self) -> bool:
        """This node reported the current round's earliest failure (ties: the lowest
        node id)."""
        n = self._round
        if n is None:
            return False
        prefix = f"{self._p}r{n}/failure/"
        with self._store_errors():
            found, _ = self._store.scan(prefix)
        reports: dict[str, float] = {}
        for key, value in found.items():
            at = failure_time(value)
            if at is None:
                self._protocol_error(f"ignoring the malformed failure report {key}")
            else:
                reports[key[len(prefix) :]] = at
        first = min(reports.items(), key=lambda item: (item[1], item[0]), default=None)
        return first is not None and first[0] == self.node_id

    def step_out(self, reason: str, failed: bool) -> bool:
        """Leave the current round for a while (excluded: ``reason``), unless fewer than
        ``min_nodes`` would be left, standbys and waiting nodes counted (then False).
        ``failed`` counts the round's failure restart, as ``next_round`` would."""
        n, summary = self._round, self._summary
        if n is None or summary is None:
            return False
        p, store, node = self._p, self._store, self.node_id
        with self._store_errors():
            waiting = len(store.scan(p + "waiting/")[0])
            if summary.size - 1 + waiting < self._s.min_nodes:
                return False
            with self._beat_lock:
                self._out = reason
                self._lease_gen += 1
                self._lease_until = None
            with self._lock:
                self._round = None
            if self._lease_callback is not None:
                self._lease_callback(None)  # no workers, nothing to fence
            if failed and store.compare_set(f"{p}r{n}/failed", None, node)[0]:
                store.add(p + "restarts", 1)
            # The reason first: the others look it up when they see the liveness key go.
            store.set(p + "out/" + node, reason, ttl=self._s.heartbeat_timeout)
            store.delete(p + "alive/" + node)
            self._drop_join_key()  # the round's watchers wake
        log.info("stepped out of round %d: %s", n, reason)
        return True

    def sit_out(self, until: float) -> None:
        """Wait outside the job until the clock reads ``until``; the job's end ends the
        wait (finished: :class:`RendezvousGracefulExitError`; failed, or this node
        leaving: :class:`RendezvousError`)."""
        p, store = self._p, self._store
        # The prefix p + "f" holds exactly the keys "failed" and "finished".
        prefix = p + "f"
        with self._store_errors():
            while not self._stop.is_set():
                found, version = store.scan(prefix)
                if why := found.get(p + "failed"):
                    raise RendezvousError(f"the job failed on another node ({why})")
                if p + "finished" in found:
                    raise RendezvousGracefulExitError(
                        "the job finished while this node sat out its exclusion"
                    )
                left = until - self._clock()
                if left <= 0:
                    return
                with contextlib.suppress(StoreTimeoutError):
                    store.wait_for_change(prefix, version, min(left, self._watch_timeout))
        raise RendezvousError("this node is leaving the job")

    @contextlib.contextmanager
    def _store_errors(self) -> Iterator[None]:
        """A store error, as a rendezvous error naming the store."""
        try:
            yield
        except StoreError as exc:
            raise RendezvousError(f"rendezvous store at {self._endpoint}: {exc}") from None

    def shutdown(self) -> None:
        """Leave the job, then close the store. Only the first call does anything: the
        agent leaves when its loop ends, and the run's assembly step calls it again in
        case the loop never ran (the store is closed by then)."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        if self._heartbeat is not None:
            self._heartbeat.join(timeout=5)
        # The watcher may be inside a long store wait: closing the store below ends it.

        def leave_store() -> None:
            if self._s.agent_hosted and not self._hosting:
                # Another agent hosts the store and may close it the moment this key is
                # gone: one more request would wait heartbeat_timeout (15 s) for a store
                # that is no more. The host removes the job's keys.
                self._store.delete(self._p + "waiting/" + self.node_id)
                self._store.delete(self._p + "out/" + self.node_id)
                self._drop_join_key()
                self._store.delete(self._p + "alive/" + self.node_id)
                return
            for kind in ("alive/", "waiting/", "out/"):
                self._store.delete(self._p + kind + self.node_id)
            self._drop_join_key()
            if self._hosting and self._left is None:
                self._linger()
            if not self._others()[0]:
                self._store.delete_prefix(self._p)  # the last node out removes the job's keys

        if self._left is None:
            with contextlib.suppress(StoreError):
                leave_store()
        else:  # stopping for a signal: do not hold the stop up
            self._bounded(leave_store, "leave the store")
        self._store.close()
        if self._failover is not None:
            self._failover.close()
        if self._on_close:
            self._on_close()

    @property
    def _hosting(self) -> bool:
        """This node serves the store (from the start, or since a move)."""
        return self._on_close is not None or (self._failover is not None and self._failover.serving)

    def _bounded(self, work: Callable[[], None], what: str, seconds: float = 1.0) -> None:
        """Run ``work`` (store requests) in a thread and wait at most ``seconds``: a store
        that cannot be reached must not delay a stop. Errors are logged, never raised."""

        def run() -> None:
            try:
                work()
            except StoreError as exc:
                log.warning("could not %s: %s", what, exc)

        thread = threading.Thread(target=run, name="rdzv-leave", daemon=True)
        thread.start()
        thread.join(seconds)
        if thread.is_alive():
            log.warning("could not %s within %g s (store at %s)", what, seconds, self._endpoint)

    def _others(self) -> tuple[list[str], int]:
        """The other nodes still in the job (alive, or sitting out an exclusion), and the
        store's version when they were read."""
        alive, version = self._store.scan(self._p + "alive/")
        out, _ = self._store.scan(self._p + "out/")
        return [*alive, *out], version

    def _linger(self) -> None:
        """This node hosts the store, which must outlive every other node of the job: wait
        until each has left (its liveness key deleted, or expired if it died; a node
        sitting out an exclusion counts as in the job)."""
        said = False
        limit = self._s.close_timeout
        deadline = None if limit is None else self._clock() + limit
        while True:
            others, version = self._others()
            if not others:
                return
            if deadline is not None and self._clock() >= deadline:
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
                self._store.wait_for_change(
                    self._p + "alive/", version, 2 * self._s.heartbeat_timeout
                )

    # -- the protocol -------------------------------------------------------------------

    def _reach_store(self, deadline: float) -> None:
        """Announce this node, waiting for an unavailable store until ``deadline`` (it
        may start after us, or be restarting); then, or on any other error, raise."""
        delay = 0.05
        cut_off = False
        while True:
            if self._stop.is_set():
                raise RendezvousError("this node is leaving the job")
            try:
                key, ttl = self._p + "alive/" + self.node_id, self._s.heartbeat_timeout
                self._store.set(key, "1", ttl=ttl)
                # The lease runs from the send time of a request on a connection that is
                # up (the set may have waited for DNS or a connection).
                sent = self._clock()
                self._store.refresh(key, ttl)
                self._lease_gen += 1
                self._lease_until = sent + self._lease_span
                return
            except StoreError as exc:
                if self._can_move and self._clock() < deadline:
                    # once per outage: a node cut off tries again until join_timeout
                    say = log.debug if cut_off else log.warning
                    say("the rendezvous store at %s is gone: %s", self._endpoint, exc)
                    try:
                        self._move_store()
                        continue
                    except StoreUnavailableError as why:
                        say("%s", why)  # cut off: retry the store, its link may heal
                        cut_off = True
                if not isinstance(exc, StoreUnavailableError):
                    raise
                if self._clock() + delay >= deadline:
                    raise StoreUnavailableError(
                        f"{exc}; gave up after rdzv.join_timeout={self._s.join_timeout:g} s"
                    ) from None
                self._stop.wait(delay)
                delay = min(delay * 2, 1.0)

    @property
    def _can_move(self) -> bool:
        """Whether this node may move the store: with failover, after a round of three
        nodes or more (a lone survivor of two cannot tell the host's death from a cut
        link, and the host goes on alone in that case)."""
        return self._failover is not None and self._summary is not None and self._summary.size >= 3

    def _move_store(self) -> None:
        """Move to the store of the first member of the last round that answers (this
        node's own, when it comes first), then carry the round number and the restart
        count over to it (every survivor writes the same values; the first one counts)."""
        assert self._failover is not None
        host, _, port = self._endpoint.rpartition(":")
        if port.isdigit() and self._failover.answers(host.strip("[]"), int(port)):
            raise StoreUnavailableError(f"the rendezvous store at {self._endpoint} answers again")
        summary = self._summary
        assert summary is not None
        hosts = [Candidate(*c) for c in summary.candidates]
        if self._record is not None:  # a candidate to host it: it counts the members
            voters = [
                Candidate(str(m[0]), str(m[3]), int(m[4]))
                for m in self._record
                if len(m) > 4 and m[3] and m[4]
            ]
            store, endpoint = self._failover.elect(voters, self.node_id, summary.size, hosts)
        else:  # it follows a candidate that moved (and so reached a majority)
            store, endpoint = self._failover.follow(hosts)
        old, self._store = self._store, store
        log.warning("rendezvous store: %s (was %s)", endpoint, self._endpoint)
        self._endpoint = endpoint
        with contextlib.suppress(Exception):
            old.close()
        p, n = self._p, self._round
        store.compare_set(p + "round", None, str(n if n is not None else 0))
        store.compare_set(p + "restarts", None, str(self._restarts_seen))

    def _quorum(self, joined: dict[str, Any], earlier: list[list[Any]] | None) -> bool:
        """Whether ``joined`` holds a strict majority of the members of the last round
        (``earlier``, its record) that did not leave on purpose (always, without
        ``majority``, after a round of one or two, or when the store does not hold that
        round: a store that moved here, whose host reached a majority to move it)."""
        members = {str(m[0]) for m in earlier or ()}
        if not self._s.majority or len(members) < 3:
            return True
        p = self._p
        gone = {k.rsplit("/", 1)[1] for k in self._store.scan(p + "left/")[0]}
        gone |= {k.rsplit("/", 1)[1] for k in self._store.scan(p + "out/")[0]}
        counted = members - gone
        return 2 * len(counted & joined.keys()) > len(counted)

    def _next_round(self, node: NodeInfo, failed: bool) -> RendezvousInfo:
        s, p = self._s, self._p
        self._reach_store(self._clock() + s.join_timeout)
        store = self._store  # (reaching it may have moved it to another node)
        if self._out is not None:  # back after an exclusion: alive again, no longer out
            with self._beat_lock:
                self._out = None
            store.delete(p + "out/" + self.node_id)
        self._start_heartbeat()
        if self._round is not None:  # leave the old round: start the next one
            old = self._round
            with self._lock:
                self._leaving = old
            if failed and store.compare_set(f"{p}r{old}/failed", None, self.node_id)[0]:
                store.add(p + "restarts", 1)
            store.compare_set(p + "round", str(old), str(old + 1))
            self._drop_join_key()  # the old round's watchers wake (and see the new round)
        deadline = self._clock() + s.join_timeout
        standby_for: int | None = None  # the round this node stands by for (logged once)
        forming = _Forming(-1)
        timed_out = False
        while True:
            if self._stop.is_set():
                raise RendezvousError("this node is leaving the job")
            # The version first: a change made after it wakes the wait below.
            found, version = store.scan(p + "round")
            if p + "round" not in found:  # the job's first node
                store.compare_set(p + "round", None, "0")
                continue
            n = round_of(found.get(p + "round"), 0)  # garbage: a protocol error, one line
            why, done = store.multi_get([p + "failed", f"{p}r{n}/done"])
            if why:
                raise RendezvousError(f"the job failed on another node ({why})")
            if done is not None:
                summary = done_summary(n, done)
                rank = self._seat(n, summary)
                if rank is not None:
                    self._progress = None
                    return self._complete(n, summary, rank)
                if forming.n == n:  # joined, but the round completed without this node
                    self._drop_join_key()
                    self._drop_lead()
                self._set_waiting(True, (n, summary))  # the round is under way without us
                # Everything of the job: wake when it finishes, fails, loses a member.
                found, version = store.scan(p)
                if round_of(found.get(p + "round"), n) != n:
                    continue  # moved on meanwhile (before this version: look again now)
                outcome = self._outcome(n, self._member_ids(n, summary), found)
                if outcome == "finished":
                    raise RendezvousGracefulExitError(
                        "the job finished without needing this standby node"
                        if standby_for is not None
                        else "the job finished while this node waited to join"
                    )
                if outcome == "gone":
                    # Nobody is left to re-form the job: this node starts the next round.
                    log.warning("every node of round %d is gone: starting round %d", n, n + 1)
                    store.compare_set(p + "round", str(n), str(n + 1))
                    continue
                if summary.size >= s.max_nodes:  # a standby: no deadline while the job runs
                    deadline = self._clock() + s.join_timeout
                    if standby_for is None:
                        log.info(
                            "standby: the job runs on %d of %d nodes; this node takes the "
                            "place of one that is lost",
                            summary.size,
                            s.max_nodes,
                        )
                    standby_for = n
                    self._progress = (_STANDBY, s.min_nodes, s.max_nodes, deadline, None)
                else:
                    self._progress = (_OUTSIDE, s.min_nodes, s.max_nodes, deadline, None)
                watched = p
            else:
                self._set_waiting(False)
                if standby_for is not None:  # a round that may need this node: join it
                    standby_for = None
                    deadline = self._clock() + s.join_timeout
                if forming.n != n:
                    forming = self._announce(n, node)
                elif not forming.leads and timed_out:
                    # the leader may be gone (its key expires with it): lead instead
                    forming.leads = self._lead(n)
                if forming.leads or (forming.full and forming.checked == 0):
                    self._form(n, forming, timed_out)
                self._progress = (
                    forming.arrived,
                    s.min_nodes,
                    s.max_nodes,
                    deadline,
                    forming.last_call,
                )
                # Every node waits for the round's completion (the leader for the last
                # call too: r<n>/done-min), and looks again at least every
                # heartbeat_timeout (the leader may have died): N joining nodes cost
                # O(N) requests and bytes, not O(N²).
                watched = f"{p}r{n}/done"
            left = deadline - self._clock()
            if left <= 0:
                raise self._timeout_error(n)
            wait = min(left, s.heartbeat_timeout)
            if done is None and forming.leads:
                for when in (forming.last_call, forming.look_at):
                    if when is not None:
                        wait = min(wait, max(0.001, when - self._clock()))
            try:
                store.wait_for_change(watched, version, wait)
                timed_out = False
            except StoreTimeoutError:
                timed_out = wait >= s.heartbeat_timeout

    def _announce(self, n: int, node: NodeInfo) -> _Forming:
        """Announce this node in round n: its join key (a TTL key the heartbeat
        refreshes, so that the round's join keys are its live joiners), its arrival
        (a count) and, for the first, the lead."""
        p, store = self._p, self._store
        record = {
            "role": node.role,
            "nproc": node.local_world_size,
            "node_rank": self._s.node_rank,
            # what this node would advertise as MASTER_ADDR (see _complete)
            "addr": self._local_addr(),
            # where it would serve the store if the host dies
            "failover": self._failover.port if self._failover is not None else None,
        }
        key, value = f"{p}r{n}/join/{self.node_id}", json.dumps(record)
        with self._beat_lock:
            self._join_key = (key, value)
            store.set(key, value, ttl=self._s.heartbeat_timeout)
        # A count of the live join keys, not a shared counter: etcd increments by
        # compare-and-set, and N nodes contending on one key cost O(N²) requests.
        arrived = count_keys(store, f"{p}r{n}/join/")
        s = self._s
        if s.min_nodes <= arrived < s.max_nodes:
            # wake the leader (waiting on r<n>/done, as every node) for the last call
            store.compare_set(f"{p}r{n}/done-min", None, self.node_id)
        full = False
        if arrived >= s.max_nodes:
            # Full by the count: one node reads the join keys now (N arriving at once may
            # each count N), and one again for each higher count (a member of the last
            # round the round waits for, arriving after newcomers).
            key = f"{p}r{n}/full"
            seen = store.get(key)
            if seen is None or (seen.isdigit() and int(seen) < arrived):
                full = store.compare_set(key, seen, str(arrived))[0]
        # One node takes the lead (the others, when their wait times out: a leader
        # that died lets its key expire).
        return _Forming(n, arrived=arrived, full=full, leads=self._lead(n))

    def _lead(self, n: int) -> bool:
        """Take the lead of forming round n, unless a live node has it."""
        key = f"{self._p}r{n}/lead"
        took, _ = self._store.compare_set(key, None, self.node_id, ttl=self._s.heartbeat_timeout)
        if took:
            self._lead_key = key
        return took

    def _form(self, n: int, forming: _Forming, timed_out: bool) -> None:
        """As the leader of forming round n: complete it once it is full (``max_nodes``
        joined, every live member of the last round among them), or at the last call
        (``last_call_timeout`` after ``min_nodes`` arrived). Reading every join key is
        O(N): done once each time the round could complete, not on each arrival."""
        s, p, store = self._s, self._p, self._store
        now = self._clock()
        arrived = count_keys(store, f"{p}r{n}/join/")
        forming.arrived = max(forming.arrived, arrived)
        if forming.last_call is None and arrived >= s.min_nodes and arrived > forming.checked:
            forming.last_call = now + s.last_call_timeout
        call = forming.last_call
        at_last_call = call is not None and now >= call
        if not (
            timed_out
            or (arrived >= s.max_nodes and arrived > forming.checked)  # full, by the count
            or (call is not None and forming.looked < call <= now)  # (once at the call)
            or (forming.look_at is not None and now >= forming.look_at)
        ):
            return
        forming.checked, forming.looked = arrived, now
        # Not complete after this look: look again a heartbeat later, when the keys of
        # nodes that came and went (or whose heartbeat was late) have settled.
        forming.look_at = now + s.heartbeat_interval
        joined, version = self._joined(n)
        forming.arrived = len(joined)
        if len(joined) < s.min_nodes:
            forming.last_call = None  # some have died since they came: wait for more
            return
        if forming.last_call is None:
            forming.last_call = now + s.last_call_timeout
        earlier = self._record_of(n - 1)
        before = {str(m[0]) for m in earlier or ()}
        # Live members of the previous round keep their places before newcomers
        # (standbys): the round waits for them, last call aside.
        missing = [m for m in before if m not in joined]
        alive = store.multi_get([p + "alive/" + m for m in missing]) if missing else []
        awaited = [m for m, a in zip(missing, alive, strict=True) if a is not None]
        ready = (len(joined) >= s.max_nodes and not awaited) or at_last_call
        if not ready:
            return
        if not self._quorum(joined, earlier):
            if n not in self._no_quorum:
                self._no_quorum[n] = len(before)
                log.warning(
                    "round %d waits for a majority of the last round's %d nodes "
                    "(%d here): a side cut off with fewer never goes on",
                    n,
                    len(before),
                    len(joined),
                )
            return
        chosen = sorted(joined, key=lambda k: (k not in before, self._order_key(k, joined[k])))[
            : s.max_nodes
        ]
        order = sorted(chosen, key=lambda k: self._order_key(k, joined[k]))
        record = [
            [
                k,
                joined[k]["role"],
                joined[k]["nproc"],
                joined[k].get("addr"),
                joined[k].get("failover"),
            ]
            for k in order
        ]
        attempt = uuid.uuid4().hex[:8]
        # The seats and the full record first, under this attempt's name: only the
        # attempt whose summary wins the compare-and-set below counts.
        seats = {f"{p}r{n}/seat/{attempt}/{k}": str(i) for i, k in enumerate(order)}
        seats[f"{p}r{n}/record/{attempt}"] = json.dumps(record)
        store.multi_set(seats)
        summary = RoundSummary(
            attempt=attempt,
            size=len(record),
            roles=RoundSummary.runs(record),
            version=version,
            candidates=_candidates(record),
            monitors=tuple(str(m[0]) for m in _spread(record)),
        )
        store.compare_set(f"{p}r{n}/done", None, summary.to_json())

    def _joined(self, n: int) -> tuple[dict[str, dict[str, Any]], int]:
        """The live announcements in round n (node id -> record), and the store's version
        when they were read."""
        found, version = self._store.scan(f"{self._p}r{n}/join/")
        out = {}
        for k, v in found.items():
            announced = join_record(v)
            if announced is None:  # not one this protocol writes: that node is not in
                self._protocol_error(f"ignoring the malformed join record {k}: {v[:80]!r}")
                continue
            out[k.rsplit("/", 1)[1]] = announced
        return out, version

    def _record_of(self, n: int) -> list[list[Any]] | None:
        """The full record of completed round ``n`` (``None`` when the store does not hold
        it, or it is garbage)."""
        if n < 0:
            return None
        value = self._store.get(f"{self._p}r{n}/done")
        if value is None:
            return None
        try:
            return self._full_record(n, done_summary(n, value))
        except CorruptKey as exc:
            self._protocol_error(str(exc))
            return None

    def _full_record(self, n: int, summary: RoundSummary) -> list[list[Any]]:
        """Round ``n``'s full record: [node id, role, workers, address, failover port] in
        group-rank order (O(N): read only by those who need it)."""
        if summary.record is not None:
            return [list(m) for m in summary.record]
        cached = self._records.get((n, summary.attempt))
        if cached is not None:
            return cached
        key = f"{self._p}r{n}/record/{summary.attempt}"
        value = self._store.get(key)
        if value is None:
            raise CorruptKey(f"the key {key!r} is missing")
        record = done_record(n, value)
        self._records = {(n, summary.attempt): record}  # the last one only
        return record

    def _member_ids(self, n: int, summary: RoundSummary) -> list[str]:
        """Round ``n``'s members, in group-rank order."""
        return [str(m[0]) for m in self._full_record(n, summary)]

    def _seat(self, n: int, summary: RoundSummary) -> int | None:
        """This node's group rank in completed round ``n`` (``None``: not a member)."""
        if summary.record is not None:
            members = [str(m[0]) for m in summary.record]
            return members.index(self.node_id) if self.node_id in members else None
        value = self._store.get(f"{self._p}r{n}/seat/{summary.attempt}/{self.node_id}")
        return seat_of(value, summary.size)

    def _outcome(self, n: int, members: list[str], found: dict[str, str]) -> str | None:
        """For a node outside round ``n`` (``members``), from the job's keys ``found``:
        ``"finished"`` when the job is marked so, or when each member finished or is gone
        (what the exit barrier calls finished), one at least finished; ``"gone"`` when
        every member is gone without finishing (none will re-form the job); else None."""
        p = self._p
        if p + "finished" in found:
            return "finished"
        exits = {k.rsplit("/", 1)[1] for k in found if k.startswith(f"{p}r{n}/exit/")}
        finished = [m for m in members if m in exits]
        gone = [m for m in members if m not in exits and p + "alive/" + m not in found]
        if len(finished) + len(gone) < len(members):
            return None
        return "finished" if finished else "gone"

    def progress(self) -> str | None:
        """What this node waits for in a rendezvous now, for status displays (``None``
        when it is not waiting); safe to call from another thread."""
        progress = self._progress
        if progress is None:
            return None
        arrived, lo, hi, deadline, last_call = progress
        now = self._clock()
        if arrived == _STANDBY:
            return (
                f"standby: the job runs on {hi} of {hi} nodes; this node takes the place "
                "of one that is lost"
            )
        if arrived == _OUTSIDE:
            return f"a round is under way without this node; {deadline - now:.0f} s left to join"
        if arrived < lo:
            return (
                f"waiting for {lo - arrived} more node(s) ({arrived} of {lo}), "
                f"{max(0.0, deadline - now):.0f} s left"
            )
        if last_call is not None and arrived < hi:
            return (
                f"{arrived} node(s) in, up to {hi} welcome: starting in "
                f"{max(0.0, last_call - now):.0f} s"
            )
        return f"{arrived} node(s) in: starting"

    @staticmethod
    def _order_key(node_id: str, record: dict[str, Any]) -> tuple[int, str]:
        """Group ranks: by ``node_rank`` when given (static), then by node id (host name
        first), which needs no shared counter for every joiner to contend on."""
        rank = record.get("node_rank")
        return (int(rank) if rank is not None else 0, node_id)

    def _local_addr(self) -> str:
        """What this node would advertise as MASTER_ADDR: ``local_addr``, or its answer."""
        if isinstance(self._addr, str):
            return self._addr
        if self._found_addr is None:
            self._found_addr = self._addr()
        return self._found_addr

    def _complete(self, n: int, summary: RoundSummary, group_rank: int) -> RendezvousInfo:
        """This node is in completed round ``n`` at ``group_rank``; ``summary`` gives the
        round's nodes (all a node needs, in two small reads: the summary and its seat).

        Group rank 0 publishes MASTER_ADDR: ``local_addr`` when it is a string (as
        given: ``rdzv.master_addr``, else ``rdzv.local_addr``); else the address it joined
        with, unless that is a loopback address while another member's is not (the store's
        host reaching its own store over loopback): then its address towards that member.
        And MASTER_PORT: ``rdzv.master_port`` as given, else a port free there now. Every
        member reads both back, so a node whose own config differs still agrees."""
        p, store = self._p, self._store
        self._drop_lead()
        nodes = tuple(
            NodeInfo(role, nproc) for role, nproc, count in summary.roles for _ in range(count)
        )
        master_key = f"{p}r{n}/master"
        # Group rank 0 and the candidates to host the store read the full record (O(N),
        # a few nodes); the others never do.
        candidate = any(c[0] == self.node_id for c in summary.candidates)
        record = self._full_record(n, summary) if group_rank == 0 or candidate else None
        if group_rank == 0:
            assert record is not None
            if isinstance(self._addr, str):
                addr = self._addr
            else:
                addrs = [str(m[3]) if len(m) > 3 and m[3] else "" for m in record]
                addr = reachable_address(
                    addrs[0] or self._local_addr(), [a for a in addrs[1:] if a]
                )
            pinned = self._s.master_port
            port = find_free_port(addr) if pinned is None else pinned_port(pinned)
            store.set(master_key, json.dumps([addr, port]))
            store.delete_prefix(f"{p}r{n - 2}/")  # keep the store small over many rounds
        master, restarts_value = store.multi_get([master_key, p + "restarts"])
        if master is None:  # group rank 0 has not written it yet
            store.wait([master_key], timeout=self._s.join_timeout)
            master, restarts_value = store.multi_get([master_key, p + "restarts"])
        addr, port = master_record(master_key, master)
        restarts = count_of(restarts_value)
        with self._lock:
            last, self._leaving = self._watching_round, None
            self._round, self._summary = n, summary
            self._record, self._restarts_seen = record, restarts
        self._tell_lease()
        self._set_waiting(False)
        if last is not None and last != n:
            # This node's watcher is still blocked on round ``last`` (its join key had
            # expired, so dropping it woke nobody): ring there to move it on.
            self._ring(last)
        self._start_watcher()
        return RendezvousInfo(n, group_rank, nodes, addr, port, restart_count=restarts)

    def _timeout_error(self, n: int) -> RendezvousTimeoutError:
        try:
            joined = len(self._store.scan(f"{self._p}r{n}/join/")[0])
        except StoreError:
            joined = -1
        want = (
            str(self._s.min_nodes)
            if self._s.min_nodes == self._s.max_nodes
            else f"{self._s.min_nodes}..{self._s.max_nodes}"
        )
        if n in self._no_quorum:
            want = f"a majority of the last round's {self._no_quorum[n]}"
        return RendezvousTimeoutError(
            f"rendezvous timed out after {self._s.join_timeout:g} s (rdzv.join_timeout): "
            f"{joined} of {want} nodes arrived at {self.backend} store {self._endpoint} "
            f"(run id {self._s.run_id})"
        )

    # -- background threads -------------------------------------------------------------

    def _ring(self, n: int | None, value: str | None = None) -> None:
        """Wake the watchers of round ``n``'s members (they wait on its join keys); a
        ``value`` starting with ``why:`` tells them why the round re-forms."""
        if n is not None:
            self._store.set(f"{self._p}r{n}/joinbell", value or self.node_id)

    def _drop_join_key(self) -> None:
        """Stop announcing this node in its round (and delete the key: the round's
        watchers wake)."""
        with self._beat_lock:
            joined, self._join_key = self._join_key, None
        if joined is not None:
            self._store.delete(joined[0])

    def _drop_lead(self) -> None:
        lead, self._lead_key = self._lead_key, None
        if lead is not None:
            self._store.delete(lead)

    def _set_waiting(self, waiting: bool, outside: tuple[int, RoundSummary] | None = None) -> None:
        """Announce (or stop announcing) that this node waits to join; when round ``n``
        runs below ``max_nodes`` (``outside``), its members' watchers are woken to let it
        in."""
        if waiting != self._waiting:
            self._waiting = waiting
            key = self._p + "waiting/" + self.node_id
            if waiting:
                self._store.set(key, "1", ttl=self._s.heartbeat_timeout)
                if outside is not None and outside[1].size < self._s.max_nodes:
                    self._ring(outside[0])
            else:
                self._store.delete(key)

    def _start_heartbeat(self) -> None:
        if self._heartbeat is None:
            self._heartbeat = threading.Thread(
                target=self._beat, name="rdzv-heartbeat", daemon=True
            )
            self._heartbeat.start()

    def _beat(self) -> None:
        """Refresh this node's liveness (and waiting, join and lead) keys every
        heartbeat_interval. The lease follows the send time of each refresh that found
        the liveness key alive; one that found it expired means the others may have
        re-formed without this node: the lease lapses until the next round (the agent
        fences its workers)."""
        ttl = self._s.heartbeat_timeout
        alive = self._p + "alive/" + self.node_id
        out = self._p + "out/" + self.node_id
        while not self._stop.wait(self._s.heartbeat_interval):
            try:
                if self._out is not None:  # sitting out: only the out key lives
                    if not self._store.refresh(out, ttl):
                        with self._beat_lock:
                            if self._out is not None:
                                self._store.set(out, self._out, ttl=ttl)
                    continue
                waiting = self._p + "waiting/" + self.node_id if self._waiting else None
                joined, lead = self._join_key, self._lead_key
                keys = [k for k in (alive, waiting, joined and joined[0], lead) if k]
                sent, gen = self._clock(), self._lease_gen
                found = dict(zip(keys, refresh_keys(self._store, keys, ttl), strict=True))
                if found[alive]:
                    if self._lease_until is not None and gen == self._lease_gen:
                        self._lease_until = sent + self._lease_span
                        self._tell_lease()
                else:
                    if self._round is not None and gen == self._lease_gen:
                        self._lease_until = None
                        self._tell_lease()
                        log.error(
                            "this node's liveness key had expired at the store at %s "
                            "(no heartbeat got through for %g s): the other nodes may "
                            "have re-formed without it",
                            self._endpoint,
                            ttl,
                        )
                    with self._beat_lock:
                        if self._out is None:  # not stepped out meanwhile
                            self._store.set(alive, "1", ttl=ttl)  # announce again
                if waiting is not None and not found[waiting]:
                    with self._beat_lock:
                        if self._out is None:
                            self._store.set(waiting, "1", ttl=ttl)
                if joined is not None and not found[joined[0]]:
                    with self._beat_lock:
                        if self._join_key == joined:  # not dropped meanwhile
                            self._store.set(joined[0], joined[1], ttl=ttl)
                if lead is not None and not found[lead]:
                    self._lead_key = None  # lapsed: another node may lead now
            except Exception as exc:  # never let the heartbeat thread die
                log.warning("heartbeat to %s failed: %s", self._endpoint, exc)

    def _start_watcher(self) -> None:
        if self._watcher is None:
            self._watcher = threading.Thread(target=self._watch, name="rdzv-watcher", daemon=True)
            self._watcher.start()

    @property
    def _watch_timeout(self) -> float:
        """How long one watch waits before asking again (nothing depends on it: changes
        wake it, and asking again from the same version misses none)."""
        return max(5.0, self._s.heartbeat_timeout)

    def _watch(self) -> None:
        """Call the membership callback once per round when the round must re-form.

        It waits on the round's join keys alone: each member's is a TTL key its heartbeat
        refreshes, so a member lost, leaving or stepping out deletes one; a node that
        fails the job, starts the next round or waits to join while the round runs below
        ``max_nodes`` rings the round's bell (``r<n>/joinbell``). Nothing else wakes it:
        a round of N nodes costs each watcher O(1) while it runs, and only a change that
        re-forms the round costs it a read of the job (O(N)). A store that cannot be
        reached is waited for up to ``heartbeat_timeout`` (an etcd restart must not
        restart healthy workers); after that the round re-forms, and ``next_round``
        reports the error if the store stays away."""
        notified: int | None = None
        lost_since: float | None = None
        watching: tuple[int, int] | None = None  # (round, store version) waited on
        look = False
        while not self._stop.is_set():
            with self._lock:
                n, summary = self._round, self._summary
                quiet = self._leaving == n or self._exiting == n
                if n is not None and summary is not None and (watching or (-1,))[0] != n:
                    # a new round: its completer saw every member's join key alive at
                    # summary.version (a summary from before versions: look now)
                    watching, look = (n, summary.version), summary.version == 0
                # Done with this round (leaving it, in its exit barrier, or it re-forms
                # already): nothing to watch until the next. Waiting on its keys
                # instead woke each of N watchers at each of the N join keys going as
                # the round re-forms: N² wake-ups (3,754 etcd watches to re-form 128
                # nodes).
                idle = watching is None or watching[0] != n or quiet or notified == n
                self._watching_round = None if idle else n
            try:
                if idle:
                    self._stop.wait(0.05)
                    continue
                assert watching is not None and n is not None and summary is not None
                if look:
                    why, version = self._look(n, summary)
                    watching = (n, version)
                    if why is not None:
                        notified = n
                        log.warning("%s: the job re-forms", why)
                        self._notify(n)
                        continue
                lost_since = None
                w, version = watching
                watching = (w, self._store.wait_for_change(
                    f"{self._p}r{w}/join", version, self._watch_timeout
                ))  # fmt: skip
                look = True
            except StoreTimeoutError:
                look = False  # nothing changed: nothing to look at
                continue
            except Exception as exc:  # StoreError, or a client bug: the watcher must not die
                if self._stop.is_set():
                    return
                look = True
                now = self._clock()
                lost_since = lost_since or now
                if now - lost_since < self._s.heartbeat_timeout:
                    log.warning(
                        "rendezvous store at %s unreachable, retrying: %s", self._endpoint, exc
                    )
                    self._stop.wait(min(0.5, self._s.heartbeat_interval))
                    continue
                log.error("lost the rendezvous store at %s: %s", self._endpoint, exc)
                if n is not None and n != notified:
                    notified = n
                    self._notify(n)  # next_round will report the error
                self._stop.wait(1.0)

    def _protocol_error(self, what: str) -> None:
        """A key that holds what this protocol never writes there: logged once each."""
        if what not in self._protocol_errors:
            self._protocol_errors.add(what)
            log.warning("rendezvous store at %s: %s", self._endpoint, what)

    def _notify(self, n: int) -> None:
        """The callback, unless the agent has moved past round ``n`` meanwhile (a stale
        notification would make it leave the round it just joined)."""
        with self._lock:
            if self._round == n and self._callback:
                self._callback()

    def _look(self, n: int, summary: RoundSummary) -> tuple[str | None, int]:
        """Why round ``n`` must re-form (``None``: it need not), and the store's version
        before it looked. What costs O(1) first (the job failed, the next round started,
        the bell says why, nodes wait to join); for a member's join key gone, only the
        first of the round's monitors still running reads the job (O(N)) and rings the
        bell with what it found: one node pays for a lost member, not every node."""
        p, store = self._p, self._store
        found, version = store.scan(p + "round")  # the version first
        failed, bell = store.multi_get([p + "failed", f"{p}r{n}/joinbell"])
        if (over := self._over(n, failed, found.get(p + "round"))) is not None:
            return over, version
        if bell is not None and bell.startswith(_REASON):
            return bell[len(_REASON) :], version
        if summary.size < self._s.max_nodes and not count_keys(store, f"{p}r{n}/exit/"):
            waiting = len(store.scan(p + "waiting/")[0])
            if waiting:
                return (
                    f"{waiting} node(s) waiting to join (up to {self._s.max_nodes} welcome)",
                    version,
                )
        if summary.monitors:
            keys = [f"{p}r{n}/{kind}/{m}" for m in summary.monitors for kind in ("join", "exit")]
            values = store.multi_get(keys)
            running = [
                m
                for i, m in enumerate(summary.monitors)
                if values[2 * i] is not None and values[2 * i + 1] is None
            ]
            if running and running[0] != self.node_id:
                return None, version  # that monitor looks, and rings the bell
        found, version = store.scan(p)
        why = self._regroup(n, self._member_ids(n, summary), found)
        if why is not None and summary.monitors:
            self._ring(n, _REASON + why)
        return why, version

    def _over(self, n: int, failed: str | None, current: str | None) -> str | None:
        """Why round ``n`` is over, from the ``failed`` and ``round`` keys: the job failed,
        or another node started the next round (``None``: neither)."""
        if failed:
            return f"the job failed on another node ({failed})"
        try:
            started = round_of(current, n)
        except CorruptKey as exc:  # go on: lost nodes must still be noticed
            self._protocol_error(str(exc))
            started = n
        return None if started == n else f"another node started round {started}"

    def _regroup(self, n: int, members: list[str], found: dict[str, str]) -> str | None:
        """Why round ``n`` (with ``members``) must re-form, as seen in the store's keys
        ``found``, or ``None`` when it need not."""
        p = self._p
        if (over := self._over(n, found.get(p + "failed"), found.get(p + "round"))) is not None:
            return over
        finished = {k.rsplit("/", 1)[1] for k in found if k.startswith(f"{p}r{n}/exit/")}
        for m in members:
            if m not in finished and p + "alive/" + m not in found:
                return self._gone(m, found)
        waiting = sum(k.startswith(p + "waiting/") for k in found)
        if waiting and len(members) < self._s.max_nodes and not finished:
            return f"{waiting} node(s) waiting to join (up to {self._s.max_nodes} welcome)"
        return None

    def _gone(self, member: str, found: dict[str, str]) -> str:
        """How ``member``, whose liveness key is gone, left: on purpose or lost."""
        if (out := found.get(self._p + "out/" + member)) is not None:
            return f"node {member} stepped out of the job ({out})"
        reason = found.get(self._p + "left/" + member)
        if reason is not None:
            return f"node {member} left the job ({reason})"
        return (
            f"node {member} was lost: its liveness key expired, no heartbeat for "
            f"rdzv.heartbeat_timeout={self._s.heartbeat_timeout:g} s"
        )
