"""The key-value store that rendezvous is written against, and an in-memory one.

Small on purpose: what a TCP server, etcd and Redis all do well. Values are text (JSON in
practice; nothing is ever pickled). Keys may carry a time to live: a node keeps its own
liveness key alive instead of rewriting shared state, and a dead node's key expires.
Waiting is notified: :meth:`Store.wait_for_change` returns as soon as a key under a
prefix changes (set, deleted or expired), with the store's new version.
"""

from __future__ import annotations

import bisect
import heapq
import math
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

__all__ = [
    "MAX_INT",
    "MAX_SECONDS",
    "MemoryStore",
    "Store",
    "StoreArgumentError",
    "StoreError",
    "StoreTimeoutError",
    "StoreUnavailableError",
    "check_amount",
    "check_items",
    "check_key",
    "check_keys",
    "check_optional_text",
    "check_seconds",
    "check_text",
    "check_version",
    "count_keys",
    "refresh_keys",
    "set_tied",
]

#: The longest time to live or timeout a store accepts, in seconds (about 31 years):
#: any time a job could mean, far from where a float or a timer would overflow.
MAX_SECONDS = 1e9
#: ``add`` amounts and versions are 64-bit integers, as in etcd and Redis.
MAX_INT = 2**63 - 1


class StoreError(Exception):
    """The store could not be reached or refused a request; the message says which."""


class StoreTimeoutError(StoreError, TimeoutError):
    """A wait ran out of time."""


class StoreUnavailableError(StoreError):
    """The store cannot be reached now but may come back (not started yet, restarting);
    worth retrying, unlike a refusal or a store that is gone for good."""


class StoreArgumentError(StoreError, ValueError):
    """A request refused for its arguments, before anything changed: a key or value that
    is not text, a time to live or timeout that is negative, NaN or infinite, an amount
    that is not an integer. Every store refuses these (the conformance suite checks it);
    the TCP store's server refuses them off the wire too."""


# -- argument checks: every Store implementation may use them -----------------------------


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def check_text(value: object, name: str = "value") -> str:
    """``value`` when it is a string; else :class:`StoreArgumentError`."""
    if not isinstance(value, str):
        raise StoreArgumentError(f"{name} must be a string, not {type(value).__name__}")
    return value


def check_key(key: object, name: str = "key") -> str:
    """A key: a string."""
    return check_text(key, name)


def check_optional_text(value: object, name: str) -> str | None:
    """A string or ``None``."""
    return None if value is None else check_text(value, name)


def check_seconds(value: object, name: str) -> float:
    """A time to live or timeout: a finite number of seconds, 0 .. :data:`MAX_SECONDS`
    (an ``int`` or ``float``; ``bool`` is not a number here)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise StoreArgumentError(f"{name} must be a number of seconds, not {_show(value)}")
    if isinstance(value, int):
        if not 0 <= value <= MAX_SECONDS:
            raise StoreArgumentError(f"{name} must be 0..{MAX_SECONDS:g} seconds, not {value}")
        return float(value)
    if not math.isfinite(value) or not 0 <= value <= MAX_SECONDS:
        raise StoreArgumentError(f"{name} must be 0..{MAX_SECONDS:g} seconds, not {value!r}")
    return value


def check_amount(value: object, name: str = "amount") -> int:
    """An ``add`` amount: an integer (negative counts down), 64-bit."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise StoreArgumentError(f"{name} must be an integer, not {_show(value)}")
    if not -MAX_INT - 1 <= value <= MAX_INT:
        raise StoreArgumentError(f"{name} must be a 64-bit integer, not {_show(value)}")
    return value


def check_version(value: object, name: str = "version") -> int:
    """A store version: an integer 0 .. :data:`MAX_INT`."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_INT:
        raise StoreArgumentError(f"{name} must be an integer >= 0, not {_show(value)}")
    return value


def check_keys(keys: object, name: str = "keys") -> list[str]:
    """A list (or tuple) of keys; a string is not a list of its characters."""
    if not isinstance(keys, list | tuple):
        raise StoreArgumentError(f"{name} must be a list of strings, not {_show(keys)}")
    return [check_key(k, f"each of {name}") for k in keys]


def check_items(items: object, name: str = "items") -> dict[str, str]:
    """A mapping of keys to values, both strings."""
    if not isinstance(items, Mapping):
        raise StoreArgumentError(f"{name} must map strings to strings, not {_show(items)}")
    return {
        check_key(k, f"each key of {name}"): check_text(v, f"each value of {name}")
        for k, v in items.items()
    }


@runtime_checkable
class Store(Protocol):
    """The operations rendezvous needs. Every blocking call takes a timeout in seconds."""

    def set(self, key: str, value: str, ttl: float | None = None) -> None:
        """Write ``key``; with ``ttl`` it disappears unless written again in time."""

    def refresh(self, key: str, ttl: float) -> bool:
        """Extend a TTL key's life without counting as a change (watchers do not wake: a
        heartbeat costs one request, not one per watcher). False if the key is gone."""

    def get(self, key: str) -> str | None:
        """The value, or ``None`` when the key does not exist."""

    def add(self, key: str, amount: int) -> int:
        """Add to an integer key (missing = 0) and return the new value."""

    def compare_set(
        self, key: str, expected: str | None, desired: str, ttl: float | None = None
    ) -> tuple[bool, str | None]:
        """Write ``desired`` if the current value is ``expected`` (``None``: the key must
        not exist). Returns (done, value now)."""

    def delete(self, key: str) -> bool:
        """Remove ``key``; False when it did not exist."""

    def delete_prefix(self, prefix: str) -> int:
        """Remove every key under ``prefix``; returns how many."""

    def multi_get(self, keys: Sequence[str]) -> list[str | None]: ...

    def multi_set(self, items: Mapping[str, str]) -> None: ...

    def scan(self, prefix: str) -> tuple[dict[str, str], int]:
        """Every key under ``prefix`` with its value, and the store's version."""

    def wait_for_change(self, prefix: str, version: int, timeout: float) -> int:
        """Block until a key under ``prefix`` changed after ``version``; return the
        version then. Raises :class:`StoreTimeoutError` after ``timeout``."""

    def wait(self, keys: Sequence[str], timeout: float) -> None:
        """Block until every key exists."""

    def close(self) -> None: ...


def refresh_keys(store: Store, keys: Sequence[str], ttl: float) -> list[bool]:
    """:meth:`Store.refresh` of each of ``keys``: in one request where the store has
    ``refresh_many`` (the memory and TCP stores: a node's heartbeat refreshes two or
    three keys, and one request instead of three is what lets one store keep a few
    thousand nodes alive), else one request each."""
    many = getattr(store, "refresh_many", None)
    if many is not None:
        try:
            return list(many(keys, ttl))
        except StoreArgumentError:  # a server from before refresh_many
            pass
    return [store.refresh(key, ttl) for key in keys]


def set_tied(store: Store, key: str, value: str, owner: str, ttl: float) -> None:
    """Set ``key`` with a time to live ``ttl``, tied where the store can to ``owner``, a
    TTL key this client set: then it lives as long as ``owner`` does, and refreshing
    either refreshes both (etcd: one lease, so a node's heartbeat is one lease
    keep-alive, not one per key). Elsewhere it is ``set(key, value, ttl=ttl)``: a key of
    its own, which the heartbeat refreshes with the others."""
    tied = getattr(store, "set_tied", None)
    if tied is not None:
        tied(key, value, owner, ttl)
    else:
        store.set(key, value, ttl=ttl)


#: How many prefixes :class:`MemoryStore` keeps the last change's version of: each
#: change checks them all, each wait on one of them is then O(1).
_PREFIXES = 64


def count_keys(store: Store, prefix: str) -> int:
    """How many keys are under ``prefix``: one small answer where the store has
    ``count`` (memory, TCP, etcd), else the length of a :meth:`Store.scan`."""
    count = getattr(store, "count", None)
    if count is not None:
        try:
            return int(count(prefix))
        except StoreArgumentError:  # a server from before count
            pass
    return len(store.scan(prefix)[0])


def _past(prefix: str) -> str | None:
    """The least string above every string that starts with ``prefix`` (its last
    character below the greatest one, plus one), or ``None`` when there is none: every
    string starts with an empty prefix, or with one of the greatest characters only."""
    stem = prefix.rstrip(chr(sys.maxunicode))
    return stem[:-1] + chr(ord(stem[-1]) + 1) if stem else None


@dataclass
class _Entry:
    value: str
    expires: float | None


class MemoryStore:
    """The store in one process (threads share it): for unit tests and the conformance
    suite's reference. ``clock`` is injectable; expiry is checked on every access."""

    def __init__(
        self,
        clock: Callable[[], float] = time.monotonic,
        on_change: Callable[[str], None] | None = None,
    ) -> None:
        self._clock = clock
        self._on_change = on_change
        self._data: dict[str, _Entry] = {}
        #: Every key, sorted: a scan reads the keys under its prefix only (scanning every
        #: key for each small scan cost the TCP store 10 s of CPU in a 1,024-node run).
        self._keys: list[str] = []
        #: The version of the last change under each prefix recently waited on, kept up
        #: to date by each change (most recently asked last; at most _PREFIXES).
        self._prefix_versions: dict[str, int] = {}
        #: (expiry time, key) of every time to live set, oldest first; an entry whose key
        #: was refreshed, rewritten or deleted since is skipped when it comes up. Checking
        #: expiry on every request by scanning every key cost the TCP store 27 % of its
        #: CPU with 1,024 nodes (bench/scale.py --profile); with the heap it is O(log n).
        self._expiries: list[tuple[float, str]] = []
        #: key -> version of its last change, oldest first (a changed key moves to the
        #: end), so that "changed since v" looks at the changes after v only: scanning
        #: every key changed since the start for each wait cost the TCP store 10 % of
        #: its CPU at 1,024 nodes.
        self._changed: dict[str, int] = {}
        self._version = 0
        self._cond = threading.Condition()

    # Every public method holds the condition's lock; _expire and _bump assume it.

    def _expire(self) -> None:
        now, heap = self._clock(), self._expiries
        while heap and heap[0][0] <= now:
            when, key = heapq.heappop(heap)
            entry = self._data.get(key)
            if entry is not None and entry.expires == when:  # (not refreshed since)
                self._remove(key)
                self._bump(key)

    def _expires_at(self, key: str, when: float) -> float:
        heap = self._expiries
        if len(heap) > 2 * len(self._data) + 64:  # mostly stale (long TTLs deleted early)
            heap[:] = [(e.expires, k) for k, e in self._data.items() if e.expires is not None]
            heapq.heapify(heap)
        heapq.heappush(heap, (when, key))
        return when

    def _remove(self, key: str) -> None:
        del self._data[key]
        keys = self._keys
        del keys[bisect.bisect_left(keys, key)]

    def _span(self, prefix: str) -> tuple[int, int]:
        """Where the keys under ``prefix`` lie in the sorted keys: two binary searches.
        Walking them to find the end made counting a round's N join keys O(N) a count,
        O(N²) a round: 3.6 million comparisons, a tenth of the store's time, for one
        2,048-node round and its re-form (bench/scale.py --profile)."""
        keys = self._keys
        start = bisect.bisect_left(keys, prefix)
        after = _past(prefix)
        end = len(keys) if after is None else bisect.bisect_left(keys, after, start)
        return start, end

    def _under(self, prefix: str) -> list[str]:
        """The keys under ``prefix``, sorted."""
        start, end = self._span(prefix)
        return self._keys[start:end]

    def _bump(self, key: str) -> None:
        self._version += 1
        self._changed.pop(key, None)
        self._changed[key] = self._version
        versions = self._prefix_versions
        for prefix in versions:
            if key.startswith(prefix):
                versions[prefix] = self._version
        self._cond.notify_all()
        if self._on_change:
            self._on_change(key)

    def expire(self) -> float | None:
        """Drop expired keys now; returns when the next key expires (clock time)."""
        with self._cond:
            self._expire()
            return self._next_expiry()

    def _put(self, key: str, value: str, ttl: float | None) -> None:
        when = None if ttl is None else self._expires_at(key, self._clock() + ttl)
        if key not in self._data:
            bisect.insort(self._keys, key)
        self._data[key] = _Entry(value, when)
        self._bump(key)

    def set(self, key: str, value: str, ttl: float | None = None) -> None:
        key, value = check_key(key), check_text(value)
        ttl = None if ttl is None else check_seconds(ttl, "ttl")
        with self._cond:
            self._expire()
            self._put(key, value, ttl)

    def refresh(self, key: str, ttl: float) -> bool:
        key, ttl = check_key(key), check_seconds(ttl, "ttl")
        with self._cond:
            self._expire()
            entry = self._data.get(key)
            if entry is None:
                return False
            entry.expires = self._expires_at(key, self._clock() + ttl)
            return True

    def refresh_many(self, keys: Sequence[str], ttl: float) -> list[bool]:
        """:meth:`refresh` of each of ``keys``, in one request (see
        :func:`refresh_keys`)."""
        keys, ttl = check_keys(keys), check_seconds(ttl, "ttl")
        with self._cond:
            self._expire()
            found = []
            for key in keys:
                entry = self._data.get(key)
                if entry is not None:
                    entry.expires = self._expires_at(key, self._clock() + ttl)
                found.append(entry is not None)
            return found

    def get(self, key: str) -> str | None:
        key = check_key(key)
        with self._cond:
            self._expire()
            entry = self._data.get(key)
            return entry.value if entry else None

    def add(self, key: str, amount: int) -> int:
        key, amount = check_key(key), check_amount(amount)
        with self._cond:
            self._expire()
            entry = self._data.get(key)
            try:
                value = int(entry.value if entry else 0) + amount
            except ValueError:
                raise StoreError(f"add: key {key!r} does not hold an integer") from None
            self._put(key, str(value), None)
            return value

    def compare_set(
        self, key: str, expected: str | None, desired: str, ttl: float | None = None
    ) -> tuple[bool, str | None]:
        key, desired = check_key(key), check_text(desired, "desired")
        expected = check_optional_text(expected, "expected")
        ttl = None if ttl is None else check_seconds(ttl, "ttl")
        with self._cond:
            self._expire()
            entry = self._data.get(key)
            current = entry.value if entry else None
            if current != expected:
                return False, current
            self._put(key, desired, ttl)
            return True, desired

    def delete(self, key: str) -> bool:
        key = check_key(key)
        with self._cond:
            self._expire()
            if key not in self._data:
                return False
            self._remove(key)
            self._bump(key)
            return True

    def delete_prefix(self, prefix: str) -> int:
        prefix = check_key(prefix, "prefix")
        with self._cond:
            self._expire()
            doomed = self._under(prefix)
            for key in doomed:
                self._remove(key)
                self._bump(key)
            return len(doomed)

    def multi_get(self, keys: Sequence[str]) -> list[str | None]:
        keys = check_keys(keys)
        with self._cond:
            self._expire()
            return [self._data[k].value if k in self._data else None for k in keys]

    def multi_set(self, items: Mapping[str, str]) -> None:
        items = check_items(items)
        with self._cond:
            self._expire()
            for key, value in items.items():
                self._put(key, value, None)

    def scan(self, prefix: str) -> tuple[dict[str, str], int]:
        prefix = check_key(prefix, "prefix")
        with self._cond:
            self._expire()
            data = self._data
            found = {k: data[k].value for k in self._under(prefix)}
            return found, self._version

    def count(self, prefix: str) -> int:
        """How many keys are under ``prefix`` (see :func:`count_keys`)."""
        prefix = check_key(prefix, "prefix")
        with self._cond:
            self._expire()
            start, end = self._span(prefix)
            return end - start

    def _changed_since(self, prefix: str, version: int) -> bool:
        versions = self._prefix_versions
        last = versions.pop(prefix, None)
        if last is None:  # not asked lately: look back through the changes, once
            last = next((v for k, v in reversed(self._changed.items()) if k.startswith(prefix)), 0)
            if len(versions) >= _PREFIXES:
                del versions[next(iter(versions))]  # the least recently asked
        versions[prefix] = last
        return last > version

    def _next_expiry(self) -> float | None:
        heap = self._expiries
        while heap:  # drop what no longer holds: refreshed, rewritten or deleted keys
            when, key = heap[0]
            entry = self._data.get(key)
            if entry is not None and entry.expires == when:
                return when
            heapq.heappop(heap)
        return None

    def wait_for_change(self, prefix: str, version: int, timeout: float) -> int:
        prefix, version = check_key(prefix, "prefix"), check_version(version)
        timeout = check_seconds(timeout, "timeout")
        self._wait_until(
            lambda: self._changed_since(prefix, version),
            timeout,
            lambda: f"no change under {prefix!r} in {timeout:g} s",
        )
        return self._version

    def wait(self, keys: Sequence[str], timeout: float) -> None:
        keys, timeout = check_keys(keys), check_seconds(timeout, "timeout")
        self._wait_until(
            lambda: all(k in self._data for k in keys),
            timeout,
            lambda: (
                f"keys {[k for k in keys if k not in self._data]} did not appear in {timeout:g} s"
            ),
        )

    def _wait_until(self, done: Callable[[], bool], timeout: float, why: Callable[[], str]) -> None:
        """Block until ``done()`` (checked under the lock, after expiring keys), waking on
        every change and at the next expiry; raise :class:`StoreTimeoutError` after
        ``timeout``."""
        deadline = self._clock() + timeout
        with self._cond:
            while True:
                self._expire()
                if done():
                    return
                now = self._clock()
                if now >= deadline:
                    raise StoreTimeoutError(why())
                expiry = self._next_expiry()
                until = deadline if expiry is None else min(deadline, expiry)
                self._cond.wait(max(0.0, until - now))

    def close(self) -> None:
        """Nothing to release."""
