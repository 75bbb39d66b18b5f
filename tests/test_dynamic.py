"""The rendezvous conformance suite on the in-memory store, the TCP store and etcd."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import pytest

from elastic_runner.rendezvous.etcd_store import EtcdStore
from elastic_runner.rendezvous.kit import parse_endpoints
from elastic_runner.rendezvous.store import MemoryStore
from elastic_runner.rendezvous.tcp_server import TCPStoreServer
from elastic_runner.rendezvous.tcp_store import TCPStoreClient
from elastic_runner.testing.etcd import EtcdServer
from elastic_runner.testing.rendezvous_suite import RendezvousSuite


class TestOnMemoryStore(RendezvousSuite):
    @pytest.fixture
    def make_store(self) -> Callable[[], MemoryStore]:
        shared = MemoryStore()
        return lambda: shared


class TestOnTCPStore(RendezvousSuite):
    @pytest.fixture
    def make_store(self) -> Iterator[Callable[[], TCPStoreClient]]:
        server = TCPStoreServer("127.0.0.1", 0)
        yield lambda: TCPStoreClient("127.0.0.1", server.port)
        server.close()


class TestOnEtcd(RendezvousSuite):
    TTL = 2.0

    @pytest.fixture
    def make_store(self, etcd_server: EtcdServer) -> Callable[[], EtcdStore]:
        namespace = f"/suite-{time.monotonic_ns()}/"
        return lambda: EtcdStore(parse_endpoints(etcd_server.endpoint, 2379), namespace=namespace)
