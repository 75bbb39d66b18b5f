"""The ``tcp`` and ``static`` backends' own decisions: which agent hosts the store (node
rank 0 for ``static``, whatever DNS says; for ``tcp``, a name that does not resolve yet
is not local unless it is this machine's own), where the hosted store listens
(``rdzv.bind``), that the hosting agent reaches its own store without DNS; where the
token comes from, the warning for a store open to the network without one, TLS; and
that garbage in the protocol's keys is a protocol error, not a crash or a blind watcher.

Every address is a loopback one; names that must not resolve fail through a
monkeypatched ``socket.getaddrinfo``, so nothing is sent."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ipaddress
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from elastic_runner.errors import ConfigError
from elastic_runner.rendezvous import tcp
from elastic_runner.rendezvous.api import NodeInfo, RendezvousError, RendezvousInfo
from elastic_runner.rendezvous.dynamic import DynamicRendezvous
from elastic_runner.rendezvous.store import StoreError, StoreTimeoutError
from elastic_runner.rendezvous.tcp_server import TCPStoreServer
from elastic_runner.rendezvous.tcp_store import TCPStoreClient
from elastic_runner.spec import RunContext
from tests.test_store import write_test_ca


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


def test_a_port_taken_by_another_program_is_an_error_for_the_one_host(tmp_path: Path) -> None:
    # rdzv.is_host=true and static's node rank 0 are the only host there is: waiting as a
    # client of whatever holds the port would end only at join_timeout
    with socket.socket() as busy:
        busy.bind(("127.0.0.2", 0))  # on one address of this machine only
        busy.listen()
        port = busy.getsockname()[1]
        in_use = rf"cannot host the rendezvous store on port {port} \(all interfaces\): "
        with pytest.raises(RendezvousError, match=in_use + "Address already in use"):
            tcp._tcp(
                _config(f"127.0.0.1:{port}", is_host=True, join_timeout=0.2),
                _context(tmp_path, 1),
            )
        with pytest.raises(RendezvousError, match=in_use):
            tcp._static(_static(f"127.0.0.1:{port}", 0), _context(tmp_path, 2, run_id="busy"))


def test_a_port_taken_on_this_machine_makes_an_auto_host_its_client(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.2", 0))
        busy.listen()
        port = busy.getsockname()[1]
        rdzv = tcp._tcp(_config(f"127.0.0.1:{port}", join_timeout=0.2), _context(tmp_path, 1))
        try:
            with pytest.raises(RendezvousError, match=rf"127\.0\.0\.1:{port}"):
                rdzv.next_round(NodeInfo("default", 1))  # a client of nothing
        finally:
            rdzv.shutdown()


def test_a_port_held_by_a_program_that_never_answers_fails_at_join_timeout_and_says_why(
    tmp_path: Path,
) -> None:
    # torch's TCPStore on the same port, say: the agent cannot host, becomes a client of
    # a listener that never answers, and used to wait in silence (60 s a try, retried
    # until join_timeout, then as long again in shutdown to leave a store it never
    # reached). Now: one warning, the error at join_timeout, a shutdown at once.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        port = silent.getsockname()[1]
        rdzv = tcp._tcp(_config(f"127.0.0.1:{port}", join_timeout=3), _context(tmp_path, 2))
        started = time.monotonic()
        try:
            with pytest.raises(RendezvousError, match="did not answer") as caught:
                rdzv.next_round(NodeInfo("default", 1))
            failed = time.monotonic() - started
        finally:
            rdzv.shutdown()
        shut = time.monotonic() - started - failed
    assert 2.5 < failed < 4.5, failed
    assert shut < 0.5, shut
    assert "another program holds that port" in str(caught.value)


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


def test_static_with_one_node_needs_no_id(
    tmp_path: Path, handlers: list[DynamicRendezvous]
) -> None:
    # one node: nobody to agree with, so the run's fresh id is the job's (as for local)
    port, run_id = _free_port(), uuid.uuid4().hex
    handlers.append(
        tcp._static(_static(f"127.0.0.1:{port}", 0, id=None), _context(tmp_path, 1, run_id))
    )
    [info] = _join_all(handlers)
    assert (info.group_rank, info.group_world_size) == (0, 1)
    client = TCPStoreClient("127.0.0.1", port)
    try:
        assert client.get(f"rdzv/{run_id}/round") == "0"  # the keys are the fresh id's
    finally:
        client.close()


@pytest.mark.parametrize("rdzv_id", [None, ""])
def test_static_with_more_nodes_still_needs_an_id(tmp_path: Path, rdzv_id: str | None) -> None:
    port = _free_port()
    with pytest.raises(ConfigError) as caught:
        tcp._static(_static(f"127.0.0.1:{port}", 0, id=rdzv_id), _context(tmp_path, 2))
    assert str(caught.value) == (
        "rdzv.id=(unset): rdzv=static needs a job id shared by all nodes, e.g. rdzv.id=myjob"
    )
    assert not _listening("127.0.0.1", port)


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
        "'head-0.invalid' (tried for 1 s): [Errno -2] Name or service not known; gave up "
        "after rdzv.join_timeout=0.3 s"
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


# -- the token: where it comes from, and a store open to the network without one ----------


def test_the_token_comes_from_one_place(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(tcp.TOKEN_ENV, raising=False)
    assert tcp.resolve_token(_config("h:1")) == ""
    assert tcp.resolve_token(_config("h:1", token="cli")) == "cli"
    secret = tmp_path / "token"
    secret.write_text("from-file\n")
    assert tcp.resolve_token(_config("h:1", token_file=str(secret))) == "from-file"
    monkeypatch.setenv("MY_TOKEN", "from-env")
    assert tcp.resolve_token(_config("h:1", token_env="MY_TOKEN")) == "from-env"
    monkeypatch.setenv(tcp.TOKEN_ENV, "default-env")
    assert tcp.resolve_token(_config("h:1")) == "default-env"
    assert tcp.resolve_token(_config("h:1", token="cli")) == "cli"  # the config wins


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (
            {"token": "a", "token_file": "/x"},
            "rdzv.token_file=/x: give the token one way: rdzv.token is set too",
        ),
        (
            {"token_file": "/nonexistent/token"},
            "rdzv.token_file=/nonexistent/token: cannot read it: No such file or directory",
        ),
        ({"token_env": "NOT_SET_ANYWHERE"}, "rdzv.token_env=NOT_SET_ANYWHERE: $NOT_SET_ANYWHERE"),
        ({"token": "x" * 1025}, "rdzv.token=(hidden): a token of at most 1024 characters"),
        (
            {"token_required": True},
            "rdzv.token_required=true: no token on this node: set rdzv.token",
        ),
    ],
)
def test_bad_token_sources_are_one_line(
    changes: dict[str, Any], message: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(tcp.TOKEN_ENV, raising=False)
    with pytest.raises(ConfigError) as caught:
        tcp.resolve_token(_config("h:1", **changes))
    assert str(caught.value).startswith(message), str(caught.value)
    assert "\n" not in str(caught.value)


def test_an_empty_token_file_is_an_error(tmp_path: Path) -> None:
    empty = tmp_path / "token"
    empty.write_text("\n")
    with pytest.raises(ConfigError, match=r"rdzv.token_file=.*: the file is empty"):
        tcp.resolve_token(_config("h:1", token_file=str(empty)))


def test_token_required_allows_a_store_on_loopback_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(tcp.TOKEN_ENV, raising=False)
    assert tcp.resolve_token(_config("h:1", token_required=True, bind="127.0.0.1")) == ""


def _no_token_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "has no token" in r.getMessage()]


def test_a_store_open_to_the_network_without_a_token_warns_loudly_once(
    tmp_path: Path,
    handlers: list[DynamicRendezvous],
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(tcp.TOKEN_ENV, raising=False)
    port = _free_port()
    handlers.append(tcp._tcp(_config(f"127.0.0.1:{port}", is_host=True), _context(tmp_path, 2)))
    handlers.append(tcp._tcp(_config(f"127.0.0.1:{port}", is_host=False), _context(tmp_path, 2)))
    _join_all(handlers)
    [warning] = _no_token_warnings(caplog)  # the hosting agent only
    assert warning == (
        f"WARNING: the rendezvous store (port {port}, on every interface) has no token, so "
        "anyone who can reach it can read this job's keys and end it. Set rdzv.token (or "
        "rdzv.token_file, or $ELASTIC_RUNNER_RDZV_TOKEN) on every node, or "
        "rdzv.bind=127.0.0.1 for a job on this machine only; rdzv.token_required=true makes "
        "this an error"
    )


@pytest.mark.parametrize("changes", [{"bind": "127.0.0.1"}, {"token": "s3cret"}])
def test_no_warning_with_a_token_or_on_loopback(
    tmp_path: Path,
    handlers: list[DynamicRendezvous],
    caplog: pytest.LogCaptureFixture,
    changes: dict[str, Any],
) -> None:
    port = _free_port()
    config = _config(f"127.0.0.1:{port}", is_host=True, **changes)
    handlers.append(tcp._tcp(config, _context(tmp_path, 1)))
    handlers[0].next_round(NodeInfo("default", 1))
    assert not _no_token_warnings(caplog)


def test_a_token_file_on_every_node_forms_the_job_and_keeps_others_out(
    tmp_path: Path, handlers: list[DynamicRendezvous], monkeypatch: pytest.MonkeyPatch
) -> None:
    secret = tmp_path / "token"
    secret.write_text("from-a-file\n")
    monkeypatch.setenv(tcp.TOKEN_ENV, "from-a-file")
    port = _free_port()
    handlers.append(
        tcp._tcp(_config(f"127.0.0.1:{port}", token_file=str(secret)), _context(tmp_path, 2))
    )
    handlers.append(tcp._tcp(_config(f"127.0.0.1:{port}"), _context(tmp_path, 2)))  # from $ENV
    assert sorted(i.group_rank for i in _join_all(handlers)) == [0, 1]
    with pytest.raises(StoreError, match=r"wrong or missing rdzv.token"):
        TCPStoreClient("127.0.0.1", port, token="guess").scan("")


# -- TLS ----------------------------------------------------------------------------------------


def test_tls_between_agents(tmp_path: Path, handlers: list[DynamicRendezvous]) -> None:
    files = write_test_ca(tmp_path / "tls")
    port = _free_port()
    tls = {"ca_cert": files.ca, "cert": files.cert, "key": files.key, "token": "t"}
    handlers.append(tcp._tcp(_config(f"127.0.0.1:{port}", **tls), _context(tmp_path, 2)))
    # the other node checks the store against the CA; it needs no certificate of its own
    handlers.append(
        tcp._tcp(
            _config(f"127.0.0.1:{port}", is_host=False, ca_cert=files.ca, token="t"),
            _context(tmp_path, 2),
        )
    )
    assert sorted(i.group_rank for i in _join_all(handlers)) == [0, 1]
    with socket.create_connection(("127.0.0.1", port)) as plain:  # not TLS: nothing readable
        plain.sendall(b"\x00\x00\x00\x02{}")
        plain.settimeout(5)
        assert plain.recv(100) == b""


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"ca_cert": "/nonexistent.pem"}, "rdzv.ca_cert=/nonexistent.pem: no such file"),
        ({"cert": "CERT"}, "rdzv.key=(unset): rdzv.cert and rdzv.key go together"),
        ({"key": "KEY"}, "rdzv.cert=(unset): rdzv.cert and rdzv.key go together"),
        ({"ca_cert": "KEY"}, "rdzv.ca_cert="),
        ({"cert": "CA", "key": "KEY"}, "rdzv.cert="),
        ({"ca_cert": "CA", "is_host": True}, "rdzv.cert=(unset): this agent hosts the store"),
    ],
)
def test_tls_config_errors_are_one_line(
    tmp_path: Path, changes: dict[str, Any], message: str
) -> None:
    files = write_test_ca(tmp_path / "tls")
    paths = {"CA": files.ca, "CERT": files.cert, "KEY": files.key}
    changes = {k: paths.get(v, v) if isinstance(v, str) else v for k, v in changes.items()}
    with pytest.raises(ConfigError) as caught:
        tcp._tcp(_config(f"127.0.0.1:{_free_port()}", **changes), _context(tmp_path, 1))
    assert str(caught.value).startswith(message), str(caught.value)
    assert "\n" not in str(caught.value)


# -- garbage in the protocol's keys: the watcher logs it once and still notices lost nodes --


def test_the_watcher_notices_a_lost_node_whatever_the_round_key_holds(
    tmp_path: Path, handlers: list[DynamicRendezvous], caplog: pytest.LogCaptureFixture
) -> None:
    port = _free_port()
    context = _context(tmp_path, 2, run_id=uuid.uuid4().hex[:8])
    config = _config(f"127.0.0.1:{port}", token="t", heartbeat_timeout=1.0)
    handlers.append(tcp._tcp(config, context))
    handlers.append(tcp._tcp(dataclasses.replace(config, is_host=False), context))
    _join_all(handlers)
    changed = threading.Event()
    handlers[0].on_membership_change(changed.set)
    store = TCPStoreClient("127.0.0.1", port, token="t")
    store.set(f"rdzv/{context.run_id}/round", "not a number")
    time.sleep(0.5)
    assert not changed.is_set()
    lost = handlers.pop()
    lost._stop.set()  # its heartbeat stops, as when its host dies
    store.delete(f"rdzv/{context.run_id}/alive/{lost.node_id}")
    assert changed.wait(5), "the watcher did not notice the lost node"
    protocol = [r.getMessage() for r in caplog.records if "not a round number" in r.getMessage()]
    assert 1 <= len(protocol) <= 2, protocol  # once per node (two nodes in this process)
    assert not [r for r in caplog.records if "unreachable" in r.getMessage()]
    with pytest.raises(RendezvousError, match=r"the key 'round' holds 'not a number'"):
        handlers[0].next_round(NodeInfo("default", 1))
    store.close()
    lost.shutdown()


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("r0/done", "{not json", "the key 'r0/done' holds '{not json', not a round's members"),
        ("r0/done", '[["a", "default", "many"]]', "not a round's members"),
        ("round", "-3", "the key 'round' holds '-3', not a round number"),
    ],
)
def test_garbage_in_a_round_is_one_rendezvous_error(
    tmp_path: Path, handlers: list[DynamicRendezvous], key: str, value: str, message: str
) -> None:
    port = _free_port()
    context = _context(tmp_path, 2, run_id=uuid.uuid4().hex[:8])
    handlers.append(tcp._tcp(_config(f"127.0.0.1:{port}", join_timeout=3), context))
    store = TCPStoreClient("127.0.0.1", port)
    try:
        store.set(f"rdzv/{context.run_id}/{key}", value)
        with pytest.raises(RendezvousError) as caught:
            handlers[0].next_round(NodeInfo("default", 1))
        assert message in str(caught.value)
    finally:
        store.close()


def test_a_malformed_join_record_is_ignored_once(
    tmp_path: Path, handlers: list[DynamicRendezvous], caplog: pytest.LogCaptureFixture
) -> None:
    port = _free_port()
    context = _context(tmp_path, 1, run_id=uuid.uuid4().hex[:8])
    handlers.append(tcp._tcp(_config(f"127.0.0.1:{port}"), context))
    store = TCPStoreClient("127.0.0.1", port)
    p = f"rdzv/{context.run_id}/"
    store.set(p + "round", "0")
    store.set(p + "alive/intruder", "1", ttl=1.0)  # gone by shutdown: no lingering for it
    store.set(p + "r0/join/intruder", '{"role": 5}')
    info = handlers[0].next_round(NodeInfo("default", 1))
    assert info.group_rank == 0 and len(info.nodes) == 1  # the intruder is not in
    assert [r.getMessage() for r in caplog.records if "malformed join" in r.getMessage()] == [
        f"rendezvous store at 127.0.0.1:{port}: ignoring the malformed join record "
        f"{p}r0/join/intruder: '{{\"role\": 5}}'"
    ]
    store.close()


def test_a_store_host_with_too_few_descriptors_for_the_job_says_so(
    tmp_path: Path,
    handlers: list[DynamicRendezvous],
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import resource

    monkeypatch.setattr(resource, "getrlimit", lambda _: (256, resource.RLIM_INFINITY))
    port = _free_port()
    context = RunContext(run_id="job", run_dir=tmp_path, node="here", min_nodes=1, max_nodes=64)
    handlers.append(tcp._tcp(_config(f"127.0.0.1:{port}", token="t"), context))
    [warning] = [r.getMessage() for r in caplog.records if "open-file limit" in r.getMessage()]
    assert warning == (
        "WARNING: the rendezvous store takes at most 128 connections under this agent's "
        "open-file limit (ulimit -n 256), and 64 nodes need about 200: raise the limit on "
        "this machine (e.g. ulimit -n 65536)"
    )


def test_a_node_leaving_an_agent_hosted_store_does_not_wait_for_it_to_close(
    tmp_path: Path, handlers: list[DynamicRendezvous]
) -> None:
    # The host closes its store as soon as the last other node's liveness key is gone; a
    # request after that delete would retry for heartbeat_timeout against nothing.
    port = _free_port()
    context = _context(tmp_path, 2, run_id=uuid.uuid4().hex[:8])
    handlers.append(tcp._tcp(_config(f"127.0.0.1:{port}", heartbeat_timeout=5.0), context))
    client = tcp._tcp(_config(f"127.0.0.1:{port}", heartbeat_timeout=5.0), context)
    handlers.append(client)
    _join_all(handlers)
    host = threading.Thread(target=handlers[0].shutdown)
    host.start()  # lingers until the client has left
    store = client._store
    delete = store.delete

    def delete_then_let_the_host_close(key: str) -> Any:
        done = delete(key)
        if "/alive/" in key:
            host.join(5)  # the host saw the key go, removed the job's keys and closed
            assert not host.is_alive()
        return done

    store.delete = delete_then_let_the_host_close  # type: ignore[method-assign]
    started = time.monotonic()
    client.shutdown()
    assert time.monotonic() - started < 2.0
    assert not _listening("127.0.0.1", port)


# -- the store server wakes only the waits a change concerns ------------------------------


@pytest.fixture
def server() -> Iterator[TCPStoreServer]:
    s = TCPStoreServer("127.0.0.1", 0)
    yield s
    s.close()


def _on_loop(server: TCPStoreServer, look: Callable[[], Any]) -> Any:
    """``look()`` run on the server's event loop (its state is the loop's)."""
    return asyncio.run_coroutine_threadsafe(_call(look), server._loop).result(5)


async def _call(look: Callable[[], Any]) -> Any:
    return look()


def _waiters(server: TCPStoreServer) -> dict[str, int]:
    waiters: dict[str, int] = _on_loop(
        server, lambda: {k: len(v) for k, v in server._waiters.items()}
    )
    return waiters


def test_waits_that_end_leave_no_waiter_behind(server: TCPStoreServer) -> None:
    clients = [TCPStoreClient("127.0.0.1", server.port) for _ in range(4)]
    ended: list[str] = []
    lock = threading.Lock()

    def wait(i: int) -> None:
        client = clients[i % len(clients)]
        try:
            if i % 3 == 2:
                client.wait([f"k/{i}", f"k/{i + 1}", "k/shared"], timeout=0.5)
            else:
                client.wait_for_change(f"p{i % 5}/", 0 if i % 2 else 10**6, timeout=0.5)
            what = "woke"
        except StoreTimeoutError:
            what = "timed out"
        with lock:
            ended.append(what)

    try:
        clients[0].set("p1/x", "1")  # waits on p1/ from version 0 end at once
        threads = [threading.Thread(target=wait, args=(i,)) for i in range(24)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 3
        # blocked waits are registered (each thread's, as it gets there)
        while not {"k/shared", "p0/"} <= set(_waiters(server)) and time.monotonic() < deadline:
            time.sleep(0.01)
        during = _waiters(server)
        assert "k/shared" in during and "p0/" in during
        clients[1].set("p3/y", "1")  # ends the waits on p3/ early
        for t in threads:
            t.join(5)
        assert not any(t.is_alive() for t in threads)
        assert len(ended) == 24 and "timed out" in ended and "woke" in ended
        assert _waiters(server) == {}
    finally:
        for c in clients:
            c.close()


def test_a_change_under_another_prefix_does_not_wake_a_wait(
    server: TCPStoreServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    looks: list[str] = []
    real = server.store.wait_for_change

    def counted(prefix: str, version: int, timeout: float) -> int:
        looks.append(prefix)  # once per start, wake-up or end of a blocked wait
        return real(prefix, version, timeout)

    monkeypatch.setattr(server.store, "wait_for_change", counted)
    waiter, writer = (TCPStoreClient("127.0.0.1", server.port) for _ in range(2))
    outcome: list[float] = []

    def wait() -> None:
        t0 = time.monotonic()
        with contextlib.suppress(StoreTimeoutError):
            waiter.wait_for_change("b/", version, timeout=0.8)
        outcome.append(time.monotonic() - t0)

    try:
        _, version = writer.scan("b/")
        thread = threading.Thread(target=wait)
        thread.start()
        deadline = time.monotonic() + 3
        while "b/" not in _waiters(server) and time.monotonic() < deadline:
            time.sleep(0.01)
        for i in range(20):
            writer.set(f"a/{i}", "x")  # not under b/
            writer.set(f"bb{i}", "x")  # nor this: b/ is a prefix, slash included
        thread.join(5)
        assert not thread.is_alive()
        assert 0.75 <= outcome[0] < 2.0, outcome  # it ran its timeout out
        # a look when it starts and one when its time is up; never woken in between
        assert looks.count("b/") == 2, looks
        assert _waiters(server) == {}
    finally:
        waiter.close()
        writer.close()


def test_a_change_under_a_waits_prefix_wakes_it_at_once(server: TCPStoreServer) -> None:
    waiter, writer = (TCPStoreClient("127.0.0.1", server.port) for _ in range(2))
    woke: list[float] = []
    try:
        _, version = writer.scan("b/")
        thread = threading.Thread(
            target=lambda: woke.append(waiter.wait_for_change("b/", version, timeout=5))
        )
        thread.start()
        deadline = time.monotonic() + 3
        while "b/" not in _waiters(server) and time.monotonic() < deadline:
            time.sleep(0.01)
        t0 = time.monotonic()
        writer.set("b/x", "1")
        thread.join(5)
        assert not thread.is_alive() and woke and woke[0] > version
        assert time.monotonic() - t0 < 1.0
        assert _waiters(server) == {}
    finally:
        waiter.close()
        writer.close()
