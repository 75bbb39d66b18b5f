"""The built-in TCP store's server: an asyncio loop in a daemon thread of the agent that
hosts the store, serving a :class:`~elastic_runner.rendezvous.store.MemoryStore`
(wire format: :mod:`elastic_runner.rendezvous.tcp_wire`). It listens on every interface
(IPv4 and, where the machine has it, IPv6) unless given one address."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import hmac
import logging
import socket
import threading
import time
from typing import Any

from elastic_runner.rendezvous.store import MemoryStore, StoreError, StoreTimeoutError
from elastic_runner.rendezvous.tcp_wire import (
    HEADER,
    MAX_FRAME,
    PLAIN_OPS,
    BadFrame,
    decode,
    encode,  # by name: bench/rendezvous.py swaps this module's encode to count bytes
)

__all__ = ["TCPStoreServer"]

log = logging.getLogger(__name__)


class TCPStoreServer:
    """Serves a :class:`MemoryStore` on ``host:port`` from a daemon thread: ``host`` is
    the one address to listen on (a name: the first address it resolves to), ``None``
    every interface. ``port`` 0 picks a free port (:attr:`port`). Binding errors are
    the :class:`OSError` of the bind (``EADDRINUSE``: another server has the port)."""

    def __init__(self, host: str | None, port: int, token: str = "") -> None:
        self._token = token
        self._loop = asyncio.new_event_loop()
        self._waiters: set[asyncio.Event] = set()
        self._expiry: asyncio.TimerHandle | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self.store = MemoryStore(on_change=self._changed)
        #: Requests answered, by operation (for benchmarks and diagnostics).
        self.requests: collections.Counter[str] = collections.Counter()
        self._server: asyncio.base_events.Server | None = None
        try:
            sock = _listen(host, port)
        except BaseException:
            self._loop.close()
            raise
        #: Where a client on this machine reaches the server.
        self.local_host = _local_host(sock)
        try:
            self._server = self._loop.run_until_complete(
                asyncio.start_server(self._serve, sock=sock)
            )
        except BaseException:
            sock.close()
            self._loop.close()
            raise
        self.port = int(sock.getsockname()[1])
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="elastic-run-tcp-store", daemon=True
        )
        self._thread.start()

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

    async def _shutdown(self) -> None:
        if self._server:
            self._server.close()
        if self._expiry:
            self._expiry.cancel()
        # Close the connections first so their tasks end normally; cancelling a task that
        # is still being set up trips an asyncio bug (CPython gh-113538) and prints noise.
        for writer in list(self._writers):
            writer.close()
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        _, pending = await asyncio.wait(tasks, timeout=0.5) if tasks else (set(), set())
        for task in pending:  # blocked in a wait: nothing else ends them
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)

    # -- runs in the server's thread ----------------------------------------------------

    def _changed(self) -> None:
        for event in self._waiters:
            event.set()

    def _schedule_expiry(self) -> None:
        next_expiry = self.store.expire()
        if self._expiry:
            self._expiry.cancel()
            self._expiry = None
        if next_expiry is not None:
            delay = max(0.0, next_expiry - time.monotonic())
            self._expiry = self._loop.call_later(delay, self._schedule_expiry)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        self._writers.add(writer)
        authenticated = not self._token
        try:
            while True:
                try:
                    header = await reader.readexactly(HEADER.size)
                except asyncio.IncompleteReadError:
                    return
                (size,) = HEADER.unpack(header)
                if size > MAX_FRAME:
                    raise BadFrame(f"frame of {size} bytes (max {MAX_FRAME})")
                message = decode(await reader.readexactly(size))
                if not authenticated:
                    token = message.get("token")
                    if (
                        message.get("op") != "hello"
                        or not isinstance(token, str)
                        or not (hmac.compare_digest(token.encode(), self._token.encode()))
                    ):
                        writer.write(
                            encode(
                                {
                                    "id": message.get("id"),
                                    "ok": False,
                                    "error": "wrong or missing rdzv.token",
                                }
                            )
                        )
                        await writer.drain()
                        return
                    authenticated = True
                writer.write(encode(await self._answer(message)))
                await writer.drain()
        except (BadFrame, asyncio.IncompleteReadError, ConnectionError) as exc:
            log.debug("tcp store: dropping client %s: %s", peer, exc)
        finally:
            self._writers.discard(writer)
            writer.close()

    async def _answer(self, message: dict[str, Any]) -> dict[str, Any]:
        rid, op = message.get("id"), message.get("op")
        self.requests[str(op)] += 1
        args = message.get("args", {})
        try:
            if op == "hello":
                result: Any = None
            elif op in PLAIN_OPS and isinstance(args, dict):
                result = getattr(self.store, op)(**args)
                if (op == "set" and args.get("ttl") is not None) or op in (
                    "compare_set",
                    "refresh",
                ):
                    self._schedule_expiry()
            elif op in ("wait_for_change", "wait") and isinstance(args, dict):
                result = await self._blocking(op, args)
            else:
                raise StoreError(f"unknown request {op!r}")
        except StoreTimeoutError as exc:
            return {"id": rid, "ok": False, "error": str(exc), "timeout": True}
        except (StoreError, TypeError, ValueError) as exc:
            return {"id": rid, "ok": False, "error": f"{type(exc).__name__}: {exc}"}
        return {"id": rid, "ok": True, "result": result}

    async def _blocking(self, op: str, args: dict[str, Any]) -> Any:
        timeout = float(args.pop("timeout"))
        deadline = self._loop.time() + timeout
        while True:
            try:
                return getattr(self.store, op)(timeout=0, **args)
            except StoreTimeoutError:
                remaining = deadline - self._loop.time()
                if remaining <= 0:
                    raise StoreTimeoutError(f"{op} timed out after {timeout:g} s") from None
            event = asyncio.Event()
            self._waiters.add(event)
            try:
                await asyncio.wait_for(event.wait(), remaining)
            except TimeoutError:
                pass
            finally:
                self._waiters.discard(event)


def _listen(host: str | None, port: int) -> socket.socket:
    """One listening socket: on every interface (one port for IPv4 and IPv6, where the
    machine has both), or on ``host``'s first address."""
    if host is None:
        if socket.has_dualstack_ipv6():
            try:
                return socket.create_server(
                    ("", port), family=socket.AF_INET6, dualstack_ipv6=True, backlog=128
                )
            except OSError as exc:
                if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                    raise
                # IPv6 there but unusable (disabled, say): IPv4 is what matters
        return socket.create_server(("", port), backlog=128)
    host = host.strip("[]")  # "[fd00::1]" as in an endpoint
    family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    return socket.create_server(address, family=family, backlog=128)


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
