"""The store conformance suite on the in-memory store and the built-in TCP store, plus the
TCP server's own failure modes."""

from __future__ import annotations

import json
import socket
import struct
from collections.abc import Callable, Iterator

import pytest

from elastic_runner.rendezvous.store import MemoryStore, StoreError
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
