"""The :class:`~elastic_runner.rendezvous.store.Store` on etcd's v3 API, over gRPC
(:mod:`elastic_runner.rendezvous.etcd_grpc`) or through etcd's JSON gateway
(:mod:`elastic_runner.rendezvous.etcd_http`): the same requests either way.

- Liveness is a lease: a TTL key is put with its own lease and :meth:`EtcdStore.refresh`
  is a lease keep-alive, which changes no key (watchers stay asleep); when a node dies
  its lease expires and etcd deletes the key.
- Every compare-and-set is a transaction on the key's ``mod_revision``.
- Waiting is a watch from a revision, never a poll.
- Several endpoints: a request that cannot reach one tries the next.
- TLS (``ca_cert``, ``cert``, ``key``) and user/password authentication.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import logging
import math
import ssl
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, Union

from elastic_runner.rendezvous.etcd_http import EndpointUnreachable, EtcdEndpoint, EtcdHTTPError
from elastic_runner.rendezvous.store import (
    StoreError,
    StoreTimeoutError,
    StoreUnavailableError,
    check_keys,
)

if TYPE_CHECKING:
    from elastic_runner.rendezvous.etcd_grpc import EtcdGrpcEndpoint

__all__ = ["APIS", "EtcdStore", "grpc_available"]

#: How a client may reach etcd: its JSON gateway, or gRPC (with ``grpcio``).
APIS = ("http", "grpc")
#: One endpoint's client, either way.
Endpoint = Union["EtcdEndpoint", "EtcdGrpcEndpoint"]

log = logging.getLogger(__name__)
T = TypeVar("T")


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def _unb64(data: str) -> str:
    return base64.b64decode(data).decode()


def _range_end(prefix: str) -> str:
    raw = bytearray(prefix.encode())
    raw[-1] += 1
    return base64.b64encode(bytes(raw)).decode()


class EtcdStore:
    """A store under ``namespace`` in an etcd cluster reached at ``endpoints``."""

    def __init__(
        self,
        endpoints: Sequence[tuple[str, int]],
        *,
        namespace: str = "/elastic-runner/",
        ca_cert: str | None = None,
        cert: str | None = None,
        key: str | None = None,
        user: str | None = None,
        password: str | None = None,
        timeout: float = 10.0,
        api: str = "http",
    ) -> None:
        """``api``: ``http`` (etcd's JSON gateway) or ``grpc`` (needs ``grpcio``)."""
        if api not in APIS:
            raise ValueError(f"api: {api!r}, not one of {', '.join(APIS)}")
        if api == "grpc" and _grpc_endpoint() is None:
            raise StoreError("etcd over gRPC needs grpcio: pip install grpcio")
        #: ``grpc`` or ``http``: how this client reaches etcd.
        self.api = api
        self._endpoints = list(endpoints)
        self._ns = namespace
        self._ca_cert, self._cert, self._key = ca_cert, cert, key
        self._auth = (user, password) if user else None
        self._timeout = timeout
        self._current = 0
        self._lock = threading.Lock()
        self._leases: dict[str, int] = {}  # key -> lease id of its TTL
        self._clients: dict[int, Endpoint] = {}
        #: Set by ``close``: no request after it (a watcher thread still waiting would
        #: otherwise open a connection that outlives the client).
        self._closed = False

    @property
    def address(self) -> str:
        return ",".join(f"{h}:{p}" for h, p in self._endpoints)

    # -- transport ----------------------------------------------------------------------

    def _client(self, index: int) -> Endpoint:
        if self._closed:
            raise StoreError(f"the client of etcd at {self.address} is closed")
        with self._lock:
            client = self._clients.get(index)
        if client is not None:
            return client
        host, port = self._endpoints[index]
        client = self._endpoint(host, port)
        try:
            self._authenticate(client)
        except BaseException:
            client.close()
            raise
        with self._lock:
            if self._closed:
                client.close()
                raise StoreError(f"the client of etcd at {self.address} is closed")
            return self._clients.setdefault(index, client)

    def _endpoint(self, host: str, port: int) -> Endpoint:
        if self.api == "http":
            return EtcdEndpoint(host, port, timeout=self._timeout, ssl_context=self._tls())
        grpc_endpoint = _grpc_endpoint()
        assert grpc_endpoint is not None  # checked when made
        if not (self._ca_cert or self._cert):
            return grpc_endpoint(host, port, timeout=self._timeout)
        files = {}
        for name, path in (("ca_cert", self._ca_cert), ("cert", self._cert), ("key", self._key)):
            try:
                files[name] = Path(path).read_bytes() if path else None
            except OSError as exc:
                raise StoreError(
                    f"etcd at {self.address}: cannot read rdzv.{name} {path}: {exc.strerror}"
                ) from None
        return grpc_endpoint(host, port, timeout=self._timeout, **files)

    def _authenticate(self, client: Endpoint) -> None:
        """Get a token for ``client`` (with ``user`` and ``password``; else nothing)."""
        if self._auth:
            name, password = self._auth
            client.authenticate(name, password or "")

    def _tls(self) -> ssl.SSLContext | None:
        """The TLS context (None: plain HTTP): etcd's CA (else the system's), and a
        client certificate if given."""
        if not (self._ca_cert or self._cert):
            return None
        try:
            context = ssl.create_default_context(cafile=self._ca_cert)
            if self._cert:
                context.load_cert_chain(self._cert, self._key)
        except OSError as exc:  # ssl.SSLError too: a file missing, unreadable or not PEM
            raise StoreError(
                f"etcd at {self.address}: cannot load rdzv.ca_cert, rdzv.cert or rdzv.key: {exc}"
            ) from None
        return context

    def _call(self, fn: Callable[[Endpoint], T]) -> T:
        """Run ``fn(endpoint)`` on the current endpoint, failing over to the next ones."""
        errors = []
        for attempt in range(len(self._endpoints)):
            index = (self._current + attempt) % len(self._endpoints)
            try:
                client = self._client(index)
                try:
                    result = fn(client)
                except EtcdHTTPError as exc:
                    # etcd forgets its simple tokens when it restarts: get another, once
                    # (a request refused for its token was not carried out)
                    if not (self._auth and "invalid auth token" in str(exc)):
                        raise
                    self._authenticate(client)
                    result = fn(client)
                self._current = index
                return result
            except EndpointUnreachable as exc:  # that thread's connection is gone with it
                host, port = self._endpoints[index]
                detail = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
                errors.append(f"{host}:{port}: {detail or 'connection failed'}")
            except EtcdHTTPError as exc:
                raise StoreError(f"etcd at {self.address}: {exc}") from None
        raise StoreUnavailableError(
            f"cannot reach etcd at any of {self.address} ({'; '.join(errors)})"
        )

    def _post(self, path: str, body: Mapping[str, Any]) -> Any:
        return self._call(lambda c: c.post(path, body))

    def _k(self, key: str) -> str:
        return self._ns + key

    # -- the Store ----------------------------------------------------------------------

    def _put_op(self, key: str, value: str, ttl: float | None) -> dict[str, Any]:
        op: dict[str, Any] = {"key": _b64(self._k(key)), "value": _b64(value)}
        if ttl is not None:
            grant = self._post("/lease/grant", {"TTL": max(1, math.ceil(ttl))})
            lease = int(grant["ID"])
            op["lease"] = lease
            with self._lock:  # a replaced lease just expires: it holds no key any more
                self._leases[key] = lease
        return op

    def _with_lease(self, put: Callable[[], T]) -> T:
        """``put()``, which grants a lease and writes with it, again with a new lease when
        etcd no longer knows the one it got: on a loaded etcd (512 nodes joining on 2
        cores) a write can reach it after the lease just granted expired."""
        for _ in range(2):
            try:
                return put()
            except StoreError as exc:
                if isinstance(exc, StoreUnavailableError) or "lease not found" not in str(exc):
                    raise
        return put()

    def set(self, key: str, value: str, ttl: float | None = None) -> None:
        self._with_lease(lambda: self._post("/kv/put", self._put_op(key, value, ttl)))

    def set_tied(self, key: str, value: str, owner: str, ttl: float) -> None:
        """Set ``key`` on the lease of ``owner`` (a TTL key this client set): it lives
        and is refreshed with it, and a heartbeat keeps both alive with one keep-alive.
        Without such a lease (``owner`` not set here, deleted, or its lease gone), a
        ``set`` with a lease of its own."""
        with self._lock:
            lease = self._leases.get(owner)
        if lease is not None:
            op = {"key": _b64(self._k(key)), "value": _b64(value), "lease": lease}
            try:
                self._post("/kv/put", op)
            except StoreError as exc:
                if isinstance(exc, StoreUnavailableError) or "lease not found" not in str(exc):
                    raise
            else:
                with self._lock:
                    self._leases[key] = lease
                return
        self.set(key, value, ttl)

    def refresh(self, key: str, ttl: float) -> bool:
        lease = self._leases.get(key)
        if lease is None:
            return False
        return self._keep_alive(lease)

    def refresh_many(self, keys: Sequence[str], ttl: float) -> list[bool]:
        """:meth:`refresh` of each of ``keys``: one keep-alive per lease, so keys set
        with :meth:`set_tied` cost nothing more."""
        keys = check_keys(keys)
        with self._lock:
            leases = [self._leases.get(key) for key in keys]
        alive = {lease: self._keep_alive(lease) for lease in dict.fromkeys(leases) if lease}
        return [bool(lease and alive[lease]) for lease in leases]

    def _keep_alive(self, lease: int) -> bool:
        try:
            answer = self._post("/lease/keepalive", {"ID": lease})
        except StoreUnavailableError:
            raise
        except StoreError:  # etcd answers "Not Found" for a lease that already expired
            return False
        return int(answer.get("result", {}).get("TTL", -1)) > 0

    def _get(self, key: str) -> tuple[str | None, int]:
        """(value, mod_revision); (None, 0) when absent."""
        answer = self._post("/kv/range", {"key": _b64(self._k(key))})
        kvs = answer.get("kvs") or []
        if not kvs:
            return None, 0
        return _unb64(kvs[0].get("value", "")), int(kvs[0]["mod_revision"])

    def get(self, key: str) -> str | None:
        return self._get(key)[0]

    def _txn_put_if(self, key: str, mod_revision: int, op: dict[str, Any]) -> bool:
        """Put ``op`` if ``key`` is still at ``mod_revision`` (0: absent)."""
        compare = {
            "key": _b64(self._k(key)),
            "target": "MOD",
            "result": "EQUAL",
            "mod_revision": mod_revision,
        }
        answer = self._post("/kv/txn", {"compare": [compare], "success": [{"request_put": op}]})
        return bool(answer.get("succeeded"))

    def _put_if(self, key: str, mod_revision: int, value: str, ttl: float | None) -> bool:
        return self._txn_put_if(key, mod_revision, self._put_op(key, value, ttl))

    def add(self, key: str, amount: int) -> int:
        while True:
            value, revision = self._get(key)
            try:
                new = int(value or 0) + amount
            except ValueError:
                raise StoreError(f"add: key {key!r} does not hold an integer") from None
            if self._txn_put_if(key, revision, self._put_op(key, str(new), None)):
                return new

    def compare_set(
        self, key: str, expected: str | None, desired: str, ttl: float | None = None
    ) -> tuple[bool, str | None]:
        if ttl is None:
            return self._compare_set_once(key, expected, desired)
        # A TTL needs a lease, granted only once a read says the put can win: most
        # compare-and-sets of a TTL key lose (N nodes trying to lead a round).
        while True:
            current, revision = self._get(key)
            if current != expected:
                return False, current
            if self._with_lease(functools.partial(self._put_if, key, revision, desired, ttl)):
                return True, desired
            # changed between the read and the transaction: look again

    def _compare_set_once(
        self, key: str, expected: str | None, desired: str
    ) -> tuple[bool, str | None]:
        """A compare-and-set in one transaction, which answers the value on a miss (a
        read and then a transaction took two requests)."""
        k = _b64(self._k(key))
        compare = (
            {"key": k, "target": "CREATE", "result": "EQUAL", "create_revision": 0}
            if expected is None
            else {"key": k, "target": "VALUE", "result": "EQUAL", "value": _b64(expected)}
        )
        answer = self._post(
            "/kv/txn",
            {
                "compare": [compare],
                "success": [{"request_put": {"key": k, "value": _b64(desired)}}],
                "failure": [{"request_range": {"key": k}}],
            },
        )
        if answer.get("succeeded"):
            with self._lock:  # a put without a lease detaches the key from its TTL
                self._leases.pop(key, None)
            return True, desired
        responses = answer.get("responses") or [{}]
        kvs = responses[0].get("response_range", {}).get("kvs") or []
        return False, _unb64(kvs[0].get("value", "")) if kvs else None

    def delete(self, key: str) -> bool:
        answer = self._post("/kv/deleterange", {"key": _b64(self._k(key))})
        with self._lock:
            self._leases.pop(key, None)
        return int(answer.get("deleted", 0)) > 0

    def multi_get(self, keys: Sequence[str]) -> list[str | None]:
        out: list[str | None] = []
        for chunk in _chunks(list(keys)):  # etcd caps a transaction at 128 operations
            ops = [{"request_range": {"key": _b64(self._k(k))}} for k in chunk]
            answer = self._post("/kv/txn", {"success": ops})
            for response in answer.get("responses", []):
                kvs = response.get("response_range", {}).get("kvs") or []
                out.append(_unb64(kvs[0].get("value", "")) if kvs else None)
        return out

    def multi_set(self, items: Mapping[str, str]) -> None:
        for chunk in _chunks(list(items)):
            ops = [{"request_put": self._put_op(k, items[k], None)} for k in chunk]
            self._post("/kv/txn", {"success": ops})

    def scan(self, prefix: str) -> tuple[dict[str, str], int]:
        full = self._k(prefix)
        answer = self._post("/kv/range", {"key": _b64(full), "range_end": _range_end(full)})
        found = {
            _unb64(kv["key"])[len(self._ns) :]: _unb64(kv.get("value", ""))
            for kv in answer.get("kvs") or []
        }
        return found, int(answer["header"]["revision"])

    def count(self, prefix: str) -> int:
        """How many keys are under ``prefix`` (etcd counts them: one small answer)."""
        full = self._k(prefix)
        answer = self._post(
            "/kv/range",
            {"key": _b64(full), "range_end": _range_end(full), "count_only": True},
        )
        return int(answer.get("count", 0))

    def delete_prefix(self, prefix: str) -> int:
        full = self._k(prefix)
        answer = self._post("/kv/deleterange", {"key": _b64(full), "range_end": _range_end(full)})
        return int(answer.get("deleted", 0))

    def wait_for_change(self, prefix: str, version: int, timeout: float) -> int:
        full = self._k(prefix)

        request = {
            "create_request": {
                "key": _b64(full),
                "range_end": _range_end(full),
                "start_revision": version + 1,
            }
        }
        deadline = time.monotonic() + timeout

        def watch(client: Endpoint) -> int:
            # A watch stream of its own, closed when this returns or the store closes.
            messages = client.watch(
                "/watch",
                request,
                # connecting gets at least 0.5 s even for a short wait: a busy etcd is
                # not a lost one (the deadline below decides what a wait is)
                connect_timeout=max(min(timeout, 10.0), 0.5),
                read_timeout=max(timeout, 0.05),
            )
            try:
                for message in messages:
                    events = (message.get("result") or {}).get("events") or ()
                    if events:
                        # The newest change of the batch: a caller reads the keys after
                        # waking, and waiting again from the first would replay the rest
                        # (a round's N join keys going: N² events).
                        return max(int(e["kv"]["mod_revision"]) for e in events)
                    if message.get("error"):
                        raise StoreError(f"etcd at {self.address}: watch: {message['error']}")
                    if time.monotonic() >= deadline:
                        break
            except TimeoutError:
                pass  # the read ran out: the wait did
            except EndpointUnreachable:
                if self._closed:  # close shut the stream down
                    raise StoreError(f"the client of etcd at {self.address} is closed") from None
                raise
            except (ValueError, KeyError, TypeError, AttributeError) as exc:
                raise StoreError(f"etcd at {self.address}: bad watch stream: {exc}") from None
            finally:
                messages.close()
            raise StoreTimeoutError(f"no change under {prefix!r} in {timeout:g} s")

        return int(self._call(watch))

    def wait(self, keys: Sequence[str], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        common = _common_prefix(keys)
        while True:
            # the scan holds every key asked for (they all start with ``common``): one
            # request, not a scan for the version and a read of the keys
            found, version = self.scan(common)
            missing = [k for k in keys if k not in found]
            if not missing:
                return
            left = deadline - time.monotonic()
            if left <= 0:
                raise StoreTimeoutError(f"keys {missing} did not appear in {timeout:g} s")
            with contextlib.suppress(StoreTimeoutError):
                self.wait_for_change(common, version, left)

    def close(self) -> None:
        """Revoke this client's leases (its TTL keys go at once) and drop connections."""
        with self._lock:  # each once: tied keys share their owner's
            leases, self._leases = list(dict.fromkeys(self._leases.values())), {}
        for lease in leases:
            with contextlib.suppress(StoreError):
                self._post("/kv/lease/revoke", {"ID": lease})
        with self._lock:
            self._closed = True
            clients, self._clients = list(self._clients.values()), {}
        for client in clients:
            client.close()  # a thread reading a watch wakes at once


@functools.cache
def _grpc_endpoint() -> type[EtcdGrpcEndpoint] | None:
    """The gRPC endpoint class, or None without ``grpcio``."""
    try:
        from elastic_runner.rendezvous.etcd_grpc import EtcdGrpcEndpoint
    except ImportError:
        return None
    return EtcdGrpcEndpoint


def grpc_available() -> bool:
    """Whether ``grpcio`` can be imported (``api="grpc"`` needs it)."""
    return _grpc_endpoint() is not None


def _chunks(keys: list[str], size: int = 100) -> list[list[str]]:
    return [keys[i : i + size] for i in range(0, len(keys), size)]


def _common_prefix(keys: Sequence[str]) -> str:
    """The longest string every key starts with (keys are strings, not paths)."""
    first, last = min(keys, default=""), max(keys, default="")
    n = 0
    while n < min(len(first), len(last)) and first[n] == last[n]:
        n += 1
    return first[:n]
