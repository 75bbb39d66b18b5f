"""Rank assignment: torch's heterogeneous and homogeneous consistency checks."""

from __future__ import annotations

import pytest

from elastic_runner.rendezvous import NodeInfo, assign_ranks


def _all_ranks(nodes: list[NodeInfo]) -> list[tuple[str, int, int, int, int]]:
    out = []
    for g, node in enumerate(nodes):
        a = assign_ranks(nodes, g)
        for local in range(node.local_world_size):
            out.append(
                (
                    node.role,
                    a.base_global_rank + local,
                    a.world_size,
                    a.base_role_rank + local,
                    a.role_world_size,
                )
            )
    return out


def test_heterogeneous_roles_like_torch() -> None:
    # torch's correct_rank_assignment_heterogeneous: master(8), trainer(1,2,3,4), ps(5,2)
    nodes = [
        NodeInfo("master", 8),
        *(NodeInfo("trainer", n) for n in (1, 2, 3, 4)),
        NodeInfo("ps", 5),
        NodeInfo("ps", 2),
    ]
    ranks = _all_ranks(nodes)
    assert sorted(r[1] for r in ranks) == list(range(25))
    assert {r[2] for r in ranks} == {25}
    for role, size in (("master", 8), ("trainer", 10), ("ps", 7)):
        mine = [r for r in ranks if r[0] == role]
        assert sorted(r[3] for r in mine) == list(range(size))
        assert {r[4] for r in mine} == {size}


def test_global_ranks_are_contiguous_per_node_in_group_order() -> None:
    nodes = [NodeInfo("ps", 4), NodeInfo("trainer", 1), NodeInfo("trainer", 2)]
    assert [assign_ranks(nodes, g).base_global_rank for g in range(3)] == [0, 4, 5]
    assert [assign_ranks(nodes, g).base_role_rank for g in range(3)] == [0, 0, 1]


def test_group_rank_out_of_range() -> None:
    with pytest.raises(ValueError):
        assign_ranks([NodeInfo("a", 1)], 1)
