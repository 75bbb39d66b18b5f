"""The protobuf messages of etcd's v3 API that the store sends and reads, to and from the
shape of etcd's JSON gateway (what :class:`~elastic_runner.rendezvous.etcd_store.EtcdStore`
builds and reads: ``bytes`` fields as base64 text, enums by name), so that one store
speaks either transport.

Written by hand from etcd's ``rpc.proto`` and ``kv.proto`` (field numbers below), for
the fields the store uses: no generated code and no ``protobuf`` package for a dozen
flat messages. Decoding skips fields it does not know, as protobuf does; a malformed
message raises :class:`ValueError`.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator, Mapping
from typing import Any

__all__ = [
    "AUTHENTICATE",
    "DELETE_RANGE",
    "KEEP_ALIVE",
    "LEASE_GRANT",
    "LEASE_REVOKE",
    "PUT",
    "RANGE",
    "TXN",
    "WATCH",
    "Message",
    "decode",
    "encode",
    "read_fields",
    "read_varint",
]

#: A message: each field's name -> (number, kind, what the kind needs). Kinds: ``bytes``
#: (base64 text in the JSON shape), ``string``, ``int`` (int64), ``bool``, ``enum``
#: (names -> numbers), ``message`` and ``messages`` (repeated; a sub-message).
Message = Mapping[str, tuple[int, str, Any]]

_HEADER: Message = {
    "cluster_id": (1, "int", None),
    "member_id": (2, "int", None),
    "revision": (3, "int", None),
    "raft_term": (4, "int", None),
}
_KV: Message = {
    "key": (1, "bytes", None),
    "create_revision": (2, "int", None),
    "mod_revision": (3, "int", None),
    "version": (4, "int", None),
    "value": (5, "bytes", None),
    "lease": (6, "int", None),
}
_RANGE_REQUEST: Message = {
    "key": (1, "bytes", None),
    "range_end": (2, "bytes", None),
    "limit": (3, "int", None),
    "revision": (4, "int", None),
    "serializable": (7, "bool", None),
    "keys_only": (8, "bool", None),
    "count_only": (9, "bool", None),
}
_RANGE_RESPONSE: Message = {
    "header": (1, "message", _HEADER),
    "kvs": (2, "messages", _KV),
    "more": (3, "bool", None),
    "count": (4, "int", None),
}
_PUT_REQUEST: Message = {
    "key": (1, "bytes", None),
    "value": (2, "bytes", None),
    "lease": (3, "int", None),
    "prev_kv": (4, "bool", None),
}
_PUT_RESPONSE: Message = {"header": (1, "message", _HEADER), "prev_kv": (2, "message", _KV)}
_DELETE_REQUEST: Message = {
    "key": (1, "bytes", None),
    "range_end": (2, "bytes", None),
    "prev_kv": (3, "bool", None),
}
_DELETE_RESPONSE: Message = {
    "header": (1, "message", _HEADER),
    "deleted": (2, "int", None),
    "prev_kvs": (3, "messages", _KV),
}
_COMPARE: Message = {
    "result": (1, "enum", {"EQUAL": 0, "GREATER": 1, "LESS": 2, "NOT_EQUAL": 3}),
    "target": (2, "enum", {"VERSION": 0, "CREATE": 1, "MOD": 2, "VALUE": 3, "LEASE": 4}),
    "key": (3, "bytes", None),
    "version": (4, "int", None),
    "create_revision": (5, "int", None),
    "mod_revision": (6, "int", None),
    "value": (7, "bytes", None),
    "lease": (8, "int", None),
    "range_end": (64, "bytes", None),
}
_REQUEST_OP: Message = {
    "request_range": (1, "message", _RANGE_REQUEST),
    "request_put": (2, "message", _PUT_REQUEST),
    "request_delete_range": (3, "message", _DELETE_REQUEST),
}
_RESPONSE_OP: Message = {
    "response_range": (1, "message", _RANGE_RESPONSE),
    "response_put": (2, "message", _PUT_RESPONSE),
    "response_delete_range": (3, "message", _DELETE_RESPONSE),
}
_TXN_REQUEST: Message = {
    "compare": (1, "messages", _COMPARE),
    "success": (2, "messages", _REQUEST_OP),
    "failure": (3, "messages", _REQUEST_OP),
}
_TXN_RESPONSE: Message = {
    "header": (1, "message", _HEADER),
    "succeeded": (2, "bool", None),
    "responses": (3, "messages", _RESPONSE_OP),
}
_LEASE_ID: Message = {"ID": (1, "int", None)}
_LEASE_GRANT_REQUEST: Message = {"TTL": (1, "int", None), "ID": (2, "int", None)}
_LEASE_GRANT_RESPONSE: Message = {
    "header": (1, "message", _HEADER),
    "ID": (2, "int", None),
    "TTL": (3, "int", None),
    "error": (4, "string", None),
}
_LEASE_REVOKE_RESPONSE: Message = {"header": (1, "message", _HEADER)}
_KEEP_ALIVE_RESPONSE: Message = {
    "header": (1, "message", _HEADER),
    "ID": (2, "int", None),
    "TTL": (3, "int", None),
}
_WATCH_CREATE: Message = {
    "key": (1, "bytes", None),
    "range_end": (2, "bytes", None),
    "start_revision": (3, "int", None),
    "progress_notify": (4, "bool", None),
    "prev_kv": (6, "bool", None),
}
_WATCH_REQUEST: Message = {"create_request": (1, "message", _WATCH_CREATE)}
_EVENT: Message = {
    "type": (1, "enum", {"PUT": 0, "DELETE": 1}),
    "kv": (2, "message", _KV),
    "prev_kv": (3, "message", _KV),
}
_WATCH_RESPONSE: Message = {
    "header": (1, "message", _HEADER),
    "watch_id": (2, "int", None),
    "created": (3, "bool", None),
    "canceled": (4, "bool", None),
    "compact_revision": (5, "int", None),
    "cancel_reason": (6, "string", None),
    "events": (11, "messages", _EVENT),
}
_AUTHENTICATE_REQUEST: Message = {"name": (1, "string", None), "password": (2, "string", None)}
_AUTHENTICATE_RESPONSE: Message = {
    "header": (1, "message", _HEADER),
    "token": (2, "string", None),
}

#: (gRPC method, request, response) of each call, by its JSON gateway path.
RANGE = ("/etcdserverpb.KV/Range", _RANGE_REQUEST, _RANGE_RESPONSE)
PUT = ("/etcdserverpb.KV/Put", _PUT_REQUEST, _PUT_RESPONSE)
TXN = ("/etcdserverpb.KV/Txn", _TXN_REQUEST, _TXN_RESPONSE)
DELETE_RANGE = ("/etcdserverpb.KV/DeleteRange", _DELETE_REQUEST, _DELETE_RESPONSE)
LEASE_GRANT = ("/etcdserverpb.Lease/LeaseGrant", _LEASE_GRANT_REQUEST, _LEASE_GRANT_RESPONSE)
LEASE_REVOKE = ("/etcdserverpb.Lease/LeaseRevoke", _LEASE_ID, _LEASE_REVOKE_RESPONSE)
KEEP_ALIVE = ("/etcdserverpb.Lease/LeaseKeepAlive", _LEASE_ID, _KEEP_ALIVE_RESPONSE)
WATCH = ("/etcdserverpb.Watch/Watch", _WATCH_REQUEST, _WATCH_RESPONSE)
AUTHENTICATE = (
    "/etcdserverpb.Auth/Authenticate",
    _AUTHENTICATE_REQUEST,
    _AUTHENTICATE_RESPONSE,
)

_INT64 = 1 << 64


def _varint(value: int) -> bytes:
    value &= _INT64 - 1  # a negative int64 is ten bytes, as protobuf writes it
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def encode(message: Message, values: Mapping[str, Any]) -> bytes:
    """``values`` (the JSON gateway's shape) as ``message``'s bytes. A name ``message``
    does not have raises :class:`KeyError`: the store asked for a field this module
    does not carry."""
    out = bytearray()
    for name, value in values.items():
        number, kind, sub = message[name]
        if kind == "messages":
            for item in value:
                body = encode(sub, item)
                out += _varint(number << 3 | 2) + _varint(len(body)) + body
            continue
        if kind in ("int", "bool", "enum"):
            number_value = sub[value] if kind == "enum" else int(value)
            out += _varint(number << 3) + _varint(number_value)
            continue
        if kind == "message":
            body = encode(sub, value)
        elif kind == "bytes":
            body = base64.b64decode(value)
        else:  # string
            body = str(value).encode()
        out += _varint(number << 3 | 2) + _varint(len(body)) + body
    return bytes(out)


def read_varint(data: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if i >= len(data) or shift > 63:
            raise ValueError("a truncated or too long varint")
        byte = data[i]
        i += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return value, i


def read_fields(data: bytes) -> Iterator[tuple[int, int, int | bytes]]:
    """(field number, wire type, value) of each field of a protobuf message; a
    malformed one raises :class:`ValueError`."""
    i = 0
    while i < len(data):
        key, i = read_varint(data, i)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, i = read_varint(data, i)
            yield number, wire, value
        elif wire == 2:
            size, i = read_varint(data, i)
            if i + size > len(data):
                raise ValueError("a field longer than its message")
            yield number, wire, data[i : i + size]
            i += size
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
            if i + size > len(data):
                raise ValueError("a truncated fixed-size field")
            yield number, wire, data[i : i + size]
            i += size
        else:
            raise ValueError(f"wire type {wire}")


def decode(message: Message, data: bytes) -> dict[str, Any]:
    """``message``'s bytes in the JSON gateway's shape (a field at its default is
    absent, as the gateway leaves it out)."""
    by_number = {number: (name, kind, sub) for name, (number, kind, sub) in message.items()}
    out: dict[str, Any] = {}
    for number, _wire, value in read_fields(data):
        known = by_number.get(number)
        if known is None:
            continue
        name, kind, sub = known
        if kind in ("int", "bool", "enum"):
            if not isinstance(value, int):
                raise ValueError(f"{name}: not a varint")
            if kind == "int":
                out[name] = value - _INT64 if value >= 1 << 63 else value
            elif kind == "bool":
                out[name] = bool(value)
            else:
                names = {n: v for v, n in sub.items()}
                out[name] = names.get(value, value)
            continue
        if not isinstance(value, bytes):
            raise ValueError(f"{name}: not length-delimited")
        if kind == "messages":
            out.setdefault(name, []).append(decode(sub, value))
        elif kind == "message":
            out[name] = decode(sub, value)
        elif kind == "bytes":
            out[name] = base64.b64encode(value).decode()
        else:
            out[name] = value.decode(errors="replace")
    return out
