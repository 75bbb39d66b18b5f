"""The built-in TCP store: an asyncio server hosted by one agent, and a client.

Wire format: each frame is a 4-byte big-endian length, then that many bytes of UTF-8
JSON. A request is ``{"id": n, "op": name, ...arguments}``; the answer is
``{"id": n, "ok": true, "result": ...}`` or ``{"id": n, "ok": false, "error": text}``.
The first request on a connection must be ``{"op": "hello", "token": ...}``. Nothing is
pickled. A malformed frame closes that connection only; the server goes on.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hmac
import json
import logging
import socket
import struct
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

from elastic_runner.rendezvous.store import (
    MemoryStore,
    StoreError,
    StoreTimeoutError,
    StoreUnavailableError,
)

__all__ = ["MAX_FRAME", "TCPStoreClient", "TCPStoreServer"]

log = logging.getLogger(__name__)

#: Largest frame either side accepts (a rendezvous never needs more).
MAX_FRAME = 16 << 20
_HEADER = struct.Struct(">I")
_PLAIN_OPS = {
    "set",
    "refresh",
    "get",
    "add",
    "compare_set",
    "delete",
    "delete_prefix",
    "multi_get",
    "multi_set",
    "scan",
}


class _BadFrame(Exception):
    pass


def _encode(message: Mapping[str, Any]) -> bytes:
    body = json.dumps(message, separators=(",", ":")).encode()
    return _HEADER.pack(len(body)) + body


def _decode(body: bytes) -> dict[str, Any]:
    try:
        message = json.loads(body)
    except (UnicodeDecodeError, ValueError) as exc:
        raise _BadFrame(f"not JSON: {exc}") from None
    if not isinstance(message, dict):
        raise _BadFrame("a frame must hold a JSON object")
    return message


class TCPStoreServer:
    """Serves a :class:`MemoryStore` on ``host:port`` from a daemon thread."""

    def __init__(self, host: str, port: int, token: str = "") -> None:
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
            self._server = self._loop.run_until_complete(
                asyncio.start_server(self._serve, host, port, reuse_address=True)
            )
        except BaseException:
            self._loop.close()
            raise
        self.port = int(self._server.sockets[0].getsockname()[1])
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
                    header = await reader.readexactly(_HEADER.size)
                except asyncio.IncompleteReadError:
                    return
                (size,) = _HEADER.unpack(header)
                if size > MAX_FRAME:
                    raise _BadFrame(f"frame of {size} bytes (max {MAX_FRAME})")
                message = _decode(await reader.readexactly(size))
                if not authenticated:
                    token = message.get("token")
                    if (
                        message.get("op") != "hello"
                        or not isinstance(token, str)
                        or not (hmac.compare_digest(token.encode(), self._token.encode()))
                    ):
                        writer.write(
                            _encode(
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
                writer.write(_encode(await self._answer(message)))
                await writer.drain()
        except (_BadFrame, asyncio.IncompleteReadError, ConnectionError) as exc:
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
            elif op in _PLAIN_OPS and isinstance(args, dict):
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


class TCPStoreClient:
    """A :class:`~elastic_runner.rendezvous.store.Store` on a :class:`TCPStoreServer`.

    Thread-safe: each thread gets its own connection, so a watcher blocked in
    :meth:`wait_for_change` never holds up another thread's requests.
    """

    def __init__(
        self,
        host: str,
        port: int,
        token: str = "",
        connect_timeout: float = 30.0,
        request_timeout: float = 60.0,
        reconnect_timeout: float | None = None,
    ) -> None:
        self.address = f"{host}:{port}"
        self._host, self._port, self._token = host, port, token
        #: How long to try the first connection (the host agent may start later) and a
        #: new one after a connection was lost (a dead host does not come back).
        self._connect_timeout = connect_timeout
        self._reconnect_timeout = (
            connect_timeout if reconnect_timeout is None else reconnect_timeout
        )
        self._connected_once = False
        self._request_timeout = request_timeout
        self._local = threading.local()
        self._ids = 0
        self._all: list[socket.socket] = []
        self._lock = threading.Lock()

    @property
    def local_address(self) -> str:
        """This machine's address on the interface that reaches the store."""
        return str(self._conn().getsockname()[0])

    def _conn(self) -> socket.socket:
        sock: socket.socket | None = getattr(self._local, "sock", None)
        if sock is not None:
            return sock
        patience = self._reconnect_timeout if self._connected_once else self._connect_timeout
        deadline = time.monotonic() + patience
        delay = 0.01
        while True:
            try:
                sock = socket.create_connection((self._host, self._port), timeout=5)
                break
            except OSError as exc:
                if time.monotonic() + delay > deadline:
                    # never reached: it may yet start; reached once: its host is gone
                    kind = StoreError if self._connected_once else StoreUnavailableError
                    raise kind(
                        f"cannot reach the rendezvous store at {self.address} "
                        f"(tried for {patience:g} s): {exc}"
                    ) from None
                time.sleep(delay)  # the host agent may still be starting: back off
                delay = min(delay * 2, 0.5)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._local.sock = sock
        with self._lock:
            self._all.append(sock)
        self._request(sock, "hello", token=self._token)
        self._connected_once = True
        return sock

    def _request(
        self, sock: socket.socket, op: str, wait_s: float | None = None, **args: Any
    ) -> Any:
        with self._lock:
            self._ids += 1
            rid = self._ids
        payload: dict[str, Any] = {"id": rid, "op": op}
        if op == "hello":
            payload["token"] = args["token"]
        else:
            payload["args"] = args
        sock.settimeout((wait_s or 0) + self._request_timeout)
        try:
            sock.sendall(_encode(payload))
            header = _recv_exactly(sock, _HEADER.size)
            (size,) = _HEADER.unpack(header)
            if size > MAX_FRAME:
                raise StoreError(f"oversized answer from {self.address}")
            answer = _decode(_recv_exactly(sock, size))
        except (OSError, _BadFrame) as exc:
            self._local.sock = None
            raise StoreError(f"lost the rendezvous store at {self.address}: {exc}") from None
        if not answer.get("ok"):
            if answer.get("timeout"):
                raise StoreTimeoutError(answer.get("error", "timed out"))
            raise StoreError(f"store at {self.address}: {answer.get('error')}")
        return answer.get("result")

    def _call(self, op: str, timeout: float | None = None, **args: Any) -> Any:
        if timeout is not None:
            args["timeout"] = timeout
        return self._request(self._conn(), op, wait_s=timeout, **args)

    def set(self, key: str, value: str, ttl: float | None = None) -> None:
        self._call("set", key=key, value=value, ttl=ttl)

    def refresh(self, key: str, ttl: float) -> bool:
        return bool(self._call("refresh", key=key, ttl=ttl))

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
        return list(self._call("multi_get", keys=list(keys)))

    def multi_set(self, items: Mapping[str, str]) -> None:
        self._call("multi_set", items=dict(items))

    def scan(self, prefix: str) -> tuple[dict[str, str], int]:
        found, version = self._call("scan", prefix=prefix)
        return dict(found), int(version)

    def wait_for_change(self, prefix: str, version: int, timeout: float) -> int:
        return int(self._call("wait_for_change", timeout=timeout, prefix=prefix, version=version))

    def wait(self, keys: Sequence[str], timeout: float) -> None:
        self._call("wait", timeout=timeout, keys=list(keys))

    def close(self) -> None:
        with self._lock:
            for sock in self._all:
                with contextlib.suppress(OSError):
                    sock.close()
            self._all.clear()


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    chunks, got = [], 0
    while got < n:
        chunk = sock.recv(n - got)
        if not chunk:
            raise ConnectionError("connection closed")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)
