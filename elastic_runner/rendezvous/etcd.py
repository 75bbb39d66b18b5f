"""Backend ``etcd``: dynamic rendezvous on an etcd cluster (v3 API), for jobs that outgrow
one store host or must survive the loss of any single node.

``rdzv=etcd rdzv.endpoint=etcd1:2379,etcd2:2379 rdzv.id=run42 nnodes=2:8``. Keys live
under ``rdzv.prefix`` + ``rdzv/<run id>/`` and are removed by the last node to leave.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from elastic_runner.hookspecs import hookimpl
from elastic_runner.registry import ComponentSpec
from elastic_runner.rendezvous.dynamic import (
    DynamicRendezvous,
    StoreRendezvousConfig,
    address_towards,
    parse_endpoints,
    settings_from,
)
from elastic_runner.rendezvous.etcd_store import EtcdStore
from elastic_runner.spec import RunContext

__all__ = ["DEFAULT_PORT", "EtcdRendezvousConfig"]

DEFAULT_PORT = 2379


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


def _etcd(config: EtcdRendezvousConfig, context: RunContext) -> DynamicRendezvous:
    endpoints = parse_endpoints(config.endpoint, DEFAULT_PORT)
    settings = settings_from(config, context)
    store = EtcdStore(
        endpoints,
        namespace=config.prefix,
        ca_cert=config.ca_cert,
        cert=config.cert,
        key=config.key,
        user=config.user,
        password=config.password,
        timeout=config.request_timeout,
    )
    host, port = endpoints[0]
    return DynamicRendezvous(
        store,
        settings,
        backend="etcd",
        endpoint=store.address,
        local_addr=config.local_addr or address_towards(host, port),
    )


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
