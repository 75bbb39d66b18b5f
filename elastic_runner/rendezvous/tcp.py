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
``rdzv.join_timeout``. If the hosting agent dies, the store moves to a surviving node
(``rdzv.failover``, on for ``tcp``; :mod:`elastic_runner.rendezvous.failover`) when a
strict majority of the last round's nodes survive; else the others fail with an error
naming the endpoint.

Security: the token (``rdzv.token``, or read from ``rdzv.token_file``, or from the
environment variable ``rdzv.token_env``, else ``$ELASTIC_RUNNER_RDZV_TOKEN``) is what
every agent must present; a store that listens beyond loopback without one logs a loud
warning at start on the hosting agent (``rdzv.token_required=true``: an error on every
node instead). TLS with ``rdzv.cert`` and ``rdzv.key`` on the hosting agent, checked by
the others against ``rdzv.ca_cert``.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import os
import resource
import socket
import ssl
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from omegaconf import MISSING

from elastic_runner.addresses import is_loopback
from elastic_runner.errors import ConfigError
from elastic_runner.hookspecs import hookimpl
from elastic_runner.registry import ComponentSpec
from elastic_runner.rendezvous.api import RendezvousError
from elastic_runner.rendezvous.dynamic import DynamicRendezvous
from elastic_runner.rendezvous.failover import StoreFailover
from elastic_runner.rendezvous.kit import StoreConnection, StoreRendezvousConfig, store_rendezvous
from elastic_runner.rendezvous.network import is_local_address, listen_socket
from elastic_runner.rendezvous.tcp_store import TCPStoreClient
from elastic_runner.spec import RunContext

if TYPE_CHECKING:
    from elastic_runner.rendezvous.tcp_server import TCPStoreServer

__all__ = [
    "DEFAULT_PORT",
    "TOKEN_ENV",
    "StaticRendezvousConfig",
    "TcpRendezvousConfig",
    "resolve_token",
    "tls_contexts",
]

log = logging.getLogger(__name__)

DEFAULT_PORT = 29400
#: Where the token is read from when no ``rdzv.token*`` key says otherwise.
TOKEN_ENV = "ELASTIC_RUNNER_RDZV_TOKEN"
#: The longest token (it travels in the small frame allowed before authentication).
MAX_TOKEN = 1024


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
    #: A file holding the token (surrounding whitespace ignored), instead of rdzv.token.
    token_file: str | None = None
    #: The environment variable holding the token (default: $ELASTIC_RUNNER_RDZV_TOKEN,
    #: when it is set).
    token_env: str | None = None
    #: No token is an error (unless rdzv.bind is a loopback address), not a warning.
    token_required: bool = False
    #: TLS: the CA that signed the hosting agent's certificate (the others check it);
    #: that certificate and its key (the agent that hosts the store serves them).
    ca_cert: str | None = None
    cert: str | None = None
    key: str | None = None
    #: How long the agent hosting the store keeps it up for nodes still running after it
    #: finished (null: as long as they are alive; closing earlier fails their run).
    close_timeout: float | None = None
    #: When the agent hosting the store dies, a surviving node hosts it (each node that
    #: does not host keeps a port ready for that); rounds after a move need a strict
    #: majority of the last round's nodes.
    failover: bool = True


@dataclass
class StaticRendezvousConfig(TcpRendezvousConfig):
    backend: str = "static"
    #: This node's group rank, 0 .. nnodes-1.
    node_rank: int = MISSING
    last_call_timeout: float = 0.0
    failover: bool = False


def _hosts(config: TcpRendezvousConfig, host: str, node_rank: int | None) -> bool:
    """Whether this agent hosts the store (unless another agent here already does)."""
    if config.is_host is not None:
        return config.is_host
    if node_rank is not None:  # static: node rank 0, whatever DNS says
        return node_rank == 0
    return is_local_address(host)


def resolve_token(config: TcpRendezvousConfig, environ: Mapping[str, str] | None = None) -> str:
    """The token, from the one place the config names: ``rdzv.token``,
    ``rdzv.token_file`` or ``rdzv.token_env``; else ``$ELASTIC_RUNNER_RDZV_TOKEN``, else
    none (``""``). A :class:`ConfigError` for two sources at once, a file that cannot be
    read or is empty, a variable that is not set, or no token with
    ``rdzv.token_required=true`` (unless ``rdzv.bind`` is a loopback address)."""
    env = os.environ if environ is None else environ
    given = [k for k in ("token", "token_file", "token_env") if getattr(config, k)]
    if len(given) > 1:
        second = given[1]
        raise ConfigError(
            f"rdzv.{second}",
            "(set)" if second == "token" else getattr(config, second),
            f"give the token one way: rdzv.{given[0]} is set too",
        )
    key, token = "rdzv.token", config.token
    if config.token_file:
        key = "rdzv.token_file"
        try:
            with open(config.token_file, encoding="utf-8") as f:
                token = f.read(MAX_TOKEN * 4 + 1).strip()
        except (OSError, UnicodeDecodeError) as exc:
            why = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
            raise ConfigError(key, config.token_file, f"cannot read it: {why}") from None
        if not token:
            raise ConfigError(key, config.token_file, "the file is empty")
    elif config.token_env:
        key = "rdzv.token_env"
        token = env.get(config.token_env, "")
        if not token:
            raise ConfigError(key, config.token_env, f"${config.token_env} is not set")
    elif not token:
        token = env.get(TOKEN_ENV, "")
        key = f"${TOKEN_ENV}"
    if token and (len(token) > MAX_TOKEN or len(json.dumps(token)) > 3 * MAX_TOKEN):
        raise ConfigError(key, "(hidden)", f"a token of at most {MAX_TOKEN} characters")
    if not token and config.token_required and not _loopback_only(config.bind):
        raise ConfigError(
            "rdzv.token_required",
            "true",
            "no token on this node: set rdzv.token, rdzv.token_file or "
            f"${TOKEN_ENV} (or rdzv.bind=127.0.0.1 for a job on this machine only)",
        )
    return token


def _loopback_only(bind: str | None) -> bool:
    """Whether a store listening on ``bind`` (None: every interface) is reachable from
    this machine only."""
    return bind is not None and is_loopback(bind.strip("[]"))


def tls_contexts(
    config: TcpRendezvousConfig,
) -> tuple[ssl.SSLContext | None, ssl.SSLContext | None]:
    """(server context, client context) when TLS is on (any of ``rdzv.ca_cert``,
    ``rdzv.cert``, ``rdzv.key`` set), else (None, None). The server context is ``None``
    without a certificate and key (an agent that hosts then refuses to start). The client
    checks the store's certificate against ``rdzv.ca_cert`` (default: the system's CAs)
    and the endpoint's name."""
    if not (config.ca_cert or config.cert or config.key):
        return None, None
    for key in ("ca_cert", "cert", "key"):
        path = getattr(config, key)
        if path and not os.path.isfile(path):
            raise ConfigError(f"rdzv.{key}", path, "no such file")
    if bool(config.cert) != bool(config.key):
        missing = "key" if config.cert else "cert"
        raise ConfigError(
            f"rdzv.{missing}", None, "rdzv.cert and rdzv.key go together (TLS for rdzv=tcp)"
        )
    try:
        client = ssl.create_default_context(cafile=config.ca_cert)
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError("rdzv.ca_cert", config.ca_cert, f"not a CA certificate: {exc}") from None
    client.minimum_version = ssl.TLSVersion.TLSv1_2
    server = None
    if config.cert and config.key:
        server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        server.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            server.load_cert_chain(config.cert, config.key)
        except (ssl.SSLError, OSError) as exc:
            raise ConfigError(
                "rdzv.cert", config.cert, f"cannot load it with rdzv.key: {exc}"
            ) from None
    return server, client


def _host_store(
    config: TcpRendezvousConfig,
    host: str,
    port: int,
    node_rank: int | None = None,
    token: str | None = None,
    ssl_context: ssl.SSLContext | None = None,
) -> TCPStoreServer | None:
    """The store server, when this agent hosts it; ``None`` when it is only a client."""
    if not _hosts(config, host, node_rank):
        return None
    token = config.token if token is None else token
    if ssl_context is None and (config.ca_cert or config.cert or config.key):
        raise ConfigError(
            "rdzv.cert",
            None,
            "this agent hosts the store: with TLS it needs rdzv.cert and rdzv.key",
        )
    # Imported here: asyncio costs every agent that does not host ~11 ms.
    from elastic_runner.rendezvous.tcp_server import TCPStoreServer

    try:
        server = TCPStoreServer(config.bind, port, token, ssl_context=ssl_context)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE and node_rank is None and config.is_host is None:
            return None  # another agent on this machine hosts it: be its client
        # static's node rank 0 and rdzv.is_host=true are the only host: a busy port is an
        # error now, not a wait for join_timeout against whatever holds it
        where = f"{config.bind}:{port}" if config.bind else f"port {port} (all interfaces)"
        if config.bind and isinstance(exc, socket.gaierror):
            why = f"cannot resolve rdzv.bind={config.bind} ({exc.strerror})"
        elif config.bind and exc.errno == errno.EADDRNOTAVAIL:
            why = f"rdzv.bind={config.bind} is not an address of this machine"
        else:
            why = os.strerror(exc.errno) if exc.errno else str(exc)
        raise RendezvousError(f"cannot host the rendezvous store on {where}: {why}") from None
    if not token and not _loopback_only(config.bind):
        where = f"on {config.bind}" if config.bind else "on every interface"
        log.warning(
            "WARNING: the rendezvous store (port %d, %s) has no token, so anyone who can "
            "reach it can read this job's keys and end it. Set rdzv.token (or "
            "rdzv.token_file, or $%s) on every node, or rdzv.bind=127.0.0.1 for a job "
            "on this machine only; rdzv.token_required=true makes this an error",
            server.port,
            where,
            TOKEN_ENV,
        )
    return server


def _check_capacity(server: TCPStoreServer, max_nodes: int) -> None:
    """Warn when the store cannot take the connections of ``max_nodes`` nodes (two
    each, three at moments) under this process's open-file limit."""
    needed = 3 * max_nodes + 8
    if server.limits.max_connections < needed:
        log.warning(
            "WARNING: the rendezvous store takes at most %d connections under this agent's "
            "open-file limit (ulimit -n %d), and %d nodes need about %d: raise the limit on "
            "this machine (e.g. ulimit -n 65536)",
            server.limits.max_connections,
            resource.getrlimit(resource.RLIMIT_NOFILE)[0],
            max_nodes,
            needed,
        )


def _tcp_store_rendezvous(
    config: TcpRendezvousConfig, context: RunContext, node_rank: int | None = None
) -> DynamicRendezvous:
    token = resolve_token(config)
    server_tls, client_tls = tls_contexts(config)

    def connect(endpoints: list[tuple[str, int]]) -> StoreConnection:
        ((host, port),) = endpoints  # the kit let one through
        server = _host_store(config, host, port, node_rank, token, server_tls)
        if server is not None:
            _check_capacity(server, context.max_nodes)
        try:
            client = TCPStoreClient(
                # the store this agent hosts is reached without DNS
                server.local_host if server is not None else host,
                port,
                token,
                connect_timeout=max(1.0, config.join_timeout),
                reconnect_timeout=config.heartbeat_timeout,
                # A request on a cut link fails within the heartbeat timeout, not 60 s
                # later: a node that heals rejoins that much sooner.
                request_timeout=max(2.0, config.heartbeat_timeout),
                ssl_context=client_tls,
                # the certificate names the endpoint, whichever address reaches it
                server_hostname=host.strip("[]"),
            )
        except BaseException:
            if server is not None:
                server.close()
            raise
        failover = None
        if server is None and config.failover and (server_tls is not None or not client_tls):
            failover = _failover(config, token, server_tls, client_tls, host)
        return StoreConnection(
            client,
            address=f"{host}:{port}",
            # The client's own end of its connection: the interface that reaches the
            # store, found once the store is reached (the host agent may start later).
            # Loopback on the hosting agent: the rendezvous then advertises its address
            # towards the other nodes instead.
            local_addr=lambda: client.local_address,
            on_close=server.close if server is not None else None,
            failover=failover,
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
        agent_hosted=True,
        majority=config.failover,
    )


def _failover(
    config: TcpRendezvousConfig,
    token: str,
    server_tls: ssl.SSLContext | None,
    client_tls: ssl.SSLContext | None,
    endpoint_host: str,
) -> StoreFailover:
    """This node's part in moving the store: a port reserved now (a listening socket,
    nothing imported or started), served if elected."""

    def serve(sock: socket.socket) -> TCPStoreServer:
        # Imported here: asyncio costs every agent that does not host ~11 ms.
        from elastic_runner.rendezvous.tcp_server import TCPStoreServer

        return TCPStoreServer(config.bind, 0, token, ssl_context=server_tls, listening=sock)

    def connect(addr: str, port: int, patience: float) -> TCPStoreClient:
        return TCPStoreClient(
            addr,
            port,
            token,
            connect_timeout=1.0,  # refused: that node is gone
            reconnect_timeout=config.heartbeat_timeout,
            request_timeout=max(patience, 2.0, config.heartbeat_timeout),
            ssl_context=client_tls,
            # TLS: the certificates name the endpoint; each node's must name its own
            # address too, for it to host the store after a move
            server_hostname=addr.strip("[]") if client_tls else endpoint_host.strip("[]"),
        )

    return StoreFailover(
        lambda: listen_socket(config.bind, 0),
        serve,
        connect,
        # a survivor elected later than this one (it noticed the loss later, or was
        # stopping its workers) starts serving within about this long
        patience=2 * config.heartbeat_timeout + 5.0,
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
    if not config.id and context.max_nodes == 1:
        # No other node has to agree on the id: the run's fresh one will do (as with
        # rdzv=local). With more nodes the kit still asks for one.
        config = dataclasses.replace(config, id=context.run_id)
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
