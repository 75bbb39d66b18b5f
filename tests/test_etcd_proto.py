"""etcd's protobuf messages in the JSON gateway's shape: what is encoded decodes to the
same (property-based), the bytes are protobuf's (checked against hand-made ones and a
real etcd in tests/test_etcd_store.py), and malformed answers raise ValueError, never
anything else."""

from __future__ import annotations

import base64
import contextlib
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from elastic_runner.rendezvous import etcd_proto as proto

_b64 = st.binary(max_size=40).map(lambda b: base64.b64encode(b).decode())
_int64 = st.integers(min_value=-(2**63), max_value=2**63 - 1)
_kv = st.fixed_dictionaries(
    {},
    optional={
        "key": _b64,
        "value": _b64,
        "mod_revision": _int64,
        "create_revision": _int64,
        "version": _int64,
        "lease": _int64,
    },
)
_header = st.fixed_dictionaries({}, optional={"revision": _int64, "raft_term": _int64})
_range_response = st.fixed_dictionaries(
    {},
    optional={
        "header": _header,
        "kvs": st.lists(_kv, min_size=1, max_size=4),
        "more": st.just(True),
        "count": _int64,
    },
)
_compare = st.fixed_dictionaries(
    {
        "key": _b64,
        "target": st.sampled_from(["VERSION", "CREATE", "MOD", "VALUE", "LEASE"]),
        "result": st.sampled_from(["EQUAL", "GREATER", "LESS", "NOT_EQUAL"]),
    },
    optional={"mod_revision": _int64, "value": _b64, "range_end": _b64},
)
_op = st.one_of(
    st.fixed_dictionaries({"request_range": st.fixed_dictionaries({"key": _b64})}),
    st.fixed_dictionaries(
        {"request_put": st.fixed_dictionaries({"key": _b64, "value": _b64, "lease": _int64})}
    ),
    st.fixed_dictionaries({"request_delete_range": st.fixed_dictionaries({"key": _b64})}),
)
_txn = st.fixed_dictionaries(
    {},
    optional={
        "compare": st.lists(_compare, min_size=1, max_size=3),
        "success": st.lists(_op, min_size=1, max_size=3),
        "failure": st.lists(_op, min_size=1, max_size=3),
    },
)
_watch_response = st.fixed_dictionaries(
    {},
    optional={
        "header": _header,
        "created": st.just(True),
        "cancel_reason": st.text(max_size=20),
        "events": st.lists(
            st.fixed_dictionaries({"kv": _kv}, optional={"type": st.just("DELETE")}),
            min_size=1,
            max_size=3,
        ),
    },
)


@pytest.mark.parametrize(
    ("message", "values"),
    [
        (proto.RANGE[2], _range_response),
        (proto.TXN[1], _txn),
        (proto.WATCH[2], _watch_response),
    ],
)
def test_what_is_encoded_decodes_the_same(message: proto.Message, values: Any) -> None:
    @given(values)
    def check(value: dict[str, Any]) -> None:
        assert proto.decode(message, proto.encode(message, value)) == value

    check()


def test_the_bytes_are_protobufs() -> None:
    # RangeRequest{key: "a", range_end: "b", count_only: true}: fields 1, 2 and 9
    request = {"key": "YQ==", "range_end": "Yg==", "count_only": True}
    assert proto.encode(proto.RANGE[1], request) == b"\x0a\x01a\x12\x01b\x48\x01"
    # a negative int64 is ten bytes; a lease id above 2**63 reads back negative
    assert proto.encode(proto.LEASE_GRANT[1], {"ID": -1}) == b"\x10" + b"\xff" * 9 + b"\x01"
    # a field this module does not know is skipped (etcd may add some)
    answer = b"\x08\x05" + b"\xa2\x06\x02hi" + b"\x10\x07"  # ID 5, field 100, TTL 7
    assert proto.decode(proto.LEASE_GRANT[1], answer) == {"TTL": 5, "ID": 7}


def test_a_field_the_store_never_sends_is_a_key_error() -> None:
    with pytest.raises(KeyError):
        proto.encode(proto.PUT[1], {"ignore_value": True})


@given(st.binary(max_size=200))
def test_any_bytes_decode_or_raise_value_error(data: bytes) -> None:
    for _, _, response in (proto.RANGE, proto.TXN, proto.WATCH, proto.KEEP_ALIVE):
        with contextlib.suppress(ValueError):
            proto.decode(response, data)
