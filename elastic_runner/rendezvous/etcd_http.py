"""JSON over HTTP to one etcd endpoint's gateway (its v3 API, etcd 3.4 and newer).

Why not ``requests`` (through etcd3gw, as before): against a local etcd, a store request
cost the client 0.7 to 0.85 ms of CPU that way (a bare ``requests`` session about the
same, urllib3 about half), and this module about 0.2 ms (``bench/etcd_client.py``),
while etcd's gateway spends 0.5 to 0.8 ms on it: with ``requests`` the clients of a rendezvous spent
more CPU than etcd did. This module is what the store needs and no more:

- One keep-alive connection per thread (a store's heartbeat, watcher and main thread
  each have theirs), checked before reuse: one the server closed while idle is replaced
  before a request is sent on it, never after.
- A watch is a stream of JSON lines on a connection of its own, which ``close`` shuts
  down so that a thread reading it wakes at once.
- Errors are two kinds: :class:`EndpointUnreachable` (connecting failed, the connection
  broke, a timeout, or the gateway answered 503, 408 or 504: another endpoint may do) and
  :class:`EtcdHTTPError` (etcd answered and refused: its own message).
- Proxy variables (``HTTP_PROXY``, ...) are not used: an etcd cluster is reached directly.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import socket
import ssl
import threading
import weakref
from collections.abc import Generator, Mapping
from typing import Any

from elastic_runner.rendezvous.sockets import readable

__all__ = ["EndpointUnreachable", "EtcdEndpoint", "EtcdHTTPError"]

#: The gateway's prefix for etcd 3.4 and newer (3.3's ``/v3beta`` is not supported).
API = "/v3"
#: Statuses that say this endpoint cannot serve now (another may).
_UNAVAILABLE = {408, 503, 504}
_HEADERS = {"Content-Type": "application/json"}


class EndpointUnreachable(Exception):
    """The endpoint could not be reached or did not answer in time."""


class EtcdHTTPError(Exception):
    """etcd answered with an error: ``str()`` is its own message when its body gives one."""

    def __init__(self, status: int, reason: str, body: str) -> None:
        detail = body.strip()
        with contextlib.suppress(ValueError, AttributeError):
            parsed = json.loads(body)
            detail = parsed.get("error") or parsed.get("message") or detail
        super().__init__(f"{status} {reason}: {detail}" if detail else f"{status} {reason}")
        self.status = status


class EtcdEndpoint:
    """One etcd endpoint: ``post`` a JSON request, ``watch`` a stream of JSON lines."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        timeout: float,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.host, self.port = host, port
        self._timeout = timeout
        self._ssl = ssl_context
        #: Sent with every request (the ``Authorization`` token once authenticated).
        self.headers: dict[str, str] = dict(_HEADERS)
        self._local = threading.local()
        self._lock = threading.Lock()
        #: Every open connection, the per-thread ones and the watches', for ``close``;
        #: weak: the connection of a thread that ended goes with the thread's locals.
        self._open: weakref.WeakSet[http.client.HTTPConnection] = weakref.WeakSet()
        self._closed = False

    def __repr__(self) -> str:
        return f"{self.host}:{self.port}"

    # -- connections --------------------------------------------------------------------

    def _connect(self, timeout: float) -> http.client.HTTPConnection:
        conn: http.client.HTTPConnection
        if self._ssl is not None:
            conn = http.client.HTTPSConnection(
                self.host, self.port, timeout=timeout, context=self._ssl
            )
        else:
            conn = http.client.HTTPConnection(self.host, self.port, timeout=timeout)
        with self._lock:
            if self._closed:
                raise EndpointUnreachable(f"{self}: closed")
            self._open.add(conn)
        try:
            conn.connect()
            assert conn.sock is not None
            conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except (OSError, http.client.HTTPException) as exc:
            self._forget(conn)
            raise EndpointUnreachable(_describe(exc)) from None
        return conn

    def _forget(self, conn: http.client.HTTPConnection) -> None:
        with self._lock:
            self._open.discard(conn)
        with contextlib.suppress(OSError):
            conn.close()
        if getattr(self._local, "conn", None) is conn:
            self._local.conn = None

    def _thread_connection(self) -> http.client.HTTPConnection:
        conn: http.client.HTTPConnection | None = getattr(self._local, "conn", None)
        if conn is not None and (conn.sock is None or readable(conn.sock)):
            # idle and readable: the server closed it (or said something unasked)
            self._forget(conn)
            conn = None
        if conn is None:
            conn = self._local.conn = self._connect(self._timeout)
        return conn

    # -- requests -----------------------------------------------------------------------

    def authenticate(self, name: str, password: str) -> None:
        """Get a token for ``name`` and send it with every request from now on (asked
        without the token held: etcd refuses any request with a token it forgot)."""
        answer = self.post("/auth/authenticate", {"name": name, "password": password}, _HEADERS)
        token = answer.get("token")
        if not isinstance(token, str) or not token:
            raise EtcdHTTPError(200, "no token in the answer", json.dumps(answer)[:300])
        self.headers = {**_HEADERS, "Authorization": token}

    def post(
        self, path: str, body: Mapping[str, Any], headers: Mapping[str, str] | None = None
    ) -> Any:
        """``body`` to ``/v3`` + ``path``; etcd's JSON answer."""
        data = json.dumps(body)
        conn = self._thread_connection()
        try:
            conn.request("POST", API + path, body=data, headers=dict(headers or self.headers))
            response = conn.getresponse()
            text = response.read()
        except Exception as exc:
            self._forget(conn)
            raise self._lost(exc) from None
        if response.will_close:
            self._forget(conn)
        return _answer(response.status, response.reason, text)

    def watch(
        self, path: str, body: Mapping[str, Any], connect_timeout: float, read_timeout: float
    ) -> Generator[Any, None, None]:
        """The JSON messages of a streamed answer (a watch), on a connection of its own
        that is closed when the iteration ends. A read waiting longer than
        ``read_timeout`` raises :class:`TimeoutError`; ``close`` ends it with
        :class:`EndpointUnreachable`."""
        conn = self._connect(connect_timeout)
        try:
            try:
                conn.request("POST", API + path, body=json.dumps(body), headers=self.headers)
                response = conn.getresponse()
                if response.status != 200:
                    _answer(response.status, response.reason, response.read())
                sock = conn.sock
                if sock is None:  # closed meanwhile
                    raise EndpointUnreachable(f"{self}: closed")
                sock.settimeout(read_timeout)
            except (EndpointUnreachable, EtcdHTTPError):
                raise
            except Exception as exc:
                raise self._lost(exc, timeout_is_the_callers=True) from None
            while True:
                try:
                    line = response.readline()
                except Exception as exc:
                    raise self._lost(exc, timeout_is_the_callers=True) from None
                if not line:
                    if self._closed:
                        raise EndpointUnreachable(f"{self}: closed")
                    raise EndpointUnreachable(f"{self}: the watch stream ended")
                if line.strip():
                    yield json.loads(line)
        finally:
            self._forget(conn)

    def _lost(self, exc: Exception, *, timeout_is_the_callers: bool = False) -> Exception:
        """What an exception from a connection's I/O means. After ``close`` (from another
        thread, which can leave http.client's objects half torn down under a reader: an
        AttributeError or a ValueError), the endpoint is closed. A watch's timeout is
        its caller's to judge (the wait ran out). An I/O or protocol error, a request's
        timeout included, is an unreachable endpoint. Anything else is not ours to hide."""
        if self._closed:
            return EndpointUnreachable(f"{self}: closed")
        if timeout_is_the_callers and isinstance(exc, TimeoutError):
            return exc
        if isinstance(exc, (OSError, http.client.HTTPException, ValueError)):
            return EndpointUnreachable(_describe(exc))
        return exc

    def close(self) -> None:
        """Close every connection; a thread reading one (a watch) wakes at once, and no
        request is made after this."""
        with self._lock:
            self._closed = True
            conns = list(self._open)
            self._open.clear()
        for conn in conns:
            if conn.sock is not None:
                with contextlib.suppress(OSError):
                    conn.sock.shutdown(socket.SHUT_RDWR)  # wakes a blocked read
            with contextlib.suppress(OSError):
                conn.close()


def _answer(status: int, reason: str, text: bytes) -> Any:
    body = text.decode("utf-8", "replace")
    if status in _UNAVAILABLE:
        raise EndpointUnreachable(f"{status} {reason}: {body.strip()[:300]}")
    if status != 200:
        raise EtcdHTTPError(status, reason, body)
    try:
        answer = json.loads(body)
    except ValueError:
        raise EtcdHTTPError(status, "not JSON", body[:300]) from None
    if not isinstance(answer, dict):  # etcd's answers are objects; callers read fields
        raise EtcdHTTPError(status, "not a JSON object", body[:300])
    return answer


def _describe(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__
