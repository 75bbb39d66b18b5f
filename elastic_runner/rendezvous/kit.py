"""The store-backed rendezvous kit: what a backend on a key-value store needs.

A backend brings a config class (a :class:`StoreRendezvousConfig` with its own keys) and
a way to reach its :class:`~elastic_runner.rendezvous.store.Store`;
:func:`store_rendezvous` does the rest: it validates every key first (one
:class:`~elastic_runner.errors.ConfigError` line for the first bad one), only then
connects, and builds the :class:`~elastic_runner.rendezvous.dynamic.DynamicRendezvous`::

    def make(config: MyStoreConfig, context: RunContext) -> DynamicRendezvous:
        def connect(endpoints: list[tuple[str, int]]) -> StoreConnection:
            store = MyStore(endpoints)
            return StoreConnection(store, address=store.address)

        return store_rendezvous(config, context, connect, default_port=7000)

Its parts are public too, for a backend that needs them alone: :func:`settings_from` and
:func:`parse_endpoints`.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

from omegaconf import MISSING

from elastic_runner.addresses import address_towards
from elastic_runner.config import (
    RendezvousConfig,
    parse_master_addr,
    parse_master_port,
    parse_run_id,
    parse_seconds,
)
from elastic_runner.errors import ConfigError
from elastic_runner.rendezvous.dynamic import DynamicRendezvous, RendezvousSettings
from elastic_runner.rendezvous.failover import StoreFailover
from elastic_runner.rendezvous.network import parse_endpoints
from elastic_runner.rendezvous.store import Store
from elastic_runner.spec import RunContext

__all__ = [
    "StoreConnection",
    "StoreRendezvousConfig",
    "parse_endpoints",
    "settings_from",
    "store_rendezvous",
]


@dataclass
class StoreRendezvousConfig(RendezvousConfig):
    """The keys every store-based backend (``tcp``, ``static``, ``etcd``, plugins such as
    ``redis``) shares."""

    #: Where the store is: ``host:port`` (several, comma-separated, where supported).
    endpoint: str = MISSING
    #: MASTER_ADDR when this node is group rank 0 (default: this node's address on the
    #: interface that reaches the store; if that is a loopback address while another
    #: node's is not, the address on the interface that reaches that node). The job-wide
    #: ``master_addr`` wins when both are set.
    local_addr: str | None = None
    join_timeout: float = 600.0
    last_call_timeout: float = 30.0
    heartbeat_interval: float = 5.0
    heartbeat_timeout: float = 15.0
    #: How long a node that finished waits for the others before leaving.
    exit_barrier_timeout: float = 300.0


@dataclass(frozen=True)
class StoreConnection:
    """What a backend's ``connect`` returns to :func:`store_rendezvous`."""

    store: Store
    #: Names the store in messages: ``host:port``, several joined with commas.
    address: str
    #: MASTER_ADDR when this node is group rank 0 and ``rdzv.local_addr`` is unset, where
    #: the backend knows better than the route towards the first endpoint (tcp: the
    #: client socket's own address, read once the store is reached). Like that default,
    #: it gives way to a reachable address when it is loopback and another node's is not.
    local_addr: str | Callable[[], str] | None = None
    #: Called after the store is closed when the rendezvous shuts down (e.g. to close a
    #: store server this node hosts).
    on_close: Callable[[], None] | None = None
    #: How the store moves to a surviving node when the agent hosting it dies (the
    #: agent-hosted TCP store); closed with the store.
    failover: StoreFailover | None = None

    def close(self) -> None:
        """Close the store, then call ``on_close``, even when closing the store fails."""
        try:
            self.store.close()
        finally:
            if self.failover is not None:
                self.failover.close()
            if self.on_close is not None:
                self.on_close()


def settings_from(
    config: StoreRendezvousConfig,
    context: RunContext,
    node_rank: int | None = None,
    close_timeout: float | None = None,
) -> RendezvousSettings:
    """Validated settings from a backend's config (one clear error per bad key): the
    run id as ``rdzv.id`` allows, every duration a finite number of seconds (the
    heartbeat interval above 0), ``rdzv.master_addr`` and ``rdzv.master_port`` as
    :func:`~elastic_runner.config.validate` allows them."""
    if close_timeout is not None:
        parse_seconds("rdzv.close_timeout", close_timeout)
    if not config.id:
        raise ConfigError(
            "rdzv.id",
            None,
            f"rdzv={config.backend} needs a job id shared by all nodes, e.g. rdzv.id=myjob",
        )
    parse_run_id(config.id)
    for key in ("join_timeout", "last_call_timeout", "heartbeat_timeout", "exit_barrier_timeout"):
        parse_seconds(f"rdzv.{key}", getattr(config, key))
    parse_seconds("rdzv.heartbeat_interval", config.heartbeat_interval, positive=True)
    if config.heartbeat_timeout <= config.heartbeat_interval:
        raise ConfigError(
            "rdzv.heartbeat_timeout",
            config.heartbeat_timeout,
            f"must exceed rdzv.heartbeat_interval ({config.heartbeat_interval:g})",
        )
    parse_master_addr(config.master_addr)
    master_port = parse_master_port(config.master_port)
    return RendezvousSettings(
        run_id=context.run_id,
        min_nodes=context.min_nodes,
        max_nodes=context.max_nodes,
        join_timeout=config.join_timeout,
        last_call_timeout=config.last_call_timeout,
        heartbeat_interval=config.heartbeat_interval,
        heartbeat_timeout=config.heartbeat_timeout,
        exit_barrier_timeout=config.exit_barrier_timeout,
        close_timeout=close_timeout,
        node_rank=node_rank,
        master_port=master_port,
    )


def store_rendezvous(
    config: StoreRendezvousConfig,
    context: RunContext,
    connect: Callable[[list[tuple[str, int]]], StoreConnection],
    *,
    default_port: int,
    max_endpoints: int | None = None,
    several_endpoints: str | None = None,
    node_rank: int | None = None,
    close_timeout: float | None = None,
    agent_hosted: bool = False,
    majority: bool = False,
) -> DynamicRendezvous:
    """A :class:`DynamicRendezvous` on the store that ``connect`` reaches.

    Validates first, in this order: the number of endpoints (at most ``max_endpoints``;
    ``several_endpoints`` names where to go with more, e.g. ``"rdzv=etcd"``), each
    endpoint (a missing port is ``default_port``), then the settings
    (:func:`settings_from`, with ``node_rank`` and ``close_timeout``); with
    ``agent_hosted`` (the store is served by one of the agents, at the endpoint's port,
    maybe on group rank 0's machine), ``rdzv.master_port`` may not be that port;
    ``majority`` goes into the settings (:class:`RendezvousSettings`). Only
    then calls ``connect`` with the parsed endpoints; ``connect`` cleans up after itself
    if it fails. MASTER_ADDR is ``rdzv.master_addr``, else ``rdzv.local_addr``, else
    the connection's ``local_addr``, else this machine's address towards the first
    endpoint (found when the store is reached); either default, when it is a loopback
    address while another node's is not, gives way to this machine's address towards
    that node. MASTER_PORT is ``rdzv.master_port``, else a free port per round. If
    building fails after ``connect`` returned, the connection is closed before the error
    goes on.
    """
    if max_endpoints is not None and len(config.endpoint.split(",")) > max_endpoints:
        # Counted before parsing: "a:1,b:2" to a one-endpoint backend is a wrong backend,
        # not a typo, whatever the endpoints look like.
        takes = "one host:port" if max_endpoints == 1 else f"at most {max_endpoints} endpoints"
        elsewhere = f" (several endpoints: {several_endpoints})" if several_endpoints else ""
        raise ConfigError(
            "rdzv.endpoint", config.endpoint, f"rdzv={config.backend} takes {takes}{elsewhere}"
        )
    endpoints = parse_endpoints(config.endpoint, default_port)
    settings = dataclasses.replace(
        settings_from(config, context, node_rank, close_timeout),
        agent_hosted=agent_hosted,
        majority=majority,
    )
    if agent_hosted and settings.master_port in {port for _, port in endpoints}:
        # The agent hosting the store may be group rank 0's: worker rank 0 could not bind
        # MASTER_PORT there. Refused whichever node hosts: the rule is the same on all.
        raise ConfigError(
            "rdzv.master_port",
            settings.master_port,
            f"the rendezvous store listens on that port (rdzv.endpoint={config.endpoint}); "
            "the workers' store (torch's TCPStore on worker rank 0, at MASTER_PORT) needs "
            "another port",
        )
    connection = connect(endpoints)
    try:
        # A string is used as it is (rdzv.master_addr, else rdzv.local_addr); a function
        # is a default that the rendezvous replaces when it is loopback and another node
        # is elsewhere.
        local_addr = (
            config.master_addr
            or config.local_addr
            or _default_addr(connection.local_addr, endpoints[0])
        )
        return DynamicRendezvous(
            connection.store,
            settings,
            backend=config.backend,
            endpoint=connection.address,
            local_addr=local_addr,
            on_close=connection.on_close,
            failover=connection.failover,
        )
    except BaseException:
        # Nothing may leak: the caller never sees the store (or the server behind it).
        with contextlib.suppress(Exception):
            connection.close()
        raise


def _default_addr(
    known: str | Callable[[], str] | None, first: tuple[str, int]
) -> Callable[[], str]:
    """MASTER_ADDR's default as a function: what the backend knows, else the route towards
    the first endpoint, found when called (once the store is reached, so it resolves)."""
    if callable(known):
        return known
    if known:
        return lambda: known
    return lambda: address_towards(*first)
