"""Backends ``tcp`` (dynamic, min:max nodes) and ``static`` (a fixed count, ranks given),
both on the built-in TCP store hosted by one of the agents.

Which agent hosts the store: ``rdzv.is_host`` when set; else, for ``static``, node rank
0 (whatever the endpoint's name resolves to, or whether it resolves yet), and for
``tcp`` the agent whose address matches ``rdzv.endpoint`` (a name that does not resolve
yet is not local, unless it is this machine's own name). When several agents on one
machine would host, the first to bind does and the others connect. The store listens
on every interface (``rdzv.bind``: on one address only), so the other nodes reach it
however the endpoint's name resolves on the hosting machine; that agent itself connects
over loopback, without asking DNS. Clients retry resolving and connecting until
``rdzv.join_timeout``. If the hosting agent dies, the others fail with an error naming
the endpoint (the store does not move to another node).
"""

from __future__ import annotations

import errno
import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from omegaconf import MISSING

from elastic_runner.errors import ConfigError
from elastic_runner.hookspecs import hookimpl
from elastic_runner.registry import ComponentSpec
from elastic_runner.rendezvous.api import RendezvousError
from elastic_runner.rendezvous.dynamic import DynamicRendezvous
from elastic_runner.rendezvous.kit import StoreConnection, StoreRendezvousConfig, store_rendezvous
from elastic_runner.rendezvous.network import is_local_address
from elastic_runner.rendezvous.tcp_store import TCPStoreClient
from elastic_runner.spec import RunContext

if TYPE_CHECKING:
    from elastic_runner.rendezvous.tcp_server import TCPStoreServer

__all__ = ["DEFAULT_PORT", "StaticRendezvousConfig", "TcpRendezvousConfig"]

DEFAULT_PORT = 29400


@dataclass
class TcpRendezvousConfig(StoreRendezvousConfig):
    backend: str = "tcp"
    #: Host the store here (true), never (false), or (null) when the endpoint is local
    #: (``static``: on node rank 0).
    is_host: bool | None = None
    #: The one address the hosted store listens on (null: every interface).
    bind: str | None = None
    #: Shared secret every agent must present to the store.
    token: str = ""
    #: How long the agent hosting the store keeps it up for nodes still running after it
    #: finished (null: as long as they are alive; closing earlier fails their run).
    close_timeout: float | None = None


@dataclass
class StaticRendezvousConfig(TcpRendezvousConfig):
    backend: str = "static"
    #: This node's group rank, 0 .. nnodes-1.
    node_rank: int = MISSING
    last_call_timeout: float = 0.0


def _hosts(config: TcpRendezvousConfig, host: str, node_rank: int | None) -> bool:
    """Whether this agent hosts the store (unless another agent here already does)."""
    if config.is_host is not None:
        return config.is_host
    if node_rank is not None:  # static: node rank 0, whatever DNS says
        return node_rank == 0
    return is_local_address(host)


def _host_store(
    config: TcpRendezvousConfig, host: str, port: int, node_rank: int | None = None
) -> TCPStoreServer | None:
    """The store server, when this agent hosts it; ``None`` when it is only a client."""
    if not _hosts(config, host, node_rank):
        return None
    # Imported here: asyncio costs every agent that does not host ~11 ms.
    from elastic_runner.rendezvous.tcp_server import TCPStoreServer

    try:
        return TCPStoreServer(config.bind, port, config.token)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            return None  # another agent on this machine hosts it: be its client
        where = f"{config.bind}:{port}" if config.bind else f"port {port} (all interfaces)"
        if config.bind and isinstance(exc, socket.gaierror):
            why = f"cannot resolve rdzv.bind={config.bind} ({exc.strerror})"
        elif config.bind and exc.errno == errno.EADDRNOTAVAIL:
            why = f"rdzv.bind={config.bind} is not an address of this machine"
        else:
            why = os.strerror(exc.errno) if exc.errno else str(exc)
        raise RendezvousError(f"cannot host the rendezvous store on {where}: {why}") from None


def _tcp_store_rendezvous(
    config: TcpRendezvousConfig, context: RunContext, node_rank: int | None = None
) -> DynamicRendezvous:
    def connect(endpoints: list[tuple[str, int]]) -> StoreConnection:
        ((host, port),) = endpoints  # the kit let one through
        server = _host_store(config, host, port, node_rank)
        try:
            client = TCPStoreClient(
                # the store this agent hosts is reached without DNS
                server.local_host if server is not None else host,
                port,
                config.token,
                connect_timeout=max(1.0, config.join_timeout),
                reconnect_timeout=config.heartbeat_timeout,
                # A request on a cut link fails within the heartbeat timeout, not 60 s
                # later: a node that heals rejoins that much sooner.
                request_timeout=max(2.0, config.heartbeat_timeout),
            )
        except BaseException:
            if server is not None:
                server.close()
            raise
        return StoreConnection(
            client,
            address=f"{host}:{port}",
            # The client's own end of its connection: the interface that reaches the
            # store, found once the store is reached (the host agent may start later).
            # Loopback on the hosting agent: the rendezvous then advertises its address
            # towards the other nodes instead.
            local_addr=lambda: client.local_address,
            on_close=server.close if server is not None else None,
        )

    return store_rendezvous(
        config,
        context,
        connect,
        default_port=DEFAULT_PORT,
        max_endpoints=1,
        several_endpoints="rdzv=etcd",
        node_rank=node_rank,
        close_timeout=config.close_timeout,
    )


def _tcp(config: TcpRendezvousConfig, context: RunContext) -> DynamicRendezvous:
    return _tcp_store_rendezvous(config, context)


def _static(config: StaticRendezvousConfig, context: RunContext) -> DynamicRendezvous:
    if context.min_nodes != context.max_nodes:
        raise ConfigError(
            "nnodes",
            f"{context.min_nodes}:{context.max_nodes}",
            "rdzv=static needs a fixed node count, e.g. nnodes=2",
        )
    if not 0 <= config.node_rank < context.max_nodes:
        raise ConfigError(
            "rdzv.node_rank", config.node_rank, f"expected 0..{context.max_nodes - 1}"
        )
    return _tcp_store_rendezvous(config, context, node_rank=config.node_rank)


@hookimpl
def elastic_runner_rendezvous_backends() -> Sequence[ComponentSpec]:
    return [
        ComponentSpec(
            "tcp",
            _tcp,
            TcpRendezvousConfig,
            "dynamic (min:max nodes) on a TCP store hosted by one agent",
        ),
        ComponentSpec(
            "static",
            _static,
            StaticRendezvousConfig,
            "a fixed node count with rdzv.node_rank given, on the TCP store",
        ),
    ]
