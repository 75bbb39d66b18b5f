"""The :class:`~elastic_runner.rendezvous.store.Store` on a Redis server (redis-py).

Every operation is one Lua script, so it is atomic and sees the same clock (Redis's
``TIME``) as every other client:

- A TTL key's deadline lives in a sorted set; each script first deletes the keys past
  their deadline and counts each as a change. A refresh moves the deadline and changes
  nothing (watchers stay asleep). Redis's own expiry, a minute later, only collects keys
  nobody purged (every client gone).
- Each change increments a version counter, records ``key -> version`` in a sorted set
  and is published on the key's own channel. A waiter subscribes to the channels of its
  prefix (a pattern), checks the record for a change under its prefix after its version,
  and sleeps until a message arrives or the next deadline passes: notified, never polled,
  and woken only by changes under its prefix (one channel for every change sent each of
  N waiters every change: a 1,024-node round moved 300 MiB).
- An index of live keys (a lexicographic sorted set) makes prefix scans exact.
"""

from __future__ import annotations

import contextlib
import functools
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

from elastic_runner.rendezvous.store import (
    StoreError,
    StoreTimeoutError,
    StoreUnavailableError,
    check_key,
    check_keys,
    check_seconds,
)

__all__ = ["RedisStore"]

T = TypeVar("T")

#: Redis's own expiry of a TTL key comes this long after its deadline (a safety net).
GRACE_MS = 60_000

_PRELUDE = """
local VERSION, CHANGES, EXPIRY, INDEX = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local DATA, CHANNEL, GRACE = ARGV[1], ARGV[2], tonumber(ARGV[3])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local function bump(key)
  local v = redis.call('INCR', VERSION)
  redis.call('ZADD', CHANGES, v, key)
  redis.call('PUBLISH', CHANNEL .. key, key)
  return v
end
local function remove(key)
  redis.call('DEL', DATA .. key)
  redis.call('ZREM', EXPIRY, key)
  redis.call('ZREM', INDEX, key)
end
local function put(key, value, ttl)
  if ttl and ttl > 0 then
    redis.call('SET', DATA .. key, value, 'PX', ttl + GRACE)
    redis.call('ZADD', EXPIRY, now + ttl, key)
  else
    redis.call('SET', DATA .. key, value)
    redis.call('ZREM', EXPIRY, key)
  end
  redis.call('ZADD', INDEX, 0, key)
  bump(key)
end
local function under(prefix)
  local last = prefix .. '\\255'
  return redis.call('ZRANGEBYLEX', INDEX, '[' .. prefix, '[' .. last)
end
local function next_expiry()
  local first = redis.call('ZRANGE', EXPIRY, 0, 0, 'WITHSCORES')
  if #first == 0 then return -1 end
  return math.max(0, tonumber(first[2]) - now)
end
for _, key in ipairs(redis.call('ZRANGEBYSCORE', EXPIRY, '-inf', now)) do
  remove(key)
  bump(key)
end
local A = {}
for i = 4, #ARGV do A[#A + 1] = ARGV[i] end
"""

_SCRIPTS = {
    "set": "put(A[1], A[2], tonumber(A[3])) return 1",
    "refresh": """
        if redis.call('EXISTS', DATA .. A[1]) == 0 then return 0 end
        local ttl = tonumber(A[2])
        redis.call('PEXPIRE', DATA .. A[1], ttl + GRACE)
        redis.call('ZADD', EXPIRY, now + ttl, A[1])
        return 1
    """,
    "refresh_many": """
        local ttl = tonumber(A[1])
        local out = {}
        for i = 2, #A do
          if redis.call('EXISTS', DATA .. A[i]) == 0 then
            out[#out + 1] = 0
          else
            redis.call('PEXPIRE', DATA .. A[i], ttl + GRACE)
            redis.call('ZADD', EXPIRY, now + ttl, A[i])
            out[#out + 1] = 1
          end
        end
        return out
    """,
    "count": "return #under(A[1])",
    "get": "return redis.call('GET', DATA .. A[1])",
    "add": """
        local current = redis.call('GET', DATA .. A[1])
        local n = tonumber(current or '0')
        if n == nil then return redis.error_reply('not an integer') end
        n = n + tonumber(A[2])
        put(A[1], string.format('%d', n), nil)
        return n
    """,
    "compare_set": """
        local current = redis.call('GET', DATA .. A[1])
        local expected = false
        if A[2] == '1' then expected = A[3] end
        if current ~= expected then return {0, current} end
        put(A[1], A[4], tonumber(A[5]))
        return {1, A[4]}
    """,
    "delete": """
        if redis.call('EXISTS', DATA .. A[1]) == 0 then return 0 end
        remove(A[1])
        bump(A[1])
        return 1
    """,
    "delete_prefix": """
        local doomed = under(A[1])
        for _, key in ipairs(doomed) do
          remove(key)
          redis.call('ZREM', CHANGES, key)
        end
        if #doomed > 0 then bump(A[1]) end
        return #doomed
    """,
    "multi_get": """
        local out = {}
        for i, key in ipairs(A) do out[i] = redis.call('GET', DATA .. key) end
        return out
    """,
    "multi_set": """
        for i = 1, #A, 2 do put(A[i], A[i + 1], nil) end
        return 1
    """,
    "scan": """
        local keys = under(A[1])
        local out = {redis.call('GET', VERSION) or '0'}
        for _, key in ipairs(keys) do
          local value = redis.call('GET', DATA .. key)
          if value then out[#out + 1] = key; out[#out + 1] = value end
        end
        return out
    """,
    "changed_since": """
        local prefix = A[1]
        for _, key in ipairs(redis.call('ZRANGEBYSCORE', CHANGES, '(' .. A[2], '+inf')) do
          if string.sub(key, 1, #prefix) == prefix or string.sub(prefix, 1, #key) == key then
            return {1, redis.call('GET', VERSION) or '0', -1}
          end
        end
        return {0, redis.call('GET', VERSION) or '0', next_expiry()}
    """,
    "exist": """
        for _, key in ipairs(A) do
          if redis.call('EXISTS', DATA .. key) == 0 then return {0, next_expiry()} end
        end
        return {1, -1}
    """,
}


class RedisStore:
    """A store under ``namespace`` on the Redis server at ``host:port``."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        db: int = 0,
        namespace: str = "elastic-runner:",
        username: str | None = None,
        password: str | None = None,
        tls: bool = False,
        ca_cert: str | None = None,
        timeout: float = 10.0,
    ) -> None:
        import redis
        from redis.backoff import ExponentialBackoff
        from redis.retry import Retry

        self._errors = redis.exceptions
        self.address = f"{host}:{port}"
        self._redis = redis.Redis(
            host=host,
            port=port,
            db=db,
            username=username,
            password=password,
            ssl=tls or bool(ca_cert),
            ssl_ca_certs=ca_cert,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            decode_responses=True,
            # Short retries for a blip; longer outages are the rendezvous's to ride out.
            retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), 2),
        )
        self._timeout = timeout
        #: Set by ``close``: no request after it. A watcher thread still in a wait would
        #: otherwise reconnect, and the pool kept that socket open past the client.
        self._closed = False
        #: Each thread's pub/sub connection, kept from one wait to the next.
        self._local = threading.local()
        meta = namespace + "meta:"
        self._keys = [meta + "version", meta + "changes", meta + "expiry", meta + "index"]
        #: A change of key k is published on ``events:k``.
        self._channel = meta + "events:"
        self._base_args = [namespace + "data:", self._channel, str(GRACE_MS)]
        self._scripts = {
            name: self._redis.register_script(_PRELUDE + body) for name, body in _SCRIPTS.items()
        }

    # -- plumbing -----------------------------------------------------------------------

    def _call(self, name: str, *args: object) -> Any:
        script = self._scripts[name]
        return self._guard(
            lambda: script(keys=self._keys, args=[*self._base_args, *(str(a) for a in args)])
        )

    def _closed_error(self) -> StoreError:
        return StoreError(f"the client of Redis at {self.address} is closed")

    def _guard(self, request: Callable[[], T]) -> T:
        errors = self._errors
        if self._closed:
            raise self._closed_error()
        try:
            return request()
        except Exception as exc:
            if self._closed:  # closed meanwhile: its connection went under the request
                raise self._closed_error() from None
            if isinstance(exc, errors.RedisError):
                raise self._store_error(exc) from None
            raise
        finally:
            if self._closed:  # a request that began before close may have reconnected
                self._redis.connection_pool.disconnect()

    def _store_error(self, exc: Exception) -> StoreError:
        errors = self._errors
        if isinstance(exc, errors.AuthenticationError):
            return StoreError(
                f"Redis at {self.address} refused the credentials (rdzv.username, "
                f"rdzv.password): {exc}"
            )
        if isinstance(exc, (errors.ConnectionError, errors.TimeoutError)):
            return StoreUnavailableError(f"cannot reach Redis at {self.address}: {exc}")
        return StoreError(f"Redis at {self.address}: {exc}")

    @staticmethod
    def _ttl_ms(ttl: float | None) -> str:
        return "" if ttl is None else str(max(1, round(ttl * 1000)))

    # -- the Store protocol -------------------------------------------------------------

    def set(self, key: str, value: str, ttl: float | None = None) -> None:
        self._call("set", key, value, self._ttl_ms(ttl))

    def refresh(self, key: str, ttl: float) -> bool:
        return bool(self._call("refresh", key, self._ttl_ms(ttl)))

    def refresh_many(self, keys: Sequence[str], ttl: float) -> list[bool]:
        """:meth:`refresh` of each of ``keys``, in one script."""
        keys, ttl = check_keys(keys), check_seconds(ttl, "ttl")
        if not keys:
            return []
        return [bool(x) for x in self._call("refresh_many", self._ttl_ms(ttl), *keys)]

    def count(self, prefix: str) -> int:
        """How many keys are under ``prefix`` (one small answer)."""
        return int(self._call("count", check_key(prefix, "prefix")))

    def get(self, key: str) -> str | None:
        value = self._call("get", key)
        return None if value is None else str(value)

    def add(self, key: str, amount: int) -> int:
        try:
            return int(self._call("add", key, amount))
        except StoreError as exc:
            raise StoreError(f"add: key {key!r} does not hold an integer ({exc})") from None

    def compare_set(
        self, key: str, expected: str | None, desired: str, ttl: float | None = None
    ) -> tuple[bool, str | None]:
        has_expected = "0" if expected is None else "1"
        done, value = self._call(
            "compare_set", key, has_expected, expected or "", desired, self._ttl_ms(ttl)
        )
        return bool(done), value

    def delete(self, key: str) -> bool:
        return bool(self._call("delete", key))

    def delete_prefix(self, prefix: str) -> int:
        return int(self._call("delete_prefix", prefix))

    def multi_get(self, keys: Sequence[str]) -> list[str | None]:
        return list(self._call("multi_get", *keys)) if keys else []

    def multi_set(self, items: Mapping[str, str]) -> None:
        if items:
            self._call("multi_set", *(x for pair in items.items() for x in pair))

    def scan(self, prefix: str) -> tuple[dict[str, str], int]:
        version, *flat = self._call("scan", prefix)
        return dict(zip(flat[::2], flat[1::2], strict=True)), int(version)

    def wait_for_change(self, prefix: str, version: int, timeout: float) -> int:
        prefix = check_key(prefix, "prefix")
        found: list[int] = []

        def changed() -> float | None:
            done, now, next_expiry = self._call("changed_since", prefix, version)
            if done:
                found.append(int(now))
                return None
            return float(next_expiry)

        self._wait(
            changed, timeout, lambda: f"no change under {prefix!r} in {timeout:g} s", [prefix]
        )
        return found[0]

    def wait(self, keys: Sequence[str], timeout: float) -> None:
        if not keys:  # all of none exist (and PSUBSCRIBE takes one pattern at least)
            return

        def exist() -> float | None:
            done, next_expiry = self._call("exist", *keys)
            return None if done else float(next_expiry)

        self._wait(
            exist, timeout, lambda: f"keys {list(keys)} did not appear in {timeout:g} s", keys
        )

    def _wait(
        self,
        check: Callable[[], float | None],
        timeout: float,
        why: Callable[[], str],
        prefixes: Sequence[str],
    ) -> None:
        """Subscribe to the change channels of the keys under ``prefixes``, then run
        ``check`` (``None``: done; else milliseconds until the next TTL deadline, -1 for
        none) after every message and deadline until it is done or ``timeout`` runs out;
        then unsubscribe, keeping the connection for this thread's next wait."""
        deadline = time.monotonic() + timeout
        pubsub = self._subscriber()
        patterns = [self._channel + _glob_escape(p) + "*" for p in prefixes]
        kept = False
        try:
            self._guard(lambda: pubsub.psubscribe(*patterns))
            # The confirmations prove the subscriptions are live before the first check.
            self._confirmed(pubsub, "psubscribe", patterns)
            try:
                while True:
                    next_expiry_ms = check()
                    if next_expiry_ms is None:
                        return
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise StoreTimeoutError(why())
                    sleep = left if next_expiry_ms < 0 else min(left, next_expiry_ms / 1000 + 0.001)
                    message = self._next_message(pubsub, sleep)
                    while message is not None:  # drain: one check covers a burst
                        message = self._guard(lambda: pubsub.get_message(timeout=0))
            finally:
                self._guard(lambda: pubsub.punsubscribe(*patterns))
                self._confirmed(pubsub, "punsubscribe", patterns)
                kept = True
        finally:
            if not kept:  # in an unknown state (a lost connection, an interruption)
                self._drop_subscriber(pubsub)

    def _subscriber(self) -> Any:
        """This thread's pub/sub connection. A new one for each wait cost a connection
        and its handshake per wait, and the connection it closed went back to the pool,
        to be connected again by the next request: 1.25 ms of the client's CPU a wait
        that returns at once, 0.71 ms now (2.7 and 2.0 ms wall, on loopback)."""
        pubsub = getattr(self._local, "pubsub", None)
        if pubsub is None:
            pubsub = self._local.pubsub = self._redis.pubsub()  # type: ignore[no-untyped-call]
        return pubsub

    def _drop_subscriber(self, pubsub: Any) -> None:
        self._local.pubsub = None
        with contextlib.suppress(Exception):
            pubsub.close()

    def _confirmed(self, pubsub: Any, kind: str, patterns: Sequence[str]) -> None:
        """Read until the server confirmed ``kind`` for each of ``patterns``; messages of
        an earlier wait still on the way are skipped."""
        awaited = set(patterns)
        deadline = time.monotonic() + self._timeout
        while awaited:
            left = deadline - time.monotonic()
            if left <= 0:
                raise StoreUnavailableError(
                    f"Redis at {self.address} did not confirm a {kind} within {self._timeout:g} s"
                )
            message = self._guard(functools.partial(pubsub.get_message, timeout=left))
            if message is not None and message.get("type") == kind:
                awaited.discard(message.get("channel"))

    def _next_message(self, pubsub: Any, seconds: float) -> Any:
        """The next message within ``seconds`` (None if none came), read in slices of
        at most ``_CLOSE_CHECK`` s so that ``close`` ends the wait: closing the pool
        under it would not (redis-py reconnects and resubscribes a pub/sub)."""
        deadline = time.monotonic() + seconds
        while True:
            left = deadline - time.monotonic()
            slice_ = max(0.0, min(left, _CLOSE_CHECK))
            message = self._guard(functools.partial(pubsub.get_message, timeout=slice_))
            if message is not None or left <= _CLOSE_CHECK:
                return message

    def close(self) -> None:
        """Close the connections; the waits of other threads end (within
        ``_CLOSE_CHECK`` s) and later requests are refused."""
        self._closed = True
        self._redis.close()


#: How often a wait looks whether the client was closed: a wakeup without a request,
#: four a second per waiting thread.
_CLOSE_CHECK = 0.25


def _glob_escape(text: str) -> str:
    """``text`` as a Redis glob pattern that matches it literally."""
    return "".join("\\" + c if c in "\\*?[]^" else c for c in text)
