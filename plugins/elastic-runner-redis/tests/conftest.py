from elastic_runner_redis.testing import redis_server  # noqa: F401

from elastic_runner.testing.fixtures import elastic_run  # noqa: F401
