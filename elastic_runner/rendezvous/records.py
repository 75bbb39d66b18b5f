"""What the dynamic rendezvous protocol's keys hold, parsed: garbage there (a bug, another
version, or a client that should not have been let in) is a protocol error, never a crash.
Private to :mod:`elastic_runner.rendezvous.dynamic`."""

from __future__ import annotations

import json
import math
from typing import Any

from elastic_runner.rendezvous.store import StoreError

__all__ = [
    "CorruptKey",
    "count_of",
    "done_record",
    "failure_time",
    "join_record",
    "master_record",
    "round_of",
]


class CorruptKey(StoreError):
    """A key of the job holds what this protocol never writes there (a bug, another
    version, or a client that should not have been let in)."""


def round_of(value: str | None, default: int) -> int:
    """The round number in the ``round`` key (``default`` when it is missing)."""
    if value is None:
        return default
    try:
        n = int(value)
    except ValueError:
        n = -1
    if n < 0:
        raise CorruptKey(f"the key 'round' holds {value[:60]!r}, not a round number")
    return n


def done_record(n: int, value: str) -> list[list[Any]]:
    """The completed round's record: [[node id, role, workers, address, failover port],
    ...] (the last two may be missing or null)."""
    try:
        record = json.loads(value)
    except (ValueError, RecursionError):
        record = None
    if (
        not isinstance(record, list)
        or not record
        or not all(
            isinstance(m, list)
            and len(m) >= 3
            and isinstance(m[0], str)
            and isinstance(m[1], str)
            and isinstance(m[2], int)
            and not isinstance(m[2], bool)
            and m[2] >= 0
            and (len(m) < 4 or m[3] is None or isinstance(m[3], str))
            and (len(m) < 5 or m[4] is None or _is_port(m[4]))
            for m in record
        )
    ):
        raise CorruptKey(f"the key 'r{n}/done' holds {value[:80]!r}, not a round's members")
    return record


def join_record(value: str) -> dict[str, Any] | None:
    """A node's announcement in a round, or ``None`` when it is not one."""
    try:
        record = json.loads(value)
    except (ValueError, RecursionError):
        return None
    if not (
        isinstance(record, dict)
        and isinstance(record.get("role"), str)
        and isinstance(record.get("nproc"), int)
        and not isinstance(record.get("nproc"), bool)
        and record["nproc"] >= 0
        and (record.get("node_rank") is None or type(record.get("node_rank")) is int)
        and (record.get("addr") is None or isinstance(record.get("addr"), str))
        and (record.get("failover") is None or _is_port(record.get("failover")))
    ):
        return None
    return record


def _is_port(value: object) -> bool:
    return type(value) is int and 0 < value < 65536


def master_record(key: str, value: str | None) -> tuple[str, int]:
    """MASTER_ADDR and MASTER_PORT as group rank 0 wrote them."""
    try:
        addr, port = json.loads(value or "")
    except (ValueError, TypeError, RecursionError):
        addr = port = None
    if not isinstance(addr, str) or type(port) is not int or not 0 < port < 65536:
        raise CorruptKey(f"the key {key!r} holds {(value or '')[:80]!r}, not an address")
    return addr, port


def count_of(value: str | None) -> int:
    """The job's restart count."""
    try:
        return max(0, int(value or 0))
    except ValueError:
        shown = (value or "")[:60]
        raise CorruptKey(f"the key 'restarts' holds {shown!r}, not a count") from None


def failure_time(value: str) -> float | None:
    """The wall-clock time in a node's failure report (``None``: not one)."""
    try:
        at = float(value)
    except ValueError:
        return None
    return at if math.isfinite(at) else None
