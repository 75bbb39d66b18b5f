"""The rendezvous conformance suite on the in-memory store, the TCP store and etcd; and
the MASTER_ADDR group rank 0 advertises, given every member's address."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from elastic_runner.rendezvous import dynamic, network
from elastic_runner.rendezvous.api import NodeInfo, RendezvousInfo
from elastic_runner.rendezvous.dynamic import DynamicRendezvous, RendezvousSettings
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


# -- MASTER_ADDR: what group rank 0 advertises, from every member's join record ---------


def _form(
    monkeypatch: pytest.MonkeyPatch, addrs: list[str | Callable[[], str]]
) -> tuple[list[RendezvousInfo], list[str]]:
    """One round of ``len(addrs)`` nodes on one store, node ``i`` with group rank ``i``
    and ``local_addr`` ``addrs[i]`` (a string: given as rdzv.local_addr; a function: the
    default, e.g. the store client's own address). Returns each node's round and the
    peers rank 0 asked its route towards (answered 10.0.0.1; nothing is sent)."""
    asked: list[str] = []

    def address_towards(host: str, port: int) -> str:
        asked.append(host)
        return "10.0.0.1"

    monkeypatch.setattr(network, "address_towards", address_towards)
    monkeypatch.setattr(dynamic, "find_free_port", lambda addr: 4242)  # no bind to fakes
    store, run_id = MemoryStore(), uuid.uuid4().hex[:8]
    handlers = [
        DynamicRendezvous(
            store,
            RendezvousSettings(run_id, len(addrs), len(addrs), join_timeout=10, node_rank=i),
            backend="test",
            endpoint="test-store",
            local_addr=addr,
        )
        for i, addr in enumerate(addrs)
    ]
    infos: list[Any] = [None] * len(handlers)

    def join(i: int) -> None:
        infos[i] = handlers[i].next_round(NodeInfo("default", 1))

    threads = [threading.Thread(target=join, args=(i,)) for i in range(len(handlers))]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
    finally:
        for h in handlers:
            h.shutdown()
    assert [info.group_rank for info in infos] == list(range(len(addrs)))
    assert {(info.master_addr, info.master_port) for info in infos} == {
        (infos[0].master_addr, 4242)
    }
    return infos, asked


def _default(addr: str) -> Callable[[], str]:
    return lambda: addr


@pytest.mark.parametrize(
    ("addrs", "master", "asked"),
    [
        # every node on this machine: loopback is right
        (["127.0.0.1", "127.0.0.1"], "127.0.0.1", []),
        ([_default("127.0.0.1"), _default("127.0.0.1")], "127.0.0.1", []),
        # rank 0 hosts the store and reaches it over loopback, the others are elsewhere:
        # its address on the interface towards them (the first non-loopback one)
        ([_default("127.0.1.1"), _default("10.0.0.2")], "10.0.0.1", ["10.0.0.2"]),
        (
            [_default("127.0.0.1"), _default("127.0.0.1"), _default("10.0.0.3")],
            "10.0.0.1",
            ["10.0.0.3"],
        ),
        # rank 0 already has a reachable address; a loopback peer changes nothing
        ([_default("10.0.0.7"), _default("10.0.0.2")], "10.0.0.7", []),
        ([_default("10.0.0.7"), _default("127.0.0.1")], "10.0.0.7", []),
        # rdzv.local_addr always wins, loopback or not
        (["127.0.0.1", _default("10.0.0.2")], "127.0.0.1", []),
        (["node0.example.org", _default("10.0.0.2")], "node0.example.org", []),
        # another node's rdzv.local_addr is its address too
        ([_default("127.0.0.1"), "10.0.0.9"], "10.0.0.1", ["10.0.0.9"]),
    ],
)
def test_master_addr_is_reachable_by_every_member(
    monkeypatch: pytest.MonkeyPatch,
    addrs: list[str | Callable[[], str]],
    master: str,
    asked: list[str],
) -> None:
    infos, towards = _form(monkeypatch, addrs)
    assert infos[0].master_addr == master
    assert towards == asked


def test_each_node_finds_its_address_once_per_round(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []

    def addr(i: int) -> Callable[[], str]:
        def find() -> str:
            calls.append(i)
            return f"10.0.0.{i + 1}"

        return find

    infos, _ = _form(monkeypatch, [addr(0), addr(1)])
    assert sorted(calls) == [0, 1]  # in the join record, read back by rank 0
    assert infos[1].master_addr == "10.0.0.1"


def test_a_done_record_without_addresses_still_completes(monkeypatch: pytest.MonkeyPatch) -> None:
    # written by an agent from before addresses were in the record: [node id, role, nproc]
    monkeypatch.setattr(dynamic, "find_free_port", lambda addr: 4242)
    store, run_id = MemoryStore(), uuid.uuid4().hex[:8]
    handler = DynamicRendezvous(
        store,
        RendezvousSettings(run_id, 1, 1, join_timeout=10),
        backend="test",
        endpoint="test-store",
        local_addr=_default("127.0.0.1"),
    )
    store.set(f"rdzv/{run_id}/round", "0")
    store.set(f"rdzv/{run_id}/alive/{handler.node_id}", "1")
    store.set(f"rdzv/{run_id}/r0/done", json.dumps([[handler.node_id, "default", 2]]))
    try:
        info = handler.next_round(NodeInfo("default", 2))
    finally:
        handler.shutdown()
    assert (info.group_rank, info.nodes, info.master_addr) == (
        0,
        (NodeInfo("default", 2),),
        "127.0.0.1",
    )
