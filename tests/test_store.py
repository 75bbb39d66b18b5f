"""The store conformance suite on the in-memory store and the built-in TCP store (plain and
over TLS), plus the TCP server's own failure modes, where it listens, and how clients find
it (a name that does not resolve yet is retried); and how the server defends itself:
frame sizes, time limits, connection caps, bad requests, running out of descriptors."""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import json
import logging
import resource
import shutil
import socket
import ssl
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from elastic_runner.rendezvous import tcp_store
from elastic_runner.rendezvous.store import (
    MemoryStore,
    StoreArgumentError,
    StoreError,
    StoreTimeoutError,
    StoreUnavailableError,
    count_keys,
    refresh_keys,
)
from elastic_runner.rendezvous.tcp_server import MAX_CONNECTIONS, StoreLimits, TCPStoreServer
from elastic_runner.rendezvous.tcp_store import TCPStoreClient
from elastic_runner.rendezvous.tcp_wire import MAX_HELLO, MAX_REQUEST, read_frame
from elastic_runner.testing.store_suite import StoreSuite, StrictStoreSuite


class TestMemoryStore(StrictStoreSuite):
    CLOSE_IS_FINAL = False  # every "client" is the one shared store

    @pytest.fixture
    def make_store(self) -> Callable[[], MemoryStore]:
        shared = MemoryStore()
        return lambda: shared


class TestTCPStore(StrictStoreSuite):
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
    client.close()


def test_unknown_op_is_an_error_not_a_crash(server: TCPStoreServer) -> None:
    with socket.create_connection(("127.0.0.1", server.port)) as s:
        for message in ({"id": 1, "op": "hello", "token": "right"}, {"id": 2, "op": "pickle"}):
            body = json.dumps(message).encode()
            s.sendall(struct.pack(">I", len(body)) + body)
            size = struct.unpack(">I", s.recv(4))[0]
            answer = json.loads(s.recv(size))
        assert answer == {
            "id": 2,
            "ok": False,
            "invalid": True,
            "error": "StoreArgumentError: unknown request 'pickle'",
        }


def test_connection_error_names_the_address() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(StoreError, match=rf"127.0.0.1:{port} \(tried for 0.2 s\)"):
        TCPStoreClient("127.0.0.1", port, connect_timeout=0.2).get("k")


def test_a_port_that_never_answers_hello_is_said_soon_and_named(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Another program on the store's port (torch's TCPStore, an HTTP server, a socket
    # nobody serves) accepts the connection and waits for a request of its own
    # protocol. The client says so after hello_warning, once; after its request timeout
    # it gives up on that connection with an error naming the likely cause, and without
    # the retries a shed connection gets (each would wait as long again).
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()  # the kernel completes connections; nobody ever answers
        port = silent.getsockname()[1]
        client = TCPStoreClient(
            "127.0.0.1", port, connect_timeout=30, request_timeout=1.5, hello_warning=0.3
        )
        with caplog.at_level(logging.WARNING, logger=tcp_store.__name__):
            started = time.monotonic()
            with pytest.raises(StoreUnavailableError) as caught:
                client.get("k")
            took = time.monotonic() - started
            with pytest.raises(StoreUnavailableError):
                client.get("k")  # said once per client, not per try
        client.close()
    assert 1.4 < took < 2.5, took  # the request timeout, once
    assert f"127.0.0.1:{port} accepted a connection but did not answer" in str(caught.value)
    assert "another program holds that port" in str(caught.value)
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 1, said
    assert said[0].startswith(
        f"the rendezvous store at 127.0.0.1:{port} accepted a connection but has not "
        "answered its hello in 0.3 s"
    )


def test_a_slow_answer_to_hello_is_waited_for() -> None:
    # A store swamped by thousands of agents connecting at once answers late: the
    # client waits (it used to give up at the hello warning, and retry into the flood).
    with socket.socket() as slow:
        slow.bind(("127.0.0.1", 0))
        slow.listen()
        port = slow.getsockname()[1]

        def answer_late() -> None:
            conn, _ = slow.accept()
            with conn:
                read_frame(conn)
                time.sleep(0.6)
                conn.sendall(_frame({"id": 1, "ok": True, "result": None}))
                rid = read_frame(conn)["id"]
                conn.sendall(_frame({"id": rid, "ok": True, "result": "v"}))

        server = threading.Thread(target=answer_late)
        server.start()
        client = TCPStoreClient("127.0.0.1", port, request_timeout=5, hello_warning=0.2)
        try:
            assert client.get("k") == "v"
        finally:
            client.close()
            server.join(5)


def test_the_first_contact_window_counts_once_across_calls(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A caller that retries (the rendezvous, until its join timeout) does not get a new
    # connect_timeout on each call; a store not reached after a while is said, once.
    monkeypatch.setattr(tcp_store, "_FIRST_CONTACT_PATIENCE", 0.3)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: refused
    client = TCPStoreClient("127.0.0.1", port, connect_timeout=2.0)
    with caplog.at_level(logging.WARNING, logger=tcp_store.__name__):
        started = time.monotonic()
        for _ in range(2):
            with pytest.raises(StoreUnavailableError, match=r"tried for 2 s"):
                client.get("k")
        took = time.monotonic() - started
    # each call had its own 2 s before: 3 s and more for the two
    assert 1.4 < took < 2.5, took
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 1, said
    assert said[0].startswith(f"still cannot reach the rendezvous store at 127.0.0.1:{port}")


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


# -- the server defends itself: frame sizes, time limits, connection caps, bad requests ----


def _frame(message: object) -> bytes:
    body = message if isinstance(message, bytes) else json.dumps(message).encode()
    return struct.pack(">I", len(body)) + body


def _answer(sock: socket.socket) -> dict[str, Any]:
    return read_frame(sock)


def _raw(server: TCPStoreServer, token: str | None = "right") -> socket.socket:
    """A raw connection, past hello unless ``token`` is None."""
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
    if token is not None:
        sock.sendall(_frame({"id": 0, "op": "hello", "token": token}))
        assert _answer(sock)["ok"]
    return sock


def _closed_within(sock: socket.socket, seconds: float) -> bool:
    """Whether the server closes ``sock`` within ``seconds`` (it sends nothing else)."""
    sock.settimeout(seconds)
    try:
        while sock.recv(65536):
            pass
    except TimeoutError:
        return False
    except OSError:  # reset
        pass
    return True


def _limited(**limits: Any) -> TCPStoreServer:
    return TCPStoreServer("127.0.0.1", 0, token="right", limits=StoreLimits(**limits))


def _works(server: TCPStoreServer) -> None:
    client = TCPStoreClient("127.0.0.1", server.port, token="right", connect_timeout=5)
    try:
        client.set("works", "yes")
        assert client.get("works") == "yes"
    finally:
        client.close()
    assert server.is_alive()


def test_before_hello_only_a_small_frame_is_read(server: TCPStoreServer) -> None:
    with _raw(server, token=None) as s:  # one byte over: closed at the header
        s.sendall(struct.pack(">I", MAX_HELLO + 1))
        assert _closed_within(s, 5)
    with _raw(server, token=None) as s:  # 16 MiB announced: not read, not buffered
        s.sendall(struct.pack(">I", 16 << 20) + b"x" * 65536)
        assert _closed_within(s, 5)
    padded = {"id": 1, "op": "hello", "token": "right", "pad": ""}
    padded["pad"] = "p" * (MAX_HELLO - len(json.dumps(padded)))
    with _raw(server, token=None) as s:  # exactly the limit: read
        s.sendall(_frame(padded))
        assert _answer(s) == {"id": 1, "ok": True, "result": None}
    assert server.refused["wrong token"] == 0
    _works(server)


def test_after_hello_requests_up_to_the_documented_limit(server: TCPStoreServer) -> None:
    big = "v" * (1 << 20)
    with _raw(server) as s:
        s.sendall(_frame({"id": 1, "op": "set", "args": {"key": "big", "value": big}}))
        assert _answer(s)["ok"]
        s.sendall(struct.pack(">I", MAX_REQUEST + 1))
        assert _closed_within(s, 5)
    assert server.store.get("big") == big


def test_hello_must_come_within_the_hello_timeout() -> None:
    server = _limited(hello_timeout=0.3)
    try:
        idle = _raw(server, token=None)
        slow = _raw(server, token=None)
        slow.sendall(_frame({"id": 1, "op": "hello", "token": "right"})[:10])  # half a hello
        t0 = time.monotonic()
        assert _closed_within(idle, 3) and _closed_within(slow, 3)
        assert time.monotonic() - t0 < 2
        assert server.refused["no hello in time"] == 2
        idle.close()
        slow.close()
        _works(server)
    finally:
        server.close()


def test_an_authenticated_frame_must_arrive_within_the_read_timeout() -> None:
    server = _limited(read_timeout=0.3)
    try:
        with _raw(server) as s:
            s.sendall(_frame({"id": 1, "op": "get", "args": {"key": "k"}})[:12])
            t0 = time.monotonic()
            assert _closed_within(s, 3)
            assert time.monotonic() - t0 < 2
        _works(server)
    finally:
        server.close()


def test_idle_connections_are_closed_and_clients_reconnect_unnoticed() -> None:
    server = _limited(idle_timeout=0.3)
    client = TCPStoreClient("127.0.0.1", server.port, token="right")
    try:
        client.set("k", "1")
        with _raw(server) as s:
            assert _closed_within(s, 3)
        time.sleep(0.5)  # the client's connection was closed too
        assert server.connections == 0
        assert client.get("k") == "1"  # a new connection, no error
        assert server.requests["hello"] == 3
        # a wait longer than the idle timeout is not idleness
        _, version = client.scan("w/")
        with pytest.raises(StoreTimeoutError):
            client.wait_for_change("w/", version, timeout=1.0)
        assert server.requests["hello"] == 3
    finally:
        client.close()
        server.close()


def test_a_hello_and_requests_sent_with_the_connection_are_answered_in_order() -> None:
    # A right hello already there when the connection is accepted is answered at once;
    # what follows it is the connection's to read as usual.
    server = _limited()
    try:
        for extra in (0, 1, 3):
            with socket.create_connection(("127.0.0.1", server.port), timeout=5) as s:
                frames = [_frame({"id": 0, "op": "hello", "token": "right"})]
                frames += [
                    _frame({"id": i + 1, "op": "set", "args": {"key": f"k{i}", "value": "v"}})
                    for i in range(extra)
                ]
                s.sendall(b"".join(frames))
                answers = [_answer(s) for _ in range(1 + extra)]
                assert [a["id"] for a in answers] == list(range(1 + extra))
                assert all(a["ok"] for a in answers)
        assert server.store.get("k2") == "v"
        with _raw(server, token=None) as s:  # a wrong token is refused as before
            s.sendall(_frame({"id": 0, "op": "hello", "token": "wrong"}))
            assert not _answer(s)["ok"]
        assert server.refused["wrong token"] == 1
    finally:
        server.close()


def test_waits_are_woken_once_however_many_changes_come_first(server: TCPStoreServer) -> None:
    # The 4,096 join keys of a round going, while 4,096 watchers waited on their prefix,
    # woke each wait at each change: N² wake-ups in one turn of the store's loop.
    woken: list[int] = []

    class Counted(asyncio.Event):
        def set(self) -> None:
            woken.append(1)
            super().set()

    async def burst() -> None:
        server._waiters["w/"] = {Counted() for _ in range(100)}
        for i in range(100):  # before any woken wait's task runs
            server._changed(f"w/{i}")

    asyncio.run_coroutine_threadsafe(burst(), server._loop).result(5)
    assert len(woken) == 100, len(woken)
    assert "w/" not in server._waiters


def test_a_connection_serves_any_thread_one_request_at_a_time(server: TCPStoreServer) -> None:
    client = TCPStoreClient("127.0.0.1", server.port, token="right")
    try:
        client.set("k", "1")
        for _ in range(3):  # threads one after another: the connection the first opened
            t = threading.Thread(target=client.get, args=("k",))
            t.start()
            t.join(5)
        assert server.requests["hello"] == 1
        version = client.scan("k")[1]
        waiting = threading.Thread(target=client.wait_for_change, args=("w/", version, 5.0))
        waiting.start()
        time.sleep(0.2)  # the wait holds its connection: another request opens one
        assert client.get("k") == "1" and waiting.is_alive()
        assert server.requests["hello"] == 2
        client.set("w/x", "1")  # ends the wait; its connection is free again
        waiting.join(5)
        threads = [threading.Thread(target=client.get, args=("k",)) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(5)
        assert server.requests["hello"] <= 3 and server.connections <= 3
    finally:
        client.close()
    deadline = time.monotonic() + 5
    while server.connections and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.connections == 0


def test_a_client_replaces_a_connection_idle_for_half_the_idle_timeout(
    server: TCPStoreServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tcp_store, "IDLE_TIMEOUT", 0.4)
    client = TCPStoreClient("127.0.0.1", server.port, token="right")
    try:
        client.set("k", "1")
        client.get("k")
        assert server.requests["hello"] == 1
        time.sleep(0.3)
        assert client.get("k") == "1"
        assert server.requests["hello"] == 2  # before the server could close it
    finally:
        client.close()


def test_connections_without_hello_are_capped_oldest_first() -> None:
    server = _limited(max_unauthenticated=4, hello_grace=0.0)
    try:
        socks = [_raw(server, token=None) for _ in range(6)]
        assert _closed_within(socks[0], 3) and _closed_within(socks[1], 3)
        assert not any(_closed_within(s, 0.2) for s in socks[2:])
        assert server.refused["unauthenticated"] == 2
        _works(server)  # the newest always gets its chance to say hello
        for s in socks:
            s.close()
    finally:
        server.close()


def test_a_connection_closed_for_the_cap_is_closed_however_soon() -> None:
    # Closed as its serving task had just started (with hello_grace 0, at once): the
    # socket was left open in 16 of 100 tries when the task opened its transport in a
    # task of its own (asyncio.wait_for's), cancelled before that task ran.
    for _ in range(50):
        server = _limited(max_unauthenticated=4, hello_grace=0.0)
        socks: list[socket.socket] = []
        try:
            socks += [_raw(server, token=None) for _ in range(6)]
            assert _closed_within(socks[0], 3) and _closed_within(socks[1], 3)
        finally:
            for s in socks:
                s.close()
            server.close()


def test_a_burst_of_agents_connecting_together_is_not_cut_short() -> None:
    # up to four times the cap while none of them had its grace to say hello; further,
    # the newcomers wait in the kernel's queue until the oldest's grace is over
    server = _limited(max_unauthenticated=4, hello_grace=1.0)
    try:
        socks = [_raw(server, token=None) for _ in range(16)]
        socks.append(_raw(server, token=None))  # queued: none closed for it yet
        assert not any(_closed_within(s, 0.05) for s in socks)
        assert server.refused["unauthenticated"] == 0
        assert _closed_within(socks[0], 3)  # silent past its grace: it makes room
        assert server.refused["unauthenticated"] >= 1
        for s in socks:
            s.close()
    finally:
        server.close()


def test_hellos_the_store_is_too_busy_to_read_are_not_cut_short() -> None:
    # A swamped store reads hellos late: their connections are past their grace but not
    # silent (what they sent waits to be read). Closing them made every agent connect
    # again, and 4,096 agents on 2 cores never formed a round.
    server = _limited(max_unauthenticated=4, hello_grace=0.0)
    socks: list[socket.socket] = []
    try:
        busy = threading.Event()

        def stall() -> None:  # the server's loop, swamped for a second
            busy.set()
            time.sleep(1.0)

        server._loop.call_soon_threadsafe(stall)
        assert busy.wait(5)
        for i in range(40):  # ten times the cap, each saying hello at once
            sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
            sock.sendall(_frame({"id": i, "op": "hello", "token": "right"}))
            socks.append(sock)
        assert all(_answer(s)["ok"] for s in socks)
        assert server.refused["unauthenticated"] == 0
        _works(server)
    finally:
        for s in socks:
            s.close()
        server.close()


def test_connections_beyond_the_cap_are_refused_busy() -> None:
    server = _limited(max_connections=3)
    try:
        held = [_raw(server) for _ in range(3)]
        with _raw(server, token=None) as s:
            answer = _answer(s)
            assert answer["busy"] is True and not answer["ok"]
            assert "3 connections" in answer["error"]
        with pytest.raises(StoreUnavailableError, match=r"refuses connections"):
            TCPStoreClient("127.0.0.1", server.port, token="right", connect_timeout=0.3).get("k")
        held.pop().close()
        time.sleep(0.2)
        _works(server)
        for s in held:
            s.close()
    finally:
        server.close()


@pytest.mark.parametrize(
    ("request_", "error"),
    [
        (b'{"id":1,"op":"set","args":{"key":"k","value":"v","ttl":NaN}}', "ttl must be 0.."),
        (b'{"id":1,"op":"set","args":{"key":"k","value":"v","ttl":Infinity}}', "ttl must"),
        (b'{"id":1,"op":"set","args":{"key":"k","value":"v","ttl":-1}}', "ttl must be 0.."),
        (b'{"id":1,"op":"refresh","args":{"key":"k","ttl":1e999}}', "ttl must"),
        (b'{"id":1,"op":"wait","args":{"keys":["k"],"timeout":NaN}}', "timeout must"),
        (
            b'{"id":1,"op":"wait_for_change","args":{"prefix":"","version":0,"timeout":-5}}',
            "timeout",
        ),
        (
            b'{"id":1,"op":"wait_for_change","args":{"prefix":"","version":-1,"timeout":1}}',
            "version",
        ),
        (b'{"id":1,"op":"add","args":{"key":"n","amount":1.5}}', "amount must be an integer"),
        (b'{"id":1,"op":"add","args":{"key":"n","amount":99999999999999999999}}', "64-bit"),
        (b'{"id":1,"op":"add","args":{"key":"n","amount":true}}', "amount must be an integer"),
        (b'{"id":1,"op":"set","args":{"key":1,"value":"v"}}', "key must be a string"),
        (b'{"id":1,"op":"set","args":{"key":["k"],"value":"v"}}', "key must be a string"),
        (b'{"id":1,"op":"set","args":{"key":"k","value":{"x":1}}}', "value must be a string"),
        (b'{"id":1,"op":"multi_get","args":{"keys":"abc"}}', "keys must be a list"),
        (b'{"id":1,"op":"refresh_many","args":{"keys":"abc","ttl":1}}', "keys must be a list"),
        (b'{"id":1,"op":"refresh_many","args":{"keys":[null],"ttl":1}}', "each of keys"),
        (b'{"id":1,"op":"refresh_many","args":{"keys":["k"],"ttl":NaN}}', "ttl must"),
        (b'{"id":1,"op":"refresh_many","args":{"keys":["k"],"ttl":-1}}', "ttl must be 0.."),
        (b'{"id":1,"op":"refresh_many","args":{"keys":["k"]}}', "missing argument ttl"),
        (b'{"id":1,"op":"refresh_many","args":{"ttl":1}}', "missing argument keys"),
        (b'{"id":1,"op":"multi_get","args":{"keys":[null]}}', "each of keys"),
        (b'{"id":1,"op":"multi_set","args":{"items":[["k","v"]]}}', "items must map"),
        (b'{"id":1,"op":"compare_set","args":{"key":"k","expected":5,"desired":"v"}}', "expected"),
        (b'{"id":1,"op":"get","args":{"key":"k","extra":1}}', "unknown argument(s) extra"),
        (b'{"id":1,"op":"get","args":{}}', "missing argument key"),
        (b'{"id":1,"op":"get","args":["k"]}', "args must be an object"),
        (b'{"id":1,"op":"__init__","args":{}}', "unknown request '__init__'"),
        (b'{"id":1,"op":["set"],"args":{}}', "unknown request list"),
        (b'{"id":"1","op":"get","args":{"key":"k"}}', "id must be an integer"),
    ],
    ids=lambda x: x.decode()[:60] if isinstance(x, bytes) else "",
)
def test_bad_requests_get_an_error_frame_and_the_connection_goes_on(
    server: TCPStoreServer, request_: bytes, error: str
) -> None:
    with _raw(server) as s:
        s.sendall(_frame(request_))
        answer = _answer(s)
        assert answer["ok"] is False and answer["invalid"] is True, answer
        assert error in answer["error"], answer
        s.sendall(_frame({"id": 2, "op": "get", "args": {"key": "k"}}))
        assert _answer(s) == {"id": 2, "ok": True, "result": None}
    assert server.store.scan("")[0] == {}  # nothing was written


def test_a_flood_of_bad_requests_logs_one_line(
    server: TCPStoreServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="elastic_runner.rendezvous.tcp_server")
    with _raw(server) as s:
        for i in range(200):
            s.sendall(_frame({"id": i, "op": "set", "args": {"key": i, "value": "v"}}))
            assert _answer(s)["invalid"]
    for _ in range(20):
        with _raw(server, token=None) as s:
            s.sendall(_frame({"id": 1, "op": "hello", "token": "wrong"}))
            assert "wrong or missing rdzv.token" in _answer(s)["error"]
    for _ in range(20):
        with _raw(server, token=None) as s:
            s.sendall(_frame(b"[" * 4000 + b"]" * 4000))  # nested: RecursionError inside
            assert _closed_within(s, 5)
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert [r.getMessage().split(":")[0:2] for r in warnings] == [
        ["tcp store", " refused a request"],
        ["tcp store", " refused a client at 127.0.0.1"],
        ["tcp store", " dropped a client at 127.0.0.1"],
    ], [r.getMessage() for r in warnings]
    assert not any(r.exc_info for r in warnings)
    assert server.refused["bad request"] == 200 and server.refused["wrong token"] == 20
    _works(server)


def test_deeply_nested_json_after_hello_drops_that_connection_only(
    server: TCPStoreServer, caplog: pytest.LogCaptureFixture
) -> None:
    with _raw(server) as s:
        s.sendall(_frame(b"[" * 200_000 + b"]" * 200_000))
        assert _closed_within(s, 5)
    with _raw(server) as s:  # nested inside a request: refused for its type, not parsed deeper
        s.sendall(_frame(b'{"id":1,"op":"get","args":{"key":' + b"[" * 500 + b"]" * 500 + b"}}"))
        assert "key must be a string" in _answer(s)["error"]
    assert not any(r.exc_info for r in caplog.records)
    _works(server)


def test_caps_keep_descriptors_for_the_agent(monkeypatch: pytest.MonkeyPatch) -> None:
    def limit(soft: int) -> StoreLimits:
        monkeypatch.setattr(resource, "getrlimit", lambda _: (soft, resource.RLIM_INFINITY))
        return StoreLimits.for_this_process()

    assert (limit(1024).max_connections, limit(1024).max_unauthenticated) == (768, 64)
    assert limit(4096).max_connections == 3072  # a quarter kept
    assert (limit(100).max_connections, limit(100).max_unauthenticated) == (50, 12)
    assert limit(1 << 20).max_connections == MAX_CONNECTIONS == 4096
    assert limit(resource.RLIM_INFINITY) == StoreLimits()


_LOW_FD_SERVER = """
import resource, sys, time
resource.setrlimit(resource.RLIMIT_NOFILE, (64, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
from elastic_runner.rendezvous.tcp_server import StoreLimits, TCPStoreServer
# caps above the descriptors there are: accept() itself runs out
server = TCPStoreServer("127.0.0.1", 0, token="right", limits=StoreLimits(max_connections=10_000,
    max_unauthenticated=10_000))
print(server.port, flush=True)
sys.stdin.read()
refused = server.refused["out of descriptors"] > 0
print("alive" if server.is_alive() else "dead", refused, flush=True)
"""


def test_out_of_descriptors_refuses_new_connections_with_one_line() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", _LOW_FD_SERVER],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None and proc.stdin is not None
        port = int(proc.stdout.readline())
        socks = []
        for _ in range(150):  # more than the 64 descriptors the server's process has
            s = socket.socket()
            s.settimeout(5)
            s.connect(("127.0.0.1", port))
            socks.append(s)
        time.sleep(0.5)
        refused = sum(_closed_within(s, 0.01) for s in socks)
        assert refused > 50  # accepted on the reserve descriptor, closed
        for s in socks:
            s.close()
        time.sleep(0.3)
        client = TCPStoreClient("127.0.0.1", port, token="right", connect_timeout=5)
        client.set("k", "v")
        assert client.get("k") == "v"
        client.close()
        out, err = proc.communicate("", timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert out.split() == ["alive", "True"]
    lines = err.strip().splitlines()
    assert len(lines) <= 2, err
    assert "out of file descriptors" in lines[0] and "Traceback" not in err


# -- TLS --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TlsFiles:
    ca: str
    cert: str
    key: str


def write_test_ca(directory: Path, names: tuple[str, ...] = ("127.0.0.1", "localhost")) -> TlsFiles:
    """A throwaway CA and a certificate it signed for ``names`` (IP addresses or DNS
    names), made with the ``openssl`` command; the test is skipped without it."""
    if shutil.which("openssl") is None:
        pytest.skip("no openssl command")
    directory.mkdir(parents=True, exist_ok=True)

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=directory)

    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    openssl("req", "-x509", *ec, "-days", "1", "-subj", "/CN=test-ca", "-keyout", "ca.key",
            "-out", "ca.pem")  # fmt: skip
    openssl("req", *ec, "-subj", "/CN=store", "-keyout", "store.key", "-out", "store.csr")
    sans = ",".join(
        f"IP:{n}" if n.replace(".", "").isdigit() or ":" in n else f"DNS:{n}" for n in names
    )
    (directory / "san.ext").write_text(f"subjectAltName={sans}\n")
    sign = ("-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", "-days", "1")
    openssl("x509", "-req", "-in", "store.csr", *sign, "-extfile", "san.ext", "-out", "store.pem")
    return TlsFiles(
        str(directory / "ca.pem"), str(directory / "store.pem"), str(directory / "store.key")
    )


def _tls_server(files: TlsFiles, **limits: Any) -> TCPStoreServer:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(files.cert, files.key)
    return TCPStoreServer(
        "127.0.0.1", 0, token="s3cret", ssl_context=context, limits=StoreLimits(**limits)
    )


def _tls_client(files: TlsFiles | None, port: int, **kwargs: Any) -> TCPStoreClient:
    context = ssl.create_default_context(cafile=files.ca) if files else None
    return TCPStoreClient("127.0.0.1", port, token="s3cret", ssl_context=context, **kwargs)


class TestTCPStoreOverTLS(StoreSuite):
    @pytest.fixture
    def make_store(self, tmp_path: Path) -> Iterator[Callable[[], TCPStoreClient]]:
        files = write_test_ca(tmp_path / "tls")
        server = _tls_server(files)
        clients: list[TCPStoreClient] = []

        def make() -> TCPStoreClient:
            clients.append(_tls_client(files, server.port))
            return clients[-1]

        yield make
        for c in clients:
            c.close()
        server.close()


def test_tls_mismatches_are_one_clear_error(tmp_path: Path) -> None:
    files = write_test_ca(tmp_path / "tls")
    other = write_test_ca(tmp_path / "other")
    server = _tls_server(files, hello_timeout=1.0)
    try:
        with pytest.raises(
            StoreError, match=r"cannot verify the rendezvous store at .*rdzv.ca_cert"
        ):
            _tls_client(other, server.port).get("k")
        with pytest.raises(
            StoreError, match=r"at hello: if the store serves TLS, set rdzv.ca_cert"
        ):
            _tls_client(None, server.port, connect_timeout=0.5).get("k")
        wrong_name = ssl.create_default_context(cafile=files.ca)
        with pytest.raises(StoreError, match=r"cannot verify .*(IP address mismatch|match)"):
            TCPStoreClient(
                "127.0.0.1", server.port, ssl_context=wrong_name, server_hostname="node0"
            ).get("k")
        assert server.is_alive()
        client = _tls_client(files, server.port)
        client.set("k", "over TLS")
        assert client.get("k") == "over TLS"
        client.close()
    finally:
        server.close()
    plain = TCPStoreServer("127.0.0.1", 0, token="s3cret")
    try:  # a TLS client to a plain store: the store closes at the ClientHello
        with pytest.raises(StoreError, match=r"closed the connection during the TLS handshake"):
            _tls_client(files, plain.port, connect_timeout=0.5).get("k")
    finally:
        plain.close()


def test_an_abandoned_wait_is_released_at_once(server: TCPStoreServer) -> None:
    with _raw(server) as s:
        s.sendall(_frame({"id": 1, "op": "wait", "args": {"keys": ["never"], "timeout": 1e6}}))
        time.sleep(0.1)
    deadline = time.monotonic() + 5
    while server.connections and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.connections == 0
    _works(server)


# -- refresh_keys: one request where the store has refresh_many, else one a key ----------


class _Counting:
    """A memory store seen through the calls it gets; ``many`` says what its refresh_many
    does: ``"ok"``, ``"absent"`` (a store without it) or ``"refused"`` (a server from
    before it)."""

    def __init__(self, many: str) -> None:
        self.inner = MemoryStore()
        self.calls: list[str] = []
        if many != "absent":
            self.refresh_many = self._ok if many == "ok" else self._refused

    def _ok(self, keys: list[str], ttl: float) -> list[bool]:
        self.calls.append("refresh_many")
        return self.inner.refresh_many(keys, ttl)

    def _refused(self, keys: list[str], ttl: float) -> list[bool]:
        self.calls.append("refresh_many")
        raise StoreArgumentError("unknown request 'refresh_many'")

    def refresh(self, key: str, ttl: float) -> bool:
        self.calls.append("refresh")
        return self.inner.refresh(key, ttl)


@pytest.mark.parametrize(
    ("many", "calls"),
    [
        ("ok", ["refresh_many"]),
        ("absent", ["refresh"] * 3),
        ("refused", ["refresh_many"] + ["refresh"] * 3),
    ],
)
def test_refresh_keys_uses_refresh_many_or_falls_back(many: str, calls: list[str]) -> None:
    clock = [0.0]
    store = _Counting(many)
    store.inner = MemoryStore(clock=lambda: clock[0])
    store.inner.set("a", "1", ttl=1.0)
    store.inner.set("c", "3", ttl=1.0)
    clock[0] = 0.9
    found = refresh_keys(store, ["a", "b", "c"], 1.0)  # type: ignore[arg-type]
    assert found == [True, False, True]
    assert store.calls == calls
    clock[0] = 1.5  # past the first TTL: alive by the refresh only
    assert store.inner.multi_get(["a", "b", "c"]) == ["1", None, "3"]
    clock[0] = 2.0
    assert store.inner.multi_get(["a", "c"]) == [None, None]


def test_refresh_keys_does_not_hide_other_errors() -> None:
    class Down(_Counting):
        def _ok(self, keys: list[str], ttl: float) -> list[bool]:
            raise StoreUnavailableError("the store is gone")

    with pytest.raises(StoreUnavailableError):
        refresh_keys(Down("ok"), ["a"], 1.0)  # type: ignore[arg-type]


def test_refresh_many_over_tcp_is_one_request(server: TCPStoreServer) -> None:
    client = TCPStoreClient("127.0.0.1", server.port, token="right")
    try:
        client.set("hb/a", "1", ttl=5)
        client.set("hb/b", "1", ttl=5)
        before = server.requests.copy()
        assert refresh_keys(client, ["hb/a", "hb/b", "hb/c"], 5) == [True, True, False]
        assert server.requests - before == {"refresh_many": 1}
    finally:
        client.close()


# -- count: how many keys are under a prefix, in one small answer ------------------------


class _Scans:
    """A store with ``scan`` only (no ``count``), or one whose ``count`` a server from
    before it refuses."""

    def __init__(self, refused: bool) -> None:
        self.inner = MemoryStore()
        self.calls: list[str] = []
        if refused:
            self.count = self._refused

    def _refused(self, prefix: str) -> int:
        self.calls.append("count")
        raise StoreArgumentError("unknown request 'count'")

    def scan(self, prefix: str) -> tuple[dict[str, str], int]:
        self.calls.append("scan")
        return self.inner.scan(prefix)


@pytest.mark.parametrize("refused", [False, True])
def test_count_keys_falls_back_to_a_scan(refused: bool) -> None:
    store = _Scans(refused)
    store.inner.multi_set({"j/a": "1", "j/b": "2", "jx": "3", "k/a": "4"})
    assert count_keys(store, "j/") == 2  # type: ignore[arg-type]
    assert store.calls == (["count", "scan"] if refused else ["scan"])


def test_count_is_the_keys_under_a_prefix_and_expires_with_them() -> None:
    clock = [0.0]
    store = MemoryStore(clock=lambda: clock[0])
    store.multi_set({"r0/join/a": "1", "r0/join/b": "2", "r0/joinbell": "x", "r1/join/a": "1"})
    store.set("r0/join/c", "3", ttl=1.0)
    assert [store.count(p) for p in ("r0/join/", "r0/join", "r", "", "none/")] == [3, 4, 5, 5, 0]
    clock[0] = 2.0  # c expired
    assert store.count("r0/join/") == 2
    store.delete_prefix("r0/")
    assert store.count("r0/") == 0 and store.count("r1/") == 1


#: Characters at the ends of the order (the least, the greatest) and between.
EDGES = "\x00ab\uffff" + chr(sys.maxunicode)


@given(
    keys=st.sets(st.text(alphabet=EDGES, max_size=4), max_size=30),
    prefix=st.text(alphabet=EDGES, max_size=3),
)
def test_count_scan_and_delete_prefix_take_exactly_the_keys_under_a_prefix(
    keys: set[str], prefix: str
) -> None:
    # (the keys under a prefix are found by two binary searches, not by walking them)
    store = MemoryStore()
    store.multi_set(dict.fromkeys(keys, "v"))
    under = {k for k in keys if k.startswith(prefix)}
    assert store.count(prefix) == len(under)
    assert set(store.scan(prefix)[0]) == under
    assert store.delete_prefix(prefix) == len(under)
    assert set(store.scan("")[0]) == keys - under


def test_count_over_tcp_is_one_small_request(server: TCPStoreServer) -> None:
    client = TCPStoreClient("127.0.0.1", server.port, token="right")
    try:
        client.multi_set({f"join/{i:04d}": "x" * 200 for i in range(200)})
        before, sent = server.requests.copy(), server.bytes_out
        assert count_keys(client, "join/") == 200
        assert server.requests - before == {"count": 1}
        assert server.bytes_out - sent < 200  # the answer is a number, not the keys
        with pytest.raises(StoreArgumentError):
            client.count(5)  # type: ignore[arg-type]
    finally:
        client.close()
