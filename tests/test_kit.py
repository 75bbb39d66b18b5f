"""The store-backed rendezvous kit: validation before connecting, one error line per bad
key, nothing leaked when building fails, and where MASTER_ADDR comes from; plus the
``tcp`` backend's own connect on top of it."""

from __future__ import annotations

import socket
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from elastic_runner.errors import ConfigError
from elastic_runner.rendezvous import kit, tcp
from elastic_runner.rendezvous.api import NodeInfo
from elastic_runner.rendezvous.kit import (
    StoreConnection,
    StoreRendezvousConfig,
    parse_endpoints,
    store_rendezvous,
)
from elastic_runner.rendezvous.store import MemoryStore
from elastic_runner.spec import RunContext


@dataclass
class FakeConfig(StoreRendezvousConfig):
    backend: str = "fake"
    endpoint: str = "127.0.0.1:7000"
    id: str | None = "job"
    heartbeat_interval: float = 0.2
    heartbeat_timeout: float = 2.0


class ClosingStore(MemoryStore):
    """A memory store that remembers being closed."""

    closed = False

    def close(self) -> None:
        self.closed = True
        super().close()


class Connector:
    """A ``connect`` that records its calls and what it handed out."""

    def __init__(self, local_addr: str | Callable[[], str] | None = None) -> None:
        self.calls: list[list[tuple[str, int]]] = []
        self.store = ClosingStore()
        self.local_addr = local_addr
        self.on_close_calls = 0

    def __call__(self, endpoints: list[tuple[str, int]]) -> StoreConnection:
        self.calls.append(endpoints)
        return StoreConnection(
            self.store, address="fake:1", local_addr=self.local_addr, on_close=self.on_close
        )

    def on_close(self) -> None:
        self.on_close_calls += 1


def context(tmp_path: Path, nodes: int = 1) -> RunContext:
    return RunContext(
        run_id=uuid.uuid4().hex[:8],
        run_dir=tmp_path,
        node="here",
        min_nodes=nodes,
        max_nodes=nodes,
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize(
    ("backend", "several", "message"),
    [
        ("tcp", "rdzv=etcd", "rdzv=tcp takes one host:port (several endpoints: rdzv=etcd)"),
        ("static", "rdzv=etcd", "rdzv=static takes one host:port (several endpoints: rdzv=etcd)"),
        ("redis", None, "rdzv=redis takes one host:port"),
    ],
)
def test_too_many_endpoints_is_one_error_naming_the_backend(
    tmp_path: Path, backend: str, several: str | None, message: str
) -> None:
    connect = Connector()
    config = FakeConfig(backend=backend, endpoint="a:1,b:2")
    with pytest.raises(ConfigError) as caught:
        store_rendezvous(
            config,
            context(tmp_path),
            connect,
            default_port=7000,
            max_endpoints=1,
            several_endpoints=several,
        )
    assert str(caught.value) == f"rdzv.endpoint=a:1,b:2: {message}"
    assert connect.calls == []


def test_endpoints_are_counted_before_they_are_parsed(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="takes one host:port"):
        store_rendezvous(
            FakeConfig(endpoint="a:1,b:99999"),
            context(tmp_path),
            Connector(),
            default_port=1,
            max_endpoints=1,
        )


def test_several_endpoints_reach_connect_parsed(tmp_path: Path) -> None:
    connect = Connector()
    store_rendezvous(
        FakeConfig(endpoint="a:1, [::1]:2,c", local_addr="127.0.0.1"),
        context(tmp_path),
        connect,
        default_port=7000,
    ).shutdown()
    assert connect.calls == [[("a", 1), ("::1", 2), ("c", 7000)]]


@pytest.mark.parametrize(
    ("changes", "close_timeout", "message"),
    [
        ({"endpoint": "h:99999"}, None, "rdzv.endpoint=h:99999: expected host:port"),
        ({"id": None}, None, "rdzv.id=(unset): rdzv=fake needs a job id shared by all nodes"),
        ({"join_timeout": -1.0}, None, "rdzv.join_timeout=-1.0: expected seconds >= 0"),
        (
            {"heartbeat_timeout": 0.2},
            None,
            "rdzv.heartbeat_timeout=0.2: must exceed rdzv.heartbeat_interval (0.2)",
        ),
        ({}, -1.0, "rdzv.close_timeout=-1.0: expected seconds >= 0"),
    ],
)
def test_config_is_validated_before_connect_is_called(
    tmp_path: Path, changes: dict[str, Any], close_timeout: float | None, message: str
) -> None:
    connect = Connector()
    config = FakeConfig(**changes)
    with pytest.raises(ConfigError) as caught:
        store_rendezvous(
            config, context(tmp_path), connect, default_port=7000, close_timeout=close_timeout
        )
    assert str(caught.value).startswith(message)
    assert connect.calls == []


def test_close_timeout_is_checked_before_the_other_settings(tmp_path: Path) -> None:
    # tcp's order since before the kit: rdzv.close_timeout, then rdzv.id
    with pytest.raises(ConfigError, match=r"^rdzv\.close_timeout="):
        store_rendezvous(
            FakeConfig(id=None), context(tmp_path), Connector(), default_port=1, close_timeout=-1
        )


def test_a_failure_after_connecting_closes_the_store_and_calls_on_close(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("cannot build")

    monkeypatch.setattr(kit, "DynamicRendezvous", broken)
    connect = Connector()
    with pytest.raises(RuntimeError, match="cannot build"):
        store_rendezvous(FakeConfig(), context(tmp_path), connect, default_port=7000)
    assert connect.calls and connect.store.closed
    assert connect.on_close_calls == 1


def test_on_close_runs_even_when_closing_the_store_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("cannot build")

    def failing_close() -> None:
        raise OSError("already gone")

    monkeypatch.setattr(kit, "DynamicRendezvous", broken)
    connect = Connector()
    monkeypatch.setattr(connect.store, "close", failing_close)
    with pytest.raises(RuntimeError, match="cannot build"):  # the first error, not close's
        store_rendezvous(FakeConfig(), context(tmp_path), connect, default_port=7000)
    assert connect.on_close_calls == 1


def test_shutdown_closes_the_store_then_calls_on_close_once(tmp_path: Path) -> None:
    connect = Connector()
    rdzv = store_rendezvous(
        FakeConfig(local_addr="127.0.0.1"), context(tmp_path), connect, default_port=7000
    )
    assert not connect.store.closed and connect.on_close_calls == 0
    rdzv.shutdown()
    assert connect.store.closed and connect.on_close_calls == 1
    rdzv.shutdown()  # the agent, then the run's assembly step: the second does nothing
    assert connect.on_close_calls == 1


@pytest.mark.parametrize(
    ("configured", "from_connection", "expected"),
    [
        ("127.0.0.3", "127.0.0.2", "127.0.0.3"),  # rdzv.local_addr wins
        (None, "127.0.0.2", "127.0.0.2"),  # then what the backend knows
        (None, lambda: "127.0.0.2", "127.0.0.2"),  # ... found once the store is reached
        (None, None, "127.0.0.4"),  # then the route towards the first endpoint
    ],
)
def test_master_addr_precedence(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    configured: str | None,
    from_connection: str | Callable[[], str] | None,
    expected: str,
) -> None:
    towards: list[tuple[str, int]] = []

    def address_towards(host: str, port: int) -> str:
        towards.append((host, port))
        return "127.0.0.4"

    monkeypatch.setattr(kit, "address_towards", address_towards)
    rdzv = store_rendezvous(
        FakeConfig(endpoint="first:5,second:6", local_addr=configured),
        context(tmp_path),
        Connector(local_addr=from_connection),
        default_port=7000,
    )
    try:
        info = rdzv.next_round(NodeInfo("default", 1))
    finally:
        rdzv.shutdown()
    assert info.master_addr == expected
    assert towards == ([("first", 5)] if expected == "127.0.0.4" else [])


def test_parse_endpoints() -> None:
    assert parse_endpoints("a:1,b", 9) == [("a", 1), ("b", 9)]
    with pytest.raises(ConfigError, match=r"e\.g\. node0:9"):
        parse_endpoints("a:x", 9)


# -- the tcp backend on the kit ---------------------------------------------------------


def _tcp_config(port: int, **changes: object) -> tcp.TcpRendezvousConfig:
    config = tcp.TcpRendezvousConfig(
        endpoint=f"127.0.0.1:{port}", id="job", heartbeat_interval=0.2, heartbeat_timeout=2.0
    )
    for key, value in changes.items():
        setattr(config, key, value)
    return config


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_tcp_hosts_nothing_when_a_key_is_bad(tmp_path: Path) -> None:
    port = _free_port()
    with pytest.raises(ConfigError, match=r"^rdzv\.close_timeout=-1: expected seconds >= 0"):
        tcp._tcp(_tcp_config(port, close_timeout=-1), context(tmp_path))
    assert not _listening(port)


def test_tcp_closes_its_server_when_the_client_cannot_be_made(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("no client")

    monkeypatch.setattr(tcp, "TCPStoreClient", broken)
    port = _free_port()
    with pytest.raises(RuntimeError, match="no client"):
        tcp._tcp(_tcp_config(port, is_host=True), context(tmp_path))
    assert not _listening(port)


def test_tcp_closes_its_server_when_building_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("cannot build")

    monkeypatch.setattr(kit, "DynamicRendezvous", broken)
    port = _free_port()
    with pytest.raises(RuntimeError, match="cannot build"):
        tcp._tcp(_tcp_config(port, is_host=True), context(tmp_path))
    assert not _listening(port)


def test_tcp_master_addr_is_the_client_address(tmp_path: Path) -> None:
    port = _free_port()
    rdzv = tcp._tcp(_tcp_config(port, is_host=True), context(tmp_path))
    try:
        assert _listening(port)
        info = rdzv.next_round(NodeInfo("default", 1))
        assert info.master_addr == "127.0.0.1"
    finally:
        rdzv.shutdown()
    assert not _listening(port)
