"""The agent's steps while this node stays out of the job: a health check keeps it out
(it checks again until the checks pass), or it was excluded for causing failures (it
sits out a cooldown, :mod:`elastic_runner.exclusion`). Apart from the loop in
:mod:`elastic_runner.agent`, which calls them between attempts, when no worker runs.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from elastic_runner.blocking_calls import BlockingCalls, Stopped
from elastic_runner.events import EventEmitter, names
from elastic_runner.exclusion import Exclusion, ExclusionJudge
from elastic_runner.lifecycle import Lifecycle, Refusal
from elastic_runner.rendezvous.api import RendezvousHandler
from elastic_runner.spec import WorkerGroup

__all__ = ["Refused", "StayingOut"]

log = logging.getLogger(__name__)


class Refused(Exception):
    """A health check kept this node out of the next rendezvous for good."""

    def __init__(self, refusal: Refusal) -> None:
        super().__init__(refusal.describe())
        self.refusal = refusal


class StayingOut:
    """Health checks that keep this node out, and its exclusions.

    ``wait(seconds)`` waits in the launcher's ``select`` (a stop signal wakes it);
    ``stopped()`` says a stop was requested. ``checks_retry`` is
    (``checks.retry_for``, ``checks.retry_interval``)."""

    def __init__(
        self,
        group: WorkerGroup,
        rendezvous: RendezvousHandler,
        calls: BlockingCalls,
        events: EventEmitter,
        lifecycle: Lifecycle,
        *,
        node: str,
        wait: Callable[[float], object],
        stopped: Callable[[], bool],
        clock: Callable[[], float],
        checks_retry: tuple[float, float],
        exclusion: ExclusionJudge,
    ) -> None:
        self._group = group
        self._rdzv = rendezvous
        self._calls = calls
        self._events = events
        self._lifecycle = lifecycle
        self._node = node
        self._wait = wait
        self._stopped = stopped
        self._clock = clock
        self._checks_retry = checks_retry
        self._exclusion = exclusion
        #: Each time this node was excluded: which node and why (for its report).
        self.excluded: list[str] = []

    def check(self) -> Refusal | None:
        """Run the health checks before the next round (``None``: every one passes)."""
        group = self._group
        return self._lifecycle.before_rendezvous(group.attempt + 1, group.restart_count)

    def until_checks_pass(self, refusal: Refusal) -> None:
        """A health check keeps this node out: check again every ``checks.retry_interval``
        seconds for ``checks.retry_for`` (the job runs on without it, if ``nnodes``
        allows), and return once every check passes; else :class:`Refused`."""
        retry_for, interval = self._checks_retry
        deadline = self._clock() + retry_for
        said = None
        current: Refusal | None = refusal
        while current is not None:
            left = deadline - self._clock()
            if left <= 0:
                raise Refused(current)
            pause = min(interval, left)
            if current != said:  # once per reason: a node may stay out for hours
                said = current
                log.warning(
                    "%s: this node stays out, checking again every %g s for up to %g s",
                    current.describe(),
                    interval,
                    left,
                )
                self._events.agent(
                    names.NODE_OUT, plugin=current.plugin, reason=current.reason, retry_in=pause
                )
            wake = self._clock() + pause
            while (now := self._clock()) < wake:
                self._wait(wake - now)
                if self._stopped():
                    raise Stopped
            current = self.check()
        log.info("every health check passes: this node joins the job")
        self._events.agent(names.NODE_IN)

    def report_failure(self) -> None:
        """Tell the rendezvous when this node's workers first failed in this round (the
        earliest report is the root cause), when exclusion is on; without waiting (the
        workers still run)."""
        if self._exclusion.enabled:
            at = time.time()
            report = "report this node's failure to the rendezvous"
            self._calls.start(lambda: self._rdzv.report_failure(at), report)

    def judge(self) -> Exclusion | None:
        """Whether this node, the root cause of the failure, must step out of the job
        (``exclusion.*``): if so, it has left the current round."""
        judge = self._exclusion
        if not judge.enabled:
            return None
        exclusion = judge.failed(self._clock(), self._calls.run(self._rdzv.root_cause))
        if exclusion is None:
            return None
        if not self._calls.run(lambda: self._rdzv.step_out(exclusion.reason, True)):
            log.warning(
                "this node would be %s, but the job cannot spare it (too few nodes would be "
                "left): it restarts with the others",
                exclusion.reason,
            )
            return None
        judge.stepped_out()
        return exclusion

    def sit_out(self, exclusion: Exclusion) -> None:
        """This node stepped out: wait out the cooldown outside the job (its end ends the
        wait); the caller joins again (once the health checks pass)."""
        log.error("node %s leaves the job: %s", self._node, exclusion.reason)
        self.excluded.append(f"node {self._node} {exclusion.reason}")
        self._events.agent(
            names.NODE_EXCLUDED,
            reason=exclusion.reason,
            cooldown=exclusion.cooldown,
            count=exclusion.count,
        )
        self._calls.run(lambda: self._rdzv.sit_out(self._clock() + exclusion.cooldown))
        log.info("cooldown over: this node joins the job again once its checks pass")
        self._events.agent(names.NODE_IN, after="exclusion")
