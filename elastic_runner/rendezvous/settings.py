"""The timing and membership knobs of the dynamic rendezvous (the ``rdzv.*`` keys of
store-based backends), in a module of their own so that every part of the protocol
(:mod:`~elastic_runner.rendezvous.dynamic` and the parts it owns) can name them without
importing the handler."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["RendezvousSettings"]


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
