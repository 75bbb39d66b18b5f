"""The ``rdzv=redis`` schema, registered in Hydra's ConfigStore by elastic-run."""

from __future__ import annotations

from dataclasses import dataclass

from elastic_runner.rendezvous.kit import StoreRendezvousConfig

__all__ = ["DEFAULT_PORT", "RedisRendezvousConfig"]

DEFAULT_PORT = 6379


@dataclass
class RedisRendezvousConfig(StoreRendezvousConfig):
    backend: str = "redis"
    #: ``host:port`` of the Redis server (one; Sentinel and Cluster are not supported).
    endpoint: str = f"127.0.0.1:{DEFAULT_PORT}"
    #: Redis database number.
    db: int = 0
    #: Namespace of elastic-run's keys (several jobs and other data can share a server).
    prefix: str = "elastic-runner:"
    #: ACL user and password (``requirepass`` alone: the password only).
    username: str | None = None
    password: str | None = None
    #: TLS: ``rediss://``; ``ca_cert`` verifies the server.
    tls: bool = False
    ca_cert: str | None = None
    #: Seconds one request may take.
    request_timeout: float = 10.0
