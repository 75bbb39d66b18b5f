"""etcd's v3 API over gRPC, for one endpoint: the same calls and answers as
:class:`~elastic_runner.rendezvous.etcd_http.EtcdEndpoint` (requests and answers in the
JSON gateway's shape, :mod:`~elastic_runner.rendezvous.etcd_proto`), without the gateway.

Why: the gateway turns each JSON request into a gRPC call to etcd itself. Profiled on a
1,024-node round (``bench/scale.py --backends etcd --profile``), 44 % of etcd's CPU was
the gateway's HTTP and JSON, and a quarter garbage collection, much of it the gateway's;
measured call by call, a read cost etcd 0.63 ms through the gateway and 0.27 ms over
gRPC, a write 0.75 and 0.41 ms. A watch through the gateway is also a TCP connection of
its own; here it is a stream on the endpoint's one connection.

Errors are the gateway endpoint's two kinds: :class:`EndpointUnreachable` (no
connection, a lost one, a timeout, etcd unavailable; or this endpoint closed) and
:class:`EtcdHTTPError` (etcd refused: its own message, the gRPC status code for status).
Needs ``grpcio``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import threading
from collections.abc import Coroutine, Generator, Mapping
from typing import Any, TypeVar

from elastic_runner.rendezvous import etcd_proto as proto
from elastic_runner.rendezvous.etcd_http import EndpointUnreachable, EtcdHTTPError

# The agent forks (and at once execs) its workers while gRPC's threads run: grpcio's fork
# handlers then skip themselves and say so on stderr, once per worker. They are for a
# child that goes on using gRPC, which ours never does. grpcio reads the switch when it
# is imported: it is off for that moment (unless the caller set it), and the process's
# environment is left as it was (what its children inherit, the workers' gRPC included).
_FORK_SUPPORT = os.environ.get("GRPC_ENABLE_FORK_SUPPORT")
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
try:
    import grpc
    import grpc.aio
finally:
    if _FORK_SUPPORT is None:
        del os.environ["GRPC_ENABLE_FORK_SUPPORT"]

__all__ = ["EtcdGrpcEndpoint"]

#: The calls of :meth:`EtcdGrpcEndpoint.post`, by the gateway's path.
_UNARY = {
    "/kv/range": proto.RANGE,
    "/kv/put": proto.PUT,
    "/kv/txn": proto.TXN,
    "/kv/deleterange": proto.DELETE_RANGE,
    "/lease/grant": proto.LEASE_GRANT,
    "/kv/lease/revoke": proto.LEASE_REVOKE,
    "/lease/revoke": proto.LEASE_REVOKE,
    "/auth/authenticate": proto.AUTHENTICATE,
}
#: gRPC codes that say this endpoint cannot serve now (another may).
_UNAVAILABLE = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.CANCELLED,
}


def _identity(data: bytes) -> bytes:
    return data


def _code(exc: grpc.RpcError) -> grpc.StatusCode:
    """The call's status; a deadline etcd saw pass first is the deadline too (etcd 3.4
    answers it as UNKNOWN "context deadline exceeded" when it ends the call before the
    client does), and grpcio's "Internal error from Core" is an unreachable endpoint."""
    code: grpc.StatusCode = exc.code()
    details = exc.details() or ""
    if code == grpc.StatusCode.UNKNOWN and "deadline exceeded" in details:
        return grpc.StatusCode.DEADLINE_EXCEEDED
    if _not_sent(exc):
        # grpcio's own failure to run the call, not etcd's answer: try again
        return grpc.StatusCode.UNAVAILABLE
    return code


def _not_sent(exc: grpc.RpcError) -> bool:
    """Whether grpcio failed to run (part of) the call itself: INTERNAL "Internal error
    from Core", a batch of operations the call no longer takes. Seen on a watch whose
    request could not be sent (``Failed "execute_batch": (SendMessageOperation ...)``)
    with two 1,024-node benchmarks at once on 2 cores: the call had already ended (most
    likely its deadline, passed while the loop ran behind), so etcd never saw the watch."""
    return exc.code() == grpc.StatusCode.INTERNAL and "from Core" in (exc.details() or "")


T = TypeVar("T")

#: A channel's name: its target and TLS files (None: plain).
_Name = tuple[str, bytes | None, bytes | None, bytes | None]


class _Calls:
    """gRPC's asyncio API on one event loop thread per process, for every store in it.

    Why not grpcio's blocking API: a thread waiting on a stream there wakes every 0.1 s
    (to see signals), and each channel with a call in flight has a thread polling it.
    Measured with 1,024 participants of the scale benchmark on 4 processes, their round
    took 90 s and 158 s of their CPU (13.5 s and 13 s through the JSON gateway). Here a
    caller blocks on a future until its answer comes, and the loop sleeps in between.

    Channels are shared too: one per etcd endpoint and TLS setting, closed with the
    last endpoint using it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.current_thread()
        self._channels: dict[_Name, Any] = {}
        self._users: dict[_Name, int] = {}

    def _running_loop(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is None:
                loop = asyncio.new_event_loop()
                ready = threading.Event()

                def serve() -> None:
                    asyncio.set_event_loop(loop)
                    loop.call_soon(ready.set)
                    try:
                        loop.run_forever()
                    finally:
                        loop.close()

                self._thread = threading.Thread(target=serve, name="etcd-grpc", daemon=True)
                self._thread.start()
                ready.wait()
                self._loop = loop
            return self._loop

    def submit(self, coroutine: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        """Run ``coroutine`` on the loop; its future (cancelling it cancels the call)."""
        return asyncio.run_coroutine_threadsafe(coroutine, self._running_loop())

    def take(self, name: _Name) -> Any:
        """The channel called ``name``, opened if need be (on the loop: grpc.aio's
        objects belong to the loop they are made on)."""
        with self._lock:
            channel = self._channels.get(name)
            self._users[name] = self._users.get(name, 0) + 1
        if channel is None:
            channel = self.submit(_open(name)).result()
            with self._lock:
                channel = self._channels.setdefault(name, channel)
        return channel

    def give_back(self, name: _Name) -> None:
        """One user of ``name`` less; the last one closes it, and the loop and its thread
        end with the last channel (nothing of gRPC's stays open in the process: a caller
        of ``launch()`` gets back what it had)."""
        with self._lock:
            self._users[name] -= 1
            if self._users[name] > 0:
                return
            del self._users[name]
            channel = self._channels.pop(name, None)
            loop, thread = self._loop, self._thread
            last = not self._users
            if last:
                self._loop = None
        if channel is not None and loop is not None:
            with contextlib.suppress(concurrent.futures.TimeoutError, RuntimeError):
                asyncio.run_coroutine_threadsafe(_close(channel, last), loop).result(5)
        if last and loop is not None:
            loop.call_soon_threadsafe(loop.stop)
            if thread is not threading.current_thread():
                thread.join(5)


async def _close(channel: Any, last: bool) -> None:
    """Close ``channel`` (its calls are cancelled); the ``last`` one waits for every
    call's task to end first: a call still winding down when the loop stops keeps
    gRPC's poller thread and its sockets for good."""
    if last:
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    await channel.close()


async def _open(name: _Name) -> Any:
    target, ca_cert, cert, key = name
    options = [
        # etcd answers a scan of a 4,096-node job's keys in more than 4 MiB
        ("grpc.max_receive_message_length", 256 * 2**20),
        # not shared with other users of gRPC in the process
        ("grpc.use_local_subchannel_pool", 1),
        # etcd is reached directly: not through http_proxy / grpc_proxy, which cluster
        # nodes often set for the outside world
        ("grpc.enable_http_proxy", 0),
    ]
    if ca_cert is not None or cert is not None:
        credentials = grpc.ssl_channel_credentials(ca_cert, key, cert)
        return grpc.aio.secure_channel(name[0], credentials, options)
    return grpc.aio.insecure_channel(target, options)


_CALLS = _Calls()


class EtcdGrpcEndpoint:
    """One etcd endpoint over gRPC: ``post`` a request, ``watch`` a stream of answers."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        timeout: float,
        ca_cert: bytes | None = None,
        cert: bytes | None = None,
        key: bytes | None = None,
    ) -> None:
        self.host, self.port = host, port
        self._timeout = timeout
        target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self._name: _Name = (target, ca_cert, cert, key)
        self._channel = _CALLS.take(self._name)
        #: Sent with every call (the token once authenticated).
        self._metadata: tuple[tuple[str, str], ...] = ()
        self._lock = threading.Lock()
        #: This endpoint's calls in flight, cancelled by ``close`` (the channel is shared).
        self._calls: set[concurrent.futures.Future[Any]] = set()
        self._closed = False

    def __repr__(self) -> str:
        return f"{self.host}:{self.port}"

    def authenticate(self, name: str, password: str) -> None:
        """Get a token for ``name`` and send it with every call from now on (asked
        without the token held: etcd refuses any call with a token it forgot)."""
        self._metadata = ()
        answer = self.post("/auth/authenticate", {"name": name, "password": password})
        token = answer.get("token")
        if not isinstance(token, str) or not token:
            raise EtcdHTTPError(0, "no token in the answer", "")
        self._metadata = (("token", token),)

    def _run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        """``coroutine``'s result, run on the loop; :meth:`close` cancels it."""
        with self._lock:
            if self._closed:
                coroutine.close()
                raise EndpointUnreachable(f"{self}: closed")
            future = _CALLS.submit(coroutine)
            self._calls.add(future)
        error: Exception
        try:
            return future.result()
        except concurrent.futures.CancelledError:
            error = EndpointUnreachable(f"{self}: closed")
        except grpc.RpcError as exc:
            error = self._error(exc)
        finally:
            with self._lock:
                self._calls.discard(future)
        # Raised with nothing of the call: the error's traceback holds this frame, and
        # the future and the coroutine would keep the call and its channel open (and
        # gRPC's poller thread) for as long as a caller keeps the error.
        del future, coroutine
        raise error

    def post(self, path: str, body: Mapping[str, Any]) -> Any:
        """The call the gateway serves at ``path``, with ``body``; its answer."""
        if path == "/lease/keepalive":
            method, request, response = proto.KEEP_ALIVE
            data = self._run(self._first_answer(method, proto.encode(request, body)))
            # as the gateway answers a stream; a lease etcd no longer knows: TTL 0
            return {"result": self._decode(response, data)}
        method, request, response = _UNARY[path]
        data = self._run(self._unary(method, proto.encode(request, body)))
        return self._decode(response, data)

    async def _unary(self, method: str, data: bytes) -> bytes:
        call = self._channel.unary_unary(
            method, request_serializer=_identity, response_deserializer=_identity
        )
        answer: bytes = await call(data, timeout=self._timeout, metadata=self._metadata)
        return answer

    async def _first_answer(self, method: str, data: bytes) -> bytes:
        """A stream's first answer to ``data``, sent alone (etcd answers a keep-alive,
        then ends the stream once the send side is closed)."""
        call = self._channel.stream_stream(
            method, request_serializer=_identity, response_deserializer=_identity
        )([data], timeout=self._timeout, metadata=self._metadata)
        try:
            answer = await call.read()
        finally:
            call.cancel()
        if answer is grpc.aio.EOF:
            raise EndpointUnreachable(f"{self}: the stream ended without an answer")
        assert isinstance(answer, bytes)
        return answer

    async def _watch(self, data: bytes, timeout: float) -> list[bytes]:
        """A watch's answers up to the first with events or a cancellation, within
        ``timeout`` (then :class:`TimeoutError`). A watch grpcio could not send is sent
        again while time is left: a watch changes nothing at etcd, and the caller waits
        from its revision whatever the stream it is read on."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        pause = 0.01
        while True:
            try:
                return await self._watch_once(data, max(deadline - loop.time(), 0.001))
            except grpc.RpcError as exc:
                if self._closed:
                    raise
                if _code(exc) == grpc.StatusCode.DEADLINE_EXCEEDED:
                    raise TimeoutError(f"{self}: no answer in {timeout:g} s") from None
                if not _not_sent(exc):
                    raise
                # Once 1 of 1,024 participants' watches (two benchmarks at once): that
                # node's join failed as "cannot reach etcd", and so did the round.
                if loop.time() + pause >= deadline:
                    raise TimeoutError(f"{self}: no answer in {timeout:g} s") from None
            await asyncio.sleep(pause)  # a channel that fails at once is not spun on
            pause = min(pause * 2, 0.5)

    async def _watch_once(self, data: bytes, timeout: float) -> list[bytes]:
        method = proto.WATCH[0]
        # sent as the call's request stream, which grpcio writes and then closes (etcd
        # keeps a watch whose send side closed): an explicit write() that meets the
        # stream already ended by etcd fails as INTERNAL "Internal error from Core"
        # (grpc/grpc#36066), not with etcd's own status (1 of 512 participants once)
        call = self._channel.stream_stream(
            method, request_serializer=_identity, response_deserializer=_identity
        )([data], timeout=timeout, metadata=self._metadata)
        answers: list[bytes] = []
        try:
            while True:
                answer = await call.read()
                if answer is grpc.aio.EOF:
                    raise EndpointUnreachable(f"{self}: the watch stream ended")
                assert isinstance(answer, bytes)
                answers.append(answer)
                decoded = self._decode(proto.WATCH[2], answer)
                if decoded.get("events") or decoded.get("canceled"):
                    return answers
        finally:
            call.cancel()

    def watch(
        self, path: str, body: Mapping[str, Any], connect_timeout: float, read_timeout: float
    ) -> Generator[Any, None, None]:
        """The answers of a watch (``{"result": ...}``, or ``{"error": ...}`` when etcd
        cancels it) up to the first with events, on a stream of its own. Longer than
        ``read_timeout`` in all raises :class:`TimeoutError`; ``close`` ends it with
        :class:`EndpointUnreachable`. ``connect_timeout``: the gateway's; a stream
        needs no connection of its own."""
        del path, connect_timeout
        data = proto.encode(proto.WATCH[1], body)
        for answer in self._run(self._watch(data, read_timeout)):
            decoded = self._decode(proto.WATCH[2], answer)
            if decoded.get("canceled"):
                yield {"error": decoded.get("cancel_reason") or "the watch was cancelled"}
                return
            yield {"result": decoded}

    def _decode(self, message: proto.Message, data: bytes) -> dict[str, Any]:
        try:
            return proto.decode(message, data)
        except ValueError as exc:
            raise EtcdHTTPError(0, "a malformed answer", str(exc)) from None

    def _error(self, exc: grpc.RpcError) -> Exception:
        code = _code(exc)
        details = exc.details() or code.name
        if self._closed:
            return EndpointUnreachable(f"{self}: closed")
        if code in _UNAVAILABLE:
            return EndpointUnreachable(f"{code.name}: {details}")
        return EtcdHTTPError(int(code.value[0]), code.name, details)

    def close(self) -> None:
        """Cancel this endpoint's calls (a thread waiting on a watch wakes at once) and
        give its channel back; no call is made after this."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            calls, self._calls = list(self._calls), set()
        for call in calls:
            call.cancel()
        self._channel = None  # grpc.aio lets its poller go with the last channel object
        _CALLS.give_back(self._name)
