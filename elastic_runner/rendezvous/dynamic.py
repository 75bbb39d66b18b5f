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
    round/bell            rung when the job fails or finishes, to wake the nodes outside
                          the round (they wait on the keys under "round")

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
the round has fewer than ``max_nodes``, or when a member's liveness key expires
(:mod:`~elastic_runner.rendezvous.watching`); a node that finishes normally passes the
exit barrier and leaves without closing anything for the others
(:mod:`~elastic_runner.rendezvous.exiting`); a node excluded for failing
(:mod:`elastic_runner.exclusion`) steps out, and after its cooldown joins as a newcomer
(:mod:`~elastic_runner.rendezvous.failures`).

With ``failover`` (the agent-hosted TCP store), a node that finds the store gone moves it
to the first member of its last round that answers (:mod:`~elastic_runner.rendezvous.
failover`; each join record carries the port a node would serve at), carrying the round
number and the restart count over to the empty store. Then, and whenever the last round
had three members or more, a round completes only with a strict majority of the last
round's members that did not leave on purpose: a partition never leaves two live worlds.

The handler here owns the protocol's parts, each in a module of its own with the handler
as its host (a ``Protocol`` of the state they share, read at each use: a move replaces the
store): :mod:`~elastic_runner.rendezvous.forming` (forming a round, reading round
records), :mod:`~elastic_runner.rendezvous.watching` and
:mod:`~elastic_runner.rendezvous.heartbeat` (its threads),
:mod:`~elastic_runner.rendezvous.reaching` (the store, and moving it),
:mod:`~elastic_runner.rendezvous.exiting` and :mod:`~elastic_runner.rendezvous.failures`.
The keys are listed here only. It is the protocol only, with no Hydra or OmegaConf
behind it: turning a backend's ``rdzv.*`` config into one is
:mod:`elastic_runner.rendezvous.kit`'s job.
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
from typing import Any

from elastic_runner.rendezvous.api import (
    NodeInfo,
    RendezvousError,
    RendezvousGracefulExitError,
    RendezvousInfo,
)
from elastic_runner.rendezvous.exiting import Exiting
from elastic_runner.rendezvous.failover import StoreFailover
from elastic_runner.rendezvous.failures import Failures
from elastic_runner.rendezvous.forming import (
    OUTSIDE,
    STANDBY,
    Forming,
    Progress,
    Rounds,
    describe_progress,
)
from elastic_runner.rendezvous.heartbeat import Heartbeat
from elastic_runner.rendezvous.network import find_free_port, pinned_port, reachable_address
from elastic_runner.rendezvous.reaching import StoreReach
from elastic_runner.rendezvous.records import (
    RoundSummary,
    count_of,
    done_summary,
    master_record,
    round_of,
)
from elastic_runner.rendezvous.settings import RendezvousSettings
from elastic_runner.rendezvous.store import Store, StoreError, StoreTimeoutError, set_tied
from elastic_runner.rendezvous.watching import MembershipWatcher

__all__ = ["DynamicRendezvous", "RendezvousSettings"]

log = logging.getLogger(__name__)


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
        #: The round whose keys the watcher may be blocked on at the store (``None``
        #: while it has nothing to watch): a node whose next round completes while
        #: its watcher is still there rings that round's bell to move it on.
        self._watching_round: int | None = None
        self._clock = clock
        self.node_id = f"{socket.gethostname()}_{os.getpid()}_{uuid.uuid4().hex[:6]}"
        self._p = f"rdzv/{settings.run_id}/"
        self._round: int | None = None
        #: What this node waits for while in next_round.
        self._progress: Progress | None = None
        self._callback: Callable[[], None] | None = None
        #: Set when this node leaves (``leave``) or shuts down: waits and threads end.
        self._stop = threading.Event()
        #: Set when this node's round completes or it stops: wakes its watcher if idle.
        self._round_moved = threading.Event()
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
        # The parts of the protocol, each with this handler as its host: they read its
        # state (the store above all, which a failover replaces) at each use.
        #: Forming a round, and completed rounds' records.
        self._rounds = Rounds(self)
        #: The bodies of the watcher and heartbeat threads, and the way out of the job.
        self._watch = MembershipWatcher(self, self._rounds)
        self._beat = Heartbeat(self)
        self._exit = Exiting(self, self._rounds, self._watch)
        #: Reaching the store at each round, and moving it when it is gone.
        self._reach = StoreReach(self)
        #: Failure reports, the job's failure, and stepping out after an exclusion.
        self._failures = Failures(self)

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
        return self._exit.exit_barrier()

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
        self._round_moved.set()
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
        self._failures.fail_job(reason)

    def report_failure(self, at: float) -> None:
        """This node's workers failed in the current round, first at wall-clock time
        ``at`` (one key per node; ``root_cause`` compares them)."""
        self._failures.report_failure(at)

    def root_cause(self) -> bool:
        """This node reported the current round's earliest failure (ties: the lowest
        node id)."""
        return self._failures.root_cause()

    def step_out(self, reason: str, failed: bool) -> bool:
        """Leave the current round for a while (excluded: ``reason``), unless fewer than
        ``min_nodes`` would be left, standbys and waiting nodes counted (then False).
        ``failed`` counts the round's failure restart, as ``next_round`` would."""
        return self._failures.step_out(reason, failed)

    def sit_out(self, until: float) -> None:
        """Wait outside the job until the clock reads ``until``; the job's end ends the
        wait (finished: :class:`RendezvousGracefulExitError`; failed, or this node
        leaving: :class:`RendezvousError`)."""
        self._failures.sit_out(until)

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
        self._round_moved.set()
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
                self._exit.linger()
            if not self._exit.others()[0]:
                self._store.delete_prefix(self._p)  # the last node out removes the job's keys

        if self._lease_gen == 0:
            pass  # the store was never reached: nothing of this node's is there to remove
        elif self._left is None:
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

        late = threading.Event()

        def run() -> None:
            try:
                work()
            except StoreError as exc:
                if not late.is_set():  # else said below; the store's close ended it
                    log.warning("could not %s: %s", what, exc)

        thread = threading.Thread(target=run, name="rdzv-leave", daemon=True)
        thread.start()
        thread.join(seconds)
        if thread.is_alive():
            late.set()
            log.warning("could not %s within %g s (store at %s)", what, seconds, self._endpoint)

    # -- the protocol -------------------------------------------------------------------

    def _next_round(self, node: NodeInfo, failed: bool) -> RendezvousInfo:
        s, p = self._s, self._p
        self._reach.reach(self._clock() + s.join_timeout)
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
        forming = Forming(-1)
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
                rank = self._rounds.seat(n, summary)
                if rank is not None:
                    self._progress = None
                    return self._complete(n, summary, rank)
                if forming.n == n:  # joined, but the round completed without this node
                    self._drop_join_key()
                    self._drop_lead()
                self._set_waiting(True, (n, summary))  # the round is under way without us
                outcome = None
                # Whether the job finished, or lost every member, is read from all of its
                # keys (O(N)): only when a few members say it may be so. Reading them on
                # every change of the job (waiting on all of its keys) cost each node
                # outside a round of 4,096 a 1 MB read per change while it re-formed:
                # 41 such nodes kept the store busy, its answers 15 s late.
                if self._exit.may_be_over(n, summary):
                    found, _ = store.scan(p)
                    if round_of(found.get(p + "round"), n) != n:
                        continue  # moved on meanwhile
                    outcome = self._exit.outcome(n, self._rounds.member_ids(n, summary), found)
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
                    self._progress = (STANDBY, s.min_nodes, s.max_nodes, deadline, None)
                else:
                    self._progress = (OUTSIDE, s.min_nodes, s.max_nodes, deadline, None)
                # The round key and the bell beside it (rung when the job fails or
                # finishes) wake this node at once; members lost are looked for once a
                # heartbeat.
                watched, longest = p + "round", s.heartbeat_interval
            else:
                self._set_waiting(False)
                if standby_for is not None:  # a round that may need this node: join it
                    standby_for = None
                    deadline = self._clock() + s.join_timeout
                if forming.n != n:
                    forming = self._rounds.announce(n, self._announcement(node))
                elif not forming.leads and timed_out:
                    # the leader may be gone (its key expires with it): lead instead
                    forming.leads = self._rounds.lead(n)
                if forming.leads or (forming.full and forming.checked == 0):
                    self._rounds.form(n, forming, timed_out)
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
                watched, longest = f"{p}r{n}/done", s.heartbeat_timeout
            left = deadline - self._clock()
            if left <= 0:
                raise self._rounds.timeout_error(n)
            wait = min(left, longest)
            if done is None and forming.leads:
                for when in (forming.last_call, forming.look_at):
                    if when is not None:
                        wait = min(wait, max(0.001, when - self._clock()))
            try:
                store.wait_for_change(watched, version, wait)
                timed_out = False
            except StoreTimeoutError:
                timed_out = wait >= s.heartbeat_timeout

    def _announcement(self, node: NodeInfo) -> dict[str, Any]:
        """This node's join record: its role, workers and the addresses it would serve
        at."""
        return {
            "role": node.role,
            "nproc": node.local_world_size,
            "node_rank": self._s.node_rank,
            # what this node would advertise as MASTER_ADDR (see _complete)
            "addr": self._local_addr(),
            # where it would serve the store if the host dies
            "failover": self._failover.port if self._failover is not None else None,
        }

    def progress(self) -> str | None:
        """What this node waits for in a rendezvous now, for status displays (``None``
        when it is not waiting); safe to call from another thread."""
        progress = self._progress
        return None if progress is None else describe_progress(progress, self._clock())

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
        # One (frozen) NodeInfo per run of alike nodes, repeated: building one per node
        # cost every node O(N) object creations, 4,096 nodes in one benchmark process
        # O(N²) (about a third of its CPU while a 4,096-node round formed).
        nodes = tuple(
            info
            for role, nproc, count in summary.roles
            for info in (NodeInfo(role, nproc),) * count
        )
        master_key = f"{p}r{n}/master"
        # Group rank 0 and the candidates to host the store read the full record (O(N),
        # a few nodes); the others never do.
        candidate = any(c[0] == self.node_id for c in summary.candidates)
        record = self._rounds.full_record(n, summary) if group_rank == 0 or candidate else None
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
        else:
            # Group rank 0 writes it once it too has woken and read the record: most
            # members get here first, and waiting first costs them two requests, not
            # three (a read, the wait, a read again).
            store.wait([master_key], timeout=self._s.join_timeout)
        master, restarts_value = store.multi_get([master_key, p + "restarts"])
        addr, port = master_record(master_key, master)
        restarts = count_of(restarts_value)
        with self._lock:
            last, self._leaving = self._watching_round, None
            self._round, self._summary = n, summary
            self._record, self._restarts_seen = record, restarts
        self._round_moved.set()  # (after the round's state: the watcher reads it next)
        self._tell_lease()
        self._set_waiting(False)
        if last is not None and last != n:
            # This node's watcher is still blocked on round ``last`` (its join key had
            # expired, so dropping it woke nobody): ring there to move it on.
            self._ring(last)
        self._start_watcher()
        return RendezvousInfo(n, group_rank, nodes, addr, port, restart_count=restarts)

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
                alive = self._p + "alive/" + self.node_id
                set_tied(self._store, key, "1", alive, self._s.heartbeat_timeout)
                if outside is not None and outside[1].size < self._s.max_nodes:
                    self._ring(outside[0])
            else:
                self._store.delete(key)

    def _start_heartbeat(self) -> None:
        if self._heartbeat is None:
            self._heartbeat = threading.Thread(
                target=self._beat.run, name="rdzv-heartbeat", daemon=True
            )
            self._heartbeat.start()

    def _start_watcher(self) -> None:
        if self._watcher is None:
            self._watcher = threading.Thread(
                target=self._watch.run, name="rdzv-watcher", daemon=True
            )
            self._watcher.start()

    def _protocol_error(self, what: str) -> None:
        """A key that holds what this protocol never writes there: logged once each."""
        if what not in self._protocol_errors:
            self._protocol_errors.add(what)
            log.warning("rendezvous store at %s: %s", self._endpoint, what)
