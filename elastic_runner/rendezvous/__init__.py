"""Rendezvous: how the agents of one job agree on membership, group ranks and the master
address. The agent sees only ``RendezvousHandler``; backends are plugins, and those on a
key-value store build on :mod:`elastic_runner.rendezvous.kit`."""

from elastic_runner.rendezvous.api import (
    NodeInfo,
    RendezvousError,
    RendezvousHandler,
    RendezvousInfo,
    RendezvousTimeoutError,
)
from elastic_runner.rendezvous.ranks import RankAssignment, assign_ranks

__all__ = [
    "NodeInfo",
    "RankAssignment",
    "RendezvousError",
    "RendezvousHandler",
    "RendezvousInfo",
    "RendezvousTimeoutError",
    "assign_ranks",
]
