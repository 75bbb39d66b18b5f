"""Backend ``etcd``: dynamic rendezvous on an etcd cluster (v3 API), for jobs that outgrow
one store host or must survive the loss of any single node.

``rdzv=etcd rdzv.endpoint=etcd1:2379,etcd2:2379 rdzv.id=run42 nnodes=2:8``. Keys live
under ``rdzv.prefix`` + ``rdzv/<run id>/`` and are removed by the last node to leave.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from elastic_runner.errors import ConfigError
from elastic_runner.hookspecs import hookimpl
from elastic_runner.registry import ComponentSpec
from elastic_runner.rendezvous.dynamic import DynamicRendezvous
from elastic_runner.rendezvous.etcd_store import APIS, EtcdStore, grpc_available
from elastic_runner.rendezvous.kit import StoreConnection, StoreRendezvousConfig, store_rendezvous
from elastic_runner.spec import RunContext

__all__ = ["DEFAULT_PORT", "EtcdRendezvousConfig"]

DEFAULT_PORT = 2379

log = logging.getLogger(__name__)


@dataclass
class EtcdRendezvousConfig(StoreRendezvousConfig):
    backend: str = "etcd"
    #: Namespace of elastic-run's keys in the cluster.
    prefix: str = "/elastic-runner/"
    #: TLS: the CA that signed etcd's certificate; a client certificate and its key.
    ca_cert: str | None = None
    cert: str | None = None
    key: str | None = None
    #: etcd user authentication.
    user: str | None = None
    password: str | None = None
    #: Seconds one etcd request may take before the next endpoint is tried.
    request_timeout: float = 10.0
    #: How to reach etcd: ``http`` (its JSON gateway) or ``grpc`` (a third of the
    #: gateway's CPU on etcd; needs ``grpcio``: ``pip install 'elastic-runner[etcd]'``).
    api: str = "http"


def _etcd(config: EtcdRendezvousConfig, context: RunContext) -> DynamicRendezvous:
    if config.api not in APIS:
        raise ConfigError("rdzv.api", config.api, f"allowed: {', '.join(APIS)}")
    if config.api == "grpc" and not grpc_available():
        raise ConfigError(
            "rdzv.api", "grpc", "needs grpcio: pip install 'elastic-runner[etcd]' (or grpcio)"
        )

    def connect(endpoints: list[tuple[str, int]]) -> StoreConnection:
        store = EtcdStore(
            endpoints,
            namespace=config.prefix,
            ca_cert=config.ca_cert,
            cert=config.cert,
            key=config.key,
            user=config.user,
            password=config.password,
            timeout=config.request_timeout,
            api=config.api,
        )
        way = "gRPC (rdzv.api=grpc)" if store.api == "grpc" else "its JSON gateway"
        log.info("etcd at %s, over %s", store.address, way)
        return StoreConnection(store, address=store.address)

    return store_rendezvous(config, context, connect, default_port=DEFAULT_PORT)


@hookimpl
def elastic_runner_rendezvous_backends() -> Sequence[ComponentSpec]:
    return [
        ComponentSpec(
            "etcd",
            _etcd,
            EtcdRendezvousConfig,
            "dynamic (min:max nodes) on an etcd cluster, v3 API",
        )
    ]
