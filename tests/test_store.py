"""The store conformance suite on the in-memory store and the built-in TCP store, plus the
TCP server's own failure modes, where it listens, and how clients find it (a name that
does not resolve yet is retried)."""

from __future__ import annotations

import errno
import ipaddress
import json
import socket
import struct
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from elastic_runner.rendezvous.store import MemoryStore, StoreError, StoreUnavailableError
from elastic_runner.rendezvous.tcp_server import TCPStoreServer
from elastic_runner.rendezvous.tcp_store import TCPStoreClient
from elastic_runner.testing.store_suite import StoreSuite


class TestMemoryStore(StoreSuite):
    @pytest.fixture
    def make_store(self) -> Callable[[], MemoryStore]:
        shared = MemoryStore()
        return lambda: shared


class TestTCPStore(StoreSuite):
    @pytest.fixture
    def make_store(self) -> Iterator[Callable[[], TCPStoreClient]]:
        server = TCPStoreServer("127.0.0.1", 0, token="s3cret")
        clients: list[TCPStoreClient] = []

        def make() -> TCPStoreClient:
            clients.append(TCPStoreClient("127.0.0.1", server.port, token="s3cret"))
            return clients[-1]

        yield make
        for c in clients:
            c.close()
        server.close()


@pytest.fixture
def server() -> Iterator[TCPStoreServer]:
    s = TCPStoreServer("127.0.0.1", 0, token="right")
    yield s
    s.close()


def test_wrong_token_is_rejected(server: TCPStoreServer) -> None:
    with pytest.raises(StoreError, match=r"wrong or missing rdzv.token"):
        TCPStoreClient("127.0.0.1", server.port, token="wrong").get("k")
    with pytest.raises(StoreError, match=r"wrong or missing rdzv.token"):
        TCPStoreClient("127.0.0.1", server.port).get("k")


def test_server_survives_garbage(server: TCPStoreServer) -> None:
    for garbage in (
        b"\x00\x00\x00\x05hello",
        b"GET / HTTP/1.1\r\n\r\n",
        b"\xff" * 8,
        struct.pack(">I", 3) + b"[1]",
        struct.pack(">I", 2**31) + b"x",
    ):
        with socket.create_connection(("127.0.0.1", server.port)) as s:
            s.sendall(garbage)
            s.shutdown(socket.SHUT_WR)
            s.settimeout(5)
            while s.recv(4096):
                pass
    client = TCPStoreClient("127.0.0.1", server.port, token="right")
    client.set("still", "alive")
    assert client.get("still") == "alive"


def test_unknown_op_is_an_error_not_a_crash(server: TCPStoreServer) -> None:
    with socket.create_connection(("127.0.0.1", server.port)) as s:
        for message in ({"id": 1, "op": "hello", "token": "right"}, {"id": 2, "op": "pickle"}):
            body = json.dumps(message).encode()
            s.sendall(struct.pack(">I", len(body)) + body)
            size = struct.unpack(">I", s.recv(4))[0]
            answer = json.loads(s.recv(size))
        assert answer == {"id": 2, "ok": False, "error": "StoreError: unknown request 'pickle'"}


def test_connection_error_names_the_address() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(StoreError, match=rf"127.0.0.1:{port} \(tried for 0.2 s\)"):
        TCPStoreClient("127.0.0.1", port, connect_timeout=0.2).get("k")


# -- where the server listens, and how clients find it ----------------------------------


def _reachable(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as s:
        s.settimeout(5)
        return s.connect_ex((host, port)) == 0


def test_server_listens_on_every_interface_by_default() -> None:
    server = TCPStoreServer(None, 0)
    try:
        assert server.local_host == "127.0.0.1"
        # not only where a name would resolve: any address of this machine, one port
        for host in ("127.0.0.1", "127.0.0.2", "127.0.1.1"):
            assert _reachable(host, server.port), host
            client = TCPStoreClient(host, server.port)
            client.set("via", host)
            assert client.get("via") == host
            client.close()
        if socket.has_ipv6 and _has_ipv6_loopback():
            assert _reachable("::1", server.port)
    finally:
        server.close()
    assert not _reachable("127.0.0.1", server.port)


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


def test_server_given_an_address_listens_there_only() -> None:
    server = TCPStoreServer("127.0.0.1", 0)
    try:
        assert server.local_host == "127.0.0.1"
        assert _reachable("127.0.0.1", server.port)
        assert not _reachable("127.0.0.2", server.port)
        refused = rf"cannot reach the rendezvous store at 127\.0\.0\.2:{server.port} \(tried"
        with pytest.raises(StoreError, match=refused):
            TCPStoreClient("127.0.0.2", server.port, connect_timeout=0.2).get("k")
    finally:
        server.close()


def test_server_on_a_taken_port_raises_address_in_use() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        # a listener on one address of the port is enough to keep "every interface" off it
        with pytest.raises(OSError) as caught:
            TCPStoreServer(None, port)
        assert caught.value.errno == errno.EADDRINUSE


@pytest.fixture
def dns(monkeypatch: pytest.MonkeyPatch) -> Callable[[str, int], list[str]]:
    """``dns("head-0.invalid", n)``: that name fails to resolve for the first ``n`` lookups
    (all of them for n < 0), then resolves to 127.0.0.1. No lookup leaves this process:
    every other name must be an IP literal. Returns the names looked up."""
    real = socket.getaddrinfo
    looked_up: list[str] = []

    def setup(name: str, failures: int) -> list[str]:
        def getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
            looked_up.append(host)
            if host == name:
                if failures < 0 or looked_up.count(name) <= failures:
                    raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
                host = "127.0.0.1"
            else:
                ipaddress.ip_address(host)  # the test would otherwise ask DNS
            return real(host, *args, **kwargs)

        monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
        return looked_up

    return setup


def test_a_store_host_that_never_resolves_is_named_in_the_error(
    dns: Callable[[str, int], list[str]],
) -> None:
    looked_up = dns("head-0.invalid", -1)
    client = TCPStoreClient("head-0.invalid", 29400, connect_timeout=0.3)
    with pytest.raises(StoreUnavailableError) as caught:  # never reached: may yet start
        client.get("k")
    assert str(caught.value) == (
        "cannot resolve rendezvous store host 'head-0.invalid' (tried for 0.3 s): "
        "[Errno -2] Name or service not known"
    )
    assert looked_up.count("head-0.invalid") > 2  # retried, not failed at once


def test_a_store_host_that_resolves_later_is_reached(
    dns: Callable[[str, int], list[str]], server: TCPStoreServer
) -> None:
    looked_up = dns("head-0.invalid", 5)
    client = TCPStoreClient("head-0.invalid", server.port, token="right", connect_timeout=30)
    try:
        client.set("k", "v")
        assert client.get("k") == "v"
    finally:
        client.close()
    assert looked_up.count("head-0.invalid") == 6
