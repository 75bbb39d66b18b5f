"""The store conformance suite on a real etcd (v3 API), over gRPC and through its JSON
gateway, plus etcd-only behaviour."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from elastic_runner.rendezvous.etcd_store import EtcdStore
from elastic_runner.rendezvous.kit import parse_endpoints
from elastic_runner.rendezvous.store import StoreError, StoreTimeoutError
from elastic_runner.testing.etcd import EtcdServer
from elastic_runner.testing.store_suite import StoreSuite


@pytest.fixture(params=["grpc", "http"])
def api(request: pytest.FixtureRequest) -> str:
    """Each test over gRPC and through etcd's JSON gateway."""
    value: str = request.param
    return value


def _token(store: EtcdStore) -> str:
    client: Any = store._clients[0]
    if store.api == "grpc":
        return str(dict(client._metadata)["token"])
    return str(client.headers["Authorization"])


def _set_token(store: EtcdStore, token: str) -> None:
    client: Any = store._clients[0]
    if store.api == "grpc":
        client._metadata = (("token", token),)
    else:
        client.headers["Authorization"] = token


class TestEtcdStore(StoreSuite):
    TTL = 2.0

    @pytest.fixture
    def make_store(self, etcd_server: EtcdServer, api: str) -> Iterator[Callable[[], EtcdStore]]:
        stores: list[EtcdStore] = []
        namespace = f"/test-{time.monotonic_ns()}/"

        def make() -> EtcdStore:
            stores.append(
                EtcdStore(parse_endpoints(etcd_server.endpoint, 2379), namespace=namespace, api=api)
            )
            return stores[-1]

        yield make
        for s in stores:
            s.close()


def test_failover_to_a_second_endpoint(etcd_server: EtcdServer, api: str) -> None:
    dead = ("127.0.0.1", 1)
    store = EtcdStore([dead, *parse_endpoints(etcd_server.endpoint, 2379)], api=api)
    store.set("k", "v")
    assert store.get("k") == "v"


def test_unreachable_names_every_endpoint(api: str) -> None:
    store = EtcdStore([("127.0.0.1", 1), ("127.0.0.1", 2)], timeout=1, api=api)
    with pytest.raises(StoreError, match=r"cannot reach etcd at any of 127.0.0.1:1,127.0.0.1:2"):
        store.get("k")


def test_close_revokes_leases_so_ttl_keys_go_at_once(etcd_server: EtcdServer, api: str) -> None:
    endpoints = parse_endpoints(etcd_server.endpoint, 2379)
    a, b = EtcdStore(endpoints, api=api), EtcdStore(endpoints, api=api)
    a.set("alive/x", "1", ttl=60)
    assert b.get("alive/x") == "1"
    a.close()
    assert b.get("alive/x") is None


def test_multi_get_and_set_beyond_etcds_transaction_limit(
    etcd_server: EtcdServer, api: str
) -> None:
    store = EtcdStore(parse_endpoints(etcd_server.endpoint, 2379), api=api)
    items = {f"many/{i:04d}": str(i) for i in range(300)}  # etcd allows 128 ops per txn
    store.multi_set(items)
    assert store.multi_get(list(items)) == list(items.values())


def _count_posts(store: EtcdStore, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The paths of the HTTP requests ``store`` makes from now on."""
    posts: list[str] = []
    post = store._post

    def counting(path: str, body: Mapping[str, Any]) -> Any:
        posts.append(path)
        return post(path, body)

    monkeypatch.setattr(store, "_post", counting)
    return posts


def test_a_wait_for_keys_that_exist_is_one_request(
    etcd_server: EtcdServer, monkeypatch: pytest.MonkeyPatch, api: str
) -> None:
    # A member waits for MASTER_ADDR before reading it: when it is there already, that
    # wait is one range request (it was a range for the version and a read of the keys).
    store = EtcdStore(parse_endpoints(etcd_server.endpoint, 2379), namespace="/wait-one/", api=api)
    store.multi_set({"r0/master": "[1]", "r0/seat": "2", "r0/other": ""})
    posts = _count_posts(store, monkeypatch)
    store.wait(["r0/master", "r0/other"], timeout=5)  # an empty value exists too
    assert posts == ["/kv/range"]
    with pytest.raises(StoreTimeoutError, match="r0/missing"):
        store.wait(["r0/master", "r0/missing"], timeout=0.3)
    store.close()


def test_user_and_password_authentication(etcd_server: EtcdServer, api: str) -> None:
    import urllib.request

    base = f"http://{etcd_server.endpoint}/v3"
    for path, body in (
        ("/auth/user/add", {"name": "root", "password": "pw"}),
        ("/auth/user/grant", {"user": "root", "role": "root"}),
        ("/auth/enable", {}),
    ):
        with urllib.request.urlopen(base + path, json.dumps(body).encode(), timeout=5):
            pass  # an error status raises
    endpoints = parse_endpoints(etcd_server.endpoint, 2379)
    with pytest.raises(StoreError, match=r"user name is empty|permission denied|token"):
        EtcdStore(endpoints, api=api).set("k", "v")  # no credentials: refused, clearly
    store = EtcdStore(endpoints, user="root", password="pw", api=api)
    store.set("k", "v")
    assert store.get("k") == "v"
    # A token etcd no longer knows (simple tokens expire after 5 idle minutes, and may
    # be lost when etcd restarts): the store gets another, once, and goes on.
    _set_token(store, "forgotten.1")
    store.set("k", "with a new token")
    assert _token(store) != "forgotten.1"
    etcd_server.kill()
    etcd_server.start()
    store.set("k", "after a restart")
    assert store.get("k") == "after a restart"
    store.close()


def test_tls_with_a_private_ca(tmp_path: Path, api: str) -> None:
    import subprocess

    from elastic_runner.testing.etcd import etcd_binary

    binary = etcd_binary()
    if binary is None:
        pytest.skip("no etcd binary")

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=tmp_path)

    openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "1",
        "-subj",
        "/CN=test-ca",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
    )
    openssl(
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        "/CN=127.0.0.1",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
    )
    (tmp_path / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    openssl(
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "1",
        "-extfile",
        "san.ext",
        "-out",
        "server.pem",
    )
    server = EtcdServer(
        binary,
        tmp_path / "data",
        tls=(str(tmp_path / "ca.pem"), str(tmp_path / "server.pem"), str(tmp_path / "server.key")),
    )
    server.start()
    try:
        endpoints = parse_endpoints(server.endpoint, 2379)
        store = EtcdStore(endpoints, ca_cert=str(tmp_path / "ca.pem"), api=api)
        store.set("k", "over tls")
        assert store.get("k") == "over tls"
        with pytest.raises(StoreError):  # plain HTTP to a TLS-only etcd fails, clearly
            EtcdStore(endpoints, timeout=2, api=api).get("k")
    finally:
        server.stop()


def test_a_short_wait_runs_out_as_a_timeout_not_as_a_lost_etcd(
    etcd_server: EtcdServer, api: str
) -> None:
    """A rendezvous's last call can leave a wait of a millisecond: it must end as a
    timeout (retried), never as "cannot reach etcd" (which fails the round); and the
    watch's connection is closed when the wait ends, not left to the garbage collector."""
    store = EtcdStore(parse_endpoints(etcd_server.endpoint, 2379), api=api)
    try:
        _, version = store.scan("p/")
        before = sorted(os.listdir("/proc/self/fd"))
        for timeout in (0.001, 0.01, 0.1) * 5:
            with pytest.raises(StoreTimeoutError):
                store.wait_for_change("p/", version, timeout)
        # none left open (the pooled connection a watch took is closed with it)
        assert len(os.listdir("/proc/self/fd")) <= len(before)
    finally:
        store.close()


def test_a_put_whose_new_lease_is_gone_gets_another(
    etcd_server: EtcdServer, monkeypatch: pytest.MonkeyPatch, api: str
) -> None:
    # On a loaded etcd a write can arrive after the lease granted for it expired: etcd
    # answers "requested lease not found", and 9 of 512 joining nodes failed on it.
    store = EtcdStore(
        parse_endpoints(etcd_server.endpoint, 2379), namespace="/lease-gone/", api=api
    )
    grant = store._put_op
    lost: list[int] = []

    def expiring(key: str, value: str, ttl: float | None) -> dict[str, object]:
        op = grant(key, value, ttl)
        if ttl is not None and len(lost) < 2:  # the first two leases expire at once
            lost.append(int(op["lease"]))
            store._post("/kv/lease/revoke", {"ID": op["lease"]})
        return op

    monkeypatch.setattr(store, "_put_op", expiring)
    try:
        store.set("alive/a", "1", ttl=30)
        assert store.get("alive/a") == "1" and len(lost) == 2
        lost.clear()
        assert store.compare_set("lead", None, "a", ttl=30) == (True, "a")
        assert store.get("lead") == "a" and len(lost) == 2
        assert store.refresh("lead", 30)  # on the lease that lived
    finally:
        store.close()


def test_a_key_tied_to_another_lives_and_is_refreshed_with_it(
    etcd_server: EtcdServer, monkeypatch: pytest.MonkeyPatch, api: str
) -> None:
    # A node's join key rides on its liveness key's lease: its heartbeat keeps both with
    # one keep-alive (two before), and a round costs one lease grant less per node.
    store = EtcdStore(parse_endpoints(etcd_server.endpoint, 2379), namespace="/tied/", api=api)
    other = EtcdStore(parse_endpoints(etcd_server.endpoint, 2379), namespace="/tied/", api=api)
    try:
        store.set("alive/a", "1", ttl=2)
        posts = _count_posts(store, monkeypatch)
        store.set_tied("join/a", "x", "alive/a", 2)
        assert posts == ["/kv/put"]  # no lease granted for it
        posts.clear()
        assert store.refresh_many(["alive/a", "join/a", "never/set"], 2) == [True, True, False]
        assert posts == ["/lease/keepalive"]  # one lease, one keep-alive
        assert store.refresh("join/a", 2)
        store.set_tied("join/b", "y", "not/set/here", 2)  # no owner: a lease of its own
        assert posts[-2:] == ["/lease/grant", "/kv/put"]
        store.delete("join/a")  # the owner's lease goes on
        assert store.refresh_many(["alive/a", "join/a"], 2) == [True, False]
        store.set_tied("join/a", "x", "alive/a", 2)
        # neither refreshed: both go when the one lease expires
        t0 = time.monotonic()
        while other.get("alive/a") is not None and time.monotonic() - t0 < 10:
            time.sleep(0.1)
        assert other.multi_get(["alive/a", "join/a"]) == [None, None]
        assert time.monotonic() - t0 < 5
    finally:
        store.close()
        other.close()


class _LosesWatches:
    """A gRPC channel whose first ``lose`` watch calls fail as grpcio fails a call it
    could not send (INTERNAL "Internal error from Core"); everything else goes to the
    real channel."""

    def __init__(self, channel: Any, lose: int) -> None:
        self._channel, self.lose, self.watches = channel, lose, 0

    def unary_unary(self, *args: Any, **kwargs: Any) -> Any:
        return self._channel.unary_unary(*args, **kwargs)

    def stream_stream(self, method: str, **kwargs: Any) -> Any:
        make = self._channel.stream_stream(method, **kwargs)
        if not method.endswith("/Watch"):
            return make
        self.watches += 1
        if self.watches > self.lose:
            return make
        import grpc.aio

        class _Unsent:
            async def read(self) -> Any:
                raise grpc.aio.AioRpcError(
                    grpc.StatusCode.INTERNAL,
                    grpc.aio.Metadata(),
                    grpc.aio.Metadata(),
                    details="Internal error from Core",
                    debug_error_string='Failed "execute_batch": (SendMessageOperation)',
                )

            def cancel(self) -> bool:
                return True

        return lambda *args, **kwargs: _Unsent()


def test_a_watch_grpcio_could_not_send_is_sent_again(etcd_server: EtcdServer) -> None:
    """Under load grpcio may fail a watch it could not send (the call ended first) with
    INTERNAL "Internal error from Core"; a join failed as "cannot reach etcd" for it.
    The watch is sent again and sees the change; one that keeps failing is a timeout
    (the caller waits again), never a lost etcd."""
    store = EtcdStore(parse_endpoints(etcd_server.endpoint, 2379), api="grpc")
    try:
        _, version = store.scan("w/")
        client: Any = store._clients[0]
        channel = client._channel
        client._channel = lossy = _LosesWatches(channel, lose=2)
        store.set("w/a", "1")
        assert store.wait_for_change("w/", version, 10.0) > version
        assert lossy.watches == 3

        client._channel = lossy = _LosesWatches(channel, lose=10**6)
        started = time.monotonic()
        with pytest.raises(StoreTimeoutError):
            store.wait_for_change("w/", version + 100, 0.5)
        assert time.monotonic() - started < 2.0
        assert 2 <= lossy.watches < 20  # sent again, backing off, not spun on
        client._channel = channel
    finally:
        store.close()
