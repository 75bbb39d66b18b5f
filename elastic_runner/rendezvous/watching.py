"""The membership watcher of the dynamic rendezvous: the thread that tells the agent,
once per round, that its round must re-form.

A running node regroups (a new round, no restart spent) when a node waits to join while
the round has fewer than ``max_nodes``, or when a member's liveness key expires (its
watcher waits on the round's join keys and bell only: nothing is read while nothing
changes). The keys are listed in :mod:`elastic_runner.rendezvous.dynamic`, whose handler
starts the thread once it is in a round and shares its state with it
(:class:`WatcherHost`).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Protocol

from elastic_runner.rendezvous.forming import Rounds
from elastic_runner.rendezvous.host import ProtocolHost
from elastic_runner.rendezvous.records import CorruptKey, RoundSummary, round_of
from elastic_runner.rendezvous.settings import RendezvousSettings
from elastic_runner.rendezvous.store import StoreTimeoutError, count_keys

__all__ = ["REASON", "MembershipWatcher", "WatcherHost", "watch_timeout"]

# The protocol's one logger, as before its parts had modules of their own: log
# configurations and filters name it.
log = logging.getLogger("elastic_runner.rendezvous.dynamic")

#: What a bell rung with a reason starts with (a node id cannot).
REASON = "why:"

#: Seconds an idle watcher waits at most before looking at its handler's state again
#: (the handler wakes it when the state changes).
IDLE_GUARD = 1.0


def watch_timeout(settings: RendezvousSettings) -> float:
    """How long one watch waits before asking again (nothing depends on it: changes
    wake it, and asking again from the same version misses none)."""
    return max(5.0, settings.heartbeat_timeout)


class WatcherHost(ProtocolHost, Protocol):
    """What the watcher needs of the rendezvous handler: its own attributes, read at each
    use and never copied (the store moves at a failover, the settings may be replaced,
    and the round's state changes under ``_lock``)."""

    #: Held over the round's state below.
    _lock: threading.Lock
    _round: int | None
    _summary: RoundSummary | None
    _leaving: int | None
    _exiting: int | None
    #: Written by the watcher: the round whose keys it may be blocked on at the store.
    _watching_round: int | None
    #: Set by the handler when its round completes or it stops (after the state above).
    _round_moved: threading.Event
    _callback: Callable[[], None] | None

    def _ring(self, n: int | None, value: str | None = None) -> None:
        """Wake the watchers of round ``n``'s members (with a reason after ``why:``)."""

    def _protocol_error(self, what: str) -> None:
        """Log a key that holds what this protocol never writes there (once each)."""


class MembershipWatcher:
    """The watcher of the handler ``host`` (:meth:`run` is its thread); ``rounds`` reads
    the members of a round."""

    def __init__(self, host: WatcherHost, rounds: Rounds) -> None:
        self._h = host
        self._rounds = rounds

    def run(self) -> None:
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
        h = self._h
        notified: int | None = None
        lost_since: float | None = None
        watching: tuple[int, int] | None = None  # (round, store version) waited on
        look = False
        while not h._stop.is_set():
            with h._lock:
                n, summary = h._round, h._summary
                quiet = h._leaving == n or h._exiting == n
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
                h._watching_round = None if idle else n
            try:
                if idle:
                    # Until the handler's round moves on. Polling every 50 ms instead
                    # cost 2,068 idle watchers (a benchmark's, in 4 processes) both
                    # cores while their round re-formed: the store got 5 to 10 % of a
                    # core, answered 19 s late, and no round formed in 60 s. (The
                    # bound is a guard only.)
                    h._round_moved.wait(IDLE_GUARD)
                    h._round_moved.clear()
                    continue
                assert watching is not None and n is not None and summary is not None
                if look:
                    why, version = self.look(n, summary)
                    watching = (n, version)
                    if why is not None:
                        notified = n
                        log.warning("%s: the job re-forms", why)
                        self.notify(n)
                        continue
                lost_since = None
                w, version = watching
                watching = (
                    w,
                    h._store.wait_for_change(f"{h._p}r{w}/join", version, watch_timeout(h._s)),
                )
                look = True
            except StoreTimeoutError:
                look = False  # nothing changed: nothing to look at
                continue
            except Exception as exc:  # StoreError, or a client bug: the watcher must not die
                if h._stop.is_set():
                    return
                look = True
                now = h._clock()
                lost_since = lost_since or now
                if now - lost_since < h._s.heartbeat_timeout:
                    log.warning(
                        "rendezvous store at %s unreachable, retrying: %s", h._endpoint, exc
                    )
                    h._stop.wait(min(0.5, h._s.heartbeat_interval))
                    continue
                log.error("lost the rendezvous store at %s: %s", h._endpoint, exc)
                if n is not None and n != notified:
                    notified = n
                    self.notify(n)  # next_round will report the error
                h._stop.wait(1.0)

    def notify(self, n: int) -> None:
        """The callback, unless the agent has moved past round ``n`` meanwhile (a stale
        notification would make it leave the round it just joined)."""
        h = self._h
        with h._lock:
            if h._round == n and h._callback:
                h._callback()

    def look(self, n: int, summary: RoundSummary) -> tuple[str | None, int]:
        """Why round ``n`` must re-form (``None``: it need not), and the store's version
        before it looked. What costs O(1) first (the job failed, the next round started,
        the bell says why, nodes wait to join); for a member's join key gone, only the
        first of the round's monitors still running reads the job (O(N)) and rings the
        bell with what it found: one node pays for a lost member, not every node."""
        h = self._h
        p, store = h._p, h._store
        found, version = store.scan(p + "round")  # the version first
        failed, bell = store.multi_get([p + "failed", f"{p}r{n}/joinbell"])
        if (over := self.over(n, failed, found.get(p + "round"))) is not None:
            return over, version
        if bell is not None and bell.startswith(REASON):
            return bell[len(REASON) :], version
        if summary.size < h._s.max_nodes and not count_keys(store, f"{p}r{n}/exit/"):
            waiting = len(store.scan(p + "waiting/")[0])
            if waiting:
                return (
                    f"{waiting} node(s) waiting to join (up to {h._s.max_nodes} welcome)",
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
            if running and running[0] != h.node_id:
                return None, version  # that monitor looks, and rings the bell
        found, version = store.scan(p)
        why = self.regroup(n, self._rounds.member_ids(n, summary), found)
        if why is not None and summary.monitors:
            h._ring(n, REASON + why)
        return why, version

    def over(self, n: int, failed: str | None, current: str | None) -> str | None:
        """Why round ``n`` is over, from the ``failed`` and ``round`` keys: the job failed,
        or another node started the next round (``None``: neither)."""
        if failed:
            return f"the job failed on another node ({failed})"
        try:
            started = round_of(current, n)
        except CorruptKey as exc:  # go on: lost nodes must still be noticed
            self._h._protocol_error(str(exc))
            started = n
        return None if started == n else f"another node started round {started}"

    def regroup(self, n: int, members: list[str], found: dict[str, str]) -> str | None:
        """Why round ``n`` (with ``members``) must re-form, as seen in the store's keys
        ``found``, or ``None`` when it need not."""
        h = self._h
        p = h._p
        if (over := self.over(n, found.get(p + "failed"), found.get(p + "round"))) is not None:
            return over
        finished = {k.rsplit("/", 1)[1] for k in found if k.startswith(f"{p}r{n}/exit/")}
        for m in members:
            if m not in finished and p + "alive/" + m not in found:
                return self.gone(m, found)
        waiting = sum(k.startswith(p + "waiting/") for k in found)
        if waiting and len(members) < h._s.max_nodes and not finished:
            return f"{waiting} node(s) waiting to join (up to {h._s.max_nodes} welcome)"
        return None

    def gone(self, member: str, found: dict[str, str]) -> str:
        """How ``member``, whose liveness key is gone, left: on purpose or lost."""
        h = self._h
        if (out := found.get(h._p + "out/" + member)) is not None:
            return f"node {member} stepped out of the job ({out})"
        reason = found.get(h._p + "left/" + member)
        if reason is not None:
            return f"node {member} left the job ({reason})"
        return (
            f"node {member} was lost: its liveness key expired, no heartbeat for "
            f"rdzv.heartbeat_timeout={h._s.heartbeat_timeout:g} s"
        )
