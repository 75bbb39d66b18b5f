"""elastic-runner-redis: ``rdzv=redis rdzv.endpoint=host:6379`` runs elastic-run's
dynamic rendezvous on a Redis server."""

from elastic_runner_redis.config import RedisRendezvousConfig
from elastic_runner_redis.store import RedisStore

__all__ = ["RedisRendezvousConfig", "RedisStore"]
