"""The built-in TCP store's wire format, shared by the client
(:mod:`elastic_runner.rendezvous.tcp_store`) and the server
(:mod:`elastic_runner.rendezvous.tcp_server`), which import this and not each other.

Each frame is a 4-byte big-endian length, then that many bytes of UTF-8 JSON. A request
is ``{"id": n, "op": name, "args": {...}}``; the answer is
``{"id": n, "ok": true, "result": ...}`` or ``{"id": n, "ok": false, "error": text}``
(with ``"timeout": true`` when a wait ran out). The first request on a connection must
be ``{"id": n, "op": "hello", "token": ...}``. Nothing is pickled. A malformed frame
closes that connection only; the server goes on.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from typing import Any

__all__ = ["HEADER", "MAX_FRAME", "PLAIN_OPS", "BadFrame", "decode", "encode"]

#: Largest frame either side accepts (a rendezvous never needs more).
MAX_FRAME = 16 << 20
#: The length prefix of every frame.
HEADER = struct.Struct(">I")
#: Store operations answered at once; ``wait_for_change`` and ``wait`` block instead.
PLAIN_OPS = {
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


class BadFrame(Exception):
    """A frame that is not a JSON object: the peer is not speaking this protocol."""


def encode(message: Mapping[str, Any]) -> bytes:
    """One frame: the length prefix, then ``message`` as compact JSON."""
    body = json.dumps(message, separators=(",", ":")).encode()
    return HEADER.pack(len(body)) + body


def decode(body: bytes) -> dict[str, Any]:
    """The JSON object in a frame's body (after its length prefix); :class:`BadFrame`
    when it is anything else."""
    try:
        message = json.loads(body)
    except (UnicodeDecodeError, ValueError) as exc:
        raise BadFrame(f"not JSON: {exc}") from None
    if not isinstance(message, dict):
        raise BadFrame("a frame must hold a JSON object")
    return message
