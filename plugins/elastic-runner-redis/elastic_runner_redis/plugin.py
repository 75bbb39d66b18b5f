"""The plugin module registered through the ``elastic_runner`` entry point."""

from __future__ import annotations

from collections.abc import Sequence

from elastic_runner import hookimpl
from elastic_runner.config import ConfigError
from elastic_runner.registry import ComponentSpec
from elastic_runner.rendezvous.dynamic import (
    DynamicRendezvous,
    address_towards,
    parse_endpoints,
    settings_from,
)
from elastic_runner.spec import RunContext
from elastic_runner_redis.config import DEFAULT_PORT, RedisRendezvousConfig
from elastic_runner_redis.store import RedisStore


def make_rendezvous(config: RedisRendezvousConfig, context: RunContext) -> DynamicRendezvous:
    endpoints = parse_endpoints(config.endpoint, DEFAULT_PORT)
    if len(endpoints) != 1:
        raise ConfigError("rdzv.endpoint", config.endpoint, "rdzv=redis takes one host:port")
    if config.db < 0:
        raise ConfigError("rdzv.db", config.db, "expected a database number >= 0")
    settings = settings_from(config, context)
    (host, port) = endpoints[0]
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
    return DynamicRendezvous(
        store,
        settings,
        backend="redis",
        endpoint=store.address,
        local_addr=config.local_addr or address_towards(host, port),
    )


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
