"""What the dynamic rendezvous protocol's keys hold, parsed: garbage there (a bug, another
version, or a client that should not have been let in) is a protocol error, never a crash.
Private to the protocol (:mod:`elastic_runner.rendezvous.dynamic` and its parts)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from elastic_runner.rendezvous.store import StoreError

__all__ = [
    "OUTSIDE_BELL",
    "CorruptKey",
    "RoundSummary",
    "count_of",
    "done_record",
    "done_summary",
    "failure_time",
    "join_record",
    "master_record",
    "round_of",
    "seat_of",
]


#: The key (under the job's prefix) rung when the job fails or finishes: nodes outside
#: the round wait on the keys under ``round``, this one among them.
OUTSIDE_BELL = "round/bell"


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


@dataclass(frozen=True)
class RoundSummary:
    """What every member of a completed round reads (``r<n>/done``): small whatever the
    number of nodes, so that N nodes reading it cost O(N) bytes, not O(N²).

    ``attempt`` names the completer's per-node seats (``r<n>/seat/<attempt>/<node>``: a
    node's group rank) and full record (``r<n>/record/<attempt>``); ``roles`` lists
    [role, workers, nodes] runs in group-rank order; ``version`` is the store's version
    when the completer saw every member's join key alive (changes after it are what a
    member's watcher wakes for); ``candidates`` are the members that may host the store
    after a move, [node id, address, port], in group-rank order; ``monitors``, a few
    members whose first still running one reads the job when a member's key goes. A
    record written by an agent from before summaries (a list: the full record) is
    ``record``, seats implied."""

    attempt: str
    size: int
    roles: tuple[tuple[str, int, int], ...]
    version: int
    candidates: tuple[tuple[str, str, int], ...] = ()
    monitors: tuple[str, ...] = ()
    record: tuple[tuple[Any, ...], ...] | None = None

    def to_json(self) -> str:
        return json.dumps(
            {
                "attempt": self.attempt,
                "size": self.size,
                "roles": [list(r) for r in self.roles],
                "version": self.version,
                "candidates": [list(c) for c in self.candidates],
                "monitors": list(self.monitors),
            },
            separators=(",", ":"),
        )

    @staticmethod
    def runs(record: list[list[Any]]) -> tuple[tuple[str, int, int], ...]:
        """``record``'s [role, workers] in runs: one entry for a job whose nodes are
        alike."""
        runs: list[list[Any]] = []
        for m in record:
            if runs and runs[-1][0] == m[1] and runs[-1][1] == m[2]:
                runs[-1][2] += 1
            else:
                runs.append([m[1], m[2], 1])
        return tuple((str(r[0]), int(r[1]), int(r[2])) for r in runs)


def done_summary(n: int, value: str) -> RoundSummary:
    """The completed round's summary (or a legacy full record, as one)."""
    try:
        data = json.loads(value)
    except (ValueError, RecursionError):
        data = None
    if isinstance(data, list):
        record = done_record(n, value)
        return RoundSummary(
            attempt="",
            size=len(record),
            roles=RoundSummary.runs(record),
            version=0,
            record=tuple(tuple(m) for m in record),
        )
    try:
        assert isinstance(data, dict)
        attempt, size, version = data["attempt"], data["size"], data["version"]
        roles = tuple((r[0], r[1], r[2]) for r in data["roles"])
        candidates = tuple((c[0], c[1], c[2]) for c in data.get("candidates", []))
        monitors = tuple(data.get("monitors", []))
        assert all(isinstance(m, str) for m in monitors)
        assert isinstance(attempt, str) and attempt.isalnum()
        assert all(type(x) is int and x >= 0 for x in (size, version))
        assert all(
            isinstance(r, str) and type(w) is int and w >= 0 and type(c) is int and c > 0
            for r, w, c in roles
        )
        assert sum(c for _, _, c in roles) == size > 0
        assert all(
            isinstance(c[0], str) and isinstance(c[1], str) and _is_port(c[2]) for c in candidates
        )
    except (AssertionError, KeyError, TypeError, IndexError, ValueError):
        raise CorruptKey(
            f"the key 'r{n}/done' holds {value[:80]!r}, not a round's members"
        ) from None
    return RoundSummary(attempt, size, roles, version, candidates, monitors)


def seat_of(value: str | None, size: int) -> int | None:
    """A node's group rank in its seat key (``None``: no seat, or not one)."""
    if value is None or not (value.isascii() and value.isdigit()):
        return None
    rank = int(value)
    return rank if rank < size else None


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
