"""The interface between the agent loop and any rendezvous backend."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

__all__ = [
    "NodeInfo",
    "RendezvousError",
    "RendezvousGracefulExitError",
    "RendezvousHandler",
    "RendezvousInfo",
    "RendezvousTimeoutError",
]


class RendezvousError(Exception):
    """A rendezvous could not complete; the message says why, for a person."""


class RendezvousGracefulExitError(RendezvousError):
    """The job finished while this node waited to join (a standby that was never
    needed): nothing to do, not a failure. The message says so, for a person."""


class RendezvousTimeoutError(RendezvousError):
    """Not enough nodes arrived in time."""


@dataclass(frozen=True)
class NodeInfo:
    """What each node announces when it joins: enough to assign every global rank."""

    role: str
    local_world_size: int


@dataclass(frozen=True)
class RendezvousInfo:
    """One completed round, from this node's point of view. ``nodes`` lists every node of
    the round in group-rank order."""

    round: int
    group_rank: int
    nodes: tuple[NodeInfo, ...]
    master_addr: str
    master_port: int
    #: Failure restarts of the whole job so far (TORCHELASTIC_RESTART_COUNT).
    restart_count: int = 0

    @property
    def group_world_size(self) -> int:
        return len(self.nodes)


@runtime_checkable
class RendezvousHandler(Protocol):
    """What the agent needs from a backend.

    ``next_round`` blocks until this node is part of a complete round; ``failed`` says
    the previous round ended in a failure, which counts one restart for the whole job
    (however many nodes report it). A backend that can see membership change while
    workers run calls the callback given to ``on_membership_change`` (from any thread);
    the agent then regroups without spending a restart. ``exit_barrier`` holds a node
    that finished until the others did or left (bounded, never an error); ``fail_job``
    tells every node the job failed for good.

    The agent calls ``next_round`` and ``exit_barrier`` from a thread of their own, so
    that a stop signal is acted on at once; it then calls ``leave`` (any thread): the
    node stops for good, the others must stop waiting for it now, and a call still in
    progress should return or raise soon. A backend whose members can be dropped calls
    the callback given to ``on_lease`` (from any thread) whenever this node's lease
    changes: the ``time.monotonic()`` until which its membership of the current round
    surely holds (its liveness refreshed within the heartbeat timeout), ``0.0`` once it
    lapsed, ``None`` when there is none; past it, the agent kills its workers (fencing)
    and joins again. ``shutdown`` may be called twice.

    Excluding a failing node (:mod:`elastic_runner.exclusion`): ``report_failure`` says
    this node's workers failed in the current round, first at wall-clock time ``at``;
    ``root_cause`` says whether this node's report is the round's earliest.
    ``step_out`` leaves the current round for a while (the others re-form without it,
    ``failed`` counting the restart as ``next_round`` would) and returns False, doing
    nothing, when the job cannot spare the node (fewer than its minimum would be left,
    standbys counted); ``sit_out`` then waits outside the job until the handler's clock
    reads ``until``, raising :class:`RendezvousGracefulExitError` when the job finishes
    meanwhile; the next ``next_round`` joins again. A backend of one node never steps
    out.
    """

    @property
    def backend(self) -> str: ...

    def next_round(self, node: NodeInfo, failed: bool = False) -> RendezvousInfo: ...

    def exit_barrier(self) -> bool: ...

    def fail_job(self, reason: str) -> None: ...

    def leave(self, reason: str) -> None: ...

    def report_failure(self, at: float) -> None: ...

    def root_cause(self) -> bool: ...

    def step_out(self, reason: str, failed: bool) -> bool: ...

    def sit_out(self, until: float) -> None: ...

    def on_lease(self, callback: Callable[[float | None], None]) -> None: ...

    def num_nodes_waiting(self) -> int: ...

    def on_membership_change(self, callback: Callable[[], None]) -> None: ...

    def shutdown(self) -> None: ...
