"""The built-in TCP store's client. The wire format is
:mod:`elastic_runner.rendezvous.tcp_wire`; the asyncio server, which only the hosting
agent needs (importing asyncio costs ~11 ms), is :mod:`elastic_runner.rendezvous.tcp_server`.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

from elastic_runner.rendezvous.sockets import readable
from elastic_runner.rendezvous.store import (
    StoreArgumentError,
    StoreError,
    StoreTimeoutError,
    StoreUnavailableError,
    check_seconds,
)
from elastic_runner.rendezvous.tcp_wire import IDLE_TIMEOUT, BadFrame, encode, read_frame

__all__ = ["TCPStoreClient"]

log = logging.getLogger(__name__)

#: How many times a connection the store closed before its hello was answered is made
#: again (after 0.2, 0.4 and 0.8 s) before the store counts as unreachable.
_HELLO_RETRIES = 3
#: Seconds of failing to reach the store the first time before saying so, once: a host
#: agent that starts late is normal for that long; longer, the user wants to know why.
_FIRST_CONTACT_PATIENCE = 30.0


class _HelloUnanswered(StoreUnavailableError):
    """A connection was accepted but its hello got no answer in time: a frozen or
    swamped store, or another program on the port. Not retried as a shed connection
    is: each try would cost the whole request timeout again."""


class TCPStoreClient:
    """A :class:`~elastic_runner.rendezvous.store.Store` on a
    :class:`~elastic_runner.rendezvous.tcp_server.TCPStoreServer`.

    Thread-safe: a connection serves one request at a time, taken from those idle (for
    any thread) or opened, so a watcher blocked in :meth:`wait_for_change` never holds
    up another thread's requests, and a node opens as many connections as it has
    requests at once (two: a wait and a heartbeat), not one per thread: its watcher
    starting when a round completes takes the connection the round was formed on,
    where 4,096 watchers connecting at once kept the store's hellos 10 s late.

    Once the store was reached, losing it is told apart by how reconnecting fails, for
    ``reconnect_timeout`` counted from the first loss (whichever thread saw it): refused
    (nobody listens: the hosting agent is gone, it will not come back) is a
    :class:`StoreError`; no answer (a cut link, a frozen host: it may heal) is a
    :class:`StoreUnavailableError`, which the rendezvous retries until its join timeout.

    ``ssl_context`` (a client context) speaks TLS, checking the server's certificate
    against ``server_hostname`` (default ``host``: the hosting agent reaches its own
    store over loopback but checks the name the other nodes use). A connection idle for
    half the server's idle timeout, or that the server closed, is replaced before the
    next request, without counting as lost.

    ``source_address``: the local address its connections are made from (port 0: any),
    as :func:`socket.create_connection` takes it; ``None`` (the default) lets the
    kernel choose. A benchmark spreads many clients over 127.0.0.x this way, so they do
    not run out of ephemeral ports towards one server.

    ``hello_warning``: seconds without an answer to a new connection's hello before
    saying so (a warning, once per client); the wait goes on up to ``request_timeout``
    (and the patience left), then it is a :class:`StoreUnavailableError` naming the
    likely cause. An idle store answers a hello at once; silence means another program
    holds the port (torch's TCPStore, an HTTP server: they wait for a request of their
    own protocol and never answer ours), a frozen host, or a store swamped by thousands
    of agents connecting at once, which is why it is not given up sooner.
    """

    def __init__(
        self,
        host: str,
        port: int,
        token: str = "",
        connect_timeout: float = 30.0,
        request_timeout: float = 60.0,
        reconnect_timeout: float | None = None,
        *,
        ssl_context: ssl.SSLContext | None = None,
        server_hostname: str | None = None,
        source_address: tuple[str, int] | None = None,
        hello_warning: float = 10.0,
    ) -> None:
        self.address = f"{host}:{port}"
        self._hello_warning = hello_warning
        self._said_silent = False
        self._source_address = source_address
        self._host, self._port, self._token = host, port, token
        self._ssl = ssl_context
        self._server_hostname = server_hostname or host
        #: How long to try the first connection (the host agent may start later) and a
        #: new one after a connection was lost (a dead host does not come back).
        self._connect_timeout = connect_timeout
        self._reconnect_timeout = (
            connect_timeout if reconnect_timeout is None else reconnect_timeout
        )
        self._connected_once = False
        #: When the first try to reach the store began: ``connect_timeout`` counts from
        #: there across calls, so a caller retrying does not get a whole new one each time.
        self._first_try: float | None = None
        #: When the store was first found unreachable after it had been reached (None:
        #: reachable); shared by every thread's reconnect.
        self._lost_since: float | None = None
        self._request_timeout = request_timeout
        self._local = threading.local()
        self._ids = 0
        #: Every open connection, and those not in a request now (with when each was
        #: last used): a connection serves one request at a time, for any thread.
        self._all: list[socket.socket] = []
        self._idle: list[tuple[socket.socket, float]] = []
        #: Set by ``close``: no connection is opened after it (a thread still in a wait
        #: would otherwise reconnect, and that socket outlived the client).
        self._closed = False
        self._lock = threading.Lock()

    @property
    def local_address(self) -> str:
        """This machine's address on the interface that reaches the store."""
        sock = self._conn()
        try:
            return str(sock.getsockname()[0])
        finally:
            self._release(sock)

    def _conn(self) -> socket.socket:
        if self._closed:
            raise StoreError(f"the client of the rendezvous store at {self.address} is closed")
        while True:  # an idle connection, the last used first
            with self._lock:
                idle = self._idle.pop() if self._idle else None
            if idle is None:
                break
            if not self._stale(*idle):
                return idle[0]
            self._drop(idle[0])
        patience = self._reconnect_timeout if self._connected_once else self._connect_timeout
        start = time.monotonic()
        if not self._connected_once:
            with self._lock:
                self._first_try = start = self._first_try or start
        else:
            with self._lock:
                self._lost_since = self._lost_since or start
                start = self._lost_since
        deadline = start + patience
        delay = 0.01
        say_at = None if self._connected_once else start + _FIRST_CONTACT_PATIENCE
        if say_at is not None and say_at < time.monotonic():
            say_at = None  # said (or the time to say it passed) in an earlier call
        while True:
            try:
                # No longer than the patience left: a cut link answers no SYN at all.
                wait = min(5.0, max(0.2, deadline - time.monotonic()))
                sock = socket.create_connection(
                    (self._host, self._port), timeout=wait, source_address=self._source_address
                )
                break
            except OSError as exc:  # socket.gaierror too: the name may resolve later
                if time.monotonic() + delay > deadline:
                    # Never reached: it may yet start. Reached once: refused means its
                    # host agent is gone for good; silence, that the way there may heal.
                    gone = self._connected_once and isinstance(exc, ConnectionRefusedError)
                    kind = StoreError if gone else StoreUnavailableError
                    what = (
                        f"cannot resolve rendezvous store host {self._host!r}"
                        if isinstance(exc, socket.gaierror)
                        else f"cannot reach the rendezvous store at {self.address}"
                    )
                    raise kind(f"{what} (tried for {patience:g} s): {exc}") from None
                if say_at is not None and time.monotonic() >= say_at:
                    say_at = None  # once: the host agent may start late, not this late
                    log.warning(
                        "still cannot reach the rendezvous store at %s after %g s (%s): "
                        "waiting for its host agent for up to %g s in all",
                        self.address,
                        _FIRST_CONTACT_PATIENCE,
                        exc,
                        patience,
                    )
                # The host agent may still be starting, its name not yet in DNS: back off.
                time.sleep(delay)
                delay = min(delay * 2, 0.5)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self._ssl is not None:
            sock = self._handshake(sock, wait)
        with self._lock:
            if self._closed:  # closed while this thread connected
                sock.close()
                raise StoreError(f"the client of the rendezvous store at {self.address} is closed")
            self._all.append(sock)
        try:
            # no longer than the patience left: a node that gives up at its join timeout
            # should not wait a whole hello timeout past it
            left = max(0.2, deadline - time.monotonic())
            self._request(sock, "hello", hello_within=left, pooled=False, token=self._token)
        except _HelloUnanswered:
            self._drop(sock)
            raise
        except StoreUnavailableError:
            self._drop(sock)
            # A store flooded with new connections sheds those that have not said hello
            # yet (4,096 agents connecting at once did this on a 2-core machine): try
            # again a few times, backing off, before calling the store unreachable.
            shed = getattr(self._local, "shed", 0)
            if shed >= _HELLO_RETRIES or time.monotonic() > deadline:
                self._local.shed = 0
                raise
            self._local.shed = shed + 1
            time.sleep(0.2 * 2**shed)
            return self._conn()
        except BaseException:
            self._drop(sock)
            raise
        self._local.shed = 0
        self._connected_once = True
        with self._lock:
            self._lost_since = None
        return sock

    def _handshake(self, sock: socket.socket, wait: float) -> socket.socket:
        """``sock`` with TLS on it: a certificate that does not verify, or a peer that
        does not speak TLS, is a :class:`StoreError` (no retry helps); a connection
        closed during the handshake may be a busy store (retried)."""
        assert self._ssl is not None
        sock.settimeout(wait)
        try:
            return self._ssl.wrap_socket(sock, server_hostname=self._server_hostname)
        except ssl.SSLCertVerificationError as exc:
            sock.close()
            raise StoreError(
                f"cannot verify the rendezvous store at {self.address}: "
                f"{exc.verify_message or exc.reason} (rdzv.ca_cert: the CA that signed "
                "the hosting agent's rdzv.cert)"
            ) from None
        except (ssl.SSLEOFError, ssl.SSLZeroReturnError, ConnectionError) as exc:
            sock.close()
            raise StoreUnavailableError(
                f"the rendezvous store at {self.address} closed the connection during "
                f"the TLS handshake ({exc}): is it serving TLS (rdzv.cert and rdzv.key "
                "on the hosting agent)?"
            ) from None
        except ssl.SSLError as exc:
            sock.close()
            raise StoreError(
                f"TLS with the rendezvous store at {self.address} failed: "
                f"{exc.reason or exc} (is it serving TLS: rdzv.cert and rdzv.key on the "
                "hosting agent?)"
            ) from None
        except OSError as exc:  # a timeout, a reset: the way there may heal
            sock.close()
            raise StoreUnavailableError(
                f"cannot reach the rendezvous store at {self.address}: {exc}"
            ) from None

    def _stale(self, sock: socket.socket, used: float) -> bool:
        """Whether an idle connection, last used at ``used``, must be replaced before its
        next request: idle long enough that the server may be closing it, or already
        closed by it (readable before a request was sent: its end of stream, or a
        parting word)."""
        if time.monotonic() - used > IDLE_TIMEOUT / 2:
            return True
        return readable(sock)

    def _release(self, sock: socket.socket) -> None:
        """A connection whose request got its answer is idle again, for any thread."""
        with self._lock:
            if not self._closed and sock in self._all:
                self._idle.append((sock, time.monotonic()))

    def _drop(self, sock: socket.socket) -> None:
        """Forget and close a connection."""
        with self._lock:
            if sock in self._all:
                self._all.remove(sock)
        with contextlib.suppress(OSError):
            sock.close()

    def _await_hello(self, sock: socket.socket, limit: float) -> None:
        """Wait until the answer to a hello starts arriving, saying so once (per client)
        when none has come within ``hello_warning``; the read that follows waits for the
        rest of ``limit``."""
        first = min(self._hello_warning, limit)
        if self._said_silent or first >= limit or readable(sock, first):
            return
        self._said_silent = True
        log.warning(
            "the rendezvous store at %s accepted a connection but has not answered its "
            "hello in %g s: another program may hold that port (torch's TCPStore, for "
            "one), or the store is swamped; waiting up to %g s",
            self.address,
            first,
            limit,
        )
        sock.settimeout(max(0.001, limit - first))

    def _request(
        self,
        sock: socket.socket,
        op: str,
        wait_s: float | None = None,
        hello_within: float | None = None,
        pooled: bool = True,
        **args: Any,
    ) -> Any:
        """Send one request on ``sock`` and read its answer; the connection is then idle
        again (``pooled``) or dropped when it failed."""
        with self._lock:
            self._ids += 1
            rid = self._ids
        payload: dict[str, Any] = {"id": rid, "op": op}
        if op == "hello":
            payload["token"] = args["token"]
            limit = min(t for t in (self._request_timeout, hello_within) if t is not None)
            sock.settimeout(limit)
        else:
            payload["args"] = args
            sock.settimeout((wait_s or 0) + self._request_timeout)
        try:
            frame = encode(payload)
        except BaseException:  # arguments JSON cannot carry: nothing was sent
            if pooled:
                self._release(sock)
            raise
        try:
            sock.sendall(frame)
            if op == "hello":
                self._await_hello(sock, limit)
            answer = read_frame(sock)
        except BadFrame as exc:
            self._drop(sock)
            raise StoreError(f"lost the rendezvous store at {self.address}: {exc}") from None
        except OSError as exc:  # the connection is lost; reconnecting tells more
            self._drop(sock)
            if op == "hello" and isinstance(exc, TimeoutError):
                raise _HelloUnanswered(
                    f"{self.address} accepted a connection but did not answer the "
                    f"rendezvous store's hello within {limit:.3g} s: another program "
                    "holds that port (torch's TCPStore, for one), or the store's host "
                    "is frozen or swamped"
                ) from None
            if isinstance(exc, TimeoutError):
                exc = TimeoutError(f"no answer within {sock.gettimeout() or 0:g} s")
            hint = ""
            if op == "hello" and self._ssl is None:
                hint = " (at hello: if the store serves TLS, set rdzv.ca_cert)"
            raise StoreUnavailableError(
                f"lost the rendezvous store at {self.address}: {exc}{hint}"
            ) from None
        except BaseException:  # interrupted mid-request: what it reads next is unknown
            self._drop(sock)
            raise
        if pooled:
            self._release(sock)
        if not answer.get("ok"):
            error = str(answer.get("error"))[:1000]
            if answer.get("timeout"):
                raise StoreTimeoutError(error)
            if answer.get("busy"):
                raise StoreUnavailableError(
                    f"the rendezvous store at {self.address} refuses connections: {error}"
                )
            if answer.get("invalid"):
                raise StoreArgumentError(f"store at {self.address}: {error}")
            raise StoreError(f"store at {self.address}: {error}")
        return answer.get("result")

    def _call(self, op: str, timeout: float | None = None, **args: Any) -> Any:
        if timeout is not None:
            # checked here too: it also sets how long this client waits for the answer
            args["timeout"] = timeout = check_seconds(timeout, "timeout")
        return self._request(self._conn(), op, wait_s=timeout, **args)

    def set(self, key: str, value: str, ttl: float | None = None) -> None:
        self._call("set", key=key, value=value, ttl=ttl)

    def refresh(self, key: str, ttl: float) -> bool:
        return bool(self._call("refresh", key=key, ttl=ttl))

    def count(self, prefix: str) -> int:
        """How many keys are under ``prefix``, in one small answer."""
        return int(self._call("count", prefix=prefix))

    def refresh_many(self, keys: Sequence[str], ttl: float) -> list[bool]:
        """:meth:`refresh` of each of ``keys``, in one request."""
        return [bool(x) for x in self._call("refresh_many", keys=_as_list(keys), ttl=ttl)]

    def get(self, key: str) -> str | None:
        result: str | None = self._call("get", key=key)
        return result

    def add(self, key: str, amount: int) -> int:
        return int(self._call("add", key=key, amount=amount))

    def compare_set(
        self, key: str, expected: str | None, desired: str, ttl: float | None = None
    ) -> tuple[bool, str | None]:
        done, value = self._call(
            "compare_set", key=key, expected=expected, desired=desired, ttl=ttl
        )
        return bool(done), value

    def delete(self, key: str) -> bool:
        return bool(self._call("delete", key=key))

    def delete_prefix(self, prefix: str) -> int:
        return int(self._call("delete_prefix", prefix=prefix))

    def multi_get(self, keys: Sequence[str]) -> list[str | None]:
        return list(self._call("multi_get", keys=_as_list(keys)))

    def multi_set(self, items: Mapping[str, str]) -> None:
        self._call("multi_set", items=dict(items) if isinstance(items, Mapping) else items)

    def scan(self, prefix: str) -> tuple[dict[str, str], int]:
        found, version = self._call("scan", prefix=prefix)
        return dict(found), int(version)

    def wait_for_change(self, prefix: str, version: int, timeout: float) -> int:
        return int(self._call("wait_for_change", timeout=timeout, prefix=prefix, version=version))

    def wait(self, keys: Sequence[str], timeout: float) -> None:
        self._call("wait", timeout=timeout, keys=_as_list(keys))

    def close(self) -> None:
        """Close every thread's connection. Each is shut down first: a thread blocked in
        a request on it (a watcher's wait) wakes at once with the connection lost,
        instead of reading, after the close, whatever socket reuses its descriptor."""
        with self._lock:
            self._closed = True
            for sock in self._all:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                with contextlib.suppress(OSError):
                    sock.close()
            self._all.clear()
            self._idle.clear()


def _as_list(keys: Sequence[str]) -> Any:
    """Keys as a JSON list; anything else (a string, a set) as it is, for the server to
    refuse or the encoder to reject: a string is not a list of its characters."""
    return list(keys) if isinstance(keys, list | tuple) else keys
