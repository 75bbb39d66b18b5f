"""The built-in TCP store's server: an asyncio loop in a daemon thread of the agent that
hosts the store, serving a :class:`~elastic_runner.rendezvous.store.MemoryStore`
(wire format: :mod:`elastic_runner.rendezvous.tcp_wire`). It listens on every interface
(IPv4 and, where the machine has it, IPv6) unless given one address.

Anything that reaches its port is treated as hostile until it said ``hello`` with the
token (:class:`StoreLimits` has the numbers):

- before ``hello``: one frame of at most ``MAX_HELLO`` bytes, within ``hello_timeout``
  of connecting (the TLS handshake included); at most ``max_unauthenticated`` such
  connections at once: past that, the oldest is closed to make room for a new one once
  it had ``hello_grace`` to say hello (agents say it at once) and nothing it sent waits
  to be read (it is silent, not waiting for this loop). A burst of agents connecting
  together may go up to four times over; further, accepting pauses (the kernel's queue
  holds the newcomers) until one of them said hello or the oldest may be closed. A
  store swamped by thousands of agents connecting at once is slow to read their hellos:
  closing those connections only made each agent connect again (4,096 agents on 2 cores:
  150,000 connections closed a minute, and no round formed in 5 minutes);
- after it: requests of at most ``MAX_REQUEST`` bytes; a frame once started must arrive
  within ``read_timeout``; a connection idle for ``idle_timeout`` (not inside a wait) is
  closed (clients reconnect on their own);
- at most ``max_connections`` in all (never so many that the agent would run short of
  file descriptors: :meth:`StoreLimits.for_this_process`), more are closed at once with a
  "busy" answer; when the process is out of file
  descriptors all the same, a connection is accepted on a reserved descriptor and
  closed, so the kernel's queue drains instead of the loop spinning;
- a request with bad arguments (not text, NaN, negative, unknown) gets an error frame,
  checked before it reaches the store; a frame that is not a JSON object closes its
  connection only;
- every kind of refusal logs one warning line at most once a minute (with a count of
  the others), never a traceback.

Per-connection memory is bounded by the frame limits (the reader buffers at most one
frame, and little beyond it), so a flood costs the agent neither memory nor its own
thread's time: only this thread serves connections.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import hmac
import logging
import os
import resource
import socket
import ssl
import sys
import threading
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any, TypeVar

from elastic_runner.rendezvous.network import listen_socket
from elastic_runner.rendezvous.sockets import readable
from elastic_runner.rendezvous.store import (
    MemoryStore,
    StoreArgumentError,
    StoreError,
    StoreTimeoutError,
)
from elastic_runner.rendezvous.tcp_wire import (
    BLOCKING_OPS,
    HEADER,
    IDLE_TIMEOUT,
    MAX_FRAME,
    MAX_HELLO,
    MAX_REQUEST,
    BadFrame,
    check_request,
    decode,
    encode,  # by name: bench/rendezvous.py swaps this module's encode to count bytes
)

__all__ = [
    "MAX_CONNECTIONS",
    "MAX_UNAUTHENTICATED",
    "StoreLimits",
    "TCPStoreServer",
]

log = logging.getLogger(__name__)

_T = TypeVar("_T")

#: Most connections the store serves at once (a node uses two: one for a wait, its own
#: or its watcher's, and one for its heartbeat; three at moments), unless the open-file
#: limit asks for fewer.
MAX_CONNECTIONS = 4096
#: Most connections at once that have not said ``hello`` yet.
MAX_UNAUTHENTICATED = 64
#: How much a connection's reader buffers beyond the frame it waits for.
_READ_LIMIT = 16 << 10
#: How often the same kind of refusal is logged at most (seconds).
_LOG_EVERY = 60.0
#: errno values of an accept() that failed for lack of resources.
_OUT_OF_RESOURCES = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}


@dataclass(frozen=True)
class StoreLimits:
    """What one connection, and all of them together, may cost the hosting agent."""

    #: Connections at once; more are refused.
    max_connections: int = MAX_CONNECTIONS
    #: Connections at once that have not said ``hello``; the oldest makes room.
    max_unauthenticated: int = MAX_UNAUTHENTICATED
    #: Seconds from connecting (TLS handshake included) to a complete ``hello``.
    hello_timeout: float = 5.0
    #: Seconds a connection has to say ``hello`` before it may make room for another (an
    #: agent starved of CPU may take a second between connecting and saying it).
    hello_grace: float = 2.0
    #: Seconds a frame, once its first byte arrived, has to arrive whole; and an answer
    #: to be taken by the client.
    read_timeout: float = 15.0
    #: Seconds an authenticated connection may wait between requests.
    idle_timeout: float = IDLE_TIMEOUT
    #: Largest frame before ``hello`` and after it.
    max_hello: int = MAX_HELLO
    max_request: int = MAX_REQUEST

    @classmethod
    def for_this_process(cls) -> StoreLimits:
        """The defaults, with the connection caps lowered to keep file descriptors for the
        agent's own use: a quarter of this process's open-file limit (``ulimit -n``), and
        at least 256 of them or half (768 connections at the usual 1024)."""
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft == resource.RLIM_INFINITY:
            return cls()
        kept = max(soft // 4, min(256, soft // 2))
        total = max(8, min(MAX_CONNECTIONS, soft - kept))
        return cls(max_connections=total, max_unauthenticated=min(MAX_UNAUTHENTICATED, total // 4))


class _Throttled:
    """Warnings of one kind at most once per ``_LOG_EVERY`` s, each saying how many of
    that kind were not logged since the last one."""

    def __init__(self) -> None:
        self._last: dict[str, float] = {}
        self._skipped: collections.Counter[str] = collections.Counter()

    def warning(self, kind: str, message: str, *args: object) -> None:
        now = time.monotonic()
        last = self._last.get(kind)
        if last is not None and now - last < _LOG_EVERY:
            self._skipped[kind] += 1
            return
        self._last[kind] = now
        skipped = self._skipped.pop(kind, 0)
        if skipped:
            message += " (%d more like it in the last %.0f s)"
            args = (*args, skipped, now - last if last is not None else 0.0)
        log.warning("tcp store: " + message, *args)


class _Conn:
    """One accepted connection."""

    __slots__ = ("accepted", "authenticated", "peer", "sock", "started", "task", "transport")

    def __init__(self, sock: socket.socket, peer: str, accepted: float) -> None:
        self.sock = sock
        self.peer = peer
        self.accepted = accepted
        self.authenticated = False
        self.started = False
        self.transport: asyncio.Transport | None = None
        self.task: asyncio.Task[None] | None = None

    def drop(self) -> None:
        """Close now, whatever it is doing."""
        if self.transport is not None:
            self.transport.abort()
            return
        if self.task is not None:
            self.task.cancel()  # in its TLS handshake (which closes it), or not started
        if not self.started:
            self.sock.close()

    def close(self) -> None:
        """Close once what was written is sent (at once, when it cannot be)."""
        if self.transport is None:
            self.sock.close()
        elif self.transport.get_write_buffer_size():
            self.transport.abort()  # a client that does not read must not hold it open
        else:
            self.transport.close()


class _Closed(Exception):
    """End this connection (the reason is in the message, for the debug log)."""


class TCPStoreServer:
    """Serves a :class:`MemoryStore` on ``host:port`` from a daemon thread: ``host`` is
    the one address to listen on (a name: the first address it resolves to), ``None``
    every interface. ``port`` 0 picks a free port (:attr:`port`). Binding errors are
    the :class:`OSError` of the bind (``EADDRINUSE``: another server has the port).

    ``token``: what every client must present in ``hello`` (empty: no secret; a client
    that presents one is refused all the same, its agent and this one disagree).
    ``ssl_context``: a server-side context to speak TLS. ``limits``:
    :meth:`StoreLimits.for_this_process` unless given. ``listening``: a socket already
    listening (from :func:`~elastic_runner.rendezvous.network.listen_socket`), served
    instead of binding ``host:port``; the connections waiting in its backlog are served
    too."""

    def __init__(
        self,
        host: str | None,
        port: int,
        token: str = "",
        *,
        ssl_context: ssl.SSLContext | None = None,
        limits: StoreLimits | None = None,
        listening: socket.socket | None = None,
    ) -> None:
        self._token = token.encode()
        self._ssl = ssl_context
        self.limits = limits or StoreLimits.for_this_process()
        self._loop = asyncio.new_event_loop()
        self._loop.set_exception_handler(self._loop_error)
        #: Blocked waits by the prefix (or key) they wait on: a change wakes only the
        #: waits it concerns. Waking every wait on every change cost a round of 1,024
        #: nodes N² wake-ups (each a task and a look at the store).
        self._waiters: dict[str, set[asyncio.Event]] = {}
        self._expiry: asyncio.TimerHandle | None = None
        self._conns: set[_Conn] = set()
        #: Connections that have not said hello, oldest first.
        self._unauthenticated: dict[_Conn, None] = {}
        self._warn = _Throttled()
        self._closing = False
        #: While accepting pauses: the timer that ends the pause.
        self._paused: asyncio.TimerHandle | None = None
        self._paused_for_hello = False
        self._reserve: int | None = None
        self.store = MemoryStore(on_change=self._changed)
        #: Requests answered, by operation (for benchmarks and diagnostics).
        self.requests: collections.Counter[str] = collections.Counter()
        #: Bytes of the frames read (headers included) and written, on every connection,
        #: for benchmarks and diagnostics (``bench/scale.py``): two integer additions per
        #: request, always on.
        self.bytes_in = 0
        self.bytes_out = 0
        #: Connections refused or closed for the limits, by reason (for tests).
        self.refused: collections.Counter[str] = collections.Counter()
        try:
            sock = listen_socket(host, port) if listening is None else listening
        except BaseException:
            self._loop.close()
            raise
        sock.setblocking(False)
        self._sock = sock
        #: Where a client on this machine reaches the server.
        self.local_host = _local_host(sock)
        self.port = int(sock.getsockname()[1])
        self._reserve_fd()
        self._loop.add_reader(sock.fileno(), self._on_acceptable)  # before the loop runs
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="elastic-run-tcp-store", daemon=True
        )
        self._thread.start()

    @property
    def connections(self) -> int:
        """Connections open now (for tests and diagnostics)."""
        return len(self._conns)

    def is_alive(self) -> bool:
        """Whether the server's thread still runs."""
        return self._thread.is_alive()

    def close(self) -> None:
        """Stop serving: close the listener and every connection, end the thread."""
        if not self._thread.is_alive():
            return
        done = asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop)
        with contextlib.suppress(Exception):
            done.result(timeout=5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        if not self._thread.is_alive():
            self._loop.close()
            self._sock.close()
            if self._reserve is not None:
                with contextlib.suppress(OSError):
                    os.close(self._reserve)
                self._reserve = None

    async def _shutdown(self) -> None:
        self._closing = True
        self._loop.remove_reader(self._sock.fileno())
        self._sock.close()  # new connections are refused from now on
        if self._expiry:
            self._expiry.cancel()
        for conn in list(self._conns):
            conn.drop()
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        _, pending = await asyncio.wait(tasks, timeout=0.5) if tasks else (set(), set())
        for task in pending:  # blocked in a wait: nothing else ends them
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)

    # -- runs in the server's thread ----------------------------------------------------

    def _loop_error(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        """asyncio's own errors: one line (a traceback at debug level only)."""
        exc = context.get("exception")
        what = f"{type(exc).__name__}: {exc}" if exc is not None else ""
        self._warn.warning("loop", "%s %s", context.get("message", "error"), what)
        log.debug("tcp store: asyncio error", exc_info=exc)

    def _changed(self, key: str) -> None:
        # A wait woken once is woken for good: its events go with it, so that more
        # changes before its task runs cost nothing. Leaving them cost each change every
        # wait on its prefix: the 4,096 join keys of a round going while 4,096 members'
        # watchers waited on them, N² wake-ups in the loop's turn.
        for prefix in [p for p in self._waiters if key.startswith(p)]:
            for event in self._waiters.pop(prefix):
                event.set()

    def _schedule_expiry(self) -> None:
        next_expiry = self.store.expire()
        if self._expiry:
            self._expiry.cancel()
            self._expiry = None
        if next_expiry is not None:
            delay = max(0.0, next_expiry - time.monotonic())
            self._expiry = self._loop.call_later(delay, self._schedule_expiry)

    def _reserve_fd(self) -> None:
        """Hold one descriptor in reserve: out of descriptors, it is given up to accept
        (and close) a connection, so the kernel's queue drains."""
        if self._reserve is None:
            with contextlib.suppress(OSError):
                self._reserve = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)

    def _on_acceptable(self) -> None:
        """The listener has connections waiting: take them (a batch at most, so that the
        connections already in get their turn; a swamped loop's turns come seconds
        apart, and 128 a turn kept thousands of agents connecting at once in the
        kernel's queue)."""
        for _ in range(512):
            if not self._room_for_one():
                return
            try:
                sock, address = self._sock.accept()
            except BlockingIOError:
                return
            except OSError as exc:
                self._accept_failed(exc)
                return
            sock.setblocking(False)
            self._admit(sock, address)

    def _pause_accepting(self, seconds: float, *, until_hello: bool = False) -> None:
        """Take no connection for ``seconds`` (the kernel queues them meanwhile), or
        (``until_hello``) until a connection that had not said hello says it or goes."""
        if self._paused is None:
            self._loop.remove_reader(self._sock.fileno())
        else:
            self._paused.cancel()
        self._paused = self._loop.call_later(seconds, self._resume_accepting)
        self._paused_for_hello = until_hello

    def _resume_accepting(self) -> None:
        if self._paused is None:
            return
        self._paused.cancel()
        self._paused, self._paused_for_hello = None, False
        if not self._closing:
            self._loop.add_reader(self._sock.fileno(), self._on_acceptable)

    def _room_for_one(self) -> bool:
        """Whether a connection may be taken now, as far as those that have not said
        hello go (closing the oldest of them to make room when it is silent past its
        grace, and one waits to be accepted); when not for their number, accepting
        pauses until the oldest's grace ends, or sooner when one of them says hello or
        goes."""
        limits, pending = self.limits, self._unauthenticated
        cap = limits.max_unauthenticated
        if len(pending) < cap:
            return True
        if not readable(self._sock):  # nobody in the kernel's queue: none to make room for
            return False
        oldest = next(iter(pending))
        grace_left = oldest.accepted + limits.hello_grace - self._loop.time()
        # Readable: what it sent waits for this loop (swamped by a burst), not for it.
        if grace_left <= 0 and not readable(oldest.sock):
            self.refused["unauthenticated"] += 1
            self._warn.warning(
                "unauthenticated",
                "closing the oldest connection that has not said hello (from %s): more "
                "than %d at once",
                oldest.peer,
                cap,
            )
            self._forget(oldest)
            oldest.drop()
            return True
        if len(pending) < 4 * cap:
            return True
        self._pause_accepting(max(0.01, grace_left), until_hello=True)
        return False

    def _accept_failed(self, exc: OSError) -> None:
        if exc.errno not in _OUT_OF_RESOURCES:
            self._warn.warning("accept", "accept() failed: %s", exc)
            self._pause_accepting(0.05)
            return
        self.refused["out of descriptors"] += 1
        self._warn.warning(
            "descriptors",
            "out of file descriptors (%s, open-file limit %d): refusing new connections",
            os.strerror(exc.errno or 0),
            resource.getrlimit(resource.RLIMIT_NOFILE)[0],
        )
        if self._reserve is not None:
            os.close(self._reserve)
            self._reserve = None
            with contextlib.suppress(OSError):
                sock, _ = self._sock.accept()
                self._busy(sock, "the agent hosting the store is out of file descriptors")
            self._reserve_fd()
        self._pause_accepting(0.01 if self._reserve is not None else 0.1)

    def _busy(self, sock: socket.socket, why: str) -> None:
        """Refuse a connection just accepted: a "busy" answer (plain TCP only), then
        close."""
        with contextlib.suppress(OSError):
            if self._ssl is None:
                sock.setblocking(False)
                sock.send(encode({"id": None, "ok": False, "busy": True, "error": why}))
        sock.close()

    def _admit(self, sock: socket.socket, address: Any) -> None:
        limits = self.limits
        peer = _peer(address)
        if len(self._conns) >= limits.max_connections:
            self.refused["too many connections"] += 1
            self._warn.warning(
                "connections",
                "refusing a connection from %s: %d connections open (max %d)",
                peer,
                len(self._conns),
                limits.max_connections,
            )
            self._busy(sock, f"the store serves {limits.max_connections} connections already")
            return
        conn = _Conn(sock, peer, self._loop.time())
        self._conns.add(conn)
        if not self._hello_at_once(conn):
            self._unauthenticated[conn] = None
        conn.task = self._loop.create_task(self._serve(conn))

    def _hello_at_once(self, conn: _Conn) -> bool:
        """Answer a right hello that came with the connection (plain TCP), here as it is
        accepted: through the loop, it took four of its turns (the task, the transport,
        the read, the answer), and a swamped store's turns last seconds (4,096 agents
        connecting at once: hellos answered after over 10 s, heartbeats lost). Anything
        else (no whole frame yet, not a hello, a wrong token, TLS) is left to
        :meth:`_serve`, which reads it as usual: only a right hello is taken here."""
        if self._ssl is not None:
            return False
        sock, limit = conn.sock, HEADER.size + self.limits.max_hello
        try:
            data = sock.recv(limit, socket.MSG_PEEK)
            if len(data) < HEADER.size:
                return False
            (size,) = HEADER.unpack_from(data)
            frame = HEADER.size + size
            if size > self.limits.max_hello or len(data) < frame:
                return False
            message = decode(data[HEADER.size : frame])
            token = message.get("token", "")
            if (
                message.get("op") != "hello"
                or not isinstance(token, str)
                or not hmac.compare_digest(token.encode("utf-8", "surrogatepass"), self._token)
            ):
                return False
            answer = encode({"id": _request_id(message.get("id")), "ok": True, "result": None})
            sock.recv(frame)  # taken: the connection's reader starts after it
            if sock.send(answer) != len(answer):  # (a new socket's buffer takes it whole)
                sock.close()  # never seen; the task finds it closed and forgets it
                return True
        except (OSError, BadFrame):
            return False
        conn.authenticated = True
        self.requests["hello"] += 1
        self.bytes_in += frame
        self.bytes_out += len(answer)
        return True

    def _forget(self, conn: _Conn) -> None:
        self._conns.discard(conn)
        self._said_hello(conn)

    def _said_hello(self, conn: _Conn) -> None:
        """``conn`` no longer counts among those that have not said hello (it said it,
        or it is gone): a pause for their number ends."""
        if self._unauthenticated.pop(conn, 0) is None and self._paused_for_hello:
            self._resume_accepting()

    async def _serve(self, conn: _Conn) -> None:
        limits = self.limits
        conn.started = True
        try:
            reader = asyncio.StreamReader(limit=_READ_LIMIT)
            protocol = asyncio.StreamReaderProtocol(reader)
            if self._ssl is not None:
                opening = self._loop.connect_accepted_socket(
                    lambda: protocol,
                    conn.sock,
                    ssl=self._ssl,
                    ssl_handshake_timeout=limits.hello_timeout,
                )
            else:
                opening = self._loop.connect_accepted_socket(lambda: protocol, conn.sock)
            # In this task, not another (Python 3.11+): wait_for's own task, dropped
            # before its first step, never closed the socket (16 of 100 connections
            # closed for the cap of those without hello were left open)
            transport, _ = await _within(opening, limits.hello_timeout)
            assert isinstance(transport, asyncio.Transport)
            conn.transport = transport
            writer = asyncio.StreamWriter(transport, protocol, reader, self._loop)
            while True:
                message = await self._read(conn, reader)
                if not conn.authenticated:
                    await self._hello(conn, message, writer)
                    continue
                await self._send(writer, await self._answer(message, reader))
        except _Closed as exc:
            log.debug("tcp store: closing %s: %s", conn.peer, exc)
        except BadFrame as exc:
            self._warn.warning("frame", "dropped a client at %s: %s", conn.peer, exc)
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.TimeoutError) as exc:
            log.debug("tcp store: client %s gone: %r", conn.peer, exc)
        except ssl.SSLError as exc:
            self._warn.warning("tls", "TLS with %s failed: %s", conn.peer, exc.reason or exc)
        except asyncio.CancelledError:
            pass  # dropped (evicted, or the server closes)
        except Exception as exc:  # a bug here must cost one connection, not the server
            self._warn.warning(
                "internal", "error serving %s: %s: %s", conn.peer, type(exc).__name__, exc
            )
            log.debug("tcp store: error serving %s", conn.peer, exc_info=True)
        finally:
            self._forget(conn)
            conn.close()

    async def _read(self, conn: _Conn, reader: asyncio.StreamReader) -> dict[str, Any]:
        """The next frame's message, within the connection's time limits."""
        limits = self.limits
        if conn.authenticated:
            idle, read, limit = limits.idle_timeout, limits.read_timeout, limits.max_request
        else:
            left = conn.accepted + limits.hello_timeout - self._loop.time()
            idle = read = max(0.0, left)
            limit = limits.max_hello
        try:
            header = await _within(reader.readexactly(HEADER.size), idle)
        except asyncio.TimeoutError:
            if conn.authenticated:
                raise _Closed(f"idle for {idle:g} s") from None
            self.refused["no hello in time"] += 1
            raise _Closed(f"no hello within {limits.hello_timeout:g} s") from None
        (size,) = HEADER.unpack(header)
        if size > limit:
            when = "after hello" if conn.authenticated else "before hello"
            raise BadFrame(f"frame of {size} bytes {when} (max {limit})")
        try:
            body = await _within(reader.readexactly(size), read)
        except asyncio.TimeoutError:
            if not conn.authenticated:
                self.refused["no hello in time"] += 1
            raise _Closed(f"a frame of {size} bytes did not arrive within {read:g} s") from None
        self.bytes_in += HEADER.size + size
        return decode(body)

    async def _send(self, writer: asyncio.StreamWriter, answer: dict[str, Any]) -> None:
        try:
            frame = encode(answer)
        except (TypeError, ValueError, RecursionError) as exc:  # nothing the store returns
            frame = encode({"id": None, "ok": False, "error": f"cannot encode: {exc}"})
        if len(frame) - HEADER.size > MAX_FRAME:
            frame = encode(
                {
                    "id": answer.get("id"),
                    "ok": False,
                    "error": f"answer of {len(frame)} bytes over the frame limit ({MAX_FRAME})",
                }
            )
        writer.write(frame)
        self.bytes_out += len(frame)
        if not writer.transport.get_write_buffer_size():
            return  # sent whole: nothing to wait for (most answers)
        try:
            await _within(writer.drain(), self.limits.read_timeout)
        except asyncio.TimeoutError:
            raise _Closed("the client does not take its answers") from None

    async def _hello(
        self, conn: _Conn, message: dict[str, Any], writer: asyncio.StreamWriter
    ) -> None:
        rid = _request_id(message.get("id"))
        token = message.get("token", "")
        if (
            message.get("op") != "hello"
            or not isinstance(token, str)
            or not hmac.compare_digest(token.encode("utf-8", "surrogatepass"), self._token)
        ):
            self.refused["wrong token"] += 1
            self._warn.warning(
                "token", "refused a client at %s: wrong or missing rdzv.token", conn.peer
            )
            await self._send(
                writer, {"id": rid, "ok": False, "error": "wrong or missing rdzv.token"}
            )
            raise _Closed("wrong token")
        conn.authenticated = True
        self._said_hello(conn)
        self.requests["hello"] += 1
        await self._send(writer, {"id": rid, "ok": True, "result": None})

    async def _answer(
        self, message: dict[str, Any], reader: asyncio.StreamReader
    ) -> dict[str, Any]:
        rid, op = message.get("id"), message.get("op")
        if rid is not None and _request_id(rid) is None:
            return self._refuse(None, "id must be an integer")
        if op == "hello":  # again: nothing to do
            self.requests["hello"] += 1
            return {"id": rid, "ok": True, "result": None}
        try:
            args = check_request(op, message.get("args", {}))
        except StoreArgumentError as exc:
            return self._refuse(rid, str(exc))
        assert isinstance(op, str)
        self.requests[op] += 1
        try:
            if op in BLOCKING_OPS:
                result: Any = await self._blocking(op, args, reader)
            else:
                result = getattr(self.store, op)(**args)
                if (op == "set" and args.get("ttl") is not None) or op in (
                    "compare_set",
                    "refresh",
                ):
                    self._schedule_expiry()
        except StoreTimeoutError as exc:
            return {"id": rid, "ok": False, "error": str(exc), "timeout": True}
        except StoreArgumentError as exc:
            return self._refuse(rid, str(exc))
        except StoreError as exc:
            return {"id": rid, "ok": False, "error": f"{type(exc).__name__}: {exc}"}
        return {"id": rid, "ok": True, "result": result}

    def _refuse(self, rid: int | None, why: str) -> dict[str, Any]:
        self.refused["bad request"] += 1
        self._warn.warning("request", "refused a request: %s", why)
        return {"id": rid, "ok": False, "invalid": True, "error": f"StoreArgumentError: {why}"}

    async def _blocking(self, op: str, args: dict[str, Any], reader: asyncio.StreamReader) -> Any:
        """Wait until the store has what ``op`` waits for, or its timeout runs out. A
        client says nothing until it has its answer: whatever it sends meanwhile (its end
        of stream, when it gave up) ends the wait and the connection, so an abandoned
        wait does not hold the server's resources until its timeout."""
        timeout = float(args.pop("timeout"))
        deadline = self._loop.time() + timeout
        peer = self._loop.create_task(reader.read(1))
        try:
            while True:
                try:
                    return getattr(self.store, op)(timeout=0, **args)
                except StoreTimeoutError:
                    remaining = deadline - self._loop.time()
                    if remaining <= 0:
                        raise StoreTimeoutError(f"{op} timed out after {timeout:g} s") from None
                event = asyncio.Event()
                # (the arguments are valid: the call above checked them)
                watched = [args["prefix"]] if op == "wait_for_change" else list(args["keys"])
                for prefix in watched:
                    self._waiters.setdefault(prefix, set()).add(event)
                changed = self._loop.create_task(event.wait())
                try:
                    await asyncio.wait(
                        {changed, peer}, timeout=remaining, return_when=asyncio.FIRST_COMPLETED
                    )
                finally:
                    for prefix in watched:
                        events = self._waiters.get(prefix)
                        if events is not None:
                            events.discard(event)
                            if not events:
                                del self._waiters[prefix]
                    changed.cancel()
                if peer.done():
                    raise _Closed(f"the client spoke or left during {op}")
        finally:
            peer.cancel()
            # ended before the connection's next read starts: the reader takes one
            # reader at a time
            await asyncio.wait({peer})
            if not peer.cancelled():
                peer.exception()  # retrieved: a reset is no error worth a log line


if sys.version_info >= (3, 11):

    async def _within(awaitable: Awaitable[_T], seconds: float) -> _T:
        """``await awaitable``, or :class:`TimeoutError` after ``seconds``: a timer,
        where :func:`asyncio.wait_for` (before Python 3.12) also made a task of it, for
        every frame read (a fifth of the loop's time at 4,096 nodes)."""
        async with asyncio.timeout(seconds):
            return await awaitable

else:  # pragma: no cover  (Python 3.10)
    _within = asyncio.wait_for


def _request_id(rid: object) -> int | None:
    """A request's id as echoed back: an integer (64-bit), else ``None``."""
    if isinstance(rid, int) and not isinstance(rid, bool) and -(2**63) <= rid < 2**63:
        return rid
    return None


def _peer(address: Any) -> str:
    """``host:port`` of a client (an IPv4 client of a dual-stack socket as IPv4)."""
    try:
        host, port = str(address[0]), address[1]
    except (TypeError, IndexError):
        return str(address)
    if host.startswith("::ffff:") and "." in host:
        host = host[len("::ffff:") :]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _local_host(sock: socket.socket) -> str:
    """The address a client on this machine connects to: the bound one, or loopback for
    a socket bound to every interface."""
    bound = str(sock.getsockname()[0])
    if bound in ("", "0.0.0.0"):
        return "127.0.0.1"
    if bound == "::":  # dual-stack sockets take IPv4 too
        v6only = sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY)
        return "::1" if v6only else "127.0.0.1"
    return bound
