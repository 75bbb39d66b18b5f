"""The heartbeat of the dynamic rendezvous: the thread that keeps this node's TTL keys
alive (liveness, and while they are held its waiting, join and lead keys, or its ``out``
key while it sits out an exclusion), and the lease that follows it.

A heartbeat only refreshes the node's own keys, so a dead node's keys expire by
themselves. The keys are listed in :mod:`elastic_runner.rendezvous.dynamic`, whose
handler starts the thread at its first ``next_round`` and shares its state with it
(:class:`HeartbeatHost`).
"""

from __future__ import annotations

import logging
import threading
from typing import Protocol

from elastic_runner.rendezvous.host import ProtocolHost
from elastic_runner.rendezvous.settings import RendezvousSettings
from elastic_runner.rendezvous.store import refresh_keys, set_tied

__all__ = ["Heartbeat", "HeartbeatHost", "lease_span"]

# The protocol's one logger, as before its parts had modules of their own: log
# configurations and filters name it.
log = logging.getLogger("elastic_runner.rendezvous.dynamic")


def lease_span(settings: RendezvousSettings) -> float:
    """How long a refresh sent at ``t`` keeps this node surely a member: until a
    margin before its key can expire at the store (``t`` + TTL at the earliest). The
    margin (one heartbeat interval, less when the TTL leaves no room for it: the
    lease must outlast the next refresh) lets the workers die (the agent wakes; the
    guardian may have to import and scan /proc first) before the others can see this
    node lost and start a new world without it."""
    ttl, interval = settings.heartbeat_timeout, settings.heartbeat_interval
    return ttl - min(interval, (ttl - interval) / 2)


class HeartbeatHost(ProtocolHost, Protocol):
    """What the heartbeat needs of the rendezvous handler: its own attributes, read at
    each use and never copied (the store moves at a failover, the settings may be
    replaced, and the keys and the lease change as the node joins, steps out and
    leaves)."""

    #: Held while the heartbeat re-announces a key, and while stepping out or back.
    _beat_lock: threading.Lock
    #: Why this node sits out (only its ``out`` key lives then).
    _out: str | None
    _waiting: bool
    _join_key: tuple[str, str] | None
    _lead_key: str | None
    _round: int | None
    _lease_until: float | None
    _lease_gen: int

    def _tell_lease(self) -> None:
        """Hand the lease of the current round to the agent."""


class Heartbeat:
    """The heartbeat of the handler ``host`` (:meth:`run` is its thread)."""

    def __init__(self, host: HeartbeatHost) -> None:
        self._h = host

    def run(self) -> None:
        """Refresh this node's liveness (and waiting, join and lead) keys every
        heartbeat_interval. The lease follows the send time of each refresh that found
        the liveness key alive; one that found it expired means the others may have
        re-formed without this node: the lease lapses until the next round (the agent
        fences its workers)."""
        h = self._h
        ttl = h._s.heartbeat_timeout
        alive = h._p + "alive/" + h.node_id
        out = h._p + "out/" + h.node_id
        while not h._stop.wait(h._s.heartbeat_interval):
            try:
                if h._out is not None:  # sitting out: only the out key lives
                    if not h._store.refresh(out, ttl):
                        with h._beat_lock:
                            if h._out is not None:
                                h._store.set(out, h._out, ttl=ttl)
                    continue
                waiting = h._p + "waiting/" + h.node_id if h._waiting else None
                joined, lead = h._join_key, h._lead_key
                keys = [k for k in (alive, waiting, joined and joined[0], lead) if k]
                sent, gen = h._clock(), h._lease_gen
                found = dict(zip(keys, refresh_keys(h._store, keys, ttl), strict=True))
                if found[alive]:
                    if h._lease_until is not None and gen == h._lease_gen:
                        h._lease_until = sent + lease_span(h._s)
                        h._tell_lease()
                else:
                    if h._round is not None and gen == h._lease_gen:
                        h._lease_until = None
                        h._tell_lease()
                        log.error(
                            "this node's liveness key had expired at the store at %s "
                            "(no heartbeat got through for %g s): the other nodes may "
                            "have re-formed without it",
                            h._endpoint,
                            ttl,
                        )
                    with h._beat_lock:
                        if h._out is None:  # not stepped out meanwhile
                            h._store.set(alive, "1", ttl=ttl)  # announce again
                if waiting is not None and not found[waiting]:
                    with h._beat_lock:
                        if h._out is None:
                            set_tied(h._store, waiting, "1", alive, ttl)
                if joined is not None and not found[joined[0]]:
                    with h._beat_lock:
                        if h._join_key == joined:  # not dropped meanwhile
                            set_tied(h._store, joined[0], joined[1], alive, ttl)
                if lead is not None and not found[lead]:
                    h._lead_key = None  # lapsed: another node may lead now
            except Exception as exc:  # never let the heartbeat thread die
                log.warning("heartbeat to %s failed: %s", h._endpoint, exc)
