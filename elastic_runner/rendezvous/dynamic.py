"""Dynamic rendezvous on any :class:`~elastic_runner.rendezvous.store.Store`.

Every state change is a small per-node key or one compare-and-set; nothing rewrites a
shared blob, and a heartbeat only refreshes the node's own key (a TTL key, so a dead
node's key expires by itself). Waiting is notified by the store. Keys, under
``rdzv/<run id>/``::

    round                 the current round number
    r<n>/join/<node>      a node's announcement in round n (role, workers, join order)
    r<n>/done             the completed round: node ids in group-rank order (one CAS)
    r<n>/master           MASTER_ADDR/PORT, written by group rank 0
    r<n>/failed           set once when round n ended in a failure (counts one restart)
    r<n>/exit/<node>      the exit barrier
    alive/<node>          liveness (TTL = heartbeat_timeout)
    waiting/<node>        a node that found the round complete and waits for the next
    restarts              failure restarts of the whole job (TORCHELASTIC_RESTART_COUNT)
    failed                the job failed for good (why), so nodes stop re-forming

A round completes at once when ``max_nodes`` have joined, or ``last_call_timeout``
after ``min_nodes`` had. A running node regroups (a new round, no restart spent) when a
node waits to join while the round has fewer than ``max_nodes``, or when a member's
liveness key expires; a node that finishes normally passes the exit barrier and leaves
without closing anything for the others.

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
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from elastic_runner.rendezvous.api import (
    NodeInfo,
    RendezvousError,
    RendezvousInfo,
    RendezvousTimeoutError,
)
from elastic_runner.rendezvous.network import find_free_port
from elastic_runner.rendezvous.store import (
    Store,
    StoreError,
    StoreTimeoutError,
    StoreUnavailableError,
)

__all__ = ["DynamicRendezvous", "RendezvousSettings"]

log = logging.getLogger(__name__)


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
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.backend = backend
        self._store = store
        self._s = settings
        self._endpoint = endpoint
        self._addr = local_addr
        self._on_close = on_close
        self._clock = clock
        self.node_id = f"{socket.gethostname()}_{os.getpid()}_{uuid.uuid4().hex[:6]}"
        self._p = f"rdzv/{settings.run_id}/"
        self._round: int | None = None
        #: (arrived or -1, min, max, deadline, last call) while in next_round
        self._progress: tuple[int, int, int, float, float | None] | None = None
        self._members: list[str] = []
        self._callback: Callable[[], None] | None = None
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None
        self._watcher: threading.Thread | None = None
        self._waiting = False
        self._lock = threading.Lock()

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
        n = self._round
        if n is None or len(self._members) <= 1:
            return True
        p = self._p
        prefix = f"{p}r{n}/exit/"
        try:
            self._store.set(prefix + self.node_id, "1")
            deadline = self._clock() + self._s.exit_barrier_timeout
            while True:
                found, version = self._store.scan(p)
                if (
                    int(found.get(p + "round", n)) != n
                    or found.get(f"{p}r{n}/failed")
                    or found.get(p + "failed")
                ):
                    return False
                if sum(k.startswith(prefix) for k in found) >= len(self._members):
                    return True
                left = deadline - self._clock()
                if left <= 0:
                    raise StoreTimeoutError(f"{left:g}")
                self._store.wait_for_change(p, version, left)
        except (StoreTimeoutError, StoreError) as exc:
            log.warning("exit barrier: not every node finished (%s); leaving anyway", exc)
        return True

    def fail_job(self, reason: str) -> None:
        """Tell every node the job failed for good (this node used up the restarts)."""
        try:
            self._store.compare_set(self._p + "failed", None, f"{self.node_id}: {reason}")
        except StoreError as exc:
            log.warning("could not tell the other nodes the job failed: %s", exc)

    def shutdown(self) -> None:
        """Leave the job, then close the store. Only the first call does anything: the
        agent leaves when its loop ends, and the run's assembly step calls it again in
        case the loop never ran (the store is closed by then)."""
        if self._stop.is_set():  # set here only
            return
        self._stop.set()
        if self._heartbeat is not None:
            self._heartbeat.join(timeout=5)
        # The watcher may be inside a long store wait: closing the store below ends it.
        try:
            self._store.delete(self._p + "alive/" + self.node_id)
            self._store.delete(self._p + "waiting/" + self.node_id)
            if self._on_close:
                self._linger()
            if not self._store.scan(self._p + "alive/")[0]:
                self._store.delete_prefix(self._p)  # the last node out removes the job's keys
        except StoreError:
            pass
        self._store.close()
        if self._on_close:
            self._on_close()

    def _linger(self) -> None:
        """This node hosts the store, which must outlive every other node of the job: wait
        until each has left (its liveness key deleted, or expired if it died)."""
        prefix = self._p + "alive/"
        said = False
        limit = self._s.close_timeout
        deadline = None if limit is None else self._clock() + limit
        while True:
            others, version = self._store.scan(prefix)
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
            with contextlib.suppress(StoreTimeoutError):
                self._store.wait_for_change(prefix, version, 2 * self._s.heartbeat_timeout)

    # -- the protocol -------------------------------------------------------------------

    def _reach_store(self, deadline: float) -> None:
        """Announce this node, waiting for an unavailable store until ``deadline`` (it
        may start after us, or be restarting); then, or on any other error, raise."""
        delay = 0.05
        while True:
            try:
                self._store.set(
                    self._p + "alive/" + self.node_id, "1", ttl=self._s.heartbeat_timeout
                )
                return
            except StoreUnavailableError:
                if self._clock() + delay >= deadline:
                    raise
                self._stop.wait(delay)
                delay = min(delay * 2, 1.0)

    def _next_round(self, node: NodeInfo, failed: bool) -> RendezvousInfo:
        s, p, store = self._s, self._p, self._store
        self._reach_store(self._clock() + s.join_timeout)
        self._start_heartbeat()
        if self._round is not None:  # leave the old round: start the next one
            if failed and store.compare_set(f"{p}r{self._round}/failed", None, self.node_id)[0]:
                store.add(p + "restarts", 1)
            store.compare_set(p + "round", str(self._round), str(self._round + 1))
        store.compare_set(p + "round", None, "0")
        deadline = self._clock() + s.join_timeout
        last_call: float | None = None
        while True:
            # The version first: a change made after it wakes the wait below.
            found, version = store.scan(p + "round")
            n = int(found.get(p + "round", "0"))
            if why := store.get(p + "failed"):
                raise RendezvousError(f"the job failed on another node ({why})")
            done = store.get(f"{p}r{n}/done")
            if done is not None:
                record = json.loads(done)
                if self.node_id in (m[0] for m in record):
                    self._progress = None
                    return self._complete(n, record)
                self._set_waiting(True)  # the round is under way without us
                self._progress = (-1, s.min_nodes, s.max_nodes, deadline, None)
            else:
                self._set_waiting(False)
                joined = self._join(n, node)
                if len(joined) < s.min_nodes:
                    last_call = None
                elif last_call is None:
                    last_call = self._clock() + s.last_call_timeout
                self._progress = (len(joined), s.min_nodes, s.max_nodes, deadline, last_call)
                if len(joined) >= s.max_nodes or (
                    last_call is not None and self._clock() >= last_call
                ):
                    order = sorted(joined, key=lambda k: self._order_key(k, joined[k]))
                    record = [[k, joined[k]["role"], joined[k]["nproc"]] for k in order]
                    store.compare_set(f"{p}r{n}/done", None, json.dumps(record[: s.max_nodes]))
                    continue
            left = deadline - self._clock()
            if left <= 0:
                raise self._timeout_error(n)
            if last_call is not None:
                left = min(left, max(0.001, last_call - self._clock()))
            # Wake only for what this node waits for: its round's completion (whoever sees
            # the round full completes it) or, outside the round, the next round; so N
            # joining nodes cost O(N) wake-ups, not one each per join. Look again at least
            # every heartbeat_timeout (a node that joined may have died).
            watched = f"{p}r{n}/done" if done is None else p + "round"
            with contextlib.suppress(StoreTimeoutError):
                store.wait_for_change(watched, version, min(left, s.heartbeat_timeout))

    def progress(self) -> str | None:
        """What this node waits for in a rendezvous now, for status displays (``None``
        when it is not waiting); safe to call from another thread."""
        progress = self._progress
        if progress is None:
            return None
        arrived, lo, hi, deadline, last_call = progress
        now = self._clock()
        if arrived < 0:
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

    def _join(self, n: int, node: NodeInfo) -> dict[str, dict[str, Any]]:
        """Announce this node in round n (once) and return the live announcements."""
        p, store = self._p, self._store
        key = f"{p}r{n}/join/{self.node_id}"
        if store.get(key) is None:
            record = {
                "role": node.role,
                "nproc": node.local_world_size,
                "node_rank": self._s.node_rank,
            }
            store.set(key, json.dumps(record))
        joined, _ = store.scan(f"{p}r{n}/join/")
        alive, _ = store.scan(p + "alive/")
        out = {}
        for k, v in joined.items():
            node_id = k.rsplit("/", 1)[1]
            if p + "alive/" + node_id in alive:
                out[node_id] = json.loads(v)
        return out

    def _complete(self, n: int, record: list[list[Any]]) -> RendezvousInfo:
        """This node is in completed round ``n``; ``record`` lists [node id, role, workers]
        in group-rank order (all a node needs, in one read)."""
        p, store = self._p, self._store
        members = [str(m[0]) for m in record]
        nodes = tuple(NodeInfo(str(role), int(nproc)) for _, role, nproc in record)
        group_rank = members.index(self.node_id)
        master_key = f"{p}r{n}/master"
        if group_rank == 0:
            addr = self._addr if isinstance(self._addr, str) else self._addr()
            store.set(master_key, json.dumps([addr, find_free_port(addr)]))
            store.delete_prefix(f"{p}r{n - 2}/")  # keep the store small over many rounds
        store.wait([master_key], timeout=self._s.join_timeout)
        master = store.get(master_key)
        assert master is not None
        addr, port = json.loads(master)
        with self._lock:
            self._round, self._members = n, members
        self._set_waiting(False)
        self._start_watcher()
        return RendezvousInfo(
            n, group_rank, nodes, addr, int(port), restart_count=int(store.get(p + "restarts") or 0)
        )

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
        return RendezvousTimeoutError(
            f"rendezvous timed out after {self._s.join_timeout:g} s (rdzv.join_timeout): "
            f"{joined} of {want} nodes arrived at {self.backend} store {self._endpoint} "
            f"(run id {self._s.run_id})"
        )

    # -- background threads -------------------------------------------------------------

    def _set_waiting(self, waiting: bool) -> None:
        if waiting != self._waiting:
            self._waiting = waiting
            key = self._p + "waiting/" + self.node_id
            if waiting:
                self._store.set(key, "1", ttl=self._s.heartbeat_timeout)
            else:
                self._store.delete(key)

    def _start_heartbeat(self) -> None:
        if self._heartbeat is None:
            self._heartbeat = threading.Thread(
                target=self._beat, name="rdzv-heartbeat", daemon=True
            )
            self._heartbeat.start()

    def _beat(self) -> None:
        ttl = self._s.heartbeat_timeout
        while not self._stop.wait(self._s.heartbeat_interval):
            try:
                keys = ["alive/"] + (["waiting/"] if self._waiting else [])
                for key in (self._p + k + self.node_id for k in keys):
                    if not self._store.refresh(key, ttl):  # it expired: announce again
                        self._store.set(key, "1", ttl=ttl)
            except Exception as exc:  # never let the heartbeat thread die
                log.warning("heartbeat to %s failed: %s", self._endpoint, exc)

    def _start_watcher(self) -> None:
        if self._watcher is None:
            self._watcher = threading.Thread(target=self._watch, name="rdzv-watcher", daemon=True)
            self._watcher.start()

    @property
    def _watch_timeout(self) -> float:
        """How long one watch waits before looking again (nothing depends on it: changes
        wake it; it only bounds how stale a missed wake-up could be)."""
        return max(5.0, self._s.heartbeat_timeout)

    def _watch(self) -> None:
        """Call the membership callback once per round when the round must re-form. A
        store that cannot be reached is waited for up to ``heartbeat_timeout`` (an etcd
        restart must not restart healthy workers); after that the round re-forms, and
        ``next_round`` reports the error if the store stays away."""
        notified: int | None = None
        lost_since: float | None = None
        while not self._stop.is_set():
            with self._lock:
                n, members = self._round, list(self._members)
            try:
                found, version = self._store.scan(self._p)
                lost_since = None
                if n is not None and n != notified and self._must_regroup(n, members, found):
                    notified = n
                    self._notify(n)
                self._store.wait_for_change(self._p, version, self._watch_timeout)
            except StoreTimeoutError:
                continue
            except Exception as exc:  # StoreError, or a client bug: the watcher must not die
                if self._stop.is_set():
                    return
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

    def _notify(self, n: int) -> None:
        """The callback, unless the agent has moved past round ``n`` meanwhile (a stale
        notification would make it leave the round it just joined)."""
        with self._lock:
            if self._round == n and self._callback:
                self._callback()

    def _must_regroup(self, n: int, members: list[str], found: dict[str, str]) -> bool:
        p = self._p
        if found.get(p + "failed") or int(found.get(p + "round", n)) != n:
            return True
        finished = {k.rsplit("/", 1)[1] for k in found if k.startswith(f"{p}r{n}/exit/")}
        if any(p + "alive/" + m not in found for m in members if m not in finished):
            return True  # a member died
        waiting = any(k.startswith(p + "waiting/") for k in found)
        return waiting and len(members) < self._s.max_nodes and not finished
