"""Global and role rank assignment from the nodes of a round (torch's slow path, done
without a store round trip because every node's ``NodeInfo`` arrives with the round)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from elastic_runner.rendezvous.api import NodeInfo

__all__ = ["RankAssignment", "assign_ranks"]


@dataclass(frozen=True)
class RankAssignment:
    """The rank bases of one node: its workers get ``base_global_rank + local_rank`` and
    ``base_role_rank + local_rank``."""

    base_global_rank: int
    world_size: int
    base_role_rank: int
    role_world_size: int


def assign_ranks(nodes: Sequence[NodeInfo], group_rank: int) -> RankAssignment:
    """Global ranks are contiguous per node in group-rank order; role ranks likewise among
    the nodes of the same role."""
    if not 0 <= group_rank < len(nodes):
        raise ValueError(f"group_rank {group_rank} outside 0..{len(nodes) - 1}")
    me = nodes[group_rank]
    earlier = nodes[:group_rank]
    return RankAssignment(
        base_global_rank=sum(n.local_world_size for n in earlier),
        world_size=sum(n.local_world_size for n in nodes),
        base_role_rank=sum(n.local_world_size for n in earlier if n.role == me.role),
        role_world_size=sum(n.local_world_size for n in nodes if n.role == me.role),
    )
