"""Backends ``tcp`` (dynamic, min:max nodes) and ``static`` (a fixed count, ranks given),
both on the built-in TCP store hosted by one of the agents.

The agent whose address matches ``rdzv.endpoint`` (or that has ``rdzv.is_host=true``)
hosts the store; when several agents on one machine share the endpoint, the first to
bind hosts and the others connect. If the hosting agent dies, the others fail with an
error naming the endpoint (the store does not move to another node).
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Sequence
from dataclasses import dataclass

from omegaconf import MISSING

from elastic_runner.config import ConfigError
from elastic_runner.hookspecs import hookimpl
from elastic_runner.registry import ComponentSpec
from elastic_runner.rendezvous.api import RendezvousError
from elastic_runner.rendezvous.dynamic import (
    DynamicRendezvous,
    StoreRendezvousConfig,
    parse_endpoints,
    settings_from,
)
from elastic_runner.rendezvous.tcp_store import TCPStoreClient
from elastic_runner.spec import RunContext

__all__ = ["DEFAULT_PORT", "StaticRendezvousConfig", "TcpRendezvousConfig"]

DEFAULT_PORT = 29400


@dataclass
class TcpRendezvousConfig(StoreRendezvousConfig):
    backend: str = "tcp"
    #: Host the store here (true), never (false), or when the endpoint is local (null).
    is_host: bool | None = None
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


def _is_local(host: str) -> bool:
    """True when ``host`` names this machine (we can bind to one of its addresses)."""
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except OSError:
        return False
    for family, _, _, _, addr in infos:
        with socket.socket(family, socket.SOCK_STREAM) as s:
            try:
                s.bind((addr[0], 0))
                return True
            except OSError:
                continue
    return False


def _connect(
    config: TcpRendezvousConfig, context: RunContext, node_rank: int | None = None
) -> DynamicRendezvous:
    if "," in config.endpoint:
        raise ConfigError(
            "rdzv.endpoint",
            config.endpoint,
            "rdzv=tcp takes one host:port (several endpoints: rdzv=etcd)",
        )
    ((host, port),) = parse_endpoints(config.endpoint, DEFAULT_PORT)
    if config.close_timeout is not None and config.close_timeout < 0:
        raise ConfigError("rdzv.close_timeout", config.close_timeout, "expected seconds >= 0")
    settings = settings_from(config, context, node_rank, config.close_timeout)
    server = None
    if config.is_host or (config.is_host is None and _is_local(host)):
        from elastic_runner.rendezvous.tcp_server import TCPStoreServer

        try:
            server = TCPStoreServer(host, port, config.token)
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise RendezvousError(
                    f"cannot host the rendezvous store on {host}:{port}: {exc.strerror}"
                ) from None
            # another agent on this machine hosts it: be its client
    client = TCPStoreClient(
        host,
        port,
        config.token,
        connect_timeout=max(1.0, config.join_timeout),
        reconnect_timeout=config.heartbeat_timeout,
    )
    return DynamicRendezvous(
        client,
        settings,
        backend=config.backend,
        endpoint=f"{host}:{port}",
        local_addr=config.local_addr or (lambda: client.local_address),
        on_close=server.close if server else None,
    )


def _tcp(config: TcpRendezvousConfig, context: RunContext) -> DynamicRendezvous:
    return _connect(config, context)


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
    return _connect(config, context, node_rank=config.node_rank)


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
