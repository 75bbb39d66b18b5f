"""The built-in TCP store's wire format, shared by the client
(:mod:`elastic_runner.rendezvous.tcp_store`) and the server
(:mod:`elastic_runner.rendezvous.tcp_server`), which import this and not each other.

Each frame is a 4-byte big-endian length, then that many bytes of UTF-8 JSON. A request
is ``{"id": n, "op": name, "args": {...}}``; the answer is
``{"id": n, "ok": true, "result": ...}`` or ``{"id": n, "ok": false, "error": text}``
(with ``"timeout": true`` when a wait ran out, ``"invalid": true`` when the arguments
were refused, ``"busy": true`` when the server refuses the connection for its limits).
The first request on a connection must be ``{"id": n, "op": "hello", "token": ...}``
(an empty token when the store has none). Nothing is pickled.

Limits (the server's; see :mod:`~elastic_runner.rendezvous.tcp_server`): a frame before
``hello`` is at most :data:`MAX_HELLO` bytes, a request after it :data:`MAX_REQUEST`,
an answer :data:`MAX_FRAME`. A frame over its limit, or one that is not a JSON object,
closes that connection only; a request with bad arguments gets an error frame and the
connection goes on.
"""

from __future__ import annotations

import json
import socket
import struct
from collections.abc import Callable, Mapping
from typing import Any

from elastic_runner.rendezvous.store import (
    StoreArgumentError,
    check_amount,
    check_items,
    check_key,
    check_keys,
    check_optional_text,
    check_seconds,
    check_text,
    check_version,
)

__all__ = [
    "BLOCKING_OPS",
    "HEADER",
    "IDLE_TIMEOUT",
    "MAX_FRAME",
    "MAX_HELLO",
    "MAX_REQUEST",
    "PLAIN_OPS",
    "BadFrame",
    "check_request",
    "decode",
    "encode",
    "read_frame",
]

#: Largest frame either side accepts: an answer (a ``scan`` of a large job) may be up to
#: this. A rendezvous of 10,000 nodes reads about 4 MiB in its largest answer.
MAX_FRAME = 16 << 20
#: Largest request the server reads after ``hello``: the largest a rendezvous writes is
#: the completed round's record, about 0.7 MiB for 10,000 nodes.
MAX_REQUEST = 4 << 20
#: Largest frame the server reads before ``hello`` (a hello is tens of bytes, plus the
#: token).
MAX_HELLO = 4 << 10
#: Seconds an authenticated connection may stay idle (no request, no wait in progress)
#: before the server closes it; a client opens a new one when its own has been idle for
#: half this long, so it never sends on a connection the server is closing.
IDLE_TIMEOUT = 300.0
#: The length prefix of every frame.
HEADER = struct.Struct(">I")

_Check = Callable[[Any], Any]


def _seconds(name: str) -> _Check:
    return lambda v: check_seconds(v, name)


def _optional_seconds(name: str) -> _Check:
    return lambda v: None if v is None else check_seconds(v, name)


#: Each operation's arguments: name -> (check, required). The checks are the store's own
#: (:mod:`elastic_runner.rendezvous.store`), so the server refuses what any store refuses.
_ARGS: dict[str, dict[str, tuple[_Check, bool]]] = {
    "set": {
        "key": (check_key, True),
        "value": (check_text, True),
        "ttl": (_optional_seconds("ttl"), False),
    },
    "refresh": {"key": (check_key, True), "ttl": (_seconds("ttl"), True)},
    "refresh_many": {"keys": (check_keys, True), "ttl": (_seconds("ttl"), True)},
    "get": {"key": (check_key, True)},
    "add": {"key": (check_key, True), "amount": (check_amount, True)},
    "compare_set": {
        "key": (check_key, True),
        "expected": (lambda v: check_optional_text(v, "expected"), True),
        "desired": (lambda v: check_text(v, "desired"), True),
        "ttl": (_optional_seconds("ttl"), False),
    },
    "delete": {"key": (check_key, True)},
    "delete_prefix": {"prefix": (lambda v: check_key(v, "prefix"), True)},
    "multi_get": {"keys": (check_keys, True)},
    "multi_set": {"items": (check_items, True)},
    "scan": {"prefix": (lambda v: check_key(v, "prefix"), True)},
    "count": {"prefix": (lambda v: check_key(v, "prefix"), True)},
    "wait_for_change": {
        "prefix": (lambda v: check_key(v, "prefix"), True),
        "version": (check_version, True),
        "timeout": (_seconds("timeout"), True),
    },
    "wait": {"keys": (check_keys, True), "timeout": (_seconds("timeout"), True)},
}
#: Store operations answered at once.
PLAIN_OPS = frozenset(_ARGS) - {"wait_for_change", "wait"}
#: Operations that block until something changes or their ``timeout`` runs out.
BLOCKING_OPS = frozenset({"wait_for_change", "wait"})


class BadFrame(Exception):
    """A frame that is not a JSON object: the peer is not speaking this protocol."""


def check_request(op: object, args: object) -> dict[str, Any]:
    """The arguments of a store operation, checked: every required one present, none
    unknown, each of its type and range. :class:`StoreArgumentError` says what is
    wrong with the first bad one."""
    if not isinstance(op, str) or op not in _ARGS:
        shown = repr(op) if isinstance(op, str | int | float | None) else type(op).__name__
        raise StoreArgumentError(f"unknown request {shown[:60]}")
    if not isinstance(args, dict):
        raise StoreArgumentError(f"{op}: args must be an object, not {type(args).__name__}")
    spec = _ARGS[op]
    unknown = [str(name)[:40] for name in args if name not in spec]
    if unknown:
        raise StoreArgumentError(f"{op}: unknown argument(s) {', '.join(sorted(unknown))}")
    checked: dict[str, Any] = {}
    for name, (check, required) in spec.items():
        if name in args:
            checked[name] = check(args[name])
        elif required:
            raise StoreArgumentError(f"{op}: missing argument {name}")
    return checked


def encode(message: Mapping[str, Any]) -> bytes:
    """One frame: the length prefix, then ``message`` as compact JSON."""
    body = json.dumps(message, separators=(",", ":")).encode()
    return HEADER.pack(len(body)) + body


def decode(body: bytes) -> dict[str, Any]:
    """The JSON object in a frame's body (after its length prefix); :class:`BadFrame`
    when it is anything else (not UTF-8, not JSON, nested too deeply, a number too long
    to convert, not an object)."""
    try:
        message = json.loads(body)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise BadFrame(f"not JSON: {str(exc)[:200]}") from None
    if not isinstance(message, dict):
        raise BadFrame("a frame must hold a JSON object")
    return message


def read_frame(sock: socket.socket, limit: int = MAX_FRAME) -> dict[str, Any]:
    """One frame read from a blocking socket: :class:`BadFrame` when it announces more
    than ``limit`` bytes or holds no JSON object, ``ConnectionError`` when the other side
    closes first (the client's answers; raw clients in tests and benchmarks)."""
    (size,) = HEADER.unpack(_exactly(sock, HEADER.size))
    if size > limit:
        raise BadFrame(f"frame of {size} bytes (max {limit})")
    return decode(_exactly(sock, size))


def _exactly(sock: socket.socket, n: int) -> bytes:
    chunks, got = [], 0
    while got < n:
        chunk = sock.recv(n - got)
        if not chunk:
            raise ConnectionError("connection closed")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)
