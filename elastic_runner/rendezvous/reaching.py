"""Reaching the store of the dynamic rendezvous: announcing this node alive at the start
of each ``next_round``, waiting for a store that is not up yet (or restarting) until
``join_timeout``, and, with ``failover`` (the agent-hosted TCP store), moving to the
store of the first member of the last round that answers when the store is gone
(:mod:`~elastic_runner.rendezvous.failover`), carrying the round number and the restart
count over to the empty store.

The keys are listed in :mod:`elastic_runner.rendezvous.dynamic`, whose handler owns a
:class:`StoreReach` and shares its state with it (:class:`ReachHost`): a move replaces
the handler's store and endpoint, which every part of the protocol reads at each use.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any, Protocol

from elastic_runner.rendezvous.api import RendezvousError
from elastic_runner.rendezvous.failover import Candidate, StoreFailover
from elastic_runner.rendezvous.heartbeat import lease_span
from elastic_runner.rendezvous.host import ProtocolHost
from elastic_runner.rendezvous.records import RoundSummary
from elastic_runner.rendezvous.store import StoreError, StoreUnavailableError

__all__ = ["ReachHost", "StoreReach"]

# The protocol's one logger, as before its parts had modules of their own: log
# configurations and filters name it.
log = logging.getLogger("elastic_runner.rendezvous.dynamic")


class ReachHost(ProtocolHost, Protocol):
    """What reaching (and moving) the store needs of the rendezvous handler: its own
    attributes, read at each use and never copied; the store, its endpoint and the lease
    are written here."""

    _failover: StoreFailover | None
    #: The last round this node was in, its full record (a candidate to host the store
    #: only), and the restart count then: what a move carries over.
    _round: int | None
    _summary: RoundSummary | None
    _record: list[list[Any]] | None
    _restarts_seen: int
    _lease_until: float | None
    _lease_gen: int


class StoreReach:
    """Reaching the store for the handler ``host``, and moving it when it is gone."""

    def __init__(self, host: ReachHost) -> None:
        self._h = host

    def reach(self, deadline: float) -> None:
        """Announce this node, waiting for an unavailable store until ``deadline`` (it
        may start after us, or be restarting); then, or on any other error, raise."""
        h = self._h
        delay = 0.05
        cut_off = False
        said = False
        while True:
            if h._stop.is_set():
                raise RendezvousError("this node is leaving the job")
            try:
                key, ttl = h._p + "alive/" + h.node_id, h._s.heartbeat_timeout
                sent = h._clock()
                h._store.set(key, "1", ttl=ttl)
                # The lease runs from a request's send time: the key cannot expire before
                # then + TTL. When the set had to wait (for DNS, a connection, a busy
                # store), a refresh starts a lease that outlasts the next heartbeat;
                # otherwise the set's own send time does, one request less per node and
                # round (6 % of a 1,024-node round's requests).
                span, interval = lease_span(h._s), h._s.heartbeat_interval
                if h._clock() - sent > max(0.0, span - interval) / 2:
                    sent = h._clock()
                    h._store.refresh(key, ttl)
                h._lease_gen += 1
                h._lease_until = sent + span
                return
            except StoreError as exc:
                if self.can_move and h._clock() < deadline:
                    # once per outage: a node cut off tries again until join_timeout
                    say = log.debug if cut_off else log.warning
                    say("the rendezvous store at %s is gone: %s", h._endpoint, exc)
                    try:
                        self.move()
                        continue
                    except StoreUnavailableError as why:
                        say("%s", why)  # cut off: retry the store, its link may heal
                        cut_off = True
                if not isinstance(exc, StoreUnavailableError):
                    raise
                if h._clock() + delay >= deadline:
                    raise StoreUnavailableError(
                        f"{exc}; gave up after rdzv.join_timeout={h._s.join_timeout:g} s"
                    ) from None
                if not said and not cut_off and h._clock() + 1.0 < deadline:
                    # Once: a store that answers nobody (another program on its port) would
                    # otherwise keep the node silent until join_timeout.
                    said = True
                    log.warning(
                        "%s; trying again until rdzv.join_timeout=%g s",
                        exc,
                        h._s.join_timeout,
                    )
                h._stop.wait(delay)
                delay = min(delay * 2, 1.0)

    @property
    def can_move(self) -> bool:
        """Whether this node may move the store: with failover, after a round of three
        nodes or more (a lone survivor of two cannot tell the host's death from a cut
        link, and the host goes on alone in that case)."""
        h = self._h
        return h._failover is not None and h._summary is not None and h._summary.size >= 3

    def move(self) -> None:
        """Move to the store of the first member of the last round that answers (this
        node's own, when it comes first), then carry the round number and the restart
        count over to it (every survivor writes the same values; the first one counts)."""
        h = self._h
        assert h._failover is not None
        host, _, port = h._endpoint.rpartition(":")
        if port.isdigit() and h._failover.answers(host.strip("[]"), int(port)):
            raise StoreUnavailableError(f"the rendezvous store at {h._endpoint} answers again")
        summary = h._summary
        assert summary is not None
        hosts = [Candidate(*c) for c in summary.candidates]
        if h._record is not None:  # a candidate to host it: it counts the members
            voters = [
                Candidate(str(m[0]), str(m[3]), int(m[4]))
                for m in h._record
                if len(m) > 4 and m[3] and m[4]
            ]
            store, endpoint = h._failover.elect(voters, h.node_id, summary.size, hosts)
        else:  # it follows a candidate that moved (and so reached a majority)
            store, endpoint = h._failover.follow(hosts)
        old, h._store = h._store, store
        log.warning("rendezvous store: %s (was %s)", endpoint, h._endpoint)
        h._endpoint = endpoint
        with contextlib.suppress(Exception):
            old.close()
        p, n = h._p, h._round
        store.compare_set(p + "round", None, str(n if n is not None else 0))
        store.compare_set(p + "restarts", None, str(h._restarts_seen))
