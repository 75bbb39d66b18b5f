"""The HTTP transport to etcd's gateway, against a scripted server on a real socket:
connection reuse, statuses, streams, close, and whatever bytes come back."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from elastic_runner.rendezvous.etcd_http import EndpointUnreachable, EtcdEndpoint, EtcdHTTPError

#: What the server does with one request: (raw response bytes, close the connection after).
Script = Callable[[bytes], tuple[bytes, bool]]


def ok(body: object, *, close: bool = False) -> tuple[bytes, bool]:
    data = json.dumps(body).encode()
    head = f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {len(data)}\r\n"
    return head.encode() + b"\r\n" + data, close


class ScriptedServer:
    """Answers each request on a real socket as ``script`` says; counts connections and
    requests."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.connections = 0
        self.requests: list[bytes] = []
        self._socks: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return
            self.connections += 1
            self._socks.append(sock)
            threading.Thread(target=self._serve, args=(sock,), daemon=True).start()

    def _serve(self, sock: socket.socket) -> None:
        buffer = b""
        with sock:
            while True:
                while b"\r\n\r\n" not in buffer:
                    try:
                        chunk = sock.recv(65536)
                    except OSError:
                        return
                    if not chunk:
                        return
                    buffer += chunk
                head, _, rest = buffer.partition(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                while len(rest) < length:
                    rest += sock.recv(65536)
                body, buffer = rest[:length], rest[length:]
                self.requests.append(body)
                response, close = self.script(body)
                try:
                    sock.sendall(response)
                except OSError:
                    return
                if close:
                    return

    def close(self) -> None:
        self.listener.close()
        for sock in self._socks:
            with contextlib.suppress(OSError):
                sock.close()


@pytest.fixture
def serve() -> Iterator[Callable[[Script], tuple[ScriptedServer, EtcdEndpoint]]]:
    made: list[tuple[ScriptedServer, EtcdEndpoint]] = []

    def make(script: Script) -> tuple[ScriptedServer, EtcdEndpoint]:
        server = ScriptedServer(script)
        made.append((server, EtcdEndpoint("127.0.0.1", server.port, timeout=2)))
        return made[-1]

    yield make
    for server, endpoint in made:
        endpoint.close()
        server.close()


def test_one_connection_per_thread_is_kept(
    serve: Callable[..., tuple[ScriptedServer, EtcdEndpoint]],
) -> None:
    server, endpoint = serve(lambda body: ok({"echo": json.loads(body)}))
    assert [endpoint.post("/kv/range", {"n": i})["echo"]["n"] for i in range(5)] == list(range(5))
    assert server.connections == 1
    other = threading.Thread(target=lambda: endpoint.post("/kv/range", {"n": 9}))
    other.start()
    other.join(5)
    assert server.connections == 2  # another thread, its own connection


def test_a_connection_the_server_closed_is_replaced_before_a_request_is_sent(
    serve: Callable[..., tuple[ScriptedServer, EtcdEndpoint]],
) -> None:
    # An idle keep-alive connection closed by the server: the next request goes on a new
    # one, sent once (sent on the dead one, it would fail, or be sent twice on a retry).
    server, endpoint = serve(lambda body: ok({}, close=True))
    for _ in range(3):
        endpoint.post("/kv/put", {})
        time.sleep(0.05)  # the server's close arrives
    assert len(server.requests) == 3
    assert server.connections == 3


def test_statuses(serve: Callable[..., tuple[ScriptedServer, EtcdEndpoint]]) -> None:
    answers = {
        b'{"s": 400}': b'{"error":"etcdserver: requested lease not found","code":5}',
        b'{"s": 503}': b"no leader",
        b'{"s": 500}': b"<html>oops</html>",
    }

    def script(body: bytes) -> tuple[bytes, bool]:
        status = json.loads(body)["s"]
        data = answers[body]
        return f"HTTP/1.1 {status} X\r\nContent-Length: {len(data)}\r\n\r\n".encode() + data, False

    _, endpoint = serve(script)
    with pytest.raises(EtcdHTTPError, match="400 X: etcdserver: requested lease not found"):
        endpoint.post("/lease/keepalive", {"s": 400})
    with pytest.raises(EndpointUnreachable, match="503"):
        endpoint.post("/kv/range", {"s": 503})
    with pytest.raises(EtcdHTTPError, match="500 X: <html>oops</html>"):
        endpoint.post("/kv/range", {"s": 500})


def test_nobody_listening_is_unreachable() -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
    endpoint = EtcdEndpoint("127.0.0.1", port, timeout=1)
    with pytest.raises(EndpointUnreachable, match="refused"):
        endpoint.post("/kv/range", {})


def test_a_server_that_never_answers_times_out(
    serve: Callable[..., tuple[ScriptedServer, EtcdEndpoint]],
) -> None:
    def silent(body: bytes) -> tuple[bytes, bool]:
        time.sleep(3)
        return b"", True

    _, endpoint = serve(silent)
    t0 = time.monotonic()
    with pytest.raises(EndpointUnreachable, match="timed out"):
        endpoint.post("/kv/range", {})
    assert time.monotonic() - t0 < 2.5  # the endpoint's timeout is 2 s


def _stream_head() -> bytes:
    return (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    )


def _chunk(message: object) -> bytes:
    data = json.dumps(message).encode() + b"\n"
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


def test_a_watch_yields_the_streamed_messages(
    serve: Callable[..., tuple[ScriptedServer, EtcdEndpoint]],
) -> None:
    messages = [{"result": {"created": True}}, {"result": {"events": [{"kv": {"n": 1}}]}}]
    _, endpoint = serve(lambda body: (_stream_head() + b"".join(map(_chunk, messages)), False))
    stream = endpoint.watch("/watch", {}, connect_timeout=1, read_timeout=1)
    assert [next(stream), next(stream)] == messages
    with pytest.raises(TimeoutError):  # nothing more comes
        next(stream)


def test_close_wakes_a_thread_reading_a_watch(
    serve: Callable[..., tuple[ScriptedServer, EtcdEndpoint]],
) -> None:
    _, endpoint = serve(
        lambda body: (_stream_head() + _chunk({"result": {"created": True}}), False)
    )
    ended: list[BaseException] = []

    def read() -> None:
        try:
            for _ in endpoint.watch("/watch", {}, connect_timeout=1, read_timeout=30):
                pass
        except BaseException as exc:
            ended.append(exc)

    thread = threading.Thread(target=read)
    thread.start()
    time.sleep(0.2)
    t0 = time.monotonic()
    endpoint.close()
    thread.join(5)
    assert time.monotonic() - t0 < 1
    assert ended and isinstance(ended[0], EndpointUnreachable)
    with pytest.raises(EndpointUnreachable, match="closed"):
        endpoint.post("/kv/range", {})  # nothing after close


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    status=st.sampled_from([b"200 OK", b"400 Bad", b"503 No", b"999 ?", b"abc", b""]),
    headers=st.lists(
        st.sampled_from(
            [
                b"Content-Length: 5",
                b"Content-Length: -1",
                b"Content-Length: 99999999",
                b"Transfer-Encoding: chunked",
                b"Connection: close",
                b"X: \xff\xfe",
            ]
        ),
        max_size=3,
    ),
    body=st.one_of(st.binary(max_size=200), st.sampled_from([b"[]", b"{}", b'"x"', b"null"])),
)
def test_whatever_the_server_sends_is_an_answer_or_one_of_two_errors(
    status: bytes, headers: list[bytes], body: bytes
) -> None:
    raw = b"HTTP/1.1 " + status + b"\r\n" + b"".join(h + b"\r\n" for h in headers) + b"\r\n" + body
    server = ScriptedServer(lambda _: (raw, True))
    endpoint = EtcdEndpoint("127.0.0.1", server.port, timeout=0.5)
    try:
        assert isinstance(endpoint.post("/kv/range", {}), dict)  # a JSON object, or:
    except (EtcdHTTPError, EndpointUnreachable):
        pass
    finally:
        endpoint.close()
        server.close()
