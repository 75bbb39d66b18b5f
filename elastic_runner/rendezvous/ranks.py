"""Global and role rank assignment from the nodes of a round (torch's slow path, done
without a store round trip because every node's ``NodeInfo`` arrives with the round)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from elastic_runner.rendezvous.api import NodeInfo, RendezvousInfo
from elastic_runner.spec import WorkerGroup

__all__ = ["RankAssignment", "assign_ranks", "join_round"]


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


def join_round(group: WorkerGroup, info: RendezvousInfo) -> None:
    """Give ``group`` the facts of the round it joined (group rank and size, master,
    the job's restart count, one more attempt) and each of its workers its ranks."""
    ranks = assign_ranks(info.nodes, info.group_rank)
    group.group_rank, group.group_world_size = info.group_rank, info.group_world_size
    group.master_addr, group.master_port = info.master_addr, info.master_port
    group.restart_count = info.restart_count
    group.attempt += 1
    for w in group.workers:
        w.global_rank = ranks.base_global_rank + w.local_rank
        w.role_rank = ranks.base_role_rank + w.local_rank
        w.world_size, w.role_world_size = ranks.world_size, ranks.role_world_size
