"""The ``tcp`` and ``static`` backends' own decisions: which agent hosts the store (node
rank 0 for ``static``, whatever DNS says; for ``tcp``, a name that does not resolve yet
is not local unless it is this machine's own), where the hosted store listens
(``rdzv.bind``), and that the hosting agent reaches its own store without DNS.

Every address is a loopback one; names that must not resolve fail through a
monkeypatched ``socket.getaddrinfo``, so nothing is sent."""

from __future__ import annotations

import ipaddress
import socket
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from elastic_runner.rendezvous import tcp
from elastic_runner.rendezvous.api import NodeInfo, RendezvousError, RendezvousInfo
from elastic_runner.rendezvous.dynamic import DynamicRendezvous
from elastic_runner.rendezvous.store import StoreError
from elastic_runner.rendezvous.tcp_store import TCPStoreClient
from elastic_runner.spec import RunContext


def _context(tmp_path: Path, nodes: int, run_id: str = "job") -> RunContext:
    return RunContext(
        run_id=run_id, run_dir=tmp_path, node="here", min_nodes=nodes, max_nodes=nodes
    )


def _config(endpoint: str, **changes: object) -> tcp.TcpRendezvousConfig:
    config = tcp.TcpRendezvousConfig(
        endpoint=endpoint,
        id="job",
        heartbeat_interval=0.2,
        heartbeat_timeout=2.0,
        join_timeout=10,
        last_call_timeout=0.1,
    )
    for key, value in changes.items():
        setattr(config, key, value)
    return config


def _static(endpoint: str, node_rank: int, **changes: object) -> tcp.StaticRendezvousConfig:
    config = tcp.StaticRendezvousConfig(
        endpoint=endpoint,
        id="job",
        heartbeat_interval=0.2,
        heartbeat_timeout=2.0,
        join_timeout=10,
        node_rank=node_rank,
    )
    for key, value in changes.items():
        setattr(config, key, value)
    return config


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _listening(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(5)
        return s.connect_ex((host, port)) == 0


@pytest.fixture
def handlers() -> Iterator[list[DynamicRendezvous]]:
    """Rendezvous handlers made by a test, shut down at its end (last made first: the
    hosting one, usually made first, keeps the store up until the others left)."""
    made: list[DynamicRendezvous] = []
    yield made
    for handler in reversed(made):
        handler.shutdown()


@pytest.fixture
def unresolvable(monkeypatch: pytest.MonkeyPatch) -> Callable[[str], list[str]]:
    """``unresolvable("head-0.invalid")``: that name does not resolve (as before its DNS
    record exists); any other looked-up name must be an IP literal, so nothing leaves
    this machine. Returns every name looked up."""
    real = socket.getaddrinfo
    looked_up: list[str] = []

    def setup(name: str) -> list[str]:
        def getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
            looked_up.append(host)
            if host == name:
                raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
            if host is not None:
                ipaddress.ip_address(host)  # a name here would be asked of DNS
            return real(host, *args, **kwargs)

        monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
        return looked_up

    return setup


def _join_all(rdzvs: list[DynamicRendezvous]) -> list[RendezvousInfo]:
    results: list[Any] = [None] * len(rdzvs)

    def join(i: int) -> None:
        try:
            results[i] = rdzvs[i].next_round(NodeInfo("default", 1))
        except Exception as exc:
            results[i] = exc

    threads = [threading.Thread(target=join, args=(i,)) for i in range(len(rdzvs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    for result in results:
        if isinstance(result, Exception):
            raise result
    return results


# -- where the hosted store listens -------------------------------------------------------


def test_the_hosted_store_is_reached_on_any_address_of_this_machine(
    tmp_path: Path, handlers: list[DynamicRendezvous]
) -> None:
    port = _free_port()
    handlers.append(tcp._tcp(_config(f"127.0.0.1:{port}", is_host=True), _context(tmp_path, 2)))
    # another node would use another address of this machine than the endpoint names
    assert _listening("127.0.0.2", port)
    handlers.append(tcp._tcp(_config(f"127.0.0.2:{port}", is_host=False), _context(tmp_path, 2)))
    infos = _join_all(handlers)
    assert sorted(info.group_rank for info in infos) == [0, 1]
    assert {info.master_addr for info in infos} == {"127.0.0.1"}  # all on this machine


def test_rdzv_bind_restricts_the_store_to_one_address(
    tmp_path: Path, handlers: list[DynamicRendezvous]
) -> None:
    port = _free_port()
    handlers.append(
        tcp._tcp(
            _config(f"127.0.0.1:{port}", is_host=True, bind="127.0.0.1"), _context(tmp_path, 1)
        )
    )
    assert _listening("127.0.0.1", port)
    assert not _listening("127.0.0.2", port)
    with pytest.raises(
        StoreError, match=rf"cannot reach the rendezvous store at 127\.0\.0\.2:{port}"
    ):
        TCPStoreClient("127.0.0.2", port, connect_timeout=0.2).get("k")
    info = handlers[0].next_round(NodeInfo("default", 1))
    assert info.master_addr == "127.0.0.1"


def test_rdzv_bind_to_an_address_of_no_interface_here_is_one_line(tmp_path: Path) -> None:
    port = _free_port()
    with pytest.raises(RendezvousError) as caught:  # TEST-NET-3: bind fails, nothing sent
        tcp._tcp(_config(f"127.0.0.1:{port}", bind="203.0.113.7"), _context(tmp_path, 1))
    assert str(caught.value) == (
        f"cannot host the rendezvous store on 203.0.113.7:{port}: "
        "rdzv.bind=203.0.113.7 is not an address of this machine"
    )
    assert not _listening("127.0.0.1", port)


def test_rdzv_bind_to_a_name_that_does_not_resolve_is_one_line(
    tmp_path: Path, unresolvable: Callable[[str], list[str]]
) -> None:
    unresolvable("store.invalid")
    port = _free_port()
    with pytest.raises(RendezvousError) as caught:
        tcp._tcp(_config(f"127.0.0.1:{port}", bind="store.invalid"), _context(tmp_path, 1))
    assert str(caught.value) == (
        f"cannot host the rendezvous store on store.invalid:{port}: "
        "cannot resolve rdzv.bind=store.invalid (Name or service not known)"
    )


def test_other_agents_on_this_machine_become_clients(
    tmp_path: Path, handlers: list[DynamicRendezvous]
) -> None:
    port = _free_port()
    for _ in range(3):  # the first binds, the others find the port taken
        handlers.append(tcp._tcp(_config(f"127.0.0.1:{port}"), _context(tmp_path, 3)))
    infos = _join_all(handlers)
    assert sorted(info.group_rank for info in infos) == [0, 1, 2]
    assert {info.master_addr for info in infos} == {"127.0.0.1"}


def test_a_port_taken_by_another_program_is_not_hosted(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.2", 0))  # on one address of this machine only
        busy.listen()
        port = busy.getsockname()[1]
        rdzv = tcp._tcp(
            _config(f"127.0.0.1:{port}", is_host=True, join_timeout=0.2), _context(tmp_path, 1)
        )
        try:
            with pytest.raises(RendezvousError, match=rf"127\.0\.0\.1:{port}"):
                rdzv.next_round(NodeInfo("default", 1))  # a client of nothing
        finally:
            rdzv.shutdown()


# -- who hosts ------------------------------------------------------------------------------


def test_static_node_rank_0_hosts_though_its_endpoint_does_not_resolve(
    tmp_path: Path,
    handlers: list[DynamicRendezvous],
    unresolvable: Callable[[str], list[str]],
) -> None:
    # Kubernetes: the head's DNS name does not exist yet when its pod starts
    looked_up = unresolvable("head-0.invalid")
    port = _free_port()
    context = _context(tmp_path, 2, run_id=uuid.uuid4().hex[:8])
    handlers.append(tcp._static(_static(f"head-0.invalid:{port}", 0), context))
    assert _listening("127.0.0.1", port)
    # node 1, for which the name resolves (here: the address it resolves to)
    handlers.append(tcp._static(_static(f"127.0.0.1:{port}", 1), context))
    infos = _join_all(handlers)
    assert [info.group_rank for info in infos] == [0, 1]
    assert {info.master_addr for info in infos} == {"127.0.0.1"}
    assert "head-0.invalid" not in looked_up  # the host reaches its own store directly


def test_static_node_rank_1_does_not_host_though_its_endpoint_is_local(
    tmp_path: Path,
) -> None:
    port = _free_port()
    rdzv = tcp._static(_static(f"127.0.0.1:{port}", 1, join_timeout=0.5), _context(tmp_path, 2))
    try:
        assert not _listening("127.0.0.1", port)
    finally:
        rdzv.shutdown()


@pytest.mark.parametrize(
    ("is_host", "node_rank", "endpoint_is_local", "hosts"),
    [
        (None, 0, False, True),
        (None, 1, True, False),
        (None, None, True, True),  # tcp: by the endpoint
        (None, None, False, False),
        (True, 1, False, True),  # rdzv.is_host wins
        (False, 0, True, False),
    ],
)
def test_who_hosts(
    monkeypatch: pytest.MonkeyPatch,
    is_host: bool | None,
    node_rank: int | None,
    endpoint_is_local: bool,
    hosts: bool,
) -> None:
    asked: list[str] = []

    def is_local_address(host: str) -> bool:
        asked.append(host)
        return endpoint_is_local

    monkeypatch.setattr(tcp, "is_local_address", is_local_address)
    assert tcp._hosts(_config("node0:1", is_host=is_host), "node0", node_rank) is hosts
    assert asked == (["node0"] if is_host is None and node_rank is None else [])


def test_tcp_with_an_unresolvable_endpoint_is_a_client_that_waits(
    tmp_path: Path, unresolvable: Callable[[str], list[str]]
) -> None:
    unresolvable("head-0.invalid")
    rdzv = tcp._tcp(_config("head-0.invalid:29400", join_timeout=0.3), _context(tmp_path, 2))
    try:
        with pytest.raises(RendezvousError) as caught:
            rdzv.next_round(NodeInfo("default", 1))
    finally:
        rdzv.shutdown()
    assert str(caught.value) == (
        "rendezvous store at head-0.invalid:29400: cannot resolve rendezvous store host "
        "'head-0.invalid' (tried for 1 s): [Errno -2] Name or service not known"
    )


def test_tcp_hosts_when_its_unresolvable_endpoint_is_this_machines_name(
    tmp_path: Path,
    handlers: list[DynamicRendezvous],
    monkeypatch: pytest.MonkeyPatch,
    unresolvable: Callable[[str], list[str]],
) -> None:
    unresolvable("head-0.invalid")
    monkeypatch.setattr(socket, "gethostname", lambda: "head-0.invalid")
    port = _free_port()
    handlers.append(tcp._tcp(_config(f"head-0.invalid:{port}"), _context(tmp_path, 1)))
    assert _listening("127.0.0.1", port)
    info = handlers[0].next_round(NodeInfo("default", 1))
    assert info.master_addr == "127.0.0.1"
