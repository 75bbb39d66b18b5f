"""Excluding a node whose workers keep failing: it leaves the job for a cooldown.

Restarting the whole group on the same nodes loops on a bad node. A failure is
attributed to the node of its root cause: each node whose workers fail reports when it
saw its first failure of the round (``RendezvousHandler.report_failure``), and the node
with the earliest report is the root cause (``root_cause``); a node whose ranks only
died of the root cause's (a collective's peer gone) reports later, so it is not blamed.
The comparison is of wall clocks: hosts whose clocks differ by more than the time a
failure takes to spread (tens of milliseconds; NTP keeps hosts within a few) may
blame the wrong one.

A node with ``exclusion.failures`` failures attributed to it within
``exclusion.window`` seconds steps out of the job (``step_out``): the others re-form
without it (a standby takes its place, if any), which costs no restart beyond the one
for the failure. It sits out ``exclusion.cooldown`` seconds, doubled at each exclusion
of the same node up to ``exclusion.cooldown_max``, then joins again once its health
checks (``checks.*``) pass. A node the job cannot spare (fewer than ``MIN`` nodes would
be left, standbys counted) is not excluded: it restarts with the others, and the log
says why. Off by default (``exclusion.failures=0``)::

    elastic-run +job=resnet nnodes=4:8 max_restarts=10 exclusion.failures=2 \\
        exclusion.window=1800 exclusion.cooldown=600
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

__all__ = ["Exclusion", "ExclusionConfig", "ExclusionJudge"]


@dataclass
class ExclusionConfig:
    """When a node whose workers keep failing leaves the job for a while."""

    #: Failures attributed to this node (it was the root cause) within ``window``
    #: seconds that exclude it (0: never exclude).
    failures: int = 0
    #: Seconds over which failures are counted.
    window: float = 600.0
    #: Seconds the node sits out the first time; doubled each time it is excluded again.
    cooldown: float = 60.0
    #: The longest cooldown, in seconds.
    cooldown_max: float = 3600.0


@dataclass(frozen=True)
class Exclusion:
    """A verdict: this node leaves the job for ``cooldown`` seconds, because ``reason``."""

    cooldown: float
    reason: str
    #: How many times this node was excluded, this one included.
    count: int


@dataclass
class ExclusionJudge:
    """Counts the failures attributed to this node and says when it must step out."""

    failures: int = 0
    window: float = 600.0
    cooldown: float = 60.0
    cooldown_max: float = 3600.0
    #: When each failure attributed to this node within the window was seen.
    strikes: deque[float] = field(default_factory=deque)
    #: Exclusions so far (the next cooldown doubles with each).
    excluded: int = 0

    @classmethod
    def of(cls, config: ExclusionConfig) -> ExclusionJudge:
        return cls(config.failures, config.window, config.cooldown, config.cooldown_max)

    @property
    def enabled(self) -> bool:
        return self.failures > 0

    def failed(self, now: float, root_cause: bool) -> Exclusion | None:
        """An attempt failed at ``now`` (a monotonic clock); ``root_cause``: this node's
        failure was the first of the round. The verdict when this node must step out
        (it is not committed until :meth:`stepped_out`: the job may not spare it)."""
        if not self.enabled:
            return None
        while self.strikes and now - self.strikes[0] > self.window:
            self.strikes.popleft()
        if not root_cause:
            return None
        self.strikes.append(now)
        if len(self.strikes) < self.failures:
            return None
        cooldown = min(self.cooldown_max, self.cooldown * 2.0**self.excluded)
        reason = (
            f"excluded for {cooldown:g} s: the root cause of {len(self.strikes)} failures "
            f"within {self.window:g} s (exclusion.failures={self.failures})"
        )
        return Exclusion(cooldown, reason, self.excluded + 1)

    def stepped_out(self) -> None:
        """The node left the job: its count starts again when it returns."""
        self.strikes.clear()
        self.excluded += 1
