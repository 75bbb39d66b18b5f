"""The store-backed rendezvous kit: validation before connecting, one error line per bad
key, nothing leaked when building fails, and where MASTER_ADDR comes from; plus the
``tcp`` backend's own connect on top of it."""

from __future__ import annotations

import dataclasses
import re
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
from elastic_runner.rendezvous.local import LocalRendezvous, LocalRendezvousConfig
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


# -- pinned MASTER_ADDR / MASTER_PORT (rdzv.master_addr, rdzv.master_port) ------------------


def _pinned_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "rdzv.master_port=" in r.getMessage()]


def test_master_addr_wins_over_local_addr_and_master_port_is_given_as_is(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    pinned = _free_port()
    rdzv = store_rendezvous(
        FakeConfig(local_addr="127.0.0.3", master_addr="trainer-0.example", master_port=pinned),
        context(tmp_path),
        Connector(local_addr="127.0.0.2"),
        default_port=7000,
    )
    try:
        first = rdzv.next_round(NodeInfo("default", 1))
        again = rdzv.next_round(NodeInfo("default", 1), failed=True)
    finally:
        rdzv.shutdown()
    # every round: the same pinned pair, not a free port per round
    assert (first.master_addr, first.master_port) == ("trainer-0.example", pinned)
    assert (again.master_addr, again.master_port) == ("trainer-0.example", pinned)
    assert _pinned_warnings(caplog) == []  # the port is free: nothing to say


def test_a_pinned_port_in_use_is_still_given_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        rdzv = store_rendezvous(
            FakeConfig(local_addr="127.0.0.1", master_port=port),
            context(tmp_path),
            Connector(),
            default_port=7000,
        )
        try:
            info = rdzv.next_round(NodeInfo("default", 1))
        finally:
            rdzv.shutdown()
    assert info.master_port == port  # never silently another one
    [warning] = _pinned_warnings(caplog)
    assert warning.startswith(f"WARNING: rdzv.master_port={port} is in use on this machine")
    assert warning.isprintable()


def test_local_takes_the_pinned_master_port_and_master_addr(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    pinned = _free_port()
    made = LocalRendezvous.from_config(LocalRendezvousConfig(master_port=pinned), context(tmp_path))
    infos = [made.next_round(NodeInfo("default", 1)) for _ in range(2)]
    assert {(i.master_addr, i.master_port) for i in infos} == {("127.0.0.1", pinned)}
    both = LocalRendezvousConfig(local_addr="127.0.0.2", master_addr="localhost")
    info = LocalRendezvous.from_config(both, context(tmp_path)).next_round(NodeInfo("x", 1))
    assert info.master_addr == "localhost"  # master_addr wins
    assert info.master_port != pinned and 0 < info.master_port < 65536  # free, per round
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", pinned))
        taken.listen()
        assert made.next_round(NodeInfo("default", 1)).master_port == pinned
    [warning] = _pinned_warnings(caplog)
    assert f"rdzv.master_port={pinned} is in use" in warning


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"master_port": 0}, "rdzv.master_port=0: expected a port from 1 to 65535, or null"),
        ({"master_port": 65536}, "rdzv.master_port=65536: expected a port from 1 to 65535"),
        ({"master_port": True}, "rdzv.master_port=True: expected a port from 1 to 65535"),
        ({"master_addr": "a b"}, "rdzv.master_addr=a b: expected a host name or IP address"),
    ],
)
def test_bad_pinned_master_values_are_one_line_before_connecting(
    tmp_path: Path, changes: dict[str, Any], message: str
) -> None:
    connect = Connector()
    with pytest.raises(ConfigError) as caught:
        store_rendezvous(FakeConfig(**changes), context(tmp_path), connect, default_port=7000)
    assert str(caught.value).startswith(message)
    assert connect.calls == []
    with pytest.raises(ConfigError, match=f"^{re.escape(message)}"):
        LocalRendezvous.from_config(LocalRendezvousConfig(**changes), context(tmp_path))


def test_a_master_port_on_the_agent_hosted_stores_port_is_refused(tmp_path: Path) -> None:
    connect = Connector()
    config = FakeConfig(endpoint="127.0.0.1:7001", master_port=7001)
    with pytest.raises(ConfigError) as caught:
        store_rendezvous(config, context(tmp_path), connect, default_port=1, agent_hosted=True)
    assert str(caught.value) == (
        "rdzv.master_port=7001: the rendezvous store listens on that port "
        "(rdzv.endpoint=127.0.0.1:7001); the workers' store (torch's TCPStore on worker rank "
        "0, at MASTER_PORT) needs another port"
    )
    assert connect.calls == []
    # a store that no agent hosts (etcd, a plugin's server) may share the number
    store_rendezvous(config, context(tmp_path), connect, default_port=1).shutdown()
    assert connect.calls


@pytest.mark.parametrize("backend", ["tcp", "static"])
def test_tcp_and_static_refuse_their_stores_port_as_master_port(
    tmp_path: Path, backend: str
) -> None:
    port = _free_port()
    config = _tcp_config(port, master_port=port)
    with pytest.raises(ConfigError, match=rf"^rdzv\.master_port={port}: the rendezvous store"):
        if backend == "tcp":
            tcp._tcp(config, context(tmp_path))
        else:
            fields = dataclasses.asdict(config) | {"backend": "static", "node_rank": 0}
            tcp._static(tcp.StaticRendezvousConfig(**fields), context(tmp_path))
    assert not _listening(port)  # refused before hosting anything
