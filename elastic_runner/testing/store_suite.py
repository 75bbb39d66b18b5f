"""The behaviour every :class:`~elastic_runner.rendezvous.store.Store` must have.

Use it from a backend's tests::

    from elastic_runner.testing.store_suite import StoreSuite

    class TestMyStore(StoreSuite):
        @pytest.fixture
        def make_store(self):
            server = start_my_server()
            yield lambda: MyStoreClient(server.address)   # a new client per call
            server.stop()

Each call of ``make_store()`` must return a new client of the same store.

:class:`StoreSuite` includes the bad arguments every store must refuse (NaN or infinite
times to live, no amount): with a :class:`StoreError` (best:
:class:`~elastic_runner.rendezvous.store.StoreArgumentError`; not a timeout),
``TypeError``, ``ValueError`` or ``OverflowError``, changing nothing, and the store
goes on. :class:`StrictStoreSuite` adds what the built-in stores refuse too (negative,
NaN or infinite times anywhere, amounts that are not 64-bit integers, keys and values
that are not text, a string given as a list of keys, ...): a store that checks its
arguments with the ``check_*`` functions of :mod:`elastic_runner.rendezvous.store`
passes it.
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from elastic_runner.rendezvous.store import Store, StoreError, StoreTimeoutError

__all__ = ["StoreSuite", "StrictStoreSuite"]

#: What a refusal may raise (a StoreTimeoutError is not one: it says the wait ran).
REFUSED = (StoreError, TypeError, ValueError, OverflowError)
NAN, INF = math.nan, math.inf

Call = Callable[[Store], object]

#: Refused by every store: (what, call). Nothing may be written under ``bad/``.
BAD_ARGUMENTS: list[tuple[str, Call]] = [
    ("set ttl=nan", lambda s: s.set("bad/k", "v", ttl=NAN)),
    ("set ttl=inf", lambda s: s.set("bad/k", "v", ttl=INF)),
    ("set ttl=-inf", lambda s: s.set("bad/k", "v", ttl=-INF)),
    ("compare_set ttl=nan", lambda s: s.compare_set("bad/k", None, "v", ttl=NAN)),
    ("add amount=None", lambda s: s.add("bad/n", None)),  # type: ignore[arg-type]
]
#: Refused by the built-in stores (:class:`StrictStoreSuite`); not yet by every backend.
STRICT_BAD_ARGUMENTS: list[tuple[str, Call]] = [
    ("set ttl=-1", lambda s: s.set("bad/k", "v", ttl=-1)),
    ("compare_set ttl=-1", lambda s: s.compare_set("bad/k", None, "v", ttl=-1.0)),
    ("refresh ttl=nan", lambda s: s.refresh("ttl/k", NAN)),
    ("refresh ttl=inf", lambda s: s.refresh("ttl/k", INF)),
    ("refresh ttl=-1", lambda s: s.refresh("ttl/k", -1)),
    ("add amount=nan", lambda s: s.add("bad/n", NAN)),  # type: ignore[arg-type]
    ("add amount='1'", lambda s: s.add("bad/n", "1")),  # type: ignore[arg-type]
    ("add amount=1.5", lambda s: s.add("bad/n", 1.5)),  # type: ignore[arg-type]
    ("add amount=True", lambda s: s.add("bad/n", True)),
    ("add amount=2**64", lambda s: s.add("bad/n", 2**64)),
    ("wait_for_change timeout=nan", lambda s: s.wait_for_change("bad/", 0, NAN)),
    ("wait_for_change timeout=inf", lambda s: s.wait_for_change("bad/", 0, INF)),
    ("wait_for_change timeout=-1", lambda s: s.wait_for_change("bad/", 0, -1)),
    ("wait_for_change version=-1", lambda s: s.wait_for_change("bad/", -1, 0.1)),
    ("wait timeout=nan", lambda s: s.wait(["bad/k"], NAN)),
    ("wait timeout=inf", lambda s: s.wait(["bad/k"], INF)),
    ("wait timeout=-1", lambda s: s.wait(["bad/k"], -1)),
    ("wait keys='bad/k'", lambda s: s.wait("bad/k", 0.1)),
    ("set key=1", lambda s: s.set(1, "v")),  # type: ignore[arg-type]
    ("set key=None", lambda s: s.set(None, "v")),  # type: ignore[arg-type]
    ("set value=1", lambda s: s.set("bad/k", 1)),  # type: ignore[arg-type]
    ("set value=None", lambda s: s.set("bad/k", None)),  # type: ignore[arg-type]
    ("get key=1", lambda s: s.get(1)),  # type: ignore[arg-type]
    ("compare_set expected=1", lambda s: s.compare_set("bad/k", 1, "v")),  # type: ignore[arg-type]
    ("compare_set desired=None", lambda s: s.compare_set("bad/k", None, None)),  # type: ignore[arg-type]
    ("delete key=1", lambda s: s.delete(1)),  # type: ignore[arg-type]
    ("delete_prefix prefix=None", lambda s: s.delete_prefix(None)),  # type: ignore[arg-type]
    ("scan prefix=1", lambda s: s.scan(1)),  # type: ignore[arg-type]
    ("multi_get keys='bad/k'", lambda s: s.multi_get("bad/k")),
    ("multi_get keys=[1]", lambda s: s.multi_get([1])),  # type: ignore[list-item]
    ("multi_set items={'bad/k': 1}", lambda s: s.multi_set({"bad/k": 1})),  # type: ignore[dict-item]
    ("multi_set items=[pairs]", lambda s: s.multi_set([("bad/k", "v")])),  # type: ignore[arg-type]
]

MakeStore = Callable[[], Store]


class StoreSuite:
    """Subclass and provide a ``make_store`` fixture. ``TTL`` is a time to live the store
    honours precisely enough (etcd's leases have a floor of about 2 s)."""

    TTL: float = 0.3

    @pytest.fixture
    def store(self, make_store: MakeStore) -> Store:
        return make_store()

    def test_set_get_delete(self, store: Store) -> None:
        assert store.get("k") is None
        store.set("k", "v1")
        assert store.get("k") == "v1"
        store.set("k", "v2")
        assert store.get("k") == "v2"
        assert store.delete("k") is True
        assert store.delete("k") is False
        assert store.get("k") is None

    def test_values_are_text_round_trips(self, store: Store) -> None:
        value = '{"json": [1, 2], "unicode": "\u00e9\u4e2d"}'
        store.set("j", value)
        assert store.get("j") == value

    def test_add_counts_from_zero(self, make_store: MakeStore) -> None:
        a, b = make_store(), make_store()
        assert a.add("n", 1) == 1
        assert b.add("n", 5) == 6
        assert a.add("n", -2) == 4

    def test_compare_set(self, store: Store) -> None:
        assert store.compare_set("c", None, "first") == (True, "first")
        assert store.compare_set("c", None, "again") == (False, "first")
        assert store.compare_set("c", "wrong", "x") == (False, "first")
        assert store.compare_set("c", "first", "second") == (True, "second")

    def test_compare_set_has_one_winner(self, make_store: MakeStore) -> None:
        wins: list[bool] = []
        lock = threading.Lock()

        def race(i: int) -> None:
            done, _ = make_store().compare_set("race", None, str(i))
            with lock:
                wins.append(done)

        threads = [threading.Thread(target=race, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert wins.count(True) == 1

    def test_delete_prefix(self, store: Store) -> None:
        store.multi_set({"job/a": "1", "job/b/c": "2", "jobs": "3"})
        assert store.delete_prefix("job/") == 2
        assert store.multi_get(["job/a", "job/b/c", "jobs"]) == [None, None, "3"]

    def test_multi_get_set_and_scan(self, store: Store) -> None:
        store.multi_set({"p/a": "1", "p/b": "2", "q/c": "3"})
        assert store.multi_get(["p/a", "nope", "q/c"]) == ["1", None, "3"]
        found, version = store.scan("p/")
        assert found == {"p/a": "1", "p/b": "2"}
        assert version > 0

    def test_ttl_key_expires_unless_refreshed(self, store: Store) -> None:
        ttl = self.TTL
        store.set("alive/a", "1", ttl=ttl)
        store.set("alive/b", "1", ttl=ttl)
        deadline = time.monotonic() + 3 * ttl
        while time.monotonic() < deadline and store.get("alive/a") is not None:
            assert store.refresh("alive/b", ttl)  # b keeps its key alive
            time.sleep(ttl / 6)
        assert store.get("alive/a") is None
        assert store.get("alive/b") == "1"
        assert store.refresh("alive/a", ttl) is False

    def test_refresh_does_not_wake_watchers(self, make_store: MakeStore) -> None:
        a, b = make_store(), make_store()
        a.set("hb/a", "1", ttl=5)
        _, version = b.scan("hb/")
        for _ in range(5):
            a.refresh("hb/a", 5)
        with pytest.raises(StoreTimeoutError):
            b.wait_for_change("hb/", version, timeout=0.2)

    def test_wait_for_change_is_notified(self, make_store: MakeStore) -> None:
        watcher, writer = make_store(), make_store()
        _, version = watcher.scan("w/")
        woke: list[float] = []

        def watch() -> None:
            watcher.wait_for_change("w/", version, timeout=10)
            woke.append(time.monotonic())

        thread = threading.Thread(target=watch)
        thread.start()
        time.sleep(0.1)
        writer.set("other/x", "not under the prefix")
        time.sleep(0.1)
        assert not woke
        t0 = time.monotonic()
        writer.set("w/x", "1")
        thread.join(5)
        assert woke and woke[0] - t0 < 0.1  # notified, not polled

    def test_a_wait_returns_past_the_changes_already_made(self, store: Store) -> None:
        # A caller reads the keys once woken and waits again from the version returned:
        # woken again for the changes it has read, N watchers of N changes made N² waits.
        _, version = store.scan("many-changes/")
        store.multi_set({f"many-changes/{i}": "1" for i in range(5)})
        for i in range(5):
            store.delete(f"many-changes/{i}")
        version = store.wait_for_change("many-changes/", version, timeout=5)
        with pytest.raises(StoreTimeoutError):
            store.wait_for_change("many-changes/", version, timeout=0.2)

    def test_expiry_wakes_watchers(self, make_store: MakeStore) -> None:
        a, b = make_store(), make_store()
        a.set("hb/a", "1", ttl=self.TTL)
        _, version = b.scan("hb/")
        t0 = time.monotonic()
        b.wait_for_change("hb/", version, timeout=10 * self.TTL)
        assert self.TTL / 2 < time.monotonic() - t0 < 4 * self.TTL
        assert b.get("hb/a") is None

    def test_waits_time_out(self, store: Store) -> None:
        _, version = store.scan("never/")
        t0 = time.monotonic()
        with pytest.raises(StoreTimeoutError):
            store.wait_for_change("never/", version, timeout=0.2)
        with pytest.raises(StoreTimeoutError):
            store.wait(["never/k"], timeout=0.2)
        assert time.monotonic() - t0 < 2

    def test_wait_returns_when_keys_exist(self, make_store: MakeStore) -> None:
        a, b = make_store(), make_store()
        writer = threading.Timer(0.1, lambda: b.multi_set({"k1": "1", "k2": "2"}))
        writer.start()
        a.wait(["k1", "k2"], timeout=5)
        assert a.multi_get(["k1", "k2"]) == ["1", "2"]
        # its answer may still be on the way: closing b under it failed the writer's thread
        writer.join(5)

    def test_a_blocked_waiter_does_not_block_its_client(self, make_store: MakeStore) -> None:
        client = make_store()
        _, version = client.scan("z/")
        thread = threading.Thread(
            target=lambda: _ignore(client.wait_for_change, "z/", version, timeout=2)
        )
        thread.start()
        time.sleep(0.05)
        t0 = time.monotonic()
        client.set("y", "1")  # same client, another thread
        assert time.monotonic() - t0 < 0.5
        client.set("z/done", "1")
        thread.join(5)

    # -- close ----------------------------------------------------------------------------

    #: Whether ``close`` ends this client's waits and refuses its later requests (not so
    #: for a store whose "clients" are one shared object, the in-memory store).
    CLOSE_IS_FINAL: bool = True

    def test_close_ends_a_wait_and_opens_nothing_after(self, make_store: MakeStore) -> None:
        """A rendezvous closes its store while its watcher thread waits in it: the wait
        ends (within 2 s), and neither that thread nor a later call opens a connection
        again. One that did was left open in the caller's process (a launch's caller saw
        a socket stay open after it returned)."""
        if not self.CLOSE_IS_FINAL:
            pytest.skip("close is not final for this store")
        before = _sockets()
        client = make_store()
        _, version = client.scan("close/")
        ended: list[BaseException | None] = []

        def wait() -> None:
            try:
                client.wait_for_change("close/", version, timeout=20)
                ended.append(None)
            except BaseException as exc:
                ended.append(exc)

        thread = threading.Thread(target=wait, daemon=True)
        thread.start()
        time.sleep(0.2)  # inside the wait
        t0 = time.monotonic()
        client.close()
        thread.join(5)
        assert not thread.is_alive(), "a wait went on after close"
        assert time.monotonic() - t0 < 2.0
        assert ended and isinstance(ended[0], StoreError), ended
        with pytest.raises(StoreError):
            client.set("close/after", "1")
        deadline = time.monotonic() + 3
        while (left := _sockets() - before) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not left, f"sockets left open after close: {sorted(left)}"

    # -- refresh_many (optional: refresh_keys falls back to refresh per key) ------------

    @staticmethod
    def _refresh_many(store: Store) -> Callable[[list[str], float], list[bool]]:
        many = getattr(store, "refresh_many", None)
        if many is None:
            pytest.skip("this store has no refresh_many")
        return many  # type: ignore[no-any-return]

    def test_count_counts_the_keys_under_a_prefix(self, store: Store) -> None:
        count = getattr(store, "count", None)
        if count is None:  # optional: the rendezvous counts a scan's keys instead
            pytest.skip("this store has no count")
        store.multi_set({"cnt/a/1": "x", "cnt/a/2": "y", "cnt/ab": "z", "cnt/b/1": "w"})
        store.set("cnt/a/3", "v", ttl=self.TTL)
        assert [count(p) for p in ("cnt/a/", "cnt/a", "cnt/", "cnt/none/")] == [3, 4, 5, 0]
        store.delete("cnt/a/1")
        assert count("cnt/a/") == 2

    def test_refresh_many_refreshes_present_keys(self, store: Store) -> None:
        refresh_many = self._refresh_many(store)
        ttl = self.TTL
        store.set("many/a", "1", ttl=ttl)
        store.set("many/b", "2", ttl=ttl)
        store.set("many/gone", "3", ttl=ttl)
        deadline = time.monotonic() + 3 * ttl
        while time.monotonic() < deadline and store.get("many/gone") is not None:
            found = refresh_many(["many/a", "many/missing", "many/b"], ttl)
            assert list(found) == [True, False, True]
            time.sleep(ttl / 6)
        assert store.get("many/gone") is None  # not refreshed: expired meanwhile
        assert store.multi_get(["many/a", "many/b", "many/missing"]) == ["1", "2", None]
        assert list(refresh_many(["many/gone", "many/a"], ttl)) == [False, True]
        assert list(refresh_many([], ttl)) == []
        assert store.get("many/missing") is None  # a refresh creates nothing

    def test_refresh_many_does_not_wake_watchers(self, make_store: MakeStore) -> None:
        a, b = make_store(), make_store()
        refresh_many = self._refresh_many(a)
        a.set("hbm/a", "1", ttl=5)
        a.set("hbm/b", "1", ttl=5)
        _, version = b.scan("hbm/")
        for _ in range(5):
            assert list(refresh_many(["hbm/a", "hbm/b", "hbm/c"], 5)) == [True, True, False]
        with pytest.raises(StoreTimeoutError):
            b.wait_for_change("hbm/", version, timeout=0.2)

    # -- bad arguments: refused, nothing changes, the store goes on ------------------------

    @pytest.mark.parametrize(("what", "call"), BAD_ARGUMENTS, ids=[w for w, _ in BAD_ARGUMENTS])
    def test_refuses_bad_arguments(self, store: Store, what: str, call: Call) -> None:
        _assert_refused(store, what, call, self.TTL)


class StrictStoreSuite(StoreSuite):
    """:class:`StoreSuite` plus the stricter argument checks of the built-in stores."""

    @pytest.mark.parametrize(
        ("what", "call"), STRICT_BAD_ARGUMENTS, ids=[w for w, _ in STRICT_BAD_ARGUMENTS]
    )
    def test_refuses_bad_arguments_strictly(self, store: Store, what: str, call: Call) -> None:
        _assert_refused(store, what, call, self.TTL)

    @pytest.mark.parametrize(
        ("what", "call"),
        [
            ("refresh_many ttl=nan", lambda m: m(["ttl/k"], NAN)),
            ("refresh_many ttl=inf", lambda m: m(["ttl/k"], INF)),
            ("refresh_many ttl=-1", lambda m: m(["ttl/k"], -1.0)),
            ("refresh_many keys='ttl/k'", lambda m: m("ttl/k", 1.0)),
            ("refresh_many keys=[1]", lambda m: m([1], 1.0)),
        ],
        ids=lambda x: x if isinstance(x, str) else "",
    )
    def test_refresh_many_refuses_bad_arguments(
        self, store: Store, what: str, call: Callable[[Any], object]
    ) -> None:
        many = StoreSuite._refresh_many(store)
        _assert_refused(store, what, lambda s: call(many), self.TTL)


def _assert_refused(store: Store, what: str, call: Call, ttl: float) -> None:
    """``call(store)`` raises one of :data:`REFUSED` (within 5 s: a wait that accepted an
    infinite timeout must not hang the suite), writes nothing under ``bad/``, and the
    store answers afterwards."""
    store.set("ttl/k", "1", ttl=max(10 * ttl, 5.0))
    store.set("bad/n", "7")
    outcome: list[BaseException | None] = []

    def attempt() -> None:
        try:
            call(store)
        except BaseException as exc:
            outcome.append(exc)
        else:
            outcome.append(None)

    thread = threading.Thread(target=attempt, daemon=True)
    thread.start()
    thread.join(5)
    assert outcome, f"{what}: not refused (still waiting after 5 s)"
    assert outcome[0] is not None, f"{what}: accepted"
    refusal = outcome[0]
    assert isinstance(refusal, REFUSED) and not isinstance(refusal, StoreTimeoutError), (
        f"{what}: {type(refusal).__name__}: {refusal}"
    )
    assert store.get("bad/k") is None, f"{what}: written anyway"
    assert store.get("bad/n") == "7", f"{what}: changed the counter"
    store.set("after", what)  # the store (and this client) goes on
    assert store.get("after") == what


def _sockets() -> set[str]:
    """The sockets this process has open (``socket:[inode]``)."""
    found = set()
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/self/fd/{fd}")
            if target.startswith("socket:"):
                found.add(target)
    return found


def _ignore(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
    with contextlib.suppress(StoreTimeoutError):
        fn(*args, **kwargs)
