"""The Redis store and rendezvous against elastic_runner's conformance suites, on a real
redis-server, plus its own failure modes."""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
from elastic_runner_redis import RedisStore
from elastic_runner_redis.testing import RedisServer

from elastic_runner.rendezvous.store import (
    Store,
    StoreError,
    StoreTimeoutError,
    StoreUnavailableError,
)
from elastic_runner.testing.rendezvous_suite import RendezvousSuite
from elastic_runner.testing.store_suite import StoreSuite


def clients_of(server: RedisServer) -> Iterator[Callable[[], Store]]:
    made: list[RedisStore] = []

    def make() -> RedisStore:
        made.append(RedisStore("127.0.0.1", server.port, namespace="suite:"))
        return made[-1]

    yield make
    for client in made:
        client.close()


class TestRedisStore(StoreSuite):
    TTL = 0.3

    @pytest.fixture
    def make_store(self, redis_server: RedisServer) -> Iterator[Callable[[], Store]]:
        yield from clients_of(redis_server)


class TestRedisRendezvous(RendezvousSuite):
    TTL = 0.5

    @pytest.fixture
    def make_store(self, redis_server: RedisServer) -> Iterator[Callable[[], Store]]:
        yield from clients_of(redis_server)


def test_namespaces_do_not_see_each_other(redis_server: RedisServer) -> None:
    a = RedisStore("127.0.0.1", redis_server.port, namespace="a:")
    b = RedisStore("127.0.0.1", redis_server.port, namespace="b:")
    a.set("k", "from a")
    assert b.get("k") is None
    assert b.scan("")[0] == {}
    assert a.scan("")[0] == {"k": "from a"}


def test_wrong_password_is_a_clear_error(tmp_path: Path) -> None:
    server = RedisServer(tmp_path, password="right")
    try:
        assert RedisStore("127.0.0.1", server.port, password="right").get("k") is None
        with pytest.raises(StoreError, match=r"Redis at 127\.0\.0\.1:\d+ refused the credentials"):
            RedisStore("127.0.0.1", server.port, password="wrong").get("k")
    finally:
        server.stop()


def test_unreachable_server_is_unavailable(redis_server: RedisServer) -> None:
    store = RedisStore("127.0.0.1", redis_server.port, timeout=1)
    redis_server.stop()
    message = f"cannot reach Redis at 127.0.0.1:{redis_server.port}"
    with pytest.raises(StoreUnavailableError, match=re.escape(message)):
        store.get("k")


def test_a_waiter_is_sent_only_the_changes_under_its_prefix(redis_server: RedisServer) -> None:
    # One channel for every change sent each of N waiters every change: a 1,024-node
    # round moved 300 MiB. A waiter's channels are those of its prefix.
    watcher = RedisStore("127.0.0.1", redis_server.port, namespace="w:")
    writer = RedisStore("127.0.0.1", redis_server.port, namespace="w:")
    admin = redis.Redis(port=redis_server.port)
    try:
        _, version = watcher.scan("mine/")
        woke: list[int] = []
        thread = threading.Thread(
            target=lambda: woke.append(watcher.wait_for_change("mine/[1]*?", version, 10))
        )
        thread.start()
        deadline = time.monotonic() + 5
        while not (admin.pubsub_numpat() or admin.pubsub_channels()):  # subscribed
            assert time.monotonic() < deadline, "the watcher never subscribed"
            time.sleep(0.01)
        sent = int(admin.info("stats")["total_net_output_bytes"])
        for i in range(300):
            writer.set(f"other/{i}", "x" * 100)
        spent = int(admin.info("stats")["total_net_output_bytes"]) - sent
        assert not woke
        print(f"{spent} bytes sent for 300 changes outside the watched prefix")
        assert spent < 300 * 20, spent  # the writer's answers only, nothing to the watcher
        # The prefix's glob characters are escaped: a channel the raw prefix would match
        # as a pattern reaches nobody; one under the prefix reaches the waiter.
        channel = "w:meta:events:"
        assert admin.publish(channel + "mine/1xx", "x") == 0
        assert admin.publish(channel + "other/0", "x") == 0
        assert admin.publish(channel + "mine/[1]*?/probe", "x") == 1
        assert not woke  # (woken, it found no change under its prefix: it waits on)
        writer.set("mine/[1]*?/k", "1")
        thread.join(5)
        assert woke and woke[0] > version
    finally:
        watcher.close()
        writer.close()
        admin.close()


def test_a_threads_waits_share_one_connection(redis_server: RedisServer) -> None:
    # A pub/sub of its own for each wait cost a connection per wait, and the pool connected
    # the closed one again for the next request: 1.25 ms of client CPU a wait, 0.71 now.
    store = RedisStore("127.0.0.1", redis_server.port, namespace="reuse:")
    writer = RedisStore("127.0.0.1", redis_server.port, namespace="reuse:")
    admin = redis.Redis(port=redis_server.port)
    writes: list[threading.Timer] = []
    try:
        store.get("warm")
        writer.get("warm")
        before = int(admin.info("stats")["total_connections_received"])
        for i in range(20):
            _, version = store.scan("k/")
            if i % 2:  # woken by a change
                writes.append(threading.Timer(0.01, lambda i=i: writer.set(f"k/{i}", "x")))
                writes[-1].start()
                assert store.wait_for_change("k/", version, 5) > version
            else:  # timed out
                with pytest.raises(StoreTimeoutError):
                    store.wait_for_change("k/", version, 0.02)
            store.wait([f"k/{i}" for i in range(1, i + 1, 2)], 5)
        opened = int(admin.info("stats")["total_connections_received"]) - before
        assert opened <= 2, f"{opened} connections for 40 waits"
        assert admin.pubsub_numpat() == 0  # every wait unsubscribed
    finally:
        for write in writes:  # a write's answer may still be on the way
            write.join(5)
        store.close()
        writer.close()
        admin.close()
