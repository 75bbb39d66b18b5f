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

import os
import threading
from collections.abc import Generator, Iterator, Mapping
from typing import Any

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
    client does)."""
    code: grpc.StatusCode = exc.code()
    if code == grpc.StatusCode.UNKNOWN and "deadline exceeded" in (exc.details() or ""):
        return grpc.StatusCode.DEADLINE_EXCEEDED
    return code


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
        options = [
            # etcd answers a scan of a 4,096-node job's keys in more than gRPC's 4 MiB
            ("grpc.max_receive_message_length", 256 * 2**20),
            # each store is its own client: no channel shared with other stores here
            ("grpc.use_local_subchannel_pool", 1),
            # etcd is reached directly: not through http_proxy / grpc_proxy, which
            # cluster nodes often set for the outside world
            ("grpc.enable_http_proxy", 0),
        ]
        if ca_cert is not None or cert is not None:
            credentials = grpc.ssl_channel_credentials(ca_cert, key, cert)
            self._channel = grpc.secure_channel(target, credentials, options)
        else:
            self._channel = grpc.insecure_channel(target, options)
        #: Sent with every call (the token once authenticated).
        self._metadata: tuple[tuple[str, str], ...] = ()
        self._lock = threading.Lock()
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

    def post(self, path: str, body: Mapping[str, Any]) -> Any:
        """The call the gateway serves at ``path``, with ``body``; its answer."""
        if path == "/lease/keepalive":
            return self._keep_alive(body)
        method, request, response = _UNARY[path]
        call = self._channel.unary_unary(
            method, request_serializer=_identity, response_deserializer=_identity
        )
        data = proto.encode(request, body)
        try:
            answer = call(data, timeout=self._timeout, metadata=self._metadata)
        except grpc.RpcError as exc:
            raise self._error(exc) from None
        except ValueError:  # "Cannot invoke RPC on closed channel!"
            raise EndpointUnreachable(f"{self}: closed") from None
        return self._decode(response, answer)

    def _keep_alive(self, body: Mapping[str, Any]) -> Any:
        """One keep-alive on a stream of its own, as the gateway answers it
        (``{"result": ...}``); a lease etcd no longer knows answers TTL 0."""
        method, request, response = proto.KEEP_ALIVE
        call = self._channel.stream_stream(
            method, request_serializer=_identity, response_deserializer=_identity
        )
        try:
            stream = call(
                iter([proto.encode(request, body)]),
                timeout=self._timeout,
                metadata=self._metadata,
            )
        except ValueError:  # a closed channel
            raise EndpointUnreachable(f"{self}: closed") from None
        try:
            for answer in stream:
                return {"result": self._decode(response, answer)}
        except grpc.RpcError as exc:
            raise self._error(exc) from None
        finally:
            stream.cancel()
        raise EndpointUnreachable(f"{self}: the keep-alive stream ended without an answer")

    def watch(
        self, path: str, body: Mapping[str, Any], connect_timeout: float, read_timeout: float
    ) -> Generator[Any, None, None]:
        """The answers of a watch (``{"result": ...}``, or ``{"error": ...}`` when etcd
        cancels it), on a stream of its own that is cancelled when the iteration ends.
        Longer than ``read_timeout`` in all raises :class:`TimeoutError`; ``close`` ends
        it with :class:`EndpointUnreachable`. ``connect_timeout``: the gateway's; a
        stream needs no connection of its own."""
        del path, connect_timeout
        method, request, response = proto.WATCH
        done = threading.Event()

        def requests() -> Iterator[bytes]:
            yield proto.encode(request, body)
            done.wait()  # the send side stays open: a closed one may end the watch

        call = self._channel.stream_stream(
            method, request_serializer=_identity, response_deserializer=_identity
        )
        try:
            stream = call(requests(), timeout=read_timeout, metadata=self._metadata)
        except ValueError:  # a closed channel
            raise EndpointUnreachable(f"{self}: closed") from None
        try:
            for data in stream:
                answer = self._decode(response, data)
                if answer.get("canceled"):
                    yield {"error": answer.get("cancel_reason") or "the watch was cancelled"}
                    return
                yield {"result": answer}
        except grpc.RpcError as exc:
            if _code(exc) == grpc.StatusCode.DEADLINE_EXCEEDED and not self._closed:
                raise TimeoutError(f"{self}: no answer in {read_timeout:g} s") from None
            raise self._error(exc) from None
        finally:
            done.set()
            stream.cancel()

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
        """Close the connection; a thread waiting on a watch wakes at once, and no call
        is made after this."""
        with self._lock:
            self._closed = True
        self._channel.close()
