"""The plugin module registered through the ``elastic_runner`` entry point: backend
``rdzv=redis``, elastic-run's store-backed rendezvous kit on a :class:`RedisStore`."""

from __future__ import annotations

from collections.abc import Sequence

from elastic_runner import hookimpl
from elastic_runner.errors import ConfigError
from elastic_runner.registry import ComponentSpec
from elastic_runner.rendezvous import RendezvousHandler
from elastic_runner.rendezvous.kit import StoreConnection, store_rendezvous
from elastic_runner.spec import RunContext
from elastic_runner_redis.config import DEFAULT_PORT, RedisRendezvousConfig
from elastic_runner_redis.store import RedisStore

__all__ = ["make_rendezvous"]


def make_rendezvous(config: RedisRendezvousConfig, context: RunContext) -> RendezvousHandler:
    """The ``rdzv=redis`` rendezvous (the factory elastic-run calls)."""
    # Redis's own key, checked with the kit's before anything connects.
    if config.db < 0:
        raise ConfigError("rdzv.db", config.db, "expected a database number >= 0")

    def connect(endpoints: list[tuple[str, int]]) -> StoreConnection:
        ((host, port),) = endpoints  # the kit let one through
        store = RedisStore(
            host,
            port,
            db=config.db,
            namespace=config.prefix,
            username=config.username,
            password=config.password,
            tls=config.tls,
            ca_cert=config.ca_cert,
            timeout=config.request_timeout,
        )
        return StoreConnection(store, address=store.address)

    return store_rendezvous(config, context, connect, default_port=DEFAULT_PORT, max_endpoints=1)


@hookimpl
def elastic_runner_rendezvous_backends() -> Sequence[ComponentSpec]:
    return [
        ComponentSpec(
            "redis",
            make_rendezvous,
            RedisRendezvousConfig,
            "dynamic (min:max nodes) on a Redis server (rdzv.endpoint=host:6379)",
        )
    ]
