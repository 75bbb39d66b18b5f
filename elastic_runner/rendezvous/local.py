"""The single-node rendezvous: no server, this node is group rank 0 of a one-node round.

Registered as backend ``local`` (the default) through the rendezvous hook, exactly like a
third-party backend.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from elastic_runner.config import (
    RendezvousConfig,
    parse_master_addr,
    parse_master_port,
    parse_nnodes,
)
from elastic_runner.errors import ConfigError
from elastic_runner.hookspecs import hookimpl
from elastic_runner.registry import ComponentSpec
from elastic_runner.rendezvous.api import NodeInfo, RendezvousInfo
from elastic_runner.rendezvous.network import find_free_port, pinned_port
from elastic_runner.spec import RunContext

__all__ = ["LocalRendezvous", "LocalRendezvousConfig"]


@dataclass
class LocalRendezvousConfig(RendezvousConfig):
    backend: str = "local"
    #: MASTER_ADDR given to workers; loopback always works on one node. ``master_addr``
    #: wins when both are set.
    local_addr: str = "127.0.0.1"


class LocalRendezvous:
    """Every round has one node: this one. Membership never changes. MASTER_PORT is
    ``master_port`` when given (``rdzv.master_port``), else a free port per round."""

    backend = "local"

    def __init__(self, local_addr: str = "127.0.0.1", master_port: int | None = None) -> None:
        self._addr = local_addr
        self._port = master_port
        self._round = -1
        self._restarts = 0

    @classmethod
    def from_config(cls, config: LocalRendezvousConfig, context: RunContext) -> LocalRendezvous:
        lo, hi = parse_nnodes(f"{context.min_nodes}:{context.max_nodes}")
        if (lo, hi) != (1, 1):
            raise ConfigError(
                "nnodes",
                f"{lo}:{hi}" if lo != hi else lo,
                "rdzv=local runs one node: use 1, or rdzv=tcp / rdzv=static for several",
            )
        port = parse_master_port(config.master_port)
        return cls(parse_master_addr(config.master_addr) or config.local_addr, port)

    def next_round(self, node: NodeInfo, failed: bool = False) -> RendezvousInfo:
        self._round += 1
        self._restarts += failed
        port = find_free_port(self._addr) if self._port is None else pinned_port(self._port)
        return RendezvousInfo(
            round=self._round,
            group_rank=0,
            nodes=(node,),
            master_addr=self._addr,
            master_port=port,
            restart_count=self._restarts,
        )

    def exit_barrier(self) -> bool:
        """One node: nobody to wait for."""
        return True

    def fail_job(self, reason: str) -> None:
        """One node: nobody to tell."""

    def leave(self, reason: str) -> None:
        """One node: nobody waits for it."""

    def report_failure(self, at: float) -> None:
        """One node: nobody to compare with."""

    def root_cause(self) -> bool:
        """One node: every failure is its own."""
        return True

    def step_out(self, reason: str, failed: bool) -> bool:
        """One node: the job cannot spare it."""
        return False

    def sit_out(self, until: float) -> None:
        """One node: never steps out."""

    def on_lease(self, callback: Callable[[float | None], None]) -> None:
        """One node: its membership cannot lapse."""

    def num_nodes_waiting(self) -> int:
        return 0

    def on_membership_change(self, callback: Callable[[], None]) -> None:
        """Membership of a one-node job never changes."""

    def shutdown(self) -> None:
        """Nothing to release."""


@hookimpl
def elastic_runner_rendezvous_backends() -> Sequence[ComponentSpec]:
    return [
        ComponentSpec(
            "local",
            LocalRendezvous.from_config,
            LocalRendezvousConfig,
            "one node, no server (the default)",
        )
    ]
