"""Forming a round of the dynamic rendezvous, and reading completed rounds' records.

A node announces itself in round ``n`` with its join key (``r<n>/join/<node>``, a TTL
key the heartbeat refreshes, so that the round's join keys are its live joiners); the
first to come takes the lead (``r<n>/lead``, a TTL key: a leader that dies lets another
take it). The leader, woken on ``r<n>/done`` by the node that brings the round to
``min_nodes`` (``r<n>/done-min``), or the one node that finds it full by the count
(``r<n>/full``), reads every announcement only when the round may be complete, and
completes it in one compare-and-set of its summary (``r<n>/done``), after the seats and
the full record under the attempt's name. The keys are listed in
:mod:`elastic_runner.rendezvous.dynamic`, whose handler owns a :class:`Rounds` and calls
it while in ``next_round``.
"""

from __future__ import annotations

import json
import logging
import threading
import uuid
from dataclasses import dataclass
from typing import Any, Protocol

from elastic_runner.rendezvous.api import RendezvousTimeoutError
from elastic_runner.rendezvous.host import ProtocolHost
from elastic_runner.rendezvous.records import (
    CorruptKey,
    RoundSummary,
    done_record,
    done_summary,
    join_record,
    seat_of,
)
from elastic_runner.rendezvous.store import StoreError, count_keys, set_tied

__all__ = [
    "CANDIDATES",
    "OUTSIDE",
    "STANDBY",
    "Forming",
    "Progress",
    "Rounds",
    "RoundsHost",
    "candidates",
    "describe_progress",
    "spread",
]

# The protocol's one logger, as before its parts had modules of their own: log
# configurations and filters name it.
log = logging.getLogger("elastic_runner.rendezvous.dynamic")

#: How many members of a round may host the store after a move (spread over the group
#: ranks): these read the round's full record (O(N) each) to count a majority; the
#: others follow the first of them that serves.
CANDIDATES = 5


@dataclass
class Forming:
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


def spread(items: list[Any]) -> list[Any]:
    """Up to :data:`CANDIDATES` of ``items``, spread over them, in order."""
    picks = {i * len(items) // CANDIDATES for i in range(CANDIDATES)} & set(range(len(items)))
    return [items[i] for i in sorted(picks)]


def candidates(record: list[list[Any]]) -> tuple[tuple[str, str, int], ...]:
    """Up to :data:`CANDIDATES` members that could host the store (an address and a
    failover port), spread over the round, in group-rank order."""
    able = [m for m in record if len(m) > 4 and m[3] and m[4]]
    return tuple((str(m[0]), str(m[3]), int(m[4])) for m in spread(able))


#: :data:`Progress`'s first field while the round is under way without this node, and
#: while it stands by (the round is complete at ``max_nodes``).
OUTSIDE, STANDBY = -1, -2

#: What a node in ``next_round`` waits for: the nodes arrived (or :data:`OUTSIDE`,
#: :data:`STANDBY`), ``min_nodes``, ``max_nodes``, its deadline and the last call.
Progress = tuple[int, int, int, float, float | None]


def describe_progress(progress: Progress, now: float) -> str:
    """``progress`` at the clock's ``now``, for status displays."""
    arrived, lo, hi, deadline, last_call = progress
    if arrived == STANDBY:
        return (
            f"standby: the job runs on {hi} of {hi} nodes; this node takes the place "
            "of one that is lost"
        )
    if arrived == OUTSIDE:
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


class RoundsHost(ProtocolHost, Protocol):
    """What forming and reading rounds needs of the rendezvous handler: its own
    attributes, read at each use and never copied (the store moves to another node at a
    failover, the settings may be replaced, and the join and lead keys are the
    heartbeat's to refresh too)."""

    #: The backend's name, for messages.
    backend: str
    #: Held while the join key is set (the heartbeat re-announces it under it).
    _beat_lock: threading.Lock
    _join_key: tuple[str, str] | None
    _lead_key: str | None

    def _protocol_error(self, what: str) -> None:
        """Log a key that holds what this protocol never writes there (once each)."""


class Rounds:
    """Round forming and round records for the handler ``host``: the announcement, the
    lead, the leader's look at the join keys, and completed rounds' records and seats
    (the last full record read is cached)."""

    def __init__(self, host: RoundsHost) -> None:
        self._h = host
        #: Rounds formed while this node waited for a majority (each logged once), and
        #: the size of the last round then.
        self.no_quorum: dict[int, int] = {}
        #: The last full record read (round, attempt) -> record.
        self._records: dict[tuple[int, str], list[list[Any]]] = {}

    def announce(self, n: int, record: dict[str, Any]) -> Forming:
        """Announce this node in round n (``record``: its role, workers, addresses): its
        join key (a TTL key the heartbeat refreshes, so that the round's join keys are
        its live joiners), its arrival (a count) and, for the first, the lead."""
        h = self._h
        p, store = h._p, h._store
        key, value = f"{p}r{n}/join/{h.node_id}", json.dumps(record)
        with h._beat_lock:
            h._join_key = (key, value)
            # on the liveness key's lease where the store has leases: one keep-alive a
            # heartbeat keeps both (etcd: half the heartbeat requests, a grant less)
            set_tied(store, key, value, f"{p}alive/{h.node_id}", h._s.heartbeat_timeout)
        # A count of the live join keys, not a shared counter: etcd increments by
        # compare-and-set, and N nodes contending on one key cost O(N²) requests.
        arrived = count_keys(store, f"{p}r{n}/join/")
        s = h._s
        if s.min_nodes <= arrived < s.max_nodes:
            # wake the leader (waiting on r<n>/done, as every node) for the last call
            store.compare_set(f"{p}r{n}/done-min", None, h.node_id)
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
        return Forming(n, arrived=arrived, full=full, leads=self.lead(n))

    def lead(self, n: int) -> bool:
        """Take the lead of forming round n, unless a live node has it."""
        h = self._h
        key = f"{h._p}r{n}/lead"
        took, _ = h._store.compare_set(key, None, h.node_id, ttl=h._s.heartbeat_timeout)
        if took:
            h._lead_key = key
        return took

    def form(self, n: int, forming: Forming, timed_out: bool) -> None:
        """As the leader of forming round n: complete it once it is full (``max_nodes``
        joined, every live member of the last round among them), or at the last call
        (``last_call_timeout`` after ``min_nodes`` arrived). Reading every join key is
        O(N): done once each time the round could complete, not on each arrival."""
        h = self._h
        s, p, store = h._s, h._p, h._store
        now = h._clock()
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
        joined, version = self.joined(n)
        forming.arrived = len(joined)
        if len(joined) < s.min_nodes:
            forming.last_call = None  # some have died since they came: wait for more
            return
        if forming.last_call is None:
            forming.last_call = now + s.last_call_timeout
        earlier = self.record_of(n - 1)
        before = {str(m[0]) for m in earlier or ()}
        # Live members of the previous round keep their places before newcomers
        # (standbys): the round waits for them, last call aside.
        missing = [m for m in before if m not in joined]
        alive = store.multi_get([p + "alive/" + m for m in missing]) if missing else []
        awaited = [m for m, a in zip(missing, alive, strict=True) if a is not None]
        ready = (len(joined) >= s.max_nodes and not awaited) or at_last_call
        if not ready:
            return
        if not self.quorum(joined, earlier):
            if n not in self.no_quorum:
                self.no_quorum[n] = len(before)
                log.warning(
                    "round %d waits for a majority of the last round's %d nodes "
                    "(%d here): a side cut off with fewer never goes on",
                    n,
                    len(before),
                    len(joined),
                )
            return
        chosen = sorted(joined, key=lambda k: (k not in before, self.order_key(k, joined[k])))[
            : s.max_nodes
        ]
        order = sorted(chosen, key=lambda k: self.order_key(k, joined[k]))
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
            candidates=candidates(record),
            monitors=tuple(str(m[0]) for m in spread(record)),
        )
        store.compare_set(f"{p}r{n}/done", None, summary.to_json())

    def quorum(self, joined: dict[str, Any], earlier: list[list[Any]] | None) -> bool:
        """Whether ``joined`` holds a strict majority of the members of the last round
        (``earlier``, its record) that did not leave on purpose (always, without
        ``majority``, after a round of one or two, or when the store does not hold that
        round: a store that moved here, whose host reached a majority to move it)."""
        h = self._h
        members = {str(m[0]) for m in earlier or ()}
        if not h._s.majority or len(members) < 3:
            return True
        p = h._p
        gone = {k.rsplit("/", 1)[1] for k in h._store.scan(p + "left/")[0]}
        gone |= {k.rsplit("/", 1)[1] for k in h._store.scan(p + "out/")[0]}
        counted = members - gone
        return 2 * len(counted & joined.keys()) > len(counted)

    def joined(self, n: int) -> tuple[dict[str, dict[str, Any]], int]:
        """The live announcements in round n (node id -> record), and the store's version
        when they were read."""
        h = self._h
        found, version = h._store.scan(f"{h._p}r{n}/join/")
        out = {}
        for k, v in found.items():
            announced = join_record(v)
            if announced is None:  # not one this protocol writes: that node is not in
                h._protocol_error(f"ignoring the malformed join record {k}: {v[:80]!r}")
                continue
            out[k.rsplit("/", 1)[1]] = announced
        return out, version

    @staticmethod
    def order_key(node_id: str, record: dict[str, Any]) -> tuple[int, str]:
        """Group ranks: by ``node_rank`` when given (static), then by node id (host name
        first), which needs no shared counter for every joiner to contend on."""
        rank = record.get("node_rank")
        return (int(rank) if rank is not None else 0, node_id)

    def record_of(self, n: int) -> list[list[Any]] | None:
        """The full record of completed round ``n`` (``None`` when the store does not hold
        it, or it is garbage)."""
        if n < 0:
            return None
        h = self._h
        value = h._store.get(f"{h._p}r{n}/done")
        if value is None:
            return None
        try:
            return self.full_record(n, done_summary(n, value))
        except CorruptKey as exc:
            h._protocol_error(str(exc))
            return None

    def full_record(self, n: int, summary: RoundSummary) -> list[list[Any]]:
        """Round ``n``'s full record: [node id, role, workers, address, failover port] in
        group-rank order (O(N): read only by those who need it)."""
        if summary.record is not None:
            return [list(m) for m in summary.record]
        cached = self._records.get((n, summary.attempt))
        if cached is not None:
            return cached
        h = self._h
        key = f"{h._p}r{n}/record/{summary.attempt}"
        value = h._store.get(key)
        if value is None:
            raise CorruptKey(f"the key {key!r} is missing")
        record = done_record(n, value)
        self._records = {(n, summary.attempt): record}  # the last one only
        return record

    def member_ids(self, n: int, summary: RoundSummary) -> list[str]:
        """Round ``n``'s members, in group-rank order."""
        return [str(m[0]) for m in self.full_record(n, summary)]

    def seat(self, n: int, summary: RoundSummary) -> int | None:
        """This node's group rank in completed round ``n`` (``None``: not a member)."""
        h = self._h
        if summary.record is not None:
            members = [str(m[0]) for m in summary.record]
            return members.index(h.node_id) if h.node_id in members else None
        value = h._store.get(f"{h._p}r{n}/seat/{summary.attempt}/{h.node_id}")
        return seat_of(value, summary.size)

    def timeout_error(self, n: int) -> RendezvousTimeoutError:
        """The error for a join_timeout in round ``n``: how many nodes arrived of how
        many wanted, at which store."""
        h = self._h
        try:
            joined = len(h._store.scan(f"{h._p}r{n}/join/")[0])
        except StoreError:
            joined = -1
        want = (
            str(h._s.min_nodes)
            if h._s.min_nodes == h._s.max_nodes
            else f"{h._s.min_nodes}..{h._s.max_nodes}"
        )
        if n in self.no_quorum:
            want = f"a majority of the last round's {self.no_quorum[n]}"
        return RendezvousTimeoutError(
            f"rendezvous timed out after {h._s.join_timeout:g} s (rdzv.join_timeout): "
            f"{joined} of {want} nodes arrived at {h.backend} store {h._endpoint} "
            f"(run id {h._s.run_id})"
        )
